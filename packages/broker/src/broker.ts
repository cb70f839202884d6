// The privileged path, in order: accept → peer identity from the kernel → decode → validate →
// policy decision → netdev operation → audit record → reply with fds → close the broker's copies.
import { randomBytes } from 'node:crypto';
import {
  MAX_REQUEST_BYTES, PROTOCOL_VERSION, SeqpacketConnection, TapbrokerError,
  checkIfName, checkMac, decodeRequest, encodeFrame, macFromBuffer, macToBuffer, sys,
  type CreateTapRequest, type ErrorCode, type HelloRequest, type Reply, type SeqpacketListener,
} from '@tapbroker/protocol';
import { Audit } from './audit.js';
import { identify, type Identity } from './identity.js';
import { Leases } from './leases.js';
import { Netdev, closeInBackground } from './netdev.js';
import { MAX_QUEUES, decide, type Policy } from './policy.js';

export const BROKER_VERSION = 'tapbrokerd 0.1.0';
/** Fds a request may (wrongly) carry that are received and closed; the kernel closes any beyond. */
const MAX_REQUEST_FDS = 16;

export interface BrokerOptions {
  policy: Policy;
  /** Where audit records go (default: stderr). */
  auditFd?: number;
  /** A connection that has not said hello by then is closed. */
  helloTimeoutMs?: number;
  maxConnections?: number;
}

interface Outcome {
  reply: Reply;
  fds: number[];
}

export class Broker {
  policy: Policy;
  readonly netdev = new Netdev();
  readonly audit: Audit;
  readonly leases: Leases;
  private readonly sessions = new Set<Session>();
  private listener: SeqpacketListener | null = null;
  readonly helloTimeoutMs: number;
  private readonly maxConnections: number;

  constructor(opts: BrokerOptions) {
    this.policy = opts.policy;
    this.audit = new Audit(() => this.policy.sha256, opts.auditFd);
    this.helloTimeoutMs = opts.helloTimeoutMs ?? 5000;
    this.maxConnections = opts.maxConnections ?? 1024;
    this.leases = new Leases((ifindex, name) => this.netdev.rtnl.getLinkByIndex(ifindex)?.name === name);
  }

  serve(listener: SeqpacketListener): void {
    this.listener = listener;
    listener.start((fd) => this.accept(fd));
  }

  get connections(): number {
    return this.sessions.size;
  }

  /** Stops accepting, lets requests in flight finish, closes every connection. */
  async shutdown(): Promise<void> {
    this.listener?.close();
    this.listener = null;
    await Promise.all([...this.sessions].map((s) => s.finish()));
    this.netdev.close();
  }

  private accept(fd: number): void {
    const conn = new SeqpacketConnection(fd, { maxPacket: MAX_REQUEST_BYTES, maxFds: MAX_REQUEST_FDS });
    let caller: Identity;
    try {
      caller = identify(conn.peer());
    } catch {
      conn.close(); // The peer vanished before we could ask who it was.
      return;
    }
    const session = new Session(this, conn, caller);
    if (this.sessions.size >= this.maxConnections) {
      void session.refuse('TB_E_BUSY', `the broker is at its limit of ${this.maxConnections} connections; try again`);
      return;
    }
    this.sessions.add(session);
    void session.run().finally(() => this.sessions.delete(session));
  }

  // ---- handlers, one per op ----

  hello(req: HelloRequest): Outcome {
    if (req.version !== PROTOCOL_VERSION) {
      throw new TapbrokerError('TB_E_VERSION', `client speaks protocol version ${req.version}; this broker speaks ${PROTOCOL_VERSION}`);
    }
    return { reply: { op: 'hello', id: req.id, version: PROTOCOL_VERSION, broker: BROKER_VERSION }, fds: [] };
  }

  createTap(caller: Identity, req: CreateTapRequest): Outcome {
    const queues = req.queues ?? 1;
    const vhost = req.vhost ?? false;
    const vnetHdr = req.vnet_hdr ?? true;
    const request = { bridge: req.bridge, queues, vhost, vnet_hdr: vnetHdr, mac: req.mac ?? null, name: req.name ?? null };
    let audited = false;
    try {
      validateCreateTap(caller, req, queues);
      const decision = decide(this.policy, caller, { bridge: req.bridge, queues, vhost, mac: req.mac ?? null }, (rule) => this.leases.live(caller.uid, rule));
      if (!decision.allow) {
        this.audit.record({ op: 'create-tap', decision: 'deny', rule: decision.rule, caller, request, code: decision.code, message: decision.message });
        audited = true;
        throw new TapbrokerError(decision.code, decision.message, { rule: decision.rule ?? 'no rule matched', hint: decision.hint });
      }
      const rule = decision.rule;
      const bridge = this.netdev.bridge(req.bridge);
      const mac = req.mac ?? randomMac(rule.macPrefix);
      const created = this.createNamed(caller.uid, req.name, (name) =>
        this.netdev.createTap({ name, queues, vnetHdr, vhost, guestMac: macToBuffer(mac), bridge }));
      const device = {
        name: created.name, ifindex: created.ifindex, bridge: bridge.name, mtu: created.mtu, host_mac: macFromBuffer(created.hostMac),
        mac, queues, vnet_hdr: vnetHdr, vhost, rule: rule.name,
      };
      this.leases.add({ uid: caller.uid, rule: rule.name, kind: 'tap', name: created.name, ifindex: created.ifindex, bridge: bridge.name, mac, created: new Date().toISOString() });
      this.audit.record({ op: 'create-tap', decision: 'grant', rule: rule.name, caller, request, device });
      return {
        reply: { op: 'create-tap', id: req.id, device, fds: { tap: created.tapFds.length, vhost: created.vhostFds.length } },
        fds: [...created.tapFds, ...created.vhostFds],
      };
    } catch (err) {
      if (!audited) {
        const e = err instanceof TapbrokerError ? err : new TapbrokerError('TB_E_INTERNAL', String(err));
        this.audit.record({ op: 'create-tap', decision: 'error', rule: null, caller, request, code: e.code, message: e.message });
      }
      throw err;
    }
  }

  /** Tries the caller's name, or broker-chosen names `tb<uid>-<random>` until one is free. */
  private createNamed<T>(uid: number, asked: string | undefined, create: (name: string) => T): T & { name: string } {
    if (asked !== undefined) return { ...create(asked), name: asked };
    for (let attempt = 0; ; attempt++) {
      const name = tapName(uid);
      try {
        return { ...create(name), name };
      } catch (err) {
        if (!(err instanceof TapbrokerError && err.code === 'TB_E_DEVICE_EXISTS') || attempt >= 8) throw err;
      }
    }
  }
}

/** Names the caller may use begin with `tb<uid>-`, so no user can mimic a host device or another user's. */
export function namePrefix(uid: number): string {
  return `tb${uid}-`;
}

const BASE36 = '0123456789abcdefghijklmnopqrstuvwxyz';

/** `tb<uid>-` followed by random base-36 characters up to 15 bytes (at most 6 of them, at least 2). */
export function tapName(uid: number): string {
  const prefix = namePrefix(uid);
  const n = Math.max(2, Math.min(6, 15 - prefix.length));
  return prefix + [...randomBytes(n)].map((b) => BASE36[b % 36]).join('');
}

/** A random unicast MAC inside `prefix`. */
export function randomMac(prefix: string): string {
  const fixed = prefix.split(':');
  const rest = [...randomBytes(6 - fixed.length)].map((b) => b.toString(16).padStart(2, '0'));
  return [...fixed, ...rest].join(':');
}

function validateCreateTap(caller: Identity, req: CreateTapRequest, queues: number): void {
  const bridgeWhy = checkIfName(req.bridge);
  if (bridgeWhy) throw new TapbrokerError('TB_E_INVALID_NAME', `bridge name \`${printable(req.bridge)}' ${bridgeWhy}`);
  if (queues < 1 || queues > MAX_QUEUES) throw new TapbrokerError('TB_E_INVALID_QUEUES', `queues must be from 1 to ${MAX_QUEUES}, not ${queues}`);
  if (req.mac !== undefined) {
    const why = checkMac(req.mac);
    if (why) throw new TapbrokerError('TB_E_INVALID_MAC', `mac \`${printable(req.mac)}' ${why}`);
  }
  if (req.name !== undefined) {
    const why = checkIfName(req.name);
    if (why) throw new TapbrokerError('TB_E_INVALID_NAME', `name \`${printable(req.name)}' ${why}`);
    const prefix = namePrefix(caller.uid);
    if (!req.name.startsWith(prefix) || req.name.length === prefix.length) {
      throw new TapbrokerError('TB_E_INVALID_NAME', `name \`${req.name}' must begin with \`${prefix}' and have more after it`, { hint: `try \`${prefix}vm0'` });
    }
  }
}

/** Caller-supplied text as it may appear in a message: control characters escaped, length bounded. */
function printable(s: string): string {
  return JSON.stringify(s.slice(0, 64)).slice(1, -1);
}

/** One connection: requests are handled one at a time, in order; reading pauses while one is in flight. */
class Session {
  private helloed = false;
  private inFlight: Promise<void> = Promise.resolve();
  private helloTimer: NodeJS.Timeout | null = null;

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

  /** Waits for the request in flight, then closes. */
  async finish(): Promise<void> {
    await this.inFlight;
    this.close();
  }

  async refuse(code: ErrorCode, message: string): Promise<void> {
    await this.reply({ op: 'error', id: null, code, message }, []).catch(() => {});
    this.close();
  }

  private close(): void {
    if (this.helloTimer) clearTimeout(this.helloTimer);
    if (!this.conn.closed) {
      this.conn.close();
      if (this.caller.pidfd !== null) sys.close(this.caller.pidfd);
    }
  }

  /** Returns false when the connection must end after this request. */
  private async handle(data: Buffer, fds: number[], truncated: boolean): Promise<boolean> {
    // Nobody may hand the broker descriptors: close them at once, whatever else the frame says.
    if (fds.length > 0) {
      for (const fd of fds) sys.close(fd);
      return this.replyError(null, new TapbrokerError('TB_E_UNEXPECTED_FDS', `the request carried ${fds.length} file descriptor${fds.length > 1 ? 's' : ''}; they were closed`), true);
    }
    if (truncated) return this.replyError(null, new TapbrokerError('TB_E_FRAME_TOO_LARGE', `frame exceeds the ${MAX_REQUEST_BYTES}-byte cap`), true);
    const decoded = decodeRequest(data);
    if (!decoded.ok) return this.replyError(decoded.id, decoded.error, true);
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
          outcome = this.broker.createTap(this.caller, req);
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
    const reply: Reply = { op: 'error', id, code: e.code, message: e.message };
    if (e.rule !== undefined) reply.rule = e.rule;
    if (e.hint !== undefined) reply.hint = e.hint;
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
