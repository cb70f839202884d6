// Macvtaps: a device on a physical NIC with the guest's MAC, whose queues are opened through its char
// device /dev/tap<ifindex>. That node lives in the devtmpfs every network namespace shares, so the broker
// picks an ifindex nobody can predict and checks every node it opens by its device number.
import { randomBytes, randomInt } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { TapbrokerError, sys } from '@tapbroker/protocol/core';
import {
  ContestedDeviceError, IFF_NO_PI, IFF_TAP, TUNSETIFF, kernelError, openVhost, sysfsDevice, tunIfreq, type Cleanup,
  type CreatedTap, type Faults, type MacvtapRequest,
} from './kernel.js';
import { grantUserOnly, mknodChar } from './libc.js';
import type { Link, Rtnetlink } from './rtnetlink.js';

const IFF_LOOPBACK = 0x8;

/** What the macvtap steps use of the Netdev they run in. */
export interface MacvtapHost {
  readonly rtnl: Rtnetlink;
  readonly cleanup: Cleanup;
  /** Where a private device node is made when /dev/tapN is another namespace's. */
  readonly stateDir: string;
  readonly faultPoint: Faults;
}

/** A random ifindex above 2^20, unused in this namespace, whose /dev/tap node does not exist. */
function freeTapIndex(rtnl: Rtnetlink): number {
  for (let i = 0; i < 64; i++) {
    const index = 0x100000 + randomInt(0x7fffffff - 0x100000);
    if (!fs.existsSync(`/dev/tap${index}`) && !rtnl.getLinkByIndex(index)) return index;
  }
  throw new TapbrokerError('TB_E_KERNEL', 'no free ifindex for a macvtap after 64 tries');
}

/**
 * Parents no macvtap may sit on: a switch's own ports (a Linux bridge, an Open vSwitch bridge's internal port,
 * whose policy a macvtap would bypass: a deny on the bridge would not see it), other virtual NICs, loopback.
 */
const NOT_PARENTS: Readonly<Record<string, string>> = {
  bridge: 'a bridge', openvswitch: 'an Open vSwitch port', macvlan: 'a macvlan device', macvtap: 'a macvtap device',
  tun: 'a tun device',
};

/** The parent a macvtap may sit on, or a TapbrokerError saying why not. */
export function macvtapParent(rtnl: Pick<Rtnetlink, 'getLinkByName'>, name: string): Link {
  const link = rtnl.getLinkByName(name);
  if (!link) throw new TapbrokerError('TB_E_NO_SUCH_PARENT', `no device \`${name}'`);
  const kind = link.kind ?? '';
  const what = (link.flags & IFF_LOOPBACK) !== 0 ? 'loopback' : Object.hasOwn(NOT_PARENTS, kind) && NOT_PARENTS[kind];
  if (what) throw new TapbrokerError('TB_E_BAD_PARENT', `\`${name}' is ${what} and cannot carry a macvtap`);
  return link;
}

/**
 * Kinds of device that sit on a lower device with a MAC of their own and take the frames sent to it from that
 * device's wire. (The kernel refuses a macvtap whose MAC an up macvlan or macvtap on its parent has, but not a
 * down one's, nor a VLAN device's or a MACsec device's.) Each is dumped on its own: the kernel filters by kind,
 * so a host with thousands of other devices costs a grant nothing for them.
 */
const STACKED_KINDS = ['macvtap', 'macvlan', 'vlan', 'macsec'];

/** Refuses a MAC already carried by the parent or any device stacked on it. */
export function checkMacFree(rtnl: Rtnetlink, parent: Link, mac: Buffer): void {
  const clash = [parent, ...STACKED_KINDS.flatMap((kind) => rtnl.dumpLinks(kind))]
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
export function createMacvtap(host: MacvtapHost, req: MacvtapRequest): CreatedTap {
  checkMacFree(host.rtnl, req.parent, req.guestMac);
  // /dev/tap<ifindex> lives in the devtmpfs every namespace shares, and a user who owns a network
  // namespace may create a macvtap at any ifindex there and own its node first. The broker's macvtap
  // gets an ifindex nobody can predict, whose node does not exist yet.
  const index = freeTapIndex(host.rtnl);
  try {
    host.rtnl.createMacvtap({
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
    host.faultPoint('macvtap:created');
    link = host.rtnl.getLinkByName(req.name);
    if (!link || link.kind !== 'macvtap' || link.link !== req.parent.index) {
      throw new TapbrokerError('TB_E_KERNEL', `macvtap \`${req.name}' vanished after creation`);
    }
    // Tag it at once: the kernel ignored the alias in the create message.
    host.rtnl.configureLink(link.index, { alias: req.alias });
    const [major, minor] = macvtapDevNumber(link, req.alias);
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
      const node = charNode(link.index, major, minor, host.stateDir);
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
    host.faultPoint('macvtap:opened');
    return {
      ifindex: link.index,
      hostMac: link.address ? Buffer.from(link.address) : Buffer.from(req.guestMac),
      mtu: link.mtu,
      tapFds,
      vhostFds,
    };
  } catch (err) {
    host.cleanup.closeFds([...tapFds, ...vhostFds], req.uid);
    const made = link ?? host.rtnl.getLinkByName(req.name);
    if (made?.kind === 'macvtap') {
      host.cleanup.deleteLink(made.index, req.uid, req.name, 'rollback of a failed create');
    }
    if (err instanceof TapbrokerError) throw err;
    const e = kernelError(`failed to open macvtap \`${req.name}'`, err);
    // Under the unit, DeviceAllow=char-macvtap is resolved when the service starts: macvtap loaded later is
    // refused by the device cgroup until a restart.
    if ((err as NodeJS.ErrnoException).code !== 'EPERM') throw e;
    throw new TapbrokerError(e.code, e.message, {
      cause: err,
      hint: 'if the macvtap module was loaded after tapbrokerd started, restart it (systemctl restart tapbrokerd)',
    });
  }
}

/** major:minor of a dev_t as Node reports it (glibc encoding). */
export function devNumbers(rdev: number | bigint): [number, number] {
  const d = BigInt(rdev);
  const major = Number(((d >> 8n) & 0xfffn) | ((d >> 32n) & ~0xfffn));
  const minor = Number((d & 0xffn) | ((d >> 12n) & ~0xffn));
  return [major, minor];
}

/** The char device number of a macvtap, from sysfs, after checking sysfs shows this namespace's device. */
function macvtapDevNumber(link: Link, tag: string | undefined): [number, number] {
  const { name, index: ifindex } = link;
  const dir = sysfsDevice(name, ifindex, { tag, address: link.address });
  let dev: string;
  try {
    dev = fs.readFileSync(`${dir}/macvtap/tap${ifindex}/dev`, 'utf8').trim();
  } catch (err) {
    throw kernelError(`cannot read the char device of \`${name}' from sysfs`, err);
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
