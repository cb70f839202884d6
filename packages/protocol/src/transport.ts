// AF_UNIX SOCK_SEQPACKET with fd passing and peer credentials, on Node's event loop.
// Each socket has exactly one libuv poll handle, watching only what someone waits for; the handle
// is closed before the fd. Every received fd is handed to the caller, who owns it from then on.
import fs from 'node:fs';
import * as sys from './sys.js';

const MSGHDR_SIZE = 56;
const IOVEC_SIZE = 16;
const CMSGHDR_SIZE = 16;
/** The kernel's own limit of fds in one SCM_RIGHTS message (SCM_MAX_FD). */
export const SCM_MAX_FD = 253;

const align8 = (n: number) => (n + 7) & ~7;
const cmsgSpace = (n: number) => CMSGHDR_SIZE + align8(n);

export interface Packet {
  data: Buffer;
  /** Descriptors that arrived with the packet (CLOEXEC); the receiver owns and must close them. */
  fds: number[];
  /** The packet was larger than the receive buffer; `data` holds only its start. */
  truncated: boolean;
  /** More fds were sent than fit; the kernel closed the excess. */
  fdsTruncated: boolean;
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

type Interest = { readable: boolean; writable: boolean };

/** One poll handle per fd, started with the union of what is waited for. */
class Poller {
  private handle: ReturnType<typeof sys.koffi.node.poll> | null = null;
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
    const cb = ((status: number, ev: Interest) => {
      try {
        this.onEvent(status, ev);
      } catch (err) {
        process.stderr.write(`tapbroker: error in a poll callback: ${(err as Error).stack}\n`);
      }
    }) as unknown as (ev: unknown) => void;
    if (!this.handle) this.handle = sys.koffi.node.poll(this.fd, next, cb);
    else this.handle.start(next, cb);
  }

  close(): void {
    this.handle?.close();
    this.handle = null;
  }

  /** libuv stopped the handle itself (it does on POLLERR): restart it at the next want(). */
  stopped(): void {
    this.interest = { readable: false, writable: false };
  }
}

/** Calls `onReadable` each time `fd` is readable until closed (a pidfd turns readable when its process exits). */
export function watchReadable(fd: number, onReadable: () => void): { close(): void } {
  const poller = new Poller(fd, (status) => {
    // POLLERR (libuv says EBADF and stops the handle): e.g. a netlink socket that overran. Restart and
    // let the reader meet the error (ENOBUFS) itself.
    if (status < 0) {
      poller.stopped();
      poller.want({ readable: true });
    }
    onReadable();
  });
  poller.want({ readable: true });
  return { close: () => poller.close() };
}

interface PendingSend {
  msghdr: Buffer;
  // Referenced so GC keeps them while their addresses sit in msghdr.
  keep: Buffer[];
  resolve: () => void;
  reject: (err: Error) => void;
}

export class SeqpacketConnection {
  readonly fd: number;
  private readonly poller: Poller;
  private readonly recvData: Buffer;
  private readonly recvControl: Buffer;
  private readonly recvIov = Buffer.alloc(IOVEC_SIZE);
  private readonly recvHdr = Buffer.alloc(MSGHDR_SIZE);
  private pendingReceive: { resolve: (p: Packet | null) => void; reject: (e: Error) => void } | null = null;
  private readonly sendQueue: PendingSend[] = [];
  private _closed = false;

  /** Takes ownership of a connected, non-blocking SEQPACKET socket. */
  constructor(fd: number, opts: { maxPacket: number; maxFds?: number }) {
    this.fd = fd;
    this.recvData = Buffer.alloc(opts.maxPacket);
    this.recvControl = Buffer.alloc(cmsgSpace(4 * (opts.maxFds ?? SCM_MAX_FD)));
    this.recvIov.writeBigUInt64LE(sys.addressOf(this.recvData), 0);
    this.recvIov.writeBigUInt64LE(BigInt(this.recvData.length), 8);
    this.poller = new Poller(fd, (status, ev) => this.onPoll(status, ev));
  }

  /** Connects to a listening SEQPACKET socket at `path`, waiting while its backlog is full. */
  static async connect(path: string, opts: { maxPacket: number; maxFds?: number; connectTimeoutMs?: number }): Promise<SeqpacketConnection> {
    const addr = sys.sockaddrUn(path);
    const fd = sys.socket(sys.AF_UNIX, sys.SOCK_SEQPACKET | sys.SOCK_NONBLOCK | sys.SOCK_CLOEXEC);
    try {
      const deadline = Date.now() + (opts.connectTimeoutMs ?? 10_000);
      for (let attempt = 0; ; attempt++) {
        try {
          sys.connect(fd, addr, `\`${path}'`);
          break;
        } catch (err) {
          // A non-blocking AF_UNIX connect says EAGAIN while the listener's backlog is full: a busy
          // broker, not a missing one. Wait, within a bound.
          if (!(err instanceof sys.SyscallError && err.errno === sys.errno.EAGAIN) || Date.now() > deadline) throw err;
          await new Promise((r) => setTimeout(r, Math.min(2 ** attempt, 100)));
        }
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
        if (!(err instanceof sys.SyscallError) || err.errno !== sys.errno.ERANGE || groupsBuf.length >= 4 * 65536) throw err;
        groupsBuf = Buffer.alloc(groupsBuf.length * 16);
      }
    }
    const groups: number[] = [];
    for (let o = 0; o + 4 <= groupsBuf.length; o += 4) groups.push(groupsBuf.readUInt32LE(o));
    let pidfd: number | null = null;
    try {
      pidfd = sys.getsockoptInt(this.fd, sys.SOL_SOCKET, sys.SO_PEERPIDFD);
    } catch (err) {
      if (!(err instanceof sys.SyscallError) || (err.errno !== sys.errno.ENOPROTOOPT && err.errno !== sys.errno.ESRCH)) throw err;
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
    if (fds.length > SCM_MAX_FD) return Promise.reject(new sys.SyscallError('sendmsg', sys.errno.EINVAL, `${fds.length} fds`));
    const iov = Buffer.alloc(IOVEC_SIZE);
    iov.writeBigUInt64LE(sys.addressOf(data), 0);
    iov.writeBigUInt64LE(BigInt(data.length), 8);
    const msghdr = Buffer.alloc(MSGHDR_SIZE);
    msghdr.writeBigUInt64LE(sys.addressOf(iov), 16);
    msghdr.writeBigUInt64LE(1n, 24);
    const keep = [data, iov];
    if (fds.length > 0) {
      const control = Buffer.alloc(cmsgSpace(4 * fds.length));
      control.writeBigUInt64LE(BigInt(CMSGHDR_SIZE + 4 * fds.length), 0);
      control.writeInt32LE(sys.SOL_SOCKET, 8);
      control.writeInt32LE(sys.SCM_RIGHTS, 12);
      fds.forEach((fd, i) => control.writeInt32LE(fd, CMSGHDR_SIZE + 4 * i));
      msghdr.writeBigUInt64LE(sys.addressOf(control), 32);
      msghdr.writeBigUInt64LE(BigInt(control.length), 40);
      keep.push(control);
    }
    return new Promise((resolve, reject) => {
      this.sendQueue.push({ msghdr, keep, resolve, reject });
      if (this.sendQueue.length === 1) this.flush();
    });
  }

  /** Closes the socket; a pending receive resolves to null and queued sends fail. */
  close(): void {
    if (this._closed) return;
    this._closed = true;
    this.poller.close();
    sys.close(this.fd);
    const pr = this.pendingReceive;
    this.pendingReceive = null;
    pr?.resolve(null);
    for (const s of this.sendQueue.splice(0)) s.reject(new sys.SyscallError('sendmsg', sys.errno.EPIPE, 'connection closed'));
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
    const hdr = this.recvHdr;
    hdr.fill(0);
    hdr.writeBigUInt64LE(sys.addressOf(this.recvIov), 16);
    hdr.writeBigUInt64LE(1n, 24);
    hdr.writeBigUInt64LE(sys.addressOf(this.recvControl), 32);
    hdr.writeBigUInt64LE(BigInt(this.recvControl.length), 40);
    let n: number;
    try {
      n = sys.recvmsg(this.fd, hdr, sys.MSG_DONTWAIT | sys.MSG_CMSG_CLOEXEC);
    } catch (err) {
      if (err instanceof sys.SyscallError && err.errno === sys.errno.ECONNRESET) n = 0;
      else return this.fail(err as Error);
    }
    if (n < 0) {
      this.poller.want({ readable: true });
      return;
    }
    this.pendingReceive = null;
    this.poller.want({ readable: false });
    const flags = hdr.readInt32LE(48);
    const fds = parseRights(this.recvControl, Number(hdr.readBigUInt64LE(40)));
    // A zero-length read is the end of the connection; SEQPACKET cannot tell it from an empty
    // packet, so the protocol has no empty packets.
    if (n === 0 && fds.length === 0) {
      pr.resolve(null);
      return;
    }
    pr.resolve({
      data: Buffer.from(this.recvData.subarray(0, n)),
      fds,
      truncated: (flags & sys.MSG_TRUNC) !== 0,
      fdsTruncated: (flags & sys.MSG_CTRUNC) !== 0,
    });
  }

  private flush(): void {
    while (this.sendQueue.length > 0 && !this._closed) {
      const s = this.sendQueue[0]!;
      let n: number;
      try {
        n = sys.sendmsg(this.fd, s.msghdr, sys.MSG_DONTWAIT | sys.MSG_NOSIGNAL);
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

function parseRights(control: Buffer, len: number): number[] {
  const fds: number[] = [];
  let o = 0;
  while (o + CMSGHDR_SIZE <= len) {
    const cmsgLen = Number(control.readBigUInt64LE(o));
    if (cmsgLen < CMSGHDR_SIZE || o + cmsgLen > len) break;
    if (control.readInt32LE(o + 8) === sys.SOL_SOCKET && control.readInt32LE(o + 12) === sys.SCM_RIGHTS) {
      for (let p = o + CMSGHDR_SIZE; p + 4 <= o + cmsgLen; p += 4) fds.push(control.readInt32LE(p));
    }
    o += align8(cmsgLen);
  }
  return fds;
}

export interface ListenOptions {
  /** Permission bits of the socket node (default 0660). */
  mode?: number;
  /** Group owning the socket node (default: unchanged). */
  gid?: number;
  backlog?: number;
}

export class SeqpacketListener {
  private readonly poller: Poller;
  private onConnection: ((fd: number) => void) | null = null;
  private _closed = false;

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
      throw new sys.SyscallError('adopt', sys.errno.ENOTSOCK, `fd ${fd} is not a listening AF_UNIX SOCK_SEQPACKET socket`);
    }
    sys.fcntlSet(fd, sys.F_SETFL, sys.fcntlGet(fd, sys.F_GETFL) | sys.O_NONBLOCK);
    return new SeqpacketListener(fd, null);
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

  close(): void {
    if (this._closed) return;
    this._closed = true;
    this.poller.close();
    sys.close(this.fd);
    if (this.path) fs.rmSync(this.path, { force: true });
  }

  private onPoll(status: number): void {
    if (this._closed) return;
    // POLLERR stops libuv's handle (reported as EBADF): restart it and let accept() say what is wrong.
    if (status < 0) {
      this.poller.stopped();
      this.poller.want({ readable: true });
    }
    for (;;) {
      let fd: number;
      try {
        fd = sys.accept(this.fd);
      } catch (err) {
        // Out of descriptors: the connection stays queued; look again shortly instead of spinning.
        if (err instanceof sys.SyscallError && (err.errno === sys.errno.EMFILE || err.errno === sys.errno.ENFILE)) {
          this.poller.want({ readable: false });
          setTimeout(() => { if (!this._closed) this.poller.want({ readable: true }); }, 50).unref();
          return;
        }
        throw err;
      }
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
