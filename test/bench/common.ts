// Shared by the benchmark's processes: timing, percentiles, a line protocol for child processes,
// and socketpair(2) (Node has none) through the project's koffi binding.
import fs from 'node:fs';
import { sys } from '@tapbroker/protocol';

/** Milliseconds on a monotonic clock, sub-microsecond resolution. */
export function now(): number {
  return Number(process.hrtime.bigint()) / 1e6;
}

export interface Stats {
  n: number;
  p50: number;
  p99: number;
  mean: number;
  min: number;
  max: number;
}

/** Nearest-rank percentiles (p99 of 300 samples is the 297th smallest). */
export function stats(samples: readonly number[]): Stats {
  if (samples.length === 0) return { n: 0, p50: NaN, p99: NaN, mean: NaN, min: NaN, max: NaN };
  const s = [...samples].sort((a, b) => a - b);
  const rank = (p: number) => s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))]!;
  return { n: s.length, p50: rank(50), p99: rank(99), mean: s.reduce((a, b) => a + b, 0) / s.length, min: s[0]!, max: s[s.length - 1]! };
}

/** Closes fds on libuv's thread pool, all at once; resolves when every close returned. */
export function closeAll(fds: readonly number[]): Promise<void> {
  return Promise.all(fds.map((fd) => new Promise<void>((resolve) => fs.close(fd, () => resolve())))).then(() => undefined);
}

/** socketpair(2): two connected sockets, [a, b]. */
export const socketpair = (type: number): [number, number] => sys.socketpair(type);

/** Reads JSON lines from a stream, one callback per line. */
export function onLines(stream: NodeJS.ReadableStream, cb: (line: string) => void): void {
  let partial = '';
  stream.setEncoding('utf8');
  stream.on('data', (chunk: string) => {
    const lines = (partial + chunk).split('\n');
    partial = lines.pop()!;
    for (const line of lines) if (line.trim()) cb(line);
  });
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
