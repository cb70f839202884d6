// Audit records (audit.ts): how a record is built from an event (stable field names, the caller's
// identity, the policy digest), where it goes (a JSON line on the fd, a JSON-lines file, journald's
// native socket when it exists, and the further sink every record is given), journalEntry's encoding for
// journald's native protocol, and the refusal limit per uid and window (driven by flushRefusals, the
// window's end, rather than by waiting it out).
import test, { type ExecutionContext } from 'ava';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { sys } from '@tapbroker/protocol';
import { MESSAGE_IDS, type AuditRecord } from '@tapbroker/broker';
import { Audit, REFUSALS_PER_WINDOW, journalEntry, printable, type Identity } from '@tapbroker/broker/internal';
import { journalEntries, journalFields } from '../helpers/datagram.js';
import { ROOT as REPO } from '../helpers/broker.js';

type Options = NonNullable<ConstructorParameters<typeof Audit>[1]>;

const SHA = 'a'.repeat(64);
const ALICE: Identity = {
  uid: 1000, gid: 1000, groups: [1000, 27], pid: 4242, pidfd: 99, exe: '/usr/bin/qemu-system-x86_64', user: 'alice',
  parent: { pid: 4000, exe: '/usr/sbin/libvirtd' }, client: 'tapbroker',
};
const RECORD: AuditRecord = {
  time: '2026-12-02T00:00:00.000Z', op: 'create-tap', decision: 'grant', rule: 'lab', policy_sha256: SHA,
  uid: 1000, gid: 1000, pid: 4242, exe: '/usr/bin/qemu', user: 'alice',
};

/**
 * An Audit writing its JSON lines to a temp file through `fd` (never to the test's stderr), without
 * journald unless `opts` names a socket; closed and removed when the test ends.
 */
function setup(t: ExecutionContext, opts: Options = {}, policySha: () => string = () => SHA) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-audit-'));
  const out = path.join(dir, 'out.jsonl');
  const fd = fs.openSync(out, 'w+');
  const audit = new Audit(policySha, { journalSocket: null, fd, ...opts });
  t.teardown(() => {
    audit.close();
    fs.closeSync(fd);
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return { audit, dir, fd, out, lines: () => jsonLines(out) };
}

function jsonLines(file: string): AuditRecord[] {
  const text = fs.readFileSync(file, 'utf8');
  return text.split('\n').filter((l) => l !== '').map((l) => (JSON.parse(l) as { audit: AuditRecord }).audit);
}

const fieldMap = journalFields;

/** A stand-in for journald's socket: a bound AF_UNIX datagram socket, read without waiting. */
function fakeJournal(t: ExecutionContext, dir: string) {
  const socketPath = path.join(dir, 'journal.sock');
  const fd = sys.socket(sys.AF_UNIX, sys.SOCK_DGRAM | sys.SOCK_NONBLOCK | sys.SOCK_CLOEXEC);
  sys.bind(fd, sys.sockaddrUn(socketPath));
  const rx = new sys.Receiver(256 * 1024);
  let open = true;
  const close = () => {
    if (open) sys.close(fd);
    open = false;
  };
  t.teardown(close);
  return {
    path: socketPath,
    /** Every datagram queued so far. */
    take(): Buffer[] {
      const got: Buffer[] = [];
      for (let m = rx.recv(fd, sys.MSG_DONTWAIT); m !== null; m = rx.recv(fd, sys.MSG_DONTWAIT)) got.push(Buffer.from(m.data));
      return got;
    },
    close,
  };
}

test('a record names the event, the caller and its parent under stable field names, in a stable order', (t) => {
  const { audit } = setup(t);
  const before = Date.now();
  const rec = audit.record({
    op: 'create-tap', decision: 'grant', rule: 'lab', caller: ALICE, request: { kind: 'tap', parent: 'br0' },
    device: { name: 'tb1000-k3x9', ifindex: 7 }, code: 'TB_E_X', message: 'note',
  });
  t.deepEqual(Object.keys(rec), [
    'time', 'op', 'decision', 'rule', 'policy_sha256', 'uid', 'gid', 'pid', 'exe', 'user', 'groups', 'ppid',
    'parent_exe', 'client', 'request', 'device', 'code', 'message',
  ]);
  t.like(rec, {
    op: 'create-tap', decision: 'grant', rule: 'lab', policy_sha256: SHA, uid: 1000, gid: 1000, pid: 4242,
    exe: '/usr/bin/qemu-system-x86_64', user: 'alice', ppid: 4000, parent_exe: '/usr/sbin/libvirtd', client: 'tapbroker',
    request: { kind: 'tap', parent: 'br0' }, device: { name: 'tb1000-k3x9', ifindex: 7 }, code: 'TB_E_X',
    message: 'note',
  });
  const time = Date.parse(rec.time);
  t.is(new Date(time).toISOString(), rec.time, 'an ISO 8601 UTC time');
  t.true(time >= before && time <= Date.now());
});

test("the caller's groups are in the record (group rules match them); its pidfd stays out", (t) => {
  // Found by an outside review: a grant through a group rule could not be explained from its record.
  const { audit } = setup(t);
  const rec = audit.record({ op: 'create-tap', decision: 'deny', rule: null, caller: ALICE });
  t.deepEqual(rec.groups, [1000, 27]);
  t.false('pidfd' in rec);
  t.false('groups' in audit.record({ op: 'cleanup', decision: 'cleanup', rule: 'lab', caller: { uid: 0 } }),
    'the broker\'s own actions name no groups');
});

test('without a caller the identity fields are null, and parent, request, device, code and message absent', (t) => {
  const { audit } = setup(t);
  const rec = audit.record({ op: 'reload', decision: 'reload', rule: null, caller: null, code: '', message: '' });
  t.deepEqual(Object.keys(rec), ['time', 'op', 'decision', 'rule', 'policy_sha256', 'uid', 'gid', 'pid', 'exe', 'user']);
  t.like(rec, { rule: null, uid: null, gid: null, pid: null, exe: null, user: null });
});

test('an owner known by uid alone: the rest of its identity is null', (t) => {
  const { audit } = setup(t);
  const rec = audit.record({ op: 'cleanup', decision: 'cleanup', rule: 'lab', caller: { uid: 0 } });
  t.like(rec, { uid: 0, gid: null, pid: null, exe: null, user: null });
  t.false('ppid' in rec, 'a caller without a parent');
});

test("policy_sha256: the digest the policy has at the time of the record, or the one the event names", (t) => {
  let sha = 'b'.repeat(64);
  const { audit } = setup(t, {}, () => sha);
  t.is(audit.record({ op: 'list', decision: 'grant', rule: null, caller: ALICE }).policy_sha256, 'b'.repeat(64));
  sha = 'c'.repeat(64);
  t.is(audit.record({ op: 'list', decision: 'grant', rule: null, caller: ALICE }).policy_sha256, 'c'.repeat(64),
    'a reload changes it');
  const old = audit.record({ op: 'release', decision: 'release', rule: 'lab', caller: ALICE, policy: 'd'.repeat(64) });
  t.is(old.policy_sha256, 'd'.repeat(64));
});

test('each record is one line {"audit": record} on the fd, in order', (t) => {
  const { audit, out, lines } = setup(t);
  const recs = [
    audit.record({ op: 'create-tap', decision: 'grant', rule: 'lab', caller: ALICE, device: { name: 'tb1000-a' } }),
    audit.record({ op: 'create-tap', decision: 'deny', rule: null, caller: ALICE, code: 'TB_E_POLICY_DENIED' }),
    audit.record({ op: 'reload', decision: 'reload', rule: null, caller: null, message: 'two\nlines' }),
  ];
  t.deepEqual(lines(), recs);
  const text = fs.readFileSync(out, 'utf8');
  t.is(text.split('\n').length, 4, 'three lines: a newline in a value is escaped');
  t.true(text.startsWith('{"audit":{"time":'));
  t.is(audit.dropped, 0);
  t.is(audit.sink, 'stderr');
});

// Found by an outside review: a caller's bridge name with U+202E (or U+2028, U+2067) reached the audit file and the
// journal raw (JSON leaves them so), reordering or splitting the line an operator reads.
test('what JSON leaves raw but a terminal acts on is written as \\uNNNN, and reads back the same', (t) => {
  const { audit, out, lines } = setup(t);
  const hostile = 'br\u202e0\u2028x\u2067y\u0085z';
  const rec = audit.record({ op: 'create-tap', decision: 'error', rule: null, caller: ALICE, request: { bridge: hostile },
    code: 'TB_E_INVALID_NAME', message: `bridge \`${printable(hostile)}'` });
  t.deepEqual(lines(), [rec], 'the same record, parsed back');
  const text = fs.readFileSync(out, 'utf8');
  t.notRegex(text, /[\u0080-\u009f\u2028\u202e\u2067]/);
  t.true(text.includes('br\\u202e0\\u2028x\\u2067y\\u0085z'));
  const journal = journalEntry(rec).toString('utf8');
  t.notRegex(journal, /[\u0080-\u009f\u2028\u202e\u2067]/, 'nor in the journal\'s fields');
  // A process's name is the caller's to set (the unit records `comm:NAME` where it cannot read the exe link).
  const named = journalEntry({ ...rec, exe: 'comm:\u001b[2Jx\u202e', parent_exe: '/bin/\u009bsh' });
  const f = fieldMap(named);
  t.is(f.get('TAPBROKER_EXE'), 'comm:\\x1b[2Jx\\u{202e}');
  t.is(f.get('TAPBROKER_PARENT_EXE'), '/bin/\\x9bsh');
  // Typed text that reads like an escape is told apart from a real control character: its backslash doubled.
  t.is(fieldMap(journalEntry({ ...rec, exe: 'comm:\\x1b' })).get('TAPBROKER_EXE'), 'comm:\\\\x1b');
});

test('with a file, every record is also appended there, after what it held, with mode 0600', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-audit-file-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'audit.jsonl');
  const earlier = `${JSON.stringify({ audit: RECORD })}\n`;
  fs.writeFileSync(file, earlier, { mode: 0o600 });
  const { audit, lines } = setup(t, { file });
  const a = audit.record({ op: 'create-tap', decision: 'grant', rule: 'lab', caller: ALICE });
  const b = audit.record({ op: 'release', decision: 'release', rule: 'lab', caller: ALICE });
  t.deepEqual(jsonLines(file), [RECORD, a, b]);
  t.deepEqual(lines(), [a, b], 'and on the fd as well');
  fs.rmSync(file);
  new Audit(() => SHA, { journalSocket: null, file }).close();
  t.is(fs.statSync(file).mode & 0o777, 0o600 & ~process.umask(), 'created owner-only');
});

test('the file is not opened through a symlink', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-audit-link-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  fs.writeFileSync(path.join(dir, 'target'), '');
  fs.symlinkSync(path.join(dir, 'target'), path.join(dir, 'audit.jsonl'));
  t.throws(() => new Audit(() => SHA, { journalSocket: null, file: path.join(dir, 'audit.jsonl') }), { message: /audit\.jsonl is a symbolic link, which is not followed: give the file itself/ });
  t.is(fs.readFileSync(path.join(dir, 'target'), 'utf8'), '');
});

test('close() closes the file', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-audit-close-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'audit.jsonl');
  /** This process's descriptors open on `file`. */
  const openOnFile = () => fs.readdirSync('/proc/self/fd').filter((fd) => {
    try {
      return fs.readlinkSync(`/proc/self/fd/${fd}`) === file;
    } catch {
      return false;
    }
  });
  const audit = new Audit(() => SHA, { journalSocket: null, file });
  t.is(openOnFile().length, 1);
  audit.close();
  t.deepEqual(openOnFile(), []);
});

test('after close(), the file\'s old fd number is never written or closed again, though another file now has it', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-audit-reuse-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const devNull = fs.openSync('/dev/null', 'w');
  t.teardown(() => fs.closeSync(devNull));
  const audit = new Audit(() => SHA, { journalSocket: null, file: path.join(dir, 'audit.jsonl'), fd: devNull });
  audit.close();
  // The lowest free fd is the one the audit file had: another file takes it.
  const other = path.join(dir, 'other');
  const fd = fs.openSync(other, 'w');
  t.teardown(() => fs.closeSync(fd));
  audit.record({ op: 'create-tap', decision: 'grant', rule: 'r', caller: { uid: 1 } });
  audit.close();
  t.is(fs.readFileSync(other, 'utf8'), '', 'nothing written to the file that took the number');
  t.notThrows(() => fs.fstatSync(fd), 'and it is still open');
});

// Found by an outside review of a broker after a week: the file was never opened again, so after logrotate's
// `create` mode (rename, then a reload) records went on to the rotated file, and nowhere once it was deleted.
test('reopen(): records go to a new file at the name after a rotation; the same file stays as it was', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-audit-rot-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'audit.jsonl');
  const log: string[] = [];
  const { audit } = setup(t, { file, log: (l) => log.push(l) });
  const a = audit.record({ op: 'create-tap', decision: 'grant', rule: 'lab', caller: ALICE, message: 'a' });
  audit.reopen();
  t.deepEqual(log, [], 'not rotated: nothing to say');
  const b = audit.record({ op: 'create-tap', decision: 'grant', rule: 'lab', caller: ALICE, message: 'b' });
  t.deepEqual(jsonLines(file), [a, b]);
  fs.renameSync(file, `${file}.1`);
  const c = audit.record({ op: 'create-tap', decision: 'grant', rule: 'lab', caller: ALICE, message: 'c' });
  audit.reopen();
  const d = audit.record({ op: 'release', decision: 'release', rule: 'lab', caller: ALICE, message: 'd' });
  t.deepEqual(jsonLines(`${file}.1`), [a, b, c], 'until the reload, the rotated file');
  t.deepEqual(jsonLines(file), [d], 'after it, the new one');
  t.is(fs.statSync(file).mode & 0o777, 0o600);
  t.deepEqual(log, [`audit file ${file}: opened again (a new file: the one before was rotated)`]);
  // Rotated and deleted before the reload (`delaycompress` off, `rotate 0`): said too.
  fs.renameSync(file, `${file}.2`);
  fs.rmSync(`${file}.2`);
  audit.reopen();
  t.regex(log[1]!, /rotated and deleted\)$/);
  // A name the broker cannot open again (a symlink planted there): the file open until now keeps the records.
  fs.renameSync(file, `${file}.3`);
  fs.symlinkSync('/dev/null', file);
  audit.reopen();
  t.regex(log[2]!, /cannot open it again \(.*is a symbolic link, which is not followed: give the file itself\); records go on to the file open until now/);
  const e = audit.record({ op: 'release', decision: 'release', rule: 'lab', caller: ALICE, message: 'e' });
  t.deepEqual(jsonLines(`${file}.3`), [e]);
});

// Found by an outside re-test of the reopen: a FIFO put at the name blocked the broker in open(2) at the next reload
// (until someone read it), and a directory a user could write since start got root's records into the user's file.
test('reopen(): a FIFO at the name, or a directory a user can now write, keeps the file open until then', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-audit-fifo-'));
  // A reader that unblocks a regressed open after a while, so that the test fails instead of hanging.
  const unblock = spawn('sh', ['-c', `sleep 3; exec cat ${dir}/audit.jsonl > /dev/null`], { stdio: 'ignore' });
  t.teardown(() => {
    unblock.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const file = path.join(dir, 'audit.jsonl');
  const log: string[] = [];
  const { audit } = setup(t, { file, log: (l) => log.push(l) });
  fs.renameSync(file, `${file}.1`);
  execFileSync('mkfifo', ['-m', '0600', file]);
  audit.reopen();
  t.regex(log[0] ?? '', /cannot open it again \(.*is not a regular file \(a FIFO or socket with no reader\)\); records go on to the file open until now/);
  const a = audit.record({ op: 'create-tap', decision: 'grant', rule: 'lab', caller: ALICE, message: 'a' });
  t.deepEqual(jsonLines(`${file}.1`), [a]);
  // A FIFO at start: refused, not waited on.
  t.throws(() => new Audit(() => SHA, { journalSocket: null, file, fd: fs.openSync('/dev/null', 'w') }),
    { message: /is not a regular file \(a FIFO or socket with no reader\)/ });
  fs.rmSync(file);
  fs.chmodSync(dir, 0o777);
  audit.reopen();
  t.regex(log[1] ?? '', /cannot open it again \(its directory is writable by others\); records go on/);
  t.false(fs.existsSync(file), 'nothing made in it');
  const b = audit.record({ op: 'create-tap', decision: 'grant', rule: 'lab', caller: ALICE, message: 'b' });
  t.deepEqual(jsonLines(`${file}.1`), [a, b]);
});

// Found by an outside re-test: a write cut just after the file's gap record (the disk full again at once) left the
// count standing, and the next gap record counted the same records again (3 lost, then 4 for 4 in all). Here the
// cuts are the kernel's own, made by RLIMIT_FSIZE (node ignores SIGXFSZ: a write past the limit fails with EFBIG).
test('a gap record written whole is said once: a write cut right after it counts only what was lost since', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-audit-gap-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const child = `
    import fs from 'node:fs';
    import { execFileSync } from 'node:child_process';
    import { Audit } from '@tapbroker/broker/internal';
    const file = process.argv[1];
    const limit = (n) => execFileSync('prlimit', ['--pid', String(process.pid), '--fsize=' + n + ':unlimited']);
    const log = [];
    const audit = new Audit(() => 'a'.repeat(64), { journalSocket: null, fd: fs.openSync('/dev/null', 'w'), file,
      log: (l) => log.push(l) });
    const rec = (m) => audit.record({ op: 'create-tap', decision: 'grant', rule: 'lab', caller: { uid: 1000 }, message: m });
    rec('r0');
    limit(fs.statSync(file).size);
    rec('r1');
    // Room for the gap record alone (its length does not change with its time).
    limit(fs.statSync(file).size + Buffer.byteLength(JSON.stringify({ audit: audit.gapRecord() }) + '\\n'));
    rec('r2');
    limit('unlimited');
    rec('r3');
    console.log(JSON.stringify({ log, lines: fs.readFileSync(file, 'utf8').split('\\n').filter((l) => l) }));`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', child, path.join(dir, 'audit.jsonl')],
    { cwd: REPO, encoding: 'utf8' });
  t.is(r.status, 0, r.stderr);
  const out = JSON.parse(r.stdout) as { log: string[]; lines: string[] };
  const recs = out.lines.map((l) => (JSON.parse(l) as { audit: AuditRecord }).audit);
  t.deepEqual(recs.map((x) => x.op === 'audit-file' ? `gap ${/^\d+/.exec(x.message!)![0]}` : x.message), ['r0', 'gap 1', 'gap 1', 'r3'],
    'r1 lost, said; r2 lost, said once');
  t.deepEqual(out.log.filter((l) => /taking records again/.test(l)).map((l) => /(\d+) lost$/.exec(l)![1]), ['1', '1']);
});

test('the further sink is given every record, the very object returned, with the caller; close() closes it', (t) => {
  const sent: Array<[AuditRecord, Partial<Identity> | null]> = [];
  let closed = 0;
  const { audit } = setup(t, { linux: { send: (rec, caller) => sent.push([rec, caller]), close: () => closed++ } });
  const a = audit.record({ op: 'create-tap', decision: 'grant', rule: 'lab', caller: ALICE });
  const b = audit.record({ op: 'cleanup', decision: 'cleanup', rule: 'lab', caller: { uid: 1000 } });
  const c = audit.record({ op: 'reload', decision: 'reload', rule: null, caller: null });
  t.is(sent.length, 3);
  t.is(sent[0]![0], a);
  t.is(sent[0]![1], ALICE, 'the whole identity: the sink picks what it needs');
  t.is(sent[1]![0], b);
  t.deepEqual(sent[1]![1], { uid: 1000 });
  t.is(sent[2]![0], c);
  t.is(sent[2]![1], null);
  audit.close();
  t.is(closed, 1);
});

test('a record that cannot be written is counted in dropped, not thrown', (t) => {
  const ro = fs.openSync('/dev/null', 'r');
  t.teardown(() => fs.closeSync(ro));
  const audit = new Audit(() => SHA, { journalSocket: null, fd: ro });
  t.notThrows(() => audit.record({ op: 'create-tap', decision: 'grant', rule: 'lab', caller: ALICE }));
  t.notThrows(() => audit.record({ op: 'release', decision: 'release', rule: 'lab', caller: ALICE }));
  t.is(audit.dropped, 2);
  audit.close();
});

test('a journald socket that is not there at start: records go to the fd', (t) => {
  const { audit, lines } = setup(t, { journalSocket: '/nonexistent/journal/socket' });
  t.is(audit.sink, 'stderr');
  const rec = audit.record({ op: 'create-tap', decision: 'grant', rule: 'lab', caller: ALICE });
  t.deepEqual(lines(), [rec]);
});

test('journald: one native datagram per record, and nothing on the fd', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-audit-jd-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const journal = fakeJournal(t, dir);
  const { audit, lines } = setup(t, { journalSocket: journal.path });
  t.is(audit.sink, `journald (${journal.path})`);
  const a = audit.record({ op: 'create-tap', decision: 'grant', rule: 'lab', caller: ALICE, device: { name: 'tb1000-a' } });
  const b = audit.record({ op: 'create-tap', decision: 'deny', rule: null, caller: ALICE, code: 'TB_E_POLICY_DENIED' });
  const got = journal.take();
  t.deepEqual(got, [journalEntry(a), journalEntry(b)]);
  t.is(fieldMap(got[0]!).get('TAPBROKER_OP'), 'create-tap');
  t.deepEqual(lines(), []);
});

test('journald gone after start: the record still goes to the fd', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-audit-jd-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const journal = fakeJournal(t, dir);
  const log: string[] = [];
  const { audit, lines } = setup(t, { journalSocket: journal.path, log: (l) => log.push(l) });
  journal.close();
  const rec = audit.record({ op: 'create-tap', decision: 'grant', rule: 'lab', caller: ALICE });
  t.deepEqual(lines(), [rec]);
  t.is(audit.dropped, 0);
  t.is(log.length, 1, 'said in the log');
  t.regex(log[0]!, /did not take a record \(.*ECONNREFUSED.*\); records go to stderr/);
});

test('journald kept full: records go to the fd, said once in the log, and counted when journald takes them again', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-audit-jd-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const journal = fakeJournal(t, dir);
  const log: string[] = [];
  const { audit, lines } = setup(t, { journalSocket: journal.path, log: (l) => log.push(l) });
  // Nobody reads the socket: its queue fills for real (net.unix.max_dgram_qlen datagrams), and sends then fail.
  let sent = 0;
  while (lines().length === 0 && sent < 100_000) {
    audit.record({ op: 'create-tap', decision: 'grant', rule: 'lab', caller: ALICE, message: `n${sent++}` });
  }
  t.is(lines().length, 1, 'the record journald did not take went to the fd');
  const queued = journal.take().length;
  t.is(queued, sent - 1, 'every other record is in the journal, none twice');
  t.is(log.length, 1);
  t.regex(log[0]!, /^journald did not take a record \(sendmsg to `.*journal\.sock' \(its queue is full\).*\); records go to stderr/);
  // The queue read: the next record goes to journald again, and the log says how many did not.
  const rec = audit.record({ op: 'release', decision: 'release', rule: 'lab', caller: ALICE });
  t.deepEqual(journal.take(), [journalEntry(rec)]);
  t.is(lines().length, 1);
  t.is(log.length, 2);
  t.regex(log[1]!, /: taking records again; 1 went to stderr meanwhile$/);
  t.is(audit.dropped, 0);
});

test('journalEntry: the fields in a fixed order, objects as JSON, absent and null ones left out', (t) => {
  const full: AuditRecord = {
    ...RECORD, groups: [1000, 27], ppid: 4000, parent_exe: '/usr/sbin/libvirtd', client: 'tapbroker-bridge-helper',
    request: { kind: 'tap', queues: 2 },
    device: { name: 'tb1000-a', ifindex: 7, lease: '0123456789abcdef' }, code: 'TB_E_X', message: 'hi',
  };
  t.deepEqual(journalEntries(journalEntry(full)), [
    ['MESSAGE', 'grant create-tap tb1000-a uid 1000 (alice) rule lab TB_E_X: hi'],
    ['MESSAGE_ID', MESSAGE_IDS.grant],
    ['PRIORITY', '6'],
    ['SYSLOG_IDENTIFIER', 'tapbrokerd'],
    ['TAPBROKER_TIME', '2026-12-02T00:00:00.000Z'],
    ['TAPBROKER_OP', 'create-tap'],
    ['TAPBROKER_DECISION', 'grant'],
    ['TAPBROKER_POLICY_SHA256', SHA],
    ['TAPBROKER_RULE', 'lab'],
    ['TAPBROKER_UID', '1000'],
    ['TAPBROKER_GID', '1000'],
    ['TAPBROKER_PID', '4242'],
    ['TAPBROKER_EXE', '/usr/bin/qemu'],
    ['TAPBROKER_USER', 'alice'],
    ['TAPBROKER_GROUPS', '1000 27'],
    ['TAPBROKER_PPID', '4000'],
    ['TAPBROKER_PARENT_EXE', '/usr/sbin/libvirtd'],
    ['TAPBROKER_CLIENT', 'tapbroker-bridge-helper'],
    ['TAPBROKER_REQUEST', '{"kind":"tap","queues":2}'],
    ['TAPBROKER_DEVICE', '{"name":"tb1000-a","ifindex":7,"lease":"0123456789abcdef"}'],
    ['TAPBROKER_IFNAME', 'tb1000-a'],
    ['TAPBROKER_LEASE', '0123456789abcdef'],
    ['TAPBROKER_CODE', 'TB_E_X'],
    ['TAPBROKER_MESSAGE', 'hi'],
  ]);
  const bare = fieldMap(journalEntry({
    ...RECORD, decision: 'reload', op: 'reload', rule: null, uid: null, gid: null, pid: null, exe: null, user: null,
    parent_exe: null,
  }));
  t.deepEqual([...bare.keys()], [
    'MESSAGE', 'MESSAGE_ID', 'PRIORITY', 'SYSLOG_IDENTIFIER', 'TAPBROKER_TIME', 'TAPBROKER_OP', 'TAPBROKER_DECISION',
    'TAPBROKER_POLICY_SHA256',
  ]);
  t.is(bare.get('MESSAGE'), 'reload');
});

test('journalEntry: TAPBROKER_LEASE from the device\'s id, which a grant and every end record carry', (t) => {
  const end = fieldMap(journalEntry({ ...RECORD, decision: 'cleanup', op: 'cleanup',
    device: { id: '0123456789abcdef', name: 'tb1000-a', kind: 'tap' } }));
  t.is(end.get('TAPBROKER_LEASE'), '0123456789abcdef');
  const grant = fieldMap(journalEntry({ ...RECORD, device: { id: 'fedcba9876543210', lease: 'fedcba9876543210', name: 'tb1000-b' } }));
  t.is(grant.get('TAPBROKER_LEASE'), 'fedcba9876543210');
});

test('journalEntry: uid 0 and other zeros are written', (t) => {
  const f = fieldMap(journalEntry({ ...RECORD, uid: 0, gid: 0, ppid: 0 }));
  t.is(f.get('TAPBROKER_UID'), '0');
  t.is(f.get('TAPBROKER_GID'), '0');
  t.is(f.get('TAPBROKER_PPID'), '0');
  t.is(f.get('MESSAGE'), 'grant create-tap uid 0 (alice) rule lab');
});

test('journalEntry: the simple form is KEY=value and a newline, nothing else', (t) => {
  const entry = journalEntry(RECORD);
  t.true(entry.toString('utf8').startsWith('MESSAGE=grant create-tap uid 1000 (alice) rule lab\nMESSAGE_ID='));
  t.is(entry.at(-1), 0x0a);
  t.is(entry.toString('utf8').split('\n').length, 15, '14 fields, each on its own line');
});

test('journalEntry: a value with a newline is KEY, a 64-bit little-endian byte length, the bytes, a newline', (t) => {
  const entry = journalEntry({ ...RECORD, message: 'é\nx' });
  const value = Buffer.from('é\nx');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(value.length));
  t.is(value.length, 4, 'bytes, not characters');
  const field = Buffer.concat([Buffer.from('TAPBROKER_MESSAGE\n'), len, value, Buffer.from('\n')]);
  t.true(entry.subarray(entry.length - field.length).equals(field));
  const f = fieldMap(entry);
  t.is(f.get('MESSAGE'), 'grant create-tap uid 1000 (alice) rule lab: é\n  x', 'the summary carries it too, as binary, its later lines indented');
  t.is(f.get('TAPBROKER_MESSAGE'), 'é\nx');
  t.is(f.get('TAPBROKER_OP'), 'create-tap', 'the other fields are still KEY=value');
});

test('journalEntry: a newline inside a JSON value is escaped, so the field stays simple', (t) => {
  const entry = journalEntry({ ...RECORD, request: { name: 'a\nb' } });
  t.true(entry.includes(Buffer.from('TAPBROKER_REQUEST={"name":"a\\nb"}\n')));
});

test('MESSAGE_IDs are fixed forever, one per decision, 128-bit hex', (t) => {
  t.deepEqual(MESSAGE_IDS, {
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
  });
});

test('journalEntry: MESSAGE_ID and PRIORITY follow the decision', (t) => {
  const priority = {
    grant: 6, deny: 5, error: 4, cleanup: 6, release: 6, reconcile: 6, reload: 5, 'dry-run': 6, suppressed: 4,
    unplug: 6,
  } as const;
  for (const decision of Object.keys(MESSAGE_IDS) as Array<AuditRecord['decision']>) {
    const f = fieldMap(journalEntry({ ...RECORD, decision }));
    t.is(f.get('MESSAGE_ID'), MESSAGE_IDS[decision], decision);
    t.is(f.get('PRIORITY'), String(priority[decision]), decision);
    t.is(f.get('TAPBROKER_DECISION'), decision);
  }
});

test('journalEntry: MESSAGE sums the record up for a person', (t) => {
  const message = (r: Partial<AuditRecord>) => fieldMap(journalEntry({ ...RECORD, ...r })).get('MESSAGE');
  t.is(message({ device: { name: 'tb1000-a' } }), 'grant create-tap tb1000-a uid 1000 (alice) rule lab');
  t.is(message({ user: null }), 'grant create-tap uid 1000 rule lab', 'a uid without a name');
  t.is(message({ uid: null, rule: null }), 'grant create-tap');
  t.is(message({ decision: 'deny', rule: null, code: 'TB_E_POLICY_DENIED', message: 'no rule allows br1' }),
    'deny create-tap uid 1000 (alice) TB_E_POLICY_DENIED: no rule allows br1');
  t.is(message({ device: { ifindex: 7 } }), 'grant create-tap uid 1000 (alice) rule lab', 'a device without a name');
  t.is(message({ op: 'cleanup', decision: 'cleanup', device: { name: 'tb1000-a' } }), 'cleanup tb1000-a uid 1000 (alice) rule lab',
    'a decision named as its op is said once');
  // Found by outside reviews: a caller's newline that reached a message forged a line of a root grant. A message's
  // later lines are indented: no line of it reads as a record of its own.
  t.is(message({ decision: 'error', rule: null, code: 'TB_E_MALFORMED', message: 'a\ngrant create tb0-evil uid 0 (root)' }),
    'error create-tap uid 1000 (alice) TB_E_MALFORMED: a\n  grant create tb0-evil uid 0 (root)');
});

// Refusals no handler saw: at most REFUSALS_PER_WINDOW written per uid and window.

test('the refusal limit is 20 per uid and window', (t) => {
  t.is(REFUSALS_PER_WINDOW, 20);
});

test('refusals up to the limit are written one by one as errors', (t) => {
  const { audit, lines } = setup(t);
  for (let i = 0; i < REFUSALS_PER_WINDOW; i++) audit.refusal(ALICE, 'request', 'TB_E_INVALID_REQUEST', `bad frame ${i}`);
  const recs = lines();
  t.is(recs.length, REFUSALS_PER_WINDOW);
  t.like(recs[0], {
    op: 'request', decision: 'error', rule: null, uid: 1000, pid: 4242, code: 'TB_E_INVALID_REQUEST', message: 'bad frame 0',
  });
  t.is(recs.at(-1)!.message, `bad frame ${REFUSALS_PER_WINDOW - 1}`);
  audit.flushRefusals();
  t.is(lines().length, REFUSALS_PER_WINDOW, 'no summary for a uid that stayed within the limit');
});

test('past the limit, refusals are counted by code and summed up in one suppressed record at the window\'s end', (t) => {
  const { audit, lines } = setup(t);
  for (let i = 0; i < REFUSALS_PER_WINDOW + 5; i++) {
    audit.refusal(ALICE, 'request', i % 2 ? 'TB_E_BUSY' : 'TB_E_INVALID_REQUEST', 'refused');
  }
  t.is(lines().length, REFUSALS_PER_WINDOW, 'the five past the limit are not written');
  audit.flushRefusals();
  const recs = lines();
  t.is(recs.length, REFUSALS_PER_WINDOW + 1);
  const summary = recs.at(-1)!;
  t.like(summary, {
    op: 'refusals', decision: 'suppressed', rule: null, uid: 1000, gid: null, pid: null,
    message: '5 more refused, denied or dry-run request(s) of uid 1000 in this window, counted but not written one by one',
  });
  // Refusals 21..25 (i = 20..24): even i is TB_E_INVALID_REQUEST.
  const request = summary.request as { window_ms: number; counts: Record<string, number> };
  t.deepEqual(request.counts, { TB_E_INVALID_REQUEST: 3, TB_E_BUSY: 2 });
  t.true(Number.isInteger(request.window_ms) && request.window_ms >= 0);
});

// Found by an outside review: past the limit a dry run that would be denied was counted as a denial.
test('past the limit, dry runs are counted as dry runs, by the code they would get', (t) => {
  const { audit, lines } = setup(t);
  for (let i = 0; i < REFUSALS_PER_WINDOW; i++) audit.refusal(ALICE, 'request', 'TB_E_BUSY', 'refused');
  audit.record({ op: 'create-tap', decision: 'deny', rule: null, caller: ALICE, code: 'TB_E_POLICY_DENIED' });
  for (let i = 0; i < 3; i++) {
    audit.record({ op: 'can', decision: 'dry-run', rule: null, caller: ALICE, code: 'TB_E_POLICY_DENIED' });
  }
  audit.record({ op: 'can', decision: 'dry-run', rule: 'lab', caller: ALICE, message: 'would grant' });
  audit.flushRefusals();
  t.deepEqual((lines().at(-1)!.request as { counts: Record<string, number> }).counts,
    { TB_E_POLICY_DENIED: 1, 'dry-run:TB_E_POLICY_DENIED': 3, 'dry-run': 1 });
});

test('the limit is per uid: one flooding uid does not silence another', (t) => {
  const { audit, lines } = setup(t);
  for (let i = 0; i < REFUSALS_PER_WINDOW + 3; i++) audit.refusal(ALICE, 'request', 'TB_E_BUSY', 'alice');
  audit.refusal({ ...ALICE, uid: 1001, user: 'bob' }, 'request', 'TB_E_BUSY', 'bob');
  const recs = lines();
  t.is(recs.length, REFUSALS_PER_WINDOW + 1);
  t.like(recs.at(-1), { uid: 1001, message: 'bob' });
  audit.flushRefusals();
  const summaries = lines().filter((r) => r.decision === 'suppressed');
  t.is(summaries.length, 1, 'a summary for the uid over the limit only');
  t.like(summaries[0], { uid: 1000 });
});

test('a new window starts after the summary: refusals are written one by one again', (t) => {
  const { audit, lines } = setup(t);
  for (let i = 0; i < REFUSALS_PER_WINDOW + 1; i++) audit.refusal(ALICE, 'request', 'TB_E_BUSY', 'first window');
  audit.flushRefusals();
  audit.refusal(ALICE, 'request', 'TB_E_BUSY', 'second window');
  const recs = lines();
  t.is(recs.length, REFUSALS_PER_WINDOW + 2);
  t.like(recs.at(-1), { decision: 'error', message: 'second window' });
  audit.flushRefusals();
  t.is(lines().length, REFUSALS_PER_WINDOW + 2, 'the second window stayed within the limit');
});

test('refusals of a caller without a uid share one count; their summary has no caller', (t) => {
  const { audit, lines } = setup(t);
  for (let i = 0; i < REFUSALS_PER_WINDOW + 2; i++) audit.refusal({}, 'connection', 'TB_E_BUSY', 'full');
  audit.flushRefusals();
  const recs = lines();
  t.is(recs.length, REFUSALS_PER_WINDOW + 1);
  t.like(recs[0], { uid: null, decision: 'error' });
  t.like(recs.at(-1), { decision: 'suppressed', uid: null, gid: null, request: { counts: { TB_E_BUSY: 2 } } });
});

test('close() ends the window: the summary is written', (t) => {
  const { audit, lines } = setup(t);
  for (let i = 0; i < REFUSALS_PER_WINDOW + 1; i++) audit.refusal(ALICE, 'request', 'TB_E_BUSY', 'x');
  audit.close();
  t.like(lines().at(-1), { decision: 'suppressed', request: { counts: { TB_E_BUSY: 1 } } });
});

// Found by an outside code review: denials and dry runs were written one by one without a limit, so one uid
// could make the broker write thousands of records a second (journald's own rate limit then drops the
// unit's records, everyone's grants among them) and push other records out of the journal.
test('denials, request errors and dry runs share the per-uid limit; past it they are counted by code', (t) => {
  const { audit, lines } = setup(t);
  for (let i = 0; i < REFUSALS_PER_WINDOW + 4; i++) {
    const decision = (['deny', 'dry-run', 'error'] as const)[i % 3]!;
    audit.record({
      op: decision === 'dry-run' ? 'can' : 'create-tap', decision, rule: null, caller: ALICE,
      ...(decision === 'dry-run' ? {} : { code: decision === 'deny' ? 'TB_E_POLICY_DENIED' : 'TB_E_KERNEL' }),
      message: `request ${i}`,
    });
  }
  t.is(lines().length, REFUSALS_PER_WINDOW);
  audit.flushRefusals();
  // Requests 21..24 (i = 20..23): i % 3 = 2, 0, 1, 2.
  t.like(lines().at(-1), {
    decision: 'suppressed', uid: 1000,
    request: { counts: { TB_E_KERNEL: 2, TB_E_POLICY_DENIED: 1, 'dry-run': 1 } },
  });
});

test('grants, cleanups and their failures are never held back by the limit, nor one uid by another\'s flood', (t) => {
  const { audit, lines } = setup(t);
  for (let i = 0; i < REFUSALS_PER_WINDOW; i++) audit.refusal(ALICE, 'request', 'TB_E_BUSY', 'filling the window');
  const ROOT: Identity = { ...ALICE, uid: 0, gid: 0, user: 'root' };
  audit.record({ op: 'create-tap', decision: 'grant', rule: 'lab', caller: ALICE, message: 'granted' });
  audit.record({ op: 'cleanup', decision: 'cleanup', rule: 'lab', caller: { uid: 1000 }, message: 'deleted' });
  audit.record({ op: 'cleanup', decision: 'error', rule: 'lab', caller: { uid: 1000 }, code: 'TB_E_KERNEL',
    message: 'failed to delete' });
  audit.record({ op: 'reconcile', decision: 'error', rule: null, caller: { uid: 1000 }, code: 'TB_E_KERNEL',
    message: 'a stale port' });
  audit.record({ op: 'create-tap', decision: 'deny', rule: null, caller: ROOT, code: 'TB_E_POLICY_DENIED',
    message: 'root denied' });
  // A failure about a device the broker made or was deleting (a release that failed, a hook's rollback).
  audit.record({ op: 'release', decision: 'error', rule: 'lab', caller: ALICE, code: 'TB_E_KERNEL',
    device: { name: 'tb1000-a' }, message: 'release failed' });
  audit.record({ op: 'create-tap', decision: 'deny', rule: null, caller: ALICE, code: 'TB_E_POLICY_DENIED',
    message: 'alice denied' });
  t.deepEqual(lines().slice(REFUSALS_PER_WINDOW).map((r) => r.message),
    ['granted', 'deleted', 'failed to delete', 'a stale port', 'root denied', 'release failed']);
});

// Found by outside reviews: a device's records joined its start and end by different keys (`device.lease` in grants,
// `device.id` in ends), and then a few reconcile records still had `lease` alone. Every device a record names with its
// lease names it as `id` too (PROTOCOL.md, "Audit records"). Read from the sources: these records come from paths
// (a broker restart after a lost table, a left-over Open vSwitch port) that the integration tests reach only in part.
test('every audit device written with its lease also carries it as id', (t) => {
  const src = path.join(path.dirname(fileURLToPath(import.meta.url)), '../../../packages/broker/src');
  const offenders: string[] = [];
  for (const f of fs.readdirSync(src).filter((n) => n.endsWith('.ts'))) {
    fs.readFileSync(path.join(src, f), 'utf8').split('\n').forEach((line, i) => {
      if (/device: \{[^}]*\blease: /.test(line) && !/\bid: /.test(line)) offenders.push(`${f}:${i + 1}: ${line.trim()}`);
    });
  }
  t.deepEqual(offenders, []);
});

// Found by an outside review: a record a full disk cut short, then a restart: the new broker wrote its first record
// (a grant) onto the cut bytes, one line that is no JSON, and the file never said records were missing.
test('a file whose last line was cut short when opened: the line is ended, and the file says records may be missing', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-audit-cut-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'audit.jsonl');
  const whole = `${JSON.stringify({ audit: { op: 'create-tap', decision: 'grant' } })}\n`;
  fs.writeFileSync(file, `${whole}{"audit":{"time":"2026-`, { mode: 0o600 });
  const log: string[] = [];
  const audit = new Audit(() => SHA, { journalSocket: null, file, fd: fs.openSync('/dev/null', 'w'), log: (l) => log.push(l) });
  const a = audit.record({ op: 'create-tap', decision: 'grant', rule: 'lab', caller: ALICE, message: 'after' });
  const b = audit.record({ op: 'release', decision: 'release', rule: 'lab', caller: ALICE, message: 'then' });
  audit.close();
  const lines = fs.readFileSync(file, 'utf8').split('\n');
  t.is(lines[1], '{"audit":{"time":"2026-', 'the cut line ended where it was cut');
  const rest = lines.slice(2).filter((l) => l !== '').map((l) => (JSON.parse(l) as { audit: AuditRecord }).audit);
  t.is(rest.length, 3);
  t.like(rest[0], { op: 'audit-file', decision: 'error' });
  t.regex(rest[0]!.message ?? '', /last line of this file was cut short when the broker opened it .* records before this one may be missing/);
  t.deepEqual(rest.slice(1), [a, b], 'said once, then the records, each a line');
  t.deepEqual(log, []);
  // A file that ends a line is written on as it is.
  fs.writeFileSync(file, whole);
  const again = new Audit(() => SHA, { journalSocket: null, file, fd: fs.openSync('/dev/null', 'w') });
  const c = again.record({ op: 'create-tap', decision: 'grant', rule: 'lab', caller: ALICE, message: 'c' });
  again.close();
  t.deepEqual(jsonLines(file).slice(1), [c]);
});

// Found by an outside re-test: the unit's broker has no CAP_DAC_OVERRIDE, and an audit file it may append to but not
// read (mode 0200) made the check of its last line fail: the broker did not start, and a reload after a rotation
// to such a file failed as a whole. Such a file is taken as whole. Run without CAP_DAC_OVERRIDE/READ_SEARCH, as the
// unit runs the broker.
test('an audit file the broker may append to but not read: opened, and opened again, as a whole one', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-audit-wo-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'audit.jsonl');
  fs.writeFileSync(file, '{"audit":{"op":"x"}}\n', { mode: 0o200 });
  fs.chmodSync(file, 0o200);
  const child = `
    import fs from 'node:fs';
    import { Audit } from '@tapbroker/broker/internal';
    const file = process.argv[1];
    const log = [];
    const audit = new Audit(() => 'a'.repeat(64), { journalSocket: null, fd: fs.openSync('/dev/null', 'w'), file,
      log: (l) => log.push(l) });
    audit.record({ op: 'create-tap', decision: 'grant', rule: 'lab', caller: { uid: 1000 }, message: 'one' });
    fs.renameSync(file, file + '.1');
    fs.writeFileSync(file, '{"audit":{"op":"y"}}', { mode: 0o200 });
    fs.chmodSync(file, 0o200);
    audit.reopen();
    audit.record({ op: 'create-tap', decision: 'grant', rule: 'lab', caller: { uid: 1000 }, message: 'two' });
    audit.close();
    let readable = true;
    try { fs.readFileSync(file); } catch { readable = false; }
    console.log(JSON.stringify({ log, readable }));`;
  const r = spawnSync('setpriv', ['--inh-caps', '-dac_override,-dac_read_search', '--bounding-set',
    '-dac_override,-dac_read_search', process.execPath, '--input-type=module', '-e', child, file],
  { cwd: REPO, encoding: 'utf8' });
  t.is(r.status, 0, r.stderr);
  const out = JSON.parse(r.stdout) as { log: string[]; readable: boolean };
  t.false(out.readable, 'the child could not read the file: the case is real');
  t.true(out.log.some((l) => /opened again \(a new file/.test(l)), out.log.join('\n'));
  t.false(out.log.some((l) => /cannot open it again/.test(l)), out.log.join('\n'));
  t.regex(fs.readFileSync(`${file}.1`, 'utf8'), /^\{"audit":\{"op":"x"\}\}\n\{"audit":\{"time":.*"message":"one"\}\}\n$/);
  t.regex(fs.readFileSync(file, 'utf8'), /^\{"audit":\{"op":"y"\}\}\{"audit":\{"time":.*"message":"two"\}\}\n$/,
    'unread, the unfinished line was not seen (and not ended): the cost of a file the broker cannot read');
});
