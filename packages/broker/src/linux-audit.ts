// --linux-audit: each grant, denial, release and cleanup of a device also goes to the kernel's audit
// subsystem as an AUDIT_VIRT_RESOURCE user message over NETLINK_AUDIT, in libvirt's fields
// (virDomainAuditNet: `virt= resrc=net reason=open|close old-net= new-net=`, `res=success|failed`), so
// `ausearch -m VIRT_RESOURCE` shows tapbroker's devices next to libvirt's. A copy of the record audit.ts
// has already written: a failure here is counted and logged, never fails a request.
import fs from 'node:fs';
import { sys } from '@tapbroker/protocol/core';
import type { AuditRecord, AuditSink } from './audit.js';
import type { Identity } from './identity.js';
import { netlinkInBackground } from './libc.js';
import { NLMSG_ERROR, NLM_F_ACK, NLM_F_REQUEST, nlmsg } from './netlink.js';

const NETLINK_AUDIT = 9;
const AUDIT_GET = 1000;
/** libaudit's AUDIT_VIRT_RESOURCE ("resource assignment"): libvirt's type for net, disk, dev… records. */
export const AUDIT_VIRT_RESOURCE = 2501;
const SO_RCVTIMEO = 20;
const NETLINK_CAP_ACK = 10;
const CAP_AUDIT_WRITE = 29;
/** Records waiting for the one send in flight; past this they are dropped and counted. */
const MAX_QUEUED = 1024;
const LOG_EVERY_MS = 60_000;
/** The kernel keeps AUDIT_MESSAGE_TEXT_MAX (8560) bytes and cuts the rest, res= included: exe is kept shorter. */
const MAX_EXE_BYTES = 2048;

const CREATES = new Set(['create', 'create-tap', 'create-macvtap']);

/**
 * One field as libaudit's audit_encode_nv_string writes it: a value with a double quote, a space, a
 * control character, DEL or any byte outside ASCII (audit_value_needs_encoding) is its bytes in upper-case
 * hex, unquoted; any other value is quoted. So no value can add a field of its own. Numbers are bare,
 * and an unknown value is `?`.
 */
export function auditField(name: string, value: string | number | null | undefined): string {
  if (value === null || value === undefined) return `${name}=?`;
  if (typeof value === 'number') return `${name}=${value}`;
  return /[^\x21-\x7e]|"/.test(value)
    ? `${name}=${Buffer.from(value, 'utf8').toString('hex').toUpperCase()}`
    : `${name}="${value}"`;
}

/** open or close, and whether it happened; null for records that are not about a device. */
function kindOf(r: AuditRecord): { reason: 'open' | 'close'; ok: boolean } | null {
  // A refusal no handler saw (a bad frame, a timeout) names no device: the broker's own log has it.
  if (r.decision !== 'grant' && !r.request && !r.device) return null;
  // A network's `down` after the device's end: the device was closed once, in the record before.
  if (r.op === 'unplug') return null;
  switch (r.decision) {
    case 'grant':
      return { reason: 'open', ok: true };
    case 'release':
    case 'cleanup':
      return { reason: 'close', ok: true };
    case 'deny':
    case 'error':
      if (CREATES.has(r.op)) return { reason: 'open', ok: false };
      return r.op === 'release' || r.op === 'cleanup' ? { reason: 'close', ok: false } : null;
    default:
      return null;
  }
}

const text = (v: unknown): string | null => (typeof v === 'string' && v !== '' ? v : null);

/**
 * The text of the kernel record for an audit record, or null when it is not about a device (reloads, dry
 * runs, reconcile notes…). `auid` is the caller's login uid (/proc/PID/loginuid): the kernel's own pid=,
 * uid=, auid= and ses= at the record's head are the broker's.
 */
export function linuxAuditMessage(r: AuditRecord, auid: number | null): string | null {
  const kind = kindOf(r);
  if (!kind) return null;
  const dev = r.device ?? {};
  const req = r.request ?? {};
  const mac = text(dev['mac']) ?? (r.decision === 'grant' ? null : text(req['mac']));
  const net = mac === 'unknown' ? null : mac; // the bridge helper's: the hypervisor sets it
  const devKind = text(dev['kind']) ?? text(req['kind']);
  const ifindex = typeof dev['ifindex'] === 'number' ? dev['ifindex'] : null;
  const path = devKind === 'tap' ? '/dev/net/tun' : devKind === 'macvtap' && ifindex ? `/dev/tap${ifindex}` : null;
  let exe = r.exe;
  if (exe && Buffer.byteLength(exe) > MAX_EXE_BYTES) exe = `${Buffer.from(exe).subarray(0, MAX_EXE_BYTES)}…`;
  return [
    'virt=tapbroker',
    'resrc=net',
    `reason=${kind.reason}`,
    auditField('old-net', kind.reason === 'close' ? net : null),
    auditField('new-net', kind.reason === 'open' ? net : null),
    auditField('path', path),
    auditField('ifname', text(dev['name']) ?? text(req['name'])),
    auditField('lease', text(dev['lease']) ?? text(dev['id'])),
    auditField('rule', r.rule),
    auditField('policy', r.policy_sha256),
    auditField('op', r.op),
    auditField('uid', r.uid),
    auditField('auid', auid),
    auditField('pid', r.pid),
    auditField('exe', exe),
    `res=${kind.ok ? 'success' : 'failed'}`,
  ].join(' ');
}

/** The caller's login uid, read only while the pid still names the caller (its pidfd says so). */
function loginUid(caller: Partial<Identity> | null): number | null {
  if (!caller?.pid) return null;
  try {
    const auid = Number(fs.readFileSync(`/proc/${caller.pid}/loginuid`, 'utf8').trim());
    if (caller.pidfd === null || caller.pidfd === undefined) return Number.isInteger(auid) ? auid : null;
    const info = fs.readFileSync(`/proc/self/fdinfo/${caller.pidfd}`, 'utf8');
    return /^Pid:\s*(-?\d+)$/m.exec(info)?.[1] === String(caller.pid) && Number.isInteger(auid) ? auid : null;
  } catch {
    return null;
  }
}

const errnoName = (e: number) => new sys.SyscallError('audit', e).code;

/**
 * The sender. sendmsg(2) to NETLINK_AUDIT is handled in the sender's own context, and when the kernel's
 * audit backlog is over its limit (auditd stalled) the kernel makes the sender sleep up to
 * backlog_wait_time (60 s by default) after handling the message, O_NONBLOCK or not. So records are
 * sent on libuv's thread pool, one at a time and in order, never on the event loop; each asks for an ACK
 * (NLM_F_ACK), which the kernel queues before sendmsg returns, and the same pool job reads it, so every
 * record is known sent or failed with the kernel's errno. At most MAX_QUEUED wait; more are dropped, counted.
 */
export class LinuxAudit implements AuditSink {
  /** Records the kernel acknowledged. */
  sent = 0;
  /** Records that were not sent: refused by the kernel, no ACK, or dropped from a full queue. */
  failed = 0;
  private fd: number | null = null;
  private closed = false;
  private readonly queue: Buffer[] = [];
  private busy = false;
  private seq = 0;
  private readonly rx = Buffer.alloc(256);
  private readonly stale = new sys.Receiver(8192);
  private loggedAt = 0;
  private failedAtLog = 0;
  private idle: Array<() => void> = [];

  constructor(private readonly log: (line: string) => void) {
    try {
      this.fd = sys.socket(sys.AF_NETLINK, sys.SOCK_RAW | sys.SOCK_CLOEXEC | sys.SOCK_NONBLOCK, NETLINK_AUDIT);
    } catch (err) {
      this.log(`linux audit: this kernel has no audit (${(err as Error).message}); no record is sent to it`);
      return;
    }
    try {
      sys.setsockoptInt(this.fd, sys.SOL_NETLINK, NETLINK_CAP_ACK, 1); // ACKs without a copy of the record
    } catch {
      // Before Linux 4.3 an ACK carries the record back: rx holds its head, which is all that is read.
    }
    const eff = /^CapEff:\s*([0-9a-f]+)$/m.exec(fs.readFileSync('/proc/self/status', 'utf8'))?.[1] ?? '0';
    if ((BigInt(`0x${eff}`) & (1n << BigInt(CAP_AUDIT_WRITE))) === 0n) {
      this.log('linux audit: warning: no CAP_AUDIT_WRITE; the kernel will refuse every record (--linux-audit)');
    }
    this.busy = true;
    void this.checkStatus().finally(() => {
      this.busy = false;
      this.pump();
    });
  }

  /** Whether audit is on, said once: AUDIT_GET on a socket of its own that waits at most a second, in the pool. */
  private async checkStatus(): Promise<void> {
    let fd: number | null = null;
    const rx = Buffer.alloc(256);
    try {
      fd = sys.socket(sys.AF_NETLINK, sys.SOCK_RAW | sys.SOCK_CLOEXEC, NETLINK_AUDIT);
      const tv = Buffer.alloc(16);
      tv.writeBigInt64LE(1n, 0);
      sys.setsockopt(fd, sys.SOL_SOCKET, SO_RCVTIMEO, tv);
      const n = await netlinkInBackground(fd, nlmsg(AUDIT_GET, NLM_F_REQUEST, 1, Buffer.alloc(0)), rx);
      const type = n >= 16 ? rx.readUInt16LE(4) : -1;
      const err = type === NLMSG_ERROR && n >= 20 ? -rx.readInt32LE(16) : 0;
      if (err === sys.errno.ECONNREFUSED) {
        this.log('linux audit: the kernel takes no audit records from this user namespace; none is sent');
        this.close(true);
      } else if (err === sys.errno.EPERM) {
        this.log('linux audit: sending records; whether audit is enabled cannot be asked (EPERM: that takes '
          + 'CAP_AUDIT_CONTROL, not granted on purpose, and the initial pid namespace); while it is off the '
          + 'kernel drops them');
      } else if (type === AUDIT_GET && n >= 24) {
        const enabled = rx.readUInt32LE(20);
        const auditd = n >= 32 ? rx.readUInt32LE(28) : 0;
        const daemon = auditd ? `pid ${auditd}` : 'not running';
        this.log(enabled === 0
          ? 'linux audit: audit is disabled in the kernel (enabled 0); records are sent but dropped until it is on'
          : `linux audit: sending records (audit enabled ${enabled}, auditd ${daemon})`);
      } else {
        this.log(`linux audit: sending records; AUDIT_GET answered ${err ? errnoName(err) : `type ${type}`}`);
      }
    } catch (err) {
      this.log(`linux audit: sending records; whether audit is enabled is unknown: ${(err as Error).message}`);
    } finally {
      if (fd !== null) sys.close(fd);
    }
  }

  send(rec: AuditRecord, caller: Partial<Identity> | null): void {
    if (this.fd === null || this.closed) return;
    const text = linuxAuditMessage(rec, loginUid(caller));
    if (text === null) return;
    if (this.queue.length >= MAX_QUEUED) return this.fail('the queue is full (the kernel is slow to take records)');
    this.seq = (this.seq + 1) >>> 0;
    // libaudit sends the text with its NUL; the kernel prints it inside msg='…'.
    this.queue.push(nlmsg(AUDIT_VIRT_RESOURCE, NLM_F_REQUEST | NLM_F_ACK, this.seq, Buffer.from(`${text}\0`)));
    this.pump();
  }

  private pump(): void {
    if (this.busy) return;
    const msg = this.queue.shift();
    if (!msg || this.fd === null) {
      for (const done of this.idle.splice(0)) done();
      return;
    }
    this.busy = true;
    const fd = this.fd;
    // Anything left from a failed read would be taken for the next record's ACK.
    try {
      while (this.stale.recv(fd, sys.MSG_DONTWAIT)) { /* discarded */ }
    } catch {
      // ENOBUFS: the receive queue overflowed, which also empties it.
    }
    const seq = msg.readUInt32LE(8);
    netlinkInBackground(fd, msg, this.rx).then(
      (n) => {
        const ack = n >= 20 && this.rx.readUInt16LE(4) === NLMSG_ERROR && this.rx.readUInt32LE(8) === seq;
        const err = ack ? -this.rx.readInt32LE(16) : -1;
        if (err === 0) this.sent++;
        else if (err === sys.errno.ECONNREFUSED) this.fail('the kernel takes no records from this user namespace');
        else if (err === sys.errno.EPERM) this.fail('EPERM: sending audit records needs CAP_AUDIT_WRITE');
        else this.fail(ack ? errnoName(err) : 'no acknowledgement from the kernel');
      },
      (err: Error) => this.fail(err.message),
    ).finally(() => {
      this.busy = false;
      this.pump();
    });
  }

  /** Counted always; logged at most once a minute, with the count since the last line. */
  private fail(why: string): void {
    this.failed++;
    const now = Date.now();
    if (now - this.loggedAt < LOG_EVERY_MS) return;
    const since = this.failed - this.failedAtLog;
    this.log(`linux audit: a record was not sent: ${why} (${since} since the last report, ${this.failed} in all)`);
    this.loggedAt = now;
    this.failedAtLog = this.failed;
  }

  /** `N sent, M failed`, for the broker's log lines. */
  get stats(): string {
    return `${this.sent} sent, ${this.failed} failed`;
  }

  /** Resolves once every queued record went out, or after `ms`. */
  flush(ms = 2000): Promise<void> {
    if (!this.busy && this.queue.length === 0) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms).unref();
      this.idle.push(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  /**
   * Takes no more records; those queued still go out (flush() waits for them), then the socket closes.
   * `drop`: they are counted as failed instead.
   */
  close(drop = false): void {
    if (this.closed) return;
    this.closed = true;
    if (drop) {
      this.failed += this.queue.length;
      this.queue.length = 0;
    }
    const done = () => {
      if (this.fd !== null) sys.close(this.fd);
      this.fd = null;
    };
    if (this.busy) this.idle.push(done);
    else done();
  }
}
