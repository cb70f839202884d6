// An in-memory model of the kernel the broker acts on (the Kernel seam of netdev.ts): links with their
// names, kinds, masters, MACs, tags and owners, a bridge's forwarding entries, and link events delivered
// when the broker catches up. It lets the handlers (ops.ts) and lease lifetimes run as an unprivileged
// unit test. It is a model, not the kernel: integration tests check the real Netdev against the kernel's
// own answers; this one checks what the broker decides, creates, records and replies around it.
import fs from 'node:fs';
import { TapbrokerError, macFromBuffer, macToBuffer } from '@tapbroker/protocol';
import {
  hostMac, vhostUnavailable, type Cleanup, type CreatedTap, type FaultPoint, type Kernel, type Link, type MacvtapRequest,
  type TapRequest, type Wants,
} from '@tapbroker/broker/internal';

const RTM_NEWLINK = 16;
const RTM_DELLINK = 17;
const IFF_UP = 0x1;
const IFF_LOOPBACK = 0x8;

export interface FakeBridge {
  mtu?: number;
  /** An administrator set its MAC (addr_assign_type 3); otherwise the broker must refuse it. */
  pinned?: boolean;
  /** IFLA_BR_VLAN_FILTERING; null: the kernel has none. */
  vlanFiltering?: boolean | null;
}

export class FakeKernel implements Kernel {
  /** Every link in the namespace, by ifindex. */
  readonly devices = new Map<number, Link>();
  /** Kernel steps in order, as `step name` lines: what the broker did, for the tests to compare. */
  readonly steps: string[] = [];
  /** Forwarding entries: `bridge/mac/vlan` → the port and whether it is static. */
  readonly fdb = new Map<string, { port: number; static: boolean }>();
  readonly locked = new Set<number>();
  /** Ports of a VLAN-filtering bridge → their access VLAN (a port that leaves its bridge loses it). */
  readonly vlans = new Map<number, number>();
  /** /dev/vhost-net exists. */
  vhost = false;
  /** This kernel can lock bridge ports (Linux ≥ 5.18). */
  canLock = true;
  /** A kernel refusal (TB_E_KERNEL) at this fault point of the next create. */
  refuseAt: FaultPoint | null = null;
  private readonly pinned = new Set<number>();
  private readonly events: Array<[number, Link]> = [];
  private lost = false;
  private listeners: Array<{
    onLink: (type: number, link: Link) => void;
    wants: Wants;
  }> = [];
  private nextIndex = 2;
  private readonly fds = new Map<number, number>();

  constructor(private readonly cleanup: Cleanup) {
    this.add({ name: 'lo', kind: null, flags: IFF_LOOPBACK | IFF_UP, mtu: 65536 });
  }

  // ---- the state a test sets up

  addBridge(name: string, opts: FakeBridge = {}): Link {
    const link = this.add({ name, kind: 'bridge', mtu: opts.mtu ?? 1500, vlanFiltering: opts.vlanFiltering ?? false });
    if (opts.pinned ?? true) this.pinned.add(link.index);
    return link;
  }

  /** A device of another kind (`null`: a physical NIC), e.g. a macvtap parent or a name already taken. */
  addDevice(name: string, kind: string | null, extra: Partial<Link> = {}): Link {
    return this.add({ name, kind, ...extra });
  }

  /** The last fd of a tap closed (its holder exited): the kernel deletes it and says so. */
  /**
   * What a holder can do to its device with its fd and no capability (TUNSETPERSIST, TUNSETOWNER,
   * SIOCSIFHWADDR): the device changes and an event says so.
   */
  holderChanges(name: string, change: Partial<Pick<Link, 'persist' | 'address' | 'tun'>>): void {
    const link = this.named(name);
    if (!link) throw new Error(`no device ${name}`);
    Object.assign(link, change);
    // A port's new address: its bridge drops that MAC's entries, static ones on other ports too (br_fdb_changeaddr).
    if (change.address && link.master !== null) {
      const prefix = `${link.master}/${macFromBuffer(change.address)}/`;
      for (const k of [...this.fdb.keys()]) if (k.startsWith(prefix)) this.fdb.delete(k);
    }
    this.changed(link);
  }

  /**
   * A holder's change whose event shows the device as it was: a task in another user namespace numbers the new owner
   * as the old one (an event numbers ids as the task that caused it sees them).
   */
  holderChangesUnseen(name: string, change: Partial<Pick<Link, 'tun'>>): void {
    const link = this.named(name);
    if (!link) throw new Error(`no device ${name}`);
    const shown = copy(link);
    Object.assign(link, change);
    if (this.listeners.length > 0) this.events.push([RTM_NEWLINK, shown]);
  }

  /** One more event showing the device as it is, changing nothing (a holder toggling its offloads). */
  repeatEvent(name: string): void {
    const link = this.named(name);
    if (!link) throw new Error(`no device ${name}`);
    this.changed(link);
  }

  /**
   * What root does to a port (`ip link set NAME nomaster`, `… master BRIDGE`): it leaves its bridge, with its lock
   * and VLAN, or joins one, in its default VLAN and unlocked; an event says so.
   */
  rootMoves(name: string, bridge: string | null): void {
    const link = this.named(name);
    if (!link) throw new Error(`no device ${name}`);
    link.master = bridge === null ? null : this.named(bridge)!.index;
    this.vlans.delete(link.index);
    this.locked.delete(link.index);
    this.changed(link);
  }

  /** What root does to a device's name (`ip link set NAME name TO`): an event says so. */
  rootRenames(name: string, to: string): void {
    const link = this.named(name);
    if (!link) throw new Error(`no device ${name}`);
    link.name = to;
    this.changed(link);
  }

  /** While set, every deletion waits for it (RTM_DELLINK stuck behind the kernel's lock), as the pool's threads do. */
  deletions: Promise<void> | null = null;

  /** How many events one drain reads (null: all); the broker's drain has a budget for floods. */
  drainBudget: number | null = null;

  /** The broker's queue of events overruns: what is queued now is lost, and its next read says so. */
  loseEvents(): void {
    this.lost = true;
  }

  lastFdClosed(name: string): void {
    const link = this.named(name);
    if (!link || link.persist) throw new Error(`${name} is not an fd-passed tap`);
    this.remove(link);
  }

  /** An fd the broker got from this kernel; closing it is the test's or the broker's business. */
  isOurs(fd: number): boolean {
    return this.fds.has(fd);
  }

  // ---- Kernel

  /** What a device's owner does at a step of its create (a persistent tap is its owner's from `tap:opened`). */
  onStep: ((point: FaultPoint) => void) | null = null;

  faultPoint = (point: FaultPoint): void => {
    this.onStep?.(point);
    if (point !== this.refuseAt) return;
    this.refuseAt = null;
    throw new TapbrokerError('TB_E_KERNEL', `injected kernel refusal at ${point}`);
  };

  bridge(name: string): Link {
    const link = this.named(name);
    if (!link) throw new TapbrokerError('TB_E_NO_SUCH_BRIDGE', `no bridge \`${name}'`);
    if (link.kind !== 'bridge') throw new TapbrokerError('TB_E_NOT_A_BRIDGE', `\`${name}' is not a bridge`);
    if (!this.pinned.has(link.index)) {
      throw new TapbrokerError('TB_E_BRIDGE_ADDRESS', `bridge \`${name}' has no fixed MAC address`);
    }
    return copy(link);
  }

  macvtapParent(name: string): Link {
    const link = this.named(name);
    if (!link) throw new TapbrokerError('TB_E_NO_SUCH_PARENT', `no device \`${name}'`);
    if ((link.flags & IFF_LOOPBACK) !== 0 || ['bridge', 'macvlan', 'macvtap', 'tun'].includes(link.kind ?? '')) {
      throw new TapbrokerError('TB_E_BAD_PARENT', `\`${name}' cannot carry a macvtap`);
    }
    return copy(link);
  }

  checkMacFree(parent: Link, mac: Buffer): void {
    const clash = this.links().find((l) => (l.index === parent.index || l.link === parent.index) && l.address?.equals(mac));
    if (clash) throw new TapbrokerError('TB_E_MAC_IN_USE', `mac is already used by \`${clash.name}' on \`${parent.name}'`);
  }

  checkVlanFiltering(bridge: Link): void {
    if (bridge.vlanFiltering !== true) {
      throw new TapbrokerError('TB_E_VLAN_UNAVAILABLE', `vlan filtering unavailable on ${bridge.name}`);
    }
  }

  createTap(req: TapRequest): CreatedTap {
    if (this.named(req.name)) throw new TapbrokerError('TB_E_DEVICE_EXISTS', `a device named \`${req.name}' exists`);
    const owner = req.persistent ?? { uid: 0, gid: null };
    // As the tun driver does: a random, locally administered address until the broker sets its own.
    const random = Buffer.from([0x02, 0x11, ...[0, 0, 0, 0].map(() => Math.floor(Math.random() * 256))]);
    const link = this.add({
      name: req.name, kind: 'tun', persist: false, alias: null, address: random,
      tun: { owner: req.persistent && req.persistent.gid !== null ? null : owner.uid, group: owner.gid, queues: 0 },
    });
    const tapFds: number[] = [];
    const vhostFds: number[] = [];
    try {
      for (let q = 0; q < (req.persistent ? 1 : req.queues); q++) tapFds.push(this.open());
      // A persistent tap's one fd is the broker's, closed before its reply: then no queue is attached.
      link.tun!.queues = req.persistent ? 0 : tapFds.length;
      this.faultPoint('tap:opened');
      this.faultPoint('tap:created');
      Object.assign(link, {
        address: hostMac(req.guestMac), mtu: req.bridge?.mtu ?? 1500, master: req.bridge?.index ?? null,
        flags: IFF_UP, alias: req.alias,
      });
      this.changed(link);
      if (req.bridge && req.vlan) this.setAccessVlan(link.index, req.vlan);
      if (req.lock) {
        this.lockPort(link.index, req.bridge!, req.guestMac, req.vlan ?? null, req.name, 'grant');
        this.faultPoint('tap:locked');
      }
      this.faultPoint('tap:configured');
      if (req.persistent) {
        link.persist = true;
        this.faultPoint('tap:persisted');
      } else if (req.vhost) for (let q = 0; q < req.queues; q++) vhostFds.push(this.openVhost());
      this.steps.push(`createTap ${req.name}`);
      return { ifindex: link.index, hostMac: hostMac(req.guestMac), mtu: link.mtu, tapFds, vhostFds };
    } catch (err) {
      this.cleanup.closeFds([...tapFds, ...vhostFds], req.uid);
      // The last fd of a tap that is not yet persistent takes the device with it.
      this.remove(link);
      throw err;
    }
  }

  createMacvtap(req: MacvtapRequest): CreatedTap {
    const clash = [...this.devices.values()].find((l) => (l.index === req.parent.index || l.link === req.parent.index)
      && l.address?.equals(req.guestMac));
    if (clash) throw new TapbrokerError('TB_E_MAC_IN_USE', `mac ${macFromBuffer(req.guestMac)} is used by ${clash.name}`);
    if (this.named(req.name)) throw new TapbrokerError('TB_E_DEVICE_EXISTS', `a device named \`${req.name}' exists`);
    const link = this.add({
      name: req.name, kind: 'macvtap', link: req.parent.index, address: Buffer.from(req.guestMac), alias: req.alias,
      mtu: req.parent.mtu, flags: IFF_UP,
    });
    const tapFds: number[] = [];
    const vhostFds: number[] = [];
    try {
      this.faultPoint('macvtap:created');
      if (!req.persistent) {
        for (let q = 0; q < req.queues; q++) tapFds.push(this.open());
        if (req.vhost) for (let q = 0; q < req.queues; q++) vhostFds.push(this.openVhost());
      }
      this.faultPoint('macvtap:opened');
      this.steps.push(`createMacvtap ${req.name}`);
      return { ifindex: link.index, hostMac: Buffer.from(link.address!), mtu: link.mtu, tapFds, vhostFds };
    } catch (err) {
      this.cleanup.closeFds([...tapFds, ...vhostFds], req.uid);
      this.cleanup.deleteLink(link.index, req.uid, req.name, 'rollback of a failed create');
      throw err;
    }
  }

  lockPort(port: number, bridge: Link, mac: Buffer, vlan: number | null, name: string, as: 'grant' | 'relock'): void {
    const key = `${bridge.index}/${macFromBuffer(mac)}/${vlan ?? 0}`;
    const held = this.fdb.get(key);
    if (held && held.port !== port && (held.static || as === 'grant')) {
      throw new TapbrokerError('TB_E_MAC_IN_USE', `MAC ${macFromBuffer(mac)} is fixed to another port: \`${name}'`);
    }
    if (!this.canLock) throw new TapbrokerError('TB_E_MAC_LOCK', 'this kernel cannot lock bridge ports');
    this.locked.add(port);
    this.fdb.set(key, { port, static: true });
    this.steps.push(`lockPort ${name}`);
  }

  fdbEntry(bridge: Link, mac: Buffer, vlan: number | null): { port: number; fixed: boolean } | null {
    const e = this.fdb.get(`${bridge.index}/${macFromBuffer(mac)}/${vlan ?? 0}`);
    return e ? { port: e.port, fixed: e.static } : null;
  }

  staticEntries(port: number): Array<{ mac: Buffer; vlan: number | null }> {
    return [...this.fdb].filter(([, e]) => e.port === port && e.static).map(([key]) => {
      const [, mac, vlan] = key.split('/');
      return { mac: macToBuffer(mac!), vlan: Number(vlan) || null };
    });
  }

  restoreFdbEntry(port: number, mac: Buffer, opts: { static?: boolean; vlan?: number | null }): void {
    const master = this.devices.get(port)?.master;
    if (master) this.fdb.set(`${master}/${macFromBuffer(mac)}/${opts.vlan ?? 0}`, { port, static: !!opts.static });
  }

  vhostRefusal(): TapbrokerError | null {
    return this.vhost ? null : vhostUnavailable();
  }

  setAccessVlan(port: number, vid: number): void {
    const link = this.devices.get(port);
    if (!link?.master) throw new TapbrokerError('TB_E_KERNEL', `port ${port} is on no bridge`);
    this.vlans.set(port, vid);
    this.steps.push(`setAccessVlan ${link.name} ${vid}`);
  }

  ipv6On(): boolean {
    return false;
  }

  closePortStack(_index: number, name: string): void {
    this.steps.push(`closePortStack ${name}`);
  }

  holdTap(name: string): number | null {
    const l = [...this.devices.values()].find((d) => d.name === name);
    if (l?.tun?.queues) return null;
    return this.open();
  }

  untag(index: number): void {
    const l = this.devices.get(index);
    if (l) l.alias = null;
  }

  /** Lookups of a device by index (RTM_GETLINK, which waits for the RTNL lock behind every deletion under way). */
  lookups = 0;

  link(index: number): Link | null {
    this.lookups++;
    const l = this.devices.get(index);
    return l ? copy(l) : null;
  }

  tapAsSeen(event: Link): Link | null {
    const l = this.devices.get(event.index);
    return l && l.name === event.name ? { ...event, tun: l.tun && { ...l.tun, queues: event.tun?.queues ?? null } } : null;
  }

  linkNamed(name: string): Link | null {
    const l = this.named(name);
    return l ? copy(l) : null;
  }

  links(): Link[] {
    return [...this.devices.values()].map(copy);
  }

  ports(master: number): Link[] {
    this.lookups++;
    return this.links().filter((l) => l.master === master);
  }

  async detach(index: number): Promise<boolean> {
    const link = this.devices.get(index);
    if (!link) return false;
    this.steps.push(`detach ${link.name}`);
    link.master = null;
    return true;
  }

  async deleteLink(index: number): Promise<boolean> {
    await this.deletions;
    const link = this.devices.get(index);
    if (link) {
      this.steps.push(`deleteLink ${link.name}`);
      this.remove(link);
    }
    return !!link;
  }

  monitor(
    onLink: (type: number, link: Link) => void,
    onOverrun: () => void,
    wants: Wants,
  ): { drain(): boolean; close(): void } {
    const listener = { onLink, wants };
    this.listeners.push(listener);
    return {
      drain: () => {
        if (this.lost) {
          this.lost = false;
          this.events.splice(0);
          onOverrun();
          return true;
        }
        // A drain over its budget (a flood of events) reads that many and leaves the rest queued.
        const batch = this.events.splice(0, this.drainBudget ?? this.events.length);
        for (const [type, link] of batch) if (wants(type, link.index, () => link.master, () => link.name)) onLink(type, copy(link));
        return this.events.length === 0;
      },
      close: () => {
        this.listeners = this.listeners.filter((l) => l !== listener);
      },
    };
  }

  followBridges(): void {}

  follows(): boolean {
    return false;
  }

  observe(): void {}

  close(): void {}

  // ---- the model

  private add(l: Partial<Link> & { name: string; kind: string | null }): Link {
    const link: Link = {
      family: 0, index: this.nextIndex++, flags: 0, mtu: 1500, master: null, address: null, link: null, alias: null,
      persist: null, tun: null, vlanFiltering: null, defaultPvid: null, portLocked: null, movedTo: null, ...l,
    };
    this.devices.set(link.index, link);
    this.changed(link);
    return link;
  }

  private named(name: string): Link | undefined {
    for (const l of this.devices.values()) if (l.name === name) return l;
    return undefined;
  }

  private changed(link: Link): void {
    if (this.listeners.length > 0) this.events.push([RTM_NEWLINK, copy(link)]);
  }

  private remove(link: Link): void {
    this.devices.delete(link.index);
    this.locked.delete(link.index);
    for (const [k, e] of this.fdb) if (e.port === link.index) this.fdb.delete(k);
    if (this.listeners.length > 0) this.events.push([RTM_DELLINK, copy(link)]);
  }

  /** A real fd (of /dev/null) stands for a queue: the broker closes what it is given, as it would a tap's. */
  private open(): number {
    const fd = fs.openSync('/dev/null', 'r');
    this.fds.set(fd, fd);
    return fd;
  }

  private openVhost(): number {
    if (!this.vhost) throw new TapbrokerError('TB_E_VHOST_UNAVAILABLE', 'vhost unavailable: no /dev/vhost-net');
    return this.open();
  }
}

function copy(l: Link): Link {
  return { ...l, address: l.address ? Buffer.from(l.address) : null, tun: l.tun ? { ...l.tun } : null };
}
