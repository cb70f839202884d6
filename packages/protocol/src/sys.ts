// Every foreign call of the project lives here: typed wrappers over libc via koffi,
// each throwing a SyscallError that carries errno. Layouts are x86_64/aarch64 LP64 Linux.
import koffi from 'koffi';
import fs from 'node:fs';
import { constants as osConstants } from 'node:os';

const libc = koffi.load('libc.so.6');

export const AF_UNIX = 1;
export const AF_NETLINK = 16;
export const SOCK_DGRAM = 2;
export const SOCK_RAW = 3;
export const SOCK_SEQPACKET = 5;
export const SOCK_NONBLOCK = 0x800;
export const SOCK_CLOEXEC = 0x80000;
export const SOL_SOCKET = 1;
export const SO_TYPE = 3;
export const SO_PASSCRED = 16;
export const SO_PEERCRED = 17;
export const SO_ACCEPTCONN = 30;
export const SO_DOMAIN = 39;
export const SO_PEERGROUPS = 59;
export const SO_PEERPIDFD = 77;
/** Linux ≥ 6.16: 0 makes the kernel refuse SCM_RIGHTS sent to this socket (the sender gets EPERM). */
export const SO_PASSRIGHTS = 83;
export const SHUT_RD = 0;
export const SCM_RIGHTS = 1;
export const MSG_CTRUNC = 0x8;
export const MSG_PEEK = 0x2;
export const MSG_TRUNC = 0x20;
export const MSG_DONTWAIT = 0x40;
export const MSG_NOSIGNAL = 0x4000;
export const MSG_CMSG_CLOEXEC = 0x40000000;
export const F_GETFD = 1;
export const F_GETFL = 3;
export const F_SETFL = 4;
export const O_NONBLOCK = 0x800;
export const NETLINK_ROUTE = 0;
export const SOL_NETLINK = 270;
export const NETLINK_EXT_ACK = 11;
export const NETLINK_GET_STRICT_CHK = 12;

const errnoNames = new Map<number, string>(
  Object.entries(osConstants.errno).map(([name, value]) => [value, name]),
);

/** A failed system call, with the errno the kernel gave. */
export class SyscallError extends Error {
  readonly errno: number;
  readonly syscall: string;
  /** Symbolic errno, e.g. `EBUSY`. */
  readonly code: string;
  /** strerror(errno), lower-case: `no such device`. */
  readonly reason: string;
  constructor(syscall: string, errno: number, detail?: string) {
    const code = errnoNames.get(errno) ?? `E${errno}`;
    super(`${syscall}${detail ? ` ${detail}` : ''}: ${strerror(errno)} (${code})`);
    this.reason = strerror(errno).toLowerCase();
    this.name = 'SyscallError';
    this.errno = errno;
    this.syscall = syscall;
    this.code = code;
  }
}

export const errno = osConstants.errno;

const _socket = libc.func('int socket(int domain, int type, int protocol)');
const _bind = libc.func('int bind(int fd, void *addr, uint32_t len)');
const _listen = libc.func('int listen(int fd, int backlog)');
const _accept4 = libc.func('int accept4(int fd, void *addr, void *len, int flags)');
const _connect = libc.func('int connect(int fd, void *addr, uint32_t len)');
const _sendmsg = libc.func('intptr_t sendmsg(int fd, void *msg, int flags)');
const _recvmsg = libc.func('intptr_t recvmsg(int fd, void *msg, int flags)');
const _getsockopt = libc.func('int getsockopt(int fd, int level, int name, void *val, _Inout_ uint32_t *len)');
const _setsockopt = libc.func('int setsockopt(int fd, int level, int name, void *val, uint32_t len)');
const _close = libc.func('int close(int fd)');
const _socketpair = libc.func('int socketpair(int domain, int type, int protocol, _Out_ int *sv)');
const _shutdown = libc.func('int shutdown(int fd, int how)');
const _ioctl = libc.func('int ioctl(int fd, unsigned long req, ...)');
const _fcntl = libc.func('int fcntl(int fd, int cmd, ...)');
const _syscall = libc.func('long syscall(long nr, ...)');
const _strerror = libc.func('const char *strerror(int errnum)');
const _getgrnam_r = libc.func(
  'int getgrnam_r(const char *name, void *grp, void *buf, size_t len, _Out_ void **result)',
);

function strerror(e: number): string {
  return (_strerror(e) as string | null) ?? `errno ${e}`;
}

function fail(syscall: string, detail?: string): never {
  throw new SyscallError(syscall, koffi.errno(), detail);
}

/** The address of a Buffer, for embedding in another structure. The caller keeps `buf` referenced. */
function addressOf(buf: Buffer): bigint {
  return koffi.address(buf) as bigint;
}

export function socket(domain: number, type: number, protocol = 0): number {
  const fd = _socket(domain, type, protocol) as number;
  if (fd < 0) fail('socket');
  return fd;
}

/** A `struct sockaddr_un` for a filesystem path; paths that do not fit are refused, never truncated. */
export function sockaddrUn(path: string): Buffer {
  const bytes = Buffer.from(path, 'utf8');
  if (bytes.length === 0 || bytes.length > 107 || bytes.includes(0)) {
    throw new SyscallError('sockaddr_un', errno.ENAMETOOLONG, `\`${path}'`);
  }
  const sa = Buffer.alloc(110);
  sa.writeUInt16LE(AF_UNIX, 0);
  bytes.copy(sa, 2);
  return sa;
}

/** A `struct sockaddr_un` for a path or, with a leading `@`, an abstract name; returns [addr, length]. */
function sockaddrUnAny(name: string): [Buffer, number] {
  if (!name.startsWith('@')) {
    const sa = sockaddrUn(name);
    return [sa, sa.length];
  }
  const bytes = Buffer.from(name.slice(1), 'utf8');
  if (bytes.length > 106) throw new SyscallError('sockaddr_un', errno.ENAMETOOLONG, `\`${name}'`);
  const sa = Buffer.alloc(110);
  sa.writeUInt16LE(AF_UNIX, 0);
  bytes.copy(sa, 3);
  return [sa, 3 + bytes.length];
}

export function bind(fd: number, addr: Buffer, what?: string): void {
  if ((_bind(fd, addr, addr.length) as number) < 0) fail('bind', what);
}

export function listen(fd: number, backlog: number): void {
  if ((_listen(fd, backlog) as number) < 0) fail('listen');
}

/** accept4 with CLOEXEC|NONBLOCK; returns -1 when no connection is pending. */
export function accept(fd: number): number {
  const cfd = _accept4(fd, null, null, SOCK_CLOEXEC | SOCK_NONBLOCK) as number;
  if (cfd >= 0) return cfd;
  const e = koffi.errno();
  if (e === errno.EAGAIN || e === errno.ECONNABORTED || e === errno.EINTR) return -1;
  throw new SyscallError('accept4', e);
}

export function connect(fd: number, addr: Buffer, what?: string): void {
  if ((_connect(fd, addr, addr.length) as number) < 0) fail('connect', what);
}

/**
 * connect(2) on a blocking socket, run on the thread pool: it waits in the kernel's own line of connectors while
 * the listener's backlog is full (SO_SNDTIMEO bounds the wait), without blocking this thread. Resolves true once
 * connected, false otherwise (its errno is the pool thread's: a connect after it tells why).
 */
export function connectInPool(fd: number, addr: Buffer): Promise<boolean> {
  return new Promise((resolve) => {
    _connect.async(fd, addr, addr.length, (err: Error | null, r: number) => resolve(!err && r === 0));
  });
}

/** SO_SNDTIMEO (struct timeval: seconds, microseconds), as x86_64 and aarch64 lay it out. */
export const SO_SNDTIMEO = 21;

/** How long one blocking connect waits on a pool thread before it lets the thread go and queues again. */
const LINE_SLICE_MS = 250;
/** The slice running now: one at a time in a process, so waiting in line holds one pool thread at most. */
let lineTurn: Promise<unknown> = Promise.resolve();

/**
 * Connects non-blocking `fd` where the listener's backlog is full: waits, in arrival order, for room, until `ms`
 * from now; throws EAGAIN if there was none by then (at once for `ms` ≤ 0). It waits in slices of at most 250 ms,
 * each a blocking connect on the thread pool, one slice at a time per process, so that waiting holds one pool
 * thread at most and for a slice at most (an outside re-test: each connect held a thread for its whole bound,
 * other async work and an exit waited behind them). `fd` ends non-blocking.
 */
export async function connectInLine(fd: number, addr: Buffer, ms: number, what?: string): Promise<void> {
  const deadline = Date.now() + ms;
  const flags = fcntlGet(fd, F_GETFL);
  const slice = async (): Promise<boolean> => {
    const left = deadline - Date.now();
    if (left <= 0) return false;
    const wait = Math.max(1, Math.min(LINE_SLICE_MS, Math.ceil(left)));
    const bound = Buffer.alloc(16);
    bound.writeBigInt64LE(BigInt(Math.floor(wait / 1000)), 0);
    bound.writeBigInt64LE(BigInt((wait % 1000) * 1000), 8);
    fcntlSet(fd, F_SETFL, flags & ~O_NONBLOCK);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, bound);
    try {
      return await connectInPool(fd, addr);
    } finally {
      fcntlSet(fd, F_SETFL, flags);
    }
  };
  while (Date.now() < deadline) {
    const turn = lineTurn.then(slice);
    lineTurn = turn.catch(() => false);
    if (await turn) return;
    // Not in: once without waiting, which connects if there is room now and says why not otherwise; only a
    // full backlog (EAGAIN) is waited out.
    try {
      connect(fd, addr, what);
      return;
    } catch (err) {
      if (!(err instanceof SyscallError && err.errno === errno.EAGAIN)) throw err;
    }
  }
  connect(fd, addr, what);
}

// ---- struct msghdr, in one place: x86_64/aarch64 layouts (msghdr 56, iovec 16, cmsghdr 16) ----
const MSGHDR_SIZE = 56;
const IOVEC_SIZE = 16;
const CMSGHDR_SIZE = 16;
/** The kernel's own limit of fds in one SCM_RIGHTS message (SCM_MAX_FD). */
export const SCM_MAX_FD = 253;
const align8 = (n: number) => (n + 7) & ~7;
/** CMSG_SPACE(4 * fds). */
export const rightsSpace = (fds: number) => CMSGHDR_SIZE + align8(4 * fds);

/**
 * Buffers whose addresses sit in a msghdr during a call. A local the code no longer reads may be
 * collected by V8 before the call returns, and the kernel would then use freed memory: every such
 * buffer is pinned here for the call's duration instead.
 */
let pinned: Buffer[] = [];
/** Read only by the garbage collector, which must see the pins. */
export const pinnedCount = (): number => pinned.length;

function msghdr(name: Buffer | null, nameLen: number, iov: Buffer, control: Buffer | null): Buffer {
  const hdr = Buffer.alloc(MSGHDR_SIZE);
  if (name) {
    hdr.writeBigUInt64LE(addressOf(name), 0);
    hdr.writeUInt32LE(nameLen, 8);
  }
  hdr.writeBigUInt64LE(addressOf(iov), 16);
  hdr.writeBigUInt64LE(1n, 24);
  if (control) {
    hdr.writeBigUInt64LE(addressOf(control), 32);
    hdr.writeBigUInt64LE(BigInt(control.length), 40);
  }
  return hdr;
}

function iovec(buf: Buffer): Buffer {
  const iov = Buffer.alloc(IOVEC_SIZE);
  iov.writeBigUInt64LE(addressOf(buf), 0);
  iov.writeBigUInt64LE(BigInt(buf.length), 8);
  return iov;
}

export interface MsgOut {
  data: Buffer;
  /** Sent as one SCM_RIGHTS message; the caller still owns them. */
  fds?: readonly number[];
  /** A destination (datagram sockets): [sockaddr, its length]. */
  addr?: [Buffer, number];
}

/** sendmsg(2) of one packet; returns the bytes sent, or -1 on EAGAIN; throws on every other error. */
export function sendMsg(fd: number, out: MsgOut, flags: number): number {
  const fds = out.fds ?? [];
  if (fds.length > SCM_MAX_FD) throw new SyscallError('sendmsg', errno.EINVAL, `${fds.length} fds`);
  let control: Buffer | null = null;
  if (fds.length > 0) {
    control = Buffer.alloc(rightsSpace(fds.length));
    control.writeBigUInt64LE(BigInt(CMSGHDR_SIZE + 4 * fds.length), 0);
    control.writeInt32LE(SOL_SOCKET, 8);
    control.writeInt32LE(SCM_RIGHTS, 12);
    fds.forEach((f, i) => control!.writeInt32LE(f, CMSGHDR_SIZE + 4 * i));
  }
  const iov = iovec(out.data);
  const hdr = msghdr(out.addr?.[0] ?? null, out.addr?.[1] ?? 0, iov, control);
  pinned = [out.data, iov, hdr, ...(control ? [control] : []), ...(out.addr ? [out.addr[0]] : [])];
  try {
    const n = Number(_sendmsg(fd, hdr, flags));
    if (n >= 0) return n;
    const e = koffi.errno();
    if (e === errno.EAGAIN || e === errno.EINTR) return -1;
    throw new SyscallError('sendmsg', e);
  } finally {
    pinned = [];
  }
}

export interface MsgIn {
  /** Bytes received (a view into the receiver's buffer, valid until its next receive). */
  data: Buffer;
  /** Descriptors that arrived (CLOEXEC when asked with MSG_CMSG_CLOEXEC); the caller owns them. */
  fds: number[];
  /** recvmsg's msg_flags: MSG_TRUNC, MSG_CTRUNC. */
  flags: number;
}

/** Long-lived receive buffers for one socket: room for `maxData` bytes and `maxFds` descriptors. */
export class Receiver {
  private readonly data: Buffer;
  private readonly control: Buffer | null;
  private readonly iov: Buffer;

  constructor(maxData: number, maxFds = 0) {
    this.data = Buffer.alloc(maxData);
    this.control = maxFds > 0 ? Buffer.alloc(rightsSpace(maxFds)) : null;
    this.iov = iovec(this.data);
  }

  /** recvmsg(2); null on EAGAIN; throws on every other error. */
  recv(fd: number, flags: number): MsgIn | null {
    const hdr = msghdr(null, 0, this.iov, this.control);
    pinned = [hdr];
    let n: number;
    try {
      n = Number(_recvmsg(fd, hdr, flags));
    } finally {
      pinned = [];
    }
    if (n < 0) {
      const e = koffi.errno();
      if (e === errno.EAGAIN || e === errno.EINTR) return null;
      throw new SyscallError('recvmsg', e);
    }
    const fds = this.control ? parseRights(this.control, Number(hdr.readBigUInt64LE(40))) : [];
    return { data: this.data.subarray(0, n), fds, flags: hdr.readInt32LE(48) };
  }
}

function parseRights(control: Buffer, len: number): number[] {
  const fds: number[] = [];
  let o = 0;
  while (o + CMSGHDR_SIZE <= len) {
    const cmsgLen = Number(control.readBigUInt64LE(o));
    if (cmsgLen < CMSGHDR_SIZE || o + cmsgLen > len) break;
    if (control.readInt32LE(o + 8) === SOL_SOCKET && control.readInt32LE(o + 12) === SCM_RIGHTS) {
      for (let p = o + CMSGHDR_SIZE; p + 4 <= o + cmsgLen; p += 4) fds.push(control.readInt32LE(p));
    }
    o += align8(cmsgLen);
  }
  return fds;
}

/** One datagram to an AF_UNIX datagram socket (sd_notify, journald's native protocol), never blocking. */
export function sendDatagram(name: string, data: Buffer): void {
  const to = datagramTo(name);
  try {
    to.send(data);
  } finally {
    to.close();
  }
}

/**
 * Datagrams to one AF_UNIX datagram socket by its name, from one socket of ours kept open (a send per record
 * rather than a socket, a send and a close); the name is looked up at each send, so a peer bound again (journald
 * restarted) is reached. send() never blocks: a full queue throws EAGAIN.
 */
export function datagramTo(name: string): { send(data: Buffer): void; close(): void } {
  const addr = sockaddrUnAny(name);
  let fd: number | null = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK);
  return {
    send(data) {
      if (fd === null) throw new SyscallError('sendmsg', errno.EBADF, `to \`${name}' (closed)`);
      if (sendMsg(fd, { data, addr }, MSG_NOSIGNAL) < 0) {
        throw new SyscallError('sendmsg', errno.EAGAIN, `to \`${name}' (its queue is full)`);
      }
    },
    close() {
      if (fd !== null) close(fd);
      fd = null;
    },
  };
}

/** socketpair(2) with CLOEXEC. */
export function socketpair(type: number): [number, number] {
  const sv = [0, 0];
  if ((_socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv) as number) < 0) fail('socketpair');
  return [sv[0]!, sv[1]!];
}

export function shutdown(fd: number, how: number): void {
  if ((_shutdown(fd, how) as number) < 0) fail('shutdown');
}

export type PollInterest = { readable: boolean; writable: boolean };
export interface PollHandle {
  start(interest: PollInterest, cb: (status: number, events: PollInterest) => void): void;
  stop(): void;
  close(): void;
}

/**
 * A libuv poll handle on Node's loop for `fd` (koffi's, undocumented: the callback gets a status and
 * the events). libuv aborts the process on a second handle for one fd or a bad fd: the caller
 * keeps one handle per open fd and closes the handle before the fd.
 */
export function pollHandle(
  fd: number,
  interest: PollInterest,
  cb: (status: number, events: PollInterest) => void,
): PollHandle {
  return koffi.node.poll(fd, interest, cb as unknown as (ev: unknown) => void) as unknown as PollHandle;
}

/** getsockopt into `buf`; returns the length the kernel wrote. */
export function getsockopt(fd: number, level: number, name: number, buf: Buffer): number {
  const len = [buf.length];
  if ((_getsockopt(fd, level, name, buf, len) as number) < 0) fail('getsockopt', `(${level}, ${name})`);
  return len[0]!;
}

export function getsockoptInt(fd: number, level: number, name: number): number {
  const buf = Buffer.alloc(4);
  getsockopt(fd, level, name, buf);
  return buf.readInt32LE(0);
}

export function setsockopt(fd: number, level: number, name: number, value: Buffer): void {
  if ((_setsockopt(fd, level, name, value, value.length) as number) < 0) fail('setsockopt', `(${level}, ${name})`);
}

export function setsockoptInt(fd: number, level: number, name: number, value: number): void {
  const buf = Buffer.alloc(4);
  buf.writeInt32LE(value, 0);
  if ((_setsockopt(fd, level, name, buf, 4) as number) < 0) fail('setsockopt', `(${level}, ${name})`);
}

export function close(fd: number): void {
  if ((_close(fd) as number) < 0) fail('close');
}

/** ioctl with a pointer argument (a struct in `arg`). */
export function ioctlPtr(fd: number, req: number, arg: Buffer, what?: string): void {
  if ((_ioctl(fd, req, 'void *', arg) as number) < 0) fail('ioctl', what);
}

/** ioctl with an integer argument. */
export function ioctlInt(fd: number, req: number, arg: number, what?: string): void {
  if ((_ioctl(fd, req, 'unsigned long', arg) as number) < 0) fail('ioctl', what);
}

export function fcntlGet(fd: number, cmd: number): number {
  const r = _fcntl(fd, cmd) as number;
  if (r < 0) fail('fcntl');
  return r;
}

export function fcntlSet(fd: number, cmd: number, value: number): void {
  if ((_fcntl(fd, cmd, 'int', value) as number) < 0) fail('fcntl');
}

/** A second descriptor of the same open file (F_DUPFD_CLOEXEC). */
export function dup(fd: number): number {
  const r = _fcntl(fd, 1030 /* F_DUPFD_CLOEXEC */, 'int', 0) as number;
  if (r < 0) fail('fcntl');
  return r;
}

/** One fd held in reserve (see withSpareFd), or -1. */
let spare = -1;

/** Holds one fd in reserve, if it is not held already and one can be had (the broker: at start, and as fds free). */
export function reserveSpareFd(): void {
  if (spare >= 0) return;
  try {
    spare = fs.openSync('/dev/null', fs.constants.O_RDONLY | 0o2000000 /* O_CLOEXEC */);
  } catch {
    // Out of fds now: held again at a later call.
  }
}

/**
 * Runs `step`, which opens one fd; at the open-files limit, once more with the reserve given up for it. For the steps
 * whose failure there would leave a connection unanswered and unclosed (an outside review: a client waited for ever
 * at a limit one fd above the broker's at rest, its socket's queue uncounted and no closer able to start).
 */
export function withSpareFd<T>(step: () => T): T {
  try {
    return step();
  } catch (err) {
    const code = err instanceof SyscallError ? err.errno : (err as NodeJS.ErrnoException).code;
    if (spare < 0 || (code !== errno.EMFILE && code !== 'EMFILE')) throw err;
    close(spare);
    spare = -1;
    try {
      return step();
    } finally {
      // Taken again at once where the step's fd is already closed (an fdinfo read): an outside audit saw a refused
      // connection's close spend it for good.
      reserveSpareFd();
    }
  }
}

/** Fds queued in a unix socket's receive queue (`scm_fds` in its fdinfo, Linux 5.7), or null where it does not say. */
export function queuedFds(fd: number): number | null {
  let info: string;
  try {
    info = withSpareFd(() => fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'));
  } catch {
    return null;
  }
  const m = /^scm_fds:\s*(\d+)$/m.exec(info);
  return m ? Number(m[1]) : null;
}

/**
 * This process dumps no core from now on (prctl PR_SET_DUMPABLE 0): `tapbroker run` re-raising its command's crash
 * signal (an outside review: node's core replaced qemu's in the same directory). Declared here, on that path alone.
 */
export function dumpNoCore(): void {
  const prctl = libc.func('int prctl(int option, unsigned long a, unsigned long b, unsigned long c, unsigned long d)');
  prctl(4 /* PR_SET_DUMPABLE */, 0, 0, 0, 0);
}

/** pidfd_open(2): a pidfd for `pid` (close-on-exec), or null if there is no such process. */
export function pidfdOpen(pid: number): number | null {
  const fd = Number(_syscall(434 /* SYS_pidfd_open */, 'int', pid, 'unsigned int', 0));
  if (fd >= 0) return fd;
  const e = koffi.errno();
  if (e === errno.ESRCH) return null;
  throw new SyscallError('pidfd_open', e);
}

/**
 * PIDFD_GET_INFO, _IOWR(0xFF, 11, struct pidfd_info): the first version of the struct is 64 bytes, `mask` at 0 and
 * `exit_code` (a wait status) at 60; PIDFD_INFO_EXIT (bit 3) asks for it and is set in the answer when the kernel
 * gave it (Linux 6.15 and later, once the process has exited, reaped or not).
 */
const PIDFD_GET_INFO = 0xc040ff0b;
const PIDFD_INFO_EXIT = 8n;

/**
 * The wait status the process behind `pidfd` exited with, even after another waiter reaped it; null where the kernel
 * does not say (before Linux 6.15, or the process still running). `tapbroker run` needs it: Node reports a child
 * that a real-time signal killed as `exit(0)` (an outside review: a VM killed by SIGRTMIN+2 exited 0).
 */
export function exitStatusOf(pidfd: number): number | null {
  const info = Buffer.alloc(64);
  info.writeBigUInt64LE(PIDFD_INFO_EXIT, 0);
  if ((_ioctl(pidfd, PIDFD_GET_INFO, 'void *', info) as number) < 0) return null;
  return (info.readBigUInt64LE(0) & PIDFD_INFO_EXIT) !== 0n ? info.readInt32LE(60) : null;
}

/** True when `fd` is an open descriptor of this process. */
export function isOpenFd(fd: number): boolean {
  if (!Number.isInteger(fd) || fd < 0) return false;
  return (_fcntl(fd, F_GETFD) as number) >= 0;
}

// struct passwd: pw_name@0 pw_passwd@8 pw_uid@16 pw_gid@20 ... (48 bytes);
// struct group: gr_name@0 gr_passwd@8 gr_gid@16 gr_mem@24 (32 bytes).
const nssBuf = Buffer.alloc(64 * 1024);
const nssRec = Buffer.alloc(64);

function nssLookup(call: (out: unknown[]) => number, what: string): boolean {
  const out: unknown[] = [null];
  const rc = call(out);
  if (rc !== 0 && rc !== errno.ENOENT && rc !== errno.ESRCH) throw new SyscallError(what, rc);
  return out[0] !== null && out[0] !== undefined;
}

/** The gid for a group name (through NSS), or null. */
export function getgrnam(name: string): number | null {
  if (!nssLookup((o) => _getgrnam_r(name, nssRec, nssBuf, nssBuf.length, o) as number, 'getgrnam_r')) return null;
  return nssRec.readUInt32LE(16);
}

