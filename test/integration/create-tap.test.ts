// create-tap against the real kernel: a fresh namespace for this file, the broker as a root child
// process inside it, every client as an unprivileged uid.
import anyTest, { type TestFn } from 'ava';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import {
  MAX_REPLY_BYTES, PROTOCOL_VERSION, SeqpacketConnection, decodeReply, encodeFrame,
} from '@tapbroker/protocol';
import { ROOT } from '../helpers/broker.js';
import { brokerFixture } from '../helpers/fixture.js';
import { NOBODY, OTHER_UID, probe, probeOnce } from '../helpers/unpriv.js';

const test = anyTest as TestFn;
const GROUP_LAB = 64100;
const DENIED_UID = 64001;
const GROUP_UID = 64002;

const POLICY = `
[[rule]]
name = "lab"
users = [${NOBODY}]
groups = [${GROUP_LAB}]
bridges = ["br0", "veth-nb", "ghost0"]
max_queues = 4
vhost = true
max_devices = 3

[[rule]]
name = "other"
users = [${OTHER_UID}]
bridges = ["br1"]

[[deny]]
name = "no-64001"
users = [${DENIED_UID}]
`;

const HOST_LINKS = ['br0', 'br1', 'veth-nb', 'veth-nb2'];

const fx = brokerFixture(test, {
  tag: 'tap', policy: POLICY,
  bridges: [['br0', { mtu: 1400, address: '192.0.2.1/24' }], 'br1'],
  veths: [['veth-nb', 'veth-nb2']],
});

const sock = () => fx.broker.socket;
const rx = (name: string) => fx.ns.link(name)?.stats64?.rx.packets ?? -1;

test.serial('a granted tap is a port of the bridge, up, with its MTU and a 0xfe MAC, and its fd works for uid 65534', async (t) => {
  const p = await probe({ socket: sock(), requests: [{ bridge: 'br0' }], write: true });
  try {
    t.is(p.result.error, null);
    t.is(p.result.uid, NOBODY);
    const { device } = p.result.taps[0]!;
    t.regex(device.name, new RegExp(`^tb${NOBODY}-[0-9a-z]+$`));
    t.true(Buffer.byteLength(device.name) <= 15);
    const link = fx.ns.link(device.name)!;
    t.truthy(link, 'the tap exists in the namespace');
    t.is(link.ifindex, device.ifindex);
    t.is(link.master, 'br0');
    t.true(link.flags.includes('UP'));
    t.is(link.mtu, 1400);
    t.is(device.mtu, 1400);
    t.is(link.address, device.host_mac);
    t.true(link.address.startsWith('fe:'));
    t.true(device.mac!.startsWith('52:54:00:'));
    t.is(link.address.slice(2), device.mac!.slice(2), 'host MAC is the guest MAC with a 0xfe first octet');
    t.is(link.linkinfo?.info_kind, 'tun');
    t.is(link.linkinfo?.info_data?.['type'], 'tap');
    t.is(link.linkinfo?.info_data?.['vnet_hdr'], true);
    t.deepEqual(p.result.taps[0]!.written, [70]);
    t.is(rx(device.name), 1, 'the frame written by uid 65534 arrived on the tap');
    const grant = await fx.broker.record((r) => r.decision === 'grant' && (r.device as { name: string }).name === device.name);
    t.truthy(grant);
    t.is(grant!.uid, NOBODY);
    t.is(grant!.rule, 'lab');
    t.is(grant!.op, 'create-tap');
    t.regex(grant!.policy_sha256, /^[0-9a-f]{64}$/);
    t.is(grant!.exe, process.execPath);
  } finally {
    await p.release();
  }
});

test.serial('a fd-passed tap vanishes with the last process holding it', async (t) => {
  const p = await probe({ socket: sock(), requests: [{ bridge: 'br0' }] });
  const name = p.result.taps[0]!.device.name;
  t.truthy(fx.ns.link(name));
  await p.release();
  t.is(fx.ns.link(name), undefined);
});

test.serial('multiqueue gives one working fd per queue and mq flags', async (t) => {
  const p = await probe({ socket: sock(), requests: [{ bridge: 'br0', queues: 4 }], write: true });
  try {
    t.is(p.result.error, null);
    const tap = p.result.taps[0]!;
    t.is(tap.tapFds, 4);
    t.deepEqual(tap.written, [70, 70, 70, 70]);
    const link = fx.ns.link(tap.device.name)!;
    t.is(link.linkinfo?.info_data?.['multi_queue'], true);
    t.is(link.linkinfo?.info_data?.['numqueues'], 4);
    t.is(rx(tap.device.name), 4);
  } finally {
    await p.release();
  }
});

const refused = test.macro({
  async exec(t, request: Record<string, unknown>, code: string, as: { uid?: number; groups?: number[] } = {}) {
    const before = fx.broker.records.length;
    const r = await probeOnce({ socket: sock(), requests: [{ bridge: 'br0', ...request }] }, as);
    t.is(r.error?.code, code, r.error?.message);
    t.deepEqual(fx.ns.extraLinks(HOST_LINKS), [], 'no device left behind');
    await fx.broker.waitFor(() => fx.broker.records.slice(before).some((x) => x.op === 'create-tap'), 3000, 'refusal not audited');
    const rec = fx.broker.records.slice(before).find((x) => x.op === 'create-tap');
    t.truthy(rec, 'the refusal was audited');
    t.is(rec!.code, code);
    t.true(fx.broker.alive);
  },
  title: (what) => `refused: ${what}`,
});

test.serial('bridge not in the rule', refused, { bridge: 'br1' }, 'TB_E_POLICY_DENIED');
test.serial('name of 16 bytes', refused, { name: `tb${NOBODY}-abcdefgh` }, 'TB_E_INVALID_NAME');
test.serial('name with a slash', refused, { name: `tb${NOBODY}-a/b` }, 'TB_E_INVALID_NAME');
test.serial('name of a host device', refused, { name: 'br0' }, 'TB_E_INVALID_NAME');
test.serial('name outside the caller prefix', refused, { name: `tb${OTHER_UID}-x` }, 'TB_E_INVALID_NAME');
test.serial('bridge name of 16 bytes', refused, { bridge: 'br0123456789abcd' }, 'TB_E_INVALID_NAME');
test.serial('MAC outside the prefix', refused, { mac: '02:00:00:00:00:01' }, 'TB_E_INVALID_MAC');
test.serial('multicast MAC', refused, { mac: '53:54:00:00:00:01' }, 'TB_E_INVALID_MAC');
test.serial('zero queues', refused, { queues: 0 }, 'TB_E_INVALID_QUEUES');
test.serial('more queues than the rule allows', refused, { queues: 5 }, 'TB_E_POLICY_DENIED');
test.serial('a bridge that does not exist', refused, { bridge: 'ghost0' }, 'TB_E_NO_SUCH_BRIDGE');
test.serial('a master that is not a bridge', refused, { bridge: 'veth-nb' }, 'TB_E_NOT_A_BRIDGE');
test.serial('a user named by a deny rule, even with an allowing group', refused, {}, 'TB_E_POLICY_DENIED', { uid: DENIED_UID, groups: [GROUP_LAB] });
test.serial('a user no rule names', refused, {}, 'TB_E_POLICY_DENIED', { uid: 64003 });

test.serial('a denial names the rule and what the caller could change', async (t) => {
  const denied = await probeOnce({ socket: sock(), requests: [{ bridge: 'br0' }] }, { uid: DENIED_UID, groups: [GROUP_LAB] });
  t.is(denied.error?.rule, 'no-64001');
  t.truthy(denied.error?.hint);
  const nomatch = await probeOnce({ socket: sock(), requests: [{ bridge: 'br0' }] }, { uid: OTHER_UID });
  t.is(nomatch.error?.rule, undefined, 'no rule decided it, and the reply says so by naming none');
  t.regex(nomatch.error!.hint!, /br1/);
  const queues = await probeOnce({ socket: sock(), requests: [{ bridge: 'br0', queues: 5 }] });
  t.is(queues.error?.rule, 'lab');
  t.regex(queues.error!.hint!, /4 queues or fewer/);
});

test.serial('a supplementary group from the kernel grants access', async (t) => {
  const r = await probeOnce({ socket: sock(), requests: [{ bridge: 'br0' }] }, { uid: GROUP_UID, groups: [GROUP_LAB] });
  t.is(r.error, null);
  t.is(r.taps[0]!.device.rule, 'lab');
  const without = await probeOnce({ socket: sock(), requests: [{ bridge: 'br0' }] }, { uid: GROUP_UID });
  t.is(without.error?.code, 'TB_E_POLICY_DENIED');
});

test.serial('the quota counts live devices only', async (t) => {
  const held = await probe({ socket: sock(), requests: [{ bridge: 'br0' }, { bridge: 'br0' }, { bridge: 'br0' }] });
  try {
    t.is(held.result.taps.length, 3);
    const over = await probeOnce({ socket: sock(), requests: [{ bridge: 'br0' }] });
    t.is(over.error?.code, 'TB_E_QUOTA_EXCEEDED');
    t.is(over.error?.rule, 'lab');
    t.is(fx.ns.extraLinks(HOST_LINKS).length, 3);
  } finally {
    await held.release();
  }
  const after = await probeOnce({ socket: sock(), requests: [{ bridge: 'br0' }] });
  t.is(after.error, null, 'taps that vanished with their fds no longer count');
});

test.serial('an existing persistent tap can never be attached to (IFF_TUN_EXCL)', async (t) => {
  const name = `tb${NOBODY}-pers`;
  fx.ns.ip('tuntap', 'add', 'dev', name, 'mode', 'tap');
  try {
    const before = fx.ns.link(name)!;
    const r = await probeOnce({ socket: sock(), requests: [{ bridge: 'br0', name }] });
    t.is(r.error?.code, 'TB_E_DEVICE_EXISTS');
    const after = fx.ns.link(name)!;
    t.is(after.ifindex, before.ifindex);
    t.is(after.master, undefined, 'not attached to the bridge');
    t.false(after.flags.includes('UP'));
  } finally {
    fx.ns.ip('tuntap', 'del', 'dev', name, 'mode', 'tap');
  }
});

test.serial('a name the caller picks inside its prefix is used exactly', async (t) => {
  const name = `tb${NOBODY}-vm0`;
  const r = await probeOnce({ socket: sock(), requests: [{ bridge: 'br0', name }] });
  t.is(r.error, null);
  t.is(r.taps[0]!.device.name, name);
  t.is(fx.ns.link(name), undefined, 'gone once released');
});

const hasVhost = fs.existsSync('/dev/vhost-net');

(hasVhost ? test.skip : test.serial)(`vhost-net is refused with a clear error where the kernel lacks it${hasVhost ? ' (skipped: /dev/vhost-net exists here; the grant is tested below)' : ''}`, async (t) => {
  const r = await probeOnce({ socket: sock(), requests: [{ bridge: 'br0', vhost: true, queues: 2 }] });
  t.is(r.error?.code, 'TB_E_VHOST_UNAVAILABLE');
  t.regex(r.error!.message, /vhost unavailable/);
  t.regex(r.error!.hint ?? '', /ask without vhost .*modprobe vhost_net/);
  t.deepEqual(fx.ns.extraLinks(HOST_LINKS), [], 'the tap made before the vhost step was rolled back');
});

(hasVhost ? test.serial : test.skip)(`vhost-net fds, one per queue${hasVhost ? '' : ' (skipped: /dev/vhost-net absent, CONFIG_VHOST_NET off on this kernel)'}`, async (t) => {
  const r = await probeOnce({ socket: sock(), requests: [{ bridge: 'br0', vhost: true, queues: 2 }] });
  t.is(r.error, null);
  t.is(r.taps[0]!.vhostFds, 2);
});
if (!hasVhost) console.log('# skip vhost-net grant: /dev/vhost-net does not exist (CONFIG_VHOST_NET is off on this kernel)');

// The answer about vhost-net is kept until a module is loaded or unloaded, as /sys/module shows it: the unit's
// ProcSubset=pid hides /proc/modules, and an outside review found the answer kept for good there (a `modprobe
// vhost_net', as the refusal's hint says, changed nothing). Private mounts stand in for /dev and /sys/module.
const MODULES_SCRIPT = `set -e
mount -t tmpfs -o mode=755 none /dev; mknod -m 666 /dev/vhost-net c 10 238
mount -t tmpfs -o mode=755 none /sys/module; mkdir /sys/module/tun; exec "$@"`;
(hasVhost ? test.skip : test)(`a vhost-net answer is asked again once /sys/module changes, not before${hasVhost ? ' (skipped: this host\'s driver would answer)' : ''}`, (t) => {
  const script = `
    import fs from 'node:fs';
    import { vhostRefusal } from './packages/broker/dist/kernel.js';
    const said = () => vhostRefusal()?.message ?? 'available';
    const first = said();
    fs.rmSync('/dev/vhost-net');
    const cached = said();
    fs.mkdirSync('/sys/module/vhost_net');
    console.log(JSON.stringify([first, cached, said()]));`;
  const r = spawnSync('unshare', ['-m', '--propagation', 'private', 'sh', '-c', MODULES_SCRIPT, 'sh', process.execPath,
    '--input-type=module', '-e', script], { encoding: 'utf8', cwd: ROOT });
  t.is(r.status, 0, r.stderr);
  t.deepEqual(JSON.parse(r.stdout), [
    'vhost unavailable: /dev/vhost-net has no driver behind it (ENODEV)',
    'vhost unavailable: /dev/vhost-net has no driver behind it (ENODEV)',
    'vhost unavailable: /dev/vhost-net does not exist on this host',
  ]);
});

test.serial('a client that disconnects mid-request leaves nothing behind and the broker keeps serving', async (t) => {
  const fdsBefore = fx.broker.fdCount();
  for (let i = 0; i < 5; i++) {
    const conn = await SeqpacketConnection.connect(sock(), { maxPacket: MAX_REPLY_BYTES });
    await conn.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION }));
    await conn.send(encodeFrame({ op: 'create-tap', id: 2, bridge: 'br0' }));
    conn.close();
  }
  // Root is not in the policy; use the unprivileged path for the grant-then-vanish race too.
  const raced = await probe({ socket: sock(), requests: [{ bridge: 'br0' }] });
  raced.child.kill('SIGKILL');
  await raced.release();
  await fx.broker.waitFor(() => fx.ns.extraLinks(HOST_LINKS).length === 0, 2000, 'devices left behind');
  const r = await probeOnce({ socket: sock(), requests: [{ bridge: 'br0' }] });
  t.is(r.error, null);
  await fx.broker.waitFor(() => fx.broker.fdCount() === fdsBefore, 2000, `broker fds ${fx.broker.fdCount()} != ${fdsBefore}`);
  t.is(fx.broker.fdCount(), fdsBefore);
  t.deepEqual(fx.ns.extraLinks(HOST_LINKS), []);
});

test.serial('a tap its holder made persistent against the rule is deleted at once, while its holder still runs', async (t) => {
  // TUNSETPERSIST needs no capability on an attached fd; the kernel announces it (RTM_NEWLINK).
  const p = await probe({ socket: sock(), requests: [{ bridge: 'br0' }], persistOwnFds: true });
  const name = p.result.taps[0]!.device.name;
  try {
    await fx.broker.waitFor(() => fx.ns.link(name) === undefined, 2000, `${name} was not deleted`);
  } finally {
    await p.release();
  }
  t.is(fx.ns.link(name), undefined, 'not back after its holder exited either');
  await fx.broker.waitFor(() => fx.broker.records.some((r) => r.decision === 'cleanup' && /made it persistent/.test(r.message ?? '')), 3000, 'no cleanup record');
  t.true(fx.broker.records.some((r) => r.decision === 'cleanup' && /made it persistent/.test(r.message ?? '')), 'the cleanup is audited');
});

test.serial('a root client not named in the policy is refused by policy, not by uid', async (t) => {
  const conn = await SeqpacketConnection.connect(sock(), { maxPacket: MAX_REPLY_BYTES });
  try {
    await conn.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION }));
    t.is(decodeReply((await conn.receive())!.data).op, 'hello');
    await conn.send(encodeFrame({ op: 'create-tap', id: 2, bridge: 'br0' }));
    const reply = decodeReply((await conn.receive())!.data);
    t.is(reply.op, 'error');
    t.is(reply.op === 'error' ? reply.code : '', 'TB_E_POLICY_DENIED');
  } finally {
    conn.close();
  }
});
