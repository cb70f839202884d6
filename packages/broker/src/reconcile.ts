// Reconcile at start: the lease table made true to the kernel and to Open vSwitch after the broker was
// down (crashed mid-create, its holders gone, its table lost). Runs once, before the first request; a
// request never runs through it (lost link events at run time are Lifetimes.resync's).
import { TapbrokerError, macFromBuffer, macToBuffer, sys } from '@tapbroker/protocol/core';
import { auditOp, type Audit, type AuditEvent } from './audit.js';
import type { Policy } from './decide.js';
import type { Kernel } from './kernel.js';
import {
  KERNEL_KIND, aliasBroker, aliasIdentity, kernelBound, leaseFromAlias, leaseView, processStartTime,
  type LeaseRecord, type LeaseTable,
} from './leases.js';
import { getpwuid } from './libc.js';
import { Forwarding } from './forwarding.js';
import { shown } from './naming.js';
import { namedDbs, plugOf, type ForeignPorts } from './plug.js';
import { currentBoot, delPortOf, listPorts, ovsdbGone, type OvsPort } from './ovs.js';
import type { Link } from './rtnetlink.js';

/** How a deletion without a lease is recorded, where not as a cleanup. */
export type DeletedAs = Partial<Pick<AuditEvent, 'op' | 'decision' | 'rule' | 'device'>>;

/** What reconcile needs of the lease lifetimes (Lifetimes.start hands it over). */
export interface Keeper {
  readonly table: LeaseTable;
  readonly kernel: Kernel;
  readonly audit: Audit;
  /** False when the table file was missing or unreadable: tagged devices then rebuild their leases. */
  readonly trusted: boolean;
  /** The table was read whole, whoever wrote it (see LeaseTable.load). */
  readonly intact: boolean;
  readonly brokerId: string;
  policy(): Policy;
  log(line: string): void;
  /** Holds a live lease's device to its terms (Lifetimes.judge). */
  judge(l: LeaseRecord, link: Link | null): void;
  isDevice(l: LeaseRecord, link: Link | null | undefined): link is Link;
  note(
    op: AuditEvent['op'], decision: AuditEvent['decision'], l: LeaseRecord, message: string, x?: Partial<AuditEvent>,
  ): void;
  deleteLink(ifindex: number, uid: number, name: string, why: string, as?: DeletedAs): Promise<void>;
  watchHolder(ids: readonly string[], pidfd: number): void;
  endLease(id: string, reason: string): void;
  retire(l: LeaseRecord, o: { op: AuditEvent['op']; decision: 'cleanup'; message: string }): Promise<void>;
  /** A followed lease's port as its link shows it: off its bridge, kept and followed (Forwarding.followPort). */
  followPort(l: LeaseRecord, link: Link): void;
  /** Undoes a device's OVS port or runs its hook's `down` (Lifetimes.unplug). */
  unplug(l: LeaseRecord): void;
  /** The names of the Open vSwitch ports that are not this broker's, kept from new devices. */
  readonly foreign: ForeignPorts;
  /** Clears a lease's tag from a device no longer its (renamed by root): never taken for an orphan of it. */
  renounce(l: LeaseRecord, link: Link): void;
}

const RECONCILE = { op: 'reconcile', decision: 'reconcile' } as const;

/**
 * At start: devices the broker died while making are deleted; leases whose device is gone dropped;
 * devices whose holder exited while the broker was down deleted; holders still running watched;
 * persistent devices kept. Devices without our tag are never touched.
 */
export function reconcile(lt: Keeper): void {
  const links = lt.kernel.links();
  const byName = new Map(links.map((k) => [k.name, k]));
  // Deletions the last run did not record: it was killed while the kernel deleted the device (an outside review
  // found 4 in 30 kills). Recorded now, if the device is gone; one still there is deleted, and recorded, below.
  // Ids the last run was deleting: never taken back from a tag, whoever wrote the table (a re-test).
  const retired = new Set(lt.table.retiring.keys());
  for (const [id, r] of lt.table.retiring) {
    if (!links.some((k) => aliasIdentity(k.alias)?.id === id)) {
      lt.audit.record({
        op: auditOp(r.op), decision: r.decision, rule: r.lease.rule, caller: { uid: r.lease.uid },
        device: leaseView(r.lease),
        // The last run may have written its record just before it stopped (an outside review's kills between the
        // record and the table write): said so, and documented (count an end once, by its lease).
        message: `${r.message} (recorded at this start: the broker stopped while deleting it; a record of this end `
          + 'may precede this one)',
      });
    }
    lt.table.retiring.delete(id);
  }
  // Leases written mid-create: the broker stopped before the grant, so the client was told nothing was made
  // (its connection closed). Their devices go, as a failed create's do, and their networks' `down`s run.
  // Leases that ended (a release, a deletion) before their network's `down` had run; read before the rollbacks
  // below add theirs, which those rollbacks run themselves.
  const owed = new Map(lt.table.owedDowns().map((l) => [l.id, l]));
  const interrupted = new Set(lt.table.unfinished());
  for (const id of interrupted) {
    const l = lt.table.get(id);
    if (!l) continue;
    void lt.retire(l, {
      op: 'reconcile', decision: 'cleanup', message: 'its create was cut short by the broker\'s stop: rolled back',
    }).catch(() => {});
  }
  // A macvtap intended but perhaps never tagged: the device of that name, on that parent, with that
  // MAC, untagged or tagged with that lease, is the one we were making.
  const undone = new Set<string>();
  for (const i of lt.table.unsettled()) {
    const link = byName.get(i.name);
    const parent = byName.get(i.parent);
    const ours =
      link &&
      parent &&
      link.kind === 'macvtap' &&
      link.link === parent.index &&
      link.address &&
      macFromBuffer(link.address) === i.mac &&
      (link.alias === null || leaseFromAlias(link.alias, link)?.id === i.id);
    if (ours && !lt.table.get(i.id)) {
      // Deleted here, not again by its tag below (a re-test counted two records of its end).
      undone.add(i.id);
      void lt.deleteLink(link.index, 0, i.name, 'a macvtap the broker died while creating', {
        ...RECONCILE,
        device: { name: i.name, ifindex: link.index, parent: i.parent, mac: i.mac, id: i.id, lease: i.id },
      });
    }
    lt.table.settle(i.id, false);
  }
  // Devices that carry our tag but have no lease: taps their fds keep alive (kept in memory only, so
  // taken back from their tag), orphans of a crash mid-create or mid-release when the table is intact
  // (deleted), or leases to rebuild when it was lost or corrupt.
  const adopted: Array<[LeaseRecord, Link]> = [];
  const seen = new Set<string>();
  const others = new Map<string, string[]>();
  for (const link of links) {
    const who = aliasIdentity(link.alias);
    if (!who || lt.table.get(who.id) || interrupted.has(who.id) || link.kind !== KERNEL_KIND[who.kind]) continue;
    if (undone.has(who.id)) continue;
    // Another broker's device (another state directory in this namespace): never ours to touch.
    const by = aliasBroker(link.alias);
    if (by !== null && by !== lt.brokerId) {
      others.set(by, [...(others.get(by) ?? []), link.name]);
      continue;
    }
    seen.add(who.id);
    // Its lease was lost with an unreadable table, and its tag cannot rebuild it: left alone, every start.
    if (lt.table.kept.has(who.id)) continue;
    const ended = owed.get(who.id);
    if (ended && ended.ifindex === link.index) {
      // The broker stopped while deleting it: the device goes, then its network's `down` runs.
      owed.delete(who.id);
      const why = 'a device the broker stopped while deleting (then unplugged from its network)';
      const as = { ...RECONCILE, rule: ended.rule, device: leaseView(ended) };
      void lt.deleteLink(link.index, who.uid, link.name, why, as).then(() => lt.unplug(ended));
      continue;
    }
    const rebuilt = replug(withUser(leaseFromAlias(link.alias, link)), lt.policy());
    const tagged = rebuilt && guestOf(lt, rebuilt, link);
    // Taken back: leases never written (they go with their fds), and where the table may lack a lease: lost with it,
    // or, in a whole table another version wrote, a tap that goes with its fds (one version kept such taps in memory
    // only, another wrote them: an outside review's downgrade and back). Never one the last run was deleting.
    const fdBound = tagged?.kind === 'tap' && tagged.ends === 'fds';
    const mayBeMissing = !lt.trusted && (!lt.intact || fdBound);
    if (tagged && !retired.has(who.id) && (kernelBound(tagged, true) || mayBeMissing)) {
      try {
        lt.table.add(tagged, !kernelBound(tagged, true));
      } catch (err) {
        // A state directory that cannot be written does not stop the start (it says so below): in memory.
        lt.table.add(tagged, false);
        lt.log(`warning: the lease of \`${link.name}' is kept in memory only: ${(err as Error).message}`);
      }
      // The tag names the network, not how the device was plugged: as the network is plugged now.
      const net = tagged.network === null ? '' : tagged.plug !== null
        ? `; network \`${tagged.network}' unplugs it as the policy plugs it now`
        : lt.policy().networks.has(tagged.network) ? ''
          : `; its network \`${tagged.network}' is no longer in the policy: no \`down' can be run for it`;
      lt.note('reconcile', 'reconcile', tagged, `lease taken back from the device's tag${net}`);
      adopted.push([tagged, link]);
    } else if (lt.intact) {
      const why = 'a device of ours without a lease (the broker died mid-create or mid-release)';
      void lt.deleteLink(link.index, who.uid, link.name, why, {
        ...RECONCILE, rule: tagged?.rule ?? null,
        device: tagged ? leaseView(tagged) : { name: link.name, ifindex: link.index, id: who.id, lease: who.id },
      });
    } else {
      lt.table.kept.add(who.id);
      lt.audit.record({
        ...RECONCILE, rule: null, caller: { uid: who.uid },
        device: { name: link.name, ifindex: link.index, id: who.id, lease: who.id },
        message: 'tagged as ours, but its lease was lost with the lease table and its tag is too short to rebuild it: '
          + `left alone, now and at every start (its owner cannot release it; root: ip link del ${link.name})`,
      });
    }
  }
  // Said, as an administrator who lost the state directory (and its broker-id) sees them nowhere else (a review).
  for (const [by, names] of others) {
    lt.log(`${names.length} device(s) tagged by broker ${by}, not this one (${lt.brokerId}), left alone: another state `
      + 'directory\'s broker in this namespace, or this one\'s before its broker-id was lost: '
      + `${names.slice(0, 8).join(', ')}${names.length > 8 ? ', …' : ''}`);
  }
  // A device left alone that is gone now needs no keeping.
  for (const id of lt.table.kept) if (!seen.has(id)) lt.table.kept.delete(id);
  for (const l of owed.values()) {
    lt.note('reconcile', 'reconcile', l, "the broker stopped before its network's down had run: running it now");
    lt.unplug(l);
  }
  const byIndex = new Map(links.map((k) => [k.index, k]));
  // Every lease's device is held to its terms, those taken back from tags and those in the table alike (a holder
  // may have changed its MAC, owner or queues while the broker was down), before any lock is put back: a device
  // that took another lease's MAC goes, and that lease's entry comes back with its deletion (retire).
  // Only a device that carries the lease's own tag is the lease's: a table naming another device of that name,
  // index and kind (the administrator's own tap) never has it judged or deleted (an outside review).
  const ours = (l: LeaseRecord, link: Link | undefined): link is Link =>
    lt.isDevice(l, link) && aliasIdentity(link.alias)?.id === l.id;
  for (const l of lt.table.all()) {
    const link = byIndex.get(l.ifindex);
    if (ours(l, link)) lt.judge(l, link);
  }
  const holders = new Map<string, LeaseRecord[]>();
  for (const l of lt.table.all()) {
    const link = byIndex.get(l.ifindex);
    if (lt.isDevice(l, link) && aliasIdentity(link.alias)?.id !== l.id) {
      lt.table.remove(l.id);
      lt.note('reconcile', 'reconcile', l, `the device \`${link.name}' carries no tag of this lease: left alone; `
        + 'lease dropped');
      lt.unplug(l);
      continue;
    }
    if (!lt.isDevice(l, link)) {
      lt.table.remove(l.id);
      // Renamed by root (or moved away and back) while the broker was down: its tag goes, as at run time, or the next
      // start took it for an orphan of this lease and deleted it (an outside review). One not seen may be in another
      // network namespace: its id is kept, as a move seen at run time keeps it, so that it is left alone if it comes
      // back before the start after next.
      const renamed = links.find((k) => aliasIdentity(k.alias)?.id === l.id);
      if (renamed) lt.renounce(l, renamed);
      else lt.table.keep(l.id);
      lt.note('reconcile', 'reconcile', l, renamed
        ? `the device is \`${renamed.name}' now, no longer this lease's: left alone; lease dropped`
        : 'the device is gone; lease dropped');
      // Its network's `down` (its hook, its OVS port) is still owed: the lease ended while the broker was down.
      lt.unplug(l);
      continue;
    }
    closePort(lt, l, link, false);
    if (Forwarding.followed(l, lt.kernel)) {
      if (link.master === null) {
        // On no bridge (its bridge made again, an administrator's nomaster): it forwards nothing. Kept and followed, as
        // at run time, its settings put back once it is a port of a bridge of that name again (an outside review: it
        // was deleted at a start, and a running VM's NIC with it). One on another bridge goes (putBack).
        lt.followPort(l, link);
      } else {
        // Only root can unlock a port: an administrator's script may have, while the broker was down. Said, undone.
        if (l.locked && lt.kernel.link(l.ifindex)?.portLocked === false) {
          lt.note('reconcile', 'reconcile', l, 'its port was found unlocked (changed while the broker was down): '
            + 'locked again');
        }
        // A port moved off its bridge and back meanwhile is in the bridge's default VLAN: set again.
        putBack(lt, l);
      }
    }
    if (l.ends !== 'holder') continue;
    const key = `${l.holder}:${l.holder_start}`;
    holders.set(key, [...(holders.get(key) ?? []), l]);
  }
  // One pidfd per holder process, as at run time (a VM's macvtaps share it): one per lease ran out of fds.
  for (const ls of holders.values()) {
    const { holder, holder_start: start } = ls[0]!;
    let pidfd: number | null = null;
    let runs: boolean;
    try {
      pidfd = holder === null ? null : sys.pidfdOpen(holder);
      // The pid is only the holder if the process started when the holder did.
      runs = pidfd !== null && processStartTime(holder!) === start;
    } catch (err) {
      // Not knowing (out of fds) is not "gone": a running VM's NIC is never deleted on a guess.
      if (pidfd !== null) sys.close(pidfd);
      lt.log(`warning: cannot tell whether holder pid ${holder} still runs (${(err as Error).message}); `
        + `its ${ls.map((l) => l.name).join(', ')} stay until the next start looks again`);
      continue;
    }
    if (runs) {
      lt.watchHolder(ls.map((l) => l.id), pidfd!);
      for (const l of ls) lt.note('reconcile', 'reconcile', l, `holder pid ${holder} still runs; watching it`);
    } else {
      if (pidfd !== null) sys.close(pidfd);
      for (const l of ls) lt.endLease(l.id, 'its holder exited while the broker was down');
    }
  }
  // Written at every start, so that from now on a missing file means it was lost, not never made. A
  // state directory that cannot be written (full, read-only) does not stop the broker: it says so.
  try {
    lt.table.save();
  } catch {
    // The table says so in the log itself (and again once it is written).
  }
}

/**
 * A port back on its bridge (moved back by hand, or the bridge made or renamed into place): its access VLAN set
 * again, as a port joins a bridge in its default VLAN (an outside review, read only: the guest was on the
 * default VLAN then), then its lock.
 */
export function putBack(lt: Keeper, l: LeaseRecord): void {
  if (l.vlan !== null) {
    try {
      // At a start, a port off its bridge (and so out of its VLAN) goes, as a locked one does (relock).
      if (lt.kernel.link(l.ifindex)?.master !== lt.kernel.linkNamed(l.parent)?.index) {
        throw new Error(`it is no longer a port of bridge \`${l.parent}'`);
      }
      lt.kernel.setAccessVlan(l.ifindex, l.vlan);
    } catch (err) {
      // Left in the bridge's default VLAN, the guest would reach what its VLAN keeps it from: the device goes.
      void lt.retire(l, {
        op: 'reconcile', decision: 'cleanup', message: `its access VLAN ${l.vlan} cannot be set again `
          + `(${(err as Error).message})`,
      }).catch(() => {});
      return;
    }
  }
  if (l.locked) relock(lt, l);
}

/**
 * A lease's Linux-bridge port, its own IP stack closed again (kernel.ts ipv6Off): at a start (a port made before that
 * was done, or opened while the broker was down), and when IPv6 comes up on one (net.ipv6.conf.all.disable_ipv6
 * written: the kernel sets every device's; an outside re-test wrote 1 then 0, and a guest's router advertisement gave
 * the host routes through its tap again). Wherever the port is now: one off its bridge meanwhile was left open, and
 * stayed so once put back (a re-test). A tap of a hook or Open vSwitch network is left as it is, also one whose lease
 * was taken back from its tag (no plug) when its network is no longer in the policy, unless it is a Linux bridge's
 * port now (a re-test: a routed hook tap lost its host addresses). A failure is logged: the device stays, its VM runs.
 */
function closePort(lt: Keeper, l: LeaseRecord, link: Link, reopened: boolean): void {
  if (l.kind !== 'tap' || l.plug !== null) return;
  const net = l.network === null ? null : lt.policy().networks.get(l.network);
  const port = () => link.master !== null && lt.kernel.link(link.master)?.kind === 'bridge';
  if (l.network !== null && (net ? net.kind !== 'bridge' : !port())) return;
  try {
    lt.kernel.closePortStack(l.ifindex, l.name);
    if (reopened) {
      lt.note('reconcile', 'reconcile', l, 'IPv6 came on again on its port (net.ipv6.conf.all.disable_ipv6 written?): '
        + 'turned off again');
    }
  } catch (err) {
    lt.log(`warning: ${(err as Error).message}`);
  }
}

/**
 * IPv6 came up on device `index` (the link monitor's Ipv6Watch): closed again where it is a lease's bridge port. Null:
 * such news were lost (an overrun, or not read during a flood), and every port is looked at: its sysctl read, and
 * closed again where it is open.
 */
export function portReopened(lt: Keeper, index: number | null): void {
  const leases = index !== null ? [lt.table.byIfindex(index)]
    : lt.table.all().filter((l) => l.kind === 'tap' && l.plug === null && lt.kernel.ipv6On(l.name));
  for (const l of leases) {
    const link = l ? lt.kernel.link(l.ifindex) : null;
    if (l && lt.isDevice(l, link)) closePort(lt, l, link, true);
  }
}

/**
 * A locked lease's port, as the broker left it: locked, learning off, the guest's static entry. Only
 * root can change those, but an administrator's script may have while the broker was down.
 */
export function relock(lt: Keeper, l: LeaseRecord): void {
  try {
    const bridge = lt.kernel.linkNamed(l.parent);
    if (!bridge) throw new Error(`bridge \`${l.parent}' is gone`);
    if (l.mac === null) throw new Error('its guest MAC is not known');
    // Only as a port of its own bridge: one an administrator moved elsewhere is not locked there.
    if (lt.kernel.link(l.ifindex)?.master !== bridge.index) {
      throw new Error(`it is no longer a port of bridge \`${l.parent}'`);
    }
    lt.kernel.lockPort(l.ifindex, bridge, macToBuffer(l.mac), l.vlan, l.name, 'relock');
  } catch (err) {
    // Its port is locked, but its MAC is fixed to another port (a device that took it, going now; or an
    // administrator's entry): cut off, not a breach, until that goes (relockBridge puts the entry back then).
    if (err instanceof TapbrokerError && err.code === 'TB_E_MAC_IN_USE') {
      const message = `its forwarding entry cannot be put back yet: ${err.message}`;
      lt.note('reconcile', 'error', l, message, { code: err.code });
      return;
    }
    // The lock cannot be had again: the device goes rather than forward another MAC.
    void lt.retire(l, {
      op: 'reconcile', decision: 'cleanup', message: `its port lock cannot be restored (${(err as Error).message})`,
    }).catch(() => {});
  }
}

/**
 * A tap's guest MAC and port lock, which tags before 0.5.0 do not name: from its port (its lock, and the one static
 * entry a lock keeps there), else unknown, never the tap's own address (an outside review's upgrade from 0.4, its
 * table cut short, took a locked guest's tap for unlocked with the tap's own MAC, and any user on the bridge could
 * then take the guest's MAC and cut it off for good). A locked port is a locked lease's, its entry there or not: one
 * whose MAC cannot be read goes (relock), rather than free its MAC for another (its re-test removed the entry by
 * giving its own tap the guest's MAC while the broker was down).
 */
function guestOf(lt: Keeper, l: LeaseRecord, link: Link): LeaseRecord {
  if (l.kind !== 'tap' || / (?:mac|host)=/.test(link.alias ?? '')) return l;
  let fixed: Array<{ mac: Buffer; vlan: number | null }> = [];
  try {
    if (link.portLocked) fixed = lt.kernel.staticEntries(link.index).filter((e) => macFromBuffer(e.mac) !== l.mac);
  } catch (err) {
    lt.log(`warning: cannot read the forwarding entries of \`${link.name}': ${(err as Error).message}`);
  }
  // One MAC, however many entries: a kernel with bridge VLANs adds a lock's entry once with no VLAN and once in the
  // port's default VLAN (its re-test, from the kernel's br_fdb_add).
  const macs = new Set(fixed.map((e) => macFromBuffer(e.mac)));
  const one = macs.size === 1 ? [...macs][0]! : null;
  return { ...l, mac: one, host_mac: l.mac, locked: link.portLocked === true };
}

/**
 * OVS keeps a port record after its tap is gone. At start, remove every port that carries our
 * external-ids but whose lease is gone or whose device is not the lease's; never a port without them.
 * Every database a lease or the policy names is visited, so a network a reload retired is cleaned too.
 * Then (and with `stale` false, at each reload: nothing removed) the names of the ports that are not ours are kept
 * from new devices of any kind: ovs-vswitchd takes a device of such a name into its port (an outside review's user
 * with no rule for an OVS network got a tap onto another broker's VLAN that way).
 */
export async function reconcileOvs(lt: Keeper, stale = true): Promise<void> {
  const named = namedDbs(lt.policy().networks.values());
  // One only the table remembers, gone, and with no lease or owed removal of its own, is forgotten (a retired one).
  for (const db of lt.table.ovsdbs()) if (!named.has(db) && ovsdbGone(db)) lt.table.forgetDb(db);
  const dbs = new Set([...lt.table.ovsdbs(), ...named]);
  const generation = lt.foreign.listing(dbs, named);
  await Promise.all([...dbs].map((db) => reconcileOvsdb(lt, db, stale, generation, named.has(db))));
}

/** Tries at reaching an Open vSwitch database at start, 1 s, 2 s, 4 s … apart (OVS may start after the broker). */
const OVS_RECONCILE_ATTEMPTS = 10;

async function reconcileOvsdb(
  lt: Keeper, db: string, stale: boolean, generation: number, named: boolean, attempt = 1,
): Promise<void> {
  let listed: Awaited<ReturnType<typeof listPorts>>;
  // The leases the listing can speak for: those live before it began (a re-test's device made while the start removed
  // stale ports was said to have lost a port it had).
  const before = new Set(lt.table.all().map((l) => l.id));
  try {
    listed = await listPorts(db);
  } catch (err) {
    // A database never listed is tried until it answers (a minute apart at most), by the latest listing alone: one
    // the policy names keeps chosen names from devices meanwhile (an outside audit's reload listing was never tried
    // again), and one the lease table alone remembers protects no name until it answers (a re-test's gave up).
    // One the table no longer remembers (its owed removals dropped: retired) is tried no more.
    if (!named && !lt.table.ovsdbs().includes(db)) return;
    const unlisted = lt.foreign.awaits(db, generation);
    const again = (stale && attempt < OVS_RECONCILE_ATTEMPTS) || unlisted;
    const s = Math.min(60, 2 ** (attempt - 1));
    const what = stale ? 'reconcile' : 'list the ports of';
    lt.log(`warning: cannot ${what} open vswitch at ${db}: ${(err as Error).message}`
      + (again ? `; trying again in ${s} s` : stale ? '; its stale ports stay until the next start' : ''));
    if (!again) return;
    await new Promise((resolve) => setTimeout(resolve, 1000 * s).unref());
    return reconcileOvsdb(lt, db, stale, generation, named, attempt + 1);
  }
  const gone = stale ? await removeStalePorts(lt, db, listed.ours) : new Set<string>();
  // Ours: a port of a lease of this broker's (live, being made, or owed its removal), which it removes itself.
  const own = (p: OvsPort) => (p.broker === null || p.broker === lt.brokerId)
    && (lt.table.get(p.lease) !== undefined || lt.table.owedDowns().some((d) => d.id === p.lease));
  const ours = new Set(listed.ours.filter(own).map((p) => p.port));
  lostPorts(lt, db, new Set(listed.ours.map((p) => p.lease)), before);
  const kept = listed.names.filter((name) => !ours.has(name) && !gone.has(name));
  lt.foreign.listed(db, new Set(kept), generation);
  if (kept.length === 0) return;
  lt.log(`open vswitch at ${db}: ${kept.length} port(s) not this broker's, whose names no new device gets: `
    + `${kept.slice(0, 8).map((name) => `\`${shown(name)}'`).join(', ')}${kept.length > 8 ? ', …' : ''}`);
}

/**
 * Says which live leases plugged into `db` have no port there any more (removed by hand, their bridge made anew):
 * their guests have no network, and nothing else would say so (an outside review). Not plugged again: the lease
 * says where, a reload may have moved the network, and the administrator who removed it may have meant it.
 */
function lostPorts(lt: Keeper, db: string, leases: ReadonlySet<string>, before: ReadonlySet<string>): void {
  const unfinished = new Set(lt.table.unfinished());
  const said = lt.foreign.saidLost;
  for (const id of said) if (!lt.table.get(id)) said.delete(id);
  for (const l of lt.table.all()) {
    if (!l.plug || !('ovs' in l.plug) || l.plug.db !== db || leases.has(l.id) || unfinished.has(l.id)) continue;
    // Once (a re-test got one record per reload: logrotate's reload made it one a day).
    if (!before.has(l.id) || said.has(l.id)) continue;
    said.add(l.id);
    lt.note('reconcile', 'reconcile', l, `its open vswitch port on ${l.plug.ovs} is gone: its guest has no network `
      + 'there (not plugged again: remove and make the device again)');
  }
}

/** Removes the stale ports of ours among `ports`; the names of those removed. */
async function removeStalePorts(lt: Keeper, db: string, ports: readonly OvsPort[]): Promise<Set<string>> {
  const gone = new Set<string>();
  const devices = new Set(lt.kernel.links().map((k) => k.name));
  for (const p of ports) {
    // Made in an earlier boot: its device went with that boot, and so did its broker's identity and lease table (in
    // /run): nobody else would ever remove it, and it kept its name from every new device (an outside review: the
    // persistent device's unit was refused after each reboot, and a running VM's port stayed for good). Only with
    // no device of its name: a broker that sees another boot id (a container's own) is not told a live port's
    // boot is over (its re-test removed another broker's live port so).
    const earlier = p.boot !== null && currentBoot() !== null && p.boot !== currentBoot() && !devices.has(p.port);
    // Another broker's (another state directory in this namespace): never ours to touch. One owed its removal is the
    // owed removal's (an outside review found both removing one port, and two records of it).
    if (!earlier && p.broker !== null && p.broker !== lt.brokerId) continue;
    if (lt.table.owedDowns().some((d) => d.id === p.lease)) continue;
    const l = lt.table.get(p.lease);
    // Made before ports named their broker (0.4): ours only if its lease is (or was just) in our table.
    if (p.broker === null && !l && !lt.table.owedDowns().some((d) => d.id === p.lease)) {
      lt.log(`warning: open vswitch port ${p.port} on ${p.bridge} (lease ${p.lease}) names no broker and no lease `
        + 'of this one: left alone; remove it by hand (ovs-vsctl del-port) if no broker holds it');
      continue;
    }
    if (l && l.name === p.port && lt.isDevice(l, lt.kernel.link(l.ifindex))) continue;
    const about = {
      op: 'reconcile' as const,
      rule: l?.rule ?? null,
      caller: { uid: p.uid },
      device: { name: p.port, ovs: p.bridge, id: p.lease, lease: p.lease },
    };
    try {
      // Only while it is still that lease's port: a device granted since the start may have its name now.
      if (!(await delPortOf(db, p.bridge, p.port, p.lease))) continue;
      gone.add(p.port);
      const message = earlier ? 'an open vswitch port of an earlier boot (its device went with it): removed'
        : 'a stale open vswitch port of ours: removed';
      lt.audit.record({ ...about, decision: 'reconcile', message });
    } catch (err) {
      const message = `failed to remove a stale open vswitch port: ${(err as Error).message}`;
      lt.audit.record({ ...about, decision: 'error', code: 'TB_E_KERNEL', message });
    }
  }
  lt.log(`open vswitch at ${db} reconciled: ${ports.length} port(s) made by tapbroker (this broker and others), `
    + `${gone.size} stale one(s) of this broker removed`);
  return gone;
}

/**
 * A lease taken back from its tag, plugged as its network is plugged now (the tag names the network, not how: an
 * outside review lost every hook's `down` with the table). Before it is judged kernel-bound: a tap on a hook or
 * Open vSwitch network never is.
 */
function replug(l: LeaseRecord | null, policy: Policy): LeaseRecord | null {
  if (!l || l.network === null) return l;
  return { ...l, plug: plugOf(policy.networks.get(l.network)) };
}

function withUser(l: LeaseRecord | null): LeaseRecord | null {
  if (!l) return null;
  try {
    return { ...l, user: getpwuid(l.uid)?.name ?? null };
  } catch {
    return l;
  }
}
