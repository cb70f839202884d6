// The terms a lease's device was granted on, and which of them a device breaks: whoever holds a tap fd can,
// with no capability, make it persistent (TUNSETPERSIST), give it an owner (TUNSETOWNER) or attach queues its
// owner lets in, and change its MAC (SIOCSIFHWADDR). Lifetimes.judge acts on what this finds.
import { macFromBuffer, macToBuffer } from '@tapbroker/protocol/core';
import { hostMac } from './kernel.js';
import type { LeaseRecord } from './leases.js';
import type { Link } from './rtnetlink.js';

/** The first term `link` breaks of `l`'s, or null. */
export function violationOf(l: LeaseRecord, link: Link): 'persist' | 'owner' | 'address' | null {
  // The broker's own ownership (root) is never a violation: a tap its holder made persistent keeps it.
  const euid = process.geteuid?.() ?? 0;
  const broker = (t: NonNullable<Link['tun']>) => t.owner === euid && t.group === null;
  if (l.kind === 'tap' && l.ends === 'fds') {
    if (link.persist) return 'persist';
    // More queues than the broker opened were attached by someone its owner let in (an owner flipped).
    if (link.tun && (!broker(link.tun) || (link.tun.queues ?? 0) > l.queues)) return 'owner';
  }
  if (l.kind === 'tap' && l.ends === 'release' && link.tun && !broker(link.tun)) {
    const owner = l.group !== null ? null : l.uid;
    if (link.tun.owner !== owner || link.tun.group !== l.group) return 'owner';
  }
  const expected = expectedMac(l);
  if (link.address && expected !== null && macFromBuffer(link.address) !== expected) return 'address';
  return null;
}

/**
 * The device's own address, as recorded at the grant; for leases recorded before 0.4.0, a tap's host side is
 * the guest's MAC with 0xfe first, and a macvtap's is the guest's.
 */
export function expectedMac(l: LeaseRecord): string | null {
  if (l.host_mac !== null || l.mac === null) return l.host_mac;
  return l.kind === 'tap' ? macFromBuffer(hostMac(macToBuffer(l.mac))) : l.mac;
}
