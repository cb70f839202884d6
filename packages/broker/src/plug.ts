// Joining a device to a named network that is not a plain Linux bridge: an Open vSwitch port, or an
// administrator's hook. The lease records how it was plugged, so unplugging never consults a later policy.
import { addPort, delPortOf, ovsdbTarget } from './ovs.js';
import { runHook } from './hook.js';
import type { LeaseRecord, Plug } from './leases.js';
import type { Network } from './decide.js';

/** How a device joins `net`, or null for a Linux bridge (attached by the kernel step itself). */
export function plugOf(net: Network | undefined): Plug | null {
  if (!net || net.kind === 'bridge') return null;
  if (net.kind === 'ovs') return { ovs: net.target, db: ovsdbTarget(net.ovsdb ?? undefined) };
  return { hook: net.target, timeout_ms: net.hookTimeoutMs };
}

/** Plugs (`up`) a lease's device as its lease says; the OVS port carries the lease in its external-ids. */
export async function plugUp(
  l: LeaseRecord,
  net: Network | undefined,
  broker: string,
  run: string,
): Promise<Record<string, unknown> | null> {
  const p = l.plug;
  if (!p) return null;
  if ('ovs' in p) {
    await addPort(p.db, p.ovs, l.name, {
      ...(net?.vlan != null ? { tag: net.vlan } : {}),
      ...(net?.trunk ? { trunks: [...net.trunk] } : {}),
      externalIds: {
        'tapbroker-lease': l.id,
        'tapbroker-uid': String(l.uid),
        ...(l.mac !== null ? { 'tapbroker-mac': l.mac } : {}),
        'tapbroker-rule': l.rule,
        // Which broker's: another broker in this namespace (another state directory) leaves it alone.
        'tapbroker-broker': broker,
      },
    });
    return { ovs: p.ovs, action: 'up', ...(net?.vlan != null ? { tag: net.vlan } : {}) };
  }
  return runPlugHook(l, p, 'up', run);
}

/** Unplugs a lease's device (`down`) as its lease says. */
export async function plugDown(l: LeaseRecord, run: string): Promise<Record<string, unknown> | null> {
  const p = l.plug;
  if (!p) return null;
  if ('ovs' in p) {
    // Only the port that carries this lease: one of that name made by someone else (an administrator's, on
    // which this lease's add-port failed) is not ours to remove.
    const removed = await delPortOf(p.db, p.ovs, l.name, l.id);
    return removed ? { ovs: p.ovs, action: 'down' } : null;
  }
  return runPlugHook(l, p, 'down', run);
}

async function runPlugHook(
  l: LeaseRecord, p: { hook: string; timeout_ms: number }, action: 'up' | 'down', run: string,
) {
  const ctx = {
    device: l.name,
    ifindex: l.ifindex,
    mac: l.mac ?? '-',
    uid: l.uid,
    network: l.network ?? '-',
    lease: l.id,
    run,
  };
  const r = await runHook(p.hook, action, ctx, p.timeout_ms);
  return { hook: p.hook, action, code: r.code, stdout: r.stdout, stderr: r.stderr, ms: r.ms };
}
