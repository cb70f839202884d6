// Fds whose last close the broker must not make itself: connections a client pushed fds through (the
// fds still queued in them), and its own copies of the fds it sent (the client shares them and can leave
// the broker's copy the last); the broker keeps one of these for each, so that neither holds up the other.
// A last close can block (a lingering TCP socket, a vhost-net fd whose worker, a thread of the client, is
// stopped) or take long
// (a tap, ~20 ms), and would stall everyone. They go, over a socketpair, to a sacrificial closer process
// (closer.ts), started on first need. A closer that stops acknowledging is killed and replaced; the fds
// queued in its socket are then released by the kernel in its exit. A closer stuck in the kernel outlives
// its SIGKILL (a user's FUSE file whose last release waits on a write its server never answers): at most
// MAX_WEDGED of them are left behind before the broker stops making new ones. Pushed connections then wait
// in bins: socketpairs of the broker's whose queues hold them in flight (its own copies closed, which for a
// socket is never a last close), so that however many come, they cost the broker two fds per bin; a bin goes
// to the next closer there is.

import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { SCM_MAX_FD, sys, watchReadable } from '@tapbroker/protocol/core';

const CLOSER = path.join(path.dirname(fileURLToPath(import.meta.url)), 'closer.js');
/** A closer with batches unacknowledged for this long is declared stuck. */
const STUCK_MS = 2000;
/** A closer that has not said it is ready (it dies with the broker) this long after its spawn is replaced. */
const READY_MS = 10_000;
/**
 * A closer with nothing to do for this long goes (it is started again on the next need): the default of the one
 * for pushed connections (an attack's path, or a kernel without SO_PASSRIGHTS). The broker's own copies keep theirs
 * longer (BrokerOptions.closerIdleMs): every grant sends them, and a new closer costs a node start.
 */
const IDLE_MS = 1000;
/** How often a closer is looked at: idle, stuck, owed its `go`. */
const CHECK_MS = 500;
/** Fds held while no closer can take them; beyond this, the oldest are handed to a fresh closer at once. */
const MAX_HELD = 4096;
/** Closers killed while stuck that have not exited yet (blocked in the kernel): no more are spawned past this. */
const MAX_WEDGED = 4;
/** Fds per batch (one `go`, one acknowledgement): well under STUCK_MS of taps' last closes. */
const BATCH = 16;
/** The closer's pool: its closes run side by side (the kernel tears down taps closed together in one go). */
const CLOSER_THREADS = 32;
/** How long pushed connections wait for more to fill a bin's packet (SCM_MAX_FD of them) while jammed. */
const BIN_DELAY_MS = 100;
/** A bin's send buffer (SO_SNDBUFFORCE): its queue holds packets up to this much memory, ~750 bytes each. */
const BIN_SNDBUF = 4 << 20;
/** Bins at most (each two fds; one holds thousands of connections before its queue is full). */
const MAX_BINS = 64;
/**
 * Connections in bins at most. Each is a descriptor in flight, counted against the sender's allowance (its
 * RLIMIT_NOFILE, past which its sendmsg with fds fails ETOOMANYREFS): root's, shared by every root process. With the
 * fds of unread replies (32,768 at most) they stay within the unit's 65,536. Beyond this they wait in the broker,
 * an fd each, as they did before there were bins.
 */
const MAX_BINNED = 16_384;

export class ForeignFds {
  private child: ChildProcess | null = null;
  private sock = -1;
  private watch: { close(): void } | null = null;
  private readonly rx = new sys.Receiver(256);
  private unacked = 0;
  private since = 0;
  /**
   * The closer said it dies with the broker (its first byte): nothing is sent to it before. A closer stopped before
   * it could say so outlived a killed broker, holding the broker's copies of taps (an outside re-test).
   */
  private ready = false;
  /** Closer starts that failed since one last started, and the reasons said meanwhile (see cannotStart). */
  private failedStarts = 0;
  private readonly startsSaid = new Set<string>();
  private held: number[] = [];
  private timer: NodeJS.Timeout | null = null;
  /** Fds handed off so far, and closers replaced because they were stuck (for status and tests). */
  handed = 0;
  replaced = 0;
  /** Killed closers still alive: stuck in the kernel (a last close that does not return). */
  private readonly wedged = new Set<ChildProcess>();
  /** Fds no socket will carry, waiting for a throwaway process (see orphan). */
  private readonly unsendable: number[] = [];
  /** The next move of pushed connections into a bin, while a packet's worth gathers. */
  private binSoon: NodeJS.Timeout | null = null;
  /** A batch was sent and our copies closed, but the closer's `go` could not be sent yet (its queue full). */
  private goOwed = false;
  /** Socketpairs whose queues hold pushed connections while no closer can be had (see the top of this file). */
  private bins: Array<[number, number]> = [];
  /** Connections in the bins. */
  private binned = 0;
  /** The broker stops: a closer is started even past MAX_WEDGED, so that its own exit releases nothing. */
  private stopping = false;

  /** `send`: sendmsg(2) (a test puts a fault this kernel cannot produce in its place). */
  constructor(
    private readonly log: (line: string) => void,
    private readonly send: typeof sys.sendMsg = sys.sendMsg,
    private readonly idleMs = IDLE_MS,
    /** Its closer, as the log names it (the broker has two). */
    private readonly what = 'fd closer',
  ) {}

  /**
   * Takes ownership of connections a client pushed fds through (sockets only: closing a copy of one runs no
   * file system's flush, so the bins may). Never closes them last in this process.
   */
  take(fds: readonly number[]): void {
    if (fds.length === 0) return;
    this.held.push(...fds);
    this.flush();
  }

  /**
   * Takes the broker's own copies of fds it sent or made. The same closer closes them; where none can be had
   * (no fd or process to spare, or every closer stuck), they are closed on the thread pool instead, as they
   * were before the closer took them: a descriptor the broker made is never kept open for lack of a closer.
   */
  give(fds: readonly number[]): void {
    if (fds.length === 0) return;
    for (const fd of fds) this.mine.add(fd);
    this.held.push(...fds);
    this.flush();
  }

  /** Held fds that are the broker's own (give): closed here when no closer can be started at all. */
  private readonly mine = new Set<number>();

  /** No closer can start (EMFILE, EAGAIN): the broker's own fds waiting are closed on the thread pool. */
  private closeMineHere(): void {
    const waiting = this.held;
    this.held = waiting.filter((fd) => !this.mine.has(fd));
    for (const fd of waiting) {
      if (!this.mine.delete(fd)) continue;
      fs.close(fd, () => {});
    }
  }

  close(): void {
    // What still waits, in bins too, goes to a closer (one is started whatever is stuck), so that the broker's
    // own exit is no last close of it.
    this.stopping = true;
    for (const fd of this.unsendable.splice(0)) if (orphan(fd, true)) sys.close(fd);
    if (this.binSoon) clearTimeout(this.binSoon);
    this.binSoon = null;
    if (this.held.length > 0 || this.bins.length > 0) this.flush();
    this.retire();
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  private flush(): void {
    // A closer may be had again: the bins go to it, whole (the broker's copies of their ends are closed once
    // sent; the closer's close of them is the last, and with it go the connections in their queues).
    if (this.bins.length > 0 && (!this.jammed || this.stopping)) {
      for (const bin of this.bins.splice(0)) this.held.push(...bin);
      this.binned = 0;
    }
    let spawned = 0;
    while (this.held.length > 0) {
      if (this.sock < 0) {
        // A closer that dies at once is not respawned in a loop: the timer tries again. Nor are closers
        // spawned without end while earlier ones stay stuck in the kernel: the fds go to bins (see jammed).
        if (spawned++ === 2 || (this.jammed && !this.stopping)) break;
        try {
          this.spawnCloser();
        } catch (err) {
          // No fd or process to spare (EMFILE, EAGAIN): the fds wait, and the timer tries again.
          this.cannotStart((err as Error).message);
          this.failedStarts++;
          this.closeMineHere();
          break;
        }
      }
      if (!this.ready && !this.stopping) break;
      // Small batches: the closer acknowledges each, and a batch of taps' last closes (~20 ms each) must not
      // look like a stuck closer.
      const batch = this.held.slice(0, BATCH);
      let n: number;
      try {
        if (this.goOwed) this.go();
        if (this.goOwed) break;
        n = this.send(this.sock, { data: Buffer.from([0]), fds: batch }, sys.MSG_DONTWAIT | sys.MSG_NOSIGNAL);
      } catch (err) {
        if (!closerGone(err)) {
          // Not the closer: an fd of the batch cannot travel (ETOOMANYREFS: a socket with others nested too deep
          // in its queue, where the kernel limits that). Each goes alone; one that cannot, to a throwaway process.
          if (!this.alone(batch)) break;
          continue;
        }
        this.log(`${this.what} unreachable (${(err as Error).message}); replacing it`);
        this.retire();
        continue;
      }
      if (n < 0) break; // Its queue is full: the stuck check decides.
      // In flight now: the kernel holds them for the closer, which closes them only at our `go`, sent once our
      // copies are closed: the last close is always the closer's, never ours.
      for (const fd of batch) {
        sys.close(fd);
        this.mine.delete(fd);
      }
      this.held = this.held.slice(batch.length);
      this.handed += batch.length;
      this.goOwed = true;
      try {
        this.go();
      } catch (err) {
        // The closer is gone: what it received goes in its exit, after our copies (closed above).
        this.log(`${this.what} unreachable (${(err as Error).message}); replacing it`);
        this.retire();
      }
    }
    // Every closer stuck in the kernel: the broker's own copies go on the pool rather than wait (new vhost-net
    // grants, the one kind whose last close can block without end, are refused meanwhile: see jammed).
    if (this.jammed) {
      this.closeMineHere();
      // Full packets at once; the rest once no more came for a moment (a bin holds a few hundred packets
      // whatever each carries, so one connection a packet would fill the bins after ~18,000).
      this.toBins(false);
      if (this.held.length > 0) {
        this.binSoon ??= setTimeout(() => {
          this.binSoon = null;
          if (this.jammed) this.toBins(true);
          else this.flush();
        }, BIN_DELAY_MS).unref();
      }
    }
    if (this.held.length > MAX_HELD && this.wedged.size < MAX_WEDGED) this.retire();
    this.timer ??= setInterval(() => this.check(), CHECK_MS).unref();
  }

  /** Every closer stuck: the pushed connections held go into bins (`all`: a last packet not full too). */
  private toBins(all: boolean): void {
    let i = 0;
    while (i < this.held.length && (all || this.held.length - i >= SCM_MAX_FD) && this.binned < MAX_BINNED) {
      const batch = this.held.slice(i, i + Math.min(SCM_MAX_FD, MAX_BINNED - this.binned));
      let n = -1;
      let into: number;
      try {
        if (this.bins.length === 0) this.bins.push(newBin());
        into = this.bins.at(-1)![0];
      } catch (err) {
        // No fd for a bin (EMFILE): what is left waits here.
        this.log(`no bin for pushed connections (${(err as Error).message}); ${this.held.length - i} wait`);
        break;
      }
      try {
        n = this.send(into, { data: Buffer.from([0]), fds: batch }, sys.MSG_DONTWAIT | sys.MSG_NOSIGNAL);
      } catch (err) {
        // An fd of the batch cannot travel (ETOOMANYREFS): each goes alone, one that cannot to a throwaway process.
        n = this.binAlone(into, batch, err as Error);
      }
      // Its queue is full: the next bin.
      if (n < 0 && this.bins.length < MAX_BINS) {
        this.bins.push(newBin());
        continue;
      }
      if (n < 0) break;
      // In flight in the bin now: closing our copy of a socket is never its last close.
      for (const fd of batch) sys.close(fd);
      i += batch.length;
      this.binned += batch.length;
    }
    if (i > 0) this.held = this.held.slice(i);
  }

  /**
   * A batch the kernel refused for a bin: its fds go in one at a time; one that cannot, to a throwaway process
   * (or aside, with none to spare). All of the batch is off our hands then (our copies are closed by toBins),
   * unless the bin filled first (-1: the rest waits for the next bin).
   */
  private binAlone(into: number, batch: number[], first: Error): number {
    this.log(`pushed connections a bin will not carry (${first.message}): one at a time`);
    for (let k = 0; k < batch.length; k++) {
      const fd = batch[k]!;
      try {
        if (this.send(into, { data: Buffer.from([0]), fds: [fd] }, sys.MSG_DONTWAIT | sys.MSG_NOSIGNAL) < 0) {
          // The bin is full: what went in is done with (toBins closes our copies); the rest waits for the next.
          batch.splice(k);
          return batch.length === 0 ? -1 : 0;
        }
      } catch (err) {
        const took = orphan(fd);
        this.log(`an fd no socket will carry (${(err as Error).message}): ${took ? 'a throwaway process closes it'
          : 'it waits for a throwaway process'}`);
        if (!took) this.unsendable.push(fd);
        else continue;
        // Set aside, not closed: toBins must not close it.
        batch.splice(k--, 1);
        this.held.splice(this.held.indexOf(fd), 1);
      }
    }
    return 0;
  }

  /**
   * Sends a batch's fds to the closer one at a time; one the kernel will not carry is inherited by a
   * throwaway process instead, whose exit is its last close. False if the rest must wait (a full queue, no
   * process to spare, the closer gone).
   */
  private alone(batch: readonly number[]): boolean {
    for (const fd of batch) {
      let n: number;
      try {
        n = this.send(this.sock, { data: Buffer.from([0]), fds: [fd] }, sys.MSG_DONTWAIT | sys.MSG_NOSIGNAL);
        if (n >= 0) this.goOwed = true;
      } catch (err) {
        if (closerGone(err)) {
          this.retire();
          return false;
        }
        const took = orphan(fd);
        // Without a throwaway process to spare it waits aside, and the rest goes on.
        if (!took) this.unsendable.push(fd);
        n = 0;
        const fate = took ? 'a throwaway process closes it' : 'it waits for a throwaway process';
        this.log(`an fd no socket will carry (${(err as Error).message}): ${fate}`);
        this.held.splice(this.held.indexOf(fd), 1);
        if (!took) continue;
      }
      if (n < 0) return false;
      sys.close(fd);
      this.mine.delete(fd);
      const at = this.held.indexOf(fd);
      if (at >= 0) this.held.splice(at, 1);
      this.handed++;
    }
    try {
      if (this.goOwed) this.go();
    } catch {
      this.retire();
      return false;
    }
    return true;
  }

  /** Tells the closer our copies of what it received are closed: it may close them now. */
  private go(): void {
    if (this.sock < 0) return;
    const n = sys.sendMsg(this.sock, { data: Buffer.from([1]) }, sys.MSG_DONTWAIT | sys.MSG_NOSIGNAL);
    if (n < 0) return;
    this.goOwed = false;
    if (this.unacked++ === 0) this.since = Date.now();
  }

  private check(): void {
    while (this.unsendable.length > 0 && orphan(this.unsendable[0]!)) {
      const fd = this.unsendable.shift()!;
      sys.close(fd);
      this.mine.delete(fd);
    }
    // An idle closer goes (its socket closed, it exits by itself): no process or fd is kept for nothing.
    if (this.unacked === 0 && !this.goOwed && this.held.length === 0 && this.sock >= 0
      && Date.now() - this.since > this.idleMs) {
      this.idle();
    }
    if (this.unacked > 0 && Date.now() - this.since > (this.ready ? STUCK_MS : READY_MS)) {
      this.log(`${this.what} stuck for ${Date.now() - this.since} ms with ${this.unacked} batch(es); replacing it`);
      this.replaced++;
      this.retire();
    }
    if (this.goOwed) {
      try {
        this.go();
      } catch {
        this.retire();
      }
    }
    if (this.held.length > 0) this.flush();
    if (this.held.length === 0 && this.unsendable.length === 0 && this.unacked === 0 && !this.goOwed && this.sock < 0
      && this.timer) {
      clearInterval(this.timer);
      this.timer = null;
    }
  }

  private onAck(): void {
    for (;;) {
      let m: sys.MsgIn | null;
      try {
        m = this.rx.recv(this.sock, sys.MSG_DONTWAIT);
      } catch {
        m = { data: Buffer.alloc(0), fds: [], flags: 0 };
      }
      if (m === null) return;
      if (m.data.length === 0) {
        // The closer is gone (it exited or was killed): whatever it had queued died with it.
        this.retire();
        if (this.held.length > 0) this.flush();
        return;
      }
      this.unacked = Math.max(0, this.unacked - m.data.length);
      this.since = Date.now();
      if (!this.ready) {
        this.ready = true;
        if (this.failedStarts > 0) this.log(`${this.what} started, after ${this.failedStarts} failed start(s)`);
        this.failedStarts = 0;
        this.startsSaid.clear();
        if (this.held.length > 0) queueMicrotask(() => this.flush());
      }
    }
  }

  /**
   * A closer that could not start, said once for each reason until one starts (an outside review's log got the same
   * line twice a second at the open-files limit, and nothing when it started again).
   */
  private cannotStart(reason: string): void {
    if (this.startsSaid.has(reason) || this.startsSaid.size >= 4) return;
    this.startsSaid.add(reason);
    this.log(`${this.what} cannot start (${reason}); ${this.held.length} fd(s) wait, tried again each second`);
  }

  private spawnCloser(): void {
    const [mine, theirs] = sys.socketpair(sys.SOCK_SEQPACKET);
    try {
      // With the broker's own node flags: under the unit's MemoryDenyWriteExecute= (inherited by children) a
      // node without --jitless aborts at start, and the fds sent to it would go with the dying process.
      const child = spawn(process.execPath, [...process.execArgv, CLOSER], {
        stdio: ['ignore', 'ignore', 'inherit', theirs],
        detached: false,
        env: { ...process.env, UV_THREADPOOL_SIZE: String(CLOSER_THREADS), TAPBROKER_CLOSER_OF: String(process.pid) },
      });
      // A spawn that failed has no pid; a running closer's errors (a kill that failed) are its own.
      child.on('error', (err) => {
        if (child.pid) this.log(`${this.what}: ${err.message}`);
        else this.cannotStart(err.message);
      });
      // No process (EMFILE, EAGAIN): its pid is unknown, and a kill of it would signal pid 0, the broker's own
      // process group.
      if (!child.pid) {
        sys.close(mine);
        throw new Error('the closer process could not be started');
      }
      this.child = child;
    } finally {
      sys.close(theirs);
    }
    sys.fcntlSet(mine, sys.F_SETFL, sys.fcntlGet(mine, sys.F_GETFL) | sys.O_NONBLOCK);
    this.sock = mine;
    this.watch = watchReadable(mine, () => this.onAck());
    // Its ready byte is owed like an acknowledgement (see READY_MS).
    this.unacked = 1;
    this.since = Date.now();
    this.ready = false;
    this.goOwed = false;
  }

  /**
   * True while no closer can be had (MAX_WEDGED stuck in the kernel): pushed fds wait, the broker's own are
   * closed on the thread pool, and vhost-net grants are refused (TB_E_BUSY) until one exits.
   */
  get jammed(): boolean {
    return this.sock < 0 && this.wedged.size >= MAX_WEDGED;
  }

  /** An idle closer: its socket closed, it reads the end and exits by itself. */
  private idle(): void {
    this.watch?.close();
    this.watch = null;
    sys.close(this.sock);
    this.sock = -1;
    this.child = null;
  }

  /** Kills the closer; the kernel releases what it held in the closer's own exit, not here. */
  private retire(): void {
    const child = this.child;
    if (child?.pid) {
      child.kill('SIGKILL');
      if (child.exitCode === null && child.signalCode === null) {
        this.wedged.add(child);
        child.once('exit', () => {
          this.wedged.delete(child);
          if (this.held.length > 0 || this.bins.length > 0) this.flush();
        });
      }
    }
    this.child = null;
    this.watch?.close();
    this.watch = null;
    if (this.sock >= 0) sys.close(this.sock);
    this.sock = -1;
    this.unacked = 0;
    // What it held goes with it, in its exit (our copies are closed already: its close is the last).
    this.goOwed = false;
  }
}

/** A bin: a socketpair whose queue holds sockets in flight, with room for thousands of packets. */
function newBin(): [number, number] {
  const bin = sys.socketpair(sys.SOCK_SEQPACKET);
  try {
    sys.setsockoptInt(bin[0], sys.SOL_SOCKET, 32 /* SO_SNDBUFFORCE */, BIN_SNDBUF);
  } catch {
    // Without CAP_NET_ADMIN: the default buffer, a few hundred packets.
  }
  return bin;
}

/** Errors that say the closer is gone, not that what was sent cannot travel. */
function closerGone(err: unknown): boolean {
  const code = (err as sys.SyscallError).errno;
  return [sys.errno.EPIPE, sys.errno.ECONNRESET, sys.errno.ENOTCONN, sys.errno.ECONNREFUSED, sys.errno.EBADF]
    .includes(code);
}

/** The binary a throwaway process runs: it only has to exit. */
const THROWAWAY = fs.existsSync('/bin/true') ? ['/bin/true'] : [process.execPath, '-e', '0'];

/**
 * An fd no socket will carry: a throwaway process inherits it (fork and exec, no SCM_RIGHTS) and exits, its
 * exit the last close. True once it holds it (the caller then closes its own copy); false if none could start.
 */
export function orphan(fd: number, force = false): boolean {
  // Bounded: past MAX_ORPHANS alive (each a fork and exec on the broker's thread), the fd waits for one to go.
  if (orphans >= MAX_ORPHANS && !force) return false;
  try {
    const child = spawn(THROWAWAY[0]!, THROWAWAY.slice(1), { stdio: ['ignore', 'ignore', 'ignore', fd] });
    child.on('error', () => {});
    if (child.pid === undefined) return false;
    orphans++;
    child.once('exit', () => orphans--);
    return true;
  } catch {
    return false;
  }
}

/** Throwaway processes alive at most (one stuck in a last close stays counted until it exits). */
const MAX_ORPHANS = 8;
let orphans = 0;
