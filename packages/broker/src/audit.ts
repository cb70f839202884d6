// One structured record per decision, written by the broker itself before the reply leaves: to journald
// (native protocol, TAPBROKER_* fields, a fixed MESSAGE_ID per kind) when its socket exists, otherwise
// as a JSON line on stderr; and, when asked, appended to a JSON-lines file and sent to a further sink
// (the kernel's audit log, linux-audit.ts).
import fs from 'node:fs';
import { dirname } from 'node:path';
import { sys } from '@tapbroker/protocol/core';
import type { Identity } from './identity.js';
import { auditJson, shown } from './naming.js';
import { notRootsAlone } from './paths.js';
import { toStderr } from './stderr.js';

export type AuditDecision =
  | 'grant'
  | 'deny'
  | 'error'
  | 'cleanup'
  | 'release'
  | 'reconcile'
  | 'reload'
  | 'dry-run'
  | 'suppressed'
  | 'unplug';

/**
 * Every `op` a record carries: the requests of the wire (a refused one too), and the broker's own: a device's end
 * (`cleanup`), a start (`reconcile`), a network's undoing (`unplug`), a refusal before any request (`connection`: a
 * full broker, a hello timeout, a uid refused at accept), a frame that is no request (`request`), and the count of
 * one uid's records held back (`refusals`), and the records the audit file lacks (`audit-file`, in the file alone).
 * tapbrokerd(8) lists them all (a docs test holds it to this list).
 */
export const AUDIT_OPS = [
  'hello', 'create', 'create-tap', 'create-macvtap', 'can', 'list', 'status', 'release', 'reload',
  'cleanup', 'reconcile', 'unplug', 'connection', 'request', 'refusals', 'audit-file',
] as const;
export type AuditOp = (typeof AUDIT_OPS)[number];

/** An op read back from the lease table (another version's, maybe): as written if it is one, else `cleanup`. */
export const auditOp = (op: string): AuditOp =>
  (AUDIT_OPS as readonly string[]).includes(op) ? op as AuditOp : 'cleanup';

/** `journalctl MESSAGE_ID=<id>` finds every record of one kind. Fixed forever. */
export const MESSAGE_IDS: Record<AuditDecision, string> = {
  grant: '7d3b0f6a1e2c4b8f9a5d6e0c1b2a3f41',
  deny: '7d3b0f6a1e2c4b8f9a5d6e0c1b2a3f42',
  error: '7d3b0f6a1e2c4b8f9a5d6e0c1b2a3f43',
  cleanup: '7d3b0f6a1e2c4b8f9a5d6e0c1b2a3f44',
  release: '7d3b0f6a1e2c4b8f9a5d6e0c1b2a3f45',
  reconcile: '7d3b0f6a1e2c4b8f9a5d6e0c1b2a3f46',
  reload: '7d3b0f6a1e2c4b8f9a5d6e0c1b2a3f47',
  'dry-run': '7d3b0f6a1e2c4b8f9a5d6e0c1b2a3f48',
  suppressed: '7d3b0f6a1e2c4b8f9a5d6e0c1b2a3f49',
  unplug: '7d3b0f6a1e2c4b8f9a5d6e0c1b2a3f4a',
};

/** The journal's PRIORITY of each kind of record (tapbrokerd(8) lists them: a docs test). */
export const PRIORITY: Record<AuditDecision, number> = {
  grant: 6, deny: 5, error: 4, cleanup: 6, release: 6, reconcile: 6, reload: 5, 'dry-run': 6, suppressed: 4, unplug: 6,
};

export const DEFAULT_JOURNAL_SOCKET = '/run/systemd/journal/socket';

export interface AuditEvent {
  op: AuditOp;
  decision: AuditDecision;
  rule: string | null;
  /** The caller, or for automatic actions the owner (uid alone). */
  caller: Partial<Identity> | null;
  request?: Record<string, unknown>;
  device?: Record<string, unknown>;
  code?: string;
  message?: string;
  /** The digest of the policy the decision was made under, when not the current one. */
  policy?: string;
  /**
   * A refusal that names a device it left as it was (a release of a device in use): held to its caller's limit like
   * any other refusal. Without it, a record naming a device is about one the broker made or deleted, never held back.
   */
  unchanged?: true;
}

/** Stable field names: tools and tests match on them. */
export interface AuditRecord {
  time: string;
  op: AuditOp;
  decision: AuditDecision;
  rule: string | null;
  policy_sha256: string;
  uid: number | null;
  gid: number | null;
  pid: number | null;
  exe: string | null;
  user: string | null;
  /** The caller's supplementary groups (SO_PEERGROUPS), which group rules match; absent without a caller. */
  groups?: number[];
  /** The subordinate gids it showed that are not counted as its groups (Caller.claimed): deny rules match them. */
  claimed_groups?: number[];
  /** The caller's parent when it connected (see Identity.parent); absent for records without a caller. */
  ppid?: number;
  parent_exe?: string | null;
  /** What the client called itself in its hello (Identity.client): never used in a decision. */
  client?: string;
  request?: Record<string, unknown>;
  device?: Record<string, unknown>;
  code?: string;
  message?: string;
}

export interface AuditOptions {
  /** journald's native socket; used when it exists at start (default /run/systemd/journal/socket). */
  journalSocket?: string | null;
  /** An append-only JSON-lines file. */
  file?: string | null;
  /** Where JSON lines go without journald (default stderr). */
  fd?: number;
  /** Also given every record once it is written (--linux-audit); it must never throw or block. */
  linux?: AuditSink | null;
  /** The broker's log: where a file that stops taking records is reported, and its recovery. */
  log?: (line: string) => void;
}

/** A further destination of records: it picks the ones it wants, and counts and logs its own failures. */
export interface AuditSink {
  send(rec: AuditRecord, caller: Partial<Identity> | null): void;
  close(): void;
}

export class Audit {
  private readonly journal: string | null;
  /** Our socket to journald's, kept open; null without journald or once closed. */
  private journalTo: ReturnType<typeof sys.datagramTo> | null;
  private fileFd: number | null;
  private readonly fd: number;
  private readonly linux: AuditSink | null;

  constructor(private readonly policySha: () => string, opts: AuditOptions = {}) {
    const journal = opts.journalSocket === undefined ? DEFAULT_JOURNAL_SOCKET : opts.journalSocket;
    this.journal = journal && fs.existsSync(journal) ? journal : null;
    this.journalTo = this.journal ? sys.datagramTo(this.journal) : null;
    this.fileFd = opts.file ? openAppend(opts.file) : null;
    if (this.fileFd !== null) this.fileCut = this.cutAtOpen = endsCut(this.fileFd);
    this.fd = opts.fd ?? 2;
    this.linux = opts.linux ?? null;
    this.file = opts.file ?? null;
    this.log = opts.log ?? (() => {});
  }

  private readonly file: string | null;
  private readonly log: (line: string) => void;
  /** Records the file did not take since it last took one; whether its last line was cut short. */
  private fileLost = 0;
  private fileCut = false;
  /**
   * Its last line was cut short when it was opened (a full disk, then a stop: an outside review's restarted broker
   * glued its first record, a grant, to it, and the file never said records were missing): said in it first.
   */
  private cutAtOpen = false;
  /** Records journald did not take (its queue full, or it gone) since it last took one: they went to stderr. */
  private journalMissed = 0;

  get sink(): string {
    return this.journal ? `journald (${this.journal})` : 'stderr';
  }

  record(ev: AuditEvent): AuditRecord {
    const c = ev.caller;
    const rec: AuditRecord = {
      time: new Date().toISOString(), op: ev.op, decision: ev.decision, rule: ev.rule,
      policy_sha256: ev.policy ?? this.policySha(),
      uid: c?.uid ?? null, gid: c?.gid ?? null, pid: c?.pid ?? null, exe: c?.exe ?? null, user: c?.user ?? null,
    };
    if (c?.groups) rec.groups = [...c.groups];
    if (c?.claimed?.length) rec.claimed_groups = [...c.claimed];
    if (c?.parent) {
      rec.ppid = c.parent.pid;
      rec.parent_exe = c.parent.exe;
    }
    if (c?.client !== undefined) rec.client = c.client;
    if (ev.request) rec.request = ev.request;
    if (ev.device) rec.device = ev.device;
    if (ev.code) rec.code = ev.code;
    if (ev.message) rec.message = ev.message;
    if (!this.overLimit(ev)) this.write(rec, c);
    return rec;
  }

  private write(rec: AuditRecord, c: Partial<Identity> | null): void {
    const line = `${auditJson({ audit: rec })}\n`;
    if (!this.toJournal(rec)) {
      this.dropped += Number(this.fd === 2 ? !toStderr(line) : writeFully(this.fd, line).left > 0);
    }
    // write(2) with O_APPEND: in the kernel before the reply is sent; no user-space buffering.
    if (this.fileFd !== null) this.toFile(line);
    this.linux?.send(rec, c);
  }

  /**
   * A record to journald, if it is used. One it does not take (its queue kept full, or journald gone) goes to
   * stderr instead; that is said in the broker's log once until it takes records again, and then how many went
   * (an outside review: a journald kept full sent records elsewhere with nothing said).
   */
  private toJournal(rec: AuditRecord): boolean {
    if (!this.journalTo) return false;
    try {
      this.journalTo.send(journalEntry(rec));
    } catch (err) {
      if (this.journalMissed++ === 0) {
        this.log(`journald did not take a record (${(err as Error).message}); records go to `
          + 'stderr until it takes them again');
      }
      return false;
    }
    if (this.journalMissed > 0) {
      this.log(`journald (${this.journal}): taking records again; ${this.journalMissed} went to stderr meanwhile`);
    }
    this.journalMissed = 0;
    return true;
  }

  /**
   * A record to the file. One it cannot take (a full disk) is lost, counted and said in the broker's log, once
   * until it takes records again; a line cut short is ended before the next, so that every other line stays
   * JSON (an outside review found lost grants said nowhere, and the next record glued to a cut one).
   */
  private toFile(line: string): void {
    // Once it takes records again, the file itself says what it lacks, before the record that ends the gap (an
    // outside review: it held a cut line and nothing else to tell a reader records were missing).
    const gap = this.fileLost > 0 || this.cutAtOpen ? `${auditJson({ audit: this.gapRecord() })}\n` : '';
    const head = Buffer.byteLength(`${this.fileCut ? '\n' : ''}${gap}`);
    const text = `${this.fileCut ? '\n' : ''}${gap}${line}`;
    const { left, why } = writeFully(this.fileFd!, text);
    const wrote = Buffer.byteLength(text) - left;
    // The gap record whole in the file: its count is said (a re-test: a write cut just after it made the next one
    // count the same records again).
    if (gap && wrote >= head) this.gapSaid();
    if (left === 0) return;
    this.dropped++;
    // Cut inside a line (not where one ends): the next write ends it first.
    if (wrote > 0) this.fileCut = wrote !== head && wrote !== head - Buffer.byteLength(gap);
    if (this.fileLost++ === 0) {
      this.fileGap = { since: new Date().toISOString(), why };
      this.log(`warning: audit file ${this.file}: a record could not be written (${why}); records are being lost until `
        + 'it takes them again (the journal, or stderr, still has them)');
    }
  }

  /** The file took records again, and its record of those it lacks: the count starts again. */
  private gapSaid(): void {
    if (this.fileLost > 0) this.log(`audit file ${this.file}: taking records again; ${this.fileLost} lost`);
    this.fileLost = 0;
    this.fileCut = this.cutAtOpen = false;
  }

  /** Since when, and why, the file has not taken records. */
  private fileGap = { since: '', why: '' };

  /** The file's own record of the records it lacks: written there alone. */
  private gapRecord(): AuditRecord {
    return {
      time: new Date().toISOString(), op: 'audit-file', decision: 'error', rule: null, policy_sha256: this.policySha(),
      uid: null, gid: null, pid: null, exe: null, user: null,
      message: this.fileLost === 0 ? 'the last line of this file was cut short when the broker opened it (a full '
        + 'disk, or a stop mid-write): records before this one may be missing; the journal (or stderr) has them'
        : `${this.fileLost} record(s) before this one could not be written to this file (${this.fileGap.why}) `
          + `since ${this.fileGap.since}; the journal (or stderr) has them`,
    };
  }

  /**
   * The file opened again by its name, at each reload (SIGHUP, `tapbroker reload`): logrotate's `create` mode renames
   * it and asks for a reload, and records then go to the new file (an outside review: they went on to the rotated one,
   * and to a deleted one once that was removed, with nothing said). One that cannot be opened keeps the old open.
   */
  reopen(): void {
    if (this.fileFd === null || this.file === null) return;
    let fd: number;
    try {
      // As trusted as at start: its directory root's alone (a re-test: one a user could write since got root's records
      // into a file of theirs).
      const why = notRootsAlone(dirname(this.file));
      if (why) throw new Error(`its directory ${why}`);
      fd = openAppend(this.file);
    } catch (err) {
      this.log(`warning: audit file ${this.file}: cannot open it again (${(err as Error).message}); `
        + 'records go on to the file open until now');
      return;
    }
    const [was, now] = [fs.fstatSync(this.fileFd), fs.fstatSync(fd)];
    fs.closeSync(this.fileFd);
    this.fileFd = fd;
    if (was.dev === now.dev && was.ino === now.ino) return;
    // A new file: a line cut short in the old one (a full disk) is not this one's to end, nor are the records the old
    // one lacks this one's to count.
    if (this.fileLost > 0) {
      this.log(`warning: audit file ${this.file}: ${this.fileLost} record(s) lost to the file before it`);
    }
    this.fileLost = 0;
    this.fileCut = this.cutAtOpen = endsCut(fd);
    this.log(`audit file ${this.file}: opened again (a new file: the one before was rotated${was.nlink === 0
      ? ' and deleted' : ''})`);
  }

  /** Records that could not be written at all (the sink failed with something other than EAGAIN). */
  dropped = 0;

  private readonly refusals = new Map<number, { n: number; suppressed: Map<string, number>; since: number }>();
  private refusalTimer: NodeJS.Timeout | null = null;

  /** A refusal no handler saw (a malformed frame, pushed fds, a timeout, a full broker). */
  refusal(caller: Partial<Identity>, op: AuditOp, code: string, message: string): void {
    this.record({ op, decision: 'error', rule: null, caller, code, message });
  }

  /**
   * What a user can make the broker write as often as it likes (refusals, denials, errors of its requests,
   * dry runs) is written one by one up to REFUSALS_PER_WINDOW per uid and window; past that it is counted,
   * and one `suppressed` record per uid and window says how many of each code (or decision) were not
   * written. A flood of them can then neither fill the journal nor push other records out of it. What
   * changes a device (grants, releases, cleanups, reconciles, and their failures) is always written.
   */
  private overLimit(ev: AuditEvent): boolean {
    // A record with a device is about one the broker made or deleted, never held back; one that changed nothing is
    // held to the limit (an outside review looped a release of its own tap in use: 3,000 records a second).
    const changed = !!ev.device && !ev.unchanged;
    if (!LIMITED.has(ev.decision) || ev.op === 'cleanup' || ev.op === 'reconcile' || changed) return false;
    const uid = ev.caller?.uid ?? -1;
    let w = this.refusals.get(uid);
    if (!w) this.refusals.set(uid, (w = { n: 0, suppressed: new Map(), since: Date.now() }));
    this.refusalTimer ??= setTimeout(() => this.flushRefusals(), REFUSAL_WINDOW_MS).unref();
    if (++w.n <= REFUSALS_PER_WINDOW) return false;
    // A dry run is a question, whatever it would be answered: counted as one, never as a denial (an outside review).
    const key = ev.decision === 'dry-run' ? (ev.code ? `dry-run:${ev.code}` : 'dry-run') : ev.code ?? ev.decision;
    w.suppressed.set(key, (w.suppressed.get(key) ?? 0) + 1);
    return true;
  }

  /** Ends the window: one aggregated record per uid that was over the limit. */
  flushRefusals(): void {
    if (this.refusalTimer) clearTimeout(this.refusalTimer);
    this.refusalTimer = null;
    for (const [uid, w] of this.refusals) {
      if (w.suppressed.size === 0) continue;
      const total = [...w.suppressed.values()].reduce((a, b) => a + b, 0);
      const counts = Object.fromEntries(w.suppressed);
      this.record({
        op: 'refusals', decision: 'suppressed', rule: null, caller: uid < 0 ? null : { uid },
        request: { window_ms: Date.now() - w.since, counts },
        message: `${total} more refused, denied or dry-run request(s) of uid ${uid} in this window, counted but not `
          + 'written one by one',
      });
    }
    this.refusals.clear();
  }

  /** Closes the file once: its fd number, reused by then, is never written or closed again. */
  close(): void {
    this.flushRefusals();
    if (this.fileLost > 0) {
      this.log(`warning: audit file ${this.file}: ${this.fileLost} record(s) since ${this.fileGap.since} lost to it, `
        + 'not said in it (its next opener says records may be missing where a line was cut)');
    }
    if (this.fileFd !== null) fs.closeSync(this.fileFd);
    this.fileFd = null;
    this.journalTo?.close();
    this.journalTo = null;
    this.linux?.close();
  }
}

/**
 * The audit file for appending: created 0600, never through a symlink, a regular file only: the open does not wait
 * (a re-test put a FIFO at the name, and the reopen at the next reload blocked the broker until someone read it).
 */
function openAppend(file: string): number {
  const { O_WRONLY, O_APPEND, O_CREAT, O_NOFOLLOW, O_NONBLOCK } = fs.constants;
  let fd: number;
  try {
    fd = fs.openSync(file, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_NONBLOCK, 0o600);
  } catch (err) {
    // What the refusal means, not only its errno (an outside review got ELOOP and ENXIO).
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ELOOP') throw new Error(`${file} is a symbolic link, which is not followed: give the file itself`);
    if (code === 'ENXIO') throw new Error(`${file} is not a regular file (a FIFO or socket with no reader)`);
    throw err;
  }
  if (fs.fstatSync(fd).isFile()) return fd;
  fs.closeSync(fd);
  throw new Error(`${file} is not a regular file`);
}

/**
 * Does the file open on `fd` end inside a line (its last byte not a line break)? Read through a read-only open; a
 * file the broker may append to but not read (mode 0200 under the unit, which has no CAP_DAC_OVERRIDE) is taken as
 * whole: an outside re-test's such file stopped the broker's start, and a reload.
 */
function endsCut(fd: number): boolean {
  const last = Buffer.alloc(1);
  try {
    const size = fs.fstatSync(fd).size;
    const rd = fs.openSync(`/proc/self/fd/${fd}`, 'r');
    try {
      return size > 0 && fs.readSync(rd, last, 0, 1, size - 1) === 1 && last[0] !== 0x0a;
    } finally {
      fs.closeSync(rd);
    }
  } catch {
    return false;
  }
}

/** Refusals, denials and dry runs written one by one per uid and window; the rest are aggregated. */
export const REFUSALS_PER_WINDOW = 20;
const LIMITED = new Set<AuditDecision>(['deny', 'error', 'dry-run']);
const REFUSAL_WINDOW_MS = 10_000;

const pause = new Int32Array(new SharedArrayBuffer(4));
/**
 * Writes all of `text`, waiting out EAGAIN: stderr may be a non-blocking pipe whose reader is slow, and
 * a record must be written before the reply leaves. Never throws (a failing audit sink must not turn a
 * granted device into a leaked one); returns the bytes left unwritten (0: all of it) and why.
 */
function writeFully(fd: number, text: string): { left: number; why: string } {
  let buf = Buffer.from(text);
  for (let waited = 0; buf.length > 0;) {
    try {
      buf = buf.subarray(fs.writeSync(fd, buf));
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? String(err);
      if (code !== 'EAGAIN' || waited > 10_000) return { left: buf.length, why: code };
      Atomics.wait(pause, 0, 0, 1);
      waited++;
    }
  }
  return { left: 0, why: '' };
}

/** A human summary for MESSAGE= (`cleanup tb1000-a …`, not `cleanup cleanup …`). */
export function summary(r: AuditRecord): string {
  const dev = r.device as { name?: string } | undefined;
  const who = r.uid === null ? '' : ` uid ${r.uid}${r.user ? ` (${r.user})` : ''}`;
  return (
    `${r.decision === r.op ? r.op : `${r.decision} ${r.op}`}${dev?.name ? ` ${dev.name}` : ''}${who}` +
    `${r.rule ? ` rule ${r.rule}` : ''}${r.code ? ` ${r.code}` : ''}${r.message ? `: ${r.message}` : ''}`
  );
}

/** `s` escaped as shown() escapes it, line by line. */
const lines = (s: string) => s.split('\n').map(shown).join('\n');
/**
 * The summary as MESSAGE: its later lines indented, so that no line of it reads as a record of its own (a record's
 * summary never starts with a space): a caller's newline that reached a message forged a line of a root grant.
 */
const indented = (s: string) => lines(s).replace(/\n/g, '\n  ');

/** journald's native protocol: KEY=value lines, or KEY, a 64-bit length and the raw value for values with newlines. */
export function journalEntry(r: AuditRecord): Buffer {
  const fields: Array<[string, string]> = [
    // What a caller wrote (its process's name, its request's strings) as a terminal may show it (see shown); a
    // newline stays (the field is then binary: one field whatever it holds, as journalctl shows it).
    ['MESSAGE', indented(summary(r))],
    ['MESSAGE_ID', MESSAGE_IDS[r.decision]],
    ['PRIORITY', String(PRIORITY[r.decision])],
    ['SYSLOG_IDENTIFIER', 'tapbrokerd'],
    ['TAPBROKER_TIME', r.time],
    ['TAPBROKER_OP', r.op],
    ['TAPBROKER_DECISION', r.decision],
    ['TAPBROKER_POLICY_SHA256', r.policy_sha256],
  ];
  const opt = (k: string, v: unknown) => {
    // A caller's backslash is doubled (shown): `\x1b` it typed is not the escape of a real ESC (an outside re-test).
    const text = (x: unknown) => lines(String(x));
    if (v !== null && v !== undefined) fields.push([k, typeof v === 'object' ? auditJson(v) : text(v)]);
  };
  opt('TAPBROKER_RULE', r.rule);
  opt('TAPBROKER_UID', r.uid);
  opt('TAPBROKER_GID', r.gid);
  opt('TAPBROKER_PID', r.pid);
  opt('TAPBROKER_EXE', r.exe);
  opt('TAPBROKER_USER', r.user);
  // Space-separated, as `id -G` prints them.
  opt('TAPBROKER_GROUPS', r.groups?.join(' '));
  opt('TAPBROKER_CLAIMED_GROUPS', r.claimed_groups?.join(' '));
  opt('TAPBROKER_PPID', r.ppid);
  opt('TAPBROKER_PARENT_EXE', r.parent_exe);
  opt('TAPBROKER_CLIENT', r.client);
  opt('TAPBROKER_REQUEST', r.request);
  opt('TAPBROKER_DEVICE', r.device);
  // The device's name and lease on their own, to match on: `journalctl TAPBROKER_IFNAME=tb1000-x`.
  opt('TAPBROKER_IFNAME', typeof r.device?.['name'] === 'string' ? r.device['name'] : null);
  // A grant's device and a lease's (every record of an end) both carry `id`: the one key joining them.
  const lease = r.device?.['id'] ?? r.device?.['lease'];
  opt('TAPBROKER_LEASE', typeof lease === 'string' ? lease : null);
  opt('TAPBROKER_CODE', r.code);
  opt('TAPBROKER_MESSAGE', r.message);
  const parts: Buffer[] = [];
  for (const [k, v] of fields) {
    if (!v.includes('\n')) {
      parts.push(Buffer.from(`${k}=${v}\n`));
      continue;
    }
    const value = Buffer.from(v);
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(value.length));
    parts.push(Buffer.from(`${k}\n`), len, value, Buffer.from('\n'));
  }
  return Buffer.concat(parts);
}
