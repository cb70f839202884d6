// Netlink framing, the same for every netlink family (rtnetlink, the Linux audit socket): messages,
// attributes and error replies. Pure functions, unit-tested on their bytes.
import { sys } from '@tapbroker/protocol/core';

export const NLMSG_ERROR = 2;
export const NLMSG_DONE = 3;
export const NLM_F_REQUEST = 0x1;
export const NLM_F_ACK = 0x4;
export const NLM_F_EXCL = 0x200;
export const NLM_F_CREATE = 0x400;
export const NLM_F_DUMP = 0x300;
export const NLMSGERR_ATTR_MSG = 1;
export const NLMSGHDR = 16;

export const align4 = (n: number) => (n + 3) & ~3;

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

/** One netlink message: nlmsghdr (its length, type, flags, seq; pid 0) and `payload`s. */
export function nlmsg(type: number, flags: number, seq: number, ...payload: Buffer[]): Buffer {
  const buf = Buffer.concat([Buffer.alloc(NLMSGHDR), ...payload]);
  buf.writeUInt32LE(buf.length, 0);
  buf.writeUInt16LE(type, 4);
  buf.writeUInt16LE(flags, 6);
  buf.writeUInt32LE(seq, 8);
  return buf;
}

/**
 * Attributes of a netlink payload region as a map of type to payload (last one wins); only the types `want` has,
 * when given. Read byte by byte, and nothing made for the rest: a tap's link event has some fifty attributes, of
 * which a decision reads eight, and the broker runs without a JIT (Buffer methods cost five times as much there).
 */
export function parseAttrs(buf: Buffer, start = 0, end = buf.length, want?: ReadonlySet<number>): Map<number, Buffer> {
  const out = new Map<number, Buffer>();
  let o = start;
  while (o + 4 <= end) {
    const len = buf[o]! | (buf[o + 1]! << 8);
    if (len < 4 || o + len > end) break;
    const type = (buf[o + 2]! | (buf[o + 3]! << 8)) & 0x3fff;
    if (!want || want.has(type)) out.set(type, buf.subarray(o + 4, o + len));
    o += align4(len);
  }
  return out;
}

export const cstr = (b: Buffer | undefined) =>
  b ? b.toString('utf8', 0, b.indexOf(0) >= 0 ? b.indexOf(0) : b.length) : undefined;

/** The error carried by an NLMSG_ERROR message (0 for an ACK). */
export function ackError(m: Buffer): number {
  return -m.readInt32LE(NLMSGHDR);
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

/** The error of an NLMSG_ERROR reply, with the kernel's extended-ack message when it sent one. */
export function netlinkError(m: Buffer, errno: number, what: string): sys.SyscallError {
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
