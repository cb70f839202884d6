// The protocol's numbers and names, with no dependency: the client loads these without the schemas.

/**
 * Version 2 added, together: `create` (several NICs in one all-or-nothing request), `status`, `mac: null`
 * (a guest MAC the broker does not know: the qemu-bridge-helper path), and `locked` (the port lock) in
 * devices, leases and `can`. The broker speaks exactly one version; docs/PROTOCOL.md says why.
 */
export const PROTOCOL_VERSION = 2;
/** The most NICs one `create` request asks for. */
export const MAX_NICS = 32;

/** The largest request frame the broker reads; larger ones are refused unread. */
export const MAX_REQUEST_BYTES = 4096;
/** The largest reply frame; below the default socket send buffer (net.core.wmem_default, 208 KiB). */
export const MAX_REPLY_BYTES = 192 * 1024;
/** The most fds one reply carries: the kernel's SCM_MAX_FD. */
export const MAX_REPLY_FDS = 253;

export const MACVTAP_MODES = ['bridge', 'vepa', 'private', 'passthru'] as const;
export type MacvtapMode = (typeof MACVTAP_MODES)[number];

/** sysexits(3): the statuses every tapbroker command exits with (documented in the man pages). */
export const EX = {
  OK: 0, USAGE: 64, DATAERR: 65, NOINPUT: 66, UNAVAILABLE: 69, SOFTWARE: 70, NOPERM: 77, CONFIG: 78,
} as const;

/** How a lease ends: its fds closing (tap), its holder exiting (macvtap), or `release` (persistent). */
export const LEASE_ENDS = ['fds', 'holder', 'release'] as const;
