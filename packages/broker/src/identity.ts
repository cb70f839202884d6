// The caller's identity, from the kernel only: SO_PEERCRED, SO_PEERGROUPS and SO_PEERPIDFD.
import fs from 'node:fs';
import type { PeerCredentials } from '@tapbroker/protocol/core';
import { getpwuid } from './libc.js';
import { processStartTime } from './leases.js';
import type { Caller } from './decide.js';

export interface Identity extends Caller {
  pid: number;
  /** A pidfd for the caller process, owned by the session; null where the kernel lacks SO_PEERPIDFD. */
  pidfd: number | null;
  /**
   * The caller's executable; without CAP_SYS_PTRACE (the hardened unit) /proc/<pid>/exe of another
   * user is unreadable, and this is `comm:<name>` from /proc/<pid>/comm instead. Null when the pid no
   * longer names the caller.
   */
  exe: string | null;
  /** The uid's account name now (cached a minute, forgotten at a reload), not when the caller connected. */
  readonly user: string | null;
  /**
   * The caller's parent when it connected (qemu or libvirtd for the bridge helper), as /proc showed it:
   * recorded for the audit trail, never used in a decision (the parent may exit or be replaced meanwhile).
   */
  parent: { pid: number; exe: string | null } | null;
  /** The program the client named itself in its hello (printable ASCII kept): its own word, for the trail only. */
  client?: string;
  /** Whose subordinate gid range (/etc/subgid) `gid` lies in, or null (the broker's view of that file). */
  subordinateGid?: (gid: number) => string | null;
}

export function identify(peer: PeerCredentials): Identity {
  const uid = peer.uid;
  return {
    uid, gid: peer.gid, groups: peer.groups, pid: peer.pid, pidfd: peer.pidfd,
    exe: readExe(peer.pid, peer.pidfd), parent: readParent(peer.pid),
    // Looked up at each use, as the cache below keeps it: a connection held across an account's rename and a
    // reload was still judged and recorded under the old name, then another user's (an outside review).
    get user() {
      return userName(uid);
    },
  };
}

function readParent(pid: number): Identity['parent'] {
  try {
    const ppid = Number(/^PPid:\s*(\d+)$/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1]);
    return ppid > 0 ? { pid: ppid, exe: readExe(ppid, null) } : null;
  } catch {
    return null;
  }
}

/** uid → user name, looked up again after NAME_TTL_MS: accounts are renamed and uids reused. */
const names = new Map<number, { name: string | null; at: number }>();
const NAME_TTL_MS = 60_000;

function userName(uid: number): string | null {
  const hit = names.get(uid);
  if (hit && Date.now() - hit.at < NAME_TTL_MS) return hit.name;
  let name: string | null;
  try {
    name = getpwuid(uid)?.name ?? null;
  } catch {
    // The account database failed (a directory service down): no name, not cached. Decisions use the uid,
    // and deny rules treat a caller without a name as matching any name they could not resolve.
    return null;
  }
  // Bounded: a uid not seen for a while is looked up again anyway.
  if (names.size >= 4096) names.clear();
  names.set(uid, { name, at: Date.now() });
  return name;
}

/** Forgets every cached user name (a policy reload, whose `{user}` patterns depend on them). */
export function forgetUserNames(): void {
  names.clear();
}

/**
 * A path's (or a comm's) bytes as text that reads back to them: printable ASCII as it is, a backslash doubled, every
 * other byte as \xNN. A byte that is not UTF-8 read as U+FFFD, or a look-alike letter, made one program's name pass
 * for another's in the audit trail (an outside re-test).
 */
export function bytesShown(b: Buffer, max = SHOWN_BYTES): string {
  let out = '';
  for (const c of b.subarray(0, max)) {
    if (c === 0x5c) out += '\\\\';
    else out += c >= 0x20 && c < 0x7f ? String.fromCharCode(c) : `\\x${c.toString(16).padStart(2, '0')}`;
  }
  // The rest counted, not shown: `\+N' (a lone backslash and a plus, which no byte shown above reads as). A 4,000-byte
  // path made every record of its caller 40 KB (an outside review: MB/s of audit from one uid).
  return b.length > max ? `${out}\\+${b.length - max}` : out;
}

/** Bytes of a program's path or a client's name the audit trail shows, at most (the rest are counted). */
export const SHOWN_BYTES = 256;

// /proc/<pid>/exe is only trusted when the pidfd, read after it, still names the same pid:
// otherwise the pid may have been reused by another process in between.
function readExe(pid: number, pidfd: number | null): string | null {
  let exe: string;
  try {
    exe = bytesShown(fs.readlinkSync(`/proc/${pid}/exe`, { encoding: 'buffer' }));
  } catch {
    try {
      exe = `comm:${bytesShown(fs.readFileSync(`/proc/${pid}/comm`).subarray(0, -1))}`;
    } catch {
      return null;
    }
  }
  return pidfd === null || stillNames(pidfd, pid) ? exe : null;
}

/** True when `pidfd` still names `pid`: what /proc/<pid> showed before this was the caller's, not a reuser's. */
function stillNames(pidfd: number, pid: number): boolean {
  try {
    const info = fs.readFileSync(`/proc/self/fdinfo/${pidfd}`, 'utf8');
    return /^Pid:\s*(-?\d+)$/m.exec(info)?.[1] === String(pid);
  } catch {
    return false;
  }
}

/**
 * The caller's start time (/proc/<pid>/stat), which names a macvtap's holder across restarts; null where its pid no
 * longer names it (an outside review: read by pid alone, a reuser's could be recorded).
 */
export function callerStartTime(c: Pick<Identity, 'pid' | 'pidfd'>): number | null {
  const start = processStartTime(c.pid);
  return c.pidfd === null || stillNames(c.pidfd, c.pid) ? start : null;
}
