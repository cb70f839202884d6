// AF_UNIX SOCK_SEQPACKET with fd passing and peer credentials, on Node's event loop.
// Each socket has exactly one libuv poll handle, watching only what someone waits for; the handle
// is closed before the fd. Every received fd is handed to the caller, who owns it from then on.
import fs from 'node:fs';
import * as sys from './sys.js';

/** The kernel's own limit of fds in one SCM_RIGHTS message (SCM_MAX_FD). */
export const SCM_MAX_FD = sys.SCM_MAX_FD;
const ECONNRESET = sys.errno.ECONNRESET;

export interface Packet {
  data: Buffer;
  /** Descriptors that arrived with the packet (CLOEXEC); the receiver owns and must close them. */
  fds: number[];
  /** The packet was larger than the receive buffer; `data` holds only its start. */
  truncated: boolean;
  /** More fds were sent than fit; the kernel closed the excess. */
  fdsTruncated: boolean;
  /**
   * On a connection that takes no fds: the packet carries some. It was read by peeking and is still queued,
   * its fds never in this process; only drainAndClose may follow.
   */
  carriesFds?: boolean;
}

export interface PeerCredentials {
  pid: number;
  uid: number;
  gid: number;
  /** Supplementary groups of the peer at connect time (SO_PEERGROUPS). */
  groups: number[];
  /** A pidfd for the peer process (SO_PEERPIDFD), or null where the kernel lacks it. Owned by the caller. */
  pidfd: number | null;
}

type Interest = sys.PollInterest;

/** One poll handle per fd, started with the union of what is waited for. */
class Poller {
  private handle: sys.PollHandle | null = null;
  private interest: Interest = { readable: false, writable: false };
  constructor(private readonly fd: number, private readonly onEvent: (status: number, ev: Interest) => void) {}

  want(change: Partial<Interest>): void {
    const next = { ...this.interest, ...change };
    if (next.readable === this.interest.readable && next.writable === this.interest.writable && this.handle) return;
    this.interest = next;
    if (!next.readable && !next.writable) {
      this.handle?.stop();
      return;
    }
    // An exception escaping a libuv poll callback wedges the process: report it and carry on.
    const cb = (status: number, ev: Interest) => {
      try {
        this.onEvent(status, ev);
      } catch (err) {
        process.stderr.write(`tapbroker: error in a poll callback: ${(err as Error).stack}\n`);
      }
    };
    if (!this.handle) this.handle = sys.pollHandle(this.fd, next, cb);
    else this.handle.start(next, cb);
  }

  close(): void {
    this.handle?.close();
    this.handle = null;
  }

  /** libuv stopped the handle itself (it does on POLLERR): started again for `again`, else at the next want(). */
  stopped(again?: Partial<Interest>): void {
    this.interest = { readable: false, writable: false };
    if (again) this.want(again);
  }
}

/** Calls `onReadable` each time `fd` is readable until closed (a pidfd turns readable when its process exits). */
export function watchReadable(fd: number, onReadable: () => void): { close(): void } {
  const poller = new Poller(fd, (status) => {
    // POLLERR (libuv says EBADF and stops the handle): e.g. a netlink socket that overran. Restart and
    // let the reader meet the error (ENOBUFS) itself.
    if (status < 0) poller.stopped({ readable: true });
    onReadable();
  });
  poller.want({ readable: true });
  return { close: () => poller.close() };
}

interface PendingSend {
  data: Buffer;
  fds: readonly number[];
  resolve: () => void;
  reject: (err: Error) => void;
}

export class SeqpacketConnection {
  readonly fd: number;
  private readonly poller: Poller;
  private readonly receiver: sys.Receiver;
  private pendingReceive: { resolve: (p: Packet | null) => void; reject: (e: Error) => void } | null = null;
  private readonly sendQueue: PendingSend[] = [];
  private _closed = false;
  /**
   * Told how long each of the socket's own wake-ups took (reading a packet, flushing sends): work done outside its
   * owner's code, for the owner to account for (the broker charges it to the peer's share of its thread).
   */
  onWork: ((ms: number) => void) | null = null;

  /**
   * Takes ownership of a connected, non-blocking SEQPACKET socket. Room is made for `maxFds` received
   * fds (default: the kernel's most, so the kernel never discards any inside this process's recvmsg).
   */
  constructor(fd: number, opts: { maxPacket: number; maxFds?: number; takesFds?: boolean }) {
    this.fd = fd;
    this.takesFds = opts.takesFds ?? true;
    this.receiver = new sys.Receiver(opts.maxPacket, this.takesFds ? opts.maxFds ?? SCM_MAX_FD : 0);
    this.poller = new Poller(fd, (status, ev) => {
      const t0 = this.onWork ? performance.now() : 0;
      this.onPoll(status, ev);
      this.onWork?.(performance.now() - t0);
    });
  }

  /**
   * False where a peer's fds must never enter this process (a broker whose kernel cannot refuse them at the
   * socket): every close() of a descriptor runs its file's flush, which a FUSE server can make wait for ever,
   * whoever else holds the file. Packets are then peeked without a control buffer (the kernel installs no
   * fd), and one that carries fds is left queued for drainAndClose, which hands the whole socket over.
   */
  private readonly takesFds: boolean;

  /** Connects to a listening SEQPACKET socket at `path`, waiting while its backlog is full. */
  static async connect(path: string, opts: { maxPacket: number; maxFds?: number; connectTimeoutMs?: number }):
    Promise<SeqpacketConnection> {
    const addr = sys.sockaddrUn(path);
    const fd = sys.socket(sys.AF_UNIX, sys.SOCK_SEQPACKET | sys.SOCK_NONBLOCK | sys.SOCK_CLOEXEC);
    try {
      try {
        sys.connect(fd, addr, `\`${path}'`);
      } catch (err) {
        // A non-blocking AF_UNIX connect says EAGAIN while the listener's backlog is full: a busy broker, not a
        // missing one. Wait in the kernel's line of connectors, within a bound: a client that slept and tried again
        // lost its turn to every connector that blocked (an outside review: 1.8 s behind a flood of connections).
        if (!(err instanceof sys.SyscallError && err.errno === sys.errno.EAGAIN)) throw err;
        await sys.connectInLine(fd, addr, opts.connectTimeoutMs ?? 10_000, `\`${path}'`);
      }
    } catch (err) {
      sys.close(fd);
      throw err;
    }
    return new SeqpacketConnection(fd, opts);
  }

  get closed(): boolean {
    return this._closed;
  }

  /** Did the peer close with data of ours unread (ECONNRESET, seen by a read or pending on the socket)? */
  resetByPeer(): boolean {
    this.reset ||= !this._closed && sys.getsockoptInt(this.fd, sys.SOL_SOCKET, 4 /* SO_ERROR */) === ECONNRESET;
    return this.reset;
  }

  private reset = false;
  /** `err` is the peer's reset: noted for resetByPeer. */
  private isReset = (e: unknown) => e instanceof sys.SyscallError && e.errno === ECONNRESET && (this.reset = true);

  /** Credentials of the peer as the kernel recorded them at connect time. */
  peer(): PeerCredentials {
    const cred = Buffer.alloc(12);
    sys.getsockopt(this.fd, sys.SOL_SOCKET, sys.SO_PEERCRED, cred);
    let groupsBuf = Buffer.alloc(4 * 256);
    for (;;) {
      try {
        const len = sys.getsockopt(this.fd, sys.SOL_SOCKET, sys.SO_PEERGROUPS, groupsBuf);
        groupsBuf = groupsBuf.subarray(0, len);
        break;
      } catch (err) {
        if (!(err instanceof sys.SyscallError) || err.errno !== sys.errno.ERANGE || groupsBuf.length >= 4 * 65536) {
          throw err;
        }
        groupsBuf = Buffer.alloc(groupsBuf.length * 16);
      }
    }
    const groups: number[] = [];
    for (let o = 0; o + 4 <= groupsBuf.length; o += 4) groups.push(groupsBuf.readUInt32LE(o));
    let pidfd: number | null = null;
    try {
      pidfd = sys.getsockoptInt(this.fd, sys.SOL_SOCKET, sys.SO_PEERPIDFD);
    } catch (err) {
      const { ENOPROTOOPT, ESRCH } = sys.errno;
      if (!(err instanceof sys.SyscallError && (err.errno === ENOPROTOOPT || err.errno === ESRCH))) throw err;
    }
    return { pid: cred.readInt32LE(0), uid: cred.readUInt32LE(4), gid: cred.readUInt32LE(8), groups, pidfd };
  }

  /** The next packet, or null once the peer has closed. One receive may be outstanding at a time. */
  receive(): Promise<Packet | null> {
    if (this.pendingReceive) return Promise.reject(new Error('receive already pending'));
    if (this._closed) return Promise.resolve(null);
    return new Promise((resolve, reject) => {
      this.pendingReceive = { resolve, reject };
      this.tryReceive();
    });
  }

  /** Sends one packet with `fds` attached. The caller still owns the fds and closes them after. */
  send(data: Buffer, fds: readonly number[] = []): Promise<void> {
    if (this._closed) return Promise.reject(new sys.SyscallError('sendmsg', sys.errno.EBADF, 'on a closed connection'));
    const many = fds.length > SCM_MAX_FD && new sys.SyscallError('sendmsg', sys.errno.EINVAL, `${fds.length} fds`);
    if (many) return Promise.reject(many);
    return new Promise((resolve, reject) => {
      this.sendQueue.push({ data, fds, resolve, reject });
      if (this.sendQueue.length === 1) this.flush();
    });
  }

  /** Bytes queued on this socket: `in`, sent by the peer, not read yet (SIOCINQ); `out`, the reverse (SIOCOUTQ). */
  queued(which: 'in' | 'out'): number {
    const buf = Buffer.alloc(4);
    sys.ioctlPtr(this.fd, which === 'in' ? 0x541b : 0x5411, buf);
    return buf.readInt32LE(0);
  }

  /**
   * Refuses fds sent to this socket from now on (SO_PASSRIGHTS=0, Linux ≥ 6.16: the sender gets EPERM).
   * Returns false where the kernel lacks the option.
   */
  refuseFds(): boolean {
    return refuseFds(this.fd);
  }

  /**
   * Closes without ever releasing a peer's fds in this thread: reading is shut down (the peer can queue
   * nothing more), every packet still queued is read, and the fds they carried go to `foreign` before
   * the socket closes. A queued fd's last close can block (a lingering TCP socket) — whoever receives
   * them must close them elsewhere. A connection that takes no fds closes here only if no fds are queued
   * in it; otherwise its socket goes to `foreign`, with them (fd-free packets ahead of them are read first).
   */
  drainAndClose(foreign: (fds: number[]) => void): void {
    if (this._closed) return;
    if (!this.takesFds) {
      // Packets without fds are read off (a socket closed with its queue unread resets the peer, which would
      // lose the reply it was sent), up to the first that carries fds, is empty, or errs: an empty packet
      // reads as the end of the connection, and a reset (ECONNRESET) is reported once ahead of packets still
      // queued, so neither says the queue is empty. What is left cannot grow once reading is shut down; the
      // kernel counts the fds in it (`scm_fds`, Linux 5.7), and a socket's last close releases them in the
      // closing thread: with none the socket closes here, otherwise (or where the count cannot be read) it
      // goes to `foreign`.
      let shut = false;
      try {
        sys.shutdown(this.fd, sys.SHUT_RD);
        shut = true;
        for (let i = 0; i < 100_000; i++) {
          const m = this.receiver.recv(this.fd, sys.MSG_DONTWAIT | sys.MSG_PEEK);
          if (m === null || m.data.length === 0 || (m.flags & sys.MSG_CTRUNC) !== 0) break;
          this.receiver.recv(this.fd, sys.MSG_DONTWAIT);
        }
      } catch {
        // ECONNRESET, ENOTCONN: nothing more is read.
      }
      if (shut && sys.queuedFds(this.fd) === 0) this.close();
      else this.end((fd) => foreign([fd]));
      return;
    }
    try {
      sys.shutdown(this.fd, sys.SHUT_RD);
      for (let i = 0; i < 100_000; i++) {
        const m = this.receiver.recv(this.fd, sys.MSG_DONTWAIT | sys.MSG_CMSG_CLOEXEC);
        if (m === null || (m.data.length === 0 && m.fds.length === 0)) break;
        if (m.fds.length > 0) foreign(m.fds);
      }
    } catch {
      // ENOTCONN, ECONNRESET: nothing more to read.
    }
    this.close();
  }

  /** Closes the socket; a pending receive resolves to null and queued sends fail. */
  close(): void {
    this.end((fd) => sys.close(fd));
  }

  /** Ends the connection; `release` takes the socket (closes it, or hands it to whoever will). */
  private end(release: (fd: number) => void): void {
    if (this._closed) return;
    this._closed = true;
    this.poller.close();
    release(this.fd);
    const pr = this.pendingReceive;
    this.pendingReceive = null;
    pr?.resolve(null);
    const closed = new sys.SyscallError('sendmsg', sys.errno.EPIPE, 'connection closed');
    for (const s of this.sendQueue.splice(0)) s.reject(closed);
  }

  private onPoll(status: number, ev: Interest): void {
    if (this._closed) return;
    if (status < 0) {
      // libuv turns POLLERR into EBADF and stops the handle. On AF_UNIX that is the peer closing with
      // our data unread (ECONNRESET): packets it sent first are still queued, so read and write on and
      // let recvmsg/sendmsg say what really happened.
      this.poller.stopped();
      if (this.sendQueue.length > 0) this.flush();
      if (this.pendingReceive) this.tryReceive();
      return;
    }
    if (ev.writable) this.flush();
    if (ev.readable && this.pendingReceive) this.tryReceive();
  }

  private fail(err: Error): void {
    const pr = this.pendingReceive;
    this.pendingReceive = null;
    pr?.reject(err);
    for (const s of this.sendQueue.splice(0)) s.reject(err);
    this.poller.want({ readable: false, writable: false });
  }

  private tryReceive(): void {
    const pr = this.pendingReceive;
    if (!pr || this._closed) return;
    let m: sys.MsgIn | null;
    try {
      m = this.receiver.recv(this.fd, sys.MSG_DONTWAIT | (this.takesFds ? sys.MSG_CMSG_CLOEXEC : sys.MSG_PEEK));
    } catch (err) {
      if (this.isReset(err)) m = { data: Buffer.alloc(0), fds: [], flags: 0 };
      else return this.fail(err as Error);
    }
    if (m === null) {
      this.poller.want({ readable: true });
      return;
    }
    this.pendingReceive = null;
    this.poller.want({ readable: false });
    // A zero-length read is the end of the connection; SEQPACKET cannot tell it from an empty
    // packet, so the protocol has no empty packets.
    const carriesFds = !this.takesFds && (m.flags & sys.MSG_CTRUNC) !== 0;
    if (m.data.length === 0 && m.fds.length === 0 && !carriesFds) {
      pr.resolve(null);
      return;
    }
    if (!this.takesFds && !carriesFds) {
      // Peeked and fd-free: now taken off the queue (the same packet: nobody else reads this socket).
      const data = Buffer.from(m.data);
      const flags = m.flags;
      try {
        this.receiver.recv(this.fd, sys.MSG_DONTWAIT);
      } catch (err) {
        // The peer left between the peek and this read, its reply unread (ECONNRESET): the end, as above. The
        // receive is answered either way: left pending, its session waited for ever, holding a connection slot.
        if (this.isReset(err)) return pr.resolve(null);
        pr.reject(err as Error);
        return this.fail(err as Error);
      }
      pr.resolve({ data, fds: [], truncated: (flags & sys.MSG_TRUNC) !== 0, fdsTruncated: false });
      return;
    }
    if (carriesFds) {
      pr.resolve({ data: Buffer.from(m.data), fds: [], truncated: (m.flags & sys.MSG_TRUNC) !== 0, fdsTruncated: false,
        carriesFds: true });
      return;
    }
    pr.resolve({
      data: Buffer.from(m.data),
      fds: m.fds,
      truncated: (m.flags & sys.MSG_TRUNC) !== 0,
      fdsTruncated: (m.flags & sys.MSG_CTRUNC) !== 0,
    });
  }

  private flush(): void {
    while (this.sendQueue.length > 0 && !this._closed) {
      const s = this.sendQueue[0]!;
      let n: number;
      try {
        n = sys.sendMsg(this.fd, { data: s.data, fds: s.fds }, sys.MSG_DONTWAIT | sys.MSG_NOSIGNAL);
      } catch (err) {
        this.sendQueue.shift();
        s.reject(err as Error);
        continue;
      }
      if (n < 0) {
        this.poller.want({ writable: true });
        return;
      }
      this.sendQueue.shift();
      s.resolve();
    }
    this.poller.want({ writable: false });
  }
}

/** SO_PASSRIGHTS=0 on `fd`; false where the kernel lacks the option (before Linux 6.16). */
export function refuseFds(fd: number): boolean {
  try {
    sys.setsockoptInt(fd, sys.SOL_SOCKET, sys.SO_PASSRIGHTS, 0);
    return true;
  } catch (err) {
    if (err instanceof sys.SyscallError && (err.errno === sys.errno.ENOPROTOOPT || err.errno === sys.errno.EINVAL)) {
      return false;
    }
    throw err;
  }
}

export interface ListenOptions {
  /** Permission bits of the socket node (default 0660). */
  mode?: number;
  /** Group owning the socket node (default: unchanged). */
  gid?: number;
  backlog?: number;
}

export class SeqpacketListener {
  /** Connections accepted per event-loop turn, at most. */
  static readonly ACCEPTS_PER_TURN = 16;
  private readonly poller: Poller;
  private onConnection: ((fd: number) => void) | null = null;
  private _closed = false;
  /** Since when accept() has been out of descriptors (ms, performance.now()), or null. */
  private stalled: number | null = null;
  /** Told when accepting stops for want of descriptors (the error), and when it goes on again (null). */
  onStall: ((err: Error | null, ms: number) => void) | null = null;

  private constructor(readonly fd: number, readonly path: string | null) {
    this.poller = new Poller(fd, (status) => this.onPoll(status));
  }

  /**
   * Binds `path` with the mode and group the admin chose. The node is created under a restrictive
   * umask, so nobody can connect before its permissions are final. A stale socket is replaced; a
   * live one (another broker) or any other kind of file is an error.
   */
  static listen(path: string, opts: ListenOptions = {}): SeqpacketListener {
    const addr = sys.sockaddrUn(path);
    removeStaleSocket(path, addr);
    const fd = sys.socket(sys.AF_UNIX, sys.SOCK_SEQPACKET | sys.SOCK_NONBLOCK | sys.SOCK_CLOEXEC);
    try {
      const old = process.umask(0o177);
      try {
        sys.bind(fd, addr, `\`${path}'`);
      } finally {
        process.umask(old);
      }
      if (opts.gid !== undefined) fs.chownSync(path, -1, opts.gid);
      fs.chmodSync(path, opts.mode ?? 0o660);
      sys.listen(fd, opts.backlog ?? 512);
    } catch (err) {
      sys.close(fd);
      throw err;
    }
    return new SeqpacketListener(fd, path);
  }

  /** Adopts an inherited listening socket (socket activation), after checking what it is. */
  static adopt(fd: number): SeqpacketListener {
    if (!sys.isOpenFd(fd)) throw new sys.SyscallError('adopt', sys.errno.EBADF, `fd ${fd}`);
    const domain = sys.getsockoptInt(fd, sys.SOL_SOCKET, sys.SO_DOMAIN);
    const type = sys.getsockoptInt(fd, sys.SOL_SOCKET, sys.SO_TYPE);
    const listening = sys.getsockoptInt(fd, sys.SOL_SOCKET, sys.SO_ACCEPTCONN);
    if (domain !== sys.AF_UNIX || type !== sys.SOCK_SEQPACKET || listening !== 1) {
      throw new sys.SyscallError(
        'adopt',
        sys.errno.ENOTSOCK,
        `fd ${fd} is not a listening AF_UNIX SOCK_SEQPACKET socket`,
      );
    }
    sys.fcntlSet(fd, sys.F_SETFL, sys.fcntlGet(fd, sys.F_GETFL) | sys.O_NONBLOCK);
    return new SeqpacketListener(fd, null);
  }

  /**
   * SO_PASSRIGHTS=0 on the listener: connections made from now on refuse fds. One already queued was
   * made before and still accepts them — set it on each accepted socket too. False before Linux 6.16.
   */
  refuseFds(): boolean {
    return refuseFds(this.fd);
  }

  /** Calls `cb` with each accepted connection's fd (CLOEXEC, non-blocking). */
  start(cb: (fd: number) => void): void {
    this.onConnection = cb;
    this.poller.want({ readable: true });
  }

  /** Stops accepting; connections already accepted are unaffected. */
  stop(): void {
    this.poller.want({ readable: false });
  }

  /**
   * Stops listening. `release` takes the socket (default: closed here): its last close releases connections
   * not accepted yet, with whatever fds are queued in them.
   */
  close(release: (fd: number) => void = (fd) => sys.close(fd)): void {
    if (this._closed) return;
    this._closed = true;
    this.poller.close();
    release(this.fd);
    if (this.path) fs.rmSync(this.path, { force: true });
  }

  private onPoll(status: number): void {
    if (this._closed) return;
    // POLLERR stops libuv's handle (reported as EBADF): restart it and let accept() say what is wrong.
    if (status < 0) this.poller.stopped({ readable: true });
    // A bounded number per loop turn: a connect flood must not keep the loop from serving others.
    for (let n = 0; ; n++) {
      if (n === SeqpacketListener.ACCEPTS_PER_TURN) {
        this.poller.want({ readable: false });
        setImmediate(() => { if (!this._closed) this.poller.want({ readable: true }); });
        return;
      }
      let fd: number;
      try {
        fd = sys.accept(this.fd);
      } catch (err) {
        // Out of descriptors: the connection stays queued; look again shortly instead of spinning.
        if (err instanceof sys.SyscallError && (err.errno === sys.errno.EMFILE || err.errno === sys.errno.ENFILE)) {
          if (this.stalled === null) this.onStall?.(err, 0);
          this.stalled ??= performance.now();
          this.poller.want({ readable: false });
          setTimeout(() => { if (!this._closed) this.poller.want({ readable: true }); }, 50).unref();
          return;
        }
        throw err;
      }
      if (this.stalled !== null) this.onStall?.(null, performance.now() - this.stalled);
      this.stalled = null;
      if (fd < 0) return;
      this.onConnection?.(fd);
    }
  }
}

function removeStaleSocket(path: string, addr: Buffer): void {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(path);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new sys.SyscallError('bind', sys.errno.EEXIST, `\`${path}' exists and is not a socket`);
  const probe = sys.socket(sys.AF_UNIX, sys.SOCK_SEQPACKET | sys.SOCK_CLOEXEC);
  try {
    sys.connect(probe, addr);
  } catch (err) {
    if (err instanceof sys.SyscallError && err.errno === sys.errno.ECONNREFUSED) {
      fs.rmSync(path);
      return;
    }
    throw err;
  } finally {
    sys.close(probe);
  }
  throw new sys.SyscallError('bind', sys.errno.EADDRINUSE, `\`${path}': another broker is listening`);
}
