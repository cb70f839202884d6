// rtnetlink: message encoding (pure, unit-tested) and a small synchronous NETLINK_ROUTE socket.
// Requests are tiny and answered in well under a millisecond; slow teardown never goes through here.
import { sys } from '@tapbroker/protocol';

export const RTM_NEWLINK = 16;
export const RTM_DELLINK = 17;
export const RTM_GETLINK = 18;
export const NLMSG_ERROR = 2;
export const NLMSG_DONE = 3;
export const NLM_F_REQUEST = 0x1;
export const NLM_F_ACK = 0x4;
export const NLM_F_EXCL = 0x200;
export const NLM_F_CREATE = 0x400;
export const IFLA_ADDRESS = 1;
export const IFLA_IFNAME = 3;
export const IFLA_MTU = 4;
export const IFLA_MASTER = 10;
export const IFLA_LINKINFO = 18;
export const IFLA_INFO_KIND = 1;
export const IFLA_EXT_MASK = 29;
export const NLMSGERR_ATTR_MSG = 1;
export const IFF_UP = 0x1;
const NLMSGHDR = 16;
const IFINFOMSG = 16;

const align4 = (n: number) => (n + 3) & ~3;

/** One rtattr: header, payload, padding to 4 bytes. */
export function rtattr(type: number, payload: Buffer): Buffer {
  const len = 4 + payload.length;
  const buf = Buffer.alloc(align4(len));
  buf.writeUInt16LE(len, 0);
  buf.writeUInt16LE(type, 2);
  payload.copy(buf, 4);
  return buf;
}

export const attrU32 = (type: number, v: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v, 0);
  return rtattr(type, b);
};
export const attrString = (type: number, s: string) => rtattr(type, Buffer.from(`${s}\0`, 'utf8'));
export const attrNested = (type: number, children: Buffer[]) => rtattr(type, Buffer.concat(children));

export interface IfInfo {
  index?: number;
  flags?: number;
  change?: number;
}

/** nlmsghdr + ifinfomsg + attributes. */
export function linkMessage(type: number, flags: number, seq: number, info: IfInfo, attrs: Buffer[]): Buffer {
  const body = Buffer.concat(attrs);
  const buf = Buffer.alloc(NLMSGHDR + IFINFOMSG + body.length);
  buf.writeUInt32LE(buf.length, 0);
  buf.writeUInt16LE(type, 4);
  buf.writeUInt16LE(flags, 6);
  buf.writeUInt32LE(seq, 8);
  buf.writeUInt32LE(0, 12);
  buf.writeUInt8(0, 16); // AF_UNSPEC
  buf.writeInt32LE(info.index ?? 0, 20);
  buf.writeUInt32LE(info.flags ?? 0, 24);
  buf.writeUInt32LE(info.change ?? 0, 28);
  body.copy(buf, NLMSGHDR + IFINFOMSG);
  return buf;
}

/** Attributes of a netlink payload region as a map of type to payload (last one wins). */
export function parseAttrs(buf: Buffer, start = 0, end = buf.length): Map<number, Buffer> {
  const out = new Map<number, Buffer>();
  let o = start;
  while (o + 4 <= end) {
    const len = buf.readUInt16LE(o);
    if (len < 4 || o + len > end) break;
    out.set(buf.readUInt16LE(o + 2) & 0x3fff, buf.subarray(o + 4, o + len));
    o += align4(len);
  }
  return out;
}

const cstr = (b: Buffer | undefined) => (b ? b.toString('utf8', 0, b.indexOf(0) >= 0 ? b.indexOf(0) : b.length) : undefined);

export interface Link {
  index: number;
  name: string;
  flags: number;
  mtu: number;
  master: number | null;
  address: Buffer | null;
  /** IFLA_INFO_KIND: `bridge`, `tun`, `veth`, `macvtap`…; null for devices without one (lo, physical NICs). */
  kind: string | null;
}

/** Decodes the ifinfomsg of an RTM_NEWLINK message (header included). */
export function parseLink(msg: Buffer): Link {
  const attrs = parseAttrs(msg, NLMSGHDR + IFINFOMSG, msg.readUInt32LE(0));
  const linkinfo = attrs.get(IFLA_LINKINFO);
  const kind = linkinfo ? cstr(parseAttrs(linkinfo).get(IFLA_INFO_KIND)) ?? null : null;
  const master = attrs.get(IFLA_MASTER);
  return {
    index: msg.readInt32LE(20),
    flags: msg.readUInt32LE(24),
    name: cstr(attrs.get(IFLA_IFNAME)) ?? '',
    mtu: attrs.get(IFLA_MTU)?.readUInt32LE(0) ?? 0,
    master: master && master.readUInt32LE(0) !== 0 ? master.readUInt32LE(0) : null,
    address: attrs.get(IFLA_ADDRESS) ?? null,
    kind,
  };
}

/** Splits a datagram into netlink messages. */
export function splitMessages(buf: Buffer): Buffer[] {
  const out: Buffer[] = [];
  let o = 0;
  while (o + NLMSGHDR <= buf.length) {
    const len = buf.readUInt32LE(o);
    if (len < NLMSGHDR || o + len > buf.length) break;
    out.push(buf.subarray(o, o + len));
    o += align4(len);
  }
  return out;
}

/** A NETLINK_ROUTE socket doing one request at a time, with extended acks for readable errors. */
export class Rtnetlink {
  private readonly fd: number;
  private seq = Math.floor(Math.random() * 0x7fffffff);
  private readonly rx = Buffer.alloc(64 * 1024);
  private readonly rxIov = Buffer.alloc(16);
  private readonly hdr = Buffer.alloc(56);
  private readonly txIov = Buffer.alloc(16);

  constructor() {
    this.fd = sys.socket(sys.AF_NETLINK, sys.SOCK_RAW | sys.SOCK_CLOEXEC, sys.NETLINK_ROUTE);
    sys.setsockoptInt(this.fd, sys.SOL_NETLINK, sys.NETLINK_EXT_ACK, 1);
    sys.setsockoptInt(this.fd, sys.SOL_NETLINK, sys.NETLINK_GET_STRICT_CHK, 1);
    this.rxIov.writeBigUInt64LE(sys.addressOf(this.rx), 0);
    this.rxIov.writeBigUInt64LE(BigInt(this.rx.length), 8);
  }

  close(): void {
    sys.close(this.fd);
  }

  /** Sends one request and returns the reply messages (for a plain request with ACK: none). */
  request(build: (seq: number) => Buffer, what: string): Buffer[] {
    const seq = (this.seq = (this.seq + 1) & 0x7fffffff);
    const msg = build(seq);
    this.txIov.writeBigUInt64LE(sys.addressOf(msg), 0);
    this.txIov.writeBigUInt64LE(BigInt(msg.length), 8);
    this.hdr.fill(0);
    this.hdr.writeBigUInt64LE(sys.addressOf(this.txIov), 16);
    this.hdr.writeBigUInt64LE(1n, 24);
    sys.sendmsg(this.fd, this.hdr, 0);
    const replies: Buffer[] = [];
    for (;;) {
      this.hdr.fill(0);
      this.hdr.writeBigUInt64LE(sys.addressOf(this.rxIov), 16);
      this.hdr.writeBigUInt64LE(1n, 24);
      const n = sys.recvmsg(this.fd, this.hdr, 0);
      for (const m of splitMessages(this.rx.subarray(0, Math.max(n, 0)))) {
        if (m.readUInt32LE(8) !== seq) continue;
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
    try {
      const [m] = this.request((seq) => linkMessage(RTM_GETLINK, NLM_F_REQUEST, seq, {}, [attrString(IFLA_IFNAME, name), attrU32(IFLA_EXT_MASK, 1)]), `get link \`${name}'`);
      return m ? parseLink(m) : null;
    } catch (err) {
      if (err instanceof sys.SyscallError && err.errno === sys.errno.ENODEV) return null;
      throw err;
    }
  }

  /** The link with index `index`, or null if there is none. */
  getLinkByIndex(index: number): Link | null {
    try {
      const [m] = this.request((seq) => linkMessage(RTM_GETLINK, NLM_F_REQUEST, seq, { index }, [attrU32(IFLA_EXT_MASK, 1)]), `get link ${index}`);
      return m ? parseLink(m) : null;
    } catch (err) {
      if (err instanceof sys.SyscallError && err.errno === sys.errno.ENODEV) return null;
      throw err;
    }
  }

  /** Sets address, MTU, master and up in one RTM_NEWLINK. */
  configureLink(index: number, opts: { address?: Buffer; mtu?: number; master?: number; up?: boolean }): void {
    const attrs: Buffer[] = [];
    if (opts.address) attrs.push(rtattr(IFLA_ADDRESS, opts.address));
    if (opts.mtu !== undefined) attrs.push(attrU32(IFLA_MTU, opts.mtu));
    if (opts.master !== undefined) attrs.push(attrU32(IFLA_MASTER, opts.master));
    const info: IfInfo = { index };
    if (opts.up !== undefined) Object.assign(info, { flags: opts.up ? IFF_UP : 0, change: IFF_UP });
    this.request((seq) => linkMessage(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq, info, attrs), `configure link ${index}`);
  }
}

function netlinkError(m: Buffer, errno: number, what: string): sys.SyscallError {
  // With NETLINK_EXT_ACK the kernel appends TLVs after the echoed request header.
  let detail = what;
  const flags = m.readUInt16LE(6);
  if (flags & 0x200 /* NLM_F_ACK_TLVS */) {
    const echoed = (flags & 0x100 /* NLM_F_CAPPED */) ? NLMSGHDR : m.readUInt32LE(NLMSGHDR + 4);
    const tlvs = parseAttrs(m, NLMSGHDR + 4 + align4(echoed), m.length);
    const text = cstr(tlvs.get(NLMSGERR_ATTR_MSG));
    if (text) detail = `${what} (${text})`;
  }
  return new sys.SyscallError('rtnetlink', errno, detail);
}
