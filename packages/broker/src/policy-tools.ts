// Policy audit tools that need no daemon: check-policy, explain-policy, who-can. They read the same
// policy the broker reads, through the same code.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { EX, MACVTAP_MODES, TapbrokerError, type MacvtapMode } from '@tapbroker/protocol';
import { accountMembers, getgrgid, getpwnam, getpwuid, groupsOf } from './libc.js';
import {
  ANY_BRIDGE, DEFAULT_PVID, bridgeList, denyCovers, denyScopeFor, denyTouches, grantsBridge, matches, matchesDeny,
  portVlan, resolveTarget, sameSegment, type AllowRule,
  type DenyRule, type Policy, type Selector, type Target,
} from './decide.js';
import { loadPolicy } from './policy.js';
import {
  FRAGMENTS_HELP, fragmentDir, policyPaths, readFragmentsFrom, stagedWithout, untrustedForTools,
} from './policy-files.js';
import { shown } from './naming.js';
import { dirsOnTheWay } from './paths.js';
import { locate, ruleAt } from './policy-text.js';
import { hostIds, screenIds, type HostIds } from './subids.js';

/** check-policy --strict found warnings (a lint's conventional status, not a sysexits one). */
const EX_WARNINGS = 1;

export interface Finding {
  /** A note says how the file would be taken where it is, and counts for neither status nor --strict. */
  level: 'error' | 'warning' | 'note';
  /** The file (the policy or one of its fragments); absent: the policy file given. */
  file?: string;
  line: number | null;
  /** Where the TOML parser says a syntax error is. */
  column?: number;
  message: string;
}

/** `FILE:LINE[:COLUMN]: message` (as the policy loader words errors and warnings) as a finding. */
function finding(level: Finding['level'], text: string, files: readonly string[]): Finding {
  const { file, ...at } = locate(text, files);
  return { level, ...(file !== null ? { file } : {}), ...at };
}

/** One finding as people read it: `FILE:LINE[:COLUMN]: LEVEL: MESSAGE`, the form editors jump to. */
function formatFinding(file: string, f: Finding): string {
  // Names from the policy and file names are the administrator's text: one finding is one line, as printed.
  return `${shown(f.file ?? file)}:${f.line ?? '-'}${f.column ? `:${f.column}` : ''}: ${f.level}: ${shown(f.message)}`;
}

/** Whether a kernel of this release has locked bridge ports (IFLA_BRPORT_LOCKED, Linux 5.18). */
export function kernelLocksPorts(release = os.release()): boolean {
  const [major = 0, minor = 0] = release.split(/[.-]/).map((n) => parseInt(n, 10) || 0);
  return major > 5 || (major === 5 && minor >= 18);
}

/** A rule's mac_lock as the tools show it: its own, or only through some of its networks. */
function macLockOf(p: Policy, r: AllowRule): string {
  if (r.macLock) return 'yes';
  const locked = r.networks.filter((n) => p.networks.get(n)?.macLock);
  return locked.length ? `on ${locked.join(',')}` : 'no';
}

/**
 * Of one caller's rules (`mine`, in policy order), the targets a later rule gives that an earlier locked rule decides
 * first and refuses (a macvtap parent, an Open vSwitch or hook network: no port there can be locked).
 */
function lockedOut(p: Policy, mine: readonly AllowRule[]): Array<{ rule: string; targets: string[]; by: string }> {
  const out: Array<{ rule: string; targets: string[]; by: string }> = [];
  const taken = new Map<string, string>();
  for (const r of mine) {
    const targets = [...r.macvtap.map((m) => `macvtap parent ${m.parent}`),
      ...r.networks.filter((n) => p.networks.get(n)?.kind !== 'bridge').map((n) => `network ${n}`)];
    // The first rule giving a target decides it (for a request it allows): a locked one refuses it.
    const by = targets.filter((t) => taken.get(t));
    if (by.length) out.push({ rule: r.name, targets: by, by: taken.get(by[0]!)! });
    for (const t of targets) if (!taken.has(t)) taken.set(t, r.macLock ? r.name : '');
  }
  return out;
}

/** May a caller be named by both: everyone, a uid or group both name, or a uid one names in a group of the other's? */
function overlaps(a: Selector, b: Selector): boolean {
  const inGroups = (uids: ReadonlySet<number>, gids: ReadonlySet<number>) => gids.size > 0 && [...uids].some((u) => {
    const pw = getpwuid(u);
    return pw !== null && [pw.gid, ...groupsOf(pw.name, pw.gid)].some((g) => gids.has(g));
  });
  if (a.everyone || b.everyone || [...a.uids].some((u) => b.uids.has(u)) || [...a.gids].some((g) => b.gids.has(g))
    || inGroups(a.uids, b.gids) || inGroups(b.uids, a.gids)) return true;
  // Two groups with a member in common (by the account database: a re-test's shared member was refused unseen).
  if (a.gids.size === 0 || b.gids.size === 0) return false;
  const members = accountMembers(new Set([...a.gids, ...b.gids]));
  const of = (gids: ReadonlySet<number>) => new Set([...gids].flatMap((g) => [...members.get(g) ?? []]));
  const theirs = of(b.gids);
  return [...of(a.gids)].some((u) => theirs.has(u));
}

/** Risky but valid: what a reviewer should look at twice. */
export function policyWarnings(p: Policy, host: HostIds = hostIds()): Finding[] {
  const out: Finding[] = p.warnings.map((w) => finding('warning', w, p.files));
  const warn = (r: AllowRule | DenyRule, message: string) =>
    out.push({ level: 'warning', file: r.file, line: r.line, message });
  for (const r of p.allow) {
    if (r.who.everyone) warn(r, `rule \`${r.name}' matches every user`);
    if (r.bridges.includes(ANY_BRIDGE)) {
      warn(r, `rule \`${r.name}' allows taps on every Linux bridge on this host, present and future `
        + '(bridges = ["*"])');
    }
    if (r.macvtap.some((m) => m.modes.includes('passthru'))) {
      warn(r, `rule \`${r.name}' allows macvtap passthru, which hands a whole NIC to a guest`);
    }
    if (r.persistent && r.maxDevicesDefault) {
      warn(r, `rule \`${r.name}' allows persistent devices without max_devices: they outlive VMs, `
        + `and only the default of ${r.maxDevices} per user limits them`);
    }
    if (r.macLock) {
      const parents = r.macvtap.map((m) => m.parent);
      const nets = r.networks.filter((n) => p.networks.get(n)?.kind !== 'bridge');
      const unlockable = [...parents.map((m) => `macvtap parent ${m}`), ...nets.map((n) => `network ${n}`)];
      // The locked rule decides them for its callers: a later rule giving them unlocked is never tried for them.
      const shadowed = p.allow.slice(p.allow.indexOf(r) + 1).filter((b) => !b.macLock && overlaps(r.who, b.who)
        && (b.macvtap.some((m) => parents.includes(m.parent)) || b.networks.some((n) => nets.includes(n))))
        .map((b) => `\`${b.name}'`);
      if (unlockable.length) {
        warn(r, `rule \`${r.name}' has mac_lock, which ${unlockable.join(', ')} cannot have: `
          + `the requests for them it allows are refused (TB_E_MAC_LOCK)${shadowed.length ? `, and no later rule is `
            + `tried for them (${shadowed.join(', ')} would give them unlocked)` : ''}`);
      }
      // The bridge helper's requests on its bridges too (the broker is not told their guest's MAC).
      const bridges = r.bridges.filter((b) => b !== ANY_BRIDGE);
      const helped = p.allow.slice(p.allow.indexOf(r) + 1).filter((b) => !b.macLock && overlaps(r.who, b.who)
        && bridges.some((x) => grantsBridge(b, x))).map((b) => `\`${b.name}'`);
      if (helped.length) {
        const on = `bridge${bridges.length > 1 ? 's' : ''} ${bridges.join(', ')}`;
        warn(r, `rule \`${r.name}' has mac_lock: the bridge helper's requests on ${on} `
          + '(whose guest MAC the broker is not told) are refused (TB_E_MAC_LOCK), and no later '
          + `rule is tried for them (${helped.join(', ')} would give them unlocked)`);
      }
    }
    if ((parseInt(r.macPrefix.slice(0, 2), 16) & 0x02) === 0) {
      warn(r, `rule \`${r.name}' mac_prefix ${r.macPrefix} lacks the locally-administered bit: `
        + 'guests may collide with real NICs');
    }
  }
  // A tap given to a group is refused wherever a deny covers its target, whomever it names (decide: no account
  // database tells who holds a group): said where a rule allows persistent taps, so the administrator can plan.
  for (const r of p.allow.filter((x) => x.persistent)) {
    const covering = p.deny.filter((d) => denyTouches(p, d, r));
    if (covering.length === 0) continue;
    out.push({
      level: 'note', file: r.file, line: r.line,
      message: `rule \`${r.name}' allows persistent taps, but none given to a group (tapbroker create --group) on `
        + `what a deny rule covers, whomever it names: ${covering.map((d) => `${denyScope(p, d)} (deny \`${d.name}')`)
          .join('; ')}`,
    });
  }
  // A network's mac_lock holds for requests by its name: a rule that grants its bridge by name (or "*")
  // without a lock of its own hands out unlocked ports on the same segment.
  for (const n of p.networks.values()) {
    if (!n.macLock || n.kind !== 'bridge') continue;
    for (const r of p.allow.filter((x) => !x.macLock && grantsBridge(x, n.target))) {
      warn(r, `rule \`${r.name}' grants bridge ${n.target} by name without mac_lock, so its taps there are not `
        + `locked, though network \`${n.name}' onto that bridge locks its own`);
    }
  }
  // An OVS port with no tag and no trunks carries every VLAN of its bridge, tagged.
  for (const n of p.networks.values()) {
    if (n.kind !== 'ovs' || n.vlan !== null || n.trunk !== null) continue;
    out.push({
      level: 'warning', line: null,
      message: `network \`${n.name}' on Open vSwitch bridge ${n.target} has neither vlan nor trunk: its guests send `
        + `and receive every VLAN of ${n.target}, tagged (a deny of any network on ${n.target} covers it)`,
    });
  }
  // mac_lock needs locked bridge ports (Linux 5.18): on an older kernel every such grant is refused.
  if (!kernelLocksPorts()) {
    for (const r of p.allow.filter((x) => x.macLock || x.networks.some((n) => p.networks.get(n)?.macLock))) {
      warn(r, `rule \`${r.name}' locks ports (mac_lock), which this kernel (${os.release()}) cannot: `
        + 'its grants will be refused with TB_E_MAC_LOCK (Linux 5.18 or later has locked bridge ports)');
    }
  }
  // Bridges a grant can reach, as this host has them now: one whose MAC nobody pinned is refused.
  const bridges = new Set([
    ...p.allow.flatMap((r) => r.bridges.filter((b) => b !== ANY_BRIDGE)),
    ...(p.allow.some((r) => r.bridges.includes(ANY_BRIDGE)) ? hostBridges() : []),
    ...[...p.networks.values()].filter((n) => n.kind === 'bridge').map((n) => n.target),
  ]);
  // The file and line of the first rule that names an interface, for the messages about it (a fragment's own).
  const at = (name: string, of: (r: AllowRule) => readonly string[]) => {
    const r = p.allow.find((x) => of(x).includes(name));
    return r ? { file: r.file, line: r.line } : { line: null };
  };
  for (const b of bridges) {
    const where = at(b, (r) => r.bridges);
    if (!fs.existsSync(`/sys/class/net/${b}`)) {
      // Made later (by systemd-networkd, or a VM host's own scripts) is fine; a typo is not.
      out.push({ level: 'note', ...where, message: `bridge ${b} does not exist on this host now` });
      continue;
    }
    if (!fs.existsSync(`/sys/class/net/${b}/bridge`)) {
      out.push({
        level: 'warning', ...where,
        message: `${b} is not a Linux bridge: grants on it are refused with TB_E_NOT_A_BRIDGE (a macvtap takes a `
          + 'NIC as its parent: macvtap = [{ parent = … }])',
      });
      continue;
    }
    const type = fs.readFileSync(`/sys/class/net/${b}/addr_assign_type`, 'utf8').trim();
    if (type !== '3') {
      out.push({
        level: 'warning', ...where,
        message: `bridge ${b} has no fixed MAC address: grants on it are refused until an administrator pins it `
          + `(ip link set ${b} address …)`,
      });
    }
    // An outside review: one guest's IGMP reports for more groups than mcast_hash_max turned it off for good.
    if (readSys(`/sys/class/net/${b}/bridge/multicast_snooping`) === '1') {
      out.push({
        level: 'note', ...where,
        message: `bridge ${b} has multicast snooping on: a guest's IGMP/MLD reports for more than `
          + `${readSys(`/sys/class/net/${b}/bridge/hash_max`) ?? '?'} groups (mcast_hash_max) make the kernel turn `
          + 'it off for the whole bridge; drop them from its ports (nftables bridge family) where snooping matters, '
          + `or turn it off (ip link set ${b} type bridge mcast_snooping 0)`,
      });
    }
  }
  const parents = new Set(p.allow.flatMap((r) => r.macvtap.map((m) => m.parent)));
  for (const m of parents) {
    if (m !== ANY_BRIDGE && !fs.existsSync(`/sys/class/net/${m}`)) {
      out.push({ level: 'note', ...at(m, (r) => r.macvtap.map((x) => x.parent)),
        message: `macvtap parent ${m} does not exist on this host now` });
    }
  }
  out.push(...subordinateWarnings(p, host));
  p.deny.forEach((d, i) => {
    if (d.who.gids.size > 0) {
      warn(d, `deny rule \`${d.name}' names groups: it holds for members by the account database and by the `
        + `caller's own groups; a member added to /etc/group is covered within a second, one added in a directory `
        + 'service (sssd, LDAP) after a reload');
    }
    if (!d.who.everyone && d.who.uids.size === 0 && d.who.gids.size === 0 && !unresolved(d.who)) {
      warn(d, `deny rule \`${d.name}' matches nobody on this host: it is unreachable`);
    }
    const earlier = p.deny.slice(0, i).find((e) => covers(p, e, d));
    if (earlier) {
      warn(d, `deny rule \`${d.name}' is shadowed by \`${earlier.name}' (${ruleAt(p.path, earlier, true)}), `
        + 'which already denies all it denies');
    }
  });
  return out;
}

/** Allow rules naming this host's subordinate ids (subids.ts), which the broker screens callers by at accept. */
function subordinateWarnings(p: Policy, host: HostIds): Finding[] {
  const out: Finding[] = [];
  for (const r of p.allow) {
    for (const uid of r.who.uids) {
      const range = host.subuids.of(uid);
      if (!range) continue;
      out.push({ level: 'warning', file: r.file, line: r.line,
        message: `rule \`${r.name}' names uid ${uid}, a subordinate uid of ${range.owner} (${host.subuids.file}): `
          + 'the broker refuses it at accept, so the rule never grants it anything' });
    }
    for (const gid of r.who.gids) {
      const range = host.subgids.of(gid);
      if (!range) continue;
      out.push({ level: 'warning', file: r.file, line: r.line,
        message: `rule \`${r.name}' names group ${gid}, in the subordinate gid range of ${range.owner} `
          + `(${host.subgids.file}): it holds only for members by the account database, and no persistent tap `
          + 'is given to it' });
    }
  }
  return out;
}

/**
 * What a deny rule covers, in words, as the policy's reader is told it: `bridges br0; networks lab (and bridge br0
 * itself)`, `every Linux bridge` or `everything`. A caller is told denyScopeFor instead.
 */
export function denyScope(policy: Policy, d: DenyRule): string {
  const bridges = d.bridges?.includes(ANY_BRIDGE) ? 'every Linux bridge'
    : d.bridges ? `bridges ${d.bridges.join(', ')}` : '';
  // A network's deny closes its segment whatever way leads onto it (denyCovers): said where it is a device.
  const segment = (n: string) => {
    const t = resolveTarget(policy, { kind: 'tap', parent: n, network: true });
    if (t.kind === 'unknown' || t.kind === 'hook') return n;
    const vlan = t.kind === 'ovs' ? (t.vlans === 'all' ? '' : ` VLAN ${t.vlans.join(', ')}`)
      : portVlan(t.vlan) !== DEFAULT_PVID ? ` VLAN ${t.vlan}` : '';
    return `${n} (and ${t.kind === 'ovs' ? 'Open vSwitch bridge' : 'bridge'} ${t.name}${vlan} itself)`;
  };
  const parts = [
    bridges, d.parents ? `macvtap parents ${d.parents.join(', ')}` : '',
    d.networks ? `networks ${d.networks.map(segment).join(', ')}` : '',
  ].filter(Boolean);
  return parts.length ? parts.join('; ') : 'everything';
}

/** The Linux bridges on this host now, for what `bridges = ["*"]` reaches today. */
function hostBridges(): string[] {
  try {
    return fs.readdirSync('/sys/class/net').filter((n) => fs.existsSync(`/sys/class/net/${n}/bridge`)).sort();
  } catch {
    return [];
  }
}

/** A sysfs attribute's text, or null where it cannot be read. */
function readSys(file: string): string | null {
  try {
    return fs.readFileSync(file, 'utf8').trim();
  } catch {
    return null;
  }
}

/** A deny rule naming a user or group this host could not look up (it fails closed: matchesDeny). */
const unresolved = (who: Selector) => who.unresolved.users.length + who.unresolved.groups.length > 0;

function selectorCovers(a: Selector, b: Selector): boolean {
  // A deny with a group nobody could look up matches every caller.
  if (a.unresolved.groups.length > 0) return true;
  if (unresolved(b)) return a.everyone;
  // A selector that matches nobody is reported as unreachable, not as shadowed.
  if (!b.everyone && b.uids.size === 0 && b.gids.size === 0) return false;
  return (
    a.everyone ||
    (!b.everyone && [...b.uids].every((u) => a.uids.has(u)) && [...b.gids].every((g) => a.gids.has(g)))
  );
}

/** In a deny with some scope, a list left out is empty: `bridges` alone covers no macvtap parent. */
function scopeCovers(
  a: readonly string[] | null,
  b: readonly string[] | null,
  alsoCovered: (x: string) => boolean = () => false,
): boolean {
  return (b ?? []).every((x) => (a ?? []).includes(x) || alsoCovered(x));
}

function covers(p: Policy, a: DenyRule, b: DenyRule): boolean {
  if (!selectorCovers(a.who, b.who)) return false;
  if (a.bridges === null && a.parents === null && a.networks === null) return true;
  if (b.bridges === null && b.parents === null && b.networks === null) return false;
  // "*" covers a named bridge unless that name also reaches an Open vSwitch bridge through a network.
  const ovs = new Set([...p.networks.values()].filter((n) => n.kind === 'ovs').map((n) => n.target));
  const anyBridge = (x: string) => a.bridges?.includes(ANY_BRIDGE) === true && x !== ANY_BRIDGE && !ovs.has(x);
  // Each list of b inside a's (a network is compared by name only: a deny of it also covers its segment).
  return scopeCovers(a.bridges, b.bridges, anyBridge) && scopeCovers(a.parents, b.parents)
    && scopeCovers(a.networks, b.networks);
}

/** Who a deny rule keeps out, as the broker applies it: names it could not look up fail closed (matchesDeny). */
function deniedPrincipals(s: Selector): string {
  if (s.unresolved.groups.length > 0) {
    return `everyone (group ${s.unresolved.groups.join(', ')} is not on this host: the deny fails closed)`;
  }
  const missing = s.unresolved.users.map((u) => `user ${u} and every caller without an account (${u} is not on `
    + 'this host: the deny fails closed)');
  return [principals(s), ...missing].filter((p) => p !== NO_ONE).join(', ') || NO_ONE;
}

/** An allow rule's principals, with `host`: those this host's subordinate ids make the broker screen, said so. */
function principals(s: Selector, host?: HostIds): string {
  if (s.everyone) return 'everyone';
  const user = (u: number) => {
    const sub = host?.subuids.of(u);
    const name = getpwuid(u)?.name;
    // A name of digits is told apart from a uid (an outside review read `user 1001` as uid 1001: it was uid 2003).
    const shownName = name === undefined ? String(u) : /^\d+$/.test(name) ? `${name} (uid ${u})` : name;
    return `${shownName}${sub ? ` (a subordinate uid of ${sub.owner}: refused at accept)` : ''}`;
  };
  const group = (g: number) => {
    const sub = host?.subgids.of(g);
    const name = getgrgid(g);
    const shownName = name === null ? String(g) : /^\d+$/.test(name) ? `${name} (gid ${g})` : name;
    return `${shownName}${sub ? ` (a subordinate gid of ${sub.owner}: members by the account database only)` : ''}`;
  };
  return [...[...s.uids].map((u) => `user ${user(u)}`), ...[...s.gids].map((g) => `group ${group(g)}`)].join(', ')
    || NO_ONE;
}

/** A selector that matches no one here (its users and groups are not on this host): not the account `nobody`. */
const NO_ONE = 'no one on this host';

/**
 * What the shipped unit (systemd/tapbrokerd.service) hides from the broker: ProtectHome=yes (/root, /home,
 * /run/user) and PrivateTmp=yes (/tmp, /var/tmp: the broker sees empty ones of its own).
 */
export const UNIT_HIDES: ReadonlyArray<[string, string]> = [
  ['/root', 'ProtectHome=yes'], ['/home', 'ProtectHome=yes'], ['/run/user', 'ProtectHome=yes'],
  ['/tmp', 'PrivateTmp=yes'], ['/var/tmp', 'PrivateTmp=yes'],
];

/**
 * The policy's files and hook programs the shipped unit would hide from the broker: check-policy and `-n` run
 * outside that sandbox, and found such a policy good (an outside review: an upgrade then restarted the broker into
 * a policy it could not load, and it stayed down). `all` (--unit): every path, as given or where its symlinks
 * lead. Otherwise a draft (a policy file under such a directory: a checkout, a test) is not judged, and of the
 * policy's files only where symlinks lead counts (the unit reads /etc/tapbroker's).
 */
export function hiddenFromUnit(p: Policy, all: boolean): Finding[] {
  const under = (x: string) => UNIT_HIDES.find(([dir]) => x === dir || x.startsWith(`${dir}/`));
  const realOf = (f: string) => {
    try {
      return fs.realpathSync(f);
    } catch {
      return f; // Not there (a hook): as given.
    }
  };
  if (!all && under(p.files[0] ?? '') !== undefined) return [];
  const paths = [...p.files.map((f) => ({ f, what: 'policy file', given: all })),
    ...[...p.networks.values()].filter((n) => n.kind === 'hook')
      .map((n) => ({ f: n.target, what: 'hook', given: true }))];
  const out: Finding[] = [];
  for (const { f, what, given } of paths) {
    const real = realOf(f);
    const hit = (given ? under(f) : undefined) ?? under(real);
    if (hit) {
      out.push({ level: 'note', file: f, line: null, message: `${what} ${f}${real !== f ? ` (${real})` : ''} is `
        + `under ${hit[0]}, which the shipped unit hides from the broker (${hit[1]}): under it the policy does `
        + 'not load' });
    }
    // As given (the directories holding a symlink) and where it leads; a script is read by its interpreter too.
    const [perm, verb] = what !== 'hook' ? [0o4, 'read'] : isScript(real) ? [0o5, 'read and run'] : [0o1, 'run'];
    const denied = all ? deniedToUnit(f, perm, verb) ?? deniedToUnit(real, perm, verb) : null;
    if (denied) {
      out.push({ level: 'note', file: f, line: null, message: `${what} ${f}: ${denied} without CAP_DAC_OVERRIDE, which `
        + 'the shipped unit\'s broker does not have (CapabilityBoundingSet=): under it the policy does not load' });
    }
  }
  const dir = fragmentDir(p.path);
  const listed = all && fs.existsSync(dir) ? deniedToUnit(dir, 0o5, 'list') : null;
  if (listed) {
    out.push({ level: 'note', file: dir, line: null, message: `fragment directory ${dir}: ${listed} without `
      + 'CAP_DAC_OVERRIDE, which the shipped unit\'s broker does not have: under it the policy does not load' });
  }
  return out;
}

/**
 * May a user other than the file's owner and group read `file` (o+r, and o+x on every directory on its way), by its
 * path or, a symlink, where it leads (a re-test's fragment in the closed policy.d led to an open file)? ACLs aside.
 */
function othersMayRead(file: string): boolean {
  const open = (f: string) => {
    const dirs = dirsOnTheWay(f);
    return dirs.length > 0 && (fs.statSync(f).mode & 0o004) !== 0
      && dirs.every((d) => (fs.statSync(d).mode & 0o001) !== 0);
  };
  try {
    return open(file) || open(fs.realpathSync(file));
  } catch {
    return false;
  }
}

/** Does `file` begin with `#!` (a script its interpreter reads)? */
function isScript(file: string): boolean {
  try {
    const fd = fs.openSync(file, 'r');
    try {
      const head = Buffer.alloc(2);
      return fs.readSync(fd, head, 0, 2, 0) === 2 && head.toString('latin1') === '#!';
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    return false;
  }
}

/**
 * Why root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (the shipped unit's broker) cannot read (`perm` 4) or
 * run (1) `file`, by the mode bits of it and of each directory on its way (ACLs aside), or null. check-policy,
 * run by a root with every capability, read such a file fine (an outside review: the upgrade then restarted the
 * broker into a policy it could not load).
 */
export function deniedToUnit(file: string, perm: number, verb = perm === 0o1 ? 'run' : 'read'): string | null {
  const allows = (st: fs.Stats, p: number) => ((st.mode >> (st.uid === 0 ? 6 : st.gid === 0 ? 3 : 0)) & p) === p;
  const mode = (st: fs.Stats) => `mode ${(st.mode & 0o7777).toString(8).padStart(4, '0')}, owner ${st.uid}, `
    + `group ${st.gid}`;
  // Walked as the kernel walks it, each symbolic link followed where it is met (a re-test's link chain passed
  // through a closed directory neither the path given nor the one it leads to shows), every directory searched.
  // Not normalised first: `dir/..` passes through dir, which the kernel must search (a re-test's closed `dir` passed).
  const todo = (file.startsWith('/') ? file : `${process.cwd()}/${file}`).split('/').filter(Boolean);
  let at = '/';
  for (let hops = 0; todo.length > 0;) {
    const dir = fs.statSync(at);
    if (!allows(dir, 0o1)) return `directory ${at} on its way (${mode(dir)}) does not let root through`;
    const part = todo.shift()!;
    const next = part === '..' ? path.dirname(at) : part === '.' ? at : path.join(at, part);
    let st: fs.Stats;
    try {
      st = fs.lstatSync(next);
    } catch {
      return null; // Not there: the load says so itself.
    }
    if (!st.isSymbolicLink()) {
      at = next;
      continue;
    }
    if (++hops > 40) return null; // A loop: the load says so itself.
    const target = fs.readlinkSync(next);
    todo.unshift(...target.split('/').filter(Boolean));
    if (target.startsWith('/')) at = '/';
  }
  const st = fs.statSync(at);
  return allows(st, perm) ? null : `its ${mode(st)} does not let root ${verb} it`;
}

/** Each tool's usage, and what it does: `tapbrokerd TOOL --help`, and the line a usage error repeats. */
export const TOOL_USAGE: Record<string, [string, string]> = {
  'check-policy': ['tapbrokerd check-policy [file] [--fragments dir] [--json] [--strict] [--unit]',
    'Validates a policy: errors (status 78), then warnings about risky rules and a summary. --strict: any warning '
      + 'makes the status 1. --unit: as the shipped unit runs the broker, where files under /root, /home, '
      + '/run/user, /tmp and /var/tmp are hidden from it (an error, not a note). ' + FRAGMENTS_HELP],
  'explain-policy': ['tapbrokerd explain-policy [file] [--fragments dir] --user name [--json]',
    'What one user may do under a policy, rule by rule, with the deny rules that apply to them. ' + FRAGMENTS_HELP],
  'who-can': ['tapbrokerd who-can [file] [--fragments dir] (--bridge name | --network name | --macvtap parent '
    + '[--mode mode]) [--json]',
    'Every rule that grants this bridge, network or macvtap parent, and every deny rule that covers it. '
      + FRAGMENTS_HELP],
};

/** A usage error: the message, the tool's usage line, and where to read more. */
function toolUsage(tool: string, why: string): number {
  process.stderr.write(`tapbrokerd: ${why}
usage: ${TOOL_USAGE[tool]?.[0] ?? tool}
see tapbrokerd ${tool} --help
`);
  return EX.USAGE;
}

function parseToolArgs(argv: readonly string[], defaultPolicy: string) {
  const o = {
    file: defaultPolicy, fragments: null as string | null, json: false, strict: false, unit: false,
    user: null as string | null,
    bridge: null as string | null,
    macvtap: null as string | null, network: null as string | null, mode: null as MacvtapMode | null,
  };
  let fileGiven = false;
  for (let i = 1; i < argv.length; i++) {
    // --opt=value and --opt value alike.
    const eq = argv[i]!.startsWith('--') ? argv[i]!.indexOf('=') : -1;
    const a = eq > 0 ? argv[i]!.slice(0, eq) : argv[i]!;
    const inline = eq > 0 ? argv[i]!.slice(eq + 1) : undefined;
    const value = () => {
      const v = inline ?? argv[++i];
      if (v === undefined) throw new TapbrokerError('TB_E_USAGE', `${a} needs a value`);
      return v;
    };
    if ((a === '--json' || a === '--strict' || a === '--unit') && inline !== undefined) {
      throw new TapbrokerError('TB_E_USAGE', `${a} takes no value`);
    }
    if (a === '--json') o.json = true;
    else if (a === '--strict' && argv[0] === 'check-policy') o.strict = true;
    else if (a === '--unit' && argv[0] === 'check-policy') o.unit = true;
    else if (a === '--fragments') o.fragments = value();
    else if (a === '--user') o.user = value();
    else if (a === '--bridge') o.bridge = value();
    else if (a === '--macvtap') o.macvtap = value();
    else if (a === '--network') o.network = value();
    else if (a === '--mode') {
      const m = value();
      if (!(MACVTAP_MODES as readonly string[]).includes(m)) {
        throw new TapbrokerError('TB_E_USAGE', `--mode must be one of ${MACVTAP_MODES.join(', ')}`);
      }
      o.mode = m as MacvtapMode;
    } else if (!a.startsWith('-') && !fileGiven) {
      o.file = a;
      fileGiven = true;
    }
    else throw new TapbrokerError('TB_E_USAGE', `unknown argument \`${a}'`);
  }
  if (o.fragments !== null) readFragmentsFrom(o.file, o.fragments);
  return o;
}

/** One way onto who-can's target: through a network (`via`), or by its own name (`direct`: a bridge by name). */
interface Route {
  via: string | null;
  direct: boolean;
  t: Target;
}

function table(rows: string[][]): string {
  const cells = rows.map((r) => r.map(shown));
  const widths = cells[0]!.map((_, c) => Math.max(...cells.map((r) => (r[c] ?? '').length)));
  return cells.map((r) => r.map((cell, c) => cell.padEnd(widths[c]!)).join('  ').trimEnd()).join('\n');
}

/**
 * Runs one tool; returns the exit status (sysexits; `check-policy --strict` with warnings: 1). `asBroker`:
 * `tapbrokerd -n`, for which a policy a user other than root could change is an error, as for the broker.
 */
export function policyTool(argv: readonly string[], defaultPolicy: string, opts: { asBroker?: boolean } = {}): number {
  const write = (s: string) => process.stdout.write(s.endsWith('\n') ? s : `${s}\n`);
  const tool = argv[0]!;
  if (argv.includes('--help') || argv.includes('-h')) {
    write(`usage: ${TOOL_USAGE[tool]![0]}\n\n${TOOL_USAGE[tool]![1]}\nSee tapbrokerd(8).`);
    return EX.OK;
  }
  let o: ReturnType<typeof parseToolArgs>;
  try {
    o = parseToolArgs(argv, defaultPolicy);
  } catch (err) {
    return toolUsage(tool, (err as Error).message);
  }
  let policy: Policy;
  try {
    policy = loadPolicy(o.file);
  } catch (err) {
    const errors = (err as Error).message.split('\n').map((m) => finding('error', m, policyPaths(o.file)));
    if (argv[0] === 'check-policy' && o.json) {
      write(JSON.stringify({ file: o.file, ok: false, findings: errors }, null, 2));
    } else {
      for (const e of errors) process.stderr.write(`${formatFinding(o.file, e)}\n`);
    }
    return EX.CONFIG;
  }

  // As root (the administrator about to reload) a file a user could change is the broker's own refusal.
  const untrusted = untrustedForTools(o.file, opts.asBroker);
  if (untrusted?.refuse) {
    process.stderr.write(`${shown(untrusted.message)}\n`);
    return EX.CONFIG;
  }
  if (untrusted && argv[0] !== 'check-policy') process.stderr.write(`tapbrokerd: note: ${shown(untrusted.message)}\n`);
  // A staged policy read without the fragments it will be loaded with: a warning (an outside review).
  const staged = stagedWithout(o.file);
  if (staged && argv[0] !== 'check-policy') process.stderr.write(`tapbrokerd: warning: ${shown(staged)}\n`);

  if (argv[0] === 'check-policy') {
    const findings = policyWarnings(policy);
    const hidden = hiddenFromUnit(policy, o.unit);
    // --unit (the package's upgrade guard): what the unit hides keeps the broker from starting there.
    if (o.unit && hidden.length > 0) {
      for (const h of hidden) process.stderr.write(`${formatFinding(o.file, { ...h, level: 'error' })}\n`);
      return EX.CONFIG;
    }
    findings.push(...hidden);
    // An installed policy others may read (an outside review read every deny rule and network of one installed 0644;
    // the package's is 0640): a note, not a refusal, as the upgrade guard (--unit) checks it too.
    const installed = o.unit || path.resolve(o.file).startsWith('/etc/');
    for (const f of installed ? policy.files.filter(othersMayRead) : []) {
      findings.push({ level: 'note', file: f, line: null, message: `policy file ${f} is readable by every user: its `
        + 'deny rules name users and its networks say where they lead, which the broker tells no caller (chmod o-r '
        + 'it, or close its directory: chmod 0750)' });
    }
    if (staged) findings.unshift({ level: 'warning', file: o.file, line: null, message: staged });
    // Names beside the fragments that are not read (policyFiles): said, so a `30-lab.TOML` is not a surprise.
    const dir = fragmentDir(o.file);
    for (const n of fs.existsSync(dir) ? fs.readdirSync(dir).sort() : []) {
      if (n.startsWith('.') || n.endsWith('.toml')) continue;
      findings.push({ level: 'note', file: `${dir}/${n}`, line: null,
        message: 'not read: only names ending in .toml are' });
    }
    // A user checking a draft (its own, or one under review in a checkout, as a CI job does) is told how the
    // broker would take the file where it is: a note, which --strict does not count.
    if (untrusted) findings.unshift({ level: 'note', file: untrusted.file, line: null, message: untrusted.message });
    const warnings = findings.filter((f) => f.level === 'warning').length;
    if (o.json) {
      write(JSON.stringify({
        file: o.file, files: policy.files, ok: true, sha256: policy.sha256, rules: policy.allow.length,
        deny_rules: policy.deny.length, findings,
      }, null, 2));
    } else {
      for (const f of findings) write(formatFinding(o.file, f));
      const n = (k: number, what: string) => `${k} ${what}${k === 1 ? '' : 's'}`;
      const fragments = policy.files.length > 1 ? `, ${n(policy.files.length - 1, 'fragment')}` : '';
      const counts = `${n(policy.allow.length, 'rule')}, ${n(policy.deny.length, 'deny rule')}${fragments}`;
      write(`${shown(o.file)}: ok: ${counts}, `
        + `${warnings} warning${warnings === 1 ? '' : 's'}, sha256 ${policy.sha256}`);
    }
    // For pipelines that must not ship a policy a reviewer would question.
    return o.strict && warnings > 0 ? EX_WARNINGS : EX.OK;
  }

  if (argv[0] === 'explain-policy') {
    if (!o.user) return toolUsage(tool, 'explain-policy needs --user NAME');
    // A name first, as the policy reads "1001"; digits that name no one, a uid (an outside review: the uid came from
    // the one reading and the groups, through `id -G`, from the other).
    const named = getpwnam(o.user);
    const digits = /^\d+$/.test(o.user);
    const pw = named ?? (digits ? { uid: Number(o.user), gid: getpwuid(Number(o.user))?.gid ?? -1 } : null);
    if (!pw) {
      process.stderr.write(`tapbrokerd: no user \`${shown(o.user)}'\n`);
      return EX.DATAERR;
    }
    if (named && digits && named.uid !== Number(o.user)) {
      process.stderr.write(`tapbrokerd: \`${o.user}' is read as the user of that name (uid ${named.uid}), as the `
        + `policy reads "${o.user}"; uid ${o.user} is another caller (${o.user} as an integer in the policy)\n`);
    }
    // A uid without an account has no groups here, but its primary gid, if it has one.
    const account = getpwuid(pw.uid);
    const groups = account ? groupsOf(account.name, account.gid) : [];
    // The name the broker goes by: getpwuid's (where accounts share a uid, another than the one given).
    const user = getpwuid(pw.uid)?.name ?? (/^\d+$/.test(o.user) ? null : o.user);
    if (user !== null && user !== o.user && !/^\d+$/.test(o.user)) {
      process.stderr.write(`tapbrokerd: uid ${pw.uid} is \`${user}' to the account database, the name the broker `
        + `goes by ({user} in name patterns), not \`${o.user}'\n`);
    }
    const caller = { uid: pw.uid, gid: pw.gid, groups, user };
    // Screened as the broker screens callers at accept: a subordinate uid (or primary gid) gets nothing.
    const host = hostIds();
    const refused = screenIds(caller, host.subuids, host.subgids).refused?.message ?? null;
    const allows = refused ? [] : policy.allow.filter((r) => matches(r.who, caller));
    const denies = policy.deny.filter((d) => matchesDeny(d.who, caller));
    const everything = (d: DenyRule) => d.bridges === null && d.parents === null && d.networks === null;
    // What of this user's own rules a deny closes, as the broker tells a refused caller (an outside review: a deny of
    // network lab closed lab2, on the same bridge, which only the broker's own hint said).
    const closes = (d: DenyRule) => {
      const s = denyScopeFor(policy, d, allows);
      return s === 'none of what your rules give' ? 'nothing the rules above give' : s;
    };
    const result = {
      user: o.user, uid: pw.uid, gid: pw.gid < 0 ? null : pw.gid, groups, refused_at_accept: refused,
      locked_out: lockedOut(policy, allows),
      denied_by: denies.map((d) => ({
        rule: d.name, file: d.file, line: d.line, bridges: everything(d) ? 'all' : d.bridges ?? [],
        parents: everything(d) ? 'all' : d.parents ?? [],
        networks: everything(d) ? 'all' : d.networks ?? [], covers: denyScope(policy, d), closes: closes(d),
      })),
      allowed_by: allows.map((r) => ({
        rule: r.name, file: r.file, line: r.line, bridges: r.bridges, macvtap: r.macvtap, networks: r.networks,
        max_queues: r.maxQueues, vhost: r.vhost,
        mac_prefix: r.macPrefix, persistent: r.persistent, name_pattern: r.namePattern, max_devices: r.maxDevices,
        mac_lock: r.macLock,
      })),
      // A tap given to a group is refused wherever any deny covers its target, whomever it names (decide).
      group_taps_refused: allows.filter((r) => r.persistent).flatMap((r) => policy.deny
        .filter((d) => denyTouches(policy, d, r))
        .map((d) => ({ rule: r.name, by: d.name, covers: denyScope(policy, d) }))),
    };
    if (o.json) write(JSON.stringify(result, null, 2));
    else {
      write(`user ${shown(o.user)}: uid ${pw.uid}, gid ${pw.gid < 0 ? 'none (no account)' : pw.gid}, `
        + `groups ${groups.join(',') || '-'}`);
      if (refused) write(`refused at accept: ${shown(refused)}`);
      else if (allows.length === 0) write('no rule allows this user anything (default deny)');
      else write(table([
        ['RULE', 'LINE', 'BRIDGES', 'MACVTAP', 'NETWORKS', 'QUEUES', 'VHOST', 'MAC PREFIX', 'PERSISTENT',
          'MAX DEVICES', 'MAC LOCK'],
        ...allows.map((r) => [r.name, ruleAt(policy.path, r), bridgeList(r.bridges, ',') || '-',
          r.macvtap.map((m) => `${m.parent}(${m.modes.join('/')})`).join(',') || '-', r.networks.join(',') || '-',
          String(r.maxQueues), r.vhost ? 'yes' : 'no', r.macPrefix, r.persistent ? 'yes' : 'no',
          String(r.maxDevices), macLockOf(policy, r)]),
      ]));
      for (const s of result.locked_out) {
        write(`\`${s.rule}' is not reached for ${s.targets.join(', ')} by requests \`${s.by}' allows: it comes first, `
          + 'and its mac_lock refuses them (TB_E_MAC_LOCK)');
      }
      for (const d of denies) {
        const scope = denyScope(policy, d);
        const why = shown(`denied by \`${d.name}' (${ruleAt(policy.path, d, true)}): ${scope}`);
        write(`${why} — deny wins over every rule above; of what they give, it closes ${shown(closes(d))}`);
      }
      for (const g of result.group_taps_refused) {
        write(shown(`\`${g.rule}' gives no tap given to a group (create --group) on ${g.covers}: deny \`${g.by}' `
          + 'covers it, whomever it names'));
      }
    }
    return EX.OK;
  }

  // who-can
  if ([o.bridge, o.macvtap, o.network].filter((x) => x !== null).length !== 1) {
    return toolUsage(tool, 'who-can needs exactly one of --bridge, --macvtap or --network');
  }
  const kind = o.bridge !== null ? 'tap' : o.macvtap !== null ? 'macvtap' : 'network';
  const target = (o.bridge ?? o.macvtap ?? o.network)!;
  const host = hostIds();
  if (kind === 'network' && !policy.networks.has(target)) {
    process.stderr.write(`tapbrokerd: no network \`${shown(target)}' in ${shown(o.file)}\n`);
    return EX.DATAERR;
  }
  // Every way a request can reach this target: by its own name and through each network onto it; for a network,
  // every way onto its segment (its bridge directly, other networks onto the same bridge and VLAN, an OVS trunk
  // carrying its VLAN), as its deny is (an outside review: `--network prod` left out a `bridges = ["*"]` rule
  // whose taps shared prod's bridge). Each is judged with the broker's own functions (resolveTarget,
  // denyCovers, sameSegment), so the tools cannot disagree.
  const asked: Target = kind === 'network' ? resolveTarget(policy, { kind: 'tap', parent: target, network: true })
    : resolveTarget(policy, { kind, parent: target, network: false });
  const viaNetwork = (n: { name: string }): Route =>
    ({ via: n.name, direct: false, t: resolveTarget(policy, { kind: 'tap', parent: n.name, network: true }) });
  const routes: Route[] = kind === 'network' ? [
    { via: null, direct: false, t: asked },
    ...(asked.kind === 'bridge' && portVlan(asked.vlan) === DEFAULT_PVID ? [{ via: null, direct: true,
      t: resolveTarget(policy, { kind: 'tap', parent: asked.name, network: false }) }] : []),
    ...[...policy.networks.values()].filter((n) => n.name !== target).map(viaNetwork)
      .filter(({ t }) => asked.kind !== 'hook' && t.kind !== 'hook' && sameSegment(asked, t)),
  ] : [
    { via: null, direct: true, t: asked },
    ...[...policy.networks.values()]
      .filter((n) => kind === 'tap' && (n.kind === 'bridge' || n.kind === 'ovs') && n.target === target)
      .map(viaNetwork),
  ];
  // The Linux bridge a route reaches directly (a `bridges` grant), if it does.
  const bridgeOf = (route: Route) => route.via === null && route.direct && kind !== 'macvtap' ? route.t.name : null;
  const grantsRoute = (r: AllowRule, route: Route) => route.via !== null ? r.networks.includes(route.via)
    : bridgeOf(route) !== null ? grantsBridge(r, bridgeOf(route)!) : kind === 'network' ? r.networks.includes(target)
      : r.macvtap.some((m) => m.parent === target && (o.mode === null || m.modes.includes(o.mode)));
  const grants = routes.flatMap((route) => policy.allow.filter((r) => grantsRoute(r, route))
    .map((r) => ({ r, route })));
  // Each deny with the routes it covers: a deny of one network onto a bridge does not keep anyone off the bridge.
  const denies = policy.deny.map((d) => ({ d, on: routes.filter(({ t }) => denyCovers(policy, d, t)) }))
    .filter(({ on }) => on.length > 0);
  // A locked grant where no port can be locked (a macvtap, an OVS or hook network) is refused at request time.
  const lockCell = (locked: boolean, via: string | null) => !locked ? 'no'
    : kind === 'macvtap' || (via !== null && policy.networks.get(via)!.kind !== 'bridge') ? 'refused' : 'yes';
  const routeName = ({ via, direct }: Route) => via !== null ? `network ${via}`
    : kind === 'network' ? (direct ? `the bridge ${asked.name} directly` : 'it directly')
      : `${kind === 'tap' ? 'the bridge' : 'it'} directly`;
  const result = {
    target: { kind, name: target, mode: o.mode },
    allowed_by: grants.map(({ r, route }) => ({
      rule: r.name, file: r.file, line: r.line, who: principals(r.who, host), via_network: route.via,
      via_bridge: kind === 'network' ? bridgeOf(route) : null,
      any_bridge: bridgeOf(route) !== null && !r.bridges.includes(bridgeOf(route)!),
      max_queues: r.maxQueues, vhost: r.vhost,
      persistent: r.persistent, max_devices: r.maxDevices,
      mac_lock: r.macLock || (route.via !== null && policy.networks.get(route.via)!.macLock)
        || (kind === 'network' && bridgeOf(route) === null && policy.networks.get(target)!.macLock),
    })),
    except: denies.map(({ d, on }) => ({
      rule: d.name, file: d.file, line: d.line, who: deniedPrincipals(d.who), routes: on.map(routeName),
    })),
    // A tap given to a group is refused wherever any deny covers its target, whomever it names (decide).
    group_taps: kind !== 'macvtap' && denies.length === 0,
    // A rule reached only after a locked one that refuses the same route to callers both may name (see decide).
    locked_out: grants.flatMap(({ r, route }, i) => {
      const via = route.via ?? (kind === 'network' ? target : null);
      const by = grants.slice(0, i).find((g) => g.route === route && lockCell(g.r.macLock, via) === 'refused'
        && overlaps(g.r.who, r.who));
      return by ? [{ rule: r.name, by: by.r.name, who: principals(by.r.who, host) }] : [];
    }),
  };
  if (o.json) write(JSON.stringify(result, null, 2));
  else {
    const net = kind === 'network' ? policy.networks.get(target)! : null;
    write(`${kind === 'tap' ? 'bridge' : kind === 'network' ? 'network' : 'macvtap parent'} ${shown(target)}`
      + `${o.mode ? ` (mode ${o.mode})` : ''}`
      + `${net ? ` (${net.kind} ${net.target}${net.vlan !== null ? `, vlan ${net.vlan}` : ''})` : ''}:`);
    if (grants.length === 0) write('nobody: no rule grants it');
    else write(table([['RULE', 'LINE', 'WHO', 'VIA', 'QUEUES', 'VHOST', 'PERSISTENT', 'MAX DEVICES', 'MAC LOCK'],
      ...result.allowed_by.map((a) => [a.rule, ruleAt(policy.path, a), a.who,
        a.via_network !== null ? `network ${a.via_network}` : a.any_bridge ? 'any Linux bridge'
          : a.via_bridge !== null ? `bridge ${a.via_bridge}` : '-',
        String(a.max_queues), a.vhost ? 'yes' : 'no', a.persistent ? 'yes' : 'no', String(a.max_devices),
        lockCell(a.mac_lock, a.via_network ?? (kind === 'network' ? target : null))])]));
    for (const l of result.locked_out) {
      write(shown(`\`${l.rule}' is not reached by ${l.who} for requests \`${l.by}' allows: it comes first for them, `
        + 'and its mac_lock refuses them (TB_E_MAC_LOCK)'));
    }
    for (const { d, on } of denies) {
      const only = on.length < routes.length ? ` (on ${on.map(routeName).join(', ')} only)` : '';
      const who = `except ${deniedPrincipals(d.who)}${only}`;
      write(shown(`${who}: denied by \`${d.name}' (${ruleAt(policy.path, d, true)})`));
    }
    if (kind !== 'macvtap' && denies.length > 0 && grants.some(({ r }) => r.persistent)) {
      write('and for everyone: no tap on it is given to a group (create --group) while a deny rule covers it');
    }
  }
  return EX.OK;
}
