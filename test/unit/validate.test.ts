// The grammar checks (validate.ts) for values that reach the kernel: interface names as the kernel's
// dev_valid_name() and IFNAMSIZ have them, network names, MACs and MAC prefixes, queue counts.
import test from 'ava';
import {
  IFNAME_MAX_BYTES, MAX_QUEUES, SCM_MAX_FD, checkIfName, checkMac, checkMacPrefix, checkNetworkName, checkQueues,
  macFromBuffer, macToBuffer,
} from '@tapbroker/protocol';

/** A check accepts each value (null) or refuses it with a reason matching `why`. */
const verdicts = test.macro({
  exec(t, check: (v: string) => string | null, values: string[], why: RegExp | null) {
    for (const v of values) {
      const got = check(v);
      if (why === null) t.is(got, null, JSON.stringify(v));
      else t.regex(got ?? '<accepted>', why, JSON.stringify(v));
    }
  },
  title: (what) => what ?? '',
});

// ---- interface names

test('IFNAMSIZ is 16 with the NUL: 15 bytes at most', (t) => {
  t.is(IFNAME_MAX_BYTES, 15);
});

test('interface names the kernel takes', verdicts, checkIfName,
  ['br0', 'eth0.100', 'tb1000-vm0', 'a', '_', '-', 'br_lan-2.x', '...', '.hidden', 'a'.repeat(15)], null);
test('the empty name', verdicts, checkIfName, [''], /^is empty$/);
test('16 characters are one too many', verdicts, checkIfName, ['a'.repeat(16)],
  /^is 16 bytes long; the kernel allows at most 15$/);
test('the limit counts UTF-8 bytes, not characters', verdicts, checkIfName, ['é'.repeat(8)], /is 16 bytes long/);
test('. and .. are not names', verdicts, checkIfName, ['.', '..'], /^is not a usable name$/);
test('a slash, a colon (an alias), white space or a NUL is refused', verdicts, checkIfName,
  ['br/0', '/', 'eth0:1', ':', 'br 0', ' br0', 'br0\t', 'br0\n', '\n', 'br\0'],
  /^may only contain A-Z a-z 0-9 _ \. -$/);
test("the kernel's %d template and other punctuation are refused", verdicts, checkIfName,
  ['tap%d', 'br*', 'br0;', 'br$x', 'ü', 'brü'], /may only contain/);

// ---- network names (policy names, never given to the kernel)

test('network names of 1 to 64 characters, dots allowed', verdicts, checkNetworkName,
  ['lan', 'a', 'n'.repeat(64), 'my.net_1-a', '.', '..', 'a'.repeat(16)], null);
test('network names that are empty, too long or hold other characters', verdicts, checkNetworkName,
  ['', 'n'.repeat(65), 'a b', 'lan\n', 'lan/1', 'lan:1', 'ü', 'lan\0'], /^must be 1-64 characters of A-Z a-z 0-9 _ \. -$/);

// ---- queues

test('queues from 1 to MAX_QUEUES', (t) => {
  for (const n of [1, 2, 64, MAX_QUEUES]) t.is(checkQueues(n), null, String(n));
  for (const n of [0, -1, MAX_QUEUES + 1, 1.5, Number.NaN, Number.POSITIVE_INFINITY, 2 ** 32 + 1]) {
    t.is(checkQueues(n), `must be from 1 to ${MAX_QUEUES}, not ${n}`, String(n));
  }
});

test('MAX_QUEUES tap fds and as many vhost fds fit one SCM_RIGHTS message', (t) => {
  t.true(2 * MAX_QUEUES <= SCM_MAX_FD);
  t.true(2 * (MAX_QUEUES + 1) > SCM_MAX_FD, 'and one queue more would not: the limit is the largest that fits');
});

// ---- MACs

test('unicast MACs in lower-case colon form', verdicts, checkMac,
  ['52:54:00:12:34:56', '02:00:00:00:00:01', 'fe:ff:ff:ff:ff:ff', '00:00:00:00:00:01'], null);
test('MACs in any other spelling', verdicts, checkMac,
  ['52:54:00:12:34:5F', '52:54:00:AB:CD:EF', '52-54-00-12-34-56', '525400123456', '52:54:00:12:34', '52:54:00:12:34:56:78',
    '5:54:00:12:34:56', '52:54:00:12:34:56\n', ' 52:54:00:12:34:56', '52:54:00:12:34:5g', '', '52:54:00:12:34:56:'],
  /^must be six lower-case hex octets separated by colons$/);
test('multicast and broadcast MACs (the low bit of the first octet)', verdicts, checkMac,
  ['01:00:5e:00:00:01', '33:33:00:00:00:01', 'ff:ff:ff:ff:ff:ff', '03:00:00:00:00:00', 'fd:00:00:00:00:00'],
  /^is a multicast address$/);
test('the all-zero MAC', verdicts, checkMac, ['00:00:00:00:00:00'], /^is all zeros$/);

test('MAC prefixes of one to six octets', verdicts, checkMacPrefix,
  ['52', '52:54', '52:54:00', '02:00:5e:10', '52:54:00:12:34:56'], null);
// Grammar only: the policy refuses a multicast mac_prefix on its own.
test('checkMacPrefix does not judge the multicast bit', verdicts, checkMacPrefix, ['01:00:5e', '03'], null);
test('MAC prefixes in any other spelling', verdicts, checkMacPrefix,
  ['', '5', '52:', ':52', '52:54:00:', '52:54:00:12:34:56:78', '52:54:0', '52:54:AA', '52-54', '52:54\n'],
  /^must be one to six lower-case hex octets separated by colons$/);

test('MACs to bytes and back', (t) => {
  t.deepEqual([...macToBuffer('52:54:00:ab:cd:ef')], [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
  t.is(macFromBuffer(Buffer.from([0x02, 0x00, 0x0a, 0xff, 0x10, 0x01])), '02:00:0a:ff:10:01', 'octets below 0x10 keep their 0');
  for (const mac of ['00:00:00:00:00:01', 'fe:ff:ff:ff:ff:ff', '52:54:00:0f:f0:00']) {
    t.is(macFromBuffer(macToBuffer(mac)), mac);
  }
});

test('macFromBuffer reads the first six bytes of a longer buffer', (t) => {
  t.is(macFromBuffer(Buffer.from([1, 2, 3, 4, 5, 6, 7, 8])), '01:02:03:04:05:06');
});
