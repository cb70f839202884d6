// rtnetlink: link message encoding (pure, unit-tested) and a small synchronous NETLINK_ROUTE socket.
// Requests are tiny and answered in well under a millisecond; slow teardown never goes through here.
import { sys } from '@tapbroker/protocol/core';
import { loadedModules } from './kernel.js';
import { netlinkInBackground } from './libc.js';
import {
  NLMSGHDR, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, ackError, align4,
  attrNested, attrString, attrU32, cstr, netlinkError, nlmsg, parseAttrs, rtattr, splitMessages,
} from './netlink.js';

export const RTM_NEWLINK = 16;
export const RTM_DELLINK = 17;
export const RTM_GETLINK = 18;
export const IFLA_ADDRESS = 1;
export const IFLA_IFNAME = 3;
export const IFLA_MTU = 4;
export const IFLA_LINK = 5;
export const IFLA_MASTER = 10;
export const IFLA_LINKINFO = 18;
export const IFLA_IFALIAS = 20;
export const IFLA_INFO_KIND = 1;
export const IFLA_INFO_DATA = 2;
const IFLA_INFO_SLAVE_DATA = 5;
export const IFLA_MACVLAN_MODE = 1;
export const IFLA_TUN_OWNER = 1;
export const IFLA_TUN_GROUP = 2;
export const IFLA_TUN_PERSIST = 6;
export const IFLA_TUN_NUM_QUEUES = 8;
export const IFLA_TUN_NUM_DISABLED_QUEUES = 9;
export const RTM_SETLINK = 19;
export const AF_BRIDGE = 7;
export const IFLA_AF_SPEC = 26;
const AF_INET = 2;
const IFLA_INET_CONF = 1;
const IPV4_DEVCONF_RP_FILTER = 8;
const IPV4_DEVCONF_ARP_IGNORE = 19;
const IPV4_DEVCONF_DROP_UNICAST_IN_L2_MULTICAST = 30;
export const IFLA_BRIDGE_VLAN_INFO = 2;
export const BRIDGE_VLAN_INFO_PVID = 0x2;
export const BRIDGE_VLAN_INFO_UNTAGGED = 0x4;
export const IFLA_BR_VLAN_FILTERING = 7;
const IFLA_BR_VLAN_DEFAULT_PVID = 39;
const IFLA_NEW_NETNSID = 45;
export const RTMGRP_LINK = 1;
/** A device's IPv6 coming up (an AF_INET6 RTM_NEWLINK as addrconf configures it): see link-monitor.ts Ipv6Watch. */
export const RTMGRP_IPV6_IFINFO = 0x800;
export const AF_INET6 = 10;
/** MACVLAN_MODE_* from if_link.h. */
export const MACVLAN_MODES = { private: 1, vepa: 2, bridge: 4, passthru: 8 } as const;
export const IFLA_EXT_MASK = 29;
/**
 * What link messages leave out: their statistics (RTEXT_FILTER_SKIP_STATS; older kernels ignore the bit). Not
 * RTEXT_FILTER_VF: a NIC's many virtual functions could make one link's message larger than a reply buffer.
 */
const EXT_MASK = 1 << 3;
/** A dump whose set of links changed while it ran: it may have missed some (NLM_F_DUMP_INTR). */
const NLM_F_DUMP_INTR = 0x10;
export const IFF_UP = 0x1;
export const IFINFOMSG = 16;

export interface IfInfo {
  index?: number;
  flags?: number;
  change?: number;
}

/** nlmsghdr + ifinfomsg (AF_UNSPEC) + attributes. */
export function linkMessage(type: number, flags: number, seq: number, info: IfInfo, attrs: Buffer[]): Buffer {
  const ifinfo = Buffer.alloc(IFINFOMSG);
  ifinfo.writeInt32LE(info.index ?? 0, 4);
  ifinfo.writeUInt32LE(info.flags ?? 0, 8);
  ifinfo.writeUInt32LE(info.change ?? 0, 12);
  return nlmsg(type, flags, seq, ifinfo, ...attrs);
}

/** One attribute of a link message, found without decoding the rest; null without it. */
function linkAttr(msg: Buffer, type: number): Buffer | null {
  const end = Math.min(msg.readUInt32LE(0), msg.length);
  // Byte by byte, as parseAttrs reads (no JIT).
  for (let o = NLMSGHDR + IFINFOMSG, len = 0; o + 4 <= end; o += align4(len)) {
    len = msg[o]! | (msg[o + 1]! << 8);
    if (len < 4 || o + len > end) break;
    if (((msg[o + 2]! | (msg[o + 3]! << 8)) & 0x3fff) === type) return msg.subarray(o + 4, o + len);
  }
  return null;
}

/** An RTM_NEWLINK's IFLA_MASTER (its bridge's index), read without decoding the rest; null without one. */
export function masterOf(msg: Buffer): number | null {
  const a = linkAttr(msg, IFLA_MASTER);
  return a && a.length >= 4 ? a.readUInt32LE(0) || null : null;
}

/** A link message's IFLA_IFNAME, read without decoding the rest; null without one. */
export function nameOf(msg: Buffer): string | null {
  return cstr(linkAttr(msg, IFLA_IFNAME) ?? undefined) ?? null;
}

export interface Link {
  /** ifi_family: AF_UNSPEC for the device itself, AF_BRIDGE for its bridge-port view. */
  family: number;
  index: number;
  name: string;
  flags: number;
  mtu: number;
  master: number | null;
  address: Buffer | null;
  /** IFLA_INFO_KIND: `bridge`, `tun`, `veth`, `macvtap`…; null for devices without one (lo, physical NICs). */
  kind: string | null;
  /** IFLA_LINK: the lower device (a macvtap's parent), or null. */
  link: number | null;
  /** IFLA_IFALIAS, or null. */
  alias: string | null;
  /** For a tun/tap: IFLA_TUN_PERSIST; null for other kinds. */
  persist: boolean | null;
  /**
   * For a tun/tap: its owner and group (null when unset), and its attached queues (enabled + disabled); the
   * kernel counts queues only for multiqueue taps (null for a single-queue one: see Netdev.holdTap).
   */
  tun: { owner: number | null; group: number | null; queues: number | null } | null;
  /** For a bridge: IFLA_BR_VLAN_FILTERING; null for other kinds or where the kernel has no VLAN filtering. */
  vlanFiltering: boolean | null;
  /** For a bridge: the VLAN a new port joins (IFLA_BR_VLAN_DEFAULT_PVID, 0 for none); null as vlanFiltering. */
  defaultPvid: number | null;
  /** On the RTM_DELLINK of a device moved to another network namespace: that namespace's id here (else null). */
  movedTo: number | null;
  /** For a bridge port: IFLA_BRPORT_LOCKED (its slave data); null for a device on no bridge, or an old kernel. */
  portLocked: boolean | null;
}

/** The attributes parseLink reads. */
const LINK_ATTRS: ReadonlySet<number> = new Set([
  IFLA_IFNAME, IFLA_MTU, IFLA_MASTER, IFLA_ADDRESS, IFLA_LINKINFO, IFLA_LINK, IFLA_IFALIAS, IFLA_NEW_NETNSID,
]);

/** Decodes the ifinfomsg of an RTM_NEWLINK message (header included). */
export function parseLink(msg: Buffer): Link {
  const attrs = parseAttrs(msg, NLMSGHDR + IFINFOMSG, msg.readUInt32LE(0), LINK_ATTRS);
  const linkinfo = attrs.get(IFLA_LINKINFO);
  const info = linkinfo ? parseAttrs(linkinfo) : null;
  const kind = info ? cstr(info.get(IFLA_INFO_KIND)) ?? null : null;
  const tunData = kind === 'tun' && info?.get(IFLA_INFO_DATA) ? parseAttrs(info.get(IFLA_INFO_DATA)!) : null;
  const brData = kind === 'bridge' && info?.get(IFLA_INFO_DATA) ? parseAttrs(info.get(IFLA_INFO_DATA)!) : null;
  const brFiltering = brData?.get(IFLA_BR_VLAN_FILTERING);
  const pvid = brData?.get(IFLA_BR_VLAN_DEFAULT_PVID);
  const master = attrs.get(IFLA_MASTER);
  const lower = attrs.get(IFLA_LINK);
  const slave = info?.get(IFLA_INFO_SLAVE_DATA);
  const port = slave ? parseAttrs(slave).get(IFLA_BRPORT_LOCKED) : undefined;
  const u32 = (t: number) => tunData?.get(t)?.readUInt32LE(0);
  const id = (v: number | undefined) => (v === undefined || v === 0xffffffff ? null : v);
  const queues = u32(IFLA_TUN_NUM_QUEUES);
  return {
    family: msg.readUInt8(16),
    index: msg.readInt32LE(20),
    flags: msg.readUInt32LE(24),
    name: cstr(attrs.get(IFLA_IFNAME)) ?? '',
    mtu: attrs.get(IFLA_MTU)?.readUInt32LE(0) ?? 0,
    master: master && master.readUInt32LE(0) !== 0 ? master.readUInt32LE(0) : null,
    address: attrs.get(IFLA_ADDRESS) ?? null,
    kind,
    link: lower && lower.readUInt32LE(0) !== 0 ? lower.readUInt32LE(0) : null,
    alias: cstr(attrs.get(IFLA_IFALIAS)) || null,
    persist: tunData ? (tunData.get(IFLA_TUN_PERSIST)?.[0] ?? 0) === 1 : null,
    tun: tunData ? {
      owner: id(u32(IFLA_TUN_OWNER)), group: id(u32(IFLA_TUN_GROUP)),
      queues: queues === undefined ? null : queues + (u32(IFLA_TUN_NUM_DISABLED_QUEUES) ?? 0),
    } : null,
    vlanFiltering: brFiltering ? brFiltering[0] === 1 : null,
    defaultPvid: pvid ? pvid.readUInt16LE(0) : null,
    portLocked: port ? port[0] === 1 : null,
    movedTo: attrs.get(IFLA_NEW_NETNSID)?.readInt32LE(0) ?? null,
  };
}

/** RTM_NEWLINK creating a macvtap on `parent` with the guest's MAC, up, never replacing a device. */
export function macvtapMessage(
  seq: number,
  opts: { name: string; index?: number; parent: number; mac: Buffer; mode: keyof typeof MACVLAN_MODES; alias?: string },
): Buffer {
  return linkMessage(
    RTM_NEWLINK,
    NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
    seq,
    { index: opts.index ?? 0, flags: IFF_UP, change: IFF_UP },
    [
      attrString(IFLA_IFNAME, opts.name),
      ...(opts.alias ? [attrString(IFLA_IFALIAS, opts.alias)] : []),
      attrU32(IFLA_LINK, opts.parent),
      rtattr(IFLA_ADDRESS, opts.mac),
      attrNested(IFLA_LINKINFO, [
        attrString(IFLA_INFO_KIND, 'macvtap'),
        attrNested(IFLA_INFO_DATA, [attrU32(IFLA_MACVLAN_MODE, MACVLAN_MODES[opts.mode])]),
      ]),
    ],
  );
}

/**
 * A bridge port's VLAN (AF_BRIDGE RTM_SETLINK/RTM_DELLINK with IFLA_AF_SPEC/IFLA_BRIDGE_VLAN_INFO):
 * `add` as the port's PVID, untagged — an access port — or remove `vid` (the default VLAN 1).
 */
export function bridgeVlanMessage(seq: number, port: number, vid: number, add: boolean): Buffer {
  const info = Buffer.alloc(4);
  info.writeUInt16LE(add ? BRIDGE_VLAN_INFO_PVID | BRIDGE_VLAN_INFO_UNTAGGED : 0, 0);
  info.writeUInt16LE(vid, 2);
  const msg = linkMessage(add ? RTM_SETLINK : RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, seq, { index: port }, [
    attrNested(IFLA_AF_SPEC, [rtattr(IFLA_BRIDGE_VLAN_INFO, info)]),
  ]);
  msg.writeUInt8(AF_BRIDGE, 16);
  return msg;
}

/**
 * The VLAN a new port of `bridge` joined and must leave to be an access port of `vid` alone: the bridge's
 * default_pvid (1 unless its administrator changed it; 0: a new port joins none), null when that is `vid`.
 */
export function joinedVlan(bridge: Pick<Link, 'defaultPvid'> | null, vid: number): number | null {
  const joined = bridge?.defaultPvid ?? 1;
  return joined === 0 || joined === vid ? null : joined;
}

export const RTM_NEWNEIGH = 28;
export const RTM_GETNEIGH = 30;
const NDA_LLADDR = 2;
const NDA_VLAN = 5;
const NDA_MASTER = 9;
const NTF_MASTER = 0x04;
/** A static entry that stays on its port: without it the bridge moves a static entry to any port that sends
 *  from its MAC (br_fdb_update), so another port could take a locked lease's address. */
const NTF_STICKY = 0x40;
const NUD_REACHABLE = 0x02;
export const NUD_NOARP = 0x40;
export const NUD_PERMANENT = 0x80;
const NDMSG = 12;
const IFLA_PROTINFO = 12;
const IFLA_BRPORT_GUARD = 5;
const IFLA_BRPORT_PROTECT = 6;
const IFLA_BRPORT_LEARNING = 8;
const IFLA_BRPORT_UNICAST_FLOOD = 9;
const IFLA_BRPORT_FLUSH = 24;
export const IFLA_BRPORT_LOCKED = 39;
const NLA_F_NESTED = 0x8000;

/** An ndmsg (AF_BRIDGE) request: `port` is ndm_ifindex, `state` ndm_state, NTF_MASTER (and `ntf`) set. */
function neighMessage(
  type: number, flags: number, seq: number, port: number, state: number, attrs: Buffer[], ntf = 0,
): Buffer {
  const ndmsg = Buffer.alloc(NDMSG);
  ndmsg.writeUInt8(AF_BRIDGE, 0);
  ndmsg.writeInt32LE(port, 4);
  ndmsg.writeUInt16LE(state, 8);
  ndmsg.writeUInt8(NTF_MASTER | ntf, 10);
  return nlmsg(type, flags, seq, ndmsg, ...attrs);
}

/**
 * RTM_NEWNEIGH (AF_BRIDGE, NTF_MASTER, NLM_F_REPLACE): the bridge's forwarding entry for `mac` (in
 * `vlan`) points at port `port`: learned-like (NUD_REACHABLE, it ages) or static (NUD_NOARP: what a
 * locked port forwards from). REPLACE moves an entry the bridge learned on another port.
 */
export function fdbEntryMessage(
  seq: number, port: number, mac: Buffer, opts: { static?: boolean; vlan?: number | null } = {},
): Buffer {
  const vlan = Buffer.alloc(2);
  vlan.writeUInt16LE(opts.vlan ?? 0);
  return neighMessage(
    RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | 0x100 /* NLM_F_REPLACE */, seq, port,
    opts.static ? NUD_NOARP : NUD_REACHABLE, [rtattr(NDA_LLADDR, mac), ...(opts.vlan ? [rtattr(NDA_VLAN, vlan)] : [])],
    opts.static ? NTF_STICKY : 0,
  );
}

/** RTM_GETNEIGH for one forwarding entry of bridge `bridge` (the kernel's `bridge fdb get`). */
export function fdbGetMessage(seq: number, bridge: number, mac: Buffer, vlan: number | null): Buffer {
  const master = Buffer.alloc(4);
  master.writeUInt32LE(bridge);
  const vid = Buffer.alloc(2);
  vid.writeUInt16LE(vlan ?? 0);
  return neighMessage(RTM_GETNEIGH, NLM_F_REQUEST, seq, 0, 0, [
    rtattr(NDA_LLADDR, mac), rtattr(NDA_MASTER, master), ...(vlan ? [rtattr(NDA_VLAN, vid)] : []),
  ]);
}

/**
 * RTM_SETLINK (AF_BRIDGE) with IFLA_PROTINFO: port `port` locked (it forwards only frames whose source
 * MAC has a static entry on it), learning and unknown-unicast flooding off, or the reverse.
 */
export function portLockMessage(seq: number, port: number, locked: boolean): Buffer {
  const flag = (v: boolean) => Buffer.from([v ? 1 : 0]);
  const protinfo = rtattr(IFLA_PROTINFO | NLA_F_NESTED, Buffer.concat([
    rtattr(IFLA_BRPORT_LOCKED, flag(locked)), rtattr(IFLA_BRPORT_LEARNING, flag(!locked)),
    // Unicast to a MAC the bridge has no entry for is not flooded to it: its guest's MAC has a static entry. An
    // outside review: a holder gave its other tap a LAN machine's MAC and back (SIOCSIFHWADDR on its fd), the
    // bridge dropped that machine's entry, and its traffic flooded to every port, the same user's locked tap too.
    rtattr(IFLA_BRPORT_UNICAST_FLOOD, flag(!locked)),
    // BPDU guard and root block: with STP on, the bridge reads BPDUs before it looks at the lock (their
    // source unchecked); a guest sending one gets its port disabled, and never becomes the root port.
    rtattr(IFLA_BRPORT_GUARD, flag(locked)), rtattr(IFLA_BRPORT_PROTECT, flag(locked)),
    // The port's learned entries go, in the same step: a locked port still takes frames from any MAC the
    // bridge has on it, so one learned while it was unlocked (put back by hand, an administrator's script)
    // would still pass. Static entries (the guest's own) stay.
    ...(locked ? [rtattr(IFLA_BRPORT_FLUSH, Buffer.alloc(0))] : []),
  ]));
  const msg = linkMessage(RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK, seq, { index: port }, [protinfo]);
  msg.writeUInt8(AF_BRIDGE, 16);
  return msg;
}

/** A NETLINK_ROUTE socket doing one request at a time, with extended acks for readable errors. */
export class Rtnetlink {
  private readonly fd: number;
  private seq = Math.floor(Math.random() * 0x7fffffff);
  private readonly rx = new sys.Receiver(64 * 1024);
  /** A reply that never comes fails the request instead of hanging the broker. */
  static readonly TIMEOUT_MS = 5000;

  constructor() {
    this.fd = sys.socket(sys.AF_NETLINK, sys.SOCK_RAW | sys.SOCK_CLOEXEC, sys.NETLINK_ROUTE);
    sys.setsockoptInt(this.fd, sys.SOL_NETLINK, sys.NETLINK_EXT_ACK, 1);
    sys.setsockoptInt(this.fd, sys.SOL_NETLINK, sys.NETLINK_GET_STRICT_CHK, 1);
    // SO_RCVTIMEO 1 s: a blocking recvmsg wakes up to check the request's deadline.
    const tv = Buffer.alloc(16);
    tv.writeBigInt64LE(1n, 0);
    sys.setsockopt(this.fd, sys.SOL_SOCKET, 20 /* SO_RCVTIMEO */, tv);
  }

  close(): void {
    sys.close(this.fd);
  }

  /** Sends one request and returns the reply messages (for a plain request with ACK: none). */
  /** The last dump's links changed while it ran (NLM_F_DUMP_INTR). */
  private interrupted = false;
  /** Link kinds the kernel did not know at their last dump, with the modules loaded before it (loadedModules). */
  private readonly unknownKinds = new Map<string, string>();

  request(build: (seq: number) => Buffer, what: string): Buffer[] {
    const seq = (this.seq = (this.seq + 1) & 0x7fffffff);
    this.interrupted = false;
    if (sys.sendMsg(this.fd, { data: build(seq) }, 0) < 0) {
      throw new sys.SyscallError('rtnetlink', sys.errno.EAGAIN, `${what}: request not sent`);
    }
    const deadline = Date.now() + Rtnetlink.TIMEOUT_MS;
    const replies: Buffer[] = [];
    for (;;) {
      if (Date.now() > deadline) throw new sys.SyscallError('rtnetlink', sys.errno.ETIMEDOUT, `${what}: no reply`);
      const got = this.rx.recv(this.fd, 0);
      // A reply cut to the buffer would lose messages without a word: an error instead.
      if (got && (got.flags & sys.MSG_TRUNC) !== 0) {
        throw new sys.SyscallError('rtnetlink', sys.errno.EMSGSIZE, `${what}: a reply larger than its buffer`);
      }
      for (const m of splitMessages(got?.data ?? Buffer.alloc(0))) {
        if (m.readUInt32LE(8) !== seq) continue;
        if ((m.readUInt16LE(6) & NLM_F_DUMP_INTR) !== 0) this.interrupted = true;
        const type = m.readUInt16LE(4);
        if (type === NLMSG_ERROR) {
          const err = -m.readInt32LE(NLMSGHDR);
          if (err === 0) return replies;
          throw netlinkError(m, err, what);
        }
        if (type === NLMSG_DONE) return replies;
        replies.push(Buffer.from(m));
        // A reply to a non-dump request is a single message followed by nothing.
        if ((m.readUInt16LE(6) & 0x2) === 0) return replies;
      }
    }
  }

  /** The link called `name`, or null if there is none. */
  getLinkByName(name: string): Link | null {
    return this.getLink(0, [attrString(IFLA_IFNAME, name)], `get link \`${name}'`);
  }

  /** The link with index `index`, or null if there is none. */
  getLinkByIndex(index: number): Link | null {
    return this.getLink(index, [], `get link ${index}`);
  }

  private getLink(index: number, attrs: Buffer[], what: string): Link | null {
    try {
      const [m] = this.request(
        (seq) => linkMessage(RTM_GETLINK, NLM_F_REQUEST, seq, { index }, [...attrs, attrU32(IFLA_EXT_MASK, EXT_MASK)]),
        what,
      );
      return m ? parseLink(m) : null;
    } catch (err) {
      if (err instanceof sys.SyscallError && err.errno === sys.errno.ENODEV) return null;
      throw err;
    }
  }

  /**
   * Every link in the namespace, or only those of one kind (IFLA_INFO_KIND), or the ports of one bridge: the kernel
   * filters that dump itself, so a host with thousands of devices does not send, nor the broker decode, every one.
   */
  dumpLinks(kind?: string, master?: number): Link[] {
    const filter = [attrU32(IFLA_EXT_MASK, EXT_MASK)];
    if (kind) filter.push(attrNested(IFLA_LINKINFO, [attrString(IFLA_INFO_KIND, kind)]));
    // Ports of one bridge (`ip link show master BR`): filtered by the kernel too, and here whatever it did.
    if (master !== undefined) filter.push(attrU32(IFLA_MASTER, master));
    // A kind the kernel does not know (its module is not loaded) filters nothing: the kernel sends every link.
    // No device of that kind exists then, nor can one until a module is loaded, which /sys/module shows.
    const modules = kind ? loadedModules() : '';
    if (kind && this.unknownKinds.get(kind) === modules) return [];
    // A dump the kernel says was interrupted by changes may have missed links: taken again, a few times.
    for (let attempt = 1; ; attempt++) {
      const links = this.request(
        (seq) => linkMessage(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, seq, {}, filter),
        kind ? `dump ${kind} links` : 'dump links',
      ).map(parseLink);
      // Filtered here too, whatever the reason the kernel did not: what is kept is only that none existed.
      const unfiltered = kind !== undefined && links.some((l) => l.kind !== kind);
      const ofKind = (unfiltered ? links.filter((l) => l.kind === kind) : links)
        .filter((l) => master === undefined || l.master === master);
      if (!this.interrupted) {
        if (unfiltered && ofKind.length === 0) this.unknownKinds.set(kind, modules);
        return ofKind;
      }
      if (attempt === 5) throw new sys.SyscallError('rtnetlink', sys.errno.EAGAIN, 'dump links: interrupted 5 times');
    }
  }

  /** Deletes link `index` here, on the calling thread: true, or false when it was already gone. */
  deleteLink(index: number): boolean {
    try {
      this.request(
        (seq) => linkMessage(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, seq, { index }, []), `delete link ${index}`,
      );
      return true;
    } catch (err) {
      if (err instanceof sys.SyscallError && err.errno === sys.errno.ENODEV) return false;
      throw err;
    }
  }

  /** Creates a macvtap; throws SyscallError (EEXIST if the name is taken). */
  createMacvtap(opts: Parameters<typeof macvtapMessage>[1]): void {
    this.request((seq) => macvtapMessage(seq, opts), `create macvtap \`${opts.name}'`);
  }

  /** Makes `port` an access port of VLAN `vid` on its bridge, out of the VLAN it joined the bridge in. */
  setAccessVlan(port: number, vid: number): void {
    this.request((seq) => bridgeVlanMessage(seq, port, vid, true), `set vlan ${vid} on port ${port}`);
    const master = this.getLinkByIndex(port)?.master;
    const joined = joinedVlan(master ? this.getLinkByIndex(master) : null, vid);
    if (joined !== null) {
      this.request((seq) => bridgeVlanMessage(seq, port, joined, false), `remove vlan ${joined} from port ${port}`);
    }
  }

  /** Locks `port` to its static forwarding entries (see portLockMessage). */
  lockPort(port: number): void {
    this.request((seq) => portLockMessage(seq, port, true), `lock port ${port}`);
  }

  /** Port and state of bridge `bridge`'s forwarding entry for `mac` in `vlan`, or null when it has none. */
  fdbEntry(bridge: number, mac: Buffer, vlan: number | null): { port: number; state: number } | null {
    try {
      const [m] = this.request((seq) => fdbGetMessage(seq, bridge, mac, vlan), 'get fdb entry');
      return m ? { port: m.readInt32LE(NLMSGHDR + 4), state: m.readUInt16LE(NLMSGHDR + 8) } : null;
    } catch (err) {
      if (err instanceof sys.SyscallError && err.errno === sys.errno.ENOENT) return null;
      throw err;
    }
  }

  /** The static forwarding entries on bridge port `port` (a lock's): MAC and VLAN. The kernel filters by port. */
  staticEntries(port: number): Array<{ mac: Buffer; vlan: number | null }> {
    const dump = (seq: number) => {
      const m = neighMessage(RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, seq, port, 0, []);
      m.writeUInt8(0, NLMSGHDR + 10); // No NTF_MASTER: with it, a strict dump by port gives nothing.
      return m;
    };
    const entries = this.request(dump, `dump fdb entries of port ${port}`);
    return entries.flatMap((m) => {
      if (m.readInt32LE(NLMSGHDR + 4) !== port || (m.readUInt16LE(NLMSGHDR + 8) & NUD_NOARP) === 0) return [];
      const a = parseAttrs(m, NLMSGHDR + NDMSG);
      const mac = a.get(NDA_LLADDR);
      return mac?.length === 6 ? [{ mac: Buffer.from(mac), vlan: a.get(NDA_VLAN)?.readUInt16LE(0) ?? null }] : [];
    });
  }

  /** Points the bridge's forwarding entry for `mac` at port `port` (see fdbEntryMessage). */
  restoreFdbEntry(port: number, mac: Buffer, opts: { static?: boolean; vlan?: number | null } = {}): void {
    this.request((seq) => fdbEntryMessage(seq, port, mac, opts), `restore fdb entry on port ${port}`);
  }

  /** Sets address, MTU, master and up in one RTM_NEWLINK. */
  configureLink(
    index: number,
    opts: { address?: Buffer; mtu?: number; master?: number; up?: boolean; alias?: string; closeStack?: boolean },
  ): void {
    const attrs: Buffer[] = [];
    if (opts.closeStack) attrs.push(CLOSED_IPV4);
    if (opts.alias !== undefined) attrs.push(attrString(IFLA_IFALIAS, opts.alias));
    if (opts.address) attrs.push(rtattr(IFLA_ADDRESS, opts.address));
    if (opts.mtu !== undefined) attrs.push(attrU32(IFLA_MTU, opts.mtu));
    if (opts.master !== undefined) attrs.push(attrU32(IFLA_MASTER, opts.master));
    const info: IfInfo = { index };
    if (opts.up !== undefined) Object.assign(info, { flags: opts.up ? IFF_UP : 0, change: IFF_UP });
    this.request(
      (seq) => linkMessage(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq, info, attrs),
      `configure link ${index}`,
    );
  }
}

/**
 * IPv4 on a bridge port: unicast in link-layer multicast dropped, sources checked strictly, and no ARP answered for any
 * of the host's addresses (arp_ignore 8): see kernel.ts ipv6Off.
 */
export const CLOSED_IPV4 = attrNested(IFLA_AF_SPEC, [attrNested(AF_INET, [attrNested(IFLA_INET_CONF, [
  attrU32(IPV4_DEVCONF_RP_FILTER, 1), attrU32(IPV4_DEVCONF_DROP_UNICAST_IN_L2_MULTICAST, 1),
  attrU32(IPV4_DEVCONF_ARP_IGNORE, 8),
])])]);

/**
 * RTM_DELLINK on libuv's thread pool, on a socket of its own: destroying a netdev costs the kernel
 * ~20 ms in the calling thread, which must never be the event loop's. Resolves true when deleted,
 * false when the link was already gone.
 */
export function deleteLinkInBackground(index: number): Promise<boolean> {
  const msg = linkMessage(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, 1, { index }, []);
  return linkInBackground(msg, `delete link ${index}`);
}

/**
 * The link leaves its bridge (IFLA_MASTER 0), on the thread pool as deleteLinkInBackground, and not queued behind
 * deletions: true when done, false when it was already gone.
 */
export function detachInBackground(index: number): Promise<boolean> {
  const msg = linkMessage(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, 1, { index }, [attrU32(IFLA_MASTER, 0)]);
  return linkInBackground(msg, `detach link ${index}`);
}

async function linkInBackground(msg: Buffer, what: string): Promise<boolean> {
  const fd = sys.socket(sys.AF_NETLINK, sys.SOCK_RAW | sys.SOCK_CLOEXEC, sys.NETLINK_ROUTE);
  const rx = Buffer.alloc(8192);
  try {
    const n = await netlinkInBackground(fd, msg, rx);
    const ack = splitMessages(rx.subarray(0, n)).find((m) => m.readUInt16LE(4) === NLMSG_ERROR);
    const err = ack ? ackError(ack) : sys.errno.EIO;
    if (err === 0) return true;
    if (err === sys.errno.ENODEV) return false;
    throw new sys.SyscallError('rtnetlink', err, what);
  } finally {
    sys.close(fd);
  }
}
