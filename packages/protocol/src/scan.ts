// The strict scanner every frame passes before anything decodes it: no extension or binary types, string
// keys only, no duplicate or reserved keys, bounded depth, no trailing bytes. No dependency, so the
// client's lighter decoder (msgpack.ts) shares it with the broker's.
import { TapbrokerError } from './errors.js';
import { printable } from './text.js';

/**
 * Deepest nesting a frame may have: the top-level map counts 1, every value (a scalar too) one more than what holds
 * it. The deepest message reaches 4: a create's NIC fields (scalars, in a map, in the array `nics`, in the request).
 */
export const MAX_DEPTH = 4;
const FORBIDDEN_KEYS = new Set(['__proto__', 'constructor', 'prototype']);
/** Bytes that follow each fixed-size scalar type byte (floats and integers); 0 for every other byte. */
const FIXED_SIZE = new Uint8Array(256);
for (const [b, n] of [[0xca, 4], [0xcb, 8], [0xcc, 1], [0xcd, 2], [0xce, 4], [0xcf, 8], [0xd0, 1], [0xd1, 2],
  [0xd2, 4], [0xd3, 8]] as const) FIXED_SIZE[b] = n;

/**
 * The UTF-8 text of `buf` from `start` to `end`, both within it: what buf.toString('utf8', start, end) gives,
 * without its argument handling (a sixth of the cost in a client that lives milliseconds, before any code is
 * compiled). A string of bytes that is not UTF-8 gets U+FFFD, as toString does.
 */
export function utf8(buf: Buffer, start: number, end: number): string {
  return (buf as Buffer & { utf8Slice(start: number, end: number): string }).utf8Slice(start, end);
}

/** Walks msgpack bytes without building values; throws on anything the protocol does not carry. */
export function scanFrame(buf: Buffer): void {
  let pos = 0;
  const malformed = (why: string): never => {
    throw new TapbrokerError('TB_E_MALFORMED', `malformed frame at byte ${pos}: ${why}`);
  };
  const need = (n: number) => {
    if (pos + n > buf.length) malformed('truncated');
  };
  const uint = (n: 1 | 2 | 4): number => {
    need(n);
    const v = n === 1 ? buf[pos]! : n === 2 ? buf.readUInt16BE(pos) : buf.readUInt32BE(pos);
    pos += n;
    return v;
  };
  // Returns the string when `wantKey`, so map keys can be checked for duplicates.
  const value = (depth: number, wantKey: boolean): string | undefined => {
    if (depth > MAX_DEPTH) malformed(`nesting deeper than ${MAX_DEPTH}`);
    need(1);
    const b = buf[pos++]!;
    let strLen = -1;
    if (b >= 0xa0 && b <= 0xbf) strLen = b & 0x1f;
    else if (b === 0xd9) strLen = uint(1);
    else if (b === 0xda) strLen = uint(2);
    else if (b === 0xdb) strLen = uint(4);
    if (strLen >= 0) {
      need(strLen);
      const s = wantKey ? utf8(buf, pos, pos + strLen) : undefined;
      pos += strLen;
      return s;
    }
    if (wantKey) {
      pos--;
      throw new TapbrokerError('TB_E_UNSUPPORTED_TYPE', `map key at byte ${pos} is not a string`);
    }
    if (b <= 0x7f || b >= 0xe0 || b === 0xc0 || b === 0xc2 || b === 0xc3) return;
    const fixed = FIXED_SIZE[b]!;
    if (fixed > 0) {
      need(fixed);
      pos += fixed;
      return;
    }
    let count = -1;
    let isMap = false;
    if (b >= 0x80 && b <= 0x8f) { count = b & 0x0f; isMap = true; }
    else if (b >= 0x90 && b <= 0x9f) count = b & 0x0f;
    else if (b === 0xdc) count = uint(2);
    else if (b === 0xdd) count = uint(4);
    else if (b === 0xde) { count = uint(2); isMap = true; }
    else if (b === 0xdf) { count = uint(4); isMap = true; }
    if (count < 0) {
      pos--;
      if (b === 0xc1) malformed('reserved byte 0xc1');
      throw new TapbrokerError(
        'TB_E_UNSUPPORTED_TYPE',
        `byte ${pos}: msgpack type 0x${b.toString(16)} (extension or binary) is not carried by the protocol`,
      );
    }
    // Every element takes at least one byte: a count beyond the rest of the frame is a lie.
    if (count * (isMap ? 2 : 1) > buf.length - pos) malformed('truncated');
    if (!isMap) {
      for (let i = 0; i < count; i++) value(depth + 1, false);
      return;
    }
    const keys = new Set<string>();
    for (let i = 0; i < count; i++) {
      const at = pos;
      const key = value(depth + 1, true)!;
      if (keys.has(key)) { pos = at; malformed(`duplicate key \`${printable(key)}'`); }
      if (FORBIDDEN_KEYS.has(key)) { pos = at; malformed(`reserved key \`${printable(key)}'`); }
      keys.add(key);
      value(depth + 1, false);
    }
  };
  if (buf.length === 0) malformed('empty');
  const first = buf[0]!;
  if (!((first >= 0x80 && first <= 0x8f) || first === 0xde || first === 0xdf)) malformed('a frame must be a map');
  value(1, false);
  if (pos !== buf.length) malformed(`${buf.length - pos} trailing bytes`);
}
