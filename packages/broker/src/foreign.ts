// Fds a client pushed at the broker. The broker never closes them itself: their last close can block
// (a lingering TCP socket) or take long, and would stall everyone. They go, over a socketpair, to a
// sacrificial closer process (closer.ts), started on first need. A closer that stops acknowledging is
// killed and replaced; the fds queued in its socket are then released by the kernel in its exit.
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { sys, watchReadable } from '@tapbroker/protocol/core';

const CLOSER = path.join(path.dirname(fileURLToPath(import.meta.url)), 'closer.js');
/** A closer with batches unacknowledged for this long is declared stuck. */
const STUCK_MS = 2000;
/** Fds held while no closer can take them; beyond this, the oldest are handed to a fresh closer at once. */
const MAX_HELD = 4096;

export class ForeignFds {
  private child: ChildProcess | null = null;
  private sock = -1;
  private watch: { close(): void } | null = null;
  private readonly rx = new sys.Receiver(256);
  private unacked = 0;
  private since = 0;
  private held: number[] = [];
  private timer: NodeJS.Timeout | null = null;
  /** Fds handed off so far, and closers replaced because they were stuck (for status and tests). */
  handed = 0;
  replaced = 0;

  constructor(private readonly log: (line: string) => void) {}

  /** Takes ownership of `fds`. Never closes them in this process. */
  take(fds: readonly number[]): void {
    if (fds.length === 0) return;
    this.held.push(...fds);
    this.flush();
  }

  close(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    this.retire();
  }

  private flush(): void {
    let spawned = 0;
    while (this.held.length > 0) {
      if (this.sock < 0) {
        // A closer that dies at once is not respawned in a loop: the timer tries again.
        if (spawned++ === 2) break;
        this.spawnCloser();
      }
      const batch = this.held.slice(0, sys.SCM_MAX_FD);
      let n: number;
      try {
        n = sys.sendMsg(this.sock, { data: Buffer.from([0]), fds: batch }, sys.MSG_DONTWAIT | sys.MSG_NOSIGNAL);
      } catch (err) {
        this.log(`fd closer unreachable (${(err as Error).message}); replacing it`);
        this.retire();
        continue;
      }
      if (n < 0) break; // Its queue is full: the stuck check decides.
      // In flight now: the kernel holds them for the closer; our copies can go without being the last.
      for (const fd of batch) sys.close(fd);
      this.held = this.held.slice(batch.length);
      this.handed += batch.length;
      if (this.unacked++ === 0) this.since = Date.now();
    }
    if (this.held.length > MAX_HELD) this.retire();
    this.timer ??= setInterval(() => this.check(), STUCK_MS / 2).unref();
  }

  private check(): void {
    if (this.unacked > 0 && Date.now() - this.since > STUCK_MS) {
      this.log(`fd closer stuck for ${Date.now() - this.since} ms with ${this.unacked} batch(es); replacing it`);
      this.replaced++;
      this.retire();
    }
    if (this.held.length > 0) this.flush();
    if (this.held.length === 0 && this.unacked === 0 && this.timer) {
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
    }
  }

  private spawnCloser(): void {
    const [mine, theirs] = sys.socketpair(sys.SOCK_SEQPACKET);
    try {
      // With the broker's own node flags: under the unit's MemoryDenyWriteExecute= (inherited by children) a
      // node without --jitless aborts at start, and the fds sent to it would go with the dying process.
      this.child = spawn(process.execPath, [...process.execArgv, CLOSER], {
        stdio: ['ignore', 'ignore', 'inherit', theirs],
        detached: false,
      });
      this.child.on('error', (err) => this.log(`fd closer: ${err.message}`));
    } finally {
      sys.close(theirs);
    }
    sys.fcntlSet(mine, sys.F_SETFL, sys.fcntlGet(mine, sys.F_GETFL) | sys.O_NONBLOCK);
    this.sock = mine;
    this.watch = watchReadable(mine, () => this.onAck());
    this.unacked = 0;
  }

  /** Kills the closer; the kernel releases what it held in the closer's own exit, not here. */
  private retire(): void {
    this.child?.kill('SIGKILL');
    this.child = null;
    this.watch?.close();
    this.watch = null;
    if (this.sock >= 0) sys.close(this.sock);
    this.sock = -1;
    this.unacked = 0;
  }
}
