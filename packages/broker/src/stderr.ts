// The daemon's stderr, written without ever waiting on its reader. stderr is often a pipe or journald's stream
// socket, shared with whatever started the daemon, and its reader can stall (a hung logger, journald
// restarting); Node writes to a pipe synchronously, so one full pipe froze the broker for every client (found
// by the benchmark, whose drain of the broker's stderr stopped). Lines go out through a file description of
// the daemon's own, never waiting; what the reader has no room for waits in memory, in order, up to 16 MiB,
// past which lines are dropped: once the backlog has gone out, one line says how many (and at exit).
import fs from 'node:fs';
import { sys } from '@tapbroker/protocol/core';

let backlog = 16 * 1024 * 1024;
const RETRY_MS = 20;
/** What a line held costs beyond its bytes (a Buffer's own): many short lines count so against the backlog. */
const ENTRY = 128;

interface Out {
  fd: number;
  socket: boolean;
}

let out: Out | null = null;
const queue: Buffer[] = [];
let queued = 0;
let timer: NodeJS.Timeout | null = null;
/** Lines dropped since the backlog last emptied (an outside re-test: drops were said nowhere). */
const lost = { lines: 0, bytes: 0, since: '', full: false, failed: '' };
/** The backlog's head is partly written; `cut`: a line's first part went out before stderr failed. */
let headStarted = false;
let cut = false;
const pause = new Int32Array(new SharedArrayBuffer(4));

/**
 * fd 2's file status flags are shared with everyone holding its description (a terminal, a pipeline), so
 * O_NONBLOCK is not set on it: a socket is sent to with MSG_DONTWAIT, and a pipe or terminal opened anew
 * (/proc/self/fd/2: a description of the daemon's own). A regular file has no reader to wait for.
 */
function open(): Out {
  try {
    const st = fs.fstatSync(2);
    if (st.isSocket()) return { fd: 2, socket: true };
    if (st.isFIFO() || st.isCharacterDevice()) {
      const { O_WRONLY, O_RDWR, O_NONBLOCK, O_NOCTTY } = fs.constants;
      try {
        return { fd: fs.openSync('/proc/self/fd/2', O_WRONLY | O_NONBLOCK | O_NOCTTY), socket: false };
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENXIO') throw err;
      }
      // A pipe with no reader now (an outside review: fd 2, blocking, was then written to, and a reader that came
      // later and stalled froze the broker). Opened for reading too, the open succeeds; writes never wait, and a
      // reader that comes later gets what waited in the pipe.
      return { fd: fs.openSync('/proc/self/fd/2', O_RDWR | O_NONBLOCK | O_NOCTTY), socket: false };
    }
  } catch {
    // No /proc, or no fd 2: written as it is.
  }
  return { fd: 2, socket: false };
}

/** Writes what the reader has room for now: the bytes written (0: none). Throws on errors other than EAGAIN. */
function tryWrite(o: Out, buf: Buffer): number {
  if (o.socket) return Math.max(0, sys.sendMsg(o.fd, { data: buf }, sys.MSG_DONTWAIT));
  try {
    return fs.writeSync(o.fd, buf);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EAGAIN') return 0;
    throw err;
  }
}

/** Writes the backlog's head while the reader takes it; false when stderr failed (the backlog is then lost). */
function drain(): boolean {
  while (queue.length > 0) {
    let n: number;
    try {
      n = tryWrite(out!, queue[0]!);
    } catch (err) {
      // Counted, and said if stderr takes lines again (a reader back on a FIFO, a disk with room again).
      cut ||= headStarted;
      headStarted = false;
      dropped(queue.length, queued - ENTRY * queue.length, err);
      queue.length = 0;
      queued = 0;
      return false;
    }
    if (n === 0) break;
    queued -= n;
    if (n < queue[0]!.length) {
      queue[0] = queue[0]!.subarray(n);
      headStarted = true;
    } else {
      queue.shift();
      queued -= ENTRY;
      headStarted = false;
    }
    if (queue.length === 0 && lost.lines > 0) sayLost();
  }
  return true;
}

/** Counts lines dropped: the backlog full, or stderr failing (its error: EPIPE, no reader; ENOSPC, a full disk). */
function dropped(lines: number, bytes: number, why: 'full' | unknown): void {
  lost.lines += lines;
  lost.bytes += bytes;
  lost.since ||= new Date().toISOString();
  if (why === 'full') lost.full = true;
  else lost.failed ||= (why as NodeJS.ErrnoException).code ?? String(why);
}

/** Queues the line that says what was dropped, once the backlog before it has gone out. */
function sayLost(): void {
  const failed = lost.failed === 'EPIPE' ? 'it had no reader' : `writing to it failed (${lost.failed})`;
  const why = [lost.full ? `its reader took nothing while ${backlog} bytes waited` : '',
    lost.failed ? failed : ''].filter(Boolean).join(', and ');
  const line = Buffer.from(`tapbrokerd: stderr: ${lost.lines} line(s), ${lost.bytes} bytes, were dropped since `
    + `${lost.since}: ${why} (audit records among them are in --audit-file, if one is set)\n`);
  Object.assign(lost, { lines: 0, bytes: 0, since: '', full: false, failed: '' });
  queue.push(line);
  queued += line.length + ENTRY;
}

function retry(): void {
  timer = null;
  drain();
  if (queue.length > 0) (timer = setTimeout(retry, RETRY_MS)).unref();
}

/** Writes `text` to stderr, never waiting; false when it was dropped (the backlog full, or stderr failing). */
export function toStderr(text: string): boolean {
  if (!out) {
    out = open();
    // Whatever is still waiting at exit gets a second to go (a stop's last lines).
    process.on('exit', () => flushStderr(1000));
  }
  let buf = Buffer.from(text);
  if (queue.length === 0) {
    // The line cut off when stderr failed is ended first, or this one would run on after it (an outside re-test).
    if (cut) buf = Buffer.concat([Buffer.from('\n'), buf]);
    let n: number;
    try {
      n = tryWrite(out, buf);
    } catch (err) {
      dropped(1, buf.length, err);
      return false;
    }
    cut = false;
    headStarted = n > 0 && n < buf.length;
    buf = buf.subarray(n);
    // Lines dropped while stderr failed are said once it takes lines again.
    if (lost.lines > 0 && buf.length === 0) {
      sayLost();
      if (!timer) (timer = setTimeout(retry, RETRY_MS)).unref();
    }
    if (buf.length === 0) return true;
  }
  if (queued + buf.length + ENTRY > backlog) {
    dropped(1, buf.length, 'full');
    return false;
  }
  queue.push(buf);
  queued += buf.length + ENTRY;
  if (!timer) (timer = setTimeout(retry, RETRY_MS)).unref();
  return true;
}

/** Waits up to `ms` for the backlog to be written (at exit). */
export function flushStderr(ms: number): void {
  const deadline = Date.now() + ms;
  while (queue.length > 0 && drain() && queue.length > 0 && Date.now() < deadline) Atomics.wait(pause, 0, 0, 5);
}

/** Sets the backlog's limit (the test entry point, to reach it without 16 MiB of records). */
export function limitStderrBacklog(bytes: number): void {
  backlog = bytes;
}
