// tapbrokerd's command line as an administrator meets it: per-command help, short usage errors,
// --opt=value, and -n printing what check-policy prints. No broker is started.
import test from 'ava';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT, tempDir } from '../helpers/broker.js';

const MAIN = path.join(ROOT, 'packages/broker/dist/main.js');
const run = (...args: string[]) => spawnSync(process.execPath, [MAIN, ...args], { encoding: 'utf8', timeout: 30_000 });

let dir: string;
let policy: string;
test.before(() => {
  dir = tempDir('dcli');
  policy = path.join(dir, 'policy.toml');
  fs.writeFileSync(policy, '[[rule]]\nname = "r"\nusers = ["*"]\nbridges = ["br0"]\n', { mode: 0o644 });
});
test.after.always(() => fs.rmSync(dir, { recursive: true, force: true }));

for (const tool of ['check-policy', 'explain-policy', 'who-can', 'import-bridge-conf']) {
  test(`tapbrokerd ${tool} --help prints its usage on stdout and exits 0`, (t) => {
    const r = run(tool, '--help');
    t.is(r.status, 0, r.stderr);
    t.true(r.stdout.startsWith(`usage: tapbrokerd ${tool}`));
    t.is(r.stderr, '');
  });
}

test('a tool\'s usage error names the problem and that tool\'s usage only', (t) => {
  const r = run('who-can', policy);
  t.is(r.status, 64);
  t.is(r.stderr, 'tapbrokerd: who-can needs exactly one of --bridge, --macvtap or --network\n'
    + 'usage: tapbrokerd who-can [file] [--fragments dir] (--bridge name | --network name | --macvtap parent [--mode mode]) [--json]\n'
    + 'see tapbrokerd who-can --help\n');
  t.is(run('check-policy', '--json=yes', policy).status, 64, 'a flag given a value');
});

test('the daemon\'s usage error shows the daemon\'s usage, not every tool\'s', (t) => {
  const r = run('--idle-exit');
  t.is(r.status, 64);
  t.regex(r.stderr, /^tapbrokerd: option --idle-exit needs a value\nusage: tapbrokerd \[-n\]/);
  t.notRegex(r.stderr, /check-policy/);
  t.regex(r.stderr, /see tapbrokerd --help\n$/);
});

test('long options take --opt=value as well as --opt value', (t) => {
  t.is(run('-n', '-f', policy, '--idle-exit=30', '--journal-socket=', '--state-dir=/nonexistent').status, 0);
  t.regex(run('-n', '-f', policy, '--idle-exit=soon').stderr, /bad idle time `soon'/);
  const who = run('who-can', policy, '--bridge=br0', '--json');
  t.is(who.status, 0, who.stderr);
  t.truthy(JSON.parse(who.stdout));
});

test('who-can names groups as the account database does, and a gid it cannot look up as a number', (t) => {
  const file = path.join(dir, 'groups.toml');
  const name = fs.readFileSync('/etc/group', 'utf8').split('\n').map((l) => l.split(':')).find((f) => f[2] === '0')![0];
  fs.writeFileSync(file, '[[rule]]\nname = "r"\ngroups = [0, 4000999]\nbridges = ["br0"]\n', { mode: 0o644 });
  const who = run('who-can', file, '--bridge=br0');
  t.is(who.status, 0, who.stderr);
  t.regex(who.stdout, new RegExp(`group ${name}, group 4000999`));
});

// Found by an outside review: -n said ok to an unknown -g group, which a start refuses (64) after making its state
// directory.
test('an unknown -g group is a usage error, with -n too, before anything is made', (t) => {
  const state = path.join(dir, 'state-g');
  for (const args of [['-n'], ['--state-dir', state, '-s', path.join(dir, 'sock-g', 'tb.sock')]]) {
    const r = run(...args, '-f', policy, '-g', 'no-such-group-tapbroker');
    t.is(r.status, 64, `${args[0]}: ${r.stderr}`);
    t.regex(r.stderr, /^tapbrokerd: no group `no-such-group-tapbroker'\n/);
  }
  t.false(fs.existsSync(state), 'the state directory was made');
  t.false(fs.existsSync(path.join(dir, 'sock-g')), 'the socket\'s directory was made');
  t.is(run('-n', '-f', policy, '-g', '0').status, 0, 'a gid is taken as it is');
});

test('-n prints exactly what check-policy prints, on the same streams', (t) => {
  const n = run('-n', '-f', policy);
  const check = run('check-policy', policy);
  t.is(n.status, 0);
  t.is(n.stdout, check.stdout);
  t.is(n.stderr, check.stderr);
  t.regex(n.stdout, /warning: rule `r' matches every user\n/);
  t.regex(n.stdout, /ok: 1 rule, 0 deny rules, 1 warning, sha256 [0-9a-f]{64}\n$/);
});

test('check-policy --strict fails on warnings, for pipelines', (t) => {
  t.is(run('check-policy', '--strict', policy).status, 1);
  const clean = path.join(dir, 'clean.toml');
  fs.writeFileSync(clean, '[[rule]]\nname = "r"\nusers = [0]\nbridges = ["br-none-here"]\n', { mode: 0o644 });
  const r = run('check-policy', clean, '--strict');
  t.is(r.status, 0, r.stdout);
});

// Found by an outside review: a NIC named as a bridge got only "pin its MAC", which does not help (every grant
// is TB_E_NOT_A_BRIDGE), and names that exist nowhere (typos) got nothing.
test('check-policy says which bridges and macvtap parents are missing or not bridges, at their rule\'s line', (t) => {
  const ns = `tbt-dcli-${process.pid}`;
  const ip = (...a: string[]) => spawnSync('ip', ['-n', ns, ...a], { encoding: 'utf8' });
  spawnSync('ip', ['netns', 'add', ns]);
  try {
    ip('link', 'add', 'br-real', 'type', 'bridge', 'mcast_snooping', '0');
    ip('link', 'set', 'br-real', 'address', '02:00:5e:00:00:09');
    // Snooping on (the kernel's default): a guest's reports can turn it off (an outside review); a note says so.
    ip('link', 'add', 'br-snoop', 'type', 'bridge', 'mcast_hash_max', '512');
    ip('link', 'set', 'br-snoop', 'address', '02:00:5e:00:00:0a');
    ip('link', 'add', 'nic0', 'type', 'veth', 'peer', 'name', 'nic1');
    const file = path.join(dir, 'kinds.toml');
    fs.writeFileSync(file, '[[rule]]\nname = "a"\nusers = [0]\nbridges = ["br-real"]\n\n[[rule]]\nname = "b"\n'
      + 'users = [0]\nbridges = ["br-typo", "nic0"]\nmacvtap = [{ parent = "eht0" }, { parent = "nic0" }]\n\n'
      + '[[rule]]\nname = "c"\nusers = [0]\nbridges = ["br-snoop"]\n', { mode: 0o644 });
    const r = spawnSync('ip', ['netns', 'exec', ns, process.execPath, MAIN, 'check-policy', file], { encoding: 'utf8' });
    t.is(r.status, 0, r.stderr);
    t.regex(r.stdout, /:6: note: bridge br-typo does not exist on this host now\n/);
    t.regex(r.stdout, /:6: warning: nic0 is not a Linux bridge: grants on it are refused with TB_E_NOT_A_BRIDGE/);
    t.regex(r.stdout, /:6: note: macvtap parent eht0 does not exist on this host now\n/);
    t.regex(r.stdout, /:12: note: bridge br-snoop has multicast snooping on: a guest's IGMP\/MLD reports for more than 512 groups \(mcast_hash_max\) make the kernel turn it off for the whole bridge; .*\(ip link set br-snoop type bridge mcast_snooping 0\)\n/);
    t.notRegex(r.stdout, /br-real|parent nic0|nic0 has no fixed MAC/);
  } finally {
    spawnSync('ip', ['netns', 'del', ns]);
  }
});

// Found by an outside review: with their output on a full disk, the tools died on Node's unhandled write error
// (a stack trace, status 1: what a failed case or a --strict warning exits with in the CI pipeline tapbrokerd(8)
// shows), and an import's truncated policy read as a result.
test('a tool whose output cannot be written exits 74 (EX_IOERR), without a stack trace', (t) => {
  const cases = path.join(dir, 'cases.toml');
  fs.writeFileSync(cases, '[[case]]\nuser = 0\nrequest = "bridge=br0"\nexpect = "allow"\n');
  const conf = path.join(dir, 'bridge.conf');
  fs.writeFileSync(conf, 'allow br0\n');
  const full = fs.openSync('/dev/full', 'w');
  t.teardown(() => fs.closeSync(full));
  for (const argv of [['-n', '-f', policy], ['check-policy', policy], ['explain-policy', policy, '--user', 'root'],
    ['who-can', policy, '--bridge', 'br0'], ['test-policy', policy, cases], ['import-bridge-conf', conf]]) {
    const r = spawnSync(process.execPath, [MAIN, ...argv], { encoding: 'utf8', timeout: 30_000, stdio: ['ignore', full, 'pipe'] });
    t.is(r.status, 74, `${argv.join(' ')}: ${r.stderr}`);
    t.notRegex(r.stderr, /Unhandled|at .*\.js:\d+/, argv[0]);
  }
});

// Found by an outside review of an install under systemd: every line was stored at info priority, so
// `journalctl -p warning -u tapbrokerd` showed the unit failed but never why. Under journald (fd 2 is the stream
// JOURNAL_STREAM names: here a file, as journald names its socket) each line opens with its sd-daemon(3) priority;
// anywhere else, the lines are as before.
test('under journald each line carries its priority: a refused start err, a warning warning; elsewhere no prefix', (t) => {
  const state = path.join(dir, 'open-state');
  fs.mkdirSync(state, { mode: 0o777 });
  fs.chmodSync(state, 0o777);
  const warned = path.join(dir, 'warned.toml');
  fs.writeFileSync(warned, '[[rule]]\nname = "r"\nusers = ["no-such-user-tb"]\nbridges = ["br0"]\n', { mode: 0o644 });
  const bad = path.join(dir, 'bad.toml');
  // And an unknown key holding a terminal escape: its error line shows it escaped, as warnings are (a re-test).
  fs.writeFileSync(bad, '[[rule]]\nname = "r"\nusers = ["*"]\nmax_queues = "4"\n"k\\u001b[2J" = 1\n', { mode: 0o644 });
  const start = (file: string, journal: boolean) => {
    const err = path.join(dir, 'stderr.log');
    const fd = fs.openSync(err, 'w');
    try {
      const st = fs.fstatSync(fd);
      const env = { ...process.env, JOURNAL_STREAM: journal ? `${st.dev}:${st.ino}` : '0:1' };
      const r = spawnSync(process.execPath, [MAIN, '-f', file, '--state-dir', state, '-s', path.join(dir, 's.sock'),
        '--journal-socket', ''], { stdio: ['ignore', 'ignore', fd], env, timeout: 30_000 });
      return { status: r.status, lines: fs.readFileSync(err, 'utf8').split('\n').filter(Boolean) };
    } finally {
      fs.closeSync(fd);
    }
  };
  const refused = start(warned, true);
  t.is(refused.status, 78, refused.lines.join('\n'));
  t.true(refused.lines.some((l) => /^<4>tapbrokerd: warning: .*no-such-user-tb/.test(l)), refused.lines.join('\n'));
  t.true(refused.lines.some((l) => /^<3>tapbrokerd: the state directory .* refusing to start$/.test(l)),
    refused.lines.join('\n'));
  t.true(refused.lines.every((l) => /^<[346]>tapbrokerd: /.test(l)), refused.lines.join('\n'));
  const invalid = start(bad, true);
  t.is(invalid.status, 78);
  t.true(invalid.lines.length > 0 && invalid.lines.every((l) => /^<3>tapbrokerd: /.test(l)), invalid.lines.join('\n'));
  t.true(invalid.lines.some((l) => /max_queues/.test(l)), invalid.lines.join('\n'));
  t.true(invalid.lines.some((l) => l.includes('unknown key `k\\x1b[2J')), invalid.lines.join('\n'));
  t.false(invalid.lines.some((l) => l.includes('\u001b')), 'a raw escape in the log');
  // Another stream (a terminal, a pipe, a file journald does not read): no prefix.
  const plain = start(warned, false);
  t.is(plain.status, 78);
  t.true(plain.lines.length > 0 && plain.lines.every((l) => l.startsWith('tapbrokerd: ')), plain.lines.join('\n'));
  fs.rmSync(state, { recursive: true, force: true });
});
