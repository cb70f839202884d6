// The wire against a real broker: handshake, hostile frames over the real socket, fds sent to the
// broker, silent clients, and peer credentials as the kernel reports them for an unprivileged process.
import anyTest, { type TestFn } from 'ava';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { pack } from 'msgpackr';
import {
  MAX_REPLY_BYTES, MAX_REQUEST_BYTES, PROTOCOL_VERSION, SeqpacketConnection, SeqpacketListener, decodeReply, encodeFrame,
  type Reply,
} from '@tapbroker/protocol';
import { BrokerProcess, tempDir } from '../helpers/broker.js';
import { brokerFixture } from '../helpers/fixture.js';
import { NOBODY, spawnAs } from '../helpers/unpriv.js';
import { until } from '../helpers/wait.js';

const test = anyTest as TestFn;
const fx = brokerFixture(test, {
  tag: 'proto', policy: `[[rule]]\nname = "any"\nusers = ["*"]\nbridges = ["br0"]\n`, bridges: ['br0'],
});

async function connect(): Promise<SeqpacketConnection> {
  return SeqpacketConnection.connect(fx.broker.socket, { maxPacket: MAX_REPLY_BYTES });
}

async function exchange(conn: SeqpacketConnection, frame: Buffer, fds: number[] = []): Promise<Reply | null> {
  await conn.send(frame, fds);
  const p = await conn.receive();
  return p ? decodeReply(p.data) : null;
}

async function helloed(): Promise<SeqpacketConnection> {
  const conn = await connect();
  const r = await exchange(conn, encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION }));
  if (r?.op !== 'hello') throw new Error('no hello');
  return conn;
}

const code = (r: Reply | null) => (r?.op === 'error' ? r.code : r?.op ?? 'closed');

test('hello answers with the version and the broker name', async (t) => {
  const conn = await connect();
  const r = await exchange(conn, encodeFrame({ op: 'hello', id: 9, version: PROTOCOL_VERSION, client: 'test' }));
  t.like(r, { op: 'hello', id: 9, version: PROTOCOL_VERSION });
  conn.close();
});

test('a client from the future gets TB_E_VERSION naming both versions, then the connection closes', async (t) => {
  const conn = await connect();
  const r = await exchange(conn, encodeFrame({ op: 'hello', id: 1, version: 99 }));
  t.is(code(r), 'TB_E_VERSION');
  t.regex(r?.op === 'error' ? r.message : '', new RegExp(`version 99.*speaks ${PROTOCOL_VERSION}`));
  t.is(await conn.receive(), null);
  conn.close();
  // Audited, as every refusal is (it was not, before an outside review).
  await fx.broker.record((a) => a.op === 'hello' && a.decision === 'error' && a.code === 'TB_E_VERSION');
});

test('an operation before hello is refused and the connection closes', async (t) => {
  const conn = await connect();
  t.is(code(await exchange(conn, encodeFrame({ op: 'create-tap', id: 1, bridge: 'br0' }))), 'TB_E_HELLO_REQUIRED');
  t.is(await conn.receive(), null);
  conn.close();
  t.deepEqual(fx.ns.extraLinks(['br0']), []);
});

const hostile = test.macro({
  async exec(t, frame: Buffer, expected: string) {
    const conn = await helloed();
    const r = await exchange(conn, frame);
    t.is(code(r), expected);
    // The connection and the broker both still serve.
    const again = await exchange(conn, encodeFrame({ op: 'hello', id: 2, version: PROTOCOL_VERSION }));
    t.is(again?.op, 'hello');
    conn.close();
    t.deepEqual(fx.ns.extraLinks(['br0']), []);
  },
  title: (what) => `over the socket: ${what}`,
});

test('garbage bytes', hostile, Buffer.from('\x00\xff garbage'), 'TB_E_MALFORMED');
test('a frame over the cap is discarded unread', hostile, Buffer.alloc(MAX_REQUEST_BYTES + 1, 0x90), 'TB_E_FRAME_TOO_LARGE');
test('a frame of 64 KiB', hostile, Buffer.alloc(65536, 0x41), 'TB_E_FRAME_TOO_LARGE');
test('an unknown op', hostile, pack({ op: 'exec', id: 3, cmd: 'sh' }), 'TB_E_UNKNOWN_OP');
test('an unknown field', hostile, pack({ op: 'create-tap', id: 3, bridge: 'br0', uid: 0 }), 'TB_E_INVALID_REQUEST');
test('an extension type', hostile, Buffer.from([0x81, 0xa2, 0x6f, 0x70, 0xd4, 0x72, 0x00]), 'TB_E_UNSUPPORTED_TYPE');

test.serial('fds sent to the broker are refused by its socket (SO_PASSRIGHTS) and the request never arrives', async (t) => {
  const before = fx.broker.fdCount();
  const conn = await helloed();
  const mine = fs.openSync('/dev/null', 'r');
  await t.throwsAsync(conn.send(encodeFrame({ op: 'create-tap', id: 5, bridge: 'br0' }), [mine, mine, mine]), { message: /EPERM/ });
  fs.closeSync(mine);
  t.is(code(await exchange(conn, encodeFrame({ op: 'hello', id: 6, version: PROTOCOL_VERSION }))), 'hello', 'the connection still serves');
  t.deepEqual(fx.ns.extraLinks(['br0']), [], 'the request was not carried out');
  t.is(fx.broker.fdCount(), before + 2, 'only the connection and the caller\'s pidfd are open in the broker');
  conn.close();
  await fx.broker.waitFor(() => fx.broker.fdCount() === before, 2000, 'broker fds did not return to baseline');
});

test.serial('fds sent to a broker that cannot refuse them at the socket go to its closer, never leaked', async (t) => {
  const fallback = await BrokerProcess.start(fx.ns, `[[rule]]\nname = "x"\nusers = [1]\nbridges = ["br0"]\n`, { tag: 'fdfb', fdFallback: true });
  try {
    // The broker's copies of /dev/null: its own, before and after (a closer process, once started,
    // adds fds of its own: a socket, and libuv's child-signal pipe).
    const nulls = () => fs.readdirSync(`/proc/${fallback.proc.pid}/fd`).filter((f) => {
      try { return fs.readlinkSync(`/proc/${fallback.proc.pid}/fd/${f}`) === '/dev/null'; } catch { return false; }
    }).length;
    const before = nulls();
    const conn = await SeqpacketConnection.connect(fallback.socket, { maxPacket: MAX_REPLY_BYTES });
    const mine = fs.openSync('/dev/null', 'r');
    await conn.send(encodeFrame({ op: 'hello', id: 5, version: PROTOCOL_VERSION }), Array(200).fill(mine));
    fs.closeSync(mine);
    const p = await conn.receive();
    t.is(code(p ? decodeReply(p.data) : null), 'TB_E_UNEXPECTED_FDS');
    conn.close();
    await fallback.waitFor(() => nulls() === before, 2000, `the broker holds ${nulls() - before} of the 200 fds`);
    t.is(nulls(), before);
  } finally {
    await fallback.stop();
  }
});

test('a client that connects and never speaks is dropped after the hello timeout', async (t) => {
  const quick = await BrokerProcess.start(fx.ns, `[[rule]]\nname = "x"\nusers = [1]\nbridges = ["br0"]\n`, { tag: 'quiet', args: ['-T', '300'] });
  try {
    const conn = await SeqpacketConnection.connect(quick.socket, { maxPacket: MAX_REPLY_BYTES });
    const p = await conn.receive();
    t.is(code(p ? decodeReply(p.data) : null), 'TB_E_TIMEOUT');
    t.is(await conn.receive(), null);
    conn.close();
  } finally {
    await quick.stop();
  }
});

test('many requests on one connection are answered in order', async (t) => {
  const conn = await helloed();
  for (let id = 10; id < 1010; id++) {
    const r = await exchange(conn, encodeFrame({ op: 'hello', id, version: PROTOCOL_VERSION }));
    if (r?.id !== id) return t.fail(`reply ${r?.id} for request ${id}`);
  }
  conn.close();
  t.true(fx.broker.alive);
});

test('peer credentials come from the kernel: uid, gid, groups and a pidfd of an unprivileged peer', async (t) => {
  const dir = tempDir('peer');
  const sockPath = path.join(dir, 's.sock');
  const listener = SeqpacketListener.listen(sockPath, { mode: 0o666 });
  try {
    const accepted = new Promise<number>((resolve) => listener.start(resolve));
    const script = `const { SeqpacketConnection } = await import('@tapbroker/protocol'); const c = await SeqpacketConnection.connect(${JSON.stringify(sockPath)}, { maxPacket: 64 }); console.log(process.pid); process.stdin.resume(); process.stdin.on('end', () => process.exit(0));`;
    const child = spawnAs({ uid: NOBODY, gid: NOBODY, groups: [4242, 4343] }, process.execPath, ['--input-type=module', '-e', script]);
    const pid = await new Promise<number>((resolve) => child.stdout!.once('data', (d) => resolve(Number(String(d).trim()))));
    const conn = new SeqpacketConnection(await accepted, { maxPacket: 64 });
    const peer = conn.peer();
    t.is(peer.uid, NOBODY);
    t.is(peer.gid, NOBODY);
    t.deepEqual([...peer.groups].sort(), [4242, 4343]);
    t.is(peer.pid, pid);
    t.not(peer.pidfd, null, 'this kernel has SO_PEERPIDFD');
    t.regex(fs.readFileSync(`/proc/self/fdinfo/${peer.pidfd}`, 'utf8'), new RegExp(`^Pid:\\s*${pid}$`, 'm'));
    child.stdin!.end();
    await new Promise((r) => child.on('exit', r));
    t.regex(fs.readFileSync(`/proc/self/fdinfo/${peer.pidfd}`, 'utf8'), /^Pid:\s*-1$/m, 'the pidfd knows the peer is gone');
    fs.closeSync(peer.pidfd!);
    conn.close();
  } finally {
    listener.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('the socket node gets exactly the mode asked for, and a stale socket is replaced', async (t) => {
  const dir = tempDir('mode');
  const sockPath = path.join(dir, 's.sock');
  try {
    const a = SeqpacketListener.listen(sockPath, { mode: 0o660, gid: 4242 });
    const st = fs.statSync(sockPath);
    t.is(st.mode & 0o777, 0o660);
    t.is(st.gid, 4242);
    // Simulate a crash: the node stays behind with nobody listening.
    const fd = a.fd;
    a.stop();
    fs.closeSync(fd);
    t.true(fs.existsSync(sockPath));
    const b = SeqpacketListener.listen(sockPath, { mode: 0o600 });
    t.is(fs.statSync(sockPath).mode & 0o777, 0o600);
    b.close();
    t.false(fs.existsSync(sockPath));
    fs.writeFileSync(sockPath, 'not a socket');
    t.throws(() => SeqpacketListener.listen(sockPath), { message: /exists and is not a socket/ });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('an inherited socket is adopted only if it is a listening SEQPACKET AF_UNIX socket', async (t) => {
  const dir = tempDir('adopt');
  const sockPath = path.join(dir, 's.sock');
  try {
    // systemd-socket-activate binds the socket and execs the broker with LISTEN_FDS=1 at fd 3.
    const child = spawn('ip', ['netns', 'exec', fx.ns.name, 'systemd-socket-activate', '--seqpacket', '-l', sockPath, process.execPath,
      fx.broker.proc.spawnargs.find((a) => a.endsWith('main.js'))!, '-f', fx.broker.policyPath, '-s', '/nonexistent/ignored.sock',
      // A state directory of its own: the default, /run/tapbroker, is the host's (a run left one behind there).
      '--state-dir', path.join(dir, 'state'), '--journal-socket', ''], { stdio: ['ignore', 'ignore', 'pipe'] });
    // Killed even when an assertion below fails: the broker it starts must not outlive the test.
    t.teardown(() => { if (child.exitCode === null) child.kill('SIGKILL'); });
    let err = '';
    child.stderr!.on('data', (d) => (err += d));
    // The node exists from bind(); connections are refused until listen() a moment later.
    const conn = await until(async () => {
      if (!fs.existsSync(sockPath)) return null;
      try {
        return await SeqpacketConnection.connect(sockPath, { maxPacket: MAX_REPLY_BYTES });
      } catch (e) {
        if (!/ECONNREFUSED/.test(String(e))) throw e;
        return null;
      }
    }, { ms: 5000, what: 'the activated socket did not accept a connection', detail: () => err });
    t.is((await exchange(conn, encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION })))?.op, 'hello');
    conn.close();
    // The broker said so before it served the hello; its stderr pipe is read apart from the socket.
    await until(() => /listening on inherited fd 3/.test(err), { ms: 3000, what: 'the broker did not say it listens on fd 3', detail: () => err });
    t.regex(err, /listening on inherited fd 3/);
    child.kill('SIGTERM');
    await new Promise((r) => child.on('exit', r));
    const notListening = fs.openSync('/dev/null', 'r');
    t.throws(() => SeqpacketListener.adopt(notListening), { message: /not a listening AF_UNIX SOCK_SEQPACKET socket|ENOTSOCK/ });
    fs.closeSync(notListening);
    t.throws(() => SeqpacketListener.adopt(9999), { message: /EBADF/ });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a connect flood: the listener accepts a bounded number per event-loop turn, then lets others run (review A5)', async (t) => {
  const dir = tempDir('flood');
  const sockPath = path.join(dir, 'flood.sock');
  const listener = SeqpacketListener.listen(sockPath, { mode: 0o600 });
  const clients: SeqpacketConnection[] = [];
  const accepted: number[] = [];
  try {
    for (let i = 0; i < 64; i++) clients.push(await SeqpacketConnection.connect(sockPath, { maxPacket: 64 }));
    let atFirstTurnEnd = -1;
    await new Promise<void>((resolve) => {
      listener.start((fd) => {
        accepted.push(fd);
        // Whatever else is due runs after this turn's accepts: how many happened by then?
        if (accepted.length === 1) setImmediate(() => { atFirstTurnEnd = accepted.length; });
        if (accepted.length === clients.length) resolve();
      });
    });
    t.true(atFirstTurnEnd > 0 && atFirstTurnEnd <= SeqpacketListener.ACCEPTS_PER_TURN, `${atFirstTurnEnd} accepts before anything else ran`);
    t.is(accepted.length, 64, 'and every connection was accepted in the end');
  } finally {
    for (const fd of accepted) fs.closeSync(fd);
    for (const c of clients) c.close();
    listener.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
