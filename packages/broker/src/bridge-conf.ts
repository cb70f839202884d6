// `tapbrokerd import-bridge-conf`: qemu-bridge-helper's ACL files (/etc/qemu/bridge.conf and what it
// includes) in, an equivalent tapbroker policy out. A policy tool, loaded only by its command: never on
// the broker's path.
//
// qemu-bridge-helper drops to the caller's uid and groups before it reads the files, and skips an
// include it cannot read: who may read each file is who its lines are for. That is how per-user and
// per-group ACL files work, so the import works it out from owners, modes, POSIX ACLs and the
// directories above each file.
import fs from 'node:fs';
import path from 'node:path';
import koffi from 'koffi';
import { EX, IFNAME_MAX_BYTES, checkIfName, sys } from '@tapbroker/protocol';
import { accountMembers, getgrgid, getpwuid } from './libc.js';
import { dirsOnTheWay, notRootsAlone, readRegularBytes } from './paths.js';
import { ANY_BRIDGE } from './decide.js';
import { shown } from './naming.js';
import { parsePolicy } from './policy.js';

export const DEFAULT_BRIDGE_CONF = '/etc/qemu/bridge.conf';


const USAGE = `usage: tapbrokerd import-bridge-conf [file]

Prints a tapbroker policy equivalent to qemu-bridge-helper's ACL file (default ${DEFAULT_BRIDGE_CONF})
and the files it includes, as each caller would have read them. Review it, then check it with
tapbrokerd check-policy. See tapbrokerd(8), "IMPORTING QEMU-BRIDGE-HELPER'S ACL".`;

// ---- qemu-bridge-helper's line grammar

/** fgets() into qemu's 4096-byte buffer: a longer line is cut and its rest read as another line. */
const LINE_MAX_BYTES = 4095;
/**
 * g_ascii_isspace(): what qemu (4.1 on) trims around a line and its argument. Not the vertical tab, which C's
 * isspace() counts (an outside review: `allow br0<VT>` was imported as br0, which qemu-bridge-helper refuses).
 */
const isSpace = (c: string | undefined) => c !== undefined && ' \t\n\f\r'.includes(c);

export type AclLine =
  | { kind: 'skip' }
  | { kind: 'allow' | 'deny'; bridge: string }
  | { kind: 'include'; file: string }
  | { kind: 'unserved'; bridge: string; why: string }
  | { kind: 'error'; message: string };

const strictUtf8 = new TextDecoder('utf-8', { fatal: true });

/** A line's text, or null when its bytes are not UTF-8. */
function utf8(bytes: Buffer): string | null {
  try {
    return strictUtf8.decode(bytes);
  } catch {
    return null;
  }
}

/** A file's lines as bytes, split at each newline (the last one empty when the file ends with one). */
function splitLines(text: Buffer): Buffer[] {
  const out: Buffer[] = [];
  let from = 0;
  for (let nl = text.indexOf(10); nl >= 0; nl = text.indexOf(10, from)) {
    out.push(text.subarray(from, nl));
    from = nl + 1;
  }
  out.push(text.subarray(from));
  return out;
}

/**
 * One line as qemu-bridge-helper reads it: leading space skipped, `#` or nothing is a comment; the
 * command ends at the line's first space, or at its first tab if it has no space; the argument is the
 * rest, trimmed; `all` is every bridge. Where qemu would take something odd (a name with spaces in it,
 * an empty name, a truncated line) it is an error here: a policy must mean what the file says.
 */
export function parseAclLine(raw: string): AclLine {
  const error = (message: string): AclLine => ({ kind: 'error', message });
  if (Buffer.byteLength(raw) + 1 > LINE_MAX_BYTES) {
    return error(`line is longer than ${LINE_MAX_BYTES - 1} bytes: qemu-bridge-helper would read it as several lines`);
  }
  if (raw.includes('\0')) return error('line holds a NUL byte: qemu-bridge-helper would stop reading it there');
  let i = 0;
  while (isSpace(raw[i])) i++;
  const rest = raw.slice(i);
  if (rest === '' || rest.startsWith('#')) return { kind: 'skip' };
  // Not in a comment, which qemu skips whatever it holds (a re-test: a comment with one refused the import).
  if (raw.includes('\v')) return error('line holds a vertical tab: qemu-bridge-helper takes it as part of a word');
  const space = rest.indexOf(' ');
  const cut = space >= 0 ? space : rest.indexOf('\t');
  const cmd = cut >= 0 ? rest.slice(0, cut) : rest.replace(/[\n\f\r]+$/, '');
  let arg = cut >= 0 ? rest.slice(cut + 1) : '';
  let a = 0;
  let b = arg.length;
  while (a < b && isSpace(arg[a])) a++;
  while (b > a && isSpace(arg[b - 1])) b--;
  arg = arg.slice(a, b);
  if (cmd !== 'allow' && cmd !== 'deny' && cmd !== 'include') {
    const tab = cmd.includes('\t')
      ? ' (qemu-bridge-helper ends the command at the line\'s first space, and this line has one after a tab)'
      : '';
    return error(`unknown command \`${shown(cmd)}'${tab}; the commands are allow, deny and include`);
  }
  if (arg === '') return error(`\`${cmd}' needs ${cmd === 'include' ? 'a file name' : 'a bridge name or all'}`);
  if (cmd === 'include') return { kind: 'include', file: arg };
  if (arg === 'all') return { kind: cmd, bridge: ANY_BRIDGE };
  if (/[ \t\v\f\r]/.test(arg)) {
    return error(`\`${cmd}' takes one bridge name, not \`${shown(arg)}' `
      + '(qemu-bridge-helper would read it all as one name, and no bridge has it)');
  }
  const bytes = Buffer.byteLength(arg);
  if (bytes > IFNAME_MAX_BYTES) {
    return error(`bridge name \`${shown(arg)}' is ${bytes} bytes long; interface names have at most `
      + `${IFNAME_MAX_BYTES} (qemu-bridge-helper refuses it too)`);
  }
  const why = checkIfName(arg);
  // A name Linux allows (any byte but `/`, `:` and white space) that tapbroker does not serve: no tap is ever
  // granted on it, whatever the line says, so the line is left out, and said (an outside review).
  // (`*` stays an error: a line that means a pattern says something qemu-bridge-helper does not do.)
  if (why && !/[/:*]/.test(arg)) return { kind: 'unserved', bridge: arg, why };
  if (why) return error(`bridge name \`${shown(arg)}' ${why}, so it names no bridge`);
  return { kind: cmd, bridge: arg };
}


// ---- who can read a file

/**
 * A set of callers tapbroker can name: everyone, or root plus these uids plus holders of these gids.
 * Root is in every one: qemu-bridge-helper run by root keeps root's power to read any file.
 */
export type Scope = { everyone: true } | { everyone: false; uids: ReadonlySet<number>; gids: ReadonlySet<number> };

const EVERYONE: Scope = { everyone: true };
const some = (uids: Iterable<number>, gids: Iterable<number> = []): Scope => ({
  everyone: false, uids: new Set([0, ...uids]), gids: new Set(gids),
});

/**
 * Who can read a file (or search a directory), as two scopes: `lower` holds no one who cannot (for
 * allow lines: never grant more than qemu-bridge-helper would), `upper` everyone who can (for deny
 * lines: never deny less). They differ only where tapbroker cannot name the set exactly, and `notes`
 * says why.
 */
export interface Reach {
  lower: Scope;
  upper: Scope;
  notes: string[];
}

interface Acl {
  users: Map<number, number>;
  groups: Map<number, number>;
  groupObj: number;
  mask: number | null;
}

let getxattr: ((file: string, name: string, value: Buffer | null, size: number) => number) | null = null;

/** The file's access ACL (system.posix_acl_access), null without one, or 'unreadable'. */
function readAcl(file: string): Acl | null | 'unreadable' {
  try {
    getxattr ??= koffi.load('libc.so.6').func(
      'intptr_t getxattr(const char *path, const char *name, void *value, size_t size)',
    ) as unknown as typeof getxattr;
  } catch {
    return 'unreadable';
  }
  const buf = Buffer.alloc(4 + 8 * 64);
  const n = Number(getxattr!(file, 'system.posix_acl_access', buf, buf.length));
  if (n < 0) {
    const errno = koffi.errno();
    return errno === sys.errno.ENODATA || errno === sys.errno.ENOTSUP ? null : 'unreadable';
  }
  // posix_acl_xattr: u32 version 2, then {u16 tag, u16 perm, u32 id}.
  if (n < 4 || (n - 4) % 8 !== 0 || buf.readUInt32LE(0) !== 2) return 'unreadable';
  const acl: Acl = { users: new Map(), groups: new Map(), groupObj: 0, mask: null };
  for (let o = 4; o < n; o += 8) {
    const tag = buf.readUInt16LE(o);
    const perm = buf.readUInt16LE(o + 2);
    const id = buf.readUInt32LE(o + 4);
    if (tag === 0x02) acl.users.set(id, perm);
    else if (tag === 0x04) acl.groupObj = perm;
    else if (tag === 0x08) acl.groups.set(id, perm);
    else if (tag === 0x10) acl.mask = perm;
    else if (tag !== 0x01 && tag !== 0x20) return 'unreadable';
  }
  return acl;
}

/**
 * Who may do `bit` (4 read, 1 search) on one inode, by the kernel's order: the owner by the owner's
 * bits alone, a named user by its ACL entry, a member of a listed group if any of its groups grants,
 * anyone else by the other bits; root always.
 */
export function reachOf(
  st: Pick<fs.Stats, 'uid' | 'gid' | 'mode'>, acl: Acl | null, bit: number, what: string,
): Reach {
  const mask = acl?.mask ?? 7;
  const ownerOk = ((st.mode >> 6) & bit) !== 0;
  const otherOk = (st.mode & bit) !== 0;
  const groupObj = acl ? acl.groupObj & mask : (st.mode >> 3) & 7;
  const named = [...(acl?.users ?? [])].filter(([u]) => u !== st.uid)
    .map(([u, p]) => [u, (p & mask & bit) !== 0] as const);
  const groups = [[st.gid, (groupObj & bit) !== 0] as const,
    ...[...(acl?.groups ?? [])].map(([g, p]) => [g, (p & mask & bit) !== 0] as const)];
  const sure = [...(ownerOk ? [st.uid] : []), ...named.filter(([, ok]) => ok).map(([u]) => u)];
  const granting = groups.filter(([, ok]) => ok).map(([g]) => g);
  const refusing = groups.filter(([, ok]) => !ok).map(([g]) => g);
  // Users the kernel turns away although a broader class would let them in.
  const shut = [
    ...(!ownerOk && st.uid !== 0 ? [st.uid] : []), ...named.filter(([u, ok]) => !ok && u !== 0).map(([u]) => u),
  ];
  const names = (uids: number[]) => uids.map(userName).join(', ');
  if (otherOk) {
    if (shut.length === 0 && refusing.length === 0) return { lower: EVERYONE, upper: EVERYONE, notes: [] };
    const notes = [
      ...(shut.length ? [`${what} is open to others but not to user ${names(shut)}`] : []),
      ...(refusing.length ? [`${what} is open to others but not to group ${refusing.map(groupName).join(', ')}`] : []),
    ];
    return { lower: some(sure, shut.length ? [] : granting), upper: EVERYONE, notes };
  }
  const full = some(sure, granting);
  if (shut.length === 0 || granting.length === 0) return { lower: full, upper: full, notes: [] };
  return {
    lower: some(sure), upper: full,
    notes: [`${what} is open to group ${granting.map(groupName).join(', ')} but not to user ${names(shut)}`],
  };
}

const smaller = (a: Scope, b: Scope): Scope => {
  if (a.everyone) return b;
  if (b.everyone) return a;
  return a.gids.size < b.gids.size || (a.gids.size === b.gids.size && a.uids.size < b.uids.size) ? a : b;
};

/**
 * Callers in both scopes. A user on one side and a group on the other, or two different groups, meet
 * only through group membership, which tapbroker cannot test for a pair: the lower scope takes the
 * members the account database lists now, the upper the smaller of the two sides.
 */
export function intersect(a: Reach, b: Reach): Reach {
  const meet = (x: Scope, y: Scope, upper: boolean): { scope: Scope; exact: boolean } => {
    if (x.everyone) return { scope: y, exact: true };
    if (y.everyone) return { scope: x, exact: true };
    const gids = [...x.gids].filter((g) => y.gids.has(g));
    const xg = [...x.gids].filter((g) => !y.gids.has(g));
    const yg = [...y.gids].filter((g) => !x.gids.has(g));
    const uids = new Set([...x.uids].filter((u) => y.uids.has(u)));
    const xu = [...x.uids].filter((u) => u !== 0 && !y.uids.has(u));
    const yu = [...y.uids].filter((u) => u !== 0 && !x.uids.has(u));
    const exact = !((xu.length && yg.length) || (yu.length && xg.length) || (xg.length && yg.length));
    if (exact) return { scope: some(uids, gids), exact };
    if (upper) return { scope: smaller(x, y), exact };
    const members = accountMembers(new Set([...xg, ...yg]));
    const inAny = (u: number, gs: number[]) => gs.some((g) => members.get(g)?.has(u));
    for (const u of xu) if (inAny(u, yg)) uids.add(u);
    for (const u of yu) if (inAny(u, xg)) uids.add(u);
    for (const g of xg) for (const u of members.get(g) ?? []) if (inAny(u, yg)) uids.add(u);
    return { scope: some(uids, gids), exact };
  };
  const lower = meet(a.lower, b.lower, false);
  const upper = meet(a.upper, b.upper, true);
  const notes = [...a.notes, ...b.notes];
  if (!lower.exact || !upper.exact) {
    notes.push(`${describe(a.upper)} and ${describe(b.upper)} meet only through group membership: allow lines `
      + `are for ${describe(lower.scope)} (members by the account database now), deny lines for `
      + `${describe(upper.scope)}`);
  }
  return { lower: lower.scope, upper: upper.scope, notes };
}

// ---- names

const groupNameOf = (gid: number) => getgrgid(gid);
const userNameOf = (uid: number) => getpwuid(uid)?.name ?? null;
const userName = (uid: number) => userNameOf(uid) ?? String(uid);
const groupName = (gid: number) => groupNameOf(gid) ?? String(gid);

export function describe(s: Scope): string {
  if (s.everyone) return 'everyone';
  const users = [...s.uids].filter((u) => u !== 0).sort((x, y) => x - y);
  const gids = [...s.gids].sort((x, y) => x - y);
  const parts = [
    ...(users.length ? [`user${users.length > 1 ? 's' : ''} ${users.map(userName).join(', ')}`] : []),
    ...(gids.length ? [`group${gids.length > 1 ? 's' : ''} ${gids.map(groupName).join(', ')}`] : []),
  ];
  return parts.length ? `${parts.join(', ')} and root` : 'root';
}

const scopeKey = (s: Scope) => (s.everyone ? '*'
  : `${[...s.uids].sort((x, y) => x - y).join(',')}/${[...s.gids].sort((x, y) => x - y).join(',')}`);

/** bridge-conf-everyone, bridge-conf-group-kvm, bridge-conf-user-alice, bridge-conf-user-root. */
function scopeName(s: Scope): string {
  if (s.everyone) return 'everyone';
  const users = [...s.uids].filter((u) => u !== 0).sort((x, y) => x - y).map(userName);
  const groups = [...s.gids].sort((x, y) => x - y).map(groupName);
  const parts = [
    ...(users.length ? [`user${users.length > 1 ? 's' : ''}`, ...users] : []),
    ...(groups.length ? [`group${groups.length > 1 ? 's' : ''}`, ...groups] : []),
  ];
  return (parts.length ? parts.join('-') : 'user-root').replace(/[^A-Za-z0-9_.-]/g, '_');
}

function tomlSelector(s: Scope): string[] {
  if (s.everyone) return ['users = ["*"]'];
  const u = [...s.uids].sort((x, y) => x - y).map((uid) => {
    const name = userNameOf(uid);
    return name !== null && /^[A-Za-z0-9_.@$-]+$/.test(name) ? JSON.stringify(name) : String(uid);
  });
  const g = [...s.gids].sort((x, y) => x - y).map((gid) => {
    const name = groupNameOf(gid);
    return name !== null && /^[A-Za-z0-9_.@$-]+$/.test(name) ? JSON.stringify(name) : String(gid);
  });
  return [`users = [${u.join(', ')}]`, ...(g.length ? [`groups = [${g.join(', ')}]`] : [])];
}

// ---- reading the files

interface Source {
  file: string;
  line: number;
  text: string;
}

interface Entry {
  kind: 'allow' | 'deny';
  bridge: string;
  scope: Scope;
  from: Source;
}

/** A problem at `where`: `FILE` or `FILE:LINE`. */
export interface Finding {
  where: string;
  message: string;
}

export interface ImportResult {
  /** The policy, or null when any error was found. */
  toml: string | null;
  errors: Finding[];
  warnings: Finding[];
  /** The top file itself could not be read. */
  noInput: boolean;
}

const MAX_DEPTH = 32;
/** A bridge.conf (or a file it includes) beyond this is not one: qemu-bridge-helper reads lines of a few words. */
const MAX_CONF_BYTES = 1 << 20;

/** The modes and ACLs on the way to a file: the file readable, each directory above it searchable. */
function reachFile(file: string, st: fs.Stats, warn: (message: string) => void): Reach {
  const aclOf = (p: string, what: string) => {
    const acl = readAcl(p);
    if (acl === 'unreadable') {
      warn(`${what} has a POSIX ACL that cannot be read here: judged by its mode alone, which may be wrong `
        + '(check it with getfacl)');
      return null;
    }
    return acl;
  };
  let reach = reachOf(st, aclOf(file, file), 4, file);
  // The directories as written, after symbolic links, and every one a link on the way leads through (an outside
  // review: a link in a 0700 directory was imported as readable by everyone): each is searched on the way in.
  const dirs = new Set<string>(dirsOnTheWay(file));
  for (const start of [path.dirname(file), path.dirname(fs.realpathSync(file))]) {
    for (let d = start; ; d = path.dirname(d)) {
      dirs.add(d);
      if (d === path.dirname(d)) break;
    }
  }
  for (const d of dirs) {
    let ds: fs.Stats;
    try {
      ds = fs.statSync(d);
    } catch {
      continue;
    }
    reach = intersect(reach, reachOf(ds, aclOf(d, `directory ${d}`), 1, `directory ${d}`));
  }
  return reach;
}

function modeText(st: fs.Stats): string {
  return `${userName(st.uid)}:${groupName(st.gid)} ${(st.mode & 0o7777).toString(8).padStart(4, '0')}`;
}

/** Reads `top` and its includes as qemu-bridge-helper would for each caller, and writes the policy. */
export function importBridgeConf(top: string): ImportResult {
  const errors: Finding[] = [];
  const warnings: Finding[] = [];
  const entries: Entry[] = [];
  const files: string[] = [];
  let noInput = false;
  const warn = (where: string, message: string) => {
    if (!warnings.some((w) => w.where === where && w.message === message)) warnings.push({ where, message });
  };

  const visit = (file: string, inherited: Reach, from: Source | null, stack: readonly string[]) => {
    const at = from ? `${from.file}:${from.line}` : shown(file);
    const name = shown(file);
    let st: fs.Stats;
    let text: Buffer;
    try {
      st = fs.statSync(file);
      if (st.isDirectory()) {
        if (from) warn(at, `${name} is a directory: qemu-bridge-helper reads nothing from it`);
        else errors.push({ where: at, message: 'is a directory' });
        noInput = !from;
        return;
      }
      // Opened once and checked: a FIFO or /dev/zero a user put in an include's place hung the import or filled root's
      // memory, before its warning about that user could be given (an outside review).
      text = readRegularBytes(file, MAX_CONF_BYTES);
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      const why = e.code === 'ENOENT' ? 'no such file' : e.message;
      if (!from) {
        noInput = true;
        errors.push({ where: at, message: `cannot read it: ${why} (qemu-bridge-helper then refuses every bridge)` });
      } else if (e.code === 'ENOENT') warn(at, `include ${name}: ${why}: qemu-bridge-helper skips it`);
      // Its deny lines would be lost, and the policy would grant what they refuse (an outside review).
      else errors.push({ where: at, message: `include ${name}: ${why}: it cannot be read here, and its deny lines `
        + 'may not be left out (run as root)' });
      return;
    }
    const real = fs.realpathSync(file);
    if (stack.includes(real)) {
      errors.push({ where: at, message: `include loop: ${[...stack, real].map(shown).join(' -> ')}` });
      return;
    }
    if (stack.length >= MAX_DEPTH) {
      errors.push({ where: at, message: `includes nested more than ${MAX_DEPTH} deep` });
      return;
    }
    const reach = intersect(inherited, reachFile(file, st, (m) => warn(name, m)));
    // The including files' notes were given where they arose.
    for (const n of reach.notes.slice(inherited.notes.length)) warn(name, n);
    if (!from && !reach.upper.everyone) {
      warn(name, `only ${describe(reach.upper)} can read it: qemu-bridge-helper refuses everyone else every bridge`);
    }
    const unsafe = notRootsAlone(file);
    if (unsafe) {
      warn(name, `${unsafe}: a user other than root can change what qemu-bridge-helper allows; this import `
        + 'is what it allows now');
    }
    const who = scopeKey(reach.lower) === scopeKey(reach.upper) ? describe(reach.lower)
      : `allow lines for ${describe(reach.lower)}, deny lines for ${describe(reach.upper)}`;
    files.push(`${name} (${modeText(st)})${from ? `, included at ${at}` : ''}: ${who}`);
    const lines = splitLines(text);
    if (lines.at(-1)?.length === 0) lines.pop();
    lines.forEach((bytes, i) => {
      const src: Source = { file: name, line: i + 1, text: '' };
      const where = `${name}:${i + 1}`;
      const raw = utf8(bytes);
      const parsed = raw === null
        ? (/^[ \t\n\v\f\r]*(#|$)/.test(bytes.toString('latin1')) ? { kind: 'skip' as const } : {
            kind: 'error' as const,
            // qemu-bridge-helper reads bytes; a name or include path decoded here would be another one (an
            // outside review: a Latin-1 include path was judged missing, and its deny lines were lost).
            message: 'line is not valid UTF-8: qemu-bridge-helper reads its bytes as they are, which a policy cannot '
              + 'carry exactly',
          })
        : parseAclLine(raw);
      if (parsed.kind === 'skip') return;
      if (parsed.kind === 'unserved') {
        warn(where, `bridge \`${shown(parsed.bridge)}' ${parsed.why}: tapbroker serves no tap on it, so this line `
          + 'is left out (qemu-bridge-helper serves it)');
        return;
      }
      if (parsed.kind === 'error') {
        errors.push({ where, message: parsed.message });
        return;
      }
      if (parsed.kind === 'include') {
        src.text = `include ${shown(parsed.file)}`;
        let target = parsed.file;
        if (!path.isAbsolute(target)) {
          // qemu-bridge-helper fopen()s the name as written: from whatever directory qemu runs in.
          target = path.resolve(target);
          warn(where, `include ${shown(parsed.file)} is relative: qemu-bridge-helper opens it from the `
            + `directory qemu runs in, which varies; read here from the current directory, as ${shown(target)}`);
        }
        visit(target, reach, src, [...stack, real]);
        return;
      }
      src.text = `${parsed.kind} ${parsed.bridge === ANY_BRIDGE ? 'all' : parsed.bridge}`;
      const scope = parsed.kind === 'allow' ? reach.lower : reach.upper;
      entries.push({ kind: parsed.kind, bridge: parsed.bridge, scope, from: src });
    });
  };

  visit(path.resolve(top), { lower: EVERYONE, upper: EVERYONE, notes: [] }, null, []);
  if (errors.length) return { toml: null, errors, warnings, noInput };
  const toml = render(top, entries, files, warnings);
  // What is printed must load: the same parser as check-policy and the broker.
  parsePolicy(toml, '<import-bridge-conf>');
  return { toml, errors, warnings, noInput };
}

const listed = (bridges: readonly string[]) => `[${bridges.map((b) => JSON.stringify(b)).join(', ')}]`;

function render(
  top: string, entries: readonly Entry[], files: readonly string[], warnings: readonly Finding[],
): string {
  const out = [
    `# A tapbroker policy imported from qemu-bridge-helper's ACL file ${shown(top)}`,
    '# by `tapbrokerd import-bridge-conf`. REVIEW IT before it becomes /etc/tapbroker/policy.toml, and check',
    '# it with `tapbrokerd check-policy` and `tapbrokerd who-can --bridge BRIDGE`.',
    '#',
    '# - qemu-bridge-helper reads its files as the calling user and skips an include that user cannot read:',
    '#   each rule below is for the users and groups that can read the lines it comes from, judged from',
    '#   owners, modes, POSIX ACLs and the directories above, resolved on this host now. root reads every',
    '#   file, so every scope includes root.',
    '# - A deny line wins wherever it is, as in qemu-bridge-helper; `all` is bridges = ["*"], every Linux',
    '#   bridge.',
    '# - A tap granted through tapbroker-bridge-helper (qemu -netdev bridge, libvirt session mode) has no',
    '#   guest MAC the broker knows: qemu sets it on its own -device, so mac_prefix does not constrain it.',
    '# - The broker refuses a bridge whose MAC address an administrator has not set',
    '#   (ip link set BRIDGE address MAC, or MACAddress= in systemd-networkd).',
    '# - Only members of the broker socket\'s group (tapbroker, as packaged) reach the broker at all: a user',
    '#   who used the setuid helper must join it (usermod -aG tapbroker USER) before these rules apply.',
    '# - Nothing else is pinned: limits are tapbroker\'s defaults (one queue, no vhost-net, 64 devices per',
    '#   user); raise them where VMs need more.',
    '#',
    '# Files read, and who qemu-bridge-helper reads each for:',
    ...files.map((f) => `#   ${f}`),
    ...(warnings.length ? ['#', '# Warnings:', ...warnings.map((w) => `#   ${w.where}: ${shown(w.message)}`)] : []),
    '',
    'version = 1',
  ];
  const byScope = (kind: 'allow' | 'deny') => {
    const m = new Map<string, { scope: Scope; entries: Entry[] }>();
    for (const e of entries.filter((x) => x.kind === kind)) {
      const k = scopeKey(e.scope);
      if (!m.has(k)) m.set(k, { scope: e.scope, entries: [] });
      m.get(k)!.entries.push(e);
    }
    // Everyone first, then in the order the files give them.
    return [...m.values()].sort((a, b) => Number(b.scope.everyone) - Number(a.scope.everyone));
  };
  const used = new Set<string>();
  const nameFor = (prefix: string, s: Scope) => {
    const base = `${prefix}${scopeName(s)}`.slice(0, 60);
    let name = base;
    for (let n = 2; used.has(name); n++) name = `${base}-${n}`;
    used.add(name);
    return name;
  };
  const bridgesOf = (es: readonly Entry[]) => {
    const names = [...new Set(es.map((e) => e.bridge))];
    return names.includes(ANY_BRIDGE) ? [ANY_BRIDGE] : names;
  };
  const allows = byScope('allow');
  if (allows.length === 0) out.push('', '# No allow line: nobody may have anything (qemu-bridge-helper\'s default).');
  const tables = [['rule', 'bridge-conf-', allows], ['deny', 'bridge-conf-deny-', byScope('deny')]] as const;
  for (const [table, prefix, groups] of tables) {
    for (const g of groups) {
      out.push('', ...g.entries.map((e) => `# from ${e.from.file}:${e.from.line}: ${e.from.text}`),
        `[[${table}]]`, `name = "${nameFor(prefix, g.scope)}"`, `# ${describe(g.scope)}`, ...tomlSelector(g.scope),
        `bridges = ${listed(bridgesOf(g.entries))}`);
    }
  }
  return `${out.join('\n')}\n`;
}

/** The command: prints the policy, or the errors; returns the exit status (sysexits). */
export function importBridgeConfTool(argv: readonly string[]): number {
  if (argv[0] === '-h' || argv[0] === '--help') {
    process.stdout.write(`${USAGE}\n`);
    return EX.OK;
  }
  const bad = argv.length > 1 ? argv[1] : argv[0]?.startsWith('-') ? argv[0] : undefined;
  if (bad !== undefined) {
    process.stderr.write(`tapbrokerd: import-bridge-conf: unknown argument \`${bad}'\n${USAGE}\n`);
    return EX.USAGE;
  }
  const file = argv[0] ?? DEFAULT_BRIDGE_CONF;
  let result: ImportResult;
  try {
    result = importBridgeConf(file);
  } catch (err) {
    process.stderr.write(`tapbrokerd: import-bridge-conf: internal error: ${(err as Error).message}\n`);
    return EX.SOFTWARE;
  }
  for (const w of result.warnings) process.stderr.write(`${w.where}: warning: ${shown(w.message)}\n`);
  for (const e of result.errors) process.stderr.write(`${e.where}: error: ${shown(e.message)}\n`);
  if (result.toml === null) return result.noInput ? EX.NOINPUT : EX.DATAERR;
  process.stdout.write(result.toml);
  return EX.OK;
}
