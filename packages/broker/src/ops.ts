// The closed set of operations: one handler per op, named after it. The create handlers are in grant.ts;
// here are the others (hello, list, release, reload, can, status) and the state they all read.
import {
  MAX_REPLY_BYTES, PROTOCOL_VERSION, TapbrokerError, bounded, checkIfName, type CanRequest, type HelloRequest,
  type ListRequest, type ReleaseRequest, type ReloadRequest, type Reply, type Request, type StatusRequest,
} from '@tapbroker/protocol/core';
import { encodeReply } from '@tapbroker/protocol/requests';
import type { Audit } from './audit.js';
import type { Fairness } from './fairness.js';
import { firstRefused } from './admission.js';
import {
  denyScopeFor, denyTouches, locksPort, matches, matchesDeny, recorded, unknownNames, type AllowRule, type Decision,
  type Policy,
} from './decide.js';
import { create, createMacvtap, createTap } from './grant.js';
import type { Identity } from './identity.js';
import { leaseView } from './leases.js';
import type { Lifetimes } from './lifetimes.js';
import { printable, shown } from './naming.js';
import type { Kernel } from './kernel.js';
import type { Outcome } from './session.js';
import { checkSpec, createSpec, specView, type CreateSpec } from './spec.js';

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
  /** Devices of `uid` queued for teardown, and its devices' `down`s running. */
  teardowns(uid: number): number;
  /** Policies applied since the start (1: the one it started with). */
  readonly policyLoads: number;
  /** Each uid's share of the broker's thread: a handler that awaits charges its later sections (meter). */
  readonly fairness: Fairness;
  /** No closer process can take the fds the broker gives up (all stuck in the kernel): no new devices. */
  readonly fdsJammed: boolean;
  /**
   * Room for `n` more fds in replies `uid` has not read (its connections' unread and reserved ones, and everyone's,
   * within their budgets), reserved until `release`: or how many there are, when there is none.
   */
  reserveFds(uid: number, n: number): { release(): void } | { unread: number; all: number; mine: boolean };
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

/** The caller's leases, oldest first (root: everyone's), as many as one reply holds. */
function list(ctx: OpContext, caller: Identity, req: ListRequest): Outcome {
  ctx.lifetimes.catchUp();
  const mine = ctx.lifetimes
    .visible(caller.uid)
    .sort((a, b) => a.created.localeCompare(b.created))
    .map(leaseView);
  let n = mine.length;
  const reply = (): Reply => ({ op: 'list', id: req.id, leases: mine.slice(0, n), truncated: n < mine.length });
  while (n > 0 && encodeReply(reply()).length > MAX_REPLY_BYTES) n = Math.floor(n * 0.9);
  return { reply: reply(), fds: [] };
}

/**
 * release: the caller's persistent lease with this name (root: anyone's), and only while the device
 * carrying the name is that very lease's device (ifindex and kind), never a same-named other one.
 */
async function release(ctx: OpContext, caller: Identity, req: ReleaseRequest): Promise<Outcome> {
  const request = { name: req.name };
  const refuse = (message: string, hint = 'tapbroker list shows your leases'): never => {
    ctx.audit.record({
      op: 'release',
      decision: 'deny',
      rule: null,
      caller,
      request,
      code: 'TB_E_NO_SUCH_LEASE',
      message,
    });
    throw new TapbrokerError('TB_E_NO_SUCH_LEASE', message, { hint });
  };
  const why = checkIfName(req.name);
  if (why) refuse(`name \`${printable(req.name)}' ${why}`);
  ctx.lifetimes.catchUp();
  // One answer whether the name is unknown or someone else's: the reply reveals nothing of other users.
  const named = ctx.lifetimes.visible(caller.uid).find((l) => l.name === req.name);
  const lease = named?.ends === 'release' ? named : undefined;
  if (named && !lease) {
    // The caller's own (so nothing of anyone else's is told): a device that ends with its VM.
    refuse(`\`${req.name}' is not persistent: it ends when ${named.ends === 'fds' ? 'its last fd closes'
      : 'the process holding it exits'}`, 'stop the VM that holds it');
  }
  if (!lease) return refuse(`you hold no persistent device named \`${req.name}'`);
  // A tap some process holds (a running VM): deleting it would leave the guest on a NIC that leads nowhere. The
  // kernel counts a multiqueue tap's queues; a single-queue one the broker attaches itself (held till deleted).
  const ours = lease.kind === 'tap' && lease.queues === 1 ? ctx.kernel.holdTap(lease.name) : null;
  const held = lease.kind !== 'tap' ? 0 : lease.queues === 1 ? (ours === null ? 1 : 0)
    : ctx.kernel.link(lease.ifindex)?.tun?.queues ?? 0;
  if (held > 0) {
    const message = `\`${lease.name}' is in use: ${held} queue${held === 1 ? ' is' : 's are'} attached (a running VM?)`;
    ctx.audit.record({
      op: 'release', decision: 'deny', rule: lease.rule, caller, request, device: leaseView(lease),
      code: 'TB_E_DEVICE_IN_USE', message, unchanged: true,
    });
    throw new TapbrokerError('TB_E_DEVICE_IN_USE', message, {
      hint: `stop the VM that holds it, then release it${caller.uid === 0 ? ` (or: ip link del ${lease.name})` : ''}`,
    });
  }
  try {
    await ctx.lifetimes.retire(lease, { op: 'release', decision: 'release', caller, request, message: 'released' });
  } catch (err) {
    if (ours !== null) ctx.lifetimes.closeFds([ours], caller.uid);
    // No longer the lease's device (renamed by root): left alone, the lease already dropped.
    if (err instanceof TapbrokerError) refuse(err.message);
    ctx.lifetimes.restore(lease);
    throw new TapbrokerError('TB_E_KERNEL', `failed to delete \`${lease.name}': ${(err as Error).message}`);
  }
  if (ours !== null) ctx.lifetimes.closeFds([ours], caller.uid);
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
      hint: 'an administrator reloads it (as root: tapbroker reload, or systemctl reload tapbrokerd)',
    });
  }
  const policy = ctx.reload(caller);
  // The load's warnings reach whoever reloaded (systemctl reload's output), not only the broker's log: a deny whose
  // group is misspelt matches everyone (an outside review found that said nowhere an administrator would look).
  // As many as fit one reply (a re-test's long policy path made 64 of 4,096 characters too big to send: the reload
  // applied, and its client was told the broker had closed); the broker's log has them all.
  // Made printable: a name in the policy may hold any character, and a client refuses a reply with control characters
  // (an outside review: the reload applied, and `systemctl reload` failed).
  const all = policy.warnings.slice(0, 64).map((w) => (w.length > 4096 ? `${w.slice(0, 4095)}…` : w)).map(shown);
  const reply = (n: number): Reply => ({ op: 'reload', id: req.id, policy_sha256: policy.sha256,
    ...(n > 0 ? { warnings: all.slice(0, n) } : {}) });
  let n = all.length;
  while (n > 0 && encodeReply(reply(n)).length > MAX_REPLY_BYTES) n--;
  return { reply: reply(n), fds: [] };
}

/** can: the decision a create request would get now, as this caller, with nothing created. */
function can(ctx: OpContext, caller: Identity, req: CanRequest): Outcome {
  const policy = ctx.policy;
  let spec: CreateSpec | null = null;
  try {
    spec = createSpec(req);
    checkSpec(spec, caller);
  } catch (err) {
    const e = err as TapbrokerError;
    ctx.audit.record({
      op: 'can',
      decision: 'dry-run',
      rule: null,
      caller,
      policy: policy.sha256,
      ...(spec ? { request: specView(spec) } : {}),
      code: e.code,
      message: e.message,
    });
    throw err;
  }
  // As a create decides it, its port lock included (admission refuses one that cannot be had).
  const d = together(ctx, caller, req);
  ctx.audit.record({
    op: 'can',
    decision: 'dry-run',
    rule: d.allow ? d.rule.name : recorded(d).rule,
    caller,
    policy: policy.sha256,
    request: specView(spec),
    message: d.allow ? 'would grant' : `would deny: ${recorded(d).message}`,
    ...(d.allow ? {} : { code: d.code }),
  });
  const reply: Reply = d.allow
    ? {
        op: 'can',
        id: req.id,
        allow: true,
        rule: d.rule.name,
        message: `rule \`${d.rule.name}' would grant it`,
        locked: locksPort(policy, spec, d.rule),
      }
    : {
        op: 'can',
        id: req.id,
        allow: false,
        rule: d.rule,
        code: d.code,
        // Within the reply's limits, as an error's are (an outside review: a hint naming many bridges broke `can').
        message: bounded(d.message),
        ...(d.hint ? { hint: bounded(d.hint) } : {}),
        locked: false,
      };
  return { reply, fds: [] };
}

/**
 * A dry run's NIC, with the NICs before it in the same request (`before`), decided as a `create` of them all would
 * decide it (admission.ts firstRefused): its rule and quota, and what a create checks before its kernel step.
 */
function together(ctx: OpContext, caller: Identity, req: CanRequest): Decision {
  const granted: AllowRule[] = [];
  const nics = [...(req.before ?? []).map((b) => ({ ...b, op: 'can' as const, id: req.id })), req];
  const r = firstRefused(ctx, ctx.policy, caller, nics, granted);
  if (!r) return { allow: true, rule: granted.at(-1)! };
  const which = r.i === nics.length - 1 ? '' : `NIC ${r.i} of the request, before this one: `;
  const e = r.refusal ?? r.error;
  const { code, message, hint } = e;
  const rule = e.rule ?? null;
  const record = r.refusal?.record;
  return { allow: false, code, rule, message: `${which}${message}`, hint: hint ?? '', ...(record ? { record } : {}) };
}

/** What one status reply tells of rules and denies at most, in bytes (a reply holds MAX_REPLY_BYTES). */
const STATUS_BYTES = 96 * 1024;
/** A deny's `covers` at most, as the reply's shape takes it, and how a longer one ends. */
const COVERS_CHARS = 4096;
const CUT = ' … (cut)';

/** status: the broker, its policy, and the caller's standing: leases, and each rule that applies with its quota. */
function status(ctx: OpContext, caller: Identity, req: StatusRequest): Outcome {
  ctx.lifetimes.catchUp();
  const used = ctx.lifetimes.counts(caller.uid);
  const mine = ctx.policy.allow.filter((r) => matches(r.who, caller));
  // Bounded, as `list' is (an outside review: a deny of 300 bridges, or 60 of them, made a reply the client refused
  // or the broker could not send, and a 33-NIC run that asks for status between requests failed with it).
  let room = STATUS_BYTES;
  const fits = (bytes: number) => (room -= bytes) >= 0;
  const rules = mine.filter((r) => fits(r.name.length + 32))
    .map((r) => ({ rule: r.name, used: used(r.name), max_devices: r.maxDevices }));
  // Only where one of the caller's rules gives what the deny covers, as a denial tells it (SECURITY.md).
  const denies = ctx.policy.deny.filter((d) => matchesDeny(d.who, caller) && mine.some((r) => denyTouches(ctx.policy,
    d, r))).map((d) => {
    const unknown = unknownNames(d.who, caller);
    const covers = `${denyScopeFor(ctx.policy, d, mine)}${unknown ? ` (it names ${unknown})` : ''}`;
    return { rule: d.name, covers: covers.length <= COVERS_CHARS ? covers : covers.slice(0, COVERS_CHARS - 8) + CUT };
  });
  const told = denies.filter((d) => fits(d.rule.length + d.covers.length + 32));
  const reply: Reply = {
    op: 'status',
    id: req.id,
    broker: ctx.version,
    version: PROTOCOL_VERSION,
    policy_sha256: ctx.policy.sha256,
    started: ctx.started,
    policy_loads: ctx.policyLoads,
    tearing_down: ctx.teardowns(caller.uid),
    uid: caller.uid,
    user: caller.user,
    leases: ctx.lifetimes.visible(caller.uid).length,
    rules,
    denies: told,
    connections: caller.uid === 0 ? ctx.connections : null,
  };
  if (rules.length < mine.length || told.length < denies.length || told.some((d) => d.covers.endsWith(CUT))) {
    reply.truncated = true;
  }
  return { reply, fds: [] };
}

/** For the audit record of a request the handlers saw. */
export type { CreateSpec };
