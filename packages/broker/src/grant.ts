// Creating devices: create-tap, create-macvtap and create (one VM's NICs), each NIC through the same steps
// in order: spec → grammar → decision → kernel step → lease → plugging → audit → reply. All or nothing.
import {
  MAX_QUEUES, MAX_REPLY_FDS, TapbrokerError, macFromBuffer, macToBuffer, type CreateMacvtapRequest,
  type CreateRequest, type CreateTapRequest, type Device, type Nic,
} from '@tapbroker/protocol/core';
import type { Audit } from './audit.js';
import { decide, resolveTarget, type AllowRule, type Decision, type Policy } from './decide.js';
import type { Identity } from './identity.js';
import { kernelBound, leaseTag, newLeaseId, processStartTime, type LeaseRecord } from './leases.js';
import { randomMac, tapName } from './naming.js';
import { ContestedDeviceError, hostMac, type CreatedTap, type Kernel } from './kernel.js';
import type { OpContext } from './ops.js';
import { hookUnsafe } from './paths.js';
import { plugOf, plugUp } from './plug.js';
import type { Link } from './rtnetlink.js';
import type { Outcome } from './session.js';
import { checkSpec, createSpec, locksPort, lockRefusal, specView, type CreateSpec } from './spec.js';

/** Devices of one uid still being torn down, at most: beyond, its grants wait (TB_E_BUSY). */
const MAX_TEARDOWN_PER_UID = 32;

export function createTap(ctx: OpContext, caller: Identity, req: CreateTapRequest): Promise<Outcome> {
  return createOne(ctx, caller, req);
}

export function createMacvtap(ctx: OpContext, caller: Identity, req: CreateMacvtapRequest): Promise<Outcome> {
  return createOne(ctx, caller, req);
}

async function createOne(
  ctx: OpContext,
  caller: Identity,
  req: CreateTapRequest | CreateMacvtapRequest,
): Promise<Outcome> {
  const [nic] = await grantAll(ctx, caller, req.op, [req]);
  const body = { id: req.id, device: nic!.device, fds: nic!.counts };
  return {
    reply: req.op === 'create-tap' ? { op: 'create-tap', ...body } : { op: 'create-macvtap', ...body },
    fds: nic!.fds,
    hold: holds([nic!]),
  };
}

/** create: one VM's NICs in one request, each decided and audited on its own, granted all or none. */
export async function create(ctx: OpContext, caller: Identity, req: CreateRequest): Promise<Outcome> {
  // Queue counts are checked NIC by NIC later; here a bad one counts as its nearest valid value.
  const queues = (q: number | undefined) => Math.min(MAX_QUEUES, Math.max(1, q ?? 1));
  const fds = req.nics.reduce((n, nic) => n + (nic.persistent ? 0 : queues(nic.queues) * (nic.vhost ? 2 : 1)), 0);
  if (fds > MAX_REPLY_FDS) {
    const message = `these NICs need ${fds} fds; one reply carries at most ${MAX_REPLY_FDS}`;
    ctx.audit.record({
      op: 'create', decision: 'error', rule: null, caller, code: 'TB_E_INVALID_REQUEST', message,
      request: { nics: req.nics.length, fds },
    });
    throw new TapbrokerError('TB_E_INVALID_REQUEST', message);
  }
  const nics = await grantAll(ctx, caller, 'create', req.nics);
  return {
    reply: { op: 'create', id: req.id, devices: nics.map((n) => n.device), fds: nics.map((n) => n.counts) },
    fds: nics.flatMap((n) => n.fds),
    hold: holds(nics),
  };
}

/** Leases that end with the connection that asked for them. */
function holds(nics: Granted[]): string[] {
  return nics.filter((n) => n.lease.ends === 'holder').map((n) => n.lease.id);
}

/** Where a new device goes, resolved against the policy the decision used. */
interface Placement {
  /** A macvtap's parent. */
  link: Link | null;
  /** The Linux bridge a tap attaches to (null: OVS or a hook plugs it). */
  bridge: Link | null;
  vlan: number | null;
  parentName: string;
}

type Granted = ReturnType<typeof makeDevice> & { plugged: Record<string, unknown> | null; spec: CreateSpec };

/**
 * Each NIC in order through the same steps; if one is refused, the ones before it are rolled back (audited
 * as cleanups), so the caller gets all of them or none. Grants are recorded once all of them stand.
 */
async function grantAll(
  ctx: OpContext,
  caller: Identity,
  op: string,
  nics: ReadonlyArray<CreateTapRequest | CreateMacvtapRequest | Nic>,
): Promise<Granted[]> {
  // The policy the decisions are made under is the one their records name, even if a reload lands meanwhile.
  const policy = ctx.policy;
  const audit = (ev: Omit<Parameters<Audit['record']>[0], 'op' | 'caller' | 'policy'>) =>
    ctx.audit.record({ op, caller, policy: policy.sha256, ...ev });
  const made: Granted[] = [];
  const byIndex: Granted[] = [];
  // A request the policy refuses is refused before anything is made (an outside review: 31 taps made, rolled back
  // and audited for a 32nd on a bridge the rule does not name, in a loop): a NIC denied with those before it
  // counted is denied here; one refused on its own (its grammar, its port lock) goes first.
  const refused = nics.length > 1 ? firstRefused(ctx, policy, caller, nics) : null;
  if (refused?.deny) {
    const { spec, deny: d } = refused;
    audit({ decision: 'deny', rule: d.rule, request: specView(spec), code: d.code, message: d.message });
    throw new TapbrokerError(d.code, `NIC ${refused.i}: ${d.message}`, {
      ...(d.rule ? { rule: d.rule } : {}), hint: d.hint, nic: refused.i,
    });
  }
  const first = refused?.i ?? 0;
  for (const i of [first, ...[...nics.keys()].filter((k) => k !== first)]) {
    const nic = nics[i]!;
    try {
      const g = await grantOne(ctx, policy, caller, nic, audit);
      made.push(g);
      byIndex[i] = g;
    } catch (err) {
      const why = nics.length > 1 ? `NIC ${i} of the same request was refused` : 'refused';
      for (const g of made) ctx.lifetimes.abort(g.lease, g.fds, why);
      if (nics.length > 1 && err instanceof TapbrokerError) {
        throw new TapbrokerError(err.code, `NIC ${i}: ${err.message}`, {
          ...(err.rule !== undefined ? { rule: err.rule } : {}),
          ...(err.hint !== undefined ? { hint: err.hint } : {}),
          nic: i,
        });
      }
      throw err;
    }
  }
  const granted = byIndex;
  await Promise.all(granted.map((g) => g.closing));
  // The devices' own creation events (before their owner and MAC were set) are read while they are still
  // being created, so they are not taken for their holder's doing. If that fails (a netlink error in a
  // resync), or a device went meanwhile (root deleted it, or its owner: during a hook's `up`), nothing of
  // the request may stay half made, and the network's `down` comes after its `up`.
  try {
    ctx.lifetimes.catchUp();
    const gone = granted.find((g) => ctx.lifetimes.vanishedMidCreate(g.lease.id));
    if (gone) throw new TapbrokerError('TB_E_KERNEL', `\`${gone.lease.name}' was deleted while it was being made`);
    try {
      ctx.lifetimes.confirm(granted.map((g) => g.lease.id));
    } catch (err) {
      throw unwritable(err);
    }
  } catch (err) {
    const e = err instanceof TapbrokerError ? err
      : new TapbrokerError('TB_E_KERNEL', `link events unreadable: ${(err as Error).message}`);
    for (const g of granted) {
      ctx.lifetimes.abort(g.lease, g.fds, e.message);
      audit({
        decision: 'error', rule: g.lease.rule, request: specView(g.spec), device: { ...g.device, lease: g.lease.id },
        code: e.code, message: e.message,
      });
    }
    throw e;
  }
  for (const g of granted) {
    ctx.lifetimes.commit(g.lease.id);
    audit({
      decision: 'grant',
      rule: g.lease.rule,
      request: specView(g.spec),
      device: { ...g.device, lease: g.lease.id, ...(g.plugged ? { plug: g.plugged } : {}) },
    });
  }
  return granted;
}

/** One device: spec → grammar → decision → kernel step → lease → plugging. Refusals are audited here. */
async function grantOne(
  ctx: OpContext,
  policy: Policy,
  caller: Identity,
  nic: CreateTapRequest | CreateMacvtapRequest | Nic,
  audit: (ev: Omit<Parameters<Audit['record']>[0], 'op' | 'caller' | 'policy'>) => void,
): Promise<Granted> {
  let spec: CreateSpec | null = null;
  let audited = false;
  try {
    // 1. One normalised request, checked as it will reach the kernel.
    spec = createSpec(nic);
    checkSpec(spec, caller);
    // 2. The decision, on a lease table that has seen every link event the kernel sent.
    ctx.lifetimes.catchUp();
    const decision = decide(policy, caller, spec, ctx.lifetimes.counts(caller.uid));
    if (!decision.allow) {
      audit({
        decision: 'deny',
        rule: decision.rule,
        request: specView(spec),
        code: decision.code,
        message: decision.message,
      });
      audited = true;
      throw new TapbrokerError(decision.code, decision.message, {
        ...(decision.rule ? { rule: decision.rule } : {}),
        hint: decision.hint,
      });
    }
    if (spec.name !== null && ctx.lifetimes.unplugPending(spec.name)) {
      throw new TapbrokerError('TB_E_BUSY', `a device named \`${spec.name}' is still being unplugged from its `
        + 'network; try again shortly');
    }
    const cooling = ctx.lifetimes.coolingDown(caller.uid);
    if (cooling > 0) {
      throw new TapbrokerError('TB_E_BUSY', `your devices flooded the broker with link events; new devices wait `
        + `another ${Math.ceil(cooling / 1000)} s`);
    }
    const busy = ctx.teardowns(caller.uid);
    if (busy >= MAX_TEARDOWN_PER_UID) {
      throw new TapbrokerError('TB_E_BUSY', `${busy} of your devices are still being torn down; try again shortly`);
    }
    // A vhost-net fd's last close can block for as long as its holder likes: none is handed out while every
    // closer is stuck in such a close (other devices' fds are then closed on the pool).
    if (spec.vhost && ctx.fdsJammed) {
      throw new TapbrokerError('TB_E_BUSY', 'the broker cannot close vhost-net descriptors now (its closer '
        + 'processes are stuck in the kernel): no vhost-net until one exits');
    }
    // 3. The kernel step. Nothing is awaited between the decision and the lease: concurrent requests
    // see each other's quota.
    const granted = makeDevice(ctx, policy, caller, spec, decision.rule);
    // 4. Open vSwitch or a hook plugs the device; if that fails, everything above is undone.
    try {
      const net = spec.network ? policy.networks.get(spec.parent) : undefined;
      const plugged = await plugUp(granted.lease, net, ctx.lifetimes.brokerId, ctx.lifetimes.hookRun);
      return { ...granted, plugged, spec };
    } catch (err) {
      ctx.lifetimes.abort(granted.lease, granted.fds, (err as Error).message);
      throw err;
    }
  } catch (err) {
    if (!audited) {
      const e = err instanceof TapbrokerError ? err : new TapbrokerError('TB_E_INTERNAL', String(err));
      const plug = (err as { hook?: unknown }).hook;
      // The port lock the policy asks for, refused: a policy decision, named by its rule.
      const byPolicy = e.code === 'TB_E_MAC_LOCK';
      audit({
        decision: byPolicy ? 'deny' : 'error',
        rule: byPolicy ? (e.rule ?? null) : null,
        ...(spec ? { request: specView(spec) } : {}),
        code: e.code,
        message: e.message,
        ...(plug ? { device: { plug } } : {}),
      });
    }
    throw err;
  }
}

/** The device, its lease (in the table and in the device's own tag), and what the reply carries. */
function makeDevice(ctx: OpContext, policy: Policy, caller: Identity, spec: CreateSpec, rule: AllowRule) {
  const place = placement(ctx.kernel, policy, spec);
  const lock = portLock(policy, spec, rule);
  // A guest MAC the hypervisor sets is unknown here: the host side then gets a random one of its own.
  const mac = spec.macUnknown ? null : (spec.mac ?? randomMac(rule.macPrefix));
  const guestMac = macToBuffer(mac ?? randomMac(rule.macPrefix));
  if (place.bridge && mac !== null) macElsewhere(ctx, caller, mac, place.parentName, place.vlan, lock);
  const owner = spec.persistent ? { uid: caller.uid, gid: spec.group } : null;
  const ends = spec.persistent ? 'release' : spec.kind === 'tap' ? 'fds' : 'holder';
  const holding = ends === 'holder';
  const draft: LeaseRecord = {
    id: newLeaseId(),
    uid: caller.uid,
    user: caller.user,
    kind: spec.kind,
    name: '',
    ifindex: 1,
    parent: place.parentName,
    network: spec.network ? spec.parent : null,
    mode: spec.mode,
    mac,
    locked: lock,
    queues: spec.queues,
    rule: rule.name,
    created: new Date().toISOString(),
    ends,
    holder: holding ? caller.pid : null,
    holder_start: holding ? processStartTime(caller.pid) : null,
    group: spec.kind === 'tap' ? spec.group : null,
    plug: plugOf(spec.network ? policy.networks.get(spec.parent) : undefined),
    host_mac: spec.kind === 'tap' && mac === null ? macFromBuffer(hostMac(guestMac)) : null,
    vlan: place.vlan,
  };
  // The lease is written into the device itself (ifalias), so a crash between here and the lease
  // table leaves a device the next start recognises as ours, and a tap its fds keep alive needs no table.
  const tag = leaseTag(draft, ctx.lifetimes.brokerId);
  const common = {
    uid: caller.uid,
    queues: spec.queues,
    vnetHdr: spec.vnetHdr,
    vhost: spec.vhost,
    guestMac,
    persistent: owner,
    alias: tag.alias,
  };
  const created = createNamed(caller.uid, spec.name, (name): CreatedTap => {
    if (spec.kind === 'tap') {
      return ctx.kernel.createTap({ ...common, name, bridge: place.bridge, vlan: place.vlan, lock });
    }
    try {
      ctx.lifetimes.table.intend({ id: draft.id, name, parent: place.parentName, mac: mac! });
    } catch (err) {
      throw unwritable(err);
    }
    try {
      return ctx.kernel.createMacvtap({ ...common, name, parent: place.link!, mode: spec.mode! });
    } catch (err) {
      ctx.lifetimes.table.settle(draft.id);
      throw err;
    }
  });
  ctx.lifetimes.table.settle(draft.id, false);
  // passthru: the kernel gives the macvtap its parent's MAC, whatever was asked; the guest must use it.
  const actualMac = spec.kind === 'macvtap' ? macFromBuffer(created.hostMac) : mac;
  const ownMac = macFromBuffer(created.hostMac);
  const lease: LeaseRecord = {
    ...draft,
    name: created.name,
    ifindex: created.ifindex,
    mac: actualMac,
    host_mac: ownMac,
  };
  const all = [...created.tapFds, ...created.vhostFds];
  try {
    ctx.lifetimes.begin(lease, !kernelBound(lease, tag.complete));
  } catch (err) {
    // The table could not be written (a full state disk): nothing may stay behind.
    ctx.lifetimes.table.forget(lease.id);
    ctx.lifetimes.closeFds(all, caller.uid);
    if (spec.persistent || spec.kind === 'macvtap')
      ctx.lifetimes.deleteLink(created.ifindex, caller.uid, created.name, 'the lease could not be written');
    throw unwritable(err);
  }
  try {
    ctx.kernel.faultPoint('create:leased');
  } catch (err) {
    ctx.lifetimes.abort(lease, all, (err as Error).message);
    throw err;
  }
  const device: Device = {
    kind: spec.kind,
    name: created.name,
    ifindex: created.ifindex,
    parent: place.parentName,
    network: lease.network,
    vlan: place.vlan,
    mode: spec.mode,
    mtu: created.mtu,
    host_mac: ownMac,
    mac: actualMac,
    locked: lock,
    queues: spec.queues,
    vnet_hdr: spec.vnetHdr,
    vhost: spec.vhost,
    persistent: spec.persistent,
    rule: rule.name,
  };
  // A persistent device keeps no fd and none is sent. The broker's go before the reply: a single-queue tap
  // still attached to one is EBUSY to its owner's open (libvirt's, qemu's ifname=) until the last closes.
  const closing = spec.persistent ? ctx.lifetimes.closeUnshared(all) : null;
  const fds = spec.persistent ? [] : all;
  const counts = {
    tap: spec.persistent ? 0 : created.tapFds.length,
    vhost: spec.persistent ? 0 : created.vhostFds.length,
  };
  return { lease, device, fds, counts, closing };
}

/**
 * A guest MAC a live locked lease holds on this bridge (and VLAN) is that lease's alone, whatever the
 * bridge's forwarding table shows this instant (a holder who gives its own tap that MAC and back empties the
 * entry for a moment): no other tap there is made with it, locked or not. Nor is a live lease's MAC locked to
 * another port (a quiet guest's entry may have aged out of the table; the lock would take its traffic).
 */
function macElsewhere(
  ctx: OpContext, caller: Identity, mac: string, bridge: string, vlan: number | null, lock: boolean,
): void {
  const owner = ctx.lifetimes.table.withMac(mac).find((o) => (o.locked || lock) && o.kind === 'tap'
    && o.parent === bridge && o.vlan === vlan);
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
  if (ctx.lifetimes.forwarding.takenLately(bridge, mac, caller)) {
    throw new TapbrokerError('TB_E_MAC_IN_USE', `MAC ${mac} was taken by a tap of yours on bridge \`${bridge}' `
      + 'lately, which erased where the bridge had it: it is locked to none of your ports there for 5 minutes',
    { hint: 'choose another MAC' });
  }
}

/**
 * The first NIC of a request the policy would refuse now, with nothing made: its grammar or port lock (`i`
 * alone: grantOne refuses it again, with its record), or its rule or quota with the NICs before it counted
 * (`deny`). Null when none is.
 */
function firstRefused(
  ctx: OpContext, policy: Policy, caller: Identity, nics: ReadonlyArray<CreateTapRequest | CreateMacvtapRequest | Nic>,
): { i: number; spec: CreateSpec; deny: Extract<Decision, { allow: false }> } | { i: number; deny: null } | null {
  ctx.lifetimes.catchUp();
  const counts = ctx.lifetimes.counts(caller.uid);
  const charged = new Map<string, number>();
  for (const [i, nic] of nics.entries()) {
    try {
      const spec = createSpec(nic);
      checkSpec(spec, caller);
      const d = decide(policy, caller, spec, (rule) => counts(rule) + (charged.get(rule) ?? 0));
      if (!d.allow) return { i, spec, deny: d };
      if (lockRefusal(policy, spec, d.rule)) return { i, deny: null };
      charged.set(d.rule.name, (charged.get(d.rule.name) ?? 0) + 1);
    } catch {
      return { i, deny: null };
    }
  }
  return null;
}

function unwritable(err: unknown): TapbrokerError {
  return new TapbrokerError(
    'TB_E_STATE_UNWRITABLE',
    `the lease table could not be written: ${(err as Error).message}`,
    {
      hint: "the broker's state directory is full or read-only; an administrator must free it",
    },
  );
}

/**
 * Whether the device is a locked port (a rule's or a network's mac_lock: either is enough), refused
 * where it cannot be one: only a tap on a Linux bridge, with a guest MAC the broker knows, can be locked.
 */
function portLock(policy: Policy, spec: CreateSpec, rule: AllowRule): boolean {
  const refusal = lockRefusal(policy, spec, rule);
  if (refusal) throw refusal;
  return locksPort(policy, spec, rule);
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

/** The caller's name, or broker-chosen names `tb<uid>-<random>` until one is free and clean. */
function createNamed(
  uid: number,
  asked: string | null,
  create: (name: string) => CreatedTap,
): CreatedTap & { name: string } {
  if (asked !== null) return { ...create(asked), name: asked };
  for (let attempt = 0; ; attempt++) {
    const name = tapName(uid);
    try {
      return { ...create(name), name };
    } catch (err) {
      const retry =
        err instanceof ContestedDeviceError || (err instanceof TapbrokerError && err.code === 'TB_E_DEVICE_EXISTS');
      if (!retry || attempt >= 8) throw err;
    }
  }
}

