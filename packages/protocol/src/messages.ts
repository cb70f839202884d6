// Every message of the protocol, as strict zod schemas: the single source of truth for the types.
// Requests and replies come in pairs named by `op`; any request may instead get an `error` reply.
import { z } from 'zod';
import { ERROR_CODES, type ErrorCode } from './errors.js';

export const PROTOCOL_VERSION = 1;

/** The largest request frame the broker reads; larger ones are refused unread. */
export const MAX_REQUEST_BYTES = 4096;
/** The largest reply frame a client reads. */
export const MAX_REPLY_BYTES = 65536;
/** The most fds one reply carries: the kernel's SCM_MAX_FD. */
export const MAX_REPLY_FDS = 253;

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

export const CreateTapRequest = z.strictObject({
  op: z.literal('create-tap'),
  id: Id,
  bridge: Text(64),
  queues: z.number().int().optional(),
  vhost: z.boolean().optional(),
  vnet_hdr: z.boolean().optional(),
  mac: Text(64).optional(),
  name: Text(64).optional(),
});

export const Request = z.discriminatedUnion('op', [HelloRequest, CreateTapRequest]);
export type Request = z.infer<typeof Request>;
export type HelloRequest = z.infer<typeof HelloRequest>;
export type CreateTapRequest = z.infer<typeof CreateTapRequest>;
export type Op = Request['op'];
export const OPS: readonly Op[] = ['hello', 'create-tap'];

// ---- replies ----

export const HelloReply = z.strictObject({
  op: z.literal('hello'),
  id: Id,
  version: z.number().int(),
  broker: Text(128),
});

export const TapDevice = z.strictObject({
  name: Text(15),
  ifindex: z.number().int().positive(),
  bridge: Text(15),
  mtu: z.number().int().positive(),
  /** The host-side MAC of the tap (first octet 0xfe, so the bridge keeps its own address). */
  host_mac: Text(17),
  /** The MAC the guest must use. */
  mac: Text(17),
  queues: z.number().int().positive(),
  vnet_hdr: z.boolean(),
  vhost: z.boolean(),
  /** The policy rule that granted the device. */
  rule: Text(128),
});
export type TapDevice = z.infer<typeof TapDevice>;

/** SCM_RIGHTS carries `fds.tap` tap fds (one per queue) followed by `fds.vhost` vhost-net fds. */
export const CreateTapReply = z.strictObject({
  op: z.literal('create-tap'),
  id: Id,
  device: TapDevice,
  fds: z.strictObject({ tap: z.number().int().positive(), vhost: z.number().int().min(0) }),
});

const codes = Object.keys(ERROR_CODES) as [ErrorCode, ...ErrorCode[]];

export const ErrorReply = z.strictObject({
  op: z.literal('error'),
  id: Id.nullable(),
  code: z.enum(codes),
  message: Text(1024),
  rule: Text(128).optional(),
  hint: Text(1024).optional(),
});

export const Reply = z.discriminatedUnion('op', [HelloReply, CreateTapReply, ErrorReply]);
export type Reply = z.infer<typeof Reply>;
export type HelloReply = z.infer<typeof HelloReply>;
export type CreateTapReply = z.infer<typeof CreateTapReply>;
export type ErrorReply = z.infer<typeof ErrorReply>;

/** Zod's issues in one line: `queues: expected number, received string`. */
export function describeIssues(error: z.ZodError): string {
  return error.issues
    .slice(0, 4)
    .map((i) => {
      const path = i.path.join('.');
      if (i.code === 'unrecognized_keys') return `unknown field${i.keys.length > 1 ? 's' : ''} ${i.keys.map((k) => `\`${k}'`).join(', ')}`;
      return `${path ? `${path}: ` : ''}${i.message.toLowerCase()}`;
    })
    .join('; ');
}
