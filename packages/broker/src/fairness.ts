// The broker's one thread, shared fairly between users: each uid (root aside) may take SHARE_MS of it in every
// window of WINDOW_MS; past that its sessions read nothing more until the window turns (their sockets fill, and
// their clients wait in the kernel). One user's 63 connections of cheap requests took nearly all of it before,
// and everyone else's grants slowed twenty-fold.

/** The window a uid's share is counted in. */
export const WINDOW_MS = 1000;
/** The broker time one uid may take per window (a VM's start takes a few ms; a flood, all of it). */
export const SHARE_MS = 250;

/**
 * Multi-NIC requests of one uid rolled back after NICs were made, per window, before its next ones wait a window:
 * what a pre-check cannot see (the bridge learning a MAC the user sends from its own tap, mid-request) made an
 * outside re-test's 31 NICs roll back, each with its record, about 4 times a second.
 */
const ROLLBACKS_PER_WINDOW = 4;
const ROLLBACK_WINDOW_MS = 10_000;

export class Fairness {
  /** uid → the window it is in, what it took of it, and the wait its sessions share once it took its share. */
  private readonly uids = new Map<number, { start: number; used: number; wait: Promise<void> | null }>();
  /** uid → its multi-NIC requests rolled back in the window, and until when its next ones wait. */
  private readonly rollbacks = new Map<number, { start: number; n: number; until: number }>();
  /** uid → its multi-NIC request in flight (see alone). */
  private readonly batches = new Map<number, Promise<void>>();
  /** `uids` is swept of windows that are over when it grows to this size (each uid that ever connected stayed). */
  private sweepAt = 256;

  /** Uids that began a request in this turn of the event loop, and the sessions of each waiting for the next. */
  private readonly began = new Set<number>();
  private readonly waiting = new Map<number, Array<() => void>>();
  private turning = false;

  constructor(private readonly now: () => number = () => performance.now()) {}

  /**
   * Null when a session of `uid` may begin a request in this turn of the event loop; else when it may. One request
   * per uid per turn (root aside), in the order they came: an outside review's 64 connections of one uid ran 64
   * requests to every one of another user's, each time that user's create waited on the kernel or its turn.
   */
  slot(uid: number): Promise<void> | null {
    if (uid === 0) return null;
    this.nextTurn();
    if (!this.began.has(uid)) {
      this.began.add(uid);
      return null;
    }
    return new Promise((resolve) => {
      const q = this.waiting.get(uid);
      if (q) q.push(resolve);
      else this.waiting.set(uid, [resolve]);
    });
  }

  /** At the loop's next turn: every uid may begin again, and each uid's first waiting session does. */
  private nextTurn(): void {
    if (this.turning) return;
    this.turning = true;
    setImmediate(() => {
      this.turning = false;
      this.began.clear();
      for (const [uid, q] of this.waiting) {
        const go = q.shift()!;
        if (q.length === 0) this.waiting.delete(uid);
        this.began.add(uid);
        go();
      }
      if (this.began.size > 0) this.nextTurn();
    });
  }

  /** Null when `uid` may go on now; else when it may (its share of this window is taken). */
  turn(uid: number): Promise<void> | null {
    if (uid === 0) return null;
    const u = this.window(uid);
    if (u.used < SHARE_MS) return null;
    u.wait ??= this.turned(u.start);
    return u.wait;
  }

  /**
   * `uid`'s turn to create: now (a function that ends it), or once no multi-NIC request of `uid` is in flight.
   * A multi-NIC request (`batch`) holds the turn until it ends it: the uid's other creates wait meanwhile.
   */
  alone(uid: number, batch: boolean): (() => void) | Promise<() => void> {
    const running = this.batches.get(uid);
    if (running) return running.then(() => this.alone(uid, batch));
    if (!batch) return () => {};
    let end!: () => void;
    this.batches.set(uid, new Promise<void>((r) => (end = r)));
    return () => {
      this.batches.delete(uid);
      end();
    };
  }

  /**
   * A multi-NIC request of `uid` was refused after NICs were made (they were rolled back, each with its record):
   * past ROLLBACKS_PER_WINDOW in a window, `uid`'s multi-NIC requests wait out the next (see rollbackWait).
   */
  rolledBack(uid: number): void {
    const t = this.now();
    let r = this.rollbacks.get(uid);
    if (!r || t - r.start >= ROLLBACK_WINDOW_MS) this.rollbacks.set(uid, (r = { start: t, n: 0, until: 0 }));
    if (++r.n > ROLLBACKS_PER_WINDOW) r.until = t + ROLLBACK_WINDOW_MS;
  }

  /** How long `uid`'s multi-NIC requests still wait after too many were rolled back (0: none). */
  rollbackWait(uid: number): number {
    const r = this.rollbacks.get(uid);
    const left = r ? r.until - this.now() : 0;
    if (r && left <= 0 && this.now() - r.start >= ROLLBACK_WINDOW_MS) this.rollbacks.delete(uid);
    return Math.max(0, left);
  }

  /** A pause inside one of `uid`'s requests: the other sessions' turn, then `uid`'s own (see turn). */
  async between(uid: number): Promise<void> {
    await new Promise((r) => setImmediate(r));
    await this.turn(uid);
  }

  /** `uid`'s request took `ms` of the broker's time. */
  spent(uid: number, ms: number): void {
    if (uid !== 0) this.window(uid).used += ms;
  }

  /**
   * For a handler that awaits between pieces of its work (a create's NICs): the session charges what runs before
   * the handler's first await; the meter charges each later section, up to the next `wait` and up to `end`.
   */
  meter(uid: number): Meter {
    return new Meter((ms) => this.spent(uid, ms), this.now);
  }

  /** Uids kept now, their window over or not (swept as new ones come: see window). */
  get size(): number {
    return this.uids.size;
  }

  /** Resolves once the window that began at `start` is over on this clock (a timer may fire early on it). */
  private turned(start: number): Promise<void> {
    return new Promise((resolve) => {
      const check = () => {
        const left = start + WINDOW_MS - this.now();
        if (left <= 0) resolve();
        else setTimeout(check, Math.ceil(left));
      };
      check();
    });
  }

  private window(uid: number): { start: number; used: number; wait: Promise<void> | null } {
    const t = this.now();
    let u = this.uids.get(uid);
    if (!u && this.uids.size >= this.sweepAt) {
      for (const [k, v] of this.uids) if (t - v.start >= WINDOW_MS) this.uids.delete(k);
      this.sweepAt = Math.max(256, 2 * this.uids.size);
    }
    if (!u || t - u.start >= WINDOW_MS) {
      // What a window's last requests took beyond its share is owed to the next window (an outside review: one
      // request past the share, or all of a uid's sessions woken at once, was forgotten at the window's turn), up to
      // one share: the time is the clock's, and a broker stopped or starved of CPU mid-stretch (a CI run's SIGSTOP)
      // charged seconds, which held the uid's next connection for as many windows.
      const over = u ? u.used - SHARE_MS * Math.floor((t - u.start) / WINDOW_MS) : 0;
      const owed = Math.min(SHARE_MS, Math.max(0, over));
      this.uids.set(uid, (u = { start: t, used: owed, wait: null }));
    }
    return u;
  }
}

/** Charges the sections of one request that run after its first await (see Fairness.meter). */
export class Meter {
  /** When the section now running began; null while the session's own (it charges that one) or after `end`. */
  private since: number | null = null;

  constructor(private readonly charge: (ms: number) => void, private readonly now: () => number) {}

  /** Charges the section that ends here, then awaits `p` (made in that section: its synchronous part counts). */
  async wait<T>(p: Promise<T>): Promise<T> {
    this.end();
    try {
      return await p;
    } finally {
      this.since = this.now();
    }
  }

  /** Charges the section that ends here (the request's last). */
  end(): void {
    if (this.since !== null) this.charge(this.now() - this.since);
    this.since = null;
  }
}
