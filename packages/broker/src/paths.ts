// Files root trusts must be files only root could have changed: the policy, hooks, the state directory,
// the audit file, the socket's directory. As OpenSSH's StrictModes has it: the file and every directory
// it is reached through are root's and writable by nobody else, except a sticky directory (such as /tmp)
// whose entry is root's. The path is walked as given, a symlink at a time: a directory that only holds a
// symlink on the way counts as much as the directories above the file it leads to, or whoever can write
// there could point the link elsewhere between the check and the read.
import fs from 'node:fs';
import path from 'node:path';
import { shown } from './naming.js';

/** Symlinks followed on one path, at most (the kernel's own limit). */
const MAX_LINKS = 40;

/**
 * Why a user other than root could have changed `file` or any directory on the way to it; null if none could.
 * `trusted`: owners taken as root is (a daemon's own account, for the socket it serves).
 */
export function notRootsAlone(file: string, trusted: (uid: number) => boolean = (uid) => uid === 0): string | null {
  // Each directory the walk goes through, with the entry it takes from there (for the sticky exemption).
  const steps: Step[] = [];
  let target: { file: string; st: fs.Stats };
  try {
    // Not path.resolve: it would take `link/..` away as text, where the kernel follows the link first.
    target = walk(path.isAbsolute(file) ? file : `${process.cwd()}/${file}`, steps);
  } catch (err) {
    return `cannot be resolved (${(err as NodeJS.ErrnoException).code ?? String(err)})`;
  }
  if (!trusted(target.st.uid)) return `is owned by uid ${target.st.uid}, not root`;
  if ((target.st.mode & 0o022) !== 0) return `is writable by ${target.st.mode & 0o002 ? 'others' : 'its group'}`;
  // The nearest directory first: the one an administrator is most likely to have to fix.
  for (const { dir, st, entry } of steps.reverse()) {
    // A directory a user named (a link into a home directory): escaped, as any text it wrote (an outside review
    // forged a log line with its newline).
    if (!trusted(st.uid)) return `is owned by uid ${st.uid} (through ${shown(dir)}), not root`;
    const sticky = (st.mode & 0o1000) !== 0 && trusted(entry.uid);
    if ((st.mode & 0o022) !== 0 && !sticky) {
      return `is writable by ${st.mode & 0o002 ? 'others' : 'its group'} (through ${shown(dir)})`;
    }
  }
  return null;
}

type Step = { dir: string; st: fs.Stats; entry: fs.Stats };

/** Every directory the kernel passes through to reach `file`, symlinks followed one at a time; none if it cannot. */
export function dirsOnTheWay(file: string): string[] {
  const steps: Step[] = [];
  try {
    walk(path.isAbsolute(file) ? file : `${process.cwd()}/${file}`, steps);
  } catch {
    return [];
  }
  return steps.map((s) => s.dir);
}

/** Resolves `abs` component by component, as the kernel does, noting every directory passed through. */
function walk(abs: string, steps: Step[]): { file: string; st: fs.Stats } {
  const todo = abs.split('/').filter((c) => c !== '' && c !== '.');
  let cur = '/';
  let st = fs.statSync('/');
  let links = 0;
  while (todo.length > 0) {
    const name = todo.shift()!;
    if (!st.isDirectory()) throw Object.assign(new Error(`${cur} is not a directory`), { code: 'ENOTDIR' });
    if (name === '..') {
      // From the directory reached, not from the path's text: the kernel's `..' after a symlink.
      cur = path.dirname(cur);
      st = fs.statSync(cur);
      continue;
    }
    const next = path.join(cur, name);
    const entry = fs.lstatSync(next);
    steps.push({ dir: cur, st, entry });
    if (entry.isSymbolicLink()) {
      if (++links > MAX_LINKS) throw Object.assign(new Error(`too many symlinks in ${abs}`), { code: 'ELOOP' });
      const to = fs.readlinkSync(next);
      todo.unshift(...to.split('/').filter((c) => c !== '' && c !== '.'));
      if (to.startsWith('/')) {
        cur = '/';
        st = fs.statSync('/');
      }
      continue;
    }
    cur = next;
    st = entry;
  }
  return { file: cur, st };
}

/**
 * Why a hook program may not be run as root, or null: it must be a regular file owned by root,
 * executable, and writable by nobody but root — checked at load and again before each run.
 */
export function hookUnsafe(file: string): string | null {
  let st: fs.Stats;
  try {
    st = fs.statSync(file);
  } catch {
    return 'does not exist';
  }
  if (!st.isFile()) return 'is not a regular file';
  if (!(st.mode & 0o100)) return 'is not executable';
  return notRootsAlone(file);
}

/**
 * A file's text, only if it is a regular file: never a FIFO or a device, which would block the broker (opened
 * without blocking, then looked at) or feed it without end; never beyond `max` bytes; through a link only if
 * `follow`.
 */
export function readRegular(file: string, max: number, follow = true): string {
  return readRegularBytes(file, max, follow).toString('utf8');
}

/** readRegular's bytes, as read. */
export function readRegularBytes(file: string, max: number, follow = true): Buffer {
  const { O_RDONLY, O_NOFOLLOW, O_NONBLOCK } = fs.constants;
  const fd = fs.openSync(file, O_RDONLY | O_NONBLOCK | (follow ? 0 : O_NOFOLLOW));
  try {
    const st = fs.fstatSync(fd);
    if (!st.isFile()) {
      const kind = st.isDirectory() ? 'a directory' : st.isFIFO() ? 'a FIFO' : st.isSocket() ? 'a socket' : 'a device';
      throw new Error(`not a regular file (${kind})`);
    }
    if (st.size > max) throw new Error(`${st.size} bytes, over ${max}`);
    return fs.readFileSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Replaces `file` with `text`, whole or not at all: a temporary file beside it (never through a link, 0600) written
 * in full, synced, renamed over `file`, and the directory synced. A write cut short (a nearly full file system) is
 * carried on until it fails: an outside review found a lease table cut short renamed over the good one, as written.
 * On failure the temporary file is removed and the error thrown.
 */
export function replaceFile(file: string, text: string): void {
  const tmp = `${file}.${process.pid}.tmp`;
  const { O_WRONLY, O_CREAT, O_TRUNC, O_NOFOLLOW } = fs.constants;
  try {
    const fd = fs.openSync(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, 0o600);
    try {
      for (let buf = Buffer.from(text); buf.length > 0;) buf = buf.subarray(fs.writeSync(fd, buf));
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, file);
  } catch (err) {
    try {
      fs.rmSync(tmp, { force: true });
    } catch {
      // A read-only directory holds none.
    }
    throw err;
  }
  const dfd = fs.openSync(path.dirname(file), 'r');
  try {
    fs.fsyncSync(dfd);
  } finally {
    fs.closeSync(dfd);
  }
}
