// One connection: the hello gate, then requests one at a time, in order, each dispatched by its op; the
// reply (with fds) goes out, and the broker's copies close. Foreign fds are never closed here, and a
// connection never closes with a peer's fds still queued on it.
import {
  MAX_REPLY_BYTES,
  MAX_REQUEST_BYTES,
  SeqpacketConnection,
  TapbrokerError,
  bounded,
  sys,
  watchReadable,
  type ErrorCode,
  type Reply,
  type Request,
} from '@tapbroker/protocol/core';
import { decodeRequest, encodeReply } from '@tapbroker/protocol/requests';
import type { Fairness } from './fairness.js';
import type { AuditOp } from './audit.js';
import { bytesShown, type Identity } from './identity.js';
import { toStderr } from './stderr.js';

/** What a handler returns: the reply, the fds that travel with it, and a lease this connection holds. */
export interface Outcome {
  reply: Reply;
  fds: number[];
  /** Leases that end when this connection or its process ends. */
  hold?: string[];
  /** Leases that go if the reply cannot be handed over (a persistent device its client never learned of). */
  undo?: string[];
  /** Called once the reply is sent, or could not be: its fds are counted as unread from then on. */
  sent?: () => void;
}

/** What a session needs of the broker (the broker implements it; no import cycle). */
export interface SessionHost {
  readonly helloTimeoutMs: number;
  /** A connection without a lease in force that sends nothing for this long is closed. */
  readonly idleTimeoutMs: number;
  dispatch(caller: Identity, req: Request): Outcome | Promise<Outcome>;
  /** The broker's copies of a reply's fds, closed off the event loop once sent (or not). */
  release(fds: number[], uid: number): void;
  /** Fds a client pushed: never closed in this process. */
  foreign(fds: number[]): void;
  endLease(id: string, reason: string): void;
  /** Is this lease still in force? */
  holds(id: string): boolean;
  /** An audit record for a refusal the handlers never saw (bad frames, fds, timeouts). */
  refused(caller: Identity, op: AuditOp, code: ErrorCode, message: string): void;
  /** Each uid's share of the broker's thread (fairness.ts). */
  readonly fairness: Fairness;
}

/** How often, at the least, a connection whose last reply is unread is looked at again. */
const UNREAD_REPLY_POLL_MAX_MS = 500;
const nextWait = (ms: number) => Math.min(2 * ms, UNREAD_REPLY_POLL_MAX_MS);
const pause = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** How long a reply may stay unsendable (the client's queue full) before its connection is closed. */
const UNSENDABLE_REPLY_MS = 5000;
/** Bytes of the name a client gives itself that its records show (128 characters may be 512 bytes). */
const CLIENT_BYTES = 64;

/** One connection: requests are handled one at a time, in order; reading pauses while one is in flight. */
/**
 * An error as the caller is told it: a TapbrokerError as it is; the broker short of fds or memory (an errno from a
 * step that has no code of its own: an outside review got TB_E_INTERNAL and a stack trace at the open-files limit)
 * as TB_E_KERNEL; anything else is a bug, TB_E_INTERNAL.
 */
export function toldAs(err: unknown): TapbrokerError {
  if (err instanceof TapbrokerError) return err;
  const message = (err as Error).message;
  if (shortOf(err)) return new TapbrokerError('TB_E_KERNEL', message, { cause: err, hint: SHORT_OF_HINT });
  return new TapbrokerError('TB_E_INTERNAL', `internal error: ${message}`);
}
/** Is `err` an errno of a broker out of open files or memory? */
export const shortOf = (err: unknown) => SHORT_OF.includes(String((err as { code?: unknown } | null)?.code));
const SHORT_OF = ['EMFILE', 'ENFILE', 'ENOMEM'];
export const SHORT_OF_HINT = 'the broker (or the system) is out of open files or memory; try again shortly (an '
  + 'administrator may raise the broker\'s LimitNOFILE= or the system\'s fs.file-max)';

export class Session {
  private helloed = false;
  private inFlight: Promise<void> = Promise.resolve();
  private timer: NodeJS.Timeout | null = null;
  /** Leases that end when this connection or its process ends. */
  private readonly held = new Set<string>();
  private holderWatch: { close(): void } | null = null;
  /** The process that connected has exited: what this connection is granted later has no holder. */
  private holderExited = false;
  private shuttingDown = false;
  /** The fds of the last reply, until the client has read it: in flight, the kernel charges them to root. */
  private fdsSent = 0;
  /** The persistent devices of the last reply, until the client has read it (Outcome.undo). */
  private undoUnread: string[] = [];

  constructor(
    private readonly host: SessionHost,
    private readonly conn: SeqpacketConnection,
    readonly caller: Identity,
  ) {}

  get closed(): boolean {
    return this.conn.closed;
  }

  /** The fds of this connection's last reply that its client has not read yet. */
  fdsUnread(): number {
    if (this.fdsSent > 0 && !this.repliesUnread()) this.fdsSent = 0;
    return this.fdsSent;
  }

  /**
   * The caller's share is charged every part of a request that runs on the broker's thread: its socket's wake-ups
   * (reading it, sending the reply), each stretch of this loop up to its next wait, the handler's (see handle), the
   * reply's encoding. An outside review: only the handler was charged, and a uid with no rule looping `status` on 64
   * connections (its reads and replies nearly all its cost) took 80 % of the thread uncharged; root's grants took
   * 20× longer.
   */
  private charge(t0: number): void {
    this.host.fairness.spent(this.caller.uid, performance.now() - t0);
  }

  /** When this loop's stretch now running began, or null while it waits (see lap). */
  private stretch: number | null = null;

  /**
   * Before each of the loop's waits: the stretch that ends here is charged (what the awaited promise ran when it was
   * made included). The next begins when the loop runs again (go), not when its promise resolved: sessions woken
   * together would each be charged for the others' stretches run in between.
   */
  private lap(): void {
    if (this.stretch !== null) this.charge(this.stretch);
    this.stretch = null;
  }

  private go(): void {
    this.stretch = performance.now();
  }

  async run(): Promise<void> {
    this.arm(this.host.helloTimeoutMs, 'TB_E_TIMEOUT', `no hello within ${this.host.helloTimeoutMs} ms`);
    this.conn.onWork = (ms) => this.host.fairness.spent(this.caller.uid, ms);
    this.go();
    try {
      for (;;) {
        const receiving = this.conn.receive();
        this.lap();
        const packet = await receiving;
        this.go();
        if (!packet) break;
        // A request in hand is not idleness: the idle timer starts again once it is answered (a slow hook or
        // Open vSwitch must not have the connection closed under its reply).
        if (this.helloed && this.timer) {
          clearTimeout(this.timer);
          this.timer = null;
        }
        // A client that does not read its replies holds them (and their fds) in flight, and would in the
        // end block the broker's send: handle nothing more from it until it has (a client that reads each
        // reply before its next request never waits), so one connection has at most one reply outstanding.
        // It waits as long as it likes: closing it would end the leases it holds (an outside review: a client
        // that sent its requests ahead lost a running VM's macvtap).
        const read = this.repliesRead();
        this.lap();
        await read;
        this.go();
        // Closed meanwhile (the broker stopping, or its client, the reply unread): the request waiting behind an
        // unread reply is not handled (a re-test: persistent creates carried out after the stop, for nobody).
        if (this.conn.closed || this.shuttingDown || this.conn.resetByPeer()) {
          this.host.foreign(packet.fds);
          break;
        }
        // A uid that took its share of the broker's time waits (with all its sessions) for the next window, and looks
        // again then: its sessions all wake at the window's turn.
        const turn = () => this.host.fairness.turn(this.caller.uid);
        for (let wait = turn(); wait; wait = turn()) {
          this.lap();
          await wait;
          this.go();
        }
        // And one request of its at a time in each turn of the event loop, however many connections it has.
        const slot = this.host.fairness.slot(this.caller.uid);
        if (slot) {
          this.lap();
          await slot;
          this.go();
        }
        let done!: () => void;
        this.inFlight = new Promise((r) => (done = r));
        try {
          if (packet.carriesFds) {
            // Where the kernel cannot refuse fds at the socket, they never enter the broker: the frame stays
            // queued with them, and the connection goes whole to the closer (close() below).
            const refused = this.refusal(null, 'request', new TapbrokerError('TB_E_UNEXPECTED_FDS',
              'the request carried file descriptors; they were never taken in, and the connection is closed'));
            this.lap();
            await refused;
            break;
          }
          // What the handler runs before it first waits (decoding, the decision, the kernel steps) is this stretch's,
          // not the time other sessions run meanwhile.
          const handled = this.handle(packet.data, packet.fds, packet.truncated);
          this.lap();
          const goOn = await handled;
          this.go();
          if (!goOn) break;
        } finally {
          done();
        }
        if (this.helloed) this.arm(this.host.idleTimeoutMs, null, 'idle');
      }
    } catch {
      // A socket error ends this session only; the broker keeps serving everyone else.
    } finally {
      this.lap();
      await this.linger();
      // A client that closed with its last reply unread never learned of the persistent devices in it (a re-test).
      const gone = this.conn.resetByPeer() ? this.undoUnread : [];
      for (const id of gone) this.host.endLease(id, 'its client closed without reading the reply');
      this.close();
    }
  }

  /**
   * A connection its client ends with its last reply's fds unread stays open, and counted, until the client reads
   * them or closes its end (its held leases end now): in flight, they are charged to root, and a closed connection
   * would count them no more (a re-test: SHUT_WR after each reply put 20,000 in flight, from one user).
   */
  private async linger(): Promise<void> {
    // So does one whose last reply named persistent devices, until it is read or not (a client that ended its side
    // first, then closed without reading, kept them: a re-test).
    const unread = () => this.fdsUnread() > 0 || (this.undoUnread.length > 0 && this.repliesUnread());
    if (this.shuttingDown || !unread()) return;
    this.endHeld('its holder closed the connection');
    for (let wait = 10; unread() && !this.shuttingDown; wait = nextWait(wait)) await pause(wait);
  }

  /** Is the last reply still in the client's queue (the connection open)? */
  private repliesUnread(): boolean {
    try {
      return !this.conn.closed && this.conn.queued('out') > 0;
    } catch {
      return false;
    }
  }

  /** Broker shutdown: waits for the request in flight, then closes, keeping held leases for the next start. */
  async finish(): Promise<void> {
    this.shuttingDown = true;
    await this.inFlight;
    this.close();
  }

  async refuse(code: ErrorCode, message: string): Promise<void> {
    this.host.refused(this.caller, 'connection', code, message);
    await this.reply({ op: 'error', id: null, code, message }, []).catch(() => {});
    this.close();
  }

  /** A timer that ends the connection: with an error reply (hello timeout) or quietly (idle). */
  private arm(ms: number, code: ErrorCode | null, message: string): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      if (code) return void this.refuse(code, message);
      // Leases that ended otherwise (a breach, a flood, root) are held no more.
      for (const id of this.held) if (!this.host.holds(id)) this.held.delete(id);
      // Not idle if a request came in while the broker was busy (this timer can run before it is read), nor while
      // its last reply's fds are unread: they stay in flight until it reads them or closes, and stay counted.
      if (this.held.size === 0 && !this.requestWaiting() && this.fdsUnread() === 0) this.close();
      else this.arm(ms, null, message);
    }, ms);
    this.timer.unref?.();
  }

  private requestWaiting(): boolean {
    try {
      return !this.conn.closed && this.conn.queued('in') > 0;
    } catch {
      return false;
    }
  }

  /** Until the last reply has been read (or the connection is gone): looked at after 10 ms, then less often. */
  private async repliesRead(): Promise<void> {
    for (let wait = 10; this.repliesUnread(); wait = nextWait(wait)) await pause(wait);
  }

  /** The lease ends with this connection, or sooner if the process that connected exits. */
  private hold(leaseId: string): void {
    // A connection already gone ends the lease at once: nobody holds it.
    if (this.conn.closed) {
      this.host.endLease(leaseId, 'its holder closed the connection');
      return;
    }
    // So does a holder that exited: a process it handed the connection to holds nothing (rv36).
    if (this.holderExited) {
      this.host.endLease(leaseId, 'its holder exited');
      return;
    }
    this.held.add(leaseId);
    if (!this.holderWatch && this.caller.pidfd !== null) {
      const pidfd = this.caller.pidfd;
      // Level-triggered: stop watching once it fired, or an exited holder's pidfd fires forever.
      this.holderWatch = watchReadable(pidfd, () => {
        this.holderWatch?.close();
        this.holderExited = true;
        this.endHeld('its holder exited');
      });
    }
  }

  private endHeld(reason: string): void {
    for (const id of this.held) this.host.endLease(id, reason);
    this.held.clear();
  }

  private close(): void {
    if (this.timer) clearTimeout(this.timer);
    if (this.conn.closed) return;
    // Charged to the caller's share, as its accept was (connections opened and closed in a loop cost the broker).
    const t0 = performance.now();
    this.holderWatch?.close();
    this.holderWatch = null;
    // The pidfd first: at the open-files limit, counting what is queued takes an fd (a re-test's client was never
    // answered when it could not).
    if (this.caller.pidfd !== null) sys.close(this.caller.pidfd);
    // Packets still queued may carry fds: their last close must not happen in this thread.
    this.conn.drainAndClose((fds) => this.host.foreign(fds));
    sys.reserveSpareFd();
    if (!this.shuttingDown) this.endHeld('its holder closed the connection');
    this.host.fairness.spent(this.caller.uid, performance.now() - t0);
  }

  /** Returns false when the connection must end after this request. */
  private async handle(data: Buffer, fds: number[], truncated: boolean): Promise<boolean> {
    // Nobody may hand the broker descriptors (the socket refuses them where the kernel can). Any that
    // arrive go to the closer, whatever else the frame says. Before hello, any refusal also ends the
    // connection; after it, the connection serves on.
    if (fds.length > 0) {
      this.host.foreign(fds);
      const n = fds.length;
      return this.refusal(
        null,
        'request',
        new TapbrokerError(
          'TB_E_UNEXPECTED_FDS',
          `the request carried ${n} file descriptor${n > 1 ? 's' : ''}; they were closed`,
        ),
      );
    }
    if (truncated)
      return this.refusal(
        null,
        'request',
        new TapbrokerError('TB_E_FRAME_TOO_LARGE', `frame exceeds the ${MAX_REQUEST_BYTES}-byte cap`),
      );
    const decoded = decodeRequest(data);
    if (!decoded.ok) return this.refusal(decoded.id, 'request', decoded.error);
    const req = decoded.message;
    if (!this.helloed && req.op !== 'hello') {
      return this.refusal(
        req.id,
        req.op,
        new TapbrokerError('TB_E_HELLO_REQUIRED', `the first message must be hello, not ${req.op}`),
      );
    }
    let outcome: Outcome;
    try {
      outcome = await this.host.dispatch(this.caller, req);
    } catch (err) {
      // A refused hello (a protocol version the broker does not speak) is audited as any refusal no handler
      // records; the other ops' handlers record their own.
      if (req.op === 'hello' && err instanceof TapbrokerError) {
        this.host.refused(this.caller, 'hello', err.code, err.message);
      }
      return this.replyError(req.id, err, req.op !== 'hello');
    }
    if (req.op === 'hello') {
      // The first hello names the client for the connection's records; a later one cannot rename it.
      // Its bytes as the audit trail writes a program's (an outside review: `?' for every other character made names
      // alike), at most CLIENT_BYTES of them.
      const client = req.client;
      if (!this.helloed && client !== undefined) this.caller.client = bytesShown(Buffer.from(client), CLIENT_BYTES);
      this.helloed = true;
      if (this.timer) clearTimeout(this.timer);
    }
    try {
      for (const id of outcome.hold ?? []) this.hold(id);
      await this.reply(outcome.reply, outcome.fds);
      this.undoUnread = outcome.undo ?? [];
    } catch (err) {
      // What it granted ends below, each with its record; that the reply did not go, and why, is recorded here.
      if (outcome.fds.length > 0 || outcome.undo?.length) {
        const why = `the reply could not be sent (${(err as Error).message}): what it granted ends`;
        this.host.refused(this.caller, req.op, 'TB_E_KERNEL', why);
      }
      // Nobody holds what could not be handed over (or watched): it ends now, and a persistent device its client
      // never learned of goes too (a client gone before the reply: nothing of its create stays).
      for (const id of outcome.hold ?? []) {
        if (!this.held.has(id)) this.host.endLease(id, 'it could not be handed over');
      }
      for (const id of outcome.undo ?? []) this.host.endLease(id, 'its client was gone before the reply');
      return false;
    } finally {
      outcome.sent?.();
      // Every fd has one owner: once sent (or not), the broker's copies go, off the event loop.
      this.host.release(outcome.fds, this.caller.uid);
    }
    return true;
  }

  /** A refusal of a frame no handler saw: audited here, then answered. */
  private refusal(id: number | null, op: AuditOp, e: TapbrokerError): Promise<boolean> {
    this.host.refused(this.caller, op, e.code, e.message);
    return this.replyError(id, e, this.helloed);
  }

  private async replyError(id: number | null, err: unknown, keepOpen: boolean): Promise<boolean> {
    const e = toldAs(err);
    if (e.code === 'TB_E_INTERNAL') toStderr(`tapbrokerd: internal error: ${(err as Error).stack}\n`);
    const reply: Reply = { op: 'error', id, code: e.code, message: bounded(e.message) };
    if (e.rule !== undefined) reply.rule = bounded(e.rule, 128);
    if (e.hint !== undefined) reply.hint = bounded(e.hint);
    if (e.nic !== undefined) reply.nic = e.nic;
    try {
      await this.reply(reply, []);
    } catch {
      return false;
    }
    return keepOpen;
  }

  /** Sends a reply; one the client leaves unsendable (its queue full) for UNSENDABLE_REPLY_MS ends the connection. */
  private async reply(reply: Reply, fds: number[]): Promise<void> {
    const stuck = setTimeout(() => this.close(), UNSENDABLE_REPLY_MS);
    try {
      // Sent now where the socket has room: encoded and sent after the handler's first wait, it is charged here
      // (before it, the loop's stretch holds it).
      const t0 = performance.now();
      let frame = encodeReply(reply);
      if (frame.length > MAX_REPLY_BYTES && fds.length === 0) {
        // A broker bug (every reply is bounded): said, and the client told so, not left with a closed connection.
        toStderr(`tapbrokerd: internal error: a ${reply.op} reply of ${frame.length} bytes is over the cap\n`);
        frame = encodeReply({ op: 'error', id: reply.id, code: 'TB_E_INTERNAL', message: 'the reply was too large' });
      }
      const sent = this.conn.send(frame, fds);
      if (this.stretch === null) this.charge(t0);
      await sent;
      this.fdsSent = fds.length;
      this.undoUnread = [];
    } finally {
      clearTimeout(stuck);
    }
  }

  /** Broker shutdown past its grace: closes now, keeping held leases for the next start. */
  abandon(): void {
    this.shuttingDown = true;
    this.close();
  }
}
