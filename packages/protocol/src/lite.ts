// What a client needs of the protocol, without zod or msgpackr (@tapbroker/protocol/lite): constants,
// error codes, grammar checks, the transport, and a reply decoder that is exactly as strict as the
// broker-side one (the same scanner, then the shapes generated from the zod schemas). Types come from
// messages.ts as types only, which loads nothing at run time.
import { MAX_REPLY_BYTES } from './constants.js';
import { TapbrokerError } from './errors.js';
import type { Reply, Request } from './messages.js';
import { decode, encode } from './msgpack.js';
import { REPLY_SHAPE } from './reply-shape.js';
import { scanFrame } from './scan.js';
import { checkShape } from './shape.js';

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
export { exitFlushed } from './exit.js';
export { checkShape, type Shape } from './shape.js';
export { REPLY_SHAPE } from './reply-shape.js';
export type {
  Request, Reply, Device, TapDevice, Lease, Nic, CreateTapRequest, CreateMacvtapRequest, StatusReply, CanReply,
  ErrorReply,
} from './messages.js';

/** A request as bytes (fields that are undefined are left out). */
export function encodeRequest(req: Request): Buffer {
  return encode(req);
}

/** Bytes from the broker to a checked reply; the client trusts nothing it did not check. */
export function decodeReply(buf: Buffer): Reply {
  const fail = (why: string): never => {
    throw new TapbrokerError('TB_E_BAD_REPLY', `bad reply from broker: ${why}`);
  };
  if (buf.length > MAX_REPLY_BYTES) fail(`frame of ${buf.length} bytes exceeds the ${MAX_REPLY_BYTES}-byte cap`);
  try {
    scanFrame(buf);
  } catch (err) {
    fail((err as Error).message);
  }
  const checked = checkShape(REPLY_SHAPE, decode(buf));
  return checked.ok ? (checked.value as Reply) : fail(checked.issue);
}
