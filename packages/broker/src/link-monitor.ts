// RTNLGRP_LINK: the kernel's link events, read without blocking and decoded only where wanted.
import { sys, watchReadable } from '@tapbroker/protocol/core';
import { attachFilter, type BpfInsn } from './libc.js';
import { NLMSGHDR, splitMessages } from './netlink.js';
import {
  AF_BRIDGE, AF_INET6, IFINFOMSG, RTMGRP_IPV6_IFINFO, RTMGRP_LINK, RTM_DELLINK, RTM_NEWLINK, masterOf, nameOf,
  parseLink, type Link,
} from './rtnetlink.js';
import { toStderr } from './stderr.js';

/** The kernel's queue of link events for the broker, in bytes (a teardown burst then seldom overruns it). */
export const LINK_EVENT_QUEUE = 4 * 1024 * 1024;

/**
 * Reads per drain at most. Events can come faster than they are decoded (a holder toggling its tap's
 * offloads, which needs no capability, sends one per ioctl): past this the rest waits for the next turn of
 * the event loop, and everyone else is served meanwhile.
 */
export const DRAIN_BUDGET = 256;

/**
 * A socket filter that drops a bridge port's own view of its link (ifinfomsg's family, byte 16, AF_BRIDGE) in the
 * kernel: skipped when read anyway, they were four of a tap's ten events at its create and more at its deletion, each
 * a read, and room taken in the queue a teardown burst overruns. One event to a message, as the kernel sends them.
 */
export const SKIP_BRIDGE_VIEWS: readonly BpfInsn[] = [
  [0x30, 0, 0, NLMSGHDR], // ldb [16]: the family (a message too short to have one would be dropped: no link message is)
  [0x15, 0, 1, AF_BRIDGE], // jeq AF_BRIDGE
  [0x06, 0, 0, 0], // ret 0: dropped
  [0x06, 0, 0, 0xffffffff], // ret all: kept
];

/** Is an event of this type about this device worth decoding? `master()`: the event's IFLA_MASTER. */
export type Wants = (
  type: number, index: number, master: () => number | null, name: () => string | null,
) => boolean;

/**
 * RTNLGRP_LINK notifications: `onLink(type, link)` for every RTM_NEWLINK/RTM_DELLINK of a device (the
 * AF_BRIDGE port messages, e.g. a port leaving its bridge, are not the device and are not passed on);
 * `onOverrun` once per overrun, when some were lost. `drain()` applies what is queued now, so a decision
 * never runs on a table older than the events the kernel already sent (during a flood, up to a budget).
 */
export class LinkMonitor {
  private readonly fd: number;
  private readonly watch: { close(): void };
  private readonly rx = new sys.Receiver(256 * 1024);
  /** Whether the kernel drops the bridge's port views for this socket (SKIP_BRIDGE_VIEWS). */
  readonly filtered: boolean = false;

  /**
   * `wants`: whether an event about this ifindex is worth decoding (most of a busy host's are not);
   * `master()` reads the event's bridge index alone, for the few it is asked of.
   */
  constructor(
    private readonly onLink: (type: number, link: Link) => void,
    private readonly onOverrun: () => void,
    private readonly wants: Wants = () => true,
    queueBytes = LINK_EVENT_QUEUE,
    /** IPv6 came up on device `index`, or null: some such news were lost (see Ipv6Watch). */
    onIpv6?: (index: number | null) => void,
  ) {
    this.fd = sys.socket(sys.AF_NETLINK, sys.SOCK_RAW | sys.SOCK_CLOEXEC | sys.SOCK_NONBLOCK, sys.NETLINK_ROUTE);
    // A larger queue overruns less often under a teardown burst (each overrun costs one dump).
    try {
      sys.setsockoptInt(this.fd, sys.SOL_SOCKET, 33 /* SO_RCVBUFFORCE */, queueBytes);
    } catch {
      // Without CAP_NET_ADMIN the default stays; overruns are still handled.
    }
    const sa = Buffer.alloc(12);
    sa.writeUInt16LE(sys.AF_NETLINK, 0);
    sa.writeUInt32LE(RTMGRP_LINK, 8);
    sys.bind(this.fd, sa, 'RTMGRP_LINK');
    try {
      attachFilter(this.fd, SKIP_BRIDGE_VIEWS);
      this.filtered = true;
    } catch {
      // Without the filter the same events come, and are skipped when read.
    }
    this.watch = watchReadable(this.fd, () => this.drain());
    this.ipv6 = onIpv6 ? new Ipv6Watch(onIpv6) : null;
  }

  private readonly ipv6: Ipv6Watch | null;

  /** Applies what is queued, up to DRAIN_BUDGET reads; false when some was left for later. */
  drain(): boolean {
    let overrun = false;
    const read = readQueued(this.fd, this.rx, (m) => {
      const type = m.readUInt16LE(4);
      if (type !== RTM_NEWLINK && type !== RTM_DELLINK) return;
      // ifinfomsg: the family (a bridge port's own view is AF_BRIDGE) and the ifindex, read before decoding.
      if (m.length < NLMSGHDR + IFINFOMSG || m.readUInt8(16) === AF_BRIDGE
        || !this.wants(type, m.readInt32LE(20), () => masterOf(m), () => nameOf(m))) return;
      try {
        this.onLink(type, parseLink(m));
      } catch (err) {
        // One event that cannot be applied does not lose the rest: they go on, and a resync follows.
        toStderr(`tapbrokerd: a link event could not be applied: ${(err as Error).stack}\n`);
        overrun = true;
      }
    });
    // One resync after the reads: a dump then reflects everything lost.
    if (overrun || read.lost) this.onOverrun();
    return read.emptied;
  }

  close(): void {
    this.ipv6?.close();
    this.watch.close();
    sys.close(this.fd);
  }
}

/**
 * Each message queued on netlink socket `fd`, up to DRAIN_BUDGET reads: `lost` when the kernel dropped some (an
 * overrun), `emptied` when nothing is left for later.
 */
function readQueued(fd: number, rx: sys.Receiver, each: (m: Buffer) => void): { lost: boolean; emptied: boolean } {
  let lost = false;
  for (let reads = 0; reads < DRAIN_BUDGET; reads++) {
    let got: sys.MsgIn | null;
    try {
      got = rx.recv(fd, sys.MSG_DONTWAIT);
    } catch (err) {
      if (!(err instanceof sys.SyscallError && err.errno === sys.errno.ENOBUFS)) throw err;
      lost = true;
      continue;
    }
    if (got === null) return { lost, emptied: true };
    for (const m of splitMessages(got.data)) each(m);
  }
  return { lost, emptied: false };
}

/** After news were lost, the next look at every port waits at least this long since the last (a flood's overruns). */
const IPV6_LOST_GAP_MS = 2000;
/** Notices a second past which their socket is left unread for a while (Ipv6Watch.pause): a host's own are a few. */
const IPV6_FLOOD = 200;

/**
 * RTNLGRP_IPV6_IFINFO: the kernel says when IPv6 comes up on a device (addrconf's AF_INET6 RTM_NEWLINK), at once,
 * before any address passes duplicate address detection (an outside audit: a guest whose router advertisements
 * stretched DAD to weeks kept a reopened port's address, the broker's former cue, from ever being told). On a socket
 * of its own: a guest can make the host's bridge send these (advertisements that flip its flags), and their flood
 * must overrun nothing but this queue (address events read with the link events overran those: 39 resyncs in 6 s).
 * `on(index)` for each; `on(null)` after some were lost, at most once per IPV6_LOST_GAP_MS (each one looks at every
 * port).
 */
class Ipv6Watch {
  private readonly fd: number;
  private watch: { close(): void } | null;
  private resume: NodeJS.Timeout | null = null;
  private readonly rx = new sys.Receiver(64 * 1024);
  private lostAt = -Infinity;
  private lostLater: NodeJS.Timeout | null = null;

  constructor(private readonly on: (index: number | null) => void) {
    this.fd = sys.socket(sys.AF_NETLINK, sys.SOCK_RAW | sys.SOCK_CLOEXEC | sys.SOCK_NONBLOCK, sys.NETLINK_ROUTE);
    const sa = Buffer.alloc(12);
    sa.writeUInt16LE(sys.AF_NETLINK, 0);
    sa.writeUInt32LE(RTMGRP_IPV6_IFINFO, 8);
    sys.bind(this.fd, sa, 'RTMGRP_IPV6_IFINFO');
    this.watch = watchReadable(this.fd, () => this.drain());
  }

  private drain(): void {
    const now = performance.now();
    if (now - this.windowStart > 1000) [this.windowStart, this.seen] = [now, 0];
    const read = readQueued(this.fd, this.rx, (m) => {
      this.seen++;
      const up = m.readUInt16LE(4) === RTM_NEWLINK && m.length >= NLMSGHDR + IFINFOMSG;
      if (up && m.readUInt8(16) === AF_INET6) this.tell(m.readInt32LE(20));
    });
    if (read.lost) this.lost();
    if (!read.emptied || this.seen > IPV6_FLOOD) this.pause();
  }

  /** Notices read in the current second (see IPV6_FLOOD). */
  private seen = 0;
  private windowStart = -Infinity;

  /**
   * More notices than a second or a drain should bring (a guest's router advertisements flipping its bridge's flags,
   * one notice each: an outside re-test kept 70 % of a core busy): not read for IPV6_LOST_GAP_MS, what came meanwhile
   * made up by one look at every port.
   */
  private pause(): void {
    this.watch?.close();
    this.watch = null;
    this.resume = setTimeout(() => {
      this.resume = null;
      this.watch = watchReadable(this.fd, () => this.drain());
      this.lost();
    }, IPV6_LOST_GAP_MS);
  }

  private lost(): void {
    if (this.lostLater) return;
    const wait = this.lostAt + IPV6_LOST_GAP_MS - performance.now();
    this.lostLater = setTimeout(() => {
      this.lostLater = null;
      this.lostAt = performance.now();
      this.tell(null);
    }, Math.max(0, wait));
  }

  private tell(index: number | null): void {
    try {
      this.on(index);
    } catch (err) {
      toStderr(`tapbrokerd: IPv6 news could not be applied: ${(err as Error).stack}\n`);
    }
  }

  close(): void {
    if (this.lostLater) clearTimeout(this.lostLater);
    if (this.resume) clearTimeout(this.resume);
    this.watch?.close();
    sys.close(this.fd);
  }
}
