// Names and MACs the broker picks, and caller text as it may appear in a message.
import { randomBytes } from 'node:crypto';

/** Broker-chosen names begin with `tb<uid>-`, so no user can mimic a host device or another user's. */
export function namePrefix(uid: number): string {
  return `tb${uid}-`;
}

const BASE36 = '0123456789abcdefghijklmnopqrstuvwxyz';

/** `tb<uid>-` followed by random base-36 characters up to 15 bytes (at most 6 of them, at least 2). */
export function tapName(uid: number): string {
  const prefix = namePrefix(uid);
  const n = Math.max(2, Math.min(6, 15 - prefix.length));
  return prefix + [...randomBytes(n)].map((b) => BASE36[b % 36]).join('');
}

/** A random unicast MAC inside `prefix`. */
export function randomMac(prefix: string): string {
  const fixed = prefix.split(':');
  const rest = [...randomBytes(6 - fixed.length)].map((b) => b.toString(16).padStart(2, '0'));
  return [...fixed, ...rest].join(':');
}

/** Caller-supplied text as it may appear in a message: control characters escaped, length bounded. */
export function printable(s: string): string {
  return JSON.stringify(s.slice(0, 64)).slice(1, -1);
}
