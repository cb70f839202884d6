// The codec as a specification: what round-trips, and every way a frame is refused, with its code.
import test from 'ava';
import { pack } from 'msgpackr';
import {
  MAX_REQUEST_BYTES, TapbrokerError, decodeReply, decodeRequest, encodeFrame, scanFrame,
} from '@tapbroker/protocol';
import { decodeRequest as brokerDecodeRequest } from '@tapbroker/protocol/requests';

test('requests round-trip', (t) => {
  const reqs = [
    { op: 'hello', id: 1, version: 1, client: 'tapbroker' },
    { op: 'create-tap', id: 7, bridge: 'br0' },
    { op: 'create-tap', id: 8, bridge: 'br0', queues: 4, vhost: true, vnet_hdr: false, mac: '52:54:00:01:02:03', name: 'tb1000-vm0' },
  ] as const;
  for (const r of reqs) {
    const d = decodeRequest(encodeFrame(r));
    t.true(d.ok);
    if (d.ok) t.deepEqual(d.message, r);
  }
});

test('replies round-trip, and undefined fields are dropped rather than encoded', (t) => {
  const reply = { op: 'error', id: 3, code: 'TB_E_POLICY_DENIED', message: 'no rule matched', rule: 'no rule matched', hint: undefined } as const;
  const back = decodeReply(encodeFrame(reply as never));
  t.deepEqual(back, { op: 'error', id: 3, code: 'TB_E_POLICY_DENIED', message: 'no rule matched', rule: 'no rule matched' });
});

// Hand-built msgpack for the cases an encoder would never produce.
const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const str = (s: string) => Buffer.concat([Buffer.from([0xa0 | s.length]), Buffer.from(s)]);
const map = (n: number, ...parts: Buffer[]) => Buffer.concat([Buffer.from([0x80 | n]), ...parts]);
const hello = () => [str('op'), str('hello'), str('id'), Buffer.from([1]), str('version'), Buffer.from([1])];

const rejects = test.macro({
  exec(t, frame: Buffer, code: string) {
    const d = decodeRequest(frame);
    t.false(d.ok);
    if (!d.ok) {
      t.is(d.error.code as string, code, d.error.message);
      t.true(d.error instanceof TapbrokerError);
      t.true(d.error.message.length > 0 && d.error.message.length < 300);
    }
  },
  title: (what) => `refused: ${what}`,
});

test('empty frame', rejects, Buffer.alloc(0), 'TB_E_MALFORMED');
test('not msgpack at all', rejects, Buffer.from('GET / HTTP/1.1\r\n'), 'TB_E_MALFORMED');
test('top level is not a map', rejects, pack([1, 2, 3]), 'TB_E_MALFORMED');
test('top level is a string', rejects, pack('hello'), 'TB_E_MALFORMED');
test('truncated map', rejects, map(3, str('op'), str('hello')), 'TB_E_MALFORMED');
test('truncated string', rejects, hex('81 a2 6f 70 a5 68 65'), 'TB_E_MALFORMED');
test('map claiming 2^32-1 entries', rejects, hex('df ffffffff a2 6f 70'), 'TB_E_MALFORMED');
test('trailing bytes', rejects, Buffer.concat([map(3, ...hello()), Buffer.from([0xc0])]), 'TB_E_MALFORMED');
test('duplicate key', rejects, map(4, ...hello(), str('op'), str('create-tap')), 'TB_E_MALFORMED');
test('__proto__ key', rejects, map(4, ...hello(), str('__proto__'), map(0)), 'TB_E_MALFORMED');
test('reserved byte 0xc1', rejects, map(1, str('op'), hex('c1')), 'TB_E_MALFORMED');
test('nesting bomb', rejects, Buffer.concat([map(1, str('a')), Buffer.alloc(2000, 0x91), Buffer.from([0x90])]), 'TB_E_MALFORMED');
test('extension type (msgpackr record)', rejects, map(1, str('op'), hex('d4 72 00')), 'TB_E_UNSUPPORTED_TYPE');
test('timestamp extension', rejects, map(1, str('op'), hex('d6 ff 00 00 00 00')), 'TB_E_UNSUPPORTED_TYPE');
test('ext8', rejects, map(1, str('op'), hex('c7 01 05 00')), 'TB_E_UNSUPPORTED_TYPE');
test('binary value', rejects, map(1, str('op'), hex('c4 02 00 00')), 'TB_E_UNSUPPORTED_TYPE');
test('integer map key', rejects, hex('81 01 02'), 'TB_E_UNSUPPORTED_TYPE');
test('frame over the cap', rejects, pack({ op: 'hello', id: 1, version: 1, client: 'x'.repeat(MAX_REQUEST_BYTES) }), 'TB_E_FRAME_TOO_LARGE');
test('unknown op', rejects, pack({ op: 'delete-everything', id: 1 }), 'TB_E_UNKNOWN_OP');
// A missing op, or one of the wrong type, is an invalid request, as any such field (PROTOCOL.md); an outside review:
// `{op: 5}` was told its op was missing. Both decoders (the broker's and the client's) say the same.
for (const [what, op, message] of [['missing op', undefined, /`op' is missing/], ['op a number', 5, /not a number/],
  ['op nil', null, /not nil/], ['op an array', ['hello'], /not an array/], ['op a boolean', true, /not a boolean/],
  ['op a map', { hello: 1 }, /not a map/]] as const) {
  test(what, rejects, pack({ ...(op === undefined ? {} : { op }), id: 1 }), 'TB_E_INVALID_REQUEST');
  test(`${what}: said as such, by both decoders`, (t) => {
    for (const decode of [decodeRequest, brokerDecodeRequest]) {
      const d = decode(pack({ ...(op === undefined ? {} : { op }), id: 1 }));
      t.like(d, { ok: false, id: 1 });
      if (!d.ok) t.regex(d.error.message, message);
    }
  });
}
test('unknown field', rejects, pack({ op: 'create-tap', id: 1, bridge: 'br0', uid: 0 }), 'TB_E_INVALID_REQUEST');
test('wrong type', rejects, pack({ op: 'create-tap', id: 1, bridge: 'br0', queues: '4' }), 'TB_E_INVALID_REQUEST');
test('fractional queues', rejects, pack({ op: 'create-tap', id: 1, bridge: 'br0', queues: 1.5 }), 'TB_E_INVALID_REQUEST');
test('missing field', rejects, pack({ op: 'create-macvtap', id: 1 }), 'TB_E_INVALID_REQUEST');
test('negative id', rejects, pack({ op: 'hello', id: -1, version: 1 }), 'TB_E_INVALID_REQUEST');
test('null where a string belongs', rejects, pack({ op: 'create-tap', id: 1, bridge: null }), 'TB_E_INVALID_REQUEST');
test('a 64-bit integer', rejects, map(3, str('op'), str('hello'), str('id'), hex('cf 7fffffffffffffff'), str('version'), Buffer.from([1])), 'TB_E_INVALID_REQUEST');

test('the request id survives a refusal when it can be read', (t) => {
  const d = decodeRequest(pack({ op: 'create-tap', id: 42, bridge: 7 }));
  t.false(d.ok);
  if (!d.ok) t.is(d.id, 42);
});

test('an unknown-field error names the field', (t) => {
  const d = decodeRequest(pack({ op: 'create-tap', id: 1, bridge: 'br0', owner: 0 }));
  t.false(d.ok);
  if (!d.ok) t.regex(d.error.message, /unknown field `owner'/);
});

// Found by an outside review: an unknown field's or op's name went into the error raw, and a newline in it made the
// journal's message and the reply show a line that read like a root grant.
test('an unknown field or op named with control characters is escaped in the error, whichever decoder', (t) => {
  const forged = '\ngrant create-tap tb0-evil uid 0 (root) rule admin\n\x1b[2K\u202e';
  for (const decoder of [decodeRequest, brokerDecodeRequest]) {
    for (const frame of [pack({ op: 'create-tap', id: 1, bridge: 'br0', [forged]: 0 }), pack({ op: forged, id: 1 })]) {
      const d = decoder(frame);
      t.false(d.ok);
      if (d.ok) continue;
      t.notRegex(d.error.message, /[\x00-\x1f\x7f-\x9f\u202e]/u, d.error.message);
      t.regex(d.error.message, /\\ngrant create-tap/);
    }
  }
  // The scanner's own refusals name a key too: one given twice (a re-test found it raw there).
  const key = Buffer.from(forged);
  const str = (b: Buffer) => Buffer.concat([Buffer.from([0xd9, b.length]), b]);
  const twice = Buffer.concat([Buffer.from([0x83]), str(Buffer.from('op')), str(Buffer.from('hello')), str(key),
    Buffer.from([1]), str(key), Buffer.from([2])]);
  for (const decoder of [decodeRequest, brokerDecodeRequest]) {
    const d = decoder(twice);
    t.false(d.ok);
    if (d.ok) continue;
    t.regex(d.error.message, /duplicate key/);
    t.notRegex(d.error.message, /[\x00-\x1f\x7f-\x9f\u202e]/u, d.error.message);
  }
});

test('a grammar error in a NIC of a create names the NIC by its index, as its other refusals do', (t) => {
  // An outside review: the index was only in the message (`nics.1: …`), where every other NIC refusal has `nic`.
  for (const decoder of [decodeRequest, brokerDecodeRequest]) {
    const d = decoder(pack({ op: 'create', id: 1, nics: [{ kind: 'tap', bridge: 'br0' }, { kind: 'tap', bridge: 'br0', owner: 0 }] }));
    t.false(d.ok);
    if (!d.ok) t.is(d.error.nic, 1);
    const other = decoder(pack({ op: 'create-tap', id: 1, bridge: 'br0', owner: 0 }));
    t.false(other.ok);
    if (!other.ok) t.is(other.error.nic, undefined);
  }
});

test('the scanner accepts what the encoder makes, at the depth the protocol uses', (t) => {
  t.notThrows(() => scanFrame(encodeFrame({ op: 'create-tap', id: 1, device: { kind: 'tap', name: 'x', ifindex: 1, parent: 'b', network: null, vlan: null, mode: null, mtu: 1500, host_mac: 'fe', mac: '52', queues: 1, vnet_hdr: true, vhost: false, persistent: false, rule: 'r', locked: false }, fds: { tap: 1, vhost: 0 } })));
});

test('a reply with an unknown error code is a bad reply', (t) => {
  const err = t.throws(() => decodeReply(pack({ op: 'error', id: 1, code: 'TB_E_MADE_UP', message: 'x' })));
  t.is((err as TapbrokerError).code, 'TB_E_BAD_REPLY');
});
