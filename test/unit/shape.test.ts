// The client's reply checker (shape.ts + reply-shape.ts) against the zod schemas it is generated from.
import test from 'ava';
import { Reply, Request, encodeFrame } from '@tapbroker/protocol';
import { checkShape as checkLite, validate } from '@tapbroker/protocol/core';
import { REQUEST_SHAPE } from '@tapbroker/protocol/requests';
import { POLICY_CHECKS, POLICY_SHAPE as POLICY_SHAPE_FOR_TESTS, PolicySchema, StateFile } from '@tapbroker/broker/internal';
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

test('the broker\'s policy-shape.ts is what its zod schema PolicySchema generates', (t) => {
  const expected = shapeModule('PolicySchema', shapeOf(PolicySchema as never));
  t.is(fs.readFileSync(path.join(ROOT, 'packages/broker/src/policy-shape.ts'), 'utf8'), expected);
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

// Found by an outside audit: `status` gained two fields inside 0.5.0 (protocol 2); a client of now must take the reply
// of a broker built before them, and check the policy by its digest then.
const status = {
  op: 'status', id: 3, broker: 'tapbrokerd 0.5.0', version: 2, policy_sha256: 'a'.repeat(64), started: 'now', uid: 1,
  user: null, leases: 0, rules: [], denies: [], connections: null,
};
test('a status reply with policy_loads and tearing_down', same, { ...status, policy_loads: 2, tearing_down: 1 });
test('a status reply of a broker without them', (t) => {
  t.true(checkShape(REPLY_SHAPE_FOR_TESTS, status).ok);
  t.like(decodeLite(encodeFrame(status as never)), { op: 'status', policy_sha256: 'a'.repeat(64) });
});

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

// The policy's generated shape and its named checks against the zod schema they come from: the same verdict
// and the same value for policy files right and wrong in every way the format can be.
const rule = { name: 'r', users: [1], bridges: ['br0'] };
const POLICY_DOCS: unknown[] = [
  {}, { version: 1 }, { version: 2 }, { rule: [rule] }, { rule: [{ ...rule, users: ['alice', 0] }] },
  { rule: [{ ...rule, users: [''] }] }, { rule: [{ ...rule, users: [-1] }] }, { rule: [{ ...rule, users: [2 ** 32] }] },
  { rule: [{ ...rule, bridges: ['*'] }] }, { rule: [{ ...rule, bridges: ['br*'] }] },
  { rule: [{ ...rule, bridges: ['br0123456789abcd'] }] }, { rule: [{ ...rule, name: 'a b' }] },
  { rule: [{ ...rule, macvtap: [{ parent: 'eth0' }] }] }, { rule: [{ ...rule, macvtap: [{ parent: 'eth0', modes: [] }] }] },
  { rule: [{ ...rule, macvtap: [{ parent: 'eth0', modes: ['source'] }] }] },
  { rule: [{ ...rule, name_pattern: 'vm-*' }] }, { rule: [{ ...rule, name_pattern: '{home}-*' }] },
  { rule: [{ ...rule, name_pattern: '{user}-*' }] }, { rule: [{ ...rule, mac_prefix: '01:00' }] },
  { rule: [{ ...rule, mac_prefix: '00:00:00:00:00:00' }] }, { rule: [{ ...rule, mac_prefix: '52-54' }] },
  { rule: [{ ...rule, mac_prefix: '02:aa' }] }, { rule: [{ ...rule, max_queues: 0 }] },
  { rule: [{ ...rule, max_queues: 127 }] }, { rule: [{ ...rule, max_queues: 1.5 }] }, { rule: [{ ...rule, vhost: 'yes' }] },
  { rule: [{ ...rule, max_devices: -1 }] }, { rule: [{ ...rule, mac_lock: true, persistent: true }] },
  { rule: [{ ...rule, bridge: 'br1' }] }, { allow: [rule] },
  { network: { lan: { bridge: 'br0', vlan: 10 } } }, { network: { lan: { bridge: 'br0', trunk: [10] } } },
  { network: { lan: { ovs: 'ovsbr', trunk: [10, 20], ovsdb: 'unix:/run/ovs.sock' } } },
  { network: { lan: { ovs: 'ovsbr', ovsdb: 'tcp:1.2.3.4' } } }, { network: { lan: { hook: 'plug' } } },
  { network: { lan: { hook: '/usr/lib/plug', vlan: 3 } } }, { network: { lan: {} } },
  { network: { lan: { bridge: 'br0', ovs: 'x' } } }, { network: { 'l a n': { bridge: 'br0' } } },
  { network: { lan: { bridge: 'br0', mac_lock: true } } }, { network: { lan: { hook: '/x', mac_lock: true } } },
  { network: { lan: { bridge: 'br0', vlann: 3 } } }, { network: [] },
  { deny: [{ users: [1] }] }, { deny: [{ users: [1], bridges: [] }] }, { deny: [{ users: [1], parents: ['eth0'] }] },
  { deny: [{ users: [1], networks: ['bad name'] }] }, { rule: 'x' }, { rule: [null] }, [],
];

test('the policy\'s shape and checks judge every kind of policy file as its zod schema does', (t) => {
  for (const doc of POLICY_DOCS) {
    const z = PolicySchema.safeParse(doc);
    const { value, issues } = validate(POLICY_SHAPE_FOR_TESTS, doc, POLICY_CHECKS);
    t.is(issues.length === 0, z.success, `${JSON.stringify(doc)}: zod ${z.success ? 'accepts' : 'refuses'}`);
    if (z.success && issues.length === 0) t.deepEqual(value, z.data, JSON.stringify(doc));
  }
});

test('a union\'s tag that is not a string is refused, never converted (an object whose toString is not callable)', (t) => {
  const lite = checkLite(REQUEST_SHAPE, { op: 'create', id: 1, nics: [{ kind: { toString: 1 } }] });
  t.false(lite.ok);
  t.regex(lite.ok ? '' : lite.issue, /unknown kind object/);
  // The same as a reply, through the client's decoder: TB_E_BAD_REPLY, not a TypeError.
  const frame = Buffer.from('82a26f7081a8746f537472696e6701a2696401', 'hex');
  t.is((t.throws(() => decodeLite(frame)) as { code?: string }).code, 'TB_E_BAD_REPLY');
});

test('a table that is not a plain one (a TOML date) is refused where a table is expected', (t) => {
  const { issues } = validate(POLICY_SHAPE_FOR_TESTS, { network: new Date(0) }, POLICY_CHECKS);
  t.deepEqual(issues.map((i) => i.message), ['expected table, received Date']);
  t.false(PolicySchema.safeParse({ network: new Date(0) }).success, 'as zod does');
  t.true(validate(POLICY_SHAPE_FOR_TESTS, { deny: [new Date(0)] }, POLICY_CHECKS).issues.length > 0);
});

test('`__proto__` as a table key is refused, where zod drops it without a word', (t) => {
  const doc = JSON.parse('{"network": {"__proto__": {"bridge": "br0"}, "lan": {"bridge": "br1"}}}') as unknown;
  const { issues } = validate(POLICY_SHAPE_FOR_TESTS, doc, POLICY_CHECKS);
  t.deepEqual(issues.map((i) => [i.path.join('.'), i.message]), [['network', '`__proto__\' is reserved']]);
});

test('a NaN where a number is expected is refused as NaN (an outside review read "expected number, received number")', (t) => {
  const lite = checkLite(REQUEST_SHAPE, { op: 'list', id: Number.NaN });
  t.false(lite.ok);
  t.regex(lite.ok ? '' : lite.issue, /expected number, received NaN/);
});
