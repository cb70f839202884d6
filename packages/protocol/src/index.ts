// The public surface of @tapbroker/protocol. Nothing else is importable from outside.
export { ERROR_CODES, TapbrokerError, isErrorCode, type ErrorCode } from './errors.js';
export {
  PROTOCOL_VERSION, MAX_REQUEST_BYTES, MAX_REPLY_BYTES, MAX_REPLY_FDS, MAX_NICS, OPS,
  Request, HelloRequest, CreateTapRequest, CreateMacvtapRequest, CreateRequest, Nic, ListRequest, ReleaseRequest,
  ReloadRequest, CanRequest, StatusRequest,
  Reply, HelloReply, CreateTapReply, CreateMacvtapReply, CreateReply, ListReply, ReleaseReply, ReloadReply, CanReply,
  StatusReply, RuleStanding, DenyStanding, ErrorReply,
  Device, Lease, MACVTAP_MODES, LEASE_ENDS, describeIssues, type Op, type MacvtapMode, type TapDevice,
} from './messages.js';
export { encodeFrame, decodeFrame, decodeRequest, decodeReply, scanFrame, MAX_DEPTH, type Decoded } from './codec.js';
export {
  SeqpacketConnection, SeqpacketListener, SCM_MAX_FD, refuseFds, watchReadable, type Packet, type PeerCredentials,
  type ListenOptions,
} from './transport.js';
export {
  checkIfName, checkMac, checkMacPrefix, checkNetworkName, checkQueues, macToBuffer, macFromBuffer, IFNAME_MAX_BYTES,
  MAX_QUEUES,
} from './validate.js';
export * as sys from './sys.js';
export { EX_IOERR, dropUnwritableOutput, exitFlushed, keepInspectorShut } from './exit.js';
export { EX } from './constants.js';
