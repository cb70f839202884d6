// Policy v1: TOML validated by zod, names resolved once at load into typed, immutable rules.
// Default deny; any matching deny rule wins; among allow rules the first in file order that
// permits the whole request decides.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { parse as parseToml, TomlError } from 'smol-toml';
import { z } from 'zod';
import {
  TapbrokerError, checkIfName, checkMacPrefix, sys, type ErrorCode,
} from '@tapbroker/protocol';

export const DEFAULT_MAC_PREFIX = '52:54:00';
/** Queues per device: 126 tap fds plus 126 vhost fds still fit one SCM_RIGHTS message (253 fds). */
export const MAX_QUEUES = 126;

const Principal = z.union([z.string().min(1).max(256), z.number().int().min(0).max(0xfffffffe)]);
const IfName = z.string().superRefine((s, ctx) => {
  const why = checkIfName(s);
  if (why) ctx.addIssue({ code: 'custom', message: `interface name \`${s}' ${why}` });
});
const RuleName = z.string().regex(/^[A-Za-z0-9_.-]{1,64}$/, 'must be 1-64 characters of A-Z a-z 0-9 _ . -');

const RuleSchema = z.strictObject({
  name: RuleName,
  users: z.array(Principal).optional(),
  groups: z.array(Principal).optional(),
  bridges: z.array(IfName).min(1),
  max_queues: z.number().int().min(1).max(MAX_QUEUES).default(1),
  vhost: z.boolean().default(false),
  mac_prefix: z.string().superRefine((s, ctx) => {
    const why = checkMacPrefix(s);
    if (why) ctx.addIssue({ code: 'custom', message: `mac_prefix \`${s}' ${why}` });
    else if (parseInt(s.slice(0, 2), 16) & 1) ctx.addIssue({ code: 'custom', message: `mac_prefix \`${s}' is multicast` });
  }).default(DEFAULT_MAC_PREFIX),
  max_devices: z.number().int().min(0).optional(),
});

const DenySchema = z.strictObject({
  name: RuleName.optional(),
  users: z.array(Principal).optional(),
  groups: z.array(Principal).optional(),
  bridges: z.array(IfName).min(1).optional(),
});

const PolicySchema = z.strictObject({
  version: z.literal(1).optional(),
  rule: z.array(RuleSchema).default([]),
  deny: z.array(DenySchema).default([]),
});

/** Who a rule applies to, resolved to numbers. `everyone` is the `"*"` user. */
export interface Selector {
  everyone: boolean;
  uids: ReadonlySet<number>;
  gids: ReadonlySet<number>;
}

export interface AllowRule {
  kind: 'allow';
  name: string;
  who: Selector;
  bridges: readonly string[];
  maxQueues: number;
  vhost: boolean;
  macPrefix: string;
  /** Live devices per user under this rule; null means no limit. */
  maxDevices: number | null;
}

export interface DenyRule {
  kind: 'deny';
  name: string;
  who: Selector;
  /** Bridges this deny applies to; null means every bridge. */
  bridges: readonly string[] | null;
}

export interface Policy {
  path: string;
  sha256: string;
  allow: readonly AllowRule[];
  deny: readonly DenyRule[];
  /** Problems that do not stop the policy from loading (e.g. a user that does not exist here). */
  warnings: readonly string[];
}

export interface Caller {
  uid: number;
  gid: number;
  /** Supplementary groups from the kernel (SO_PEERGROUPS). */
  groups: readonly number[];
}

export interface TapAsk {
  bridge: string;
  queues: number;
  vhost: boolean;
  mac: string | null;
}

export type Decision =
  | { allow: true; rule: AllowRule }
  | { allow: false; code: ErrorCode; rule: string | null; message: string; hint: string };

/** Reads, parses, validates and resolves a policy file; throws TB_E_POLICY_INVALID with every error found. */
export function loadPolicy(path: string): Policy {
  let text: string;
  try {
    text = fs.readFileSync(path, 'utf8');
  } catch (err) {
    throw new TapbrokerError('TB_E_POLICY_INVALID', `cannot read policy \`${path}': ${(err as Error).message}`);
  }
  return parsePolicy(text, path);
}

export function parsePolicy(text: string, path = '<policy>'): Policy {
  let doc: unknown;
  try {
    doc = parseToml(text);
  } catch (err) {
    const where = err instanceof TomlError ? `${path}:${err.line}:${err.column}` : path;
    const first = (err as Error).message.split('\n')[0];
    throw new TapbrokerError('TB_E_POLICY_INVALID', `${where}: ${first}`);
  }
  const parsed = PolicySchema.safeParse(doc);
  if (!parsed.success) {
    const errors = parsed.error.issues.map((i) => `${path}: ${i.path.join('.') || 'top level'}: ${i.message}`);
    throw new TapbrokerError('TB_E_POLICY_INVALID', errors.join('\n'));
  }
  const warnings: string[] = [];
  const errors: string[] = [];
  const names = new Set<string>();
  const allow = parsed.data.rule.map((r, i): AllowRule => {
    if (names.has(r.name)) errors.push(`${path}: rule.${i}.name: duplicate rule name \`${r.name}'`);
    names.add(r.name);
    const who = resolveSelector(r.users, r.groups, `rule \`${r.name}'`, warnings, errors, path);
    return {
      kind: 'allow', name: r.name, who, bridges: r.bridges, maxQueues: r.max_queues, vhost: r.vhost,
      macPrefix: r.mac_prefix, maxDevices: r.max_devices ?? null,
    };
  });
  const deny = parsed.data.deny.map((d, i): DenyRule => {
    const name = d.name ?? `deny.${i}`;
    if (names.has(name)) errors.push(`${path}: deny.${i}.name: duplicate rule name \`${name}'`);
    names.add(name);
    const who = resolveSelector(d.users, d.groups, `deny rule \`${name}'`, warnings, errors, path);
    return { kind: 'deny', name, who, bridges: d.bridges ?? null };
  });
  if (errors.length > 0) throw new TapbrokerError('TB_E_POLICY_INVALID', errors.join('\n'));
  const sha256 = createHash('sha256').update(text).digest('hex');
  return { path, sha256, allow, deny, warnings };
}

function resolveSelector(
  users: ReadonlyArray<string | number> | undefined, groups: ReadonlyArray<string | number> | undefined,
  what: string, warnings: string[], errors: string[], path: string,
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
      const pw = sys.getpwnam(u);
      if (pw) uids.add(pw.uid);
      else warnings.push(`${path}: ${what}: no user \`${u}' on this host; it matches nobody`);
    }
  }
  for (const g of groups ?? []) {
    if (typeof g === 'number') gids.add(g);
    else {
      const gid = sys.getgrnam(g);
      if (gid !== null) gids.add(gid);
      else warnings.push(`${path}: ${what}: no group \`${g}' on this host; it matches nobody`);
    }
  }
  return { everyone, uids, gids };
}

export function matches(who: Selector, caller: Caller): boolean {
  if (who.everyone || who.uids.has(caller.uid) || who.gids.has(caller.gid)) return true;
  return caller.groups.some((g) => who.gids.has(g));
}

export function macInPrefix(mac: string, prefix: string): boolean {
  return mac.startsWith(prefix) && (mac.length === prefix.length || mac[prefix.length] === ':');
}

/**
 * The decision for one create-tap request. `liveDevices(rule)` counts the caller's live devices
 * charged to that rule. Pure: no I/O beyond that callback.
 */
export function decide(policy: Policy, caller: Caller, ask: TapAsk, liveDevices: (rule: string) => number): Decision {
  const deny = policy.deny.find((d) => matches(d.who, caller) && (d.bridges === null || d.bridges.includes(ask.bridge)));
  if (deny) {
    return {
      allow: false, code: 'TB_E_POLICY_DENIED', rule: deny.name,
      message: `denied by rule \`${deny.name}'`,
      hint: deny.bridges ? `the deny rule covers bridge${deny.bridges.length > 1 ? 's' : ''} ${deny.bridges.join(', ')}; another bridge may be allowed` : 'the deny rule covers every bridge; only an administrator can change it',
    };
  }
  const mine = policy.allow.filter((r) => matches(r.who, caller));
  if (mine.length === 0) {
    return {
      allow: false, code: 'TB_E_POLICY_DENIED', rule: null, message: 'no rule matched',
      hint: `no rule names uid ${caller.uid} or any of its groups; ask an administrator to add one`,
    };
  }
  const forBridge = mine.filter((r) => r.bridges.includes(ask.bridge));
  if (forBridge.length === 0) {
    const allowed = [...new Set(mine.flatMap((r) => r.bridges))].join(', ');
    return {
      allow: false, code: 'TB_E_POLICY_DENIED', rule: null, message: `no rule matched bridge \`${ask.bridge}'`,
      hint: `your rules allow bridge${allowed.includes(',') ? 's' : ''} ${allowed}`,
    };
  }
  let first: Decision | null = null;
  for (const rule of forBridge) {
    const refusal = refuse(rule, ask, liveDevices(rule.name));
    if (!refusal) return { allow: true, rule };
    first ??= refusal;
  }
  return first!;
}

function refuse(rule: AllowRule, ask: TapAsk, live: number): Decision | null {
  const no = (code: ErrorCode, message: string, hint: string): Decision => ({ allow: false, code, rule: rule.name, message, hint });
  if (ask.queues > rule.maxQueues) {
    return no('TB_E_POLICY_DENIED', `rule \`${rule.name}' allows at most ${rule.maxQueues} queue${rule.maxQueues > 1 ? 's' : ''}, not ${ask.queues}`, `ask for ${rule.maxQueues} queue${rule.maxQueues > 1 ? 's' : ''} or fewer`);
  }
  if (ask.vhost && !rule.vhost) {
    return no('TB_E_POLICY_DENIED', `rule \`${rule.name}' does not allow vhost-net`, 'ask with vhost=off');
  }
  if (ask.mac !== null && !macInPrefix(ask.mac, rule.macPrefix)) {
    return no('TB_E_INVALID_MAC', `mac ${ask.mac} is outside rule \`${rule.name}' prefix ${rule.macPrefix}`, `use a MAC starting with ${rule.macPrefix}, or leave it out and the broker picks one`);
  }
  if (rule.maxDevices !== null && live >= rule.maxDevices) {
    return no('TB_E_QUOTA_EXCEEDED', `rule \`${rule.name}' allows ${rule.maxDevices} live device${rule.maxDevices === 1 ? '' : 's'} per user and you hold ${live}`, 'stop a VM that holds one, then ask again');
  }
  return null;
}

