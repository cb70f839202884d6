// Kernel steps on network devices: tun ioctls, rtnetlink, /dev/vhost-net. Every function here acts
// with privilege and is transactional: on failure it undoes what it made and throws a
// TapbrokerError that names the object and the errno.
import { randomBytes, randomInt } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { TapbrokerError, macFromBuffer, sys, type MacvtapMode } from '@tapbroker/protocol';
import { grantUserOnly, mknodChar } from './libc.js';
import {
  LinkMonitor, NUD_NOARP, NUD_PERMANENT, RTM_DELLINK, Rtnetlink, deleteLinkInBackground, type Link,
} from './rtnetlink.js';

export const TUNSETIFF = 0x400454ca;
export const TUNSETPERSIST = 0x400454cb;
export const TUNSETOWNER = 0x400454cc;
export const TUNSETGROUP = 0x400454ce;
const IFF_LOOPBACK = 0x8;
export const IFF_TAP = 0x0002;
export const IFF_MULTI_QUEUE = 0x0100;
export const IFF_NO_PI = 0x1000;
export const IFF_VNET_HDR = 0x4000;
export const IFF_TUN_EXCL = 0x8000;
const IFREQ_SIZE = 40;

const TUN_PATH = '/dev/net/tun';
const VHOST_PATH = '/dev/vhost-net';

/** The ifreq for TUNSETIFF. The name was validated to fit; it is never truncated here. */
export function tunIfreq(name: string, flags: number): Buffer {
  // An empty name is used only on macvtap fds, where TUNSETIFF sets flags and ignores the name.
  const ifr = Buffer.alloc(IFREQ_SIZE);
  const bytes = Buffer.from(name, 'utf8');
  if (bytes.length > 15) {
    throw new TapbrokerError('TB_E_INVALID_NAME', `interface name \`${name}' is longer than 15 bytes`);
  }
  bytes.copy(ifr, 0);
  ifr.writeUInt16LE(flags, 16);
  return ifr;
}

/** TUNSETIFF flags for a tap: never attaching to an existing device (IFF_TUN_EXCL). */
export function tapFlags(opts: { vnetHdr: boolean; multiQueue: boolean; exclusive: boolean }): number {
  return (
    IFF_TAP |
    IFF_NO_PI |
    (opts.exclusive ? IFF_TUN_EXCL : 0) |
    (opts.vnetHdr ? IFF_VNET_HDR : 0) |
    (opts.multiQueue ? IFF_MULTI_QUEUE : 0)
  );
}

/** The host side of a guest MAC: first octet 0xfe so the bridge never adopts it as its own address. */
export function hostMac(guestMac: Buffer): Buffer {
  const mac = Buffer.from(guestMac);
  mac[0] = 0xfe;
  return mac;
}

/** A link whose address is its own bytes, not a view of a receive buffer the next message overwrites. */
function ownCopy(link: Link): Link {
  return { ...link, address: link.address ? Buffer.from(link.address) : null };
}

/** Points in the kernel steps where a test may inject a fault (a crash, a pause). */
export type FaultPoint =
  | 'tap:opened' | 'tap:created' | 'tap:configured' | 'tap:locked' | 'tap:persisted'
  | 'macvtap:created' | 'macvtap:opened'
  | 'create:leased' | 'release:unleased' | 'release:deleted';
export type Faults = (point: FaultPoint) => void;
export const NO_FAULTS: Faults = () => {};

/** Undo work that is slow or may fail: done off the event loop by whoever owns lifetimes. */
export interface Cleanup {
  closeFds(fds: readonly number[], uid: number): void;
  deleteLink(ifindex: number, uid: number, name: string, why: string): void;
}

/** For persistent devices: who owns them. */
export interface Owner {
  uid: number;
  gid: number | null;
}

/**
 * Someone else reached a new device before it was secured (a queue on a tap before its owner was set,
 * a macvtap's /dev/tapN node): it was destroyed; another name (and index) may be tried.
 */
export class ContestedDeviceError extends TapbrokerError {
  readonly ifindex: number;
  constructor(code: 'TB_E_KERNEL', message: string, extra: { ifindex: number }) {
    super(code, message);
    this.ifindex = extra.ifindex;
  }
}

export interface TapRequest {
  /** Whose device it is (for accounting of its teardown). */
  uid: number;
  name: string;
  queues: number;
  vnetHdr: boolean;
  vhost: boolean;
  guestMac: Buffer;
  /** The Linux bridge to attach to; null for a tap that something else plugs (Open vSwitch, a hook). */
  bridge: Link | null;
  /** Access VLAN on the bridge (needs bridge VLAN filtering); none when absent or null. */
  vlan?: number | null;
  /** Persistent and owned by this user (TUNSETOWNER/TUNSETGROUP/TUNSETPERSIST); null for fd-passed. */
  persistent: Owner | null;
  /** IFLA_IFALIAS: who the device belongs to, readable with `ip link`. */
  alias: string;
  /** A locked bridge port whose one static forwarding entry is `guestMac` (mac_lock). */
  lock?: boolean;
}

export interface MacvtapRequest {
  uid: number;
  alias: string;
  name: string;
  parent: Link;
  mode: MacvtapMode;
  queues: number;
  vnetHdr: boolean;
  vhost: boolean;
  guestMac: Buffer;
  /** Persistent: its char device is made the owner's alone, and no fds are opened. */
  persistent: Owner | null;
}

/** major:minor of a dev_t as Node reports it (glibc encoding). */
export function devNumbers(rdev: number | bigint): [number, number] {
  const d = BigInt(rdev);
  const major = Number(((d >> 8n) & 0xfffn) | ((d >> 32n) & ~0xfffn));
  const minor = Number((d & 0xffn) | ((d >> 12n) & ~0xffn));
  return [major, minor];
}

export interface CreatedTap {
  ifindex: number;
  hostMac: Buffer;
  mtu: number;
  /** One fd per queue. */
  tapFds: number[];
  /** One /dev/vhost-net fd per queue when asked, else empty. */
  vhostFds: number[];
}

/**
 * Everything the handlers and lease lifetimes ask of the kernel. Netdev is the kernel itself; the handlers'
 * unit tests run on an in-memory model of it (test/helpers/fake-kernel.ts), unprivileged.
 */
export interface Kernel {
  readonly faultPoint: Faults;
  /** A Linux bridge a tap may join (see Netdev.bridge), or a TapbrokerError saying why not. */
  bridge(name: string): Link;
  macvtapParent(name: string): Link;
  checkVlanFiltering(bridge: Link): void;
  createTap(req: TapRequest): CreatedTap;
  createMacvtap(req: MacvtapRequest): CreatedTap;
  lockPort(port: number, bridge: Link, mac: Buffer, vlan: number | null, name: string): void;
  restoreFdbEntry(port: number, mac: Buffer, opts: { static?: boolean; vlan?: number | null }): void;
  link(index: number): Link | null;
  linkNamed(name: string): Link | null;
  links(): Link[];
  /** RTM_DELLINK off the event loop: true when deleted, false when the link was already gone. */
  deleteLink(index: number): Promise<boolean>;
  /** Link events, as LinkMonitor delivers them. */
  monitor(
    onLink: (type: number, link: Link) => void,
    onOverrun: () => void,
    wants: (type: number, index: number) => boolean,
  ): { drain(): void; close(): void };
  followBridges(): void;
  follows(index: number): boolean;
  observe(type: number, link: Link | null): void;
  close(): void;
}

export class Netdev implements Kernel {
  readonly rtnl = new Rtnetlink();

  /**
   * `stateDir` holds private device nodes when /dev/tapN is another namespace's.
   */
  constructor(
    private readonly cleanup: Cleanup, private readonly stateDir: string, readonly faultPoint: Faults = NO_FAULTS,
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

  links(): Link[] {
    return this.rtnl.dumpLinks();
  }

  restoreFdbEntry(port: number, mac: Buffer, opts: { static?: boolean; vlan?: number | null }): void {
    this.rtnl.restoreFdbEntry(port, mac, opts);
  }

  deleteLink(index: number): Promise<boolean> {
    return deleteLinkInBackground(index);
  }

  monitor(...args: ConstructorParameters<typeof LinkMonitor>): LinkMonitor {
    return new LinkMonitor(...args);
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
    if (addrAssignType(name, link.index) !== NET_ADDR_SET) {
      const mac = link.address ? macFromBuffer(link.address) : '02:00:00:00:00:01';
      throw new TapbrokerError(
        'TB_E_BRIDGE_ADDRESS',
        `bridge \`${name}' has no fixed MAC address, so a guest could take it over; `
          + `pin it with \`ip link set ${name} address ${mac}' (or MACAddress= in its .netdev)`,
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
        this.faultPoint('tap:opened');
        this.own(fd, req);
      }
      this.faultPoint('tap:created');
      const link = this.rtnl.getLinkByName(req.name);
      if (!link || link.kind !== 'tun') {
        throw new TapbrokerError('TB_E_KERNEL', `tap \`${req.name}' vanished after creation`);
      }
      this.checkQueues(link, opens, req);
      const mac = hostMac(req.guestMac);
      const bridge = req.bridge;
      try {
        this.rtnl.configureLink(
          link.index,
          bridge
            ? { address: mac, mtu: bridge.mtu, master: bridge.index, up: true, alias: req.alias }
            : { address: mac, up: true, alias: req.alias },
        );
        if (bridge && req.vlan) this.rtnl.setAccessVlan(link.index, req.vlan);
      } catch (err) {
        if (err instanceof TapbrokerError) throw err;
        throw kernelError(
          bridge
            ? `failed to attach \`${req.name}' to bridge \`${bridge.name}'${req.vlan ? ` on vlan ${req.vlan}` : ''}`
            : `failed to set up \`${req.name}'`,
          err,
        );
      }
      // Before any fd leaves the broker: nobody can have sent a frame through the port yet.
      if (req.lock) {
        this.lockPort(link.index, bridge!, req.guestMac, req.vlan ?? null, req.name);
        this.faultPoint('tap:locked');
      }
      this.faultPoint('tap:configured');
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
      this.cleanup.closeFds([...tapFds, ...vhostFds], req.uid);
      if (err instanceof ContestedDeviceError) this.cleanup.deleteLink(err.ifindex, req.uid, req.name, err.message);
      throw err;
    }
  }

  /**
   * mac_lock: `port` forwards only frames from `mac` (a locked port, learning off, one static forwarding
   * entry). An entry the bridge learned on another port is replaced; a static one (another locked lease's,
   * or an administrator's) is not taken. Also used at start to restore a lock changed behind our back.
   */
  lockPort(port: number, bridge: Link, mac: Buffer, vlan: number | null, name: string): void {
    const held = this.rtnl.fdbEntry(bridge.index, mac, vlan);
    if (held && held.port !== port && (held.state & (NUD_NOARP | NUD_PERMANENT)) !== 0) {
      throw new TapbrokerError('TB_E_MAC_IN_USE', `MAC ${macFromBuffer(mac)} is fixed to another port of bridge `
        + `\`${bridge.name}' (a static forwarding entry): \`${name}' cannot be locked to it`);
    }
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

  /** A random ifindex above 2^20, unused in this namespace, whose /dev/tap node does not exist. */
  private freeTapIndex(): number {
    for (let i = 0; i < 64; i++) {
      const index = 0x100000 + randomInt(0x7fffffff - 0x100000);
      if (!fs.existsSync(`/dev/tap${index}`) && !this.rtnl.getLinkByIndex(index)) return index;
    }
    throw new TapbrokerError('TB_E_KERNEL', 'no free ifindex for a macvtap after 64 tries');
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

  /** The parent a macvtap may sit on, or a TapbrokerError saying why not. */
  macvtapParent(name: string): Link {
    const link = this.rtnl.getLinkByName(name);
    if (!link) throw new TapbrokerError('TB_E_NO_SUCH_PARENT', `no device \`${name}'`);
    if ((link.flags & IFF_LOOPBACK) !== 0 || ['bridge', 'macvlan', 'macvtap', 'tun'].includes(link.kind ?? '')) {
      throw new TapbrokerError(
        'TB_E_BAD_PARENT',
        `\`${name}' is ${link.kind ? `a ${link.kind} device` : 'loopback'} and cannot carry a macvtap`,
      );
    }
    return link;
  }

  /** Refuses a MAC already carried by the parent or any device stacked on it. */
  checkMacFree(parent: Link, mac: Buffer): void {
    const clash = this.rtnl
      .dumpLinks()
      .find((l) => (l.index === parent.index || l.link === parent.index) && l.address?.equals(mac));
    if (clash) {
      throw new TapbrokerError(
        'TB_E_MAC_IN_USE',
        `mac ${[...mac].map((b) => b.toString(16).padStart(2, '0')).join(':')} `
          + `is already used by \`${clash.name}' on \`${parent.name}'`,
      );
    }
  }

  /**
   * netdev.createMacvtap: a macvtap with the guest's MAC, up; then one fd per queue from its char
   * device (checked by device number, since /dev/tap<ifindex> is shared by every namespace), or for
   * a persistent one, that char device handed to its owner. All or nothing.
   */
  createMacvtap(req: MacvtapRequest): CreatedTap {
    this.checkMacFree(req.parent, req.guestMac);
    // /dev/tap<ifindex> lives in the devtmpfs every namespace shares, and a user who owns a network
    // namespace may create a macvtap at any ifindex there and own its node first. The broker's macvtap
    // gets an ifindex nobody can predict, whose node does not exist yet.
    const index = this.freeTapIndex();
    try {
      this.rtnl.createMacvtap({
        name: req.name,
        index,
        parent: req.parent.index,
        mac: req.guestMac,
        mode: req.mode,
        alias: req.alias,
      });
    } catch (err) {
      if (err instanceof sys.SyscallError && err.errno === sys.errno.EEXIST) {
        throw new TapbrokerError('TB_E_DEVICE_EXISTS', `a device named \`${req.name}' already exists`);
      }
      if (err instanceof sys.SyscallError && err.errno === sys.errno.EADDRINUSE) {
        throw new TapbrokerError('TB_E_MAC_IN_USE', `the MAC is already in use on \`${req.parent.name}'`);
      }
      throw kernelError(`failed to create macvtap \`${req.name}' on \`${req.parent.name}'`, err);
    }
    const tapFds: number[] = [];
    const vhostFds: number[] = [];
    let link: Link | null = null;
    try {
      this.faultPoint('macvtap:created');
      link = this.rtnl.getLinkByName(req.name);
      if (!link || link.kind !== 'macvtap' || link.link !== req.parent.index) {
        throw new TapbrokerError('TB_E_KERNEL', `macvtap \`${req.name}' vanished after creation`);
      }
      // Tag it at once: the kernel ignored the alias in the create message.
      this.rtnl.configureLink(link.index, { alias: req.alias });
      const [major, minor] = macvtapDevNumber(req.name, link.index);
      const shared = `/dev/tap${link.index}`;
      if (fs.existsSync(shared) && !nodeIs(shared, major, minor)) {
        // Someone made that node between the choice of the index and the device: try another.
        throw new ContestedDeviceError('TB_E_KERNEL', `${shared} was taken by another namespace's device; destroyed`, {
          ifindex: link.index,
        });
      }
      if (req.persistent) {
        const node = `/dev/tap${link.index}`;
        if (!nodeIs(node, major, minor)) {
          throw new TapbrokerError(
            'TB_E_KERNEL',
            `${node} is not the char device of \`${req.name}' `
              + `(another namespace has a device with ifindex ${link.index})`,
          );
        }
        // root keeps owning the node; a POSIX ACL lets the caller (and nobody else) open it. This needs
        // no capability beyond ownership, unlike chown (CAP_CHOWN), so it works in the hardened unit.
        fs.chmodSync(node, 0o600);
        try {
          grantUserOnly(node, req.persistent.uid);
        } catch (err) {
          throw kernelError(`failed to give ${node} to uid ${req.persistent.uid}`, err);
        }
      } else {
        const node = charNode(link.index, major, minor, this.stateDir);
        try {
          for (let q = 0; q < req.queues; q++) {
            const fd = fs.openSync(node.path, fs.constants.O_RDWR);
            tapFds.push(fd);
            const [maj, min] = devNumbers(fs.fstatSync(fd).rdev);
            if (maj !== major || min !== minor) {
              throw new TapbrokerError('TB_E_KERNEL', `${node.path} changed under us`);
            }
            if (!req.vnetHdr) sys.ioctlPtr(fd, TUNSETIFF, tunIfreq('', IFF_TAP | IFF_NO_PI));
          }
        } finally {
          node.remove();
        }
        if (req.vhost) for (let q = 0; q < req.queues; q++) vhostFds.push(openVhost());
      }
      this.faultPoint('macvtap:opened');
      return {
        ifindex: link.index,
        hostMac: link.address ? Buffer.from(link.address) : Buffer.from(req.guestMac),
        mtu: link.mtu,
        tapFds,
        vhostFds,
      };
    } catch (err) {
      this.cleanup.closeFds([...tapFds, ...vhostFds], req.uid);
      const made = link ?? this.rtnl.getLinkByName(req.name);
      if (made?.kind === 'macvtap') {
        this.cleanup.deleteLink(made.index, req.uid, req.name, 'rollback of a failed create');
      }
      throw err instanceof TapbrokerError ? err : kernelError(`failed to open macvtap \`${req.name}'`, err);
    }
  }
}

/** addr_assign_type 3: an administrator set the address (`ip link set … address`). */
const NET_ADDR_SET = 3;

/** A device's addr_assign_type from sysfs, after checking sysfs shows this namespace's device. */
function addrAssignType(name: string, ifindex: number): number {
  const dir = `/sys/class/net/${name}`;
  try {
    if (fs.readFileSync(`${dir}/ifindex`, 'utf8').trim() !== String(ifindex)) {
      throw new TapbrokerError(
        'TB_E_KERNEL',
        `sysfs shows another namespace's \`${name}'; mount sysfs for the broker's namespace`,
      );
    }
    return Number(fs.readFileSync(`${dir}/addr_assign_type`, 'utf8').trim());
  } catch (err) {
    throw kernelError(`cannot read the address type of \`${name}' from sysfs`, err);
  }
}

/** The char device number of a macvtap, from sysfs, after checking sysfs shows this namespace's device. */
function macvtapDevNumber(name: string, ifindex: number): [number, number] {
  const dir = `/sys/class/net/${name}`;
  let seen: string;
  let dev: string;
  try {
    seen = fs.readFileSync(`${dir}/ifindex`, 'utf8').trim();
    dev = fs.readFileSync(`${dir}/macvtap/tap${ifindex}/dev`, 'utf8').trim();
  } catch (err) {
    throw kernelError(`cannot read the char device of \`${name}' from sysfs`, err);
  }
  if (seen !== String(ifindex)) {
    throw new TapbrokerError(
      'TB_E_KERNEL',
      `sysfs shows another namespace's \`${name}' `
        + `(ifindex ${seen}, not ${ifindex}); mount sysfs for the broker's namespace`,
    );
  }
  const m = /^(\d+):(\d+)$/.exec(dev);
  if (!m) throw new TapbrokerError('TB_E_KERNEL', `unexpected device number \`${dev}' for \`${name}'`);
  return [Number(m[1]), Number(m[2])];
}

function nodeIs(node: string, major: number, minor: number): boolean {
  try {
    const st = fs.statSync(node);
    if (!st.isCharacterDevice()) return false;
    const [a, b] = devNumbers(st.rdev);
    return a === major && b === minor;
  } catch {
    return false;
  }
}

/** /dev/tap<ifindex> when it is this device; otherwise a private node of our own in the state directory. */
function charNode(ifindex: number, major: number, minor: number, stateDir: string): { path: string; remove(): void } {
  const shared = `/dev/tap${ifindex}`;
  if (nodeIs(shared, major, minor)) return { path: shared, remove: () => {} };
  const dir = path.join(stateDir, 'dev');
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const own = path.join(dir, `tap${ifindex}.${randomBytes(4).toString('hex')}`);
  try {
    mknodChar(own, 0o600, major, minor);
  } catch (err) {
    throw new TapbrokerError(
      'TB_E_KERNEL',
      `${shared} is another namespace's device and a private node cannot be made in ${dir} `
        + `(${err instanceof sys.SyscallError ? err.code : String(err)}: `
        + 'needs CAP_MKNOD and a state directory without nodev)',
    );
  }
  return { path: own, remove: () => fs.rmSync(own, { force: true }) };
}

function openVhost(): number {
  try {
    return fs.openSync(VHOST_PATH, fs.constants.O_RDWR);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENODEV' || code === 'ENXIO') {
      throw new TapbrokerError(
        'TB_E_VHOST_UNAVAILABLE',
        `vhost unavailable: ${VHOST_PATH} does not exist on this host`,
      );
    }
    throw kernelError(`failed to open ${VHOST_PATH}`, err);
  }
}

/** `failed to attach `tb1-x' to bridge `br0': no such device (ENODEV)`. */
function kernelError(what: string, err: unknown): TapbrokerError {
  if (err instanceof TapbrokerError) return err;
  if (err instanceof sys.SyscallError) {
    return new TapbrokerError('TB_E_KERNEL', `${what}: ${err.reason} (${err.code})`, { cause: err });
  }
  const e = err as NodeJS.ErrnoException;
  return new TapbrokerError('TB_E_KERNEL', `${what}: ${e.code ?? ''} ${e.message}`.trim(), { cause: err });
}
