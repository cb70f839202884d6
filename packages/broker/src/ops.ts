// The closed set of operations: one handler per op, named after it. Each create handler reads as its
// steps in order: spec → grammar → decision → kernel step → lease → plugging → audit → reply.
import {
  MAX_REPLY_BYTES,
  MAX_QUEUES,
  MAX_REPLY_FDS,
  PROTOCOL_VERSION,
  TapbrokerError,
  checkIfName,
  encodeFrame,
  macFromBuffer,
  macToBuffer,
  type CanRequest,
  type CreateMacvtapRequest,
  type CreateRequest,
  type CreateTapRequest,
  type Device,
  type HelloRequest,
  type ListRequest,
  type Nic,
  type ReleaseRequest,
  type ReloadRequest,
  type Reply,
  type Request,
  type StatusRequest,
} from '@tapbroker/protocol';
import type { Audit } from './audit.js';
import type { Identity } from './identity.js';
import { kernelBound, leaseTag, leaseView, newLeaseId, processStartTime, type LeaseRecord } from './leases.js';
import type { Lifetimes } from './lifetimes.js';
import { printable, randomMac, tapName } from './naming.js';
import { ContestedDeviceError, hostMac, type CreatedTap, type Kernel } from './netdev.js';
import { plugOf, plugUp } from './plug.js';
import { decide, hookUnsafe, matches, resolveTarget, type AllowRule, type Policy } from './policy.js';
import type { Link } from './rtnetlink.js';
import type { Outcome } from './session.js';
import { checkSpec, createSpec, specView, type CreateSpec } from './spec.js';

/** Devices of one uid still being torn down, at most: beyond, its grants wait (TB_E_BUSY). */
export const MAX_TEARDOWN_PER_UID = 32;

/** What the handlers act on: the broker's state, read through this narrow view. */
export interface OpContext {
  readonly policy: Policy;
  readonly kernel: Kernel;
  readonly lifetimes: Lifetimes;
  readonly audit: Audit;
  readonly version: string;
  /** When the broker started (ISO 8601). */
  readonly started: string;
  /** Open connections. */
  readonly connections: number;
  /** Devices of `uid` queued for teardown. */
  teardowns(uid: number): number;
  reload(caller: Identity): Policy;
}

type Handler<R extends Request> = (ctx: OpContext, caller: Identity, req: R) => Outcome | Promise<Outcome>;
type Handlers = { [K in Request['op']]: Handler<Extract<Request, { op: K }>> };

export const HANDLERS: Handlers = {
  hello: hello,
  'create-tap': createTap,
  'create-macvtap': createMacvtap,
  create: create,
  list: list,
  release: release,
  reload: reload,
  can: can,
  status: status,
};

export function dispatch(ctx: OpContext, caller: Identity, req: Request): Outcome | Promise<Outcome> {
  return (HANDLERS[req.op] as Handler<Request>)(ctx, caller, req);
}

function hello(ctx: OpContext, _caller: Identity, req: HelloRequest): Outcome {
  if (req.version !== PROTOCOL_VERSION) {
    throw new TapbrokerError(
      'TB_E_VERSION',
      `client speaks protocol version ${req.version}; this broker speaks ${PROTOCOL_VERSION}`,
      {
        hint: req.version < PROTOCOL_VERSION
          ? `upgrade the client to one that speaks version ${PROTOCOL_VERSION} (the tapbroker package ships both)`
          : 'this broker is older than the client: restart tapbrokerd after the upgrade (systemctl restart tapbrokerd)',
      },
    );
  }
  return { reply: { op: 'hello', id: req.id, version: PROTOCOL_VERSION, broker: ctx.version }, fds: [] };
}

function createTap(ctx: OpContext, caller: Identity, req: CreateTapRequest): Promise<Outcome> {
  return createOne(ctx, caller, req);
}

function createMacvtap(ctx: OpContext, caller: Identity, req: CreateMacvtapRequest): Promise<Outcome> {
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
async function create(ctx: OpContext, caller: Identity, req: CreateRequest): Promise<Outcome> {
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
  const granted: Granted[] = [];
  for (const [i, nic] of nics.entries()) {
    try {
      granted.push(await grantOne(ctx, policy, caller, nic, audit));
    } catch (err) {
      const why = nics.length > 1 ? `NIC ${i} of the same request was refused` : 'refused';
      for (const g of granted) ctx.lifetimes.abort(g.lease, g.fds, why);
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
  // The devices' own creation events (before their owner and MAC were set) are read while they are still
  // being created, so they are not taken for their holder's doing. If that fails (a netlink error in a
  // resync), nothing of the request may stay half made.
  try {
    ctx.lifetimes.catchUp();
  } catch (err) {
    for (const g of granted) ctx.lifetimes.abort(g.lease, g.fds, `link events unreadable: ${(err as Error).message}`);
    throw err;
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
    const busy = ctx.teardowns(caller.uid);
    if (busy >= MAX_TEARDOWN_PER_UID) {
      throw new TapbrokerError('TB_E_BUSY', `${busy} of your devices are still being torn down; try again shortly`);
    }
    // 3. The kernel step. Nothing is awaited between the decision and the lease: concurrent requests
    // see each other's quota.
    const granted = makeDevice(ctx, policy, caller, spec, decision.rule);
    // 4. Open vSwitch or a hook plugs the device; if that fails, everything above is undone.
    try {
      const plugged = await plugUp(granted.lease, spec.network ? policy.networks.get(spec.parent) : undefined);
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
  // A persistent device keeps no fd: the broker's go now, and none is sent.
  if (spec.persistent) ctx.lifetimes.closeFds(all, caller.uid);
  const fds = spec.persistent ? [] : all;
  const counts = {
    tap: spec.persistent ? 0 : created.tapFds.length,
    vhost: spec.persistent ? 0 : created.vhostFds.length,
  };
  return { lease, device, fds, counts };
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
  return rule.macLock || (spec.network && policy.networks.get(spec.parent)?.macLock) || false;
}

/** Why this request cannot have the port lock its rule or network asks for (as `can` says too), or null. */
function lockRefusal(policy: Policy, spec: CreateSpec, rule: AllowRule): TapbrokerError | null {
  const lock = rule.macLock || (spec.network && policy.networks.get(spec.parent)?.macLock) || false;
  if (!lock) return null;
  const why = spec.kind === 'macvtap' ? 'a macvtap cannot be locked to its MAC'
    : resolveTarget(policy, spec).kind !== 'bridge'
      ? 'only a port of a Linux bridge can be locked: this network is Open vSwitch or a hook'
      : spec.macUnknown ? 'the broker is not told the guest\'s MAC (the bridge helper\'s way), so it cannot lock '
        + 'the port to it'
        : null;
  if (!why) return null;
  const who = rule.macLock ? `rule \`${rule.name}'` : `network \`${spec.parent}'`;
  return new TapbrokerError('TB_E_MAC_LOCK', `${who} locks ports to their guest's MAC, and ${why}`, {
    rule: rule.name,
    hint: spec.macUnknown ? 'use tapbroker run, which tells the broker the MAC' : 'ask for a tap on a Linux bridge',
  });
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

/** The caller's leases, oldest first (root: everyone's), as many as one reply holds. */
function list(ctx: OpContext, caller: Identity, req: ListRequest): Outcome {
  ctx.lifetimes.catchUp();
  const mine = ctx.lifetimes
    .visible(caller.uid)
    .sort((a, b) => a.created.localeCompare(b.created))
    .map(leaseView);
  let n = mine.length;
  const reply = (): Reply => ({ op: 'list', id: req.id, leases: mine.slice(0, n), truncated: n < mine.length });
  while (n > 0 && encodeFrame(reply()).length > MAX_REPLY_BYTES) n = Math.floor(n * 0.9);
  return { reply: reply(), fds: [] };
}

/**
 * release: the caller's persistent lease with this name (root: anyone's), and only while the device
 * carrying the name is that very lease's device (ifindex and kind), never a same-named other one.
 */
async function release(ctx: OpContext, caller: Identity, req: ReleaseRequest): Promise<Outcome> {
  const request = { name: req.name };
  const refuse = (message: string): never => {
    ctx.audit.record({
      op: 'release',
      decision: 'deny',
      rule: null,
      caller,
      request,
      code: 'TB_E_NO_SUCH_LEASE',
      message,
    });
    throw new TapbrokerError('TB_E_NO_SUCH_LEASE', message, { hint: 'tapbroker list shows your leases' });
  };
  const why = checkIfName(req.name);
  if (why) refuse(`name \`${printable(req.name)}' ${why}`);
  ctx.lifetimes.catchUp();
  // One answer whether the name is unknown or someone else's: the reply reveals nothing of other users.
  const lease = ctx.lifetimes.visible(caller.uid).find((l) => l.name === req.name && l.ends === 'release');
  if (!lease) return refuse(`you hold no persistent device named \`${req.name}'`);
  // Out of the table first (durably), so a crash from here on leaves a tagged device without a lease:
  // the next start deletes it as an orphan.
  ctx.lifetimes.table.remove(lease.id);
  ctx.kernel.faultPoint('release:unleased');
  try {
    await ctx.lifetimes.retire(lease, { op: 'release', decision: 'release', caller, request, message: 'released' });
  } catch (err) {
    ctx.lifetimes.table.add(lease);
    throw new TapbrokerError('TB_E_KERNEL', `failed to delete \`${lease.name}': ${(err as Error).message}`);
  }
  ctx.kernel.faultPoint('release:deleted');
  return { reply: { op: 'release', id: req.id, lease: leaseView(lease) }, fds: [] };
}

function reload(ctx: OpContext, caller: Identity, req: ReloadRequest): Outcome {
  if (caller.uid !== 0) {
    ctx.audit.record({
      op: 'reload',
      decision: 'deny',
      rule: null,
      caller,
      code: 'TB_E_POLICY_DENIED',
      message: 'only root may reload the policy',
    });
    throw new TapbrokerError('TB_E_POLICY_DENIED', 'only root may reload the policy', {
      hint: 'run it as root, or send tapbrokerd SIGHUP',
    });
  }
  return { reply: { op: 'reload', id: req.id, policy_sha256: ctx.reload(caller).sha256 }, fds: [] };
}

/** can: the decision a create request would get now, as this caller, with nothing created. */
function can(ctx: OpContext, caller: Identity, req: CanRequest): Outcome {
  const policy = ctx.policy;
  const spec = createSpec(req);
  try {
    checkSpec(spec, caller);
  } catch (err) {
    const e = err as TapbrokerError;
    ctx.audit.record({
      op: 'can',
      decision: 'dry-run',
      rule: null,
      caller,
      policy: policy.sha256,
      request: specView(spec),
      code: e.code,
      message: e.message,
    });
    throw err;
  }
  ctx.lifetimes.catchUp();
  const decided = decide(policy, caller, spec, ctx.lifetimes.counts(caller.uid));
  // A grant whose port cannot be locked as its rule or network says would be refused: so is the dry run.
  const refusal = decided.allow ? lockRefusal(policy, spec, decided.rule) : null;
  const d: typeof decided = refusal ? {
    allow: false, code: refusal.code, rule: refusal.rule ?? null, message: refusal.message, hint: refusal.hint ?? '',
  } : decided;
  ctx.audit.record({
    op: 'can',
    decision: 'dry-run',
    rule: d.allow ? d.rule.name : d.rule,
    caller,
    policy: policy.sha256,
    request: specView(spec),
    message: d.allow ? 'would grant' : `would deny: ${d.message}`,
    ...(d.allow ? {} : { code: d.code }),
  });
  const reply: Reply = d.allow
    ? {
        op: 'can',
        id: req.id,
        allow: true,
        rule: d.rule.name,
        message: `rule \`${d.rule.name}' would grant it`,
        locked: d.rule.macLock || (spec.network && policy.networks.get(spec.parent)?.macLock) || false,
      }
    : {
        op: 'can',
        id: req.id,
        allow: false,
        rule: d.rule,
        code: d.code,
        message: d.message,
        hint: d.hint,
        locked: false,
      };
  return { reply, fds: [] };
}

/** status: the broker, its policy, and the caller's standing: leases, and each rule that applies with its quota. */
function status(ctx: OpContext, caller: Identity, req: StatusRequest): Outcome {
  ctx.lifetimes.catchUp();
  const used = ctx.lifetimes.counts(caller.uid);
  const rules = ctx.policy.allow
    .filter((r) => matches(r.who, caller))
    .map((r) => ({ rule: r.name, used: used(r.name), max_devices: r.maxDevices }));
  const reply: Reply = {
    op: 'status',
    id: req.id,
    broker: ctx.version,
    version: PROTOCOL_VERSION,
    policy_sha256: ctx.policy.sha256,
    started: ctx.started,
    uid: caller.uid,
    user: caller.user,
    leases: ctx.lifetimes.visible(caller.uid).length,
    rules,
    connections: caller.uid === 0 ? ctx.connections : null,
  };
  return { reply, fds: [] };
}

/** For the audit record of a request the handlers saw. */
export type { CreateSpec };
