// The kernel refusing mid-transaction: everything made so far is undone and the broker keeps serving.
import anyTest, { type TestFn } from 'ava';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { BrokerProcess, tempDir } from '../helpers/broker.js';
import { Netns } from '../helpers/netns.js';
import { NOBODY, probe, probeOnce } from '../helpers/unpriv.js';
import { poll } from '../helpers/wait.js';
import type { ProbeRequest } from '../helpers/probe.js';

const test = anyTest as TestFn;
const POLICY = `[[rule]]\nname = "r"\nusers = [${NOBODY}]\nbridges = ["br0", "brx"]\nmacvtap = [{ parent = "vx" }]\nmax_queues = 64\n`;
let ns: Netns;
let dir: string;

test.before(() => {
  ns = Netns.create('refuse');
  ns.bridge('br0');
  dir = tempDir('refuse');
});

test.after.always(() => {
  ns?.destroy();
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Starts a broker that waits at `point`, runs `meanwhile` there, and returns the request's outcome. */
/**
 * The devices left besides br0, once the last copies of closed taps' fds are gone: the broker's own copies go
 * to its closer, which closes them a moment after the reply on a loaded machine.
 */
async function leftOver(): Promise<string[]> {
  await poll(() => ns.extraLinks(['br0']).length === 0, { ms: 3000 });
  return ns.extraLinks(['br0']);
}

async function interrupted(point: string, request: ProbeRequest, meanwhile: () => void) {
  const gate = path.join(dir, `gate-${point.replace(':', '-')}`);
  const broker = await BrokerProcess.start(ns, POLICY, { tag: 'refuse', fault: `${point}=wait:${gate}` });
  try {
    const pending = probeOnce({ socket: broker.socket, requests: [request] });
    await broker.waitFor(() => fs.existsSync(`${gate}.reached`), 5000, `never reached ${point}`);
    meanwhile();
    fs.writeFileSync(gate, '');
    const result = await pending;
    const after = await probeOnce({ socket: broker.socket, requests: [{ bridge: 'br0' }] });
    return { result, after, broker };
  } finally {
    await broker.stop();
    fs.rmSync(gate, { force: true });
    fs.rmSync(`${gate}.reached`, { force: true });
  }
}

test.serial('the bridge deleted between decision and attach: TB_E_KERNEL, the tap is gone, the broker serves', async (t) => {
  ns.bridge('brx');
  const { result, after } = await interrupted('tap:created', { bridge: 'brx' }, () => ns.ip('link', 'del', 'brx'));
  t.is(result.error?.code, 'TB_E_KERNEL');
  t.regex(result.error!.message, /failed to attach `tb65534-\w+' to bridge `brx'/);
  t.deepEqual(await leftOver(), []);
  t.is(after.error, null, 'the next request is served');
});

test.serial('the macvtap parent deleted mid-create: TB_E_KERNEL, nothing left', async (t) => {
  ns.ip('link', 'add', 'vx', 'type', 'veth', 'peer', 'name', 'vy');
  ns.ip('link', 'set', 'vx', 'up');
  const { result, after } = await interrupted('macvtap:created', { parent: 'vx' }, () => ns.ip('link', 'del', 'vx'));
  t.is(result.error?.code, 'TB_E_KERNEL');
  t.deepEqual(await leftOver(), []);
  t.is(after.error, null);
});

test.serial('EMFILE in the broker: the queues opened so far are closed, the tap is gone, fds return to baseline', async (t) => {
  const broker = await BrokerProcess.start(ns, POLICY, { tag: 'emfile' });
  try {
    const baseline = broker.fdCount();
    // Only the soft limit moves, so it can be raised again without CAP_SYS_RESOURCE.
    const hard = /^Max open files\s+\d+\s+(\d+)/m.exec(fs.readFileSync(`/proc/${broker.proc.pid}/limits`, 'utf8'))![1]!;
    spawnSync('prlimit', ['--pid', String(broker.proc.pid), `--nofile=${baseline + 20}:${hard}`]);
    const r = await probeOnce({ socket: broker.socket, requests: [{ bridge: 'br0', queues: 40 }] });
    t.is(r.error?.code, 'TB_E_KERNEL');
    t.regex(r.error!.message, /EMFILE|too many open files/i);
    await broker.waitFor(() => ns.extraLinks(['br0']).length === 0, 2000, 'tap left behind');
    await broker.waitFor(() => broker.fdCount() === baseline, 2000, `fds ${broker.fdCount()} != ${baseline}`);
    const restored = spawnSync('prlimit', ['--pid', String(broker.proc.pid), `--nofile=${Math.min(4096, Number(hard))}:${hard}`], { encoding: 'utf8' });
    t.is(restored.status, 0, restored.stderr);
    const ok = await probe({ socket: broker.socket, requests: [{ bridge: 'br0', queues: 40 }] });
    t.is(ok.result.error, null);
    t.is(ok.result.taps[0]!.tapFds, 40);
    await ok.release();
  } finally {
    await broker.stop();
  }
});

// From an outside review: at some limits just above the broker's own fds, a step with no code of its own (reading
// the caller's /proc/PID/stat) failed with EMFILE and the caller got TB_E_INTERNAL ("a bug") and the log a stack
// trace; and the log said the closer could not start twice a second, and never that it started again.
// Found by an outside review (the hang a CI run met in the sweep below): at a limit one fd above the broker's at rest,
// with no closer running, the accept took the last fd, the peer's pidfd could not be had, the connection's queue
// could not be counted (that takes an fd too), and its socket went to a closer that could not start: the client
// waited for ever. At two above, the same one request later (the pidfd was closed after the count). One fd is held in
// reserve for those steps, and the pidfd goes first: every request is answered, at each limit, closers or none.
test.serial('one, two and three fds above its own at rest, no closer running: every request is answered', async (t) => {
  const broker = await BrokerProcess.start(ns, POLICY, { tag: 'emfile-edge', closerIdleMs: 200 });
  const pid = String(broker.proc.pid);
  const hard = /^Max open files\s+\d+\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/limits`, 'utf8'))![1]!;
  const limit = (n: number) => spawnSync('prlimit', ['--pid', pid, `--nofile=${n}:${hard}`]);
  try {
    // Its closers gone (the one of pushed connections goes after 1 s without work), and its fds at rest.
    await broker.waitFor(() => broker.closers().length === 0, 10_000, `closers running: ${broker.closers()}`);
    const baseline = broker.fdCount();
    for (const above of [1, 2, 3]) {
      await broker.waitFor(() => broker.closers().length === 0 && broker.fdCount() <= baseline, 10_000,
        `closers ${broker.closers()}, fds ${broker.fdCount()} > ${baseline}`);
      limit(baseline + above);
      const codes: string[] = [];
      try {
        for (let i = 0; i < 3; i++) {
          let late: NodeJS.Timeout | undefined;
          let stuck = '';
          const p = await probe({ socket: broker.socket, requests: [{ bridge: 'br0', queues: 2 }] }, {}, (child) => {
            late = setTimeout(() => {
              stuck = `request ${i} unanswered at ${above} above ${baseline}: ${broker.fds().join(' ')}\n${broker.stderr}`;
              child.kill('SIGKILL');
            }, 10_000);
          }).catch((err: Error) => { throw new Error(stuck || err.message); }).finally(() => clearTimeout(late));
          await p.release();
          codes.push(p.result.error?.code ?? 'granted');
        }
      } finally {
        limit(4096);
      }
      t.false(codes.includes('TB_E_INTERNAL'), codes.join(' '));
      await poll(() => ns.extraLinks(['br0']).length === 0, { ms: 3000 });
      t.deepEqual(ns.extraLinks(['br0']), [], `a device left behind at ${above} above`);
    }
    t.notRegex(broker.stderr, /internal error/);
  } finally {
    limit(4096);
    await broker.stop();
  }
});

// Found by an outside code audit: connections refused at accept (a uid past its cap of connections) spent the fd held
// in reserve at the limit and never took it back: the broker was then as before the reserve, and a client could wait
// unanswered again. The reserve is taken again after every accept, whatever became of the connection.
test.serial('the fd in reserve, spent on a connection refused at the limit, is held again once that connection is closed', async (t) => {
  const broker = await BrokerProcess.start(ns, POLICY, { tag: 'emfile-spare', closerIdleMs: 200, maxConnectionsPerUser: 2 });
  const pid = String(broker.proc.pid);
  const hard = /^Max open files\s+\d+\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/limits`, 'utf8'))![1]!;
  const limit = (n: number) => spawnSync('prlimit', ['--pid', pid, `--nofile=${n}:${hard}`]);
  const reserve = () => broker.fds().filter((f) => /^([3-9]|\d\d+)->\/dev\/null$/.test(f)).length;
  const held: Array<Awaited<ReturnType<typeof probe>>> = [];
  try {
    await broker.waitFor(() => broker.closers().length === 0, 10_000, `closers running: ${broker.closers()}`);
    t.is(reserve(), 1, `one fd in reserve at rest: ${broker.fds().join(' ')}`);
    // uid 65534 at its cap of two connections, each held open.
    for (let i = 0; i < 2; i++) held.push(await probe({ socket: broker.socket, requests: [] }));
    await broker.waitFor(() => broker.closers().length === 0, 10_000, 'closers');
    // The limit that leaves one fd number free below it (node holds a high-numbered fd or two, which a count of fds
    // would take for room).
    const numbers = broker.fds().map((f) => Number(f.split('->')[0]));
    let one = 1;
    while (one - numbers.filter((n) => n < one).length !== 1) one++;
    limit(one);
    try {
      // A third: accepted with the last fd, its pidfd had with the reserve, refused (its cap), closed.
      const third = await probeOnce({ socket: broker.socket, requests: [{ bridge: 'br0' }] });
      t.is(third.error?.code, 'TB_E_BUSY', JSON.stringify(third.error));
      await broker.waitFor(() => reserve() === 1, 3000, `the reserve was not taken again: ${broker.fds().join(' ')}`);
    } finally {
      limit(4096);
    }
  } finally {
    for (const p of held) await p.release();
    await broker.stop();
  }
});

test.serial('at each open-files limit just above its own fds: a resource refusal, never TB_E_INTERNAL; said once', async (t) => {
  const broker = await BrokerProcess.start(ns, POLICY, { tag: 'emfile-sweep' });
  const pid = String(broker.proc.pid);
  const hard = /^Max open files\s+\d+\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/limits`, 'utf8'))![1]!;
  const limit = (n: number) => spawnSync('prlimit', ['--pid', pid, `--nofile=${n}:${hard}`]);
  // A macvtap too: its lease names its holder's start time, read from /proc (the step the review's EMFILE hit).
  ns.ip('link', 'add', 'vx', 'type', 'veth', 'peer', 'name', 'vy');
  ns.ip('link', 'set', 'vx', 'up');
  try {
    const codes = new Set<string>();
    const baseline = broker.fdCount();
    for (let n = baseline + 1; n <= baseline + 24; n++) {
      // Each limit above the fds the broker holds at rest (the last try's copies closed by its closer).
      await broker.waitFor(() => broker.fdCount() <= baseline, 5000, `fds ${broker.fdCount()} > ${baseline}`);
      limit(n);
      // Bounded: a request the broker never answers fails here, with what the broker was doing, not at ava's timeout.
      let late: NodeJS.Timeout | undefined;
      let stuck = '';
      const p = await probe({ socket: broker.socket, requests: [{ bridge: 'br0', queues: 4 }, { parent: 'vx', queues: 4 }] },
        {}, (child) => {
          late = setTimeout(() => {
            stuck = `no answer at a limit of ${n} (${baseline} fds at rest): ${broker.fds().join(' ')}\n${broker.stderr}`;
            child.kill('SIGKILL');
          }, 20_000);
        }).catch((err: Error) => { throw new Error(stuck || err.message); }).finally(() => clearTimeout(late));
      await p.release();
      const r = p.result;
      limit(4096);
      codes.add(r.error?.code ?? 'granted');
      await poll(() => ns.extraLinks(['br0', 'vx', 'vy']).length === 0, { ms: 3000 });
    }
    t.deepEqual(ns.extraLinks(['br0', 'vx', 'vy']), [], 'a device left behind');
    t.false(codes.has('TB_E_INTERNAL'));
    t.true(codes.has('TB_E_KERNEL'), 'no limit refused the create');
    t.notRegex(broker.stderr, /internal error/);
    // The closer: each reason said once until one starts, and its start said then.
    // (Per closer: the broker has two, one for its copies of granted fds.)
    for (const what of ['fd closer', 'fd closer of grants']) {
      const periods = broker.stderr.split(new RegExp(`${what} started, after \\d+ failed start`));
      for (const period of periods) {
        const said = period.match(new RegExp(`${what} cannot start \\([^)]*\\)`, 'g')) ?? [];
        t.is(new Set(said).size, said.length, `a reason said twice before one started:\n${said.join('\n')}`);
      }
    }
    t.regex(broker.stderr, /fd closer( of grants)? cannot start/, 'no limit kept a closer from starting');
    t.regex(broker.stderr, /fd closer( of grants)? started, after \d+ failed start/);
    // Accepts stalled and resumed again and again: said once a minute at most (a re-test made the lines alternate).
    const stalls = broker.stderr.match(/not accepting connections/g) ?? [];
    t.true(stalls.length <= 1, broker.stderr.split('\n').filter((l) => /accepting connections/.test(l)).join('\n'));
  } finally {
    limit(4096);
    await broker.stop();
    ns.ip('link', 'del', 'vx');
  }
});
