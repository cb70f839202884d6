// Grammar checks for values that reach the kernel. Each returns null when the value is fine, or a
// short reason. Nothing is ever truncated or normalised: the checked string is the one used.

/** Linux IFNAMSIZ is 16 including the terminating NUL. */
export const IFNAME_MAX_BYTES = 15;

const IFNAME_CHARS = /^[A-Za-z0-9_.-]+$/;

export function checkIfName(name: string): string | null {
  const bytes = Buffer.byteLength(name, 'utf8');
  if (bytes === 0) return 'is empty';
  if (bytes > IFNAME_MAX_BYTES) return `is ${bytes} bytes long; the kernel allows at most ${IFNAME_MAX_BYTES}`;
  if (!IFNAME_CHARS.test(name)) return 'may only contain A-Z a-z 0-9 _ . -';
  if (name === '.' || name === '..') return 'is not a usable name';
  return null;
}

/** Queues per device: 126 tap fds plus 126 vhost fds still fit one SCM_RIGHTS message (253 fds). */
export const MAX_QUEUES = 126;

export function checkQueues(n: number): string | null {
  return Number.isInteger(n) && n >= 1 && n <= MAX_QUEUES ? null : `must be from 1 to ${MAX_QUEUES}, not ${n}`;
}

const NETWORK_NAME = /^[A-Za-z0-9_.-]{1,64}$/;

/** Names of networks and rules: what an administrator writes in the policy. */
export function checkNetworkName(name: string): string | null {
  return NETWORK_NAME.test(name) ? null : 'must be 1-64 characters of A-Z a-z 0-9 _ . -';
}

const MAC_RE = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/;
const PREFIX_RE = /^[0-9a-f]{2}(:[0-9a-f]{2}){0,5}$/;

/** Lower-case colon form only: `52:54:00:12:34:56`. */
export function checkMac(mac: string): string | null {
  if (!MAC_RE.test(mac)) return 'must be six lower-case hex octets separated by colons';
  const first = parseInt(mac.slice(0, 2), 16);
  if (first & 1) return 'is a multicast address';
  if (mac === '00:00:00:00:00:00') return 'is all zeros';
  return null;
}

export function checkMacPrefix(prefix: string): string | null {
  return PREFIX_RE.test(prefix) ? null : 'must be one to six lower-case hex octets separated by colons';
}

export function macToBuffer(mac: string): Buffer {
  return Buffer.from(mac.split(':').map((h) => parseInt(h, 16)));
}

export function macFromBuffer(buf: Buffer): string {
  return [...buf.subarray(0, 6)].map((b) => b.toString(16).padStart(2, '0')).join(':');
}
