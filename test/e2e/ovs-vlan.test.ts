// Open vSwitch networks through the broker, against a real ovsdb-server/ovs-vswitchd (userspace
// datapath) in the test's namespace: port records with the lease's external-ids, removed when the
// lease ends or found stale at start; and a qemu guest on an access port of VLAN 100 that reaches a
// peer on VLAN 100 and cannot reach one on VLAN 200.
import anyTest, { type TestFn } from 'ava';
import { BrokerProcess, CLIENT_CLI, tempDir } from '../helpers/broker.js';
import { QEMU, guestImage, guestQemuArgs, guestUnavailable } from '../helpers/guest.js';
import { Netns } from '../helpers/netns.js';
import { OvsInstance, ovsUnavailable } from '../helpers/ovs.js';
import { NOBODY, probe, probeOnce, spawnAs } from '../helpers/unpriv.js';
import fs from 'node:fs';
import path from 'node:path';

const test = anyTest as TestFn;
const unavailable = ovsUnavailable();
if (unavailable) console.log(`# skip open vswitch networks: ${unavailable}`);
const t0 = unavailable ? test.skip : test.serial;

let ns: Netns;
let ovs: OvsInstance;
let broker: BrokerProcess;
let dir: string;
let policy: string;
let peer: Netns | undefined;

test.before(async () => {
  if (unavailable) return;
  ns = Netns.create('ovs-e2e');
  ovs = await OvsInstance.start(ns);
  ovs.addBridge('br-int');
  // The VLAN-100 peer: an internal port, 192.0.2.1.
  ovs.vsctl('add-port', 'br-int', 'p100', 'tag=100', '--', 'set', 'Interface', 'p100', 'type=internal');
  ns.ip('addr', 'add', '192.0.2.1/24', 'dev', 'p100');
  ns.ip('link', 'set', 'p100', 'up');
  // The VLAN-200 peer, 192.0.2.3, in a namespace of its own behind a veth (in one namespace Linux would
  // answer ARP for it on p100 as well, whatever the VLANs).
  peer = Netns.create('ovs-peer');
  ns.ip('link', 'add', 'vp200', 'type', 'veth', 'peer', 'name', 'vq200', 'netns', peer.name);
  ns.ip('link', 'set', 'vp200', 'up');
  ovs.vsctl('add-port', 'br-int', 'vp200', 'tag=200');
  peer.ip('addr', 'add', '192.0.2.3/24', 'dev', 'vq200');
  peer.ip('link', 'set', 'vq200', 'up');
  dir = tempDir('ovs-e2e');
  policy = `[network.prod]\novs = "br-int"\nvlan = 100\novsdb = "${ovs.db}"\n\n[[rule]]\nname = "vm"\nusers = [${NOBODY}]\nnetworks = ["prod"]\npersistent = true\n`;
  broker = await BrokerProcess.start(ns, policy, { dir });
});

test.after.always(async () => {
  await broker?.stop();
  await ovs?.stop();
  ns?.destroy();
  peer?.destroy();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

const portOf = (name: string) => {
  try {
    return { tag: ovs.vsctl('get', 'Port', name, 'tag').trim(), ids: ovs.vsctl('get', 'Port', name, 'external_ids').trim() };
  } catch {
    return null;
  }
};

t0('a tap on network prod is an OVS access port of VLAN 100 whose external-ids name its lease; gone with the lease', async (t) => {
  const p = await probe({ socket: broker.socket, requests: [{ network: 'prod' }] });
  const d = p.result.taps[0]!.device;
  t.is(p.result.error, null, p.result.error?.message);
  t.like(d, { network: 'prod', parent: 'br-int', vlan: 100 });
  const port = portOf(d.name)!;
  t.is(port.tag, '100');
  // ovs-vsctl quotes a key or value only where it needs to.
  t.regex(port.ids, new RegExp(`"?tapbroker-uid"?="?${NOBODY}"?`));
  t.regex(port.ids, new RegExp(`"?tapbroker-mac"?="${d.mac}"`));
  t.regex(port.ids, /"?tapbroker-lease"?="?[0-9a-f]{16}"?/);
  await p.release();
  await broker.waitFor(() => portOf(d.name) === null, 3000, 'the OVS port outlived its tap');
  t.is(portOf(d.name), null, 'the OVS port went with its tap');
});

t0('an OVS port that cannot be removed is tried again, and its name is given to no device meanwhile', async (t) => {
  // Found by an outside review: one failed del-port (Open vSwitch not answering) was never tried again, and
  // ovs-vswitchd then took any later device of that name into the stale port, whatever its network.
  const name = `tb${NOBODY}-ovr`;
  const p = await probe({ socket: broker.socket, requests: [{ network: 'prod', name }] });
  t.is(p.result.error, null, p.result.error?.message);
  ovs.pauseDb(true);
  let paused = true;
  try {
    await p.release();
    await broker.waitFor(() => broker.records.some((r) => r.decision === 'error' && (r.device as { name?: string } | undefined)?.name === name
      && /unplugging failed: .*trying again in 1 s/.test(r.message ?? '')), 15_000, 'no failed unplug recorded');
    const meanwhile = await probe({ socket: broker.socket, requests: [{ network: 'prod', name }] });
    t.is(meanwhile.result.error?.code, 'TB_E_BUSY', JSON.stringify(meanwhile.result.error));
    await meanwhile.release();
    ovs.pauseDb(false);
    paused = false;
    await broker.waitFor(() => broker.records.some((r) => r.decision === 'unplug' && r.message === 'unplugged from its network'
      && (r.device as { name?: string } | undefined)?.name === name), 30_000, 'the port was never removed');
    t.is(portOf(name), null, 'the stale port is gone');
    const again = await probe({ socket: broker.socket, requests: [{ network: 'prod', name }] });
    t.is(again.result.error, null, again.result.error?.message);
    await again.release();
  } finally {
    if (paused) ovs.pauseDb(false);
  }
});

t0('a port removal that failed and then found nothing to remove says so: its trail ends (rv131)', async (t) => {
  // Found by an outside review: the trail of such a device ended in "unplugging failed … trying again", for good.
  const name = `tb${NOBODY}-gon`;
  const p = await probe({ socket: broker.socket, requests: [{ network: 'prod', name }] });
  t.is(p.result.error, null, p.result.error?.message);
  ovs.pauseDb(true);
  let paused = true;
  const failed = (n: number) => broker.records.some((r) => r.decision === 'error' && (r.device as { name?: string } | undefined)?.name === name
    && new RegExp(`unplugging failed: .*trying again in ${n} s`).test(r.message ?? ''));
  try {
    await p.release();
    // Its second failure leaves 2 s before the next try: the port goes by hand meanwhile.
    await broker.waitFor(() => failed(2), 20_000, 'no second failed unplug recorded');
    ovs.pauseDb(false);
    paused = false;
    ovs.vsctl('--if-exists', 'del-port', 'br-int', name);
    await broker.waitFor(() => broker.records.some((r) => r.decision === 'unplug' && r.message === 'nothing was left to remove from its network'
      && (r.device as { name?: string } | undefined)?.name === name), 15_000, 'the last try was not recorded');
  } finally {
    if (paused) ovs.pauseDb(false);
  }
});

t0('a live VM\'s port removed by hand is said at the next listing (rv131)', async (t) => {
  // Found by an outside review: the VM had no network for good, and list, log and audit said nothing.
  const p = await probe({ socket: broker.socket, requests: [{ network: 'prod' }] });
  t.is(p.result.error, null, p.result.error?.message);
  const name = p.result.taps[0]!.device.name;
  try {
    ovs.vsctl('del-port', 'br-int', name);
    const seen = broker.records.length;
    broker.proc.kill('SIGHUP');
    const lost = (r: { op: string; device?: unknown; message?: string }) => r.op === 'reconcile'
      && (r.device as { name?: string } | undefined)?.name === name
      && /its open vswitch port on br-int is gone: its guest has no network there/.test(r.message ?? '');
    await broker.waitFor(() => broker.records.slice(seen).some(lost), 5000, 'the lost port was not said');
    // Said once, not at every reload (a re-test's logrotate made it one a day).
    const logged = broker.stderr.length;
    broker.proc.kill('SIGHUP');
    await broker.waitFor(() => /port\(s\) not this broker's/.test(broker.stderr.slice(logged)), 5000, 'no listing');
    t.is(broker.records.filter(lost).length, 1);
  } finally {
    await p.release();
  }
});

t0('a port removal owed at start is done and recorded once, not also as a stale port (rv131)', async (t) => {
  // Found by an outside review: the owed removal and the start's listing both went after the port, and both
  // recorded its removal (a race this test does not force: the review's script met it in 5 runs of 6 around an
  // Open vSwitch outage; this holds the outcome).
  const p = await probe({ socket: broker.socket, requests: [{ network: 'prod' }] });
  t.is(p.result.error, null, p.result.error?.message);
  const name = p.result.taps[0]!.device.name;
  await broker.stop('SIGKILL', true);
  await p.release();
  await new Promise((r) => setTimeout(r, 200));
  broker = await BrokerProcess.start(ns, policy, { dir });
  const about = (r: { device?: unknown }) => (r.device as { name?: string } | undefined)?.name === name;
  const unplugged = () => broker.records.filter((r) => about(r) && r.op === 'unplug' && r.decision === 'unplug').length;
  await broker.waitFor(() => unplugged() > 0, 15_000, 'the owed removal was not recorded');
  await broker.waitFor(() => /open vswitch at .* reconciled/.test(broker.stderr), 15_000, 'no reconcile of OVS');
  t.is(portOf(name), null);
  t.is(unplugged(), 1);
  t.false(broker.records.some((r) => about(r) && /a stale open vswitch port of ours: removed/.test(r.message ?? '')));
});

t0('at start, stale OVS ports of ours are removed; a port without our external-ids is never touched', async (t) => {
  const p = await probe({ socket: broker.socket, requests: [{ network: 'prod' }] });
  const name = p.result.taps[0]!.device.name;
  await broker.stop('SIGKILL', true);
  await p.release();
  t.truthy(portOf(name), 'the tap is gone but its port record stays');
  ns.ip('tuntap', 'add', 'foreign0', 'mode', 'tap');
  ovs.vsctl('add-port', 'br-int', 'foreign0');
  broker = await BrokerProcess.start(ns, policy, { dir });
  await broker.waitFor(() => portOf(name) === null, 5000, 'stale port not removed');
  t.truthy(portOf('foreign0'), 'foreign port untouched');
  ovs.vsctl('del-port', 'br-int', 'foreign0');
  ns.ip('tuntap', 'del', 'foreign0', 'mode', 'tap');
});

t0('at start with Open vSwitch not answering, stale ports of ours are removed once it answers', async (t) => {
  // Found by an outside code review: reconcile at start tried each database once, so a broker started before
  // Open vSwitch (or while it hung) left its stale ports until its next start.
  const p = await probe({ socket: broker.socket, requests: [{ network: 'prod' }] });
  const name = p.result.taps[0]!.device.name;
  await broker.stop('SIGKILL', true);
  await p.release();
  t.truthy(portOf(name), 'the tap is gone but its port record stays');
  // The lease table lost too: only the port's own external-ids say it is ours (no `down` is owed to it).
  fs.rmSync(broker.stateFile);
  ovs.pauseDb(true);
  let paused = true;
  try {
    broker = await BrokerProcess.start(ns, policy, { dir });
    await broker.waitFor(() => /cannot reconcile open vswitch at .*; trying again in 1 s/.test(broker.stderr), 20_000,
      'no failed reconcile logged');
    ovs.pauseDb(false);
    paused = false;
    await broker.waitFor(() => portOf(name) === null, 20_000, 'the stale port was never removed');
    await broker.record((r) => r.op === 'reconcile' && r.message === 'a stale open vswitch port of ours: removed'
      && (r.device as { name?: string }).name === name);
  } finally {
    if (paused) ovs.pauseDb(false);
  }
});

t0('a second broker in the namespace leaves the first one\'s live OVS ports alone at its start', async (t) => {
  // Found by an outside review: the OVS port carried no broker id, and a second broker (another state directory)
  // took the first one's live port for a stale one of its own and removed it, cutting the guest off.
  const p = await probe({ socket: broker.socket, requests: [{ network: 'prod' }] });
  const name = p.result.taps[0]!.device.name;
  const dir2 = tempDir('ovs-e2e-second');
  let second: BrokerProcess | null = null;
  try {
    t.regex(portOf(name)!.ids, /"?tapbroker-broker"?="?[0-9a-f]{8}"?/, 'the port names its broker');
    second = await BrokerProcess.start(ns, policy, { dir: dir2, tag: 'ovs-second' });
    await second.waitFor(() => /open vswitch at .* reconciled: [1-9]\d* port\(s\) made by tapbroker \(this broker and others\), 0 stale/.test(second!.stderr), 10_000,
      'the second broker never reconciled the database');
    t.truthy(portOf(name), 'the first broker\'s live port is still there');
  } finally {
    await second?.stop();
    fs.rmSync(dir2, { recursive: true, force: true });
    await p.release();
  }
});

// Found by an outside review of libvirt and Open vSwitch users: a reboot empties /run (the lease table, the broker's
// identity) and takes every device, but Open vSwitch's database is on disk: its ports named a broker that no longer
// was, so no broker removed them, and their names were kept from new devices; the persistent device's unit was refused
// (TB_E_DEVICE_EXISTS) after every boot. Ports name their boot too: one of an earlier boot is removed, whoever's.
// A reboot cannot be made in a test: the port is given another boot's id, as the boot before would have written it.
t0('after a reboot (its state gone, a new identity), ports of an earlier boot are removed and their names free again', async (t) => {
  const name = `tb${NOBODY}-boot`;
  const made = await probe({ socket: broker.socket, requests: [{ network: 'prod', persistent: true, name }] });
  t.is(made.result.error, null, made.result.error?.message);
  await made.release();
  const boot = fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim().replace(/-/g, '');
  t.regex(portOf(name)!.ids, new RegExp(`"?tapbroker-boot"?="?${boot}"?`), 'the port names its boot');
  // And a VM's tap whose port says another boot, its device alive: what a broker that sees another boot id (a
  // container's own) finds. Its re-test: such a live port was removed.
  const live = await probe({ socket: broker.socket, requests: [{ network: 'prod' }] });
  t.teardown(() => live.release());
  const liveName = live.result.taps[0]!.device.name;
  // The "reboot": the broker dies, the device goes, /run is empty, and the port is the last boot's.
  await broker.stop('SIGKILL', true);
  ns.ip('link', 'del', name);
  fs.rmSync(path.dirname(broker.stateFile), { recursive: true, force: true });
  const earlier = '00000000000040008000000000000000';
  ovs.vsctl('set', 'Port', name, `external_ids:tapbroker-boot=${earlier}`);
  ovs.vsctl('set', 'Port', liveName, `external_ids:tapbroker-boot=${earlier}`);
  broker = await BrokerProcess.start(ns, policy, { dir });
  await broker.waitFor(() => portOf(name) === null, 10_000, 'the earlier boot\'s port was not removed');
  await broker.record((r) => r.op === 'reconcile' && /an open vswitch port of an earlier boot/.test(r.message ?? '')
    && (r.device as { name?: string }).name === name);
  t.truthy(portOf(liveName), 'a port whose device is alive stays, whatever boot it names');
  await live.release();
  // Its device gone, the next start removes it.
  await broker.stop('SIGTERM', true);
  broker = await BrokerProcess.start(ns, policy, { dir });
  await broker.waitFor(() => portOf(liveName) === null, 10_000, 'the port of a device gone, of an earlier boot');
  // What tapbroker-persistent@NAME runs at every boot: the device is made again, on its VLAN.
  const again = await probe({ socket: broker.socket, requests: [{ network: 'prod', persistent: true, name }],
    release: [name] });
  t.is(again.result.error, null, again.result.error?.message);
  await again.release();
  await broker.waitFor(() => portOf(name) === null, 5000, 'the port outlived its release');
});

// Found by its re-test: the unit's ProcSubset=pid hides /proc/sys/kernel/random/boot_id, so under the unit no port
// named its boot and the fix above did nothing. The unit gives it (TAPBROKER_BOOT_ID=%b): here the broker runs with
// /proc mounted as ProcSubset=pid mounts it, and the variable as systemd sets it.
t0('under the unit\'s ProcSubset=pid, ports name the boot the unit gives (TAPBROKER_BOOT_ID)', async (t) => {
  const boot = fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  await broker.stop('SIGTERM', true);
  try {
    broker = await BrokerProcess.start(ns, policy, {
      dir, env: { TAPBROKER_BOOT_ID: boot.replace(/-/g, '') },
      wrap: ['unshare', '-m', '--propagation', 'private', 'sh', '-c', 'mount -t proc -o subset=pid proc /proc && exec "$@"',
        'sh'],
    });
    const p = await probe({ socket: broker.socket, requests: [{ network: 'prod' }] });
    const name = p.result.taps[0]!.device.name;
    try {
      t.regex(portOf(name)!.ids, new RegExp(`"?tapbroker-boot"?="?${boot.replace(/-/g, '')}"?`));
    } finally {
      await p.release();
    }
    await broker.waitFor(() => portOf(name) === null, 5000, 'the port outlived its tap');
  } finally {
    await broker.stop('SIGTERM', true);
    broker = await BrokerProcess.start(ns, policy, { dir });
  }
});

t0('a device named as a port someone else made: add-port fails, and the rollback leaves that port alone', async (t) => {
  // Found by an outside review: the rollback removed whatever port had the name (del-port by name), here an
  // administrator's internal port, which add-port had refused to take over.
  const name = `tb${NOBODY}-adm`;
  // A patch port: a port record with no kernel device of that name.
  ovs.vsctl('add-port', 'br-int', name, '--', 'set', 'Interface', name, 'type=patch', 'options:peer=nowhere');
  try {
    const r = await probe({ socket: broker.socket, requests: [{ network: 'prod', name }] });
    await r.release();
    t.is(r.result.error?.code, 'TB_E_KERNEL', JSON.stringify(r.result.error));
    // The caller is told its network's plugging failed; what Open vSwitch said, and its database, are in the record
    // (an outside re-test read the database's path in such a refusal).
    t.is(r.result.error?.message, 'Open vSwitch could not plug the device into network `prod\': it was rolled back');
    t.notRegex(JSON.stringify(r.result.error), /unix:|\.sock|br-int/);
    const rec = await broker.record((x) => x.decision === 'error' && x.code === 'TB_E_KERNEL'
      && (x.request as { parent?: string } | undefined)?.parent === 'prod');
    t.regex(rec.message ?? '', /br-int/, 'the record says what failed');
    await broker.record((rec) => rec.decision === 'cleanup' && /create rolled back/.test(rec.message ?? '')
      && (rec.device as { name?: string }).name === name);
    t.truthy(portOf(name), 'the administrator\'s port is still there');
    // And no unplug of it is owed (retried for minutes, the name blocked).
    const again = await probe({ socket: broker.socket, requests: [{ network: 'prod', name }] });
    await again.release();
    t.not(again.result.error?.code, 'TB_E_BUSY', JSON.stringify(again.result.error));
  } finally {
    ovs.vsctl('--if-exists', 'del-port', 'br-int', name);
  }
});

t0('a port that is not the broker\'s keeps its name from every device, a Linux bridge\'s tap too, until it is gone (rv124)', async (t) => {
  // Found by an outside review: a user with no rule for an OVS network asked for a tap on a Linux bridge named as a
  // port left in OVS (another broker's, one made before 0.5.0 or by hand), and ovs-vswitchd took the tap into that
  // port, on its VLAN. The broker lists such ports at start and at each reload.
  const name = `tb${NOBODY}-fgn`;
  ovs.vsctl('add-port', 'br-int', name, 'tag=999', '--', 'set', 'Port', name, 'external-ids:tapbroker-lease=00000000deadbeef',
    `external-ids:tapbroker-uid=${NOBODY}`, 'external-ids:tapbroker-broker=0123abcd');
  ns.ip('link', 'add', 'lbr-fgn', 'address', '02:00:00:00:0f:01', 'type', 'bridge');
  // Each reload lists the ports again, and logs them (the bridge's own interface, br-int, is one).
  const reloaded = async () => {
    const logged = broker.stderr.length;
    broker.proc.kill('SIGHUP');
    await broker.waitFor(() => /port\(s\) not this broker's/.test(broker.stderr.slice(logged)), 5000, 'no listing');
    return broker.stderr.slice(logged);
  };
  try {
    fs.writeFileSync(broker.policyPath, `${policy}bridges = ["lbr-fgn"]\n`);
    t.regex(await reloaded(), new RegExp(`whose names no new device gets: .*\`${name}'`));
    for (const request of [{ bridge: 'lbr-fgn', name }, { network: 'prod', name }]) {
      const r = await probe({ socket: broker.socket, requests: [request] });
      await r.release();
      t.is(r.result.error?.code, 'TB_E_DEVICE_EXISTS', JSON.stringify(request));
      t.regex(r.result.error?.message ?? '', /^an Open vSwitch port named `tb\d+-fgn' is not this broker's: Open vSwitch would take/);
    }
    t.false(ns.ip('-o', 'link', 'show').includes(`${name}:`), 'no device of that name was made');
    // Gone by hand, and the broker reloaded: the name is given out again.
    ovs.vsctl('del-port', 'br-int', name);
    t.notRegex(await reloaded(), new RegExp(`\`${name}'`));
    const r = await probe({ socket: broker.socket, requests: [{ bridge: 'lbr-fgn', name }] });
    await r.release();
    t.is(r.result.error, null, JSON.stringify(r.result.error));
  } finally {
    ovs.vsctl('--if-exists', 'del-port', 'br-int', name);
    ns.ip('link', 'del', 'lbr-fgn');
    fs.writeFileSync(broker.policyPath, policy);
    await reloaded();
  }
});

t0('until Open vSwitch has answered once, no device gets a name its caller chose; then a port not the broker\'s keeps its name (rv126)', async (t) => {
  // Found by an outside re-test: the broker serves at once and lists the ports when Open vSwitch answers (it may
  // start after the broker): until then, a Linux bridge tap named as such a port was granted, and taken into it.
  const name = `tb${NOBODY}-early`;
  ovs.vsctl('add-port', 'br-int', name, 'tag=999');
  ns.ip('link', 'add', 'lbr-early', 'address', '02:00:00:00:0f:02', 'type', 'bridge');
  await broker.stop('SIGTERM', true);
  ovs.pauseDb(true);
  let paused = true;
  try {
    broker = await BrokerProcess.start(ns, `${policy}bridges = ["lbr-early"]\n`, { dir });
    const early = await probeOnce({ socket: broker.socket, requests: [{ bridge: 'lbr-early', name }] });
    t.is(early.error?.code, 'TB_E_BUSY', JSON.stringify(early.error));
    t.regex(early.error?.message ?? '', /^the ports of Open vSwitch are not listed yet/);
    t.notRegex(early.error?.message ?? '', /unix:|\.sock|\.db/, 'the database is the policy\'s to tell (an outside review)');
    const picked = await probe({ socket: broker.socket, requests: [{ bridge: 'lbr-early' }] });
    await picked.release();
    t.is(picked.result.error, null, 'a name the broker picks is given meanwhile');
    t.false(ns.ip('-o', 'link', 'show').includes(`${name}:`), 'no device of that name was made');
    ovs.pauseDb(false);
    paused = false;
    await broker.waitFor(() => new RegExp(`no new device gets: .*\`${name}'`).test(broker.stderr), 20_000, 'no listing');
    const later = await probeOnce({ socket: broker.socket, requests: [{ bridge: 'lbr-early', name }] });
    t.is(later.error?.code, 'TB_E_DEVICE_EXISTS', JSON.stringify(later.error));
  } finally {
    if (paused) ovs.pauseDb(false);
    ovs.vsctl('--if-exists', 'del-port', 'br-int', name);
    await broker.stop('SIGTERM', true);
    ns.ip('link', 'del', 'lbr-early');
    broker = await BrokerProcess.start(ns, policy, { dir });
  }
});

t0('a trunk port: its VLANs in the port and in the grant\'s record (rv124)', async (t) => {
  const trunk = `[network.tr]\novs = "br-int"\ntrunk = [200, 300]\novsdb = "${ovs.db}"\n\n`;
  fs.writeFileSync(broker.policyPath, trunk + policy.replace('networks = ["prod"]', 'networks = ["prod", "tr"]'));
  const seen = broker.records.length;
  broker.proc.kill('SIGHUP');
  await broker.waitFor(() => broker.records.slice(seen).some((r) => r.op === 'reload'), 5000, 'no reload');
  try {
    const p = await probe({ socket: broker.socket, requests: [{ network: 'tr' }] });
    t.is(p.result.error, null, JSON.stringify(p.result.error));
    const name = p.result.taps[0]!.device.name;
    t.is(ovs.vsctl('get', 'Port', name, 'trunks').trim(), '[200, 300]');
    const grant = await broker.record((r) => r.decision === 'grant' && (r.device as { name?: string })?.name === name);
    t.deepEqual((grant.device as { plug?: unknown }).plug, { ovs: 'br-int', action: 'up', trunks: [200, 300] });
    await p.release();
  } finally {
    fs.writeFileSync(broker.policyPath, policy);
    const at = broker.records.length;
    broker.proc.kill('SIGHUP');
    await broker.waitFor(() => broker.records.slice(at).some((r) => r.op === 'reload'), 5000, 'no reload');
  }
});

t0('a network a reload retired: its lease\'s port is removed when the lease ends, and at start when the lease is gone (review B4)', async (t) => {
  // A persistent tap on prod; then the policy retires prod.
  const made = await probe({ socket: broker.socket, requests: [{ network: 'prod', persistent: true }] });
  await made.release();
  const name = made.result.taps[0]!.device.name;
  t.truthy(portOf(name));
  const retired = `[[rule]]\nname = "vm"\nusers = [${NOBODY}]\nbridges = []\nmacvtap = [{ parent = "lo" }]\npersistent = true\n`;
  fs.writeFileSync(broker.policyPath, retired);
  broker.proc.kill('SIGHUP');
  await broker.record((r) => r.op === 'reload' && r.decision === 'reload');
  // The broker dies, the device goes behind its back; at the next start the lease is dropped and the
  // port, in a database no network of the policy names any more, is still found and removed.
  await broker.stop('SIGKILL', true);
  ns.ip('link', 'del', name);
  t.truthy(portOf(name), 'the port record outlived its tap');
  broker = await BrokerProcess.start(ns, retired, { dir });
  await broker.waitFor(() => portOf(name) === null, 5000, 'the retired network\'s stale port was not removed');
  await broker.stop('SIGTERM', true);
  broker = await BrokerProcess.start(ns, policy, { dir });
});

const noGuest = unavailable ?? guestUnavailable();
(noGuest ? test.skip : test.serial)('a qemu guest on an OVS access port of VLAN 100 reaches VLAN 100 and not VLAN 200', async (t) => {
  t.timeout(180_000);
  const img = guestImage();
  const boot = (ping: string) => new Promise<string>((resolve) => {
    const c = spawnAs({}, process.execPath, [CLIENT_CLI, 'run', '--socket', broker.socket, '--net', 'network=prod', '--', QEMU, ...guestQemuArgs(img, { ip: '192.0.2.2/24', ping, timeout: 6 })], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    c.stdout!.on('data', (d) => (out += d));
    const timer = setTimeout(() => c.kill('SIGKILL'), 120_000);
    c.on('exit', () => { clearTimeout(timer); resolve(out); });
  });
  const same = await boot('192.0.2.1');
  t.regex(same, /TB-GUEST-PING-OK 192\.0\.2\.1/, 'same VLAN');
  const other = await boot('192.0.2.3');
  t.regex(other, /TB-GUEST-PING-FAIL 192\.0\.2\.3/, 'the VLAN 200 peer is unreachable');
});
