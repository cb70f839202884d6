// One connection: the hello gate, then requests one at a time, in order, each dispatched by its op to
// the broker's handler of the same name; the reply (with fds) goes out, and the broker's copies close.
import {
  MAX_REQUEST_BYTES, SeqpacketConnection, TapbrokerError, decodeRequest, encodeFrame, sys, watchReadable,
  type ErrorCode, type Reply,
} from '@tapbroker/protocol';
import type { Broker, Outcome } from './broker.js';
import type { Identity } from './identity.js';
import { closeInBackground } from './netdev.js';

/** Reply text within the protocol's limits (1024 characters for messages). */
function bounded(s: string, max = 1024): string {
  return s.length <= max ? s : `${s.slice(0, max - 1)}…`;
}

/** One connection: requests are handled one at a time, in order; reading pauses while one is in flight. */
export class Session {
  private helloed = false;
  private inFlight: Promise<void> = Promise.resolve();
  private helloTimer: NodeJS.Timeout | null = null;
  /** Leases that end when this connection or its process ends. */
  private readonly held = new Set<string>();
  private holderWatch: { close(): void } | null = null;
  private shuttingDown = false;

  constructor(private readonly broker: Broker, private readonly conn: SeqpacketConnection, readonly caller: Identity) {}

  async run(): Promise<void> {
    this.helloTimer = setTimeout(() => void this.refuse('TB_E_TIMEOUT', `no hello within ${this.broker.helloTimeoutMs} ms`), this.broker.helloTimeoutMs);
    try {
      for (;;) {
        const packet = await this.conn.receive();
        if (!packet) break;
        let done!: () => void;
        this.inFlight = new Promise((r) => (done = r));
        try {
          if (!(await this.handle(packet.data, packet.fds, packet.truncated))) break;
        } finally {
          done();
        }
      }
    } catch {
      // A socket error ends this session only; the broker keeps serving everyone else.
    } finally {
      this.close();
    }
  }

  /** Broker shutdown: waits for the request in flight, then closes, keeping held leases for the next start. */
  async finish(): Promise<void> {
    this.shuttingDown = true;
    await this.inFlight;
    this.close();
  }

  async refuse(code: ErrorCode, message: string): Promise<void> {
    await this.reply({ op: 'error', id: null, code, message }, []).catch(() => {});
    this.close();
  }

  /** The lease ends with this connection, or sooner if the process that connected exits. */
  hold(leaseId: string): void {
    // A connection already gone ends the lease at once: nobody holds it.
    if (this.conn.closed) {
      this.broker.endLease(leaseId, 'its holder closed the connection');
      return;
    }
    this.held.add(leaseId);
    if (!this.holderWatch && this.caller.pidfd !== null) {
      this.holderWatch = watchReadable(this.caller.pidfd, () => this.endHeld('its holder exited'));
    }
  }

  private endHeld(reason: string): void {
    for (const id of this.held) this.broker.endLease(id, reason);
    this.held.clear();
  }

  private close(): void {
    if (this.helloTimer) clearTimeout(this.helloTimer);
    if (this.conn.closed) return;
    this.holderWatch?.close();
    this.conn.close();
    if (!this.shuttingDown) this.endHeld('its holder closed the connection');
    if (this.caller.pidfd !== null) sys.close(this.caller.pidfd);
  }

  /** Returns false when the connection must end after this request. */
  private async handle(data: Buffer, fds: number[], truncated: boolean): Promise<boolean> {
    // Nobody may hand the broker descriptors: close them at once, whatever else the frame says.
    // Before hello, any refusal also ends the connection; after it, the connection serves on.
    if (fds.length > 0) {
      // Off the event loop: one of them may be the last fd of a tap, whose close takes ~20 ms.
      void closeInBackground(fds);
      return this.replyError(null, new TapbrokerError('TB_E_UNEXPECTED_FDS', `the request carried ${fds.length} file descriptor${fds.length > 1 ? 's' : ''}; they were closed`), this.helloed);
    }
    if (truncated) return this.replyError(null, new TapbrokerError('TB_E_FRAME_TOO_LARGE', `frame exceeds the ${MAX_REQUEST_BYTES}-byte cap`), this.helloed);
    const decoded = decodeRequest(data);
    if (!decoded.ok) return this.replyError(decoded.id, decoded.error, this.helloed);
    const req = decoded.message;
    if (!this.helloed && req.op !== 'hello') {
      return this.replyError(req.id, new TapbrokerError('TB_E_HELLO_REQUIRED', `the first message must be hello, not ${req.op}`), false);
    }
    let outcome: Outcome;
    try {
      switch (req.op) {
        case 'hello':
          outcome = this.broker.hello(req);
          this.helloed = true;
          if (this.helloTimer) clearTimeout(this.helloTimer);
          break;
        case 'create-tap':
        case 'create-macvtap':
          outcome = await this.broker.create(this.caller, req, this);
          break;
        case 'list':
          outcome = this.broker.list(this.caller, req);
          break;
        case 'release':
          outcome = await this.broker.release(this.caller, req);
          break;
        case 'reload':
          outcome = this.broker.reloadOp(this.caller, req.id);
          break;
        case 'can':
          outcome = this.broker.can(this.caller, req);
          break;
      }
    } catch (err) {
      return this.replyError(req.id, err, req.op !== 'hello');
    }
    try {
      await this.reply(outcome.reply, outcome.fds);
    } catch {
      if (outcome.fds.length > 0) {
        this.broker.audit.record({ op: req.op, decision: 'cleanup', rule: null, caller: this.caller, code: 'TB_E_BROKER_CLOSED', message: 'the client went away before the reply; its devices were destroyed' });
      }
      return false;
    } finally {
      // Every fd has one owner: once sent (or not), the broker's copies go, off the event loop.
      void closeInBackground(outcome.fds);
    }
    return true;
  }

  private async replyError(id: number | null, err: unknown, keepOpen: boolean): Promise<boolean> {
    const e = err instanceof TapbrokerError ? err : new TapbrokerError('TB_E_INTERNAL', `internal error: ${(err as Error).message}`);
    if (e.code === 'TB_E_INTERNAL') process.stderr.write(`tapbrokerd: internal error: ${(err as Error).stack}\n`);
    const reply: Reply = { op: 'error', id, code: e.code, message: bounded(e.message) };
    if (e.rule !== undefined) reply.rule = bounded(e.rule, 128);
    if (e.hint !== undefined) reply.hint = bounded(e.hint);
    try {
      await this.reply(reply, []);
    } catch {
      return false;
    }
    return keepOpen;
  }

  private reply(reply: Reply, fds: number[]): Promise<void> {
    return this.conn.send(encodeFrame(reply), fds);
  }
}
