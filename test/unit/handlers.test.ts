// The handlers as a table: (policy, kernel state, caller, request) → (reply code, audit records, kernel steps),
// run unprivileged on a model of the kernel (test/helpers/fake-kernel.ts) through the Kernel seam. The request
// goes through the real codec, the real Broker, ops.ts, spec, policy, lease table and audit; only the kernel is
// modelled. The same behaviour against the real kernel is covered by the integration and security tests.
import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  MAX_REPLY_BYTES, PROTOCOL_VERSION, SeqpacketConnection, SeqpacketListener, TapbrokerError, decodeReply, decodeRequest,
  encodeFrame, type Reply,
} from '@tapbroker/protocol';
import { decodeReply as decodeReplyLite } from '@tapbroker/protocol/lite';
import { encodeReply } from '@tapbroker/protocol/requests';
import {
  Broker, Forwarding, REPEAT_CHECK_MS, loadTrustedPolicy, parsePolicy, type AuditRecord, type Identity,
} from '@tapbroker/broker/internal';
import { FakeKernel } from '../helpers/fake-kernel.js';
import { quiet } from '../helpers/wait.js';

const POLICY = `
[network.lab-net]
bridge = "br0"

[network.locked-net]
bridge = "br0"
mac_lock = true

[network.vlan-net]
bridge = "brv"
vlan = 10

[[rule]]
name = "lab"
users = [1000]
bridges = ["br0", "nopin0", "eth0", "ghost0"]
networks = ["lab-net", "locked-net", "vlan-net"]
max_queues = 4
max_devices = 2
mac_prefix = "52:54:00"

[[rule]]
name = "pets"
users = [1000]
bridges = ["br1"]
persistent = true
vhost = true

[[rule]]
name = "nics"
users = [1000]
macvtap = [{ parent = "eth0", modes = ["bridge"] }, { parent = "lo" }, { parent = "eth9" }]

[[rule]]
name = "others"
users = [2000]
bridges = ["br1"]

[[deny]]
name = "no-br1-for-3000"
users = [3000]
bridges = ["br1"]

[[rule]]
name = "everyone-br1"
users = ["*"]
bridges = ["br1"]
`;

/** The host every row starts from. */
function host(k: FakeKernel): void {
  k.addBridge('br0', { mtu: 9000 });
  k.addBridge('br1');
  k.addBridge('nopin0', { pinned: false });
  k.addBridge('brv', { vlanFiltering: true });
  k.addDevice('eth0', null, { mtu: 1500, address: Buffer.from('525400000001', 'hex') });
}

const caller = (uid: number): Identity => ({
  uid, gid: uid, groups: [uid], pid: process.pid, pidfd: null, exe: '/usr/bin/qemu-system-x86_64',
  user: `user${uid}`, parent: null,
});

interface Row {
  /** What the row shows. */
  title: string;
  request: Record<string, unknown>;
  uid?: number;
  kernel?: (k: FakeKernel) => void;
  /** Requests made first, by the same caller (their fds kept open). */
  before?: Array<Record<string, unknown>>;
  /** null: granted. */
  code: string | null;
  /** The audit records the request leaves, in order: each field given must match. */
  audit: Array<Partial<AuditRecord>>;
  /** The kernel steps the request takes (`createTap NAME`, `deleteLink NAME`, `lockPort NAME`…). */
  steps: RegExp[];
  /** Further checks on the reply. */
  reply?: (r: Reply, k: FakeKernel, refusal?: TapbrokerError) => void;
}

const tap = (fields: Record<string, unknown> = {}) => ({ op: 'create-tap', bridge: 'br0', ...fields });

const ROWS: Row[] = [
  {
    title: 'a tap on a pinned bridge: granted with the bridge\'s MTU, one fd, audited as a grant',
    request: tap(),
    code: null,
    audit: [{ op: 'create-tap', decision: 'grant', rule: 'lab', uid: 1000 }],
    steps: [/^createTap tb1000-[0-9a-z]+$/],
    reply: (r, k) => {
      if (r.op !== 'create-tap') throw new Error(r.op);
      if (r.device.mtu !== 9000) throw new Error(`mtu ${r.device.mtu}`);
      const dev = k.linkNamed(r.device.name)!;
      if (dev.master !== k.linkNamed('br0')!.index) throw new Error('not attached to br0');
      if (!dev.alias?.startsWith('tapbroker lease=')) throw new Error(`tag ${dev.alias}`);
    },
  },
  {
    title: 'no rule for the uid: denied, nothing made',
    uid: 4242,
    request: tap(),
    code: 'TB_E_POLICY_DENIED',
    audit: [{ op: 'create-tap', decision: 'deny', rule: null, uid: 4242, code: 'TB_E_POLICY_DENIED' }],
    steps: [],
  },
  {
    title: 'a deny rule wins over an allow rule for everyone',
    uid: 3000,
    request: tap({ bridge: 'br1' }),
    code: 'TB_E_POLICY_DENIED',
    audit: [{ decision: 'deny', rule: 'no-br1-for-3000', code: 'TB_E_POLICY_DENIED' }],
    steps: [],
  },
  {
    title: 'more queues than the rule allows',
    request: tap({ queues: 5 }),
    code: 'TB_E_POLICY_DENIED',
    audit: [{ decision: 'deny', code: 'TB_E_POLICY_DENIED' }],
    steps: [],
  },
  {
    title: 'the quota counts live leases: the third tap under max_devices = 2 is refused',
    before: [tap(), tap()],
    request: tap(),
    code: 'TB_E_QUOTA_EXCEEDED',
    audit: [{ decision: 'deny', rule: 'lab', code: 'TB_E_QUOTA_EXCEEDED' }],
    steps: [],
  },
  {
    title: 'a tap that ended with its fds no longer counts: the kernel\'s event reaches the quota first',
    before: [tap({ name: 'tb1000-a' }), tap({ name: 'tb1000-b' })],
    kernel: (k) => k.lastFdClosed('tb1000-a'),
    request: tap(),
    code: null,
    audit: [{ op: 'cleanup', decision: 'cleanup', rule: 'lab', uid: 1000 }, { decision: 'grant', rule: 'lab' }],
    steps: [/^createTap /],
  },
  {
    title: 'a name outside the rule\'s pattern',
    request: tap({ name: 'eth7' }),
    code: 'TB_E_INVALID_NAME',
    audit: [{ code: 'TB_E_INVALID_NAME' }],
    steps: [],
  },
  {
    title: 'a name that exists: never attached to, refused',
    kernel: (k) => k.addDevice('tb1000-x', 'veth'),
    request: tap({ name: 'tb1000-x' }),
    code: 'TB_E_DEVICE_EXISTS',
    audit: [{ decision: 'error', code: 'TB_E_DEVICE_EXISTS' }],
    steps: [],
  },
  {
    title: 'a bridge whose MAC is not pinned',
    request: tap({ bridge: 'nopin0' }),
    code: 'TB_E_BRIDGE_ADDRESS',
    audit: [{ decision: 'error', code: 'TB_E_BRIDGE_ADDRESS' }],
    steps: [],
  },
  {
    title: 'a bridge the policy allows that does not exist',
    request: tap({ bridge: 'ghost0' }),
    code: 'TB_E_NO_SUCH_BRIDGE',
    audit: [{ decision: 'error', code: 'TB_E_NO_SUCH_BRIDGE' }],
    steps: [],
  },
  {
    title: 'a "bridge" that is a NIC',
    request: tap({ bridge: 'eth0' }),
    code: 'TB_E_NOT_A_BRIDGE',
    audit: [{ decision: 'error', code: 'TB_E_NOT_A_BRIDGE' }],
    steps: [],
  },
  {
    title: 'vhost where /dev/vhost-net is missing: the tap made for it is undone',
    request: tap({ bridge: 'br1', vhost: true }),
    code: 'TB_E_VHOST_UNAVAILABLE',
    audit: [{ decision: 'error', code: 'TB_E_VHOST_UNAVAILABLE', rule: null }],
    steps: [],
    reply: (_r, k) => {
      if (k.links().some((l) => l.kind === 'tun')) throw new Error('a tap stayed behind');
    },
  },
  {
    title: 'vhost where it exists: one vhost fd per queue',
    kernel: (k) => {
      k.vhost = true;
    },
    request: tap({ bridge: 'br1', vhost: true }),
    code: null,
    audit: [{ decision: 'grant', rule: 'pets' }],
    steps: [/^createTap /],
    reply: (r) => {
      if (r.op !== 'create-tap' || r.fds.tap !== 1 || r.fds.vhost !== 1) throw new Error(JSON.stringify(r));
    },
  },
  {
    title: 'a kernel refusal after the tap was configured: TB_E_KERNEL, nothing left',
    kernel: (k) => {
      k.refuseAt = 'tap:configured';
    },
    request: tap(),
    code: 'TB_E_KERNEL',
    audit: [{ decision: 'error', code: 'TB_E_KERNEL' }],
    steps: [],
    reply: (_r, k) => {
      if (k.links().some((l) => l.kind === 'tun')) throw new Error('a tap stayed behind');
    },
  },
  {
    // A fake of the fault: EMFILE at one chosen step cannot be had from the real kernel on demand (an outside review
    // met it by sweeping the broker's open-files limit: TB_E_INTERNAL, "a bug", and a stack trace in the log).
    title: 'the broker out of fds at a step with no code of its own: TB_E_KERNEL naming it, with a hint; nothing left',
    kernel: (k) => {
      k.onStep = (point) => {
        if (point !== 'tap:configured') return;
        k.onStep = null;
        throw Object.assign(new Error('EMFILE: too many open files, open \'/proc/1/stat\''), { code: 'EMFILE' });
      };
    },
    request: tap(),
    code: 'TB_E_KERNEL',
    audit: [{ decision: 'error', code: 'TB_E_KERNEL', message: 'EMFILE: too many open files, open \'/proc/1/stat\'' }],
    steps: [],
    reply: (_r, k, refusal) => {
      if (!/out of open files or memory/.test(refusal?.hint ?? '')) throw new Error(`hint: ${refusal?.hint}`);
      if (k.links().some((l) => l.kind === 'tun')) throw new Error('a tap stayed behind');
    },
  },
  {
    title: 'a refusal after the lease was recorded: the device is deleted, and its cleanup audited',
    kernel: (k) => {
      k.refuseAt = 'create:leased';
    },
    request: tap({ bridge: 'br1', persistent: true }),
    code: 'TB_E_KERNEL',
    audit: [
      { decision: 'error', code: 'TB_E_KERNEL' },
      { op: 'cleanup', decision: 'cleanup' },
    ],
    steps: [/^createTap /, /^deleteLink /],
  },
  {
    title: 'a persistent tap: owned by the caller, no fds, kept in the lease table',
    request: tap({ bridge: 'br1', persistent: true }),
    code: null,
    audit: [{ decision: 'grant', rule: 'pets' }],
    steps: [/^createTap /],
    reply: (r, k) => {
      if (r.op !== 'create-tap' || r.fds.tap !== 0) throw new Error(JSON.stringify(r));
      const dev = k.linkNamed(r.device.name)!;
      if (!dev.persist || dev.tun?.owner !== 1000) throw new Error(JSON.stringify(dev.tun));
    },
  },
  {
    title: 'a network with mac_lock: the port is locked to the guest MAC before the fd leaves',
    request: { op: 'create-tap', network: 'locked-net', mac: '52:54:00:00:00:07' },
    code: null,
    audit: [{ decision: 'grant', rule: 'lab' }],
    steps: [/^lockPort /, /^createTap /],
    reply: (r, k) => {
      if (r.op !== 'create-tap' || !r.device.locked) throw new Error('not locked');
      if (!k.locked.has(r.device.ifindex)) throw new Error('the kernel has no lock');
    },
  },
  {
    title: 'mac_lock where the kernel cannot lock ports: a policy refusal, named by its rule',
    kernel: (k) => {
      k.canLock = false;
    },
    request: { op: 'create-tap', network: 'locked-net', mac: '52:54:00:00:00:07' },
    code: 'TB_E_MAC_LOCK',
    audit: [{ decision: 'deny', code: 'TB_E_MAC_LOCK' }],
    steps: [],
  },
  {
    title: 'mac_lock with a MAC the broker is not told',
    request: { op: 'create-tap', network: 'locked-net', mac: null },
    code: 'TB_E_MAC_LOCK',
    audit: [{ decision: 'deny', rule: 'lab', code: 'TB_E_MAC_LOCK' }],
    steps: [],
  },
  {
    title: 'a macvtap on a NIC the rule names: the guest MAC, one fd',
    request: { op: 'create-macvtap', parent: 'eth0', mac: '52:54:00:00:00:09' },
    code: null,
    audit: [{ op: 'create-macvtap', decision: 'grant', rule: 'nics' }],
    steps: [/^createMacvtap tb1000-/],
    reply: (r) => {
      if (r.op !== 'create-macvtap' || r.device.mac !== '52:54:00:00:00:09') throw new Error(JSON.stringify(r));
    },
  },
  {
    title: 'a macvtap with a MAC its parent already carries',
    request: { op: 'create-macvtap', parent: 'eth0', mac: '52:54:00:00:00:01' },
    code: 'TB_E_MAC_IN_USE',
    audit: [{ decision: 'error', code: 'TB_E_MAC_IN_USE' }],
    steps: [],
  },
  {
    title: 'a macvtap on loopback, even where the rule names it',
    request: { op: 'create-macvtap', parent: 'lo' },
    code: 'TB_E_BAD_PARENT',
    audit: [{ decision: 'error', code: 'TB_E_BAD_PARENT' }],
    steps: [],
  },
  {
    title: 'a macvtap on a parent that does not exist',
    request: { op: 'create-macvtap', parent: 'eth9' },
    code: 'TB_E_NO_SUCH_PARENT',
    audit: [{ decision: 'error', code: 'TB_E_NO_SUCH_PARENT' }],
    steps: [],
  },
  {
    title: 'a macvtap mode the rule does not list',
    request: { op: 'create-macvtap', parent: 'eth0', mode: 'passthru' },
    code: 'TB_E_POLICY_DENIED',
    audit: [{ decision: 'deny', code: 'TB_E_POLICY_DENIED' }],
    steps: [],
  },
  {
    // Where a NIC goes is checked before anything is made: an outside review made 31 taps roll back for a 32nd.
    title: 'create: a NIC refused where it goes (a bridge without a pinned address) is refused before anything is made',
    request: { op: 'create', nics: [{ kind: 'tap', bridge: 'br0' }, { kind: 'tap', bridge: 'nopin0' }] },
    code: 'TB_E_BRIDGE_ADDRESS',
    audit: [{ op: 'create', decision: 'error', code: 'TB_E_BRIDGE_ADDRESS' }],
    steps: [],
    reply: (_r, k) => {
      if (k.links().some((l) => l.kind === 'tun')) throw new Error('a tap was made');
    },
  },
  {
    title: 'create, all or none: the second NIC\'s kernel step failing undoes the first, each NIC audited',
    request: { op: 'create', nics: [{ kind: 'tap', bridge: 'br0' }, { kind: 'tap', bridge: 'br0' }] },
    kernel: (k) => {
      let taps = 0;
      k.onStep = (point) => {
        if (point === 'tap:configured' && ++taps === 2) k.refuseAt = point;
      };
    },
    code: 'TB_E_KERNEL',
    audit: [
      { op: 'create', decision: 'error', code: 'TB_E_KERNEL' },
      { op: 'cleanup', decision: 'cleanup' },
    ],
    steps: [/^createTap /, /^deleteLink /],
    reply: (_r, k) => {
      if (k.links().some((l) => l.kind === 'tun')) throw new Error('a tap stayed behind');
    },
  },
  {
    title: 'create: two NICs granted in one reply, one grant record each',
    request: { op: 'create', nics: [{ kind: 'tap', bridge: 'br0' }, { kind: 'tap', network: 'lab-net' }] },
    code: null,
    audit: [{ op: 'create', decision: 'grant' }, { op: 'create', decision: 'grant' }],
    steps: [/^createTap /, /^createTap /],
    reply: (r) => {
      if (r.op !== 'create' || r.devices.length !== 2) throw new Error(JSON.stringify(r));
    },
  },
  {
    // An outside review: one MAC twice on one bridge was granted, two ports with one guest and one host MAC.
    title: 'create: one MAC twice on one bridge is refused before anything is made',
    request: { op: 'create', nics: [{ kind: 'tap', bridge: 'br0', mac: '52:54:00:00:00:0b' },
      { kind: 'tap', bridge: 'br0', mac: '52:54:00:00:00:0b' }] },
    code: 'TB_E_INVALID_REQUEST',
    audit: [{ op: 'create', decision: 'error', code: 'TB_E_INVALID_REQUEST' }],
    steps: [],
  },
  {
    // The same review: two macvtaps with one MAC on one parent were refused only by the second's kernel step.
    title: 'create: one MAC twice on one macvtap parent is refused before anything is made, and so is its can',
    request: { op: 'create', nics: [{ kind: 'macvtap', parent: 'eth0', mac: '52:54:00:00:00:0c' },
      { kind: 'macvtap', parent: 'eth0', mac: '52:54:00:00:00:0c' }] },
    code: 'TB_E_INVALID_REQUEST',
    audit: [{ op: 'create', decision: 'error', code: 'TB_E_INVALID_REQUEST' }],
    steps: [],
  },
  {
    title: 'can: a MAC an earlier NIC of the same request has on the same parent is refused',
    request: { op: 'can', kind: 'macvtap', parent: 'eth0', mac: '52:54:00:00:00:0d',
      before: [{ kind: 'macvtap', parent: 'eth0', mac: '52:54:00:00:00:0d' }] },
    code: null,
    audit: [{ op: 'can', decision: 'dry-run' }],
    steps: [],
    reply: (r) => {
      if (r.op !== 'can' || r.allow || !/earlier NIC of this request asks for MAC 52:54:00:00:00:0d/.test(r.message ?? '')) {
        throw new Error(JSON.stringify(r));
      }
    },
  },
  {
    // `can --group`: a persistent tap given to a group is asked about as `create --group' would make it.
    // A deny covers br1 (for uid 3000): whoever holds group 1000 could open the tap, which no database tells.
    title: 'can: a persistent tap given to one of the caller\'s groups, on a bridge a deny covers, is refused',
    request: { op: 'can', kind: 'tap', parent: 'br1', persistent: true, group: 1000 },
    code: null,
    audit: [{ op: 'can', decision: 'dry-run', rule: 'no-br1-for-3000', code: 'TB_E_POLICY_DENIED' }],
    steps: [],
    reply: (r) => {
      if (r.op !== 'can' || r.allow || r.code !== 'TB_E_POLICY_DENIED' || r.rule !== null) throw new Error(JSON.stringify(r));
    },
  },
  {
    title: 'can: a group the caller is not in is refused, as by create',
    request: { op: 'can', kind: 'tap', parent: 'br1', persistent: true, group: 4242 },
    code: 'TB_E_POLICY_DENIED',
    audit: [{ op: 'can', decision: 'dry-run', code: 'TB_E_POLICY_DENIED' }],
    steps: [],
  },
  {
    // Found by an outside review: audited as `error`; a refusal of ownership is the policy's (tapbrokerd(8)).
    title: 'create: a persistent tap for a group the caller is not in is refused, audited as a deny',
    request: tap({ bridge: 'br1', persistent: true, group: 4242 }),
    code: 'TB_E_POLICY_DENIED',
    audit: [{ op: 'create-tap', decision: 'deny', code: 'TB_E_POLICY_DENIED', message: 'you are not in group 4242' }],
    steps: [],
  },
  {
    title: 'can: a group for a macvtap is refused (it is its owner\'s alone)',
    request: { op: 'can', kind: 'macvtap', parent: 'eth0', persistent: true, group: 1000 },
    code: 'TB_E_INVALID_REQUEST',
    audit: [{ op: 'can', decision: 'dry-run', code: 'TB_E_INVALID_REQUEST' }],
    steps: [],
  },
  {
    title: 'can: a dry run makes nothing and is audited as one',
    request: { op: 'can', kind: 'tap', parent: 'br0' },
    code: null,
    audit: [{ op: 'can', decision: 'dry-run', rule: 'lab' }],
    steps: [],
  },
  {
    title: 'release of another user\'s device: not found, nothing deleted',
    before: [tap({ bridge: 'br1', persistent: true, name: 'tb1000-p' })],
    uid: 2000,
    request: { op: 'release', name: 'tb1000-p' },
    code: 'TB_E_NO_SUCH_LEASE',
    audit: [{ op: 'release', decision: 'deny', code: 'TB_E_NO_SUCH_LEASE' }],
    steps: [],
  },
  {
    title: 'release of one\'s own persistent tap: deleted and audited',
    before: [tap({ bridge: 'br1', persistent: true, name: 'tb1000-p' })],
    request: { op: 'release', name: 'tb1000-p' },
    code: null,
    audit: [{ op: 'release', decision: 'release' }],
    steps: [/^deleteLink tb1000-p$/],
  },
  {
    title: 'reload by a user: refused',
    request: { op: 'reload' },
    code: 'TB_E_POLICY_DENIED',
    audit: [{ op: 'reload', decision: 'deny', code: 'TB_E_POLICY_DENIED' }],
    steps: [],
  },
  {
    title: 'a field the schema does not know: refused by the codec before any handler',
    request: tap({ bridges: 'br0' }),
    code: 'TB_E_INVALID_REQUEST',
    audit: [],
    steps: [],
  },
];

let nextId = 1;

/** Slow work done and its records written: the reaper idle, then the turn its callbacks run in. */
async function settled(broker: Broker): Promise<void> {
  await broker.reaper.idle();
  await new Promise((r) => setImmediate(r));
}

/** The broker listening on a socket in `dir`, and a connection to it that has said hello. */
async function helloed(broker: Broker, dir: string): Promise<SeqpacketConnection> {
  const socket = path.join(dir, 'broker.sock');
  broker.start(SeqpacketListener.listen(socket, { mode: 0o600 }));
  const conn = await SeqpacketConnection.connect(socket, { maxPacket: MAX_REPLY_BYTES });
  await conn.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION }));
  await conn.receive();
  return conn;
}

/** Through the codec, as a session would, to the broker's dispatch. */
async function ask(broker: Broker, who: Identity, request: Record<string, unknown>) {
  const decoded = decodeRequest(encodeFrame({ id: nextId++, ...request } as never));
  if (!decoded.ok) throw decoded.error;
  return broker.dispatch(who, decoded.message);
}

/** A broker on the fake kernel with the table's host, started; `fds` the test keeps are closed after it. */
async function onFakeKernel(
  run: (b: { broker: Broker; kernel: FakeKernel; records: AuditRecord[]; held: number[] }) => Promise<void>,
  policy = POLICY,
  options: { takerWaitMs?: number; returnMemoryMs?: number; returnMemory?: () => void } = {},
): Promise<void> {
  // Parsed first: a policy that does not parse leaves no directory behind.
  const parsed = parsePolicy(policy);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-handlers-'));
  const records: AuditRecord[] = [];
  const devNull = fs.openSync('/dev/null', 'w');
  let kernel!: FakeKernel;
  const broker = new Broker({
    policy: parsed,
    stateDir: dir,
    audit: { journalSocket: null, fd: devNull, linux: { send: (r) => records.push(r), close: () => {} } },
    kernel: (cleanup) => (kernel = new FakeKernel(cleanup)),
    ...options,
  });
  const held: number[] = [];
  try {
    host(kernel);
    broker.lifetimes.start();
    await run({ broker, kernel, records, held });
  } finally {
    for (const fd of held) fs.closeSync(fd);
    await broker.shutdown();
    fs.closeSync(devNull);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

for (const row of ROWS) {
  test(row.title, (t) => onFakeKernel(async ({ broker, kernel, records, held }) => {
    const who = caller(row.uid ?? 1000);
    for (const r of row.before ?? []) held.push(...(await ask(broker, caller(1000), r)).fds);
    await settled(broker);
    row.kernel?.(kernel);
    const steps = kernel.steps.length;
    const seen = records.length;
    let code: string | null = null;
    let reply: Reply | null = null;
    let refusal: TapbrokerError | undefined;
    try {
      const out = await ask(broker, who, row.request);
      reply = out.reply;
      held.push(...out.fds);
      t.true(out.fds.every((fd) => kernel.isOurs(fd)), 'every fd sent is one the kernel gave');
    } catch (err) {
      if (!(err instanceof TapbrokerError)) throw err;
      code = err.code;
      refusal = err;
    }
    await settled(broker);
    t.is(code, row.code, 'the reply code');
    const got = records.slice(seen);
    t.is(got.length, row.audit.length, `audit records: ${got.map((r) => `${r.op}/${r.decision}`).join(', ')}`);
    row.audit.forEach((want, i) => t.like(got[i], want as Record<string, unknown>, `audit record ${i}`));
    const taken = kernel.steps.slice(steps);
    t.is(taken.length, row.steps.length, `kernel steps: ${taken.join(', ')}`);
    row.steps.forEach((re, i) => t.regex(taken[i] ?? '', re, `kernel step ${i}`));
    if (reply) row.reply?.(reply, kernel);
    else if (row.code === null) t.fail('granted');
    else row.reply?.(null as never, kernel, refusal);
  }));
}


test('a tap\'s link events are judged without looking it up (an RTM_GETLINK waits behind every deletion under way)', async (t) => {
  // The broker's thread blocked for up to 100 ms per event while other taps were being deleted (a profile: 6 ms a
  // grant of it in the bench): a tap event's owner and group are read again from sysfs instead.
  await onFakeKernel(async ({ broker, kernel, held }) => {
    const who = caller(1000);
    const got = await ask(broker, who, tap({ bridge: 'br1' }));
    held.push(...got.fds);
    const name = (got.reply as { device: { name: string } }).device.name;
    await settled(broker);
    const before = kernel.lookups;
    // Offloads, MTU, carrier: changes of no term.
    for (let i = 0; i < 10; i++) kernel.holderChanges(name, {});
    await ask(broker, who, { op: 'list' });
    await settled(broker);
    t.is(kernel.lookups - before, 0, 'no device looked up for its events');
    t.not(kernel.linkNamed(name), null, 'the tap stays');
    // Given to another owner: still seen, and the tap goes.
    const tun = kernel.linkNamed(name)!.tun!;
    kernel.holderChanges(name, { tun: { ...tun, owner: 1000 } });
    await ask(broker, who, { op: 'list' });
    await settled(broker);
    t.is(kernel.linkNamed(name), null, 'a tap given to another owner is deleted');
  });
});

test('lost link events: a tap its holder made persistent (allowed) and gave another MAC is still deleted', async (t) => {
  // Found by an outside review: after a resync, the lease was converted to a persistent one and its new
  // MAC never judged (no later event came to show it), so the tap lived on with another guest's address.
  await onFakeKernel(async ({ broker, kernel, records, held }) => {
    const who = caller(1000);
    const got = await ask(broker, who, tap({ bridge: 'br1' }));
    held.push(...got.fds);
    const name = (got.reply as { device: { name: string } }).device.name;
    await settled(broker);
    // The rule (pets) allows persistent taps; the holder makes its tap persistent and takes another MAC,
    // and the broker's queue of events overruns meanwhile.
    kernel.holderChanges(name, { persist: true, address: Buffer.from('525400aaaaaa', 'hex') });
    kernel.loseEvents();
    const seen = records.length;
    await ask(broker, who, { op: 'list' });
    await settled(broker);
    t.is(kernel.linkNamed(name), null, 'the device is deleted');
    const after = records.slice(seen).map((r) => `${r.decision}: ${r.message ?? ''}`);
    t.true(after.some((m) => /^cleanup: its MAC was changed to 52:54:00:aa:aa:aa/.test(m)), after.join('\n'));
    t.like((await ask(broker, who, { op: 'list' })).reply, { op: 'list', leases: [] }, 'no lease left');
  });
});

test('a tap its holder makes persistent is decided on the policy in force: a deny added by a reload deletes it', async (t) => {
  // Found by an outside review: only the lease's rule was looked at (by name, for persistent = true), so a
  // holder that a reload had denied could still make its tap outlive it.
  await onFakeKernel(async ({ broker, kernel, records, held }) => {
    const who = caller(1000);
    const got = await ask(broker, who, tap({ bridge: 'br1' }));
    held.push(...got.fds);
    const name = (got.reply as { device: { name: string } }).device.name;
    await settled(broker);
    broker.policy = parsePolicy(`${POLICY}\n[[deny]]\nname = "no-more-1000"\nusers = [1000]\nbridges = ["br1"]\n`);
    kernel.holderChanges(name, { persist: true });
    const seen = records.length;
    await ask(broker, who, { op: 'list' });
    await settled(broker);
    t.is(kernel.linkNamed(name), null, 'the device is deleted');
    const after = records.slice(seen).map((r) => `${r.decision}: ${r.message ?? ''}`);
    t.true(after.some((m) => /^cleanup: its holder made it persistent, which the policy does not allow \(.*no-more-1000/.test(m)), after.join('\n'));
    t.false(after.some((m) => /now a persistent lease/.test(m)), 'it never became one');
    // Nor where the rule now grants persistent taps only as locked ports, and this one is not locked.
    broker.policy = parsePolicy(POLICY);
    const next = await ask(broker, who, tap({ bridge: 'br1' }));
    held.push(...next.fds);
    const other = (next.reply as { device: { name: string } }).device.name;
    await settled(broker);
    broker.policy = parsePolicy(POLICY.replace('name = "pets"', 'name = "pets"\nmac_lock = true'));
    kernel.holderChanges(other, { persist: true });
    await ask(broker, who, { op: 'list' });
    await settled(broker);
    t.is(kernel.linkNamed(other), null, 'the unlocked tap is deleted');
    t.true(records.some((r) => r.decision === 'cleanup' && /grants persistent taps only as locked ports/.test(r.message ?? '')));
  });
});

test('a tap its holder makes persistent: a uid without an account is never taken for a gid', async (t) => {
  // Found by an outside review: the conversion was decided with the uid's number standing in for the gid where
  // the uid has no account, so a uid equal to a group's gid took that group's rule (its persistence and quota)
  // by an ioctl on its fd. (The host the tests run on has no account for these uids.)
  await onFakeKernel(async ({ broker, kernel, records, held }) => {
    const judged = async (uid: number, before: string, after: string) => {
      broker.policy = parsePolicy(before);
      const who: Identity = { ...caller(uid), gid: 65534, groups: [] };
      const got = await ask(broker, who, tap({ bridge: 'br1' }));
      held.push(...got.fds);
      const name = (got.reply as { device: { name: string } }).device.name;
      await settled(broker);
      broker.policy = parsePolicy(after);
      kernel.holderChanges(name, { persist: true });
      await ask(broker, who, { op: 'list' });
      await settled(broker);
      t.is(kernel.linkNamed(name), null, `uid ${uid}: the device is deleted`);
      t.false(records.some((r) => /now a persistent lease/.test(r.message ?? '')), `uid ${uid}: no rule converted it`);
    };
    // Another rule, for group 4000, allows persistent taps: uid 4000 is not in it.
    const plain = '[[rule]]\nname = "plain"\nusers = [4000]\nbridges = ["br1"]\nmax_devices = 1\n';
    const both = `${plain}\n[[rule]]\nname = "group-4000"\ngroups = [4000]\nbridges = ["br1"]\npersistent = true\n`;
    await judged(4000, both, both);
    // Its own rule, reloaded to admit group 4002 only: uid 4002 is not gid 4002.
    const own = (who: string) => `[[rule]]\nname = "own"\n${who}\nbridges = ["br1"]\npersistent = true\n`;
    await judged(4002, own('users = [4002]'), own('groups = [4002]'));
  });
});

// Found by an outside review: root renaming a request's fd-bound NIC while the request ran went unseen (a device's
// own events mid-create were not read, but for its deletion): the request was granted under a name no device had,
// the client refused the reply, and the request's persistent NIC stayed, counted, with no end.
test('a NIC renamed by root while its request runs fails the request, and every NIC of it is undone', async (t) => {
  await onFakeKernel(async ({ broker, kernel, records }) => {
    let taps = 0;
    kernel.onStep = (point) => {
      if (point === 'tap:configured' && ++taps === 2) kernel.rootRenames('tb1000-ren', 'admin0');
    };
    const got = ask(broker, caller(1000), { op: 'create', nics: [
      { kind: 'tap', bridge: 'br0', name: 'tb1000-ren' }, { kind: 'tap', bridge: 'br1', persistent: true, name: 'tb1000-pet' },
    ] });
    const err = await t.throwsAsync(got);
    t.is((err as { code?: string }).code, 'TB_E_KERNEL');
    t.regex(err!.message, /`tb1000-ren' was deleted or renamed while it was being made/);
    await settled(broker);
    t.is(kernel.linkNamed('tb1000-pet'), null, 'the persistent NIC is undone');
    t.deepEqual(broker.lifetimes.table.all(), [], 'no lease stays');
    t.false(records.some((r) => r.decision === 'grant'), 'nothing granted');
  });
});

test('a persistent tap its owner changes while it is being made is judged when its create ends', async (t) => {
  // Found by an outside review: the events of a lease mid-create are not judged (they predate its terms), and
  // nothing judged the device afterwards, so an owner could change its persistent tap's MAC or group meanwhile.
  await onFakeKernel(async ({ broker, kernel, records }) => {
    const name = 'tb1000-own';
    kernel.onStep = (point) => {
      if (point === 'tap:persisted') kernel.holderChanges(name, { address: Buffer.from('525400bbbbbb', 'hex') });
    };
    await ask(broker, caller(1000), tap({ bridge: 'br1', persistent: true, name }));
    await settled(broker);
    t.is(kernel.linkNamed(name), null, 'the device is deleted');
    const cleanup = records.find((r) => r.decision === 'cleanup' && /its MAC was changed to 52:54:00:bb:bb:bb/.test(r.message ?? ''));
    t.truthy(cleanup, records.map((r) => `${r.decision}: ${r.message ?? ''}`).join('\n'));
  });
});

test('a name its holder picked is held to name_pattern when its tap is made persistent; a broker-picked one is not', async (t) => {
  // Found by an outside code review: the conversion was decided as if the broker had picked every name, so
  // a tap named outside a persistent rule's name_pattern could become that rule's persistent device.
  const policy = parsePolicy(POLICY.replace('name = "pets"', 'name = "pets"\nname_pattern = "pet{uid}-*"'));
  await onFakeKernel(async ({ broker, kernel, records, held }) => {
    broker.policy = policy;
    const who = caller(1000);
    // Granted by everyone-br1 (its default name_pattern tb{uid}-*), not by pets (pet{uid}-*).
    const named = await ask(broker, who, tap({ bridge: 'br1', name: 'tb1000-Own' }));
    held.push(...named.fds);
    const picked = await ask(broker, who, tap({ bridge: 'br1' }));
    held.push(...picked.fds);
    const other = (picked.reply as { device: { name: string } }).device.name;
    await settled(broker);
    kernel.holderChanges('tb1000-Own', { persist: true });
    kernel.holderChanges(other, { persist: true });
    await ask(broker, who, { op: 'list' });
    await settled(broker);
    t.is(kernel.linkNamed('tb1000-Own'), null, 'the tap named outside pets\' pattern is deleted');
    const gone = records.find((r) => r.decision === 'cleanup' && (r.device as { name: string }).name === 'tb1000-Own');
    t.regex(gone?.message ?? '', /made it persistent, which the policy does not allow \(name `tb1000-Own' does not match/);
    t.not(kernel.linkNamed(other), null, 'the broker-named one is a persistent lease of pets');
    t.like((await ask(broker, who, { op: 'list' })).reply, { leases: [{ name: other, ends: 'release', rule: 'pets' }] });
  });
});

test('a tap committed before its own link events were read is not deleted by them; a later breach still is', async (t) => {
  // The events of a create predate its MAC (the kernel's random one first): read after the commit (a drain over
  // its budget), they are judged on the device as it is, not taken for a breach, until one shows it as granted.
  await onFakeKernel(async ({ broker, kernel, held }) => {
    kernel.drainBudget = 0;
    const got = await ask(broker, caller(1000), tap());
    held.push(...got.fds);
    const name = (got.reply as { device: { name: string; host_mac: string } }).device.name;
    kernel.drainBudget = null;
    await ask(broker, caller(1000), { op: 'list' });
    await settled(broker);
    t.not(kernel.linkNamed(name), null, 'its own early events did not delete it');
    // Once an event showed it as granted, a MAC set and set back before the broker reads it is a breach.
    const own = (got.reply as { device: { host_mac: string } }).device.host_mac;
    kernel.holderChanges(name, { address: Buffer.from('525400dddddd', 'hex') });
    kernel.holderChanges(name, { address: Buffer.from(own.split(':').map((h) => parseInt(h, 16))) });
    await ask(broker, caller(1000), { op: 'list' });
    await settled(broker);
    t.is(kernel.linkNamed(name), null, 'the flip is a breach');
  });
});

test('a tap that takes a locked guest\'s MAC while the guest is being made, and goes: the guest\'s entry is put back', async (t) => {
  // Found by an outside review: the put-back skipped leases still being made, whose ports are locked before their
  // leases are written; the guest was granted a locked port with no entry, cut off.
  await onFakeKernel(async ({ broker, kernel, held }) => {
    const taker = await ask(broker, caller(1000), tap());
    const name = (taker.reply as { device: { name: string } }).device.name;
    await settled(broker);
    const mac = '52:54:00:12:34:99';
    kernel.onStep = (point) => {
      if (point !== 'tap:locked') return;
      kernel.onStep = null;
      kernel.holderChanges(name, { address: Buffer.from(mac.split(':').map((h) => parseInt(h, 16))) });
      for (const fd of taker.fds) fs.closeSync(fd);
      kernel.lastFdClosed(name);
    };
    const guest = await ask(broker, caller(1000), { op: 'create-tap', network: 'locked-net', mac });
    held.push(...guest.fds);
    await settled(broker);
    const g = (guest.reply as { device: { ifindex: number; locked: boolean } }).device;
    t.true(g.locked);
    t.deepEqual(kernel.fdb.get(`${kernel.linkNamed('br0')!.index}/${mac}/0`), { port: g.ifindex, static: true });
  });
});

// Found by an outside re-test: once a taker's lease ended its events were no longer read, and its deletion waits
// behind every queued one (decoys of its holder's first): given the guest's MAC again meanwhile, every few ms, it
// kept a locked guest cut off 60 % of the time. A tap whose deletion waits is watched for what it takes.
test('a tap whose deletion waits, given a locked guest\'s MAC again, has the guest\'s entry put back each time', async (t) => {
  await onFakeKernel(async ({ broker, kernel, held }) => {
    const guest = await ask(broker, caller(1000), { op: 'create-tap', network: 'locked-net' });
    held.push(...guest.fds);
    const g = (guest.reply as { device: { mac: string; ifindex: number } }).device;
    const key = `${kernel.linkNamed('br0')!.index}/${g.mac}/0`;
    const taker = await ask(broker, caller(1000), tap());
    held.push(...taker.fds);
    const name = (taker.reply as { device: { name: string } }).device.name;
    await settled(broker);
    let open!: () => void;
    kernel.deletions = new Promise((r) => (open = r));
    const mac = Buffer.from(g.mac.split(':').map((h) => parseInt(h, 16)));
    // A request makes the broker read the link events queued (its deletions are held: not settled()).
    const read = () => ask(broker, caller(1000), { op: 'list' });
    kernel.holderChanges(name, { address: mac });
    await read();
    t.deepEqual(kernel.fdb.get(key), { port: g.ifindex, static: true }, 'put back as the taking is read');
    t.false(broker.lifetimes.visible(1000).some((l) => l.name === name), 'the taker\'s lease ended');
    for (let i = 0; i < 3; i++) {
      kernel.holderChanges(name, { address: Buffer.from('02aabbccdd0' + i, 'hex') });
      kernel.holderChanges(name, { address: mac });
      t.is(kernel.fdb.get(key), undefined, 'taken again while its deletion waits');
      await read();
      t.deepEqual(kernel.fdb.get(key), { port: g.ifindex, static: true }, `put back again (${i + 1})`);
    }
    t.truthy(kernel.linkNamed(name), 'all the while the taker waited for its deletion');
    open();
    kernel.deletions = null;
    await settled(broker);
    t.falsy(kernel.linkNamed(name), 'then deleted');
    t.deepEqual(kernel.fdb.get(key), { port: g.ifindex, static: true }, 'and the entry stays');
  });
});

test('a tap committed with its events unread that takes a locked guest\'s MAC and sets it back: the entry is put back', async (t) => {
  // Found by an outside review: such a lease is judged on its device as it is now, so a MAC set back before the
  // broker read the events passed, and the guest's static entry, dropped by the bridge, was never put back.
  await onFakeKernel(async ({ broker, kernel, records, held }) => {
    const guest = await ask(broker, caller(1000), { op: 'create-tap', network: 'locked-net' });
    held.push(...guest.fds);
    const g = (guest.reply as { device: { mac: string; ifindex: number } }).device;
    const key = `${kernel.linkNamed('br0')!.index}/${g.mac}/0`;
    await settled(broker);
    // The taker's create reads its own events while it is made (they are skipped then), but events queued behind
    // them (another device's, as an attacker's offload toggles would be) are left for later: it is committed fresh.
    kernel.drainBudget = 3;
    kernel.onStep = (point) => {
      if (point === 'tap:configured') for (let i = 0; i < 6; i++) kernel.holderChanges(guestName(), {});
    };
    const guestName = () => (guest.reply as { device: { name: string } }).device.name;
    const taker = await ask(broker, caller(1000), tap());
    kernel.onStep = null;
    held.push(...taker.fds);
    const d = (taker.reply as { device: { name: string; host_mac: string } }).device;
    kernel.holderChanges(d.name, { address: Buffer.from(g.mac.split(':').map((h) => parseInt(h, 16))) });
    kernel.holderChanges(d.name, { address: Buffer.from(d.host_mac.split(':').map((h) => parseInt(h, 16))) });
    t.is(kernel.fdb.get(key), undefined, 'the bridge dropped the guest\'s static entry');
    kernel.drainBudget = null;
    await ask(broker, caller(1000), { op: 'list' });
    await settled(broker);
    t.deepEqual(kernel.fdb.get(key), { port: g.ifindex, static: true }, 'put back');
    t.true(records.some((r) => (r.device as { name?: string } | undefined)?.name === d.name
      && /its holder gave it MAC .* before the broker read it/.test(r.message ?? '')), 'the taking is recorded');
  });
});

// Found by an outside review (read only; this kernel has no VLAN filtering, so the fake kernel's model stands in): a
// port moved off its bridge and back by hand joined the bridge's default VLAN, and its guest reached it.
test('a VLAN port moved off its bridge and back gets its access VLAN again; a locked one its lock too', async (t) => {
  await onFakeKernel(async ({ broker, kernel, records, held }) => {
    for (const network of ['vlan-net', 'locked-net']) {
      const got = await ask(broker, caller(1000), { op: 'create-tap', network });
      held.push(...got.fds);
      const name = (got.reply as { device: { name: string } }).device.name;
      const index = kernel.linkNamed(name)!.index;
      const bridge = network === 'vlan-net' ? 'brv' : 'br0';
      if (network === 'vlan-net') t.is(kernel.vlans.get(index), 10, 'granted as an access port of VLAN 10');
      kernel.rootMoves(name, null);
      await ask(broker, caller(1000), { op: 'list' });
      await settled(broker);
      kernel.rootMoves(name, bridge);
      await ask(broker, caller(1000), { op: 'list' });
      await settled(broker);
      const said = records.filter((r) => (r.device as { name?: string } | undefined)?.name === name
        && r.op === 'reconcile').map((r) => r.message);
      if (network === 'vlan-net') {
        t.is(kernel.vlans.get(index), 10, 'back in VLAN 10, not the bridge\'s default');
        t.false(kernel.locked.has(index), 'not locked: its network locks nothing');
        t.deepEqual(said, [
          "no longer a port of bridge `brv': its access VLAN 10 went with it, and is put back once it is a port of a "
            + 'bridge of that name again',
          "back on bridge `brv': its access VLAN 10 is put back",
        ]);
      } else {
        t.true(kernel.locked.has(index), 'locked again');
        t.is(kernel.vlans.get(index), undefined);
      }
      t.not(kernel.linkNamed(name), null);
    }
  });
});

test('a tap that takes a locked guest\'s MAC and is gone before its event is read: the guest\'s entry is put back', async (t) => {
  // Found by an outside review: the event was skipped (its device gone) and the DELLINK judged nothing; the locked
  // guest stayed without its static entry, cut off until a restart, and the taker's next tap had its traffic.
  await onFakeKernel(async ({ broker, kernel, records, held }) => {
    const guest = await ask(broker, caller(1000), { op: 'create-tap', network: 'locked-net' });
    held.push(...guest.fds);
    const g = (guest.reply as { device: { name: string; mac: string; ifindex: number } }).device;
    const key = `${kernel.linkNamed('br0')!.index}/${g.mac}/0`;
    t.deepEqual(kernel.fdb.get(key), { port: g.ifindex, static: true });
    const taker = await ask(broker, caller(1000), tap());
    const name = (taker.reply as { device: { name: string } }).device.name;
    await settled(broker);
    kernel.holderChanges(name, { address: Buffer.from(g.mac.split(':').map((h) => parseInt(h, 16))) });
    t.is(kernel.fdb.get(key), undefined, 'the bridge dropped the guest\'s static entry');
    for (const fd of taker.fds) fs.closeSync(fd);
    kernel.lastFdClosed(name);
    await ask(broker, caller(1000), { op: 'list' });
    await settled(broker);
    t.deepEqual(kernel.fdb.get(key), { port: g.ifindex, static: true }, 'put back');
    t.true(broker.lifetimes.forwarding.takenLately('br0', g.mac, 1000, () => false), 'the MAC is noted as taken');
    t.true(records.some((r) => r.decision === 'cleanup' && /the device vanished with its last fd/.test(r.message ?? '')));
  });
});

// Found by an outside re-test: another user's loops of new taps, each given a locked guest's MAC until deleted, cut
// the guest off 32-42 % of the time. Such a taker leaves its bridge at once and its uid's new devices wait (1 s, then
// doubling); a holder taking its own guest's MAC harms no one else, and waits for nothing.
test('a tap that takes another uid\'s locked guest\'s MAC leaves its bridge, and its uid\'s new devices wait', (t) =>
  onFakeKernel(async ({ broker, kernel, held }) => {
    const guest = await ask(broker, caller(1000), { op: 'create-tap', network: 'locked-net' });
    held.push(...guest.fds);
    const mac = (guest.reply as { device: { mac: string } }).device.mac;
    const take = async (uid: number) => {
      const taker = await ask(broker, caller(uid), tap());
      held.push(...taker.fds);
      const name = (taker.reply as { device: { name: string } }).device.name;
      await settled(broker);
      kernel.holderChanges(name, { address: Buffer.from(mac.split(':').map((h) => parseInt(h, 16))) });
      await ask(broker, caller(uid), { op: 'list' });
      await settled(broker);
      return name;
    };
    const own = await take(1000);
    t.is(broker.lifetimes.forwarding.takerWaits(1000, false), 0, 'its own guest: no wait');
    t.false(kernel.steps.includes(`detach ${own}`));
    const other = await take(2000);
    t.true(kernel.steps.includes(`detach ${other}`), 'the taker left its bridge');
    // The first wait, not a doubled one; long here, so that a loaded machine's delays stay inside it.
    const waits = broker.lifetimes.forwarding.takerWaits(2000, false);
    t.true(waits > 50_000 && waits <= 60_000, `${waits} ms`);
    const refused = await t.throwsAsync(ask(broker, caller(2000), tap()));
    t.like(refused, { code: 'TB_E_BUSY' });
    t.regex(refused!.message, /took the MAC of a guest whose port is locked; new devices wait another (5\d|60) s/);
    const again = await ask(broker, caller(1000), { op: 'create-tap', network: 'lab-net' });
    held.push(...again.fds);
    t.is(again.reply.op, 'create-tap', 'another uid is not held up');
  }, `${POLICY}\n[[rule]]\nname = "takers"\nusers = [2000]\nbridges = ["br0"]\n`, { takerWaitMs: 60_000 }));

// Found by an outside review: a holder's tap toggling its offloads (no capability needed) sent events under every
// flood limit, each decoded and its owner read from sysfs, and kept everyone's requests waiting up to 0.3 s a second.
// An event repeating a state already judged is judged once more within REPEAT_CHECK_MS, not at once: an owner numbered
// alike from another user namespace (what such an event can hide) is still found.
test('events repeating a judged state are judged again shortly after, and a change they hide is still found', (t) =>
  onFakeKernel(async ({ broker, kernel, records, held }) => {
    const got = await ask(broker, caller(1000), tap());
    held.push(...got.fds);
    const name = (got.reply as { device: { name: string } }).device.name;
    await settled(broker);
    let looked = 0;
    const tapAsSeen = kernel.tapAsSeen.bind(kernel);
    kernel.tapAsSeen = (event) => {
      looked++;
      return tapAsSeen(event);
    };
    kernel.repeatEvent(name);
    await ask(broker, caller(1000), { op: 'list' });
    t.is(looked, 1, 'a state not judged before is judged at once');
    for (let i = 0; i < 50; i++) kernel.repeatEvent(name);
    await ask(broker, caller(1000), { op: 'list' });
    t.is(looked, 1, 'its repeats are not, at once');
    await new Promise((r) => setTimeout(r, REPEAT_CHECK_MS + 30));
    t.is(looked, 2, 'once more, shortly after');
    // The holder, from a user namespace of its own, takes the tap: its event shows the owner it had.
    kernel.holderChangesUnseen(name, { tun: { owner: 1000, group: null, queues: null } });
    await ask(broker, caller(1000), { op: 'list' });
    t.truthy(kernel.linkNamed(name), 'not judged at once');
    await new Promise((r) => setTimeout(r, REPEAT_CHECK_MS + 30));
    await settled(broker);
    t.is(kernel.linkNamed(name), null, 'found within the delay, and deleted');
    t.true(records.some((r) => r.decision === 'cleanup' && /changed its owner or group/.test(r.message ?? '')));
    // A persistent tap's events are all judged at once: whoever its owner lets in may attach a queue unseen otherwise.
    const kept = await ask(broker, caller(1000), { op: 'create-tap', bridge: 'br1', persistent: true });
    const persistent = (kept.reply as { device: { name: string } }).device.name;
    await settled(broker);
    const before = looked;
    for (let i = 0; i < 3; i++) kernel.repeatEvent(persistent);
    await ask(broker, caller(1000), { op: 'list' });
    t.is(looked, before + 3);
  }));

// Found by an outside re-test: a member of the group a persistent tap was given to took a locked guest's MAC through
// it, and its owner's every device waited. Only the owner's taps given to a group wait then.
test('a tap given to a group that takes a locked guest\'s MAC: only its owner\'s taps given to a group wait', (t) =>
  onFakeKernel(async ({ broker, kernel, held }) => {
    const guest = await ask(broker, caller(2000), { op: 'create-tap', bridge: 'br0' });
    held.push(...guest.fds);
    const mac = (guest.reply as { device: { mac: string } }).device.mac;
    const given = await ask(broker, caller(1000), { op: 'create-tap', bridge: 'br0', persistent: true, group: 1000 });
    const name = (given.reply as { device: { name: string } }).device.name;
    await settled(broker);
    kernel.holderChanges(name, { address: Buffer.from(mac.split(':').map((h) => parseInt(h, 16))) });
    await ask(broker, caller(1000), { op: 'list' });
    await settled(broker);
    t.true(kernel.steps.includes(`detach ${name}`), 'the taker left its bridge');
    t.is(broker.lifetimes.forwarding.takerWaits(1000, false), 0, 'its owner\'s own devices do not wait');
    t.true(broker.lifetimes.forwarding.takerWaits(1000, true) > 0);
    const own = await ask(broker, caller(1000), { op: 'create-tap', bridge: 'br0' });
    held.push(...own.fds);
    t.is(own.reply.op, 'create-tap');
    const refused = await t.throwsAsync(ask(broker, caller(1000), { op: 'create-tap', bridge: 'br0', persistent: true,
      group: 1000 }));
    t.regex(refused!.message, /a tap you gave a group took the MAC of a guest whose port is locked; taps you give a group wait/);
  }, '[[rule]]\nname = "locked"\nusers = [2000]\nbridges = ["br0"]\nmac_lock = true\n\n'
    + '[[rule]]\nname = "grp"\nusers = [1000]\nbridges = ["br0"]\npersistent = true\n'));

// Found by an outside re-test: a lease taken back from its device's tag has no plug, and an Open vSwitch VLAN port's
// was followed as a Linux bridge's, so its device was deleted at a start (not a port of "its bridge").
test('only a Linux bridge\'s VLAN ports are followed; an Open vSwitch one (no plug once taken back from its tag) is not', (t) => {
  const kernel = new FakeKernel({} as never);
  kernel.addBridge('brv', { vlanFiltering: true });
  kernel.addDevice('ovsbr0', 'openvswitch');
  const lease = (parent: string, extra: Record<string, unknown> = {}) =>
    ({ kind: 'tap', plug: null, locked: false, vlan: 10, parent, ...extra }) as never;
  t.true(Forwarding.followed(lease('brv'), kernel));
  t.false(Forwarding.followed(lease('ovsbr0'), kernel));
  t.false(Forwarding.followed(lease('gone0'), kernel), 'a bridge that is not there: nothing to put back yet');
  t.true(Forwarding.followed(lease('br0', { vlan: null, locked: true }), kernel), 'a locked port, as before');
  t.false(Forwarding.followed(lease('brv', { kind: 'macvtap' }), kernel));
});

test('at a start, a VLAN port moved off its bridge and back while the broker was down gets its access VLAN again', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-handlers-'));
  const devNull = fs.openSync('/dev/null', 'w');
  let kernel: FakeKernel | undefined;
  // Two brokers, one after the other, on the same state directory and the same kernel.
  const make = () => new Broker({
    policy: parsePolicy(POLICY), stateDir: dir, audit: { journalSocket: null, fd: devNull, linux: null },
    kernel: (cleanup) => (kernel ??= new FakeKernel(cleanup)),
  });
  const first = make();
  const held: number[] = [];
  let second: Broker | undefined;
  try {
    host(kernel!);
    first.lifetimes.start();
    const got = await ask(first, caller(1000), { op: 'create-tap', network: 'vlan-net' });
    held.push(...got.fds);
    const name = (got.reply as { device: { name: string } }).device.name;
    await first.shutdown();
    kernel!.rootMoves(name, null);
    kernel!.rootMoves(name, 'brv');
    t.is(kernel!.vlans.get(kernel!.linkNamed(name)!.index), undefined, 'in the bridge\'s default VLAN meanwhile');
    second = make();
    second.lifetimes.start();
    t.is(kernel!.vlans.get(kernel!.linkNamed(name)!.index), 10);
  } finally {
    for (const fd of held) fs.closeSync(fd);
    await second?.shutdown();
    fs.closeSync(devNull);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a lease retired twice at once (a flood and a breach judged together) is deleted and recorded once', async (t) => {
  // Found by an outside code review: retire() ran again on a lease already out of the table: a second
  // deletion of its ifindex and a second `down` of its network.
  await onFakeKernel(async ({ broker, kernel, records, held }) => {
    const got = await ask(broker, caller(1000), tap());
    held.push(...got.fds);
    await settled(broker);
    const [lease] = broker.lifetimes.table.all();
    const steps = kernel.steps.length;
    const seen = records.length;
    const message = 'retired for the test';
    await Promise.all([1, 2].map(() => broker.lifetimes.retire(lease!, { op: 'cleanup', decision: 'cleanup', message })));
    await settled(broker);
    t.deepEqual(kernel.steps.slice(steps), [`deleteLink ${lease!.name}`]);
    t.is(records.slice(seen).filter((r) => r.message === message).length, 1);
  });
});

test('a release waiting behind other deletions leaves its device alone if root renamed it meanwhile', async (t) => {
  // Found by an outside review: the device was looked at when its deletion was queued, not when it ran; root
  // renamed it while other users' deletions ran ahead, and it was deleted by its index all the same.
  await onFakeKernel(async ({ broker, kernel, records }) => {
    const made: string[] = [];
    for (let i = 0; i < 3; i++) {
      const got = await ask(broker, caller(1000), tap({ bridge: 'br1', persistent: true }));
      if (got.reply.op === 'create-tap') made.push(got.reply.device.name);
    }
    await settled(broker);
    let open!: () => void;
    kernel.deletions = new Promise((r) => (open = r));
    // Two deletions take the reaper's two threads; the third waits for its turn.
    const first = made.slice(0, 2).map((name) => ask(broker, caller(1000), { op: 'release', name }));
    const third = ask(broker, caller(1000), { op: 'release', name: made[2] });
    await new Promise((r) => setImmediate(r));
    kernel.rootRenames(made[2]!, 'admin-kept');
    open();
    await Promise.all(first);
    const err = await third.then(() => null, (e: unknown) => e);
    t.is((err as TapbrokerError | null)?.code, 'TB_E_NO_SUCH_LEASE');
    await settled(broker);
    const kept = kernel.linkNamed('admin-kept');
    t.truthy(kept, 'the renamed device is still there');
    t.is(kept?.alias, null, 'its tag cleared: no later start takes it for an orphan of ours');
    t.false(kernel.steps.includes('deleteLink admin-kept'));
    t.true(records.some((r) => /the device is `admin-kept' \(tun\) now, no longer this lease's: left alone/.test(r.message ?? '')));
    t.false(records.some((r) => r.op === 'release' && r.decision === 'release' && (r.device as { name?: string }).name === made[2]));
  });
});

test('a connection whose held lease ended otherwise (a breach) is closed once idle, not kept for ever', async (t) => {
  // Found by an outside code review: a connection's held leases were never pruned when they ended by a breach,
  // a flood or root, so it was never idle: up to 64 connections per uid kept open for nothing.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-idle-'));
  const devNull = fs.openSync('/dev/null', 'w');
  let kernel!: FakeKernel;
  const broker = new Broker({
    // A macvtap: its lease is held by the connection (a tap's ends with its fds, not with the connection).
    policy: parsePolicy(`${POLICY}\n[[rule]]\nname = "root-nics"\nusers = [0]\nmacvtap = [{ parent = "eth0" }]\n`),
    // Long enough that a loaded machine's pause between the hello and the request does not idle it out first.
    stateDir: dir, idleTimeoutMs: 1500,
    audit: { journalSocket: null, fd: devNull },
    kernel: (cleanup) => (kernel = new FakeKernel(cleanup)),
  });
  const fds: number[] = [];
  let conn: SeqpacketConnection | null = null;
  try {
    host(kernel);
    conn = await helloed(broker, dir);
    await conn.send(encodeFrame({ op: 'create-macvtap', id: 2, parent: 'eth0' }));
    const got = (await conn.receive())!;
    fds.push(...got.fds);
    const reply = decodeReply(got.data);
    if (reply.op !== 'create-macvtap') throw new Error(JSON.stringify(reply));
    // Its holder breaks its terms (another MAC): the broker deletes the device and ends the lease.
    kernel.holderChanges(reply.device.name, { address: Buffer.from('525400cccccc', 'hex') });
    broker.lifetimes.catchUp();
    await settled(broker);
    t.is(kernel.linkNamed(reply.device.name), null, 'the device is deleted');
    const closed = await Promise.race([conn.receive().then((p) => p === null), quiet(6000, 'the idle timeout (1.5 s) passing').then(() => false)]);
    t.true(closed, 'the broker closed the idle connection');
  } finally {
    conn?.close();
    for (const fd of fds) fs.closeSync(fd);
    await broker.shutdown();
    fs.closeSync(devNull);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

// Found by an outside review: the bridge helper said hello as `tapbroker', and nothing in a record told its grants
// from `tapbroker run''s. The name is the client's own word: kept for the trail, printable ASCII only.
test('records after a hello carry the name the client gave itself, its control and non-ASCII bytes escaped', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-client-'));
  const records: AuditRecord[] = [];
  const devNull = fs.openSync('/dev/null', 'w');
  let kernel!: FakeKernel;
  const broker = new Broker({
    policy: parsePolicy(POLICY), stateDir: dir,
    audit: { journalSocket: null, fd: devNull, linux: { send: (r) => records.push(r), close: () => {} } },
    kernel: (cleanup) => (kernel = new FakeKernel(cleanup)),
  });
  const fds: number[] = [];
  const conns: SeqpacketConnection[] = [];
  try {
    host(kernel);
    const socket = path.join(dir, 'broker.sock');
    broker.start(SeqpacketListener.listen(socket, { mode: 0o600 }));
    for (const client of ['vm\x1b[2J\u202emanager', undefined]) {
      const conn = await SeqpacketConnection.connect(socket, { maxPacket: MAX_REPLY_BYTES });
      conns.push(conn);
      await conn.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION, ...(client ? { client } : {}) }));
      await conn.receive();
      await conn.send(encodeFrame({ op: 'create-tap', id: 2, bridge: 'br1' }));
      const got = (await conn.receive())!;
      fds.push(...got.fds);
      t.is(decodeReply(got.data).op, 'create-tap');
      // A second hello does not rename the connection's client (an outside re-test).
      await conn.send(encodeFrame({ op: 'hello', id: 3, version: PROTOCOL_VERSION, client: 'renamed' }));
      await conn.receive();
      await conn.send(encodeFrame({ op: 'create-tap', id: 4, bridge: 'br1' }));
      fds.push(...(await conn.receive())!.fds);
    }
    const grants = records.filter((r) => r.decision === 'grant');
    t.is(grants.length, 4);
    t.is(grants[0]!.client, 'vm\\x1b[2J\\xe2\\x80\\xaemanager');
    t.is(grants[1]!.client, 'vm\\x1b[2J\\xe2\\x80\\xaemanager', 'not renamed by a second hello');
    t.false('client' in grants[2]!, 'a hello without a name leaves the field out');
    t.false('client' in grants[3]!, 'and a later hello does not add one');
  } finally {
    for (const c of conns) c.close();
    for (const fd of fds) fs.closeSync(fd);
    await broker.shutdown();
    fs.closeSync(devNull);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

// Found by an outside review: status listed a user's allow rules with room in them, and said nothing of the deny
// that refused every request of that user: a script trusting status was misled.
test('status lists the deny rules that name the caller, with what each covers', (t) => onFakeKernel(async ({ broker }) => {
  const status = async (uid: number) => {
    const { reply } = await ask(broker, caller(uid), { op: 'status' });
    return reply as Extract<Reply, { op: 'status' }>;
  };
  const denied = await status(3000);
  t.deepEqual(denied.rules.map((r) => r.rule), ['everyone-br1']);
  t.deepEqual(denied.denies, [{ rule: 'no-br1-for-3000', covers: 'bridges br1' }]);
  t.deepEqual((await status(1000)).denies, [], 'no deny names uid 1000');
}));

test('the table covers every op and every outcome a create can have', (t) => {
  const ops = new Set(ROWS.map((r) => r.request['op']));
  for (const op of ['create-tap', 'create-macvtap', 'create', 'can', 'release', 'reload']) t.true(ops.has(op), op);
  const decisions = new Set(ROWS.flatMap((r) => r.audit.map((a) => a.decision)));
  for (const d of ['grant', 'deny', 'error', 'cleanup', 'dry-run', 'release']) t.true(decisions.has(d as never), d);
});

// Found by an outside re-test: the session charged a uid's share with what a handler ran before its first await,
// and a create awaits after its first NIC, so NICs 1-31 of a 32-NIC create were free (a loop of them stalled every
// user's grants for seconds). Here each NIC's kernel step takes 40 ms on the clock the share is counted on (moved
// by the modelled kernel); the request is dispatched directly, so no session charges any part of it.
test('every NIC of a create is charged to its caller\'s share of the broker, not only the first', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-share-'));
  const devNull = fs.openSync('/dev/null', 'w');
  let now = 1_000_000;
  let kernel!: FakeKernel;
  const broker = new Broker({
    policy: parsePolicy(POLICY), stateDir: dir, clock: () => now,
    audit: { journalSocket: null, fd: devNull },
    kernel: (cleanup) => (kernel = new FakeKernel(cleanup)),
  });
  const fds: number[] = [];
  try {
    host(kernel);
    broker.lifetimes.start();
    const createTap = kernel.createTap.bind(kernel);
    kernel.createTap = (req) => {
      now += 40;
      return createTap(req);
    };
    let charged = 0;
    const spent = broker.fairness.spent.bind(broker.fairness);
    broker.fairness.spent = (uid, ms) => {
      if (uid === 2000) charged += ms;
      spent(uid, ms);
    };
    const created = ask(broker, caller(2000), { op: 'create', nics: Array(8).fill({ kind: 'tap', bridge: 'br1' }) });
    // Past its share (250 ms) at NIC 7, the request waits for its next turn: the clock is moved on for it.
    const turned = setInterval(() => (now += 100), 5);
    const out = await created.finally(() => clearInterval(turned));
    fds.push(...out.fds);
    t.is(out.fds.length, 8);
    // NICs 1-7 (NIC 0 is the session's to charge): 280 ms at least.
    t.true(charged >= 7 * 40, `${charged} ms charged`);
  } finally {
    for (const fd of fds) fs.closeSync(fd);
    await broker.shutdown();
    fs.closeSync(devNull);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

// The same re-test: 32 NICs made in one go held every other request (root's too) behind them, for up to 3 s
// while another user's multiqueue taps died (each NIC then takes ~100 ms in the kernel). Between NICs the
// broker now serves the others: a callback queued after the request's first NIC runs before its second.
test('a multi-NIC create lets the broker serve others between its NICs', (t) => onFakeKernel(async ({ broker, held }) => {
  const order: string[] = [];
  const nics = Array(4).fill({ kind: 'tap', bridge: 'br1' });
  const created = ask(broker, caller(2000), { op: 'create', nics }).then((out) => {
    held.push(...out.fds);
    order.push('create');
  });
  setImmediate(() => order.push('another session'));
  await created;
  t.deepEqual(order, ['another session', 'create']);
}));

// Found by an outside review of the audit tools: the summary of a window of denials (past 20 per uid in 10 s) was
// written when the window ended, under the policy in force then: a reload in between made it claim denials under
// a policy that allows that uid. A reload now ends the window first.
test('a reload ends the window of refusals: their summary names the policy they were decided under', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-flush-'));
  fs.chmodSync(dir, 0o755);
  const file = path.join(dir, 'policy.toml');
  fs.writeFileSync(file, '[[rule]]\nname = "others"\nusers = [2000]\nbridges = ["br1"]\n', { mode: 0o644 });
  const records: AuditRecord[] = [];
  const devNull = fs.openSync('/dev/null', 'w');
  let kernel!: FakeKernel;
  const broker = new Broker({
    policy: loadTrustedPolicy(file), policyPath: file, stateDir: dir,
    audit: { journalSocket: null, fd: devNull, linux: { send: (r) => records.push(r), close: () => {} } },
    kernel: (cleanup) => (kernel = new FakeKernel(cleanup)),
  });
  try {
    host(kernel);
    broker.lifetimes.start();
    const before = broker.policy.sha256;
    for (let i = 0; i < 25; i++) {
      await t.throwsAsync(ask(broker, caller(3000), { op: 'create-tap', bridge: 'br1' }));
    }
    fs.writeFileSync(file, '[[rule]]\nname = "everyone"\nusers = ["*"]\nbridges = ["br1"]\n');
    const after = broker.reload(null).sha256;
    t.not(after, before);
    const summary = records.find((r) => r.decision === 'suppressed');
    t.truthy(summary, 'the window was ended by the reload');
    t.is(summary!.policy_sha256, before, 'under the policy the denials were decided by');
    t.deepEqual((summary!.request as { counts: unknown }).counts, { TB_E_POLICY_DENIED: 5 });
    const reload = records.findIndex((r) => r.op === 'reload');
    t.true(records.indexOf(summary!) < reload, 'before the reload\'s own record');
  } finally {
    await broker.shutdown();
    fs.closeSync(devNull);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

// Found by a CI run: a MAC the broker picked for a NIC could be one a live lease had (300 macvtaps in one request drew
// two alike now and then), and the whole request was refused as TB_E_MAC_IN_USE. A picked MAC is no lease's.
test('MACs the broker picks are no live lease\'s: 32 NICs from a prefix with 256 MACs are all granted', (t) =>
  onFakeKernel(async ({ broker, held }) => {
    for (let round = 0; round < 3; round++) {
      const got = await ask(broker, caller(5000), { op: 'create', nics: Array(32).fill({ kind: 'tap', bridge: 'br0' }) });
      held.push(...got.fds);
      if (got.reply.op !== 'create') throw new Error(JSON.stringify(got.reply));
    }
    const macs = broker.lifetimes.table.all().map((l) => l.mac);
    t.is(macs.length, 96);
    t.is(new Set(macs).size, 96, 'every one its own');
  }, '[[rule]]\nname = "few"\nusers = [5000]\nbridges = ["br0"]\nmac_prefix = "52:54:00:12:34"\nmax_devices = 100\n'));

// Found by an outside review: a MAC the broker picked for a NIC could be one a later NIC of the same request asked for
// (both granted on one bridge, or the request refused after NICs were made). 16 picks against 16 asked MACs of 256
// collide in about 65 % of requests without the fix; ten requests, each on a broker of its own.
test('MACs the broker picks are none a NIC of the same request asks for', async (t) => {
  const policy = '[[rule]]\nname = "few"\nusers = [5000]\nbridges = ["br0"]\nmac_prefix = "52:54:00:12:34"\n'
    + 'max_devices = 64\n';
  for (let round = 0; round < 10; round++) {
    await onFakeKernel(async ({ broker, held }) => {
      const asked = Array.from({ length: 16 }, (_, i) => `52:54:00:12:34:${(i * 16 + round).toString(16).padStart(2, '0')}`);
      const nics = [...Array(16).fill({ kind: 'tap', bridge: 'br0' }), ...asked.map((mac) => ({ kind: 'tap', bridge: 'br0', mac }))];
      const got = await ask(broker, caller(5000), { op: 'create', nics });
      held.push(...got.fds);
      if (got.reply.op !== 'create') throw new Error(JSON.stringify(got.reply));
      const macs = got.reply.devices.map((d) => d.mac);
      t.deepEqual(macs.slice(16), asked);
      t.is(new Set(macs).size, 32, `round ${round}: every one its own`);
    }, policy);
  }
});

// Found by an outside review: a create of one NIC refused without naming it (`nic`), as PROTOCOL.md says every
// refused NIC of a create is; its message stays as it is (a prefix `NIC 0:' says nothing there).
test('a create of one NIC refused names it as NIC 0', (t) => onFakeKernel(async ({ broker }) => {
  const err = await t.throwsAsync(ask(broker, caller(1000), { op: 'create', nics: [{ kind: 'tap', bridge: 'brX' }] }));
  t.like(err, { code: 'TB_E_POLICY_DENIED', nic: 0 });
  t.notRegex(err!.message, /^NIC/);
  const two = await t.throwsAsync(ask(broker, caller(1000), { op: 'create', nics: [{ kind: 'tap', bridge: 'br0' },
    { kind: 'tap', bridge: 'brX' }] }));
  t.like(two, { code: 'TB_E_POLICY_DENIED', nic: 1 });
  t.regex(two!.message, /^NIC 1: /);
  const single = await t.throwsAsync(ask(broker, caller(1000), { op: 'create-tap', bridge: 'brX' }));
  t.is((single as TapbrokerError).nic, undefined, 'create-tap has no NICs to name');
}));

// Found by an outside re-test: status told a caller of a deny on a bridge none of its rules gives (a denial would
// not), and a deny's names this host could not look up (other people's account names) were shown to callers.
test('status tells a deny only where the caller\'s rules give what it covers, and never the names it could not look up', (t) =>
  onFakeKernel(async ({ broker }) => {
    const { reply } = await ask(broker, { ...caller(5000), user: null }, { op: 'status' });
    if (reply.op !== 'status') throw new Error(JSON.stringify(reply));
    t.deepEqual(reply.denies.map((d) => d.rule), ['here', 'offboarded'], 'not the deny of a bridge no rule gives it');
    t.regex(reply.denies[1]!.covers, /a user this host cannot look up, so it matches every caller without an account name/);
    t.notRegex(JSON.stringify(reply), /jsmith/, 'no name from the deny');
  }, `[[rule]]\nname = "a"\nusers = [5000]\nbridges = ["br0"]\n
[[deny]]\nname = "elsewhere"\nusers = [5000]\nbridges = ["br9"]\n
[[deny]]\nname = "here"\nusers = [5000]\nbridges = ["br0"]\n
[[deny]]\nname = "offboarded"\nusers = ["no-such-user-jsmith"]\nbridges = ["br0"]\n`));

// Found by an outside review: a caller whose rule gives any bridge (`"*"`) was told of no deny, though a deny of
// everything refused it all, and a deny of a network on br0 refused its taps on br0 (as can and the broker said).
test('status tells a caller whose rule gives any bridge of the denies that refuse it', (t) =>
  onFakeKernel(async ({ broker }) => {
    const status = async (uid: number) => {
      const { reply } = await ask(broker, caller(uid), { op: 'status' });
      if (reply.op !== 'status') throw new Error(JSON.stringify(reply));
      return reply.denies;
    };
    t.deepEqual(await status(5000), [{ rule: 'suspended', covers: 'everything' }]);
    t.deepEqual(await status(5001), [{ rule: 'nolab', covers: 'the Linux bridge of a network it denies' }]);
    t.deepEqual(await status(5002), [], 'a network in another VLAN of br0 closes no untagged tap of it');
    t.deepEqual(await status(5003), [{ rule: 'nobr9', covers: 'bridges br9' }]);
    await t.throwsAsync(ask(broker, caller(5001), { op: 'create-tap', bridge: 'br0' }), { message: /denied by rule `nolab'/ });
    // The denial names the bridge the caller asked for itself.
    const can = await ask(broker, caller(5001), { op: 'can', kind: 'tap', parent: 'br0' });
    if (can.reply.op !== 'can' || can.reply.allow) throw new Error(JSON.stringify(can.reply));
    await ask(broker, caller(5002), { op: 'can', kind: 'tap', parent: 'br0' }).then(({ reply }) => {
      t.true(reply.op === 'can' && reply.allow, 'the deny of VLAN 10 leaves br0\'s untagged taps');
    });
  }, `[network.lab]\nbridge = "br0"\n[network.v10]\nbridge = "br0"\nvlan = 10\n
[[rule]]\nname = "any"\nusers = [5000, 5001, 5002, 5003]\nbridges = ["*"]\n
[[deny]]\nname = "suspended"\nusers = [5000]\n
[[deny]]\nname = "nolab"\nusers = [5001]\nnetworks = ["lab"]\n
[[deny]]\nname = "nov10"\nusers = [5002]\nnetworks = ["v10"]\n
[[deny]]\nname = "nobr9"\nusers = [5003]\nbridges = ["br9"]\n`));

// Found by an outside review: `can' copied a refusal's message and hint into its reply whole; a hint naming a rule's
// 300 bridges went past the reply's 1,024 characters, and the client refused the reply (TB_E_BAD_REPLY, exit 70)
// instead of telling the refusal (77). Bounded as an error's are.
test('can: a refusal with a long hint still makes a reply the client reads', async (t) => {
  const bridges = Array.from({ length: 300 }, (_, i) => `"lab-bridge-${String(i).padStart(3, '0')}"`).join(', ');
  await onFakeKernel(async ({ broker }) => {
    const { reply } = await ask(broker, caller(5000), { op: 'can', kind: 'tap', parent: 'br9' });
    if (reply.op !== 'can' || reply.allow) throw new Error(JSON.stringify(reply));
    t.is(reply.code, 'TB_E_POLICY_DENIED');
    t.true((reply.hint ?? '').length <= 1024 && (reply.hint ?? '').endsWith('…'), reply.hint);
    t.notThrows(() => decodeReplyLite(encodeReply(reply)));
  }, `[[rule]]\nname = "lab"\nusers = [5000]\nbridges = [${bridges}]\n`);
});

// Found by an outside long run: glibc keeps what a burst freed, so the broker's RSS stayed near 80 MB once idle (one
// malloc_trim gave back half). The broker gives it back on a timer (returnFreeMemory), which stops with it.
test('the broker gives freed memory back to the system on its timer, and stops at shutdown', async (t) => {
  let calls = 0;
  let atShutdown = -1;
  await onFakeKernel(async () => {
    // Timers run late on a loaded machine: waited for, up to 5 s.
    for (let waited = 0; calls < 2 && waited < 5000; waited += 25) await new Promise((r) => setTimeout(r, 25));
    t.true(calls >= 2, `${calls} calls at one every 50 ms`);
  }, POLICY, { returnMemoryMs: 50, returnMemory: () => void calls++ });
  atShutdown = calls;
  await new Promise((r) => setTimeout(r, 150));
  t.is(calls, atShutdown, 'none after shutdown');
});

// Found by an outside review: status had no bound. A deny of 300 bridges made a `covers` the client's shape refused
// (TB_E_BAD_REPLY), and 60 of them a reply the broker could not send (the connection closed, nothing logged), which
// also failed a run of more than 32 NICs (it asks for status between requests). Cut to fit, and said so.
test('status fits one reply whatever the policy, and says when it left something out', (t) => {
  const bridges = Array.from({ length: 300 }, (_, i) => `"tenant-${String(i).padStart(5, '0')}"`).join(', ');
  const denies = (n: number) => Array.from({ length: n }, (_, i) =>
    `[[deny]]\nname = "d${i}"\nusers = [5000]\nbridges = [${bridges}]\n`).join('\n');
  const rules = (n: number) => Array.from({ length: n }, (_, i) =>
    `[[rule]]\nname = "r${String(i).padStart(60, '0')}"\nusers = [5000]\nbridges = ["*"]\n`).join('\n');
  const statusUnder = (policy: string) => new Promise<Extract<Reply, { op: 'status' }>>((resolve, reject) => {
    onFakeKernel(async ({ broker }) => {
      const { reply } = await ask(broker, caller(5000), { op: 'status' });
      if (reply.op !== 'status') throw new Error(JSON.stringify(reply));
      resolve(reply);
    }, policy).catch(reject);
  });
  return (async () => {
    const one = await statusUnder(`${rules(1)}\n${denies(1)}`);
    t.is(one.denies.length, 1);
    t.true(one.denies[0]!.covers.length <= 4096, 'the client\'s shape takes 4,096 characters');
    t.regex(one.denies[0]!.covers, / … \(cut\)$/);
    t.is(one.truncated, true);
    t.notThrows(() => decodeReplyLite(encodeReply(one)), 'the client reads it');
    t.notThrows(() => decodeReply(encodeReply(one)));
    for (const policy of [`${rules(1)}\n${denies(60)}`, `${rules(2000)}\n${denies(1)}`]) {
      const big = await statusUnder(policy);
      t.true(encodeReply(big).length <= MAX_REPLY_BYTES, `${encodeReply(big).length} bytes`);
      t.is(big.truncated, true);
      t.notThrows(() => decodeReplyLite(encodeReply(big)));
    }
    const small = await statusUnder(`${rules(1)}\n[[deny]]\nname = "d"\nusers = [5000]\nbridges = ["br9"]\n`);
    t.is(small.truncated, undefined, 'nothing left out: not said');
  })();
});

// Found by an outside re-test: status (and a denial's hint) listed every network a deny covers, names no rule gave
// the caller (a denial of one of them says only `no rule matched`).
test('status tells of a deny only what the caller\'s own rules give', (t) =>
  onFakeKernel(async ({ broker }) => {
    const { reply } = await ask(broker, caller(5000), { op: 'status' });
    if (reply.op !== 'status') throw new Error(JSON.stringify(reply));
    t.deepEqual(reply.denies, [{ rule: 'freeze', covers: 'networks lab' }]);
    t.notRegex(JSON.stringify(reply), /prod-db-secret|br-hidden/);
  }, `[network.lab]\nbridge = "br0"\n[network.prod-db-secret]\nbridge = "br-hidden"\n
[[rule]]\nname = "a"\nusers = [5000]\nnetworks = ["lab"]\n
[[rule]]\nname = "b"\nusers = [5001]\nnetworks = ["prod-db-secret"]\n
[[deny]]\nname = "freeze"\nusers = [5000, 5001]\nnetworks = ["lab", "prod-db-secret"]\n`));

// Found by an outside re-test: reload's warnings (64 of up to 4,096 characters each) could outgrow a reply; the
// reload applied, and its client was told the broker had closed the connection. As many as fit are sent.
test('a reload whose warnings outgrow a reply sends as many as fit, and succeeds', async (t) => {
  const top = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-warn-'));
  let dir = top;
  // A policy path of ~3.6 KB: every warning names it.
  for (let i = 0; i < 18; i++) dir = path.join(dir, `${'d'.repeat(199)}`);
  fs.mkdirSync(dir, { recursive: true, mode: 0o755 });
  for (let d = dir; d.startsWith(top); d = path.dirname(d)) fs.chmodSync(d, 0o755);
  const file = path.join(dir, 'policy.toml');
  const rules = Array.from({ length: 70 }, (_, i) => `[[rule]]\nname = "r${i}"\nusers = ["no-such-user-${i}"]\nbridges = ["br1"]\n`);
  fs.writeFileSync(file, rules.join('\n'), { mode: 0o644 });
  const devNull = fs.openSync('/dev/null', 'w');
  const broker = new Broker({
    policy: loadTrustedPolicy(file), policyPath: file, stateDir: top, log: () => {},
    audit: { journalSocket: null, fd: devNull }, kernel: (cleanup) => new FakeKernel(cleanup),
  });
  try {
    broker.lifetimes.start();
    const { reply } = await ask(broker, { ...caller(0), groups: [] }, { op: 'reload' });
    if (reply.op !== 'reload') throw new Error(JSON.stringify(reply));
    t.true(encodeReply(reply).length <= MAX_REPLY_BYTES, 'the reply fits');
    t.true((reply.warnings?.length ?? 0) > 10 && reply.warnings!.length < 64, `${reply.warnings?.length} warnings sent`);
    t.regex(reply.warnings![0]!, /no user `no-such-user-0' on this host/);
  } finally {
    await broker.shutdown();
    fs.closeSync(devNull);
    fs.rmSync(top, { recursive: true, force: true });
  }
});

// Found by an outside re-test: between the NICs of a multi-NIC create the broker serves others, the caller's other
// connections too, which then took a name (or the quota) that request's pre-check had seen free: 31 NICs made and
// rolled back per loser, in a loop. A uid's multi-NIC request now runs alone among that uid's creates.
test('a uid\'s other creates wait for its multi-NIC request: they cannot take what its pre-check saw free', (t) =>
  onFakeKernel(async ({ broker, records, held }) => {
    const name = 'tb2000-race';
    const nics = [{ kind: 'tap', bridge: 'br1' }, { kind: 'tap', bridge: 'br1' }, { kind: 'tap', bridge: 'br1', name }];
    const batch = ask(broker, caller(2000), { op: 'create', nics });
    const single = ask(broker, caller(2000), { op: 'create-tap', bridge: 'br1', name });
    const [b, s] = await Promise.allSettled([batch, single]);
    if (b.status === 'fulfilled') held.push(...b.value.fds);
    if (s.status === 'fulfilled') held.push(...s.value.fds);
    t.is(b.status, 'fulfilled', 'the multi-NIC request got every NIC');
    t.is(s.status === 'rejected' ? (s.reason as TapbrokerError).code : null, 'TB_E_DEVICE_EXISTS', 'the other came after');
    await settled(broker);
    t.false(records.some((r) => /rolled back/.test(r.message ?? '')), 'nothing made and rolled back');
    // Another uid is not held up by it.
    const other = ask(broker, caller(1000), { op: 'create-tap', bridge: 'br0' });
    held.push(...(await other).fds);
  }));

// The idle timer could run before a request that came in while the broker was busy was read, and closed that
// connection unanswered (a loaded CI machine showed it in the idle test above). A connection with a request
// waiting is not idle. Serial: it blocks this process's event loop, which the concurrent tests' brokers share.
test.serial('a connection is not closed as idle while a request it sent waits to be read', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-busy-'));
  const devNull = fs.openSync('/dev/null', 'w');
  let kernel!: FakeKernel;
  const broker = new Broker({
    policy: parsePolicy(POLICY), stateDir: dir, idleTimeoutMs: 100,
    audit: { journalSocket: null, fd: devNull },
    kernel: (cleanup) => (kernel = new FakeKernel(cleanup)),
  });
  let conn: SeqpacketConnection | null = null;
  try {
    host(kernel);
    conn = await helloed(broker, dir);
    await conn.send(encodeFrame({ op: 'status', id: 2 }));
    // The broker is busy for longer than its idle timeout: its timer and the request are both due now.
    const until = performance.now() + 300;
    while (performance.now() < until);
    const got = await conn.receive();
    t.not(got, null, 'the connection was closed with its request unanswered');
    t.is(decodeReply(got!.data).op, 'status');
  } finally {
    conn?.close();
    await broker.shutdown();
    fs.closeSync(devNull);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

// Found by an outside re-test: a user made the bridge learn its last NIC's MAC mid-request (frames from its own
// tap), past the pre-check; each such request rolled back 31 NICs with a record each, ~4 times a second. Past 4
// rolled-back multi-NIC requests in 10 s, the uid's next ones wait.
test('a uid whose multi-NIC requests keep being rolled back waits before its next ones', (t) => onFakeKernel(
  async ({ broker, kernel, records }) => {
    let taps = 0;
    kernel.onStep = (point) => {
      if (point === 'tap:configured' && ++taps % 3 === 0) kernel.refuseAt = point;
    };
    const nics = Array(3).fill({ kind: 'tap', bridge: 'br1' });
    const codes: string[] = [];
    for (let i = 0; i < 6; i++) {
      codes.push(await ask(broker, caller(2000), { op: 'create', nics }).then(() => 'granted',
        (err: TapbrokerError) => err.code));
      await settled(broker);
    }
    t.deepEqual(codes, ['TB_E_KERNEL', 'TB_E_KERNEL', 'TB_E_KERNEL', 'TB_E_KERNEL', 'TB_E_KERNEL', 'TB_E_BUSY']);
    t.true(records.some((r) => r.code === 'TB_E_BUSY' && /refused after NICs were made too often/.test(r.message ?? '')));
    kernel.onStep = null;
    const one = await ask(broker, caller(2000), { op: 'create-tap', bridge: 'br1' });
    t.is(one.fds.length, 1, 'one NIC at a time is still served');
    for (const fd of one.fds) fs.closeSync(fd);
  }));
