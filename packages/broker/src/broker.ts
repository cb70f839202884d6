// The broker's lifecycle: accept → peer identity from the kernel → connection caps → session (decode,
// dispatch by op to ops.ts) → reply with fds. It owns the state the handlers read: the policy, the
// kernel steps, lease lifetimes, the audit trail, and the queues of slow work.
import {
  MAX_REQUEST_BYTES,
  PROTOCOL_VERSION,
  SeqpacketConnection,
  TapbrokerError,
  refuseFds,
  sys,
  type ErrorCode,
  type PeerCredentials,
  type Request,
  type SeqpacketListener,
} from '@tapbroker/protocol/core';
import { encodeReply } from '@tapbroker/protocol/requests';
import { Fairness } from './fairness.js';
import { Audit, type AuditOp, type AuditOptions } from './audit.js';
import { ForeignFds } from './foreign.js';
import { forgetUserNames, identify, type Identity } from './identity.js';
import { BROKER_VERSION } from './leases.js';
import { Lifetimes } from './lifetimes.js';
import { returnFreeMemory } from './libc.js';
import { shown } from './naming.js';
import { SUBGID_FILE, Subuids, screenIds } from './subids.js';
import { NO_FAULTS, type Cleanup, type Faults, type Kernel } from './kernel.js';
import { Netdev } from './netdev.js';
import { dispatch, type OpContext } from './ops.js';
import type { Policy } from './decide.js';
import { accountsStamp, loadTrustedPolicy, lostSince, movedSince, warned, withAccountsNow } from './policy.js';
import { Reaper } from './reaper.js';
import { reconcileOvs } from './reconcile.js';
import { Session, type Outcome, type SessionHost } from './session.js';

export { BROKER_VERSION, PROTOCOL_VERSION };

/** Connections kept for users who hold none, so many users together cannot lock a new one out. */
const RESERVED_FOR_NEWCOMERS = 64;
/** How long a shutdown waits for requests in flight before it closes their connections anyway. */
const SHUTDOWN_GRACE_MS = 15_000;

export interface BrokerOptions {
  policy: Policy;
  /** Where the lease table lives; null keeps it in memory (tests, embedding). */
  stateDir: string | null;
  /** The policy file, re-read by reload(); null when the policy did not come from a file. */
  policyPath?: string | null;
  /** Where audit records go. */
  audit?: AuditOptions;
  /** A connection that has not said hello by then is closed. */
  helloTimeoutMs?: number;
  /** A connection holding no lease that sends nothing for this long is closed (default 60 s). */
  idleTimeoutMs?: number;
  maxConnections?: number;
  /** Connections one uid may hold at once, so no user can take every slot (default 64). */
  maxConnectionsPerUser?: number;
  /**
   * Fds of unread replies one uid's connections may hold before its creates wait (default 1024; all callers' together:
   * 32 times as many, half the unit's open-file limit).
   */
  maxUnreadFds?: number;
  log?: (line: string) => void;
  /**
   * Refuse fds at the socket (SO_PASSRIGHTS=0) where the kernel can (default true). False exercises
   * the fallback every kernel before 6.16 relies on: fds received, handed to the closer process.
   */
  refuseFdsAtSocket?: boolean;
  /** Fault points in the kernel steps; a no-op unless a test injects faults. */
  faults?: Faults;
  /**
   * The kernel the broker acts on (default: this one, through Netdev). `cleanup` is how its own rollbacks
   * hand slow work back to the broker.
   */
  kernel?: (cleanup: Cleanup) => Kernel;
  /** The kernel's queue of link events for the broker, in bytes (default 4 MiB); lost events cost a dump. */
  linkEventQueue?: number;
  /** Where subordinate uids are listed (default /etc/subuid), read again whenever it changes. */
  subuidFile?: string;
  /** Where subordinate gids are listed (default /etc/subgid), read again whenever it changes. */
  subgidFile?: string;
  /** The clock each uid's share of the broker's thread is counted on, in ms (default performance.now). */
  clock?: () => number;
  /** How long the closer of the broker's own fd copies stays without work before it goes (default 30 s). */
  closerIdleMs?: number;
  /** How long a uid whose tap took a locked guest's MAC first waits for new devices (default 1 s; it doubles). */
  takerWaitMs?: number;
  /** How often memory the broker freed goes back to the system (default 60 s; 0: never), and how. */
  returnMemoryMs?: number;
  returnMemory?: () => void;
}

/**
 * What the log says of accepts stalled for want of fds: once each way (an outside review found only the closer's
 * line, twice a second, at the open-files limit). A stall within a minute of the last one said is said only if it
 * lasts 5 s (a re-test made short ones alternate; an audit's long one inside that minute was said nowhere).
 */
export function stallLog(log: (line: string) => void, quietMs = 60_000, lateMs = 5000) {
  let said = false;
  let quietUntil = 0;
  let unsaid = 0;
  let late: NodeJS.Timeout | undefined;
  const say = (err: Error) => {
    said = true;
    log(`not accepting connections: ${err.message}; they wait in the socket's queue until fds are free`
      + (unsaid > 0 ? ` (${unsaid} shorter stall(s) since the last said)` : ''));
    unsaid = 0;
  };
  return (err: Error | null, ms: number) => {
    clearTimeout(late);
    if (err && performance.now() >= quietUntil) say(err);
    else if (err) late = setTimeout(() => say(err), lateMs).unref();
    else if (said) {
      said = false;
      quietUntil = performance.now() + quietMs;
      log(`accepting connections again, after ${Math.round(ms)} ms`);
    } else unsaid++;
  };
}

export class Broker implements SessionHost, OpContext {
  private current!: Policy;
  /**
   * The account files when the deny rules' group members were last read, and when they were last looked at.
   * None at first: the first look reads them again (they may have changed since the policy was loaded).
   */
  private accounts = { stamp: '', next: -Infinity };
  readonly version = BROKER_VERSION;
  readonly started = new Date().toISOString();
  /** Policies applied since the start (status: a client's requests decided under one policy compare it). */
  policyLoads = 1;
  readonly kernel: Kernel;
  readonly audit: Audit;
  readonly lifetimes: Lifetimes;
  readonly reaper: Reaper;
  /** Connections (with the fds queued in them) a client pushed fds through: a closer of their own. */
  readonly foreignFds: ForeignFds;
  /**
   * The broker's own copies of fds it sent: another closer, so that nothing a client pushes (a lingering
   * socket, a file whose flush never returns) can hold up the end of other users' devices.
   */
  readonly ownFds: ForeignFds;
  readonly policyPath: string | null;
  readonly helloTimeoutMs: number;
  readonly idleTimeoutMs: number;
  readonly fairness: Fairness;
  private readonly sessions = new Set<Session>();
  private readonly perUid = new Map<number, number>();
  private listener: SeqpacketListener | null = null;
  private readonly maxConnections: number;
  private readonly maxConnectionsPerUser: number;
  private readonly maxUnreadFds: { perUid: number; all: number };
  /** Subordinate uids: refused at accept; subordinate gids: left out of the caller's groups (subids.ts). */
  private readonly subuids: Subuids;
  private readonly subgids: Subuids;
  private readonly refuseAtSocket: boolean;
  /** True once SO_PASSRIGHTS is in force on the listener. */
  fdsRefusedAtSocket = false;
  private readonly log: (line: string) => void;
  private readonly trim: NodeJS.Timeout | null;

  constructor(opts: BrokerOptions) {
    this.policy = opts.policy;
    this.policyPath = opts.policyPath ?? null;
    this.fairness = new Fairness(opts.clock);
    this.audit = new Audit(() => this.policy.sha256, { log: opts.log, ...opts.audit });
    this.helloTimeoutMs = opts.helloTimeoutMs ?? 5000;
    this.idleTimeoutMs = opts.idleTimeoutMs ?? 60_000;
    this.maxConnections = opts.maxConnections ?? 1024;
    this.maxConnectionsPerUser = opts.maxConnectionsPerUser ?? 64;
    const unread = opts.maxUnreadFds ?? 1024;
    this.maxUnreadFds = { perUid: unread, all: 32 * unread };
    this.refuseAtSocket = opts.refuseFdsAtSocket ?? true;
    this.subuids = new Subuids(opts.subuidFile);
    this.subgids = new Subuids(opts.subgidFile ?? SUBGID_FILE);
    this.log = opts.log ?? (() => {});
    this.foreignFds = new ForeignFds(this.log);
    // Every grant hands it fds: kept through a burst of VM starts, not started again for each (a node start).
    this.ownFds = new ForeignFds(this.log, undefined, opts.closerIdleMs ?? 30_000, 'fd closer of grants');
    let lifetimes!: Lifetimes;
    const cleanup: Cleanup = {
      closeFds: (fds, uid) => lifetimes.closeFds(fds, uid),
      deleteLink: (ifindex, uid, name, why) => lifetimes.deleteLink(ifindex, uid, name, why),
    };
    const stateDir = opts.stateDir ?? '/run/tapbroker';
    this.kernel = opts.kernel?.(cleanup)
      ?? new Netdev(cleanup, stateDir, opts.faults ?? NO_FAULTS, opts.linkEventQueue);
    this.reaper = new Reaper((ifindex) => this.kernel.deleteLink(ifindex), (fds) => this.ownFds.give(fds));
    lifetimes = new Lifetimes(opts.stateDir, this.kernel, this.reaper, this.audit, () => this.policy, this.log,
      opts.takerWaitMs);
    this.lifetimes = lifetimes;
    const every = opts.returnMemoryMs ?? 60_000;
    this.trim = every > 0 ? setInterval(opts.returnMemory ?? returnFreeMemory, every).unref() : null;
  }

  /**
   * The policy in force. Its names and its deny rules' group members follow the account database: looked at at
   * most once a second, read again when its files changed (a user added to a deny's group is denied within a
   * second). A reading takes the broker's thread, and a user may change the files (chfn): the next waits ten times
   * as long as the last took (an outside re-test: a 200,000-line /etc/group changed every 100 ms held requests 1-2 s).
   */
  get policy(): Policy {
    const now = performance.now();
    if (now >= this.accounts.next) {
      this.accounts.next = now + 1000;
      const stamp = accountsStamp();
      if (stamp !== this.accounts.stamp) {
        const first = this.accounts.stamp === '';
        this.accounts.stamp = stamp;
        const { policy, changed } = withAccountsNow(this.current);
        this.current = policy;
        this.accounts.next = now + Math.max(1000, 10 * (performance.now() - now));
        if (!first) this.accountsChanged(changed);
      }
    }
    return this.current;
  }

  set policy(p: Policy) {
    this.current = p;
  }

  /** The policy's names read again after the account files changed: logged, and recorded where they mean others. */
  private accountsChanged(changed: string[]): void {
    forgetUserNames();
    this.log('the account database changed: the policy\'s user and group names, and its deny rules\' group members, '
      + 'were read again');
    if (changed.length === 0) return;
    // What the policy's names mean changed: another policy in force, as after a reload (an outside re-test's VM got
    // NICs under two rules across a uid's change, and its client, comparing this count, saw none).
    this.policyLoads++;
    this.audit.record({
      op: 'reload', decision: 'reload', rule: null, caller: null,
      message: `the account database changed: ${changed.join('; ')} (the policy file was not read again)`,
    });
  }

  get leases() {
    return this.lifetimes.table;
  }

  /** Reconciles the lease table with the kernel, follows link events, and serves `listener`. */
  start(listener: SeqpacketListener): void {
    this.lifetimes.start();
    this.listener = listener;
    if (this.refuseAtSocket) this.fdsRefusedAtSocket = listener.refuseFds();
    listener.onStall = stallLog(this.log);
    sys.reserveSpareFd();
    listener.start((fd) => this.accept(fd));
  }

  get connections(): number {
    return this.sessions.size;
  }

  /** Stops accepting, lets requests in flight finish, closes every connection; leases stay on disk. */
  async shutdown(): Promise<void> {
    // Connections not accepted yet go with the listener, and fds a client queued in them with its last close:
    // the closer's (started at the stop if need be), never the broker's.
    this.listener?.close((fd) => this.foreignFds.take([fd]));
    this.listener = null;
    // Requests in flight are answered, for SHUTDOWN_GRACE_MS at most (a hook or Open vSwitch that hangs).
    let grace: NodeJS.Timeout | undefined;
    const late = new Promise<void>((resolve) => (grace = setTimeout(resolve, SHUTDOWN_GRACE_MS)));
    await Promise.race([Promise.all([...this.sessions].map((s) => s.finish())), late]);
    clearTimeout(grace);
    for (const s of this.sessions) s.abandon();
    await this.reaper.idle();
    // Hooks' `down`s running: within the same grace (what is left runs again at the next start).
    await this.lifetimes.close(SHUTDOWN_GRACE_MS);
    this.foreignFds.close();
    this.ownFds.close();
    if (this.trim) clearInterval(this.trim);
    this.kernel.close();
    this.audit.close();
  }

  /**
   * Re-reads the policy file. A valid one applies to requests from now on; an invalid one is refused
   * with its errors and the last good policy stays. Leases are never touched.
   */
  reload(caller: Partial<Identity> | null): Policy {
    const before = this.policy.sha256;
    // The audit file too, whatever becomes of the policy: logrotate's `postrotate` asks for a reload.
    this.audit.reopen();
    try {
      if (!this.policyPath) throw new TapbrokerError('TB_E_POLICY_INVALID', 'the policy did not come from a file');
      const stamp = accountsStamp();
      const loaded = loadTrustedPolicy(this.policyPath);
      // What the last policy had and this one lacks is said where the administrator looks (the reply, the log and
      // the record): a fragment deleted or being replaced reads as gone (an outside review lost a deny that way).
      const moved = movedSince(this.policy, loaded, this.lifetimes.table.all());
      const next: Policy = { ...loaded, warnings: [...lostSince(this.policy, loaded), ...moved, ...loaded.warnings] };
      forgetUserNames();
      for (const w of next.warnings) this.log(`warning: ${shown(w)}`);
      // Denials counted so far were decided under the policy before: their summary names that one.
      this.audit.flushRefusals();
      this.policy = next;
      this.policyLoads++;
      // The ports that are not this broker's, listed again (the policy may name another database).
      if (this.lifetimes.keeper) void reconcileOvs(this.lifetimes.keeper, false);
      this.accounts = { stamp, next: performance.now() + 1000 };
      this.audit.record({
        op: 'reload',
        decision: 'reload',
        rule: null,
        caller,
        message: next.sha256 === before
          ? `policy ${before} read again, unchanged, from ${next.files.join(', ')}${warned(next)}`
          : `policy ${before} replaced by ${next.sha256}, read from ${next.files.join(', ')}${warned(next)}`,
      });
      return next;
    } catch (err) {
      const e = err instanceof TapbrokerError ? err : new TapbrokerError('TB_E_POLICY_INVALID', String(err));
      this.audit.record({
        op: 'reload',
        decision: 'error',
        rule: null,
        caller,
        code: e.code,
        message: `${e.message} (keeping ${before})`,
      });
      throw e;
    }
  }

  /** Idle: no connection, no lease, and no network's `down` (or Open vSwitch port removal) running or to try again. */
  get idle(): boolean {
    return this.sessions.size === 0 && this.leases.size === 0 && this.lifetimes.unplugs.idle;
  }

  // ---- SessionHost

  dispatch(caller: Identity, req: Request): Outcome | Promise<Outcome> {
    return dispatch(this, caller, req);
  }

  release(fds: number[], uid: number): void {
    this.reaper.closeFds(fds, uid).catch(() => {});
  }

  foreign(fds: number[]): void {
    this.foreignFds.take(fds);
  }

  endLease(id: string, reason: string): void {
    this.lifetimes.endLease(id, reason);
  }

  holds(id: string): boolean {
    return this.lifetimes.holds(id);
  }

  refused(caller: Partial<Identity>, op: AuditOp, code: ErrorCode, message: string): void {
    this.audit.refusal(caller, op, code, message);
  }

  teardowns(uid: number): number {
    return this.reaper.pending(uid) + this.lifetimes.unplugs.of(uid);
  }

  get fdsJammed(): boolean {
    return this.ownFds.jammed;
  }

  /** Fds of replies their clients have not read yet: `uid`'s connections', or every connection's. */
  private fdsUnread(uid?: number): number {
    let n = 0;
    for (const s of this.sessions) if (uid === undefined || s.caller.uid === uid) n += s.fdsUnread();
    return n;
  }

  /** Fds of replies being made (reserved, not sent yet), per uid and in all. */
  private readonly fdsReserved = new Map<number, number>();
  private fdsReservedAll = 0;

  reserveFds(uid: number, n: number): { release(): void } | { unread: number; all: number; mine: boolean } {
    const unread = this.fdsUnread(uid) + (this.fdsReserved.get(uid) ?? 0);
    const all = this.fdsUnread() + this.fdsReservedAll;
    const mine = unread + n > this.maxUnreadFds.perUid;
    if (mine || all + n > this.maxUnreadFds.all) return { unread, all, mine };
    this.fdsReserved.set(uid, (this.fdsReserved.get(uid) ?? 0) + n);
    this.fdsReservedAll += n;
    let held = true;
    return {
      release: () => {
        if (!held) return;
        held = false;
        const left = (this.fdsReserved.get(uid) ?? 0) - n;
        if (left > 0) this.fdsReserved.set(uid, left);
        else this.fdsReserved.delete(uid);
        this.fdsReservedAll -= n;
      },
    };
  }

  // ---- connections

  /**
   * A new connection. The caps are checked from what the socket says of the peer (SO_PEERCRED, its groups
   * and a pidfd: three getsockopt calls), before any /proc or account work. Its uid's share of the broker's
   * thread is charged for it (an outside review: a uid with no rule connecting and closing in a loop, never
   * charged, stalled root's requests for up to 1.7 s); a uid past its share waits, connections and all, for the
   * next window (up to its cap of connections).
   */
  private accept(fd: number): void {
    try {
      this.acceptOne(fd);
    } finally {
      // The fd held in reserve, given up at the open-files limit, is taken again where it can be, whatever became of
      // the connection (its re-test: refused and shed connections spent it and never took it back).
      sys.reserveSpareFd();
    }
  }

  private acceptOne(fd: number): void {
    const t0 = performance.now();
    if (this.shed(fd)) return;
    // No client's fd ever enters the broker, not even one queued before the socket refused them: each close()
    // runs its file's flush, which a FUSE server can make wait for ever. Frames are peeked, and a frame with
    // fds ends its connection, which goes whole to the closer (SeqpacketConnection, takesFds).
    const conn = new SeqpacketConnection(fd, { maxPacket: MAX_REQUEST_BYTES, takesFds: false });
    // A connection queued before the listener refused fds can still carry them: refuse them here too.
    if (this.fdsRefusedAtSocket) refuseFds(fd);
    let peer: PeerCredentials;
    try {
      // Its pidfd is the one fd a connection needs before it can be answered: at the open-files limit, the reserve's.
      peer = sys.withSpareFd(() => conn.peer());
    } catch {
      conn.drainAndClose((fds) => this.foreign(fds)); // The peer vanished before we could ask who it was.
      return;
    }
    const payer = this.payer(peer.uid);
    const mine = this.perUid.get(payer) ?? 0;
    const wait = this.fairness.turn(payer);
    if (wait && mine < this.maxConnectionsPerUser) {
      this.perUid.set(payer, mine + 1);
      void wait.then(() => {
        this.unhold(payer);
        try {
          if (this.listener) {
            this.admit(conn, peer, payer, performance.now());
          } else {
            // Stopped meanwhile: the connection goes as the ones not accepted yet do.
            if (peer.pidfd !== null) sys.close(peer.pidfd);
            conn.drainAndClose((fds) => this.foreign(fds));
          }
        } finally {
          sys.reserveSpareFd(); // As accept's: a connection held back and refused here spent it too.
        }
      });
    } else {
      this.admit(conn, peer, payer, t0);
    }
  }

  /**
   * Whose share a connection of `uid` is charged to: a subordinate uid's (/etc/subuid) owner's, so that one user's
   * thousands of uids are one share and one cap of connections (an outside review: each had its own, and a flood
   * spread over them was never held back). Ranges of root's, or of an owner without an account, are one share
   * each, under a key no uid has (root's own uid pays nothing).
   */
  private payer(uid: number): number {
    const sub = uid === 0 ? null : this.subuids.of(uid);
    if (!sub) return uid;
    return sub.ownerUid !== null && sub.ownerUid !== 0 ? sub.ownerUid : -1 - sub.start;
  }

  /**
   * A connection of a uid past its share that holds its cap of connections already goes at once, as cheaply as
   * can be: its uid read (SO_PEERCRED), no reply, closed here where no fds are queued in it (else by the closer).
   */
  private shed(fd: number): boolean {
    const cred = Buffer.alloc(12);
    try {
      sys.getsockopt(fd, sys.SOL_SOCKET, sys.SO_PEERCRED, cred);
    } catch {
      return false;
    }
    const uid = cred.readUInt32LE(4);
    const payer = this.payer(uid);
    if (uid === 0 || (this.perUid.get(payer) ?? 0) < this.maxConnectionsPerUser || !this.fairness.turn(payer)) {
      return false;
    }
    // Recorded under the payer, as refusals at check are under a subordinate uid's owner.
    this.audit.refusal({ uid: payer < 0 ? -1 - payer : payer, pid: cred.readInt32LE(0) }, 'connection', 'TB_E_BUSY',
      `uid ${uid} took its share of the broker's time and holds ${this.maxConnectionsPerUser} connections: `
      + 'connection closed unanswered');
    if (sys.queuedFds(fd) === 0) sys.close(fd);
    else this.foreign([fd]);
    return true;
  }

  /** A connection's uid may have it now: checked, and served or refused; charged to its payer from `t0`. */
  private admit(conn: SeqpacketConnection, peer: PeerCredentials, payer: number, t0: number): void {
    try {
      this.check(conn, peer);
    } finally {
      this.fairness.spent(payer, performance.now() - t0);
    }
  }

  private check(conn: SeqpacketConnection, peer: PeerCredentials): void {
    const { groups, claimed, refused } = screenIds(peer, this.subuids, this.subgids);
    peer = { ...peer, groups };
    if (refused) {
      if (peer.pidfd !== null) sys.close(peer.pidfd);
      const message = refused.message;
      // Counted against the owner: its thousands of uids share one allowance of audit records.
      const owner = refused.byUid ? { uid: refused.range.ownerUid ?? refused.range.start, pid: peer.pid }
        : { uid: peer.uid, gid: peer.gid, pid: peer.pid };
      this.audit.refusal(owner, 'connection', 'TB_E_POLICY_DENIED', message);
      conn
        .send(encodeReply({ op: 'error', id: null, code: 'TB_E_POLICY_DENIED', message }))
        .catch(() => {})
        .finally(() => conn.drainAndClose((fds) => this.foreign(fds)));
      return;
    }
    const mine = this.perUid.get(peer.uid) ?? 0;
    // The last slots are kept for users who hold none: however many users together fill the broker, a
    // user's first connection still gets in.
    const reserve = Math.min(RESERVED_FOR_NEWCOMERS, Math.floor(this.maxConnections / 4));
    const full =
      this.sessions.size >= this.maxConnections
        ? `the broker is at its limit of ${this.maxConnections} connections; try again`
        : peer.uid !== 0 && mine >= this.maxConnectionsPerUser
          ? `uid ${peer.uid} already holds ${mine} connections, the most one user may`
          : peer.uid !== 0 && mine > 0 && this.sessions.size >= this.maxConnections - reserve
            ? `the broker's last ${reserve} connections are kept for users who hold none; uid ${peer.uid} holds ${mine}`
            : null;
    if (full) {
      if (peer.pidfd !== null) sys.close(peer.pidfd);
      this.audit.refusal({ uid: peer.uid, gid: peer.gid, pid: peer.pid }, 'connection', 'TB_E_BUSY', full);
      conn
        .send(Buffer.from(encodeBusy(full)))
        .catch(() => {})
        .finally(() => conn.drainAndClose((fds) => this.foreign(fds)));
      return;
    }
    const caller = identify(peer);
    if (claimed.length > 0) caller.claimed = claimed;
    caller.subordinateGid = (gid) => this.subgids.of(gid)?.owner ?? null;
    const session = new Session(this, conn, caller);
    this.sessions.add(session);
    this.perUid.set(peer.uid, mine + 1);
    void session.run().finally(() => {
      this.sessions.delete(session);
      this.unhold(peer.uid);
    });
  }

  private unhold(uid: number): void {
    const n = (this.perUid.get(uid) ?? 1) - 1;
    if (n > 0) this.perUid.set(uid, n);
    else this.perUid.delete(uid);
  }
}

function encodeBusy(message: string): Buffer {
  return encodeReply({ op: 'error', id: null, code: 'TB_E_BUSY', message });
}

export type { Identity, Outcome };
