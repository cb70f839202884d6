// Named networks: a Linux bridge by the admin's name, bridge VLANs (absent on this kernel: a clear
// refusal), and plug hooks run by the broker — recording their calls, failing, hanging, printing garbage.
import anyTest, { type TestFn } from 'ava';
import { execFileSync, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { BROKER_MAIN, BrokerProcess, CLIENT_CLI, tempDir } from '../helpers/broker.js';
import { brokerFixture } from '../helpers/fixture.js';
import { Netns } from '../helpers/netns.js';
import { NOBODY, probe, probeOnce, setprivArgs, spawnAs } from '../helpers/unpriv.js';

const test = anyTest as TestFn;
let dir: string;
let log: string;
/** The policy hookPolicy() wrote, for brokers of the tests' own. */
let policyText = '';
const BASE = ['br0', 'br-hook'];

function script(name: string, body: string, mode = 0o755): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, `#!/bin/sh\n${body}\n`);
  fs.chmodSync(file, mode);
  return file;
}

/** Makes the broker's directory with the hook scripts in it; returns the policy that names them. */
function hookPolicy(): string {
  policyText = makeHookPolicy();
  return policyText;
}

function makeHookPolicy(): string {
  dir = tempDir('nets');
  log = path.join(dir, 'hook.log');
  // A hook that records its argv and environment, then plugs the tap into br-hook itself.
  const plug = script('plug', `echo "$@ | env: $(env | sort | tr '\\n' ' ')" >> ${log}\nif [ "$1" = up ]; then ip link set "$2" master br-hook; fi\necho "plugged $2"`);
  const fail = script('fail', 'echo "no such segment" >&2; exit 3');
  const hang = script('hang', 'sleep 60');
  const garbage = script('garbage', "printf '\\001\\377binary\\033[31m\\n'; exit 0");
  // A hook whose down takes a while, and says when it is done.
  // Its down waits for the test's word (a file), up to 20 s: a sleep ran out on a loaded machine before the test asked.
  const slow = script('slow', `if [ "$1" = down ]; then i=0; while [ ! -e ${log}.go ] && [ $i -lt 400 ]; do sleep 0.05; `
    + `i=$((i+1)); done; fi\necho "$1-done $2" >> ${log}`);
  // A hook whose down takes longer, and says when each starts.
  const slower = script('slower', `if [ "$1" = down ]; then echo "slower-down-start $2" >> ${log}; sleep 4; fi`);
  // A hook whose up takes a while, and says when each action starts and ends.
  const slowUp = script('slowup', `echo "$1-start $2" >> ${log}\nif [ "$1" = up ]; then touch ${log}.up; sleep 1.5; fi\necho "$1-end $2" >> ${log}`);
  // A hook whose up waits for the test's word (a file), up to 20 s, and says when it starts.
  const gated = script('gated', `if [ "$1" = up ]; then touch ${log}.gated; i=0; while [ ! -e ${log}.gate ] && [ $i -lt 400 ]; `
    + 'do sleep 0.05; i=$((i+1)); done; fi');
  // A hook the test makes unrunnable for a while (a missing interpreter: the kernel refuses the exec).
  script('swap', `echo "$1-done $2" >> ${log}`);
  return `
[network.swapped]
hook = "${path.join(dir, 'swap')}"

[network.lab]
bridge = "br0"

[network.lab100]
bridge = "br0"
vlan = 100

[network.custom]
hook = "${plug}"

[network.broken]
hook = "${fail}"

[network.stuck]
hook = "${hang}"
hook_timeout = 1

[network.noisy]
hook = "${garbage}"

[network.slowdown]
hook = "${slow}"

[network.slowup]
hook = "${slowUp}"

[network.slowerdown]
hook = "${slower}"

[network.gated]
hook = "${gated}"

[[rule]]
name = "nets"
users = [${NOBODY}]
networks = ["lab", "lab100", "custom", "broken", "stuck", "noisy", "slowdown", "slowup", "slowerdown", "gated", "swapped"]
persistent = true
`;
}

const fx = brokerFixture(test, {
  tag: 'nets', policy: hookPolicy, bridges: ['br0', 'br-hook'], start: () => ({ dir }),
});

test.after.always(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

const sock = () => fx.broker.socket;

/** A restarted broker ran the `down` owed for device `name`, and recorded it. */
async function ranDown(b: BrokerProcess, name: string): Promise<void> {
  await b.waitFor(() => fs.readFileSync(log, 'utf8').includes(`down-done ${name}`), 5000, 'the restarted broker never ran down');
  await b.record((r) => r.decision === 'unplug' && r.message === 'unplugged from its network'
    && (r.device as { name?: string }).name === name);
}

test.serial('network=lab: a tap on the bridge the admin named, recorded as that network', async (t) => {
  const p = await probe({ socket: sock(), requests: [{ network: 'lab' }] });
  try {
    t.is(p.result.error, null, p.result.error?.message);
    t.like(p.result.taps[0]!.device, { network: 'lab', parent: 'br0', vlan: null });
    t.is(fx.ns.link(p.result.taps[0]!.device.name)?.master, 'br0');
  } finally {
    await p.release();
  }
});

// Found by an outside review of an administrator's week: a reload that moved a network said nothing of the VMs it
// leaves where they were. The reload's log line and record name the network, where it is now and was, and how many
// live devices stay.
test.serial('a reload that moves a network with live devices says so; they stay, new ones go where it is now', async (t) => {
  const p = await probe({ socket: sock(), requests: [{ network: 'lab' }] });
  const policy = fx.broker.policyPath;
  const before = fs.readFileSync(policy, 'utf8');
  try {
    t.is(p.result.error, null, p.result.error?.message);
    fs.writeFileSync(policy, before.replace('[network.lab]\nbridge = "br0"', '[network.lab]\nbridge = "br-hook"'));
    fx.broker.proc.kill('SIGHUP');
    const said = "network `lab' is bridge br-hook now: its 1 live device(s) stay where they were plugged (bridge br0) "
      + 'until they end';
    const r = await fx.broker.record((x) => x.op === 'reload' && x.decision === 'reload' && x.message!.includes(said));
    t.regex(r.message!, /replaced by/);
    t.true(fx.broker.stderr.includes(`warning: ${said}`));
    t.is(fx.ns.link(p.result.taps[0]!.device.name)?.master, 'br0', 'the live device stays');
    const next = await probeOnce({ socket: sock(), requests: [{ network: 'lab' }] });
    t.like(next.taps[0]?.device, { network: 'lab', parent: 'br-hook' });
  } finally {
    await p.release();
    fs.writeFileSync(policy, before);
    fx.broker.proc.kill('SIGHUP');
    await fx.broker.record((x) => x.op === 'reload' && x.decision === 'reload' && /replaced by/.test(x.message!)
      && !x.message!.includes('br-hook now'));
  }
});

test.serial('a network the rule does not list, and a bridge= the rule does not list, are refused', async (t) => {
  t.is((await probeOnce({ socket: sock(), requests: [{ network: 'nope' }] })).error?.code, 'TB_E_POLICY_DENIED');
  const r = await probeOnce({ socket: sock(), requests: [{ bridge: 'br0' }] });
  t.is(r.error?.code, 'TB_E_POLICY_DENIED', 'a network grant does not grant its bridge by name');
  t.deepEqual(fx.ns.extraLinks(BASE), []);
});

test.serial('a bridge VLAN where the kernel has no VLAN filtering: a clear refusal, nothing made', async (t) => {
  const r = await probeOnce({ socket: sock(), requests: [{ network: 'lab100' }] });
  t.is(r.error?.code, 'TB_E_VLAN_UNAVAILABLE');
  t.regex(r.error!.message, /^vlan filtering unavailable on br0/);
  t.deepEqual(fx.ns.extraLinks(BASE), []);
});

// Whether this kernel can filter VLANs on a bridge at all: decides the next test.
const probeNs = Netns.create('vlanprobe');
probeNs.bridge('brv');
const canFilter = spawnSync('ip', ['-n', probeNs.name, 'link', 'set', 'brv', 'type', 'bridge', 'vlan_filtering', '1']).status === 0;
probeNs.destroy();
if (!canFilter) console.log('# skip bridge VLAN traffic: this kernel cannot turn on bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING off); the netlink encoding is unit-tested');

(canFilter ? test.serial : test.skip)(`an access port on VLAN 100 of a filtering bridge${canFilter ? '' : ' (skipped: no bridge VLAN filtering in this kernel)'}`, async (t) => {
  fx.ns.ip('link', 'set', 'br0', 'type', 'bridge', 'vlan_filtering', '1');
  try {
    const p = await probe({ socket: sock(), requests: [{ network: 'lab100' }] });
    t.is(p.result.error, null, p.result.error?.message);
    const vlans = spawnSync('bridge', ['-n', fx.ns.name, '-j', 'vlan', 'show', 'dev', p.result.taps[0]!.device.name], { encoding: 'utf8' }).stdout;
    t.regex(vlans, /"vlan":100,"flags":\["PVID","Egress Untagged"\]/);
    await p.release();
  } finally {
    fx.ns.ip('link', 'set', 'br0', 'type', 'bridge', 'vlan_filtering', '0');
  }
  t.deepEqual(fx.ns.extraLinks(BASE), []);
});

test.serial('a plug hook: run up with fixed argv and documented variables only, plugs the device; down when it is gone', async (t) => {
  fs.rmSync(log, { force: true });
  const p = await probe({ socket: sock(), requests: [{ network: 'custom' }] });
  const d = p.result.taps[0]!.device;
  t.is(p.result.error, null, p.result.error?.message);
  t.like(d, { network: 'custom', parent: '-' });
  t.is(fx.ns.link(d.name)?.master, 'br-hook', 'the hook plugged it');
  const up = fs.readFileSync(log, 'utf8').trim();
  t.true(up.startsWith(`up ${d.name} ifindex=${d.ifindex} mac=${d.mac} uid=${NOBODY} network=custom lease=`), up);
  // sh itself adds PWD, SHLVL and _; everything else came from the broker.
  const env = up.split(' | env: ')[1]!.trim().split(' ').map((kv) => kv.split('=')[0]!).filter((k) => !['PWD', 'SHLVL', '_', 'OLDPWD'].includes(k)).sort();
  t.deepEqual(env, ['PATH', 'TAPBROKER_ACTION', 'TAPBROKER_DEVICE', 'TAPBROKER_IFINDEX', 'TAPBROKER_LEASE', 'TAPBROKER_MAC', 'TAPBROKER_NETWORK', 'TAPBROKER_RUN', 'TAPBROKER_UID']);
  const grant = await fx.broker.record((r) => r.decision === 'grant' && (r.device as { name: string }).name === d.name);
  t.like((grant.device as { plug: Record<string, unknown> }).plug, { action: 'up', code: 0, stdout: `plugged ${d.name}\n` });
  await p.release();
  await fx.broker.waitFor(() => fs.readFileSync(log, 'utf8').includes(`down ${d.name}`), 3000, 'no down call');
  t.true(fs.readFileSync(log, 'utf8').includes(`down ${d.name}`), 'the hook\'s down ran');
  // One record of the device's end, and one of its network's down under an op of its own (an outside review
  // counted two cleanups per device).
  const about = (op: string) => (r: { op: string; device?: unknown }) => r.op === op
    && (r.device as { name?: string } | undefined)?.name === d.name;
  await fx.broker.record(about('unplug'));
  t.is(fx.broker.records.filter(about('cleanup')).length, 1, 'one cleanup: the device\'s end');
  t.is(fx.broker.records.find(about('unplug'))!.decision, 'unplug', 'with a decision (and MESSAGE_ID) of its own');
});

test.serial('one MAC on two hook networks is granted; twice on one is refused before anything is made', async (t) => {
  // Found by a re-test: every hook network counted as one segment (its place is its hook's), so one MAC on two of
  // them was refused as a duplicate.
  const mac = '52:54:00:6b:00:01';
  const two = await probe({ socket: sock(), batch: true, requests: [{ network: 'custom', mac }, { network: 'noisy', mac }] });
  t.is(two.result.error, null, two.result.error?.message);
  await two.release();
  const twice = await probeOnce({ socket: sock(), batch: true, requests: [{ network: 'custom', mac }, { network: 'custom', mac }] });
  t.is(twice.error?.code, 'TB_E_INVALID_REQUEST');
  t.regex(twice.error?.message ?? '', /asks for MAC 52:54:00:6b:00:01 on network `custom' too/);
  t.is(twice.error?.nic, 1);
});

test.serial('a name is not given out again while its last device\'s down still runs', async (t) => {
  // Found by an outside review: the old lease's `down NAME` ran across the new lease's `up NAME`, and a hook that
  // acts on the name (nft … iifname NAME) undid the new device's `up`.
  const name = `tb${NOBODY}-slow`;
  const first = await probe({ socket: sock(), requests: [{ network: 'slowdown', name }] });
  t.is(first.result.error, null, first.result.error?.message);
  await first.release();
  await fx.broker.waitFor(() => fx.ns.link(name) === undefined, 3000, 'the first device stayed');
  const again = await probeOnce({ socket: sock(), requests: [{ network: 'slowdown', name }] });
  fs.writeFileSync(`${log}.go`, '');
  t.is(again.error?.code, 'TB_E_BUSY', JSON.stringify(again.error));
  t.regex(again.error?.message ?? '', /still being plugged into or unplugged from its network/);
  await fx.broker.waitFor(() => fs.readFileSync(log, 'utf8').includes(`down-done ${name}`), 5000, 'down never finished');
  const third = await probeOnce({ socket: sock(), requests: [{ network: 'slowdown', name }] });
  t.is(third.error, null, `after its down: ${third.error?.message}`);
});

// Found by an outside review of hook networks: a user deleted its own persistent tap while the tap's `up` ran (it may
// clear the persist flag) and asked for the name again at once: granted, and the new lease's `up` overlapped the old
// one's `up`, then the old one's rollback `down`. The name is held from a create's `up` to its end. (Root deletes the
// device here: the same deletion, made without a helper.)
test.serial('a name is not given out again while a create of that name plugs it, nor until its rollback\'s down ends', async (t) => {
  for (const f of [`${log}.gated`, `${log}.gate`]) fs.rmSync(f, { force: true });
  const name = `tb${NOBODY}-upk`;
  t.teardown(() => {
    fs.writeFileSync(`${log}.gate`, '');
    if (fx.ns.link(name)) fx.ns.ip('link', 'del', name);
  });
  const first = probeOnce({ socket: sock(), requests: [{ network: 'gated', name, persistent: true }] });
  await fx.broker.waitFor(() => fs.existsSync(`${log}.gated`), 5000, 'up never started');
  fx.ns.ip('link', 'del', name);
  const during = await probeOnce({ socket: sock(), requests: [{ network: 'gated', name, persistent: true }] });
  t.is(during.error?.code, 'TB_E_BUSY', JSON.stringify(during.error));
  t.regex(during.error?.message ?? '', /still being plugged into or unplugged from its network/);
  fs.writeFileSync(`${log}.gate`, '');
  const r = await first;
  t.is(r.error?.code, 'TB_E_KERNEL');
  t.regex(r.error?.message ?? '', /deleted or renamed while it was being made/);
  // Its record carries what its `up` did (it ran: what it did is undone by the `down`).
  const failed = await fx.broker.record((x) => x.decision === 'error' && (x.device as { name?: string })?.name === name);
  t.like((failed.device as { plug?: unknown }).plug, { action: 'up', code: 0 });
  // Its rollback's down ran; the name is free again.
  fs.rmSync(`${log}.gated`, { force: true });
  const after = await probe({ socket: sock(), requests: [{ network: 'gated', name, persistent: true }] });
  try {
    t.is(after.result.error, null, after.result.error?.message);
  } finally {
    await after.release();
  }
});

// Found by an outside review: with the broker at its task limit (one user's hook processes), root's `down` could not
// be started (spawn EAGAIN), was recorded as the hook's answer, and never ran. A hook the kernel will not start for
// want of processes, memory or fds gave no answer: its down is tried again, as one killed by someone else is. Here the
// broker's open-files limit is what stops it, for real (EMFILE: the spawn's pipes), lowered on the running broker.
// One that cannot start at all (its interpreter gone) gave its answer: recorded once, not tried again.
test.serial('a down the kernel will not start for want of fds is tried again, and runs once it can', async (t) => {
  const pid = fx.broker.proc.pid!;
  const hard = /^Max open files\s+\S+\s+(\S+)/m.exec(fs.readFileSync(`/proc/${pid}/limits`, 'utf8'))![1]!;
  const soft = /^Max open files\s+(\S+)/m.exec(fs.readFileSync(`/proc/${pid}/limits`, 'utf8'))![1]!;
  const limit = (n: string) => execFileSync('prlimit', ['--pid', String(pid), `--nofile=${n}:${hard}`]);
  t.teardown(() => limit(soft));
  const p = await probe({ socket: sock(), requests: [{ network: 'swapped' }] });
  t.is(p.result.error, null, p.result.error?.message);
  const name = p.result.taps[0]!.device.name;
  limit(String(fs.readdirSync(`/proc/${pid}/fd`).length - 8));
  await p.release();
  const failed = await fx.broker.record((r) => r.op === 'unplug' && r.decision === 'error'
    && (r.device as { name?: string }).name === name);
  limit(soft);
  t.regex(failed.message ?? '', /could not run: .*EMFILE.*; trying again in 1 s$/);
  await fx.broker.waitFor(() => fs.readFileSync(log, 'utf8').includes(`down-done ${name}`), 10_000, 'the down never ran');
  // An interpreter gone: the down's answer, once.
  const hook = path.join(dir, 'swap');
  const good = fs.readFileSync(hook);
  t.teardown(() => fs.writeFileSync(hook, good));
  const q = await probe({ socket: sock(), requests: [{ network: 'swapped' }] });
  const other = q.result.taps[0]!.device.name;
  fs.writeFileSync(hook, '#!/nonexistent/interpreter\n');
  await q.release();
  const broken = await fx.broker.record((r) => r.op === 'unplug' && r.decision === 'error'
    && (r.device as { name?: string }).name === other);
  t.regex(broken.message ?? '', /could not run: .*ENOENT[^;]*$/, 'not tried again');
});

// Found by an outside re-test: Node throws most spawn failures (ETXTBSY, ENOMEM) instead of emitting them, and those
// skipped the sorting above: an `up` that could not start was TB_E_INTERNAL, and a `down` was lost, not tried again.
// Here the hook's file is open for writing (an administrator's `cp` over it), for real: the kernel will not run it.
test.serial('a hook being written (ETXTBSY): the up is refused as the hook\'s, the down tried again until it runs', async (t) => {
  const hook = path.join(dir, 'swap');
  const p = await probe({ socket: sock(), requests: [{ network: 'swapped' }] });
  t.is(p.result.error, null, p.result.error?.message);
  const name = p.result.taps[0]!.device.name;
  let writer: number | null = fs.openSync(hook, 'r+');
  t.teardown(() => { if (writer !== null) fs.closeSync(writer); });
  const up = await probeOnce({ socket: sock(), requests: [{ network: 'swapped' }] });
  t.is(up.error?.code, 'TB_E_HOOK_FAILED', JSON.stringify(up.error));
  const upRecord = await fx.broker.record((x) => x.decision === 'error' && x.code === 'TB_E_HOOK_FAILED' && x.pid === up.pid);
  t.regex(upRecord.message ?? '', /could not run: .*ETXTBSY/);
  await p.release();
  const failed = await fx.broker.record((r) => r.op === 'unplug' && r.decision === 'error'
    && (r.device as { name?: string }).name === name);
  t.regex(failed.message ?? '', /could not run: .*ETXTBSY.*; trying again in 1 s$/);
  fs.closeSync(writer);
  writer = null;
  await fx.broker.waitFor(() => fs.readFileSync(log, 'utf8').includes(`down-done ${name}`), 10_000, 'the down never ran');
});

// Found by an outside review: a broker that exits when idle (--idle-exit, socket activation) counted only connections
// and leases, and went with a `down` (or an Open vSwitch port removal) still to be tried again: the port stayed until
// its next start. A `down` waiting to be tried again keeps it running; it exits once the `down` has run.
test.serial('--idle-exit waits for a network\'s down that is to be tried again, and exits once it has run', async (t) => {
  const hook = path.join(dir, 'swap');
  const b = await BrokerProcess.start(fx.ns, policyText, { tag: 'idle-down', args: ['--journal-socket', '', '--idle-exit', '1'] });
  let writer: number | null = null;
  try {
    const p = await probe({ socket: b.socket, requests: [{ network: 'swapped' }] });
    t.is(p.result.error, null, p.result.error?.message);
    const name = p.result.taps[0]!.device.name;
    writer = fs.openSync(hook, 'r+');
    await p.release();
    await b.record((r) => r.op === 'unplug' && r.decision === 'error' && (r.device as { name?: string }).name === name);
    // Well past its idle second, with its `down` owed: still running (a bounded look at something that must not happen).
    await new Promise((r) => setTimeout(r, 2500));
    t.true(b.alive, 'the broker exited with a down still to run');
    fs.closeSync(writer);
    writer = null;
    await b.waitFor(() => fs.readFileSync(log, 'utf8').includes(`down-done ${name}`), 15_000, 'the down never ran');
    await b.waitFor(() => !b.alive, 10_000, 'the broker did not exit once idle');
    t.is(b.proc.exitCode, 0);
  } finally {
    if (writer !== null) fs.closeSync(writer);
    await b.stop();
  }
});

// Found by an outside review: a lease's `down` runs once the lease has left the table (and its quota), and nothing
// counted it: one user with max_devices = 2, creating and ending leases in a loop, kept 104 root hook processes
// running at once. A uid's running downs count as its teardowns: past 32, its new devices wait (TB_E_BUSY).
test.serial('a uid\'s downs still running count as its teardowns: past 32, its grants wait', async (t) => {
  const many = await probe({ socket: sock(), batch: true, requests: Array(33).fill({ network: 'slowerdown' }) });
  t.is(many.result.error, null, many.result.error?.message);
  await many.release();
  const started = () => fs.readFileSync(log, 'utf8').split('\n').filter((l) => l.startsWith('slower-down-start')).length;
  await fx.broker.waitFor(() => started() >= 33, 10_000, `${started()} downs started`);
  const busy = await probeOnce({ socket: sock(), requests: [{ network: 'lab' }] });
  t.is(busy.error?.code, 'TB_E_BUSY', JSON.stringify(busy.error));
  t.regex(busy.error?.message ?? '', /still being torn down or unplugged/);
  const unplugged = () => fx.broker.records.filter((r) => r.op === 'unplug'
    && /unplugged from its network/.test(r.message ?? '') && JSON.stringify(r.device).includes('/slower"')).length;
  await fx.broker.waitFor(() => unplugged() >= 33, 10_000, `${unplugged()} downs finished`);
  const after = await probe({ socket: sock(), requests: [{ network: 'lab' }] });
  t.is(after.result.error, null, `once they are done: ${after.result.error?.message}`);
  await after.release();
});

test.serial('a lease on a hook network that ended while the broker was down gets its down at the next start', async (t) => {
  // Found by an outside review: the restarted broker dropped the lease and never ran the hook's down.
  const bdir = tempDir('nets-restart');
  let b = await BrokerProcess.start(fx.ns, policyText, { tag: 'netsr', dir: bdir });
  try {
    const p = await probe({ socket: b.socket, requests: [{ network: 'slowdown' }] });
    t.is(p.result.error, null, p.result.error?.message);
    const name = p.result.taps[0]!.device.name;
    await b.stop('SIGTERM', true);
    await p.release();
    await fx.broker.waitFor(() => fx.ns.link(name) === undefined, 3000, 'the device outlived its holder');
    t.false(fs.readFileSync(log, 'utf8').includes(`down-done ${name}`), 'nobody ran down while the broker was down');
    b = await BrokerProcess.start(fx.ns, policyText, { tag: 'netsr', dir: bdir });
    await ranDown(b, name);
  } finally {
    await b.stop();
    fs.rmSync(bdir, { recursive: true, force: true });
  }
});

// Found by an outside review: a service manager stops the unit by signalling its whole cgroup, the broker and a running
// hook at once (every package upgrade restarts it); the broker took the hook's death for its answer and dropped the
// `down` for good. (The unit now signals the broker alone, KillMode=mixed; the broker must not lose it either way.)
test.serial('a down killed with the broker at a stop (a whole cgroup signalled) runs again at the next start', async (t) => {
  const bdir = tempDir('nets-cut');
  let b = await BrokerProcess.start(fx.ns, policyText, { tag: 'netsc', dir: bdir });
  try {
    fs.rmSync(`${log}.go`, { force: true });
    const p = await probe({ socket: b.socket, requests: [{ network: 'slowdown' }] });
    t.is(p.result.error, null, p.result.error?.message);
    const name = p.result.taps[0]!.device.name;
    await p.release();
    // Its down runs (waiting for the word that never comes): found by its argv, as `ps` shows it.
    const hook = `${dir}/slow down ${name}`;
    const downPid = () => spawnSync('ps', ['-eo', 'pid=,args='], { encoding: 'utf8' }).stdout.split('\n')
      .find((l) => l.includes(hook))?.trim().split(/\s+/)[0];
    await b.waitFor(() => downPid() !== undefined, 5000, 'its down never started');
    const pid = Number(downPid());
    process.kill(-pid, 'SIGTERM');
    b.proc.kill('SIGTERM');
    await b.stop('SIGTERM', true);
    t.false(fs.readFileSync(log, 'utf8').includes(`down-done ${name}`), 'the down was cut short');
    fs.writeFileSync(`${log}.go`, '');
    b = await BrokerProcess.start(fx.ns, policyText, { tag: 'netsc', dir: bdir });
    await ranDown(b, name);
  } finally {
    await b.stop();
    fs.rmSync(bdir, { recursive: true, force: true });
  }
});

// Found by an outside review: a lost lease table is rebuilt from the devices' tags, and a tag named the network but
// not how the device was plugged: every rebuilt hook lease lost its `down` (a VM's tap, a persistent one).
test.serial('a lease rebuilt from its tag after the table was lost still gets its network\'s down', async (t) => {
  const bdir = tempDir('nets-lost');
  let b = await BrokerProcess.start(fx.ns, policyText, { tag: 'netsl', dir: bdir });
  try {
    const vm = await probe({ socket: b.socket, requests: [{ network: 'slowdown' }] });
    t.is(vm.result.error, null, vm.result.error?.message);
    const made = await probeOnce({ socket: b.socket, requests: [{ network: 'slowdown', persistent: true }] });
    t.is(made.error, null, made.error?.message);
    const [tap, pet] = [vm.result.taps[0]!.device.name, made.taps[0]!.device.name];
    await b.stop('SIGKILL', true);
    fs.writeFileSync(b.stateFile, '{"version":1,"leas');
    b = await BrokerProcess.start(fx.ns, policyText, { tag: 'netsl', dir: bdir });
    t.regex(b.stderr, /leases\.json is not JSON/);
    await b.record((r) => r.op === 'reconcile' && (r.device as { name?: string }).name === pet
      && /network `slowdown' unplugs it as the policy plugs it now/.test(r.message ?? ''));
    await vm.release();
    t.is((await probeOnce({ socket: b.socket, release: [pet] })).error, null);
    for (const name of [tap, pet]) {
      await b.waitFor(() => fs.readFileSync(log, 'utf8').includes(`down-done ${name}`), 5000, `no down for ${name}`);
    }
  } finally {
    await b.stop();
    fs.rmSync(bdir, { recursive: true, force: true });
  }
});

test.serial('a persistent device on a hook network whose release the broker died in gets its down at the next start', async (t) => {
  // Found by an outside code review: the lease left the table before its device was deleted, and a device's tag
  // does not say how it was plugged: the restarted broker deleted it as an orphan and never ran the hook's down.
  const bdir = tempDir('nets-kill');
  let b = await BrokerProcess.start(fx.ns, policyText, { tag: 'netsk', dir: bdir, fault: 'retire:unleased' });
  try {
    const made = await probeOnce({ socket: b.socket, requests: [{ network: 'slowdown', persistent: true }] });
    t.is(made.error, null, made.error?.message);
    const name = made.taps[0]!.device.name;
    const r = await probeOnce({ socket: b.socket, release: [name] });
    t.is(r.error?.code, 'TB_E_BROKER_CLOSED');
    await b.waitFor(() => !b.alive, 5000, 'the broker was not killed mid-release');
    t.not(fx.ns.link(name), undefined, 'killed before the device was deleted');
    b = await BrokerProcess.start(fx.ns, policyText, { tag: 'netsk', dir: bdir });
    await ranDown(b, name);
    t.is(fx.ns.link(name), undefined, 'the device is gone');
    t.deepEqual((JSON.parse(fs.readFileSync(b.stateFile, 'utf8')) as { downs: unknown[] }).downs, [], 'nothing owed');
  } finally {
    await b.stop();
    fs.rmSync(bdir, { recursive: true, force: true });
  }
});

// Found by an outside fault review: a broker killed while a hook's `up` ran left the `up` running; the restart ran
// `down` at once, and the `up` finished after it (whatever it set up stayed for good). And the device, persistent,
// was kept as a lease though its client was told the create failed.
test.serial('a broker killed during a hook\'s up: the restart kills the up, then rolls the device back and runs down', async (t) => {
  fs.rmSync(`${log}.up`, { force: true });
  const bdir = tempDir('nets-upkill');
  const name = `tb${NOBODY}-upk`;
  let b = await BrokerProcess.start(fx.ns, policyText, { tag: 'netsu', dir: bdir });
  const hookProcs = () => fs.readdirSync('/proc').filter((d) => /^\d+$/.test(d)).filter((pid) => {
    try {
      return fs.readFileSync(`/proc/${pid}/environ`, 'latin1').includes(`TAPBROKER_DEVICE=${name}\0`)
        && !/^\d+ \(.*\) Z/.test(fs.readFileSync(`/proc/${pid}/stat`, 'latin1'));
    } catch {
      return false;
    }
  });
  try {
    const asked = probeOnce({ socket: b.socket, requests: [{ network: 'slowup', name, persistent: true }] });
    await b.waitFor(() => fs.existsSync(`${log}.up`), 5000, 'up never started');
    await b.stop('SIGKILL', true);
    t.is((await asked).error?.code, 'TB_E_BROKER_CLOSED');
    t.true(hookProcs().length > 0, 'its up still runs');
    b = await BrokerProcess.start(fx.ns, policyText, { tag: 'netsu', dir: bdir });
    await b.waitFor(() => hookProcs().length === 0, 2000, `the up still runs: ${hookProcs()}`);
    await b.waitFor(() => fs.readFileSync(log, 'utf8').includes(`down-end ${name}`), 5000, 'down never ran');
    t.is(fx.ns.link(name), undefined, 'the device its client was told failed is gone');
    const lines = fs.readFileSync(log, 'utf8').split('\n').filter((l) => l.endsWith(` ${name}`));
    t.deepEqual(lines, [`up-start ${name}`, `down-start ${name}`, `down-end ${name}`], 'the up never finished');
    t.regex(b.stderr, /killed \d+ process\(es\) started by the plug hooks of the broker.s last run/);
    t.deepEqual((await probeOnce({ socket: b.socket, list: true })).leases, []);
  } finally {
    await b.stop();
    fs.rmSync(bdir, { recursive: true, force: true });
  }
});

test.serial('a persistent create whose client is gone before its reply (killed during the hook\'s up) is undone', async (t) => {
  // Found by a re-test: the device stayed, with a grant on record and no reply to anyone.
  fs.rmSync(`${log}.up`, { force: true });
  const name = `tb${NOBODY}-killed`;
  const client = spawnAs({}, process.execPath, [CLIENT_CLI, 'create', '--persistent', '--network', 'slowup', '--name', name,
    '--socket', sock()], { stdio: ['ignore', 'ignore', 'ignore'] });
  await fx.broker.waitFor(() => fs.existsSync(`${log}.up`), 5000, 'up never started');
  client.kill('SIGKILL');
  const undone = await fx.broker.record((r) => r.decision === 'cleanup' && (r.device as { name?: string }).name === name,
    10_000);
  t.regex(undone.message ?? '', /its client was gone before the reply/);
  await fx.broker.record((r) => r.decision === 'error' && /^the reply could not be sent/.test(r.message ?? ''));
  await fx.broker.waitFor(() => fx.ns.link(name) === undefined, 3000, 'the persistent device stayed');
});

test.serial('a device deleted while its hook\'s up runs: the create fails, and down runs after up, not across it', async (t) => {
  // Found by an outside code review: the deletion's event unplugged the lease mid-create (down overlapping up),
  // and the grant was still recorded and replied, for a device that was gone.
  fs.rmSync(`${log}.up`, { force: true });
  const name = `tb${NOBODY}-gone`;
  const asked = probeOnce({ socket: sock(), requests: [{ network: 'slowup', name, persistent: true }] });
  await fx.broker.waitFor(() => fs.existsSync(`${log}.up`), 5000, 'up never started');
  fx.ns.ip('link', 'del', name);
  const r = await asked;
  t.is(r.error?.code, 'TB_E_KERNEL', JSON.stringify(r.error));
  t.regex(r.error?.message ?? '', /was deleted or renamed while it was being made/);
  await fx.broker.waitFor(() => fs.readFileSync(log, 'utf8').includes(`down-end ${name}`), 5000, 'down never ran');
  const lines = fs.readFileSync(log, 'utf8').split('\n').filter((l) => l.endsWith(` ${name}`));
  t.deepEqual(lines, [`up-start ${name}`, `up-end ${name}`, `down-start ${name}`, `down-end ${name}`]);
  t.false(fx.broker.records.some((rec) => rec.decision === 'grant' && (rec.device as { name?: string }).name === name));
  t.deepEqual((await probeOnce({ socket: sock(), list: true })).leases, []);
});

// Found by an outside review (all or nothing, under races): a create reply the client refused (an fd whose tap root
// renamed between the broker's last look and the client's) left the request's persistent devices made, leased and
// counted, while its user was told the create failed. The client stopped (SIGSTOP) while the reply waits for it is
// the only way to put root's rename in that window for real: the broker catches a rename before its reply.
test.serial('a create reply the client refuses: its fds closed and its persistent devices released', async (t) => {
  for (const f of [`${log}.gated`, `${log}.gate`]) fs.rmSync(f, { force: true });
  const kept = `tb${NOBODY}-kept`;
  const fdTap = `tb${NOBODY}-fdtap`;
  let child: ChildProcess | null = null;
  // Whatever happens, the probe goes (it would hold the test's worker, and its devices, for ever) and so do they.
  t.teardown(() => {
    child?.kill('SIGKILL');
    fs.writeFileSync(`${log}.gate`, '');
    for (const name of [kept, 'adm-renamed']) if (fx.ns.link(name)) fx.ns.ip('link', 'del', name);
  });
  const asked = probe({ socket: sock(), batch: true, requests: [{ network: 'lab', name: kept, persistent: true },
    { network: 'lab', name: fdTap }, { network: 'gated' }] }, {}, (c) => (child = c));
  // Awaited below; a failure before that kills the probe (teardown), which must not be an unhandled rejection too.
  asked.catch(() => {});
  await fx.broker.waitFor(() => fs.existsSync(`${log}.gated`), 5000, 'up never started');
  const pid = child!.pid!;
  process.kill(pid, 'SIGSTOP');
  try {
    // The hook's up may end now: the reply then waits in the stopped client's socket (ss: its receive queue).
    fs.writeFileSync(`${log}.gate`, '');
    await fx.broker.waitFor(() => queued(pid), 10_000, 'the reply never reached the client');
    // Written before the reply left; read from the broker's output here in its own time (a sync look failed in CI).
    await fx.broker.record((r) => r.decision === 'grant' && (r.device as { name?: string }).name === kept);
    fx.ns.ip('link', 'set', fdTap, 'name', 'adm-renamed');
  } finally {
    process.kill(pid, 'SIGCONT');
  }
  const r = await asked.then(async (p) => { await p.release(); return p.result; });
  t.is(r.error?.code, 'TB_E_BAD_REPLY', JSON.stringify(r.error));
  t.regex(r.error?.message ?? '', /attached to `adm-renamed'/);
  const released = await fx.broker.record((x) => x.op === 'release' && x.decision === 'release'
    && (x.device as { name?: string }).name === kept);
  t.is(released.uid, NOBODY);
  await fx.broker.waitFor(() => fx.ns.link(kept) === undefined, 3000, 'the persistent device stayed');
  t.deepEqual((await probeOnce({ socket: sock(), list: true })).leases?.map((l) => l.name), []);
  await fx.broker.waitFor(() => fx.ns.link('adm-renamed') === undefined, 3000, 'the refused fd tap outlived its fds');
});

/** Does a Unix socket of process `pid` have data waiting (ss's Recv-Q)? Its sockets by their inodes: `ss -p` walked
 * every process's fds, which stalled another file's broker in the same run. */
function queued(pid: number): boolean {
  const mine = new Set(fs.readdirSync(`/proc/${pid}/fd`).map((fd) => {
    try {
      return /^socket:\[(\d+)\]$/.exec(fs.readlinkSync(`/proc/${pid}/fd/${fd}`))?.[1] ?? '';
    } catch {
      return '';
    }
  }));
  const out = spawnSync('ss', ['-xH'], { encoding: 'utf8' }).stdout;
  return out.split('\n').some((l) => {
    const f = l.trim().split(/\s+/);
    return f.length >= 8 && mine.has(f[5]!) && Number(f[2]) > 0;
  });
}

const hookFails = test.macro({
  async exec(t, network: string, pattern: RegExp) {
    const r = await probeOnce({ socket: sock(), requests: [{ network }] });
    t.is(r.error?.code, 'TB_E_HOOK_FAILED');
    // The caller is told its network's hook failed; the hook's path and output are in the record (an outside
    // re-test read both in the refusal).
    t.is(r.error!.message, `the plug hook of network \`${network}' failed, timed out or is unsafe to run; the device `
      + 'was rolled back');
    t.notRegex(JSON.stringify(r.error), new RegExp(`${dir}|no such segment`));
    const rec = await fx.broker.record((x) => x.decision === 'error' && x.code === 'TB_E_HOOK_FAILED' && x.pid === r.pid);
    t.regex(rec.message ?? '', pattern);
    await fx.broker.waitFor(() => fx.ns.extraLinks(BASE).length === 0, 2000, 'the device was not rolled back');
    const state = JSON.parse(fs.readFileSync(fx.broker.stateFile, 'utf8')) as { leases: unknown[] };
    t.deepEqual(state.leases, []);
    t.true(fx.broker.alive);
  },
  title: (what) => `a hook that ${what}: refused, rolled back`,
});
test.serial('fails', hookFails, 'broken', /exited 3: no such segment/);
test.serial('hangs past its timeout', hookFails, 'stuck', /timed out after 1000 ms/);

// Found by an outside review of the audit trail: a multi-NIC create refused by its last NIC's hook answered
// before its rollback: the NICs made were still there, and their records came after the reply, naming no caller.
test.serial('a multi-NIC create its last hook refuses: rolled back and recorded before the reply', async (t) => {
  const r = await probeOnce({ socket: sock(), requests: [{ network: 'lab' }, { network: 'lab' }, { network: 'broken' }],
    batch: true });
  t.is(r.error?.code, 'TB_E_HOOK_FAILED');
  t.deepEqual(fx.ns.extraLinks(BASE), [], 'nothing of it is left when the client reads the refusal');
  const mine = () => fx.broker.records.filter((x) => x.op === 'cleanup' && /create rolled back/.test(x.message ?? '')
    && x.pid === r.pid);
  await fx.broker.waitFor(() => mine().length === 3, 3000, 'three rollback records naming the caller');
  t.true(mine().every((x) => x.uid === NOBODY && x.exe !== null), 'each names the caller, not its uid alone');
  const refused = fx.broker.records.find((x) => x.op === 'create' && x.decision === 'error' && x.pid === r.pid)!;
  t.regex((refused.device as { name?: string }).name ?? '', /^tb/, 'the refused NIC\'s record names the device made for it');
});

test.serial('a hook printing garbage: its output is captured, made printable, and the grant stands', async (t) => {
  const p = await probe({ socket: sock(), requests: [{ network: 'noisy' }] });
  try {
    t.is(p.result.error, null);
    const name = p.result.taps[0]!.device.name;
    const grant = await fx.broker.record((r) => r.decision === 'grant' && (r.device as { name: string }).name === name);
    t.is((grant.device as { plug: { stdout: string } }).plug.stdout, '??binary?[31m\n');
  } finally {
    await p.release();
  }
});

test.serial('a hook made unsafe after the policy loaded is not run', async (t) => {
  const file = path.join(dir, 'plug');
  fs.chmodSync(file, 0o777);
  fs.rmSync(log, { force: true });
  try {
    const r = await probeOnce({ socket: sock(), requests: [{ network: 'custom' }] });
    t.is(r.error?.code, 'TB_E_HOOK_FAILED');
    t.notRegex(r.error!.message, new RegExp(dir), 'the hook\'s path is the policy\'s');
    const rec = await fx.broker.record((x) => x.decision === 'error' && x.code === 'TB_E_HOOK_FAILED' && x.pid === r.pid);
    t.regex(rec.message ?? '', /writable by others; not run/);
    t.false(fs.existsSync(log), 'never executed');
    t.deepEqual(fx.ns.extraLinks(BASE), []);
  } finally {
    fs.chmodSync(file, 0o755);
  }
});

test.serial('a policy with an unsafe hook does not load', (t) => {
  const bad = path.join(dir, 'unsafe.toml');
  const hookFile = script('unsafe-hook', 'exit 0', 0o775);
  fs.writeFileSync(bad, `[network.x]\nhook = "${hookFile}"\n[[rule]]\nname = "r"\nusers = [1]\nnetworks = ["x"]\n`);
  const r = spawnSync(process.execPath, [BROKER_MAIN, 'check-policy', bad], { encoding: 'utf8' });
  t.is(r.status, 78);
  t.regex(r.stderr, /hook .*unsafe-hook is writable by its group/);
});

test.serial('tapbroker run --net network=NAME and create --persistent --network NAME', async (t) => {
  const run = spawnSync('setpriv', [...setprivArgs(), process.execPath, CLIENT_CLI, 'run', '--socket', sock(), '--net', 'network=lab', '--', 'sh', '-c', 'echo "$@"', 'sh'], { encoding: 'utf8' });
  t.is(run.status, 0, run.stderr);
  t.regex(run.stderr, /on network lab \(br0\)/);
  const made = spawnSync('setpriv', [...setprivArgs(), process.execPath, CLIENT_CLI, 'create', '--persistent', '--network', 'lab', '--json', '--socket', sock()], { encoding: 'utf8' });
  t.is(made.status, 0, made.stderr);
  const d = JSON.parse(made.stdout) as { name: string; network: string };
  t.is(d.network, 'lab');
  t.is(fx.ns.link(d.name)?.master, 'br0');
  t.is((await probeOnce({ socket: sock(), release: [d.name] })).error, null);
});

test.serial('the policy tools understand networks', (t) => {
  const who = spawnSync(process.execPath, [BROKER_MAIN, 'who-can', fx.broker.policyPath, '--network', 'lab100', '--json'], { encoding: 'utf8' });
  t.is(who.status, 0, who.stderr);
  t.deepEqual((JSON.parse(who.stdout) as { allowed_by: Array<{ rule: string }> }).allowed_by.map((r) => r.rule), ['nets']);
  const text = spawnSync(process.execPath, [BROKER_MAIN, 'who-can', fx.broker.policyPath, '--network', 'lab100'], { encoding: 'utf8' }).stdout;
  t.regex(text, /network lab100 \(bridge br0, vlan 100\)/);
  const ex = JSON.parse(spawnSync(process.execPath, [BROKER_MAIN, 'explain-policy', fx.broker.policyPath, '--user', 'nobody', '--json'], { encoding: 'utf8' }).stdout) as { allowed_by: Array<{ networks: string[] }> };
  t.true(ex.allowed_by[0]!.networks.includes('custom'));
  t.is(spawnSync(process.execPath, [BROKER_MAIN, 'who-can', fx.broker.policyPath, '--network', 'nope'], { encoding: 'utf8' }).status, 65);
  t.is(spawnSync(process.execPath, [BROKER_MAIN, 'check-policy', fx.broker.policyPath], { encoding: 'utf8' }).status, 0);
});

// Found by an outside re-test: the bridge helper gave up after 30 s in all, though a network's `up` may run for up
// to 300 s: a 35 s `up` made the tap after qemu had been told no. The helper's deadline for the broker's hello is
// $TAPBROKER_HELPER_TIMEOUT; for the tap, 300 s more. Here the hello's is 1 s and the `up` takes 1.5 s.
test.serial('the bridge helper waits for a slow hook\'s up past its deadline for the broker\'s hello', async (t) => {
  const { spawn } = await import('node:child_process');
  const { sys } = await import('@tapbroker/protocol');
  const helper = path.join(path.dirname(CLIENT_CLI), 'bridge-helper.js');
  const [mine, theirs] = sys.socketpair(1);
  try {
    const child = spawn('setpriv', [...setprivArgs(), process.execPath, helper, '--br=network:slowup', '--fd=3'], {
      stdio: ['ignore', 'pipe', 'pipe', theirs],
      env: { PATH: process.env['PATH'], TAPBROKER_SOCKET: sock(), TAPBROKER_HELPER_TIMEOUT: '1' },
    });
    let err = '';
    child.stderr!.on('data', (d) => (err += d));
    const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
    t.is(code, 0, err);
    const got = new sys.Receiver(16, 4).recv(mine, 0x40 /* MSG_DONTWAIT */);
    t.is(got?.fds.length, 1, 'the tap was sent');
    for (const fd of got?.fds ?? []) sys.close(fd);
  } finally {
    sys.close(mine);
    sys.close(theirs);
  }
});
