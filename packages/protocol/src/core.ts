// The protocol as both sides use it, without zod or msgpackr (@tapbroker/protocol/core): constants, error
// codes, grammar checks, the transport, the shape checker. Types come from messages.ts as types only, which
// loads nothing at run time. The client adds its reply decoder (lite.ts), the broker its request decoder
// (requests.ts).
export * from './constants.js';
export { ERROR_CODES, TapbrokerError, isErrorCode, type ErrorCode } from './errors.js';
export {
  checkIfName, checkMac, checkMacPrefix, checkNetworkName, checkQueues, macToBuffer, macFromBuffer, IFNAME_MAX_BYTES,
  MAX_QUEUES,
} from './validate.js';
export {
  SeqpacketConnection, SeqpacketListener, SCM_MAX_FD, refuseFds, watchReadable, type Packet, type PeerCredentials,
  type ListenOptions,
} from './transport.js';
export * as sys from './sys.js';
export { EX_IOERR, dropUnwritableOutput, exitFlushed, keepInspectorShut } from './exit.js';
export { checkShape, validate, type Checks, type Issue, type Shape } from './shape.js';
export { HIDDEN, PLAIN, bounded, jsonShown, printable } from './text.js';
export type {
  Request, Reply, HelloRequest, CreateRequest, ListRequest, ReleaseRequest, ReloadRequest, CanRequest, StatusRequest,
  Device, TapDevice, Lease, Nic, CreateTapRequest, CreateMacvtapRequest, StatusReply, CanReply, ErrorReply,
} from './messages.js';

