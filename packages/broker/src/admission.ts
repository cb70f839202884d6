// Admission: what a NIC must pass before anything is made for it (after its grammar and its decision): its
// name not being unplugged, the caller's teardowns and cool-down, a closer for vhost-net fds, where it goes
// (the bridge, VLAN, parent, network or hook), its port lock, and its MAC. A multi-NIC request has every NIC
// checked so, with the NICs before it counted, before its first is made (firstRefused).
import {
  TapbrokerError, macToBuffer, type CanRequest, type CreateMacvtapRequest, type CreateTapRequest, type ErrorCode,
  type Nic,
} from '@tapbroker/protocol/core';
import {
  decide, locksPort, portVlan, resolveTarget, type AllowRule, type Decision, type Policy,
} from './decide.js';
import type { Identity } from './identity.js';
import type { Kernel } from './kernel.js';
import { macInUse } from './netdev.js';
import type { OpContext } from './ops.js';
import { hookUnsafe } from './paths.js';
import type { ForeignPorts } from './plug.js';
import type { Link } from './rtnetlink.js';
import { checkSpec, createSpec, type CreateSpec } from './spec.js';

/** Devices of one uid still being torn down (deleted, or unplugged by a hook), at most: beyond, its grants wait. */
const MAX_TEARDOWN_PER_UID = 32;

/** Where a new device goes, resolved against the policy the decision used. */
export interface Placement {
  /** A macvtap's parent. */
  link: Link | null;
  /** The Linux bridge a tap attaches to (null: OVS or a hook plugs it). */
  bridge: Link | null;
  vlan: number | null;
  parentName: string;
}

export interface Admitted {
  place: Placement;
  /** Whether the device is a locked port. */
  lock: boolean;
}

/**
 * Throws unless a device may take `name`, which its caller chose, for Open vSwitch's sake (see ForeignPorts). The
 * database is not named: its path is the policy's, and an outside review read it in a plain bridge's refusal.
 */
function foreignName(foreign: ForeignPorts, name: string): void {
  if (foreign.of(name) !== null) {
    throw new TapbrokerError('TB_E_DEVICE_EXISTS', `an Open vSwitch port named \`${name}' is not this broker's: `
      + 'Open vSwitch would take a new device of that name into it');
  }
  if (foreign.waiting() !== null) {
    throw new TapbrokerError('TB_E_BUSY', 'the ports of Open vSwitch are not listed yet (it has not answered): a '
      + 'device gets a name of your choosing once they are; leave the name out to have one picked');
  }
}

/**
 * What a granted NIC must still pass before the kernel step, checked with nothing made (so a multi-NIC request
 * is refused before its first device, see firstRefused): its name not being unplugged, the caller not cooling
 * down or over its teardowns, a closer for vhost-net fds, where it goes, its port lock and MAC. Throws.
 */
export function admit(ctx: OpContext, policy: Policy, caller: Identity, spec: CreateSpec, rule: AllowRule): Admitted {
  if (spec.name !== null && ctx.lifetimes.unplugs.pending(spec.name)) {
    throw new TapbrokerError('TB_E_BUSY', `a device named \`${spec.name}' is still being plugged into or unplugged `
      + 'from its network; try again shortly');
  }
  if (spec.name !== null) foreignName(ctx.lifetimes.unplugs.foreign, spec.name);
  const cooling = ctx.lifetimes.floods.coolingDown(caller.uid);
  if (cooling > 0) {
    throw new TapbrokerError('TB_E_BUSY', `your devices flooded the broker with link events; new devices wait `
      + `another ${Math.ceil(cooling / 1000)} s`);
  }
  const toGroup = spec.persistent && spec.group !== null;
  const taker = ctx.lifetimes.forwarding.takerWaits(caller.uid, toGroup);
  if (taker > 0) {
    const own = ctx.lifetimes.forwarding.takerWaits(caller.uid, false) > 0;
    const s = Math.ceil(taker / 1000);
    throw new TapbrokerError('TB_E_BUSY', own
      ? `a tap of yours took the MAC of a guest whose port is locked; new devices wait another ${s} s`
      : `a tap you gave a group took the MAC of a guest whose port is locked; taps you give a group wait `
        + `another ${s} s`);
  }
  // A macvtap that is not persistent ends with its holder, found again after a restart by its pid and start time. A
  // caller outside the broker's PID namespace has no pid the broker sees (0): such a device could never be found
  // again (an outside review: holder 0 broke `list', and the next start dropped the whole lease table).
  if (spec.kind === 'macvtap' && !spec.persistent && caller.pid === 0) {
    throw new TapbrokerError('TB_E_INVALID_REQUEST', 'the broker cannot see your process (it runs in a PID namespace '
      + 'of its own that yours is not in), so after a restart it could not tell whether you still hold a macvtap',
    { hint: 'ask for a tap, or a persistent macvtap (tapbroker create --persistent) that you release' });
  }
  const busy = ctx.teardowns(caller.uid);
  if (busy >= MAX_TEARDOWN_PER_UID) {
    throw new TapbrokerError('TB_E_BUSY', `${busy} of your devices are still being torn down or unplugged; try again `
      + 'shortly');
  }
  // A host without vhost-net refuses every such request at its kernel step: refused here, with nothing made (and a
  // dry run says so: an outside review found `can' saying yes where every `run' failed).
  const noVhost = spec.vhost ? ctx.kernel.vhostRefusal() : null;
  if (noVhost) throw noVhost;
  // A vhost-net fd's last close can block for as long as its holder likes: none is handed out while every
  // closer is stuck in such a close (other devices' fds are then closed on the pool).
  if (spec.vhost && ctx.fdsJammed) {
    throw new TapbrokerError('TB_E_BUSY', 'the broker cannot close vhost-net descriptors now (its closer '
      + 'processes are stuck in the kernel): no vhost-net until one exits');
  }
  // Each tap given to a group may take a MAC for all its members (see Forwarding): bounded by its owner's count.
  if (spec.persistent && spec.group !== null && ctx.lifetimes.forwarding.groupTapsWait(caller.uid)) {
    throw new TapbrokerError('TB_E_BUSY', 'your taps took other MACs more than 1,024 times in 5 minutes: no new '
      + 'tap given to a group until those expire');
  }
  const place = placement(ctx.kernel, policy, spec);
  // decide() granted it, so this port lock can be had (one that cannot refuses the request there).
  const lock = locksPort(policy, spec, rule);
  // A MAC the caller asked for is checked here; one the broker picks, once picked (makeDevice).
  if (place.bridge && spec.mac !== null) {
    macElsewhere(ctx, caller, spec.mac, place.parentName, place.vlan, lock);
    // The bridge's own forwarding table too, as the lock will read it, but before anything is made (a re-test
    // made 31 NICs and rolled them back for a 32nd whose MAC a machine behind the uplink had).
    const e = lock ? ctx.kernel.fdbEntry(place.bridge, macToBuffer(spec.mac), place.vlan) : null;
    if (e) throw macInUse(macToBuffer(spec.mac), place.parentName, e.fixed, 'a new tap');
  }
  // A macvtap's MAC on its parent too, before anything is made (a re-test's 32nd NIC was refused only at the
  // kernel step, 31 made and rolled back, and `can` said yes).
  if (spec.kind === 'macvtap' && spec.mac !== null && place.link) {
    ctx.kernel.checkMacFree(place.link, macToBuffer(spec.mac));
  }
  return { place, lock };
}

/**
 * A guest MAC a live locked lease holds on this bridge (and VLAN) is that lease's alone, whatever the
 * bridge's forwarding table shows this instant (a holder who gives its own tap that MAC and back empties the
 * entry for a moment): no other tap there is made with it, locked or not. Nor is a live lease's MAC locked to
 * another port (a quiet guest's entry may have aged out of the table; the lock would take its traffic).
 */
export function macElsewhere(
  ctx: OpContext, caller: Identity, mac: string, bridge: string, vlan: number | null, lock: boolean,
): void {
  const owner = ctx.lifetimes.table.withMac(mac).find((o) => (o.locked || lock) && o.kind === 'tap'
    && o.parent === bridge && portVlan(o.vlan) === portVlan(vlan));
  if (owner) {
    throw new TapbrokerError('TB_E_MAC_IN_USE', `MAC ${mac} is ${owner.locked ? 'locked to' : 'in use on'} another `
      + `port of bridge \`${bridge}' (a live lease's): no other tap there may ${lock ? 'be locked to' : 'use'} it`,
    { hint: 'choose another MAC' });
  }
  // The caller's own tap took it lately, which deleted the bridge's entries for it (whoever's MAC it is: a
  // router behind the uplink, say): the forwarding table cannot tell now whether another port uses it. Every
  // link event already sent is read first, however many a backlog holds.
  if (!lock) return;
  ctx.lifetimes.catchUp(true);
  // A group's members by their process's groups or the account database (a process may drop a group it holds).
  const member = (g: number) => caller.gid === g || caller.groups.includes(g)
    || !!ctx.policy.membersOf?.(g).has(caller.uid);
  if (ctx.lifetimes.forwarding.takenLately(bridge, mac, caller.uid, member)) {
    throw new TapbrokerError('TB_E_MAC_IN_USE', `MAC ${mac} was taken on bridge \`${bridge}' lately by a tap of `
      + 'yours or one given to a group of yours, which erased where the bridge had it: it is locked to none of '
      + 'your ports there for 5 minutes', { hint: 'choose another MAC' });
  }
}

/** A NIC refused before anything is made: audited as `decision` (a deny, under `rule`) or a request error. */
export interface Refusal {
  decision: 'deny' | 'error';
  rule: string | null;
  code: ErrorCode;
  message: string;
  hint?: string;
  /** What the audit record says instead (decide's Refusal). */
  record?: { rule: string; message: string };
}

/**
 * The first NIC of a request that would be refused now, with nothing made: on its own (its grammar, what admit
 * checks, a name already taken: `i` alone, grantOne refuses it again with its record), or with the NICs before
 * it counted (`refusal`: its rule or quota, a name or a locked MAC an earlier NIC asks for). Null when none is;
 * `granted` then holds each NIC's rule. A NIC refused on its own carries why (`error`: what grantOne would throw).
 */
export function firstRefused(
  ctx: OpContext, policy: Policy, caller: Identity,
  nics: ReadonlyArray<CreateTapRequest | CreateMacvtapRequest | CanRequest | Nic>, granted: AllowRule[] = [],
): { i: number; spec: CreateSpec; refusal: Refusal } | { i: number; refusal: null; error: TapbrokerError } | null {
  ctx.lifetimes.catchUp();
  const counts = ctx.lifetimes.counts(caller.uid);
  const charged = new Map<string, number>();
  const names = new Set<string>();
  const macs: Array<{ mac: string; where: string }> = [];
  for (const [i, nic] of nics.entries()) {
    let spec: CreateSpec;
    let d: Decision;
    let a: Admitted;
    try {
      spec = createSpec(nic);
      checkSpec(spec, caller);
      d = decide(policy, caller, spec, (rule) => counts(rule) + (charged.get(rule) ?? 0));
      if (!d.allow) {
        const { rule, code, message, hint, record } = d;
        return { i, spec, refusal: { decision: 'deny', rule, code, message, hint, ...(record ? { record } : {}) } };
      }
      a = admit(ctx, policy, caller, spec, d.rule);
      if (spec.name !== null && ctx.kernel.linkNamed(spec.name)) {
        const error = new TapbrokerError('TB_E_DEVICE_EXISTS', `a device named \`${spec.name}' already exists`);
        return { i, refusal: null, error };
      }
    } catch (err) {
      const error = err instanceof TapbrokerError ? err : new TapbrokerError('TB_E_KERNEL', (err as Error).message);
      return { i, refusal: null, error };
    }
    const error = (message: string): Refusal =>
      ({ decision: 'error', rule: null, code: 'TB_E_INVALID_REQUEST', message });
    if (spec.name !== null && names.has(spec.name)) {
      return { i, spec, refusal: error(`an earlier NIC of this request asks for the name \`${spec.name}' too`) };
    }
    // One MAC twice on one segment (a bridge and VLAN, a network, a macvtap parent): frames for it reach either NIC
    // (an outside review: granted for taps, a macvtap's refused only by its kernel step, after NIC 0 was made).
    // A hook network's segment is its own (its taps go where its hook puts them): told apart by its name.
    const segment = a.place.parentName === '-' ? `network \`${spec.parent}'` : `\`${a.place.parentName}'`;
    const where = `${spec.kind}/${segment}/${a.place.bridge ? portVlan(a.place.vlan) : a.place.vlan}`;
    if (spec.mac !== null && macs.some((m) => m.mac === spec.mac && m.where === where)) {
      const on = spec.kind === 'macvtap' ? `parent ${segment}` : segment;
      return { i, spec, refusal: error(`an earlier NIC of this request asks for MAC ${spec.mac} on ${on} too`) };
    }
    if (spec.name !== null) names.add(spec.name);
    if (spec.mac !== null) macs.push({ mac: spec.mac, where });
    charged.set(d.rule.name, (charged.get(d.rule.name) ?? 0) + 1);
    granted.push(d.rule);
  }
  return null;
}

/** Where a new device goes: a Linux bridge (maybe with a VLAN), a macvtap parent, an OVS bridge or a hook. */
function placement(kernel: Kernel, policy: Policy, spec: CreateSpec): Placement {
  const target = resolveTarget(policy, spec);
  switch (target.kind) {
    case 'macvtap': {
      const link = kernel.macvtapParent(target.name);
      return { link, bridge: null, vlan: null, parentName: link.name };
    }
    case 'bridge': {
      const bridge = kernel.bridge(target.name);
      if (target.vlan !== null) kernel.checkVlanFiltering(bridge);
      return { link: bridge, bridge, vlan: target.vlan, parentName: bridge.name };
    }
    // An OVS bridge that does not exist makes add-port fail, and the grant is rolled back then.
    case 'ovs':
      return { link: null, bridge: null, vlan: target.vlan, parentName: target.name };
    case 'hook': {
      const unsafe = hookUnsafe(target.name);
      if (unsafe) throw new TapbrokerError('TB_E_HOOK_FAILED', `hook ${target.name} ${unsafe}; not run`);
      return { link: null, bridge: null, vlan: null, parentName: '-' };
    }
    case 'unknown':
      throw new TapbrokerError('TB_E_POLICY_DENIED', `no network \`${target.name}'`);
  }
}
