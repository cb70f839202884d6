// `tapbroker run` and `tapbroker qemu-args` as a user runs them: exit status, signals, errors, env.
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { BrokerProcess, CLIENT_CLI, tempDir } from '../helpers/broker.js';
import { Netns } from '../helpers/netns.js';
import { NOBODY, setprivArgs, spawnAs } from '../helpers/unpriv.js';

let ns: Netns;
let broker: BrokerProcess;

test.before(async () => {
  ns = Netns.create('cli');
  ns.bridge('br0', { mtu: 1450 });
  broker = await BrokerProcess.start(ns, `[[rule]]\nname = "cli"\nusers = [${NOBODY}]\nbridges = ["br0"]\nmax_queues = 2\n`, { tag: 'cli' });
});

test.after.always(async () => {
  await broker?.stop();
  ns?.destroy();
});

function tapbroker(args: string[], env: NodeJS.ProcessEnv = {}) {
  const r = spawnSync('setpriv', [...setprivArgs(), process.execPath, CLIENT_CLI, ...args], { encoding: 'utf8', env: { ...process.env, ...env }, timeout: 20_000 });
  return { code: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr };
}

test('run appends the netdev and device arguments and passes the fds at 3 and up', (t) => {
  const r = tapbroker(['run', '--socket', broker.socket, '--net', 'bridge=br0,queues=2,id=lan', '--', 'sh', '-c', 'echo "$@"; readlink /proc/$$/fd/3 /proc/$$/fd/4; test ! -e /proc/$$/fd/5 && echo no-fd-5', 'sh']);
  t.is(r.code, 0, r.stderr);
  const [args, fd3, fd4, none] = r.stdout.trim().split('\n');
  t.regex(args!, /^-netdev tap,id=lan,fds=3:4 -device virtio-net-pci,netdev=lan,mac=52:54:00:[0-9a-f:]{8},mq=on,vectors=6$/);
  t.is(fd3, '/dev/net/tun');
  t.is(fd4, '/dev/net/tun');
  t.is(none, 'no-fd-5', 'nothing else leaks into the child');
  t.regex(r.stderr, /tapbroker: tb65534-\S+ on br0 \(ifindex \d+, mtu 1450, mac 52:54:00:/);
});

test('run exits with the command\'s exit status', (t) => {
  t.is(tapbroker(['run', '--socket', broker.socket, '--net', 'bridge=br0', '--', 'sh', '-c', 'exit 3']).code, 3);
});

test('TAPBROKER_SOCKET names the socket when --socket is absent', (t) => {
  t.is(tapbroker(['run', '--net', 'bridge=br0', '--', 'true'], { TAPBROKER_SOCKET: broker.socket }).code, 0);
});

test('SIGTERM to the client reaches the command, and the client dies the same way', async (t) => {
  const child = spawnAs({}, process.execPath, [CLIENT_CLI, 'run', '--socket', broker.socket, '--net', 'bridge=br0', '--', 'sh', '-c', 'trap "echo got-term; exit 9" TERM; echo ready; while :; do sleep 0.05; done'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  await new Promise<void>((resolve) => child.stdout!.on('data', (d) => { out += d; if (out.includes('ready')) resolve(); }));
  child.kill('SIGTERM');
  const code = await new Promise<number | null>((resolve) => child.on('exit', (c) => resolve(c)));
  t.regex(out, /got-term/);
  t.is(code, 9, 'the command trapped TERM and exited 9; the client passes that on');
});

test('a command killed by a signal makes the client die by that signal', (t) => {
  const r = tapbroker(['run', '--socket', broker.socket, '--net', 'bridge=br0', '--', 'sh', '-c', 'kill -HUP $$']);
  t.is(r.signal, 'SIGHUP');
});

test('a refusal prints code, rule and hint, and exits 77', (t) => {
  const r = tapbroker(['run', '--socket', broker.socket, '--net', 'bridge=br0,queues=3', '--', 'true']);
  t.is(r.code, 77);
  t.regex(r.stderr, /TB_E_POLICY_DENIED: rule `cli' allows at most 2 queues, not 3/);
  t.regex(r.stderr, /hint: ask for 2 queues or fewer/);
});

test('no broker: exit 69 with the path, and what to check', (t) => {
  const r = tapbroker(['run', '--socket', '/nonexistent/tb.sock', '--net', 'bridge=br0', '--', 'true']);
  t.is(r.code, 69);
  t.regex(r.stderr, /TB_E_CONNECT: cannot connect to the broker at \/nonexistent\/tb\.sock/);
  t.regex(r.stderr, /hint: no broker listens there: is tapbrokerd\.socket enabled and started/);
});

test('a socket the user may not open: the hint names group tapbroker and logging in again', async (t) => {
  const { SeqpacketListener } = await import('@tapbroker/protocol');
  const fs = await import('node:fs');
  const dir = tempDir('cli-eacces');
  const listener = SeqpacketListener.listen(`${dir}/root-only.sock`, { mode: 0o600 });
  try {
    const r = tapbroker(['run', '--socket', `${dir}/root-only.sock`, '--net', 'bridge=br0', '--', 'true']);
    t.is(r.code, 69);
    t.regex(r.stderr, /permission denied \(EACCES\)/);
    t.regex(r.stderr, /hint: only root and members of group tapbroker may connect.*log in again/);
    // A socket file nothing accepts on any more (a broker killed without cleaning up).
    listener.close();
    const stale = SeqpacketListener.listen(`${dir}/stale2.sock`, { mode: 0o666 });
    // Close the fd but keep the node: the path now refuses connections.
    const { sys } = await import('@tapbroker/protocol');
    sys.close(stale.fd);
    const refused = tapbroker(['run', '--socket', `${dir}/stale2.sock`, '--net', 'bridge=br0', '--', 'true']);
    t.is(refused.code, 69);
    t.regex(refused.stderr, /hint: the socket exists but nothing accepts on it/);
  } finally {
    listener.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('usage errors exit 64', (t) => {
  t.is(tapbroker(['run', '--net', 'bridge=br0']).code, 64);
  t.is(tapbroker(['frobnicate']).code, 64);
});

test('qemu-args prints the arguments without asking the broker', (t) => {
  const r = tapbroker(['qemu-args', '--net', 'bridge=br0,queues=2,mac=52:54:00:00:00:01', '--net', 'bridge=br1,model=e1000']);
  t.is(r.code, 0, r.stderr);
  t.is(r.stdout.trim(), '-netdev tap,id=net0,fds=3:4 -device virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01,mq=on,vectors=6 -netdev tap,id=net1,fd=5 -device e1000,netdev=net1');
});

test('the broker refuses a second instance on a live socket', (t) => {
  const r = spawnSync('ip', ['netns', 'exec', ns.name, process.execPath, CLIENT_CLI.replace('client/dist/cli.js', 'broker/dist/main.js'), '-f', broker.policyPath, '-s', broker.socket], { encoding: 'utf8', timeout: 10_000 });
  t.is(r.status, 69);
  t.regex(r.stderr, /another broker is listening/);
  t.true(broker.alive);
});

test('tapbrokerd -n checks the policy and exits', (t) => {
  const main = CLIENT_CLI.replace('client/dist/cli.js', 'broker/dist/main.js');
  const ok = spawnSync(process.execPath, [main, '-n', '-f', broker.policyPath], { encoding: 'utf8' });
  t.is(ok.status, 0);
  t.regex(ok.stdout, /ok: 1 rule, 0 deny rules, sha256 [0-9a-f]{64}/);
  const bad = spawnSync(process.execPath, [main, '-n', '-f', '/nonexistent.toml'], { encoding: 'utf8' });
  t.is(bad.status, 78);
  const usage = spawnSync(process.execPath, [main, '-x'], { encoding: 'utf8' });
  t.is(usage.status, 64);
  t.regex(usage.stderr, /usage: tapbrokerd \[-n\] \[-f policy\] \[-s socket\]/);
});

test('output piped to a slow reader is never cut: check-policy --json of 2,000 rules arrives whole (review 15.1)', async (t) => {
  const fs = await import('node:fs');
  const os = await import('node:os');
  const path = await import('node:path');
  const { BROKER_MAIN } = await import('../helpers/broker.js');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-pipe-'));
  try {
    const file = path.join(dir, 'policy.toml');
    // Every rule matches everyone: one warning each, so the JSON runs to hundreds of KiB.
    const rules = Array.from({ length: 2000 }, (_, i) => `[[rule]]\nname = "r${i}"\nusers = ["*"]\nbridges = ["br${i % 100}"]\n`).join('\n');
    fs.writeFileSync(file, rules);
    // The reader sleeps first, so the pipe fills while the tool is already done writing.
    const r = spawnSync('sh', ['-c', `"${process.execPath}" "${BROKER_MAIN}" check-policy "${file}" --json | (sleep 1; cat)`], { encoding: 'utf8', maxBuffer: 64 << 20 });
    t.is(r.status, 0, r.stderr);
    t.true(r.stdout.length > 65536, `${r.stdout.length} bytes: more than one pipe's worth`);
    const parsed = JSON.parse(r.stdout) as { rules: number };
    t.is(parsed.rules, 2000);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a broker without CAP_NET_ADMIN refuses to start, with exit 77, which the unit does not restart', async (t) => {
  const fs = await import('node:fs');
  const { BROKER_MAIN, ROOT } = await import('../helpers/broker.js');
  const dir = tempDir('nocap');
  try {
    fs.writeFileSync(`${dir}/policy.toml`, `[[rule]]\nname = "r"\nusers = [${NOBODY}]\nbridges = ["br0"]\n`);
    // Root, but with CAP_NET_ADMIN out of its bounding and inheritable sets.
    const r = spawnSync('setpriv', ['--bounding-set', '-net_admin', '--inh-caps', '-net_admin', '--', process.execPath, BROKER_MAIN,
      '-f', `${dir}/policy.toml`, '-s', `${dir}/tb.sock`, '--state-dir', `${dir}/state`, '--journal-socket', ''], { encoding: 'utf8', timeout: 10_000 });
    t.is(r.status, 77);
    t.regex(r.stderr, /needs CAP_NET_ADMIN/);
    t.false(fs.existsSync(`${dir}/tb.sock`), 'it never listened');
    t.regex(fs.readFileSync(`${ROOT}/systemd/tapbrokerd.service`, 'utf8'), /^RestartPreventExitStatus=.*\b77\b/m);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
