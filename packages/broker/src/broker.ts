// The privileged path, in order: accept → peer identity from the kernel → (session.ts: decode, dispatch
// by op) → validate → policy decision → netdev operation → lease → audit record → (session.ts: reply
// with fds, close the broker's copies). This file holds the handlers and the leases' lifetimes.
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import {
  MAX_REPLY_BYTES, MAX_REQUEST_BYTES, PROTOCOL_VERSION, SeqpacketConnection, TapbrokerError,
  checkIfName, checkMac, encodeFrame, macFromBuffer, macToBuffer, sys, watchReadable,
  type CanRequest, type CreateMacvtapRequest, type CreateTapRequest, type Device, type HelloRequest,
  type ListRequest, type ReleaseRequest, type Reply, type SeqpacketListener,
} from '@tapbroker/protocol';
import { Audit, type AuditOptions } from './audit.js';
import { identify, type Identity } from './identity.js';
import { LeaseTable, leaseAlias, leaseFromAlias, leaseView, newLeaseId, processStartTime, type LeaseRecord } from './leases.js';
import { Session } from './session.js';
import { hook } from './testhook.js';
import { runHook } from './hook.js';
import { addPort, delPort, listOurPorts, ovsdbTarget } from './ovs.js';
import { Netdev, closeInBackground, type CreatedTap } from './netdev.js';
import { MAX_QUEUES, decide, hookUnsafe, loadPolicy, type Policy } from './policy.js';
import { LinkMonitor, RTM_DELLINK, deleteLinkInBackground, type Link } from './rtnetlink.js';

export const BROKER_VERSION = 'tapbrokerd 0.2.0';
/** Fds a request may (wrongly) carry that are received and closed; the kernel closes any beyond. */
const MAX_REQUEST_FDS = 16;

export interface BrokerOptions {
  policy: Policy;
  /** Where the lease table lives; null keeps it in memory (tests, embedding). */
  stateDir: string | null;
  /** The policy file, re-read by reload(); null when the policy did not come from a file. */
  policyPath?: string | null;
  /** Where audit records go. */
  audit?: AuditOptions;
  /** A connection that has not said hello by then is closed. */
  helloTimeoutMs?: number;
  maxConnections?: number;
  /** Connections one uid may hold at once, so no user can take every slot (default 64). */
  maxConnectionsPerUser?: number;
  log?: (line: string) => void;
}

/** What a handler returns: the reply and the fds that travel with it. */
export interface Outcome {
  reply: Reply;
  fds: number[];
}

const KERNEL_KIND = { tap: 'tun', macvtap: 'macvtap' } as const;

export class Broker {
  policy: Policy;
  readonly netdev = new Netdev();
  readonly audit: Audit;
  readonly leases: LeaseTable;
  readonly stateDir: string | null;
  readonly policyPath: string | null;
  private readonly leasesTrusted: boolean;
  private readonly sessions = new Set<Session>();
  /** pidfd watches of holders whose leases outlived a broker restart. */
  private readonly holderWatches = new Map<string, { close(): void }>();
  private readonly deletions = new Set<Promise<unknown>>();
  private listener: SeqpacketListener | null = null;
  private monitor: LinkMonitor | null = null;
  readonly helloTimeoutMs: number;
  private readonly maxConnections: number;
  private readonly maxConnectionsPerUser: number;
  private readonly log: (line: string) => void;

  constructor(opts: BrokerOptions) {
    this.policy = opts.policy;
    this.stateDir = opts.stateDir;
    this.policyPath = opts.policyPath ?? null;
    this.audit = new Audit(() => this.policy.sha256, opts.audit);
    this.helloTimeoutMs = opts.helloTimeoutMs ?? 5000;
    this.maxConnections = opts.maxConnections ?? 1024;
    this.maxConnectionsPerUser = opts.maxConnectionsPerUser ?? 64;
    this.log = opts.log ?? (() => {});
    const { table, problem, trusted } = LeaseTable.load(opts.stateDir);
    this.leases = table;
    this.leasesTrusted = trusted;
    if (problem) this.log(`warning: ${problem}`);
  }

  /** Reconciles the lease table with the kernel, follows link events, and serves `listener`. */
  start(listener: SeqpacketListener): void {
    this.monitor = new LinkMonitor((type, link) => { if (type === RTM_DELLINK) this.linkGone(link); }, () => this.resync());
    this.reconcile();
    void this.track(this.reconcileOvs());
    // Written at every start, so that from now on a missing file means it was lost, not never made.
    this.leases.save();
    this.listener = listener;
    listener.start((fd) => this.accept(fd));
  }

  get connections(): number {
    return this.sessions.size;
  }

  /** Stops accepting, lets requests in flight finish, closes every connection; leases stay on disk. */
  async shutdown(): Promise<void> {
    this.listener?.close();
    this.listener = null;
    await Promise.all([...this.sessions].map((s) => s.finish()));
    await Promise.all([...this.deletions]);
    for (const w of this.holderWatches.values()) w.close();
    this.holderWatches.clear();
    this.monitor?.close();
    this.netdev.close();
    this.audit.close();
  }

  /**
   * Re-reads the policy file. A valid one applies to requests from now on; an invalid one is refused
   * with its errors and the last good policy stays. Leases are never touched.
   */
  reload(caller: Partial<Identity> | null): Policy {
    const before = this.policy.sha256;
    try {
      if (!this.policyPath) throw new TapbrokerError('TB_E_POLICY_INVALID', 'the policy did not come from a file');
      const next = loadPolicy(this.policyPath);
      for (const w of next.warnings) this.log(`warning: ${w}`);
      this.policy = next;
      this.audit.record({ op: 'reload', decision: 'reload', rule: null, caller, message: `policy ${before} replaced by ${next.sha256}` });
      return next;
    } catch (err) {
      const e = err instanceof TapbrokerError ? err : new TapbrokerError('TB_E_POLICY_INVALID', String(err));
      this.audit.record({ op: 'reload', decision: 'error', rule: null, caller, code: e.code, message: `${e.message} (keeping ${before})` });
      throw e;
    }
  }

  /** Idle: no connection and no lease. */
  get idle(): boolean {
    return this.sessions.size === 0 && this.leases.size === 0;
  }

  private accept(fd: number): void {
    const conn = new SeqpacketConnection(fd, { maxPacket: MAX_REQUEST_BYTES, maxFds: MAX_REQUEST_FDS });
    let caller: Identity;
    try {
      caller = identify(conn.peer());
    } catch {
      conn.close(); // The peer vanished before we could ask who it was.
      return;
    }
    const session = new Session(this, conn, caller);
    if (this.sessions.size >= this.maxConnections) {
      void session.refuse('TB_E_BUSY', `the broker is at its limit of ${this.maxConnections} connections; try again`);
      return;
    }
    let mine = 0;
    for (const s of this.sessions) if (s.caller.uid === caller.uid) mine++;
    if (caller.uid !== 0 && mine >= this.maxConnectionsPerUser) {
      void session.refuse('TB_E_BUSY', `uid ${caller.uid} already holds ${mine} connections, the most one user may`);
      return;
    }
    this.sessions.add(session);
    void session.run().finally(() => this.sessions.delete(session));
  }

  // ---- handlers, one per op ----

  hello(req: HelloRequest): Outcome {
    if (req.version !== PROTOCOL_VERSION) {
      throw new TapbrokerError('TB_E_VERSION', `client speaks protocol version ${req.version}; this broker speaks ${PROTOCOL_VERSION}`);
    }
    return { reply: { op: 'hello', id: req.id, version: PROTOCOL_VERSION, broker: BROKER_VERSION }, fds: [] };
  }

  /** create-tap and create-macvtap: one path, so both get the same checks in the same order. */
  async create(caller: Identity, req: CreateTapRequest | CreateMacvtapRequest, session: Session): Promise<Outcome> {
    const kind = req.op === 'create-tap' ? 'tap' : 'macvtap';
    const network = req.op === 'create-tap' ? req.network ?? null : null;
    const parent = req.op === 'create-tap' ? req.bridge ?? req.network ?? '' : req.parent;
    const mode = req.op === 'create-macvtap' ? req.mode ?? 'bridge' : null;
    const queues = req.queues ?? 1;
    const vhost = req.vhost ?? false;
    const vnetHdr = req.vnet_hdr ?? true;
    const persistent = req.persistent ?? false;
    const group = req.op === 'create-tap' ? req.group ?? null : null;
    const request = { kind, parent, network, mode, queues, vhost, vnet_hdr: vnetHdr, mac: req.mac ?? null, name: req.name ?? null, persistent, group };
    let audited = false;
    try {
      if (req.op === 'create-tap' && (req.bridge === undefined) === (req.network === undefined)) {
        throw new TapbrokerError('TB_E_INVALID_REQUEST', 'create-tap needs exactly one of bridge or network');
      }
      validateCreate(caller, { kind, parent, network: network !== null, queues, mac: req.mac, name: req.name, persistent, vhost, group });
      const decision = decide(this.policy, caller, { kind, parent, network: network !== null, mode, queues, vhost, mac: req.mac ?? null, name: req.name ?? null, persistent }, (rule) => this.liveDevices(caller.uid, rule));
      if (!decision.allow) {
        this.audit.record({ op: req.op, decision: 'deny', rule: decision.rule, caller, request, code: decision.code, message: decision.message });
        audited = true;
        throw new TapbrokerError(decision.code, decision.message, { rule: decision.rule ?? 'no rule matched', hint: decision.hint });
      }
      const rule = decision.rule;
      // Nothing is awaited between the decision and the lease: concurrent requests see each other's quota.
      const target = this.resolveTarget(kind, parent, network);
      const mac = req.mac ?? randomMac(rule.macPrefix);
      const owner = persistent ? { uid: caller.uid, gid: group } : null;
      const ends = persistent ? 'release' : kind === 'tap' ? 'fds' : 'holder';
      // The lease is written into the device itself (ifalias), so a crash between here and the lease
      // table leaves a device the next start recognises as ours.
      const draft: LeaseRecord = {
        id: newLeaseId(), uid: caller.uid, user: caller.user, kind, name: '', ifindex: 1, parent: target.parentName, network, mode, mac,
        queues, rule: rule.name, created: new Date().toISOString(), ends,
        holder: ends === 'holder' ? caller.pid : null, holder_start: ends === 'holder' ? processStartTime(caller.pid) : null,
      };
      const alias = leaseAlias(draft);
      const created = this.createNamed(caller.uid, req.name, (name): CreatedTap => {
        if (kind === 'tap') return this.netdev.createTap({ name, queues, vnetHdr, vhost, guestMac: macToBuffer(mac), bridge: target.bridge, vlan: target.vlan, persistent: owner, alias });
        this.leases.intend({ id: draft.id, name, parent: target.parentName, mac });
        try {
          return this.netdev.createMacvtap({ name, parent: target.link!, mode: mode!, queues, vnetHdr, vhost, guestMac: macToBuffer(mac), persistent: owner, alias }, this.stateDir ?? os.tmpdir());
        } catch (err) {
          this.leases.settle(draft.id);
          throw err;
        }
      });
      this.leases.settle(draft.id, false);
      // passthru: the kernel gives the macvtap its parent's MAC, whatever was asked; the guest must use it.
      const actualMac = kind === 'macvtap' ? macFromBuffer(created.hostMac) : mac;
      const lease: LeaseRecord = { ...draft, name: created.name, ifindex: created.ifindex, mac: actualMac };
      this.leases.add(lease);
      hook('create:leased');
      const fds = persistent ? [] : [...created.tapFds, ...created.vhostFds];
      // Open vSwitch or a hook plugs the device now; if that fails, everything above is undone.
      const plugged = await this.plug(lease, 'up').catch((err: unknown) => {
        this.leases.remove(lease.id);
        void closeInBackground([...created.tapFds, ...created.vhostFds]);
        if (persistent || kind === 'macvtap') void this.track(deleteLinkInBackground(created.ifindex)).catch(() => {});
        throw err;
      });
      if (ends === 'holder') session.hold(lease.id);
      const device: Device = {
        kind, name: created.name, ifindex: created.ifindex, parent: target.parentName, network, vlan: target.vlan, mode, mtu: created.mtu,
        host_mac: macFromBuffer(created.hostMac), mac: actualMac, queues, vnet_hdr: vnetHdr, vhost, persistent, rule: rule.name,
      };
      this.audit.record({ op: req.op, decision: 'grant', rule: rule.name, caller, request, device: { ...device, lease: lease.id, ...(plugged ? { plug: plugged } : {}) } });
      // A persistent device keeps no fd: the broker's one goes now, and none is sent.
      if (persistent) void closeInBackground(created.tapFds);
      const body = { id: req.id, device, fds: { tap: persistent ? 0 : created.tapFds.length, vhost: persistent ? 0 : created.vhostFds.length } };
      return { reply: req.op === 'create-tap' ? { op: 'create-tap', ...body } : { op: 'create-macvtap', ...body }, fds };
    } catch (err) {
      if (!audited) {
        const e = err instanceof TapbrokerError ? err : new TapbrokerError('TB_E_INTERNAL', String(err));
        const plug = (err as { hook?: unknown }).hook;
        this.audit.record({ op: req.op, decision: 'error', rule: null, caller, request, code: e.code, message: e.message, ...(plug ? { device: { plug } } : {}) });
      }
      throw err;
    }
  }

  /** Where a new device goes: a Linux bridge (maybe with a VLAN), a macvtap parent, or an OVS bridge or hook network. */
  private resolveTarget(kind: 'tap' | 'macvtap', parent: string, network: string | null): { link: Link | null; bridge: Link | null; vlan: number | null; parentName: string } {
    if (kind === 'macvtap') {
      const link = this.netdev.macvtapParent(parent);
      return { link, bridge: null, vlan: null, parentName: link.name };
    }
    if (network === null) {
      const bridge = this.netdev.bridge(parent);
      return { link: bridge, bridge, vlan: null, parentName: bridge.name };
    }
    const net = this.policy.networks.get(network)!;
    if (net.kind === 'bridge') {
      const bridge = this.netdev.bridge(net.target);
      if (net.vlan !== null) this.netdev.checkVlanFiltering(bridge);
      return { link: bridge, bridge, vlan: net.vlan, parentName: bridge.name };
    }
    // An OVS bridge that does not exist makes add-port fail, and the grant is rolled back then.
    if (net.kind === 'ovs') return { link: null, bridge: null, vlan: net.vlan, parentName: net.target };
    const unsafe = hookUnsafe(net.target);
    if (unsafe) throw new TapbrokerError('TB_E_HOOK_FAILED', `hook ${net.target} ${unsafe}; not run`);
    return { link: null, bridge: null, vlan: null, parentName: '-' };
  }

  /** Joins (`up`) or leaves (`down`) a device to its named network where OVS or a hook does that. */
  private async plug(l: LeaseRecord, action: 'up' | 'down'): Promise<Record<string, unknown> | null> {
    const net = l.network ? this.policy.networks.get(l.network) : undefined;
    if (!net || net.kind === 'bridge') return null;
    if (net.kind === 'ovs') {
      const db = ovsdbTarget(net.ovsdb ?? undefined);
      if (action === 'up') {
        await addPort(db, net.target, l.name, {
          ...(net.vlan !== null ? { tag: net.vlan } : {}), ...(net.trunk !== null ? { trunks: [...net.trunk] } : {}),
          externalIds: { 'tapbroker-lease': l.id, 'tapbroker-uid': String(l.uid), 'tapbroker-mac': l.mac, 'tapbroker-rule': l.rule },
        });
      } else await delPort(db, net.target, l.name);
      return { ovs: net.target, action, ...(net.vlan !== null ? { tag: net.vlan } : {}) };
    }
    const r = await runHook(net.target, action, { device: l.name, ifindex: l.ifindex, mac: l.mac, uid: l.uid, network: net.name, lease: l.id }, net.hookTimeoutMs);
    return { hook: net.target, action, code: r.code, stdout: r.stdout, stderr: r.stderr, ms: r.ms };
  }

  /** After a device of a named network is gone or going: its OVS port record or hook `down`. Never throws. */
  private unplug(l: LeaseRecord): void {
    if (!l.network) return;
    void this.track(this.plug(l, 'down')).then(
      (r) => { if (r) this.audit.record({ op: 'cleanup', decision: 'cleanup', rule: l.rule, caller: { uid: l.uid }, device: { ...leaseView(l), plug: r }, message: 'unplugged from its network' }); },
      (err: Error) => this.audit.record({ op: 'cleanup', decision: 'error', rule: l.rule, caller: { uid: l.uid }, device: leaseView(l), code: 'TB_E_HOOK_FAILED', message: `unplugging failed: ${err.message}` }),
    );
  }

  /** The caller's leases, oldest first (root: everyone's), as many as one reply holds. */
  list(caller: Identity, req: ListRequest): Outcome {
    for (const l of this.leases.all()) if ((caller.uid === 0 || l.uid === caller.uid) && !this.deviceOf(l) && this.leases.get(l.id)) this.dropVanished(l);
    const mine = this.leases.all().filter((l) => caller.uid === 0 || l.uid === caller.uid).sort((a, b) => a.created.localeCompare(b.created)).map(leaseView);
    let n = mine.length;
    const reply = (): Reply => ({ op: 'list', id: req.id, leases: mine.slice(0, n), truncated: n < mine.length });
    while (n > 0 && encodeFrame(reply()).length > MAX_REPLY_BYTES) n = Math.floor(n * 0.9);
    return { reply: reply(), fds: [] };
  }

  /**
   * release: the caller's persistent lease with this name (root: anyone's), and only while the device
   * carrying the name is that very lease's device (ifindex and kind), never a same-named other one.
   */
  async release(caller: Identity, req: ReleaseRequest): Promise<Outcome> {
    const request = { name: req.name };
    const refuse = (message: string): never => {
      this.audit.record({ op: 'release', decision: 'deny', rule: null, caller, request, code: 'TB_E_NO_SUCH_LEASE', message });
      throw new TapbrokerError('TB_E_NO_SUCH_LEASE', message, { hint: 'tapbroker list shows your leases' });
    };
    const why = checkIfName(req.name);
    if (why) refuse(`name \`${printable(req.name)}' ${why}`);
    // One answer whether the name is unknown or someone else's: the reply reveals nothing of other users.
    const lease = this.leases.all().find((l) => l.name === req.name && l.ends === 'release' && (caller.uid === 0 || l.uid === caller.uid));
    if (!lease) return refuse(`you hold no persistent device named \`${req.name}'`);
    const link = this.netdev.rtnl.getLinkByIndex(lease.ifindex);
    if (!link || link.name !== lease.name || link.kind !== KERNEL_KIND[lease.kind]) {
      this.leases.remove(lease.id);
      this.audit.record({ op: 'release', decision: 'reconcile', rule: lease.rule, caller: { uid: lease.uid }, device: leaseView(lease), message: 'the lease\'s device is gone; lease dropped' });
      return refuse(`you hold no persistent device named \`${req.name}'`);
    }
    // Out of the table first, so a racing request cannot act on it twice.
    this.leases.remove(lease.id);
    hook('release:unleased');
    try {
      await this.track(deleteLinkInBackground(lease.ifindex));
      hook('release:deleted');
    } catch (err) {
      this.leases.add(lease);
      const e = new TapbrokerError('TB_E_KERNEL', `failed to delete \`${lease.name}': ${err instanceof sys.SyscallError ? `${err.reason} (${err.code})` : String(err)}`);
      this.audit.record({ op: 'release', decision: 'error', rule: lease.rule, caller, request, code: e.code, message: e.message });
      throw e;
    }
    this.unplug(lease);
    this.audit.record({ op: 'release', decision: 'release', rule: lease.rule, caller, request, device: leaseView(lease) });
    return { reply: { op: 'release', id: req.id, lease: leaseView(lease) }, fds: [] };
  }

  reloadOp(caller: Identity, id: number): Outcome {
    if (caller.uid !== 0) {
      this.audit.record({ op: 'reload', decision: 'deny', rule: null, caller, code: 'TB_E_POLICY_DENIED', message: 'only root may reload the policy' });
      throw new TapbrokerError('TB_E_POLICY_DENIED', 'only root may reload the policy', { rule: 'no rule matched', hint: 'run it as root, or send tapbrokerd SIGHUP' });
    }
    return { reply: { op: 'reload', id, policy_sha256: this.reload(caller).sha256 }, fds: [] };
  }

  /** can: the decision a create request would get now, as this caller, with nothing created. */
  can(caller: Identity, req: CanRequest): Outcome {
    const queues = req.queues ?? 1;
    const persistent = req.persistent ?? false;
    const vhost = req.vhost ?? false;
    const kind = req.kind === 'network' ? 'tap' : req.kind;
    const network = req.kind === 'network';
    validateCreate(caller, { kind, parent: req.parent, network, queues, mac: req.mac, name: req.name, persistent, vhost, group: null });
    const mode = req.kind === 'macvtap' ? req.mode ?? 'bridge' : null;
    const d = decide(this.policy, caller, { kind, network, parent: req.parent, mode, queues, vhost, mac: req.mac ?? null, name: req.name ?? null, persistent }, (rule) => this.liveDevices(caller.uid, rule));
    const request = { kind: req.kind, parent: req.parent, mode, queues, vhost, persistent };
    this.audit.record({ op: 'can', decision: d.allow ? 'grant' : 'deny', rule: d.allow ? d.rule.name : d.rule, caller, request, ...(d.allow ? {} : { code: d.code, message: d.message }) });
    const reply: Reply = d.allow
      ? { op: 'can', id: req.id, allow: true, rule: d.rule.name, message: `rule \`${d.rule.name}' would grant it` }
      : { op: 'can', id: req.id, allow: false, rule: d.rule, code: d.code, message: d.message, hint: d.hint };
    return { reply, fds: [] };
  }

  // ---- leases ----

  /** Live devices of `uid` under `rule`; a lease whose device vanished is dropped on the way. */
  private liveDevices(uid: number, rule: string): number {
    let n = 0;
    for (const l of this.leases.all()) {
      if (l.uid !== uid || l.rule !== rule) continue;
      if (this.deviceOf(l)) n++;
      else this.dropVanished(l);
    }
    return n;
  }

  /**
   * The kernel link that is this lease's device, or null. A tap handed out by fd that its holder made
   * persistent (TUNSETPERSIST needs no capability on an attached fd) would outlive its lease's terms:
   * where the rule allows persistent devices its lease becomes one (releasable, counted); otherwise
   * the device is deleted.
   */
  private deviceOf(l: LeaseRecord): Link | null {
    const link = this.netdev.rtnl.getLinkByIndex(l.ifindex);
    if (!link || link.name !== l.name || link.kind !== KERNEL_KIND[l.kind]) return null;
    if (l.ends === 'fds' && link.persist) {
      const rule = this.policy.allow.find((r) => r.name === l.rule);
      if (rule?.persistent) {
        const converted: LeaseRecord = { ...l, ends: 'release' };
        this.leases.add(converted);
        this.audit.record({ op: 'reconcile', decision: 'reconcile', rule: l.rule, caller: { uid: l.uid }, device: leaseView(converted), message: 'its holder made it persistent; the rule allows that: it is now a persistent lease' });
      } else {
        this.leases.remove(l.id);
        void this.track(deleteLinkInBackground(l.ifindex)).catch(() => {});
        this.audit.record({ op: 'cleanup', decision: 'cleanup', rule: l.rule, caller: { uid: l.uid }, device: leaseView(l), message: `its holder made it persistent, which rule \`${l.rule}' does not allow: deleted` });
        return null;
      }
    }
    return link;
  }

  private dropVanished(l: LeaseRecord): void {
    if (!this.leases.remove(l.id)) return;
    this.unplug(l);
    this.holderWatches.get(l.id)?.close();
    this.holderWatches.delete(l.id);
    this.audit.record({ op: 'cleanup', decision: 'cleanup', rule: l.rule, caller: { uid: l.uid }, device: leaseView(l), message: l.ends === 'fds' ? 'the device vanished with its last fd' : 'the device vanished' });
  }

  private linkGone(link: Link): void {
    const l = this.leases.byIfindex(link.index);
    if (l && l.name === link.name) this.dropVanished(l);
  }

  /** After lost link events: check every lease against the kernel. */
  private resync(): void {
    for (const l of this.leases.all()) if (!this.deviceOf(l)) this.dropVanished(l);
  }

  /** Ends a lease that lives as long as its holder: the device is deleted (off the event loop). */
  endLease(id: string, reason: string): void {
    const l = this.leases.get(id);
    if (!l) return;
    this.leases.remove(id);
    this.holderWatches.get(id)?.close();
    this.holderWatches.delete(id);
    if (this.deviceOf(l)) void this.track(deleteLinkInBackground(l.ifindex)).catch((err: Error) => this.log(`failed to delete \`${l.name}': ${err.message}`));
    this.unplug(l);
    this.audit.record({ op: 'cleanup', decision: 'cleanup', rule: l.rule, caller: { uid: l.uid }, device: leaseView(l), message: reason });
  }

  /**
   * At start: drop leases whose device is gone; delete devices whose holder exited while the broker
   * was down; watch holders still running; keep persistent devices. Devices without a lease are never touched.
   */
  reconcile(): void {
    // A macvtap intended but perhaps never tagged: the device of that name, on that parent, with that
    // MAC, untagged or tagged with that lease, is the one we were making.
    for (const i of this.leases.unsettled()) {
      const link = this.netdev.rtnl.getLinkByName(i.name);
      const parent = this.netdev.rtnl.getLinkByName(i.parent);
      const ours = link && parent && link.kind === 'macvtap' && link.link === parent.index && link.address && macFromBuffer(link.address) === i.mac
        && (link.alias === null || leaseFromAlias(link.alias, link)?.id === i.id);
      if (ours && !this.leases.get(i.id)) {
        void this.track(deleteLinkInBackground(link.index)).catch(() => {});
        this.audit.record({ op: 'reconcile', decision: 'reconcile', rule: null, caller: null, device: { name: i.name, parent: i.parent, mac: i.mac, lease: i.id }, message: 'a macvtap the broker died while creating: deleted' });
      }
      this.leases.settle(i.id, false);
    }
    // Devices that carry our tag but have no lease: orphans of a crash mid-create or mid-release when
    // the table is intact (deleted), or leases to rebuild when it was lost or corrupt.
    for (const link of this.netdev.rtnl.dumpLinks()) {
      const tagged = leaseFromAlias(link.alias, link);
      if (!tagged || this.leases.get(tagged.id) || link.kind !== KERNEL_KIND[tagged.kind]) continue;
      if (this.leasesTrusted) {
        void this.track(deleteLinkInBackground(link.index)).catch((err: Error) => this.log(`failed to delete \`${link.name}': ${err.message}`));
        this.audit.record({ op: 'reconcile', decision: 'reconcile', rule: tagged.rule, caller: { uid: tagged.uid }, device: leaseView(tagged), message: 'a device of ours without a lease (the broker died mid-create or mid-release): deleted' });
      } else {
        this.leases.add(tagged);
        this.audit.record({ op: 'reconcile', decision: 'reconcile', rule: tagged.rule, caller: { uid: tagged.uid }, device: leaseView(tagged), message: 'lease rebuilt from the device\'s tag' });
      }
    }
    for (const l of this.leases.all()) {
      if (!this.deviceOf(l)) {
        this.leases.remove(l.id);
        this.audit.record({ op: 'reconcile', decision: 'reconcile', rule: l.rule, caller: { uid: l.uid }, device: leaseView(l), message: 'the device is gone; lease dropped' });
        continue;
      }
      if (l.ends !== 'holder') continue;
      const pidfd = l.holder === null ? null : sys.pidfdOpen(l.holder);
      // The pid is only the holder if the process started when the holder did.
      if (pidfd !== null && processStartTime(l.holder!) === l.holder_start) {
        const watch = watchReadable(pidfd, () => this.endLease(l.id, 'its holder exited'));
        this.holderWatches.set(l.id, { close: () => { watch.close(); sys.close(pidfd); } });
        this.audit.record({ op: 'reconcile', decision: 'reconcile', rule: l.rule, caller: { uid: l.uid }, device: leaseView(l), message: `holder pid ${l.holder} still runs; watching it` });
      } else {
        if (pidfd !== null) sys.close(pidfd);
        this.endLease(l.id, 'its holder exited while the broker was down');
      }
    }
  }

  /**
   * OVS keeps a port record after its tap is gone. At start, remove every port that carries our
   * external-ids but whose lease is gone or whose device is not the lease's; never a port without them.
   */
  async reconcileOvs(): Promise<void> {
    const dbs = new Set([...this.policy.networks.values()].filter((n) => n.kind === 'ovs').map((n) => ovsdbTarget(n.ovsdb ?? undefined)));
    for (const db of dbs) {
      let ports: Awaited<ReturnType<typeof listOurPorts>>;
      try {
        ports = await listOurPorts(db);
      } catch (err) {
        this.log(`warning: cannot reconcile open vswitch at ${db}: ${(err as Error).message}`);
        continue;
      }
      for (const p of ports) {
        const l = this.leases.get(p.lease);
        if (l && l.name === p.port && this.deviceOf(l)) continue;
        try {
          await delPort(db, p.bridge, p.port);
          this.audit.record({ op: 'reconcile', decision: 'reconcile', rule: l?.rule ?? null, caller: { uid: p.uid }, device: { name: p.port, ovs: p.bridge, lease: p.lease }, message: 'a stale open vswitch port of ours: removed' });
        } catch (err) {
          this.log(`failed to remove stale port ${p.port} from ${p.bridge}: ${(err as Error).message}`);
        }
      }
    }
  }

  private track<T>(p: Promise<T>): Promise<T> {
    this.deletions.add(p);
    void p.catch(() => {}).finally(() => this.deletions.delete(p));
    return p;
  }

  /** Tries the caller's name, or broker-chosen names `tb<uid>-<random>` until one is free. */
  private createNamed(uid: number, asked: string | undefined, create: (name: string) => CreatedTap): CreatedTap & { name: string } {
    if (asked !== undefined) return { ...create(asked), name: asked };
    for (let attempt = 0; ; attempt++) {
      const name = tapName(uid);
      try {
        return { ...create(name), name };
      } catch (err) {
        if (!(err instanceof TapbrokerError && err.code === 'TB_E_DEVICE_EXISTS') || attempt >= 8) throw err;
      }
    }
  }
}

/** Broker-chosen names begin with `tb<uid>-`, so no user can mimic a host device or another user's. */
export function namePrefix(uid: number): string {
  return `tb${uid}-`;
}

const BASE36 = '0123456789abcdefghijklmnopqrstuvwxyz';

/** `tb<uid>-` followed by random base-36 characters up to 15 bytes (at most 6 of them, at least 2). */
export function tapName(uid: number): string {
  const prefix = namePrefix(uid);
  const n = Math.max(2, Math.min(6, 15 - prefix.length));
  return prefix + [...randomBytes(n)].map((b) => BASE36[b % 36]).join('');
}

/** A random unicast MAC inside `prefix`. */
export function randomMac(prefix: string): string {
  const fixed = prefix.split(':');
  const rest = [...randomBytes(6 - fixed.length)].map((b) => b.toString(16).padStart(2, '0'));
  return [...fixed, ...rest].join(':');
}

interface CreateFields {
  kind: 'tap' | 'macvtap';
  parent: string;
  /** `parent` names a network. */
  network: boolean;
  queues: number;
  mac: string | undefined;
  name: string | undefined;
  persistent: boolean;
  vhost: boolean;
  group: number | null;
}

/** Grammar of every field, exactly as it will reach the kernel. */
function validateCreate(caller: Identity, f: CreateFields): void {
  if (f.network) {
    if (!/^[A-Za-z0-9_.-]{1,64}$/.test(f.parent)) throw new TapbrokerError('TB_E_INVALID_NAME', `network name \`${printable(f.parent)}' must be 1-64 characters of A-Z a-z 0-9 _ . -`);
  } else {
    const parentWhy = checkIfName(f.parent);
    if (parentWhy) throw new TapbrokerError('TB_E_INVALID_NAME', `${f.kind === 'tap' ? 'bridge' : 'parent'} name \`${printable(f.parent)}' ${parentWhy}`);
  }
  if (f.queues < 1 || f.queues > MAX_QUEUES) throw new TapbrokerError('TB_E_INVALID_QUEUES', `queues must be from 1 to ${MAX_QUEUES}, not ${f.queues}`);
  if (f.mac !== undefined) {
    const why = checkMac(f.mac);
    if (why) throw new TapbrokerError('TB_E_INVALID_MAC', `mac \`${printable(f.mac)}' ${why}`);
  }
  if (f.name !== undefined) {
    const why = checkIfName(f.name);
    if (why) throw new TapbrokerError('TB_E_INVALID_NAME', `name \`${printable(f.name)}' ${why}`);
  }
  if (f.persistent && f.vhost) throw new TapbrokerError('TB_E_INVALID_REQUEST', 'vhost-net fds travel with a fd-passed device; a persistent one gets none');
  if (f.group !== null && !f.persistent) throw new TapbrokerError('TB_E_INVALID_REQUEST', 'group is for persistent devices');
  if (f.group !== null && f.group !== caller.gid && !caller.groups.includes(f.group)) {
    throw new TapbrokerError('TB_E_POLICY_DENIED', `you are not in group ${f.group}`, { rule: 'no rule matched', hint: 'name one of your own groups' });
  }
}

/** Caller-supplied text as it may appear in a message: control characters escaped, length bounded. */
function printable(s: string): string {
  return JSON.stringify(s.slice(0, 64)).slice(1, -1);
}
