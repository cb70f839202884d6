// SIGKILL of the broker at every step of create-tap, create-macvtap, persistent create and release
// (fault points injected through the test-only entry point test/helpers/broker-entry.ts); after a restart: no leaked device, a
// lease table that matches the kernel, quotas true.
import anyTest, { type TestFn } from 'ava';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { BROKER_MAIN, BrokerProcess, CLIENT_CLI, tempDir } from '../helpers/broker.js';
import { Netns } from '../helpers/netns.js';
import { NOBODY, probe, probeOnce, setprivArgs } from '../helpers/unpriv.js';
import type { ProbeRequest } from '../helpers/probe.js';

const test = anyTest as TestFn;
const POLICY = `[[rule]]\nname = "f"\nusers = [${NOBODY}]\nbridges = ["br0"]\nmacvtap = [{ parent = "vparent" }]\npersistent = true\nmax_devices = 3\n`;
let ns: Netns;
let dir: string;
let broker: BrokerProcess;
const BASE = ['br0', 'vparent', 'vpeer'];

test.before(async () => {
  ns = Netns.create('kill');
  ns.bridge('br0');
  ns.ip('link', 'add', 'vparent', 'type', 'veth', 'peer', 'name', 'vpeer');
  ns.ip('link', 'set', 'vparent', 'up');
  dir = tempDir('kill');
  broker = await BrokerProcess.start(ns, POLICY, { dir });
});

test.after.always(async () => {
  await broker?.stop();
  ns?.destroy();
  fs.rmSync(dir, { recursive: true, force: true });
});

interface StateFile { leases: Array<{ name: string; ifindex: number; uid: number }> }
const state = () => JSON.parse(fs.readFileSync(broker.stateFile, 'utf8')) as StateFile;

/** The lease table and the kernel agree, and nothing of ours is outside the table. */
async function consistent(t: import('ava').ExecutionContext): Promise<void> {
  // Deletions run off the event loop: give them a moment.
  await broker.waitFor(() => {
    const names = new Set(state().leases.map((l) => l.name));
    return ns.extraLinks(BASE).every((n) => names.has(n));
  }, 2000, `devices without a lease: ${ns.extraLinks(BASE).join(' ')}`);
  const links = new Map(ns.links().map((l) => [l.ifname, l.ifindex]));
  for (const l of state().leases) t.is(links.get(l.name), l.ifindex, `lease ${l.name} has its device`);
  const listed = (await probeOnce({ socket: broker.socket, list: true })).leases!;
  t.is(listed.length, state().leases.length, 'list shows the table');
}

async function releaseAll(): Promise<void> {
  const names = state().leases.map((l) => l.name);
  if (names.length) await probeOnce({ socket: broker.socket, release: names });
}

async function killAt(point: string, run: () => Promise<void>, between?: () => void): Promise<void> {
  await broker.stop('SIGTERM', true);
  broker = await BrokerProcess.start(ns, POLICY, { dir, fault: point });
  await run();
  await broker.waitFor(() => !broker.alive, 5000, `the broker was not killed at ${point}`);
  between?.();
  broker = await BrokerProcess.start(ns, POLICY, { dir });
}

/** The lease table as another version of the broker would have written it (an upgrade between a crash and a start). */
function stampOtherVersion(): void {
  const table = JSON.parse(fs.readFileSync(broker.stateFile, 'utf8')) as Record<string, unknown>;
  fs.writeFileSync(broker.stateFile, JSON.stringify({ ...table, broker: 'tapbrokerd 0.0.1' }));
}

// Found by an outside re-test: a table another version wrote is not trusted to list every device, and its start took
// back from their tags the devices a crash left half made or half released (a persistent tap the client was told had
// failed, counted against its quota; a released one back). Only taps that go with their fds are taken back so, and
// never one the last run was deleting; a macvtap rolled back from its intent is recorded once.
const stampedCases: Array<[string, ProbeRequest | 'release']> = [
  ['tap:persisted', { bridge: 'br0', persistent: true }],
  ['macvtap:opened', { parent: 'vparent' }],
  ['retire:unleased', 'release'],
  ['release:deleted', 'release'],
];
for (const [point, request] of stampedCases) {
  test.serial(`SIGKILL at ${point}, then a start on a table of another version: nothing half made is taken back`,
    async (t) => {
      let name: string | null = null;
      let held: Awaited<ReturnType<typeof probe>> | null = null;
      if (request === 'release') {
        const made = await probeOnce({ socket: broker.socket, requests: [{ bridge: 'br0', persistent: true }] });
        name = made.taps[0]!.device.name;
      }
      await killAt(point, async () => {
        if (request === 'release') {
          t.is((await probeOnce({ socket: broker.socket, release: [name!] })).error?.code, 'TB_E_BROKER_CLOSED');
        } else {
          held = await probe({ socket: broker.socket, requests: [request] });
          t.is(held.result.error?.code, 'TB_E_BROKER_CLOSED');
        }
      }, stampOtherVersion);
      await broker.waitFor(() => ns.extraLinks(BASE).length === 0 && state().leases.length === 0, 3000,
        `left: ${ns.extraLinks(BASE).join(' ')} (leases ${state().leases.map((l) => l.name)})`);
      t.false(broker.records.some((r) => /taken back from the device's tag/.test(r.message ?? '')), 'nothing taken back');
      const ends = broker.records.filter((r) => r.op === 'reconcile' && (r.device as { name?: string } | undefined)?.name);
      t.true(new Set(ends.map((r) => (r.device as { name: string }).name)).size === ends.length, 'one record per device');
      await (held as Awaited<ReturnType<typeof probe>> | null)?.release();
      await consistent(t);
    });
}

const createCases: Array<[string, ProbeRequest]> = [
  ['tap:created', { bridge: 'br0' }],
  ['tap:configured', { bridge: 'br0' }],
  ['create:leased', { bridge: 'br0' }],
  ['tap:created', { bridge: 'br0', persistent: true }],
  ['tap:attached', { bridge: 'br0', persistent: true }],
  ['tap:configured', { bridge: 'br0', persistent: true }],
  ['tap:persisted', { bridge: 'br0', persistent: true }],
  ['create:leased', { bridge: 'br0', persistent: true }],
  ['macvtap:created', { parent: 'vparent' }],
  ['macvtap:opened', { parent: 'vparent' }],
  ['create:leased', { parent: 'vparent' }],
  ['macvtap:created', { parent: 'vparent', persistent: true }],
  ['create:leased', { parent: 'vparent', persistent: true }],
];

for (const [point, request] of createCases) {
  const what = `${'parent' in request ? 'macvtap' : 'tap'}${request.persistent ? ' (persistent)' : ''}`;
  test.serial(`SIGKILL at ${point} creating a ${what}: nothing leaks`, async (t) => {
    let held: Awaited<ReturnType<typeof probe>> | null = null;
    await killAt(point, async () => {
      held = await probe({ socket: broker.socket, requests: [request] });
      t.is(held.result.error?.code, 'TB_E_BROKER_CLOSED');
    });
    await consistent(t);
    // The client was told nothing was made (found by an outside review: a persistent device written before its
    // create finished was kept by the restart, listed and counted, with no record): nothing is.
    await broker.waitFor(() => ns.extraLinks(BASE).length === 0 && state().leases.length === 0, 3000,
      `left after a create that failed: ${ns.extraLinks(BASE).join(' ')} (leases ${state().leases.map((l) => l.name)})`);
    // A lease on disk (a persistent device, a macvtap) is rolled back by the restart, and says so.
    if (point === 'create:leased' && (request.persistent || 'parent' in request)) {
      await broker.record((r) => r.op === 'reconcile' && r.decision === 'cleanup' && /cut short/.test(r.message ?? ''));
    }
    await held!.release();
    await consistent(t);
    // Quotas are true: the caller can still fill its quota exactly.
    await releaseAll();
    const fill = await probe({ socket: broker.socket, requests: [{ bridge: 'br0' }, { bridge: 'br0' }, { bridge: 'br0' }] });
    t.is(fill.result.error, null, 'a quota of 3 is all there');
    await fill.release();
  });
}

for (const request of [{ bridge: 'br0', persistent: true }, { parent: 'vparent', persistent: true }] as ProbeRequest[]) {
  const what = 'parent' in request ? 'macvtap' : 'tap';
  test.serial(`SIGKILL once a persistent ${what}'s create is durable, before its reply: it stays, and its grant is on record`,
    async (t) => {
      // An outside review killed the broker between the write that keeps a create and its grant record: the device
      // stayed, listed and counted, with no record at all. Its record now comes first.
      let killed: BrokerProcess | null = null;
      const tapbroker = (...args: string[]) => spawnSync('setpriv', [...setprivArgs(), process.execPath, CLIENT_CLI,
        'create', '--persistent', '--socket', broker.socket, ...args], { encoding: 'utf8', timeout: 20_000 });
      await killAt('create:confirmed', async () => {
        killed = broker;
        if (what === 'tap') {
          // As the real client meets it: it says the device may be there, and how to take it.
          const r = tapbroker('--bridge', 'br0', '--name', 'tb65534-kept');
          t.regex(r.stderr, /TB_E_BROKER_CLOSED[^]*may have been made[^]*--exist-ok/);
          return;
        }
        const got = await probe({ socket: broker.socket, requests: [request] });
        t.is(got.result.error?.code, 'TB_E_BROKER_CLOSED');
        await got.release();
      });
      const [name] = ns.extraLinks(BASE);
      t.truthy(name, 'the device stays');
      t.true(killed!.records.some((r) => r.decision === 'grant' && (r.device as { name?: string } | undefined)?.name === name),
        `a grant record names ${name}`);
      await consistent(t);
      if (what === 'tap') t.regex(tapbroker('--bridge', 'br0', '--name', 'tb65534-kept', '--exist-ok').stdout, /^exists: /);
      await releaseAll();
      await consistent(t);
    });
}

test.serial('SIGKILL between a create\'s grant records and the write that keeps it: every grant on record is ended', async (t) => {
  // Found by an outside re-test: a tap and a macvtap in one create, the broker killed after their grant records and
  // before the write that keeps them; the restart rolled the macvtap back and said so, the tap went with the
  // broker's fds and its grant stayed on record with no end. Only leases on disk are recorded before that write.
  let killed: BrokerProcess | null = null;
  await killAt('create:recorded', async () => {
    killed = broker;
    const got = await probe({ socket: broker.socket, batch: true, requests: [{ bridge: 'br0' }, { parent: 'vparent' }] });
    t.is(got.result.error?.code, 'TB_E_BROKER_CLOSED');
    await got.release();
  });
  await consistent(t);
  await broker.waitFor(() => ns.extraLinks(BASE).length === 0, 3000, `left: ${ns.extraLinks(BASE).join(' ')}`);
  const named = (r: { device?: unknown }) => (r.device as { name?: string } | undefined)?.name;
  const granted = killed!.records.filter((r) => r.decision === 'grant').map(named);
  t.is(granted.length, 1, 'the macvtap\'s grant only');
  for (const name of granted) {
    await broker.record((r) => r.decision !== 'grant' && named(r) === name);
  }
});

test.serial('SIGKILL at create:leased, then root renames the device: the restart rolls back the lease, not it',
  async (t) => {
    const name = `tb${NOBODY}-cut`;
    let held: Awaited<ReturnType<typeof probe>> | null = null;
    await broker.stop('SIGTERM', true);
    broker = await BrokerProcess.start(ns, POLICY, { dir, fault: 'create:leased' });
    held = await probe({ socket: broker.socket, requests: [{ bridge: 'br0', persistent: true, name }] });
    t.is(held.result.error?.code, 'TB_E_BROKER_CLOSED');
    await broker.waitFor(() => !broker.alive, 5000, 'the broker was not killed at create:leased');
    ns.ip('link', 'set', 'dev', name, 'name', 'uplink-cut');
    broker = await BrokerProcess.start(ns, POLICY, { dir });
    const rec = await broker.record((r) => r.decision === 'cleanup' && (r.device as { name?: string }).name === name);
    t.regex(rec.message ?? '', /is `uplink-cut' \(tun\) now, no longer this lease's: left alone; lease dropped/);
    t.truthy(ns.link('uplink-cut'), 'the renamed device is untouched');
    t.falsy(ns.link('uplink-cut')?.ifalias, 'and no longer carries the broker\'s tag');
    t.deepEqual(state().leases, []);
    await held.release();
    ns.ip('link', 'del', 'uplink-cut');
  });

test.serial('SIGKILL while the second NIC of a create is made: the first one, persistent, is gone after the restart', async (t) => {
  let held: Awaited<ReturnType<typeof probe>> | null = null;
  await killAt('macvtap:created', async () => {
    held = await probe({ socket: broker.socket, batch: true,
      requests: [{ bridge: 'br0', persistent: true }, { parent: 'vparent' }] });
    t.is(held.result.error?.code, 'TB_E_BROKER_CLOSED');
  });
  try {
    await broker.waitFor(() => ns.extraLinks(BASE).length === 0 && state().leases.length === 0, 3000,
      `left after a create that failed: ${ns.extraLinks(BASE).join(' ')}`);
    await broker.record((r) => r.op === 'reconcile' && r.decision === 'cleanup' && r.device?.['ends'] === 'release');
    t.deepEqual(broker.records.filter((r) => r.decision === 'grant'), [], 'nothing was granted');
    await consistent(t);
  } finally {
    await held!.release();
  }
});

// Found by an outside review: the restart opened one pidfd per macvtap lease (at run time a VM's share one); under
// a low fd limit it ran out, took a live VM's macvtap for one whose holder had exited, and deleted it.
test.serial('after a restart one VM\'s macvtaps are watched through one pidfd, and all go when the VM does', async (t) => {
  const d2 = tempDir('kill-fds');
  const policy = `[[rule]]\nname = "m"\nusers = [${NOBODY}]\nmacvtap = [{ parent = "vparent" }]\nmax_devices = 8\n`;
  let b = await BrokerProcess.start(ns, policy, { dir: d2, tag: 'kfd' });
  const held = await probe({ socket: b.socket, batch: true, requests: Array(8).fill({ parent: 'vparent' }) });
  try {
    t.is(held.result.error, null, held.result.error?.message);
    await b.stop('SIGKILL', true);
    b = await BrokerProcess.start(ns, policy, { dir: d2, tag: 'kfd' });
    const fds = fs.readdirSync(`/proc/${b.proc.pid}/fd`).map((fd) => {
      try {
        return fs.readlinkSync(`/proc/${b.proc.pid}/fd/${fd}`);
      } catch {
        return '';
      }
    });
    t.is(fds.filter((f) => f === 'anon_inode:[pidfd]').length, 1, 'one pidfd for the holder of eight');
    t.is((await probeOnce({ socket: b.socket, list: true })).leases!.length, 8, 'every macvtap kept and watched');
    await held.release();
    await b.waitFor(() => ns.extraLinks(BASE).length === 0, 3000, `left after the VM exited: ${ns.extraLinks(BASE)}`);
    const ended = () => b.records.filter((r) => r.decision === 'cleanup' && /its holder exited/.test(r.message ?? ''));
    await b.waitFor(() => ended().length >= 8, 3000, `${ended().length} cleanup records`);
    t.is(ended().length, 8);
  } finally {
    await held.release();
    await b.stop();
    fs.rmSync(d2, { recursive: true, force: true });
  }
});

// Found by an outside review: a second broker on the same state directory started, the two wrote the lease table
// over each other, and one's persistent tap was later deleted as an orphan. The second now refuses to start.
test.serial('a second broker on the same state directory refuses to start, and the first serves on', async (t) => {
  const other = path.join(dir, 'second.sock');
  const r = spawnSync('ip', ['netns', 'exec', ns.name, process.execPath, BROKER_MAIN, '-f', broker.policyPath, '-s', other,
    '--state-dir', path.dirname(broker.stateFile), '--journal-socket', ''], { encoding: 'utf8', timeout: 20_000 });
  t.is(r.status, 69, r.stderr);
  t.regex(r.stderr, /another tapbrokerd uses the state directory .*; refusing to start/);
  t.false(fs.existsSync(other), 'it did not bind its socket');
  const made = await probeOnce({ socket: broker.socket, requests: [{ bridge: 'br0', persistent: true }] });
  t.is(made.error, null);
  await releaseAll();
});

for (const point of ['retire:unleased', 'release:deleted']) {
  test.serial(`SIGKILL at ${point}: the device is gone after the restart and nothing leaks`, async (t) => {
    const made = await probeOnce({ socket: broker.socket, requests: [{ bridge: 'br0', persistent: true }] });
    const name = made.taps[0]!.device.name;
    await killAt(point, async () => {
      const r = await probeOnce({ socket: broker.socket, release: [name] });
      t.is(r.error?.code, 'TB_E_BROKER_CLOSED');
    });
    await broker.waitFor(() => ns.link(name) === undefined, 2000, `${name} survived its release`);
    await consistent(t);
  });
}

// Found by an outside review: a broker killed while the kernel deleted a released device (on a pool thread) left
// no record of it, at that start or any later: the lease had left the table. Its record is owed in the table now.
test.serial('SIGKILL after a release\'s deletion, before its record: the next start writes the record', async (t) => {
  const made = await probeOnce({ socket: broker.socket, requests: [{ bridge: 'br0', persistent: true }] });
  const name = made.taps[0]!.device.name;
  await killAt('retire:deleted', async () => {
    const r = await probeOnce({ socket: broker.socket, release: [name] });
    t.is(r.error?.code, 'TB_E_BROKER_CLOSED');
  });
  t.is(ns.link(name), undefined, 'the kernel deleted it');
  const rec = await broker.record((r) => r.op === 'release' && (r.device as { name?: string }).name === name);
  t.is(rec.decision, 'release');
  t.regex(rec.message ?? '', /^released \(recorded at this start: the broker stopped while deleting it; a record of this end may precede this one\)$/);
  t.deepEqual((JSON.parse(fs.readFileSync(broker.stateFile, 'utf8')) as { retiring: unknown[] }).retiring, [],
    'owed no more');
  await consistent(t);
});

test.serial('a lost lease table is rebuilt from the devices\' tags: persistent devices stay and stay releasable', async (t) => {
  const made = await probeOnce({ socket: broker.socket, requests: [{ bridge: 'br0', persistent: true }, { parent: 'vparent', persistent: true }] });
  t.is(made.error, null);
  await broker.stop('SIGKILL', true);
  fs.rmSync(broker.stateFile);
  broker = await BrokerProcess.start(ns, POLICY, { dir });
  const listed = (await probeOnce({ socket: broker.socket, list: true })).leases!;
  t.deepEqual(listed.map((l) => l.name).sort(), made.taps.map((x) => x.device.name).sort());
  t.like(listed.find((l) => l.kind === 'tap'), { uid: NOBODY, user: 'nobody', rule: 'f', ends: 'release', parent: 'br0' });
  await releaseAll();
  t.deepEqual(ns.extraLinks(BASE), []);
});
