// Protocol version 2 against the real kernel: `create` (one VM's NICs in one request, all or none, each
// decided and audited on its own), `status`, a guest MAC the broker is not told (`mac: null`), and the
// version handshake. A fresh namespace for this file; every client an unprivileged uid.
import anyTest, { type TestFn } from 'ava';
import { MAX_REPLY_BYTES, PROTOCOL_VERSION, SeqpacketConnection, decodeReply, encodeFrame } from '@tapbroker/protocol';
import type { AuditRecord } from '@tapbroker/broker/internal';
import { CLIENT_CLI } from '../helpers/broker.js';
import { brokerFixture } from '../helpers/fixture.js';
import { NOBODY, OTHER_UID, probe, probeOnce, spawnAs } from '../helpers/unpriv.js';

const test = anyTest as TestFn;
const STRANGER = 64003;

/** A network name at its longest (64 characters): NICs on it make a create request long. */
const LONG_NET = `lan-${'x'.repeat(60)}`;

const POLICY = `
[[rule]]
name = "vm"
users = [${NOBODY}]
bridges = ["br0", "br2"]
macvtap = [{ parent = "vparent" }]
max_queues = 126
max_devices = 4

[[rule]]
name = "other"
users = [${OTHER_UID}]
bridges = ["br1"]
networks = ["${LONG_NET}"]
persistent = true

[network.${LONG_NET}]
bridge = "br1"
`;

const HOST_LINKS = ['br0', 'br1', 'br2', 'vparent', 'vpeer'];

const fx = brokerFixture(test, {
  tag: 'v2', policy: POLICY, bridges: ['br0', 'br1', 'br2'], veths: [['vparent', 'vpeer']],
});

const nothingLeft = (t: { deepEqual: (a: unknown, b: unknown, m: string) => void }) =>
  fx.broker.waitFor(() => fx.ns.extraLinks(HOST_LINKS).length === 0, 3000, `devices left: ${fx.ns.extraLinks(HOST_LINKS)}`)
    .then(() => t.deepEqual(fx.ns.extraLinks(HOST_LINKS), [], 'nothing is left behind'));

test.serial('one create request grants every NIC of a VM, in order, each with working fds and its own audit record', async (t) => {
  const before = fx.broker.records.length;
  const p = await probe({
    socket: fx.broker.socket, batch: true, write: true,
    requests: [{ bridge: 'br0', queues: 2 }, { bridge: 'br2' }, { parent: 'vparent', mode: 'bridge' }],
  });
  try {
    t.is(p.result.error, null);
    const [a, b, c] = p.result.taps;
    t.like(a!.device, { kind: 'tap', parent: 'br0', queues: 2, locked: false });
    t.like(b!.device, { kind: 'tap', parent: 'br2' });
    t.like(c!.device, { kind: 'macvtap', parent: 'vparent' });
    t.deepEqual(p.result.taps.map((x) => x.tapFds), [2, 1, 1], 'each NIC got its own queue fds');
    t.true(p.result.taps.every((x) => x.written.every((n) => n > 0)), 'every fd carries frames');
    for (const x of p.result.taps) t.truthy(fx.ns.link(x.device.name), `${x.device.name} exists`);
    const grants = fx.broker.records.slice(before).filter((r) => r.decision === 'grant');
    t.is(grants.length, 3, 'one grant record per NIC');
    t.true(grants.every((r) => r.op === 'create' && r.rule === 'vm'));
  } finally {
    await p.release();
  }
  await nothingLeft(t);
});

test.serial('a NIC the policy refuses refuses the whole request, its index named, before anything is made', async (t) => {
  const before = fx.broker.records.length;
  const r = await probeOnce({ socket: fx.broker.socket, batch: true, requests: [{ bridge: 'br0' }, { bridge: 'br1' }] });
  t.is(r.error?.code, 'TB_E_POLICY_DENIED');
  t.is(r.error?.nic, 1);
  t.regex(r.error?.message ?? '', /^NIC 1: /);
  t.deepEqual(r.taps, []);
  await nothingLeft(t);
  // NIC 0 was never made (found by an outside review: NICs before a refused one were made, rolled back and audited,
  // one record each, as often as a user asked). Records of the test before may still come in: only this
  // request's are counted.
  const mine = fx.broker.records.slice(before);
  t.is(mine.filter((x) => x.decision === 'deny').length, 1, 'the refused NIC has its deny record');
  t.is(mine.filter((x) => x.decision === 'grant').length, 0, 'nothing is recorded as granted');
  t.is(mine.filter((x) => /NIC 1 of the same request was refused/.test(x.message ?? '')).length, 0, 'nothing rolled back');
});

// Found by an outside re-test: a 32-NIC create whose last NIC asked for NIC 0's name made 31 taps, rolled them back
// and audited each (430 records a second from a loop). What a NIC would fail on with the NICs before it made (a
// name one of them asks for, a device by that name) is refused with nothing made, one record for the request.
test.serial('a NIC whose name an earlier NIC asks for, or a device has, refuses the request before anything is made', async (t) => {
  const name = `tb${NOBODY}-twice`;
  const taken = `tb${NOBODY}-taken`;
  fx.ns.ip('link', 'add', taken, 'type', 'bridge');
  try {
    for (const [nics, code] of [
      [[{ bridge: 'br0', name }, { bridge: 'br2' }, { bridge: 'br0', name }], 'TB_E_INVALID_REQUEST'],
      [[{ bridge: 'br0' }, { bridge: 'br2' }, { bridge: 'br0', name: taken }], 'TB_E_DEVICE_EXISTS'],
    ] as const) {
      const before = fx.broker.records.length;
      const r = await probeOnce({ socket: fx.broker.socket, batch: true, requests: [...nics] });
      t.is(r.error?.code, code);
      t.is(r.error?.nic, 2, 'the NIC is named');
      t.regex(r.error?.message ?? '', /^NIC 2: /);
      // Right after the reply: a device made and rolled back would still be on its way out.
      t.deepEqual(fx.ns.extraLinks([...HOST_LINKS, taken]), [], 'nothing was made');
      await fx.broker.waitFor(() => fx.broker.records.some((x) => x.op === 'create' && x.code === code), 3000, 'its record');
      const mine = fx.broker.records.slice(before);
      t.deepEqual(mine.filter((x) => x.op === 'create').map((x) => [x.decision, x.code]), [['error', code]],
        'one record for the request');
      t.false(mine.some((x) => /rolled back/.test(x.message ?? '')), 'nothing rolled back');
    }
  } finally {
    fx.ns.ip('link', 'del', taken);
  }
});

test.serial('the quota counts the NICs of the same request', async (t) => {
  const r = await probeOnce({ socket: fx.broker.socket, batch: true, requests: Array(5).fill({ bridge: 'br0' }) });
  t.is(r.error?.code, 'TB_E_QUOTA_EXCEEDED');
  t.is(r.error?.nic, 4, 'the fifth NIC is over max_devices = 4');
  await nothingLeft(t);
});

test.serial('a request whose fds would not fit one reply is refused before anything is made', async (t) => {
  // Sent as one request (the client library would split it): the broker counts its fds first.
  const before = fx.broker.records.length;
  const conn = await SeqpacketConnection.connect(fx.broker.socket, { maxPacket: MAX_REPLY_BYTES });
  try {
    await conn.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION }));
    t.is(decodeReply((await conn.receive())!.data).op, 'hello');
    const nics = Array.from({ length: 3 }, () => ({ kind: 'tap' as const, bridge: 'br0', queues: 126 }));
    await conn.send(encodeFrame({ op: 'create', id: 2, nics }));
    const r = decodeReply((await conn.receive())!.data);
    t.like(r, { op: 'error', code: 'TB_E_INVALID_REQUEST' });
    t.regex(r.op === 'error' ? r.message : '', /378 fds; one reply carries at most 253/);
  } finally {
    conn.close();
  }
  t.deepEqual(fx.ns.extraLinks(HOST_LINKS), []);
  t.false(fx.broker.records.slice(before).some((x) => x.decision === 'grant'));
});

test.serial('the client puts NICs whose fds would not fit one reply into several requests', async (t) => {
  const p = await probe({ socket: fx.broker.socket, batch: true, requests: Array(3).fill({ bridge: 'br0', queues: 126 }) });
  try {
    t.is(p.result.error, null);
    t.deepEqual(p.result.taps.map((x) => x.tapFds), [126, 126, 126]);
  } finally {
    await p.release();
  }
  await nothingLeft(t);
});

test.serial('more NICs than one request carries go in several, in order; a later refusal names its NIC and ends the rest', async (t) => {
  const before = fx.broker.records.length;
  const p = await probe({ socket: fx.broker.socket, batch: true, requests: Array(40).fill({ bridge: 'br1' }) },
    { uid: OTHER_UID });
  try {
    t.is(p.result.error, null);
    t.is(p.result.taps.length, 40, 'every NIC granted');
    t.is(fx.broker.records.slice(before).filter((r) => r.op === 'create' && r.decision === 'grant').length, 40);
  } finally {
    await p.release();
  }
  await nothingLeft(t);
  const r = await probeOnce({ socket: fx.broker.socket, batch: true, requests: [...Array(33).fill({ bridge: 'br1' }), { bridge: 'br0' }] },
    { uid: OTHER_UID });
  t.is(r.error?.code, 'TB_E_POLICY_DENIED');
  t.is(r.error?.nic, 33, 'named by its place among all the NICs, not in its request');
  t.regex(r.error?.message ?? '', /^NIC 33: /);
  t.deepEqual(r.taps, []);
  await nothingLeft(t);
});

// Found by an outside review: the client split a VM's NICs into requests by their count and fds, never by size: 31
// NICs on a network of a 64-character name, each with its MAC and name, were one request over MAX_REQUEST_BYTES,
// refused TB_E_FRAME_TOO_LARGE (here 32, their names at their longest).
test.serial('NICs too many bytes for one request go in as many as hold them', async (t) => {
  const nics = Array.from({ length: 32 }, (_, i) => ({ network: LONG_NET, queues: 1, vnet_hdr: true,
    mac: `52:54:00:aa:bb:${i.toString(16).padStart(2, '0')}`, name: `tb${OTHER_UID}-n${i}`.padEnd(15, 'x') }));
  const before = fx.broker.records.length;
  const p = await probe({ socket: fx.broker.socket, batch: true, requests: nics }, { uid: OTHER_UID });
  try {
    t.is(p.result.error, null, p.result.error?.message);
    t.deepEqual(p.result.taps.map((x) => x.device.name), nics.map((n) => n.name));
    const creates = new Set(fx.broker.records.slice(before).filter((r) => r.decision === 'grant').map((r) => r.pid));
    t.is(creates.size, 1, 'one client');
  } finally {
    await p.release();
  }
  await nothingLeft(t);
});

test.serial('persistent devices an earlier request granted are released when a later one is refused', async (t) => {
  // 34 NICs: the client sends 32, then 2; the second request is refused before its first NIC is made.
  const before = fx.broker.records.length;
  const r = await probeOnce({ socket: fx.broker.socket, batch: true,
    requests: [...Array(33).fill({ bridge: 'br1', persistent: true }), { bridge: 'br0', persistent: true }] },
  { uid: OTHER_UID });
  t.is(r.error?.nic, 33);
  await nothingLeft(t);
  // The first request's 32 are released by the client; the 33rd, in the refused request, rolled back by the broker.
  // Only this request's rollbacks are counted: the fd-passed taps of the test before end when their device goes,
  // and those records may still be coming in.
  const rolledBack = (x: AuditRecord) =>
    x.decision === 'cleanup' && /create rolled back: NIC \d+ of the same request was refused/.test(x.message ?? '');
  await fx.broker.waitFor(() => fx.broker.records.slice(before)
    .filter((x) => x.op === 'release' && x.decision === 'release').length === 32, 3000, 'not all 32 released');
  const mine = fx.broker.records.slice(before);
  t.is(mine.filter((x) => x.op === 'release' && x.decision === 'release').length, 32, 'each released, and audited');
  t.is(mine.filter(rolledBack).length, 0, 'the refused request made nothing to roll back');
  t.is(mine.filter((x) => x.decision === 'cleanup' && x.device?.ends === 'release' && !rolledBack(x)).length, 0,
    'no other persistent device of it cleaned up');
});

test.serial('status tells the caller its leases and, for each rule that applies, its quota', async (t) => {
  const p = await probe({ socket: fx.broker.socket, requests: [{ bridge: 'br0' }], status: true });
  try {
    const s = p.result.status!;
    t.like(s, { version: PROTOCOL_VERSION, uid: NOBODY, leases: 1, connections: null });
    t.regex(s.broker, /^tapbrokerd \d+\.\d+\.\d+/);
    t.regex(s.policy_sha256, /^[0-9a-f]{64}$/);
    t.deepEqual(s.rules, [{ rule: 'vm', used: 1, max_devices: 4 }], 'only the rules that apply to the caller');
    const stranger = await probeOnce({ socket: fx.broker.socket, status: true }, { uid: STRANGER });
    t.deepEqual(stranger.status!.rules, [], 'a user no rule names sees none');
    t.is(stranger.status!.leases, 0, 'and none of anyone else\'s leases');
  } finally {
    await p.release();
  }
});

test.serial('a tap whose guest MAC the hypervisor sets: the lease claims no MAC, the host side gets its own', async (t) => {
  const p = await probe({ socket: fx.broker.socket, requests: [{ bridge: 'br0', macUnknown: true }], list: true });
  try {
    t.is(p.result.error, null);
    const d = p.result.taps[0]!.device;
    t.is(d.mac, null);
    t.regex(d.host_mac, /^fe:/);
    t.is(fx.ns.link(d.name)?.address, d.host_mac);
    t.is(p.result.leases!.find((l) => l.name === d.name)?.mac, null);
    const grant = await fx.broker.record((r) => r.decision === 'grant' && (r.device as { name?: string }).name === d.name);
    t.is((grant.request as { mac: string }).mac, 'unknown');
  } finally {
    await p.release();
  }
  await nothingLeft(t);
});

test.serial('a macvtap cannot be asked for with an unknown MAC: its MAC is the guest\'s', async (t) => {
  const conn = await SeqpacketConnection.connect(fx.broker.socket, { maxPacket: MAX_REPLY_BYTES });
  try {
    await conn.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION }));
    await conn.receive();
    await conn.send(encodeFrame({ op: 'create-macvtap', id: 2, parent: 'vparent', mac: null }));
    const r = decodeReply((await conn.receive())!.data);
    t.like(r, { op: 'error', id: 2, code: 'TB_E_INVALID_REQUEST' });
    t.regex(r.op === 'error' ? r.message : '', /a macvtap's MAC is the guest's/);
  } finally {
    conn.close();
  }
  t.deepEqual(fx.ns.extraLinks(HOST_LINKS), []);
});

test('a version 1 client is told to upgrade, and the connection closes', async (t) => {
  const conn = await SeqpacketConnection.connect(fx.broker.socket, { maxPacket: MAX_REPLY_BYTES });
  try {
    await conn.send(encodeFrame({ op: 'hello', id: 1, version: 1 }));
    const r = decodeReply((await conn.receive())!.data);
    t.like(r, { op: 'error', code: 'TB_E_VERSION' });
    t.regex(r.op === 'error' ? r.message : '', new RegExp(`version 1; this broker speaks ${PROTOCOL_VERSION}`));
    t.regex(r.op === 'error' ? r.hint ?? '' : '', /upgrade the client/);
    t.is(await conn.receive(), null);
  } finally {
    conn.close();
  }
});

test.serial('tapbroker status prints the same for people and, with --json, for scripts', async (t) => {
  const run = (...args: string[]) => new Promise<{ code: number | null; out: string }>((resolve) => {
    const c = spawnAs({}, process.execPath, [CLIENT_CLI, 'status', '--socket', fx.broker.socket, ...args]);
    let out = '';
    c.stdout!.on('data', (d) => (out += d));
    c.on('close', (code) => resolve({ code, out }));
  });
  const text = await run();
  t.is(text.code, 0);
  t.regex(text.out, new RegExp(`^broker: +tapbrokerd \\S+ \\(protocol ${PROTOCOL_VERSION}\\) at ${fx.broker.socket}`, 'm'));
  t.regex(text.out, /^rules: +vm \(0 of 4 devices\)$/m);
  const json = await run('--json');
  t.is(json.code, 0);
  t.like(JSON.parse(json.out), { socket: fx.broker.socket, uid: NOBODY, rules: [{ rule: 'vm', used: 0, max_devices: 4 }] });
  const bad = await run('--bogus');
  t.is(bad.code, 64);
});
