// What the broker asks of the kernel (the Kernel seam), in the kernel's own terms: the tun driver's ABI,
// requests for a tap or a macvtap and what comes back, fault points, and how a kernel refusal is worded.
// netdev.ts (taps, bridges) and macvtap.ts act on the kernel itself; the handlers' unit tests on a model.
import fs from 'node:fs';
import { TapbrokerError, macFromBuffer, sys, type MacvtapMode } from '@tapbroker/protocol/core';
import type { Wants } from './link-monitor.js';
import type { Link } from './rtnetlink.js';

export const TUNSETIFF = 0x400454ca;
export const TUNSETPERSIST = 0x400454cb;
export const TUNSETOWNER = 0x400454cc;
export const TUNSETGROUP = 0x400454ce;
export const IFF_TAP = 0x0002;
export const IFF_MULTI_QUEUE = 0x0100;
export const IFF_NO_PI = 0x1000;
export const IFF_VNET_HDR = 0x4000;
export const IFF_TUN_EXCL = 0x8000;
const IFREQ_SIZE = 40;

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

/** Points in the kernel steps where a test may inject a fault (a crash, a pause). */
export type FaultPoint =
  | 'tap:opened' | 'tap:created' | 'tap:attached' | 'tap:configured' | 'tap:locked' | 'tap:persisted'
  | 'macvtap:created' | 'macvtap:opened'
  | 'create:leased' | 'create:recorded' | 'create:confirmed' | 'retire:unleased' | 'retire:deleted' | 'release:deleted';
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
  /** Refuses (TB_E_MAC_IN_USE) a MAC the parent or a device stacked on it carries, before anything is made. */
  checkMacFree(parent: Link, mac: Buffer): void;
  checkVlanFiltering(bridge: Link): void;
  createTap(req: TapRequest): CreatedTap;
  createMacvtap(req: MacvtapRequest): CreatedTap;
  lockPort(port: number, bridge: Link, mac: Buffer, vlan: number | null, name: string, as: 'grant' | 'relock'): void;
  /** The bridge's forwarding entry for `mac` (on `vlan`): its port, and whether it is static; null if none. */
  fdbEntry(bridge: Link, mac: Buffer, vlan: number | null): { port: number; fixed: boolean } | null;
  restoreFdbEntry(port: number, mac: Buffer, opts: { static?: boolean; vlan?: number | null }): void;
  /** The static forwarding entries (a lock's) on bridge port `port`. */
  staticEntries(port: number): Array<{ mac: Buffer; vlan: number | null }>;
  /** Makes `port` an access port of VLAN `vid` on its bridge (a port put back on a bridge is in its default VLAN). */
  setAccessVlan(port: number, vid: number): void;
  /** A Linux-bridge port's own IP stack closed to its guest (see ipv6Off): for a port made before that was done. */
  closePortStack(index: number, name: string): void;
  /** Is IPv6 on for device `name` (its disable_ipv6 0)? False where that cannot be read. */
  ipv6On(name: string): boolean;
  /**
   * A single-queue tap nobody holds, attached by the broker (its fd) so that nobody can until it is deleted;
   * null when a process holds it (the kernel counts no queues for such a tap, and its carrier is its holder's
   * to set: attaching is the one sure test).
   */
  holdTap(name: string): number | null;
  /** Why vhost-net cannot be had on this host (see vhostRefusal), or null when it can. */
  vhostRefusal(): TapbrokerError | null;
  /** Clears a device's alias: the broker's tag, on a device no longer the broker's. */
  untag(index: number): void;
  link(index: number): Link | null;
  /**
   * A tap's link event with its owner and group as the broker numbers them (an event numbers them as the task that
   * made it sees them: a holder in a user namespace), read now without the RTNL lock (an RTM_GETLINK waits behind
   * every device being deleted meanwhile, on the broker's thread); null when its device is gone.
   */
  tapAsSeen(event: Link): Link | null;
  linkNamed(name: string): Link | null;
  links(): Link[];
  /** The ports of bridge `master` (one dump, however many there are). */
  ports(master: number): Link[];
  /** RTM_DELLINK off the event loop: true when deleted, false when the link was already gone. */
  deleteLink(index: number): Promise<boolean>;
  /** Off its bridge at once, off the event loop and ahead of deletions: true when done, false when it was gone. */
  detach(index: number): Promise<boolean>;
  /** Link events, as LinkMonitor delivers them. */
  monitor(
    onLink: (type: number, link: Link) => void,
    onOverrun: () => void,
    wants: Wants,
    /** IPv6 came up on device `index`, or null: some such news were lost. */
    onIpv6?: (index: number | null) => void,
  ): { drain(): boolean; close(): void };
  followBridges(): void;
  follows(index: number): boolean;
  observe(type: number, link: Link | null): void;
  close(): void;
}

export function openVhost(): number {
  try {
    return fs.openSync(VHOST_PATH, fs.constants.O_RDWR);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENODEV' || code === 'ENXIO') throw vhostUnavailable(code);
    throw kernelError(`failed to open ${VHOST_PATH}`, err);
  }
}

/** The last answer of vhostRefusal, and the modules loaded then (loadedModules): only a load or unload changes it. */
let vhostAnswer: { modules: string; refusal: TapbrokerError | null } | null = null;

/**
 * Why this host has no vhost-net, or null: asked before anything is made (admission), and by a dry run. The node
 * must open: its existence is not enough (a static node made at boot stays where the driver cannot be loaded).
 */
export function vhostRefusal(): TapbrokerError | null {
  const modules = loadedModules();
  if (vhostAnswer?.modules === modules) return vhostAnswer.refusal;
  let refusal = null;
  try {
    fs.closeSync(openVhost());
  } catch (err) {
    if (!(err instanceof TapbrokerError && err.code === 'TB_E_VHOST_UNAVAILABLE')) throw err;
    refusal = err;
  }
  vhostAnswer = { modules, refusal };
  return refusal;
}

/**
 * The kernel's modules as /sys/module lists them: a module's load or unload changes it (a kernel without module
 * support lists its built-ins for good). Not /proc/modules: a unit with ProcSubset=pid (the shipped one's before 0.5.0)
 * hides it (an outside review).
 */
export function loadedModules(): string {
  try {
    return fs.readdirSync('/sys/module').join(' ');
  } catch {
    return '';
  }
}

export function vhostUnavailable(code = 'ENOENT'): TapbrokerError {
  const why = code === 'ENOENT' ? 'does not exist on this host' : `has no driver behind it (${code})`;
  return new TapbrokerError('TB_E_VHOST_UNAVAILABLE', `vhost unavailable: ${VHOST_PATH} ${why}`,
    { hint: 'ask without vhost (qemu then moves the packets itself), or have root load it: modprobe vhost_net' });
}

/** `failed to attach `tb1-x' to bridge `br0': no such device (ENODEV)`. */
export function kernelError(what: string, err: unknown): TapbrokerError {
  if (err instanceof TapbrokerError) return err;
  if (err instanceof sys.SyscallError) {
    return new TapbrokerError('TB_E_KERNEL', `${what}: ${err.reason} (${err.code})`, { cause: err });
  }
  const e = err as NodeJS.ErrnoException;
  return new TapbrokerError('TB_E_KERNEL', `${what}: ${e.code ?? ''} ${e.message}`.trim(), { cause: err });
}

/**
 * A bridge port's own IP stack is closed to its guest. The bridge hands a frame sent to a link-local group address
 * (01:80:c2:00:00:0X) to the port device itself, before any port lock, whatever its source MAC, and the host took it
 * there (an outside review: a guest's IPv6 router advertisement gave the host a default route through its tap, and a
 * UDP packet from a spoofed MAC reached a host socket on the tap's interface, past rules written for the bridge). So
 * IPv6 is off on every port the broker makes (no address, no router advertisements: here, by sysctl, as netlink cannot
 * set it; again whenever the host turns it back on, reconcile.ts portReopened), and IPv4 drops unicast in link-layer
 * multicast, checks sources (a port has no address: every source but 0.0.0.0 fails) and answers no ARP: IPV4_DEVCONF,
 * in the RTM_NEWLINK that configures the port (rtnetlink.ts). Before the port is up. A host booted without IPv6 has
 * nothing to turn off.
 */
export function ipv6Off(name: string): void {
  try {
    fs.writeFileSync(`/proc/sys/net/ipv6/conf/${name}/disable_ipv6`, '1');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' && !fs.existsSync('/proc/sys/net/ipv6') && fs.existsSync('/proc/sys/net/ipv4')) return;
    const why = code ?? (err as Error).message;
    throw new TapbrokerError('TB_E_KERNEL', `cannot turn IPv6 off on port \`${name}' (${why}): the broker writes `
      + '/proc/sys/net/ipv6/conf/PORT/disable_ipv6', {
      cause: err, hint: 'a unit with ProcSubset=pid, or ProtectKernelTunables= without '
        + 'ReadWritePaths=-/proc/sys/net/ipv6/conf, keeps it from the broker: see the shipped tapbrokerd.service',
    });
  }
}

/** Is IPv6 on for device `name` (its disable_ipv6 0)? False where that cannot be read. */
export function ipv6On(name: string): boolean {
  try {
    return fs.readFileSync(`/proc/sys/net/ipv6/conf/${name}/disable_ipv6`, 'latin1').trim() === '0';
  } catch {
    return false;
  }
}

const attribute = Buffer.alloc(4096);
/**
 * One attribute of device `name` from sysfs, without its newline. Throws as the read does (ENOENT: no such device).
 * An attribute is at most a page, read in one go (a tap's link events read four: readFileSync's fstat and second
 * read cost a third more).
 */
export function sysfsRead(name: string, file: string): string {
  const fd = fs.openSync(`/sys/class/net/${name}/${file}`, fs.constants.O_RDONLY);
  try {
    return attribute.toString('latin1', 0, fs.readSync(fd, attribute, 0, attribute.length, 0)).replace(/\n$/, '');
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * The sysfs directory of device `name`, after checking that it shows this namespace's device: index `index`, with
 * `own.tag` as its alias (the broker's tag), or else `own.address` as its MAC. A name and an index repeat across
 * namespaces, and a broker started with `nsenter --net` keeps another namespace's sysfs (an outside re-test).
 */
export function sysfsDevice(
  name: string, index: number, own: { tag?: string | null | undefined; address?: Buffer | null },
): string {
  const dir = `/sys/class/net/${name}`;
  const read = (file: string) => sysfsRead(name, file);
  let same: boolean;
  try {
    same = read('ifindex') === String(index) && (own.tag ? read('ifalias') === own.tag
      : !own.address || read('address') === macFromBuffer(own.address));
  } catch (err) {
    throw kernelError(`cannot read \`${name}' from sysfs`, err);
  }
  if (!same) {
    throw new TapbrokerError('TB_E_KERNEL', `sysfs shows another namespace's \`${name}'; mount sysfs for the broker's `
      + 'namespace');
  }
  return dir;
}
