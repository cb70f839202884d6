// Pointing at a policy's text (policy-text.ts): lineIndex, the line a zod path such as ['rule', 3, 'bridges']
// or ['network', 'lan', 'vlan'] was written on, found from the headers and keys alone (the deepest part
// of the path that was written, else line 1); and didYouMean, the known key a typo was closest to. The
// load's own messages built from both are tested in policy.test.ts.
import test from 'ava';
import { POLICY_KEYS, didYouMean, lineIndex } from '@tapbroker/broker/internal';

/** `lines` joined into a policy text: line N of the text is lines[N - 1]. */
const text = (...lines: string[]) => `${lines.join('\n')}\n`;

test('[[rule]] entries are numbered from 0 in order; [[deny]] entries count on their own', (t) => {
  const at = lineIndex(text(
    '[[rule]]', 'name = "a"',
    '[[deny]]', 'users = [1]',
    '[[rule]]', 'name = "b"',
    '[[deny]]', 'users = [2]',
    '[[rule]]', 'name = "c"',
  ));
  t.deepEqual([0, 1, 2].map((i) => at(['rule', i])), [1, 5, 9]);
  t.deepEqual([0, 1].map((i) => at(['deny', i])), [3, 7]);
  t.is(at(['rule', 2, 'name']), 10);
  t.is(at(['deny', 1, 'users']), 8);
});

test('an entry index as a string finds the same entry (paths are joined as text)', (t) => {
  const at = lineIndex(text('[[rule]]', '[[rule]]', 'vhost = true'));
  t.is(at(['rule', '1', 'vhost']), 3);
  t.is(at(['rule', 1, 'vhost']), 3);
});

test('a key is found in its own entry, not in an earlier one that has it too', (t) => {
  const at = lineIndex(text(
    'version = 1',
    '[[rule]]', 'name = "a"', 'bridges = ["br0"]',
    '[[rule]]', 'name = "b"', 'users = [1]', 'bridges = ["br1"]',
  ));
  t.is(at(['rule', 0, 'bridges']), 4);
  t.is(at(['rule', 1, 'bridges']), 8);
  t.is(at(['rule', 0, 'users']), 2, 'rule 0 has no users key: its header');
});

test('top-level keys are found before any table', (t) => {
  const at = lineIndex(text('# a comment', '', 'version = 1', '', '[[rule]]', 'version = 2'));
  t.is(at(['version']), 3);
  t.is(at(['rule', 0, 'version']), 6, 'the same key inside a table is that table\'s');
});

test('headers may be indented, hold spaces and be followed by a comment', (t) => {
  const at = lineIndex(text(
    '  [[ rule ]]  # the lab', '\tname = "a"',
    '[ network . lan ] # vlan 2', '  vlan   =   2',
  ));
  t.is(at(['rule', 0]), 1);
  t.is(at(['rule', 0, 'name']), 2);
  t.is(at(['network', 'lan']), 3);
  t.is(at(['network', 'lan', 'vlan']), 4);
});

test('[network.NAME] tables: each its own header and keys', (t) => {
  const at = lineIndex(text(
    '[[rule]]', 'networks = ["lan", "wan"]',
    '[network.lan]', 'bridge = "br0"', 'vlan = 2',
    '[network.wan]', 'ovs = "br-int"', 'vlan = 3',
  ));
  t.is(at(['network', 'lan']), 3);
  t.is(at(['network', 'lan', 'vlan']), 5);
  t.is(at(['network', 'wan']), 6);
  t.is(at(['network', 'wan', 'vlan']), 8);
  t.is(at(['network', 'wan', 'bridge']), 6, 'a key written only in another network: this one\'s header');
  t.is(at(['network', 'dmz', 'vlan']), 3, 'a network not written: the first [network.…] table');
  t.is(at(['network']), 3);
});

test('a header ends the table before it: keys after [[rule]] are the rule\'s, not the network\'s', (t) => {
  const at = lineIndex(text('[network.lan]', 'bridge = "br0"', '[[rule]]', 'bridge = "x"'));
  t.is(at(['network', 'lan', 'bridge']), 2);
  t.is(at(['rule', 0, 'bridge']), 4);
});

test('[[rule.macvtap]] entries belong to the latest rule, numbered from 0 within it, and own the keys below them', (t) => {
  const at = lineIndex(text(
    '[[rule]]', 'name = "a"', '[[rule.macvtap]]', 'parent = "eth9"',
    '[[rule]]', 'name = "b"', '[[rule.macvtap]]', 'parent = "eth0"', '[[rule.macvtap]]', 'parent = "eth1"',
    'modez = ["bridge"]',
  ));
  t.is(at(['rule', 0, 'macvtap', 0, 'parent']), 4);
  t.is(at(['rule', 1, 'macvtap', 0]), 7);
  t.is(at(['rule', 1, 'macvtap', 1, 'parent']), 10);
  t.is(at(['rule', 1, 'macvtap', 1, 'modez']), 11, 'an unknown key in the second entry is pointed at where it is');
  t.is(at(['rule', 1, 'name']), 6, 'the rule\'s own keys stay the rule\'s');
});

test('a quoted network name is found by its value', (t) => {
  const at = lineIndex(text(
    '[network.lan]', 'vlan = 1',
    '[network."lan-2"]', 'vlan = 2',
    '[network."lab 3"]', 'vlan = 3',
    '[network."q\\"x"]', 'vlan = 4',
  ));
  t.is(at(['network', 'lan-2', 'vlan']), 4);
  t.is(at(['network', 'lab 3']), 5, 'a space inside the quotes');
  t.is(at(['network', 'q"x', 'vlan']), 8, 'an escaped quote');
  t.is(at(['network', '"lan-2"', 'vlan']), 1, 'the quotes are not part of the name: the first network table');
});

test('a quoted key is found by its value', (t) => {
  const at = lineIndex(text('[[rule]]', '"max_queues" = 4', '"mac\\u005flock" = true'));
  t.is(at(['rule', 0, 'max_queues']), 2);
  t.is(at(['rule', 0, 'mac_lock']), 3, 'a \\u escape, read as JSON reads it');
});

test('a TOML escape JSON lacks keeps the raw text: such a key falls back to its table', (t) => {
  const at = lineIndex(text('version = 1', '[[rule]]', 'name = "a"', '"x\\U00000041" = 1'));
  t.is(at(['rule', 0, 'x\\U00000041']), 4);
  t.is(at(['rule', 0, 'xA']), 2);
});

test('lines end with \\r\\n or \\n alike', (t) => {
  const lf = text('version = 1', '[[rule]]', 'name = "a"', '[network.lan]', 'vlan = 2');
  const crlf = lineIndex(lf.replaceAll('\n', '\r\n'));
  const at = lineIndex(lf);
  for (const path of [['version'], ['rule', 0], ['rule', 0, 'name'], ['network', 'lan'], ['network', 'lan', 'vlan']]) {
    t.is(crlf(path), at(path), path.join('.'));
  }
  t.is(crlf(['network', 'lan', 'vlan']), 5);
});

test('a path nothing of which was written gives line 1', (t) => {
  const at = lineIndex(text('', '', '[[rule]]', 'name = "a"'));
  t.is(at([]), 1, 'the top level');
  t.is(at(['deny', 0, 'users']), 1);
  t.is(at(['rule', 3, 'name']), 1, 'an entry past the last: [[rule]] itself is no key');
  t.is(at(['network', 'lan']), 1);
  t.is(lineIndex('')(['version']), 1, 'an empty text');
});

test('comments and values are not keys', (t) => {
  const at = lineIndex(text(
    'version = 1',
    '[[rule]]', '# vhost = true', 'users = [', '  "vhost = x",', ']', 'name = "a = b"', 'vhost = true',
  ));
  t.is(at(['rule', 0, 'vhost']), 8);
  t.is(at(['rule', 0, 'a']), 2, 'no key `a\': the rule\'s header');
});

test('didYouMean: the closest known key, not the first close one', (t) => {
  t.is(didYouMean('max_queus', ['max_queue_x', 'max_queues']), 'max_queues');
  t.is(didYouMean('vlam', ['vlans', 'vlan']), 'vlan');
});

test('didYouMean: of keys equally close, the one listed first', (t) => {
  t.is(didYouMean('bridgeX', ['bridges', 'bridgeY']), 'bridges');
  t.is(didYouMean('bridgeX', ['bridgeY', 'bridges']), 'bridgeY');
});

test('didYouMean: case is ignored, and the known spelling returned', (t) => {
  t.is(didYouMean('MAX_QUEUES', POLICY_KEYS.rule), 'max_queues');
  t.is(didYouMean('Mac_Lok', POLICY_KEYS.rule), 'mac_lock');
});

test('didYouMean: one edit of any kind is a typo', (t) => {
  t.is(didYouMean('max_device', POLICY_KEYS.rule), 'max_devices', 'a letter missing');
  t.is(didYouMean('networkss', POLICY_KEYS.rule), 'networks', 'a letter too many');
  t.is(didYouMean('persistant', POLICY_KEYS.rule), 'persistent', 'a letter wrong');
  t.is(didYouMean('vlna', POLICY_KEYS.network), 'vlan', 'two letters swapped: two edits, still close');
  t.is(didYouMean('parnet', POLICY_KEYS.macvtap), 'parent');
});

test('didYouMean: up to two edits for a key of 8 characters or fewer', (t) => {
  t.is(didYouMean('aaaaaaaa', ['aaaaaabb']), 'aaaaaabb');
  t.is(didYouMean('aaaaaaaa', ['aaaaabbb']), null);
  t.is(didYouMean('ovs', ['ovsdb']), 'ovsdb');
});

test('didYouMean: longer keys are allowed a third of their length in edits', (t) => {
  t.is(didYouMean('aaaaaaaaa', ['aaaaaabbb']), 'aaaaaabbb', '9 characters: 3 edits');
  t.is(didYouMean('aaaaaaaaa', ['aaaaabbbb']), null);
  t.is(didYouMean('aaaaaaaaaaaa', ['aaaaaaaabbbb']), 'aaaaaaaabbbb', '12 characters: 4 edits');
  t.is(didYouMean('aaaaaaaaaaaa', ['aaaaaaabbbbb']), null);
  t.is(didYouMean('hook_timeout_ms', POLICY_KEYS.network), 'hook_timeout', '15 characters: 5 edits');
});

test('didYouMean: the allowance follows the length of the key written, not of the known one', (t) => {
  t.is(didYouMean('abcdef', ['abcdefxyz']), null, '6 characters written: 2 edits, not 3');
  t.is(didYouMean('abcdefxyz', ['abcdef']), 'abcdef', '9 characters written: 3 edits');
  t.is(didYouMean('name', ['name_pattern']), null, 'eight insertions');
});

test('didYouMean: null when nothing is close, or nothing is known', (t) => {
  t.is(didYouMean('frobnicate', POLICY_KEYS.rule), null);
  t.is(didYouMean('parents', POLICY_KEYS.network), null);
  t.is(didYouMean('name', []), null);
});

// Found by an outside review (fuzzing the policy tools): a draft with a 20,000-character header and 4,000 keys under
// it kept check-policy busy for minutes (each key line copied the header, and V8 hashes strings that long by their
// length alone, so all of them collided). Long keys stand for their digests: found, at their lines, in linear time.
test('keys and headers of any length are found at their lines, and a long header costs its length once', (t) => {
  const long = 'x'.repeat(20_000);
  const keys = Array.from({ length: 4000 }, (_, i) => `b${i} = 1`);
  const t0 = performance.now();
  const at = lineIndex(text('version = 1', `["${long}"]`, ...keys, `[network.${'a.'.repeat(5000)}z]`, 'vlan = 3',
    `[[rule]]`, `"${long}y" = 2`));
  t.is(at(['version']), 1);
  t.is(at([long]), 2);
  t.is(at([long, 'b0']), 3);
  t.is(at([long, 'b3999']), 4002);
  t.is(at([long, 'nowhere']), 2, 'an unwritten key: its table\'s line');
  const dotted = ['network', ...Array(5000).fill('a'), 'z'];
  t.is(at(dotted), 4003);
  t.is(at([...dotted, 'vlan']), 4004);
  t.is(at(['rule', 0, `${long}y`]), 4006);
  // Not a timing test: a bound far above the ~0.1 s it takes, below the minutes it took.
  t.true(performance.now() - t0 < 20_000, `${Math.round(performance.now() - t0)} ms`);
});
