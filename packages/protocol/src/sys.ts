// Every foreign call of the project lives here: typed wrappers over libc via koffi,
// each throwing a SyscallError that carries errno. Layouts are x86_64/aarch64 LP64 Linux.
import koffi from 'koffi';
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
export const SCM_RIGHTS = 1;
export const MSG_CTRUNC = 0x8;
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
const _ioctl = libc.func('int ioctl(int fd, unsigned long req, ...)');
const _fcntl = libc.func('int fcntl(int fd, int cmd, ...)');
const _strerror = libc.func('const char *strerror(int errnum)');
const _syscall = libc.func('long syscall(long nr, ...)');
const _mknod = libc.func('int mknod(const char *path, uint32_t mode, uint64_t dev)');
const SYS_pidfd_open = 434;
const _setxattr = libc.func('int setxattr(const char *path, const char *name, void *value, size_t size, int flags)');
const _getpwnam_r = libc.func('int getpwnam_r(const char *name, void *pwd, void *buf, size_t len, _Out_ void **result)');
const _getpwuid_r = libc.func('int getpwuid_r(uint32_t uid, void *pwd, void *buf, size_t len, _Out_ void **result)');
const _getgrnam_r = libc.func('int getgrnam_r(const char *name, void *grp, void *buf, size_t len, _Out_ void **result)');

function strerror(e: number): string {
  return (_strerror(e) as string | null) ?? `errno ${e}`;
}

function fail(syscall: string, detail?: string): never {
  throw new SyscallError(syscall, koffi.errno(), detail);
}

/** The address of a Buffer, for embedding in another structure. The caller keeps `buf` referenced. */
export function addressOf(buf: Buffer): bigint {
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
export function sockaddrUnAny(name: string): [Buffer, number] {
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

let inFlight: Buffer[] = [];

/** One datagram to an AF_UNIX datagram socket (sd_notify, journald's native protocol). */
export function sendDatagram(name: string, data: Buffer): void {
  const [sa, salen] = sockaddrUnAny(name);
  const fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC);
  try {
    const iov = Buffer.alloc(16);
    // Referenced from module scope across the call: their addresses sit in iov and hdr.
    inFlight = [sa, iov, data];
    iov.writeBigUInt64LE(addressOf(data), 0);
    iov.writeBigUInt64LE(BigInt(data.length), 8);
    const hdr = Buffer.alloc(56);
    hdr.writeBigUInt64LE(addressOf(sa), 0);
    hdr.writeUInt32LE(salen, 8);
    hdr.writeBigUInt64LE(addressOf(iov), 16);
    hdr.writeBigUInt64LE(1n, 24);
    inFlight.push(hdr);
    const n = Number(_sendmsg(fd, hdr, MSG_NOSIGNAL));
    if (n < 0) fail('sendmsg', `to \`${name}'`);
  } finally {
    inFlight = [];
    close(fd);
  }
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

/** sendmsg; returns -1 on EAGAIN, throws on every other error. */
export function sendmsg(fd: number, msghdr: Buffer, flags: number): number {
  const n = Number(_sendmsg(fd, msghdr, flags));
  if (n >= 0) return n;
  const e = koffi.errno();
  if (e === errno.EAGAIN || e === errno.EINTR) return -1;
  throw new SyscallError('sendmsg', e);
}

/** recvmsg; returns -1 on EAGAIN, throws on every other error. */
export function recvmsg(fd: number, msghdr: Buffer, flags: number): number {
  const n = Number(_recvmsg(fd, msghdr, flags));
  if (n >= 0) return n;
  const e = koffi.errno();
  if (e === errno.EAGAIN || e === errno.EINTR) return -1;
  throw new SyscallError('recvmsg', e);
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

/** Async sendmsg then recvmsg on libuv's thread pool, for kernel calls that may take long (RTM_DELLINK). */
export function sendRecvInBackground(fd: number, tx: Buffer, rxHdr: Buffer): Promise<number> {
  return new Promise((resolve, reject) => {
    _sendmsg.async(fd, tx, 0, (err: Error | null, sent: bigint | number) => {
      if (err) return reject(err);
      if (Number(sent) < 0) return reject(new SyscallError('sendmsg', errno.EIO, 'in background'));
      _recvmsg.async(fd, rxHdr, 0, (err2: Error | null, n: bigint | number) => {
        if (err2) reject(err2);
        else if (Number(n) < 0) reject(new SyscallError('recvmsg', errno.EIO, 'in background'));
        else resolve(Number(n));
      });
    });
  });
}

/** pidfd_open(2): a pidfd for `pid`, or null if there is no such process. */
export function pidfdOpen(pid: number): number | null {
  const fd = Number(_syscall(SYS_pidfd_open, 'int', pid, 'unsigned int', 0));
  if (fd >= 0) return fd;
  const e = koffi.errno();
  if (e === errno.ESRCH) return null;
  throw new SyscallError('pidfd_open', e);
}

/** mknod(2) of a character device node. */
export function mknodChar(path: string, mode: number, major: number, minor: number): void {
  // glibc's makedev() encoding of dev_t.
  const dev = (BigInt(major & 0xfff) << 8n) | BigInt(minor & 0xff) | (BigInt(minor & ~0xff) << 12n) | (BigInt(major & ~0xfff) << 32n);
  if ((_mknod(path, 0o020000 | mode, dev) as number) < 0) fail('mknod', `\`${path}'`);
}

/** The system.posix_acl_access value: owner rw, `uid` rw, group none, mask rw, other none. */
export function aclUserOnly(uid: number): Buffer {
  // posix_acl_xattr: u32 version 2, then {u16 tag, u16 perm, u32 id} sorted by tag.
  const entries: Array<[number, number, number]> = [[0x01, 6, 0xffffffff], [0x02, 6, uid], [0x04, 0, 0xffffffff], [0x10, 6, 0xffffffff], [0x20, 0, 0xffffffff]];
  const buf = Buffer.alloc(4 + 8 * entries.length);
  buf.writeUInt32LE(2, 0);
  entries.forEach(([tag, perm, id], i) => {
    buf.writeUInt16LE(tag, 4 + 8 * i);
    buf.writeUInt16LE(perm, 6 + 8 * i);
    buf.writeUInt32LE(id, 8 + 8 * i);
  });
  return buf;
}

/** Gives `uid` (and nobody else but the owner) read-write access to `path` with a POSIX ACL. */
export function grantUserOnly(path: string, uid: number): void {
  const value = aclUserOnly(uid);
  if ((_setxattr(path, 'system.posix_acl_access', value, value.length, 0) as number) < 0) fail('setxattr', `\`${path}'`);
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

/** The user database entry for a name (through NSS), or null. */
export function getpwnam(name: string): { uid: number; gid: number } | null {
  if (!nssLookup((o) => _getpwnam_r(name, nssRec, nssBuf, nssBuf.length, o) as number, 'getpwnam_r')) return null;
  return { uid: nssRec.readUInt32LE(16), gid: nssRec.readUInt32LE(20) };
}

/** The user name for a uid (through NSS), or null. */
export function getpwuid(uid: number): { name: string; gid: number } | null {
  if (!nssLookup((o) => _getpwuid_r(uid, nssRec, nssBuf, nssBuf.length, o) as number, 'getpwuid_r')) return null;
  const namePtr = nssRec.readBigUInt64LE(0);
  const name = koffi.decode(namePtr, 'char', -1) as string;
  return { name, gid: nssRec.readUInt32LE(20) };
}

/** The gid for a group name (through NSS), or null. */
export function getgrnam(name: string): number | null {
  if (!nssLookup((o) => _getgrnam_r(name, nssRec, nssBuf, nssBuf.length, o) as number, 'getgrnam_r')) return null;
  return nssRec.readUInt32LE(16);
}

export { koffi };
