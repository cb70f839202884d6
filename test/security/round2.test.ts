// The second outside review's findings, each as its attack: hostile local users (uid 65534 and 64000
// with a rule, 64002 with none) against a real broker in a fresh namespace. Each test failed on the
// code before its fix; the finding it guards is in its title (issue 9 = A, issue 10 = B).
import anyTest, { type ExecutionContext, type TestFn } from 'ava';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  MAX_REPLY_BYTES, PROTOCOL_VERSION, SeqpacketConnection, decodeReply, encodeFrame, sys,
} from '@tapbroker/protocol';
import { BROKER_VERSION } from '@tapbroker/broker';
import { Subuids, runPolicyTests, type AuditRecord } from '@tapbroker/broker/internal';
import { BrokerProcess, CLIENT_CLI, ROOT, tempDir } from '../helpers/broker.js';
import { Netns, tunNode } from '../helpers/netns.js';
import { Peer } from '../helpers/seqpeer.js';
import { NOBODY, OTHER_UID, probe, probeOnce, setprivArgs } from '../helpers/unpriv.js';
import { quiet, until, within } from '../helpers/wait.js';

const test = anyTest as TestFn;
const HERE = path.dirname(fileURLToPath(import.meta.url));
const LINGER = path.join(HERE, '../helpers/linger.js');
const OPEN_TAP = path.join(HERE, '../helpers/open-tap.js');
/** A local user no rule names. */
const STRANGER = 64002;
const GROUP = 4242;

const POLICY = `
[network.lab]
bridge = "br0"

[network.side]
bridge = "br1"

[[rule]]
name = "r2"
users = [0, ${NOBODY}, ${OTHER_UID}]
bridges = ["br0", "br1"]
networks = ["lab", "side"]
macvtap = [{ parent = "vparent" }]
persistent = true
max_queues = 4
max_devices = 400

[[deny]]
name = "not-br1"
users = ["*"]
bridges = ["br1"]
`;
const BASE = ['br0', 'br1', 'vparent', 'vpeer'];

let ns: Netns;
let broker: BrokerProcess;
let dir: string;
const children = new Set<ChildProcess>();

test.before(async () => {
  ns = Netns.create('r2');
  ns.bridge('br0');
  ns.bridge('br1');
  ns.ip('link', 'add', 'vparent', 'type', 'veth', 'peer', 'name', 'vpeer');
  ns.ip('link', 'set', 'vparent', 'up');
  ns.ip('link', 'set', 'vpeer', 'up');
  dir = tempDir('r2');
  broker = await BrokerProcess.start(ns, POLICY, { tag: 'r2' });
});

test.after.always(async () => {
  for (const c of children) c.kill('SIGKILL');
  await broker?.stop();
  ns?.destroy();
  fs.rmSync(dir, { recursive: true, force: true });
});

/** A program run as `uid` inside the test's namespace, held until released. */
function inNs(uid: number, script: string, args: string[]): { child: ChildProcess; line: Promise<Record<string, unknown>> } {
  const child = spawn('ip', ['netns', 'exec', ns.name, 'setpriv', ...setprivArgs({ uid }), process.execPath, script, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
  children.add(child);
  child.on('exit', () => children.delete(child));
  let out = '';
  let err = '';
  child.stderr!.on('data', (d) => (err += d));
  const line = new Promise<Record<string, unknown>>((resolve, reject) => {
    child.stdout!.on('data', (d) => {
      out += d;
      if (out.includes('\n')) resolve(JSON.parse(out.slice(0, out.indexOf('\n'))) as Record<string, unknown>);
    });
    child.on('exit', (code) => reject(new Error(`${path.basename(script)} exited ${code}: ${err}`)));
  });
  return { child, line };
}

/** A victim's grant and a fresh hello, each within `ms`: the broker still serves everyone else. */
async function serves(t: ExecutionContext, b: BrokerProcess, ms = 8000): Promise<void> {
  const started = Date.now();
  const got = await within(probeOnce({ socket: b.socket, requests: [{ bridge: 'br0' }] }, { uid: OTHER_UID }), ms);
  const r = got === 'timeout' ? null : got;
  t.truthy(r, `a victim's grant did not complete within ${ms} ms`);
  t.is(r?.error ?? null, null, r?.error?.message);
  t.log(`a victim's grant meanwhile: ${Date.now() - started} ms`);
}

/** What each of a process's fds is (`socket:[inode]`, `/dev/null`, …). */
function fdTargets(pid: number): string[] {
  const dir = `/proc/${pid}/fd`;
  return fs.readdirSync(dir).map((f) => { try { return fs.readlinkSync(`${dir}/${f}`); } catch { return '?'; } });
}

/** The broker's fds that are TCP sockets (an attacker's lingering ones) or copies of `pushed`. */
function foreignHeld(pid: number, pushed: string): string[] {
  const tcp = new Set(fs.readFileSync(`/proc/${pid}/net/tcp`, 'utf8').split('\n').slice(1)
    .map((l) => l.trim().split(/\s+/)[9]).filter(Boolean).map((i) => `socket:[${i}]`));
  return fdTargets(pid).filter((x) => tcp.has(x) || x === pushed);
}

/** A file whose copies a test pushes at the broker, so any it kept can be told from its own. */
function pushedFile(): string {
  const f = path.join(dir, 'pushed');
  fs.writeFileSync(f, '', { mode: 0o644 });
  return f;
}

const records = (b: BrokerProcess, pred: (r: AuditRecord) => boolean) => b.records.filter(pred);

// ---------------------------------------------------------------- A1: fds pushed at the broker

test.serial('A1: fds pushed at the broker are refused by its socket (EPERM); a lingering socket never reaches it', async (t) => {
  const a = inNs(STRANGER, LINGER, [broker.socket, '4', '16', 'hello']);
  try {
    const out = await a.line;
    t.is(out['hello'], 'hello', 'no rule is needed to say hello');
    t.is(out['sent'], 'EPERM', 'the kernel refused the fds at the broker\'s socket');
    await serves(t, broker);
  } finally {
    a.child.kill('SIGKILL');
  }
});

test.serial('A1 (kernels without SO_PASSRIGHTS): 16 fds then 4 lingering TCP sockets in one packet; the broker serves on', async (t) => {
  const fb = await BrokerProcess.start(ns, POLICY, { tag: 'r2fb', fdFallback: true });
  try {
    const pushed = pushedFile();
    const a = inNs(STRANGER, LINGER, [fb.socket, '4', '16', 'hello', pushed]);
    try {
      const out = await a.line;
      t.is(out['sent'], 'ok');
      t.is(out['reply'], 'TB_E_UNEXPECTED_FDS');
      // The lingering sockets now block whoever closes them last: never the broker's loop or pool.
      await serves(t, fb);
      await serves(t, fb);
      // It holds none of the pushed fds: no TCP socket, no copy of /dev/null beyond its own.
      const held = () => foreignHeld(fb.proc.pid!, pushed);
      await fb.waitFor(() => held().length === 0, 3000, `the broker still holds ${held().join(', ')}`);
      await fb.record((r) => r.code === 'TB_E_UNEXPECTED_FDS' && r.uid === STRANGER);
      await fb.waitFor(() => /fd closer stuck/.test(fb.stderr), 6000, 'the stuck closer was not replaced');
    } finally {
      a.child.kill('SIGKILL');
    }
    t.true(fb.alive);
  } finally {
    await fb.stop();
  }
});

// Found by an outside review: the closer closed one fd after another, so one user's taps (each last close
// ~20 ms of teardown) or a lingering socket kept every other user's closed tap alive, and counted against
// its quota, behind them. Its closes now run side by side: a close that blocks holds up no other.
test.serial('A1 (kernels without SO_PASSRIGHTS): a close blocked in the closer holds up no other user\'s tap', async (t) => {
  const fb = await BrokerProcess.start(ns, POLICY, { tag: 'r2fb3', fdFallback: true });
  try {
    const a = inNs(STRANGER, LINGER, [fb.socket, '4', '0', 'hello']);
    try {
      t.is((await a.line)['reply'], 'TB_E_UNEXPECTED_FDS');
      // The lingering sockets are in the closer now, blocking its close for 30 s (until it is replaced).
      const r = await probeOnce({ socket: fb.socket, requests: [{ bridge: 'br0' }] }, { uid: OTHER_UID });
      t.is(r.error, null, r.error?.message);
      const name = r.taps[0]!.device.name;
      // Its client has exited: the broker's copy, in the closer, is the tap's last fd.
      await fb.waitFor(() => !ns.link(name) || /fd closer stuck/.test(fb.stderr), 8000, 'neither happened');
      t.is(ns.link(name), undefined, 'the tap went before the stuck closer was replaced');
      t.notRegex(fb.stderr, /fd closer stuck/, 'and not because the stuck closer was replaced');
    } finally {
      a.child.kill('SIGKILL');
    }
  } finally {
    await fb.stop();
  }
});

// Found by an outside re-test: the kernel runs a file's flush at every close(), not only the last, and a user's
// own FUSE server (in a user and mount namespace of its own) can hold a flush for ever: the broker's close of
// its copy of one pushed fd froze it for everyone. No pushed fd enters the broker any more.
const FUSE_HOLD = path.join(HERE, '../../helpers/fuse-hold.py');
const fuseWhy = !fs.existsSync('/dev/fuse') ? '/dev/fuse does not exist here'
  : spawnSync('python3', ['-c', '0']).status !== 0 ? 'python3 is not installed'
    : spawnSync('setpriv', [...setprivArgs({ uid: STRANGER }), 'unshare', '-Urm', 'true']).status !== 0
      ? 'unprivileged users cannot make a user namespace here' : null;
if (fuseWhy) console.log(`# skip the FUSE flush attack: ${fuseWhy}`);

/** Kills a FUSE attacker's process group (its server first of all), then stops the broker and removes `mnt`. */
async function endFuse(a: ChildProcess, fb: BrokerProcess, mnt: string): Promise<void> {
  try {
    process.kill(-a.pid!, 'SIGKILL');
  } catch {
    // Gone.
  }
  await fb.stop();
  fs.rmSync(mnt, { recursive: true, force: true });
}
(fuseWhy ? test.serial.skip : test.serial)('A1 (kernels without SO_PASSRIGHTS): a pushed fd whose flush never returns (a FUSE file of the user\'s) stalls no one', async (t) => {
  const fb = await BrokerProcess.start(ns, POLICY, { tag: 'r2fuse', fdFallback: true });
  const mnt = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-fuse-'));
  fs.chmodSync(mnt, 0o777);
  const a = spawn('ip', ['netns', 'exec', ns.name, 'setpriv', ...setprivArgs({ uid: STRANGER }), 'unshare', '-Urm',
    'python3', FUSE_HOLD, `${mnt}/m`, process.execPath, LINGER, fb.socket, '0', '1', 'hello', `${mnt}/m/f`],
  { stdio: ['pipe', 'pipe', 'pipe'], detached: true });
  try {
    const line = await new Promise<string>((resolve, reject) => {
      let out = '';
      let err = '';
      a.stderr!.on('data', (d) => (err += d));
      a.stdout!.on('data', (d) => {
        out += d;
        if (out.includes('\n')) resolve(out.slice(0, out.indexOf('\n')));
      });
      a.on('exit', (code) => reject(new Error(`the attacker exited ${code}: ${err}`)));
    });
    const got = JSON.parse(line) as Record<string, unknown>;
    t.is(got['sent'], 'ok');
    t.is(got['reply'], 'TB_E_UNEXPECTED_FDS');
    await serves(t, fb);
    await serves(t, fb);
    await fb.record((r) => r.code === 'TB_E_UNEXPECTED_FDS' && r.uid === STRANGER);
  } finally {
    // The FUSE server goes first: whoever waits on its flush (the attacker itself, or a broker that took the
    // fd in) is released.
    await endFuse(a, fb, mnt);
  }
});

// Found by an outside re-test: a user's FUSE file whose last release waits on a write its server never answers
// (writeback cache) wedges a closer in D state, beyond SIGKILL; after four, no closer was started, and every
// connection that pushed an fd stayed open in the broker, one fd each, without bound (EMFILE in the end: no
// one served). Now they wait in bins, a few fds whatever their number.
const WEDGE = path.join(HERE, '../../helpers/wedge.py');
(fuseWhy ? test.serial.skip : test.serial)('A1 (kernels without SO_PASSRIGHTS): closers wedged for good by a user\'s FUSE writes; its flood costs the broker no fd per connection, nor its stop', async (t) => {
  const fb = await BrokerProcess.start(ns, POLICY, { tag: 'r2wedge', fdFallback: true });
  const mnt = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-fusewb-'));
  fs.chmodSync(mnt, 0o777);
  const a = spawn('ip', ['netns', 'exec', ns.name, 'setpriv', ...setprivArgs({ uid: STRANGER }), 'unshare', '-Urm',
    'python3', FUSE_HOLD, '--write', `${mnt}/m`, 'python3', WEDGE, fb.socket, `${mnt}/m`, '5', '400', `${mnt}/go`],
  { stdio: ['pipe', 'pipe', 'pipe'], detached: true });
  const lines: Record<string, unknown>[] = [];
  let err = '';
  let out = '';
  a.stderr!.on('data', (d) => (err += d));
  a.stdout!.on('data', (d) => {
    out += d;
    for (let i = out.indexOf('\n'); i >= 0; i = out.indexOf('\n')) {
      lines.push(JSON.parse(out.slice(0, i)) as Record<string, unknown>);
      out = out.slice(i + 1);
    }
  });
  const phase = (name: string) => until(() => lines.find((l) => l['phase'] === name),
    { ms: 40_000, what: `the attacker's phase ${name} (stderr: ${err})` });
  const fds = () => fs.readdirSync(`/proc/${fb.proc.pid}/fd`).length;
  try {
    t.like(await phase('wedged'), { refused: 5 });
    const stuck = () => (fb.stderr.match(/fd closer stuck/g) ?? []).length;
    await fb.waitFor(() => stuck() >= 4, 5000, 'fewer than four closers found stuck');
    await serves(t, fb);
    const before = fds();
    fs.writeFileSync(`${mnt}/go`, '');
    t.like(await phase('flooded'), { pushed: 400 });
    await serves(t, fb);
    await fb.waitFor(() => fds() < before + 16, 3000, `the broker holds ${fds() - before} more fds than before the flood`);
    t.log(`broker fds before the flood of 400 connections ${before}, after ${fds()}; closers found stuck: ${stuck()}`);
    t.true(fb.alive);
    // A connection with a dirty file of the user's queued in it, in a bin: the broker's stop hands the bins to
    // a closer (one is started past the cap), never releasing it in its own exit.
    fs.writeFileSync(`${mnt}/go2`, '');
    t.like(await phase('binned'), { refused: true });
    // In a bin once the kernel counts it there: the fds queued in the broker's sockets (its bins) number the
    // flood's 400 and this one.
    const queued = () => fs.readdirSync(`/proc/${fb.proc.pid}/fdinfo`).reduce((n, fd) => {
      try {
        return n + Number(/^scm_fds:\s*(\d+)/m.exec(fs.readFileSync(`/proc/${fb.proc.pid}/fdinfo/${fd}`, 'utf8'))?.[1] ?? 0);
      } catch {
        return n;
      }
    }, 0);
    await fb.waitFor(() => queued() >= 401, 3000, `not in a bin: ${queued()} fds queued in the broker's sockets`);
    const stopping = Date.now();
    fb.proc.kill('SIGTERM');
    await fb.waitFor(() => !fb.alive, 10_000, 'the broker did not exit within 10 s of SIGTERM, the FUSE server alive');
    t.log(`the broker exited ${Date.now() - stopping} ms after SIGTERM`);
  } finally {
    // The FUSE server first: its /dev/fuse closing aborts the connection, which frees the wedged closers.
    await endFuse(a, fb, mnt);
  }
});

// Found by an outside re-test: at its stop the broker closed its listening socket itself, and with it the
// connections it had not accepted yet, whose queued fds were then released in its thread: a lingering socket
// among them kept it from exiting for the linger time. The broker is stopped (SIGSTOP) here to keep them
// queued: a connect flood does the same (16 accepts per turn of its loop).
const BACKLOG = path.join(HERE, '../../helpers/backlog.py');
// The system's: a python3 earlier in root's PATH may sit where the attacker's uid cannot reach it.
const PYTHON3 = ['/usr/bin/python3', '/bin/python3'].find((p) => fs.existsSync(p)) ?? 'python3';
test.serial('A1 (kernels without SO_PASSRIGHTS): fds queued in connections not accepted yet do not hold up the broker\'s stop', async (t) => {
  const fb = await BrokerProcess.start(ns, POLICY, { tag: 'r2backlog', fdFallback: true });
  let a: ReturnType<typeof spawn> | null = null;
  try {
    await serves(t, fb);
    fb.proc.kill('SIGSTOP');
    a = spawn('ip', ['netns', 'exec', ns.name, 'setpriv', ...setprivArgs({ uid: STRANGER }), PYTHON3, BACKLOG,
      fb.socket, '400', '100'], { stdio: ['pipe', 'pipe', 'inherit'] });
    let out = '';
    a.stdout!.on('data', (d) => (out += d));
    await until(() => /queued (\d+)/.exec(out), { ms: 10_000, what: 'the connections were not queued' });
    t.log(out.trim());
    const started = Date.now();
    fb.proc.kill('SIGTERM');
    fb.proc.kill('SIGCONT');
    await fb.waitFor(() => !fb.alive, 10_000, 'the broker did not exit within 10 s of SIGTERM');
    t.log(`the broker exited ${Date.now() - started} ms after SIGTERM`);
  } finally {
    fb.proc.kill('SIGCONT');
    a?.kill('SIGKILL');
    await fb.stop('SIGKILL');
  }
});

test.serial('A1 (kernels without SO_PASSRIGHTS): fds queued behind a frame refused before hello; the close never releases them in the broker', async (t) => {
  const fb = await BrokerProcess.start(ns, POLICY, { tag: 'r2fb2', fdFallback: true });
  try {
    const a = inNs(STRANGER, LINGER, [fb.socket, '2', '0', 'behind']);
    try {
      const out = await a.line;
      t.is(out['sent'], 'ok');
      t.is(out['reply'], 'TB_E_HELLO_REQUIRED');
      await serves(t, fb);
      await fb.record((r) => r.code === 'TB_E_HELLO_REQUIRED' && r.uid === STRANGER);
    } finally {
      a.child.kill('SIGKILL');
    }
  } finally {
    await fb.stop();
  }
});

// Found by an outside re-test: an empty packet (which the broker takes for the end of the connection) ended
// the read-off of fd-free packets as if the queue were empty, and the broker closed the socket itself, with
// the lingering sockets queued behind it: their last close ran in the broker for the linger time (30 s here).
test.serial('A1 (kernels without SO_PASSRIGHTS): fds queued behind an empty packet are never released in the broker', async (t) => {
  const fb = await BrokerProcess.start(ns, POLICY, { tag: 'r2fb4', fdFallback: true });
  try {
    const pushed = pushedFile();
    const a = inNs(STRANGER, LINGER, [fb.socket, '2', '4', 'empty', pushed]);
    try {
      const out = await a.line;
      t.is(out['sent'], 'ok');
      t.is(out['hello'], 'hello');
      t.log(`the client read: ${JSON.stringify(out)}`);
      await serves(t, fb);
      await serves(t, fb);
      const held = () => foreignHeld(fb.proc.pid!, pushed);
      await fb.waitFor(() => held().length === 0, 3000, `the broker still holds ${held().join(', ')}`);
    } finally {
      a.child.kill('SIGKILL');
    }
    t.true(fb.alive);
  } finally {
    await fb.stop();
  }
});

// Found by an outside review: the closer was spawned without the broker's node flags, and under the unit's
// MemoryDenyWriteExecute= (which children inherit) node aborts at start without --jitless: the pushed fds went
// with a dying process, and the stuck-closer logic never ran. Here the broker runs as the unit runs it:
// node --jitless --no-expose-wasm under PR_SET_MDWE (the prctl behind MemoryDenyWriteExecute=, Linux 6.3).
const MDWE_C = `#include <stdio.h>
#include <sys/prctl.h>
#include <unistd.h>
int main(int argc, char **argv) {
  if (argc < 2 || prctl(65 /* PR_SET_MDWE */, 1 /* PR_MDWE_REFUSE_EXEC_GAIN */, 0, 0, 0) != 0) { perror("prctl"); return 111; }
  execv(argv[1], argv + 1);
  perror("execv");
  return 111;
}
`;

/** The wrapper, built once here, or why it cannot be. */
const mdwe = ((): { bin: string } | { why: string } => {
  const where = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-mdwe-'));
  process.on('exit', () => fs.rmSync(where, { recursive: true, force: true }));
  const bin = path.join(where, 'mdwe');
  fs.writeFileSync(`${bin}.c`, MDWE_C);
  if (spawnSync('cc', ['-O', '-o', bin, `${bin}.c`]).status !== 0) return { why: 'no C compiler (cc)' };
  fs.chmodSync(where, 0o755);
  if (spawnSync(bin, ['/bin/true']).status !== 0) return { why: 'this kernel has no PR_SET_MDWE (Linux 6.3)' };
  return { bin };
})();
if ('why' in mdwe) console.log(`# skip the closer under MemoryDenyWriteExecute: ${mdwe.why}`);

('bin' in mdwe ? test.serial : test.serial.skip)('A1 (kernels without SO_PASSRIGHTS), as the unit runs the broker: its fd closer runs with its node flags', async (t) => {
  const wrap = (mdwe as { bin: string }).bin;
  const fb = await BrokerProcess.start(ns, POLICY, { tag: 'r2mdwe', fdFallback: true, wrap: [wrap], nodeArgs: ['--jitless', '--no-expose-wasm'] });
  try {
    const pushed = pushedFile();
    const a = inNs(STRANGER, LINGER, [fb.socket, '0', '16', 'hello', pushed]);
    try {
      const out = await a.line;
      t.is(out['reply'], 'TB_E_UNEXPECTED_FDS');
      await fb.waitFor(() => foreignHeld(fb.proc.pid!, pushed).length === 0, 3000, 'the broker still holds pushed fds');
      const closers = () => fs.readFileSync(`/proc/${fb.proc.pid}/task/${fb.proc.pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean)
        .map((pid) => {
          try {
            return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
          } catch {
            return []; // Gone meanwhile.
          }
        });
      // One look, kept: a closer that is exiting (it goes when idle) reads as an empty command line.
      let seen: string[] = [];
      await fb.waitFor(() => {
        const c = closers();
        if (c.length === 1 && c[0]!.length > 1) seen = c[0]!;
        return seen.length > 0;
      }, 3000, 'no closer process runs');
      t.true(seen.includes('--jitless'), `the closer runs as ${seen.join(' ')}`);
      await serves(t, fb);
      t.notRegex(fb.stderr, /Check failed|fd closer (stuck|exited)/);
    } finally {
      a.child.kill('SIGKILL');
    }
  } finally {
    await fb.stop();
  }
});

test.serial('A1: the broker\'s own copies of the fds it sends go to its closer process, which goes when idle', async (t) => {
  // Found by an outside review: the broker closed its copies of a reply's fds on its thread pool, and a client
  // shares them: closing its own first leaves the broker's the last close (~20 ms for a tap), and a vhost-net fd
  // whose worker (a thread of the client) is stopped blocks that close for as long as the client likes, four
  // such and the pool (every deletion) is wedged. Now they go to the closer, like fds pushed at the broker.
  // It stays 30 s without work as shipped (a new one costs a node start); 1 s here, so that the test sees it go.
  const b = await BrokerProcess.start(ns, POLICY, { tag: 'r2closer', closerIdleMs: 1000 });
  try {
    const closers = () => fs.readFileSync(`/proc/${b.proc.pid}/task/${b.proc.pid}/children`, 'utf8').trim().split(/\s+/)
      .filter(Boolean).map((pid) => fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8'));
    t.deepEqual(closers(), [], 'no closer before there is anything to close');
    const base = b.fdCount();
    const p = await probe({ socket: b.socket, requests: [{ bridge: 'br0', queues: 2 }] });
    t.is(p.result.error, null, p.result.error?.message);
    await b.waitFor(() => closers().some((c) => c.includes('closer.js')), 3000, 'the reply\'s fds did not go to a closer');
    await p.release();
    // Idle, it goes, and nothing of it stays in the broker.
    await b.waitFor(() => closers().length === 0 && b.fdCount() === base, 5000, `closers ${closers().length}, fds ${b.fdCount()} (${base} before)`);
    await serves(t, b);
  } finally {
    await b.stop();
  }
});

// ---------------------------------------------------------------- B1, B3, B12: who can reach a device

const openAs = (uid: number, name: string, opts: { mq?: boolean; hold?: boolean; persist?: boolean } = {}) =>
  inNs(uid, OPEN_TAP, [name, opts.mq ? 'mq' : '-', tunNode(dir), ...(opts.hold ? ['hold'] : opts.persist ? ['persist'] : [])]);

test.serial('B1: a uid in no rule cannot attach a queue to another user\'s multiqueue tap', async (t) => {
  const victim = await probe({ socket: broker.socket, requests: [{ bridge: 'br0', queues: 2 }] });
  try {
    t.is(victim.result.error, null, victim.result.error?.message);
    const name = victim.result.taps[0]!.device.name;
    const a = openAs(STRANGER, name, { mq: true });
    t.deepEqual(await a.line, { ok: false, code: 'EPERM' }, 'the tap belongs to the broker (TUNSETOWNER), not to anyone who asks');
    const self = openAs(NOBODY, name, { mq: true });
    t.deepEqual(await self.line, { ok: false, code: 'EPERM' }, 'nor can its holder add queues beyond its rule\'s');
  } finally {
    await victim.release();
  }
});

test.serial('B1: a holder that makes itself its tap\'s owner (TUNSETOWNER) loses the tap at once', async (t) => {
  const p = await probe({ socket: broker.socket, requests: [{ bridge: 'br0', queues: 2 }], ownOwnFds: true });
  try {
    const name = p.result.taps[0]!.device.name;
    await broker.waitFor(() => ns.link(name) === undefined, 2000, `${name} survived its owner change`);
    const rec = await broker.record((r) => r.decision === 'cleanup' && /changed its owner/.test(r.message ?? ''));
    t.is((rec.device as { name?: string }).name, name, 'the cleanup names the tap');
  } finally {
    await p.release();
  }
});

test.serial('B1: a holder that makes itself owner, attaches a queue and gives the owner back loses the tap', async (t) => {
  // Found by an outside review: the broker judged the device as it was when it read the event (root's again),
  // so the holder kept a tap with more queues than its rule's max_queues (and could hand queues to anyone).
  const p = await probe({ socket: broker.socket, requests: [{ bridge: 'br0', queues: 2 }], flipOwner: true, tun: tunNode(dir) });
  try {
    t.is(p.result.error, null, p.result.error?.message);
    const name = p.result.taps[0]!.device.name;
    await broker.waitFor(() => ns.link(name) === undefined, 2000, `${name} survived its owner flip`);
    const rec = await broker.record((r) => r.decision === 'cleanup' && (r.device as { name?: string }).name === name);
    t.regex(rec.message ?? '', /changed its owner or group/);
  } finally {
    await p.release();
  }
});

test.serial('B3: a queue attached in the window before the owner is set: the device is destroyed, never handed out', async (t) => {
  const gate = path.join(dir, 'gate');
  const b = await BrokerProcess.start(ns, POLICY, { tag: 'r2race', fault: `tap:opened=wait:${gate}` });
  let attacker: ReturnType<typeof openAs> | null = null;
  try {
    const name = `tb${NOBODY}-race`;
    const asked = probeOnce({ socket: b.socket, requests: [{ bridge: 'br0', persistent: true, queues: 2, name }] });
    await b.waitFor(() => fs.existsSync(`${gate}.reached`), 5000, 'the broker never reached tap:opened');
    // The racing attacker: the tap exists, owner-less, multiqueue. It attaches a queue and keeps it.
    attacker = openAs(STRANGER, name, { mq: true, hold: true });
    t.deepEqual(await attacker.line, { ok: true }, 'the attacker won the window');
    fs.writeFileSync(gate, '');
    const r = await asked;
    t.is(r.error?.code, 'TB_E_KERNEL', 'the device with a foreign queue is not handed out');
    t.regex(r.error?.message ?? '', /attached by another process/);
    await b.waitFor(() => ns.link(name) === undefined, 3000, `${name} with the attacker's queue survived`);
    // Without a name of its own choosing, the broker simply takes another.
    const again = await probeOnce({ socket: b.socket, requests: [{ bridge: 'br0', queues: 2 }] });
    t.is(again.error, null);
  } finally {
    attacker?.child.kill('SIGKILL');
    await b.stop();
    fs.rmSync(gate, { force: true });
    fs.rmSync(`${gate}.reached`, { force: true });
  }
});

test.serial('B3: a persistent tap its caller made persist itself while the broker was making it: a failed create still deletes it', async (t) => {
  // Found by an outside code review: a persistent tap is its caller's from TUNSETIFF on, and its caller can attach a
  // queue and set TUNSETPERSIST itself; a step failing after that (a MAC another locked port holds) only closed the
  // broker's fd, and the tap lived on without a lease: outside the quota, its port lock and its MAC unjudged.
  const gate = path.join(dir, 'gate-persist');
  const b = await BrokerProcess.start(ns, POLICY, { tag: 'r2persist', fault: `tap:configured=wait:${gate}` });
  try {
    const name = `tb${NOBODY}-pst`;
    const asked = probeOnce({ socket: b.socket, requests: [{ bridge: 'br0', persistent: true, queues: 2, name }] });
    await b.waitFor(() => fs.existsSync(`${gate}.reached`), 5000, 'the broker never reached tap:configured');
    const owner = openAs(NOBODY, name, { mq: true, persist: true });
    t.deepEqual(await owner.line, { ok: true }, 'its owner attached a queue and made it persist');
    // Written whole before the gate exists (the broker opens it as soon as the file is there).
    fs.writeFileSync(`${gate}.tmp`, 'throw');
    fs.renameSync(`${gate}.tmp`, gate);
    const r = await asked;
    t.is(r.error?.code, 'TB_E_KERNEL');
    await b.waitFor(() => ns.link(name) === undefined, 3000, `${name} outlived its failed create`);
    await b.record((rec) => rec.decision === 'cleanup' && (rec.device as { name?: string }).name === name
      && /a persistent tap whose create failed: deleted/.test(rec.message ?? ''));
  } finally {
    await b.stop();
    if (ns.link(`tb${NOBODY}-pst`)) ns.ip('link', 'del', `tb${NOBODY}-pst`);
    fs.rmSync(gate, { force: true });
    fs.rmSync(`${gate}.reached`, { force: true });
  }
});

test.serial('B12: a persistent tap given to a group: any member may open it, not only its creator', async (t) => {
  const made = await probeOnce({ socket: broker.socket, requests: [{ bridge: 'br0', persistent: true, group: GROUP }] }, { uid: NOBODY, groups: [GROUP] });
  t.is(made.error, null, made.error?.message);
  const name = made.taps[0]!.device.name;
  try {
    const link = ns.link(name)!;
    t.is(String(link.linkinfo?.info_data?.['group']), String(GROUP));
    t.falsy(link.linkinfo?.info_data?.['user'], 'no owner: the driver would demand owner and group both');
    const outsider = inNs(OTHER_UID, OPEN_TAP, [name, '-', tunNode(dir)]);
    t.deepEqual(await outsider.line, { ok: false, code: 'EPERM' }, 'not a member: refused');
    const cmd = spawnSync('ip', ['netns', 'exec', ns.name, 'setpriv', ...setprivArgs({ uid: OTHER_UID, groups: [GROUP] }), process.execPath, OPEN_TAP, name, '-', tunNode(dir)], { encoding: 'utf8' });
    t.deepEqual(JSON.parse(cmd.stdout) as unknown, { ok: true }, 'another member of the group opens it');
  } finally {
    await probeOnce({ socket: broker.socket, release: [name] });
  }
});

// Found by an outside review: a member of the group a persistent tap was given to flooded link events through
// it, and the record said the owner's devices flooded. The record now says only what the broker knows; the
// owner is still charged (a re-test showed that an owner not charged for its group's taps floods through a
// group of its own freely).
test.serial('B12: a flood through a tap given to a group takes the tap; its record does not blame one holder, and the owner waits', async (t) => {
  const made = await probeOnce({ socket: broker.socket, requests: [{ bridge: 'br0', persistent: true, group: GROUP }] }, { uid: NOBODY, groups: [GROUP] });
  t.is(made.error, null, made.error?.message);
  const name = made.taps[0]!.device.name;
  try {
    // On a loaded machine one burst may be spread over more than a second (or overrun the broker's queue of events,
    // which is then read afresh, uncounted): the member floods again, up to five times, until its tap goes.
    for (let i = 0; i < 5 && ns.link(name) !== undefined; i++) {
      const member = spawnSync('ip', ['netns', 'exec', ns.name, 'setpriv', ...setprivArgs({ uid: OTHER_UID, groups: [GROUP] }), process.execPath, OPEN_TAP, name, '-', tunNode(dir), 'flood'], { encoding: 'utf8' });
      if (i === 0) t.deepEqual(JSON.parse(member.stdout) as unknown, { ok: true }, member.stderr);
      await until(() => ns.link(name) === undefined || null, { ms: 2000, what: 'gone' }).catch(() => null);
    }
    await broker.waitFor(() => ns.link(name) === undefined, 1000, `${name} survived its flood`);
    const rec = await broker.record((r) => r.decision === 'cleanup' && (r.device as { name?: string } | undefined)?.name === name);
    t.regex(rec.message ?? '', new RegExp(`^a holder \\(its owner or a member of group ${GROUP}, which it was given to\\) made it send more than 500 link events`));
    const again = await probeOnce({ socket: broker.socket, requests: [{ bridge: 'br0' }] });
    t.is(again.error?.code, 'TB_E_BUSY', 'its owner\'s next device waits out the cool-down');
    await quiet(1100, 'the 1 s cool-down');
  } finally {
    await probeOnce({ socket: broker.socket, release: [name] });
  }
});

// ---------------------------------------------------------------- A8, A10: what the link monitor believes

test.serial('A8: a port leaving its bridge is not the device vanishing', async (t) => {
  const p = await probe({ socket: broker.socket, requests: [{ bridge: 'br0' }] });
  try {
    const name = p.result.taps[0]!.device.name;
    ns.ip('link', 'set', name, 'nomaster');
    // The change's link events are queued before `ip` returns: once the broker has read them, it has judged them.
    await broker.waitFor(() => broker.linkEventsUnread() === 0, 3000, 'the broker did not read the link events');
    const listed = await probeOnce({ socket: broker.socket, list: true });
    t.truthy(listed.leases!.find((l) => l.name === name), 'the lease is still there');
    t.deepEqual(records(broker, (r) => r.decision === 'cleanup' && (r.device as { name?: string } | undefined)?.name === name), [], 'no false cleanup record');
  } finally {
    await p.release();
  }
});

test.serial('A10: a holder that changes its tap\'s MAC (SIOCSIFHWADDR on its fd) loses the tap; the bridge keeps its address', async (t) => {
  const before = ns.link('br0')!.address;
  const p = await probe({ socket: broker.socket, requests: [{ bridge: 'br0' }], setOwnMac: '02:00:00:00:00:01' });
  try {
    const name = p.result.taps[0]!.device.name;
    await broker.waitFor(() => ns.link(name) === undefined, 2000, `${name} survived a MAC change`);
    await broker.record((r) => r.decision === 'cleanup' && /its MAC was changed to 02:00:00:00:00:01/.test(r.message ?? ''));
    t.is(ns.link('br0')!.address, before, 'the bridge address never moved');
  } finally {
    await p.release();
  }
});

test.serial('A10: a bridge whose MAC nobody pinned is refused, with how to pin it', async (t) => {
  ns.ip('link', 'add', 'brfree', 'type', 'bridge');
  try {
    const b = await BrokerProcess.start(ns, `[[rule]]\nname = "f"\nusers = [${NOBODY}]\nbridges = ["brfree"]\n`, { tag: 'r2free' });
    try {
      const r = await probeOnce({ socket: b.socket, requests: [{ bridge: 'brfree' }] });
      t.is(r.error?.code, 'TB_E_BRIDGE_ADDRESS');
      t.regex(r.error?.message ?? '', /ip link set brfree address/);
      t.deepEqual(ns.extraLinks([...BASE, 'brfree']), []);
    } finally {
      await b.stop();
    }
  } finally {
    ns.ip('link', 'del', 'brfree');
  }
});

// ---------------------------------------------------------------- A2: deny wins across names

test.serial('A2: a bridge deny holds for a network onto that bridge', async (t) => {
  const r = await probeOnce({ socket: broker.socket, requests: [{ network: 'side' }] });
  t.is(r.error?.code, 'TB_E_POLICY_DENIED');
  t.is(r.error?.rule, 'not-br1');
  t.deepEqual(ns.extraLinks(BASE), []);
});

// ---------------------------------------------------------------- A9, A6: refusals and unread replies

test.serial('A9: refusals no handler saw are audited; a flood is aggregated', async (t) => {
  const conn = await SeqpacketConnection.connect(broker.socket, { maxPacket: MAX_REPLY_BYTES });
  await conn.send(Buffer.from([0xc1, 0x00]));
  await conn.receive();
  conn.close();
  await broker.record((r) => r.code === 'TB_E_MALFORMED' && r.uid === 0);
  // 60 more from one connection: at most 20 one by one per window, the rest counted in one record.
  const flood = await SeqpacketConnection.connect(broker.socket, { maxPacket: MAX_REPLY_BYTES });
  await flood.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION }));
  await flood.receive();
  for (let i = 0; i < 60; i++) {
    await flood.send(Buffer.from([0xc1]));
    await flood.receive();
  }
  flood.close();
  const single = records(broker, (r) => r.code === 'TB_E_MALFORMED' && r.uid === 0).length;
  t.true(single <= 20, `${single} single records`);
  const agg = await broker.record((r) => r.decision === 'suppressed' && r.uid === 0, 15_000);
  t.true(((agg.request as { counts: Record<string, number> }).counts['TB_E_MALFORMED'] ?? 0) >= 40);
});

test.serial('A6: a client that does not read its replies holds one reply\'s fds at most, and waits; it keeps its connection', async (t) => {
  const conn = await SeqpacketConnection.connect(broker.socket, { maxPacket: MAX_REPLY_BYTES });
  try {
    await conn.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION }));
    await conn.receive();
    const before = ns.extraLinks(BASE).length;
    // Three requests sent ahead, no reads: each next one is handled only once the last reply is read, however late
    // (an outside review: the connection was closed after 5 s, ending the leases it held, a VM's macvtap among them).
    for (let i = 0; i < 3; i++) await conn.send(encodeFrame({ op: 'create-tap', id: 10 + i, bridge: 'br0' }));
    const fds: number[] = [];
    try {
      for (let i = 0; i < 3; i++) {
        await broker.waitFor(() => ns.extraLinks(BASE).length - before === i + 1, 3000, `request ${i} not handled`);
        await quiet(i === 0 ? 6000 : 300, 'past the old 5 s: nothing more is handled while the reply is unread');
        t.is(ns.extraLinks(BASE).length - before, i + 1, `one tap held through an unread reply after request ${i}`);
        const got = await conn.receive();
        t.truthy(got, 'the reply is there, and the connection open');
        fds.push(...got!.fds);
      }
      t.deepEqual(records(broker, (r) => r.code === 'TB_E_TIMEOUT'), [], 'no refusal recorded');
    } finally {
      for (const fd of fds) sys.close(fd);
    }
  } finally {
    conn.close();
  }
  await broker.waitFor(() => ns.extraLinks(BASE).length === 0, 3000, 'taps left');
});

test.serial('A6: a persistent create waiting behind a reply its client closed without reading is never made', async (t) => {
  // Found by a re-test: a persistent create waiting behind an unread reply was carried out after its client had
  // gone (or the broker had stopped): the device stayed, with a grant and no reply to anyone.
  const conn = await SeqpacketConnection.connect(broker.socket, { maxPacket: MAX_REPLY_BYTES });
  await conn.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION }));
  await conn.receive();
  await conn.send(encodeFrame({ op: 'status', id: 2 }));
  await conn.send(encodeFrame({ op: 'create-tap', id: 3, bridge: 'br0', persistent: true, name: 'tb0-gone' }));
  // The status reply is here, unread, and the broker has read the create (nothing of ours is left unread in its
  // queue): the create waits in the broker until the reply is read, and the client goes instead.
  await until(() => (conn.queued('in') > 0 && conn.queued('out') === 0) || null, { what: 'no status reply', ms: 5000 });
  conn.close();
  // A request after it, from another connection, is answered after the broker has seen the close.
  await until(async () => (await probeOnce({ socket: broker.socket, list: true })).leases !== null || null,
    { what: 'the broker did not answer', ms: 5000 });
  await quiet(300, 'the waiting create is dropped, not made');
  t.is(ns.link('tb0-gone'), undefined, 'never made');
  t.false(broker.records.some((r) => (r.device as { name?: string } | undefined)?.name === 'tb0-gone'), 'no record of it');
});

test.serial('A6: a persistent create whose reply its client never read before closing is undone, and says so', async (t) => {
  // Found by a re-test: a reply queued but unread when its client closed (the kernel tells the broker: ECONNRESET)
  // kept the persistent device it named, with only a grant on record.
  const conn = await SeqpacketConnection.connect(broker.socket, { maxPacket: MAX_REPLY_BYTES });
  await conn.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION }));
  await conn.receive();
  await conn.send(encodeFrame({ op: 'create-tap', id: 2, bridge: 'br0', persistent: true, name: 'tb0-unread' }));
  await until(() => conn.queued('in') > 0 || null, { what: 'no reply', ms: 5000 });
  conn.close();
  const undone = await broker.record((r) => r.decision === 'cleanup' && (r.device as { name?: string }).name === 'tb0-unread');
  t.regex(undone.message ?? '', /its client closed without reading the reply/);
  await broker.waitFor(() => ns.link('tb0-unread') === undefined, 3000, 'the persistent tap stayed');
  // The same after ending its side first (SHUT_WR), then closing (a re-test: the broker closed at the end of the
  // connection, before the client's close could say the reply went unread).
  const half = await SeqpacketConnection.connect(broker.socket, { maxPacket: MAX_REPLY_BYTES });
  await half.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION }));
  await half.receive();
  await half.send(encodeFrame({ op: 'create-tap', id: 2, bridge: 'br0', persistent: true, name: 'tb0-half' }));
  await until(() => half.queued('in') > 0 || null, { what: 'no reply', ms: 5000 });
  sys.shutdown(half.fd, 1);
  await quiet(300, 'the broker reads the end of the connection');
  half.close();
  await broker.record((r) => r.decision === 'cleanup' && (r.device as { name?: string }).name === 'tb0-half');
  await broker.waitFor(() => ns.link('tb0-half') === undefined, 3000, 'the half-closed client\'s persistent tap stayed');
  // One whose client read the reply stays.
  const name = `tb${NOBODY}-read`;
  const kept = await probeOnce({ socket: broker.socket, requests: [{ bridge: 'br0', persistent: true, name }] });
  t.is(kept.error, null, kept.error?.message);
  await quiet(300, 'nothing undoes a reply that was read');
  t.truthy(ns.link(name), 'a persistent tap whose reply was read stays');
  await probeOnce({ socket: broker.socket, release: [name] });
});

test.serial('A6: fds of replies a uid leaves unread are bounded: its next create waits until it reads them, others are served', async (t) => {
  // Unread, a reply's fds stay in flight, and the kernel charges them to root: past root's RLIMIT_NOFILE every root
  // process without CAP_SYS_RESOURCE (the broker under its unit among them) could send none (ETOOMANYREFS).
  const b = await BrokerProcess.start(ns, POLICY, { tag: 'r2inflight', maxUnreadFds: 6 });
  const hello = async () => {
    const c = await SeqpacketConnection.connect(b.socket, { maxPacket: MAX_REPLY_BYTES });
    await c.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION }));
    await c.receive();
    return c;
  };
  const first = await hello();
  const fds: number[] = [];
  try {
    await first.send(encodeFrame({ op: 'create-tap', id: 2, bridge: 'br0', queues: 4 }));
    await until(() => first.queued('in') > 0 || null, { what: 'no reply', ms: 5000 });
    // Root asks on another connection: 4 fds unread already, 4 more would pass 6.
    const second = await hello();
    try {
      await second.send(encodeFrame({ op: 'create-tap', id: 3, bridge: 'br0', queues: 4 }));
      const busy = decodeReply((await second.receive())!.data);
      t.like(busy, { op: 'error', code: 'TB_E_BUSY' });
      // Its own count only: the count of all callers' told others' VM starts (an outside review); the record has both.
      t.regex(busy.op === 'error' ? busy.message : '', /^4 fds of replies to you are still unread or on their way; this one would carry 4 more than the broker lets stay in flight for one user$/);
      t.regex((await b.record((r) => r.code === 'TB_E_BUSY')).message ?? '', /^4 fds of replies to uid 0 \(4 to all callers\)/);
      // Another uid is served meanwhile.
      const other = await probeOnce({ socket: b.socket, requests: [{ bridge: 'br0', queues: 4 }] }, { uid: NOBODY });
      t.is(other.error, null, other.error?.message);
      // Ending the connection (SHUT_WR) leaves them unread and counted (a re-test: the broker closed its end, and
      // counted them no more, while they stayed in flight).
      sys.shutdown(first.fd, 1);
      await quiet(300, 'the broker reads the end of the connection');
      await second.send(encodeFrame({ op: 'create-tap', id: 4, bridge: 'br0', queues: 4 }));
      t.like(decodeReply((await second.receive())!.data), { op: 'error', code: 'TB_E_BUSY' }, 'still counted');
      // Read: root's next create is granted.
      const got = await first.receive();
      fds.push(...got!.fds);
      await until(async () => {
        await second.send(encodeFrame({ op: 'create-tap', id: 5, bridge: 'br0', queues: 4 }));
        const again = await second.receive();
        fds.push(...again!.fds);
        return decodeReply(again!.data).op === 'create-tap' || null;
      }, { what: 'root\'s create was never granted once it had read its reply', ms: 5000, every: 100 });
      // Two creates at once on two connections: the room is reserved by the first, the second waits.
      const third = await hello();
      try {
        await Promise.all([second.send(encodeFrame({ op: 'create-tap', id: 6, bridge: 'br0', queues: 4 })),
          third.send(encodeFrame({ op: 'create-tap', id: 7, bridge: 'br0', queues: 4 }))]);
        // Both answered before either is read: whichever came second saw the first's fds on their way or unread.
        await until(() => (second.queued('in') > 0 && third.queued('in') > 0) || null, { what: 'no replies', ms: 5000 });
        const [a, b2] = await Promise.all([second.receive(), third.receive()]);
        fds.push(...a!.fds, ...b2!.fds);
        t.deepEqual([decodeReply(a!.data).op, decodeReply(b2!.data).op].sort(), ['create-tap', 'error'],
          'one create\'s 4 on their way (or unread): 4 more pass 6');
      } finally {
        third.close();
      }
    } finally {
      second.close();
    }
  } finally {
    for (const fd of fds) sys.close(fd);
    first.close();
    await b.stop();
  }
});

test.serial('A6: a client that sends requests and never reads a reply (no fds in them): the broker holds one, and still stops', async (t) => {
  // Found by an outside code review: only replies with fds were waited for; after ~340 unread status replies the
  // broker's send waited for room forever, the connection never idled out, and SIGTERM never completed.
  const b = await BrokerProcess.start(ns, POLICY, { tag: 'r2unread' });
  const conn = await SeqpacketConnection.connect(b.socket, { maxPacket: MAX_REPLY_BYTES });
  try {
    await conn.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION }));
    await conn.receive();
    // Sent, never read: the sends are queued by the connection, and fail once the broker has closed it.
    const sends = Array.from({ length: 600 }, (_, i) => conn.send(encodeFrame({ op: 'status', id: 10 + i })).catch(() => {}));
    await until(() => conn.queued('in') > 0 || null, { what: 'no reply came', ms: 5000 });
    await quiet(500, 'the broker waits for that reply to be read');
    const stopped = Date.now();
    await b.stop('SIGTERM', true);
    t.true(Date.now() - stopped < 5000, `SIGTERM took ${Date.now() - stopped} ms`);
    let replies = 0;
    for (let got = await conn.receive(); got; got = await conn.receive()) replies++;
    t.is(replies, 1, 'one reply in flight, no more');
    conn.close();
    await Promise.all(sends);
  } finally {
    conn.close();
    await b.stop();
  }
});

test.serial('F2: subordinate uids (/etc/subuid) are refused at accept: one user is not thousands of callers', async (t) => {
  // Found by an outside review: a user with a subordinate range (newuidmap, as rootless containers use) connected
  // as each of its uids: the deny rule naming the user missed them, the quota and connection cap counted each
  // apart, and together they filled every connection of the broker.
  const subuid = path.join(dir, 'subuid');
  fs.writeFileSync(subuid, `# user:start:count\nnobody:300000:65536\n${OTHER_UID}:400000:10\n`);
  const sb = await BrokerProcess.start(ns, POLICY.replace(`users = [0, ${NOBODY}, ${OTHER_UID}]`, 'users = ["*"]'),
    { tag: 'r2subuid', subuidFile: subuid });
  try {
    for (const uid of [300001, 365535, 400009]) {
      const r = await probeOnce({ socket: sb.socket, requests: [{ bridge: 'br0' }] }, { uid });
      t.is(r.error?.code, 'TB_E_POLICY_DENIED', `uid ${uid}: ${JSON.stringify(r.error)}`);
      t.regex(r.error?.message ?? '', new RegExp(`^uid ${uid} is a subordinate uid of (nobody|${OTHER_UID}) `));
    }
    // Past the range, and the owner itself: served.
    for (const uid of [NOBODY, 365536]) {
      const r = await probeOnce({ socket: sb.socket, requests: [{ bridge: 'br0' }] }, { uid });
      t.is(r.error, null, `uid ${uid}: ${JSON.stringify(r.error)}`);
    }
    // A range added while the broker runs (useradd adds one for every new user) is refused at once.
    fs.appendFileSync(subuid, `${NOBODY}:500000:100\n`);
    const added = await probeOnce({ socket: sb.socket, requests: [{ bridge: 'br0' }] }, { uid: 500050 });
    t.is(added.error?.code, 'TB_E_POLICY_DENIED', JSON.stringify(added.error));
    // Audited under the owner, so that its uids share one allowance of records.
    const rec = await sb.record((r) => r.op === 'connection' && r.code === 'TB_E_POLICY_DENIED' && /300001/.test(r.message ?? ''));
    t.is(rec.uid, NOBODY);
    t.deepEqual(ns.extraLinks(BASE), []);
  } finally {
    await sb.stop();
  }
});

// Found by an outside review: /etc/subgid was never read. newgidmap lets a user map its subordinate gids in a user
// namespace of its own and setgroups() to them, and the kernel then shows the broker those host gids: a user got a
// rule's group that way. Here setpriv gives the process those gids directly (the kernel's view is the same).
test.serial('F2: subordinate gids (/etc/subgid) give no rule\'s group, unless the account database does', async (t) => {
  const subgid = path.join(dir, 'subgid');
  fs.writeFileSync(subgid, `nobody:4200000:65536\n`);
  // A real group inside the range (a site whose directory's gids overlap the subordinate ranges), nobody a member.
  const group = `tbsg${process.pid % 100000}`;
  spawnSync('groupdel', [group]);
  const made = spawnSync('groupadd', ['-g', '4200501', group], { encoding: 'utf8' });
  if (made.status !== 0) throw new Error(`groupadd: ${made.stderr}`);
  const sb = await BrokerProcess.start(ns, `[[rule]]\nname = "grp"\ngroups = [4200500, 4200501]\nbridges = ["br0"]\npersistent = true\n`,
    { tag: 'r2subgid', subgidFile: subgid });
  try {
    spawnSync('gpasswd', ['-a', 'nobody', group]);
    const taken = await probeOnce({ socket: sb.socket, requests: [{ bridge: 'br0' }] }, { uid: NOBODY, groups: [4200500] });
    t.is(taken.error?.code, 'TB_E_POLICY_DENIED', `a subordinate gid gave rule grp: ${JSON.stringify(taken.error)}`);
    const rec = await sb.record((r) => r.decision === 'deny' && r.uid === NOBODY);
    t.deepEqual(rec.groups, [], 'the subordinate gid is no group of the caller\'s, in the record too');
    const member = await probeOnce({ socket: sb.socket, requests: [{ bridge: 'br0' }] }, { uid: NOBODY, groups: [4200501] });
    t.is(member.error, null, `a member of a real group in the range: ${JSON.stringify(member.error)}`);
    // But no tap is given to it: the kernel lets whoever holds the gid open the tap, its range's owner included
    // (a re-test opened a group tap through a subordinate gid, on a bridge a deny kept it off).
    const given = await probeOnce({ socket: sb.socket, requests: [{ bridge: 'br0', persistent: true, group: 4200501 }] },
      { uid: NOBODY, groups: [4200501] });
    t.is(given.error?.code, 'TB_E_POLICY_DENIED', JSON.stringify(given.error));
    t.regex(given.error?.message ?? '', /^group 4200501 lies in the subordinate gid range of nobody /);
    // A primary gid that is a subordinate one (a process running as a container's group): refused at accept.
    const primary = await probeOnce({ socket: sb.socket, requests: [{ bridge: 'br0' }] }, { uid: NOBODY, gid: 4200600 });
    t.is(primary.error?.code, 'TB_E_POLICY_DENIED');
    t.regex(primary.error?.message ?? '', /^gid 4200600 is a subordinate gid of nobody /);
    t.deepEqual(ns.extraLinks(BASE), []);
  } finally {
    await sb.stop();
    spawnSync('groupdel', [group]);
  }
});

// Found by an outside review of the policy tools: a deny naming a subordinate gid let a caller holding it through (the
// gid was left out of its groups before deciding), while test-policy, taking the groups as given, called it denied.
test.serial('F2: a deny rule naming a subordinate gid holds for a caller that holds it; test-policy agrees', async (t) => {
  const subgid = path.join(dir, 'subgid-deny');
  fs.writeFileSync(subgid, `nobody:4300000:65536\n`);
  const policy = `[[rule]]\nname = "all"\nusers = ["*"]\nbridges = ["br0"]\n\n`
    + `[[deny]]\nname = "no-ct"\ngroups = [4300005]\nbridges = ["br0"]\n`;
  const sb = await BrokerProcess.start(ns, policy, { tag: 'r2subdeny', subgidFile: subgid });
  try {
    const r = await probeOnce({ socket: sb.socket, requests: [{ bridge: 'br0' }] }, { uid: NOBODY, groups: [4300005] });
    t.is(r.error?.code, 'TB_E_POLICY_DENIED', JSON.stringify(r.error));
    t.is(r.error?.rule, 'no-ct');
    // The record says which group it was: not one of the caller's groups, one it claims (a re-test).
    const rec = await sb.record((x) => x.decision === 'deny' && x.rule === 'no-ct');
    t.deepEqual([rec.groups, rec.claimed_groups], [[], [4300005]]);
    const without = await probeOnce({ socket: sb.socket, requests: [{ bridge: 'br0' }] }, { uid: NOBODY, groups: [] });
    t.is(without.error, null, JSON.stringify(without.error));
    // test-policy, given this host's files, decides the same.
    const host = { subuids: new Subuids('/nonexistent/subuid'), subgids: new Subuids(subgid) };
    const [c] = runPolicyTests(policy, `[[case]]\nuser = ${NOBODY}\ngroups = [4300005]\nrequest = "bridge=br0"\n`
      + 'expect = "deny"\nrule = "no-ct"\n', host).results;
    t.true(c!.passed, c!.failure ?? '');
    // The granted tap went with its client's fd.
    await until(() => ns.extraLinks(BASE).length === 0 || null, { what: 'taps left', ms: 3000 });
  } finally {
    await sb.stop();
  }
});

// ---------------------------------------------------------------- A4: a group deny and setgroups

test.serial('A4: a group deny holds for a member who dropped the group (as setgroups in a user namespace allows)', async (t) => {
  // nobody's primary group is nogroup (65534) in the account database. The process asks with another
  // gid and no supplementary groups: the kernel's lists no longer say nogroup, the database does.
  const b = await BrokerProcess.start(ns, `[[rule]]\nname = "r"\nusers = [${NOBODY}]\nbridges = ["br0"]\n\n[[deny]]\nname = "no-nogroup"\ngroups = ["nogroup"]\nbridges = ["br0"]\n`, { tag: 'r2grp' });
  try {
    const r = await probeOnce({ socket: b.socket, requests: [{ bridge: 'br0' }] }, { uid: NOBODY, gid: 4343 });
    t.is(r.error?.code, 'TB_E_POLICY_DENIED');
    t.is(r.error?.rule, 'no-nogroup');
    t.deepEqual(ns.extraLinks(BASE), []);
  } finally {
    await b.stop();
  }
});

// Found by an outside review of the audit tools: a user added to a deny's group after the policy loaded was
// denied by test-policy, who-can and explain-policy (they read the account database as it is) and granted by
// the broker (as it was at load) until a reload. The broker now reads the members again when the files change.
test.serial('A4: a user added to a deny rule\'s group while the broker runs is denied from then on, with no reload', async (t) => {
  const group = `tbq${process.pid % 100000}`;
  spawnSync('groupdel', [group]);
  const made = spawnSync('groupadd', [group], { encoding: 'utf8' });
  if (made.status !== 0) throw new Error(`groupadd: ${made.stderr}`);
  const b = await BrokerProcess.start(ns, `[[rule]]\nname = "r"\nusers = [${NOBODY}]\nbridges = ["br0"]\n\n`
    + `[[deny]]\nname = "quarantine"\ngroups = ["${group}"]\nbridges = ["br0"]\n`, { tag: 'r2late' });
  try {
    const before = await probeOnce({ socket: b.socket, requests: [{ bridge: 'br0' }], status: true });
    t.is(before.error, null, 'not a member yet: granted');
    t.is(before.status?.policy_loads, 1);
    // nobody's process asks with no supplementary groups: only the account database says it is a member.
    const added = spawnSync('gpasswd', ['-a', 'nobody', group], { encoding: 'utf8' });
    if (added.status !== 0) throw new Error(`gpasswd: ${added.stderr}`);
    const denied = await until(async () => {
      const r = await probeOnce({ socket: b.socket, requests: [{ bridge: 'br0' }] });
      return r.error?.code === 'TB_E_POLICY_DENIED' ? r.error : null;
    }, { what: 'the new member was never denied', ms: 5000, every: 200 });
    t.is(denied.rule, 'quarantine');
    await until(() => /the account database changed: .*deny rules' group members, were read again/.test(b.stderr) || null,
      { what: 'the broker did not say it read the members again', ms: 3000 });
    // Another policy in force: recorded, and counted for clients that decide a VM's NICs under one (rv128).
    await b.record((r) => r.decision === 'reload' && /deny rule `quarantine': group members none are \d+ now/.test(r.message ?? ''));
    const after = await probeOnce({ socket: b.socket, requests: [], status: true });
    t.is(after.status?.policy_loads, 2);
    await until(() => ns.extraLinks(BASE).length === 0 || null, { what: 'taps left', ms: 3000 });
  } finally {
    await b.stop();
    spawnSync('groupdel', [group]);
  }
});

// Found by an outside review of the security team's tools (rv71 F3): a rule's group renamed, and a new group made
// under its name, with no reload: the tools named the new group's members, the broker kept granting the old one's.
test.serial('A4: a rule\'s group renamed and made anew while the broker runs: the rule follows its name, and says so', async (t) => {
  const group = `tbn${process.pid % 100000}`;
  const gid = () => Number(spawnSync('getent', ['group', group], { encoding: 'utf8' }).stdout.split(':')[2]);
  spawnSync('groupdel', [group]);
  spawnSync('groupdel', [`${group}-old`]);
  if (spawnSync('groupadd', [group]).status !== 0) throw new Error('groupadd failed');
  const old = gid();
  const b = await BrokerProcess.start(ns, `[[rule]]\nname = "lab"\ngroups = ["${group}"]\nbridges = ["br0"]\n`,
    { tag: 'r2renamed' });
  try {
    const before = await probeOnce({ socket: b.socket, requests: [{ bridge: 'br0' }], status: true }, { uid: NOBODY, gid: old });
    t.is(before.error, null, 'the group as loaded: granted');
    t.is(before.status?.policy_loads, 1);
    if (spawnSync('groupmod', ['-n', `${group}-old`, group]).status !== 0) throw new Error('groupmod failed');
    if (spawnSync('groupadd', [group]).status !== 0) throw new Error('groupadd failed');
    const now = gid();
    t.not(now, old);
    const denied = await until(async () => {
      const r = await probeOnce({ socket: b.socket, requests: [{ bridge: 'br0' }] }, { uid: NOBODY, gid: old });
      return r.error?.code === 'TB_E_POLICY_DENIED' ? r.error : null;
    }, { what: 'the renamed group was still granted', ms: 5000, every: 200 });
    t.truthy(denied);
    const granted = await probeOnce({ socket: b.socket, requests: [{ bridge: 'br0' }] }, { uid: NOBODY, gid: now });
    t.is(granted.error, null, 'the group of that name now: granted');
    await b.record((r) => r.decision === 'reload'
      && (r.message ?? '').includes(`rule \`lab': gids ${old} are ${now} now`));
    // Another policy in force, as after a reload: a client deciding a VM's NICs under one policy sees it (rv123).
    const after = await probeOnce({ socket: b.socket, requests: [], status: true }, { uid: NOBODY, gid: now });
    t.is(after.status?.policy_loads, 2);
    await until(() => ns.extraLinks(BASE).length === 0 || null, { what: 'taps left', ms: 3000 });
  } finally {
    await b.stop();
    spawnSync('groupdel', [group]);
    spawnSync('groupdel', [`${group}-old`]);
  }
});

// Found by an outside review of the security team's tools (rv71 F1): a rule for a supplementary group allows
// persistent taps; `can --persistent` said yes, but a tap its holder made persistent (TUNSETPERSIST) was decided
// without the holder's groups, and deleted as "no rule matched".
test.serial('A4: a tap made persistent by its holder is decided with its owner\'s groups, as can decides it', async (t) => {
  const group = `tbp${process.pid % 100000}`;
  spawnSync('groupdel', [group]);
  if (spawnSync('groupadd', [group]).status !== 0) throw new Error('groupadd failed');
  if (spawnSync('gpasswd', ['-a', 'nobody', group]).status !== 0) throw new Error('gpasswd failed');
  const gid = Number(spawnSync('getent', ['group', group], { encoding: 'utf8' }).stdout.split(':')[2]);
  const b = await BrokerProcess.start(ns, `[[rule]]\nname = "lab"\ngroups = ["${group}"]\nbridges = ["br0"]\n`
    + 'persistent = true\n', { tag: 'r2persist' });
  try {
    const p = await probe({ socket: b.socket, requests: [{ bridge: 'br0' }], persistOwnFds: true }, { uid: NOBODY, groups: [gid] });
    t.is(p.result.error, null);
    const name = p.result.taps[0]!.device.name;
    await p.release();
    const kept = await b.record((r) => r.decision === 'reconcile' || (r.decision === 'cleanup' && r.device !== undefined
      && (r.device as { name?: string }).name === name));
    t.not(kept.decision, 'cleanup', kept.message);
    t.truthy(ns.link(name), 'the tap stays, now a persistent lease of rule lab');
    const listed = (await probeOnce({ socket: b.socket, list: true }, { uid: NOBODY })).leases ?? [];
    t.like(listed.find((l) => l.name === name), { rule: 'lab', ends: 'release' });
    await probeOnce({ socket: b.socket, release: [name] }, { uid: NOBODY });
  } finally {
    await b.stop();
    spawnSync('groupdel', [group]);
  }
});

// Found by an outside re-test (rv74 f1): a broker whose /sys shows another namespace (`nsenter --net` keeps the mount)
// took that namespace's tap of the same name and index for one of its own; from then on every other tap's event
// read as "gone", and a holder gave its tap away unjudged. Sysfs now counts as the broker's only where it shows a
// tap with the broker's own tag.
test.serial('A4: a broker whose sysfs is another namespace\'s still judges its taps, a tap of the same name and index there', async (t) => {
  const theirs = Netns.create('sysfs-b');
  const mine = Netns.create('sysfs-a');
  const name = `tb${NOBODY}-same`;
  const hooks = tempDir('r2sysfs-hook');
  const hook = path.join(hooks, 'plain');
  fs.writeFileSync(hook, '#!/bin/sh\nexit 0\n', { mode: 0o755 });
  let b: BrokerProcess | null = null;
  try {
    theirs.bridge('br0');
    mine.bridge('br0');
    theirs.ip('tuntap', 'add', name, 'mode', 'tap');
    b = await BrokerProcess.start(theirs, `[network.plain]\nhook = "${hook}"\n\n[[rule]]\nname = "r"\nusers = [${NOBODY}]\n`
      + 'bridges = ["br0"]\nnetworks = ["plain"]\n', { tag: 'r2sysfs', wrap: ['nsenter', `--net=/run/netns/${mine.name}`] });
    // A bridge of the same name and index there (another MAC) is not taken for the broker's own either.
    const bridged = await probeOnce({ socket: b.socket, requests: [{ bridge: 'br0' }] });
    t.is(bridged.error?.code, 'TB_E_KERNEL');
    t.regex(bridged.error?.message ?? '', /sysfs shows another namespace's `br0'/);
    const first = await probe({ socket: b.socket, requests: [{ network: 'plain', name }] });
    t.is(first.result.error, null, first.result.error?.message);
    t.is(mine.link(name)?.ifindex, theirs.link(name)?.ifindex, 'the same name and index in both namespaces');
    const given = await probe({ socket: b.socket, requests: [{ network: 'plain' }], ownOwnFds: true });
    t.is(given.result.error, null, given.result.error?.message);
    const away = given.result.taps[0]!.device.name;
    try {
      await b.waitFor(() => mine.link(away) === undefined, 3000, `${away}, given to its holder, stayed`);
      await b.record((r) => r.decision === 'cleanup' && (r.device as { name?: string }).name === away
        && /changed its owner or group/.test(r.message ?? ''));
      t.truthy(mine.link(name), 'the tap of the same name as theirs is left alone');
    } finally {
      await given.release();
      await first.release();
    }
  } finally {
    await b?.stop();
    mine.destroy();
    theirs.destroy();
    fs.rmSync(hooks, { recursive: true, force: true });
  }
});

// ---------------------------------------------------------------- B11: the client and a fake broker

async function fakeBroker(as: number | null, mode: 'socket' | 'escape' | 'old'): Promise<{ socket: string; stop(): void }> {
  const socket = path.join(dir, `fake-${mode}-${as ?? 0}.sock`);
  fs.rmSync(socket, { force: true });
  const script = path.join(HERE, '../helpers/fake-broker.js');
  const child = as === null
    ? spawn(process.execPath, [script, socket, mode], { stdio: ['ignore', 'pipe', 'inherit'] })
    : spawn('setpriv', [...setprivArgs({ uid: as }), process.execPath, script, socket, mode], { stdio: ['ignore', 'pipe', 'inherit'] });
  children.add(child);
  await new Promise<void>((resolve, reject) => {
    child.stdout!.on('data', (d: Buffer) => { if (d.toString().includes('ready')) resolve(); });
    child.on('exit', (code) => reject(new Error(`fake broker exited ${code}`)));
  });
  return { socket, stop: () => child.kill('SIGKILL') };
}

// Found by an outside review of upgrades: a client newer than the broker it reaches (the package's files replaced, the
// broker not restarted yet) failed `status` with "missing field" and `can` with "unknown field", and no word of why.
test.serial('a client talking to a broker of another version says so when it cannot read a reply, with the fix', async (t) => {
  const old = await fakeBroker(null, 'old');
  try {
    for (const args of [['status'], ['can', '--persistent', '--group', '0', '--net', 'bridge=br0']]) {
      const r = spawnSync(process.execPath, [CLIENT_CLI, ...args, '--socket', old.socket], { encoding: 'utf8' });
      t.not(r.status, 0);
      // A broker newer than this client: the client of its version is the fix (one older: a restart of the broker).
      t.regex(r.stderr, /hint: the broker is tapbrokerd 9\.9\.9 and this client \d+\.\d+\.\d+: use the client installed with the broker/, args[0]);
    }
  } finally {
    old.stop();
  }
});

test.serial('B11: the client refuses a "broker" that is not root\'s', async (t) => {
  fs.chmodSync(dir, 0o777);
  const fake = await fakeBroker(OTHER_UID, 'socket');
  try {
    const r = await probeOnce({ socket: fake.socket, requests: [{ bridge: 'br0' }] });
    t.is(r.error?.code, 'TB_E_CONNECT');
    t.regex(r.error?.message ?? '', /served by uid 64000, not root/);
  } finally {
    fake.stop();
    fs.chmodSync(dir, 0o755);
  }
});

test.serial('B11: the client refuses fds that are not the tap the reply names, and replies with terminal escapes', async (t) => {
  const sockets = await fakeBroker(null, 'socket');
  const escapes = await fakeBroker(null, 'escape');
  try {
    const r = await probeOnce({ socket: sockets.socket, requests: [{ bridge: 'br0' }] });
    t.is(r.error?.code, 'TB_E_BAD_REPLY', 'a socket handed over as a NIC is refused');
    t.regex(r.error?.message ?? '', /not a tap/);
    const e = await probeOnce({ socket: escapes.socket, requests: [{ bridge: 'br0' }] });
    t.is(e.error?.code, 'TB_E_BAD_REPLY');
    t.notRegex(e.error?.message ?? '', /\u001b/);
  } finally {
    sockets.stop();
    escapes.stop();
  }
});

// ---------------------------------------------------------------- two brokers in one namespace

test.serial('A (also): a second broker with its own state directory never deletes the first one\'s devices', async (t) => {
  const made = await probeOnce({ socket: broker.socket, requests: [{ bridge: 'br0', persistent: true }] });
  t.is(made.error, null, made.error?.message);
  const name = made.taps[0]!.device.name;
  const otherDir = tempDir('r2other');
  try {
    // An intact table of its own (trusted): a tagged device without a lease would be taken for an orphan
    // of its own crash and deleted; without one it would be adopted. Neither may happen.
    fs.mkdirSync(path.join(otherDir, 'state'), { recursive: true });
    fs.writeFileSync(path.join(otherDir, 'state', 'leases.json'),
      `${JSON.stringify({ version: 1, broker: BROKER_VERSION, leases: [], intents: [] })}\n`);
    const other = await BrokerProcess.start(ns, POLICY, { dir: otherDir });
    // It reconciles before it says it listens, and records what it does before that line: all here now.
    t.deepEqual(other.records.filter((r) => (r.device as { name?: string } | undefined)?.name === name), [], 'it never acted on it');
    const listed = await probeOnce({ socket: other.socket, list: true });
    t.deepEqual(listed.leases!.filter((l) => l.name === name), [], 'nor took it for its own');
    await other.stop('SIGTERM', true);
    t.truthy(ns.link(name), 'the first broker\'s persistent tap is still there');
  } finally {
    fs.rmSync(otherDir, { recursive: true, force: true });
    await probeOnce({ socket: broker.socket, release: [name] });
  }
});

// ---------------------------------------------------------------- files root trusts

test.serial('A (also): a policy, state directory or hook another user could change is refused', async (t) => {
  const base = tempDir('r2files');
  try {
    const policy = path.join(base, 'policy.toml');
    fs.writeFileSync(policy, `[[rule]]\nname = "r"\nusers = [${NOBODY}]\nbridges = ["br0"]\n`);
    const run = (...args: string[]) => spawnSync('ip', ['netns', 'exec', ns.name, process.execPath, path.join(HERE, '../../../packages/broker/dist/main.js'), ...args], { encoding: 'utf8' });
    fs.chmodSync(policy, 0o666);
    const writable = run('-n', '-f', policy);
    t.is(writable.status, 78, 'a world-writable policy does not pass -n');
    t.regex(writable.stderr, /is writable by others: a user other than root could change the policy/);
    const check = run('check-policy', policy);
    t.is(check.status, 78, 'check-policy, as root, refuses it as the broker would');
    t.regex(check.stderr, /error: is writable by others: a user other than root could change the policy/, 'check-policy says why');
    fs.chmodSync(policy, 0o644);
    fs.chownSync(policy, NOBODY, NOBODY);
    t.is(run('-n', '-f', policy).status, 78, 'nor one owned by another user');
    fs.chownSync(policy, 0, 0);
    // A parent directory anyone may write to (not sticky): anyone could swap the file.
    const open = path.join(base, 'open');
    fs.mkdirSync(open);
    fs.chmodSync(open, 0o777);
    fs.copyFileSync(policy, path.join(open, 'policy.toml'));
    t.is(run('-n', '-f', path.join(open, 'policy.toml')).status, 78, 'nor one in a directory others may write');
    // The state directory: a link to a directory another user owns.
    const theirs = path.join(base, 'theirs');
    fs.mkdirSync(theirs);
    fs.chownSync(theirs, NOBODY, NOBODY);
    fs.symlinkSync(theirs, path.join(base, 'state-link'));
    const state = run('-f', policy, '-s', path.join(base, 'x.sock'), '--state-dir', path.join(base, 'state-link'), '--journal-socket', '');
    t.is(state.status, 78);
    t.regex(state.stderr, /state directory .* is owned by uid 65534/);
    // A hook whose directory others may write.
    fs.writeFileSync(path.join(open, 'hook'), '#!/bin/sh\nexit 0\n', { mode: 0o755 });
    fs.writeFileSync(policy, `[network.h]\nhook = "${path.join(open, 'hook')}"\n\n[[rule]]\nname = "r"\nusers = [${NOBODY}]\nnetworks = ["h"]\n`);
    const hook = run('-n', '-f', policy);
    t.is(hook.status, 78);
    t.regex(hook.stderr, /hook .* is writable by others \(through .*open\)/);
  } finally {
    fs.rmSync(base, { recursive: true, force: true });
  }
});

test.serial('A1: a connection queued before the broker started (socket activation) cannot slip fds past it', async (t) => {
  // The service manager's listening socket, made here as systemd would (without SO_PASSRIGHTS), and a
  // client that connects and sends fds before any broker runs: its packet waits in the queue.
  const sockPath = path.join(dir, 'activated.sock');
  fs.rmSync(sockPath, { force: true });
  const { SeqpacketListener } = await import('@tapbroker/protocol');
  const listener = SeqpacketListener.listen(sockPath, { mode: 0o666 });
  const early = await SeqpacketConnection.connect(sockPath, { maxPacket: MAX_REPLY_BYTES });
  const pushed = pushedFile();
  const nul = fs.openSync(pushed, 'r');
  await early.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION }), Array<number>(20).fill(nul));
  fs.closeSync(nul);
  // LISTEN_PID is the shell's pid, which exec keeps through `ip netns exec` to node.
  const main = path.join(HERE, '../../../packages/broker/dist/main.js');
  const child = spawn('sh', ['-c', `LISTEN_PID=$$ LISTEN_FDS=1 exec ip netns exec ${ns.name} "$0" "$@"`, process.execPath, main,
    '-f', broker.policyPath, '--state-dir', path.join(dir, 'activated-state'), '--journal-socket', ''],
  { stdio: ['ignore', 'ignore', 'pipe', listener.fd] });
  children.add(child);
  let err = '';
  child.stderr!.on('data', (d) => (err += d));
  try {
    const got = await within(early.receive(), 5000);
    const reply = got === 'timeout' ? null : got;
    t.truthy(reply, `no reply: ${err}`);
    const { decodeReply } = await import('@tapbroker/protocol');
    t.is(reply ? (decodeReply(reply.data) as { code?: string }).code : null, 'TB_E_UNEXPECTED_FDS', 'the queued fds were refused');
    // Refused fds go to the closer, which closes them off the broker's loop: wait for them to be gone.
    await until(() => foreignHeld(child.pid!, pushed).length === 0, { ms: 3000, what: 'the broker still holds pushed fds', detail: () => foreignHeld(child.pid!, pushed).join(', ') });
    t.deepEqual(foreignHeld(child.pid!, pushed), [], 'the broker kept none of them');
    // A connection made now meets SO_PASSRIGHTS: refused by the kernel.
    const late = await SeqpacketConnection.connect(sockPath, { maxPacket: MAX_REPLY_BYTES });
    const again = fs.openSync('/dev/null', 'r');
    await t.throwsAsync(late.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION }), [again]), { message: /EPERM/ });
    fs.closeSync(again);
    late.close();
    t.regex(err, /listening on inherited fd 3/);
  } finally {
    early.close();
    child.kill('SIGTERM');
    await new Promise((r) => child.once('exit', r));
    listener.close();
  }
});

test.serial('B7: a macvtap holder that passes its connection on and exits: its macvtap goes, and the broker does not spin', async (t) => {
  const out = spawnSync('setpriv', [...setprivArgs({ uid: NOBODY }), process.execPath, path.join(HERE, '../helpers/pass-on.js'), broker.socket, 'vparent'], { encoding: 'utf8' });
  t.is(out.status, 0, out.stderr);
  const { name } = JSON.parse(out.stdout) as { name: string };
  await broker.waitFor(() => ns.link(name) === undefined, 3000, `${name} outlived its holder`);
  // The connection lives on in `sleep`; the holder's pidfd stays readable. CPU over one second:
  const ticks = () => fs.readFileSync(`/proc/${broker.proc.pid}/stat`, 'utf8').split(') ')[1]!.split(' ').slice(11, 13).map(Number).reduce((a, b) => a + b, 0);
  const before = ticks();
  await quiet(1000, 'the measurement: CPU the broker uses in one idle second');
  const used = ticks() - before;
  t.true(used < 30, `the broker used ${used} clock ticks of CPU in one idle second`);
});

// ---------------------------------------------------------------- A3: squatting /dev/tapN

const userns = spawnSync('setpriv', [...setprivArgs({ uid: STRANGER }), 'unshare', '-Urn', 'true']).status === 0;
if (!userns) console.log('# skip A3: unprivileged user namespaces are off here, so nobody can squat /dev/tapN this way');
(userns ? test.serial : test.serial.skip)('A3: a user squatting /dev/tapN from its own user namespace blocks nobody\'s macvtaps', async (t) => {
  // The indexes the kernel would give next in the broker's namespace, taken in a namespace of the
  // attacker's own (no privilege needed): their /dev/tapN nodes are the attacker's.
  const last = Math.max(...ns.links().map((l) => l.ifindex));
  const squat = `ip link add v0 type veth peer name v1 && for i in $(seq ${last + 1} ${last + 40}); do ip link add link v0 name m$i index $i type macvtap; done; echo squatting; sleep 60`;
  const squatter = spawn('setpriv', [...setprivArgs({ uid: STRANGER }), 'unshare', '-Urn', 'sh', '-c', squat], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(squatter);
  try {
    await new Promise<void>((resolve, reject) => {
      squatter.stdout!.on('data', (d: Buffer) => { if (d.toString().includes('squatting')) resolve(); });
      squatter.on('exit', (code) => reject(new Error(`the squatter exited ${code}`)));
    });
    t.true(fs.existsSync(`/dev/tap${last + 1}`), 'the next index\'s node is the attacker\'s');
    const p = await probe({ socket: broker.socket, requests: [{ parent: 'vparent' }] });
    try {
      t.is(p.result.error, null, p.result.error?.message);
    } finally {
      await p.release();
    }
    const made = await probeOnce({ socket: broker.socket, requests: [{ parent: 'vparent', persistent: true }] });
    t.is(made.error, null, made.error?.message);
    const name = made.taps[0]!.device.name;
    const node = `/dev/tap${made.taps[0]!.device.ifindex}`;
    t.is(fs.statSync(node).uid, 0, 'its node is root\'s (with an ACL for its owner)');
    await probeOnce({ socket: broker.socket, release: [name] });
  } finally {
    squatter.kill('SIGKILL');
  }
});

test.serial('A5: users together cannot take every connection: the last ones are kept for a user who holds none', async (t) => {
  // A limit of 16 keeps 4 (a quarter, at most 64) for newcomers.
  const b = await BrokerProcess.start(ns, POLICY, { tag: 'r2cap', maxConnections: 16 });
  const held: SeqpacketConnection[] = [];
  try {
    for (let i = 0; i < 12; i++) {
      // Each says hello and hears back: accepted and counted, and not dropped by the hello timeout.
      const c = await SeqpacketConnection.connect(b.socket, { maxPacket: MAX_REPLY_BYTES });
      await c.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION }));
      await c.receive();
      held.push(c);
    }
    // Root's twelve fill the broker up to its kept slots (root is exempt from the per-user cap, not from
    // the count). uid 65534 holds one, then asks for a second; uid 64000 asks for its first.
    const first = await probe({ socket: b.socket, requests: [] }, { uid: NOBODY });
    t.teardown(() => first.release());
    const second = await probeOnce({ socket: b.socket, requests: [{ bridge: 'br0' }] }, { uid: NOBODY });
    t.is(second.error?.code, 'TB_E_BUSY', `a user who holds a connection does not get a kept slot: ${JSON.stringify(second.error)}`);
    const newcomer = await probeOnce({ socket: b.socket, requests: [{ bridge: 'br0' }] }, { uid: OTHER_UID });
    t.is(newcomer.error, null, 'a user who holds none still gets in');
  } finally {
    for (const c of held) c.close();
    await b.stop();
  }
});

// Found by an outside review: accepting a connection was never charged to its uid's share, and a uid with no rule
// connecting and closing in a loop stalled everyone (root's status p90 672 ms). Now accepts and closes are charged,
// a uid past its share has its new connections wait, and one holding its cap already is closed unanswered. Here the
// share's clock stands still (the test entry point), so a uid past its share stays past it: no timing in the test.
const PAST_SHARE = `
import socket, sys, time
sock = sys.argv[1]
HELLO = bytes.fromhex('83a26f70a568656c6c6fa2696401a776657273696f6e02')
def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.connect(sock); return s
first = conn(); first.send(HELLO); first.recv(4096)
first.settimeout(2)
frames = 0
try:
    while True:  # malformed frames (each answered, each charged) until one is not: the share is spent
        first.send(b'\\xc1'); first.recv(4096); frames += 1
except socket.timeout:
    pass
held = []
for i in range(3):  # waiting for a window that never comes: held, unanswered
    s = conn(); s.send(HELLO); s.settimeout(0.5)
    try:
        s.recv(4096); answered = True
    except socket.timeout:
        answered = False
    held.append((s, answered))
last = conn(); last.settimeout(5)
t0 = time.time()
try:
    got = last.recv(4096)
except socket.timeout:
    got = None
print({'frames': frames, 'held_answered': [a for _, a in held], 'last': 'closed' if got == b'' else repr(got),
       'last_s': round(time.time() - t0, 2)}, flush=True)
sys.stdin.read()
`;

test.serial('F3: a uid past its share waits for its next connections, and one at its cap is closed unanswered', async (t) => {
  const b = await BrokerProcess.start(ns, POLICY, { tag: 'r2shed', maxConnectionsPerUser: 4, frozenClock: true });
  const user = spawn('ip', ['netns', 'exec', ns.name, 'setpriv', ...setprivArgs({ uid: 64077 }), '/usr/bin/python3', '-c',
    PAST_SHARE, b.socket], { stdio: ['pipe', 'pipe', 'inherit'] });
  try {
    let out = '';
    user.stdout!.on('data', (d) => (out += String(d)));
    await until(() => out.includes('\n'), { ms: 60_000, what: 'the user never spent its share' });
    const r = JSON.parse(out.replace(/'/g, '"').replace(/True/g, 'true').replace(/False/g, 'false')) as
      { frames: number; held_answered: boolean[]; last: string; last_s: number };
    t.true(r.frames > 0, 'its frames were answered until its share was spent');
    t.deepEqual(r.held_answered, [false, false, false], 'connections past its share wait for its next window');
    t.is(r.last, 'closed', 'a connection past its cap (4) is closed');
    t.true(r.last_s < 2, `closed at once, not after a timeout (${r.last_s} s)`);
    // Recorded: past the uid's 20 refusals of the window (its malformed frames took them), counted in the window's
    // `suppressed` record, by code.
    const counted = (x: { request?: unknown }) => ((x.request as { counts?: Record<string, number> } | undefined)
      ?.counts?.['TB_E_BUSY'] ?? 0) > 0;
    const rec = await b.record((x) => x.uid === 64077 && (/connection closed unanswered/.test(x.message ?? '')
      || counted(x)), 15_000);
    t.truthy(rec.code === 'TB_E_BUSY' || counted(rec), JSON.stringify(rec));
    // The same user's own client, shed too, is told what happened, not that the broker may be down.
    const cli = spawnSync('setpriv', [...setprivArgs({ uid: 64077 }), process.execPath, CLIENT_CLI, 'status', '--socket',
      b.socket], { encoding: 'utf8', timeout: 20_000 });
    t.is(cli.status, 69, cli.stderr);
    t.regex(cli.stderr, /hint: the broker closes a new connection unanswered when it is stopping, or when you hold too many/);
    // Root is served meanwhile.
    const root = await probeOnce({ socket: b.socket, status: true }, { uid: 0 });
    t.is(root.error, null);
  } finally {
    user.stdin!.end();
    user.kill('SIGKILL');
    await b.stop();
  }
});

// Found by an outside review: only a request's handler was charged to its uid's share, and a well-formed request that
// costs the broker little beyond reading it and sending its reply (`status`) cost almost nothing of it: a uid with no
// rule looping `status` on its 64 connections took 80 % of the thread, and root's grants took 20 times as long. Its
// socket's wake-ups, the loop's stretches and the reply are charged now: the share (250 ms) is spent within a few
// thousand such requests. The clock stands still here (the test entry point): a count, not a time.
const STATUS_LOOP = `
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.connect(sys.argv[1])
s.send(bytes.fromhex('83a26f70a568656c6c6fa2696401a776657273696f6e02')); s.recv(4096)
s.settimeout(2)
n = 0
try:
    while n < 1000000:
        s.send(bytes.fromhex('82a26f70a6737461747573a2696402')); s.recv(65536); n += 1
except socket.timeout:
    pass
print(n, flush=True)
`;

test.serial('F3: a uid\'s cheap requests are charged what they cost the broker: reading them and replying too', async (t) => {
  const b = await BrokerProcess.start(ns, POLICY, { tag: 'r2status', frozenClock: true });
  try {
    const r = spawnSync('ip', ['netns', 'exec', ns.name, 'setpriv', ...setprivArgs({ uid: 64078 }), '/usr/bin/python3',
      '-c', STATUS_LOOP, b.socket], { encoding: 'utf8', timeout: 240_000 });
    const n = Number(r.stdout.trim());
    t.log(`status requests answered before uid 64078's share was spent: ${n}`);
    // About 0.1 ms each here (2,600); with the handler alone charged, its share took 42,000: the bound is a factor of
    // four from each.
    t.true(n > 0 && n < 10_000, `${n} answered${r.stderr ? `: ${r.stderr}` : ''}`);
    // Root is served meanwhile.
    t.is((await probeOnce({ socket: b.socket, status: true }, { uid: 0 })).error, null);
  } finally {
    await b.stop();
  }
});

// Found by an outside review: refusing a subordinate uid was charged to that uid, so a flood spread over a user's
// 65,536 subordinate uids was never held back (each had a full share and its own cap). They pay as their owner now.
const SPEND_AS_SUBORDINATE = `
import socket, sys
n = 0
while n < 50000:  # connections refused at accept (a subordinate uid), each charged, until one waits: share spent
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.connect(sys.argv[1]); s.settimeout(1)
    try:
        s.recv(4096)
    except socket.timeout:
        break
    s.close(); n += 1
print(n, flush=True)
sys.stdin.read()
`;
const ANSWERED_WITHIN_1S = `
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.connect(sys.argv[1]); s.settimeout(1)
s.send(bytes.fromhex('83a26f70a568656c6c6fa2696401a776657273696f6e02'))  # hello
try:
    s.recv(4096); print('answered')
except socket.timeout:
    print('waiting')
`;

test.serial('F3: a user\'s subordinate uids share its one share of the broker\'s time', async (t) => {
  const subuid = path.join(dir, 'subuid-share');
  fs.writeFileSync(subuid, '64077:300000:65536\n');
  const b = await BrokerProcess.start(ns, POLICY, { tag: 'r2subshare', subuidFile: subuid, frozenClock: true });
  const py = (uid: number, script: string, stdio: 'pipe' | 'ignore' = 'ignore') => spawn('ip', ['netns', 'exec', ns.name,
    'setpriv', ...setprivArgs({ uid }), '/usr/bin/python3', '-c', script, b.socket], { stdio: [stdio, 'pipe', 'inherit'] });
  const spender = py(300001, SPEND_AS_SUBORDINATE, 'pipe');
  try {
    let out = '';
    spender.stdout!.on('data', (d) => (out += String(d)));
    await until(() => out.includes('\n'), { ms: 90_000, what: 'the subordinate uid never spent a share' });
    t.true(Number(out) > 0, `refused ${out.trim()} connections first`);
    const answered = async (uid: number) => {
      const p = py(uid, ANSWERED_WITHIN_1S);
      let said = '';
      p.stdout!.on('data', (d) => (said += String(d)));
      await new Promise((r) => p.once('close', r));
      return said.trim();
    };
    // Another of the same user's subordinate uids, and the user itself: past the same share, they wait.
    t.is(await answered(300002), 'waiting');
    t.is(await answered(64077), 'waiting');
    // Another user, and root, are served.
    t.is(await answered(64078), 'answered');
    t.is((await probeOnce({ socket: b.socket, status: true }, { uid: 0 })).error, null);
  } finally {
    spender.stdin!.end();
    spender.kill('SIGKILL');
    await b.stop();
  }
});

// Found by an outside review at a limit of 60 open files: a step that failed for want of an fd could not be undone
// either (a tap left without its lease). The unit sets LimitNOFILE= (systemd-units tests it); a broker started with
// fewer files than it needs says so at start.
test.serial('a broker started with too few open files says so at start', async (t) => {
  const b = await BrokerProcess.start(ns, POLICY, { tag: 'r2nofile', wrap: ['prlimit', '--nofile=200'] });
  try {
    t.regex(b.stderr, /warning: the broker may open only 200 files \(RLIMIT_NOFILE\); it needs 4096/);
  } finally {
    await b.stop();
  }
  const plenty = await BrokerProcess.start(ns, POLICY, { tag: 'r2nofile2', wrap: ['prlimit', '--nofile=8192'] });
  try {
    t.notRegex(plenty.stderr, /RLIMIT_NOFILE/);
  } finally {
    await plenty.stop();
  }
});

test.serial('at the open-file limit a deletion still happens (on the broker\'s own netlink socket): no device is left', (t) => {
  // The undo of a failed step deletes its device with a netlink socket of its own, off the event loop; with no fd
  // left for that socket it failed, and the device stayed without its lease. Now it falls back to the socket the
  // broker already holds. The script fills its fd table, then deletes a persistent tap the real kernel made (it loads
  // netdev.js alone: a larger module graph was still loading once the table was full).
  ns.ip('tuntap', 'add', 'r2full0', 'mode', 'tap');
  const script = `
    import fs from 'node:fs';
    import { Netdev } from './packages/broker/dist/netdev.js';
    const netdev = new Netdev({ deleteLink() {} }, '/tmp');
    const index = netdev.linkNamed('r2full0').index;
    const filler = [];
    try { for (;;) filler.push(fs.openSync('/dev/null', 'r')); } catch (e) { if (e.code !== 'EMFILE') throw e; }
    console.log(JSON.stringify({ filled: filler.length, deleted: await netdev.deleteLink(index), again: await netdev.deleteLink(index) }));
    process.exit(0);`;
  const r = spawnSync('ip', ['netns', 'exec', ns.name, 'prlimit', '--nofile=64', process.execPath, '--input-type=module', '-e', script],
    { encoding: 'utf8', cwd: ROOT });
  const gone = ns.link('r2full0') === undefined;
  if (!gone) ns.ip('link', 'del', 'r2full0');
  t.is(r.status, 0, r.stderr);
  const out = JSON.parse(r.stdout) as { filled: number; deleted: boolean; again: boolean };
  t.true(out.filled > 0, 'the fd table was full');
  t.deepEqual([out.deleted, out.again], [true, false]);
  t.true(gone, 'the tap is gone');
});

// ---------------------------------------------------------------- B13: renamed users

test.serial('B13: a renamed user: after a reload, {user} patterns and audit records use the new name, on a connection held since', async (t) => {
  // The broker's own account database: a copy of /etc/passwd with a user for uid 64000, renamed later.
  const passwd = path.join(dir, 'passwd');
  const base = fs.readFileSync('/etc/passwd', 'utf8').split('\n').filter((l) => l && !l.split(':')[2]?.startsWith(`${OTHER_UID}`)).join('\n');
  const write = (name: string) => fs.writeFileSync(passwd, `${base}\n${name}:x:${OTHER_UID}:${OTHER_UID}::/nonexistent:/usr/sbin/nologin\n`);
  write('tbold');
  const policy = `[[rule]]\nname = "u"\nusers = [${OTHER_UID}]\nbridges = ["br0"]\npersistent = true\nname_pattern = "u-{user}"\n`;
  const b = await BrokerProcess.start(ns, policy, { tag: 'r2user', passwd });
  // A connection opened before the rename and held through it (an outside review: it kept the old name for good,
  // and with it a device named for whoever was given that name next).
  const held = Peer.start({ uid: OTHER_UID });
  try {
    const before = await probeOnce({ socket: b.socket, requests: [{ bridge: 'br0', persistent: true, name: 'u-tbold' }] }, { uid: OTHER_UID });
    t.is(before.error, null, before.error?.message);
    await probeOnce({ socket: b.socket, release: ['u-tbold'] }, { uid: OTHER_UID });
    const conn = await held.connect(b.socket);
    const ask = async (id: number, frame: Record<string, unknown>) => {
      await held.send(conn, Buffer.from(encodeFrame({ id, ...frame } as Parameters<typeof encodeFrame>[0])));
      const got = await held.recv(conn);
      return decodeReply(got.data!) as { op: string; code?: string };
    };
    t.is((await ask(0, { op: 'hello', version: PROTOCOL_VERSION })).op, 'hello');
    // The account is renamed (the same file, rewritten in place), and the policy reloaded.
    fs.writeFileSync(passwd, fs.readFileSync(passwd, 'utf8').replace('tbold:', 'tbnew:'));
    b.proc.kill('SIGHUP');
    await b.record((r) => r.op === 'reload' && r.decision === 'reload');
    const old = await probeOnce({ socket: b.socket, requests: [{ bridge: 'br0', persistent: true, name: 'u-tbold' }] }, { uid: OTHER_UID });
    t.is(old.error?.code, 'TB_E_INVALID_NAME', 'the old name no longer fits');
    const tap = { op: 'create-tap', bridge: 'br0', persistent: true };
    t.is((await ask(1, { ...tap, name: 'u-tbold' })).code, 'TB_E_INVALID_NAME', 'the old name no longer fits the held connection');
    t.is(ns.link('u-tbold'), undefined);
    t.is((await ask(2, { ...tap, name: 'u-tbnew' })).op, 'create-tap', 'the new name fits the held connection');
    t.is((await b.record((r) => r.decision === 'grant' && (r.device as { name?: string }).name === 'u-tbnew')).user, 'tbnew');
    await probeOnce({ socket: b.socket, release: ['u-tbnew'] }, { uid: OTHER_UID });
    const renamed = await probeOnce({ socket: b.socket, requests: [{ bridge: 'br0', persistent: true, name: 'u-tbnew' }] }, { uid: OTHER_UID });
    t.is(renamed.error, null, renamed.error?.message);
    await probeOnce({ socket: b.socket, release: ['u-tbnew'] }, { uid: OTHER_UID });
  } finally {
    await held.stop();
    for (const n of ['u-tbold', 'u-tbnew']) if (ns.link(n)) ns.ip('link', 'del', n);
    await b.stop();
  }
});

// A11: floods of link events. Each TUNSETOFFLOAD on a leased tap's fd (no capability needed) is one link
// event. Found by outside reviews: the broker decoded and judged them in a loop that ran until the queue was
// empty, so a holder toggling in a loop froze it for every user (seconds per request); then, once a flooding
// device was deleted, a uid churning through new taps (or flooding from many, each under the device limit)
// still slowed everyone down 15-fold. Now a drain reads a budget of events per turn; a device sending more
// than 500 a second, or one of a uid whose devices together send more than 2,000, is deleted; and that uid's
// creates wait, 1 s after its first flood and twice as long after each next one. A broker of their own, so
// the cool-downs stay out of the other tests.
const FLOOD_POLICY = `[[rule]]\nname = "fl"\nusers = [${NOBODY}, ${OTHER_UID}]\nbridges = ["br0"]\nmax_devices = 8\n`;

const floodCleanups = (b: BrokerProcess, names: readonly string[]) => b.records.filter((r) => r.decision === 'cleanup'
  && names.includes((r.device as { name?: string } | undefined)?.name ?? '') && /link events in a second/.test(r.message ?? ''));

test.serial('A11: a holder flooding link events loses its tap, its next create waits, and everyone else is served', async (t) => {
  const fb = await BrokerProcess.start(ns, FLOOD_POLICY, { tag: 'r2flood' });
  try {
    const attacker = await probe({ socket: fb.socket, requests: [{ bridge: 'br0' }], floodOffloads: 1_000_000 });
    try {
      const a = attacker.result.taps[0]!.device;
      const done = attacker.result.offloads?.[0];
      t.truthy(done, 'the flood ran');
      t.not(done!.stoppedBy, null, `all ${done!.toggles} toggles went through: the tap outlived its flood`);
      t.true(done!.toggles > 500, `it stopped after ${done!.toggles} toggles: before it flooded`);
      await fb.waitFor(() => ns.link(a.name) === undefined, 5000, `${a.name} survived its flood`);
      await fb.waitFor(() => floodCleanups(fb, [a.name]).length === 1, 3000, 'no cleanup record');
      t.is(floodCleanups(fb, [a.name])[0]!.uid, NOBODY, 'the cleanup is on the holder\'s account');
      t.regex(floodCleanups(fb, [a.name])[0]!.message!, /its holder made it send more than 500 link events in a second .*wait 1 s/);
      // Its next create waits out the cool-down; another user's does not.
      const again = await probeOnce({ socket: fb.socket, requests: [{ bridge: 'br0' }] });
      t.is(again.error?.code, 'TB_E_BUSY', JSON.stringify(again.error));
      t.regex(again.error?.message ?? '', /flooded the broker with link events; new devices wait another \d+ s/);
      await serves(t, fb);
      await quiet(1100, 'the 1 s cool-down');
      const after = await probeOnce({ socket: fb.socket, requests: [{ bridge: 'br0' }] });
      t.is(after.error, null, `after its cool-down: ${after.error?.message}`);
    } finally {
      await attacker.release();
    }
  } finally {
    await fb.stop();
  }
});

// Found by an outside re-test: root moving a port off its bridge and back (nomaster/master) makes about eight
// link events of the tap each time, none its holder's doing; 150 such moves in a second deleted the user's tap
// as its holder's flood and made the user wait.
test.serial('A11: root moving a holder\'s tap off its bridge and back, fast, is not the holder\'s flood', async (t) => {
  const fb = await BrokerProcess.start(ns, FLOOD_POLICY, { tag: 'r2flood3' });
  try {
    const holder = await probe({ socket: fb.socket, requests: [{ bridge: 'br0' }] });
    try {
      const name = holder.result.taps[0]!.device.name;
      const moves = 200;
      const started = performance.now();
      const batch = spawnSync('ip', ['-n', ns.name, '-batch', '-'],
        { input: `link set ${name} nomaster\nlink set ${name} master br0\n`.repeat(moves), encoding: 'utf8' });
      t.is(batch.status, 0, batch.stderr);
      const ms = performance.now() - started;
      await fb.waitFor(() => fb.linkEventsUnread() === 0, 5000, 'the broker did not read the link events');
      await quiet(300, 'a late flood verdict, were there one');
      t.deepEqual(floodCleanups(fb, [name]).map((r) => r.message), [], `${moves} moves by root in ${ms.toFixed(0)} ms`);
      t.truthy(ns.link(name), `${name} was deleted`);
      t.is(ns.link(name)!.master, 'br0', 'back on its bridge');
      const next = await probeOnce({ socket: fb.socket, requests: [{ bridge: 'br0' }] });
      t.is(next.error, null, `the holder's uid was made to wait: ${next.error?.message}`);
    } finally {
      await holder.release();
    }
  } finally {
    await fb.stop();
  }
});

test.serial('A11: many taps of one uid, each under the device limit, flooding together: deleted, and the uid waits', async (t) => {
  const fb = await BrokerProcess.start(ns, FLOOD_POLICY, { tag: 'r2flood2' });
  try {
    // Six taps, 450 toggles each (under 500 a device), one after another: 2,700 events from one uid.
    const attacker = await probe({ socket: fb.socket, requests: Array.from({ length: 6 }, () => ({ bridge: 'br0' })), floodOffloads: 450 });
    try {
      const names = attacker.result.taps.map((x) => x.device.name);
      await fb.waitFor(() => floodCleanups(fb, names).length > 0, 5000, 'no tap of the flooding uid was deleted');
      const rec = floodCleanups(fb, names)[0]!;
      t.regex(rec.message!, new RegExp(`the devices of uid ${NOBODY} sent more than 2000 link events in a second, this one the most .*wait 1 s`));
      // Asked at once, within the 1 s cool-down (a loaded machine took longer than that to get here before).
      const again = await probeOnce({ socket: fb.socket, requests: [{ bridge: 'br0' }] });
      t.is(again.error?.code, 'TB_E_BUSY', JSON.stringify(again.error));
      // One flood, one device, and the cool-down grows once (the count starts over after it).
      await quiet(500, 'late cleanups, were there any');
      t.is(floodCleanups(fb, names).length, 1, floodCleanups(fb, names).map((r) => r.message).join('\n'));
      await serves(t, fb);
    } finally {
      await attacker.release();
    }
  } finally {
    await fb.stop();
  }
});

/**
 * A broker of its own with `policy`, and a locked tap of OTHER_UID on br0 (the victim): `entry()` finds its static
 * forwarding entry, `drop()` takes it away as root (what a holder's MAC flip does to it). Torn down after `run`.
 */
async function withLockedVictim(
  tag: string, policy: string, opts: { linkEventQueue?: number },
  run: (b: BrokerProcess, v: { mac: string; name: string }, entry: () => string | undefined, drop: () => void) => Promise<void>,
): Promise<void> {
  const lb = await BrokerProcess.start(ns, policy, { tag, ...opts });
  try {
    const victim = await probe({ socket: lb.socket, requests: [{ bridge: 'br0' }] }, { uid: OTHER_UID });
    try {
      if (victim.result.error) throw new Error(victim.result.error.message);
      const v = victim.result.taps[0]!.device as { mac: string; name: string };
      const entry = () => spawnSync('bridge', ['-n', ns.name, 'fdb', 'show', 'br', 'br0'], { encoding: 'utf8' }).stdout
        .split('\n').find((l) => l.startsWith(`${v.mac} dev ${v.name} `) && / static/.test(l));
      const drop = () => void spawnSync('bridge', ['-n', ns.name, 'fdb', 'del', v.mac, 'dev', v.name, 'master', 'static']);
      if (!entry()) throw new Error('the locked guest has no static entry');
      await run(lb, v, entry, drop);
    } finally {
      await victim.release();
    }
  } finally {
    await lb.stop();
  }
}

const LOCKED_RULE = `[[rule]]\nname = "locked"\nusers = [${OTHER_UID}]\nbridges = ["br0"]\nmac_lock = true\n`;

test.serial('A10: a holder that sets another guest\'s MAC and straight back loses its tap; the locked guest\'s static entry comes back', async (t) => {
  // Found by an outside review: the bridge deletes any forwarding entry of a MAC a port takes as its own, static
  // ones too, and the broker judged the device as it was when it read the event (its MAC already back): a locked
  // guest's only entry was gone for good (learning is off on its port), and nothing was recorded.
  const policy = LOCKED_RULE.replace(`users = [${OTHER_UID}]`, `users = [${NOBODY}, ${OTHER_UID}]`);
  await withLockedVictim('r2flip', policy, {}, async (lb, v, entry) => {
    const attacker = await probe({ socket: lb.socket, requests: [{ bridge: 'br0' }], flipOwnMac: v.mac });
    try {
      const a = attacker.result.taps[0]!.device;
      await lb.waitFor(() => ns.link(a.name) === undefined, 2000, `${a.name} survived taking another guest's MAC`);
      await lb.waitFor(() => entry() !== undefined, 2000, 'the locked guest\'s static entry did not come back');
      const rec = await lb.record((r) => /forwarding entry for .* restored/.test(r.message ?? ''));
      t.is((rec.device as { name?: string }).name, v.name);
    } finally {
      await attacker.release();
    }
  });
});

test.serial('A10: after lost link events, every locked guest\'s static entry is put back (a MAC flip the broker never saw)', async (t) => {
  // Found by an outside re-test: a holder that floods the broker's queue of link events, then sets another guest's
  // MAC and back, has its events lost; the resync judged every device as it now is (MAC back: nothing wrong),
  // and the locked guest's static entry, which the bridge deleted when the MAC was taken, stayed gone. Here the
  // entry is taken away by root (what the flip does to it) while the broker is stopped, and a burst of host
  // link events overruns its small queue (64 KiB), as the holder's flood does.
  await withLockedVictim('r2relock', LOCKED_RULE, { linkEventQueue: 64 * 1024 }, async (lb, _v, entry, drop) => {
    process.kill(lb.proc.pid!, 'SIGSTOP');
    try {
      drop();
      t.falsy(entry(), 'the entry is gone');
      const adds = Array.from({ length: 300 }, (_, i) => `link add rlk${i} type veth peer name rlp${i}`);
      const dels = Array.from({ length: 300 }, (_, i) => `link del rlk${i}`);
      spawnSync('ip', ['-n', ns.name, '-batch', '-'], { input: `${[...adds, ...dels].join('\n')}\n` });
    } finally {
      process.kill(lb.proc.pid!, 'SIGCONT');
    }
    await lb.waitFor(() => /link events were lost/.test(lb.stderr), 5000, 'the broker did not resynchronise');
    await lb.waitFor(() => entry() !== undefined, 3000, 'the locked guest\'s static entry was not put back');
    t.truthy(entry());
  });
});

test.serial('A10: a persistent tap made or released on a bridge puts back its locked guests\' static entries', async (t) => {
  // Found by an outside re-test: while a persistent tap is being made (its owner holds it from the start, and its
  // events are not judged until its create ends) and while a released device is being deleted (its lease already
  // gone), its owner could set another guest's MAC and back unjudged, and the bridge dropped that guest's static
  // entry. The broker now puts every locked lease's entry on that bridge back when either ends. Here root takes
  // the entry away (what the flip does to it), so that the test does not depend on winning the race.
  const policy = `${LOCKED_RULE}\n[[rule]]\nname = "pets"\nusers = [${NOBODY}]\nbridges = ["br0"]\npersistent = true\n`;
  await withLockedVictim('r2relock2', policy, {}, async (lb, _v, entry, drop) => {
    drop();
    t.falsy(entry());
    const made = await probeOnce({ socket: lb.socket, requests: [{ bridge: 'br0', persistent: true }] });
    t.is(made.error, null, made.error?.message);
    t.truthy(entry(), 'put back when the persistent tap was made');
    drop();
    t.falsy(entry());
    const released = await probeOnce({ socket: lb.socket, release: [made.taps[0]!.device.name] });
    t.is(released.error, null, released.error?.message);
    await lb.waitFor(() => entry() !== undefined, 3000, 'not put back when the persistent tap was released');
    t.truthy(entry());
  });
});

test.serial('A10: a holder that takes another guest\'s MAC loses its tap, and the guest\'s forwarding entry goes back to its port', async (t) => {
  // The victim's guest sends a frame: the bridge learns its MAC on the victim's port.
  const victim = await probe({ socket: broker.socket, requests: [{ bridge: 'br0' }], write: true }, { uid: OTHER_UID });
  try {
    const v = victim.result.taps[0]!.device;
    const fdb = () => spawnSync('bridge', ['-n', ns.name, 'fdb', 'show', 'br', 'br0'], { encoding: 'utf8' }).stdout
      .split('\n').filter((l) => l.startsWith(`${v.mac} `));
    await broker.waitFor(() => fdb().some((l) => l.includes(`dev ${v.name} `)), 2000, 'the bridge never learned the victim\'s MAC');
    // The attacker gives its own tap the victim's MAC: the bridge moves the entry to the attacker's port.
    const attacker = await probe({ socket: broker.socket, requests: [{ bridge: 'br0' }], setOwnMac: v.mac! });
    try {
      const a = attacker.result.taps[0]!.device;
      await broker.waitFor(() => ns.link(a.name) === undefined, 2000, `${a.name} survived taking another guest's MAC`);
      await broker.waitFor(() => fdb().some((l) => l.includes(`dev ${v.name} `)), 2000, `the entry did not come back: ${fdb().join('; ')}`);
      const rec = await broker.record((r) => /forwarding entry for .* restored/.test(r.message ?? ''));
      t.is((rec.device as { name?: string }).name, v.name, 'the restored entry is the victim\'s');
    } finally {
      await attacker.release();
    }
  } finally {
    await victim.release();
  }
});
