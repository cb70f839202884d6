// Policy v1: TOML validated by zod, names resolved once at load into typed, immutable rules.
// Default deny; any matching deny rule wins; among allow rules the first in file order that
// permits the whole request decides.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { parse as parseToml, TomlError } from 'smol-toml';
import { z } from 'zod';
import {
  MACVTAP_MODES, MAX_QUEUES, TapbrokerError, checkIfName, checkMacPrefix, checkNetworkName, type ErrorCode,
  type MacvtapMode,
} from '@tapbroker/protocol';
import { accountMembers, getgrnam, getpwnam } from './libc.js';
import { OVSDB_TARGET } from './ovs.js';
import { notRootsAlone } from './paths.js';

export const DEFAULT_MAC_PREFIX = '52:54:00';
/** Names callers may pick: `{uid}` and `{user}` are substituted, `*` stands for one or more of [A-Za-z0-9_.-]. */
export const DEFAULT_NAME_PATTERN = 'tb{uid}-*';
/** Devices per user under a rule that names no max_devices: finite, so no rule leaves it unbounded. */
export const DEFAULT_MAX_DEVICES = 64;

const Principal = z.union([z.string().min(1).max(256), z.number().int().min(0).max(0xfffffffe)]);
const IfName = z.string().superRefine((s, ctx) => {
  const why = checkIfName(s);
  if (why) ctx.addIssue({ code: 'custom', message: `interface name \`${s}' ${why}` });
});
const PolicyName = z.string().superRefine((s, ctx) => {
  const why = checkNetworkName(s);
  if (why) ctx.addIssue({ code: 'custom', message: why });
});
const RuleName = PolicyName;
/** In `bridges`, the whole entry `"*"` stands for every Linux bridge; it is not a glob inside a name. */
export const ANY_BRIDGE = '*';
const BridgeName = z.string().superRefine((s, ctx) => {
  if (s === ANY_BRIDGE) return;
  const why = checkIfName(s);
  if (!why) return;
  const glob = s.includes('*') ? ': "*" stands alone for every Linux bridge, it is not a pattern' : '';
  ctx.addIssue({ code: 'custom', message: `interface name \`${s}' ${why}${glob}` });
});

const NamePattern = z.string().superRefine((s, ctx) => {
  if (!/^[A-Za-z0-9_.*{}-]+$/.test(s) || /\{(?!uid\}|user\})/.test(s)) {
    ctx.addIssue({
      code: 'custom',
      message: `name_pattern \`${s}' may use A-Z a-z 0-9 _ . - *, {uid} and {user} only`,
    });
  } else if (!s.includes('{uid}') && !s.includes('{user}')) {
    ctx.addIssue({
      code: 'custom',
      message: `name_pattern \`${s}' must contain {uid} or {user}, so users cannot take each other's names`,
    });
  }
});

const MacvtapGrant = z.strictObject({
  parent: IfName,
  /** passthru takes the whole NIC: it is only allowed where named. */
  modes: z.array(z.enum(MACVTAP_MODES)).min(1).default(['bridge']),
});

const NetworkName = PolicyName;
const Vlan = z.number().int().min(1).max(4094);

const NetworkSchema = z.strictObject({
  bridge: IfName.optional(),
  ovs: IfName.optional(),
  /** Absolute path of a plug program, run by the broker as `PATH up|down DEVICE key=value…`. */
  hook: z.string().regex(/^\/[^\0]*$/, 'must be an absolute path').optional(),
  /** Access VLAN: the port's PVID, untagged. */
  vlan: Vlan.optional(),
  /** Trunk VLANs (Open vSwitch only). */
  trunk: z.array(Vlan).min(1).optional(),
  /** Seconds a hook may run (default 10). */
  hook_timeout: z.number().int().min(1).max(300).optional(),
  /** OVSDB to use instead of the one ovs-vsctl would find. */
  ovsdb: z.string().regex(OVSDB_TARGET, 'must be unix:/path (no spaces or commas)').optional(),
  /** Every tap on this network is a locked port that forwards only its lease's guest MAC. */
  mac_lock: z.boolean().optional(),
}).superRefine((n, ctx) => {
  const kinds = [n.bridge, n.ovs, n.hook].filter((x) => x !== undefined).length;
  if (kinds !== 1) ctx.addIssue({ code: 'custom', message: 'a network needs exactly one of bridge, ovs or hook' });
  if (n.vlan !== undefined && n.trunk !== undefined) {
    ctx.addIssue({ code: 'custom', message: 'vlan and trunk exclude each other' });
  }
  if (n.trunk !== undefined && n.ovs === undefined) ctx.addIssue({ code: 'custom', message: 'trunk needs ovs' });
  if ((n.vlan !== undefined || n.trunk !== undefined) && n.hook !== undefined) {
    ctx.addIssue({ code: 'custom', message: 'a hook network sets its own VLANs' });
  }
  if (n.ovsdb !== undefined && n.ovs === undefined) ctx.addIssue({ code: 'custom', message: 'ovsdb needs ovs' });
  if (n.mac_lock && n.bridge === undefined) {
    ctx.addIssue({ code: 'custom', message: 'mac_lock needs a Linux bridge network (locked bridge ports)' });
  }
});

const RuleSchema = z.strictObject({
  name: RuleName,
  users: z.array(Principal).optional(),
  groups: z.array(Principal).optional(),
  bridges: z.array(BridgeName).default([]),
  macvtap: z.array(MacvtapGrant).default([]),
  networks: z.array(NetworkName).default([]),
  persistent: z.boolean().default(false),
  name_pattern: NamePattern.default(DEFAULT_NAME_PATTERN),
  max_queues: z.number().int().min(1).max(MAX_QUEUES).default(1),
  vhost: z.boolean().default(false),
  mac_prefix: z.string().superRefine((s, ctx) => {
    const why = checkMacPrefix(s);
    if (why) ctx.addIssue({ code: 'custom', message: `mac_prefix \`${s}' ${why}` });
    else if (parseInt(s.slice(0, 2), 16) & 1) {
      ctx.addIssue({ code: 'custom', message: `mac_prefix \`${s}' is multicast` });
    } else if (s === '00:00:00:00:00:00') {
      const message = `mac_prefix \`${s}' allows only the all-zero MAC, which no device may have`;
      ctx.addIssue({ code: 'custom', message });
    }
  }).default(DEFAULT_MAC_PREFIX),
  max_devices: z.number().int().min(0).optional(),
  /** Every tap it grants on a Linux bridge is a locked port that forwards only its lease's guest MAC. */
  mac_lock: z.boolean().default(false),
});

const DenySchema = z.strictObject({
  name: RuleName.optional(),
  users: z.array(Principal).optional(),
  groups: z.array(Principal).optional(),
  bridges: z.array(BridgeName).min(1).optional(),
  parents: z.array(IfName).min(1).optional(),
  networks: z.array(NetworkName).min(1).optional(),
});

const PolicySchema = z.strictObject({
  version: z.literal(1).optional(),
  network: z.record(NetworkName, NetworkSchema).default({}),
  rule: z.array(RuleSchema).default([]),
  deny: z.array(DenySchema).default([]),
});

/** A named network: what an admin calls it, and how a tap joins it. */
export interface Network {
  name: string;
  kind: 'bridge' | 'ovs' | 'hook';
  /** The Linux bridge or OVS bridge, or the hook's path. */
  target: string;
  vlan: number | null;
  trunk: readonly number[] | null;
  ovsdb: string | null;
  hookTimeoutMs: number;
  macLock: boolean;
}

/** Who a rule applies to, resolved to numbers. `everyone` is the `"*"` user. */
export interface Selector {
  everyone: boolean;
  uids: ReadonlySet<number>;
  gids: ReadonlySet<number>;
  /**
   * Deny rules only: users who are members of `gids` by the account database (read at load). A
   * process can drop a group it holds (setgroups in a user namespace); it cannot leave the database.
   */
  members: ReadonlySet<number>;
}

export interface AllowRule {
  kind: 'allow';
  name: string;
  /** Line of its [[rule]] header in the file. */
  /** The file (main or fragment) and line it is written at. */
  file: string;
  line: number;
  who: Selector;
  bridges: readonly string[];
  macvtap: ReadonlyArray<{ parent: string; modes: readonly MacvtapMode[] }>;
  networks: readonly string[];
  persistent: boolean;
  namePattern: string;
  maxQueues: number;
  vhost: boolean;
  macPrefix: string;
  /** Live devices per user under this rule (DEFAULT_MAX_DEVICES when the rule names none). */
  maxDevices: number;
  /** The rule named no max_devices. */
  maxDevicesDefault: boolean;
  /** Its taps are locked ports (a network's mac_lock locks too: either is enough). */
  macLock: boolean;
}

export interface DenyRule {
  kind: 'deny';
  name: string;
  file: string;
  line: number;
  who: Selector;
  /**
   * Bridges this deny applies to (`"*"`: every Linux bridge); null means every bridge (unless `parents`
   * narrows it to macvtaps).
   */
  bridges: readonly string[] | null;
  /** Macvtap parents this deny applies to; null means every parent (unless `bridges` narrows it to taps). */
  parents: readonly string[] | null;
  /** Named networks this deny applies to. */
  networks: readonly string[] | null;
}

export interface Policy {
  path: string;
  /** The files it was read from: the main file, then its fragments in order. */
  files: readonly string[];
  sha256: string;
  allow: readonly AllowRule[];
  deny: readonly DenyRule[];
  networks: ReadonlyMap<string, Network>;
  /** Problems that do not stop the policy from loading (e.g. a user that does not exist here). */
  warnings: readonly string[];
}

export interface Caller {
  uid: number;
  gid: number;
  /** Supplementary groups from the kernel (SO_PEERGROUPS). */
  groups: readonly number[];
}

/** What a create request asks for, as the policy sees it. */
export interface Ask {
  kind: 'tap' | 'macvtap';
  /** The bridge of a tap, the parent of a macvtap, the name of a network. */
  parent: string;
  /** True when `parent` names a network. */
  network?: boolean;
  mode: MacvtapMode | null;
  queues: number;
  vhost: boolean;
  mac: string | null;
  /** A name the caller picked, or null for a broker-chosen one. */
  name: string | null;
  persistent: boolean;
}

export type Decision =
  | { allow: true; rule: AllowRule }
  | { allow: false; code: ErrorCode; rule: string | null; message: string; hint: string };

/**
 * The policy the broker runs on: only from a file no user but root could have changed (nor any
 * directory above it), then as loadPolicy.
 */
export function loadTrustedPolicy(path: string): Policy {
  const bad = untrustedPolicyFile(path);
  if (bad) {
    throw new TapbrokerError(
      'TB_E_POLICY_INVALID', `${bad.file}: ${bad.why}: a user other than root could change the policy`,
    );
  }
  return loadPolicy(path);
}

/** The first of the policy's files (its fragment directory included) a user other than root could change. */
export function untrustedPolicyFile(path: string): { file: string; why: string } | null {
  const dir = fragmentDir(path);
  for (const file of [path, ...(fs.existsSync(dir) ? [dir] : []), ...policyFiles(path).slice(1)]) {
    const why = notRootsAlone(file);
    if (why) return { file, why };
  }
  return null;
}

/**
 * The files a policy is made of: `path`, then every `*.toml` in the directory beside it named after it
 * (`policy.d` for `policy.toml`), in lexical (byte) order. Other names there (an editor's backup, a
 * package manager's `.dpkg-old`) are not read.
 */
export function policyFiles(path: string): string[] {
  const dir = fragmentDir(path);
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [path];
    throw new TapbrokerError('TB_E_POLICY_INVALID', `cannot read ${dir}: ${(err as Error).message}`);
  }
  const toml = names.filter((n) => n.endsWith('.toml') && !n.startsWith('.'))
    .sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  return [path, ...toml.map((n) => `${dir}/${n}`)];
}

/** `policy.toml` → `policy.d`, beside it. */
export function fragmentDir(path: string): string {
  return `${path.endsWith('.toml') ? path.slice(0, -5) : path}.d`;
}

/** Reads, parses, validates and resolves a policy and its fragments; throws TB_E_POLICY_INVALID with every error. */
export function loadPolicy(path: string): Policy {
  const sources = policyFiles(path).map((file) => {
    try {
      return { path: file, text: fs.readFileSync(file, 'utf8') };
    } catch (err) {
      throw new TapbrokerError('TB_E_POLICY_INVALID', `${file}: cannot read the policy: ${(err as Error).message}`);
    }
  });
  return parseSources(sources);
}

export function parsePolicy(text: string, path = '<policy>'): Policy {
  return parseSources([{ path, text }]);
}

interface Doc {
  path: string;
  line: (where: ReadonlyArray<PropertyKey>) => number;
  /** `FILE:LINE` of a key, for messages. */
  at: (where: ReadonlyArray<PropertyKey>) => string;
  data: z.infer<typeof PolicySchema>;
}

/** One file's TOML, checked against the schema; errors as `FILE:LINE: …`. */
function parseDoc(path: string, text: string, errors: string[]): Doc | null {
  let doc: unknown;
  try {
    doc = parseToml(text);
  } catch (err) {
    const where = err instanceof TomlError ? `${path}:${err.line}:${err.column}` : path;
    errors.push(`${where}: ${(err as Error).message.split('\n')[0]}`);
    return null;
  }
  const lineOf = lineIndex(text);
  const parsed = PolicySchema.safeParse(doc);
  if (!parsed.success) {
    errors.push(...parsed.error.issues.flatMap((i) => {
      const where = i.path.join('.') || 'top level';
      if (i.code !== 'unrecognized_keys') return [`${path}:${lineOf(i.path)}: ${where}: ${i.message}`];
      return i.keys.map((k) => {
        const guess = didYouMean(k, knownKeys(i.path));
        return `${path}:${lineOf([...i.path, k])}: ${where}: unknown key \`${k}'`
          + (guess ? ` (did you mean \`${guess}'?)` : '');
      });
    }));
    return null;
  }
  return { path, line: lineOf, at: (where) => `${path}:${lineOf(where)}`, data: parsed.data };
}

/**
 * The policy of several files read as one (the main file first, then its fragments): rules, deny rules
 * and networks from all of them, names unique across them, every message naming its file and line.
 */
export function parseSources(sources: ReadonlyArray<{ path: string; text: string }>): Policy {
  const errors: string[] = [];
  const docs = sources.map((src) => parseDoc(src.path, src.text, errors));
  if (errors.length > 0) throw new TapbrokerError('TB_E_POLICY_INVALID', errors.join('\n'));
  const warnings: string[] = [];
  // Networks first: a rule in one file may name a network defined in another.
  const networks = new Map<string, Network>();
  const definedAt = new Map<string, string>();
  for (const doc of docs as Doc[]) {
    for (const [name, n] of Object.entries(doc.data.network)) {
      const at = doc.at(['network', name]);
      if (definedAt.has(name)) {
        errors.push(`${at}: network \`${name}' is already defined at ${definedAt.get(name)}`);
        continue;
      }
      definedAt.set(name, at);
      const kind = n.bridge !== undefined ? 'bridge' : n.ovs !== undefined ? 'ovs' : 'hook';
      const target = (n.bridge ?? n.ovs ?? n.hook)!;
      if (kind === 'hook') {
        const why = hookUnsafe(target);
        if (why) errors.push(`${doc.at(['network', name, 'hook'])}: network \`${name}': hook ${target} ${why}`);
      }
      networks.set(name, {
        name, kind, target, vlan: n.vlan ?? null, trunk: n.trunk ?? null, ovsdb: n.ovsdb ?? null,
        hookTimeoutMs: (n.hook_timeout ?? 10) * 1000, macLock: n.mac_lock ?? false,
      });
    }
  }
  const named = new Map<string, string>();
  const unique = (name: string, at: string, what: string) => {
    if (named.has(name)) errors.push(`${at}: ${what}: duplicate rule name \`${name}' (also at ${named.get(name)})`);
    else named.set(name, at);
  };
  const allow = (docs as Doc[]).flatMap((doc) => doc.data.rule.map((r, i): AllowRule => {
    const at = (...key: string[]) => doc.at(['rule', i, ...key]);
    unique(r.name, at(), `rule.${i}.name`);
    const who = resolveSelector(r.users, r.groups, `rule \`${r.name}'`, warnings, errors, at());
    if (r.bridges.length === 0 && r.macvtap.length === 0 && r.networks.length === 0) {
      errors.push(`${at()}: rule \`${r.name}' allows no bridges, no macvtap parents and no networks`);
    }
    if (r.bridges.includes(ANY_BRIDGE) && r.bridges.length > 1) {
      warnings.push(`${at('bridges')}: rule \`${r.name}' lists "*" and other bridges: `
        + '"*" already grants every Linux bridge');
    }
    for (const n of r.networks) {
      if (!networks.has(n)) {
        errors.push(`${at('networks')}: rule \`${r.name}' names network \`${n}', which is not defined`);
      }
    }
    return {
      kind: 'allow', name: r.name, file: doc.path, line: doc.line(['rule', i]), who,
      bridges: r.bridges, macvtap: r.macvtap, networks: r.networks, persistent: r.persistent,
      namePattern: r.name_pattern, maxQueues: r.max_queues, vhost: r.vhost, macPrefix: r.mac_prefix,
      maxDevices: r.max_devices ?? DEFAULT_MAX_DEVICES, maxDevicesDefault: r.max_devices === undefined,
      macLock: r.mac_lock,
    };
  }));
  let denies = 0;
  const deny = (docs as Doc[]).flatMap((doc) => doc.data.deny.map((d, i): DenyRule => {
    const at = doc.at(['deny', i]);
    // Unnamed deny rules are numbered across all files, in order.
    const name = d.name ?? `deny.${denies}`;
    denies++;
    unique(name, at, `deny.${i}.name`);
    return {
      kind: 'deny', name, file: doc.path, line: doc.line(['deny', i]),
      who: resolveSelector(d.users, d.groups, `deny rule \`${name}'`, warnings, errors, at, true),
      bridges: d.bridges ?? null, parents: d.parents ?? null, networks: d.networks ?? null,
    };
  }));
  const path = sources[0]?.path ?? '<policy>';
  errors.push(...patternOverlaps(allow, path));
  if (allow.length === 0) warnings.push(`${path}:1: the policy allows nothing: every request will be denied`);
  if (errors.length > 0) throw new TapbrokerError('TB_E_POLICY_INVALID', errors.join('\n'));
  return { path, files: sources.map((s) => s.path), sha256: digest(sources), allow, deny, warnings, networks };
}

/**
 * The policy's digest, in every audit record: of the file's text when it is alone (as before fragments);
 * else of each file's path and the digest of its text, in order, so a renamed fragment changes it too.
 */
function digest(sources: ReadonlyArray<{ path: string; text: string }>): string {
  const sha = (t: string) => createHash('sha256').update(t).digest('hex');
  if (sources.length === 1) return sha(sources[0]!.text);
  return sha(sources.map((s) => `${s.path}\0${sha(s.text)}\n`).join(''));
}

/**
 * Name patterns under which two possible users (any uid, any user name, not only today's accounts)
 * could be given one device name, as errors. Each pattern is LITERAL{uid}REST or LITERAL{user}:
 * - `{uid}` must be followed by a character that is not a digit, or end the pattern (`tb{uid}*` lets
 *   uid 1 make `tb10-vm0`, uid 10's name);
 * - `{user}` must end the pattern, without `*` (user names may contain every character `*` stands for);
 * - the literal parts before the placeholder, the broker's own `tb` among them (its names are
 *   `tb<uid>-…`), must be prefix-free unless the whole patterns are equal: checked after one sort.
 */
function patternOverlaps(rules: readonly AllowRule[], path: string): string[] {
  const errors: string[] = [];
  const shapes = new Map<string, { pattern: string; rule: string; line: number }>();
  shapes.set('tb', { pattern: DEFAULT_NAME_PATTERN, rule: 'the names the broker picks', line: 0 });
  for (const r of rules) {
    const p = r.namePattern;
    const at = `${path}:${r.line}: rule \`${r.name}' name_pattern ${p}`;
    const holes = p.match(/\{uid\}|\{user\}/g) ?? [];
    if (holes.length !== 1) {
      errors.push(`${at}: must contain exactly one of {uid} or {user}`);
      continue;
    }
    const i = p.indexOf(holes[0]!);
    const prefix = p.slice(0, i);
    const rest = p.slice(i + holes[0]!.length);
    if (prefix.includes('*')) errors.push(`${at}: * may only follow the placeholder`);
    else if (holes[0] === '{uid}' && /^[0-9*]/.test(rest)) {
      errors.push(
        `${at}: {uid} must be followed by a character that is not a digit (e.g. tb{uid}-*), `
          + 'or two uids could share a name',
      );
    } else if (holes[0] === '{user}' && rest !== '') {
      errors.push(`${at}: {user} must end the pattern, without * (user names may contain - . _ and digits)`);
    } else {
      const seen = shapes.get(prefix);
      if (seen && seen.pattern !== p) {
        errors.push(
          `${at}: overlaps `
            + `${seen.rule === 'the names the broker picks' ? seen.rule : `rule \`${seen.rule}' (${seen.pattern})`}`,
        );
      } else shapes.set(prefix, { pattern: p, rule: r.name, line: r.line });
    }
  }
  // Prefix-free: in sorted order a prefix sits right before the strings it begins.
  const sorted = [...shapes.keys()].sort();
  for (let k = 1; k < sorted.length; k++) {
    const a = shapes.get(sorted[k - 1]!)!;
    const b = shapes.get(sorted[k]!)!;
    if (sorted[k]!.startsWith(sorted[k - 1]!)) {
      const who = (x: typeof a) => (x.line === 0 ? x.rule : `rule \`${x.rule}' (${x.pattern})`);
      errors.push(`${path}:${b.line || a.line}: name_pattern ${b.pattern} of ${who(b)} overlaps ${who(a)}: `
        + 'the text before {uid} or {user} must not begin another pattern\'s');
    }
  }
  return errors;
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

/** The line of `[[table]]` number `index`, or of `key` inside it; 1 when it cannot be told. */
/**
 * Where each table, array-table entry and key starts in a policy's text, found in one pass (a lookup per
 * rule then costs nothing: a policy of 16,000 rules loads in linear time). Paths as zod reports them:
 * ['rule', 3, 'bridges'], ['network', 'lan', 'vlan'], ['version'].
 */
export function lineIndex(text: string): (where: ReadonlyArray<PropertyKey>) => number {
  const at = new Map<string, number>();
  const count = new Map<string, number>();
  let section: string[] = [];
  const put = (k: string, line: number) => {
    if (!at.has(k)) at.set(k, line);
  };
  text.split('\n').forEach((raw, n) => {
    const line = raw.trim();
    const array = /^\[\[\s*([A-Za-z0-9_-]+)\s*\]\]/.exec(line);
    const table = array ? null : /^\[\s*([A-Za-z0-9_-]+)\s*\.\s*("(?:[^"\\]|\\.)*"|[A-Za-z0-9_-]+)\s*\]/.exec(line);
    if (array) {
      const i = count.get(array[1]!) ?? 0;
      count.set(array[1]!, i + 1);
      section = [array[1]!, String(i)];
      put(section.join('\0'), n + 1);
    } else if (table) {
      const name = table[2]!.startsWith('"') ? unquote(table[2]!) : table[2]!;
      section = [table[1]!, name];
      put(section.join('\0'), n + 1);
      put(table[1]!, n + 1);
    } else {
      const key = /^("(?:[^"\\]|\\.)*"|[A-Za-z0-9_-]+)\s*=/.exec(line);
      if (key) put([...section, key[1]!.startsWith('"') ? unquote(key[1]!) : key[1]!].join('\0'), n + 1);
    }
  });
  return (where) => {
    for (let k = where.length; k > 0; k--) {
      const hit = at.get(where.slice(0, k).map(String).join('\0'));
      if (hit !== undefined) return hit;
    }
    return 1;
  };
}

/** A TOML basic string as JSON reads it; TOML escapes JSON has not (\\U, literal tabs) keep the raw text. */
function unquote(s: string): string {
  try {
    return JSON.parse(s) as string;
  } catch {
    return s.slice(1, -1);
  }
}

/** The known key closest to `key` (a typo's likely intent), or null when none is close. */
export function didYouMean(key: string, known: readonly string[]): string | null {
  let best: string | null = null;
  let bestD = Math.max(2, Math.floor(key.length / 3)) + 1;
  for (const k of known) {
    const d = editDistance(key.toLowerCase(), k.toLowerCase());
    if (d < bestD) [best, bestD] = [k, d];
  }
  return best;
}

function editDistance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++) {
      cur[j] = Math.min(prev[j]! + 1, cur[j - 1]! + 1, prev[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    prev = cur;
  }
  return prev[b.length]!;
}

/** Every key of the policy, by table, from the schemas (tapbroker-policy(5) is checked against it). */
export const POLICY_KEYS = {
  top: Object.keys(PolicySchema.shape), rule: Object.keys(RuleSchema.shape), deny: Object.keys(DenySchema.shape),
  network: Object.keys(NetworkSchema.shape), macvtap: Object.keys(MacvtapGrant.shape),
} as const;

/** The keys a table at `path` may hold. */
function knownKeys(path: ReadonlyArray<PropertyKey>): readonly string[] {
  const [table] = path;
  if (path.length === 0) return POLICY_KEYS.top;
  if (table === 'rule') return path[2] === 'macvtap' ? POLICY_KEYS.macvtap : POLICY_KEYS.rule;
  if (table === 'deny') return POLICY_KEYS.deny;
  if (table === 'network') return POLICY_KEYS.network;
  return [];
}

function resolveSelector(
  users: ReadonlyArray<string | number> | undefined, groups: ReadonlyArray<string | number> | undefined,
  what: string, warnings: string[], errors: string[], path: string, withMembers = false,
): Selector {
  if ((users?.length ?? 0) + (groups?.length ?? 0) === 0) {
    errors.push(`${path}: ${what} names no users and no groups (use users = ["*"] to mean everyone)`);
  }
  let everyone = false;
  const uids = new Set<number>();
  const gids = new Set<number>();
  for (const u of users ?? []) {
    if (u === '*') everyone = true;
    else if (typeof u === 'number') uids.add(u);
    else {
      const pw = getpwnam(u);
      if (pw) uids.add(pw.uid);
      else warnings.push(`${path}: ${what}: no user \`${u}' on this host; it matches nobody`);
    }
  }
  for (const g of groups ?? []) {
    if (typeof g === 'number') gids.add(g);
    else {
      const gid = getgrnam(g);
      if (gid !== null) gids.add(gid);
      else warnings.push(`${path}: ${what}: no group \`${g}' on this host; it matches nobody`);
    }
  }
  const members = new Set<number>();
  if (withMembers) for (const set of accountMembers(gids).values()) for (const u of set) members.add(u);
  return { everyone, uids, gids, members };
}

/** An allow rule's selector: the caller's uid, or a group the calling process holds (kernel's list). */
export function matches(who: Selector, caller: Caller): boolean {
  if (who.everyone || who.uids.has(caller.uid) || who.gids.has(caller.gid)) return true;
  return caller.groups.some((g) => who.gids.has(g));
}

/** A deny rule's selector: as for allow rules, or membership of a group by the account database. */
export function matchesDeny(who: Selector, caller: Caller): boolean {
  return matches(who, caller) || who.members.has(caller.uid);
}

export function macInPrefix(mac: string, prefix: string): boolean {
  return mac.startsWith(prefix) && (mac.length === prefix.length || mac[prefix.length] === ':');
}

/**
 * What a request reaches once names are resolved: a network is its Linux bridge, Open vSwitch bridge
 * or hook (with its VLAN). Deny rules are decided on this, so no second name escapes a deny.
 */
export interface Target {
  kind: 'bridge' | 'ovs' | 'hook' | 'macvtap' | 'unknown';
  /** The bridge, the macvtap parent, the hook's path; for an unknown network its name. */
  name: string;
  vlan: number | null;
  /** The network the request named, or null. */
  network: string | null;
}

export function resolveTarget(policy: Policy, ask: Pick<Ask, 'kind' | 'parent' | 'network'>): Target {
  if (!ask.network) {
    return { kind: ask.kind === 'tap' ? 'bridge' : 'macvtap', name: ask.parent, vlan: null, network: null };
  }
  return networkTarget(policy.networks.get(ask.parent)) ?? {
    kind: 'unknown',
    name: ask.parent,
    vlan: null,
    network: ask.parent,
  };
}

function networkTarget(n: Network | undefined): Target | null {
  return n ? { kind: n.kind, name: n.target, vlan: n.vlan, network: n.name } : null;
}

const sameSegment = (a: Target, b: Target) => a.kind === b.kind && a.name === b.name && a.vlan === b.vlan;

/**
 * Does a deny rule cover this target? With no scope it covers everything; `bridges` covers every way
 * onto those bridges (Linux or Open vSwitch, directly or through a network), and `"*"` every way onto
 * any Linux bridge; `parents` macvtaps on those parents; `networks` those networks and anything else
 * reaching the same bridge and VLAN.
 */
export function denyCovers(policy: Policy, d: DenyRule, t: Target): boolean {
  if (d.bridges === null && d.parents === null && d.networks === null) return true;
  if (t.kind === 'bridge' && d.bridges?.includes(ANY_BRIDGE)) return true;
  if ((t.kind === 'bridge' || t.kind === 'ovs') && d.bridges?.includes(t.name)) return true;
  if (t.kind === 'macvtap' && d.parents?.includes(t.name)) return true;
  if (t.network !== null && d.networks?.includes(t.network)) return true;
  return (d.networks ?? []).some((n) => {
    const denied = networkTarget(policy.networks.get(n));
    return denied !== null && denied.kind !== 'hook' && sameSegment(denied, t);
  });
}

/** Does an allow rule's `bridges` grant a tap on this Linux bridge, by name or by `"*"`? */
export function grantsBridge(rule: AllowRule, bridge: string): boolean {
  return rule.bridges.includes(bridge) || rule.bridges.includes(ANY_BRIDGE);
}

/** A `bridges` list in words: `"*"` is `any Linux bridge`. */
export function bridgeList(bridges: readonly string[], separator = ', '): string {
  return bridges.map((b) => (b === ANY_BRIDGE ? 'any Linux bridge' : b)).join(separator);
}

function grantsTarget(rule: AllowRule, ask: Ask): boolean {
  if (ask.network) return rule.networks.includes(ask.parent);
  return ask.kind === 'tap' ? grantsBridge(rule, ask.parent) : rule.macvtap.some((m) => m.parent === ask.parent);
}

function targets(rule: AllowRule, ask: Ask): string[] {
  if (ask.network) return [...rule.networks];
  return ask.kind === 'tap'
    ? rule.bridges.map((b) => bridgeList([b]))
    : rule.macvtap.map((m) => `${m.parent} (${m.modes.join(', ')})`);
}

function targetNoun(ask: Ask): string {
  return ask.network ? 'networks' : ask.kind === 'tap' ? 'bridges' : 'macvtap parents';
}

/** Does `name` match `pattern` for this caller? */
export function nameMatches(name: string, pattern: string, uid: number, user: string | null): boolean {
  if (pattern.includes('{user}') && user === null) return false;
  const re = pattern
    .split(/(\*|\{uid\}|\{user\})/)
    .map((part) =>
      part === '*'
        ? '[A-Za-z0-9_.-]+'
        : part === '{uid}'
          ? String(uid)
          : part === '{user}'
            ? escapeRe(user!)
            : escapeRe(part),
    )
    .join('');
  return new RegExp(`^${re}$`).test(name);
}

function escapeRe(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/** What a deny rule covers, in words: `bridges br0; networks lab`, `every Linux bridge` or `everything`. */
export function denyScope(d: DenyRule): string {
  const bridges = d.bridges?.includes(ANY_BRIDGE) ? 'every Linux bridge'
    : d.bridges ? `bridges ${d.bridges.join(', ')}` : '';
  const parts = [
    bridges, d.parents ? `macvtap parents ${d.parents.join(', ')}` : '',
    d.networks ? `networks ${d.networks.join(', ')}` : '',
  ].filter(Boolean);
  return parts.length ? parts.join('; ') : 'everything';
}

/**
 * The decision for one create request: the one function the broker and the policy tools use.
 * `live(rule)` is the caller's count of devices charged to that rule, looked up, not computed: a pure
 * function of its inputs.
 */
export function decide(
  policy: Policy,
  caller: Caller & { user?: string | null },
  ask: Ask,
  live: (rule: string) => number,
): Decision {
  const what = ask.network
    ? `network \`${ask.parent}'`
    : ask.kind === 'tap'
      ? `bridge \`${ask.parent}'`
      : `macvtap parent \`${ask.parent}'`;
  const target = resolveTarget(policy, ask);
  const deny = policy.deny.find((d) => matchesDeny(d.who, caller) && denyCovers(policy, d, target));
  if (deny) {
    const scope = denyScope(deny);
    // Nothing the caller can pick instead: every target, or every Linux bridge for a tap on one.
    const whole = scope === 'everything' || (target.kind === 'bridge' && !ask.network
      && scope.startsWith('every Linux bridge'));
    const onto = target.network !== null && target.kind !== 'unknown'
      ? ` (network \`${target.network}' is ${target.kind} ${target.name})`
      : '';
    return {
      allow: false, code: 'TB_E_POLICY_DENIED', rule: deny.name, message: `denied by rule \`${deny.name}'${onto}`,
      hint: `the deny rule covers ${scope}${whole
        ? '; only an administrator can change it'
        : `; another ${targetNoun(ask).replace(/s$/, '')} may be allowed`}`,
    };
  }
  const mine = policy.allow.filter((r) => matches(r.who, caller));
  if (mine.length === 0) {
    return {
      allow: false, code: 'TB_E_POLICY_DENIED', rule: null, message: 'no rule matched',
      hint: `no rule names uid ${caller.uid} or any of its groups; ask an administrator to add one`,
    };
  }
  const forTarget = mine.filter((r) => grantsTarget(r, ask));
  if (forTarget.length === 0) {
    const allowed = [...new Set(mine.flatMap((r) => targets(r, ask)))];
    return {
      allow: false, code: 'TB_E_POLICY_DENIED', rule: null, message: `no rule matched ${what}`,
      hint: allowed.length
        ? `your rules allow ${targetNoun(ask)}: ${allowed.join(', ')}`
        : `your rules allow no ${targetNoun(ask)}`,
    };
  }
  let first: Decision | null = null;
  for (const rule of forTarget) {
    const refusal = refuse(rule, caller, ask, live(rule.name));
    if (!refusal) return { allow: true, rule };
    first ??= refusal;
  }
  return first!;
}

function refuse(rule: AllowRule, caller: Caller & { user?: string | null }, ask: Ask, live: number): Decision | null {
  const no = (code: ErrorCode, message: string, hint: string): Decision => ({
    allow: false,
    code,
    rule: rule.name,
    message,
    hint,
  });
  if (ask.kind === 'macvtap' && !ask.network) {
    const modes = rule.macvtap.find((m) => m.parent === ask.parent)!.modes;
    if (!modes.includes(ask.mode!)) {
      return no(
        'TB_E_POLICY_DENIED',
        `rule \`${rule.name}' allows mode${modes.length > 1 ? 's' : ''} ${modes.join(', ')} on \`${ask.parent}', `
          + `not ${ask.mode}`,
        `ask for mode ${modes[0]}`,
      );
    }
  }
  if (ask.persistent && !rule.persistent) {
    return no(
      'TB_E_POLICY_DENIED',
      `rule \`${rule.name}' does not allow persistent devices`,
      'use tapbroker run, which needs no persistent device',
    );
  }
  if (ask.name !== null && !nameMatches(ask.name, rule.namePattern, caller.uid, caller.user ?? null)) {
    const example = rule.namePattern
      .replace('{uid}', String(caller.uid))
      .replace('{user}', caller.user ?? 'USER')
      .replace('*', 'vm0');
    return no(
      'TB_E_INVALID_NAME',
      `name \`${ask.name}' does not match rule \`${rule.name}' name_pattern ${rule.namePattern}`,
      `pick a name like \`${example}', or leave it out and the broker picks one`,
    );
  }
  if (ask.queues > rule.maxQueues) {
    return no(
      'TB_E_POLICY_DENIED',
      `rule \`${rule.name}' allows at most ${rule.maxQueues} queue${rule.maxQueues > 1 ? 's' : ''}, not ${ask.queues}`,
      `ask for ${rule.maxQueues} queue${rule.maxQueues > 1 ? 's' : ''} or fewer`,
    );
  }
  if (ask.vhost && !rule.vhost) {
    return no('TB_E_POLICY_DENIED', `rule \`${rule.name}' does not allow vhost-net`, 'ask with vhost=off');
  }
  if (ask.mac !== null && !macInPrefix(ask.mac, rule.macPrefix)) {
    return no(
      'TB_E_INVALID_MAC',
      `mac ${ask.mac} is outside rule \`${rule.name}' prefix ${rule.macPrefix}`,
      `use a MAC starting with ${rule.macPrefix}, or leave it out and the broker picks one`,
    );
  }
  if (live >= rule.maxDevices) {
    return no(
      'TB_E_QUOTA_EXCEEDED',
      `rule \`${rule.name}' allows ${rule.maxDevices} live device${rule.maxDevices === 1 ? '' : 's'} per user `
        + `and you hold ${live}`,
      'stop a VM that holds one, or free a persistent device with tapbroker release NAME (tapbroker list shows '
        + 'them), then ask again',
    );
  }
  return null;
}

