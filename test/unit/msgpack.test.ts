// The client's msgpack codec (msgpack.ts), reached through @tapbroker/protocol/lite: encodeRequest is its
// encoder, decodeReply its decoder behind the scanner. The encoder's bytes are checked against the msgpack
// specification by hand; the decoder against the broker-side decoder (msgpackr and zod), which it must
// match: the same replies accepted with the same values, the same frames refused.
import test from 'ava';
import { Unpackr } from 'msgpackr';
import {
  MAX_REPLY_BYTES, TapbrokerError, decodeReply as brokerDecodeReply, decodeRequest, encodeFrame, scanFrame,
  type Reply, type Request,
} from '@tapbroker/protocol';
import { decodeReply, encodeRequest } from '@tapbroker/protocol/lite';
import { h, s, utf8 } from '../helpers/msgpack-hex.js';

const encode = (v: unknown) => encodeRequest(v as Request);
/** msgpackr as the broker configures it (64-bit integers as numbers). */
const unpack = (b: Buffer) => new Unpackr({ useRecords: false, mapsAsObjects: true, int64AsType: 'number' }).unpack(b);
/** The bytes of `{n: value}`, after the map header and the key. */
const valueBytes = (value: unknown) => encode({ n: value }).subarray(3).toString('hex');

// ---- the encoder, byte by byte

const integers: Array<[number, string]> = [
  [0, '00'], [127, '7f'], [128, 'cc80'], [255, 'ccff'], [256, 'cd0100'], [65535, 'cdffff'], [65536, 'ce00010000'],
  [2 ** 32 - 1, 'ceffffffff'], [2 ** 32, 'cf0000000100000000'], [Number.MAX_SAFE_INTEGER, 'cf001fffffffffffff'],
  [-1, 'ff'], [-32, 'e0'], [-33, 'd0df'], [-128, 'd080'], [-129, 'd1ff7f'], [-32768, 'd18000'],
  [-32769, 'd2ffff7fff'], [-(2 ** 31), 'd280000000'], [-(2 ** 31) - 1, 'd3ffffffff7fffffff'],
  [Number.MIN_SAFE_INTEGER, 'd3ffe0000000000001'],
];
test('integers take the smallest form that holds them', (t) => {
  for (const [n, hex] of integers) t.is(valueBytes(n), hex, String(n));
});

test('other numbers are float64', (t) => {
  t.is(valueBytes(1.5), 'cb3ff8000000000000');
  t.is(valueBytes(-0.5), 'cbbfe0000000000000');
  t.is(valueBytes(2 ** 53), 'cb4340000000000000', 'an integer beyond the safe range is not written as one');
  t.is(valueBytes(2 ** 64), 'cb43f0000000000000');
});

test('nil and booleans', (t) => {
  t.is(valueBytes(null), 'c0');
  t.is(valueBytes(true), 'c3');
  t.is(valueBytes(false), 'c2');
});

test('string headers count UTF-8 bytes', (t) => {
  const head = (str: string, hexChars: number) => valueBytes(str).slice(0, hexChars);
  t.is(valueBytes(''), 'a0');
  t.is(valueBytes('op'), 'a26f70');
  t.is(head('x'.repeat(31), 2), 'bf');
  t.is(head('é'.repeat(15), 2), 'be', '15 characters, 30 bytes: still a fixstr');
  t.is(head('é'.repeat(16), 4), 'd920', '16 characters, 32 bytes: a str8');
  t.is(head('x'.repeat(32), 4), 'd920');
  t.is(head('x'.repeat(255), 4), 'd9ff');
  t.is(head('x'.repeat(256), 6), 'da0100');
  t.is(head('x'.repeat(65535), 6), 'daffff');
  t.is(head('x'.repeat(65536), 10), 'db00010000');
});

test('array headers', (t) => {
  t.is(valueBytes([]), '90');
  t.is(valueBytes([1, 2]), '920102');
  t.is(valueBytes(Array(15).fill(0)), '9f' + '00'.repeat(15));
  t.is(valueBytes(Array(16).fill(0)), 'dc0010' + '00'.repeat(16), 'there is no array8');
  t.is(valueBytes(Array(65536).fill(0)).slice(0, 10), 'dd00010000');
});

const mapOf = (n: number) => Object.fromEntries(Array.from({ length: n }, (_, i) => [`k${i}`, i]));
test('map headers, and keys in insertion order', (t) => {
  t.is(encode({}).toString('hex'), '80');
  t.is(encode({ b: 1, a: 2 }).toString('hex'), `82${s('b')}01${s('a')}02`);
  t.is(encode(mapOf(15)).subarray(0, 1).toString('hex'), '8f');
  t.is(encode(mapOf(16)).subarray(0, 3).toString('hex'), 'de0010', 'there is no map8');
  t.is(encode(mapOf(65536)).subarray(0, 5).toString('hex'), 'df00010000');
});

test('undefined properties are left out, and out of the count', (t) => {
  t.is(encode({ a: 1, b: undefined, c: 2 }).toString('hex'), `82${s('a')}01${s('c')}02`);
  t.is(encode({ ...mapOf(15), extra: undefined }).subarray(0, 1).toString('hex'), '8f', '15 entries: still a fixmap');
  t.deepEqual(unpack(encode({ a: { b: undefined, c: [{ d: undefined }] } })), { a: { c: [{}] } });
});

test('what msgpack cannot carry is refused, not written', (t) => {
  for (const v of [10n, () => 1, Symbol('x'), undefined]) {
    t.throws(() => encode({ a: [v] }), { instanceOf: TypeError, message: /^msgpack: cannot encode a / }, typeof v);
  }
});

test('everything it writes is one frame the scanner accepts and msgpack reads back as written', (t) => {
  const values = [
    ...integers.map(([n]) => n), 1.5, -0.25, null, true, false, '', 'é'.repeat(16), 'x'.repeat(300), 'x'.repeat(70000),
    [], [1, [2, []]], Array(20).fill('a'), {}, mapOf(20), { nested: { map: 1 } },
  ];
  for (const v of values) {
    const frame = encode({ v });
    t.notThrows(() => scanFrame(frame));
    t.deepEqual(unpack(frame), { v });
  }
});

test("the broker's strict decoder takes the requests it writes", (t) => {
  const reqs: Request[] = [
    { op: 'hello', id: 1, version: 1, client: 'tapbroker 0.4.0' },
    { op: 'create-tap', id: 2 ** 32 - 1, bridge: 'br0', queues: 4, vhost: true, vnet_hdr: false, mac: null, name: 'vm0' },
    { op: 'create-macvtap', id: 3, parent: 'eth0', mode: 'passthru', mac: '52:54:00:aa:bb:cc' },
    { op: 'create', id: 4, nics: [{ kind: 'tap', network: 'lan' }, { kind: 'macvtap', parent: 'eth1' }] },
    { op: 'can', id: 5, kind: 'network', parent: 'lan', persistent: true },
    { op: 'release', id: 6, name: 'tb1000-ab12cd' },
  ];
  for (const req of reqs) {
    const d = decodeRequest(encodeRequest(req));
    t.true(d.ok, d.ok ? '' : d.error.message);
    if (d.ok) t.deepEqual(d.message, req);
  }
});

// ---- the decoder: the same answers as the broker-side one

/** Both decoders accept `frame` and read `expected`, or both refuse it as a bad reply (lite: with `why`). */
const likeBroker = test.macro({
  exec(t, frame: Buffer, expected: Reply | RegExp) {
    const answer = (decode: (b: Buffer) => Reply) => {
      try {
        return decode(frame);
      } catch (err) {
        return err as TapbrokerError;
      }
    };
    const [lite, broker] = [answer(decodeReply), answer(brokerDecodeReply)];
    if (expected instanceof RegExp) {
      for (const got of [lite, broker]) t.like(got, { code: 'TB_E_BAD_REPLY' }, JSON.stringify(got));
      t.regex((lite as Error).message, expected);
    } else {
      t.deepEqual(lite, expected);
      t.deepEqual(broker, expected);
    }
  },
  title: (what) => `decoded as the broker decodes it: ${what}`,
});

/** `{op: 'hello', id: 1, version: <hex>, broker: <hex>}`. */
const hello = (version = '01', broker = s('b'), id = '01') =>
  h('84', s('op'), s('hello'), s('id'), id, s('version'), version, s('broker'), broker);
const helloReply = (version = 1, broker = 'b'): Reply => ({ op: 'hello', id: 1, version, broker });

const numberForms: Array<[string, string, number]> = [
  ['uint8', 'ccff', 255], ['uint16', 'cd1234', 0x1234], ['uint32', 'ce12345678', 0x12345678],
  ['uint64', 'cf0000001234567890', 0x1234567890], ['int8', 'd080', -128], ['int16', 'd18000', -32768],
  ['int32', 'd280000000', -(2 ** 31)], ['int64', 'd3ffffffff00000000', -(2 ** 32)], ['negative fixint', 'e0', -32],
  ['float64 holding an integer', 'cb4014000000000000', 5], ['float32 holding an integer', 'ca40a00000', 5],
];
for (const [name, hex, n] of numberForms) test(`a ${name}`, likeBroker, hello(hex), helloReply(n));

const stringForms: Array<[string, string, string]> = [
  ['str8', `d903${utf8('abc')}`, 'abc'], ['str16', `da0003${utf8('abc')}`, 'abc'],
  ['str32', `db00000003${utf8('abc')}`, 'abc'], ['UTF-8 fixstr', s('brøker'), 'brøker'],
  ['string with invalid UTF-8', 'a361ff62', 'a\ufffdb'], ['string with a NUL', 'a3610062', 'a\0b'],
];
for (const [name, hex, str] of stringForms) test(`a ${name}`, likeBroker, hello('01', hex), helloReply(1, str));

const list = (leases: string, top = '84') =>
  h(top, s('op'), s('list'), s('id'), '02', s('leases'), leases, s('truncated'), 'c2');
test('an empty array16', likeBroker, list('dc0000'), { op: 'list', id: 2, leases: [], truncated: false });
test('an empty array32', likeBroker, list('dd00000000'), { op: 'list', id: 2, leases: [], truncated: false });
test('a map16 frame', likeBroker, list('90', 'de0004'), { op: 'list', id: 2, leases: [], truncated: false });
test('a map32 frame', likeBroker, list('90', 'df00000004'), { op: 'list', id: 2, leases: [], truncated: false });

test('a fractional float32', likeBroker, hello('ca40b00000'), /version: expected an integer/);
test('NaN', likeBroker, hello('cb7ff8000000000000'), /version:/);
test('an id of 2^32', likeBroker, hello('01', s('b'), 'cf0000000100000000'), /^bad reply from broker: id:/);
test('an id of 2^32-1', likeBroker, hello('01', s('b'), 'ceffffffff'), { op: 'hello', id: 2 ** 32 - 1, version: 1, broker: 'b' });
test('an int64 beyond 2^53', likeBroker, hello('cf0020000000000001'), /version:/);

// What the scanner refuses, the lite decoder never sees: each is a bad reply, with the scanner's reason.
const scannerRefusals: Record<string, [string, RegExp]> = {
  'an empty frame': ['', /: empty$/],
  'an array frame': ['9101', /a frame must be a map$/],
  'a duplicate key': [`82${s('op')}${s('hello')}${s('op')}${s('error')}`, /duplicate key `op'$/],
  'a duplicate key in str8 form': [`82${s('op')}${s('hello')}d902${utf8('op')}${s('error')}`, /duplicate key `op'$/],
  'a reserved key': [`81${s('__proto__')}81${s('admin')}c3`, /reserved key `__proto__'$/],
  'a key that is not a string': ['8101c0', /map key at byte 1 is not a string$/],
  'a binary value': [`81${s('op')}c40100`, /msgpack type 0xc4/],
  'an extension value': [`81${s('op')}d6ff00000000`, /msgpack type 0xd6/],
  'trailing bytes': [`81${s('op')}${s('hello')}c0c0`, /2 trailing bytes$/],
  'a truncated frame': [`82${s('op')}${s('hello')}${s('id')}`, /truncated$/],
  'deep nesting': [`81${s('a')}91919100`, /nesting deeper than 4$/],
};
for (const [name, [hex, why]] of Object.entries(scannerRefusals)) test(name, likeBroker, h(hex), why);

test('a __proto__ key pollutes nothing: it is refused before any object is built', (t) => {
  const frame = h('83', s('op'), s('error'), s('__proto__'), '81', s('polluted'), 'c3', s('id'), 'c0');
  t.throws(() => decodeReply(frame), { code: 'TB_E_BAD_REPLY', message: /reserved key `__proto__'/ });
  t.is((({}) as Record<string, unknown>)['polluted'], undefined);
});

test('a frame over MAX_REPLY_BYTES is refused for its size before it is read', (t) => {
  const garbage = (n: number) => Buffer.alloc(n, 0xc1);
  t.throws(() => decodeReply(garbage(MAX_REPLY_BYTES + 1)), {
    code: 'TB_E_BAD_REPLY',
    message: `bad reply from broker: frame of ${MAX_REPLY_BYTES + 1} bytes exceeds the ${MAX_REPLY_BYTES}-byte cap`,
  });
  t.throws(() => decodeReply(garbage(MAX_REPLY_BYTES)), { message: /a frame must be a map$/ },
    'at the cap: read, and refused for what it is');
});

test('replies the broker encodes read back the same, defaults filled in as the broker-side decoder does', (t) => {
  const device = {
    kind: 'tap', name: 'tb1000-ab12cd', ifindex: 7, parent: 'br0', network: null, vlan: null, mode: null, mtu: 1500,
    host_mac: 'fe:54:00:00:00:01', mac: '52:54:00:00:00:01', locked: false, queues: 1, vnet_hdr: true, vhost: false,
    persistent: false, rule: 'lab',
  } as const;
  const lease = {
    id: 'l1', uid: 1000, user: 'alice', kind: 'tap', name: 'tb1000-ab12cd', ifindex: 7, parent: 'br0', mode: null,
    mac: null, queues: 1, rule: 'lab', created: '2026-12-02T00:00:00Z', ends: 'fds', holder: null,
  } as const;
  // Leases without network and locked, the fields with defaults: both decoders fill them in.
  const replies = [
    { op: 'create-tap', id: 1, device, fds: { tap: 1, vhost: 0 } },
    { op: 'list', id: 2, leases: Array(20).fill(lease), truncated: false },
    { op: 'error', id: null, code: 'TB_E_POLICY_DENIED', message: 'm'.repeat(1000), rule: 'no rule matched' },
  ] as Reply[];
  for (const reply of replies) {
    const mine = encodeRequest(reply as never);
    const expected = brokerDecodeReply(encodeFrame(reply));
    t.deepEqual(decodeReply(mine), expected);
    t.deepEqual(decodeReply(encodeFrame(reply)), expected);
  }
  const back = decodeReply(encodeRequest({ op: 'list', id: 2, leases: [lease], truncated: false } as never));
  t.like(back.op === 'list' ? back.leases[0] : back, { network: null, locked: false });
});
