// The strict scanner (scan.ts) every frame passes before anything decodes it, byte by byte: what it
// accepts, and what it refuses with which code and at which byte. Frames are written out in hex, as the
// msgpack specification spells each type, so no encoder's choices hide a case.
import test from 'ava';
import { MAX_DEPTH, TapbrokerError, scanFrame } from '@tapbroker/protocol';
import { h, s, utf8 } from '../helpers/msgpack-hex.js';

/** A one-entry map `{a: <value>}`, the value in hex. */
const inA = (value: string) => h('81', s('a'), value);

const accepted = test.macro({
  exec(t, frame: Buffer) {
    t.notThrows(() => scanFrame(frame), frame.toString('hex'));
  },
  title: (what) => `accepted: ${what}`,
});

const refused = test.macro({
  exec(t, frame: Buffer, code: string, message: RegExp) {
    const err = t.throws(() => scanFrame(frame), undefined, frame.toString('hex'));
    t.true(err instanceof TapbrokerError, String(err));
    t.is((err as TapbrokerError).code as string, code);
    t.regex(err!.message, message);
  },
  title: (what) => `refused: ${what}`,
});

// ---- what the protocol carries

const scalars: Record<string, string> = {
  nil: 'c0', false: 'c2', true: 'c3', 'positive fixint': '7f', 'negative fixint': 'e0', uint8: 'cc ff',
  uint16: 'cd ffff', uint32: 'ce ffffffff', uint64: 'cf 0000000000000001', int8: 'd0 80', int16: 'd1 8000',
  int32: 'd2 80000000', int64: 'd3 ffffffffffffffff', float32: 'ca 3fc00000', float64: 'cb 3ff8000000000000',
  fixstr: s('hello'), 'empty fixstr': 'a0', str8: `d9 03 ${utf8('abc')}`, str16: 'da 0001 78',
  str32: 'db 00000001 78', 'UTF-8 fixstr': s('été'),
};
for (const [name, value] of Object.entries(scalars)) test(`a ${name} value`, accepted, inA(value));

test('each array form', accepted, h('83', s('a'), '92 01 02', s('b'), 'dc 0001 c0', s('c'), 'dd 00000002 c2 c3'));
test('each map form, inside a map', accepted,
  h('83', s('a'), '81', s('x'), '01', s('b'), 'de 0000', s('c'), 'df 00000001', s('y'), 'c0'));
test('an empty map', accepted, h('80'));
test('a map16 frame', accepted, h('de 0001', s('op'), s('x')));
test('a map32 frame', accepted, h('df 00000001', s('op'), s('x')));
test('keys in str8, str16 and str32 form', accepted,
  h('83 d9 01', utf8('a'), '01 da 0001', utf8('b'), '02 db 00000001',
    utf8('c'), '03'));
test('the same key in two different maps', accepted, h('82', s('a'), '81', s('a'), '01', s('b'), '81', s('a'), '02'));
test('reserved words as values, and keys that merely resemble them', accepted,
  h('84', s('a'), s('__proto__'), s('b'), s('constructor'), s('__proto'), s('prototype'), s('Constructor'), '01'));

// ---- the frame as a whole

test('an empty frame', refused, h(''), 'TB_E_MALFORMED', /^malformed frame at byte 0: empty$/);
const notMaps = { array: '90', fixstr: 'a0', nil: 'c0', integer: '01', array16: 'dc 0000', bin8: 'c4 00' };
for (const [name, frame] of Object.entries(notMaps)) {
  test(`a frame that is a ${name}`, refused, h(frame), 'TB_E_MALFORMED', /: a frame must be a map$/);
}
test('one trailing byte', refused, h('80 c0'), 'TB_E_MALFORMED', /^malformed frame at byte 1: 1 trailing bytes$/);
test('a second map after the first', refused, h('81', s('a'), '01', '81', s('a'), '01'), 'TB_E_MALFORMED',
  /at byte 4: 4 trailing bytes$/);

// ---- truncation: every length the frame claims is checked against what is there

const truncated: Record<string, string> = {
  uint8: 'cc', uint16: 'cd 00', uint32: 'ce 000000', uint64: 'cf 00000000000000', int8: 'd0', int16: 'd1 00',
  int32: 'd2 000000', int64: 'd3 00000000000000', float32: 'ca 000000', float64: 'cb 00000000000000',
  'fixstr body': 'a3 6162', 'str8 length': 'd9', 'str8 body': 'd9 03 6162', 'str16 length': 'da 00',
  'str32 body': 'db ffffffff 61', 'array16 count': 'dc 00', 'missing value': '',
};
for (const [name, value] of Object.entries(truncated)) {
  test(`truncated ${name}`, refused, inA(value), 'TB_E_MALFORMED', /: truncated$/);
}
test('a fixarray claiming more elements than bytes remain', refused, inA('93 01 02'), 'TB_E_MALFORMED', /: truncated$/);
test('an array32 claiming 2^32-1 elements', refused, inA('dd ffffffff 01'), 'TB_E_MALFORMED', /: truncated$/);
// A map entry takes at least two bytes: 2 entries cannot fit in 3.
test('a map16 whose entries cannot fit what remains', refused, inA(`de 0002 ${s('k')} 01`), 'TB_E_MALFORMED',
  /at byte 6: truncated$/);

// ---- depth

test('MAX_DEPTH is 4: the deepest message is a map in an array in a map', (t) => {
  t.is(MAX_DEPTH, 4);
  // {devices: [{name: 'x'}]}: the top map (1), the array (2), the map (3), its keys and values (4).
  t.notThrows(() => scanFrame(h('81', s('devices'), '91 81', s('name'), s('x'))));
});
test('an empty array at depth 4', accepted, inA('91 91 90'));
test('a value at depth 5', refused, inA('91 91 91 00'), 'TB_E_MALFORMED', /at byte 6: nesting deeper than 4$/);
test('an empty map at depth 4', accepted, inA(`81 ${s('b')} 81 ${s('c')} 80`));
test('a map key at depth 5', refused, inA(`81 ${s('b')} 81 ${s('c')} 81 ${s('d')} 00`), 'TB_E_MALFORMED',
  /nesting deeper than 4$/);
test('a nesting bomb of array16s', refused, inA('dc0001'.repeat(1000)), 'TB_E_MALFORMED', /nesting deeper than 4$/);

// ---- keys

test('a duplicate key, at the byte where it starts again', refused, h('82', s('a'), '01', s('a'), '02'),
  'TB_E_MALFORMED', /^malformed frame at byte 4: duplicate key `a'$/);
test('a duplicate key spelt as str8', refused, h('82', s('op'), '01', 'd9 02', utf8('op'), '02'),
  'TB_E_MALFORMED', /duplicate key `op'/);
test('a duplicate key spelt as str32', refused, h('82', s('op'), '01', 'db 00000002', utf8('op'), '02'),
  'TB_E_MALFORMED', /duplicate key `op'/);
test('a duplicate key after other keys', refused, h('83', s('a'), '01', s('b'), '02', s('a'), '03'),
  'TB_E_MALFORMED', /at byte 7: duplicate key `a'/);
test('a duplicate key in a nested map', refused, inA(`82 ${s('x')} 01 ${s('x')} 01`), 'TB_E_MALFORMED',
  /duplicate key `x'/);
test('a duplicate key in a map inside an array', refused, inA(`91 82 ${s('x')} 01 ${s('x')} 01`), 'TB_E_MALFORMED',
  /duplicate key `x'/);
for (const key of ['__proto__', 'constructor', 'prototype']) {
  test(`the reserved key ${key}`, refused, h('81', s(key), '80'), 'TB_E_MALFORMED',
    new RegExp(`at byte 1: reserved key \`${key}'$`));
}
test('a reserved key in a nested map', refused, inA(`81 ${s('__proto__')} 81 ${s('admin')} c3`), 'TB_E_MALFORMED',
  /reserved key `__proto__'/);

const keyTypes: Record<string, string> = {
  'an integer': '01', 'a negative integer': 'ff', nil: 'c0', 'a boolean': 'c3', 'a float': 'cb 3ff0000000000000',
  'an array': '91 01', 'a map': '80', 'a binary': 'c4 01 61', 'the reserved byte 0xc1': 'c1',
};
for (const [name, key] of Object.entries(keyTypes)) {
  test(`${name} as a map key`, refused, h('81', key, '01'), 'TB_E_UNSUPPORTED_TYPE', /^map key at byte 1 is not a string$/);
}
test('an integer key in a nested map, at its byte', refused, inA('81 05 01'), 'TB_E_UNSUPPORTED_TYPE',
  /^map key at byte 4 is not a string$/);

// ---- types the protocol does not carry

const foreign: Record<string, string> = {
  bin8: 'c4 01 00', bin16: 'c5 0001 00', bin32: 'c6 00000001 00', ext8: 'c7 01 05 00', ext16: 'c8 0001 05 00',
  ext32: 'c9 00000001 05 00', fixext1: 'd4 05 00', fixext2: 'd5 05 0000', fixext4: 'd6 ff 00000000',
  fixext8: 'd7 ff 0000000000000000', fixext16: 'd8 05 00000000000000000000000000000000',
};
for (const [name, value] of Object.entries(foreign)) {
  const type = value.slice(0, 2);
  test(`a ${name} value`, refused, inA(value), 'TB_E_UNSUPPORTED_TYPE',
    new RegExp(`^byte 3: msgpack type 0x${type} \\(extension or binary\\) is not carried by the protocol$`));
}
test('a binary inside an array', refused, inA('92 01 c4 00'), 'TB_E_UNSUPPORTED_TYPE', /^byte 5: msgpack type 0xc4/);
test('the reserved byte 0xc1 as a value', refused, inA('c1'), 'TB_E_MALFORMED',
  /^malformed frame at byte 3: reserved byte 0xc1$/);
