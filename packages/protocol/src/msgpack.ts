// A small msgpack codec for the client: what the protocol carries (maps with string keys, arrays,
// strings, integers, floats, booleans, nil) and nothing else. The client decodes only what scanFrame
// has accepted, so the broker's frames meet the same strictness as the broker's own decoder; loading
// msgpackr (and zod) would cost the client more than its whole start otherwise (see PERFORMANCE.md).
import { utf8 } from './scan.js';

/** Encodes a message; properties that are `undefined` are left out, as the protocol has no undefined. */
export function encode(value: unknown): Buffer {
  const out: Buffer[] = [];
  write(value, out);
  return Buffer.concat(out);
}

function write(v: unknown, out: Buffer[]): void {
  if (v === null) out.push(Buffer.from([0xc0]));
  else if (v === true || v === false) out.push(Buffer.from([v ? 0xc3 : 0xc2]));
  else if (typeof v === 'number') out.push(number(v));
  else if (typeof v === 'string') {
    const s = Buffer.from(v, 'utf8');
    out.push(s.length < 32 ? Buffer.from([0xa0 | s.length]) : head(0xd9, 0xda, 0xdb, s.length), s);
  } else if (Array.isArray(v)) {
    out.push(v.length < 16 ? Buffer.from([0x90 | v.length]) : head(null, 0xdc, 0xdd, v.length));
    for (const x of v) write(x, out);
  } else if (typeof v === 'object') {
    const entries = Object.entries(v as Record<string, unknown>).filter(([, x]) => x !== undefined);
    out.push(entries.length < 16 ? Buffer.from([0x80 | entries.length]) : head(null, 0xde, 0xdf, entries.length));
    for (const [k, x] of entries) {
      write(k, out);
      write(x, out);
    }
  } else throw new TypeError(`msgpack: cannot encode a ${typeof v}`);
}

/** A length prefix: the 8-, 16- or 32-bit form that fits. */
function head(b8: number | null, b16: number, b32: number, n: number): Buffer {
  if (b8 !== null && n < 0x100) return Buffer.from([b8, n]);
  if (n < 0x10000) return Buffer.from([b16, n >> 8, n & 0xff]);
  const b = Buffer.alloc(5);
  b[0] = b32;
  b.writeUInt32BE(n, 1);
  return b;
}

function number(n: number): Buffer {
  if (Number.isInteger(n) && Number.isSafeInteger(n)) {
    if (n >= 0 && n < 0x80) return Buffer.from([n]);
    if (n < 0 && n >= -32) return Buffer.from([n & 0xff]);
    const b = Buffer.alloc(9);
    if (n >= 0) {
      if (n < 0x100) return Buffer.from([0xcc, n]);
      if (n < 0x10000) return Buffer.from([0xcd, n >> 8, n & 0xff]);
      if (n < 0x100000000) { b[0] = 0xce; b.writeUInt32BE(n, 1); return b.subarray(0, 5); }
      b[0] = 0xcf;
      b.writeBigUInt64BE(BigInt(n), 1);
      return b;
    }
    if (n >= -0x80) return Buffer.from([0xd0, n & 0xff]);
    if (n >= -0x8000) { b[0] = 0xd1; b.writeInt16BE(n, 1); return b.subarray(0, 3); }
    if (n >= -0x80000000) { b[0] = 0xd2; b.writeInt32BE(n, 1); return b.subarray(0, 5); }
    b[0] = 0xd3;
    b.writeBigInt64BE(BigInt(n), 1);
    return b;
  }
  const b = Buffer.alloc(9);
  b[0] = 0xcb;
  b.writeDoubleBE(n, 1);
  return b;
}

/**
 * Decodes one frame that scanFrame accepted (it has already refused extension and binary types, keys
 * that are not strings, duplicate and reserved keys, deep nesting and trailing bytes).
 */
export function decode(buf: Buffer): unknown {
  let pos = 0;
  const u = (n: 1 | 2 | 4) => {
    const v = n === 1 ? buf[pos]! : n === 2 ? buf.readUInt16BE(pos) : buf.readUInt32BE(pos);
    pos += n;
    return v;
  };
  const str = (n: number) => {
    const s = utf8(buf, pos, pos + n);
    pos += n;
    return s;
  };
  const value = (): unknown => {
    const b = buf[pos++]!;
    if (b <= 0x7f) return b;
    if (b >= 0xe0) return b - 0x100;
    if (b >= 0xa0 && b <= 0xbf) return str(b & 0x1f);
    if (b >= 0x80 && b <= 0x8f) return map(b & 0x0f);
    if (b >= 0x90 && b <= 0x9f) return array(b & 0x0f);
    switch (b) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xca: { const v = buf.readFloatBE(pos); pos += 4; return v; }
      case 0xcb: { const v = buf.readDoubleBE(pos); pos += 8; return v; }
      case 0xcc: return u(1);
      case 0xcd: return u(2);
      case 0xce: return u(4);
      case 0xcf: { const v = Number(buf.readBigUInt64BE(pos)); pos += 8; return v; }
      case 0xd0: { const v = buf.readInt8(pos); pos += 1; return v; }
      case 0xd1: { const v = buf.readInt16BE(pos); pos += 2; return v; }
      case 0xd2: { const v = buf.readInt32BE(pos); pos += 4; return v; }
      case 0xd3: { const v = Number(buf.readBigInt64BE(pos)); pos += 8; return v; }
      case 0xd9: return str(u(1));
      case 0xda: return str(u(2));
      case 0xdb: return str(u(4));
      case 0xdc: return array(u(2));
      case 0xdd: return array(u(4));
      case 0xde: return map(u(2));
      case 0xdf: return map(u(4));
      default: throw new Error(`msgpack: byte 0x${b.toString(16)} the scanner should have refused`);
    }
  };
  const array = (n: number) => {
    const a: unknown[] = [];
    for (let i = 0; i < n; i++) a.push(value());
    return a;
  };
  const map = (n: number) => {
    const o: Record<string, unknown> = {};
    for (let i = 0; i < n; i++) {
      const k = value() as string;
      o[k] = value();
    }
    return o;
  };
  return value();
}
