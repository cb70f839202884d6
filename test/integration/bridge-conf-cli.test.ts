// `tapbrokerd import-bridge-conf` as an administrator runs it: its policy passes check-policy; a
// malformed ACL file gives FILE:LINE errors, status 65 and no policy.
import test from 'ava';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BROKER_MAIN } from '../helpers/broker.js';

let dir: string;
test.before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-bridge-conf-cli-'));
  fs.chmodSync(dir, 0o755);
});
test.after.always(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

function tapbrokerd(...args: string[]) {
  const r = spawnSync(process.execPath, [BROKER_MAIN, ...args], { encoding: 'utf8', timeout: 20_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

test('the policy it prints is one check-policy accepts', (t) => {
  const conf = path.join(dir, 'bridge.conf');
  const kvm = path.join(dir, 'kvm.conf');
  fs.writeFileSync(conf, `# lab\nallow br0\ndeny br9\ninclude ${kvm}\ninclude ${path.join(dir, 'gone.conf')}\n`);
  fs.writeFileSync(kvm, 'allow all\n');
  fs.chownSync(kvm, 0, 65534);
  fs.chmodSync(kvm, 0o640);
  const r = tapbrokerd('import-bridge-conf', conf);
  t.is(r.code, 0, r.stderr);
  t.regex(r.stdout, new RegExp(`^# from ${conf}:2: allow br0$`, 'm'));
  t.regex(r.stdout, /^bridges = \["\*"\]$/m);
  t.regex(r.stderr, new RegExp(`^${conf}:5: warning: include .*gone\\.conf: no such file`, 'm'));
  const policy = path.join(dir, 'policy.toml');
  fs.writeFileSync(policy, r.stdout);
  const check = tapbrokerd('check-policy', policy);
  t.is(check.code, 0, check.stderr);
  t.regex(check.stdout, /ok: 2 rules, 1 deny rule,/);
  t.regex(check.stdout, /allows taps on every Linux bridge on this host, present and future/);
});

test('a malformed file: FILE:LINE errors on stderr, status 65, nothing on stdout', (t) => {
  const conf = path.join(dir, 'bad.conf');
  fs.writeFileSync(conf, 'allow br0\nallow br0 br1\npermit br2\n');
  const r = tapbrokerd('import-bridge-conf', conf);
  t.is(r.code, 65);
  t.is(r.stdout, '');
  t.regex(r.stderr, new RegExp(`^${conf}:2: error: .*one bridge name`, 'm'));
  t.regex(r.stderr, new RegExp(`^${conf}:3: error: unknown command \`permit'`, 'm'));
});

test('a file that is not there is status 66; --help is status 0; two files are a usage error', (t) => {
  t.is(tapbrokerd('import-bridge-conf', path.join(dir, 'none.conf')).code, 66);
  const help = tapbrokerd('import-bridge-conf', '--help');
  t.is(help.code, 0);
  t.regex(help.stdout, /usage: tapbrokerd import-bridge-conf \[file\]/);
  t.is(tapbrokerd('import-bridge-conf', 'a', 'b').code, 64);
  t.regex(tapbrokerd('--help').stdout, /tapbrokerd import-bridge-conf \[file\]/);
});

// Found by an outside review: run by a user who could not read an include, the import skipped it with a warning
// and exited 0, so that file's deny lines were lost and the policy granted what they refuse.
test('an include it cannot read is an error, not a skipped file: its deny lines would be lost', (t) => {
  const conf = path.join(dir, 'guests.conf');
  const denies = path.join(dir, 'deny-guests.conf');
  fs.writeFileSync(conf, `allow all\ninclude ${denies}\n`, { mode: 0o644 });
  fs.writeFileSync(denies, 'deny br0\n');
  fs.chownSync(denies, 0, 64101);
  fs.chmodSync(denies, 0o640);
  const r = spawnSync(process.execPath, [BROKER_MAIN, 'import-bridge-conf', conf],
    { encoding: 'utf8', timeout: 20_000, uid: 64001, gid: 64001 });
  t.is(r.status, 65, r.stdout);
  t.is(r.stdout, '', 'no policy');
  t.regex(r.stderr, new RegExp(`^${conf}:2: error: include .*deny-guests\\.conf: .*its deny lines may not be left out`, 'm'));
});
