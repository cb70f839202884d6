// The client library: connect, say hello, ask for devices, receive their fds.
import fs from 'node:fs';
import {
  MAX_REPLY_BYTES, MAX_REPLY_FDS, PROTOCOL_VERSION, SeqpacketConnection, TapbrokerError,
  decodeReply, encodeFrame, sys, type CreateTapRequest, type Reply, type TapDevice,
} from '@tapbroker/protocol';

export const DEFAULT_SOCKET = '/run/tapbroker/tapbroker.sock';

/** `--socket`, else $TAPBROKER_SOCKET, else the default. */
export function socketPath(explicit?: string | null): string {
  return explicit || process.env['TAPBROKER_SOCKET'] || DEFAULT_SOCKET;
}

export interface TapOptions {
  bridge: string;
  queues?: number;
  vhost?: boolean;
  vnetHdr?: boolean;
  mac?: string | null;
  name?: string | null;
}

/** A granted tap: the device as the broker made it and the fds this process now owns. */
export interface Tap {
  device: TapDevice;
  tapFds: number[];
  vhostFds: number[];
}

export function closeTap(tap: Tap): void {
  for (const fd of [...tap.tapFds, ...tap.vhostFds]) fs.closeSync(fd);
  tap.tapFds = [];
  tap.vhostFds = [];
}

export class TapbrokerClient {
  private nextId = 1;
  broker = '';

  private constructor(private readonly conn: SeqpacketConnection, readonly socket: string) {}

  /** Connects and performs the version handshake. */
  static async connect(socket?: string | null): Promise<TapbrokerClient> {
    const path = socketPath(socket);
    let conn: SeqpacketConnection;
    try {
      conn = await SeqpacketConnection.connect(path, { maxPacket: MAX_REPLY_BYTES, maxFds: MAX_REPLY_FDS });
    } catch (err) {
      throw new TapbrokerError('TB_E_CONNECT', `cannot connect to the broker at ${path}: ${err instanceof sys.SyscallError ? `${err.reason} (${err.code})` : (err as Error).message}`, { cause: err });
    }
    const client = new TapbrokerClient(conn, path);
    try {
      const { reply } = await client.call({ op: 'hello', id: client.nextId++, version: PROTOCOL_VERSION, client: 'tapbroker' });
      if (reply.op !== 'hello') throw new TapbrokerError('TB_E_BAD_REPLY', `expected a hello reply, got ${reply.op}`);
      client.broker = reply.broker;
    } catch (err) {
      client.close();
      throw err;
    }
    return client;
  }

  async createTap(opts: TapOptions): Promise<Tap> {
    const req: CreateTapRequest = { op: 'create-tap', id: this.nextId++, bridge: opts.bridge };
    if (opts.queues !== undefined) req.queues = opts.queues;
    if (opts.vhost !== undefined) req.vhost = opts.vhost;
    if (opts.vnetHdr !== undefined) req.vnet_hdr = opts.vnetHdr;
    if (opts.mac) req.mac = opts.mac;
    if (opts.name) req.name = opts.name;
    const { reply, fds } = await this.call(req);
    const closeAll = () => fds.forEach((fd) => fs.closeSync(fd));
    if (reply.op !== 'create-tap') {
      closeAll();
      throw new TapbrokerError('TB_E_BAD_REPLY', `expected a create-tap reply, got ${reply.op}`);
    }
    const want = reply.fds.tap + reply.fds.vhost;
    if (fds.length !== want || reply.fds.tap !== reply.device.queues || (reply.fds.vhost !== 0 && reply.fds.vhost !== reply.fds.tap)) {
      closeAll();
      throw new TapbrokerError('TB_E_BAD_REPLY', `the broker sent ${fds.length} fds for ${reply.fds.tap} tap and ${reply.fds.vhost} vhost fds`);
    }
    return { device: reply.device, tapFds: fds.slice(0, reply.fds.tap), vhostFds: fds.slice(reply.fds.tap) };
  }

  close(): void {
    this.conn.close();
  }

  /** One request, one reply. Error replies become TapbrokerErrors; stray fds are closed. */
  private async call(req: CreateTapRequest | { op: 'hello'; id: number; version: number; client: string }): Promise<{ reply: Reply; fds: number[] }> {
    await this.conn.send(encodeFrame(req)).catch((err: Error) => {
      throw new TapbrokerError('TB_E_BROKER_CLOSED', `the broker closed the connection: ${err.message}`);
    });
    const packet = await this.conn.receive();
    if (!packet) throw new TapbrokerError('TB_E_BROKER_CLOSED', 'the broker closed the connection before replying');
    const fail = (err: TapbrokerError): never => {
      packet.fds.forEach((fd) => fs.closeSync(fd));
      throw err;
    };
    if (packet.truncated || packet.fdsTruncated) fail(new TapbrokerError('TB_E_BAD_REPLY', 'the broker\'s reply was truncated'));
    let reply: Reply;
    try {
      reply = decodeReply(packet.data);
    } catch (err) {
      return fail(err as TapbrokerError);
    }
    if (reply.op === 'error') {
      fail(new TapbrokerError(reply.code, reply.message, { ...(reply.rule ? { rule: reply.rule } : {}), ...(reply.hint ? { hint: reply.hint } : {}) }));
    }
    if (reply.id !== req.id) fail(new TapbrokerError('TB_E_BAD_REPLY', `reply id ${String(reply.id)} does not match request id ${req.id}`));
    return { reply, fds: packet.fds };
  }
}
