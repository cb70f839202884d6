// The terms a lease's device was granted on, and which of them a device breaks: whoever holds a tap fd can,
// with no capability, make it persistent (TUNSETPERSIST), give it an owner (TUNSETOWNER) or attach queues its
// owner lets in, and change its MAC (SIOCSIFHWADDR). Lifetimes.judge acts on what this finds, and on whether the
// policy grants a tap made persistent that way.
import { macFromBuffer, macToBuffer } from '@tapbroker/protocol/core';
import { decide, type Ask, type Decision, type Policy } from './decide.js';
import { hostMac } from './kernel.js';
import type { LeaseRecord } from './leases.js';
import { getpwuid, groupsOf } from './libc.js';
import { namePrefix } from './naming.js';
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
  return foreignMac(l, link) !== null ? 'address' : null;
}

/** The MAC `link` shows `l`'s tap with when it is not the lease's (its holder set it), else null. */
export function takenMac(l: LeaseRecord, link: Link): string | null {
  return l.kind === 'tap' ? foreignMac(l, link) : null;
}

/** The MAC `link` shows when it is not `l`'s own (expectedMac), else null. */
function foreignMac(l: LeaseRecord, link: Link): string | null {
  const expected = expectedMac(l);
  const mac = link.address ? macFromBuffer(link.address) : null;
  return mac !== null && expected !== null && mac !== expected ? mac : null;
}

/**
 * The device's own address, as recorded at the grant; for leases recorded before 0.4.0, a tap's host side is
 * the guest's MAC with 0xfe first, and a macvtap's is the guest's.
 */
export function expectedMac(l: LeaseRecord): string | null {
  if (l.host_mac !== null || l.mac === null) return l.host_mac;
  return l.kind === 'tap' ? macFromBuffer(hostMac(macToBuffer(l.mac))) : l.mac;
}

/**
 * A tap its holder made persistent is a persistent device it never asked for: decided now, on the policy
 * in force, as a persistent create of the same device would be (deny rules included). The holder's process is
 * not asking: its owner's groups are the account database's (an outside review: a rule for a supplementary
 * group granted such taps at `can` and deleted them here). `live`: the lease table's count of the uid's leases
 * under each rule.
 */
export function decidePersistent(policy: Policy, l: LeaseRecord, live: (rule: string) => number): Decision {
  const account = getpwuid(l.uid);
  // Without an account there is no group to go by (-1 is none): a uid's number is never a gid.
  const caller = { uid: l.uid, gid: account?.gid ?? -1, groups: account ? groupsOrNone(account) : [],
    user: account?.name ?? null };
  // A name of the broker's own form is one it picked (a request naming one gains nothing by it): like
  // any broker-chosen name, no rule's name_pattern applies to it. Any other name was the caller's.
  const picked = new RegExp(`^${namePrefix(l.uid)}[0-9a-z]{2,6}$`).test(l.name);
  const ask: Ask = {
    kind: 'tap', parent: l.network ?? l.parent, network: l.network !== null, mode: null, queues: l.queues,
    vhost: false, mac: l.mac, name: picked ? null : l.name, persistent: true,
  };
  // Its own lease is in the table already: it is not counted against itself.
  const d = decide(policy, caller, ask, (rule) => live(rule) - (rule === l.rule ? 1 : 0));
  // A rule (or network) that locks its ports would have locked this one: an unlocked port is not what it grants.
  const lock = d.allow && (d.rule.macLock || (l.network !== null && policy.networks.get(l.network)?.macLock));
  if (d.allow && lock && !l.locked) {
    const message = `rule \`${d.rule.name}' grants persistent taps only as locked ports, and this one is not`;
    return { allow: false, code: 'TB_E_MAC_LOCK', rule: d.rule.name, message, hint: 'ask for a persistent tap' };
  }
  return d;
}

/** An account's groups by the account database; none where it cannot say (a directory service down). */
function groupsOrNone(account: { name: string; gid: number }): number[] {
  try {
    return groupsOf(account.name, account.gid);
  } catch {
    return [];
  }
}
