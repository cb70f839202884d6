// SeqpacketConnection.drainAndClose on a connection that takes no fds (the broker's): the socket's last close
// releases the fds still queued in it, in the closing thread, so the socket closes in place only when the
// kernel says no fds are queued; otherwise it goes whole to `foreign`. Found by an outside re-test: an empty
// packet (read as the end) or a pending reset (reported ahead of queued packets) ended the read-off as if the
// queue were empty, and the broker closed the socket with fds behind them. Plain sockets, no privilege.
import test, { type ExecutionContext } from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { SeqpacketConnection, SeqpacketListener, sys } from '@tapbroker/protocol';
import { stallLog } from '@tapbroker/broker/internal';
import { poll } from '../helpers/wait.js';

const rx = new sys.Receiver(64);

/** A socket whose peer, `watched`, reads EOF once every copy of it is closed (null while one is open). */
function watchedPair(): { file: number; gone: () => boolean; close: () => void } {
  const [file, watched] = sys.socketpair(sys.SOCK_SEQPACKET);
  return {
    file,
    gone: () => rx.recv(watched, sys.MSG_DONTWAIT)?.data.length === 0,
    close: () => sys.close(watched),
  };
}

/** The broker's end as a connection that takes no fds, and the client's end. */
function connection(): { conn: SeqpacketConnection; client: number } {
  const [broker, client] = sys.socketpair(sys.SOCK_SEQPACKET);
  sys.fcntlSet(broker, sys.F_SETFL, sys.fcntlGet(broker, sys.F_GETFL) | sys.O_NONBLOCK);
  return { conn: new SeqpacketConnection(broker, { maxPacket: 4096, takesFds: false }), client };
}

test('queuedFds counts the fds queued in a socket, and reading them off counts them out', (t) => {
  const [a, b] = sys.socketpair(sys.SOCK_SEQPACKET);
  try {
    t.is(sys.queuedFds(b), 0);
    sys.sendMsg(a, { data: Buffer.from('x'), fds: [0, 1, 2] }, sys.MSG_NOSIGNAL);
    sys.sendMsg(a, { data: Buffer.alloc(0) }, sys.MSG_NOSIGNAL);
    t.is(sys.queuedFds(b), 3);
    const m = new sys.Receiver(64, 8).recv(b, sys.MSG_DONTWAIT | sys.MSG_CMSG_CLOEXEC);
    t.is(m?.fds.length, 3);
    for (const fd of m?.fds ?? []) sys.close(fd);
    t.is(sys.queuedFds(b), 0, 'the empty packet behind carries none');
  } finally {
    sys.close(a);
    sys.close(b);
  }
});

test('a connection with fd-free packets queued is read off and closed in place', (t) => {
  const { conn, client } = connection();
  try {
    sys.sendMsg(client, { data: Buffer.from('one') }, sys.MSG_NOSIGNAL);
    sys.sendMsg(client, { data: Buffer.from('two') }, sys.MSG_NOSIGNAL);
    const handed: number[] = [];
    conn.drainAndClose((fds) => handed.push(...fds));
    t.deepEqual(handed, [], 'nothing for the closer');
    t.true(conn.closed);
    t.is(rx.recv(client, sys.MSG_DONTWAIT)?.data.length, 0, 'the client sees the end at once');
  } finally {
    sys.close(client);
  }
});

for (const [name, ahead] of [
  ['an empty packet', (client: number) => sys.sendMsg(client, { data: Buffer.alloc(0) }, sys.MSG_NOSIGNAL)],
  ['fd-free packets and an empty one', (client: number) => {
    sys.sendMsg(client, { data: Buffer.from('one') }, sys.MSG_NOSIGNAL);
    sys.sendMsg(client, { data: Buffer.alloc(0) }, sys.MSG_NOSIGNAL);
  }],
] as const) {
  test(`fds queued behind ${name} are never released in place: the socket goes to foreign`, (t) => {
    const { conn, client } = connection();
    const pushed = watchedPair();
    try {
      ahead(client);
      sys.sendMsg(client, { data: Buffer.from('list'), fds: [pushed.file] }, sys.MSG_NOSIGNAL);
      sys.close(pushed.file);
      const handed: number[] = [];
      conn.drainAndClose((fds) => handed.push(...fds));
      t.is(handed.length, 1, 'the socket itself, once');
      t.false(pushed.gone(), 'the pushed socket is still queued, not released');
      t.is(sys.queuedFds(handed[0]!), 1);
      sys.close(handed[0]!);
      t.true(pushed.gone(), 'released where the handed socket is closed last');
    } finally {
      sys.close(client);
      pushed.close();
    }
  });
}

test('a reset reported ahead of queued fds does not end the drain as if the queue were empty', (t) => {
  const { conn, client } = connection();
  const pushed = watchedPair();
  try {
    sys.sendMsg(client, { data: Buffer.from('one') }, sys.MSG_NOSIGNAL);
    sys.sendMsg(client, { data: Buffer.from('list'), fds: [pushed.file] }, sys.MSG_NOSIGNAL);
    sys.close(pushed.file);
    // A reply the client never reads: its close then leaves ECONNRESET pending on the broker's end, which the
    // next read reports ahead of the packets still queued.
    sys.sendMsg(conn.fd, { data: Buffer.from('reply') }, sys.MSG_NOSIGNAL);
    sys.close(client);
    const handed: number[] = [];
    conn.drainAndClose((fds) => handed.push(...fds));
    t.is(handed.length, 1, 'the socket itself, once');
    t.false(pushed.gone(), 'the pushed socket is still queued, not released');
    sys.close(handed[0]!);
    t.true(pushed.gone());
  } finally {
    pushed.close();
  }
});

// Found by an outside review: a client that closed with a reply unread between the broker's peek at its next
// request and the read that takes it off made that read fail with ECONNRESET, after the pending receive was
// cleared: nothing answered it, and the session (its socket, pidfd and connection slot) waited for ever. The
// reset is the kernel's own; only its timing is forced here, by closing the client inside the peek.
test('a reset between the peek and the read ends the receive, as the end of the connection', async (t) => {
  const { conn, client } = connection();
  try {
    sys.sendMsg(client, { data: Buffer.from('request') }, sys.MSG_NOSIGNAL);
    sys.sendMsg(conn.fd, { data: Buffer.from('reply') }, sys.MSG_NOSIGNAL);
    const receiver = (conn as unknown as { receiver: sys.Receiver }).receiver;
    const recv = receiver.recv.bind(receiver);
    let peeked = false;
    receiver.recv = (fd, flags) => {
      const m = recv(fd, flags);
      if (!peeked && (flags & sys.MSG_PEEK) !== 0 && m !== null) {
        peeked = true;
        sys.close(client);
      }
      return m;
    };
    const got = await Promise.race([conn.receive(), new Promise<'pending'>((r) => setTimeout(() => r('pending'), 2000))]);
    t.true(peeked);
    t.is(got, null, 'the receive is answered: the end of the connection');
  } finally {
    conn.close();
  }
});

/**
 * A listener that accepts nothing on its own, with a backlog of one, filled: connects there find no room until
 * the test takes one with `accept()`. Everything goes at the test's end.
 */
function fullListener(t: ExecutionContext): { sock: string; accept: () => void; keep: (fd: number) => void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-line-'));
  const sock = path.join(dir, 'l.sock');
  const listener = sys.socket(sys.AF_UNIX, sys.SOCK_SEQPACKET | sys.SOCK_CLOEXEC | sys.SOCK_NONBLOCK);
  const fds: number[] = [];
  t.teardown(() => {
    for (const fd of fds) sys.close(fd);
    sys.close(listener);
    fs.rmSync(dir, { recursive: true, force: true });
  });
  sys.bind(listener, sys.sockaddrUn(sock));
  sys.listen(listener, 1);
  // Connects that do not wait, until one is told there is no room.
  for (;;) {
    const fd = sys.socket(sys.AF_UNIX, sys.SOCK_SEQPACKET | sys.SOCK_CLOEXEC | sys.SOCK_NONBLOCK);
    try {
      sys.connect(fd, sys.sockaddrUn(sock));
      fds.push(fd);
    } catch (err) {
      sys.close(fd);
      if ((err as sys.SyscallError).errno !== sys.errno.EAGAIN) throw err;
      break;
    }
  }
  return { sock, accept: () => fds.push(sys.accept(listener)), keep: (fd) => fds.push(fd) };
}

// Found by an outside re-test: a client whose connect found the listener's backlog full slept and tried again, and
// lost its turn to every connector that blocked (the kernel wakes blocked connectors in arrival order): behind one
// uid's flood of connections, root's connect took up to 1.8 s. It now waits in that line itself.
test('a connect that finds the backlog full waits in the kernel\'s line, and gets in as soon as there is room', async (t) => {
  // The client waits in slices of at most 250 ms, and a new slice joins the line at its end: the order is only
  // checked when room came within the slice it began with. A machine too busy for that (a CI run next to other
  // work) tries again, up to three times.
  for (let attempt = 1; ; attempt++) {
    if (await inLineOnce(t) || attempt === 3) return;
    t.log(`attempt ${attempt}: room came after the first slice; tried again`);
  }
});

/** One round of the test above; false when room came too late in the slice to tell anything. */
async function inLineOnce(t: import('ava').ExecutionContext): Promise<boolean> {
  const { sock, accept, keep } = fullListener(t);
  // Full: a connect with a short bound fails with EAGAIN once the bound has passed.
  const started = Date.now();
  const err = await t.throwsAsync(SeqpacketConnection.connect(sock, { maxPacket: 64, connectTimeoutMs: 300 }));
  t.is((err as unknown as sys.SyscallError).errno, sys.errno.EAGAIN);
  t.true(Date.now() - started >= 250, `gave up after ${Date.now() - started} ms`);
  // One with room to wait: pending until the listener takes one connection, then in.
  let done = false;
  const waiting = Date.now();
  const pending = SeqpacketConnection.connect(sock, { maxPacket: 64, connectTimeoutMs: 10_000 }).then((c) => {
    done = true;
    return c;
  });
  // Threads of this process blocked in the kernel's line of connectors (a pool thread each).
  const inLine = () => fs.readdirSync('/proc/self/task')
    .filter((tid) => { try { return fs.readFileSync(`/proc/self/task/${tid}/wchan`, 'utf8') === 'unix_wait_for_peer'; } catch { return false; } })
    .length;
  t.truthy(await poll(() => inLine() === 1, { ms: 5000, every: 2 }), 'it never waited in the kernel\'s line');
  t.false(done, 'connected while the backlog was full');
  // A connector arriving after it, blocking (as a flooder's connect does), with a bound of its own.
  const other = sys.socket(sys.AF_UNIX, sys.SOCK_SEQPACKET | sys.SOCK_CLOEXEC);
  keep(other);
  const bound = Buffer.alloc(16);
  bound.writeBigInt64LE(5n, 0);
  sys.setsockopt(other, sys.SOL_SOCKET, sys.SO_SNDTIMEO, bound);
  let otherIn: boolean | null = null;
  const otherDone = sys.connectInPool(other, sys.sockaddrUn(sock)).then((ok) => (otherIn = ok));
  t.truthy(await poll(() => inLine() === 2, { ms: 5000, every: 2 }), 'the later connector never waited');
  // Room for one: the first in line gets it (before, the client slept between tries and the blocked one won).
  const inFirstSlice = Date.now() - waiting < 200;
  accept();
  // Time enough for a pool thread woken in a busy machine's run queue (a CI run beside other work took over 2 s).
  const conn = await Promise.race([pending, new Promise<null>((r) => setTimeout(() => r(null), 10_000))]);
  if (!inFirstSlice && (!conn || otherIn !== null)) {
    // Let the round end before the next: both get in as the listener takes them.
    accept();
    await Promise.all([otherDone, conn ? null : pending.then((c) => c.close())]);
    conn?.close();
    return false;
  }
  t.truthy(conn, 'the connector that came later took the room: this one did not wait in line');
  t.is(otherIn, null, 'the later connector got in first');
  conn?.close();
  accept();
  await otherDone;
  t.true(otherIn, 'the later connector, next in line');
  return true;
}

// Found by an outside re-test of the line: a connect held its pool thread for its whole bound, so eight connects
// from one process (the pool has four threads) took twice the bound to fail, and a file read waited behind them.
test('connects waiting in line hold no pool thread for long: a file read goes on, and each fails at its own bound', async (t) => {
  const { sock } = fullListener(t);
  const started = Date.now();
  const failed = Promise.all(Array.from({ length: 8 }, () =>
    SeqpacketConnection.connect(sock, { maxPacket: 64, connectTimeoutMs: 1000 }).then(() => 'in', () => Date.now() - started)));
  const read = Date.now();
  await fs.promises.readFile('/proc/self/status');
  const readMs = Date.now() - read;
  const times = await failed;
  // A file read waits at most for a slice of the line (250 ms), not for a connect's whole bound (1 s, twice over).
  t.true(readMs < 900, `a file read waited ${readMs} ms behind the connects`);
  for (const ms of times) t.true(typeof ms === 'number' && ms < 1900, `a connect failed after ${String(ms)} ms (bound 1 s)`);
});

// SECURITY.md: "Get a socket before its permissions are set": the node is made under umask 0177, so between bind()
// and the chmod to its final mode only its owner (root) could connect; nobody can before listen() in any case.
test('a listening socket\'s node is its owner\'s alone until its final mode is set, and listens only after', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-listen-'));
  const file = path.join(dir, 'sock');
  const chmod = fs.chmodSync;
  const seen: Array<{ mode: number; listening: boolean }> = [];
  const probeListening = () => {
    const fd = sys.socket(sys.AF_UNIX, sys.SOCK_SEQPACKET | sys.SOCK_NONBLOCK | sys.SOCK_CLOEXEC);
    try {
      sys.connect(fd, sys.sockaddrUn(file));
      return true;
    } catch {
      return false;
    } finally {
      sys.close(fd);
    }
  };
  fs.chmodSync = ((p: fs.PathLike, mode: fs.Mode) => {
    if (p === file) seen.push({ mode: fs.lstatSync(file).mode & 0o777, listening: probeListening() });
    chmod(p, mode);
  }) as typeof fs.chmodSync;
  let listener: SeqpacketListener | undefined;
  try {
    listener = SeqpacketListener.listen(file, { mode: 0o666 });
  } finally {
    fs.chmodSync = chmod;
  }
  try {
    t.deepEqual(seen, [{ mode: 0o600, listening: false }]);
    t.is(fs.lstatSync(file).mode & 0o777, 0o666);
    t.true(probeListening(), 'and it listens once its mode is set');
  } finally {
    listener?.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

// The broker's log of accepts stalled for want of fds (quiet window and lateness shortened here from 60 s and 5 s).
// Found by outside reviews: the stalls were said nowhere, then (once said) short ones could be made to alternate,
// then a long one inside the quiet minute was said nowhere.
test('a stall is said once each way; within the quiet window only one that lasts is said', async (t) => {
  const lines: string[] = [];
  const onStall = stallLog((l) => lines.push(l), 300, 60);
  const emfile = new Error('accept4: Too many open files (EMFILE)');
  onStall(emfile, 0);
  onStall(null, 10);
  t.deepEqual(lines.map((l) => l.split(':')[0]), ['not accepting connections', 'accepting connections again, after 10 ms']);
  // Short stalls in the quiet window: counted, not said.
  for (let i = 0; i < 5; i++) {
    onStall(emfile, 0);
    onStall(null, 1);
  }
  t.is(lines.length, 2);
  // A long one in the window: said once it has lasted, then its end.
  onStall(emfile, 0);
  await new Promise((r) => setTimeout(r, 120));
  t.regex(lines[2] ?? '', /^not accepting connections: .* \(5 shorter stall\(s\) since the last said\)$/);
  onStall(null, 120);
  t.is(lines[3], 'accepting connections again, after 120 ms');
  // Past the window: said at once.
  await new Promise((r) => setTimeout(r, 350));
  onStall(emfile, 0);
  t.is(lines.length, 5);
  onStall(null, 1);
});
