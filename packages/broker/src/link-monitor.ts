// RTNLGRP_LINK: the kernel's link events, read without blocking and decoded only where wanted.
import { sys, watchReadable } from '@tapbroker/protocol/core';
import { attachFilter, type BpfInsn } from './libc.js';
import { NLMSGHDR, splitMessages } from './netlink.js';
import {
  AF_BRIDGE, IFINFOMSG, RTMGRP_IPV6_IFADDR, RTMGRP_LINK, RTM_DELLINK, RTM_NEWADDR, RTM_NEWLINK, masterOf, nameOf,
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
    /** An IPv6 address came on device `index` (RTM_NEWADDR; ifaddrmsg's index sits where ifinfomsg's does). */
    private readonly onAddress: (index: number) => void = () => {},
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
    sa.writeUInt32LE(RTMGRP_LINK | RTMGRP_IPV6_IFADDR, 8);
    sys.bind(this.fd, sa, 'RTMGRP_LINK');
    try {
      attachFilter(this.fd, SKIP_BRIDGE_VIEWS);
      this.filtered = true;
    } catch {
      // Without the filter the same events come, and are skipped when read.
    }
    this.watch = watchReadable(this.fd, () => this.drain());
  }

  /** Applies what is queued, up to DRAIN_BUDGET reads; false when some was left for later. */
  drain(): boolean {
    let overrun = false;
    let emptied = false;
    for (let reads = 0; reads < DRAIN_BUDGET; reads++) {
      let got: sys.MsgIn | null;
      try {
        got = this.rx.recv(this.fd, sys.MSG_DONTWAIT);
      } catch (err) {
        if (err instanceof sys.SyscallError && err.errno === sys.errno.ENOBUFS) {
          overrun = true;
          continue;
        }
        throw err;
      }
      if (got === null) {
        emptied = true;
        break;
      }
      for (const m of splitMessages(got.data)) {
        const type = m.readUInt16LE(4);
        if (type === RTM_NEWADDR && m.length >= NLMSGHDR + 8) {
          try {
            this.onAddress(m.readInt32LE(20));
          } catch (err) {
            toStderr(`tapbrokerd: an address event could not be applied: ${(err as Error).stack}\n`);
          }
        }
        if (type !== RTM_NEWLINK && type !== RTM_DELLINK) continue;
        // ifinfomsg: the family (a bridge port's own view is AF_BRIDGE) and the ifindex, read before decoding.
        if (m.length < NLMSGHDR + IFINFOMSG || m.readUInt8(16) === AF_BRIDGE
          || !this.wants(type, m.readInt32LE(20), () => masterOf(m), () => nameOf(m))) continue;
        try {
          this.onLink(type, parseLink(m));
        } catch (err) {
          // One event that cannot be applied does not lose the rest: they go on, and a resync follows.
          toStderr(`tapbrokerd: a link event could not be applied: ${(err as Error).stack}\n`);
          overrun = true;
        }
      }
    }
    // One resync after the reads: a dump then reflects everything lost.
    if (overrun) this.onOverrun();
    return emptied;
  }

  close(): void {
    this.watch.close();
    sys.close(this.fd);
  }
}
