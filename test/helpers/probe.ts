// The unprivileged side of integration tests, run as its own process under an unprivileged uid:
// asks the broker for taps, proves each fd works by writing a frame, prints one JSON line, then
// holds the fds until its stdin closes.
import fs from 'node:fs';
import { sys } from '@tapbroker/protocol';
import {
  TapbrokerClient, TapbrokerError, type Lease, type MacvtapOptions, type NicOptions, type Tap, type TapOptions,
} from '@tapbroker/client';
import type { StatusReply } from '@tapbroker/protocol';

export type ProbeRequest = TapOptions | MacvtapOptions;

export interface ProbeArgs {
  socket: string;
  requests?: ProbeRequest[];
  /** Fill this process's fd table (its RLIMIT_NOFILE: As.nofile) to this many free fds before the creates. */
  freeFds?: number;
  /** Ask for every request in one `create` (all or none) instead of one request each. */
  batch?: boolean;
  /** Then ask for the broker's status. */
  status?: boolean;
  /** Write one Ethernet frame into every queue fd. */
  /** Write frames with this source MAC instead of the device's guest MAC (a spoofing guest). */
  writeFrom?: string;
  /** Write this frame (hex, from the destination MAC on) instead of the probe's own: a hostile guest. */
  writeRaw?: string;
  /** How many frames `write` writes into each queue fd (default 1). */
  frames?: number;
  write?: boolean;
  /** Then list the caller's leases. */
  list?: boolean;
  /** Then ask to release this name this many times on the one connection, whatever each answer (releaseCodes). */
  releaseAgain?: { name: string; times: number };
  /** Then release these names. */
  release?: string[];
  /** Misbehave: make every granted tap persistent through its own fd (TUNSETPERSIST). */
  persistOwnFds?: boolean;
  /** Misbehave: set every granted tap's MAC through its own fd (SIOCSIFHWADDR, no capability needed). */
  setOwnMac?: string;
  /** Misbehave: set every granted tap's MAC to this one and straight back (two SIOCSIFHWADDR on its fd). */
  flipOwnMac?: string;
  /** Misbehave: make itself each tap's owner, attach one more queue by name, and give the owner back (root). */
  flipOwner?: boolean;
  /** Open each device by name the moment it is granted, as libvirt does a persistent tap (TUNSETIFF). */
  openByName?: boolean;
  /** The tun clone device flipOwner and openByName open (tests make a 0666 node of their own: see tunNode). */
  tun?: string;
  /** Misbehave: make itself every granted tap's owner through its own fd (TUNSETOWNER). */
  ownOwnFds?: boolean;
  /** Misbehave later: on SIGUSR1, make every granted tap persistent through its own fd (TUNSETPERSIST). */
  persistOnSignal?: boolean;
  /**
   * Misbehave: toggle each tap's offloads this many times through its fd (TUNSETOFFLOAD, no capability
   * needed; each toggle is one link event), stopping at the first error (the device gone).
   */
  floodOffloads?: number;
}

/** Queues flipOwner attached: kept open until the probe exits. */
const extraQueues: number[] = [];

export interface ProbeResult {
  uid: number;
  pid: number;
  taps: Array<{ device: Tap['device']; tapFds: number; vhostFds: number; written: number[] }>;
  leases: Lease[] | null;
  released: Lease[];
  status: StatusReply | null;
  error: { code: string; message: string; rule?: string; hint?: string; nic?: number } | null;
  /** releaseAgain: each answer's error code, or 'released'. */
  releaseCodes?: string[];
  /** openByName: per device, 'ok' or the errno of its open. */
  opened?: string[];
  /** floodOffloads: per tap, toggles done and the errno that stopped them (null: all done). */
  offloads?: Array<{ toggles: number; stoppedBy: string | null }>;
}

/** virtio_net_hdr (10 bytes, all zero) + a broadcast frame with a local experimental ethertype. */
export function testFrame(srcMac: string): Buffer {
  const frame = Buffer.alloc(10 + 60);
  frame.fill(0xff, 10, 16);
  Buffer.from(srcMac.split(':').map((h) => parseInt(h, 16))).copy(frame, 16);
  frame.writeUInt16BE(0x88b5, 22);
  frame.write('tapbroker probe', 24);
  return frame;
}

async function main(): Promise<void> {
  const args = JSON.parse(process.argv[2]!) as ProbeArgs;
  const result: ProbeResult = { uid: process.getuid!(), pid: process.pid, taps: [], leases: null, released: [], status: null,
    error: null };
  const held: Tap[] = [];
  // The connection stays open until stdin closes: macvtap leases live as long as it does.
  let client: TapbrokerClient | null = null;
  try {
    client = await TapbrokerClient.connect(args.socket);
    const kinded = (r: ProbeRequest): NicOptions => ('parent' in r ? { kind: 'macvtap', ...r } : { kind: 'tap', ...r });
    const filler: number[] = [];
    if (args.freeFds !== undefined) {
      try {
        for (;;) filler.push(fs.openSync('/dev/null', 'r'));
      } catch (err) {
        if ((err as { code?: string }).code !== 'EMFILE') throw err;
      }
      for (const fd of filler.splice(filler.length - args.freeFds)) fs.closeSync(fd);
    }
    const batch = args.batch ? await client.createNics((args.requests ?? []).map(kinded))
      .finally(() => filler.forEach((fd) => fs.closeSync(fd))) : null;
    for (const [i, r] of (args.requests ?? []).entries()) {
      const tap = batch ? batch[i]! : 'parent' in r ? await client.createMacvtap(r as MacvtapOptions)
        : await client.createTap(r as TapOptions);
      held.push(tap);
      if (args.openByName) {
        const fd = fs.openSync(args.tun ?? '/dev/net/tun', 'r+');
        // struct ifreq: the name, then IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (| IFF_MULTI_QUEUE) at 16.
        const ifr = Buffer.alloc(40);
        ifr.write(tap.device.name, 0, 'latin1');
        ifr.writeUInt16LE(0x0002 | 0x1000 | 0x4000 | (tap.device.queues > 1 ? 0x0100 : 0), 16);
        try {
          sys.ioctlPtr(fd, 0x400454ca /* TUNSETIFF */, ifr);
          (result.opened ??= []).push('ok');
        } catch (err) {
          (result.opened ??= []).push((err as { code?: string }).code ?? String(err));
        } finally {
          fs.closeSync(fd);
        }
      }
      const src = args.writeFrom ?? tap.device.mac ?? '52:54:00:00:00:01';
      const written = args.write
        ? tap.tapFds.flatMap((fd) => Array.from({ length: args.frames ?? 1 }, () => fs.writeSync(fd, args.writeRaw
          ? Buffer.concat([Buffer.alloc(10), Buffer.from(args.writeRaw, 'hex')]) : testFrame(src))))
        : [];
      if (args.persistOwnFds) for (const fd of tap.tapFds) sys.ioctlInt(fd, 0x400454cb /* TUNSETPERSIST */, 1);
      if (args.persistOnSignal) {
        const fds = tap.tapFds;
        process.on('SIGUSR1', () => {
          for (const fd of fds) sys.ioctlInt(fd, 0x400454cb /* TUNSETPERSIST */, 1);
        });
      }
      if (args.ownOwnFds) sys.ioctlInt(tap.tapFds[0]!, 0x400454cc /* TUNSETOWNER */, process.getuid!());
      if (args.flipOwner) {
        sys.ioctlInt(tap.tapFds[0]!, 0x400454cc /* TUNSETOWNER */, process.getuid!());
        const extra = fs.openSync(args.tun ?? '/dev/net/tun', 'r+');
        extraQueues.push(extra);
        // struct ifreq: the name, then IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE at 16.
        const ifr = Buffer.alloc(40);
        ifr.write(tap.device.name, 0, 'latin1');
        ifr.writeUInt16LE(0x0002 | 0x1000 | 0x4000 | 0x0100, 16);
        try {
          sys.ioctlPtr(extra, 0x400454ca /* TUNSETIFF */, ifr);
          sys.ioctlInt(tap.tapFds[0]!, 0x400454cc /* TUNSETOWNER */, 0);
        } catch {
          // The broker was quicker: the device is gone (TUNSETIFF would then make a new one, refused: EPERM).
        }
      }
      const setMac = (mac: string) => {
        // struct ifreq: the name is ignored on a tap fd; ifr_hwaddr (a sockaddr) at 16: ARPHRD_ETHER, MAC.
        const ifr = Buffer.alloc(40);
        ifr.writeUInt16LE(1, 16);
        Buffer.from(mac.split(':').map((h) => parseInt(h, 16))).copy(ifr, 18);
        sys.ioctlPtr(tap.tapFds[0]!, 0x8924 /* SIOCSIFHWADDR */, ifr);
      };
      if (args.setOwnMac) setMac(args.setOwnMac);
      if (args.flipOwnMac) {
        setMac(args.flipOwnMac);
        setMac(tap.device.host_mac);
      }
      if (args.floodOffloads) {
        const done = { toggles: 0, stoppedBy: null as string | null };
        (result.offloads ??= []).push(done);
        try {
          for (let i = 0; i < args.floodOffloads; i++) {
            sys.ioctlInt(tap.tapFds[0]!, 0x400454d0 /* TUNSETOFFLOAD */, (i + 1) % 2 /* TUN_F_CSUM, or none */);
            done.toggles++;
          }
        } catch (err) {
          done.stoppedBy = (err as { code?: string }).code ?? String(err);
        }
      }
      result.taps.push({ device: tap.device, tapFds: tap.tapFds.length, vhostFds: tap.vhostFds.length, written });
    }
    if (args.list) result.leases = (await client.list()).leases;
    if (args.status) result.status = await client.status();
    if (args.releaseAgain) {
      result.releaseCodes = [];
      for (let i = 0; i < args.releaseAgain.times; i++) {
        const code = await client.release(args.releaseAgain.name).then(() => 'released',
          (err: unknown) => (err instanceof TapbrokerError ? err.code : Promise.reject(err)));
        result.releaseCodes.push(code);
      }
    }
    for (const name of args.release ?? []) result.released.push(await client.release(name));
  } catch (err) {
    if (!(err instanceof TapbrokerError)) throw err;
    result.error = {
      code: err.code, message: err.message, ...(err.rule ? { rule: err.rule } : {}), ...(err.hint ? { hint: err.hint } : {}),
      ...(err.nic !== undefined ? { nic: err.nic } : {}),
    };
  }
  process.stdout.write(`${JSON.stringify(result)}\n`);
  process.stdin.resume();
  process.stdin.on('end', () => {
    client?.close();
    process.exit(0);
  });
}

void main();
