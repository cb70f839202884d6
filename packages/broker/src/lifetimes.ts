// Lease lifetimes: how each lease ends (its fds, its holder, a release), and keeping the lease table
// true to the kernel (link events, one dump after lost events; reconcile at start is reconcile.ts). Every
// device the broker deletes goes through retire(), which audits both success and failure.
import { TapbrokerError, macFromBuffer, sys, watchReadable } from '@tapbroker/protocol/core';
import type { Audit, AuditEvent } from './audit.js';
import type { Identity } from './identity.js';
import { BrokerId, KERNEL_KIND, LeaseTable, aliasIdentity, leaseView, type LeaseRecord } from './leases.js';
import type { Cleanup, Kernel } from './kernel.js';
import { portReopened, putBack, reconcile, reconcileOvs, type DeletedAs, type Keeper } from './reconcile.js';
import { hookRun, killOrphanHooks, type HookRun } from './hook.js';
import { decidePersistent, expectedMac, takenMac, violationOf } from './terms.js';
import { Floods } from './floods.js';
import { Repeats, stateOf } from './repeats.js';
import { Forwarding } from './forwarding.js';
import { Unplugs, retired } from './plug.js';
import { recorded, type Policy } from './decide.js';
import type { Reaper } from './reaper.js';
import { RTM_DELLINK, RTM_NEWLINK, type Link } from './rtnetlink.js';

export interface RetireOptions {
  op: AuditEvent['op'];
  decision: 'cleanup' | 'release' | 'reconcile';
  message: string;
  caller?: Partial<Identity> | null;
  request?: Record<string, unknown>;
}

export class Lifetimes implements Cleanup {
  readonly table: LeaseTable;
  /** False when the table file was missing or unreadable: tagged devices then rebuild their leases. */
  private readonly trusted: boolean;
  private readonly intact: boolean;
  /** Leases whose create has not finished: counted by quotas, invisible to list and release. */
  private readonly creating = new Set<string>();
  /** Of those, the ones whose device went meanwhile: their create fails (and rolls back, `down` after `up`). */
  private readonly vanished = new Set<string>();
  private readonly holderWatches = new Map<string, { close(): void }>();
  /** Devices being unplugged from their networks (their OVS ports, their hooks' `down`s). */
  readonly unplugs: Unplugs;
  private monitor: { drain(): boolean; close(): void } | null = null;
  /** Forwarding entries a holder took, and the MACs its taps took lately (grant asks it: takenLately). */
  readonly forwarding: Forwarding;
  /** Link events per device and per uid, to find floods (see wants); how long a uid's creates wait after one. */
  readonly floods = new Floods((ifindex) => {
    const o = this.table.byIfindex(ifindex);
    return o && !this.creating.has(o.id) ? o : undefined;
  });
  /** This broker's identity in its devices' tags. */
  readonly identity: BrokerId;
  /** This run's secret, which its plug hooks inherit; and earlier runs', to find the hooks they left running. */
  readonly hookRun: HookRun & { readonly previous: readonly string[]; cleaned(): void };

  constructor(
    stateDir: string | null,
    private readonly kernel: Kernel,
    private readonly reaper: Reaper,
    private readonly audit: Audit,
    private readonly policy: () => Policy,
    private readonly log: (line: string) => void,
    takerWaitMs?: number,
  ) {
    this.identity = BrokerId.load(stateDir, log, () => kernel.links().map((k) => k.alias));
    this.hookRun = hookRun(stateDir);
    const { table, problem, trusted, intact } = LeaseTable.load(stateDir);
    this.table = table;
    table.log = log;
    this.forwarding = new Forwarding(kernel, table, (...a) => this.note(...a), log, takerWaitMs);
    this.unplugs = new Unplugs(table, (...a) => this.note(...a), this.hookRun, retired(() => this.policy().networks));
    this.trusted = trusted;
    this.intact = intact;
    if (problem) log(`warning: ${problem}`);
  }

  /** Follows link events, then reconciles the table with the kernel. */
  start(): void {
    this.kernel.followBridges();
    this.monitor = this.kernel.monitor(
      (type, link) => this.onLink(type, link), () => this.resync(),
      (type, index, master, name) => this.wants(type, index, master, name),
      (index) => this.keeper && portReopened(this.keeper, index),
    );
    const keeper: Keeper = this.keeper = {
      table: this.table, kernel: this.kernel, audit: this.audit, trusted: this.trusted, intact: this.intact,
      brokerId: this.identity.value, policy: this.policy, log: this.log,
      judge: (l, link) => this.judge(l, link),
      isDevice: (l, link): link is Link => this.isDevice(l, link),
      note: (...a) => this.note(...a),
      deleteLink: (...a) => this.deleteLink(...a),
      watchHolder: (...a) => this.watchHolder(...a),
      endLease: (...a) => this.endLease(...a),
      retire: (...a) => this.retire(...a),
      unplug: (l) => this.unplug(l), foreign: this.unplugs.foreign, renounce: (l, link) => this.renounce(l, link),
      followPort: (l, link) => this.forwarding.followPort(l, link, false, () => putBack(keeper, l)),
    };
    // Hooks a stopped broker left running go before any `down` runs.
    const killed = this.hookRun.previous.length > 0 ? killOrphanHooks(this.hookRun.previous) : 0;
    this.hookRun.cleaned();
    if (killed > 0) this.log(`killed ${killed} process(es) started by the plug hooks of the broker's last run`);
    const snapshotted = this.table.snapshotted;
    reconcile(keeper);
    void reconcileOvs(keeper);
    // The leases of a stop's snapshot are judged and in memory: the file no longer holds them, or a crash
    // before the next write would have the start after it record the end of one twice.
    if (snapshotted) this.saveQuietly('the leases of the last stop stay in the lease table');
  }

  private saveQuietly(what: string): void {
    try {
      this.table.save();
    } catch (err) {
      this.log(`warning: ${what}: ${(err as Error).message}`);
    }
  }

  /** Stops: the unpluggings running are waited for `ms` at most (the rest stay owed to the next start). */
  async close(ms: number): Promise<void> {
    await this.unplugs.close(ms);
    for (const w of this.holderWatches.values()) w.close();
    this.holderWatches.clear();
    // What ended already is recorded now; every live lease goes to disk, so the next start records the end of
    // those whose taps go while the broker is down.
    this.catchUp(true);
    this.monitor?.close();
    this.forwarding.close();
    this.repeats.close();
    try {
      this.table.snapshot();
    } catch (err) {
      this.log(`warning: the live leases could not be written at the stop: ${(err as Error).message}; a tap that `
        + 'goes before the next start ends without a record');
    }
  }

  /** An audit record about a lease, on its owner's behalf. */
  private note(
    op: AuditEvent['op'],
    decision: AuditEvent['decision'],
    l: LeaseRecord,
    message: string,
    extra: Partial<AuditEvent> = {},
  ): void {
    this.audit.record({ op, decision, rule: l.rule, caller: { uid: l.uid }, device: leaseView(l), message, ...extra });
  }

  // ---- the table as a decision sees it

  /**
   * Applies every link event the kernel has already sent, so a decision never counts a gone device. During
   * a flood of events only a budget of them: bridges are then looked up afresh, not taken from events that
   * may still be queued, and a gone device may still count against its owner until its event is read.
   */
  catchUp(all = false): void {
    let drained = this.monitor?.drain() !== false;
    // `all` (before a port is locked to a MAC): every event already sent, past the budget, so that a MAC a
    // holder took behind a backlog of harmless events is known (bounded by the socket's queue).
    for (let n = 0; all && !drained && n < 256; n++) drained = this.monitor!.drain() !== false;
    this.drained = drained;
    if (!this.drained) this.kernel.observe(0, null);
    if (this.resyncOwed) this.resync();
  }

  /** The caller's devices per rule: a lookup, computed after catchUp(). */
  counts(uid: number): (rule: string) => number {
    const n = new Map<string, number>();
    for (const l of this.table.all()) if (l.uid === uid) n.set(l.rule, (n.get(l.rule) ?? 0) + 1);
    return (rule) => n.get(rule) ?? 0;
  }

  /** Leases a caller may see (list) or act on (release): its own (root: all), with their create finished. */
  visible(uid: number): LeaseRecord[] {
    return this.table.all().filter((l) => (uid === 0 || l.uid === uid) && !this.creating.has(l.id));
  }

  /** A lease whose device exists and is tagged, still mid-create; written to disk when `durable`. */
  begin(l: LeaseRecord, durable: boolean): void {
    this.table.add(l, durable, true);
    this.creating.add(l.id);
  }

  /** A lease taken out for a release whose deletion failed: back in the table, if its device still is. */
  restore(l: LeaseRecord): void {
    if (this.isDevice(l, this.kernel.link(l.ifindex))) this.table.add(l);
    // Gone after all: what its end still owes (its network's `down`) is done now.
    else this.unplug(l);
  }

  /** Is this lease still in force (its device not gone, its lease not ended)? */
  holds(id: string): boolean {
    return this.table.get(id) !== undefined;
  }

  /** Did this lease's device go while its create was in flight (deleted by root, or by its owner)? */
  vanishedMidCreate(id: string): boolean {
    if (this.vanished.has(id)) return true;
    // Events still unread (a drain over its budget) may say so: the device is looked up instead.
    const l = this.table.get(id);
    return !this.drained && (!l || !this.isDevice(l, this.kernel.link(l.ifindex)));
  }

  /** The create is done. Never throws: a device that cannot be looked up now is judged at the next catch-up. */
  commit(id: string): void {
    this.creating.delete(id);
    if (!this.drained) this.fresh.add(id);
    // A persistent device was its owner's from the moment its owner was set, and the events of its create
    // were not judged (they predate its terms): whatever its owner did meanwhile is judged now.
    const l = this.table.get(id);
    if (!l || l.ends !== 'release') return;
    try {
      // Its owner could act on it while it was made (events then go unjudged): a MAC it took and gave back
      // has dropped that MAC's entries on the bridge, a locked guest's among them.
      if (l.kind === 'tap') this.forwarding.relockBridge(l.parent, 'a persistent tap was made on its bridge');
      this.judge(l, this.kernel.link(l.ifindex));
    } catch (err) {
      this.resyncOwed = true;
      this.log(`warning: \`${l.name}' could not be judged at the end of its create (${(err as Error).message}); `
        + 'every lease is checked again before the next decision');
    }
  }

  /** The create failed after its lease was written: the device goes (audited), the lease with it. */
  /** Undoes a create: its fds closed, its device deleted and recorded as `caller`'s. Resolves when recorded. */
  abort(l: LeaseRecord, fds: number[], why: string, caller?: Identity): Promise<void> {
    this.creating.delete(l.id);
    this.vanished.delete(l.id);
    this.reaper.closeFds(fds, l.uid).catch(() => {});
    const message = `create rolled back: ${why}`;
    const o: RetireOptions = { op: 'cleanup', decision: 'cleanup', message, ...(caller ? { caller } : {}) };
    return this.retire(l, o).catch(() => {});
  }

  // ---- Cleanup, for the kernel steps' own rollbacks

  closeFds(fds: readonly number[], uid: number): void {
    this.reaper.closeFds(fds, uid).catch(() => {});
  }

  /** Closes fds nobody was sent (a persistent device's) on the pool; resolves once they are closed. */
  closeUnshared(fds: readonly number[]): Promise<void> {
    return this.reaper.closeHere(fds);
  }

  /**
   * Deletes a device that never got (or no longer has) a lease; one record either way (a cleanup, or `as`
   * says what: reconcile's). Never rejects.
   */
  deleteLink(ifindex: number, uid: number, name: string, why: string, as?: DeletedAs): Promise<void> {
    const base = { op: 'cleanup' as const, decision: 'cleanup' as const, rule: null, caller: { uid },
      device: { name, ifindex }, ...as };
    return this.reaper.deleteLink(ifindex, uid).then(
      (deleted) => void this.audit.record({ ...base, message: `${why}: ${deleted ? 'deleted' : 'already gone'}` }),
      (err: Error) =>
        void this.audit.record({
          ...base,
          decision: 'error',
          code: 'TB_E_KERNEL',
          message: `failed to delete \`${name}' (${why}): ${err.message}`,
        }),
    );
  }

  // ---- how leases end

  /** Leases that end with one holder process: watched through one pidfd, closed when the last of them ends. */
  watchHolder(ids: readonly string[], pidfd: number): void {
    const left = new Set(ids);
    const watch = watchReadable(pidfd, () => {
      for (const id of [...left]) this.endLease(id, 'its holder exited');
    });
    for (const id of ids) {
      this.holderWatches.set(id, {
        close: () => {
          if (!left.delete(id) || left.size > 0) return;
          watch.close();
          sys.close(pidfd);
        },
      });
    }
  }

  /** Ends a lease that lives as long as its holder or connection: its device is deleted. */
  endLease(id: string, reason: string): void {
    const l = this.table.get(id);
    if (!l) return;
    void this.retire(l, { op: 'cleanup', decision: 'cleanup', message: reason }).catch(() => {});
  }

  /**
   * The one way a device of the broker's goes: out of the table first, durably (so nothing acts on it
   * twice, and a crash from here on leaves a tagged device without a lease, which the next start deletes,
   * running its network's `down` if it still owes one), deleted off the event loop, unplugged from its
   * network, and audited whether it worked or not. On failure the error is rethrown after its record
   * (release puts the lease back). A lease no longer in the table is left alone.
   */
  async retire(l: LeaseRecord, o: RetireOptions): Promise<void> {
    // Already retired or gone (two events judged the same lease, a flood and a violation): nothing twice.
    if (!this.table.remove(l.id, { op: o.op, decision: o.decision, message: o.message })) return;
    this.kernel.faultPoint('retire:unleased');
    this.forget(l);
    if (l.kind === 'tap') this.forwarding.retiring.set(l.ifindex, l);
    const base: AuditEvent = {
      op: o.op,
      decision: o.decision,
      rule: l.rule,
      caller: o.caller ?? { uid: l.uid },
      device: leaseView(l),
    };
    if (o.request) base.request = o.request;
    // Deleted by its index: only while the device there is still this lease's (an administrator may have renamed
    // it, or the index be another device's now), looked at now and again when its turn comes (other deletions may
    // run first, for seconds: an outside review renamed it meanwhile); otherwise it is left alone.
    const other = { now: this.otherDevice(l) };
    try {
      if (!other.now) await this.reaper.deleteLink(l.ifindex, l.uid, () => !(other.now = this.otherDevice(l)));
    } catch (err) {
      const why = err instanceof sys.SyscallError ? `${err.reason} (${err.code})` : String(err);
      const message = `failed to delete \`${l.name}': ${why}`;
      this.audit.record({ ...base, decision: 'error', code: 'TB_E_KERNEL', message });
      this.table.retired(l.id);
      throw err;
    } finally {
      this.forwarding.retiring.delete(l.ifindex);
    }
    if (other.now) {
      const message = `the device is \`${other.now.name}' (${other.now.kind}) now, no longer this lease's: left alone`;
      this.unplug(l);
      this.note('cleanup', 'cleanup', l, `${message}; lease dropped`);
      this.table.retired(l.id);
      this.renounce(l, other.now);
      throw new TapbrokerError('TB_E_NO_SUCH_LEASE', `\`${l.name}' is gone: ${message}`);
    }
    this.kernel.faultPoint('retire:deleted');
    this.unplug(l);
    this.audit.record({ ...base, message: o.message });
    this.table.retired(l.id);
    // Until it was gone its holder could give it another guest's MAC and back (the bridge then drops that
    // MAC's entries, static ones included), with no lease left to judge the events by.
    if (l.kind === 'tap') this.forwarding.relockBridge(l.parent, 'a device on its bridge was deleted');
  }

  /** A tap whose holder gave it a MAC not its lease's: that MAC is locked to no new port there for a while. */
  private noteTaken(l: LeaseRecord, link: Link): void {
    if (l.kind === 'tap' && link.address) this.forwarding.noteTaken(l, macFromBuffer(link.address));
  }

  /**
   * A device that is no longer this lease's (root renamed it): its tag is cleared, so that no later start takes
   * it back or deletes it as an orphan of ours. Only while it carries this very lease's tag.
   */
  private renounce(l: LeaseRecord, link: Link): void {
    if (aliasIdentity(link.alias)?.id !== l.id) return;
    try {
      this.kernel.untag(link.index);
    } catch (err) {
      const why = (err as Error).message;
      this.log(`warning: the tag of \`${link.name}' (once \`${l.name}') could not be cleared: ${why}`);
    }
  }

  /** A lease whose device is already gone: dropped and unplugged; mid-create, its create fails instead. */
  private dropVanished(l: LeaseRecord, message: string): void {
    if (this.creating.has(l.id)) {
      this.vanished.add(l.id);
      return;
    }
    if (!this.table.remove(l.id)) return;
    this.forget(l);
    this.unplug(l);
    this.note('cleanup', 'cleanup', l, message);
  }

  /** What is kept of a lease while it lives: gone with it. */
  private forget(l: LeaseRecord): void {
    this.floods.forget(l.ifindex);
    for (const set of [this.creating, this.vanished, this.fresh]) set.delete(l.id);
    this.holderWatches.get(l.id)?.close();
    this.holderWatches.delete(l.id);
  }

  /** Undoes a device's OVS port or runs its hook's `down`, as its lease says. Never throws. */
  unplug(l: LeaseRecord): void {
    this.unplugs.unplug(l);
  }

  // ---- the kernel's view

  /** The device at a lease's index when it is another one (renamed by root, or the index reused), else null. */
  private otherDevice(l: LeaseRecord): Link | null {
    const now = this.kernel.link(l.ifindex);
    return now && !this.isDevice(l, now) ? now : null;
  }

  /** Is `link` this lease's device (same index, name and kind)? */
  private isDevice(l: LeaseRecord, link: Link | null | undefined): link is Link {
    return !!link && link.name === l.name && link.kind === KERNEL_KIND[l.kind];
  }

  /**
   * Link events worth decoding: a followed bridge's, a lease's deletion, a live lease's change. A device's
   * own events while its create is in flight predate its owner and address, so they show nothing to judge.
   */
  private wants(type: number, index: number, master: () => number | null, name: () => string | null): boolean {
    if (this.kernel.follows(index) || this.forwarding.holdsPortOff(index)) return true;
    const l = this.table.byIfindex(index);
    if (!l) return type !== RTM_DELLINK && this.forwarding.retiring.has(index);
    if (type === RTM_DELLINK) return true;
    // Renamed (only root can) while its create runs: that create fails, as for a deletion (an outside review: a
    // request's fd-bound NIC renamed mid-way was granted under a name no device had, and its persistent NICs stayed).
    if (this.creating.has(l.id) && name() !== l.name) return true;
    // A persistent tap's owner may attach a queue while it is being made: its events are read for what its
    // address shows (onLink), not judged.
    return (!this.creating.has(l.id) || (l.kind === 'tap' && l.ends === 'release')) && !this.flooding(l, master());
  }

  /** Is this event part of a flood (floods.ts)? The flood's device is deleted, as any other breach is. */
  private flooding(l: LeaseRecord, master: number | null): boolean {
    const flood = this.floods.count(l, master);
    if (!flood) return false;
    void this.retire(flood.victim, { op: 'cleanup', decision: 'cleanup', message: flood.message }).catch(() => {});
    return flood.victim === l;
  }

  /** Events repeating a judged state (repeats.ts): judged again once, shortly after. */
  private readonly repeats = new Repeats((link) => this.onLink(RTM_NEWLINK, link, true));

  private onLink(type: number, link: Link, again = false): void {
    this.kernel.observe(type, link);
    const l = this.table.byIfindex(link.index);
    if (!l) {
      const retiring = type !== RTM_DELLINK ? this.forwarding.retiring.get(link.index) : undefined;
      if (retiring) return this.forwarding.retaken(retiring, link);
      if (link.kind === 'bridge' && type !== RTM_DELLINK) {
        this.forwarding.followBridge(link, (o) => putBack(this.keeper!, o));
      }
      return;
    }
    // Renamed (only root can): no longer the broker's device; nothing acts on it by this lease again.
    if (l.name !== link.name) {
      this.dropVanished(l, `renamed to \`${link.name}': lease dropped, device left alone`);
      return this.renounce(l, link);
    }
    // A tap that took another MAC and went at once (closed before this was read): see Forwarding.took. A deletion's
    // event says what MAC the device had (its bridge has let it go by then: none is named).
    const took = takenMac(l, link);
    if (type === RTM_DELLINK && took !== null) this.forwarding.took(l, took);
    if (type === RTM_DELLINK && link.movedTo !== null) {
      // Moved to another network namespace (only root can), tag and all: not deleted there, nor if it comes back.
      this.table.keep(l.id);
      return this.dropVanished(l, `moved to another network namespace (nsid ${link.movedTo}): lease dropped, `
        + 'device left alone');
    }
    if (type === RTM_DELLINK) {
      this.dropVanished(l, l.ends === 'fds' ? 'the device vanished with its last fd' : 'the device vanished');
      return;
    }
    if (this.creating.has(l.id)) {
      // Its owner took a MAC mid-create (the bridge erased that MAC's entries): noted, as a holder's would be.
      if (violationOf(l, link) === 'address') this.noteTaken(l, link);
      return;
    }
    const state = stateOf(link);
    if (this.repeats.repeated(l, link, state, again)) return;
    // A tap event's owner and group are numbered as the user namespace of the task that made it numbers them: from
    // a holder in a rootless container root shows as the overflow uid, the holder's own uid as root, its gid as 0
    // (outside reviews: taps deleted for nothing, one given away unseen). They are read again as the broker sees
    // them (sysfs); a queue attached while an owner was changed and set back still shows in the event's count.
    const seen = link.tun ? this.kernel.tapAsSeen(link) : link;
    // Gone since: its RTM_DELLINK, queued or soon to be, says how it went; a MAC it took on its bridge is taken care
    // of now (the MAC the broker sets at a create is set before the tap joins its bridge).
    if (seen === null) return void (took !== null && link.master !== null && this.forwarding.took(l, took));
    if (!this.isDevice(l, seen)) return this.judge(l, seen);
    link = { ...link, tun: seen.tun };
    this.forwarding.followPort(l, link, this.fresh.has(l.id), () => putBack(this.keeper!, l));
    const violation = violationOf(l, link);
    if (violation === null) {
      if (!this.fresh.delete(l.id)) this.repeats.granted(l, state);
      return;
    }
    // A MAC an event shows is a breach even if undone since: a MAC set and set back has already wiped the
    // bridge's forwarding entry for it (an owner is judged as read again above). What
    // an event shows of persistence is judged on the device as it is now (converted or not, by what it is),
    // and so is every event of a lease whose create ended before all of its own events were read (those
    // predate its MAC and owner), until one shows it as granted.
    const current = violation === 'persist' || this.fresh.has(l.id) ? this.kernel.link(link.index) : link;
    if (current !== null) this.judge(l, current);
    if (took === null) return;
    // What it took, set back before it was judged and kept (a lease committed with events unread is judged as it is
    // now): the taking still wiped entries (an outside review cut a locked guest off for good this way).
    if (link.master !== null && this.table.get(l.id)) this.forwarding.took(l, took);
    else this.forwarding.noteTaken(l, took);
  }

  /** Leases committed while link events were still unread (a drain over its budget): see onLink. */
  private readonly fresh = new Set<string>();
  /** What reconcile was handed at start: a port lock is put back, OVS ports listed again, through it at run time. */
  keeper: Keeper | null = null;
  /** Did the last catch-up read every queued link event? */
  private drained = true;

  /**
   * Holds a live lease's device to the terms it was granted on. Whoever holds a tap fd can, with no
   * capability, make it persistent (TUNSETPERSIST), give it an owner (TUNSETOWNER) or change its MAC
   * (SIOCSIFHWADDR, which can move the bridge's address or displace another port's FDB entry). Each is
   * undone by deleting the device at once; a persistent one where the rule allows it becomes a lease
   * that ends with release.
   */
  private judge(l: LeaseRecord, link: Link | null): void {
    if (!this.isDevice(l, link)) {
      this.dropVanished(l, l.ends === 'fds' ? 'the device vanished with its last fd' : 'the device vanished');
      return;
    }
    if (this.creating.has(l.id)) return;
    const violation = violationOf(l, link);
    if (violation === null) return;
    let refused = '';
    if (violation === 'persist') {
      const d = decidePersistent(this.policy(), l, this.counts(l.uid));
      if (d.allow) {
        const converted: LeaseRecord = { ...l, ends: 'release', rule: d.rule.name };
        try {
          this.table.add(converted);
        } catch (err) {
          // A persistent lease the table cannot hold would not survive a restart: the device goes instead
          // (the failed add left the lease as it was).
          const message = `its holder made it persistent, but the lease table cannot be written `
            + `(${(err as Error).message}): deleted`;
          void this.retire(l, { op: 'cleanup', decision: 'cleanup', message }).catch(() => {});
          return;
        }
        this.note(
          'reconcile',
          'reconcile',
          converted,
          `its holder made it persistent; rule \`${d.rule.name}' allows that: it is now a persistent lease`,
        );
        // Judged again as what it now is: a MAC changed at the same time shows in no later event (after
        // lost events, none comes at all).
        return this.judge(converted, link);
      }
      refused = recorded(d).message;
    }
    const why = {
      persist: `its holder made it persistent, which the policy does not allow (${refused})`,
      owner: 'its holder changed its owner or group (TUNSETOWNER/TUNSETGROUP), or queues beyond its lease\'s were '
        + 'attached',
      address:
        `its MAC was changed to ${link.address ? macFromBuffer(link.address) : 'none'}` +
        ` (its lease's: ${expectedMac(l)})`,
    }[violation];
    if (violation === 'address') this.noteTaken(l, link);
    // A tap given another guest's MAC made the bridge move that guest's forwarding entry to this port: it goes
    // back to the port of the lease the MAC belongs to now, or else once this device is gone.
    // (A copy: an event's link is read from a buffer the next event reuses.)
    const taken = violation === 'address' && link.address ? Buffer.from(link.address) : null;
    const back = taken === null || link.master === null || this.forwarding.restoreTaken(l, taken, true);
    const retired = this.retire(l, { op: 'cleanup', decision: 'cleanup', message: `${why}: deleted` });
    if (!back) void retired.then(() => this.forwarding.restoreTaken(l, taken!), () => {});
    else void retired.catch(() => {});
  }

  /** After lost link events: one dump, and every lease judged against it. */
  resync(): void {
    // Until one pass has checked every lease, the next catch-up tries again (a dump that failed, a judgement
    // that threw): lost events are never forgotten half-handled.
    this.resyncOwed = true;
    this.kernel.observe(0, null);
    const links = new Map(this.kernel.links().map((k) => [k.index, k]));
    for (const l of this.table.all()) this.judge(l, links.get(l.ifindex) ?? null);
    // What the lost events showed is lost with them: a MAC set and set back meanwhile has deleted the bridge's
    // entries of that MAC, a locked guest's static one included. Every locked lease's entry is put back, on
    // a port still of its own bridge.
    const bridgeIndex = new Map([...links.values()].map((k) => [k.name, k.index]));
    for (const l of this.table.all()) {
      if (!l.locked || l.mac === null) continue;
      const master = links.get(l.ifindex)?.master ?? null;
      if (master === null || master !== bridgeIndex.get(l.parent)) continue;
      this.forwarding.relock(l, 'link events were lost');
    }
    this.resyncOwed = false;
    this.resyncs++;
    this.log(`link events were lost (the kernel's queue for them overran): ${this.table.size} leases checked `
      + `against a fresh list of ${links.size} links (${this.resyncs} time${this.resyncs > 1 ? 's' : ''} so far)`);
  }

  /** How many times lost link events made the broker check every lease against a dump. */
  private resyncs = 0;
  private resyncOwed = false;
}
