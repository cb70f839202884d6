// Names and MACs the broker picks, and caller text as it may appear in a message.
import { randomFillSync } from 'node:crypto';
import { HIDDEN, PLAIN, TapbrokerError } from '@tapbroker/protocol/core';
import { ContestedDeviceError } from './kernel.js';

/** Broker-chosen names begin with `tb<uid>-`, so no user can mimic a host device or another user's. */
export function namePrefix(uid: number): string {
  return `tb${uid}-`;
}

/**
 * Random octets from the kernel's CSPRNG, drawn 4 KiB at a time: each draw costs a round trip into
 * OpenSSL (about 0.1 ms in the broker), and a grant needs three (its lease id, name and MAC).
 */
const pool = Buffer.alloc(4096);
let used = pool.length;
export function randomOctets(n: number): Buffer {
  if (used + n > pool.length) {
    randomFillSync(pool);
    used = 0;
  }
  // A copy: the pool's octets are never handed out twice.
  const out = Buffer.from(pool.subarray(used, used + n));
  pool.fill(0, used, used + n);
  used += n;
  return out;
}

const BASE36 = '0123456789abcdefghijklmnopqrstuvwxyz';

/** How many random base-36 characters follow `prefix` in a name the broker picks: up to 15 bytes, 2 to 6 of them. */
const suffixLength = (prefix: string) => Math.max(2, Math.min(6, 15 - prefix.length));

/** `tb<uid>-` followed by random base-36 characters up to 15 bytes (at most 6 of them, at least 2). */
export function tapName(uid: number): string {
  const prefix = namePrefix(uid);
  return prefix + [...randomOctets(suffixLength(prefix))].map((b) => BASE36[b % 36]).join('');
}

/**
 * Names to try for `uid`: eight random ones, then, where the random part is at most three characters (a uid of nine or
 * ten digits: 46,656 or 1,296 names), every one `present()` (the kernel's names, listed once) and `held` leave free,
 * in turn from a random one (an outside review: a ten-digit uid's creates failed from about 600 devices on).
 */
function* namesFor(uid: number, held: (name: string) => boolean, present: () => ReadonlySet<string>) {
  for (let i = 0; i < 8; i++) yield tapName(uid);
  const prefix = namePrefix(uid);
  const chars = suffixLength(prefix);
  if (chars > 3) return;
  const taken = present();
  const span = 36 ** chars;
  const start = randomOctets(2).readUInt16BE(0) % span;
  for (let i = 0; i < span; i++) {
    let n = (start + i) % span;
    let suffix = '';
    for (let k = 0; k < chars; k++, n = Math.floor(n / 36)) suffix = BASE36[n % 36] + suffix;
    if (!taken.has(prefix + suffix) && !held(prefix + suffix)) yield prefix + suffix;
  }
}

/**
 * A MAC of `prefix` that is not `taken`, or null when none is: eight random draws, then, for a prefix of at most 65,536
 * MACs, every one of them in turn from a random one on (a test drew a MAC in use eight times running from a prefix of
 * 256 with 96 taken, about once in 200 runs, and granted it twice). Past that size eight misses mean it is full.
 */
export function freeMac(prefix: string, taken: (mac: string) => boolean): string | null {
  for (let tries = 0; tries < 8; tries++) {
    const mac = randomMac(prefix);
    if (!taken(mac)) return mac;
  }
  const free = 6 - prefix.split(':').length;
  if (free > 2) return null;
  const span = 256 ** free;
  const start = randomOctets(2).readUInt16BE(0) % span;
  for (let i = 0; i < span; i++) {
    const n = (start + i) % span;
    const rest = free === 2 ? [n >> 8, n & 0xff] : free === 1 ? [n] : [];
    const mac = [prefix, ...rest.map((b) => b.toString(16).padStart(2, '0'))].join(':');
    if (mac !== '00:00:00:00:00:00' && !taken(mac)) return mac;
  }
  return null;
}

/** A random unicast MAC inside `prefix`, never all zeros (the policy refuses a prefix that allows only that). */
export function randomMac(prefix: string): string {
  const fixed = prefix.split(':');
  for (;;) {
    const rest = [...randomOctets(6 - fixed.length)].map((b) => b.toString(16).padStart(2, '0'));
    const mac = [...fixed, ...rest].join(':');
    if (mac !== '00:00:00:00:00:00') return mac;
  }
}

/**
 * Text from a policy, a file name or a caller as a terminal or a log line shows it: what is hidden (HIDDEN) escaped as
 * \xNN or \u{N}, and a backslash doubled (so that the four characters `\x1b' never read as an escaped ESC), so that
 * it can neither end a line nor rewrite, reorder or hide what an operator reads.
 */
export function shown(s: string): string {
  if (PLAIN.test(s) && !s.includes('\\')) return s;
  return s.replace(/\\/g, '\\\\').replace(HIDDEN, (c) => {
    const n = c.codePointAt(0)!;
    return n <= 0xff ? `\\x${n.toString(16).padStart(2, '0')}` : `\\u{${n.toString(16)}}`;
  });
}

/** JSON as the audit trail writes it (what hides or acts on a terminal escaped), and caller text in a message. */
export { jsonShown as auditJson, printable } from '@tapbroker/protocol/core';

/**
 * The caller's name, or broker-chosen names `tb<uid>-<random>` until one is free and clean: a drawn name the kernel
 * has (or contests), or one `held` still another device's (its `down`, another create's `up`: see Unplugs.hold), is
 * drawn again (an outside review: new `up`s overlapped old `down`s of a drawn name); see namesFor.
 */
export function createNamed<T>(
  uid: number, asked: string | null, held: (name: string) => boolean, create: (name: string) => T,
  present: () => ReadonlySet<string> = () => new Set(),
): T & { name: string } {
  if (asked !== null) return { ...create(asked), name: asked };
  let misses = 0;
  for (const name of namesFor(uid, held, present)) {
    try {
      if (held(name)) {
        throw new TapbrokerError('TB_E_DEVICE_EXISTS', `\`${name}' is still being plugged into or unplugged from its `
          + 'network');
      }
      return { ...create(name), name };
    } catch (err) {
      const retry =
        err instanceof ContestedDeviceError || (err instanceof TapbrokerError && err.code === 'TB_E_DEVICE_EXISTS');
      if (!retry || ++misses > 16) throw err;
    }
  }
  throw new TapbrokerError('TB_E_DEVICE_EXISTS', `every name the broker picks for uid ${uid} (\`${namePrefix(uid)}' `
    + `and ${suffixLength(namePrefix(uid))} characters) is taken`, { hint: 'name the device yourself (name=…)' });
}
