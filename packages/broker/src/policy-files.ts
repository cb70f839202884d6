// The files a policy is made of, as the broker and its tools find them: the main file and its fragment directory
// (opened once, its fragments read through that opening), which of them root alone could have written, and
// their text, read without waiting on a FIFO or reading without end.
import fs from 'node:fs';
import { basename, dirname } from 'node:path';
import { TapbrokerError } from '@tapbroker/protocol/core';
import { notRootsAlone, readRegular } from './paths.js';

/** A policy file's size at most (a 16,000-rule policy is about 1 MiB). */
const MAX_POLICY_BYTES = 16 * 1024 * 1024;

/** A policy file as messages name it (`file`), where it is read from (`at`), and a fragment's real path (`real`). */
export interface PolicyFile {
  file: string;
  at: string;
  real?: string;
}

/** Whether fds can be read through (/proc/self/fd): where not, a fragment is read by its path. */
const fdPaths = fs.existsSync('/proc/self/fd');

/**
 * The files a policy is made of, as one look at them: `path`, then every `*.toml` in the directory beside it named
 * after it (`policy.d` for `policy.toml`), in lexical (byte) order. The directory holding both is opened once, and the
 * fragment directory once through it; every file is read through those openings (`at`): a directory swapped under a
 * reload (a link replaced, as tapbroker-policy(5) suggests, or the directory above) gives the names and contents of one
 * of them, never a mix (outside reviews applied one directory's allows without its denies). A fragment directory that
 * is a link to nothing (gone, or hidden by the unit's PrivateTmp) is an error, not a policy without fragments (its
 * deny rules were lost so). Other names there (an editor's backup, a `.dpkg-old`) are not read.
 */
export function openedPolicy<T>(path: string, f: (files: PolicyFile[]) => T): T {
  // `policy.toml/` names no file, and its fragment directory would be `policy.toml/.d`: none, its denies lost (an
  // outside re-test); the kernel refuses it too.
  if (path.endsWith('/')) throw new TapbrokerError('TB_E_POLICY_INVALID', `${path}: not a file (the path ends in /)`);
  const dir = fragmentDir(path);
  const up = opened(dirname(path));
  // A tool's --fragments elsewhere is opened through its own directory.
  const away = dirname(dir) === dirname(path) ? null : opened(dirname(dir));
  try {
    const main: PolicyFile = { file: path, at: `${up.at}/${basename(path)}`, real: `${up.real}/${basename(path)}` };
    const at = `${(away ?? up).at}/${basename(dir)}`;
    let fd: number;
    try {
      fd = fs.openSync(at, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' && !linked(at) && !fragmentDirs.has(path)) return f([main]);
      const why = code !== 'ENOENT' ? (err as Error).message.replaceAll(at, dir) : !linked(at) ? 'no such directory'
        : 'it is a link to nothing (gone, or hidden from the broker: the unit\'s PrivateTmp hides /tmp and /var/tmp)';
      throw new TapbrokerError('TB_E_POLICY_INVALID', `cannot read ${dir}: ${why}`);
    }
    try {
      const frag = fdPaths ? `/proc/self/fd/${fd}` : dir;
      let real: string;
      let names: string[];
      try {
        real = fdPaths ? fs.readlinkSync(frag) : dir;
        names = fragmentNames(dir, fs.readdirSync(frag, { encoding: 'buffer' }));
      } catch (err) {
        if (err instanceof TapbrokerError) throw err;
        throw new TapbrokerError('TB_E_POLICY_INVALID', `cannot read ${dir}: ${(err as Error).message}`);
      }
      return f([main, ...names.map((n) => ({ file: `${dir}/${n}`, at: `${frag}/${n}`, real: `${real}/${n}` }))]);
    } finally {
      fs.closeSync(fd);
    }
  } finally {
    away?.close();
    up.close();
  }
}

/** A directory opened once, to read through (`at`), with its real path; where it cannot be, its path as given. */
function opened(dir: string): { at: string; real: string; close(): void } {
  let fd: number;
  try {
    if (!fdPaths) throw new Error('no /proc/self/fd');
    fd = fs.openSync(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  } catch {
    // Its files' reads then fail (or not) as they would have, and say why.
    return { at: dir, real: dir, close: () => {} };
  }
  return { at: `/proc/self/fd/${fd}`, real: fs.readlinkSync(`/proc/self/fd/${fd}`), close: () => fs.closeSync(fd) };
}

/** Is there a name at `file` (a link, even to nothing)? */
function linked(file: string): boolean {
  try {
    fs.lstatSync(file);
    return true;
  } catch {
    return false;
  }
}

/** The fragments among a directory's names, in byte order; a name that is not UTF-8 is refused. */
function fragmentNames(dir: string, names: Buffer[]): string[] {
  // In byte order, as documented (a JavaScript sort compares UTF-16 units: `ls` and the broker differed for some
  // names); a name that is not UTF-8 would be read as another (its bytes replaced): refused by name instead.
  const toml = names.filter((b) => b.toString('latin1').endsWith('.toml') && b[0] !== 0x2e).sort(Buffer.compare);
  const bad = toml.find((b) => !Buffer.from(b.toString('utf8')).equals(b));
  if (bad) {
    // Its bytes in hex, which no escaping at print time changes (an outside review: `\xe9' printed as `\\xe9').
    throw new TapbrokerError('TB_E_POLICY_INVALID', `${dir}/${bad.toString('utf8')}: the fragment's name is not UTF-8 `
      + `(its bytes in hex: ${bad.toString('hex')}): rename it`);
  }
  return toml.map((n) => n.toString('utf8'));
}

/** The files a policy is made of, by the names messages give them (see openedPolicy). */
export function policyFiles(path: string): string[] {
  return openedPolicy(path, (files) => files.map((f) => f.file));
}

/** Every path a load's message may begin with: the files it reads (as far as they can be listed), their directory. */
export function policyPaths(path: string): string[] {
  try {
    return [...policyFiles(path), fragmentDir(path)];
  } catch {
    return [path, fragmentDir(path)];
  }
}

/**
 * A policy tool's --fragments: the directory read as a file's fragments instead of the one named after it, so that a
 * policy staged as `policy.toml.new` is checked with the `policy.d` it will be loaded with (an outside review: the
 * documented check of the staged file read none, and passed a rule name a fragment had, which the reload then
 * refused). Set by the tools alone, never by the broker.
 */
export const fragmentDirs = new Map<string, string>();

/** A tool's --fragments DIR for `path` (trailing slashes dropped, so messages name `DIR/x.toml`). */
export function readFragmentsFrom(path: string, dir: string): void {
  // An empty one would read `.d`-less `*.toml` of the current directory (`--fragments "$UNSET"`: an outside audit).
  if (dir === '') throw new TapbrokerError('TB_E_USAGE', '--fragments needs a directory, not an empty string');
  fragmentDirs.set(path, dir.length > 1 ? dir.replace(/\/+$/, '') || '/' : dir);
}

/** `policy.toml` → `policy.d`, beside it (or the directory a tool was given for it). */
export function fragmentDir(path: string): string {
  return fragmentDirs.get(path) ?? `${path.endsWith('.toml') ? path.slice(0, -5) : path}.d`;
}

/**
 * A staged policy (`policy.toml.new`, `policy.toml.dpkg-dist`) read without --fragments, when the file it will become
 * has fragments and the staged name has none: what a tool says of it; else null.
 */
export function stagedWithout(path: string): string | null {
  const m = /^(.+)\.toml\.[^/]+$/.exec(basename(path));
  if (!m || fragmentDirs.has(path) || fs.existsSync(fragmentDir(path))) return null;
  const theirs = path.includes('/') ? `${dirname(path)}/${m[1]}.d` : `${m[1]}.d`;
  if (!fs.existsSync(theirs)) return null;
  return `read without ${theirs}, the fragments it will be loaded with once it replaces ${m[1]}.toml (its own would `
    + `be ${fragmentDir(path)}, which does not exist): add --fragments ${theirs}`;
}

/** --fragments, as every policy tool's help gives it. */
export const FRAGMENTS_HELP = '--fragments dir: read the fragments from dir, not from the directory named after the '
  + 'file (check policy.toml.new with --fragments policy.d: the fragments it will be loaded with).';

/** The first of the policy's files (its fragment directory included) a user other than root could change. */
export function untrustedPolicyFile(path: string): { file: string; why: string } | null {
  return openedPolicy(path, (files) => firstUntrusted(path, files));
}

export function firstUntrusted(path: string, files: readonly PolicyFile[]): { file: string; why: string } | null {
  const dir = fragmentDir(path);
  // Each file by the real path of the directory it was read through (every directory above it walked); the policy
  // and its fragment directory by the paths given too (the links on the way to them).
  const checks = [{ file: path, at: path }, ...(files.length > 1 || fs.existsSync(dir) ? [{ file: dir, at: dir }] : []),
    ...files.map((f) => ({ file: f.file, at: f.real ?? f.file }))];
  for (const { file, at } of checks) {
    const why = notRootsAlone(at);
    if (why) return { file, why };
  }
  return null;
}

/**
 * How a policy tool takes a file the broker would refuse (a user other than root could change it): as root
 * (the administrator, whose broker reads it; or `tapbrokerd -n`) it is the broker's own refusal, an error,
 * for every tool (an outside review: who-can, test-policy and explain-policy described a fragment the broker
 * had refused on reload, a deny it did not apply); for another user (a draft, a checkout in CI), a note.
 */
export function untrustedForTools(
  path: string, asBroker = false,
): { refuse: boolean; file: string; message: string } | null {
  const unsafe = untrustedPolicyFile(path);
  if (!unsafe) return null;
  if (asBroker || process.geteuid?.() === 0) {
    const cause = unsafe.why.startsWith('cannot be resolved') ? 'the broker cannot read the policy there'
      : 'a user other than root could change the policy';
    return { refuse: true, file: unsafe.file, message: `${unsafe.file}:-: error: ${unsafe.why}: ${cause}` };
  }
  return { refuse: false, file: unsafe.file, message: `${unsafe.file} ${unsafe.why}: tapbrokerd would refuse to run `
    + 'on it where it is (install it owned by root, writable by root alone)' };
}

/** Each file's text, by the name messages give it. */
export function readSources(files: readonly PolicyFile[]): Array<{ path: string; text: string }> {
  return files.map(({ file, at }) => {
    try {
      // A FIFO a reload opened would hold every client up (an outside review); nor is a policy 16 MiB.
      return { path: file, text: readRegular(at, MAX_POLICY_BYTES) };
    } catch (err) {
      // Named as given, not as read (/proc/self/fd/N/…).
      const why = (err as Error).message.replaceAll(at, file);
      throw new TapbrokerError('TB_E_POLICY_INVALID', `${file}: cannot read the policy: ${why}`);
    }
  });
}
