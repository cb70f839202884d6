// What a client needs of the protocol, without zod or msgpackr (@tapbroker/protocol/lite): the shared core,
// and a reply decoder exactly as strict as the zod schema it is generated from (the strict scanner, a small
// msgpack reader, then the generated shape; the fuzz test holds it to the msgpackr + zod decoder).
import { MAX_REPLY_BYTES } from './constants.js';
import { TapbrokerError } from './errors.js';
import type { Reply, Request } from './messages.js';
import { decode, encode } from './msgpack.js';
import { REPLY_SHAPE } from './reply-shape.js';
import { scanFrame } from './scan.js';
import { checkShape } from './shape.js';

export * from './core.js';
export { REPLY_SHAPE } from './reply-shape.js';

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
