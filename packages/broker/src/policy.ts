// Loading the policy: root's TOML files (the main file and its fragments), trusted only when root alone
// could have written them, checked against the shape generated from the zod schema in policy-schema.ts
// (with every error, each at its file and line), and resolved once into the typed, immutable rules that
// decide.ts decides on. Runs at start and on reload, never on a request's input.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { basename } from 'node:path';
import { parse as parseToml, TomlError } from 'smol-toml';
import {
  TapbrokerError, checkIfName, checkMacPrefix, checkNetworkName, validate, type Checks, type Shape,
} from '@tapbroker/protocol/core';
import { accountMembers, getgrnam, getpwnam } from './libc.js';
import { OVSDB_TARGET, ovsdbTarget } from './ovs.js';
import type { LeaseRecord } from './lease-schema.js';
import {
  ANY_BRIDGE, type AllowRule, type DenyRule, type Network, type Policy, type Selector,
} from './decide.js';
import { hookUnsafe } from './paths.js';
import { firstUntrusted, openedPolicy, readSources } from './policy-files.js';
import type { PolicyDoc } from './policy-schema.js';
import { POLICY_SHAPE } from './policy-shape.js';
import { didYouMean, lineIndex, oneLine } from './policy-text.js';

export const DEFAULT_MAC_PREFIX = '52:54:00';
/** Names callers may pick: `{uid}` and `{user}` are substituted, `*` stands for one or more of [A-Za-z0-9_.-]. */
export const DEFAULT_NAME_PATTERN = 'tb{uid}-*';
/** Devices per user under a rule that names no max_devices: finite, so no rule leaves it unbounded. */
export const DEFAULT_MAX_DEVICES = 64;

/**
 * The refinements the policy's format makes in code, by name: the generated shape names them, and
 * policy-schema.ts (the zod source) runs the same functions. Each gives why a value is refused, or null.
 */
export const POLICY_CHECKS = {
  'ifname': (s: string) => {
    const why = checkIfName(s);
    return why ? `interface name \`${s}' ${why}` : null;
  },
  'policy-name': (s: string) => checkNetworkName(s),
  'bridge-name': (s: string) => {
    const why = s === ANY_BRIDGE ? null : checkIfName(s);
    if (!why) return null;
    const glob = s.includes('*') ? ': "*" stands alone for every Linux bridge, it is not a pattern' : '';
    return `interface name \`${s}' ${why}${glob}`;
  },
  'name-pattern': (s: string) => {
    if (!/^[A-Za-z0-9_.*{}-]+$/.test(s) || /\{(?!uid\}|user\})/.test(s)) {
      return `name_pattern \`${s}' may use A-Z a-z 0-9 _ . - *, {uid} and {user} only`;
    }
    if (!s.includes('{uid}') && !s.includes('{user}')) {
      return `name_pattern \`${s}' must contain {uid} or {user}, so users cannot take each other's names`;
    }
    return null;
  },
  'mac-prefix': (s: string) => {
    const why = checkMacPrefix(s);
    if (why) return `mac_prefix \`${s}' ${why}`;
    if (parseInt(s.slice(0, 2), 16) & 1) return `mac_prefix \`${s}' is multicast`;
    if (s === '00:00:00:00:00:00') return `mac_prefix \`${s}' allows only the all-zero MAC, which no device may have`;
    return null;
  },
  'hook-path': (s: string) => (/^\/[^\0]*$/.test(s) ? null : 'must be an absolute path'),
  'ovsdb': (s: string) => (OVSDB_TARGET.test(s) ? null : 'must be unix:/path (no spaces or commas)'),
  'network': (n: PolicyDoc['network'][string]) => {
    const why: string[] = [];
    const kinds = [n.bridge, n.ovs, n.hook].filter((x) => x !== undefined).length;
    if (kinds !== 1) why.push('a network needs exactly one of bridge, ovs or hook');
    if (n.vlan !== undefined && n.trunk !== undefined) why.push('vlan and trunk exclude each other');
    if (n.trunk !== undefined && n.ovs === undefined) why.push('trunk needs ovs');
    if ((n.vlan !== undefined || n.trunk !== undefined) && n.hook !== undefined) {
      why.push('a hook network sets its own VLANs');
    }
    if (n.ovsdb !== undefined && n.ovs === undefined) why.push('ovsdb needs ovs');
    if (n.mac_lock && n.bridge === undefined) why.push('mac_lock needs a Linux bridge network (locked bridge ports)');
    return why.length ? why.join('; ') : null;
  },
} as const satisfies Checks;


/**
 * The policy the broker runs on: only from a file no user but root could have changed (nor any
 * directory above it), then as loadPolicy; both from one look at its fragment directory.
 */
export function loadTrustedPolicy(path: string): Policy {
  return openedPolicy(path, (files) => {
    const bad = firstUntrusted(path, files);
    if (bad) {
      // A path that cannot be walked (EACCES where a sandbox hides it, ENOENT) is not read: said as what it is.
      const cause = bad.why.startsWith('cannot be resolved') ? 'the broker cannot read the policy there'
        : 'a user other than root could change the policy';
      throw new TapbrokerError('TB_E_POLICY_INVALID', `${bad.file}: ${bad.why}: ${cause}`);
    }
    return parseSources(readSources(files));
  });
}

/**
 * What `last` had and `next` lacks, as a reload warns of it: its fragments gone, its deny rules gone (by name, with
 * where they were: a count missed one lost while another came).
 */
export function lostSince(last: Policy, next: Policy): string[] {
  // An unnamed deny's name is its place among all (deny.N), which another file's going changes: it is known by its
  // file and what it says instead (a re-test was told a deny still in force had gone).
  const key = (d: DenyRule) => (/^deny\.\d+$/.test(d.name)
    ? `${d.file}\0${JSON.stringify([d.who.written, d.bridges, d.parents, d.networks])}` : d.name);
  const denies = new Set(next.deny.map(key));
  return [
    ...last.files.filter((f) => !next.files.includes(f)).map((f) => `${f}: a fragment of the last policy is gone (if `
      + 'it is being replaced, reload again once it is there)'),
    ...last.deny.filter((d) => !denies.has(key(d))).map((d) => `${d.file}:${d.line}: deny rule \`${d.name}' of the `
      + 'last policy is gone'),
  ];
}

/**
 * Networks `next` places elsewhere than `last` did (another bridge, VLAN, trunk, database or hook), with the live
 * devices of each (`leases`) that are not where it is now: a reload never moves them, and an outside review's
 * operator, who moved a network to isolate it, was told nothing of the VMs left where they were.
 */
export function movedSince(last: Policy, next: Policy, leases: Iterable<LeaseRecord>): string[] {
  // As a lease records it (no trunk: a trunk's change is the network's), and with the same database spelt alike.
  const at = (kind: string, target: string, vlan: number | null, db: string | null) => `${kind} ${target}`
    + (vlan !== null ? `, vlan ${vlan}` : '') + (db !== null ? `, in ${db}` : '');
  const placed = (n: Network) => at(n.kind === 'ovs' ? 'ovs bridge' : n.kind, n.target, n.vlan,
    n.kind === 'ovs' ? ovsdbTarget(n.ovsdb ?? undefined) : null);
  const trunk = (n: Network) => [...n.trunk ?? []].sort((a, b) => a - b).join(',');
  const where = (l: LeaseRecord) => (l.plug && 'hook' in l.plug ? at('hook', l.plug.hook, null, null)
    : at(l.plug ? 'ovs bridge' : 'bridge', l.plug ? l.plug.ovs : l.parent, l.vlan, l.plug ? l.plug.db : null));
  const left = new Map<string, string[]>();
  for (const l of leases) if (l.network !== null) left.set(l.network, [...left.get(l.network) ?? [], where(l)]);
  return [...last.networks.values()].flatMap((was) => {
    const now = next.networks.get(was.name);
    if (!now || (placed(now) === placed(was) && trunk(now) === trunk(was))) return [];
    const stay = (left.get(was.name) ?? []).filter((w) => w !== placed(now) || trunk(now) !== trunk(was));
    if (stay.length === 0) return [];
    const trunks = now.trunk !== null ? `, trunk ${trunk(now)}` : '';
    const before = trunk(now) !== trunk(was) ? `, trunk ${trunk(was) || 'none'}` : '';
    return [`network \`${was.name}' is ${placed(now)}${trunks} now: its ${stay.length} live device(s) stay where they `
      + `were plugged (${[...new Set(stay)].join('; ')}${before}) until they end`];
  });
}

/** A reload record's tail: the load's warnings (16 at most; the log has them all). */
export function warned(p: Policy): string {
  if (p.warnings.length === 0) return '';
  const more = p.warnings.length > 16 ? `; ${p.warnings.length - 16} more in the log` : '';
  return `; warnings: ${p.warnings.slice(0, 16).join('; ')}${more}`;
}

/** Reads, parses, validates and resolves a policy and its fragments; throws TB_E_POLICY_INVALID with every error. */
export function loadPolicy(path: string): Policy {
  return openedPolicy(path, (files) => parseSources(readSources(files)));
}

export function parsePolicy(text: string, path = '<policy>'): Policy {
  return parseSources([{ path, text }]);
}

interface Doc {
  path: string;
  line: (where: ReadonlyArray<PropertyKey>) => number;
  /** `FILE:LINE` of a key, for messages. */
  at: (where: ReadonlyArray<PropertyKey>) => string;
  data: PolicyDoc;
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
  const { value, issues } = validate(POLICY_SHAPE, doc, POLICY_CHECKS);
  if (issues.length > 0) {
    errors.push(...issues.map((i) => {
      const where = i.path.join('.') || 'top level';
      if (i.unknown === undefined) return `${path}:${lineOf(i.path)}: ${where}: ${i.message}`;
      const guess = didYouMean(i.unknown, knownKeys(i.path));
      return `${path}:${lineOf([...i.path, i.unknown])}: ${where}: unknown key \`${i.unknown}'`
        + (guess ? ` (did you mean \`${guess}'?)` : '');
    }));
    return null;
  }
  return { path, line: lineOf, at: (where) => `${path}:${lineOf(where)}`, data: value as PolicyDoc };
}

/**
 * The policy of several files read as one (the main file first, then its fragments): rules, deny rules
 * and networks from all of them, names unique across them, every message naming its file and line.
 */
export function parseSources(sources: ReadonlyArray<{ path: string; text: string }>): Policy {
  const errors: string[] = [];
  const docs = sources.map((src) => parseDoc(src.path, src.text, errors));
  if (errors.length > 0) throw new TapbrokerError('TB_E_POLICY_INVALID', errors.map(oneLine).join('\n'));
  // An empty fragment is what a copy over it reads as until its write is done (cp and > truncate first): said, since
  // a reload then would apply the policy without it (an outside review lost a deny rule that way).
  const warnings = sources.slice(1).filter((src) => src.text.trim() === '').map((src) => `${src.path}: the fragment `
    + 'is empty: it defines nothing (if it was being written, reload again once it is; write fragments beside the '
    + 'directory\'s and rename them into place)');
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
      } else if (n.hook_timeout !== undefined) {
        warnings.push(`${doc.at(['network', name, 'hook_timeout'])}: network \`${name}': hook_timeout is for hook `
          + 'networks only: ignored here');
      }
      networks.set(name, {
        name, kind, target, vlan: n.vlan ?? null, trunk: n.trunk ?? null, ovsdb: n.ovsdb ?? null,
        hookTimeoutMs: (n.hook_timeout ?? 10) * 1000, macLock: n.mac_lock ?? false,
      });
    }
  }
  const named = new Map<string, string>();
  const look = lookups();
  const unique = (name: string, at: string, what: string) => {
    if (named.has(name)) errors.push(`${at}: ${what}: duplicate rule name \`${name}' (also at ${named.get(name)})`);
    else named.set(name, at);
  };
  const allow = (docs as Doc[]).flatMap((doc) => doc.data.rule.map((r, i): AllowRule => {
    const at = (...key: string[]) => doc.at(['rule', i, ...key]);
    unique(r.name, at(), `rule.${i}.name`);
    const who = resolveSelector(r.users, r.groups, `rule \`${r.name}'`, warnings, errors, at(), false, look);
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
      who: resolveSelector(d.users, d.groups, `deny rule \`${name}'`, warnings, errors, at, true, look),
      bridges: d.bridges ?? null, parents: d.parents ?? null, networks: d.networks ?? null,
    };
  }));
  const path = sources[0]?.path ?? '<policy>';
  errors.push(...patternOverlaps(allow));
  if (allow.length === 0) warnings.push(`${path}:1: the policy allows nothing: every request will be denied`);
  if (errors.length > 0) throw new TapbrokerError('TB_E_POLICY_INVALID', errors.map(oneLine).join('\n'));
  return {
    path, files: sources.map((s) => s.path), sha256: digest(sources), allow, deny, networks, membersOf: memberCache(),
    warnings: warnings.map(oneLine),
  };
}

/**
 * Members of a group by the account database, read once per group while the policy and the database stay as
 * they are (as a deny's own groups are, at load): a scan of the account database is not for every request.
 */
function memberCache(): (gid: number) => ReadonlySet<number> {
  const members = new Map<number, ReadonlySet<number>>();
  return (gid: number) => {
    let m = members.get(gid);
    if (!m) members.set(gid, (m = accountMembers(new Set([gid])).get(gid) ?? new Set<number>()));
    return m;
  };
}

/** Where the account database's changes show: its files (a directory service's changes are not seen). */
const ACCOUNT_FILES = ['/etc/group', '/etc/passwd'];

/** The account files as they are now (inode, time, size), to tell later whether they changed. */
export function accountsStamp(): string {
  return ACCOUNT_FILES.map((f) => {
    try {
      const st = fs.statSync(f);
      return `${st.ino}:${st.mtimeMs}:${st.size}`;
    } catch {
      return '-';
    }
  }).join('|');
}

/**
 * `p` with every rule's user and group names looked up again, and the group members its deny rules hold to (and
 * those of groups taps are given to) read again, from the account database: a user added to a deny's group is
 * denied from then on, and a group renamed or made anew is the one its name names, not from the next reload
 * (outside reviews: the policy tools read the database as it is, the broker as it was at load). `changed`: what
 * the names resolve to now where it is not what they did.
 */
export function withAccountsNow(p: Policy): { policy: Policy; changed: string[] } {
  const changed: string[] = [];
  const look = lookups();
  const again = <R extends AllowRule | DenyRule>(r: R): R => {
    const w = r.who.written;
    const who = resolveSelector(w.users, w.groups, '', [], [], '', r.kind === 'deny', look);
    const was = (s: ReadonlySet<number>) => [...s].sort((a, b) => a - b).join(',');
    // A deny's group members too: one added is denied from then on, another policy in force (an outside re-test).
    const sets = [['uids', r.who.uids, who.uids], ['gids', r.who.gids, who.gids],
      ['group members', r.who.members, who.members]] as const;
    for (const [what, before, now] of sets) {
      if (was(before) !== was(now)) changed.push(`${r.kind === 'deny' ? 'deny rule' : 'rule'} \`${r.name}': ${what} `
        + `${was(before) || 'none'} are ${was(now) || 'none'} now`);
    }
    return { ...r, who };
  };
  return { policy: { ...p, allow: p.allow.map(again), deny: p.deny.map(again), membersOf: memberCache() }, changed };
}

/**
 * The policy's digest, in every audit record: of the file's text when it is alone (as before fragments);
 * else of each file's name (not its path: the same files give the same digest however the path to them is
 * spelled, in a checkout as on the host) and the digest of its text, in order, so a renamed fragment
 * changes it too.
 */
function digest(sources: ReadonlyArray<{ path: string; text: string }>): string {
  const sha = (t: string) => createHash('sha256').update(t).digest('hex');
  if (sources.length === 1) return sha(sources[0]!.text);
  return sha(sources.map((s) => `${basename(s.path)}\0${sha(s.text)}\n`).join(''));
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
function patternOverlaps(rules: readonly AllowRule[]): string[] {
  const errors: string[] = [];
  const shapes = new Map<string, { pattern: string; rule: string; file: string; line: number }>();
  shapes.set('tb', { pattern: DEFAULT_NAME_PATTERN, rule: 'the names the broker picks', file: '', line: 0 });
  for (const r of rules) {
    const p = r.namePattern;
    // Each at its own file (a fragment's rule in its fragment) and line.
    const at = `${r.file}:${r.line}: rule \`${r.name}' name_pattern ${p}`;
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
      } else shapes.set(prefix, { pattern: p, rule: r.name, file: r.file, line: r.line });
    }
  }
  // Prefix-free: in sorted order a prefix sits right before the strings it begins.
  const sorted = [...shapes.keys()].sort();
  for (let k = 1; k < sorted.length; k++) {
    const a = shapes.get(sorted[k - 1]!)!;
    const b = shapes.get(sorted[k]!)!;
    if (sorted[k]!.startsWith(sorted[k - 1]!)) {
      const who = (x: typeof a) => (x.line === 0 ? x.rule : `rule \`${x.rule}' (${x.pattern})`);
      const where = b.line ? `${b.file}:${b.line}` : `${a.file}:${a.line}`;
      errors.push(`${where}: name_pattern ${b.pattern} of ${who(b)} overlaps ${who(a)}: `
        + 'the text before {uid} or {user} must not begin another pattern\'s');
    }
  }
  return errors;
}

/** Every key of the policy, by table, from the schemas (tapbroker-policy(5) is checked against it). */
export const POLICY_KEYS = (() => {
  const keys = (shape: Shape | undefined): string[] => {
    const s = shape?.t === 'array' ? shape.of : shape?.t === 'record' ? shape.value : shape;
    return s?.t === 'object' ? Object.keys(s.fields) : [];
  };
  const top = POLICY_SHAPE.t === 'object' ? POLICY_SHAPE.fields : {};
  const rule = top['rule']?.t === 'array' && top['rule'].of.t === 'object' ? top['rule'].of.fields : {};
  return {
    top: keys(POLICY_SHAPE), rule: keys(top['rule']), deny: keys(top['deny']), network: keys(top['network']),
    macvtap: keys(rule['macvtap']),
  } as const;
})();

/** The keys a table at `path` may hold. */
function knownKeys(path: ReadonlyArray<PropertyKey>): readonly string[] {
  const [table] = path;
  if (path.length === 0) return POLICY_KEYS.top;
  if (table === 'rule') return path[2] === 'macvtap' ? POLICY_KEYS.macvtap : POLICY_KEYS.rule;
  if (table === 'deny') return POLICY_KEYS.deny;
  if (table === 'network') return POLICY_KEYS.network;
  return [];
}

/** Account lookups for one pass over a policy: each name is asked of NSS once (16,000 rules name a few groups). */
function lookups(): { uid: (name: string) => number | null; gid: (name: string) => number | null } {
  const uids = new Map<string, number | null>();
  const gids = new Map<string, number | null>();
  const once = <V>(m: Map<string, V>, key: string, get: () => V): V => {
    if (!m.has(key)) m.set(key, get());
    return m.get(key)!;
  };
  return { uid: (n) => once(uids, n, () => getpwnam(n)?.uid ?? null), gid: (n) => once(gids, n, () => getgrnam(n)) };
}

function resolveSelector(
  users: ReadonlyArray<string | number> | undefined, groups: ReadonlyArray<string | number> | undefined,
  what: string, warnings: string[], errors: string[], path: string, deny = false, look = lookups(),
): Selector {
  if ((users?.length ?? 0) + (groups?.length ?? 0) === 0) {
    errors.push(`${path}: ${what} names no users and no groups (use users = ["*"] to mean everyone)`);
  }
  let everyone = false;
  const uids = new Set<number>();
  const gids = new Set<number>();
  const unresolved = { users: [] as string[], groups: [] as string[] };
  // An allow rule's unknown name matches nobody; a deny rule's fails closed (matchesDeny).
  // Until the name can be looked up: within a second of /etc/passwd or /etc/group changing (the broker reads them
  // again), at a reload for a directory service (an outside review: "until a reload" was said, and not so).
  const until = 'until the name can be looked up (within a second of its creation in /etc/passwd or /etc/group; '
    + 'in a directory service, at a reload)';
  const effect = (kind: 'user' | 'group') => (deny
    ? kind === 'user'
      ? `this deny rule matches callers of that name and callers whose name cannot be looked up, ${until}`
      : `this deny rule matches every caller ${until}`
    : `it matches nobody ${until}`);
  for (const u of users ?? []) {
    if (u === '*') everyone = true;
    else if (typeof u === 'number') uids.add(u);
    else {
      const uid = look.uid(u);
      if (uid !== null) uids.add(uid);
      else {
        if (deny) unresolved.users.push(u);
        warnings.push(`${path}: ${what}: no user \`${u}' on this host; ${effect('user')}`);
      }
    }
  }
  for (const g of groups ?? []) {
    if (typeof g === 'number') gids.add(g);
    else {
      const gid = look.gid(g);
      if (gid !== null) gids.add(gid);
      else {
        if (deny) unresolved.groups.push(g);
        warnings.push(`${path}: ${what}: no group \`${g}' on this host; ${effect('group')}`);
      }
    }
  }
  const members = new Set<number>();
  if (deny) for (const set of accountMembers(gids).values()) for (const u of set) members.add(u);
  return { everyone, uids, gids, members, unresolved, written: { users: users ?? [], groups: groups ?? [] } };
}
