// The Kernel itself: taps (tun ioctls), bridges, port locks, link lookups and events, with macvtaps in
// macvtap.ts. Every step acts with privilege and is transactional: on failure it undoes what it made and
// throws a TapbrokerError that names the object and the errno.
import fs from 'node:fs';
import { TapbrokerError, macFromBuffer, sys } from '@tapbroker/protocol/core';
import {
  ContestedDeviceError, NO_FAULTS, TUNSETOWNER, TUNSETGROUP, TUNSETIFF, TUNSETPERSIST, hostMac, kernelError,
  openVhost, tapFlags, tunIfreq, vhostRefusal, type Cleanup, type CreatedTap, type Faults, type Kernel,
  sysfsDevice, sysfsRead, ipv6Off, ipv6On, type MacvtapRequest, type TapRequest,
} from './kernel.js';
import { checkMacFree, createMacvtap, macvtapParent } from './macvtap.js';
import { randomMac } from './naming.js';
import { LINK_EVENT_QUEUE, LinkMonitor } from './link-monitor.js';
import {
  NUD_NOARP, NUD_PERMANENT, RTM_DELLINK, Rtnetlink, deleteLinkInBackground, detachInBackground, type Link,
} from './rtnetlink.js';

const TUN_PATH = '/dev/net/tun';
/** A link whose address is its own bytes, not a view of a receive buffer the next message overwrites. */
function ownCopy(link: Link): Link {
  return { ...link, address: link.address ? Buffer.from(link.address) : null };
}

export class Netdev implements Kernel {
  readonly rtnl = new Rtnetlink();

  /**
   * `stateDir` holds private device nodes when /dev/tapN is another namespace's.
   */
  constructor(
    readonly cleanup: Cleanup, readonly stateDir: string, readonly faultPoint: Faults = NO_FAULTS,
    private readonly linkEventQueue = LINK_EVENT_QUEUE,
  ) {}

  close(): void {
    this.rtnl.close();
  }

  link(index: number): Link | null {
    return this.rtnl.getLinkByIndex(index);
  }

  linkNamed(name: string): Link | null {
    return this.rtnl.getLinkByName(name);
  }

  /**
   * Has sysfs shown one of this broker's own taps, by its name, index and tag (a lease's tag is this broker's alone:
   * a sysfs of another namespace can show a device of the same name and index, an outside review found)?
   */
  private sysfsOurs = false;

  tapAsSeen(event: Link): Link | null {
    const ids = this.tunIdsSeen(event.name, event.index, event.alias);
    if (ids === 'gone' && this.sysfsOurs) return null;
    if (ids === 'gone' || ids === null) return this.link(event.index);
    return { ...event, tun: { queues: event.tun?.queues ?? null, ...ids } };
  }

  private tunIdsSeen(name: string, index: number, tag: string | null): ReturnType<typeof tunIds> {
    const ids = tunIds(name, index, tag);
    if (ids !== null && ids !== 'gone') this.sysfsOurs = true;
    return ids;
  }

  links(): Link[] {
    return this.rtnl.dumpLinks();
  }

  ports(master: number): Link[] {
    return this.rtnl.dumpLinks(undefined, master);
  }

  restoreFdbEntry(port: number, mac: Buffer, opts: { static?: boolean; vlan?: number | null }): void {
    this.rtnl.restoreFdbEntry(port, mac, opts);
  }

  vhostRefusal(): TapbrokerError | null {
    return vhostRefusal();
  }

  setAccessVlan(port: number, vid: number): void {
    this.rtnl.setAccessVlan(port, vid);
  }

  ipv6On(name: string): boolean {
    return ipv6On(name);
  }

  closePortStack(index: number, name: string): void {
    // IPv4 first: a sysctl that cannot be written leaves the rest done.
    this.rtnl.configureLink(index, { closeStack: true });
    ipv6Off(name);
  }

  deleteLink(index: number): Promise<boolean> {
    return deleteLinkInBackground(index).catch((err: unknown) => {
      // At the open-file limit the background delete has no socket of its own: this one, on the event loop (one
      // device's teardown), rather than a device left without its lease (an outside review, at a limit of 60).
      const full = err instanceof sys.SyscallError && err.syscall === 'socket'
        && (err.errno === sys.errno.EMFILE || err.errno === sys.errno.ENFILE);
      if (!full) throw err;
      return this.rtnl.deleteLink(index);
    });
  }

  detach(index: number): Promise<boolean> {
    return detachInBackground(index);
  }

  holdTap(name: string): number | null {
    const fd = fs.openSync(TUN_PATH, fs.constants.O_RDWR);
    try {
      sys.ioctlPtr(fd, TUNSETIFF, tunIfreq(name, tapFlags({ vnetHdr: false, multiQueue: false, exclusive: false })));
      return fd;
    } catch (err) {
      fs.closeSync(fd);
      if (err instanceof sys.SyscallError && err.errno === sys.errno.EBUSY) return null;
      throw kernelError(`failed to look whether \`${name}' is held`, err);
    }
  }

  untag(index: number): void {
    this.rtnl.configureLink(index, { alias: '' });
  }

  monitor(...[onLink, onOverrun, wants, onIpv6]: Parameters<Kernel['monitor']>): LinkMonitor {
    return new LinkMonitor(onLink, onOverrun, wants, this.linkEventQueue, onIpv6);
  }

  /**
   * The bridge called `name`, or a TapbrokerError saying why it cannot be used. A bridge whose MAC
   * nobody set takes the lowest of its ports' MACs, and a guest's holder can set its tap's MAC to
   * anything (SIOCSIFHWADDR needs no capability on its fd): only a pinned bridge keeps its address.
   */
  bridge(name: string): Link {
    const known = this.bridges?.get(name);
    if (known) return known;
    const link = this.rtnl.getLinkByName(name);
    if (!link) throw new TapbrokerError('TB_E_NO_SUCH_BRIDGE', `no bridge \`${name}'`);
    if (link.kind !== 'bridge') {
      throw new TapbrokerError(
        'TB_E_NOT_A_BRIDGE',
        `\`${name}' is ${link.kind ? `a ${link.kind} device` : 'a device'}, not a bridge`,
      );
    }
    if (addrAssignType(link) !== NET_ADDR_SET) {
      // A random locally administered address: the bridge's own now is its lowest port's, which may be a tap's (its
      // holder sets it, even between two looks: outside reviews), or none (no port: all zeros, refused as pinned).
      const mac = randomMac('02');
      throw new TapbrokerError(
        'TB_E_BRIDGE_ADDRESS',
        `bridge \`${name}' has no fixed MAC address, so a guest could take it over; an administrator pins it `
          + `with \`ip link set ${name} address ${mac}' (or MACAddress= in its .netdev)`,
      );
    }
    const own = ownCopy(link);
    this.bridges?.set(name, own);
    return own;
  }

  /**
   * Bridges that passed bridge(), kept while link events say they are unchanged (only with a link monitor
   * that applies every event before a decision: see observe). A pinned address stays pinned; any event
   * that changes a bridge's name, kind or address, or deletes it, drops it, and a lost event drops all.
   */
  private bridges: Map<string, Link> | null = null;

  /** From now on, bridges are looked up once and then followed through link events (observe). */
  followBridges(): void {
    this.bridges ??= new Map();
  }

  /** Is `index` a bridge whose events observe() must see? */
  follows(index: number): boolean {
    for (const b of this.bridges?.values() ?? []) if (b.index === index) return true;
    return false;
  }

  /** A link event, or null after lost events (everything is looked up afresh). */
  observe(type: number, link: Link | null): void {
    if (!this.bridges) return;
    if (!link) return this.bridges.clear();
    for (const [name, b] of this.bridges) {
      if (b.index !== link.index) continue;
      const same = type !== RTM_DELLINK && link.name === name && link.kind === 'bridge'
        && !!link.address && !!b.address && link.address.equals(b.address);
      if (same) this.bridges.set(name, ownCopy(link));
      else this.bridges.delete(name);
    }
  }

  /**
   * netdev.createTap: a new tap (never an existing one), one fd per queue, host MAC, the bridge's
   * MTU, attached and up, plus vhost-net fds when asked. All or nothing.
   */
  createTap(req: TapRequest): CreatedTap {
    const tapFds: number[] = [];
    const vhostFds: number[] = [];
    /** The new device, once TUNSETIFF made it (null: nothing made, or not ours to delete). */
    let made: Link | { index: null } | null = null;
    try {
      const multiQueue = req.queues > 1;
      // A persistent tap needs one open: libvirt attaches its own queues, with the same IFF_MULTI_QUEUE.
      const opens = req.persistent ? 1 : req.queues;
      for (let q = 0; q < opens; q++) {
        let fd: number;
        try {
          fd = fs.openSync(TUN_PATH, fs.constants.O_RDWR);
        } catch (err) {
          throw kernelError(`failed to open ${TUN_PATH} for \`${req.name}' queue ${q}`, err);
        }
        tapFds.push(fd);
        // Only the first open creates; the others attach queues to the device that fd now holds.
        const flags = tapFlags({ vnetHdr: req.vnetHdr, multiQueue, exclusive: q === 0 });
        try {
          sys.ioctlPtr(fd, TUNSETIFF, tunIfreq(req.name, flags));
        } catch (err) {
          if (q === 0 && err instanceof sys.SyscallError && err.errno === sys.errno.EBUSY) {
            throw new TapbrokerError('TB_E_DEVICE_EXISTS', `a device named \`${req.name}' already exists`);
          }
          throw kernelError(`failed to create tap \`${req.name}'${q > 0 ? ` queue ${q}` : ''}`, err);
        }
        if (q > 0) continue;
        made = { index: null };
        this.faultPoint('tap:opened');
        this.own(fd, req);
      }
      this.faultPoint('tap:created');
      const link = this.rtnl.getLinkByName(req.name);
      if (!link || link.kind !== 'tun') {
        throw new TapbrokerError('TB_E_KERNEL', `tap \`${req.name}' vanished after creation`);
      }
      made = link;
      this.checkQueues(link, opens, req);
      const mac = hostMac(req.guestMac);
      const bridge = req.bridge;
      try {
        // Before it is up: no address, and nothing a guest sends to a link-local group reaches the host through it.
        if (bridge) ipv6Off(req.name);
        // A port joins its bridge in the bridge's default VLAN: one with an access VLAN comes up only once
        // it is in that VLAN alone, or the broker's queue would hold default-VLAN frames for the guest; a
        // locked one only once locked (a persistent tap's owner may attach a queue by name meanwhile, and the
        // bridge would learn whatever source it sent from; a port that is down forwards and learns nothing).
        const vlan = bridge && req.vlan ? req.vlan : null;
        const upLater = vlan !== null || req.lock;
        this.rtnl.configureLink(
          link.index,
          bridge
            ? { address: mac, mtu: bridge.mtu, master: bridge.index, up: !upLater, alias: req.alias, closeStack: true }
            : { address: mac, up: true, alias: req.alias },
        );
        if (vlan !== null) this.rtnl.setAccessVlan(link.index, vlan);
        this.faultPoint('tap:attached');
        // Before any fd leaves the broker, and before the port is up: nobody can have sent a frame through it.
        if (req.lock) {
          this.lockPort(link.index, bridge!, req.guestMac, req.vlan ?? null, req.name, 'grant');
          this.faultPoint('tap:locked');
        }
        if (upLater) this.rtnl.configureLink(link.index, { up: true });
      } catch (err) {
        if (err instanceof TapbrokerError) throw err;
        throw kernelError(
          bridge
            ? `failed to attach \`${req.name}' to bridge \`${bridge.name}'${req.vlan ? ` on vlan ${req.vlan}` : ''}`
            : `failed to set up \`${req.name}'`,
          err,
        );
      }
      this.faultPoint('tap:configured');
      // Until sysfs has shown one of its own taps, its answer that a tap is gone is not taken (tapAsSeen).
      if (!this.sysfsOurs && req.alias) this.tunIdsSeen(req.name, link.index, req.alias);
      if (req.persistent) {
        // Persistence comes last, so every earlier failure is undone by closing the fd.
        try {
          sys.ioctlInt(tapFds[0]!, TUNSETPERSIST, 1);
        } catch (err) {
          throw kernelError(`failed to make \`${req.name}' persistent`, err);
        }
        this.faultPoint('tap:persisted');
      } else if (req.vhost) for (let q = 0; q < req.queues; q++) vhostFds.push(openVhost());
      return { ifindex: link.index, hostMac: mac, mtu: bridge?.mtu ?? link.mtu, tapFds, vhostFds };
    } catch (err) {
      if (err instanceof ContestedDeviceError) this.cleanup.deleteLink(err.ifindex, req.uid, req.name, err.message);
      else if (req.persistent && made) this.deleteOwned(made.index, req);
      this.cleanup.closeFds([...tapFds, ...vhostFds], req.uid);
      throw err;
    }
  }

  staticEntries(port: number): Array<{ mac: Buffer; vlan: number | null }> {
    return this.rtnl.staticEntries(port);
  }

  fdbEntry(bridge: Link, mac: Buffer, vlan: number | null): { port: number; fixed: boolean } | null {
    const e = this.rtnl.fdbEntry(bridge.index, mac, vlan);
    return e && { port: e.port, fixed: (e.state & (NUD_NOARP | NUD_PERMANENT)) !== 0 };
  }

  /**
   * mac_lock: `port` forwards only frames from `mac` (a locked port, learning off, BPDUs refused, one static
   * forwarding entry). A grant takes no MAC the bridge has on another port, learned or static: that is a live
   * machine's. A relock (at start, of a lease that owns `mac`) locks the port first, then replaces an entry
   * learned elsewhere, but not a static one (another port's address, an administrator's): then it throws, and
   * the port stays locked with no entry until that one goes.
   */
  lockPort(port: number, bridge: Link, mac: Buffer, vlan: number | null, name: string, as: 'grant' | 'relock'): void {
    const held = () => {
      const e = this.fdbEntry(bridge, mac, vlan);
      if (e && e.port !== port && (e.fixed || as === 'grant')) throw macInUse(mac, bridge.name, e.fixed, `\`${name}'`);
    };
    if (as === 'grant') held();
    try {
      this.rtnl.lockPort(port);
    } catch (err) {
      const no = err instanceof sys.SyscallError && [sys.errno.EINVAL, sys.errno.EOPNOTSUPP].includes(err.errno);
      if (no) {
        throw new TapbrokerError('TB_E_MAC_LOCK', `this kernel cannot lock bridge ports (Linux 5.18 or later can): `
          + `${(err as Error).message}`);
      }
      throw kernelError(`failed to lock \`${name}' to its MAC`, err);
    }
    if (as === 'relock') held();
    try {
      this.rtnl.restoreFdbEntry(port, mac, { static: true, vlan });
    } catch (err) {
      throw kernelError(`failed to add the static forwarding entry of \`${name}'`, err);
    }
  }

  /**
   * Who may attach to the new tap, set on the first fd right after TUNSETIFF. The tun driver lets any
   * uid attach a queue to an owner-less multiqueue tap through /dev/net/tun (mode 0666); with an owner
   * (or group) set, only that uid (or members) or CAP_NET_ADMIN may. A fd-passed tap belongs to the
   * broker (root): its holder's fds work as before, and nobody can add queues beyond the rule's. A
   * persistent tap belongs to its caller, or to its group alone when one was asked (the driver
   * requires owner *and* group when both are set).
   */
  private own(fd: number, req: TapRequest): void {
    try {
      if (!req.persistent) sys.ioctlInt(fd, TUNSETOWNER, process.geteuid?.() ?? 0);
      else if (req.persistent.gid !== null) sys.ioctlInt(fd, TUNSETGROUP, req.persistent.gid);
      else sys.ioctlInt(fd, TUNSETOWNER, req.persistent.uid);
    } catch (err) {
      throw kernelError(`failed to set the owner of \`${req.name}'`, err);
    }
  }

  /**
   * A persistent tap belongs to its caller from its first moment, and its owner can attach a queue and make
   * it persist (TUNSETPERSIST) on its own: closing the broker's fd would not end it, so a failed create
   * deletes it. Looked up by name only while the broker's fd still holds the device, so the name is its.
   */
  private deleteOwned(index: number | null, req: TapRequest): void {
    let ifindex = index;
    try {
      ifindex ??= this.rtnl.getLinkByName(req.name)?.index ?? null;
    } catch {
      // Not found: then nothing holds it but the fds closed below.
    }
    if (ifindex !== null) this.cleanup.deleteLink(ifindex, req.uid, req.name, 'a persistent tap whose create failed');
  }

  /**
   * Between TUNSETIFF and the owner being set, a uid watching link events may attach a queue of its own
   * to a multiqueue tap. After the owner is set, nobody else can: if the kernel then counts more queues
   * than the broker opened, the device is not handed out but destroyed.
   */
  private checkQueues(link: Link, opened: number, req: TapRequest): void {
    const attached = link.tun?.queues ?? null;
    if (attached === null || attached <= opened) return;
    throw new ContestedDeviceError(
      'TB_E_KERNEL',
      `tap \`${req.name}' had ${attached - opened} queue(s) attached by another process before its owner was set; `
        + 'destroyed',
      { ifindex: link.index },
    );
  }

  macvtapParent(name: string): Link {
    return macvtapParent(this.rtnl, name);
  }

  createMacvtap(req: MacvtapRequest): CreatedTap {
    return createMacvtap(this, req);
  }

  checkMacFree(parent: Link, mac: Buffer): void {
    checkMacFree(this.rtnl, parent, mac);
  }

  /** Refuses a VLAN on a bridge without VLAN filtering, before anything is made. */
  checkVlanFiltering(bridge: Link): void {
    if (bridge.vlanFiltering === true) return;
    const why = bridge.vlanFiltering === null
      ? 'this kernel has no bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)'
      : `vlan_filtering is off on ${bridge.name}; turn it on with `
        + `\`ip link set ${bridge.name} type bridge vlan_filtering 1' `
        + '(this fails where the kernel lacks CONFIG_BRIDGE_VLAN_FILTERING)';
    throw new TapbrokerError('TB_E_VLAN_UNAVAILABLE', `vlan filtering unavailable on ${bridge.name}: ${why}`);
  }

}

/**
 * A tap's owner and group from sysfs, numbered as this process's user namespace numbers them, where `name` there is
 * device `index` and carries `tag` (the broker's); 'gone' when it is not device `index` (deleted, renamed, or sysfs
 * of another namespace); null when sysfs cannot tell (no tag to compare, another tag, an unreadable file).
 */
function tunIds(
  name: string, index: number, tag: string | null,
): { owner: number | null; group: number | null } | 'gone' | null {
  const read = (file: string) => sysfsRead(name, file);
  // tun writes -1 for an owner or group it has none of.
  const id = (file: string) => {
    const v = read(file);
    return v === '-1' ? null : Number(v);
  };
  try {
    if (read('ifindex') !== String(index)) return 'gone';
    if (tag === null || read('ifalias') !== tag) return null;
    return { owner: id('owner'), group: id('group') };
  } catch (err) {
    // A device being deleted: EINVAL from its ifindex (no longer registered), ENODEV while its entry goes.
    const code = (err as NodeJS.ErrnoException).code;
    return code === 'ENOENT' || code === 'ENODEV' || code === 'EINVAL' ? 'gone' : null;
  }
}

/** addr_assign_type 3: an administrator set the address (`ip link set … address`). */
const NET_ADDR_SET = 3;

/** A device's addr_assign_type from sysfs, after checking sysfs shows this namespace's device. */
function addrAssignType(link: Link): number {
  const dir = sysfsDevice(link.name, link.index, { address: link.address });
  try {
    return Number(fs.readFileSync(`${dir}/addr_assign_type`, 'utf8').trim());
  } catch (err) {
    throw kernelError(`cannot read the address type of \`${link.name}' from sysfs`, err);
  }
}

/** A MAC the bridge's forwarding table has on another port: `who` (a port, or none yet) cannot be locked to it. */
export function macInUse(mac: Buffer, bridge: string, fixed: boolean, who: string): TapbrokerError {
  return new TapbrokerError('TB_E_MAC_IN_USE', `MAC ${macFromBuffer(mac)} is ${fixed ? 'fixed to' : 'in use on'} `
    + `another port of bridge \`${bridge}' (${fixed ? 'a static' : 'a learned'} forwarding entry): ${who} cannot be `
    + 'locked to it', { hint: 'choose another MAC' });
}
