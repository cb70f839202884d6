// Waiting in tests: for a condition, with a deadline, never for a fixed time in the hope that something
// happened meanwhile. The few places where time itself must pass say why (quiet).

const pause = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * Calls `probe` every `every` ms (default 20) until it returns something truthy, and resolves with that;
 * with null once `ms` have passed without. What `probe` throws ends the wait with that error.
 */
export async function poll<T>(probe: () => T | Promise<T>, opts: { ms: number; every?: number }): Promise<NonNullable<T> | null> {
  const deadline = Date.now() + opts.ms;
  for (;;) {
    const v = await probe();
    if (v) return v as NonNullable<T>;
    if (Date.now() > deadline) return null;
    await pause(opts.every ?? 20);
  }
}

export interface UntilOptions {
  /** The deadline. */
  ms: number;
  /** What is awaited, as the failure names it. */
  what: string;
  /** More for the failure (a log, what was seen instead), read when it happens. */
  detail?: () => string;
  /** How often to look, in ms (default 20). */
  every?: number;
}

/** `poll` that throws once `ms` have passed: an Error naming `what` and the time waited. */
export async function until<T>(probe: () => T | Promise<T>, opts: UntilOptions): Promise<NonNullable<T>> {
  const started = Date.now();
  const v = await poll(probe, opts);
  if (v !== null) return v;
  const detail = opts.detail?.();
  throw new Error(`${opts.what} (after ${Date.now() - started} ms)${detail ? `:\n${detail}` : ''}`);
}

/**
 * The value of `read` once it has stayed the same for `still` ms (default 200), looking every 20 ms: for a
 * count that settles (a process's fds after a burst), where no single event says it has.
 */
export async function steady<T>(read: () => T, opts: { ms: number; what: string; still?: number }): Promise<T> {
  const started = Date.now();
  const still = opts.still ?? 200;
  let last = read();
  let since = Date.now();
  for (;;) {
    await pause(20);
    const now = read();
    if (now !== last) {
      last = now;
      since = Date.now();
    } else if (Date.now() - since >= still) {
      return last;
    }
    if (Date.now() - started > opts.ms) throw new Error(`${opts.what}: still changing (after ${opts.ms} ms; last ${String(last)})`);
  }
}

/**
 * Lets `ms` pass on purpose: only where the time itself is the point (a window in which something must
 * NOT happen, an interval being measured, deliberate jitter), never to wait for something to happen.
 * `why` says which, at the call site.
 */
export function quiet(ms: number, why: string): Promise<void> {
  void why;
  return pause(ms);
}

/** `p`'s value, or 'timeout' when it has none within `ms` (the timer does not outlive the race). */
export async function within<T>(p: Promise<T>, ms: number): Promise<T | 'timeout'> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<'timeout'>((r) => { timer = setTimeout(() => r('timeout'), ms); })]);
  } finally {
    clearTimeout(timer);
  }
}
