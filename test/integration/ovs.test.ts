// The OVS module against a real Open vSwitch (userspace datapath: the kernel datapath is absent here),
// run privately inside a fresh namespace. ovs-vsctl runs in this process's namespace and reaches the
// switch through its unix socket; the taps live in the namespace where ovs-vswitchd runs.
import anyTest, { type ExecutionContext, type TestFn } from 'ava';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { TapbrokerError, type ErrorCode } from '@tapbroker/protocol';
import {
  addPort, delPort, delPortOf, isOvsBridge, listPorts, ovsdbTarget, setUpFailed,
} from '@tapbroker/broker/internal';
import { Netns } from '../helpers/netns.js';
import { OvsInstance, ovsUnavailable } from '../helpers/ovs.js';
import { until } from '../helpers/wait.js';

const test = anyTest as TestFn;
const unavailable = ovsUnavailable();
if (unavailable) console.log(`# skip open vswitch: ${unavailable}`);
const ovsTest = unavailable ? test.skip : test.serial;

let ns: Netns;
let ovs: OvsInstance;

const ids = (lease: string, extra: Record<string, string> = {}): Record<string, string> => ({
  'tapbroker-lease': lease, 'tapbroker-uid': '1000', 'tapbroker-mac': '52:54:00:12:34:56', 'tapbroker-rule': 'lab', ...extra,
});

/** The ports listPorts finds to be tapbroker's. */
const ourPorts = async (db: string) => (await listPorts(db)).ours;

function tap(name: string): void {
  ns.ip('tuntap', 'add', name, 'mode', 'tap');
}

function ports(bridge = 'br-int'): string[] {
  return ovs.vsctl('list-ports', bridge).split('\n').filter(Boolean);
}

async function refused(t: ExecutionContext, p: Promise<unknown>, code: ErrorCode, message?: RegExp): Promise<void> {
  const err = await t.throwsAsync(p, { instanceOf: TapbrokerError });
  t.is((err as TapbrokerError).code, code, err?.message);
  if (message) t.regex(err!.message, message);
}

if (!unavailable) {
  test.before(async () => {
    ns = Netns.create('ovs');
    ovs = await OvsInstance.start(ns);
    ovs.addBridge('br-int');
  });

  test.after.always(async () => {
    await ovs?.stop();
    ns?.destroy();
  });
}

ovsTest('ovsdbTarget: the policy value, else $OVS_RUNDIR, else the default ovs-vsctl itself reports', (t) => {
  const saved = process.env.OVS_RUNDIR;
  try {
    delete process.env.OVS_RUNDIR;
    const help = execFileSync('ovs-vsctl', ['--help'], { encoding: 'utf8', env: { PATH: process.env.PATH ?? '' } });
    const builtin = /--db=DATABASE[^\n]*\n\s*\(default: (\S+)\)/.exec(help)?.[1];
    t.is(builtin, 'unix:/var/run/openvswitch/db.sock');
    t.is(ovsdbTarget(), builtin!);
    process.env.OVS_RUNDIR = '/run/x';
    t.is(ovsdbTarget(), 'unix:/run/x/db.sock');
    t.is(ovsdbTarget('unix:/srv/ovs/db.sock'), 'unix:/srv/ovs/db.sock');
    for (const bad of ['tcp:127.0.0.1:6640', 'unix:relative', 'unix:/a,unix:/b', 'unix:/a b']) {
      t.is(t.throws(() => ovsdbTarget(bad), { instanceOf: TapbrokerError })?.code, 'TB_E_INVALID_REQUEST', bad);
    }
  } finally {
    if (saved === undefined) delete process.env.OVS_RUNDIR;
    else process.env.OVS_RUNDIR = saved;
  }
});

ovsTest('isOvsBridge: an OVS bridge yes; a missing one or a Linux bridge no', async (t) => {
  ns.bridge('lbr0');
  t.true(await isOvsBridge(ovs.db, 'br-int'));
  t.false(await isOvsBridge(ovs.db, 'br-none'));
  t.false(await isOvsBridge(ovs.db, 'lbr0'));
});

ovsTest('addPort: access tag and external-ids on Port and Interface, attached by ovs-vswitchd; listed as ours', async (t) => {
  tap('tb1000-a');
  const t0 = process.hrtime.bigint();
  await addPort(ovs.db, 'br-int', 'tb1000-a', { tag: 100, externalIds: ids('0123456789abcdef') });
  t.log(`addPort: ${(Number(process.hrtime.bigint() - t0) / 1e6).toFixed(1)} ms`);

  t.regex(ovs.vsctl('list', 'port', 'tb1000-a'), /^tag\s+: 100$/m);
  const portIds = ovs.vsctl('get', 'Port', 'tb1000-a', 'external_ids');
  const ifaceIds = ovs.vsctl('get', 'Interface', 'tb1000-a', 'external_ids');
  for (const s of [portIds, ifaceIds]) {
    t.regex(s, /tapbroker-lease="?0123456789abcdef"?/);
    t.regex(s, /tapbroker-uid="1000"/);
    t.regex(s, /tapbroker-mac="52:54:00:12:34:56"/);
    t.regex(s, /tapbroker-rule=lab/);
  }
  // Attached without error: a real OpenFlow port number, no error, and in the datapath.
  t.true(Number(ovs.vsctl('get', 'Interface', 'tb1000-a', 'ofport').trim()) > 0, ovs.log());
  t.is(ovs.vsctl('get', 'Interface', 'tb1000-a', 'error').trim(), '[]');
  t.notRegex(ovs.vsctl('show'), /error:/);
  t.regex(ovs.appctl('dpif/show'), /tb1000-a \d+\/\d+/);

  const ours = await ourPorts(ovs.db);
  t.deepEqual(ours.filter((p) => p.port === 'tb1000-a'), [{ bridge: 'br-int', port: 'tb1000-a', lease: '0123456789abcdef', uid: 1000, broker: null, boot: null }]);
});

ovsTest('listPorts: ours is not a port added by hand, with the right bridge for each; names is every interface', async (t) => {
  tap('tbhand');
  ovs.vsctl('add-port', 'br-int', 'tbhand', '--', 'set', 'Port', 'tbhand', 'external-ids:owner=admin');
  ovs.addBridge('br-two');
  tap('tb1000-b');
  await addPort(ovs.db, 'br-two', 'tb1000-b', { externalIds: ids('1111222233334444', { 'tapbroker-uid': '65534', 'tapbroker-broker': 'abcdef01' }) });
  const { ours, names } = await listPorts(ovs.db);
  for (const name of ['tbhand', 'br-int', 'br-two', 'tb1000-a', 'tb1000-b']) t.true(names.includes(name), name);
  t.false(ours.some((p) => p.port === 'tbhand' || p.port === 'br-int' || p.port === 'br-two'));
  t.deepEqual(ours.find((p) => p.port === 'tb1000-b'), { bridge: 'br-two', port: 'tb1000-b', lease: '1111222233334444', uid: 65534, broker: 'abcdef01', boot: null });
  t.is(ours.find((p) => p.port === 'tb1000-a')?.bridge, 'br-int');
  t.true(await delPort(ovs.db, 'br-two', 'tb1000-b'));
});

ovsTest('addPort: trunks recorded', async (t) => {
  tap('tb1000-t');
  await addPort(ovs.db, 'br-int', 'tb1000-t', { trunks: [100, 200], externalIds: ids('7777') });
  t.is(ovs.vsctl('get', 'Port', 'tb1000-t', 'trunks').trim(), '[100, 200]');
  t.is(ovs.vsctl('get', 'Port', 'tb1000-t', 'tag').trim(), '[]');
  t.true(Number(ovs.vsctl('get', 'Interface', 'tb1000-t', 'ofport').trim()) > 0);
  // An all-digit lease id comes back from OVSDB as a string all the same.
  t.is((await ourPorts(ovs.db)).find((p) => p.port === 'tb1000-t')?.lease, '7777');
  t.true(await delPort(ovs.db, 'br-int', 'tb1000-t'));
});

ovsTest('delPort: true when it removed the port, false the second time', async (t) => {
  const t0 = process.hrtime.bigint();
  t.true(await delPort(ovs.db, 'br-int', 'tb1000-a'));
  t.log(`delPort: ${(Number(process.hrtime.bigint() - t0) / 1e6).toFixed(1)} ms`);
  t.false(ports().includes('tb1000-a'));
  t.false((await ourPorts(ovs.db)).some((p) => p.port === 'tb1000-a'));
  t.false(await delPort(ovs.db, 'br-int', 'tb1000-a'));
  // The tap itself is the broker's business, not OVS's: still there.
  t.truthy(ns.link('tb1000-a'));
});

ovsTest('delPortOf: a lease\'s port moved to another bridge, its record kept, is removed from there', async (t) => {
  // Found by an outside review: `del-port br-int PORT' was refused once the port was on another bridge, taken for
  // an unreachable Open vSwitch, and tried again for minutes, the port's name blocked until a restart.
  ovs.addBridge('br-moved');
  tap('tb1000-m');
  await addPort(ovs.db, 'br-int', 'tb1000-m', { externalIds: ids('5555666677778888') });
  const uuid = ovs.vsctl('get', 'Port', 'tb1000-m', '_uuid').trim();
  ovs.vsctl('--no-wait', 'remove', 'Bridge', 'br-int', 'ports', uuid, '--', 'add', 'Bridge', 'br-moved', 'ports', uuid);
  t.is((await ourPorts(ovs.db)).find((p) => p.port === 'tb1000-m')?.bridge, 'br-moved');
  t.false(await delPortOf(ovs.db, 'br-int', 'tb1000-m', 'aaaabbbbccccdddd'), 'another lease\'s: left alone');
  t.true(await delPortOf(ovs.db, 'br-int', 'tb1000-m', '5555666677778888'));
  t.false((await ourPorts(ovs.db)).some((p) => p.port === 'tb1000-m'));
});

ovsTest('addPort never adopts an existing port', async (t) => {
  await refused(t, addPort(ovs.db, 'br-int', 'tbhand', { tag: 5, externalIds: ids('aaaa') }), 'TB_E_KERNEL', /^failed to add `tbhand' to ovs bridge `br-int': .*already exists/);
  t.is(ovs.vsctl('get', 'Port', 'tbhand', 'external_ids').trim(), '{owner=admin}');
  t.is(ovs.vsctl('get', 'Port', 'tbhand', 'tag').trim(), '[]');
});

ovsTest('addPort of a device ovs-vswitchd cannot open: TB_E_KERNEL, and no port left behind', async (t) => {
  await refused(t, addPort(ovs.db, 'br-int', 'tb1000-ghost', { tag: 100, externalIds: ids('bbbb') }), 'TB_E_KERNEL',
    /^failed to add `tb1000-ghost' to ovs bridge `br-int': could not open network device tb1000-ghost \(No such device\)$/);
  t.false(ports().includes('tb1000-ghost'));
});

ovsTest('addPort to a bridge whose datapath ovs-vswitchd cannot create: TB_E_KERNEL, and no port left behind', async (t) => {
  // ovs-vsctl then warns without a reason (the interface's error column is empty): an outside review's port was
  // granted and recorded as plugged, on no datapath.
  ovs.vsctl('add-br', 'br-dead', '--', 'set', 'Bridge', 'br-dead', 'datapath_type=bogus');
  t.teardown(() => ovs.vsctl('--if-exists', 'del-br', 'br-dead'));
  tap('tb1000-dead');
  await refused(t, addPort(ovs.db, 'br-dead', 'tb1000-dead', { tag: 100, externalIds: ids('dddd') }), 'TB_E_KERNEL',
    /^failed to add `tb1000-dead' to ovs bridge `br-dead': ovs-vswitchd could not set it up \(it recorded no reason/);
  t.deepEqual(ports('br-dead'), []);
});

test('setUpFailed: the port\'s own warning, with its reason or without one; another port\'s is not its', (t) => {
  const see = '.  See ovs-vswitchd log for details.';
  t.is(setUpFailed(`ovs-vsctl: Error detected while setting up 'tb1-a': could not open network device tb1-a (No such device)${see}\n`, 'tb1-a'),
    'could not open network device tb1-a (No such device)');
  t.regex(setUpFailed(`ovs-vsctl: Error detected while setting up 'tb1-a'${see}\n`, 'tb1-a') ?? '', /^ovs-vswitchd could not set it up/);
  t.is(setUpFailed(`ovs-vsctl: Error detected while setting up 'tb1-ab'${see}\n`, 'tb1-a'), null);
  t.is(setUpFailed(`ovs-vsctl: Error detected while setting up 'other': no${see}\n`, 'tb1-a'), null);
  t.is(setUpFailed('', 'tb1-a'), null);
});

ovsTest('addPort to a missing bridge: TB_E_KERNEL naming both', async (t) => {
  tap('tb1000-c');
  await refused(t, addPort(ovs.db, 'br-none', 'tb1000-c', { externalIds: ids('cccc') }), 'TB_E_KERNEL', /^failed to add `tb1000-c' to ovs bridge `br-none': no bridge named br-none/);
});

ovsTest('refusals before any exec: bad names, VLANs, external-ids', async (t) => {
  // A database that does not exist: reaching ovs-vsctl would give TB_E_KERNEL, not these codes.
  const nowhere = 'unix:/nonexistent/db.sock';
  const before = ports();
  for (const db of [ovs.db, nowhere]) {
    for (const name of ['tb1000-abcdefghi' /* 16 bytes */, 'a;b', '--db=x', '-x', '', 'a b', 'tb\u00e9']) {
      await refused(t, addPort(db, 'br-int', name, { externalIds: ids('dddd') }), 'TB_E_INVALID_NAME');
      await refused(t, addPort(db, name, 'tb1000-c', { externalIds: ids('dddd') }), 'TB_E_INVALID_NAME');
      await refused(t, delPort(db, 'br-int', name), 'TB_E_INVALID_NAME');
      await refused(t, isOvsBridge(db, name), 'TB_E_INVALID_NAME');
    }
    for (const vlan of [0, 4095, -1, 1.5, NaN]) {
      await refused(t, addPort(db, 'br-int', 'tb1000-c', { tag: vlan, externalIds: ids('dddd') }), 'TB_E_INVALID_REQUEST', /vlan/);
      await refused(t, addPort(db, 'br-int', 'tb1000-c', { trunks: [100, vlan], externalIds: ids('dddd') }), 'TB_E_INVALID_REQUEST', /vlan/);
    }
    await refused(t, addPort(db, 'br-int', 'tb1000-c', { trunks: [], externalIds: ids('dddd') }), 'TB_E_INVALID_REQUEST');
    for (const value of ['a b', 'x"y', 'k=v', 'a,b', '{x}', '', 'é']) {
      await refused(t, addPort(db, 'br-int', 'tb1000-c', { externalIds: ids('dddd', { 'tapbroker-rule': value }) }), 'TB_E_INVALID_REQUEST');
    }
    await refused(t, addPort(db, 'br-int', 'tb1000-c', { externalIds: { 'tapbroker-uid': '1' } }), 'TB_E_INVALID_REQUEST', /tapbroker-lease/);
    await refused(t, addPort(db, 'br-int', 'tb1000-c', { externalIds: ids('dddd', { 'other:key': 'x' }) }), 'TB_E_INVALID_REQUEST');
  }
  await refused(t, ourPorts('unix:/a,unix:/b'), 'TB_E_INVALID_REQUEST');
  t.deepEqual(ports(), before);
});

ovsTest('OVS unreachable: TB_E_KERNEL "open vswitch unavailable"', async (t) => {
  const nowhere = 'unix:/nonexistent/db.sock';
  await refused(t, isOvsBridge(nowhere, 'br-int'), 'TB_E_KERNEL', /^open vswitch unavailable: .*\/nonexistent\/db\.sock cannot be resolved/);
  await refused(t, ourPorts(nowhere), 'TB_E_KERNEL', /^open vswitch unavailable/);
  await refused(t, delPort(nowhere, 'br-int', 'tb1000-c'), 'TB_E_KERNEL', /^open vswitch unavailable/);
});

// From an outside review: a socket the policy names was used wherever it was, and a socket in a directory users
// can write would let any of them answer as the switch. The real switch's socket, reached through a directory
// others can write, is refused before ovs-vsctl runs; through one only root can write, it works.
ovsTest('a database socket reached through a directory others can write is not used', async (t) => {
  const real = ovs.db.slice('unix:'.length);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-ovsdb-'));
  try {
    fs.symlinkSync(real, path.join(dir, 'db.sock'));
    const via = `unix:${dir}/db.sock`;
    t.true(await isOvsBridge(via, 'br-int'), 'through a directory only root can write: used');
    fs.chmodSync(dir, 0o777);
    await refused(t, isOvsBridge(via, 'br-int'), 'TB_E_KERNEL', /^open vswitch unavailable: .*db\.sock is writable by others \(through /);
    tap('tb1000-u');
    await refused(t, addPort(via, 'br-int', 'tb1000-u', { externalIds: ids('uuuu') }), 'TB_E_KERNEL', /not used$/);
    t.false(ports().includes('tb1000-u'), 'no port added');
    ns.ip('link', 'del', 'tb1000-u');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

// From an outside review: a database that answered without end grew the broker's ovs-vsctl past 1 GB in 3 s.
ovsTest('ovs-vsctl runs with its address space bounded', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-ovsdb-'));
  // A database that takes the connection and never answers: ovs-vsctl waits for it, until its timeout.
  const server = net.createServer((c) => c.on('error', () => {}));
  await new Promise<void>((resolve) => server.listen(path.join(dir, 'db.sock'), resolve));
  try {
    const call = ourPorts(`unix:${dir}/db.sock`).catch((err: unknown) => err);
    const limits = await until(() => {
      try {
        const child = fs.readdirSync('/proc').find((pid) => /^\d+$/.test(pid) && parentOf(pid) === process.pid
          && fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim() === 'ovs-vsctl');
        return child === undefined ? null : fs.readFileSync(`/proc/${child}/limits`, 'utf8');
      } catch {
        return null; // a child gone while it was read
      }
    }, { ms: 4000, what: 'no ovs-vsctl running' });
    t.regex(limits, /^Max address space\s+268435456\s+268435456\s+bytes/m);
    t.true(await call instanceof TapbrokerError);
  } finally {
    server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

function parentOf(pid: string): number | null {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
    return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
  } catch {
    return null;
  }
}

ovsTest('ovs-vswitchd not answering: addPort times out and takes its committed port back', async (t) => {
  const pid = Number(execFileSync('cat', [`${ovs.run}/ovs-vswitchd.pid`], { encoding: 'utf8' }).trim());
  process.kill(pid, 'SIGSTOP');
  try {
    const t0 = Date.now();
    await refused(t, addPort(ovs.db, 'br-int', 'tb1000-c', { tag: 7, externalIds: ids('eeee') }), 'TB_E_KERNEL', /^open vswitch unavailable: .*no answer within 5 s/);
    t.log(`timed out after ${Date.now() - t0} ms`);
    t.false(ovs.vsctl('--no-wait', 'list-ports', 'br-int').split('\n').includes('tb1000-c'));
  } finally {
    process.kill(pid, 'SIGCONT');
  }
  // And the switch is usable again afterwards.
  await addPort(ovs.db, 'br-int', 'tb1000-c', { tag: 7, externalIds: ids('eeee') });
  t.true(Number(ovs.vsctl('get', 'Interface', 'tb1000-c', 'ofport').trim()) > 0);
  t.true(await delPort(ovs.db, 'br-int', 'tb1000-c'));
});

ovsTest('timings: 20 addPort/delPort pairs', async (t) => {
  tap('tb1000-z');
  const add: number[] = [];
  const del: number[] = [];
  for (let i = 0; i < 20; i++) {
    let t0 = process.hrtime.bigint();
    await addPort(ovs.db, 'br-int', 'tb1000-z', { tag: 100, externalIds: ids(`lease${i}`) });
    add.push(Number(process.hrtime.bigint() - t0) / 1e6);
    t0 = process.hrtime.bigint();
    t.true(await delPort(ovs.db, 'br-int', 'tb1000-z'));
    del.push(Number(process.hrtime.bigint() - t0) / 1e6);
  }
  const median = (xs: number[]): string => [...xs].sort((a, b) => a - b)[xs.length >> 1]!.toFixed(1);
  t.log(`addPort median ${median(add)} ms (max ${Math.max(...add).toFixed(1)}), delPort median ${median(del)} ms (max ${Math.max(...del).toFixed(1)})`);
});
