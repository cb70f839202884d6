// Loading the policy: root's TOML files (the main file and its fragments), trusted only when root alone
// could have written them, validated by zod, and resolved once into the typed, immutable rules that
// decide.ts decides on. Runs at start and on reload, never on a request's input.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { parse as parseToml, TomlError } from 'smol-toml';
import { z } from 'zod';
import {
  MACVTAP_MODES, MAX_QUEUES, TapbrokerError, checkIfName, checkMacPrefix, checkNetworkName,
} from '@tapbroker/protocol/core';
import { accountMembers, getgrnam, getpwnam } from './libc.js';
import { OVSDB_TARGET } from './ovs.js';
import {
  ANY_BRIDGE, type AllowRule, type DenyRule, type Network, type Policy, type Selector,
} from './decide.js';
import { hookUnsafe, notRootsAlone } from './paths.js';
import { didYouMean, lineIndex } from './policy-text.js';


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
