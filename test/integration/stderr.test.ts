// A broker whose stderr nobody reads for a while (a hung logger at the end of a pipe, journald restarting) goes on
// serving: its audit records and log lines wait in memory, in order, and reach the reader once it reads again.
// Found by the benchmark: Node writes to a pipe synchronously, so a full stderr pipe froze the broker for every
// client (stuck in the kernel's pipe_write). Both kinds of stderr are tried: a FIFO (a shell's `2> fifo` or
// `| logger`: a pipe) and a socket (what systemd's StandardError=journal and Node's own child pipes are).
import anyTest, { type TestFn } from 'ava';
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { TapbrokerClient } from '@tapbroker/client';
import { BROKER_MAIN, BROKER_TEST_ENTRY, tempDir } from '../helpers/broker.js';
import { Netns } from '../helpers/netns.js';
import { until } from '../helpers/wait.js';

const test = anyTest as TestFn;
let ns: Netns;

test.before(() => {
  ns = Netns.create('stderr');
  ns.bridge('br0');
});
test.after.always(() => ns?.destroy());

const POLICY = '[[rule]]\nname = "root"\nusers = [0]\nbridges = ["br0"]\nmax_devices = 10000\n';
const GRANTS = 600;

/** Starts a broker in the namespace with `stderr` as its fd 2; resolves once it answers. */
async function start(dir: string, stderr: number | 'pipe', backlog?: number): Promise<{ proc: ChildProcess; socket: string }> {
  fs.writeFileSync(path.join(dir, 'policy.toml'), POLICY);
  const socket = path.join(dir, 'tapbroker.sock');
  // A backlog of its own needs the test entry point (TB_TEST_STDERR_BACKLOG); the shipped main.js otherwise.
  const proc = spawn('ip', ['netns', 'exec', ns.name, process.execPath, backlog ? BROKER_TEST_ENTRY : BROKER_MAIN, '-f',
    path.join(dir, 'policy.toml'), '-s', socket, '--state-dir', path.join(dir, 'state'), '--journal-socket', ''],
  { stdio: ['ignore', 'ignore', stderr], env: { ...process.env, ...(backlog ? { TB_TEST_STDERR_BACKLOG: String(backlog) } : {}) } });
  // Answering: a connection made and a hello answered.
  await until(() => TapbrokerClient.connect(socket).then((c) => (c.close(), true), () => false),
    { ms: 10_000, what: 'the broker did not start' });
  return { proc, socket };
}

/** GRANTS grants, each answered within 5 s, on one connection; every tap closed at once. */
async function grants(socket: string): Promise<void> {
  const client = await TapbrokerClient.connect(socket);
  try {
    for (let i = 0; i < GRANTS; i++) {
      let timer: NodeJS.Timeout | undefined;
      const tap = await Promise.race([client.createTap({ bridge: 'br0' }), new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`grant ${i} not answered in 5 s: the broker waits on its stderr`)), 5000);
      })]).finally(() => clearTimeout(timer));
      for (const fd of [...tap.tapFds, ...tap.vhostFds]) fs.closeSync(fd);
    }
  } finally {
    client.close();
  }
}

/**
 * A broker whose stderr is Node's child pipe (a socketpair), not read while GRANTS grants are served; then read.
 * Returns what it has read so far, as it grows.
 */
async function unreadSocket(tag: string, t: { teardown(f: () => void): void }, backlog?: number): Promise<() => string> {
  const dir = tempDir(tag);
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const { proc, socket } = await start(dir, 'pipe', backlog);
  t.teardown(() => proc.kill('SIGKILL'));
  proc.stderr!.pause();
  await grants(socket);
  let text = '';
  proc.stderr!.on('data', (d: Buffer) => (text += d.toString()));
  proc.stderr!.resume();
  return () => text;
}

/** The audit records in `text`, each line whole JSON, in the order written. */
function grantsIn(t: { true(v: boolean, m?: string): void }, text: string): number {
  let last = '';
  let n = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith('{')) continue;
    const rec = (JSON.parse(line) as { audit: { time: string; decision: string } }).audit;
    t.true(rec.time >= last, `out of order: ${rec.time} after ${last}`);
    last = rec.time;
    if (rec.decision === 'grant') n++;
  }
  return n;
}

/** What a non-blocking reader of a FIFO can read now ('' when nothing waits). */
function readNow(fd: number): string {
  const buf = Buffer.alloc(1 << 16);
  let text = '';
  for (;;) {
    let n = 0;
    try {
      n = fs.readSync(fd, buf);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EAGAIN') break;
      throw err;
    }
    if (n === 0) break;
    text += buf.toString('utf8', 0, n);
  }
  return text;
}

/** What a FIFO's reader gets, read until every grant's record is in it. */
async function readGrants(reader: number): Promise<string> {
  let text = '';
  await until(() => {
    text += readNow(reader);
    return (text.match(/"decision":"grant"/g) ?? []).length >= GRANTS;
  }, { ms: 10_000, what: 'not every grant reached the reader' });
  return text;
}

/** A FIFO in a test directory: a reader's end opened first (without waiting), then a writer's as a shell would. */
function fifoIn(tag: string, t: { teardown(f: () => void): void }) {
  const dir = tempDir(tag);
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const fifo = path.join(dir, 'log.fifo');
  execFileSync('mkfifo', [fifo]);
  const reader = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  return { dir, fifo, reader, writer: fs.openSync(fifo, fs.constants.O_WRONLY) };
}

test.serial('a FIFO stderr nobody reads: every client is served, and the reader gets every record in order later', async (t) => {
  const { dir, reader, writer } = fifoIn('stderr-fifo', t);
  const { proc, socket } = await start(dir, writer);
  fs.closeSync(writer);
  try {
    await grants(socket);
    // fd 2's own description is as it was (a shell sharing it must not find it non-blocking).
    t.false((parseInt(/flags:\s+(\d+)/.exec(fs.readFileSync(`/proc/${proc.pid}/fdinfo/2`, 'utf8'))![1]!, 8)
      & fs.constants.O_NONBLOCK) !== 0, 'the shared fd 2 was made non-blocking');
    const text = await readGrants(reader);
    t.is(grantsIn(t, text), GRANTS);
    t.regex(text, /^tapbrokerd: listening on/m);
  } finally {
    proc.kill('SIGKILL');
    fs.closeSync(reader);
  }
});

// Found by an outside review: with no reader on the FIFO when the broker first wrote, its own non-blocking open
// failed (ENXIO) and it fell back to fd 2, blocking: a reader that came later and stalled froze the broker.
test.serial('a FIFO with no reader at start, then a reader that never reads: every client is served', async (t) => {
  const { dir, fifo, reader: first, writer } = fifoIn('stderr-noreader', t);
  const started = start(dir, writer);
  // Gone before the broker's first line (it is spawned by now, and takes a while to start).
  fs.closeSync(writer);
  fs.closeSync(first);
  const { proc, socket } = await started;
  const reader = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  try {
    await grants(socket);
    const text = await readGrants(reader);
    t.is(grantsIn(t, text), GRANTS);
  } finally {
    proc.kill('SIGKILL');
    fs.closeSync(reader);
  }
});

// Found by an outside review: lines that failed to go out (no reader: EPIPE) were dropped and said nowhere.
test.serial('lines a FIFO took no reader for are counted, and said once a reader is back', async (t) => {
  const { dir, fifo, reader: first, writer } = fifoIn('stderr-epipe', t);
  const { proc, socket } = await start(dir, writer);
  fs.closeSync(writer);
  fs.closeSync(first);
  let reader: number | undefined;
  try {
    const client = await TapbrokerClient.connect(socket);
    const grant = async () => {
      const tap = await client.createTap({ bridge: 'br0' });
      for (const fd of [...tap.tapFds, ...tap.vhostFds]) fs.closeSync(fd);
    };
    for (let i = 0; i < 3; i++) await grant();
    reader = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
    await grant();
    client.close();
    let text = '';
    const said = await until(() => {
      text += readNow(reader!);
      return /^tapbrokerd: stderr: (\d+) line\(s\), \d+ bytes, were dropped since \S+: it had no reader \(/m.exec(text);
    }, { ms: 10_000, what: 'no line said what was dropped', detail: () => text });
    t.true(Number(said[1]) >= 3, `${said[1]} lines counted: the three grants' records at least`);
  } finally {
    proc.kill('SIGKILL');
    if (reader !== undefined) fs.closeSync(reader);
  }
});

test.serial('a socket stderr nobody reads: every client is served, and the reader gets every record in order later', async (t) => {
  const text = await unreadSocket('stderr-socket', t);
  await until(() => (text().match(/"decision":"grant"/g) ?? []).length >= GRANTS,
    { ms: 10_000, what: 'not every grant reached the reader' });
  t.is(grantsIn(t, text()), GRANTS);
});

// Found by an outside re-test: past the backlog, lines were dropped and said nowhere (stderr is the audit trail
// without journald). Now one line says how many, once the backlog has gone out. A 64 KiB backlog here, so that
// the test reaches it without 16 MiB of records.
test.serial('lines dropped past the backlog are said, once it has gone out: how many, and since when', async (t) => {
  const text = await unreadSocket('stderr-lost', t, 64 * 1024);
  const said = await until(() => /^tapbrokerd: stderr: (\d+) line\(s\), (\d+) bytes, were dropped since (\S+): its reader took nothing while 65536 bytes waited \(/m.exec(text()),
    { ms: 10_000, what: 'no line said what was dropped', detail: () => text().slice(-2000) });
  const records = () => text().split('\n').filter((l) => l.startsWith('{"audit"')).length;
  // Every record is either here or counted: a grant and its cleanup for each of the GRANTS taps (the last
  // cleanups may come after the line).
  await until(() => records() + Number(said[1]) >= 2 * GRANTS,
    { ms: 10_000, what: `${records()} records and ${said[1]} dropped: some are neither` });
  t.true(records() < 2 * GRANTS, `nothing was dropped (${records()} records): the test did not reach the backlog`);
  t.is(records() + Number(said[1]), 2 * GRANTS);
  t.true(Date.parse(said[3]!) > 0, said[3]);
  t.is(grantsIn(t, text()), (text().match(/"decision":"grant"/g) ?? []).length, 'each line whole JSON, in order');
});
