// Forwarding entries a holder took: whoever holds a tap fd can set the tap's MAC (SIOCSIFHWADDR needs no
// capability on it), and a bridge port taking a MAC makes the bridge move or drop that MAC's entries, a locked
// guest's static one included. What the broker can put back, it does: the entry of the lease whose MAC was
// taken, and every locked lease's static entry after a window in which it could not judge a holder's changes.
import { macFromBuffer, macToBuffer } from '@tapbroker/protocol/core';
import type { AuditEvent } from './audit.js';
import type { Kernel } from './kernel.js';
import type { LeaseRecord, LeaseTable } from './leases.js';
import type { Link } from './rtnetlink.js';
import { takenMac } from './terms.js';
import { portVlan } from './decide.js';

type Note = (
  op: AuditEvent['op'], decision: AuditEvent['decision'], l: LeaseRecord, message: string, extra?: Partial<AuditEvent>,
) => void;

/**
 * How long a MAC a holder's tap took stays unlockable on that bridge for whoever may have taken it: the bridge
 * deleted that MAC's entries elsewhere (whoever it belongs to: another guest, a router behind the uplink), and a
 * lock asked for now would find no entry to refuse it by. The bridge's default ageing time: by then the MAC's
 * owner has sent again. Who may have taken it: the lease's uid, and for a persistent tap given to a group, every
 * member of that group (any of them could attach to it: an outside re-test took a router's MAC through another
 * user's group tap and locked it to its own port). Nobody else's locks are held up by it.
 */
const TAKEN_MS = 300_000;
/**
 * MACs one uid's taps may have taken lately; past it, that uid's every lock waits, and so do its new taps given
 * to a group (nothing is forgotten early). A group is held up for the MACs taken through it only, never by a
 * count (an owner picks the group; a count would let it hold up every member's locks: an earlier re-test).
 */
const MAX_TAKEN = 1024;
const MAX_TAKEN_GROUP = 16 * MAX_TAKEN;
/** MACs recorded one by one for a tap that took them (see Forwarding.took). */
const TOOK_RECORDED = 16;
/**
 * Passes putting back one bridge's locked entries are this far apart at least; asked for sooner, one more pass
 * comes when the gap is over. A pass costs netlink requests per locked port on the bridge, and any holder can
 * ask for one with each tap it closes after changing its MAC: an outside review stalled everyone's requests
 * (p99 213 ms) with 8 such loops against another user's 60 locked VMs.
 */
const RELOCK_GAP_MS = 100;
/**
 * A uid whose tap took a locked guest's MAC: its new devices wait, 1 s the first time, twice as long each time after
 * (at most 5 minutes), until it has taken none for 10 minutes. Its tap leaves the bridge at once (its deletion may
 * wait behind others'); without both, an outside re-test cut a locked guest off 32-42 % of the time with four loops
 * of new taps, each flipping its MAC to the guest's until deleted.
 */
const TAKER_WAIT_MS = 1000;
const TAKER_WAIT_MAX_MS = 300_000;
const TAKER_MEMORY_MS = 600_000;

export class Forwarding {
  /** `u:UID` or `g:GID` → `bridge/mac` → until when the locks it holds up do not take it (see TAKEN_MS). */
  private readonly taken = new Map<string, Map<string, number>>();
  /** The MACs each tap was recorded taking (by lease id, at most TOOK_RECORDED; the last 1,024 taps): see took. */
  private readonly recorded = new Map<string, Set<string>>();
  /** A write of the quarantine is due, and when the last one was (see noteTaken). */
  private saveDue: NodeJS.Timeout | null = null;
  private savedAt = 0;

  constructor(
    private readonly kernel: Kernel,
    private readonly table: LeaseTable,
    private readonly note: Note,
    private readonly log: (line: string) => void,
    private readonly takerWaitMs = TAKER_WAIT_MS,
  ) {
    // What the last run recorded: a restart is no way out of the quarantine (an outside re-test restarted the
    // broker and locked the MAC at once).
    for (const { who, key, until } of table.taken) {
      const mine = this.taken.get(who) ?? new Map<string, number>();
      mine.set(key, until);
      this.taken.set(who, mine);
    }
  }

  /**
   * An event showed `l`'s tap on its bridge with `mac`, not its lease's, and its device is kept or gone (set back,
   * or closed, before the event was read): the bridge dropped that MAC's entries, a locked guest's static one too
   * (outside reviews cut locked guests off for good this way). The MAC is noted, the bridge's locked entries are
   * put back, and the taking is recorded: once per tap and MAC (its event and its deletion's may both show it, and
   * a holder may flip between MACs: an outside review had the same one recorded 150 times), TOOK_RECORDED at most.
   */
  took(l: LeaseRecord, mac: string): void {
    this.noteTaken(l, mac);
    // The entry it took goes back at once, one write (a re-test timed takings to the pass's gap and kept a locked
    // guest cut off half the time); the pass over the whole bridge may wait for its gap.
    // Another uid's guest (a holder cutting off its own guest harms no one else).
    if (this.relockMac(l.parent, mac, `\`${l.name}' took ${mac}`).some((o) => o.uid !== l.uid)) this.lockTaken(l);
    this.relockBridge(l.parent, `\`${l.name}' took ${mac}`);
    const macs = this.recorded.get(l.id);
    if (macs?.has(mac) || (macs?.size ?? 0) > TOOK_RECORDED) return;
    this.remember(l, mac);
    const more = this.recorded.get(l.id)!.size > TOOK_RECORDED
      ? `; it took more than ${TOOK_RECORDED} MACs, the rest not recorded` : '';
    this.note('cleanup', 'cleanup', l, `its holder gave it MAC ${mac}, not its lease's, before the broker read `
      + `it: the locked entries of bridge \`${l.parent}' are put back${more}`);
  }

  /**
   * Taps whose lease ended and whose deletion waits, by index: until it is gone its holder can give it a locked
   * guest's MAC again, which drops the guest's entry each time (an outside re-test queued decoy deletions first and
   * kept a locked guest cut off 60 % of the time). Their events are read for that alone (retaken).
   */
  readonly retiring = new Map<number, LeaseRecord>();

  /** A retiring tap's event: a MAC it took on its bridge goes back at once, as a live tap's does (took). */
  retaken(l: LeaseRecord, link: Link): void {
    const took = link.name === l.name && link.master !== null ? takenMac(l, link) : null;
    if (took !== null) this.took(l, took);
  }

  /** `l`'s taking of `mac` is on record (the last 1,024 taps' are kept). */
  private remember(l: LeaseRecord, mac: string): void {
    const macs = this.recorded.get(l.id) ?? new Set<string>();
    macs.add(mac);
    this.recorded.set(l.id, macs);
    if (this.recorded.size > 1024) this.recorded.delete(this.recorded.keys().next().value!);
  }

  /** At a stop: the snapshot of the table carries the quarantine; no write of it may come after. */
  close(): void {
    if (this.saveDue) clearTimeout(this.saveDue);
    this.saveDue = null;
    // The next start puts every lock back.
    for (const t of this.relockDue.values()) clearTimeout(t);
    this.relockDue.clear();
  }

  /**
   * `l`'s tap on its bridge showed `mac` as its own address: the locks of whoever may have taken it wait. True the
   * first time this taker is noted for it.
   */
  noteTaken(l: LeaseRecord, mac: string): boolean {
    let fresh = false;
    for (const who of [`u:${l.uid}`, ...(l.group !== null ? [`g:${l.group}`] : [])]) {
      const mine = this.live(who) ?? new Map<string, number>();
      const key = `${l.parent}/${mac}`;
      // Past the cap a uid's locks are held up as a whole (takenLately), and nothing more is kept or written: a
      // holder can show a new MAC with each ioctl (an outside review made the broker write 30 MB/s that way). A
      // group's are kept up to a larger cap, for memory's sake (never held up by a count: see MAX_TAKEN).
      if (!mine.has(key) && mine.size >= (who.startsWith('g:') ? MAX_TAKEN_GROUP : MAX_TAKEN)) continue;
      fresh ||= !mine.has(key);
      mine.set(key, Date.now() + TAKEN_MS);
      this.taken.set(who, mine);
    }
    // One event and its judgement note the same taking: written once (a re-test counted two writes each).
    if (!fresh) return false;
    const now = Date.now();
    this.table.taken = [...this.taken].flatMap(([who, m]) =>
      [...m].filter(([, until]) => until > now).map(([key, until]) => ({ who, key, until })));
    // Written with the table at once, or a second after the last such write if sooner (any other write of the table
    // carries it too, as does the snapshot at a stop); a full disk is said by the table, and the quarantine holds
    // in memory for this run.
    const save = () => {
      if (this.saveDue) clearTimeout(this.saveDue);
      this.saveDue = null;
      this.savedAt = Date.now();
      try {
        this.table.save();
      } catch {
        // Said by the table.
      }
    };
    const since = Date.now() - this.savedAt;
    if (since >= 1000) save();
    else this.saveDue ??= setTimeout(save, 1000 - since).unref();
    return true;
  }

  /**
   * May the caller have taken `mac` on `bridge` lately: a tap of its uid's, or a tap given to a group it is in
   * (`member`: by its process's groups or the account database), or did its uid take more MACs than are kept?
   */
  takenLately(bridge: string, mac: string, uid: number, member: (gid: number) => boolean): boolean {
    const key = `${bridge}/${mac}`;
    const mine = this.live(`u:${uid}`);
    if (mine !== null && (mine.has(key) || mine.size >= MAX_TAKEN)) return true;
    for (const who of [...this.taken.keys()].filter((k) => k.startsWith('g:'))) {
      if (member(Number(who.slice(2))) && this.live(who)?.has(key)) return true;
    }
    return false;
  }

  /** Whether `uid`'s new taps given to a group wait: its taps took more MACs lately than are kept. */
  groupTapsWait(uid: number): boolean {
    return (this.live(`u:${uid}`)?.size ?? 0) >= MAX_TAKEN;
  }

  /** Entries still in force (the expired ones dropped), or null. */
  private live(who: string): Map<string, number> | null {
    const mine = this.taken.get(who);
    if (!mine) return null;
    const now = Date.now();
    for (const [k, until] of mine) if (until <= now) mine.delete(k);
    if (mine.size > 0) return mine;
    this.taken.delete(who);
    return null;
  }

  /**
   * `l`'s holder took `mac`: the port of the lease whose guest MAC it is (on `l`'s bridge) gets its entry back.
   * Tried at once, while the taker still has the MAC (the kernel lets the entry go to the victim's port: the
   * taker's local one is replaced), and after its deletion only if that failed: the deletion waits behind every
   * user's (an outside re-test queued decoys first and kept a locked guest cut off 30 – 40 % of the time).
   * `quiet`: a failure is not recorded (the try after the deletion will be). False if it failed.
   */
  restoreTaken(l: LeaseRecord, mac: Buffer, quiet = false): boolean {
    const taken = macFromBuffer(mac);
    // The taking is on record (the taker's deletion says it): its events read later (a retiring tap's) add none.
    this.remember(l, taken);
    // A locked lease's if one holds it (no other tap there is granted a MAC a locked lease holds; one granted
    // before the lock loses it to the lock), else the oldest's.
    const holders = this.table.all().filter((v) => v.id !== l.id && v.kind === 'tap' && v.parent === l.parent
      && v.mac === taken);
    const victim = holders.find((v) => v.locked) ?? oldest(holders)[0];
    if (!victim) return true;
    if (victim.locked && victim.uid !== l.uid) this.lockTaken(l);
    try {
      // A locked victim's entry is static again: its port forwards from that MAC only through it.
      this.kernel.restoreFdbEntry(victim.ifindex, mac, { static: victim.locked, vlan: victim.vlan });
      const message = `its forwarding entry for ${victim.mac}, taken by \`${l.name}', restored`;
      this.note('cleanup', 'cleanup', victim, message);
      return true;
    } catch (err) {
      if (quiet) return false;
      this.note('cleanup', 'error', victim, `its forwarding entry for ${victim.mac} could not be restored: `
        + `${(err as Error).message}`, { code: 'TB_E_KERNEL' });
      return false;
    }
  }

  /** A locked lease's static forwarding entry, put back as it was granted (idempotent). */
  relock(l: LeaseRecord, why: string): void {
    try {
      this.kernel.restoreFdbEntry(l.ifindex, macToBuffer(l.mac!), { static: true, vlan: l.vlan });
    } catch (err) {
      this.note('cleanup', 'error', l, `its forwarding entry for ${l.mac} could not be put back (${why}): `
        + `${(err as Error).message}`, { code: 'TB_E_KERNEL' });
    }
  }

  /**
   * Every locked lease's static entry on `bridge`, put back: after a window in which a holder could change a
   * device's MAC with no lease to judge its events by (a persistent tap being made, a device being deleted).
   * Only ports still on that bridge; nothing is looked up where no lease there is locked. Leases still being
   * made too: their ports are locked before their leases are written (an outside review took a guest's MAC
   * while its create was in flight, and the guest was granted a locked port with no entry).
   */
  relockBridge(bridge: string, why: string): void {
    // At most one pass per RELOCK_GAP_MS on a bridge: one asked for meanwhile comes when the gap is over.
    if (this.relockDue.has(bridge)) return;
    const wait = (this.relockedAt.get(bridge) ?? -Infinity) + RELOCK_GAP_MS - Date.now();
    if (wait <= 0) return this.relockNow(bridge, why);
    this.relockDue.set(bridge, setTimeout(() => {
      this.relockDue.delete(bridge);
      this.relockNow(bridge, why);
    }, wait));
  }

  /** The locked leases holding `mac` on `bridge` (the oldest per VLAN), their entries put back now; returned. */
  private relockMac(bridge: string, mac: string, why: string): LeaseRecord[] {
    const seen = new Set<number>();
    const relocked: LeaseRecord[] = [];
    for (const o of oldest(this.table.all().filter((v) => v.locked && v.parent === bridge && v.mac === mac))) {
      // Untagged and VLAN 1 are one segment (portVlan), as the grant's checks take them.
      if (seen.has(portVlan(o.vlan)) || this.off.has(o.id)) continue;
      seen.add(portVlan(o.vlan));
      this.relock(o, why);
      relocked.push(o);
    }
    return relocked;
  }

  /**
   * Uids whose taps took a locked guest's MAC (see TAKER_WAIT_MS), and the tap each last did it with: `u:UID` for its
   * own taps, `g:UID` for taps it gave a group (any member may have done it: an outside re-test had a member make
   * the owner's every device wait; only the owner's taps given to a group wait then).
   */
  private readonly takers = new Map<string, { strikes: number; until: number; last: number; tap: string }>();

  /** `l` took a locked guest's MAC: it leaves its bridge, and new devices wait (once per tap). */
  private lockTaken(l: LeaseRecord): void {
    const now = performance.now();
    const key = `${l.group === null ? 'u' : 'g'}:${l.uid}`;
    const t = this.takers.get(key);
    if (t?.tap === l.id) return;
    void this.kernel.detach(l.ifindex).catch(() => {});
    const strikes = t && now - t.last < TAKER_MEMORY_MS ? t.strikes + 1 : 1;
    const wait = Math.min(TAKER_WAIT_MAX_MS, this.takerWaitMs * 2 ** Math.min(strikes - 1, 20));
    this.takers.set(key, { strikes, until: now + wait, last: now, tap: l.id });
    if (this.takers.size > 4096) this.takers.delete(this.takers.keys().next().value!);
  }

  /**
   * How long `uid`'s new devices (`toGroup`: a tap it gives a group) must still wait after a tap of its, or one it
   * gave a group, took a locked guest's MAC (ms; 0: none).
   */
  takerWaits(uid: number, toGroup: boolean): number {
    const keys = [`u:${uid}`, ...(toGroup ? [`g:${uid}`] : [])];
    const until = Math.max(...keys.map((k) => this.takers.get(k)?.until ?? 0));
    return Math.max(0, Math.ceil(until - performance.now()));
  }

  /** When each bridge's last pass ran, and the passes due. */
  private readonly relockedAt = new Map<string, number>();
  private readonly relockDue = new Map<string, NodeJS.Timeout>();

  private relockNow(bridge: string, why: string): void {
    // One lease per MAC and VLAN, the oldest (a state from before MACs locked were kept unique may have two).
    const seen = new Set<string>();
    const locked = oldest(this.table.all().filter((o) => o.locked && o.mac !== null && o.parent === bridge))
      .filter((o) => !seen.has(`${o.mac}/${portVlan(o.vlan)}`) && !!seen.add(`${o.mac}/${portVlan(o.vlan)}`));
    if (locked.length === 0) return;
    this.relockedAt.set(bridge, Date.now());
    if (this.relockedAt.size > 1024) this.relockedAt.delete(this.relockedAt.keys().next().value!);
    try {
      const master = this.kernel.linkNamed(bridge)?.index;
      if (master === undefined) return;
      // Its ports in one dump (not a lookup per locked lease).
      const ports = new Set(this.kernel.ports(master).map((p) => p.index));
      for (const o of locked) if (ports.has(o.ifindex)) this.relock(o, why);
    } catch (err) {
      this.log(`warning: locked ports of ${bridge} not checked (${why}): ${(err as Error).message}`);
    }
  }

  /**
   * Leases whose port settings go with their Linux bridge and are put back when the port is on it again: a lock,
   * an access VLAN on a Linux bridge (OVS and hook networks keep theirs in their own tables; a lease taken back
   * from its device's tag has no plug, so an OVS VLAN port is told by its bridge: an outside re-test found one
   * deleted at a start).
   */
  static followed(l: LeaseRecord, kernel: Kernel): boolean {
    if (l.kind !== 'tap' || l.plug !== null) return false;
    return l.locked || (l.vlan !== null && kernel.linkNamed(l.parent)?.kind === 'bridge');
  }

  /** Followed leases whose device is off its bridge (their settings lost with it), with the bridge it is on now. */
  private readonly off = new Map<string, number | null>();

  /**
   * A followed port follows its device's bridge: one that left it (the bridge deleted, or an administrator's
   * `nomaster`) lost its lock and VLAN with it, and gets them back once it is a port of a bridge of that name
   * again, as at a start (an outside review: re-attached by hand, it forwarded any MAC, and nothing said so).
   */
  followPort(l: LeaseRecord, event: Link, fresh: boolean, putBack: () => void): void {
    if (!Forwarding.followed(l, this.kernel)) return;
    // A lease committed before its own events were read is followed by its device as it is (see Lifetimes.onLink).
    const link = fresh ? this.kernel.link(l.ifindex) ?? event : event;
    const on = link.master !== null && link.master === this.kernel.linkNamed(l.parent)?.index;
    const [what, is] = settings(l);
    if (on && this.off.delete(l.id)) {
      this.note('reconcile', 'reconcile', l, `back on bridge \`${l.parent}': ${what} ${is} put back`);
      putBack();
    } else if (!on && !this.off.has(l.id)) {
      this.note('reconcile', 'reconcile', l, `no longer a port of bridge \`${l.parent}': ${what} went with it, and `
        + `${is} put back once it is a port of a bridge of that name again`);
    }
    if (!on) this.off.set(l.id, link.master);
  }

  /** Is `index` a bridge a locked port off its own is on now (renamed into its place, it takes the lock back)? */
  holdsPortOff(index: number): boolean {
    for (const [id, master] of this.off) {
      if (!this.table.get(id)) this.off.delete(id);
      else if (master === index) return true;
    }
    return false;
  }

  /** A bridge made or renamed: ports of locked leases off their bridge that now bear its name are locked again. */
  followBridge(bridge: Link, relock: (l: LeaseRecord) => void): void {
    for (const [id, master] of this.off) {
      const l = this.table.get(id);
      if (!l) this.off.delete(id);
      else if (master === bridge.index && l.parent === bridge.name) {
        this.off.delete(id);
        const [what, is] = settings(l);
        this.note('reconcile', 'reconcile', l, `on bridge \`${l.parent}' again (made or renamed so): ${what} ${is} `
          + 'put back');
        relock(l);
      }
    }
  }
}

/** What a followed port has of its own (`its port lock`, `its access VLAN 10`, or both), and its verb's form. */
function settings(l: LeaseRecord): [string, 'is' | 'are'] {
  const vlan = l.vlan !== null ? `access VLAN ${l.vlan}` : null;
  if (!l.locked) return [`its ${vlan}`, 'is'];
  return vlan ? [`its port lock and ${vlan}`, 'are'] : ['its port lock', 'is'];
}

/** Leases, the oldest first (by their creation time; ties in table order). */
function oldest(ls: LeaseRecord[]): LeaseRecord[] {
  return [...ls].sort((a, b) => a.created.localeCompare(b.created));
}
