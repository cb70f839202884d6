// tapbroker-bridge-helper as qemu and libvirt run it: qemu-bridge-helper's arguments and exit statuses,
// the tap's fd on the inherited unix socket, errors on stderr, nothing left behind. (qemu itself runs it
// in test/e2e/qemu-ping.test.ts.) A fresh namespace; the helper runs as uid 65534.
import test from 'ava';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { sys } from '@tapbroker/protocol';
import { ROOT, tempDir } from '../helpers/broker.js';
import { brokerFixture } from '../helpers/fixture.js';
import { NOBODY, setprivArgs } from '../helpers/unpriv.js';

const HELPER = path.join(ROOT, 'packages/client/dist/bridge-helper.js');
const USAGE = 'Usage: qemu-bridge-helper [--use-vnet] --br=bridge --fd=unixfd';
const HOST_LINKS = ['br0', 'br1'];

const fx = brokerFixture(test, {
  tag: 'bh',
  bridges: ['br0', 'br1'],
  policy: `
[network.lan]
bridge = "br1"

[[rule]]
name = "vm"
users = [${NOBODY}]
bridges = ["br0"]
networks = ["lan"]
`,
});

/** Runs the helper as uid 65534 with `fd` (if any) as its fd 3; the environment qemu would give it. */
function helper(args: string[], opts: { fd?: number; socket?: string; env?: NodeJS.ProcessEnv } = {}) {
  const stdio: Array<'ignore' | 'pipe' | number> = ['ignore', 'pipe', 'pipe'];
  if (opts.fd !== undefined) stdio.push(opts.fd);
  const child = spawn('setpriv', [...setprivArgs(), process.execPath, HELPER, ...args], {
    stdio, env: { PATH: process.env['PATH'], TAPBROKER_SOCKET: opts.socket ?? fx.broker.socket, ...opts.env },
  });
  let out = '';
  let err = '';
  child.stdout!.on('data', (d) => (out += d));
  child.stderr!.on('data', (d) => (err += d));
  // 'close': the process exited and its stdout and stderr are drained.
  return new Promise<{ code: number | null; out: string; err: string }>((resolve) =>
    child.on('close', (code) => resolve({ code, out, err })));
}

/** The fd the helper sent on our end of the pair, with its one-byte payload. */
function receivedFd(end: number): { fds: number[]; bytes: number } {
  const msg = new sys.Receiver(16, 4).recv(end, 0x40 /* MSG_DONTWAIT */);
  return { fds: msg?.fds ?? [], bytes: msg?.data.length ?? 0 };
}

/** The tap a tun fd is attached to, from /proc. */
function tapOf(fd: number): string | null {
  return /^iff:\s*(\S+)$/m.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))?.[1] ?? null;
}

const usage = test.macro(async (t, args: string[], why: RegExp) => {
  const r = await helper(args);
  t.is(r.code, 1);
  t.regex(r.err, why);
  t.true(r.err.includes(USAGE), 'qemu-bridge-helper\'s usage line');
  t.deepEqual(fx.ns.extraLinks(HOST_LINKS), []);
});

test('no arguments', usage, [], /--br=bridge is needed/);
test('an unknown argument', usage, ['--br=br0', '--fd=3', '--verbose'], /unknown argument `--verbose'/);
test('no --fd', usage, ['--br=br0'], /--fd=unixfd is needed/);
test('a non-numeric --fd', usage, ['--br=br0', '--fd=x'], /--fd must be a file descriptor number/);
test('a bridge name the kernel would refuse', usage, ['--br=br0/../x', '--fd=3'], /bridge name `br0\/\.\.\/x'/);
test('a bridge name longer than 15 bytes', usage, ['--br=abcdefghijklmnop', '--fd=3'], /bridge name/);
test('an --fd that is not open', usage, ['--br=br0', '--fd=77'], /--fd=77 is not an open file descriptor/);

test('--help and --version', async (t) => {
  const h = await helper(['--help']);
  t.is(h.code, 0);
  t.true(h.out.startsWith(USAGE));
  const v = await helper(['--version']);
  t.is(v.code, 0);
  t.regex(v.out, /^tapbroker-bridge-helper \d+\.\d+\.\d+ \(protocol 2\)\n$/);
});

// Records of requests and connections since `before` (the end of an earlier test's taps may still be coming in).
const asked = (before: number) => fx.broker.records.slice(before).filter((r) => r.decision !== 'cleanup');

test.serial('an --fd that is not a socket is refused before the broker is asked', async (t) => {
  const before = fx.broker.records.length;
  const devnull = fs.openSync('/dev/null', 'r');
  try {
    const r = await helper(['--br=br0', '--fd=3'], { fd: devnull });
    t.is(r.code, 1);
    t.regex(r.err, /--fd=3 is not a unix socket/);
  } finally {
    fs.closeSync(devnull);
  }
  t.deepEqual(asked(before), [], 'the broker saw nothing');
});

test.serial('an --fd that is a socket but not a unix one is refused before the broker is asked', async (t) => {
  const before = fx.broker.records.length;
  const udp = sys.socket(2 /* AF_INET */, 2 /* SOCK_DGRAM */);
  try {
    const r = await helper(['--br=br0', '--fd=3'], { fd: udp });
    t.is(r.code, 1);
    t.regex(r.err, /--fd=3 is not a unix socket/);
  } finally {
    sys.close(udp);
  }
  t.deepEqual(asked(before), [], 'the broker saw nothing');
});

test.serial('the hypervisor\'s end closed: the helper says --fd failed, not the broker, and the tap goes', async (t) => {
  const [mine, theirs] = sys.socketpair(1);
  sys.close(mine);
  const before = fx.broker.records.length;
  try {
    const r = await helper(['--br=br0', '--fd=3'], { fd: theirs });
    t.is(r.code, 1);
    t.regex(r.err, /^tapbroker-bridge-helper: TB_E_USAGE: --fd=3: cannot send the tap to the hypervisor over it: .*EPIPE/m);
    t.notRegex(r.err, /TB_E_BROKER_CLOSED/);
    const granted = () => fx.broker.records.slice(before).find((x) => x.decision === 'grant' && x.uid === NOBODY);
    await fx.broker.waitFor(() => granted() !== undefined, 3000, 'no grant recorded');
    const name = (granted()!.device as { name: string }).name;
    await fx.broker.waitFor(() => fx.ns.link(name) === undefined, 3000, 'the tap outlived the helper');
  } finally {
    sys.close(theirs);
  }
});

test('no broker at $TAPBROKER_SOCKET: the hint names the variable, not a --socket the helper does not take', async (t) => {
  const [mine, theirs] = sys.socketpair(1);
  try {
    const r = await helper(['--br=br0', '--fd=3'], { fd: theirs, socket: '/nonexistent/tapbroker.sock' });
    t.is(r.code, 1);
    t.regex(r.err, /TB_E_CONNECT/);
    t.regex(r.err, /hint: .*with \$TAPBROKER_SOCKET/);
    t.notRegex(r.err, /--socket/);
  } finally {
    sys.close(mine);
    sys.close(theirs);
  }
});

// Found by an outside review: a socket another user serves was refused (as it must be), with a hint naming --socket.
test.serial('a socket another user serves, or a path that is no socket: no word of a --socket the helper lacks', async (t) => {
  const dir = tempDir('helper-foreign');
  fs.chmodSync(dir, 0o755);
  fs.chownSync(dir, NOBODY, NOBODY);
  const fake = path.join(dir, 'fake.sock');
  const listen = 'import socket,sys,time\ns=socket.socket(socket.AF_UNIX,socket.SOCK_SEQPACKET)\ns.bind(sys.argv[1])\n'
    + 'import os\nos.chmod(sys.argv[1],0o666)\ns.listen(4)\nprint("up",flush=True)\ntime.sleep(30)\n';
  const server = spawn('setpriv', [...setprivArgs(), '/usr/bin/python3', '-c', listen, fake], { stdio: ['ignore', 'pipe', 'inherit'] });
  const [mine, theirs] = sys.socketpair(1);
  try {
    await new Promise((resolve, reject) => {
      server.stdout!.once('data', resolve);
      server.once('exit', () => reject(new Error('the other user\'s server did not start')));
    });
    fs.writeFileSync(path.join(dir, 'file'), '');
    for (const socket of [fake, path.join(dir, 'file')]) {
      const r = await helper(['--br=br0', '--fd=3'], { fd: theirs, socket });
      t.is(r.code, 1, r.err);
      t.regex(r.err, /\$TAPBROKER_SOCKET/, r.err);
      t.notRegex(r.err, /--socket/, r.err);
    }
  } finally {
    server.kill('SIGKILL');
    sys.close(mine);
    sys.close(theirs);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test.serial('--use-vnet --br=BR: the tap goes over the socket with one byte, and ends with its fd', async (t) => {
  const [mine, theirs] = sys.socketpair(1 /* SOCK_STREAM, as qemu makes it */);
  try {
    const r = await helper(['--use-vnet', '--br=br0', '--fd=3'], { fd: theirs });
    t.is(r.code, 0, r.err);
    t.is(r.err, '', 'silent on success');
    const got = receivedFd(mine);
    t.is(got.bytes, 1);
    t.is(got.fds.length, 1);
    const name = tapOf(got.fds[0]!);
    t.regex(name ?? '', new RegExp(`^tb${NOBODY}-`));
    t.truthy(fx.ns.link(name!), 'the tap lives while we hold its fd');
    const grant = await fx.broker.record((x) => x.decision === 'grant' && (x.device as { name?: string }).name === name);
    t.like(grant.request, { parent: 'br0', mac: 'unknown', vnet_hdr: true });
    fs.closeSync(got.fds[0]!);
    await fx.broker.waitFor(() => fx.ns.link(name!) === undefined, 3000, 'the tap outlived its last fd');
  } finally {
    sys.close(mine);
    sys.close(theirs);
  }
});

// Found by an outside review: a value out of range was replaced by 30 without a word.
test.serial('a $TAPBROKER_HELPER_TIMEOUT out of range is 30, with a warning, and the tap is still had', async (t) => {
  for (const value of ['0.5', '3601', 'soon']) {
    const [mine, theirs] = sys.socketpair(1);
    try {
      const r = await helper(['--br=br0', '--fd=3'], { fd: theirs, env: { TAPBROKER_HELPER_TIMEOUT: value } });
      t.is(r.code, 0, r.err);
      t.is(r.err, 'tapbroker-bridge-helper: warning: TAPBROKER_HELPER_TIMEOUT is not 1 to 3600 seconds: 30 used\n', value);
      const got = receivedFd(mine);
      for (const fd of got.fds) fs.closeSync(fd);
      t.is(got.fds.length, 1);
    } finally {
      sys.close(mine);
      sys.close(theirs);
    }
  }
  await fx.broker.waitFor(() => fx.ns.extraLinks(HOST_LINKS).length === 0, 5000, 'a tap was left');
});

test.serial('--br=network:NAME asks for a network of the policy; without --use-vnet there is no vnet header', async (t) => {
  const [mine, theirs] = sys.socketpair(1);
  try {
    const r = await helper(['--br=network:lan', '--fd=3'], { fd: theirs });
    t.is(r.code, 0, r.err);
    const { fds } = receivedFd(mine);
    const name = tapOf(fds[0]!);
    const grant = await fx.broker.record((x) => x.decision === 'grant' && (x.device as { name?: string }).name === name);
    t.like(grant.request, { network: 'lan', vnet_hdr: false });
    t.like(grant.device, { parent: 'br1', network: 'lan' });
    fs.closeSync(fds[0]!);
  } finally {
    sys.close(mine);
    sys.close(theirs);
  }
});

test.serial('a refusal prints the broker\'s code, rule and hint, exits 1 and leaves nothing', async (t) => {
  const [mine, theirs] = sys.socketpair(1);
  try {
    const r = await helper(['--br=br1', '--fd=3'], { fd: theirs });
    t.is(r.code, 1);
    t.regex(r.err, /^tapbroker-bridge-helper: TB_E_POLICY_DENIED: /m);
    t.regex(r.err, /^tapbroker-bridge-helper: hint: /m);
    t.deepEqual(receivedFd(mine).fds, [], 'no fd was sent');
  } finally {
    sys.close(mine);
    sys.close(theirs);
  }
  t.deepEqual(fx.ns.extraLinks(HOST_LINKS), []);
});

test.serial('no broker: the connect error says what to do', async (t) => {
  const [mine, theirs] = sys.socketpair(1);
  try {
    const r = await helper(['--br=br0', '--fd=3'], { fd: theirs, socket: '/run/tapbroker-none/none.sock' });
    t.is(r.code, 1);
    t.regex(r.err, /TB_E_CONNECT: cannot connect to the broker at \/run\/tapbroker-none\/none\.sock/);
    t.regex(r.err, /hint: /);
  } finally {
    sys.close(mine);
    sys.close(theirs);
  }
});

// Found by an outside review: the helper waited for the broker's reply for ever, and qemu waits for the helper with
// its main lock held: a stopped broker hung qemu's start, and a hotplug froze its monitor.
test.serial('a broker that does not answer: the helper gives up after its timeout, exits 1, and qemu goes on', async (t) => {
  const [mine, theirs] = sys.socketpair(1);
  const pid = fx.broker.proc.pid!;
  process.kill(pid, 'SIGSTOP');
  try {
    const started = Date.now();
    const r = await helper(['--br=br0', '--fd=3'], { fd: theirs, env: { TAPBROKER_HELPER_TIMEOUT: '1' } });
    t.is(r.code, 1);
    t.regex(r.err, /^tapbroker-bridge-helper: TB_E_TIMEOUT: the broker did not answer within 1 s$/m);
    t.regex(r.err, /TAPBROKER_HELPER_TIMEOUT/);
    t.true(Date.now() - started < 10_000, 'it did not wait for the broker');
    t.deepEqual(receivedFd(mine).fds, [], 'no fd was sent');
  } finally {
    process.kill(pid, 'SIGCONT');
    sys.close(mine);
    sys.close(theirs);
  }
  // The request it left in the socket is served once the broker goes on; its tap ends with its fds.
  await fx.broker.waitFor(() => fx.ns.extraLinks(HOST_LINKS).length === 0, 5000, 'a tap was left');
});
