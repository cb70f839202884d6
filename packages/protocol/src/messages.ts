// Every message of the protocol, as strict zod schemas: the single source of truth for the types.
// Requests and replies come in pairs named by `op`; any request may instead get an `error` reply.
import { z } from 'zod';
import { ERROR_CODES, type ErrorCode } from './errors.js';
import { printable } from './text.js';

import {
  LEASE_ENDS, MACVTAP_MODES, MAX_NICS, MAX_REPLY_BYTES, MAX_REPLY_FDS, MAX_REQUEST_BYTES, PROTOCOL_VERSION,
  type MacvtapMode,
} from './constants.js';

export {
  LEASE_ENDS, MACVTAP_MODES, MAX_NICS, MAX_REPLY_BYTES, MAX_REPLY_FDS, MAX_REQUEST_BYTES, PROTOCOL_VERSION,
  type MacvtapMode,
};

const Id = z.number().int().min(0).max(0xffffffff);
// Lengths here only bound the work; the exact kernel grammar is checked by the broker with its own codes.
const Text = (max: number) => z.string().max(max);

// ---- requests ----

export const HelloRequest = z.strictObject({
  op: z.literal('hello'),
  id: Id,
  version: z.number().int(),
  client: Text(128).optional(),
});

/** Fields every create request shares. */
const DeviceOptions = {
  queues: z.number().int().optional(),
  vhost: z.boolean().optional(),
  vnet_hdr: z.boolean().optional(),
  /** The guest's MAC; absent: the broker picks one; null: the hypervisor sets it and the broker does not know it. */
  mac: Text(64).nullable().optional(),
  name: Text(64).optional(),
  /** A persistent device owned by the caller (for libvirt managed='no'); no fds are sent. */
  persistent: z.boolean().optional(),
};

/** Exactly one of `bridge` (a Linux bridge by its name) or `network` (a network the admin named). */
const TapFields = {
  bridge: Text(64).optional(),
  network: Text(64).optional(),
  ...DeviceOptions,
  /** With `persistent`: also let this group (one of the caller's) use the tap. */
  group: z.number().int().min(0).max(0xfffffffe).optional(),
};

export const CreateTapRequest = z.strictObject({ op: z.literal('create-tap'), id: Id, ...TapFields });


/** A persistent macvtap's char device is opened only by the caller; no fds are sent. */
const MacvtapFields = { parent: Text(64), mode: z.enum(MACVTAP_MODES).optional(), ...DeviceOptions };

export const CreateMacvtapRequest = z.strictObject({ op: z.literal('create-macvtap'), id: Id, ...MacvtapFields });

/** One NIC of a `create` request: the fields of create-tap or create-macvtap, told apart by `kind`. */
export const Nic = z.discriminatedUnion('kind', [
  z.strictObject({ kind: z.literal('tap'), ...TapFields }),
  z.strictObject({ kind: z.literal('macvtap'), ...MacvtapFields }),
]);
export type Nic = z.infer<typeof Nic>;

/** Several NICs (one VM's) in one request: each decided and audited on its own, granted all or none. */
export const CreateRequest = z.strictObject({
  op: z.literal('create'),
  id: Id,
  nics: z.array(Nic).min(1).max(MAX_NICS),
});

/** The broker, the policy and the caller's own standing: leases, and each rule that applies with its quota. */
export const StatusRequest = z.strictObject({ op: z.literal('status'), id: Id });

export const ListRequest = z.strictObject({ op: z.literal('list'), id: Id });

export const ReleaseRequest = z.strictObject({ op: z.literal('release'), id: Id, name: Text(64) });

/** Root only: re-read the policy file (as SIGHUP does). */
export const ReloadRequest = z.strictObject({ op: z.literal('reload'), id: Id });

/** One NIC as a dry run names it. */
const CanFields = {
  /** `network`: `parent` names a network. */
  kind: z.enum(['tap', 'macvtap', 'network']),
  parent: Text(64),
  mode: z.enum(MACVTAP_MODES).optional(),
  queues: z.number().int().optional(),
  vhost: z.boolean().optional(),
  mac: Text(64).nullable().optional(),
  name: Text(64).optional(),
  persistent: z.boolean().optional(),
  /** A persistent tap given to this group too (create-tap's `group`). */
  group: z.number().int().min(0).max(0xfffffffe).optional(),
};

/** A dry run of a create request, as the caller: the decision, with nothing created. */
export const CanRequest = z.strictObject({
  op: z.literal('can'),
  id: Id,
  ...CanFields,
  /**
   * The NICs of the same request before this one (as `tapbroker run` asks for them together): charged to their
   * rules' quotas, and their names and MACs checked against this one's, as a `create` of them all would be.
   */
  before: z.array(z.strictObject(CanFields)).max(MAX_NICS - 1).optional(),
});

export const Request = z.discriminatedUnion('op', [
  HelloRequest, CreateTapRequest, CreateMacvtapRequest, CreateRequest, ListRequest, ReleaseRequest, ReloadRequest,
  CanRequest, StatusRequest,
]);
export type Request = z.infer<typeof Request>;
export type HelloRequest = z.infer<typeof HelloRequest>;
export type CreateTapRequest = z.infer<typeof CreateTapRequest>;
export type CreateMacvtapRequest = z.infer<typeof CreateMacvtapRequest>;
export type ListRequest = z.infer<typeof ListRequest>;
export type ReleaseRequest = z.infer<typeof ReleaseRequest>;
export type ReloadRequest = z.infer<typeof ReloadRequest>;
export type CanRequest = z.infer<typeof CanRequest>;
export type CreateRequest = z.infer<typeof CreateRequest>;
export type StatusRequest = z.infer<typeof StatusRequest>;
export type Op = Request['op'];
export const OPS: readonly Op[] = [
  'hello', 'create-tap', 'create-macvtap', 'create', 'list', 'release', 'reload', 'can', 'status',
];

// ---- replies ----

const codes = Object.keys(ERROR_CODES) as [ErrorCode, ...ErrorCode[]];

export const HelloReply = z.strictObject({
  op: z.literal('hello'),
  id: Id,
  version: z.number().int(),
  broker: Text(128),
});


export const Device = z.strictObject({
  kind: z.enum(['tap', 'macvtap']),
  name: Text(15),
  ifindex: z.number().int().positive(),
  /** The bridge of a tap (Linux or Open vSwitch), the parent of a macvtap, `-` for a hook network. */
  parent: Text(15),
  /** The named network the device joined, or null. */
  network: Text(64).nullable(),
  /** Its access VLAN, or null. */
  vlan: z.number().int().nullable(),
  mode: z.enum(MACVTAP_MODES).nullable(),
  mtu: z.number().int().positive(),
  /** The host-side MAC: for a tap, first octet 0xfe (the bridge never adopts it); for a macvtap, the guest's. */
  host_mac: Text(17),
  /** The MAC the guest must use; null when the hypervisor sets it (the broker was not told). */
  mac: Text(17).nullable(),
  /** The bridge port forwards only frames from `mac` (the policy's mac_lock). */
  locked: z.boolean(),
  queues: z.number().int().positive(),
  vnet_hdr: z.boolean(),
  vhost: z.boolean(),
  persistent: z.boolean(),
  /** The policy rule that granted the device. */
  rule: Text(128),
});
export type Device = z.infer<typeof Device>;
/** Kept for readers of version 0.1 code: a tap is a Device of kind `tap`. */
export type TapDevice = Device;

/**
 * SCM_RIGHTS carries `fds.tap` queue fds (one per queue) followed by `fds.vhost` vhost-net fds; none for persistent
 * devices.
 */
const Fds = z.strictObject({ tap: z.number().int().min(0), vhost: z.number().int().min(0) });

export const CreateTapReply = z.strictObject({ op: z.literal('create-tap'), id: Id, device: Device, fds: Fds });
export const CreateMacvtapReply = z.strictObject({ op: z.literal('create-macvtap'), id: Id, device: Device, fds: Fds });
/**
 * `devices[i]` and `fds[i]` for the i-th NIC asked for (two arrays: frames nest at most 4 deep); SCM_RIGHTS
 * carries each NIC's fds in that order, its tap fds first.
 */
export const CreateReply = z.strictObject({
  op: z.literal('create'),
  id: Id,
  devices: z.array(Device).min(1).max(MAX_NICS),
  fds: z.array(Fds).min(1).max(MAX_NICS),
});

export const Lease = z.strictObject({
  id: Text(32),
  uid: z.number().int().min(0),
  user: Text(256).nullable(),
  kind: z.enum(['tap', 'macvtap']),
  name: Text(15),
  ifindex: z.number().int().positive(),
  parent: Text(15),
  network: Text(64).nullable().default(null),
  mode: z.enum(MACVTAP_MODES).nullable(),
  mac: Text(17).nullable(),
  locked: z.boolean().default(false),
  queues: z.number().int().positive(),
  rule: Text(128),
  created: Text(64),
  ends: z.enum(LEASE_ENDS),
  /** For leases that end with their holder: the holder's pid. */
  holder: z.number().int().positive().nullable(),
});
export type Lease = z.infer<typeof Lease>;

/** `truncated` says more leases exist than one reply holds (the first ones, oldest first, are listed). */
export const ListReply = z.strictObject({
  op: z.literal('list'),
  id: Id,
  leases: z.array(Lease).max(4096),
  truncated: z.boolean(),
});
export const ReleaseReply = z.strictObject({ op: z.literal('release'), id: Id, lease: Lease });
/** `warnings`: what the new policy's load warned about (each with its file and line), when there was any. */
export const ReloadReply = z.strictObject({
  op: z.literal('reload'), id: Id, policy_sha256: Text(64), warnings: z.array(Text(4096)).max(64).optional(),
});

/** A rule that applies to the caller, with how many of its devices the caller holds. */
export const RuleStanding = z.strictObject({
  rule: Text(128),
  used: z.number().int().min(0),
  max_devices: z.number().int().min(0),
});

/** A deny rule that names the caller, and what it covers (networks by name): the caller's own to know. */
export const DenyStanding = z.strictObject({
  rule: Text(128),
  covers: Text(4096),
});

export const StatusReply = z.strictObject({
  op: z.literal('status'),
  id: Id,
  broker: Text(128),
  version: z.number().int(),
  policy_sha256: Text(64),
  /** When this broker started (ISO 8601). */
  started: Text(64),
  /**
   * Policies this broker has applied: 1 at its start, one more at each reload that applied one (an unchanged one
   * too: names are resolved again), and at each account change that changed what the policy's names mean. A client
   * whose requests must all be decided under one policy compares it.
   * Optional: a broker of 0.5.0 built before it lacks it (a client then compares the digest).
   */
  policy_loads: z.number().int().min(1).optional(),
  /** The caller's devices still being deleted or unplugged (their fds closed, a hook's `down` running). Optional. */
  tearing_down: z.number().int().min(0).optional(),
  uid: z.number().int().min(0),
  user: Text(256).nullable(),
  /** The caller's live leases (root: everyone's). */
  leases: z.number().int().min(0),
  rules: z.array(RuleStanding).max(4096),
  /** Deny rules that name the caller: deny wins over every rule above. */
  denies: z.array(DenyStanding).max(4096),
  /** Open connections: for root only, null for others. */
  connections: z.number().int().min(0).nullable(),
  /** Some rules or denies were left out, or a deny's `covers` cut, to fit one reply (a policy of thousands). */
  truncated: z.literal(true).optional(),
});


export const ErrorReply = z.strictObject({
  op: z.literal('error'),
  id: Id.nullable(),
  code: z.enum(codes),
  message: Text(1024),
  rule: Text(128).optional(),
  hint: Text(1024).optional(),
  /** In a `create` request: the index of the NIC refused (nothing of the others was kept). */
  nic: z.number().int().min(0).optional(),
});

/** `allow` false carries the code, rule and hint a real request would get. */
export const CanReply = z.strictObject({
  op: z.literal('can'),
  id: Id,
  allow: z.boolean(),
  rule: Text(128).nullable(),
  code: z.enum(codes).optional(),
  message: Text(1024),
  hint: Text(1024).optional(),
  /** A grant would be a locked port (mac_lock). */
  locked: z.boolean(),
});

export const Reply = z.discriminatedUnion('op', [
  HelloReply, CreateTapReply, CreateMacvtapReply, CreateReply, ListReply, ReleaseReply, ReloadReply, CanReply,
  StatusReply, ErrorReply,
]);
export type Reply = z.infer<typeof Reply>;
export type HelloReply = z.infer<typeof HelloReply>;
export type CreateTapReply = z.infer<typeof CreateTapReply>;
export type CreateMacvtapReply = z.infer<typeof CreateMacvtapReply>;
export type ListReply = z.infer<typeof ListReply>;
export type ReleaseReply = z.infer<typeof ReleaseReply>;
export type ReloadReply = z.infer<typeof ReloadReply>;
export type CanReply = z.infer<typeof CanReply>;
export type CreateReply = z.infer<typeof CreateReply>;
export type StatusReply = z.infer<typeof StatusReply>;
export type ErrorReply = z.infer<typeof ErrorReply>;

/** Zod's issues in one line: `queues: expected number, received string`. */
export function describeIssues(error: z.ZodError): string {
  return error.issues
    .slice(0, 4)
    .map((i) => {
      const path = i.path.join('.');
      if (i.code === 'unrecognized_keys')
        return `unknown field${i.keys.length > 1 ? 's' : ''} ${i.keys.map((k) => `\`${printable(k)}'`).join(', ')}`;
      return `${path ? `${path}: ` : ''}${i.message.toLowerCase()}`;
    })
    .join('; ');
}
