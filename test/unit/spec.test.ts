// One normalised request (spec.ts): the defaults createSpec applies to each kind of request, every
// refusal of checkSpec with its code, and the view audit records show.
import test, { type ExecutionContext } from 'ava';
import {
  TapbrokerError, type CanRequest, type CreateMacvtapRequest, type CreateTapRequest, type Nic,
} from '@tapbroker/protocol';
import { checkSpec, createSpec, specView, type CreateSpec } from '@tapbroker/broker/internal';

type Identity = Parameters<typeof checkSpec>[1];
const caller: Identity = {
  uid: 1000, gid: 1000, groups: [24, 500], pid: 4242, pidfd: null, exe: '/usr/bin/qemu-system-x86_64', user: 'alice',
  parent: null,
};

const tapReq = (fields: Partial<CreateTapRequest> = {}): CreateTapRequest =>
  ({ op: 'create-tap', id: 1, bridge: 'br0', ...fields });
const macvtapReq = (fields: Partial<CreateMacvtapRequest> = {}): CreateMacvtapRequest =>
  ({ op: 'create-macvtap', id: 1, parent: 'eth0', ...fields });
const canReq = (fields: Partial<CanRequest> = {}): CanRequest => ({ op: 'can', id: 1, kind: 'tap', parent: 'br0', ...fields });

function refusal(t: ExecutionContext, f: () => unknown): TapbrokerError {
  const err = t.throws(f);
  t.true(err instanceof TapbrokerError, String(err));
  return err as TapbrokerError;
}

// ---- createSpec

const tapDefaults: CreateSpec = {
  kind: 'tap', parent: 'br0', network: false, mode: null, queues: 1, vhost: false, vnetHdr: true, mac: null,
  macUnknown: false, name: null, persistent: false, group: null,
};

test('create-tap: every default', (t) => {
  t.deepEqual(createSpec(tapReq()), tapDefaults);
});

test('create-tap: every field given is kept as it is', (t) => {
  const s = createSpec(tapReq({
    queues: 4, vhost: true, vnet_hdr: false, mac: '52:54:00:01:02:03', name: 'vm0', persistent: true, group: 24,
  }));
  t.deepEqual(s, {
    ...tapDefaults, queues: 4, vhost: true, vnetHdr: false, mac: '52:54:00:01:02:03', name: 'vm0', persistent: true,
    group: 24,
  });
});

test('create-tap on a network: the parent is the network, marked as one', (t) => {
  t.deepEqual(createSpec({ op: 'create-tap', id: 1, network: 'lan' }), { ...tapDefaults, parent: 'lan', network: true });
});

test('create-tap needs exactly one of bridge or network', (t) => {
  for (const req of [{ op: 'create-tap', id: 1 }, tapReq({ network: 'lan' })] as CreateTapRequest[]) {
    const err = refusal(t, () => createSpec(req));
    t.is(err.code, 'TB_E_INVALID_REQUEST');
    t.regex(err.message, /exactly one of bridge or network/);
  }
});

test('mac null: the hypervisor sets it (unknown); mac absent: the broker picks one', (t) => {
  t.like(createSpec(tapReq({ mac: null })), { mac: null, macUnknown: true });
  t.like(createSpec(tapReq({ mac: undefined })), { mac: null, macUnknown: false });
  t.like(createSpec(tapReq({ mac: '52:54:00:00:00:01' })), { mac: '52:54:00:00:00:01', macUnknown: false });
});

test('create-macvtap: mode bridge, vnet_hdr on, and never a network or a group', (t) => {
  t.deepEqual(createSpec(macvtapReq()), { ...tapDefaults, kind: 'macvtap', parent: 'eth0', mode: 'bridge' });
  t.like(createSpec(macvtapReq({ mode: 'private', vnet_hdr: false })), { mode: 'private', vnetHdr: false });
});

test('a NIC of a create request is read as the request of its kind', (t) => {
  const tapNic: Nic = { kind: 'tap', bridge: 'br1', queues: 2 };
  const macvtapNic: Nic = { kind: 'macvtap', parent: 'eth1', mode: 'vepa' };
  t.deepEqual(createSpec(tapNic), { ...tapDefaults, parent: 'br1', queues: 2 });
  t.deepEqual(createSpec(macvtapNic), { ...tapDefaults, kind: 'macvtap', parent: 'eth1', mode: 'vepa' });
  t.deepEqual(createSpec({ kind: 'tap', network: 'lan' }), { ...tapDefaults, parent: 'lan', network: true });
  t.is(refusal(t, () => createSpec({ kind: 'tap' })).code, 'TB_E_INVALID_REQUEST');
});

test('can: a dry run of each kind', (t) => {
  t.deepEqual(createSpec(canReq()), tapDefaults);
  t.deepEqual(createSpec(canReq({ kind: 'network', parent: 'lan' })), { ...tapDefaults, parent: 'lan', network: true });
  t.deepEqual(createSpec(canReq({ kind: 'macvtap', parent: 'eth0' })),
    { ...tapDefaults, kind: 'macvtap', parent: 'eth0', mode: 'bridge' });
  t.like(createSpec(canReq({ kind: 'tap', mode: 'vepa' })), { mode: null }, 'a mode means nothing to a tap');
  t.like(createSpec(canReq({ queues: 8, vhost: true, mac: null, name: 'x', persistent: true })),
    { queues: 8, vhost: true, mac: null, macUnknown: true, name: 'x', persistent: true });
});

test('any other op is not a create request', (t) => {
  const err = refusal(t, () => createSpec({ op: 'hello', id: 1, version: 1 } as never));
  t.is(err.code, 'TB_E_UNKNOWN_OP');
  t.regex(err.message, /hello/);
});

// ---- checkSpec

const spec = (fields: Partial<CreateSpec> = {}): CreateSpec => ({ ...tapDefaults, ...fields });

const refused = test.macro({
  exec(t, s: CreateSpec, code: string, message: RegExp, who: Identity = caller) {
    const err = refusal(t, () => checkSpec(s, who));
    t.is(err.code as string, code);
    t.regex(err.message, message);
  },
  title: (what) => `refused: ${what}`,
});

test('a well-formed spec of each kind passes', (t) => {
  const fine = [
    spec(),
    spec({ parent: 'lan', network: true }),
    spec({ kind: 'macvtap', parent: 'eth0', mode: 'bridge' }),
    spec({ queues: 126, vhost: true, mac: '02:00:00:00:00:01', name: 'tb1000-vm0' }),
    spec({ mac: null, macUnknown: true }),
    spec({ persistent: true, group: 1000 }),
    spec({ persistent: true, group: 500 }),
  ];
  for (const s of fine) t.notThrows(() => checkSpec(s, caller), JSON.stringify(s));
});

test('a network name need not be an interface name', (t) => {
  const long = 'n'.repeat(40);
  t.notThrows(() => checkSpec(spec({ parent: long, network: true }), caller));
  t.throws(() => checkSpec(spec({ parent: long }), caller), { message: /^bridge name `n{40}' is 40 bytes long/ });
});

test('a bridge name the kernel would refuse', refused, spec({ parent: 'br:0' }), 'TB_E_INVALID_NAME',
  /^bridge name `br:0' may only contain/);
test("a macvtap's parent the kernel would refuse", refused, spec({ kind: 'macvtap', mode: 'bridge', parent: '..' }),
  'TB_E_INVALID_NAME', /^parent name `\.\.' is not a usable name/);
test('a network name with a space', refused, spec({ parent: 'my lan', network: true }), 'TB_E_INVALID_NAME',
  /^network name `my lan' must be 1-64 characters/);
test('queues 0', refused, spec({ queues: 0 }), 'TB_E_INVALID_QUEUES', /^queues must be from 1 to 126, not 0$/);
test('queues 127', refused, spec({ queues: 127 }), 'TB_E_INVALID_QUEUES', /not 127$/);
test('fractional queues', refused, spec({ queues: 2.5 }), 'TB_E_INVALID_QUEUES', /not 2\.5$/);
test('an upper-case MAC', refused, spec({ mac: '52:54:00:AB:CD:EF' }), 'TB_E_INVALID_MAC',
  /^mac `52:54:00:AB:CD:EF' must be six lower-case hex octets/);
test('a multicast MAC', refused, spec({ mac: '01:00:5e:00:00:01' }), 'TB_E_INVALID_MAC', /is a multicast address$/);
test('a device name of 16 bytes', refused, spec({ name: 'tb1000-abcdefghi' }), 'TB_E_INVALID_NAME',
  /^name `tb1000-abcdefghi' is 16 bytes long/);
test('a persistent device with vhost-net', refused, spec({ persistent: true, vhost: true }), 'TB_E_INVALID_REQUEST',
  /vhost-net/);
test('mac null for a macvtap', refused, spec({ kind: 'macvtap', mode: 'bridge', parent: 'eth0', macUnknown: true }),
  'TB_E_INVALID_REQUEST', /^mac null is for taps/);
test('a group for a device that is not persistent', refused, spec({ group: 1000 }), 'TB_E_INVALID_REQUEST',
  /^group is for persistent devices$/);
test('a group the caller is not in', refused, spec({ persistent: true, group: 0 }), 'TB_E_POLICY_DENIED',
  /^you are not in group 0$/);
test("the caller's own uid is not a group", refused, spec({ persistent: true, group: 1001 }), 'TB_E_POLICY_DENIED',
  /not in group 1001/, { ...caller, uid: 1001 });

test('a refused group says what to do instead', (t) => {
  const err = refusal(t, () => checkSpec(spec({ persistent: true, group: 27 }), caller));
  t.is(err.hint, 'name one of your own groups');
});

// printable(): caller text in a message has its control characters escaped and is cut at 64 characters.
test('caller text in a refusal is escaped: no raw control character reaches a log line', (t) => {
  const err = refusal(t, () => checkSpec(spec({ name: 'x\n\x1b[31m\ty' }), caller));
  t.is(err.code, 'TB_E_INVALID_NAME');
  t.false(/[\0-\x1f]/.test(err.message), err.message);
  t.true(err.message.startsWith('name `x\\n\\u001b[31m\\ty\''), err.message);
});

test('caller text in a refusal is cut at 64 characters', (t) => {
  const err = refusal(t, () => checkSpec(spec({ mac: `${'a'.repeat(64)}TAIL` }), caller));
  t.true(err.message.startsWith(`mac \`${'a'.repeat(64)}' must be`), err.message);
  t.false(err.message.includes('TAIL'));
});

// ---- specView

test('specView: the audit view of a broker-picked tap', (t) => {
  t.deepEqual(specView(createSpec(tapReq())), {
    kind: 'tap', parent: 'br0', network: null, mode: null, queues: 1, vhost: false, vnet_hdr: true, mac: null, name: null,
    persistent: false, group: null,
  });
});

test('specView: a network names itself, an unknown MAC says so, every field given shows', (t) => {
  const view = specView(createSpec({
    op: 'create-tap', id: 9, network: 'lan', mac: null, queues: 3, vhost: true, vnet_hdr: false, name: 'vm1',
    persistent: true, group: 500,
  }));
  t.deepEqual(view, {
    kind: 'tap', parent: 'lan', network: 'lan', mode: null, queues: 3, vhost: true, vnet_hdr: false, mac: 'unknown',
    name: 'vm1', persistent: true, group: 500,
  });
});

test('specView: a macvtap with its MAC and mode', (t) => {
  t.like(specView(createSpec(macvtapReq({ mac: '52:54:00:aa:bb:cc', mode: 'passthru' }))),
    { kind: 'macvtap', parent: 'eth0', network: null, mode: 'passthru', mac: '52:54:00:aa:bb:cc' });
});
