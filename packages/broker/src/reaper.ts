// Slow kernel work off the event loop: destroying a netdev costs the kernel ~20 ms in the calling thread
// (RTM_DELLINK, or the last close of a tap fd). Deletions run at most MAX_RUNNING at a time (koffi allows
// 256 pending async calls and kills the process beyond), queue in order otherwise, are counted against
// the uid they belong to, and never throw out of a callback. Closes go to the pool at once.
import fs from 'node:fs';
import { sys } from '@tapbroker/protocol/core';

/** Pool threads the reaper may occupy at once (libuv has 4; the rest stay free for everything else). */
const MAX_RUNNING = 2;

interface Job {
  /** The uid whose device this job deletes. */
  uid: number;
  run: () => Promise<unknown>;
  done: (ok: boolean, value: unknown) => void;
}

export class Reaper {
  private readonly queue: Job[] = [];
  private running = 0;
  private readonly perUid = new Map<number, number>();
  private readonly idleWaiters: Array<() => void> = [];
  private readonly closing = new Set<Promise<void>>();

  /**
   * `deleteLink`: the kernel's RTM_DELLINK, run off the event loop (Kernel.deleteLink). `handOff`: where the
   * broker's copies of fds go instead of the thread pool (the closer process: see closeFds).
   */
  constructor(
    private readonly deleteLinkNow: (ifindex: number) => Promise<boolean>,
    private readonly handOff: ((fds: readonly number[]) => void) | null = null,
  ) {}

  /**
   * Deletions queued or running for `uid`: devices on their way out, already out of the lease table
   * (and so out of its quota), of which a uid may have MAX_TEARDOWN_PER_UID before its creates wait.
   * (Closing the broker's copies of fds is not counted: the device lives on with its holder's fds, in
   * the lease table, until the kernel says it is gone.)
   */
  pending(uid: number): number {
    return this.perUid.get(uid) ?? 0;
  }

  get backlog(): number {
    return this.queue.length + this.running + this.closing.size;
  }

  /**
   * Deletes link `ifindex` (made for `uid`): true when deleted, false when it was already gone, or when `still`,
   * asked when its turn comes, says it is no longer the device to delete.
   */
  deleteLink(ifindex: number, uid: number, still: () => boolean = () => true): Promise<boolean> {
    return this.submit(uid, () => (still() ? this.deleteLinkNow(ifindex) : Promise.resolve(false))) as Promise<boolean>;
  }

  /**
   * Gives up the broker's copies of fds. With a `handOff` (the broker's closer process) they go there:
   * a client shares every fd it was sent and can make the broker's copy the last one (close its own first),
   * and a last close can take ~20 ms (a tap) or block for as long as the client likes (a vhost-net fd whose
   * worker, a thread of the client, it has stopped): in the closer it stalls no one. Without one (unit
   * tests), on the thread pool at once.
   */
  closeFds(fds: readonly number[], _uid: number): Promise<void> {
    if (fds.length === 0) return Promise.resolve();
    if (this.handOff) {
      this.handOff(fds);
      return Promise.resolve();
    }
    return this.closeHere(fds);
  }

  /**
   * Closes fds on the thread pool, resolved when all are closed: for fds no client ever shared (a persistent
   * device's, which nobody is sent), whose last close is the broker's and takes at most the kernel's lock.
   */
  closeHere(fds: readonly number[]): Promise<void> {
    const p = Promise.all(fds.map((fd) => new Promise<void>((r) => fs.close(fd, () => r())))).then(() => undefined);
    this.closing.add(p);
    void p.finally(() => {
      this.closing.delete(p);
      if (this.backlog === 0) for (const w of this.idleWaiters.splice(0)) w();
    });
    return p;
  }

  /** Resolves when nothing is queued or running. */
  idle(): Promise<void> {
    if (this.backlog === 0) return Promise.resolve();
    return new Promise((r) => this.idleWaiters.push(r));
  }

  private submit(uid: number, run: () => Promise<unknown>): Promise<unknown> {
    this.perUid.set(uid, this.pending(uid) + 1);
    return new Promise((resolve, reject) => {
      this.queue.push({ uid, run, done: (ok, v) => (ok ? resolve(v) : reject(v)) });
      this.next();
    });
  }

  private next(): void {
    while (this.running < MAX_RUNNING && this.queue.length > 0) {
      const job = this.queue.shift()!;
      this.running++;
      let p: Promise<unknown>;
      try {
        p = job.run();
      } catch (err) {
        p = Promise.reject(err instanceof Error ? err : new sys.SyscallError('reaper', sys.errno.EIO, String(err)));
      }
      p.then(
        (v) => this.finish(job, true, v),
        (e: unknown) => this.finish(job, false, e),
      );
    }
    if (this.backlog === 0) for (const w of this.idleWaiters.splice(0)) w();
  }

  private finish(job: Job, ok: boolean, value: unknown): void {
    this.running--;
    const n = this.pending(job.uid) - 1;
    if (n > 0) this.perUid.set(job.uid, n);
    else this.perUid.delete(job.uid);
    job.done(ok, value);
    this.next();
  }
}
