// Kernel steps on network devices: tun ioctls, rtnetlink, /dev/vhost-net. Every function here acts
// with privilege and is transactional: on failure it undoes what it made and throws a
// TapbrokerError that names the object and the errno.
import fs from 'node:fs';
import { TapbrokerError, sys } from '@tapbroker/protocol';
import { Rtnetlink, type Link } from './rtnetlink.js';

export const TUNSETIFF = 0x400454ca;
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
  const ifr = Buffer.alloc(IFREQ_SIZE);
  const bytes = Buffer.from(name, 'utf8');
  if (bytes.length > 15) throw new TapbrokerError('TB_E_INVALID_NAME', `interface name \`${name}' is longer than 15 bytes`);
  bytes.copy(ifr, 0);
  ifr.writeUInt16LE(flags, 16);
  return ifr;
}

/** TUNSETIFF flags for a tap: never attaching to an existing device (IFF_TUN_EXCL). */
export function tapFlags(opts: { vnetHdr: boolean; multiQueue: boolean; exclusive: boolean }): number {
  return IFF_TAP | IFF_NO_PI | (opts.exclusive ? IFF_TUN_EXCL : 0) | (opts.vnetHdr ? IFF_VNET_HDR : 0) | (opts.multiQueue ? IFF_MULTI_QUEUE : 0);
}

/** The host side of a guest MAC: first octet 0xfe so the bridge never adopts it as its own address. */
export function hostMac(guestMac: Buffer): Buffer {
  const mac = Buffer.from(guestMac);
  mac[0] = 0xfe;
  return mac;
}

/** Closes fds off the event loop: the last close of a tap destroys the netdev (~20 ms of kernel time). */
export function closeInBackground(fds: readonly number[]): Promise<void> {
  return Promise.all(fds.map((fd) => new Promise<void>((resolve) => fs.close(fd, () => resolve())))).then(() => undefined);
}

export interface TapRequest {
  name: string;
  queues: number;
  vnetHdr: boolean;
  vhost: boolean;
  guestMac: Buffer;
  bridge: Link;
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

export class Netdev {
  readonly rtnl = new Rtnetlink();

  close(): void {
    this.rtnl.close();
  }

  /** The bridge called `name`, or a TapbrokerError saying why it cannot be used. */
  bridge(name: string): Link {
    const link = this.rtnl.getLinkByName(name);
    if (!link) throw new TapbrokerError('TB_E_NO_SUCH_BRIDGE', `no bridge \`${name}'`);
    if (link.kind !== 'bridge') throw new TapbrokerError('TB_E_NOT_A_BRIDGE', `\`${name}' is ${link.kind ? `a ${link.kind} device` : 'a device'}, not a bridge`);
    return link;
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
      for (let q = 0; q < req.queues; q++) {
        const fd = fs.openSync(TUN_PATH, fs.constants.O_RDWR);
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
      }
      const link = this.rtnl.getLinkByName(req.name);
      if (!link || link.kind !== 'tun') throw new TapbrokerError('TB_E_KERNEL', `tap \`${req.name}' vanished after creation`);
      const mac = hostMac(req.guestMac);
      try {
        this.rtnl.configureLink(link.index, { address: mac, mtu: req.bridge.mtu, master: req.bridge.index, up: true });
      } catch (err) {
        throw kernelError(`failed to attach \`${req.name}' to bridge \`${req.bridge.name}'`, err);
      }
      if (req.vhost) for (let q = 0; q < req.queues; q++) vhostFds.push(openVhost());
      return { ifindex: link.index, hostMac: mac, mtu: req.bridge.mtu, tapFds, vhostFds };
    } catch (err) {
      void closeInBackground([...tapFds, ...vhostFds]);
      throw err;
    }
  }
}

function openVhost(): number {
  try {
    return fs.openSync(VHOST_PATH, fs.constants.O_RDWR);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENODEV' || code === 'ENXIO') {
      throw new TapbrokerError('TB_E_VHOST_UNAVAILABLE', `vhost unavailable: ${VHOST_PATH} does not exist on this host`);
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
  return new TapbrokerError('TB_E_KERNEL', `${what}: ${e.message}`, { cause: err });
}
