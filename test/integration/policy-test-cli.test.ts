// `tapbrokerd test-policy` as a CI job runs it: status 0 when every case holds, 1 with one line per
// failing case and a summary, 65 with FILE:LINE errors for a malformed cases file, 78 for a bad policy.
import test from 'ava';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BROKER_MAIN } from '../helpers/broker.js';

let dir: string;
const file = (name: string, text: string) => {
  const p = path.join(dir, name);
  fs.writeFileSync(p, text);
  return p;
};
let policy: string;

test.before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-policy-test-cli-'));
  policy = file('policy.toml', `[network.lab]
bridge = "br1"

[[rule]]
name = "team"
users = [1234]
bridges = ["br1"]
networks = ["lab"]
max_devices = 2

[[deny]]
name = "no-999"
users = [999]
bridges = ["br1"]
`);
});
test.after.always(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

function tapbrokerd(...args: string[]) {
  const r = spawnSync(process.execPath, [BROKER_MAIN, ...args], { encoding: 'utf8', timeout: 20_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

const HOLDING = `[[case]]
name = "1234 may use br1"
user = 1234
request = "bridge=br1"
expect = "allow"
rule = "team"

[[case]]
name = "999 may not reach br1 through lab"
user = 999
request = "network=lab"
expect = "deny"
rule = "no-999"

[[case]]
user = 1234
request = "bridge=br1"
expect = "deny"
code = "TB_E_QUOTA_EXCEEDED"
devices = { team = 2 }
`;

test('every case holds: status 0 and the summary alone', (t) => {
  const r = tapbrokerd('test-policy', policy, file('ok.toml', HOLDING));
  t.is(r.code, 0, r.stderr);
  t.is(r.stdout, '3 cases, 3 passed, 0 failed\n');
  t.is(r.stderr, '');
});

test('a failing case: status 1, FILE:LINE with the case, what was expected and what was decided', (t) => {
  const cases = file('fail.toml', `${HOLDING}
[[case]]
name = "999 on br1"
user = 999
request = "bridge=br1"
expect = "allow"

[[case]]
user = 1234
request = "bridge=br1,persistent=on"
expect = "allow"
`);
  const r = tapbrokerd('test-policy', policy, cases);
  t.is(r.code, 1, r.stderr);
  t.deepEqual(r.stdout.split('\n'), [
    `${cases}:22: fail: 999 on br1: expected allow, got deny by rule \`no-999' (line 11) with TB_E_POLICY_DENIED: `
      + "denied by rule `no-999'",
    `${cases}:28: fail: case 5: expected allow, got deny by rule \`team' (line 4) with TB_E_POLICY_DENIED: `
      + "rule `team' does not allow persistent devices",
    '5 cases, 3 passed, 2 failed',
    '',
  ]);
  const json = tapbrokerd('test-policy', policy, cases, '--json');
  t.is(json.code, 1);
  const out = JSON.parse(json.stdout);
  t.like(out, { policy, cases_file: cases, ok: false, cases: 5, passed: 3, failed: 2 });
  t.like(out.results[3], {
    index: 4, name: '999 on br1', line: 22, passed: false,
    expected: { decision: 'allow', rule: null, code: null },
    decided: { decision: 'deny', rule: 'no-999', line: 11, code: 'TB_E_POLICY_DENIED' },
  });
});

test('a malformed cases file: status 65, FILE:LINE: error: lines on stderr, no case run', (t) => {
  const cases = file('bad.toml', `[[case]]
user = 1234
request = "bridge=br1,colour=red"
expect = "allow"

[[case]]
user = 1234
request = "bridge=br1"
expcet = "deny"
`);
  const r = tapbrokerd('test-policy', policy, cases);
  t.is(r.code, 65);
  t.is(r.stdout, '');
  t.deepEqual(r.stderr.split('\n'), [
    `${cases}:3: error: case 1: request: \`bridge=br1,colour=red': unknown key \`colour'; known: bridge, network, `
      + 'macvtap, mode, queues, vhost, mac, name, persistent, group',
    `${cases}:6: error: case 2: expect: missing (expect = "allow" or "deny")`,
    `${cases}:9: error: case 2: unknown key \`expcet' (did you mean \`expect'?)`,
    '',
  ]);
  const json = tapbrokerd('test-policy', policy, cases, '--json');
  t.is(json.code, 65);
  t.is(JSON.parse(json.stdout).errors.length, 3);
});

test('an invalid policy is status 78 as check-policy reports it; a missing cases file 66', (t) => {
  const bad = file('bad-policy.toml', '[[rule]]\nname = "x"\nusers = [1]\n');
  const r = tapbrokerd('test-policy', bad, file('ok2.toml', HOLDING));
  t.is(r.code, 78);
  t.is(r.stderr, tapbrokerd('check-policy', bad).stderr);
  t.is(tapbrokerd('test-policy', policy, path.join(dir, 'none.toml')).code, 66);
});

test('usage: --help, one file is the cases (the policy is the default), none or three is status 64', (t) => {
  const help = tapbrokerd('test-policy', '--help');
  t.is(help.code, 0);
  t.regex(help.stdout, /^usage: tapbrokerd test-policy \[policy\] cases \[--fragments dir\] \[--json\]$/m);
  t.regex(tapbrokerd('--help').stdout, /tapbrokerd test-policy \[file\] cases \[--fragments dir\] \[--json\]/);
  // One argument is the cases file: the policy is /etc/tapbroker/policy.toml (absent here, or not this one).
  const one = tapbrokerd('test-policy', file('ok3.toml', HOLDING));
  t.not(one.code, 64, one.stderr);
  if (!fs.existsSync('/etc/tapbroker/policy.toml')) {
    t.is(one.code, 78);
    t.regex(one.stderr, /^\/etc\/tapbroker\/policy\.toml:-: error: cannot read the policy: /);
  }
  for (const args of [[], ['a', 'b', 'c'], [policy, '--strict']]) {
    const r = tapbrokerd('test-policy', ...args);
    t.is(r.code, 64, args.join(' '));
    t.regex(r.stderr, /^usage: tapbrokerd test-policy/m);
  }
});
