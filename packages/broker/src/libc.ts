// The broker's own foreign calls (the protocol package's sys holds what clients need too, pidfd_open among them):
// pidfd signals, device nodes, ACLs, the account database, and netlink on the thread pool. Each failure throws a
// SyscallError carrying errno.
import koffi from 'koffi';
import { sys } from '@tapbroker/protocol/core';

const libc = koffi.load('libc.so.6');
const _syscall = libc.func('long syscall(long nr, ...)');
const _mknod = libc.func('int mknod(const char *path, uint32_t mode, uint64_t dev)');
const _setxattr = libc.func('int setxattr(const char *path, const char *name, void *value, size_t size, int flags)');
const _sendmsg = libc.func('intptr_t sendmsg(int fd, void *msg, int flags)');
const _recvmsg = libc.func('intptr_t recvmsg(int fd, void *msg, int flags)');
const _getpwnam_r = libc.func(
  'int getpwnam_r(const char *name, void *pwd, void *buf, size_t len, _Out_ void **result)',
);
const _getpwuid_r = libc.func('int getpwuid_r(uint32_t uid, void *pwd, void *buf, size_t len, _Out_ void **result)');
const _getgrgid_r = libc.func('int getgrgid_r(uint32_t gid, void *grp, void *buf, size_t len, _Out_ void **result)');
const _getgrouplist = libc.func('int getgrouplist(const char *user, uint32_t group, void *groups, _Inout_ int *n)');
const _setpwent = libc.func('void setpwent()');
const _getpwent = libc.func('void *getpwent()');
const _endpwent = libc.func('void endpwent()');
const _setgrent = libc.func('void setgrent()');
const _getgrent = libc.func('void *getgrent()');
const _endgrent = libc.func('void endgrent()');
const _flock = libc.func('int flock(int fd, int op)');
const _prlimit = libc.func('int prlimit(int pid, int resource, const void *limit, void *old)');
const _mallocTrim = libc.func('int malloc_trim(size_t pad)');
const SYS_pidfd_send_signal = 424;
const LOCK_EX = 2;
const LOCK_NB = 4;

function fail(syscall: string, detail?: string): never {
  throw new sys.SyscallError(syscall, koffi.errno(), detail);
}

/** One classic BPF instruction: code, jump if true, jump if false, constant. */
export type BpfInsn = readonly [code: number, jt: number, jf: number, k: number];

/**
 * SO_ATTACH_FILTER: `program` runs on every message before it is queued to socket `fd` (struct sock_fprog: the
 * instruction count, then a pointer to them; the kernel copies them during the call).
 */
export function attachFilter(fd: number, program: readonly BpfInsn[]): void {
  const insns = Buffer.alloc(8 * program.length);
  program.forEach(([code, jt, jf, k], i) => {
    insns.writeUInt16LE(code, 8 * i);
    insns.writeUInt8(jt, 8 * i + 2);
    insns.writeUInt8(jf, 8 * i + 3);
    insns.writeUInt32LE(k >>> 0, 8 * i + 4);
  });
  const fprog = Buffer.alloc(16);
  fprog.writeUInt16LE(program.length, 0);
  fprog.writeBigUInt64LE(koffi.address(insns) as bigint, 8);
  sys.setsockopt(fd, sys.SOL_SOCKET, 26 /* SO_ATTACH_FILTER */, fprog);
}

/**
 * malloc_trim(3): the memory glibc's heaps hold free goes back to the system, wherever it lies in them (it keeps what
 * a burst freed otherwise: an outside long run's broker stayed near 80 MB RSS, and one call gave back half of it).
 * About a millisecond.
 */
export function returnFreeMemory(): void {
  _mallocTrim(0);
}

/** pidfd_send_signal(2): `signal` to the process behind `pidfd`. False when it is gone. */
export function pidfdSignal(pidfd: number, signal: number): boolean {
  const rc = _syscall(SYS_pidfd_send_signal, 'int', pidfd, 'int', signal, 'void *', null, 'unsigned int', 0);
  if (Number(rc) === 0) return true;
  if (koffi.errno() === sys.errno.ESRCH) return false;
  return fail('pidfd_send_signal');
}

/** prlimit(2) RLIMIT_AS, soft and hard, of a process: false when it is gone. */
export function limitAddressSpace(pid: number, bytes: number): boolean {
  const limit = Buffer.alloc(16);
  limit.writeBigUInt64LE(BigInt(bytes), 0);
  limit.writeBigUInt64LE(BigInt(bytes), 8);
  if (_prlimit(pid, 9 /* RLIMIT_AS */, limit, null) === 0) return true;
  if (koffi.errno() === sys.errno.ESRCH) return false;
  return fail('prlimit');
}

/** flock(2) LOCK_EX, without waiting: false when another open file holds it. */
export function lockExclusive(fd: number): boolean {
  if (_flock(fd, LOCK_EX | LOCK_NB) === 0) return true;
  if (koffi.errno() === sys.errno.EAGAIN) return false;
  return fail('flock');
}

/** mknod(2) of a character device node. */
export function mknodChar(path: string, mode: number, major: number, minor: number): void {
  // glibc's makedev() encoding of dev_t.
  const dev =
    (BigInt(major & 0xfff) << 8n) |
    BigInt(minor & 0xff) |
    (BigInt(minor & ~0xff) << 12n) |
    (BigInt(major & ~0xfff) << 32n);
  if ((_mknod(path, 0o020000 | mode, dev) as number) < 0) fail('mknod', `\`${path}'`);
}

/** The system.posix_acl_access value: owner rw, `uid` rw, group none, mask rw, other none. */
export function aclUserOnly(uid: number): Buffer {
  // posix_acl_xattr: u32 version 2, then {u16 tag, u16 perm, u32 id} sorted by tag.
  const entries: Array<[number, number, number]> = [
    [0x01, 6, 0xffffffff],
    [0x02, 6, uid],
    [0x04, 0, 0xffffffff],
    [0x10, 6, 0xffffffff],
    [0x20, 0, 0xffffffff],
  ];
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
  if ((_setxattr(path, 'system.posix_acl_access', value, value.length, 0) as number) < 0)
    fail('setxattr', `\`${path}'`);
}

// struct passwd: pw_name@0 pw_passwd@8 pw_uid@16 pw_gid@20 (48 bytes);
// struct group: gr_name@0 gr_passwd@8 gr_gid@16 gr_mem@24 (32 bytes).
const nssBuf = Buffer.alloc(64 * 1024);
const nssRec = Buffer.alloc(64);

function nssLookup(call: (out: unknown[]) => number, what: string): boolean {
  const out: unknown[] = [null];
  const rc = call(out);
  if (rc !== 0 && rc !== sys.errno.ENOENT && rc !== sys.errno.ESRCH) throw new sys.SyscallError(what, rc);
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
  const name = koffi.decode(nssRec.readBigUInt64LE(0), 'char', -1) as string;
  return { name, gid: nssRec.readUInt32LE(20) };
}

/** The gid for a group name (through NSS), or null. */
export const getgrnam = sys.getgrnam;

/** The groups the account database gives user `name` (whose primary group is `gid`), through NSS (getgrouplist). */
export function groupsOf(name: string, gid: number): number[] {
  for (let room = 64; ; ) {
    const out = Buffer.alloc(4 * room);
    const n = [room];
    if ((_getgrouplist(name, gid, out, n) as number) >= 0) {
      return Array.from({ length: n[0]! }, (_, i) => out.readUInt32LE(4 * i));
    }
    if (n[0]! <= room) fail('getgrouplist');
    room = n[0]!;
  }
}

/** The group name for a gid (through NSS), or null. */
export function getgrgid(gid: number): string | null {
  if (!nssLookup((o) => _getgrgid_r(gid, nssRec, nssBuf, nssBuf.length, o) as number, 'getgrgid_r')) return null;
  return koffi.decode(nssRec.readBigUInt64LE(0), 'char', -1) as string;
}

const cString = (p: unknown) => koffi.decode(p, 'char', -1) as string;

/**
 * Every member of groups `gids` by the account database: users listed in the group (gr_mem) and users
 * whose primary group it is. One pass over each database, at policy load, never per request.
 */
export function accountMembers(gids: ReadonlySet<number>): Map<number, Set<number>> {
  const out = new Map<number, Set<number>>([...gids].map((g) => [g, new Set<number>()]));
  if (gids.size === 0) return out;
  const byName = new Map<string, number>();
  _setpwent();
  try {
    for (let p = _getpwent(); p !== null; p = _getpwent()) {
      const rec = koffi.decode(p, koffi.array('uint8_t', 24)) as number[];
      const b = Buffer.from(rec);
      const uid = b.readUInt32LE(16);
      const gid = b.readUInt32LE(20);
      byName.set(cString(b.readBigUInt64LE(0)), uid);
      out.get(gid)?.add(uid);
    }
  } finally {
    _endpwent();
  }
  _setgrent();
  try {
    for (let g = _getgrent(); g !== null; g = _getgrent()) {
      const b = Buffer.from(koffi.decode(g, koffi.array('uint8_t', 32)) as number[]);
      const members = out.get(b.readUInt32LE(16));
      if (!members) continue;
      const mem = b.readBigUInt64LE(24);
      for (let i = 0; mem !== 0n; i++) {
        const ptr = BigInt(koffi.decode(mem + BigInt(8 * i), 'uint64_t') as number | bigint);
        if (ptr === 0n) break;
        const uid = byName.get(cString(ptr));
        if (uid !== undefined) members.add(uid);
      }
    }
  } finally {
    _endgrent();
  }
  return out;
}

/**
 * A netlink request and its ack on libuv's thread pool, for kernel calls that take long (RTM_DELLINK
 * costs ~20 ms). Every buffer whose address the kernel uses is held by this closure until the end.
 */
export function netlinkInBackground(fd: number, msg: Buffer, rx: Buffer): Promise<number> {
  const iovs = Buffer.alloc(32);
  iovs.writeBigUInt64LE(koffi.address(msg) as bigint, 0);
  iovs.writeBigUInt64LE(BigInt(msg.length), 8);
  iovs.writeBigUInt64LE(koffi.address(rx) as bigint, 16);
  iovs.writeBigUInt64LE(BigInt(rx.length), 24);
  const tx = Buffer.alloc(56);
  tx.writeBigUInt64LE(koffi.address(iovs) as bigint, 16);
  tx.writeBigUInt64LE(1n, 24);
  const rxHdr = Buffer.alloc(56);
  rxHdr.writeBigUInt64LE((koffi.address(iovs) as bigint) + 16n, 16);
  rxHdr.writeBigUInt64LE(1n, 24);
  const held = [msg, rx, iovs, tx, rxHdr];
  return new Promise<number>((resolve, reject) => {
    // Nothing may throw out of a koffi callback: it would kill the process.
    _sendmsg.async(fd, tx, 0, (err: Error | null, sent: bigint | number) => {
      if (err || Number(sent) < 0) {
        reject(err ?? new sys.SyscallError('sendmsg', sys.errno.EIO, 'in background'));
        return;
      }
      _recvmsg.async(fd, rxHdr, 0, (err2: Error | null, n: bigint | number) => {
        if (err2) reject(err2);
        else if (Number(n) < 0) reject(new sys.SyscallError('recvmsg', sys.errno.EIO, 'in background'));
        else resolve(Number(n));
      });
    });
  }).finally(() => void held);
}
