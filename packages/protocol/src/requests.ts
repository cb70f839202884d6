// What the broker reads from clients (@tapbroker/protocol/requests), without zod or msgpackr: bytes to a
// checked request through the strict scanner, a small msgpack reader and the shape generated from the zod
// schema `Request` (the fuzz test holds it to the msgpackr + zod decoder frame by frame); replies as bytes.
import { MAX_REQUEST_BYTES } from './constants.js';
import { TapbrokerError, opRefusal } from './errors.js';
import type { Reply, Request } from './messages.js';
import { decode, encode } from './msgpack.js';
import { REQUEST_SHAPE } from './request-shape.js';
import { scanFrame } from './scan.js';
import { checkShape } from './shape.js';

export { REQUEST_SHAPE } from './request-shape.js';

/** A reply as bytes (fields that are undefined are left out). */
export function encodeReply(reply: Reply): Buffer {
  return encode(reply);
}

export type Decoded<T> = { ok: true; message: T } | { ok: false; id: number | null; error: TapbrokerError };

const OPS = REQUEST_SHAPE.t === 'union' ? Object.keys(REQUEST_SHAPE.options) : [];

/** Bytes from a client to a checked request, or the error to reply with (and the request's id, if readable). */
export function decodeRequest(buf: Buffer): Decoded<Request> {
  const refuse = (id: number | null, error: TapbrokerError) => ({ ok: false as const, id, error });
  if (buf.length > MAX_REQUEST_BYTES) {
    return refuse(null, new TapbrokerError(
      'TB_E_FRAME_TOO_LARGE', `frame of ${buf.length} bytes exceeds the ${MAX_REQUEST_BYTES}-byte cap`,
    ));
  }
  let obj: Record<string, unknown>;
  try {
    scanFrame(buf);
    obj = decode(buf) as Record<string, unknown>;
  } catch (err) {
    const e = err instanceof TapbrokerError ? err : new TapbrokerError('TB_E_MALFORMED', `malformed frame: ${err}`);
    return refuse(null, e);
  }
  const id = typeof obj['id'] === 'number' && Number.isInteger(obj['id']) && obj['id'] >= 0 && obj['id'] <= 0xffffffff
    ? obj['id'] : null;
  const op = obj['op'];
  const refused = opRefusal(op, OPS);
  if (refused) return refuse(id, refused);
  const checked = checkShape(REQUEST_SHAPE, obj);
  if (!checked.ok) {
    // A NIC of a `create` is named by its index, as its other refusals name it.
    const [key, nic] = checked.path;
    return refuse(id, new TapbrokerError('TB_E_INVALID_REQUEST', `invalid ${op} request: ${checked.issue}`,
      key === 'nics' && typeof nic === 'number' ? { nic } : {}));
  }
  return { ok: true, message: checked.value as Request };
}
