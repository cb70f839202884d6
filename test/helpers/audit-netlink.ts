// The kernel's audit subsystem for tests, over NETLINK_AUDIT with our own messages (auditctl is not
// installed): its status, switching it on and off, and reading the records it logs (the read-only
// multicast group, which exists only in the initial network namespace).
import fs from 'node:fs';
import { sys } from '@tapbroker/protocol';
import { poll, until } from './wait.js';

const NETLINK_AUDIT = 9;
const NLMSG_ERROR = 2;
const NLM_F_REQUEST = 0x1;
const NLM_F_ACK = 0x4;
const AUDIT_GET = 1000;
const AUDIT_SET = 1001;
const AUDIT_STATUS_ENABLED = 0x1;
/** AUDIT_NLGRP_READLOG: every record the kernel logs, for readers with CAP_AUDIT_READ. */
const AUDIT_NLGRP_READLOG = 1;
const PROC_NET_INIT_INO = 0xeffffff9;

export interface AuditStatus {
  /** 0 off, 1 on, 2 on and locked (cannot be changed until reboot). */
  enabled: number;
  /** auditd's pid, 0 when none runs. */
  pid: number;
  backlogLimit: number;
  lost: number;
}

let seq = 1;

function nlmsg(type: number, flags: number, payload: Buffer): Buffer {
  const buf = Buffer.alloc(16 + payload.length);
  buf.writeUInt32LE(buf.length, 0);
  buf.writeUInt16LE(type, 4);
  buf.writeUInt16LE(flags, 6);
  buf.writeUInt32LE(seq++, 8);
  payload.copy(buf, 16);
  return buf;
}

/** One request; resolves with the first reply of `want` (or the ACK when `want` is null), throwing on an error. */
async function request(type: number, payload: Buffer, want: number | null): Promise<Buffer> {
  const fd = sys.socket(sys.AF_NETLINK, sys.SOCK_RAW | sys.SOCK_CLOEXEC | sys.SOCK_NONBLOCK, NETLINK_AUDIT);
  try {
    const msg = nlmsg(type, NLM_F_REQUEST | NLM_F_ACK, payload);
    sys.sendMsg(fd, { data: msg }, 0);
    const rx = new sys.Receiver(8192);
    // Everything queued each time: the first reply of `want` (or the ACK), or null to look again.
    const answer = await poll(() => {
      for (let m = rx.recv(fd, sys.MSG_DONTWAIT); m; m = rx.recv(fd, sys.MSG_DONTWAIT)) {
        const t = m.data.readUInt16LE(4);
        if (t === NLMSG_ERROR) {
          const err = -m.data.readInt32LE(16);
          if (err !== 0) throw new sys.SyscallError(type === AUDIT_GET ? 'AUDIT_GET' : 'AUDIT_SET', err);
          if (want === null) return Buffer.from(m.data);
        } else if (t === want) {
          return Buffer.from(m.data);
        }
      }
      return null;
    }, { ms: 2000, every: 5 });
    if (!answer) throw new Error(`no answer to audit request ${type}`);
    return answer;
  } finally {
    sys.close(fd);
  }
}

export async function auditStatus(): Promise<AuditStatus> {
  const r = await request(AUDIT_GET, Buffer.alloc(0), AUDIT_GET);
  return { enabled: r.readUInt32LE(20), pid: r.readUInt32LE(28), backlogLimit: r.readUInt32LE(36), lost: r.readUInt32LE(40) };
}

/** AUDIT_SET of `enabled` alone (mask AUDIT_STATUS_ENABLED). */
export async function setAuditEnabled(enabled: 0 | 1): Promise<void> {
  const status = Buffer.alloc(40); // struct audit_status up to backlog_wait_time; the kernel reads what is sent
  status.writeUInt32LE(AUDIT_STATUS_ENABLED, 0);
  status.writeUInt32LE(enabled, 4);
  await request(AUDIT_SET, status, null);
}

/**
 * Why audit cannot be tested here, or null: a kernel without audit (EPROTONOSUPPORT), a user namespace
 * other than the initial one (ECONNREFUSED), no CAP_AUDIT_CONTROL, or a network namespace other than the
 * initial one (where the log's multicast group does not exist).
 */
export async function auditUnavailable(): Promise<string | null> {
  // init_net's inode is PROC_NET_INIT_INO on recent kernels; elsewhere compare with pid 1's, where readable.
  const mine = fs.statSync('/proc/self/ns/net').ino;
  let init: number | null = PROC_NET_INIT_INO;
  try {
    init = fs.statSync('/proc/1/ns/net').ino;
  } catch {
    // Not readable here (a sandbox): the constant decides, or nothing does.
  }
  if (mine !== PROC_NET_INIT_INO && init !== PROC_NET_INIT_INO && mine !== init) {
    return 'not in the initial network namespace: the audit log\'s multicast group is only there';
  }
  try {
    await auditStatus();
    return null;
  } catch (err) {
    const e = err as sys.SyscallError;
    if (e.errno === sys.errno.EPROTONOSUPPORT) return 'this kernel has no audit (NETLINK_AUDIT: EPROTONOSUPPORT)';
    if (e.errno === sys.errno.ECONNREFUSED) return 'audit refuses this user namespace (ECONNREFUSED)';
    return `audit cannot be read here: ${e.message}`;
  }
}

export interface KernelRecord {
  type: number;
  /** The record as the kernel logged it: `audit(…): pid= uid= auid= ses= … msg='…'`. */
  text: string;
}

/** The records the kernel logs, read from AUDIT_NLGRP_READLOG while open. */
export class AuditLog {
  readonly records: KernelRecord[] = [];
  private readonly rx = new sys.Receiver(16384);
  private readonly timer: NodeJS.Timeout;

  private constructor(private fd: number) {
    this.timer = setInterval(() => this.drain(), 20);
  }

  static open(): AuditLog {
    const fd = sys.socket(sys.AF_NETLINK, sys.SOCK_RAW | sys.SOCK_CLOEXEC | sys.SOCK_NONBLOCK, NETLINK_AUDIT);
    const addr = Buffer.alloc(12); // sockaddr_nl: family, pad, pid 0 (the kernel picks), groups
    addr.writeUInt16LE(sys.AF_NETLINK, 0);
    addr.writeUInt32LE(1 << (AUDIT_NLGRP_READLOG - 1), 8);
    try {
      sys.bind(fd, addr, 'AUDIT_NLGRP_READLOG');
    } catch (err) {
      sys.close(fd);
      throw err;
    }
    return new AuditLog(fd);
  }

  drain(): void {
    if (this.fd < 0) return;
    for (let m = this.rx.recv(this.fd, sys.MSG_DONTWAIT); m; m = this.rx.recv(this.fd, sys.MSG_DONTWAIT)) {
      const len = Math.min(m.data.readUInt32LE(0), m.data.length);
      this.records.push({ type: m.data.readUInt16LE(4), text: m.data.toString('utf8', 16, len).replace(/\0+$/, '') });
    }
  }

  /** The first record matching `pred`, waiting up to `ms` for it. */
  async find(pred: (r: KernelRecord) => boolean, ms = 5000): Promise<KernelRecord> {
    return until(() => {
      this.drain();
      return this.records.find(pred);
    }, { ms, what: 'no such audit record', detail: () => `seen:\n${this.records.map((r) => `${r.type} ${r.text}`).join('\n')}` });
  }

  close(): void {
    clearInterval(this.timer);
    if (this.fd >= 0) sys.close(this.fd);
    this.fd = -1;
  }
}

/** The fields of a record's msg='…' (tapbroker's own), as name → raw value (quoted, hex, bare or `?`). */
export function innerFields(text: string): Map<string, string> {
  const inner = /msg='(.*)'$/.exec(text)?.[1] ?? '';
  return new Map(inner.split(' ').map((f) => [f.slice(0, f.indexOf('=')), f.slice(f.indexOf('=') + 1)]));
}

/** The kernel's own fields before msg= (the sender's pid=, uid=, auid=, ses=). */
export function headerFields(text: string): Map<string, string> {
  const head = text.slice(text.indexOf('): ') + 3, text.indexOf(" msg='"));
  return new Map(head.split(' ').map((f) => [f.slice(0, f.indexOf('=')), f.slice(f.indexOf('=') + 1)]));
}
