// `tapbrokerd test-policy`'s core: policies × tables of cases through runPolicyTests, which decides each
// case with the broker's own createSpec, checkSpec and decide; and the cases file's errors, with lines.
import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Subuids, parsePolicy, parseRequest, runPolicyTests, type CaseResult } from '@tapbroker/broker/internal';

const TEAM = `
[network.lab]
bridge = "br1"

[network.lab-ovs]
ovs = "br1"

[network.other]
bridge = "br2"

[[rule]]
name = "team"
users = [1234]
groups = [100]
bridges = ["br1", "br2"]
networks = ["lab", "other"]
max_queues = 4
max_devices = 2

[[rule]]
name = "keep"
users = [1500]
bridges = ["br2"]
persistent = true

[[rule]]
name = "everyone"
users = ["*"]
bridges = ["pub0"]
macvtap = [{ parent = "eth0", modes = ["bridge", "vepa"] }]

[[deny]]
name = "no-br1"
users = [999]
bridges = ["br1"]

[[deny]]
name = "no-interns"
groups = [600]
`;

/** The line of the first line of `text` that contains `what`. */
const lineOf = (text: string, what: string) => text.split('\n').findIndex((l) => l.includes(what)) + 1;

/** One [[case]] per row: TOML key = value lines. */
function cases(...rows: Array<Record<string, string | number | boolean | object>>): string {
  return rows.map((r) => `[[case]]\n${Object.entries(r).map(([k, v]) => `${k} = ${toml(v)}`).join('\n')}\n`).join('\n');
}

function toml(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(toml).join(', ')}]`;
  if (typeof v === 'object' && v !== null) {
    return `{ ${Object.entries(v).map(([k, x]) => `${k} = ${toml(x)}`).join(', ')} }`;
  }
  return typeof v === 'string' ? JSON.stringify(v) : String(v);
}

function run(policy: string, text: string): CaseResult[] {
  const r = runPolicyTests(policy, text);
  if (r.errors.length > 0) throw new Error(`malformed: ${JSON.stringify(r.errors)}`);
  return r.results;
}

// Each row: a case that must hold under TEAM (and so pass), with what it exercises.
const HOLDING: Array<[string, Record<string, string | number | object>]> = [
  ['a user named by uid', { user: 1234, request: 'bridge=br1', expect: 'allow', rule: 'team' }],
  ['a network onto an allowed bridge', { user: 1234, request: 'network=lab', expect: 'allow', rule: 'team' }],
  ['deny wins over the allow rule', { user: 999, groups: [100], request: 'bridge=br1', expect: 'deny', rule: 'no-br1' }],
  ['a deny on a bridge covers a network onto it',
    { user: 999, groups: [100], request: 'network=lab', expect: 'deny', rule: 'no-br1', code: 'TB_E_POLICY_DENIED' }],
  ['the same caller elsewhere is allowed', { user: 999, groups: [100], request: 'network=other', expect: 'allow' }],
  ['the primary group', { user: 1300, gid: 100, request: 'bridge=br2', expect: 'allow', rule: 'team' }],
  ['a supplementary group', { user: 1300, groups: [100], request: 'bridge=br2', expect: 'allow', rule: 'team' }],
  ['a group by name', { user: 1300, groups: ['users'], request: 'bridge=br2', expect: 'allow', rule: 'team' }],
  ['a group given as digits', { user: '1300', groups: ['100'], request: 'bridge=br2', expect: 'allow' }],
  ['no group: default deny', { user: 1300, request: 'bridge=br2', expect: 'deny', code: 'TB_E_POLICY_DENIED' }],
  ['deny by a supplementary group', { user: 1234, groups: [600], request: 'bridge=br2', expect: 'deny', rule: 'no-interns' }],
  ['deny by the primary group', { user: 1234, gid: 600, request: 'bridge=br2', expect: 'deny', rule: 'no-interns' }],
  ['persistent: a rule without persistent = true denies it',
    { user: 1234, request: 'bridge=br2,persistent=on', expect: 'deny', rule: 'team', code: 'TB_E_POLICY_DENIED' }],
  ['persistent: a rule with it grants it', { user: 1500, request: 'bridge=br2,persistent=on', expect: 'allow', rule: 'keep' }],
  ['persistent with vhost: the grammar refuses it before the policy',
    { user: 1500, request: 'bridge=br2,persistent=on,vhost=on', expect: 'deny', code: 'TB_E_INVALID_REQUEST' }],
  ['quota: under it', { user: 1234, request: 'bridge=br1', expect: 'allow', devices: { team: 1 } }],
  ['quota: at it', { user: 1234, request: 'bridge=br1', expect: 'deny', rule: 'team', code: 'TB_E_QUOTA_EXCEEDED',
    devices: { team: 2 } }],
  ['quota: another rule\'s devices do not count', { user: 1234, request: 'bridge=br1', expect: 'allow', devices: { keep: 9 } }],
  ['queues over the rule\'s limit', { user: 1234, request: 'bridge=br1,queues=8', expect: 'deny', code: 'TB_E_POLICY_DENIED' }],
  ['queues out of range: the grammar', { user: 1234, request: 'bridge=br1,queues=200', expect: 'deny',
    code: 'TB_E_INVALID_QUEUES' }],
  ['vhost the rule does not allow', { user: 1234, request: 'bridge=br1,vhost=on', expect: 'deny', rule: 'team' }],
  ['a multicast MAC', { user: 1234, request: 'bridge=br1,mac=01:00:5e:00:00:01', expect: 'deny', code: 'TB_E_INVALID_MAC' }],
  ['a MAC outside the prefix', { user: 1234, request: 'bridge=br1,mac=02:00:00:00:00:01', expect: 'deny', rule: 'team',
    code: 'TB_E_INVALID_MAC' }],
  ['a MAC in upper case is sent in lower case', { user: 1234, request: 'bridge=br1,mac=52:54:00:AB:CD:EF', expect: 'allow' }],
  ['a name that fits the pattern', { user: 1234, request: 'bridge=br1,name=tb1234-vm0', expect: 'allow' }],
  ['a name that does not', { user: 1234, request: 'bridge=br1,name=tb1-vm0', expect: 'deny', code: 'TB_E_INVALID_NAME' }],
  ['a bridge name the kernel would refuse', { user: 1234, request: 'bridge=a-name-far-too-long', expect: 'deny',
    code: 'TB_E_INVALID_NAME' }],
  ['everyone, by "*"', { user: 4242, request: 'bridge=pub0', expect: 'allow', rule: 'everyone' }],
  ['macvtap in an allowed mode', { user: 4242, request: 'macvtap=eth0,mode=vepa', expect: 'allow', rule: 'everyone' }],
  ['macvtap in another mode', { user: 4242, request: 'macvtap=eth0,mode=passthru', expect: 'deny', rule: 'everyone' }],
  ['an undefined network', { user: 1234, request: 'network=nowhere', expect: 'deny', code: 'TB_E_POLICY_DENIED' }],
  ['root by name', { user: 'root', request: 'bridge=pub0', expect: 'allow' }],
];

test('every case of the table holds under the policy', (t) => {
  const rows = HOLDING.map(([name, row]) => ({ name, ...row }));
  const results = run(TEAM, cases(...rows));
  t.is(results.length, HOLDING.length);
  for (const r of results) t.true(r.passed, `${r.name}: ${r.failure}`);
});

test('a case that does not hold: what was expected, what was decided, by which rule, and its message', (t) => {
  const text = cases(
    { name: 'fine', user: 1234, request: 'bridge=br1', expect: 'allow' },
    { name: '999 on br1', user: 999, groups: [100], request: 'bridge=br1', expect: 'allow' },
    { user: 1234, request: 'bridge=br1', expect: 'deny' },
  );
  const r = runPolicyTests(TEAM, text);
  t.deepEqual([r.passed, r.failed], [1, 2]);
  const [, denied, allowed] = r.results;
  t.is(denied!.line, lineOf(text, '999 on br1') - 1);
  t.is(denied!.failure, `expected allow, got deny by rule \`no-br1' (line ${lineOf(TEAM, 'name = "no-br1"') - 1}) `
    + "with TB_E_POLICY_DENIED: denied by rule `no-br1'");
  // Network lab leads onto br1: the caller's rules give it, and the deny of br1 closes it too.
  t.is(denied!.decided.hint, 'the deny rule covers bridges br1; networks lab; another bridge may be allowed');
  // No name: `case N`, N counted from 1.
  t.is(allowed!.name, 'case 3');
  t.is(allowed!.line, text.split('\n').map((l, i) => [l, i + 1] as const).filter(([l]) => l === '[[case]]')[2]![1]);
  t.regex(allowed!.failure!, /^expected deny, got allow by rule `team' \(line \d+\)$/);
});

test('an expected rule that differs fails, though the decision is the same', (t) => {
  const [r] = run(TEAM, cases({ user: 1234, request: 'bridge=pub0', expect: 'allow', rule: 'team' }));
  t.false(r!.passed);
  t.regex(r!.failure!, /^expected allow by rule `team', got allow by rule `everyone' \(line \d+\)$/);
  const [q] = run(TEAM, cases({ user: 1234, request: 'bridge=br1', expect: 'deny', code: 'TB_E_QUOTA_EXCEEDED',
    devices: { team: 1 } }));
  t.false(q!.passed, 'under quota: allowed, not the expected code');
  const [c] = run(TEAM, cases({ user: 1234, request: 'bridge=br1', expect: 'deny', code: 'TB_E_QUOTA_EXCEEDED',
    devices: { team: 2 } }));
  t.true(c!.passed, c!.failure ?? '');
  t.regex(c!.decided.message, /allows 2 live devices per user and you hold 2/);
});

test('a deny rule by group holds for members by the account database, as the loader resolved it', (t) => {
  // root's primary group is 0 in every passwd: a member by the database whatever the case's groups say.
  const policy = `
[[rule]]
name = "all"
users = ["*"]
bridges = ["br0"]

[[deny]]
name = "not-group-0"
groups = [0]
`;
  const results = run(policy, cases(
    { user: 0, gid: 4242, request: 'bridge=br0', expect: 'deny', rule: 'not-group-0' },
    { user: 4242, request: 'bridge=br0', expect: 'allow' },
    { user: 4242, groups: ['root'], request: 'bridge=br0', expect: 'deny', rule: 'not-group-0' },
  ));
  for (const r of results) t.true(r.passed, `${r.name}: ${r.failure}`);
  t.deepEqual(results.map((r) => r.caller), [
    { uid: 0, gid: 4242, groups: [], user: 'root' },
    // No account: no primary group (a uid's number is never taken for a gid, as the broker does not).
    { uid: 4242, gid: -1, groups: [], user: null },
    { uid: 4242, gid: -1, groups: [0], user: null },
  ]);
});

test('a Policy object and its text give the same results; the user name fills {user} patterns', (t) => {
  const text = `
[[rule]]
name = "named"
users = ["root"]
bridges = ["br0"]
name_pattern = "vm-{user}"
`;
  const c = cases(
    { user: 'root', request: 'bridge=br0,name=vm-root', expect: 'allow' },
    { user: 0, request: 'bridge=br0,name=vm-root', expect: 'allow' },
    { user: 'root', request: 'bridge=br0,name=vm-alice', expect: 'deny', code: 'TB_E_INVALID_NAME' },
  );
  const a = runPolicyTests(text, c);
  t.deepEqual(a, runPolicyTests(parsePolicy(text), c));
  t.is(a.passed, 3, JSON.stringify(a.results.map((r) => r.failure)));
});

test('a malformed cases file: every error, each at its line', (t) => {
  const text = `[[case]]
name = "typo"
user = 1234
request = "bridge=br1"
expect = "allow"
rules = "team"

[[case]]
user = 1234
request = "bridge=br1,colour=red"
expect = "allow"

[[case]]
user = 1234
request = "bridge=br1"

[[case]]
user = "no-such-user-tapbroker"
groups = ["no-such-group-tapbroker"]
request = "macvtap=eth0,mode=sideways"
expect = "deny"
code = "TB_E_NO_SUCH_BRIDGE"
devices = { tem = 1 }

[[case]]
user = 1234
request = "bridge=br1"
expect = "allow"
code = "TB_E_POLICY_DENIED"
`;
  const r = runPolicyTests(TEAM, text);
  t.deepEqual(r.results, [], 'no case runs');
  t.deepEqual(r.errors, [
    { line: 6, message: "case 1: unknown key `rules' (did you mean `rule'?)" },
    { line: 10, message: "case 2: request: `bridge=br1,colour=red': unknown key `colour'; known: bridge, network, "
      + 'macvtap, mode, queues, vhost, mac, name, persistent, group' },
    { line: 13, message: 'case 3: expect: missing (expect = "allow" or "deny")' },
    { line: 18, message: "case 4: user: no user `no-such-user-tapbroker' on this host (give a uid instead)" },
    { line: 19, message: "case 4: groups.0: no group `no-such-group-tapbroker' on this host (give a gid instead)" },
    { line: 20, message: "case 4: request: `macvtap=eth0,mode=sideways': mode must be one of bridge, vepa, private, "
      + "passthru, not `sideways'" },
    { line: 22, message: "case 4: code: `TB_E_NO_SUCH_BRIDGE' is not one a decision gives; those are "
      + 'TB_E_POLICY_DENIED, TB_E_QUOTA_EXCEEDED, TB_E_INVALID_NAME, TB_E_INVALID_MAC, TB_E_INVALID_QUEUES, '
      + 'TB_E_INVALID_REQUEST, TB_E_MAC_LOCK' },
    { line: 23, message: "case 4: devices.tem: the policy has no allow rule `tem' (did you mean `team'?)" },
    { line: 29, message: 'case 5: code: is for expect = "deny"' },
  ]);
});

test('a malformed cases file: no case, an unknown table, bad types, TOML syntax', (t) => {
  t.deepEqual(runPolicyTests(TEAM, '').errors, [{ line: 1, message: 'no [[case]]: a cases file holds at least one' }]);
  t.deepEqual(runPolicyTests(TEAM, 'case = []\n').errors,
    [{ line: 1, message: 'no [[case]]: a cases file holds at least one' }]);
  t.deepEqual(runPolicyTests(TEAM, `${cases({ user: 1, request: 'bridge=br1', expect: 'allow' })}\n[[cases]]\n`).errors,
    [{ line: 6, message: "top level: unknown key `cases' (did you mean `case'?)" }]);
  const types = runPolicyTests(TEAM, cases({ user: 1, request: 5, expect: 'maybe', gid: -1, devices: { team: 'x' } }));
  t.deepEqual(types.errors.map((e) => [e.line, e.message.replace(/:.*/s, '')]), [
    [3, 'case 1'], [4, 'case 1'], [5, 'case 1'], [6, 'case 1'],
  ]);
  t.regex(types.errors[0]!.message, /^case 1: request: .*expected string/);
  t.regex(types.errors[1]!.message, /^case 1: expect: .*"allow"\|"deny"/);
  const syntax = runPolicyTests(TEAM, '[[case]\nuser = 1\n').errors;
  t.is(syntax.length, 1);
  t.is(syntax[0]!.line, 1);
  t.is(typeof syntax[0]!.column, 'number');
});

test('an invalid policy text throws TB_E_POLICY_INVALID, as parsePolicy does', (t) => {
  t.throws(() => runPolicyTests('[[rule]]\nname = "x"\nusers = [1]\n', cases({ user: 1, request: 'bridge=b', expect: 'deny' })),
    { message: /allows no bridges/ });
});

test('SPECs: the client grammar for the keys that reach the broker', (t) => {
  t.deepEqual(parseRequest('bridge=br0'), { kind: 'tap', bridge: 'br0', queues: 1, vhost: false, persistent: false });
  t.deepEqual(parseRequest('network=lab,queues=4,vhost=on,name=tb1-x,mac=52:54:00:AA:BB:CC'), {
    kind: 'tap', network: 'lab', queues: 4, vhost: true, persistent: false, name: 'tb1-x', mac: '52:54:00:aa:bb:cc',
  });
  t.deepEqual(parseRequest('macvtap=eth0,persistent=on'),
    { kind: 'macvtap', parent: 'eth0', mode: 'bridge', queues: 1, vhost: false, persistent: true });
  const bad: Array<[string, RegExp]> = [
    ['', /is not key=value/],
    ['br0', /`br0' is not key=value/],
    ['bridge=br0,network=lab', /exactly one of/],
    ['queues=2', /exactly one of/],
    ['bridge=br0,bridge=br1', /`bridge' given twice/],
    ['bridge=br0,mode=vepa', /mode= is for macvtap/],
    ['bridge=br0,vhost=yes', /vhost must be on or off/],
    ['bridge=br0,persistent=true', /persistent must be on or off/],
    ['bridge=br0,queues=two', /queues must be an integer/],
    ['bridge=br0,model=e1000', /only shapes qemu's command line/],
    ['bridge=br0,dev.romfile=', /only shapes qemu's command line/],
    ['bridge=br0,brdige=x', /did you mean `bridge'/],
    ['bridge=br\u001b[0m', /control character/],
  ];
  for (const [spec, why] of bad) t.regex(parseRequest(spec) as string, why, spec);
});

test('a port its rule locks but that cannot be locked is refused TB_E_MAC_LOCK, as the broker and `can` refuse it', (t) => {
  // Found by an outside review: test-policy passed `allow` where the broker refused, and a case could not even
  // expect the code.
  const policy = '[[rule]]\nname = "locked"\nusers = [1500]\nmacvtap = [{ parent = "eth0" }]\nmac_lock = true\n';
  const [denied, allowed] = run(policy, cases(
    { user: 1500, request: 'macvtap=eth0', expect: 'deny', code: 'TB_E_MAC_LOCK', rule: 'locked' },
    { user: 1500, request: 'macvtap=eth0', expect: 'allow' },
  ));
  t.true(denied!.passed, denied!.failure ?? '');
  t.false(allowed!.passed);
  t.regex(allowed!.failure ?? '', /got deny by rule `locked' \(line 1\) with TB_E_MAC_LOCK: rule `locked' locks ports/);
});

test('callers are screened by the host\'s subordinate ids, as the broker screens them at accept', (t) => {
  // Found in a final read: test-policy allowed what the broker refuses for a subordinate uid, a rule group had
  // only as a subordinate gid, and a persistent tap given to a group in a subordinate gid range.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-subids-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  fs.writeFileSync(path.join(dir, 'subuid'), 'nobody:4100000:65536\n');
  fs.writeFileSync(path.join(dir, 'subgid'), 'nobody:4200000:65536\n');
  const host = { subuids: new Subuids(path.join(dir, 'subuid')), subgids: new Subuids(path.join(dir, 'subgid')) };
  const policy = [
    '[[rule]]', 'name = "anyone"', 'users = ["*"]', 'bridges = ["br0"]', 'persistent = true',
    '[[rule]]', 'name = "team"', 'users = []', 'groups = [4200500]', 'bridges = ["br1"]',
  ].join('\n');
  const text = cases(
    { name: 'subuid', user: 4100005, request: 'bridge=br0', expect: 'allow' },
    { name: 'subgid member', user: 65534, groups: [4200500], request: 'bridge=br1', expect: 'allow' },
    { name: 'subgid primary', user: 65534, gid: 4200001, request: 'bridge=br0', expect: 'allow' },
    { name: 'subgid group=', user: 65534, groups: [4200500], request: 'bridge=br0,persistent=on,group=4200500',
      expect: 'allow' },
    { name: 'own group=', user: 65534, groups: [65534], request: 'bridge=br0,persistent=on,group=65534', expect: 'allow' },
  );
  // Without the host's files every case holds; with them, all but the last are refused as the broker refuses them.
  t.deepEqual(runPolicyTests(policy, text).results.map((r) => r.passed), [true, true, true, true, true]);
  const screened = runPolicyTests(policy, text, host).results;
  t.deepEqual(screened.map((r) => [r.name, r.decided.decision, r.decided.code]), [
    ['subuid', 'deny', 'TB_E_POLICY_DENIED'], ['subgid member', 'deny', 'TB_E_POLICY_DENIED'],
    ['subgid primary', 'deny', 'TB_E_POLICY_DENIED'], ['subgid group=', 'deny', 'TB_E_POLICY_DENIED'],
    ['own group=', 'allow', null],
  ]);
  t.regex(screened[0]!.decided.message, /uid 4100005 is a subordinate uid of nobody/);
  t.regex(screened[2]!.decided.message, /gid 4200001 is a subordinate gid of nobody/);
  // The broker drops the subgid from the caller's groups first, so it is not one of the caller's.
  t.regex(screened[3]!.decided.message, /you are not in group 4200500/);
  // A group the account database gives (nobody's nogroup, 65534) that lies in a subordinate range stays the
  // caller's, and a tap is still not given to it.
  fs.writeFileSync(path.join(dir, 'subgid'), 'root:65534:1\n');
  const [given] = runPolicyTests(policy, cases(
    { user: 65534, groups: [65534], request: 'bridge=br0,persistent=on,group=65534', expect: 'allow' },
  ), host).results;
  t.is(given!.decided.code, 'TB_E_POLICY_DENIED');
  t.regex(given!.decided.message, /group 65534 lies in the subordinate gid range of root/);
});

test('group= names a gid or a group, and no such group is an error of the cases file', (t) => {
  t.like(parseRequest('bridge=br0,persistent=on,group=0'), { group: 0 });
  t.like(parseRequest('bridge=br0,persistent=on,group=root'), { group: 0 });
  t.regex(String(parseRequest('bridge=br0,persistent=on,group=no-such-group-x')), /no group `no-such-group-x'/);
});
