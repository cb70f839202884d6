// Files root trusts must be files only root could have changed: the policy, hooks, the state directory,
// the audit file, the socket's directory. As OpenSSH's StrictModes has it: the file (after symlinks)
// and every directory above it are root's and writable by nobody else, except a sticky directory
// (such as /tmp) whose entry is root's.
import fs from 'node:fs';
import path from 'node:path';

/** Why a user other than root could have changed `file` or any directory above it; null if none could. */
export function notRootsAlone(file: string): string | null {
  let real: string;
  try {
    real = fs.realpathSync(file);
  } catch (err) {
    return `cannot be resolved (${(err as NodeJS.ErrnoException).code ?? String(err)})`;
  }
  let entry: fs.Stats | null = null;
  for (let p = real; ; p = path.dirname(p)) {
    const st = fs.statSync(p);
    const where = p === real ? '' : ` (through ${p})`;
    if (st.uid !== 0) return `is owned by uid ${st.uid}${where}, not root`;
    const sticky = st.isDirectory() && (st.mode & 0o1000) !== 0 && entry !== null && entry.uid === 0;
    if ((st.mode & 0o022) !== 0 && !sticky) return `is writable by ${st.mode & 0o002 ? 'others' : 'its group'}${where}`;
    if (p === path.dirname(p)) return null;
    entry = st;
  }
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

