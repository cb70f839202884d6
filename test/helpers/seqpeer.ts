// A raw protocol peer in its own process, under any uid (setpriv): the test process drives it with JSON
// lines over stdin/stdout, so hostile frames, fds and connection patterns can come from a real
// unprivileged client — one the policy allows, so requests get past the policy into the kernel steps.
// The same file is the child (run as a script) and the test-side driver (`Peer`).
import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import {
  MAX_REPLY_BYTES, MAX_REPLY_FDS, PROTOCOL_VERSION, SeqpacketConnection, decodeReply, encodeFrame, type Packet,
} from '@tapbroker/protocol';
import { spawnAs, type As } from './unpriv.js';

const SELF = fileURLToPath(import.meta.url);

/** What one receive saw: a packet (`data`), or the end of the connection (`data` null), or nothing yet. */
export interface Received {
  data: Buffer | null;
  fds: number;
  timedOut: boolean;
}

/** One frame of a bulk run, as the peer saw its answer. */
export interface RunResult {
  /** The reply packet, or null when the connection closed (or the send failed) without one. */
  reply: Buffer | null;
  fds: number;
  /** The send itself failed (e.g. EMSGSIZE): the frame never reached the broker. */
  sendError: string | null;
  /** The broker closed the connection after this reply (checked only after TB_E_VERSION/HELLO_REQUIRED-like replies). */
  closedAfter: boolean;
  timedOut: boolean;
}

// ---------------------------------------------------------------- child side

interface Conn {
  conn: SeqpacketConnection;
  /** A receive that timed out stays pending; the next receive picks it up. */
  pending: Promise<Packet | null> | null;
  held: number[];
}

async function child(): Promise<void> {
  const conns = new Map<number, Conn>();
  let nextConn = 1;
  let devNull = -1;
  const out = (o: unknown) => process.stdout.write(`${JSON.stringify(o)}\n`);

  const receive = async (c: Conn, timeoutMs: number): Promise<Packet | null | 'timeout'> => {
    c.pending ??= c.conn.receive();
    const p = c.pending;
    let timer: NodeJS.Timeout | undefined;
    const r = await Promise.race([p, new Promise<'timeout'>((res) => { timer = setTimeout(() => res('timeout'), timeoutMs); })]);
    clearTimeout(timer);
    if (r !== 'timeout') c.pending = null;
    return r;
  };
  const keepOrClose = (c: Conn, fds: number[], hold: boolean) => {
    if (hold) c.held.push(...fds);
    else for (const fd of fds) fs.closeSync(fd);
  };
  const get = (id: number): Conn => {
    const c = conns.get(id);
    if (!c) throw new Error(`no connection ${id}`);
    return c;
  };
  const dropConn = (id: number) => {
    const c = conns.get(id);
    if (!c) return;
    c.conn.close();
    for (const fd of c.held) fs.closeSync(fd);
    conns.delete(id);
  };
  const open = async (socket: string): Promise<number> => {
    const conn = await SeqpacketConnection.connect(socket, { maxPacket: MAX_REPLY_BYTES, maxFds: MAX_REPLY_FDS });
    const id = nextConn++;
    conns.set(id, { conn, pending: null, held: [] });
    return id;
  };

  const handle = async (m: Record<string, any>): Promise<Record<string, unknown>> => {
    switch (m['cmd']) {
      case 'connect':
        return { conn: await open(m['socket']) };
      case 'connect-many': {
        const ids: number[] = [];
        for (let i = 0; i < m['n']; i++) ids.push(await open(m['socket']));
        return { conns: ids };
      }
      case 'send': {
        const c = get(m['conn']);
        let fds: number[] = [];
        if (m['heldFrom'] !== undefined) fds = get(m['heldFrom']).held.splice(0);
        else if (m['fds']) {
          if (devNull < 0) devNull = fs.openSync('/dev/null', 'r');
          fds = Array(m['fds']).fill(devNull);
        }
        try {
          await c.conn.send(Buffer.from(m['data'], 'base64'), fds);
        } finally {
          if (m['heldFrom'] !== undefined) for (const fd of fds) fs.closeSync(fd);
        }
        return {};
      }
      case 'recv': {
        const c = get(m['conn']);
        const p = await receive(c, m['timeoutMs'] ?? 5000);
        if (p === 'timeout') return { data: null, fds: 0, timedOut: true };
        if (!p) return { data: null, fds: 0, timedOut: false };
        keepOrClose(c, p.fds, !!m['hold']);
        return { data: p.data.toString('base64'), fds: p.fds.length, timedOut: false };
      }
      case 'close':
        dropConn(m['conn']);
        return {};
      case 'close-all':
        for (const id of [...conns.keys()]) dropConn(id);
        return {};
      case 'run':
        return { results: await run(m['socket'], (m['frames'] as string[]).map((f) => Buffer.from(f, 'base64')), m['reconnectEvery'] ?? 0) };
      default:
        throw new Error(`unknown command ${String(m['cmd'])}`);
    }
  };

  // Bulk: connect and say hello, then each frame in turn, waiting for its answer; reconnect (and say
  // hello again) whenever the broker closed the connection, and every `reconnectEvery` frames.
  const run = async (socket: string, frames: Buffer[], reconnectEvery: number) => {
    const results: Array<Omit<RunResult, 'reply'> & { reply: string | null }> = [];
    let id = -1;
    let sinceConnect = 0;
    const connectHello = async () => {
      id = await open(socket);
      sinceConnect = 0;
      const c = get(id);
      await c.conn.send(encodeFrame({ op: 'hello', id: 0, version: PROTOCOL_VERSION }));
      const p = await receive(c, 5000);
      if (p === 'timeout' || !p || decodeReply(p.data).op !== 'hello') throw new Error('no hello reply');
    };
    for (const frame of frames) {
      if (id < 0 || (reconnectEvery > 0 && sinceConnect >= reconnectEvery)) {
        if (id >= 0) dropConn(id);
        await connectHello();
      }
      sinceConnect++;
      const c = get(id);
      const r = { reply: null as string | null, fds: 0, sendError: null as string | null, closedAfter: false, timedOut: false };
      try {
        await c.conn.send(frame);
      } catch (err) {
        r.sendError = (err as Error).message;
      }
      if (r.sendError === null) {
        const p = await receive(c, 5000);
        if (p === 'timeout') r.timedOut = true;
        else if (p) {
          r.reply = p.data.toString('base64');
          r.fds = p.fds.length;
          keepOrClose(c, p.fds, false);
          // Replies after which the protocol closes the connection: make sure it did.
          let closing = false;
          try {
            const rep = decodeReply(p.data);
            closing = rep.op === 'error' && (rep.code === 'TB_E_VERSION' || rep.code === 'TB_E_HELLO_REQUIRED');
          } catch { /* judged by the test */ }
          if (closing) {
            const after = await receive(c, 2000);
            r.closedAfter = after === null;
            if (after !== null && after !== 'timeout') keepOrClose(c, after.fds, false);
          }
        }
      }
      results.push(r);
      if (r.reply === null || r.closedAfter || r.sendError !== null) {
        dropConn(id);
        id = -1;
      }
    }
    if (id >= 0) dropConn(id);
    return results;
  };

  const rl = readline.createInterface({ input: process.stdin });
  rl.on('line', (line) => {
    const m = JSON.parse(line) as Record<string, unknown>;
    handle(m).then(
      (r) => out({ seq: m['seq'], ok: true, ...r }),
      (err: Error & { code?: string }) => out({ seq: m['seq'], ok: false, error: err.message, code: err.code ?? null }),
    );
  });
  rl.on('close', () => {
    for (const id of [...conns.keys()]) dropConn(id);
    process.exit(0);
  });
}

// ---------------------------------------------------------------- test side

export class PeerError extends Error {
  constructor(message: string, readonly code: string | null) {
    super(message);
  }
}

export class Peer {
  private seq = 0;
  private readonly waiting = new Map<number, { resolve: (r: Record<string, any>) => void; reject: (e: Error) => void }>();
  private stderr = '';
  private readonly exited: Promise<void>;

  private constructor(private readonly proc: ChildProcess, readonly uid: number) {
    const rl = readline.createInterface({ input: proc.stdout! });
    rl.on('line', (line) => {
      const m = JSON.parse(line) as Record<string, any>;
      const w = this.waiting.get(m['seq']);
      if (!w) return;
      this.waiting.delete(m['seq']);
      if (m['ok']) w.resolve(m);
      else w.reject(new PeerError(m['error'], m['code']));
    });
    proc.stderr!.on('data', (d) => (this.stderr += d));
    this.exited = new Promise((resolve) => proc.once('exit', () => {
      for (const w of this.waiting.values()) w.reject(new Error(`peer exited: ${this.stderr}`));
      this.waiting.clear();
      resolve();
    }));
  }

  /** Starts a peer process as `as` (default uid 65534). */
  static start(as: As = {}): Peer {
    const proc = spawnAs(as, process.execPath, [SELF]);
    return new Peer(proc, as.uid ?? 65534);
  }

  private call(cmd: Record<string, unknown>): Promise<Record<string, any>> {
    const seq = ++this.seq;
    return new Promise((resolve, reject) => {
      this.waiting.set(seq, { resolve, reject });
      this.proc.stdin!.write(`${JSON.stringify({ ...cmd, seq })}\n`);
    });
  }

  async connect(socket: string): Promise<number> {
    return (await this.call({ cmd: 'connect', socket }))['conn'];
  }

  async connectMany(socket: string, n: number): Promise<number[]> {
    return (await this.call({ cmd: 'connect-many', socket, n }))['conns'];
  }

  /** Sends one packet, with `fds` copies of /dev/null, or the fds held from an earlier reply on `heldFrom`. */
  async send(conn: number, data: Buffer, opts: { fds?: number; heldFrom?: number } = {}): Promise<void> {
    await this.call({ cmd: 'send', conn, data: data.toString('base64'), ...opts });
  }

  /** The next packet; received fds are closed at once unless `hold`. */
  async recv(conn: number, opts: { timeoutMs?: number; hold?: boolean } = {}): Promise<Received> {
    const r = await this.call({ cmd: 'recv', conn, ...opts });
    return { data: r['data'] === null ? null : Buffer.from(r['data'], 'base64'), fds: r['fds'], timedOut: r['timedOut'] };
  }

  async exchange(conn: number, data: Buffer, opts: { fds?: number; heldFrom?: number; timeoutMs?: number; hold?: boolean } = {}): Promise<Received> {
    await this.send(conn, data, { ...(opts.fds ? { fds: opts.fds } : {}), ...(opts.heldFrom !== undefined ? { heldFrom: opts.heldFrom } : {}) });
    return this.recv(conn, { ...(opts.timeoutMs ? { timeoutMs: opts.timeoutMs } : {}), ...(opts.hold ? { hold: true } : {}) });
  }

  /** Closes the connection and any fds held from it. */
  async close(conn: number): Promise<void> {
    await this.call({ cmd: 'close', conn });
  }

  async closeAll(): Promise<void> {
    await this.call({ cmd: 'close-all' });
  }

  /** Bulk: see `run` in the child. */
  async run(socket: string, frames: Buffer[], opts: { reconnectEvery?: number } = {}): Promise<RunResult[]> {
    const r = await this.call({ cmd: 'run', socket, frames: frames.map((f) => f.toString('base64')), ...opts });
    return (r['results'] as Array<Omit<RunResult, 'reply'> & { reply: string | null }>).map((x) => ({ ...x, reply: x.reply === null ? null : Buffer.from(x.reply, 'base64') }));
  }

  async stop(): Promise<void> {
    this.proc.stdin!.end();
    await this.exited;
  }
}

if (process.argv[1] === SELF) void child();
