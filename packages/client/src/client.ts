// The client library: connect, say hello, ask for devices, receive their fds.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import {
  MAX_NICS, MAX_REPLY_BYTES, MAX_REPLY_FDS, MAX_REQUEST_BYTES, PROTOCOL_VERSION, SeqpacketConnection, TapbrokerError,
  decodeReply, encodeRequest, sys, type CreateMacvtapRequest, type CreateTapRequest, type Device, type Lease,
  type CanRequest, type MacvtapMode, type Nic, type Reply, type Request, type StatusReply,
} from '@tapbroker/protocol/lite';

export const DEFAULT_SOCKET = '/run/tapbroker/tapbroker.sock';

/** What to do about a connect error: the way forward, not only the errno. */
/** A broker that closes without a word has usually died or failed to start (an invalid policy at a restart). */
const CLOSED_HINT = 'the broker may have stopped or failed to start: `systemctl status tapbrokerd` and '
  + '`journalctl -u tapbrokerd` say why (once fixed: `systemctl reset-failed tapbrokerd.socket tapbrokerd`, '
  + 'then start the socket)';
/** A connection closed before its first answer: a broker shedding the user's connections, or one stopping. */
const UNANSWERED_HINT = 'the broker closes a new connection unanswered when it is stopping, or when you hold too '
  + 'many connections (64) while past your share of its time: try again shortly, with fewer at once '
  + '(`systemctl status tapbrokerd` says whether it runs)';

const CONNECT_HINTS: Record<string, string> = {
  ENOENT: 'no broker listens there: is tapbrokerd.socket enabled and started (systemctl status tapbrokerd.socket)? '
    + 'Or give the right path with --socket or $TAPBROKER_SOCKET',
  ECONNREFUSED: 'the socket exists but nothing accepts on it: the broker is not running (systemctl status '
    + 'tapbrokerd.socket tapbrokerd.service), or it left a stale socket behind',
  ENOTDIR: 'the socket path is wrong: give the right one with --socket or $TAPBROKER_SOCKET',
  // A stream socket there (a hand-written unit's ListenStream=, another program's): an outside review got no hint.
  EPROTOTYPE: 'something other than tapbrokerd listens there (a stream socket): the broker\'s is SOCK_SEQPACKET '
    + '(ListenSequentialPacket= in tapbrokerd.socket); give the right path with --socket or $TAPBROKER_SOCKET',
};

/** The package's own group for the socket (sysusers.d): the one group whose joining the hint advises. */
const SOCKET_GROUP = 'tapbroker';

/**
 * Who may connect, from the socket's own group and mode (the package's is group tapbroker, 0660). Joining a group is
 * advised only for the package's own: any other may give far more than the broker (outside reviews: root, disk,
 * then input, ssl-cert, libvirt), which a client cannot tell.
 */
function accessHint(path: string): string {
  let group = SOCKET_GROUP;
  try {
    const st = fs.statSync(path);
    const mode = (st.mode & 0o777).toString(8);
    if ((st.mode & 0o060) !== 0o060) return `only root may connect (the socket's mode is 0${mode})`;
    group = fs.readFileSync('/etc/group', 'utf8').split('\n').map((l) => l.split(':'))
      .find((f) => f.length >= 3 && Number(f[2]) === st.gid)?.[0] ?? String(st.gid);
  } catch {
    // Its directory is closed to us too: the package's group is the best guess.
  }
  if (group === SOCKET_GROUP) {
    return `only root and members of group ${group} may connect: ask an administrator to add you `
      + `(usermod -aG ${group} USER), then log in again so the new group applies (\`id -nG\` shows it)`;
  }
  return `only root and members of group ${group} may connect: ask an administrator for access. If that group gives `
    + 'more than the broker (root, disk, input, libvirt, …), the socket should have a group of its own: '
    + `tapbrokerd -g ${SOCKET_GROUP}, or SocketGroup=${SOCKET_GROUP} in tapbrokerd.socket`;
}

/** A hint when `path` exists but is not a socket; null when it is one, or cannot be looked at. */
function notASocket(path: string): string | null {
  let st: fs.Stats;
  try {
    st = fs.statSync(path);
  } catch {
    return null;
  }
  if (st.isSocket()) return null;
  return `${path} is ${st.isDirectory() ? 'a directory' : 'not a socket'}: give the broker's socket with --socket or `
    + `$TAPBROKER_SOCKET (by default ${DEFAULT_SOCKET})`;
}

/** `--socket`, else $TAPBROKER_SOCKET, else the default. */
export function socketPath(explicit?: string | null): string {
  return explicit || process.env['TAPBROKER_SOCKET'] || DEFAULT_SOCKET;
}

interface CommonOptions {
  queues?: number;
  vhost?: boolean;
  vnetHdr?: boolean;
  mac?: string | null;
  name?: string | null;
  /** A persistent device owned by the caller; no fds come back. */
  persistent?: boolean;
}

/** Exactly one of `bridge` or `network`. */
export interface TapOptions extends CommonOptions {
  bridge?: string;
  network?: string;
  /** With `persistent`: a group (one of the caller's) that may also use the tap. */
  group?: number | null;
  /**
   * The hypervisor sets the guest's MAC and the broker is not told it (qemu-bridge-helper's way): the lease
   * and the audit record say so, and a rule with a MAC lock refuses the tap.
   */
  macUnknown?: boolean;
}

export interface MacvtapOptions extends CommonOptions {
  parent: string;
  mode?: MacvtapMode;
}

/** One NIC of a `createNics` request. */
export type NicOptions = ({ kind: 'tap' } & TapOptions) | ({ kind: 'macvtap' } & MacvtapOptions);

/** A granted device: as the broker made it, and the fds this process now owns (none for persistent ones). */
export interface Tap {
  device: Device;
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
  /** Has the broker answered anything on this connection (its hello)? */
  private answered = false;

  private constructor(private readonly conn: SeqpacketConnection, readonly socket: string) {}

  /** Connects and performs the version handshake; `opts.client` names the program in the audit records. */
  static async connect(socket?: string | null, opts: { client?: string } = {}): Promise<TapbrokerClient> {
    const path = socketPath(socket);
    let conn: SeqpacketConnection;
    try {
      conn = await SeqpacketConnection.connect(path, { maxPacket: MAX_REPLY_BYTES, maxFds: MAX_REPLY_FDS });
    } catch (err) {
      const why = err instanceof sys.SyscallError ? `${err.reason} (${err.code})` : (err as Error).message;
      const code = err instanceof sys.SyscallError ? err.code : '';
      // Something that is there but is no socket (a file, a directory): said as such, whatever connect(2) said.
      const hint = notASocket(path) ?? (code === 'EACCES' ? accessHint(path) : CONNECT_HINTS[code]);
      throw new TapbrokerError('TB_E_CONNECT', `cannot connect to the broker at ${path}: ${why}`, {
        cause: err,
        ...(hint ? { hint } : {}),
      });
    }
    const client = new TapbrokerClient(conn, path);
    try {
      checkPeer(conn, path);
      const { reply } = await client.call({
        op: 'hello',
        id: client.nextId++,
        version: PROTOCOL_VERSION,
        client: opts.client ?? 'tapbroker',
      });
      if (reply.op !== 'hello') throw new TapbrokerError('TB_E_BAD_REPLY', `expected a hello reply, got ${reply.op}`);
      client.broker = reply.broker;
    } catch (err) {
      client.close();
      throw err;
    }
    return client;
  }

  async createTap(opts: TapOptions): Promise<Tap> {
    return this.create({ op: 'create-tap', id: this.nextId++, ...tapFields(opts) });
  }

  /**
   * A macvtap outlives its fds, so the broker deletes it when this connection closes or this process
   * exits: keep the client open for as long as the VM runs.
   */
  async createMacvtap(opts: MacvtapOptions): Promise<Tap> {
    return this.create({ op: 'create-macvtap', id: this.nextId++, ...macvtapFields(opts) });
  }

  /**
   * One VM's NICs in one round trip: each decided on its own, granted all or none (a refusal names the
   * NIC in its message and as `nic`). Macvtaps among them end with this connection, as for createMacvtap.
   * More NICs than one request carries (MAX_NICS, or fds beyond MAX_REPLY_FDS) go in as few requests as
   * hold them, in order; if one is refused, what the earlier ones granted goes (fds closed, persistent
   * devices released; a macvtap among them still ends only with this connection), and the refusal names
   * the NIC by its place in `nics`.
   */
  async createNics(nics: readonly NicOptions[], opts: { onRetry?: (why: string) => void } = {}): Promise<Tap[]> {
    const parts = batches(nics);
    if (parts.length === 1) return this.createParts(nics, parts);
    // Several requests are decided under the policy in force at each: one reload between them would leave one VM's
    // NICs of a network on two bridges (an outside review: 32 on br0, 8 on br1). The count of policies the broker
    // has applied is read before and after (a digest would miss a reload and its revert: a re-test flipped one
    // back; a broker without the count is checked by its digest all the same); a change undoes what was made, and
    // the VM's NICs are asked for again.
    const loads = () => this.status().then((s) => `${s.started} ${s.policy_loads ?? s.policy_sha256}`, () => null);
    // Past the first attempt, a refusal as busy (its own undone devices still being unplugged) is asked again until
    // then: a count of the caller's teardowns would also wait for its other VMs' (a re-test: 30 s for nothing, or
    // asked too early once one of theirs ended).
    let until = 0;
    for (let attempt = 1; ; attempt++) {
      const before = await loads();
      const taps = await this.createPartsUntil(nics, parts, until).catch((err: unknown) => {
        throw attempt === 1 || !(err instanceof TapbrokerError) ? err
          : retold(err, `asked for again after the broker's policy changed: ${err.message}`, err.nic);
      });
      const after = await loads();
      if (before === null || after === null || before === after) return taps;
      await this.undo(taps);
      // A macvtap made goes only with this connection: asked for again, a fixed MAC of it would be in use.
      const held = taps.some((x) => x.device.kind === 'macvtap' && !x.device.persistent);
      if (attempt === POLICY_TRIES || held) {
        throw new TapbrokerError('TB_E_BUSY', `the broker's policy changed while this VM's ${nics.length} NICs were `
          + `made in ${parts.length} requests${held ? '' : `, ${POLICY_TRIES} times`}: none was kept`, {
          hint: held ? 'try again (its macvtaps go when this connection closes)'
            : 'try again once the policy is no longer being reloaded',
        });
      }
      opts.onRetry?.(`the broker's policy changed while ${nics.length} NICs were made in ${parts.length} requests: `
        + `what they got is undone, and they are asked for again (${attempt + 1} of ${POLICY_TRIES})`);
      // The kernel deletes them a while after their fds close, a network's `down` runs for each: until then they
      // count against the caller's quota, and their names are not given out (a re-test's retry was refused so).
      until = Date.now() + UNDONE_WAIT_MS;
      await this.untilGone(taps.map((x) => x.device.name), until);
    }
  }

  /** createParts; refused as busy, asked again (100 ms, doubling to 1 s, between) while `until` is ahead. */
  private async createPartsUntil(nics: readonly NicOptions[], parts: ReadonlyArray<{ from: number; to: number }>,
    until: number): Promise<Tap[]> {
    for (let wait = 100; ; wait = Math.min(2 * wait, 1000)) {
      try {
        return await this.createParts(nics, parts);
      } catch (err) {
        if (!(err instanceof TapbrokerError) || err.code !== 'TB_E_BUSY' || Date.now() + wait > until) throw err;
        await new Promise((r) => setTimeout(r, wait));
      }
    }
  }

  /** Until the broker lists none of these devices of the caller's, or `until`. */
  private async untilGone(names: readonly string[], until: number): Promise<void> {
    const undone = new Set(names);
    while (Date.now() < until) {
      const listed = await this.list().then(({ leases }) => leases.some((l) => undone.has(l.name)), () => false);
      if (!listed) return;
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /** `nics` in the requests `parts` says, in order; all or none. */
  private async createParts(nics: readonly NicOptions[], parts: ReadonlyArray<{ from: number; to: number }>) {
    const taps: Tap[] = [];
    try {
      for (const batch of parts) {
        try {
          taps.push(...(await this.createBatch(nics.slice(batch.from, batch.to))));
        } catch (err) {
          if (!(err instanceof TapbrokerError) || err.nic === undefined || batch.from === 0) throw err;
          const nic = batch.from + err.nic;
          // A batch of one NIC names it in `nic` alone.
          const message = /^NIC \d+:/.test(err.message) ? err.message.replace(/^NIC \d+:/, `NIC ${nic}:`)
            : `NIC ${nic}: ${err.message}`;
          throw retold(err, message, nic);
        }
      }
    } catch (err) {
      await this.undo(taps);
      throw err;
    }
    return taps;
  }

  /** What requests granted goes: fds closed, persistent devices released (a macvtap ends with this connection). */
  private async undo(taps: readonly Tap[]): Promise<void> {
    taps.forEach(closeTap);
    for (const tap of taps.filter((x) => x.device.persistent)) await this.release(tap.device.name).catch(() => {});
  }

  private async createBatch(nics: readonly NicOptions[]): Promise<Tap[]> {
    const req: Request = {
      op: 'create',
      id: this.nextId++,
      nics: nics.map(wireNic),
    };
    const { reply, fds } = await this.call(req);
    if (reply.op !== 'create' || reply.devices.length !== nics.length || reply.fds.length !== nics.length) {
      fds.forEach((fd) => fs.closeSync(fd));
      throw new TapbrokerError('TB_E_BAD_REPLY', `expected a create reply for ${nics.length} NICs, got ${reply.op}`);
    }
    const taps: Tap[] = [];
    let at = 0;
    try {
      for (const [i, device] of reply.devices.entries()) {
        const counts = reply.fds[i]!;
        const n = counts.tap + counts.vhost;
        if (at + n > fds.length) {
          throw new TapbrokerError('TB_E_BAD_REPLY', `the broker sent ${fds.length} fds for more`);
        }
        taps.push(granted(device, counts, fds.slice(at, at + n)));
        at += n;
      }
      if (at !== fds.length) {
        throw new TapbrokerError('TB_E_BAD_REPLY', `the broker sent ${fds.length - at} fds too many`);
      }
    } catch (err) {
      // A reply this client cannot take is no grant: its fds closed, the persistent devices it made released
      // (they outlive the fds; a macvtap ends with this connection). A persistent name in a create reply is
      // always one this request made: the broker refuses a name that exists.
      fds.forEach((fd) => fs.closeSync(fd));
      for (const d of reply.devices.filter((x) => x.persistent)) await this.release(d.name).catch(() => {});
      throw err;
    }
    return taps;
  }

  /** The broker, its policy, and the caller's standing: leases, and each rule that applies with its quota. */
  async status(): Promise<StatusReply> {
    const { reply } = await this.call({ op: 'status', id: this.nextId++ });
    if (reply.op !== 'status') throw new TapbrokerError('TB_E_BAD_REPLY', `expected a status reply, got ${reply.op}`);
    return reply;
  }

  /** The caller's leases (root: everyone's). */
  async list(): Promise<{ leases: Lease[]; truncated: boolean }> {
    const { reply } = await this.call({ op: 'list', id: this.nextId++ });
    if (reply.op !== 'list') throw new TapbrokerError('TB_E_BAD_REPLY', `expected a list reply, got ${reply.op}`);
    return { leases: reply.leases, truncated: reply.truncated };
  }

  /** Deletes a persistent device of the caller's. */
  async release(name: string): Promise<Lease> {
    const { reply } = await this.call({ op: 'release', id: this.nextId++, name });
    if (reply.op !== 'release') throw new TapbrokerError('TB_E_BAD_REPLY', `expected a release reply, got ${reply.op}`);
    return reply.lease;
  }

  /**
   * Dry run: would the broker grant this, and by which rule? Nothing is created. `before`: the NICs asked for
   * before it in the same request, counted as a `create` of them all counts them (quota, names, MACs).
   */
  async can(opts: CanNic & { before?: readonly CanNic[] }) {
    const req: Request = { op: 'can', id: this.nextId++, ...canFields(opts) };
    if (opts.before?.length) req.before = opts.before.map(canFields);
    const { reply } = await this.call(req);
    if (reply.op !== 'can') throw new TapbrokerError('TB_E_BAD_REPLY', `expected a can reply, got ${reply.op}`);
    return reply;
  }

  /** Root only: the broker re-reads its policy file; returns the new digest and what its load warned about. */
  async reload(): Promise<{ policy_sha256: string; warnings: string[] }> {
    let reply: Reply;
    try {
      ({ reply } = await this.call({ op: 'reload', id: this.nextId++ }));
    } catch (err) {
      // A reply this client cannot read says nothing of the reload: it may have applied (never "it failed").
      if (!(err instanceof TapbrokerError) || err.code !== 'TB_E_BAD_REPLY') throw err;
      throw new TapbrokerError(err.code, `${err.message}; the new policy may be in force`, {
        hint: 'tapbroker status shows the digest of the policy the broker serves',
      });
    }
    if (reply.op !== 'reload') throw new TapbrokerError('TB_E_BAD_REPLY', `expected a reload reply, got ${reply.op}`);
    return { policy_sha256: reply.policy_sha256, warnings: reply.warnings ?? [] };
  }

  private async create(req: CreateTapRequest | CreateMacvtapRequest): Promise<Tap> {
    const { reply, fds } = await this.call(req);
    if (reply.op !== req.op) {
      fds.forEach((fd) => fs.closeSync(fd));
      throw new TapbrokerError('TB_E_BAD_REPLY', `expected a ${req.op} reply, got ${reply.op}`);
    }
    const { device, fds: counts } = reply as Extract<Reply, { op: 'create-tap' | 'create-macvtap' }>;
    try {
      return granted(device, counts, fds);
    } catch (err) {
      // As in createBatch: no grant, and a persistent device it made released.
      fds.forEach((fd) => fs.closeSync(fd));
      if (device.persistent) await this.release(device.name).catch(() => {});
      throw err;
    }
  }

  close(): void {
    this.conn.close();
  }

  /**
   * A reply this client cannot read, or a field the broker does not know: where the broker is another version
   * (files upgraded, the broker not restarted yet: one protocol version, fields added within it), said so, with
   * the fix (an outside review of upgrades: `status` failed with "missing field" alone).
   */
  private skewed(err: TapbrokerError): TapbrokerError {
    const mine = (createRequire(import.meta.url)('../package.json') as { version: string }).version;
    // Only a field one side has and the other lacks, and only a version string of the expected form (a hostile
    // "broker" could otherwise print lines of its own choosing after `hint:`, an outside re-test noted).
    const theirs = /^tapbrokerd (\d+\.\d+\.\d+)$/.exec(this.broker ?? '')?.[1];
    if (!theirs || theirs === mine || !/(missing|unknown) field/.test(err.message)) return err;
    const older = (a: string, b: string) => {
      const [x, y] = [a, b].map((v) => v.split('.').map(Number));
      const i = x!.findIndex((n, k) => n !== y![k]);
      return i >= 0 && x![i]! < y![i]!;
    };
    return new TapbrokerError(err.code, err.message, {
      ...(err.rule ? { rule: err.rule } : {}), ...(err.nic !== undefined ? { nic: err.nic } : {}),
      hint: `the broker is tapbrokerd ${theirs} and this client ${mine}: `
        + (older(theirs, mine) ? 'restart the broker to run the version installed (systemctl restart tapbrokerd)'
          : 'use the client installed with the broker'),
    });
  }

  /**
   * The persistent devices a create reply this client refuses names (they outlive its fds), released: all or none
   * (an outside re-test: a reply whose fds the kernel cut short at this process's open-files limit left one). Only a
   * reply that reads as this request's can name them; a device is never released by a name the request gave, which
   * may be one the caller already had.
   */
  private async releaseMade(req: Request, data: Buffer): Promise<void> {
    if (req.op !== 'create' && req.op !== 'create-tap' && req.op !== 'create-macvtap') return;
    let reply: Reply;
    try {
      reply = decodeReply(data);
    } catch {
      return;
    }
    if (reply.id !== req.id) return;
    const made = reply.op === 'create' ? reply.devices : reply.op === req.op ? [reply.device] : [];
    for (const d of made.filter((x) => x.persistent)) await this.release(d.name).catch(() => {});
  }

  /** One request, one reply. Error replies become TapbrokerErrors; stray fds are closed. */
  private async call(req: Request): Promise<{ reply: Reply; fds: number[] }> {
    await this.conn.send(encodeRequest(req)).catch(async (err: Error) => {
      // The broker may have refused the connection (TB_E_BUSY) and closed it before our first request
      // went out: its refusal is still queued here, and says more than the broken pipe.
      const queued = await this.conn.receive().catch(() => null);
      const refusal = queued ? (() => { try { return decodeReply(queued.data); } catch { return null; } })() : null;
      queued?.fds.forEach((fd) => fs.closeSync(fd));
      if (refusal?.op === 'error' && !hasControlCharacters(refusal)) {
        throw new TapbrokerError(refusal.code, refusal.message, refusal.hint ? { hint: refusal.hint } : {});
      }
      throw new TapbrokerError('TB_E_BROKER_CLOSED', `the broker closed the connection: ${err.message}`,
        { hint: this.answered ? CLOSED_HINT : UNANSWERED_HINT });
    });
    const packet = await this.conn.receive();
    if (!packet) {
      throw new TapbrokerError('TB_E_BROKER_CLOSED', 'the broker closed the connection before replying',
        { hint: this.answered ? CLOSED_HINT : UNANSWERED_HINT });
    }
    this.answered = true;
    const fail = async (err: TapbrokerError): Promise<never> => {
      packet.fds.forEach((fd) => fs.closeSync(fd));
      await this.releaseMade(req, packet.data);
      throw err;
    };
    if (packet.fdsTruncated) {
      // The kernel drops the descriptors a process has no room for (MSG_CTRUNC): this process's limit, not the broker
      // (an outside review: it read as the broker's fault).
      return fail(new TapbrokerError('TB_E_BAD_REPLY', 'the reply\'s file descriptors did not all arrive: this process '
        + 'has no room for them under its open-files limit', { hint: 'raise it (ulimit -n) and ask again' }));
    }
    if (packet.truncated) return fail(new TapbrokerError('TB_E_BAD_REPLY', 'the broker\'s reply was truncated'));
    let reply: Reply;
    try {
      reply = decodeReply(packet.data);
    } catch (err) {
      return fail(this.skewed(err as TapbrokerError));
    }
    if (hasControlCharacters(reply)) {
      return fail(new TapbrokerError('TB_E_BAD_REPLY', 'the reply carries control characters'));
    }
    if (reply.op === 'error') {
      const e = new TapbrokerError(reply.code, reply.message, {
        ...(reply.rule ? { rule: reply.rule } : {}), ...(reply.hint ? { hint: reply.hint } : {}),
        ...(reply.nic !== undefined ? { nic: reply.nic } : {}),
      });
      return fail(reply.code === 'TB_E_INVALID_REQUEST' && /unknown field/.test(reply.message) ? this.skewed(e) : e);
    }
    if (reply.id !== req.id) {
      const ids = `reply id ${String(reply.id)} does not match request id ${req.id}`;
      return fail(new TapbrokerError('TB_E_BAD_REPLY', ids));
    }
    return { reply, fds: packet.fds };
  }
}

/**
 * The broker is root's. A socket at $TAPBROKER_SOCKET (or --socket) served by anyone else is not a
 * broker: it could hand qemu a socket for a NIC and read the guest's frames.
 */
function checkPeer(conn: SeqpacketConnection, path: string): void {
  const peer = conn.peer();
  if (peer.pidfd !== null) sys.close(peer.pidfd);
  if (peer.uid === 0) return;
  if (peer.uid === readId('/proc/sys/kernel/overflowuid') && !mapsRoot()) {
    // A rootless container: the host's root, like every uid its user namespace does not map, shows as the
    // overflow uid. The broker cannot be told from any other user's server from here, so it is not trusted.
    throw new TapbrokerError('TB_E_CONNECT', `the socket at ${path} is served by a uid this user namespace does not `
      + `map (shown as ${peer.uid}): a broker (root) cannot be told from any other user's server from here`,
    { hint: 'run tapbroker outside the user namespace, with the container as its command (tapbroker run --net … '
      + '-- podman run --preserve-fds=N …)' });
  }
  throw new TapbrokerError(
    'TB_E_CONNECT',
    `the socket at ${path} is served by uid ${peer.uid}, not root: not a tapbroker broker`,
    { hint: 'check --socket and $TAPBROKER_SOCKET' },
  );
}

function readId(file: string): number {
  try {
    return Number(fs.readFileSync(file, 'utf8'));
  } catch {
    return 65534;
  }
}

/** Does this process's user namespace map the host's root (uid_map: inside, outside, count)? */
function mapsRoot(): boolean {
  try {
    return fs.readFileSync('/proc/self/uid_map', 'utf8').split('\n').some((line) => {
      const [, outside, count] = line.trim().split(/\s+/).map(Number);
      return outside === 0 && count! > 0;
    });
  } catch {
    return true;
  }
}

/** A device and its fds, checked: the counts the reply states, and each fd what it says it is. */
function granted(device: Device, counts: { tap: number; vhost: number }, fds: number[]): Tap {
  const queueFds = device.persistent ? 0 : device.queues;
  const vhostOk = counts.vhost === 0 || counts.vhost === counts.tap;
  if (fds.length !== counts.tap + counts.vhost || counts.tap !== queueFds || !vhostOk) {
    throw new TapbrokerError(
      'TB_E_BAD_REPLY',
      `the broker sent ${fds.length} fds for ${counts.tap} queue and ${counts.vhost} vhost fds`,
    );
  }
  const why = fds.slice(0, counts.tap).map((fd) => notTheTap(fd, device.name)).find((w) => w !== null)
    ?? fds.slice(counts.tap).map(notVhost).find((w) => w !== null) ?? null;
  if (why !== null) throw new TapbrokerError('TB_E_BAD_REPLY', `the broker's fds are not what it says: ${why}`);
  return { device, tapFds: fds.slice(0, counts.tap), vhostFds: fds.slice(counts.tap) };
}

const TUNGETIFF = 0x800454d2;
const IFF_TAP = 0x0002;

/** Why `fd` is not a queue of the tap or macvtap `name`, or null. */
function notTheTap(fd: number, name: string): string | null {
  const ifr = Buffer.alloc(40);
  try {
    sys.ioctlPtr(fd, TUNGETIFF, ifr);
  } catch {
    return `fd for \`${name}' is not a tap`;
  }
  const end = ifr.indexOf(0);
  const got = ifr.toString('utf8', 0, end >= 0 && end < 16 ? end : 16);
  if ((ifr.readUInt16LE(16) & IFF_TAP) === 0) return `fd for \`${name}' is a tun, not a tap`;
  return got === name ? null : `fd for \`${name}' is attached to \`${got}'`;
}

/** Why `fd` is not /dev/vhost-net (char 10:238), or null. */
function notVhost(fd: number): string | null {
  const st = fs.fstatSync(fd);
  const rdev = BigInt(st.rdev);
  const major = Number(((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & ~0xfffn));
  const minor = Number((rdev & 0xffn) | ((rdev >> 12n) & ~0xffn));
  return st.isCharacterDevice() && major === 10 && minor === 238 ? null : 'a vhost fd is not /dev/vhost-net';
}

/** Control characters other than tab and newline, anywhere in a reply's strings (terminal escapes). */
function hasControlCharacters(v: unknown): boolean {
  if (typeof v === 'string') return /[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/.test(v);
  if (Array.isArray(v)) return v.some(hasControlCharacters);
  if (v && typeof v === 'object') return Object.values(v).some(hasControlCharacters);
  return false;
}

type CommonFields = Pick<CreateTapRequest, 'queues' | 'vhost' | 'vnet_hdr' | 'mac' | 'name' | 'persistent'>;

function tapFields(o: TapOptions): Omit<CreateTapRequest, 'op' | 'id'> {
  const r: Omit<CreateTapRequest, 'op' | 'id'> = common(o);
  if (o.bridge !== undefined) r.bridge = o.bridge;
  if (o.network !== undefined) r.network = o.network;
  if (o.group !== undefined && o.group !== null) r.group = o.group;
  if (o.macUnknown) r.mac = null;
  return r;
}

function macvtapFields(o: MacvtapOptions): Omit<CreateMacvtapRequest, 'op' | 'id'> {
  return { parent: o.parent, ...(o.mode ? { mode: o.mode } : {}), ...common(o) };
}

function common(o: CommonOptions): CommonFields {
  const r: CommonFields = {};
  if (o.queues !== undefined) r.queues = o.queues;
  if (o.vhost !== undefined) r.vhost = o.vhost;
  if (o.vnetHdr !== undefined) r.vnet_hdr = o.vnetHdr;
  if (o.mac) r.mac = o.mac;
  if (o.name) r.name = o.name;
  if (o.persistent) r.persistent = true;
  return r;
}

/** One NIC of a dry run. */
export interface CanNic {
  kind: 'tap' | 'macvtap' | 'network';
  parent: string;
  mode?: MacvtapMode | null;
  queues?: number;
  vhost?: boolean;
  mac?: string | null;
  /** A tap whose guest MAC the broker is not told (see TapOptions.macUnknown). */
  macUnknown?: boolean;
  name?: string | null;
  persistent?: boolean;
  /** A persistent tap given to this group too. */
  group?: number | null;
}

/** A dry run's NIC as the wire has it: only the fields given. */
function canFields(n: CanNic): NonNullable<CanRequest['before']>[number] {
  return {
    kind: n.kind, parent: n.parent, ...(n.mode ? { mode: n.mode } : {}),
    ...(n.queues !== undefined ? { queues: n.queues } : {}), ...(n.vhost !== undefined ? { vhost: n.vhost } : {}),
    ...(n.macUnknown ? { mac: null } : n.mac ? { mac: n.mac } : {}), ...(n.name ? { name: n.name } : {}),
    ...(n.persistent ? { persistent: true } : {}), ...(n.group != null ? { group: n.group } : {}),
  };
}

const wireNic = (n: NicOptions): Nic =>
  (n.kind === 'tap' ? { kind: 'tap', ...tapFields(n) } : { kind: 'macvtap', ...macvtapFields(n) });

/** A create request's bytes without its NICs, its id at its longest and its array's header at its largest. */
/** The same refusal told with another message (its rule and hint kept), naming NIC `nic` if any. */
function retold(err: TapbrokerError, message: string, nic: number | undefined): TapbrokerError {
  return new TapbrokerError(err.code, message, {
    ...(err.rule !== undefined ? { rule: err.rule } : {}),
    ...(err.hint !== undefined ? { hint: err.hint } : {}),
    ...(nic !== undefined ? { nic } : {}),
  });
}

/** Attempts of a VM's NICs made in several requests while the broker's policy keeps changing. */
const POLICY_TRIES = 3;
/** How long an attempt undone waits for its devices to be gone before the next (a network's `down` may be slow). */
const UNDONE_WAIT_MS = 30_000;

const CREATE_BYTES = encodeRequest({ op: 'create', id: 0xffffffff, nics: [] }).length + 2;

/**
 * Runs of NICs that each fit one create request and its reply: at most MAX_NICS, MAX_REPLY_FDS fds, and
 * MAX_REQUEST_BYTES (an outside review: 31 NICs with long network names, MACs and names were one request too large).
 */
function batches(nics: readonly NicOptions[]): Array<{ from: number; to: number }> {
  const out: Array<{ from: number; to: number }> = [];
  let from = 0;
  let fds = 0;
  let bytes = CREATE_BYTES;
  for (const [i, n] of nics.entries()) {
    // A bad queue count is the broker's to refuse; here it counts as its nearest valid value.
    const need = n.persistent ? 0 : Math.max(1, n.queues ?? 1) * (n.vhost ? 2 : 1);
    const size = encodeRequest({ op: 'create', id: 0, nics: [wireNic(n)] }).length - CREATE_BYTES + 6;
    if (i > from && (i - from >= MAX_NICS || fds + need > MAX_REPLY_FDS || bytes + size > MAX_REQUEST_BYTES)) {
      out.push({ from, to: i });
      [from, fds, bytes] = [i, 0, CREATE_BYTES];
    }
    fds += need;
    bytes += size;
  }
  // No NIC at all is one (empty) request, for the broker to refuse as it does.
  out.push({ from, to: nics.length });
  return out;
}
