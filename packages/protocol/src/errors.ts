// The one list of stable error codes. Callers match on `code`; messages may change.
// docs/PROTOCOL.md documents every code, and a test fails if the two disagree.

import { printable } from './text.js';

export const ERROR_CODES = {
  TB_E_MALFORMED:
    'the frame is not a well-formed message: bad msgpack, trailing bytes, duplicate keys or nesting too deep',
  TB_E_FRAME_TOO_LARGE: 'the frame is larger than the size cap and was discarded unread',
  TB_E_UNSUPPORTED_TYPE: 'the frame holds a value type the protocol does not carry (extension, binary, non-string key)',
  TB_E_INVALID_REQUEST: 'a field is missing, unknown or of the wrong type',
  TB_E_UNKNOWN_OP: 'the op is not one the broker knows',
  TB_E_VERSION: 'the client speaks a protocol version the broker does not',
  TB_E_HELLO_REQUIRED: 'the first message on a connection must be hello',
  TB_E_UNEXPECTED_FDS: 'the request carried file descriptors; the broker accepts none and closed them',
  TB_E_INVALID_NAME:
    'an interface name is empty, longer than 15 bytes, has characters outside [A-Za-z0-9_.-] ' +
    'or does not match the rule\'s name_pattern',
  TB_E_INVALID_MAC: 'a MAC address is malformed, multicast, all-zero or outside the rule\'s prefix',
  TB_E_INVALID_QUEUES: 'the queue count is not an integer from 1 to 126',
  TB_E_NO_SUCH_BRIDGE: 'the named bridge does not exist',
  TB_E_NOT_A_BRIDGE: 'the named device exists but is not a Linux bridge',
  TB_E_BRIDGE_ADDRESS:
    'the bridge\'s MAC address was never set by an administrator, so a guest could take it over; pin it first',
  TB_E_NO_SUCH_PARENT: 'the named macvtap parent does not exist',
  TB_E_BAD_PARENT:
    'the named parent cannot carry a macvtap (a bridge, an Open vSwitch port, a macvlan/macvtap, a tun/tap, '
    + 'or loopback)',
  TB_E_MAC_IN_USE:
    'the MAC is already used by the parent or another device on it, or locked to another port of the bridge',
  TB_E_MAC_LOCK:
    'the port must be locked to the guest\'s MAC (mac_lock), which this request or kernel cannot have: a macvtap, '
    + 'an Open vSwitch or hook network, a MAC the broker is not told, or no locked bridge ports',
  TB_E_VLAN_UNAVAILABLE: 'the network needs bridge VLAN filtering, which the bridge or this kernel does not have',
  TB_E_HOOK_FAILED: 'the network\'s plug hook failed, timed out or is unsafe to run; the device was rolled back',
  TB_E_NO_SUCH_LEASE: 'no lease of the caller matches that name and the device now carrying it',
  TB_E_POLICY_DENIED: 'the policy does not allow this request; the reply names the rule and what could change',
  TB_E_QUOTA_EXCEEDED: 'the caller already holds as many live devices as the rule allows',
  TB_E_VHOST_UNAVAILABLE: 'vhost-net was asked for but this host cannot give it (/dev/vhost-net absent or driverless)',
  TB_E_DEVICE_EXISTS: 'a device with the requested name already exists',
  TB_E_DEVICE_IN_USE: 'the persistent tap is held open (a running VM): release it once nothing holds it',
  TB_E_KERNEL: 'the kernel refused an operation; the message names it and the errno; nothing was left behind',
  TB_E_STATE_UNWRITABLE:
    'the broker\'s lease table cannot be written (its state directory is full or read-only); nothing was created',
  TB_E_TIMEOUT: 'the client did not say hello in time',
  TB_E_BUSY: 'the broker is at its connection limit, or the caller must wait (its teardowns, a port removal owed)',
  TB_E_INTERNAL: 'the broker hit a bug; nothing was left behind and it keeps serving',
  TB_E_CONNECT: 'the client could not connect to the broker socket',
  TB_E_BROKER_CLOSED: 'the broker closed the connection before replying',
  TB_E_BAD_REPLY: 'the broker\'s reply did not match the protocol',
  TB_E_USAGE: 'the command line is wrong',
  TB_E_POLICY_INVALID: 'the policy file cannot be read, parsed or validated',
} as const;

export type ErrorCode = keyof typeof ERROR_CODES;

export function isErrorCode(s: string): s is ErrorCode {
  return Object.hasOwn(ERROR_CODES, s);
}

/** An error with a stable code; `rule` and `hint` accompany policy decisions. */
export class TapbrokerError extends Error {
  readonly code: ErrorCode;
  readonly rule: string | undefined;
  readonly hint: string | undefined;
  /** In a `create` request: the index of the NIC refused. */
  readonly nic: number | undefined;
  constructor(
    code: ErrorCode,
    message: string,
    extra: { rule?: string; hint?: string; nic?: number; cause?: unknown } = {},
  ) {
    // Bounded so that every error fits an error reply (messages at most 1024 characters).
    super(
      message.length > 1000 ? `${message.slice(0, 999)}…` : message,
      extra.cause === undefined ? undefined : { cause: extra.cause },
    );
    this.name = 'TapbrokerError';
    this.code = code;
    this.rule = extra.rule;
    this.hint = extra.hint;
    this.nic = extra.nic;
  }
}

/**
 * Why a request's `op` is refused, or null when it is one of `ops`: a string not among them is an unknown op; none, or
 * one of another type, an invalid request (an outside review: `{op: 5}` was told its op was missing).
 */
export function opRefusal(op: unknown, ops: readonly string[]): TapbrokerError | null {
  if (typeof op === 'string') {
    if (ops.includes(op)) return null;
    const known = ops.join(', ');
    return new TapbrokerError('TB_E_UNKNOWN_OP', `unknown op \`${printable(op.slice(0, 32))}'; known ops: ${known}`);
  }
  const type = op === null ? 'nil' : Array.isArray(op) ? 'an array' : typeof op === 'object' ? 'a map'
    : `a ${typeof op}`;
  const what = op === undefined ? 'is missing' : `must be a string, not ${type}`;
  return new TapbrokerError('TB_E_INVALID_REQUEST', `invalid request: \`op' ${what}`);
}
