// Property-based fuzzing with fast-check: first the decoders in-process (arbitrary bytes, msgpack of
// arbitrary values, valid requests mutated, msgpack token soup, non-canonical encodings, replies), then the
// whole request path of a real broker in a fresh namespace, as root and as uid 65534 (so grants happen).
// Seeds are printed; a failure prints fast-check's seed and path, and for the broker path the frame in hex.
import anyTest, { type ExecutionContext, type TestFn } from 'ava';
import fc from 'fast-check';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { performance } from 'node:perf_hooks';
import { isDeepStrictEqual } from 'node:util';
import { pack } from 'msgpackr';
import {
  MAX_REPLY_BYTES, MAX_REQUEST_BYTES, PROTOCOL_VERSION, Reply, Request, SeqpacketConnection,
  TapbrokerError, decodeFrame, decodeReply, decodeRequest, encodeFrame, isErrorCode, type Lease,
} from '@tapbroker/protocol';
import { decodeRequest as decodeBrokerRequest } from '@tapbroker/protocol/requests';
import { decodeReply as decodeLiteReply, encodeRequest as encodeLiteRequest } from '../helpers/lite.js';
import { BrokerProcess } from '../helpers/broker.js';
import { Netns } from '../helpers/netns.js';
import { Peer, type RunResult } from '../helpers/seqpeer.js';
import { NOBODY } from '../helpers/unpriv.js';
import { poll, within } from '../helpers/wait.js';

const test = anyTest as TestFn;
const SEED = Number(process.env['TB_FUZZ_SEED'] ?? (Date.now() % 2 ** 31));
const fileStarted = performance.now();

// ---------------------------------------------------------------- checks shared by every decoder property

const stats = { frames: 0, replyFrames: 0, brokerCompared: 0, slowestMs: 0, slowestLen: 0, ok: 0, codes: new Map<string, number>() };
const PROTO_NAMES = Object.getOwnPropertyNames(Object.prototype).sort();
const SLOW_MS = 100;

/** fast-check builds records with a null prototype; compare values, not prototypes. */
const same = (a: unknown, b: unknown) => isDeepStrictEqual(structuredClone(a), structuredClone(b));

function noPollution(): void {
  if (({} as Record<string, unknown>)['polluted'] !== undefined) throw new Error('Object.prototype.polluted is set');
  const names = Object.getOwnPropertyNames(Object.prototype).sort();
  if (!isDeepStrictEqual(names, PROTO_NAMES)) throw new Error(`Object.prototype changed: ${names.join(',')}`);
}

/**
 * Runs a decode and keeps its time. A frame over SLOW_MS is decoded twice more and judged by its fastest
 * run: a pathological frame is slow every time, a garbage collection or a busy machine is not.
 */
function timed<T>(buf: Buffer, f: () => T): T {
  let t0 = performance.now();
  const r = f();
  let ms = performance.now() - t0;
  for (let again = 0; again < 2 && ms > SLOW_MS; again++) {
    t0 = performance.now();
    f();
    ms = Math.min(ms, performance.now() - t0);
  }
  if (ms > stats.slowestMs) {
    stats.slowestMs = ms;
    stats.slowestLen = buf.length;
  }
  if (ms > SLOW_MS) throw new Error(`decoding ${buf.length} bytes took ${ms.toFixed(1)} ms: ${buf.toString('hex').slice(0, 200)}`);
  return r;
}

/** decodeRequest never throws; ok → re-validates; not ok → a stable code and a sane id; no pollution; fast. */
function checkRequest(buf: Buffer): ReturnType<typeof decodeRequest> {
  stats.frames++;
  let d: ReturnType<typeof decodeRequest>;
  try {
    d = timed(buf, () => decodeRequest(buf));
  } catch (err) {
    throw new Error(`decodeRequest threw ${(err as Error).stack}`);
  }
  if (d.ok) {
    stats.ok++;
    const again = Request.safeParse(d.message);
    if (!again.success) throw new Error(`accepted a message that does not re-validate: ${JSON.stringify(d.message)}`);
    if (!isDeepStrictEqual(again.data, d.message)) throw new Error('re-validation changed the message');
  } else {
    if (!(d.error instanceof TapbrokerError) || !isErrorCode(d.error.code)) throw new Error(`not a stable code: ${String(d.error)}`);
    if (d.id !== null && !(Number.isInteger(d.id) && d.id >= 0 && d.id <= 0xffffffff)) throw new Error(`bad id ${d.id}`);
    if (typeof d.error.message !== 'string' || d.error.message.length === 0) throw new Error('empty message');
    stats.codes.set(d.error.code, (stats.codes.get(d.error.code) ?? 0) + 1);
  }
  differential(buf);
  // The decoder the broker runs (protocol/requests: no msgpackr, no zod) must accept exactly what the
  // msgpackr + zod one accepts, read it the same, and refuse the rest with the same code and id.
  const b = timed(buf, () => decodeBrokerRequest(buf));
  if (b.ok !== d.ok) {
    throw new Error(`the broker's decoder ${b.ok ? 'accepts' : `refuses (${b.error.code} ${b.error.message})`} a frame `
      + `the schema ${d.ok ? 'accepts' : `refuses (${d.error.code})`}: ${buf.toString('hex').slice(0, 400)}`);
  }
  if (b.ok && d.ok && !isDeepStrictEqual(b.message, d.message)) {
    throw new Error(`the broker's decoder reads ${JSON.stringify(b.message)} where the schema reads ${JSON.stringify(d.message)}`);
  }
  if (!b.ok && !d.ok && (b.error.code !== d.error.code || b.id !== d.id)) {
    throw new Error(`the broker's decoder refuses with ${b.error.code} (id ${b.id}), the schema with ${d.error.code} (id ${d.id}): ${buf.toString('hex').slice(0, 400)}`);
  }
  stats.brokerCompared++;
  noPollution();
  return d;
}

/** decodeReply returns a valid Reply or throws TB_E_BAD_REPLY (its contract), nothing else. */
function checkReply(buf: Buffer): void {
  stats.replyFrames++;
  // The client's own decoder (no msgpackr, no zod: protocol/lite) must accept exactly what the
  // broker-side one accepts, and read it the same.
  let lite: Reply | TapbrokerError;
  try {
    lite = decodeLiteReply(buf);
  } catch (err) {
    if (!(err instanceof TapbrokerError) || err.code !== 'TB_E_BAD_REPLY') throw new Error(`the client's decodeReply threw something else: ${(err as Error).stack}`);
    lite = err;
  }
  let r: Reply;
  try {
    r = timed(buf, () => decodeReply(buf));
  } catch (err) {
    if (!(err instanceof TapbrokerError) || err.code !== 'TB_E_BAD_REPLY') throw new Error(`decodeReply threw something else: ${(err as Error).stack}`);
    if (!(lite instanceof TapbrokerError)) throw new Error(`the client accepts a reply the schema refuses: ${JSON.stringify(lite)}`);
    noPollution();
    return;
  }
  if (lite instanceof TapbrokerError) throw new Error(`the client refuses a valid reply (${lite.message}): ${JSON.stringify(r)}`);
  if (!isDeepStrictEqual(lite, r)) throw new Error(`the client reads ${JSON.stringify(lite)} where the schema reads ${JSON.stringify(r)}`);
  const again = Reply.safeParse(r);
  if (!again.success || !isDeepStrictEqual(again.data, r)) throw new Error(`accepted a reply that does not re-validate: ${JSON.stringify(r)}`);
  noPollution();
}

// ---------------------------------------------------------------- an independent reference decoder

/**
 * What the bytes say, read by a second, independent decoder (Buffer's UTF-8, BigInt for 64-bit). Every
 * frame the strict scanner lets through must decode to exactly this in msgpackr: otherwise the scanner
 * checked something else than what the broker acts on (a duplicate key it did not see, say).
 */
function refDecode(buf: Buffer): unknown {
  let pos = 0;
  const str = (n: number) => {
    const s = buf.toString('utf8', pos, pos + n);
    pos += n;
    return s;
  };
  const arr = (n: number) => Array.from({ length: n }, () => read());
  const map = (n: number) => {
    const o: Record<string, unknown> = {};
    for (let i = 0; i < n; i++) {
      const k = read() as string;
      Object.defineProperty(o, k, { value: read(), enumerable: true, writable: true, configurable: true });
    }
    return o;
  };
  const u = (n: 1 | 2 | 4) => {
    const v = n === 1 ? buf[pos]! : n === 2 ? buf.readUInt16BE(pos) : buf.readUInt32BE(pos);
    pos += n;
    return v;
  };
  const read = (): unknown => {
    const b = buf[pos++]!;
    if (b <= 0x7f) return b;
    if (b >= 0xe0) return b - 256;
    if (b <= 0x8f) return map(b & 0x0f);
    if (b <= 0x9f) return arr(b & 0x0f);
    if (b <= 0xbf) return str(b & 0x1f);
    let v: unknown;
    switch (b) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xca: v = buf.readFloatBE(pos); pos += 4; return v;
      case 0xcb: v = buf.readDoubleBE(pos); pos += 8; return v;
      case 0xcc: return u(1);
      case 0xcd: return u(2);
      case 0xce: return u(4);
      case 0xcf: v = Number(buf.readBigUInt64BE(pos)); pos += 8; return v;
      case 0xd0: v = buf.readInt8(pos); pos += 1; return v;
      case 0xd1: v = buf.readInt16BE(pos); pos += 2; return v;
      case 0xd2: v = buf.readInt32BE(pos); pos += 4; return v;
      case 0xd3: v = Number(buf.readBigInt64BE(pos)); pos += 8; return v;
      case 0xd9: return str(u(1));
      case 0xda: return str(u(2));
      case 0xdb: return str(u(4));
      case 0xdc: return arr(u(2));
      case 0xdd: return arr(u(4));
      case 0xde: return map(u(2));
      case 0xdf: return map(u(4));
      default: throw new Error(`reference decoder: type 0x${b.toString(16)}`);
    }
  };
  return read();
}

let differentialCompared = 0;
function differential(buf: Buffer): void {
  let mine: unknown;
  try {
    mine = decodeFrame(buf, MAX_REQUEST_BYTES);
  } catch {
    return; // refused: nothing reaches msgpackr's result
  }
  differentialCompared++;
  const ref = refDecode(buf);
  if (!isDeepStrictEqual(mine, ref)) {
    throw new Error(`the scanner passed a frame msgpackr reads differently: ${buf.toString('hex').slice(0, 400)}\nmsgpackr: ${JSON.stringify(mine)}\nreference: ${JSON.stringify(ref)}`);
  }
}

// ---------------------------------------------------------------- arbitraries

const KEYS = ['op', 'id', 'version', 'client', 'bridge', 'parent', 'mode', 'queues', 'vhost', 'vnet_hdr', 'mac', 'name', 'persistent', 'group', 'kind', 'uid', '__proto__', 'constructor', 'prototype', 'polluted', 'toString'];
const VALUES = ['hello', 'create-tap', 'create-macvtap', 'list', 'release', 'reload', 'can', 'br0', 'vparent', 'lo', 'tap', 'macvtap', 'bridge', 'passthru', `tb${NOBODY}-fz`, '52:54:00:12:34:56', '__proto__'];

const id = fc.oneof(fc.constantFrom(0, 1, 0xffffffff), fc.integer({ min: 0, max: 0xffffffff }));
const text = (max: number) => fc.oneof(fc.string({ maxLength: max }), fc.constantFrom(...VALUES.filter((v) => v.length <= max)), fc.string({ maxLength: Math.min(max, 16), unit: 'binary' }));
const ifname = fc.oneof(fc.constantFrom('br0', 'vparent', 'lo', 'br1', `tb${NOBODY}-a`, '..', 'a/b', `tb${NOBODY}-%d`), fc.stringMatching(/^[a-z0-9._-]{1,17}$/), text(64));
const macText = fc.oneof(
  fc.array(fc.integer({ min: 0, max: 255 }), { minLength: 6, maxLength: 6 }).map((o) => o.map((x) => x.toString(16).padStart(2, '0')).join(':')),
  fc.array(fc.integer({ min: 0, max: 255 }), { minLength: 3, maxLength: 3 }).map((o) => `52:54:00:${o.map((x) => x.toString(16).padStart(2, '0')).join(':')}`),
  text(64),
);
const smallInt = fc.oneof(fc.integer({ min: -3, max: 130 }), fc.integer());

/** Values for fields by name, where a plain string or number would rarely say anything interesting. */
const HINTS: Record<string, fc.Arbitrary<unknown>> = {
  id, name: ifname, bridge: ifname, parent: ifname, network: ifname, mac: macText, host_mac: macText, client: text(128),
  version: fc.oneof(fc.constant(PROTOCOL_VERSION), fc.integer()), queues: smallInt,
};

interface ZodLike { _zod: { def: Record<string, any> } }
const checksOf = (s: ZodLike) => ((s._zod.def['checks'] ?? []) as ZodLike[]).map((c) => c._zod.def);

/**
 * An arbitrary for a zod schema, from its own definition (objects, unions, literals, enums, strings and
 * numbers with their bounds, nullable/optional/default), so the fuzzing follows the schema as it changes.
 * Results are filtered through the schema itself, so only valid values come out.
 */
function fromZod(schema: ZodLike, key = ''): fc.Arbitrary<unknown> {
  const def = schema._zod.def;
  switch (def['type']) {
    case 'object': {
      const shape = def['shape'] as Record<string, ZodLike>;
      const model: Record<string, fc.Arbitrary<unknown>> = {};
      const required: string[] = [];
      for (const [k, v] of Object.entries(shape)) {
        const t = v._zod.def['type'];
        model[k] = fromZod(t === 'optional' || t === 'default' ? v._zod.def['innerType'] : v, k);
        if (t !== 'optional' && t !== 'default') required.push(k);
      }
      return fc.record(model, { requiredKeys: required });
    }
    case 'union': return fc.oneof(...(def['options'] as ZodLike[]).map((o) => fromZod(o, key)));
    case 'optional': case 'default': return fromZod(def['innerType'], key);
    case 'nullable': return fc.option(fromZod(def['innerType'], key));
    case 'literal': return fc.constantFrom(...(def['values'] as unknown[]));
    case 'enum': return fc.constantFrom(...Object.values(def['entries'] as Record<string, unknown>));
    case 'boolean': return fc.boolean();
    case 'array': {
      const max = checksOf(schema).find((c) => c['check'] === 'max_length')?.['maximum'] ?? 4;
      const min = checksOf(schema).find((c) => c['check'] === 'min_length')?.['minimum'] ?? 0;
      // A length, then a tuple of that many: fc.array of records is ~300× slower to generate (a create
      // request's NICs took 8 ms each), which starved every test of this file.
      const element = fromZod(def['element'], key);
      return fc.integer({ min, max: Math.max(min, Math.min(4, max)) })
        .chain((n) => fc.tuple(...Array.from({ length: n }, () => element)));
    }
    case 'string': {
      const max = checksOf(schema).find((c) => c['check'] === 'max_length')?.['maximum'] ?? 64;
      return HINTS[key] ? fc.oneof(HINTS[key]!, text(max)) : text(max);
    }
    case 'number': {
      const cs = checksOf(schema);
      const int = cs.some((c) => c['check'] === 'number_format' && /int/.test(c['format']));
      const lo = cs.find((c) => c['check'] === 'greater_than')?.['value'] ?? -Number.MAX_SAFE_INTEGER;
      const hi = cs.find((c) => c['check'] === 'less_than')?.['value'] ?? Number.MAX_SAFE_INTEGER;
      const min = cs.find((c) => c['check'] === 'greater_than' && !c['inclusive']) ? lo + 1 : lo;
      const max = cs.find((c) => c['check'] === 'less_than' && !c['inclusive']) ? hi - 1 : hi;
      const base = int ? fc.oneof(fc.constantFrom(min, max, Math.max(min, Math.min(max, 1))), fc.integer({ min: Math.max(min, -(2 ** 31)), max: Math.min(max, 2 ** 31) }), fc.maxSafeInteger().filter((n) => n >= min && n <= max)) : fc.double({ noNaN: true, noDefaultInfinity: true, min, max });
      return HINTS[key] ? fc.oneof(HINTS[key]!, base) : base;
    }
    default: throw new Error(`fromZod: no arbitrary for zod type ${String(def['type'])}`);
  }
}

/** Requests that satisfy the real schema, generated from it. */
const validRequest = fromZod(Request as unknown as ZodLike).filter((r) => Request.safeParse(r).success) as fc.Arbitrary<Request>;
/** Replies that satisfy the real schema, generated from it. */
const validReply = fromZod(Reply as unknown as ZodLike).filter((r) => Reply.safeParse(r).success) as fc.Arbitrary<Reply>;

type Mutation =
  | { k: 'flip'; at: number; bit: number }
  | { k: 'set'; at: number; byte: number }
  | { k: 'insert'; at: number; bytes: Uint8Array }
  | { k: 'delete'; at: number; n: number }
  | { k: 'truncate'; at: number }
  | { k: 'copy'; from: number; n: number; at: number };
const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ k: fc.constant('flip' as const), at: fc.nat(), bit: fc.integer({ min: 0, max: 7 }) }),
  fc.record({ k: fc.constant('set' as const), at: fc.nat(), byte: fc.constantFrom(0x00, 0x7f, 0x80, 0x8f, 0x90, 0xa0, 0xbf, 0xc0, 0xc1, 0xc4, 0xc7, 0xca, 0xcb, 0xcf, 0xd3, 0xd4, 0xd9, 0xdb, 0xdd, 0xde, 0xdf, 0xff) }),
  fc.record({ k: fc.constant('insert' as const), at: fc.nat(), bytes: fc.uint8Array({ minLength: 1, maxLength: 8 }) }),
  fc.record({ k: fc.constant('delete' as const), at: fc.nat(), n: fc.integer({ min: 1, max: 8 }) }),
  fc.record({ k: fc.constant('truncate' as const), at: fc.nat() }),
  fc.record({ k: fc.constant('copy' as const), from: fc.nat(), n: fc.integer({ min: 1, max: 24 }), at: fc.nat() }),
);

function mutate(frame: Buffer, ms: Mutation[]): Buffer {
  let b = Buffer.from(frame);
  for (const m of ms) {
    const len = b.length;
    if (len === 0) break;
    const at = m.at % (len + 1);
    switch (m.k) {
      case 'flip': if (at < len) b[at] = b[at]! ^ (1 << m.bit); break;
      case 'set': if (at < len) b[at] = m.byte; break;
      case 'insert': b = Buffer.concat([b.subarray(0, at), m.bytes, b.subarray(at)]); break;
      case 'delete': b = Buffer.concat([b.subarray(0, at), b.subarray(at + m.n)]); break;
      case 'truncate': b = b.subarray(0, at); break;
      case 'copy': {
        const from = m.from % len;
        b = Buffer.concat([b.subarray(0, at), b.subarray(from, from + m.n), b.subarray(at)]);
        break;
      }
    }
  }
  return b;
}

const u8 = (...n: number[]) => Buffer.from(n);
const be = (n: number, bytes: 2 | 4) => {
  const b = Buffer.alloc(bytes);
  if (bytes === 2) b.writeUInt16BE(n & 0xffff);
  else b.writeUInt32BE(n >>> 0);
  return b;
};
function strHead(n: number, form: 0 | 1 | 2 | 3): Buffer {
  if (form === 0 && n < 32) return u8(0xa0 | n);
  if (form <= 1 && n < 256) return u8(0xd9, n);
  if (form <= 2 && n < 65536) return Buffer.concat([u8(0xda), be(n, 2)]);
  return Buffer.concat([u8(0xdb), be(n, 4)]);
}
const mstr = (s: string | Uint8Array, form: 0 | 1 | 2 | 3 = 0) => {
  const b = typeof s === 'string' ? Buffer.from(s) : Buffer.from(s);
  return Buffer.concat([strHead(b.length, form), b]);
};

/** msgpack tokens, well-formed or not, mostly from the protocol's vocabulary. */
const token: fc.Arbitrary<Buffer> = fc.oneof(
  { weight: 6, arbitrary: fc.tuple(fc.constantFrom(...KEYS, ...VALUES), fc.constantFrom(0, 0, 0, 1, 2, 3) as fc.Arbitrary<0 | 1 | 2 | 3>).map(([s, f]) => mstr(s, f)) },
  { weight: 2, arbitrary: fc.uint8Array({ maxLength: 20 }).map((b) => mstr(b)) },
  { weight: 1, arbitrary: fc.tuple(fc.constantFrom(0xd9, 0xda, 0xdb), fc.nat(64), fc.uint8Array({ maxLength: 40 })).map(([h, n, b]) => Buffer.concat([u8(h), h === 0xd9 ? u8(n) : be(n, h === 0xda ? 2 : 4), b])) },
  { weight: 3, arbitrary: fc.integer({ min: 0, max: 15 }).map((n) => u8(0x80 | n)) },
  { weight: 2, arbitrary: fc.integer({ min: 0, max: 15 }).map((n) => u8(0x90 | n)) },
  { weight: 1, arbitrary: fc.tuple(fc.constantFrom(0xdc, 0xdd, 0xde, 0xdf), fc.oneof(fc.nat(20), fc.nat(0xffffffff))).map(([h, n]) => Buffer.concat([u8(h), h === 0xdc || h === 0xde ? be(n, 2) : be(n, 4)])) },
  { weight: 3, arbitrary: fc.oneof(fc.integer({ min: -40, max: 300 }), fc.integer(), fc.constantFrom(0xffffffff, 2 ** 32, 2 ** 53, -(2 ** 53), 1.5, -0, NaN, Infinity)).map((n) => pack(n)) },
  { weight: 1, arbitrary: fc.tuple(fc.constantFrom(0xcf, 0xd3), fc.bigInt({ min: 0n, max: 2n ** 64n - 1n })).map(([h, n]) => { const b = Buffer.alloc(9); b[0] = h; b.writeBigUInt64BE(n, 1); return b; }) },
  { weight: 1, arbitrary: fc.tuple(fc.constantFrom(0xca, 0xcb), fc.uint8Array({ minLength: 8, maxLength: 8 })).map(([h, b]) => Buffer.concat([u8(h), Buffer.from(b).subarray(0, h === 0xca ? 4 : 8)])) },
  { weight: 1, arbitrary: fc.constantFrom(0xc0, 0xc2, 0xc3, 0xc1).map((b) => u8(b)) },
  { weight: 1, arbitrary: fc.tuple(fc.constantFrom(0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8), fc.uint8Array({ maxLength: 20 })).map(([h, b]) => Buffer.concat([u8(h), b])) },
  { weight: 1, arbitrary: fc.integer({ min: 0, max: 255 }).map((b) => u8(b)) },
);
const soup: fc.Arbitrary<Buffer> = fc.tuple(fc.integer({ min: 0, max: 12 }), fc.array(token, { maxLength: 40 })).map(([n, ts]) => Buffer.concat([u8(0x80 | n), ...ts]));

/** A value encoded with a randomly chosen (often non-canonical) msgpack form at every node. */
function encodeOdd(v: unknown, pick: () => number): Buffer {
  if (v === null) return u8(0xc0);
  if (typeof v === 'boolean') return u8(v ? 0xc3 : 0xc2);
  if (typeof v === 'string') return mstr(v, Math.min(3, pick() % 4) as 0 | 1 | 2 | 3);
  if (typeof v === 'number') {
    const c = pick() % 5;
    if (!Number.isInteger(v) || c === 0) { const b = Buffer.alloc(9); b[0] = 0xcb; b.writeDoubleBE(v, 1); return b; }
    if (c === 1 && v >= 0 && v <= 0xffffffff) return Buffer.concat([u8(0xce), be(v, 4)]);
    if (c === 2) { const b = Buffer.alloc(9); b[0] = v >= 0 ? 0xcf : 0xd3; if (v >= 0) b.writeBigUInt64BE(BigInt(v), 1); else b.writeBigInt64BE(BigInt(v), 1); return b; }
    if (c === 3 && v >= -(2 ** 31) && v < 2 ** 31) { const b = Buffer.alloc(5); b[0] = 0xd2; b.writeInt32BE(v, 1); return b; }
    return pack(v);
  }
  if (Array.isArray(v)) return Buffer.concat([Buffer.concat([u8(0xdc), be(v.length, 2)]), ...v.map((x) => encodeOdd(x, pick))]);
  const entries = Object.entries(v as Record<string, unknown>);
  const head = pick() % 3 === 0 ? Buffer.concat([u8(0xde), be(entries.length, 2)]) : pick() % 3 === 1 ? Buffer.concat([u8(0xdf), be(entries.length, 4)]) : u8(0x80 | entries.length);
  return Buffer.concat([head, ...entries.flatMap(([k, x]) => [mstr(k, Math.min(3, pick() % 4) as 0 | 1 | 2 | 3), encodeOdd(x, pick)])]);
}

// ---------------------------------------------------------------- decoder properties

const run = <T>(t: ExecutionContext, name: string, arb: fc.Arbitrary<T>, numRuns: number, pred: (x: T) => void, opts: { shrink?: boolean } = {}) => {
  const started = performance.now();
  const before = stats.frames + stats.replyFrames;
  // fc.assert throws with the counterexample (and the seed) when a case fails.
  fc.assert(fc.property(arb, (x) => { pred(x); }), { numRuns, seed: SEED, endOnFailure: opts.shrink === false });
  const frames = stats.frames + stats.replyFrames - before;
  t.log(`${name}: ${frames} frames in ${((performance.now() - started) / 1000).toFixed(1)} s (seed ${SEED})`);
  t.true(frames >= numRuns * 0.9, `${name}: ${frames} frames decoded for ${numRuns} cases`);
};

test.serial('decodeRequest: arbitrary bytes up to 5000', (t) => {
  const bytes = fc.oneof(fc.uint8Array({ maxLength: 5000 }), fc.uint8Array({ maxLength: 64 }), fc.tuple(fc.constantFrom(0x80, 0x81, 0x83, 0x87, 0x8f, 0xde, 0xdf), fc.uint8Array({ maxLength: 300 })).map(([h, b]) => Uint8Array.from([h, ...b])));
  run(t, 'arbitrary bytes', bytes, 25_000, (b) => void checkRequest(Buffer.from(b.buffer, b.byteOffset, b.byteLength)));
});

test.serial('decodeRequest: msgpack of arbitrary values', (t) => {
  const key = fc.oneof(fc.string({ maxLength: 12 }), fc.constantFrom(...KEYS));
  const value = fc.anything({
    maxDepth: 5, maxKeys: 8, key, withDate: true, withMap: true, withSet: true, withTypedArray: true, withNullPrototype: true, withSparseArray: true, withBoxedValues: true,
    values: [fc.constantFrom(...VALUES), fc.integer(), fc.double(), fc.boolean(), fc.constant(null), fc.constant(undefined), fc.string({ maxLength: 20 }), fc.string({ unit: 'binary', maxLength: 10 }), fc.bigInt({ min: -(2n ** 63n), max: 2n ** 64n - 1n })],
  });
  const top = fc.oneof(value, fc.dictionary(key, value, { maxKeys: 10 }), fc.tuple(fc.constantFrom(...VALUES.slice(0, 7)), fc.dictionary(key, value, { maxKeys: 6 })).map(([op, o]) => ({ op, id: 1, ...o })));
  let unpackable = 0;
  run(t, 'msgpack of arbitrary values', top, 25_000, (v) => {
    let frame: Buffer;
    try {
      frame = pack(v);
    } catch {
      unpackable++;
      return;
    }
    checkRequest(frame);
  });
  t.log(`${unpackable} values msgpackr could not pack`);
});

test.serial('decodeRequest: valid requests round-trip, and mutated ones are refused cleanly', (t) => {
  run(t, 'mutated valid requests', fc.tuple(validRequest, fc.array(mutation, { minLength: 1, maxLength: 4 })), 20_000, ([req, ms]) => {
    const frame = encodeFrame(req);
    const d = checkRequest(frame);
    if (!d.ok || !same(d.message, Request.parse(req))) throw new Error(`a valid request did not round-trip: ${JSON.stringify(req)} → ${d.ok ? JSON.stringify(d.message) : d.error.code}`);
    // The client's own encoder (protocol/lite, no msgpackr) must say the same to the broker.
    const lite = checkRequest(encodeLiteRequest(req));
    if (!lite.ok || !same(lite.message, d.message)) throw new Error(`the client's encoding of ${JSON.stringify(req)} reads differently`);
    checkRequest(mutate(frame, ms));
  });
});

test.serial('decodeRequest: non-canonical encodings of valid requests decode to the same request', (t) => {
  run(t, 'non-canonical encodings', fc.tuple(validRequest, fc.array(fc.nat(), { minLength: 64, maxLength: 64 })), 8_000, ([req, choices]) => {
    let i = 0;
    const frame = encodeOdd(req, () => choices[i++ % choices.length]!);
    const d = checkRequest(frame);
    if (frame.length <= MAX_REQUEST_BYTES && (!d.ok || !same(d.message, Request.parse(req)))) {
      throw new Error(`a re-encoded valid request was read differently: ${JSON.stringify(req)} (${frame.toString('hex')}) → ${d.ok ? JSON.stringify(d.message) : `${d.error.code} ${d.error.message}`}`);
    }
  });
});

test.serial('decodeRequest: msgpack token soup', (t) => {
  run(t, 'token soup', soup, 22_000, (f) => void checkRequest(f));
});

test.serial('decodeReply: replies the broker can send, mutated, and garbage', (t) => {
  const reply = validReply;
  run(t, 'replies', fc.oneof(
    { weight: 3, arbitrary: fc.tuple(reply, fc.array(mutation, { maxLength: 4 })).map(([r, ms]) => ({ r, frame: mutate(encodeFrame(r), ms), mutated: ms.length > 0 })) },
    { weight: 1, arbitrary: fc.oneof(soup, fc.uint8Array({ maxLength: 3000 }).map((b) => Buffer.from(b))).map((frame) => ({ r: null, frame, mutated: true })) },
  ), 16_000, ({ r, frame, mutated }) => {
    checkReply(frame);
    if (!mutated && r && !same(decodeReply(frame), Reply.parse(r))) throw new Error(`a valid reply did not round-trip: ${JSON.stringify(r)}`);
  });
});

// A bug (see corpus: "many long unknown fields", "duplicate key of 2000 bytes"): some refusals carry a
// message longer than ErrorReply allows (1024 characters), so the reply the broker sends for them is
// one its own client rejects as TB_E_BAD_REPLY. Every refusal must fit in a valid reply.
test.serial('decodeRequest: every refusal fits in a valid error reply', (t) => {
  const longKey = (max: number) => fc.string({ minLength: 1, maxLength: max, size: 'max' });
  const frames = fc.oneof(
    fc.dictionary(longKey(300), fc.integer(), { minKeys: 1, maxKeys: 12 }).map((extra) => pack({ op: 'create-tap', id: 1, bridge: 'br0', ...extra })),
    fc.tuple(longKey(1900), fc.integer(), fc.integer()).map(([k, a, b]) => Buffer.concat([u8(0x85), mstr('op'), mstr('hello'), mstr('id'), u8(1), mstr('version'), u8(1), mstr(k, 2), pack(a), mstr(k, 2), pack(b)])),
  );
  run(t, 'refusals as replies', frames, 300, (f) => {
    const d = checkRequest(f);
    if (d.ok) return;
    const parsed = Reply.safeParse({ op: 'error', id: d.id, code: d.error.code, message: d.error.message });
    if (!parsed.success) throw new Error(`the refusal of ${f.length} bytes (${d.error.code}) does not fit a reply: message of ${d.error.message.length} characters`);
  }, { shrink: false });
});

test.serial('decoders: at least 100,000 frames, none slower than 100 ms', (t) => {
  const codes = [...stats.codes].sort((a, b) => b[1] - a[1]).map(([c, n]) => `${c} ${n}`).join(', ');
  t.log(`${stats.frames} request frames (${stats.ok} accepted; ${codes}) and ${stats.replyFrames} reply frames in ${((performance.now() - fileStarted) / 1000).toFixed(1)} s`);
  t.log(`${differentialCompared} scanner-passed frames compared with the reference decoder; slowest decode ${stats.slowestMs.toFixed(2)} ms (${stats.slowestLen} bytes)`);
  t.log(`${stats.brokerCompared} frames decoded alike by the broker's own decoder and by msgpackr + zod`);
  t.true(stats.brokerCompared >= stats.frames, 'every request frame went through both');
  t.true(stats.frames + stats.replyFrames >= 100_000, `${stats.frames + stats.replyFrames} frames`);
  t.true(stats.slowestMs <= SLOW_MS);
});

// ---------------------------------------------------------------- the whole request path

const POLICY = `
[[rule]]
name = "fuzz"
users = [${NOBODY}]
bridges = ["br0"]
macvtap = [{ parent = "vparent", modes = ["bridge", "vepa", "private"] }]
max_queues = 4
`;
const BASE = ['br0', 'br1', 'vparent', 'vpeer'];

let ns: Netns | undefined;
let broker: BrokerProcess | undefined;
let peer: Peer | undefined;

test.after.always(async () => {
  await peer?.stop();
  await broker?.stop();
  ns?.destroy();
});

/** Frames for the broker: garbage, schema-shaped but invalid requests, and valid requests (some grantable). */
function brokerFrames(n: number, seed: number, grantable: number): Buffer[] {
  const grant = fc.record({
    op: fc.constant('create-tap' as const), id, bridge: fc.constant('br0'), queues: fc.integer({ min: 1, max: 4 }), vnet_hdr: fc.boolean(),
    mac: fc.array(fc.integer({ min: 0, max: 255 }), { minLength: 3, maxLength: 3 }).map((o) => `52:54:00:${o.map((x) => x.toString(16).padStart(2, '0')).join(':')}`),
    name: fc.stringMatching(/^[a-z0-9]{1,6}$/).map((s) => `tb${NOBODY}-${s}`),
  }, { requiredKeys: ['op', 'id', 'bridge'] });
  const grantMacvtap = fc.record({
    op: fc.constant('create-macvtap' as const), id, parent: fc.constant('vparent'), mode: fc.constantFrom('bridge' as const, 'vepa' as const, 'private' as const),
    queues: fc.integer({ min: 1, max: 2 }),
    mac: fc.array(fc.integer({ min: 0, max: 255 }), { minLength: 3, maxLength: 3 }).map((o) => `52:54:00:${o.map((x) => x.toString(16).padStart(2, '0')).join(':')}`),
  }, { requiredKeys: ['op', 'id', 'parent'] });
  const shaped = fc.tuple(validRequest, fc.dictionary(fc.constantFrom(...KEYS, 'x', 'mtu', 'owner'), fc.oneof(fc.integer(), fc.string({ maxLength: 8 }), fc.constant(null), fc.boolean()), { maxKeys: 3 }))
    .map(([r, extra]) => pack({ ...r, ...Object.fromEntries(Object.entries(extra).filter(([k]) => !['__proto__', 'constructor', 'prototype'].includes(k))) }));
  const arb = fc.oneof(
    { weight: grantable, arbitrary: fc.oneof({ weight: 4, arbitrary: grant }, { weight: 1, arbitrary: grantMacvtap }).map((r) => encodeFrame(r)) },
    { weight: 3, arbitrary: validRequest.map((r) => encodeFrame(r)) },
    { weight: 3, arbitrary: shaped },
    { weight: 2, arbitrary: fc.tuple(validRequest, fc.array(mutation, { minLength: 1, maxLength: 3 })).map(([r, ms]) => mutate(encodeFrame(r), ms)) },
    { weight: 2, arbitrary: soup },
    { weight: 1, arbitrary: fc.uint8Array({ maxLength: 5000 }).map((b) => Buffer.from(b)) },
  ).filter((f) => f.length > 0);
  return fc.sample(arb, { numRuns: n, seed });
}

/** The one answer a frame must get, judged against the library's own decoder. */
function judgeFrame(frame: Buffer, r: { reply: Buffer | null; fds: number; closedAfter: boolean; sendError: string | null; timedOut: boolean }, helloed: boolean): string | null {
  if (r.sendError !== null) return /EMSGSIZE|ENOBUFS/.test(r.sendError) ? null : `send failed: ${r.sendError}`;
  if (r.timedOut) return 'no reply within 5 s';
  if (!r.reply) return 'the connection closed without a reply';
  let reply: Reply;
  try {
    reply = decodeReply(r.reply);
  } catch (err) {
    return `the reply is not a valid Reply: ${(err as Error).message}`;
  }
  if (reply.op === 'error' && reply.code === 'TB_E_INTERNAL') return `TB_E_INTERNAL: ${reply.message}`;
  const d = decodeRequest(frame);
  if (!d.ok) {
    const want = frame.length > MAX_REQUEST_BYTES ? 'TB_E_FRAME_TOO_LARGE' : d.error.code;
    if (reply.op !== 'error' || reply.code !== want) return `expected ${want}, got ${reply.op === 'error' ? reply.code : reply.op}`;
    if (reply.id !== (frame.length > MAX_REQUEST_BYTES ? null : d.id)) return `reply id ${reply.id}, request id ${d.id}`;
    return r.fds === 0 ? null : 'fds with an error';
  }
  const req = d.message;
  if (reply.id !== req.id) return `reply id ${reply.id} for request id ${req.id}`;
  if (!helloed && req.op !== 'hello') return reply.op === 'error' && reply.code === 'TB_E_HELLO_REQUIRED' && r.closedAfter ? null : 'no TB_E_HELLO_REQUIRED and close';
  if (reply.op === 'error') {
    if (reply.code === 'TB_E_VERSION' || reply.code === 'TB_E_HELLO_REQUIRED') return r.closedAfter ? null : `${reply.code} without closing the connection`;
    return r.fds === 0 ? null : 'fds with an error';
  }
  if (reply.op !== req.op) return `reply op ${reply.op} for ${req.op}`;
  if (reply.op === 'create-tap' || reply.op === 'create-macvtap') {
    if (r.fds !== reply.fds.tap + reply.fds.vhost) return `${r.fds} fds for fds ${JSON.stringify(reply.fds)}`;
  } else if (r.fds !== 0) return `${r.fds} fds with ${reply.op}`;
  return null;
}

/** Notifications dropped by RTNLGRP_LINK sockets in `ns` (the broker's monitor is the only one there). */
function monitorDrops(n: Netns): number {
  const rows = execFileSync('ip', ['netns', 'exec', n.name, 'cat', '/proc/net/netlink'], { encoding: 'utf8' }).trim().split('\n').slice(1).map((l) => l.trim().split(/\s+/));
  // sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
  return rows.filter((r) => r[1] === '0' && (parseInt(r[3]!, 16) & 1) === 1).reduce((sum, r) => sum + Number(r[8]), 0);
}

/** Every lease of the broker, as root's `list` shows it (a tap its fds keep alive is not in the file). */
async function leases(b: BrokerProcess): Promise<Lease[]> {
  const c = await SeqpacketConnection.connect(b.socket, { maxPacket: MAX_REPLY_BYTES });
  try {
    await c.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION }));
    await c.receive();
    await c.send(encodeFrame({ op: 'list', id: 2 }));
    const r = decodeReply((await c.receive())!.data);
    if (r.op !== 'list') throw new Error(`list: ${JSON.stringify(r)}`);
    return r.leases;
  } finally {
    c.close();
  }
}

test.serial('the whole request path: generated frames against a real broker, as root and as uid 65534', async (t) => {
  const started = performance.now();
  ns = Netns.create('fuzz');
  ns.bridge('br0', { address: '192.0.2.1/24' });
  ns.bridge('br1');
  ns.ip('link', 'add', 'vparent', 'type', 'veth', 'peer', 'name', 'vpeer');
  ns.ip('link', 'set', 'vparent', 'up');
  ns.ip('link', 'set', 'vpeer', 'up');
  broker = await BrokerProcess.start(ns, POLICY, { tag: 'fuzz' });
  peer = Peer.start({ uid: NOBODY });
  const b = broker;
  // Warm up (a grant of each kind), then the baseline with nothing held.
  const warm = await peer.run(b.socket, [encodeFrame({ op: 'create-tap', id: 1, bridge: 'br0' }), encodeFrame({ op: 'create-macvtap', id: 2, parent: 'vparent' })]);
  t.deepEqual(warm.map((w) => (w.reply ? decodeReply(w.reply).op : 'none')), ['create-tap', 'create-macvtap']);
  await poll(() => ns!.extraLinks(BASE).length === 0, { ms: 3000 });
  const baseline = await b.settledFdCount();

  let failures = 0;
  const fail = (who: string, i: number, frame: Buffer, why: string) => {
    if (failures++ < 10) t.fail(`${who} frame ${i} (${frame.length} bytes, hex ${frame.toString('hex').slice(0, 300)}): ${why}`);
  };
  const counts = new Map<string, number>();
  const count = (reply: Buffer | null) => {
    let k = 'none';
    try {
      if (reply) { const r = decodeReply(reply); k = r.op === 'error' ? r.code : r.op; }
    } catch { k = 'invalid'; }
    counts.set(k, (counts.get(k) ?? 0) + 1);
  };

  // As root, in this process: one connection at a time, re-opened (and hello'd) when the broker closes it.
  const rootFrames = brokerFrames(2_500, SEED, 2);
  let conn: SeqpacketConnection | null = null;
  for (let i = 0; i < rootFrames.length; i++) {
    const frame = rootFrames[i]!;
    if (!conn) {
      conn = await SeqpacketConnection.connect(b.socket, { maxPacket: MAX_REPLY_BYTES });
      await conn.send(encodeFrame({ op: 'hello', id: 0, version: PROTOCOL_VERSION }));
      const h = await conn.receive();
      if (!h || decodeReply(h.data).op !== 'hello') { fail('root', i, frame, 'no hello'); break; }
    }
    const r: RunResult = { reply: null, fds: 0, sendError: null, closedAfter: false, timedOut: false };
    try {
      await conn.send(frame);
    } catch (err) {
      r.sendError = (err as Error).message;
    }
    if (r.sendError === null) {
      const p = await within(conn.receive(), 5000);
      if (p === 'timeout') r.timedOut = true;
      else if (p) {
        r.reply = p.data;
        r.fds = p.fds.length;
        for (const fd of p.fds) fs.closeSync(fd);
        const rep = (() => { try { return decodeReply(p.data); } catch { return null; } })();
        if (rep?.op === 'error' && (rep.code === 'TB_E_VERSION' || rep.code === 'TB_E_HELLO_REQUIRED')) r.closedAfter = (await conn.receive()) === null;
      }
    }
    count(r.reply);
    const why = judgeFrame(frame, r, true);
    if (why) fail('root', i, frame, why);
    if (!r.reply || r.closedAfter || r.sendError) {
      conn.close();
      conn = null;
    }
    if (!b.alive) { fail('root', i, frame, 'the broker died'); break; }
  }
  conn?.close();
  const rootDone = performance.now();

  // As uid 65534, in its own process: grants happen (and their fds are closed at once by the peer).
  const userFrames = brokerFrames(1_200, SEED + 1, 4);
  const results = await peer.run(b.socket, userFrames, { reconnectEvery: 50 });
  results.forEach((r, i) => {
    count(r.reply);
    const why = judgeFrame(userFrames[i]!, r, true);
    if (why) fail('uid 65534', i, userFrames[i]!, why);
  });
  t.true(b.alive, 'the broker is alive');
  const total = rootFrames.length + userFrames.length;
  t.log(`${total} frames through the broker (${rootFrames.length} as root in ${((rootDone - started) / 1000).toFixed(1)} s, ${userFrames.length} as uid 65534 in ${((performance.now() - rootDone) / 1000).toFixed(1)} s; seed ${SEED})`);
  t.log([...counts].sort((a, c) => c[1] - a[1]).map(([k, n]) => `${k} ${n}`).join(', '));
  t.true(total >= 3000);
  t.true((counts.get('create-tap') ?? 0) > 50, 'grants happened');

  // Afterwards: nothing left behind.
  await poll(async () => ns!.extraLinks(BASE).length === 0 && (await leases(b)).length === 0, { ms: 5000 });
  await poll(() => b.fdCount() === baseline, { ms: 5000 });
  t.deepEqual(ns.extraLinks(BASE), [], 'no link left behind');
  t.is(b.fdCount(), baseline, 'the broker\'s fd count is back to its baseline');
  const names = new Set(ns.links().map((l) => l.ifname));
  const left = await leases(b);
  const stale = left.filter((l) => !names.has(l.name));
  for (const l of stale) {
    t.log(`stale lease: ${JSON.stringify(l)}`);
    for (const r of b.records.filter((x) => JSON.stringify(x).includes(l.name))) t.log(`  audit: ${JSON.stringify(r).slice(0, 400)}`);
  }
  // The lease table is true: an overrun of the broker's link monitor triggers one resync dump, and every
  // decision first applies the link events already queued.
  if (stale.length > 0) t.log(`the broker's link monitor dropped ${monitorDrops(ns)} notification(s)`);
  t.deepEqual(stale.map((l) => l.name), [], 'no lease whose device is gone');
  t.deepEqual(left.map((l) => l.name), [], 'no lease at all');
  t.notRegex(b.stderr, /internal error/);
  const c = await SeqpacketConnection.connect(b.socket, { maxPacket: MAX_REPLY_BYTES });
  await c.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION }));
  const h = await c.receive();
  c.close();
  t.is(h ? decodeReply(h.data).op : 'closed', 'hello', 'the broker answers a fresh hello');
  t.log(`whole request path: ${((performance.now() - started) / 1000).toFixed(1)} s`);
});
