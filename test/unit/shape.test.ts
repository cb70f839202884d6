// The client's reply checker (shape.ts + reply-shape.ts) against the zod schemas it is generated from.
import test from 'ava';
import { Reply, Request, encodeFrame } from '@tapbroker/protocol';
import { checkShape as checkLite } from '@tapbroker/protocol/core';
import { REQUEST_SHAPE } from '@tapbroker/protocol/requests';
import { StateFile } from '@tapbroker/broker/internal';
import { REPLY_SHAPE_FOR_TESTS, checkShape, decodeReply as decodeLite } from '../helpers/lite.js';
import { replyShapeModule, shapeModule, shapeOf } from '../helpers/zod-shape.js';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT } from '../helpers/broker.js';

test('reply-shape.ts is what the zod schema Reply generates (npm run gen:shapes when it is not)', (t) => {
  const expected = replyShapeModule(shapeOf(Reply as never));
  t.is(fs.readFileSync(path.join(ROOT, 'packages/protocol/src/reply-shape.ts'), 'utf8'), expected);
  t.deepEqual(REPLY_SHAPE_FOR_TESTS, shapeOf(Reply as never));
});

test('request-shape.ts is what the zod schema Request generates', (t) => {
  const expected = shapeModule('Request', shapeOf(Request as never));
  t.is(fs.readFileSync(path.join(ROOT, 'packages/protocol/src/request-shape.ts'), 'utf8'), expected);
  t.deepEqual(REQUEST_SHAPE, shapeOf(Request as never));
});

test('the broker\'s state-shape.ts is what its zod schema StateFile generates', (t) => {
  const expected = shapeModule('StateFile', shapeOf(StateFile as never));
  t.is(fs.readFileSync(path.join(ROOT, 'packages/broker/src/state-shape.ts'), 'utf8'), expected);
});

test('a lease table: defaults filled in as zod does; a plug of either form; a wrong one refused', (t) => {
  const shape = shapeOf(StateFile as never);
  const lease = {
    id: 'l1', uid: 1, user: null, kind: 'tap', name: 'tb1-x', ifindex: 7, parent: 'br0', mode: null, mac: null,
    queues: 1, rule: 'r', created: '2026-12-02T00:00:00Z', ends: 'release', holder: null, holder_start: null,
  };
  for (const plug of [null, { ovs: 'br-int', db: 'unix:/run/ovs.sock' }, { hook: '/usr/lib/x', timeout_ms: 5000 }]) {
    const file = { version: 1, leases: [{ ...lease, plug }] };
    const z = StateFile.safeParse(file);
    const lite = checkLite(shape, file);
    t.true(z.success && lite.ok);
    if (z.success && lite.ok) t.deepEqual(lite.value, z.data);
  }
  for (const plug of [{ ovs: 'br-int' }, { hook: '/x', timeout_ms: 0 }, { ovs: 'a', db: 'b', hook: 'c' }]) {
    const file = { version: 1, leases: [{ ...lease, plug }] };
    t.false(StateFile.safeParse(file).success);
    t.false(checkLite(shape, file).ok, JSON.stringify(plug));
  }
});

const device = {
  kind: 'tap', name: 'tb1-x', ifindex: 7, parent: 'br0', network: null, vlan: null, mode: null, mtu: 1500,
  host_mac: 'fe:54:00:00:00:01', mac: '52:54:00:00:00:01', locked: false, queues: 1, vnet_hdr: true, vhost: false,
  persistent: false, rule: 'r',
};
const lease = {
  id: 'l1', uid: 1, user: null, kind: 'tap', name: 'tb1-x', ifindex: 7, parent: 'br0', mode: null, mac: null,
  queues: 1, rule: 'r', created: '2026-12-02T00:00:00Z', ends: 'fds', holder: null,
};

const same = test.macro((t, reply: unknown) => {
  const z = Reply.safeParse(reply);
  const lite = checkShape(REPLY_SHAPE_FOR_TESTS, reply);
  t.is(lite.ok, z.success, z.success ? 'zod accepts it' : `zod refuses it: ${z.error.issues[0]?.message}`);
  if (z.success && lite.ok) t.deepEqual(lite.value, z.data, 'defaults filled in as zod does');
});

test('a create-tap reply', same, { op: 'create-tap', id: 1, device, fds: { tap: 1, vhost: 0 } });
test('a create reply', same, { op: 'create', id: 1, devices: [device], fds: [{ tap: 1, vhost: 0 }] });
test('a list reply: defaults (network, locked) filled in', same, { op: 'list', id: 2, leases: [lease], truncated: false });
test('an unknown field', same, { op: 'create-tap', id: 1, device: { ...device, owner: 0 }, fds: { tap: 1, vhost: 0 } });
test('a missing field', same, { op: 'create-tap', id: 1, device: { ...device, mac: undefined }, fds: { tap: 1, vhost: 0 } });
test('a number out of range', same, { op: 'create-tap', id: 2 ** 32, device, fds: { tap: 1, vhost: 0 } });
test('a float for an integer', same, { op: 'create-tap', id: 1.5, device, fds: { tap: 1, vhost: 0 } });
test('ifindex 0 (positive)', same, { op: 'create-tap', id: 1, device: { ...device, ifindex: 0 }, fds: { tap: 1, vhost: 0 } });
test('a string too long', same, { op: 'create-tap', id: 1, device: { ...device, name: 'x'.repeat(16) }, fds: { tap: 1, vhost: 0 } });
test('an unknown op', same, { op: 'nope', id: 1 });
test('an empty create reply', same, { op: 'create', id: 1, devices: [], fds: [] });
test('an error reply with nic', same, { op: 'error', id: null, code: 'TB_E_POLICY_DENIED', message: 'm', nic: 1 });
test('an error reply with an unknown code', same, { op: 'error', id: null, code: 'TB_E_NOPE', message: 'm' });
test('an enum value outside it', same, { op: 'create-tap', id: 1, device: { ...device, kind: 'tun' }, fds: { tap: 1, vhost: 0 } });

test('the client decoder: the broker\'s encoding in, the same reply out; garbage refused with TB_E_BAD_REPLY', (t) => {
  const reply = { op: 'list', id: 2, leases: [{ ...lease, network: null, locked: false }], truncated: false } as const;
  t.deepEqual(decodeLite(encodeFrame(reply)), reply);
  for (const bad of [Buffer.from([0x91, 0x01]), Buffer.from([0x81, 0xa1, 0x61]), encodeFrame({ op: 'nope', id: 1 } as never)]) {
    t.throws(() => decodeLite(bad), { message: /^bad reply from broker/ });
  }
});
test('string lengths in code points, as zod counts them', same,
  { op: 'create-tap', id: 1, device: { ...device, name: '\u{10000}'.repeat(15) }, fds: { tap: 1, vhost: 0 } });
test('string lengths in code points: one too many', same,
  { op: 'create-tap', id: 1, device: { ...device, name: '\u{10000}'.repeat(16) }, fds: { tap: 1, vhost: 0 } });
