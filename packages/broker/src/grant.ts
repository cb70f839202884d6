// Creating devices: create-tap, create-macvtap and create (one VM's NICs), each NIC through the same steps
// in order: spec → grammar → decision → kernel step → lease → plugging → audit → reply. All or nothing.
import {
  MAX_QUEUES, MAX_REPLY_FDS, TapbrokerError, macFromBuffer, macToBuffer, type CreateMacvtapRequest,
  type CreateRequest, type CreateTapRequest, type Device, type Nic,
} from '@tapbroker/protocol/core';
import { admit, firstRefused, macElsewhere, type Admitted } from './admission.js';
import type { Audit, AuditOp } from './audit.js';
import type { Meter } from './fairness.js';
import { decide, recorded, type AllowRule, type Policy } from './decide.js';
import { callerStartTime, type Identity } from './identity.js';
import { kernelBound, leaseTag, newLeaseId, type LeaseRecord } from './leases.js';
import { createNamed, freeMac, randomMac } from './naming.js';
import { hostMac, type CreatedTap } from './kernel.js';
import type { OpContext } from './ops.js';
import { plugOf, plugUp } from './plug.js';
import { SHORT_OF_HINT, shortOf, toldAs, type Outcome } from './session.js';
import { checkSpec, createSpec, specView, type CreateSpec } from './spec.js';

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
  const { granted: [nic], sent } = await grantAll(ctx, caller, req.op, [req]);
  const body = { id: req.id, device: nic!.device, fds: nic!.counts };
  return {
    reply: req.op === 'create-tap' ? { op: 'create-tap', ...body } : { op: 'create-macvtap', ...body },
    fds: nic!.fds,
    hold: holds([nic!]),
    undo: persistent([nic!]),
    sent,
  };
}

/** create: one VM's NICs in one request, each decided and audited on its own, granted all or none. */
export async function create(ctx: OpContext, caller: Identity, req: CreateRequest): Promise<Outcome> {
  const fds = fdsOf(req.nics);
  if (fds > MAX_REPLY_FDS) {
    const message = `these NICs need ${fds} fds; one reply carries at most ${MAX_REPLY_FDS}`;
    ctx.audit.record({
      op: 'create', decision: 'error', rule: null, caller, code: 'TB_E_INVALID_REQUEST', message,
      request: { nics: req.nics.length, fds },
    });
    throw new TapbrokerError('TB_E_INVALID_REQUEST', message);
  }
  const { granted: nics, sent } = await grantAll(ctx, caller, 'create', req.nics);
  return {
    reply: { op: 'create', id: req.id, devices: nics.map((n) => n.device), fds: nics.map((n) => n.counts) },
    fds: nics.flatMap((n) => n.fds),
    hold: holds(nics),
    undo: persistent(nics),
    sent,
  };
}

/** The fds a reply to these NICs carries (a bad queue count, refused later, counts as its nearest valid one). */
function fdsOf(nics: ReadonlyArray<CreateTapRequest | CreateMacvtapRequest | Nic>): number {
  const queues = (q: number | undefined) => Math.min(MAX_QUEUES, Math.max(1, q ?? 1));
  return nics.reduce((n, nic) => n + (nic.persistent ? 0 : queues(nic.queues) * (nic.vhost ? 2 : 1)), 0);
}

/** Leases that end with the connection that asked for them. */
function holds(nics: Granted[]): string[] {
  return nics.filter((n) => n.lease.ends === 'holder').map((n) => n.lease.id);
}

/** Persistent devices: they outlive the connection, unless its reply cannot be sent. */
function persistent(nics: Granted[]): string[] {
  return nics.filter((n) => n.lease.ends === 'release').map((n) => n.lease.id);
}

/** `held` lets its name go to new devices (see Unplugs.hold); nothing the second time. */
type Granted = ReturnType<typeof makeDevice> & {
  plugged: Record<string, unknown> | null; spec: CreateSpec; held: () => void;
};

/**
 * Each NIC in order through the same steps; if one is refused, the ones before it are rolled back (audited
 * as cleanups), so the caller gets all of them or none. Grants are recorded once all of them stand.
 */
async function grantAll(
  ctx: OpContext,
  caller: Identity,
  op: AuditOp,
  nics: ReadonlyArray<CreateTapRequest | CreateMacvtapRequest | Nic>,
): Promise<{ granted: Granted[]; sent: () => void }> {
  // Every section after the first await is charged to the caller's share too (the session charges only up to
  // it: an outside review ran 32-NIC creates, NICs 1-31 uncharged, and stalled everyone's grants for seconds).
  const meter = ctx.fairness.meter(caller.uid);
  // A uid's multi-NIC request runs alone among that uid's creates: what its pre-check saw (names, quota,
  // teardowns) is not the caller's to change from another connection between its NICs (an outside re-test raced
  // 8 such requests for one name: 31 NICs made and rolled back by each loser).
  const turn = ctx.fairness.alone(caller.uid, nics.length > 1);
  const done = typeof turn === 'function' ? turn : await meter.wait(turn);
  try {
    const room = reserveFds(ctx, caller, op, nics);
    try {
      return { granted: await grantEach(ctx, caller, op, nics, meter), sent: room.release };
    } catch (err) {
      room.release();
      throw err;
    }
  } finally {
    done();
    meter.end();
  }
}

/**
 * Room for the fds of this request's reply among those its caller, and everyone, leave unread: reserved from now
 * until the reply is sent (a re-test: one uid's creates at once on many connections all passed a check made
 * before any was sent). Unread, fds stay in flight, charged to root by the kernel: past its RLIMIT_NOFILE, sends
 * of fds fail (ETOOMANYREFS) for every root process without CAP_SYS_RESOURCE, this broker's included.
 */
function reserveFds(
  ctx: OpContext, caller: Identity, op: AuditOp, nics: ReadonlyArray<CreateTapRequest | CreateMacvtapRequest | Nic>,
): { release(): void } {
  const want = fdsOf(nics);
  if (want === 0) return { release: () => {} };
  const room = ctx.reserveFds(caller.uid, want);
  if ('release' in room) return room;
  // The caller is told its own count only: the count of all callers' told their VM starts and unread replies (an
  // outside review). The record, root's to read, has both.
  const message = `${room.unread} fds of replies to uid ${caller.uid} (${room.all} to all callers) are still unread `
    + `or on their way; this one would carry ${want} more than the broker lets stay in flight`;
  ctx.audit.record({ op, caller, decision: 'error', rule: null, code: 'TB_E_BUSY', message });
  throw room.mine
    ? new TapbrokerError('TB_E_BUSY', `${room.unread} fds of replies to you are still unread or on their way; this one `
      + `would carry ${want} more than the broker lets stay in flight for one user`,
    { hint: 'read the replies on your other connections, or close them' })
    : new TapbrokerError('TB_E_BUSY', 'the broker has as many fds of replies in flight to all its callers as it lets '
      + 'stay so', { hint: 'try again shortly' });
}

/** grantAll's steps, in the caller's turn. */
async function grantEach(
  ctx: OpContext,
  caller: Identity,
  op: AuditOp,
  nics: ReadonlyArray<CreateTapRequest | CreateMacvtapRequest | Nic>,
  meter: Meter,
): Promise<Granted[]> {
  // The policy the decisions are made under is the one their records name, even if a reload lands meanwhile.
  const policy = ctx.policy;
  const audit = (ev: Omit<Parameters<Audit['record']>[0], 'op' | 'caller' | 'policy'>) =>
    ctx.audit.record({ op, caller, policy: policy.sha256, ...ev });
  const made: Granted[] = [];
  const byIndex: Granted[] = [];
  const waits = nics.length > 1 ? ctx.fairness.rollbackWait(caller.uid) : 0;
  if (waits > 0) {
    const message = `your requests of several NICs were refused after NICs were made too often: they wait another `
      + `${Math.ceil(waits / 1000)} s`;
    audit({ decision: 'error', rule: null, code: 'TB_E_BUSY', message });
    throw new TapbrokerError('TB_E_BUSY', message, { hint: 'ask for NICs one by one meanwhile, or try again later' });
  }
  // A request the policy refuses is refused before anything is made (an outside review: 31 taps made, rolled back
  // and audited for a 32nd on a bridge the rule does not name, in a loop): a NIC denied with those before it
  // counted is denied here; one refused on its own (its grammar, its port lock) goes first.
  const refused = nics.length > 1 ? firstRefused(ctx, policy, caller, nics) : null;
  if (refused?.refusal) {
    const { spec, refusal: r } = refused;
    audit({ decision: r.decision, request: specView(spec), code: r.code, ...recorded(r) });
    throw new TapbrokerError(r.code, `NIC ${refused.i}: ${r.message}`, {
      ...(r.rule ? { rule: r.rule } : {}), ...(r.hint ? { hint: r.hint } : {}), nic: refused.i,
    });
  }
  const first = refused?.i ?? 0;
  const asked = askedMacs(nics);
  for (const i of [first, ...[...nics.keys()].filter((k) => k !== first)]) {
    const nic = nics[i]!;
    try {
      // Between NICs the broker serves others (and a caller past its share waits for its turn): under the
      // kernel's contention (another user's multiqueue taps dying) one NIC can take 150 ms, and a re-test
      // held everyone's grants, root's too, behind 32 NICs made in one go for up to 3 s.
      if (made.length > 0) await meter.wait(ctx.fairness.between(caller.uid));
      const g = await meter.wait(grantOne(ctx, policy, caller, nic, audit, asked));
      made.push(g);
      byIndex[i] = g;
    } catch (err) {
      const why = nics.length > 1 ? `NIC ${i} of the same request was refused` : 'refused';
      await meter.wait(undone(made.map((g) => abort(ctx, g, why, caller))));
      if (made.length > 1) ctx.fairness.rolledBack(caller.uid);
      // A create's refusal names its NIC, also the only one (`nic`; an outside review); the message says which where
      // there are several.
      if (op === 'create' && err instanceof TapbrokerError) {
        throw new TapbrokerError(err.code, nics.length > 1 ? `NIC ${i}: ${err.message}` : err.message, {
          ...(err.rule !== undefined ? { rule: err.rule } : {}),
          ...(err.hint !== undefined ? { hint: err.hint } : {}),
          nic: i,
        });
      }
      throw err;
    }
  }
  const granted = byIndex;
  await meter.wait(Promise.all(granted.map((g) => g.closing)));
  // The devices' own creation events (before their owner and MAC were set) are read while they are still
  // being created, so they are not taken for their holder's doing. If that fails (a netlink error in a
  // resync), or a device went meanwhile (root deleted it, or its owner: during a hook's `up`), nothing of
  // the request may stay half made, and the network's `down` comes after its `up`.
  let granting = false;
  const recordGrant = (g: Granted) => audit({
    decision: 'grant',
    rule: g.lease.rule,
    request: specView(g.spec),
    device: deviceRecord(g.device, g.lease, g.plugged),
  });
  try {
    ctx.lifetimes.catchUp();
    const gone = granted.find((g) => ctx.lifetimes.vanishedMidCreate(g.lease.id));
    if (gone) {
      throw new TapbrokerError('TB_E_KERNEL', `\`${gone.lease.name}' was deleted or renamed while it was being made`);
    }
    // Leases on disk are recorded before the write that makes them stay: a broker killed after it keeps them at its
    // next start, and their records must be there (an outside review killed it between the two: a persistent tap and
    // no record); one killed before rolls them back, and records that. The others go with the broker's fds.
    granting = true;
    for (const g of granted) if (g.durable) recordGrant(g);
    ctx.kernel.faultPoint('create:recorded');
    try {
      // Done, durably: a broker stopped before this deletes their devices at its next start (the client was told
      // nothing was made); one stopped after keeps them. Throws when the table cannot be written.
      ctx.lifetimes.table.confirm(granted.map((g) => g.lease.id));
    } catch (err) {
      throw unwritable(err);
    }
  } catch (err) {
    const e = err instanceof TapbrokerError ? err
      : new TapbrokerError('TB_E_KERNEL', `link events unreadable: ${(err as Error).message}`);
    for (const g of granted) {
      audit({
        // Its `up`'s answer too: it ran, and what it did is being undone (an outside review found it in no record).
        decision: 'error', rule: g.lease.rule, request: specView(g.spec),
        device: deviceRecord(g.device, g.lease, g.plugged), code: e.code,
        message: granting && g.durable ? `${e.message}: its grant, recorded, is undone` : e.message,
      });
    }
    await meter.wait(undone(granted.map((g) => abort(ctx, g, e.message, caller))));
    throw e;
  }
  for (const g of granted) if (!g.durable) recordGrant(g);
  ctx.kernel.faultPoint('create:confirmed');
  for (const g of granted) {
    ctx.lifetimes.commit(g.lease.id);
    g.held();
  }
  return granted;
}

/** Undoes one NIC's create; its name is held until its rollback's `down` holds it (see Unplugs.hold). */
function abort(ctx: OpContext, g: Pick<Granted, 'lease' | 'fds' | 'held'>, why: string, caller: Identity) {
  return ctx.lifetimes.abort(g.lease, g.fds, why, caller).finally(g.held);
}

/** How long a refusal waits for the rollback of what its request made, so that its records go before the reply. */
const ROLLBACK_WAIT_MS = 5000;

/** The rollbacks done and recorded, or ROLLBACK_WAIT_MS passed (a kernel that hangs: they end, and record, later). */
async function undone(rollbacks: ReadonlyArray<Promise<void>>): Promise<void> {
  if (rollbacks.length === 0) return;
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([Promise.all(rollbacks), new Promise<void>((r) => (timer = setTimeout(r, ROLLBACK_WAIT_MS)))]);
  clearTimeout(timer);
}

/** One device: spec → grammar → decision → kernel step → lease → plugging. Refusals are audited here. */
async function grantOne(
  ctx: OpContext,
  policy: Policy,
  caller: Identity,
  nic: CreateTapRequest | CreateMacvtapRequest | Nic,
  audit: (ev: Omit<Parameters<Audit['record']>[0], 'op' | 'caller' | 'policy'>) => void,
  asked: ReadonlySet<string> = NONE,
): Promise<Granted> {
  let spec: CreateSpec | null = null;
  let made: ReturnType<typeof makeDevice> | null = null;
  let audited = false;
  let ovs = false; // Open vSwitch was plugging the device when the create failed (see the end).
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
        request: specView(spec),
        code: decision.code,
        ...recorded(decision),
      });
      audited = true;
      throw new TapbrokerError(decision.code, decision.message, {
        ...(decision.rule ? { rule: decision.rule } : {}),
        hint: decision.hint,
      });
    }
    const admitted = admit(ctx, policy, caller, spec, decision.rule);
    // 3. The kernel step. Nothing is awaited between the decision and the lease: concurrent requests
    // see each other's quota.
    const granted = made = makeDevice(ctx, policy, caller, spec, decision.rule, admitted, asked);
    // 4. Open vSwitch or a hook plugs the device; if that fails, everything above is undone, and recorded first.
    // No new device takes its name until this create ends (see Unplugs.hold).
    const held = granted.lease.plug ? ctx.lifetimes.unplugs.hold(granted.lease.name) : () => {};
    try {
      const net = spec.network ? policy.networks.get(spec.parent) : undefined;
      ovs = !!granted.lease.plug && 'ovs' in granted.lease.plug;
      const plugged = await plugUp(granted.lease, net, ctx.lifetimes.identity.value, ctx.lifetimes.hookRun);
      return { ...granted, plugged, spec, held };
    } catch (err) {
      await undone([abort(ctx, { ...granted, held }, (err as Error).message, caller)]);
      throw err;
    }
  } catch (err) {
    if (!audited) {
      const e = toldAs(err);
      const plug = (err as { hook?: unknown }).hook;
      // The port lock the policy asks for, refused, or a refusal of ownership (a group the caller is not in, a network
      // gone at a reload): policy decisions, the first named by its rule (an outside review: `deny` was `error`).
      const byPolicy = e.code === 'TB_E_MAC_LOCK' || e.code === 'TB_E_POLICY_DENIED';
      audit({
        decision: byPolicy ? 'deny' : 'error',
        rule: byPolicy ? (e.rule ?? null) : null,
        ...(spec ? { request: specView(spec) } : {}),
        code: e.code,
        message: e.message,
        // The device made for it (then rolled back), where there was one: a hook's `up` that failed.
        ...(made ? { device: deviceRecord(made.device, made.lease, plug) }
          : plug ? { device: { plug } } : {}),
      });
    }
    // Out of fds or memory is no bug: a refusal with its code, for every NIC of the request alike.
    if (shortOf(err)) throw toldAs(err);
    // A hook's path and what it printed, Open vSwitch's database and what it said, are the policy's and root's: the
    // record above has them, the caller is told its network's plugging failed (an outside re-test read them all).
    const [code, net, hint] = [(err as { code?: string }).code, `network \`${spec?.parent ?? '?'}'`,
      'the broker\'s log and audit record say why: ask an administrator'];
    if (code === 'TB_E_HOOK_FAILED') throw new TapbrokerError(code, `the plug hook of ${net} failed, timed out or is `
      + 'unsafe to run; the device was rolled back', { hint });
    if (ovs && err instanceof TapbrokerError) throw new TapbrokerError(err.code, 'Open vSwitch could not plug the '
      + `device into ${net}: it was rolled back`, { hint });
    throw err;
  }
}

const NONE: ReadonlySet<string> = new Set();

/** The MACs a request's NICs ask for (the grammar takes lower case alone: one MAC is one string). */
function askedMacs(nics: ReadonlyArray<CreateTapRequest | CreateMacvtapRequest | Nic>): ReadonlySet<string> {
  return nics.length < 2 ? NONE : new Set(nics.flatMap((n) => (typeof n.mac === 'string' ? [n.mac] : [])));
}

/**
 * A MAC the broker picks: of the rule's prefix, no live lease's (this request's earlier NICs included), and none a
 * NIC of the same request asks for (an outside review: drawn before a later NIC's, on one bridge, twice). One a
 * lease has would be refused as in use, a whole request with it: 300 macvtaps in one request drew two alike about
 * once in 370 (a CI run), and a short prefix leaves few to draw from.
 */
function freshMac(ctx: OpContext, prefix: string, asked: ReadonlySet<string>): string {
  const mac = freeMac(prefix, (m) => asked.has(m) || ctx.lifetimes.table.withMac(m).length > 0);
  if (mac !== null) return mac;
  throw new TapbrokerError('TB_E_MAC_IN_USE', `every MAC of the rule's prefix ${prefix} is in use`, {
    hint: 'release a device, or ask an administrator for a longer mac_prefix',
  });
}

/** The device, its lease (in the table and in the device's own tag), and what the reply carries. */
function makeDevice(
  ctx: OpContext, policy: Policy, caller: Identity, spec: CreateSpec, rule: AllowRule, { place, lock }: Admitted,
  asked: ReadonlySet<string>,
) {
  const unkept = ctx.lifetimes.identity.keep();
  if (unkept) throw unwritable(unkept, 'the broker\'s identity (in its devices\' tags) could not be kept');
  // A guest MAC the hypervisor sets is unknown here: the host side then gets a random one of its own.
  const mac = spec.macUnknown ? null : (spec.mac ?? freshMac(ctx, rule.macPrefix, asked));
  const guestMac = macToBuffer(mac ?? randomMac(rule.macPrefix));
  if (place.bridge && mac !== null && spec.mac === null) {
    macElsewhere(ctx, caller, mac, place.parentName, place.vlan, lock);
  }
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
    holder_start: holding ? callerStartTime(caller) : null,
    group: spec.kind === 'tap' ? spec.group : null,
    plug: plugOf(spec.network ? policy.networks.get(spec.parent) : undefined),
    host_mac: spec.kind === 'tap' && mac === null ? macFromBuffer(hostMac(guestMac)) : null,
    vlan: place.vlan,
  };
  // The lease is written into the device itself (ifalias), so a crash between here and the lease
  // table leaves a device the next start recognises as ours, and a tap its fds keep alive needs no table.
  const tag = leaseTag(draft, ctx.lifetimes.identity.value);
  const common = {
    uid: caller.uid,
    queues: spec.queues,
    vnetHdr: spec.vnetHdr,
    vhost: spec.vhost,
    guestMac,
    persistent: owner,
    alias: tag.alias,
  };
  const held = (name: string) => ctx.lifetimes.unplugs.taken(name);
  const created = createNamed(caller.uid, spec.name, held, (name): CreatedTap => {
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
  }, () => new Set(ctx.kernel.links().map((l) => l.name)));
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
  // Written to disk (a start after a crash keeps it) unless its device ends with its fds, which end with the broker.
  const durable = !kernelBound(lease, tag.complete);
  try {
    ctx.lifetimes.begin(lease, durable);
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
    void ctx.lifetimes.abort(lease, all, (err as Error).message, caller);
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
  return { lease, device, fds, counts, closing, durable };
}

/**
 * A device as its audit records name it: `id` is its lease, as in every record of its end (the key that joins a
 * grant to its end); `lease`, the same, is the name grant records had first.
 */
function deviceRecord(device: Device, lease: LeaseRecord, plug?: unknown): Record<string, unknown> {
  return { ...device, id: lease.id, lease: lease.id, ...(plug ? { plug } : {}) };
}

const FULL_HINT = 'the broker\'s state directory is full or read-only; an administrator must free it';
function unwritable(err: unknown, what = 'the lease table could not be written'): TapbrokerError {
  // Out of fds is not a full disk (an outside review's hint said the directory was full at the open-files limit).
  const message = `${what}: ${(err as Error).message}`;
  return new TapbrokerError('TB_E_STATE_UNWRITABLE', message, {
    hint: shortOf(err) ? SHORT_OF_HINT : FULL_HINT,
  });
}


