// Frames are one msgpack map each. Untrusted bytes are first walked by a strict scanner (no
// extension or binary types, string keys only, no duplicate keys, bounded depth, no trailing
// bytes), then decoded by msgpackr with every structured-clone feature off, then checked by zod.
import { Packr, Unpackr } from 'msgpackr';
import { TapbrokerError, opRefusal } from './errors.js';
import { scanFrame } from './scan.js';
import {
  MAX_REPLY_BYTES, MAX_REQUEST_BYTES, OPS, Reply, Request, describeIssues,
} from './messages.js';

export { MAX_DEPTH, scanFrame } from './scan.js';

const packr = new Packr({ useRecords: false, structuredClone: false, moreTypes: false, variableMapSize: true });
const unpackr = new Unpackr({
  useRecords: false,
  structuredClone: false,
  moreTypes: false,
  mapsAsObjects: true,
  int64AsType: 'number',
});

/** Decodes untrusted bytes into a plain object, or throws a TapbrokerError with a stable code. */
export function decodeFrame(buf: Buffer, maxBytes: number): Record<string, unknown> {
  if (buf.length > maxBytes) {
    throw new TapbrokerError('TB_E_FRAME_TOO_LARGE', `frame of ${buf.length} bytes exceeds the ${maxBytes}-byte cap`);
  }
  scanFrame(buf);
  try {
    return unpackr.unpack(buf) as Record<string, unknown>;
  } catch (err) {
    throw new TapbrokerError('TB_E_MALFORMED', `malformed frame: ${(err as Error).message}`);
  }
}

export function encodeFrame(msg: Request | Reply): Buffer {
  return packr.pack(withoutUndefined(msg));
}

// msgpackr encodes `undefined` as an extension type, which the scanner (rightly) refuses.
function withoutUndefined(v: unknown): unknown {
  if (v === null || typeof v !== 'object' || Array.isArray(v)) return v;
  const out: Record<string, unknown> = {};
  for (const [k, x] of Object.entries(v)) if (x !== undefined) out[k] = withoutUndefined(x);
  return out;
}

export type Decoded<T> = { ok: true; message: T } | { ok: false; id: number | null; error: TapbrokerError };

function requestId(obj: Record<string, unknown>): number | null {
  const id = obj['id'];
  return typeof id === 'number' && Number.isInteger(id) && id >= 0 && id <= 0xffffffff ? id : null;
}

/** Bytes from a client to a validated request, or the error to reply with. */
export function decodeRequest(buf: Buffer): Decoded<Request> {
  let obj: Record<string, unknown>;
  try {
    obj = decodeFrame(buf, MAX_REQUEST_BYTES);
  } catch (err) {
    return { ok: false, id: null, error: err as TapbrokerError };
  }
  const id = requestId(obj);
  const op = obj['op'];
  const refused = opRefusal(op, OPS);
  if (refused) return { ok: false, id, error: refused };
  const parsed = Request.safeParse(obj);
  if (!parsed.success) {
    // A NIC of a `create` is named by its index, as its other refusals name it.
    const [key, nic] = parsed.error.issues[0]?.path ?? [];
    return {
      ok: false,
      id,
      error: new TapbrokerError('TB_E_INVALID_REQUEST', `invalid ${op} request: ${describeIssues(parsed.error)}`,
        key === 'nics' && typeof nic === 'number' ? { nic } : {}),
    };
  }
  return { ok: true, message: parsed.data };
}

/** Bytes from the broker to a validated reply; the client trusts nothing it did not check. */
export function decodeReply(buf: Buffer): Reply {
  let obj: Record<string, unknown>;
  try {
    obj = decodeFrame(buf, MAX_REPLY_BYTES);
  } catch (err) {
    throw new TapbrokerError('TB_E_BAD_REPLY', `bad reply from broker: ${(err as Error).message}`);
  }
  const parsed = Reply.safeParse(obj);
  if (!parsed.success) {
    throw new TapbrokerError('TB_E_BAD_REPLY', `bad reply from broker: ${describeIssues(parsed.error)}`);
  }
  return parsed.data;
}
