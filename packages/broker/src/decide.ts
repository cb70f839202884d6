// The decision for one request: the policy as the broker holds it (rules resolved at load, in policy.ts),
// and `decide`. Default deny; any matching deny rule wins; among allow rules the first in file order that
// permits the whole request decides. Pure functions of their inputs: the broker and the policy tools share them.
import type { ErrorCode, MacvtapMode } from '@tapbroker/protocol/core';

/** In `bridges`, the whole entry `"*"` stands for every Linux bridge; it is not a glob inside a name. */
export const ANY_BRIDGE = '*';

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
  /**
   * Deny rules only: names the account database could not look up at load (a directory service not up
   * yet, a deleted account). A deny fails closed on them: see matchesDeny.
   */
  unresolved: { users: readonly string[]; groups: readonly string[] };
  /** The names and numbers as the policy wrote them: resolved again when the account files change. */
  written: { users: ReadonlyArray<string | number>; groups: ReadonlyArray<string | number> };
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
  /**
   * The uids the account database says are in a group: a tap given to the group counts as theirs when a locked port's
   * MAC is weighed (admission). None where not known.
   */
  membersOf?: (gid: number) => ReadonlySet<number>;
}

export interface Caller {
  uid: number;
  gid: number;
  /** Supplementary groups from the kernel (SO_PEERGROUPS). */
  groups: readonly number[];
  /**
   * Groups the kernel showed that are not counted as the caller's (subordinate gids the account database does
   * not give it: subids.ts): no allow rule's group is had through them, but a deny rule's holds for them.
   */
  claimed?: readonly number[];
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
  /** A persistent tap given to a group: every member may open it, so every member must be allowed there. */
  group?: number | null;
  /** The hypervisor sets the guest's MAC (the bridge helper's way): the broker cannot lock a port to it. */
  macUnknown?: boolean;
}

/**
 * A refusal as the caller is told it. `record`, where present, is what the audit record says instead: a deny
 * the caller is not told of (see decide), with the rule that decided.
 */
export type Refusal = {
  allow: false; code: ErrorCode; rule: string | null; message: string; hint: string;
  record?: { rule: string; message: string };
};
export type Decision = { allow: true; rule: AllowRule } | Refusal;

/** The rule and message of a refusal's audit record (decide's, or admission's, which carries it on). */
export const recorded = (d: Pick<Refusal, 'rule' | 'message' | 'record'>) =>
  d.record ?? { rule: d.rule, message: d.message };

/** An allow rule's selector: the caller's uid, or a group the calling process holds (kernel's list). */
export function matches(who: Selector, caller: Caller): boolean {
  if (who.everyone || who.uids.has(caller.uid) || who.gids.has(caller.gid)) return true;
  return caller.groups.some((g) => who.gids.has(g));
}

/**
 * A deny rule's selector: as for allow rules, or membership of a group by the account database, or a group the
 * caller only claims (a subordinate gid it took in a user namespace of its own). A deny
 * never lets someone through because a name in it could not be looked up: a user name it could not
 * resolve still matches a caller of that name, or whose own name is unknown; a group it could not resolve
 * matches every caller (nobody can tell its members), until a reload resolves it.
 */
export function matchesDeny(who: Selector, caller: Caller & { user?: string | null }): boolean {
  if (matches(who, caller) || who.members.has(caller.uid) || who.unresolved.groups.length > 0) return true;
  if (caller.claimed?.some((g) => who.gids.has(g))) return true;
  return who.unresolved.users.length > 0 && (!caller.user || who.unresolved.users.includes(caller.user));
}

/**
 * Why a deny matched `caller` only because this host could not look up a name in it (it fails closed: matchesDeny),
 * in words a denial may tell the caller (no name: they are other people's, an offboarded user's, a re-test found);
 * null when it matched the caller by what it could resolve.
 */
export function unknownNames(who: Selector, caller: Caller & { user?: string | null }): string | null {
  if (matchesDeny({ ...who, unresolved: { users: [], groups: [] } }, caller)) return null;
  if (who.unresolved.groups.length > 0) return 'a group this host cannot look up, so it matches every caller';
  return who.unresolved.users.length > 0
    ? 'a user this host cannot look up, so it matches every caller without an account name (yours has none)'
    : null;
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
  /**
   * On Open vSwitch, the VLANs its port carries: its access VLAN, its trunk, or (neither) every VLAN, which
   * is what an OVS port with no tag and no trunks carries.
   */
  vlans: readonly number[] | 'all';
  /** The network the request named, or null. */
  network: string | null;
}

export function resolveTarget(policy: Policy, ask: Pick<Ask, 'kind' | 'parent' | 'network'>): Target {
  if (!ask.network) {
    const kind = ask.kind === 'tap' ? 'bridge' : 'macvtap';
    return { kind, name: ask.parent, vlan: null, vlans: 'all', network: null };
  }
  return networkTarget(policy.networks.get(ask.parent)) ?? {
    kind: 'unknown',
    name: ask.parent,
    vlan: null,
    vlans: 'all',
    network: ask.parent,
  };
}

function networkTarget(n: Network | undefined): Target | null {
  if (!n) return null;
  const vlans = n.vlan !== null ? [n.vlan] : n.trunk ?? 'all';
  return { kind: n.kind, name: n.target, vlan: n.vlan, vlans, network: n.name };
}

/**
 * The VLAN of a Linux bridge's port: its own, or (none) the bridge's default_pvid, which the policy takes as the
 * kernel's default, VLAN 1 (an outside review's deny of a network in VLAN 1 left the bridge's untagged taps, in
 * VLAN 1 too, open to the user it denied). A bridge whose default_pvid was changed: see tapbroker-policy(5).
 */
export const DEFAULT_PVID = 1;
export const portVlan = (vlan: number | null): number => vlan ?? DEFAULT_PVID;

/**
 * Do two targets reach the same traffic? The same Linux bridge in the same VLAN (no VLAN: its default
 * one, portVlan); on the same Open vSwitch bridge, any VLAN in common: a trunk, or a port that carries every VLAN,
 * reaches an access VLAN's frames.
 */
export function sameSegment(a: Target, b: Target): boolean {
  if (a.kind !== b.kind || a.name !== b.name) return false;
  if (a.kind !== 'ovs') return portVlan(a.vlan) === portVlan(b.vlan);
  return a.vlans === 'all' || b.vlans === 'all' || a.vlans.some((v) => (b.vlans as readonly number[]).includes(v));
}

/**
 * Does a deny rule cover this target? With no scope it covers everything; `bridges` covers every way
 * onto those bridges (Linux or Open vSwitch, directly or through a network), and `"*"` every way onto
 * any Linux bridge; `parents` macvtaps on those parents; `networks` those networks and anything else
 * reaching the same bridge and VLAN (on Open vSwitch: any VLAN the denied network carries).
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

/**
 * Does deny `d` cover anything allow rule `r` gives: one of its bridges, macvtap parents or networks (`"*"`: any
 * Linux bridge the deny names or closes through a network's segment)? A deny is told to a caller only there
 * (status, as a denial). An outside review: a deny of everything, or of a network on br0, was not told to a caller
 * whose rule gives `"*"`, though it refused that caller's taps on br0.
 */
export function denyTouches(policy: Policy, d: DenyRule, r: AllowRule): boolean {
  if (d.bridges === null && d.parents === null && d.networks === null) return true;
  // A rule of "*" reaches the Linux bridges the deny names ("*" itself too), and those its networks lead onto.
  const reached = !r.bridges.includes(ANY_BRIDGE) ? [] : [...(d.bridges ?? []), ...(d.networks ?? [])
    .map((n) => networkTarget(policy.networks.get(n))).flatMap((t) => (t?.kind === 'bridge' ? [t.name] : []))];
  const asks = [
    ...[...r.bridges.filter((b) => b !== ANY_BRIDGE), ...reached].map((parent) => ({ kind: 'tap' as const, parent,
      network: false })),
    ...r.macvtap.map((m) => ({ kind: 'macvtap' as const, parent: m.parent, network: false })),
    ...r.networks.map((parent) => ({ kind: 'tap' as const, parent, network: true })),
  ];
  return asks.some((a) => denyCovers(policy, d, resolveTarget(policy, a)));
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

/**
 * What deny `d` covers of what the caller's rules `mine` give, in words, as the caller is told it (status, a
 * denial's hint): only targets its own rules name, by those names (networks by name: where they lead is the
 * policy's to tell, rv39), a network or bridge it reaches through a deny of its segment included. An outside
 * re-test was told a deny's other networks, names no rule gives it and the policy keeps from it. `asked`: the target
 * of the request it refuses, named by the caller itself (a bridge a rule of "*" reaches through a network's deny).
 */
export function denyScopeFor(policy: Policy, d: DenyRule, mine: readonly AllowRule[], asked?: Ask): string {
  if (!d.bridges && !d.parents && !d.networks) return 'everything';
  const covered = (kind: 'tap' | 'macvtap', parent: string, network: boolean) =>
    denyCovers(policy, d, resolveTarget(policy, { kind, parent, network }));
  const named = (xs: string[]) => [...new Set(xs)].sort();
  // The target the caller asked for, where the deny covers it.
  const own = (kind: 'tap' | 'macvtap', network: boolean) =>
    (asked?.kind === kind && !!asked.network === network && covered(kind, asked.parent, network) ? [asked.parent] : []);
  // A rule giving any bridge reaches every bridge the deny names as one (a network's segment is not told).
  const bridges = named(mine.flatMap((r) => r.bridges.includes(ANY_BRIDGE)
    ? (d.bridges ?? []).filter((b) => b !== ANY_BRIDGE) : r.bridges.filter((b) => covered('tap', b, false)))
    .concat(own('tap', false)));
  const parents = named(mine.flatMap((r) => r.macvtap.map((m) => m.parent))
    .filter((p) => covered('macvtap', p, false)).concat(own('macvtap', false)));
  const networks = named(mine.flatMap((r) => r.networks).filter((n) => covered('tap', n, true))
    .concat(own('tap', true)));
  // A rule giving any bridge, closed on a bridge through a network's segment: told without naming either.
  const segment = mine.some((r) => r.bridges.includes(ANY_BRIDGE)) && (d.networks ?? []).some((n) => {
    const t = networkTarget(policy.networks.get(n));
    return t?.kind === 'bridge' && covered('tap', t.name, false);
  });
  const parts = [
    d.bridges?.includes(ANY_BRIDGE) ? 'every Linux bridge' : bridges.length ? `bridges ${bridges.join(', ')}`
      : segment ? 'the Linux bridge of a network it denies' : '',
    parents.length ? `macvtap parents ${parents.join(', ')}` : '',
    networks.length ? `networks ${networks.join(', ')}` : '',
  ].filter(Boolean);
  return parts.length ? parts.join('; ') : 'none of what your rules give';
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
  const mine = policy.allow.filter((r) => matches(r.who, caller));
  const forTarget = mine.filter((r) => grantsTarget(r, ask));
  if (deny) {
    const onto = target.network !== null && target.kind !== 'unknown'
      ? ` (network \`${target.network}' is ${target.kind} ${target.name})`
      : '';
    // A typo in a deny's group denies everyone: the caller, who cannot read the policy, is told why (an outside
    // review: users were sent to other bridges, the administrator saw nothing but a warning at the reload).
    const unknown = unknownNames(deny.who, caller);
    const message = `denied by rule \`${deny.name}'${onto}${unknown ? `, which names ${unknown}` : ''}`;
    // A caller no rule gives this target is told what it would be told without the deny (rv39): a deny must not
    // tell it which networks exist, or where they lead.
    if (forTarget.length === 0) return { ...unmatched(caller, ask, what, mine), record: { rule: deny.name, message } };
    const scope = denyScopeFor(policy, deny, mine, ask);
    // Nothing the caller can pick instead: every target, or every Linux bridge for a tap on one.
    const whole = unknown !== null || scope === 'everything' || (target.kind === 'bridge' && !ask.network
      && scope.startsWith('every Linux bridge'));
    return {
      allow: false, code: 'TB_E_POLICY_DENIED', rule: deny.name, message,
      hint: `the deny rule covers ${scope}${whole
        ? '; only an administrator can change it'
        : `; another ${targetNoun(ask).replace(/s$/, '')} may be allowed`}`,
    };
  }
  if (forTarget.length === 0) return unmatched(caller, ask, what, mine);
  let first: Decision | null = null;
  for (const rule of forTarget) {
    const refusal = refuse(rule, caller, ask, live(rule.name));
    // The first rule that would grant it decides; a port lock it asks for and cannot have refuses the request, and no
    // later rule is tried: a lock is never stepped around (a re-test took an unlocked port through the bridge helper
    // when a later rule was tried). The tools say which later rules it shadows.
    if (!refusal) {
      return groupRefusal(policy, ask, target, what) ?? lockRefusal(policy, ask, rule) ?? { allow: true, rule };
    }
    first ??= refusal;
  }
  return first!;
}

/**
 * A tap given to a group reaches whoever holds the group when it is opened, which no account database tells (a session
 * keeps a group its user has left; newgrp, pam_group give one): outside reviews opened such taps from an offboarded
 * user's process, then from a named user's session, then from one that kept changing pid past a look at /proc. So a
 * deny covering the target, whomever it names, refuses it: looked for only where a rule would grant it otherwise
 * (a re-test learned other users' denies through requests their rules refused anyway), and told without the rule.
 */
function groupRefusal(policy: Policy, ask: Ask, target: Target, what: string): Refusal | null {
  const shared = ask.group != null ? policy.deny.find((d) => denyCovers(policy, d, target)) : undefined;
  return !shared ? null : {
    allow: false, code: 'TB_E_POLICY_DENIED', rule: null,
    record: { rule: shared.name, message: `denied by rule \`${shared.name}': the tap would be given to group `
      + `${ask.group}, whose holders no account database tells, and the rule covers ${what}` },
    message: `a deny rule covers ${what}, and a tap given to a group reaches every process holding the group, which `
      + 'the broker cannot tell (a session keeps a group its user has left)',
    hint: `give it to no group: no tap on ${what} is given to a group while a deny rule covers it`,
  };
}

/** Whether the device is to be a locked port: its rule's or its network's mac_lock (either is enough). */
export function locksPort(policy: Policy, ask: Ask, rule: AllowRule): boolean {
  return rule.macLock || (!!ask.network && policy.networks.get(ask.parent)?.macLock) || false;
}

/**
 * Why a grant under `rule` cannot have the port lock its rule or network asks for, or null. Only a tap on a Linux
 * bridge, with a guest MAC the broker knows, is locked.
 */
function lockRefusal(policy: Policy, ask: Ask, rule: AllowRule): Refusal | null {
  if (!locksPort(policy, ask, rule)) return null;
  const why = ask.kind === 'macvtap' ? 'a macvtap cannot be locked to its MAC'
    : resolveTarget(policy, ask).kind !== 'bridge'
      ? 'only a port of a Linux bridge can be locked: this network is Open vSwitch or a hook'
      : ask.macUnknown ? 'the broker is not told the guest\'s MAC (the bridge helper\'s way), so it cannot lock '
        + 'the port to it'
        : null;
  if (!why) return null;
  const who = rule.macLock ? `rule \`${rule.name}'` : `network \`${ask.parent}'`;
  return {
    allow: false, code: 'TB_E_MAC_LOCK', rule: rule.name,
    message: `${who} locks ports to their guest's MAC, and ${why}`,
    hint: ask.macUnknown ? 'use tapbroker run, which tells the broker the MAC' : 'ask for a tap on a Linux bridge',
  };
}

/** No allow rule of the caller's gives it the target. */
function unmatched(caller: Caller, ask: Ask, what: string, mine: readonly AllowRule[]): Refusal {
  if (mine.length === 0) {
    return {
      allow: false, code: 'TB_E_POLICY_DENIED', rule: null, message: 'no rule matched',
      hint: `no rule names uid ${caller.uid} or any of its groups; ask an administrator to add one`,
    };
  }
  const allowed = [...new Set(mine.flatMap((r) => targets(r, ask)))];
  return {
    allow: false, code: 'TB_E_POLICY_DENIED', rule: null, message: `no rule matched ${what}`,
    hint: allowed.length
      ? `your rules allow ${targetNoun(ask)}: ${allowed.join(', ')}`
      : `your rules allow no ${targetNoun(ask)}`,
  };
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

