// The hostile-input corpus: named attacks against one real broker in a fresh namespace, each sent by
// a real client (uid 65534 or 64000, both allowed by the policy, so requests get past the policy into
// the kernel steps; root only where noted). Every attack asserts the exact stable error code the client
// sees AND that nothing was left behind: no extra link, the broker's fd count back to its baseline, no
// lease but the ones the test holds on purpose, and the broker alive and answering a fresh hello.
// Tests under "found by this corpus" were bugs when written (audit EAGAIN, poll-callback exceptions,
// netlink overrun, quota race, over-long messages, pre-hello handling); they guard the fixes.
import anyTest, { type ExecutionContext, type TestFn } from 'ava';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { pack } from 'msgpackr';
import {
  MAX_REPLY_BYTES, MAX_REQUEST_BYTES, PROTOCOL_VERSION, SeqpacketConnection, decodeReply, encodeFrame,
  type Lease, type Packet, type Reply,
} from '@tapbroker/protocol';
import { BrokerProcess } from '../helpers/broker.js';
import { Netns } from '../helpers/netns.js';
import { Peer } from '../helpers/seqpeer.js';
import { NOBODY, OTHER_UID, probeOnce } from '../helpers/unpriv.js';
import { poll, quiet, steady, within } from '../helpers/wait.js';

const test = anyTest as TestFn;

const POLICY = `
[[rule]]
name = "corpus"
users = [${NOBODY}, ${OTHER_UID}]
bridges = ["br0"]
macvtap = [{ parent = "vparent" }]
persistent = true
max_devices = 4
max_queues = 4

# An administrator's mistakes, for uid ${NOBODY} only: names that are not bridges, and parents that
# cannot carry a macvtap. The policy lets these through; the broker's own kernel-side checks must not.
[[rule]]
name = "mistakes"
users = [${NOBODY}]
bridges = ["vparent", "lo", "ghost0"]
macvtap = [{ parent = "br0" }, { parent = "lo" }, { parent = "ghost0" }]
`;

/** The namespace's own links (besides lo). */
const BASE = ['br0', 'br1', 'vparent', 'vpeer'];
/** vparent's own address: inside the rule's MAC prefix, so a macvtap asking for it must be refused. */
const PARENT_MAC = '52:54:00:0f:0f:01';

let ns: Netns;
let broker: BrokerProcess;
let nobody: Peer;
let other: Peer;
let baseline = 0;
/** How much of the broker's stderr earlier tests have already checked. */
let stderrChecked = 0;

const sock = () => broker.socket;

test.before(async () => {
  ns = Netns.create('sec');
  ns.bridge('br0', { address: '192.0.2.1/24' });
  ns.bridge('br1');
  ns.ip('link', 'add', 'vparent', 'type', 'veth', 'peer', 'name', 'vpeer');
  ns.ip('link', 'set', 'vparent', 'address', PARENT_MAC);
  ns.ip('link', 'set', 'vparent', 'up');
  ns.ip('link', 'set', 'vpeer', 'up');
  broker = await BrokerProcess.start(ns, POLICY, { tag: 'sec' });
  nobody = Peer.start({ uid: NOBODY });
  other = Peer.start({ uid: OTHER_UID });
  // Warm up every path once (a tap, a macvtap, a persistent tap), so lazily opened resources are
  // part of the baseline, then take the baseline with nothing held.
  const w = await probeOnce({ socket: sock(), requests: [{ bridge: 'br0' }, { parent: 'vparent' }, { bridge: 'br0', persistent: true, name: `tb${NOBODY}-warm` }], release: [`tb${NOBODY}-warm`] });
  if (w.error) throw new Error(`warm-up failed: ${w.error.code} ${w.error.message}`);
  await poll(() => ns.extraLinks(BASE).length === 0, { ms: 3000 });
  baseline = await broker.settledFdCount();
  stderrChecked = broker.stderr.length;
});

test.after.always(async () => {
  await nobody?.stop();
  await other?.stop();
  await broker?.stop();
  ns?.destroy();
});

// ---------------------------------------------------------------- frames

const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ''), 'hex');
/** A msgpack string with the header asked for (fixstr when it fits, unless told otherwise). */
function str(s: string | Buffer, form: 'fix' | '8' | '16' | '32' = 'fix'): Buffer {
  const b = Buffer.isBuffer(s) ? s : Buffer.from(s, 'utf8');
  if (form === 'fix' && b.length < 32) return Buffer.concat([Buffer.from([0xa0 | b.length]), b]);
  if (form === 'fix' || form === '8') {
    if (b.length < 256) return Buffer.concat([Buffer.from([0xd9, b.length]), b]);
  }
  if (form !== '32' && b.length < 65536) {
    const h = Buffer.alloc(3);
    h[0] = 0xda;
    h.writeUInt16BE(b.length, 1);
    return Buffer.concat([h, b]);
  }
  const h = Buffer.alloc(5);
  h[0] = 0xdb;
  h.writeUInt32BE(b.length, 1);
  return Buffer.concat([h, b]);
}
/** A map from hand-encoded key and value bytes. */
function map(entries: Array<[Buffer | string, Buffer]>): Buffer {
  const n = entries.length;
  const head = n < 16 ? Buffer.from([0x80 | n]) : Buffer.from([0xde, n >> 8, n & 0xff]);
  return Buffer.concat([head, ...entries.flatMap(([k, v]) => [typeof k === 'string' ? str(k) : k, v])]);
}
const P = (v: unknown) => pack(v);
const HELLO = encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION });
const hello = (version: number, id = 1) => pack({ op: 'hello', id, version });
const CT = [['op', P('create-tap')], ['id', P(7)], ['bridge', P('br0')]] as Array<[string, Buffer]>;
/** A create-tap for br0 with these fields (as packed by msgpackr, so wrong types go through as they are). */
const ct = (fields: Record<string, unknown> = {}) => pack({ op: 'create-tap', id: 7, bridge: 'br0', ...fields });
const cm = (fields: Record<string, unknown> = {}) => pack({ op: 'create-macvtap', id: 8, parent: 'vparent', ...fields });

// ---------------------------------------------------------------- judging replies

interface Got {
  /** The error code, the reply's op, `closed`, or `timeout`; a reply the client rejects is TB_E_BAD_REPLY. */
  code: string;
  reply: Reply | null;
  message: string;
  fds: number;
}

function judge(r: { data: Buffer | null; fds: number; timedOut?: boolean }): Got {
  if (r.timedOut) return { code: 'timeout', reply: null, message: 'no reply in time', fds: 0 };
  if (!r.data) return { code: 'closed', reply: null, message: 'connection closed', fds: r.fds };
  try {
    const reply = decodeReply(r.data);
    return { code: reply.op === 'error' ? reply.code : reply.op, reply, message: reply.op === 'error' ? reply.message : '', fds: r.fds };
  } catch (err) {
    return { code: (err as { code?: string }).code ?? 'thrown', reply: null, message: (err as Error).message, fds: r.fds };
  }
}
const judgeLocal = (p: Packet | null): Got => judge(p ? { data: p.data, fds: p.fds.length } : { data: null, fds: 0 });

async function localConnect(socket = sock()): Promise<SeqpacketConnection> {
  return SeqpacketConnection.connect(socket, { maxPacket: MAX_REPLY_BYTES });
}

async function localExchange(conn: SeqpacketConnection, frame: Buffer): Promise<Got> {
  await conn.send(frame);
  const p = await conn.receive();
  for (const fd of p?.fds ?? []) fs.closeSync(fd);
  return judgeLocal(p);
}

async function helloed(peer: Peer): Promise<number> {
  const conn = await peer.connect(sock());
  const r = judge(await peer.exchange(conn, HELLO));
  if (r.code !== 'hello') throw new Error(`hello refused: ${r.code} ${r.message}`);
  return conn;
}

/** One request on a fresh helloed connection of `peer`, then the connection is closed. */
async function once(peer: Peer, frame: Buffer, opts: { hold?: boolean } = {}): Promise<Got> {
  const conn = await helloed(peer);
  try {
    return judge(await peer.exchange(conn, frame, opts));
  } finally {
    await peer.close(conn);
  }
}

// ---------------------------------------------------------------- nothing left behind

/**
 * The broker's lease table as root's `list` shows it (every lease: a tap its fds keep alive is in memory
 * only, not in the file).
 */
async function leaseNames(b: BrokerProcess = broker): Promise<string[]> {
  const c = await localConnect(b.socket);
  try {
    await localExchange(c, HELLO);
    const r = await localExchange(c, encodeFrame({ op: 'list', id: 2 }));
    if (r.reply?.op !== 'list') throw new Error(`list: ${r.code} ${r.message}`);
    return r.reply.leases.map((l) => l.name).sort();
  } finally {
    c.close();
  }
}
const extraLinks = () => ns.extraLinks(BASE).sort();
const same = (a: string[], b: string[]) => a.length === b.length && a.every((x, i) => x === b[i]);

/**
 * The broker is alive and answers a fresh hello; every link but `links` is gone; its fds are back to
 * the baseline; its lease table holds exactly `leases`; it logged no internal error.
 */
async function clean(t: ExecutionContext, held: { links?: string[]; leases?: string[]; connections?: number } = {}): Promise<void> {
  t.true(broker.alive, 'the broker is alive');
  const c = await localConnect();
  try {
    t.is((await localExchange(c, HELLO)).code, 'hello', 'the broker answers a fresh hello');
  } finally {
    c.close();
  }
  const links = [...(held.links ?? [])].sort();
  await poll(() => same(extraLinks(), links), { ms: 15_000 });
  t.deepEqual(extraLinks(), links, 'no link left behind');
  // Each open connection costs the broker two fds: the socket and the caller's pidfd.
  const fds = baseline + 2 * (held.connections ?? 0);
  // The broker's closer process goes (and its socket with it) after a second idle.
  await poll(() => broker.fdCount() === fds, { ms: 15_000 });
  t.is(broker.fdCount(), fds, 'the broker\'s fd count is back to its baseline');
  const leases = [...(held.leases ?? [])].sort();
  await poll(async () => same(await leaseNames(), leases), { ms: 2000 });
  const names = await leaseNames();
  if (!same(names, leases)) {
    for (const name of names.filter((n) => !leases.includes(n))) {
      t.log(`unexpected lease ${name}; device ${ns.link(name) ? 'present' : 'gone'}; its audit records:`);
      for (const r of broker.records.filter((x) => JSON.stringify(x).includes(name))) t.log(`  ${JSON.stringify(r)}`);
    }
  }
  t.deepEqual(names, leases, 'no lease but the ones held on purpose');
  const fresh = broker.stderr.slice(stderrChecked);
  stderrChecked = broker.stderr.length;
  t.notRegex(fresh, /internal error/, 'no internal error');
}

// ---------------------------------------------------------------- the attack macro

interface Attack {
  /** Who sends it (default uid 65534). */
  as?: 'nobody' | 'other';
  /** Say hello first (default true). */
  hello?: boolean;
  frame: Buffer;
  /** Copies of /dev/null to attach. */
  fds?: number;
  expect: string;
  /** The protocol closes the connection after this reply. */
  closes?: boolean;
}

const attack = test.macro({
  async exec(t, a: Attack) {
    const peer = a.as === 'other' ? other : nobody;
    const conn = a.hello === false ? await peer.connect(sock()) : await helloed(peer);
    try {
      // A send the kernel refuses (SO_PASSRIGHTS: EPERM for fds) is judged by its errno.
      const got = await peer.exchange(conn, a.frame, a.fds ? { fds: a.fds } : {}).then(judge, (err: Error & { code?: string }) => (
        { code: err.code ?? 'thrown', reply: null, message: err.message, fds: 0 }));
      t.is(got.code, a.expect, got.message);
      t.is(got.fds, 0, 'an error carries no fds');
      if (a.closes) t.is(judge(await peer.recv(conn, { timeoutMs: 2000 })).code, 'closed', 'then the connection closes');
      else t.is(judge(await peer.exchange(conn, HELLO, { timeoutMs: 2000 })).code, 'hello', 'the connection still answers');
    } finally {
      await peer.close(conn);
    }
    await clean(t);
  },
  title: (title = '') => title,
});

// ---------------------------------------------------------------- device names

const N = `tb${NOBODY}-`;
test.serial('name: 16 bytes', attack, { frame: ct({ name: `${N}abcdefgh` }), expect: 'TB_E_INVALID_NAME' });
test.serial('name: 17 bytes', attack, { frame: ct({ name: `${N}abcdefghi` }), expect: 'TB_E_INVALID_NAME' });
test.serial('name: 64 bytes', attack, { frame: ct({ name: N + 'a'.repeat(64 - N.length) }), expect: 'TB_E_INVALID_NAME' });
test.serial('name: 65 characters, over the schema bound', attack, { frame: ct({ name: N + 'a'.repeat(65 - N.length) }), expect: 'TB_E_INVALID_REQUEST' });
test.serial('name: 15 bytes with a multi-byte character', attack, { frame: ct({ name: `${N}abcdeé` }), expect: 'TB_E_INVALID_NAME' });
test.serial('name: a slash', attack, { frame: ct({ name: `${N}a/b` }), expect: 'TB_E_INVALID_NAME' });
test.serial('name: ..', attack, { frame: ct({ name: '..' }), expect: 'TB_E_INVALID_NAME' });
test.serial('name: .', attack, { frame: ct({ name: '.' }), expect: 'TB_E_INVALID_NAME' });
test.serial('name: a space', attack, { frame: ct({ name: `${N}a b` }), expect: 'TB_E_INVALID_NAME' });
test.serial('name: %d, the kernel\'s name template', attack, { frame: ct({ name: `${N}%d` }), expect: 'TB_E_INVALID_NAME' });
test.serial('name: %d for a macvtap (rtnetlink expands it too)', attack, { frame: cm({ name: `${N}%d` }), expect: 'TB_E_INVALID_NAME' });
test.serial('name: a newline', attack, { frame: ct({ name: `${N}a\n` }), expect: 'TB_E_INVALID_NAME' });
test.serial('name: a NUL byte (the kernel would stop reading there)', attack, { frame: ct({ name: `${N}a\0b` }), expect: 'TB_E_INVALID_NAME' });
test.serial('name: non-ASCII (tbé)', attack, { frame: ct({ name: 'tbé' }), expect: 'TB_E_INVALID_NAME' });
test.serial('name: an emoji', attack, { frame: ct({ name: `${N}\u{1F600}` }), expect: 'TB_E_INVALID_NAME' });
test.serial('name: invalid UTF-8 bytes', attack, { frame: map([...CT, ['name', str(Buffer.concat([Buffer.from(N), Buffer.from([0xff, 0xfe])]))]]), expect: 'TB_E_INVALID_NAME' });
test.serial('name: empty', attack, { frame: ct({ name: '' }), expect: 'TB_E_INVALID_NAME' });
test.serial('name: lo, a host device', attack, { frame: ct({ name: 'lo' }), expect: 'TB_E_INVALID_NAME' });
test.serial('name: br0, a host bridge', attack, { frame: ct({ name: 'br0' }), expect: 'TB_E_INVALID_NAME' });
test.serial('name: vparent, a host device, for a macvtap', attack, { frame: cm({ name: 'vparent' }), expect: 'TB_E_INVALID_NAME' });
test.serial('name: the prefix in upper case', attack, { frame: ct({ name: `TB${NOBODY}-x` }), expect: 'TB_E_INVALID_NAME' });
test.serial('name: another uid\'s prefix', attack, { frame: ct({ name: `tb${OTHER_UID}-x` }), expect: 'TB_E_INVALID_NAME' });
test.serial('name: the bare prefix', attack, { frame: ct({ name: N }), expect: 'TB_E_INVALID_NAME' });

// ---------------------------------------------------------------- bridges and parents

test.serial('bridge: 16 bytes', attack, { frame: ct({ bridge: 'br0123456789abcd' }), expect: 'TB_E_INVALID_NAME' });
test.serial('bridge: empty', attack, { frame: ct({ bridge: '' }), expect: 'TB_E_INVALID_NAME' });
test.serial('bridge: br0 followed by a NUL byte', attack, { frame: ct({ bridge: 'br0\0evil' }), expect: 'TB_E_INVALID_NAME' });
test.serial('bridge: br0 followed by a newline', attack, { frame: ct({ bridge: 'br0\n' }), expect: 'TB_E_INVALID_NAME' });
test.serial('bridge: vparent, a veth the policy lists as a bridge', attack, { frame: ct({ bridge: 'vparent' }), expect: 'TB_E_NOT_A_BRIDGE' });
test.serial('bridge: lo, which the policy lists as a bridge', attack, { frame: ct({ bridge: 'lo' }), expect: 'TB_E_NOT_A_BRIDGE' });
test.serial('bridge: ghost0, listed but absent', attack, { frame: ct({ bridge: 'ghost0' }), expect: 'TB_E_NO_SUCH_BRIDGE' });
test.serial('bridge: br1, a bridge the policy does not list', attack, { frame: ct({ bridge: 'br1' }), expect: 'TB_E_POLICY_DENIED' });
test.serial('bridge: vparent for a uid whose rule does not list it', attack, { as: 'other', frame: ct({ bridge: 'vparent' }), expect: 'TB_E_POLICY_DENIED' });
test.serial('macvtap parent: br0, a bridge (listed by mistake)', attack, { frame: cm({ parent: 'br0' }), expect: 'TB_E_BAD_PARENT' });
test.serial('macvtap parent: lo (listed by mistake)', attack, { frame: cm({ parent: 'lo' }), expect: 'TB_E_BAD_PARENT' });
test.serial('macvtap parent: ghost0, listed but absent', attack, { frame: cm({ parent: 'ghost0' }), expect: 'TB_E_NO_SUCH_PARENT' });
test.serial('macvtap parent: vpeer, not in the policy', attack, { frame: cm({ parent: 'vpeer' }), expect: 'TB_E_POLICY_DENIED' });
test.serial('macvtap mode: passthru where only bridge is allowed', attack, { frame: cm({ mode: 'passthru' }), expect: 'TB_E_POLICY_DENIED' });
test.serial('macvtap mode: one that does not exist', attack, { frame: cm({ mode: 'source' }), expect: 'TB_E_INVALID_REQUEST' });

// ---------------------------------------------------------------- MACs

for (const [what, mac] of [
  ['multicast', '01:00:5e:00:00:01'],
  ['multicast inside the prefix\'s first octets', '53:54:00:00:00:01'],
  ['all-zero', '00:00:00:00:00:00'],
  ['broadcast ff:ff:ff:ff:ff:ff', 'ff:ff:ff:ff:ff:ff'],
  ['upper-case', '52:54:00:AB:CD:EF'],
  ['outside the rule\'s prefix', '02:00:00:00:00:01'],
  ['too short', '52:54:00:12:34'],
  ['too long', '52:54:00:12:34:56:78'],
  ['with dashes', '52-54-00-12-34-56'],
  ['without separators', '525400123456'],
  ['with a trailing newline', '52:54:00:12:34:56\n'],
  ['not hex', '52:54:00:zz:34:56'],
  ['empty', ''],
] as const) {
  test.serial(`mac: ${what}`, attack, { frame: ct({ mac }), expect: 'TB_E_INVALID_MAC' });
}
test.serial('mac: a macvtap asking for the broadcast address', attack, { frame: cm({ mac: 'ff:ff:ff:ff:ff:ff' }), expect: 'TB_E_INVALID_MAC' });
test.serial('mac: a macvtap asking for its parent\'s own address', attack, { frame: cm({ mac: PARENT_MAC }), expect: 'TB_E_MAC_IN_USE' });

test.serial('mac: already in use on the parent by another user\'s macvtap (held), asked again', async (t) => {
  const mac = '52:54:00:aa:00:01';
  const holder = await helloed(other);
  try {
    const first = judge(await other.exchange(holder, cm({ mac }), { hold: true }));
    t.is(first.code, 'create-macvtap', first.message);
    const name = first.reply?.op === 'create-macvtap' ? first.reply.device.name : '';
    t.is(judge(await nobody.exchange(await helloed(nobody), cm({ mac }))).code, 'TB_E_MAC_IN_USE');
    t.is(judge(await other.exchange(await helloed(other), cm({ mac }))).code, 'TB_E_MAC_IN_USE', 'by its own owner too');
    await nobody.closeAll();
    // The holder's connection closes: its macvtap goes, and so does everything else.
    await other.closeAll();
    await clean(t);
    t.is(ns.link(name), undefined);
  } finally {
    await nobody.closeAll();
    await other.closeAll();
  }
});

// ---------------------------------------------------------------- queues

test.serial('queues: 0', attack, { frame: ct({ queues: 0 }), expect: 'TB_E_INVALID_QUEUES' });
test.serial('queues: -1', attack, { frame: ct({ queues: -1 }), expect: 'TB_E_INVALID_QUEUES' });
test.serial('queues: 127', attack, { frame: ct({ queues: 127 }), expect: 'TB_E_INVALID_QUEUES' });
test.serial('queues: 2^31', attack, { frame: ct({ queues: 2 ** 31 }), expect: 'TB_E_INVALID_QUEUES' });
test.serial('queues: -2^31', attack, { frame: ct({ queues: -(2 ** 31) }), expect: 'TB_E_INVALID_QUEUES' });
test.serial('queues: 2^53, not a safe integer', attack, { frame: ct({ queues: 2 ** 53 }), expect: 'TB_E_INVALID_REQUEST' });
test.serial('queues: 1.5', attack, { frame: ct({ queues: 1.5 }), expect: 'TB_E_INVALID_REQUEST' });
test.serial('queues: \'4\'', attack, { frame: ct({ queues: '4' }), expect: 'TB_E_INVALID_REQUEST' });
test.serial('queues: NaN', attack, { frame: ct({ queues: NaN }), expect: 'TB_E_INVALID_REQUEST' });
test.serial('queues: 5, over the rule\'s max_queues', attack, { frame: ct({ queues: 5 }), expect: 'TB_E_POLICY_DENIED' });
test.serial('queues: 0 for a macvtap', attack, { frame: cm({ queues: 0 }), expect: 'TB_E_INVALID_QUEUES' });

// ---------------------------------------------------------------- ops and fields

test.serial('op: exec', attack, { frame: pack({ op: 'exec', id: 3, cmd: '/bin/sh' }), expect: 'TB_E_UNKNOWN_OP' });
test.serial('op: __proto__', attack, { frame: pack({ op: '__proto__', id: 3 }), expect: 'TB_E_UNKNOWN_OP' });
test.serial('op: empty', attack, { frame: pack({ op: '', id: 3 }), expect: 'TB_E_UNKNOWN_OP' });
test.serial('op: constructor', attack, { frame: pack({ op: 'constructor', id: 3 }), expect: 'TB_E_UNKNOWN_OP' });
test.serial('op: HELLO in upper case', attack, { frame: pack({ op: 'HELLO', id: 3, version: 1 }), expect: 'TB_E_UNKNOWN_OP' });
test.serial('op: missing', attack, { frame: pack({ id: 3, bridge: 'br0' }), expect: 'TB_E_INVALID_REQUEST' });
test.serial('op: 4000 bytes long', attack, { frame: pack({ op: 'x'.repeat(4000), id: 3 }), expect: 'TB_E_UNKNOWN_OP' });
test.serial('field: uid', attack, { frame: ct({ uid: 0 }), expect: 'TB_E_INVALID_REQUEST' });
test.serial('field: mtu', attack, { frame: ct({ mtu: 65535 }), expect: 'TB_E_INVALID_REQUEST' });
test.serial('field: owner', attack, { frame: ct({ owner: 0 }), expect: 'TB_E_INVALID_REQUEST' });
test.serial('field: group on a macvtap', attack, { frame: cm({ group: 0 }), expect: 'TB_E_INVALID_REQUEST' });
test.serial('field: group without persistent', attack, { frame: ct({ group: NOBODY }), expect: 'TB_E_INVALID_REQUEST' });
test.serial('field: group the caller is not in', attack, { frame: ct({ persistent: true, group: 0 }), expect: 'TB_E_POLICY_DENIED' });
test.serial('field: persistent with vhost', attack, { frame: ct({ persistent: true, vhost: true }), expect: 'TB_E_INVALID_REQUEST' });
test.serial('field: vhost, which the rule does not allow', attack, { frame: ct({ vhost: true }), expect: 'TB_E_POLICY_DENIED' });
test.serial('field: op reload as a user', attack, { frame: pack({ op: 'reload', id: 3 }), expect: 'TB_E_POLICY_DENIED' });
test.serial('field: can with a bad name is an error, not an answer', attack, { frame: pack({ op: 'can', id: 3, kind: 'tap', parent: 'br0', name: 'a/b' }), expect: 'TB_E_INVALID_NAME' });

// A bug: the refusal's message lists every unknown field name in full, so a frame (within the 4 KiB cap)
// with long unknown keys gets a message over ErrorReply's 1024-character bound; the client's own
// decodeReply then rejects the broker's reply and reports TB_E_BAD_REPLY instead of the real code.
test.serial('field: many long unknown fields (the reply must still be a valid reply)', attack, {
  frame: ct(Object.fromEntries(Array.from({ length: 24 }, (_, i) => [`${'k'.repeat(100)}${i}`, 1]))),
  expect: 'TB_E_INVALID_REQUEST',
});

// Wrong types for every field of create-tap, each on its own connection.
const WRONG: Record<string, unknown[]> = {
  id: ['7', -1, 2 ** 32, 1.5, null, true, [], {}],
  bridge: [0, null, true, ['br0'], { name: 'br0' }, 1.5],
  queues: ['1', true, null, [1], {}, 1.5],
  vhost: [1, 0, 'true', null, []],
  vnet_hdr: [1, 'false', null, {}],
  // null is no wrong type: it says the hypervisor sets the guest's MAC (protocol version 2).
  mac: [0x525400123456, ['52:54:00:12:34:56'], true],
  name: [1, null, [`${N}x`], { name: `${N}x` }, false],
  persistent: [1, 'yes', null, []],
  group: [-1, '65534', null, 1.5, 2 ** 32 - 1, []],
};
for (const [field, values] of Object.entries(WRONG)) {
  test.serial(`wrong types for create-tap field \`${field}'`, async (t) => {
    for (const v of values) {
      const got = await once(nobody, ct({ ...(field === 'group' || field === 'persistent' ? { persistent: true } : {}), [field]: v }));
      t.is(got.code, 'TB_E_INVALID_REQUEST', `${field} = ${JSON.stringify(v)}: ${got.message}`);
      if (field === 'id' && got.reply?.op === 'error') t.is(got.reply.id, null, 'an id that is not an id is not echoed');
    }
    await clean(t);
  });
}
test.serial('wrong type for op: a number', attack, { frame: pack({ op: 1, id: 3, bridge: 'br0' }), expect: 'TB_E_INVALID_REQUEST' });
test.serial('wrong type for op: null', attack, { frame: pack({ op: null, id: 3, bridge: 'br0' }), expect: 'TB_E_INVALID_REQUEST' });
test.serial('wrong type for op: an array', attack, { frame: pack({ op: ['create-tap'], id: 3, bridge: 'br0' }), expect: 'TB_E_INVALID_REQUEST' });

// ---------------------------------------------------------------- msgpack structure

test.serial('duplicate key: op, hello then create-tap', attack, {
  frame: map([['op', P('hello')], ['id', P(1)], ['version', P(1)], ['op', P('create-tap')], ['bridge', P('br0')]]), expect: 'TB_E_MALFORMED',
});
test.serial('duplicate key: name, twice in a grantable create-tap', attack, { frame: map([...CT, ['name', P(`${N}a`)], ['name', P(`${N}b`)]]), expect: 'TB_E_MALFORMED' });
test.serial('duplicate key spelled with another string header (fixstr, str8, str16, str32)', attack, {
  frame: map([...CT, [str('bridge', '8'), P('br1')]]), expect: 'TB_E_MALFORMED',
});
test.serial('duplicate key hidden by invalid UTF-8 that decodes to the same text', attack, {
  frame: map([...CT, [str(Buffer.from([0x6e, 0xff])), P(1)], [str(Buffer.from([0x6e, 0xfe])), P(2)]]), expect: 'TB_E_MALFORMED',
});
// A bug: the refusal quotes the duplicated key in full; a 2000-byte key makes the message longer than
// the reply schema allows, and the client sees TB_E_BAD_REPLY instead of TB_E_MALFORMED.
test.serial('duplicate key of 2000 bytes (the reply must still be a valid reply)', attack, {
  frame: map([...CT, [str('k'.repeat(2000), '16'), P(1)], [str('k'.repeat(2000), '16'), P(2)]]), expect: 'TB_E_MALFORMED',
});
test.serial('reserved key: __proto__', attack, { frame: map([...CT, ['__proto__', map([['polluted', P(1)]])]]), expect: 'TB_E_MALFORMED' });
test.serial('reserved key: constructor', attack, { frame: map([...CT, ['constructor', map([['prototype', map([])]])]]), expect: 'TB_E_MALFORMED' });
test.serial('reserved key: __proto__ inside a nested map', attack, { frame: map([...CT, ['x', map([['__proto__', map([['polluted', P(1)]])]])]]), expect: 'TB_E_MALFORMED' });
test.serial('depth bomb: 2000 nested arrays', attack, { frame: map([...CT, ['x', Buffer.concat([Buffer.alloc(2000, 0x91), Buffer.from([0x90])])]]), expect: 'TB_E_MALFORMED' });
test.serial('depth bomb: 1000 nested maps', attack, { frame: map([...CT, ['x', Buffer.concat([Buffer.from('81a178'.repeat(1000), 'hex'), Buffer.from([0x80])])]]), expect: 'TB_E_MALFORMED' });
test.serial('depth: 4 levels pass the scanner and fail the schema', attack, { frame: map([...CT, ['name', hex('91 91 90')]]), expect: 'TB_E_INVALID_REQUEST' });
test.serial('depth: 5 levels are malformed', attack, { frame: map([...CT, ['name', hex('91 91 91 90')]]), expect: 'TB_E_MALFORMED' });
test.serial('an array claiming 2^32-1 elements', attack, { frame: map([...CT, ['x', hex('dd ffffffff 01')]]), expect: 'TB_E_MALFORMED' });
test.serial('a map claiming 2^32-1 entries', attack, { frame: hex('df ffffffff a2 6f 70'), expect: 'TB_E_MALFORMED' });
test.serial('a string claiming 4 GiB', attack, { frame: map([...CT, ['x', hex('db ffffffff 61')]]), expect: 'TB_E_MALFORMED' });
test.serial('reserved byte 0xc1', attack, { frame: map([...CT, ['x', hex('c1')]]), expect: 'TB_E_MALFORMED' });
test.serial('trailing bytes after the map', attack, { frame: Buffer.concat([ct(), hex('c0')]), expect: 'TB_E_MALFORMED' });
test.serial('two maps in one frame', attack, { frame: Buffer.concat([HELLO, ct()]), expect: 'TB_E_MALFORMED' });
test.serial('an empty map', attack, { frame: hex('80'), expect: 'TB_E_INVALID_REQUEST' });
test.serial('id 2^32-1 is echoed', async (t) => {
  const got = await once(nobody, pack({ op: 'hello', id: 2 ** 32 - 1, version: PROTOCOL_VERSION }));
  t.is(got.code, 'hello');
  t.is(got.reply?.id, 2 ** 32 - 1);
  await clean(t);
});
test.serial('top level: an array', attack, { frame: pack(['create-tap', 7, 'br0']), expect: 'TB_E_MALFORMED' });
test.serial('top level: nil', attack, { frame: hex('c0'), expect: 'TB_E_MALFORMED' });
for (const [what, bytes] of [
  ['fixext1', 'd4 01 00'], ['fixext2', 'd5 01 0000'], ['fixext4', 'd6 01 00000000'], ['fixext8', 'd7 01 0000000000000000'],
  ['fixext16', 'd8 01 00000000000000000000000000000000'], ['ext8', 'c7 03 01 616263'], ['ext16', 'c8 0003 01 616263'],
  ['ext32', 'c9 00000003 01 616263'], ['timestamp -1 (32-bit)', 'd6 ff 00000000'], ['timestamp -1 (64-bit)', 'd7 ff 0000000000000000'],
  ['timestamp -1 (96-bit)', 'c7 0c ff 000000000000000000000000'], ['msgpackr record 0x72', 'd4 72 00'],
  ['msgpackr structured clone 0x70', 'd4 70 00'], ['bin8', 'c4 03 627230'], ['bin16', 'c5 0003 627230'], ['bin32', 'c6 00000003 627230'],
] as const) {
  test.serial(`value type: ${what}`, attack, { frame: map([['op', P('create-tap')], ['id', P(7)], ['bridge', hex(bytes)]]), expect: 'TB_E_UNSUPPORTED_TYPE' });
}
for (const [what, bytes] of [['an integer', '01'], ['nil', 'c0'], ['binary', 'c4 02 6f70'], ['an extension', 'd4 01 00'], ['an array', '91 a2 6f70'], ['a map', '81 a1 61 01']] as const) {
  test.serial(`map key: ${what}`, attack, { frame: map([...CT, [hex(bytes), P(1)]]), expect: 'TB_E_UNSUPPORTED_TYPE' });
}

test.serial('truncated frames: a grantable create-tap cut at every length, each malformed, the connection still answering', async (t) => {
  const full = encodeFrame({ op: 'create-tap', id: 77, bridge: 'br0', queues: 2, vhost: false, vnet_hdr: true, mac: '52:54:00:12:34:56', name: `${N}cut`, persistent: false });
  const conn = await helloed(nobody);
  try {
    for (let n = 1; n < full.length; n++) {
      const got = judge(await nobody.exchange(conn, full.subarray(0, n)));
      if (got.code !== 'TB_E_MALFORMED') t.fail(`cut at ${n}/${full.length}: ${got.code} ${got.message}`);
      if (got.reply?.op === 'error' && got.reply.id !== null) t.fail(`cut at ${n}: an id was read from a truncated frame`);
      if (n % 8 === 0 && judge(await nobody.exchange(conn, HELLO)).code !== 'hello') t.fail(`no hello after the cut at ${n}`);
    }
    t.is(judge(await nobody.exchange(conn, HELLO)).code, 'hello');
    t.deepEqual(extraLinks(), [], 'no prefix was carried out');
  } finally {
    await nobody.close(conn);
  }
  await clean(t);
});

// ---------------------------------------------------------------- frame sizes

/** A hello frame of exactly `n` bytes (its `client` padded). */
function helloOfSize(n: number): Buffer {
  let pad = n - encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION, client: '' }).length;
  for (;;) {
    const f = pack({ op: 'hello', id: 1, version: PROTOCOL_VERSION, client: 'x'.repeat(Math.max(0, pad)) });
    if (f.length === n) return f;
    pad += n - f.length;
  }
}

test.serial('size: exactly 4096 bytes is read (and refused for its content, not its size)', attack, { frame: helloOfSize(MAX_REQUEST_BYTES), expect: 'TB_E_INVALID_REQUEST' });
for (const n of [4097, 65536, 200_000]) {
  test.serial(`size: ${n} bytes`, async (t) => {
    const conn = await helloed(nobody);
    try {
      let sent = true;
      try {
        await nobody.send(conn, helloOfSize(n));
      } catch (err) {
        // A SEQPACKET send bigger than the socket's send buffer fails on the client's side: not sent.
        t.regex((err as Error).message, /EMSGSIZE|ENOBUFS/);
        sent = false;
        t.log(`${n} bytes: not sent (${(err as Error).message})`);
      }
      if (sent) {
        const got = judge(await nobody.recv(conn));
        t.is(got.code, 'TB_E_FRAME_TOO_LARGE', got.message);
        t.is(got.reply?.op === 'error' ? got.reply.id : -1, null, 'the frame was not read, so no id');
      }
      t.is(judge(await nobody.exchange(conn, HELLO)).code, 'hello', 'the connection still answers');
    } finally {
      await nobody.close(conn);
    }
    await clean(t);
  });
}

test.serial('size: an empty frame ends the connection (the protocol has none), and nothing else', async (t) => {
  const conn = await helloed(nobody);
  try {
    await nobody.send(conn, Buffer.alloc(0));
    t.is(judge(await nobody.recv(conn, { timeoutMs: 2000 })).code, 'closed', 'the broker took it for the end of the connection');
  } finally {
    await nobody.close(conn);
  }
  await clean(t);
});
// The socket refuses fds (SO_PASSRIGHTS=0): the sender gets EPERM and the broker never sees them. The path
// kernels before 6.16 take (fds received, handed to the closer process) is test/security/foreign-fds.test.ts.
test.serial('size: an empty frame carrying fds', attack, { frame: Buffer.alloc(0), fds: 3, expect: 'EPERM' });

// ---------------------------------------------------------------- fds sent to the broker

for (const n of [1, 16, 200]) {
  test.serial(`fds: ${n} sent with a grantable create-tap are refused by the socket, and the request is not carried out`, attack, { frame: ct({ name: `${N}fds` }), fds: n, expect: 'EPERM' });
}
test.serial('fds: a granted tap\'s own queue fds sent back to the broker', async (t) => {
  const conn = await helloed(nobody);
  try {
    const got = judge(await nobody.exchange(conn, ct({ queues: 2 }), { hold: true }));
    t.is(got.code, 'create-tap', got.message);
    t.is(got.fds, 2);
    const name = got.reply?.op === 'create-tap' ? got.reply.device.name : '';
    t.truthy(ns.link(name));
    // The socket refuses them: they never reach the broker, and the tap lives on with the peer.
    await t.throwsAsync(nobody.exchange(conn, HELLO, { heldFrom: conn }), { message: /EPERM/ });
    t.is(judge(await nobody.exchange(conn, HELLO)).code, 'hello');
  } finally {
    await nobody.close(conn);
  }
  await clean(t);
});

// ---------------------------------------------------------------- handshake

test.serial('version: 0, from the past', attack, { hello: false, frame: hello(0), expect: 'TB_E_VERSION', closes: true });
test.serial('version: 1, the version before', attack, { hello: false, frame: hello(1), expect: 'TB_E_VERSION', closes: true });
test.serial('version: one from the future', attack, { hello: false, frame: hello(PROTOCOL_VERSION + 1), expect: 'TB_E_VERSION', closes: true });
test.serial('version: 2^32-1', attack, { hello: false, frame: hello(2 ** 32 - 1), expect: 'TB_E_VERSION', closes: true });
test.serial('version: -1', attack, { hello: false, frame: hello(-1), expect: 'TB_E_VERSION', closes: true });
test.serial('another version after a good hello', attack, { frame: hello(PROTOCOL_VERSION + 1), expect: 'TB_E_VERSION', closes: true });
test.serial('version: \'1\', a string', attack, { hello: false, frame: pack({ op: 'hello', id: 1, version: '1' }), expect: 'TB_E_INVALID_REQUEST', closes: true });
test.serial('before hello: a grantable create-tap', attack, { hello: false, frame: ct(), expect: 'TB_E_HELLO_REQUIRED', closes: true });
test.serial('before hello: list', attack, { hello: false, frame: pack({ op: 'list', id: 2 }), expect: 'TB_E_HELLO_REQUIRED', closes: true });
test.serial('before hello: release', attack, { hello: false, frame: pack({ op: 'release', id: 2, name: `${N}x` }), expect: 'TB_E_HELLO_REQUIRED', closes: true });
// PROTOCOL.md: "Anything else first gets TB_E_HELLO_REQUIRED and the connection closes." A first frame
// that fails to decode gets its decode error (fair: it cannot be told from a bad hello) but the
// connection stays open and keeps being served until the hello timeout.
test.serial('before hello: an unknown op gets an error and the connection closes', attack, { hello: false, frame: pack({ op: 'exec', id: 2 }), expect: 'TB_E_UNKNOWN_OP', closes: true });
test.serial('before hello: garbage gets an error and the connection closes', attack, { hello: false, frame: Buffer.from('GET / HTTP/1.1\r\n\r\n'), expect: 'TB_E_MALFORMED', closes: true });

// ---------------------------------------------------------------- other users' devices, and devices the broker did not make

/** A persistent tap of uid 64000's, made through the client library as the brief's probe does. */
async function victim(name: string): Promise<number> {
  const r = await probeOnce({ socket: sock(), requests: [{ bridge: 'br0', persistent: true, name }] }, { uid: OTHER_UID });
  if (r.error) throw new Error(`${r.error.code}: ${r.error.message}`);
  return r.taps[0]!.device.ifindex;
}

async function releaseAs(peer: Peer, name: string): Promise<Got> {
  return once(peer, pack({ op: 'release', id: 5, name }));
}

async function listAs(peer: Peer): Promise<Lease[]> {
  const got = await once(peer, pack({ op: 'list', id: 6 }));
  if (got.reply?.op !== 'list') throw new Error(`list: ${got.code} ${got.message}`);
  return got.reply.leases;
}

test.serial('another user\'s persistent tap: its name, asked for by uid 65534, for a tap and a macvtap', async (t) => {
  const name = `tb${OTHER_UID}-vic`;
  const ifindex = await victim(name);
  try {
    t.is((await once(nobody, ct({ name }))).code, 'TB_E_INVALID_NAME');
    t.is((await once(nobody, ct({ name, persistent: true }))).code, 'TB_E_INVALID_NAME');
    t.is((await once(nobody, cm({ name }))).code, 'TB_E_INVALID_NAME');
    const link = ns.link(name);
    t.is(link?.ifindex, ifindex, 'the device is untouched');
    t.is(link?.master, 'br0');
    await clean(t, { links: [name], leases: [name] });
  } finally {
    t.is((await releaseAs(other, name)).code, 'release');
  }
  await clean(t);
});

test.serial('another user\'s persistent tap: release by uid 65534 is TB_E_NO_SUCH_LEASE and the device stays', async (t) => {
  const name = `tb${OTHER_UID}-vic`;
  const ifindex = await victim(name);
  try {
    const got = await releaseAs(nobody, name);
    t.is(got.code, 'TB_E_NO_SUCH_LEASE');
    t.is(got.message, `you hold no persistent device named \`${name}'`, 'the same words as for a name nobody holds');
    t.is((await releaseAs(nobody, `tb${NOBODY}-nothere`)).message, `you hold no persistent device named \`tb${NOBODY}-nothere'`);
    t.is(ns.link(name)?.ifindex, ifindex, 'the device is still there');
    await clean(t, { links: [name], leases: [name] });
  } finally {
    t.is((await releaseAs(other, name)).code, 'release');
  }
  await clean(t);
});

test.serial('another user\'s persistent tap: list as uid 65534 does not show it; as its owner it does', async (t) => {
  const name = `tb${OTHER_UID}-vic`;
  await victim(name);
  try {
    t.deepEqual((await listAs(nobody)).map((l) => l.name), []);
    t.deepEqual((await listAs(other)).map((l) => l.name), [name]);
    await clean(t, { links: [name], leases: [name] });
  } finally {
    t.is((await releaseAs(other, name)).code, 'release');
  }
  await clean(t);
});

test.serial('own persistent tap: the same name again, as a tap and as a macvtap, is TB_E_DEVICE_EXISTS', async (t) => {
  const name = `tb${OTHER_UID}-mine`;
  const ifindex = await victim(name);
  try {
    t.is((await once(other, ct({ name }))).code, 'TB_E_DEVICE_EXISTS');
    t.is((await once(other, ct({ name, persistent: true }))).code, 'TB_E_DEVICE_EXISTS');
    t.is((await once(other, cm({ name }))).code, 'TB_E_DEVICE_EXISTS');
    t.is(ns.link(name)?.ifindex, ifindex);
    await clean(t, { links: [name], leases: [name] });
  } finally {
    t.is((await releaseAs(other, name)).code, 'release');
  }
  await clean(t);
});

test.serial('a root-made tap and veth inside the caller\'s prefix: never attached to, never released', async (t) => {
  const tap = `${N}rt`;
  const veth = `${N}ve`;
  ns.ip('tuntap', 'add', 'dev', tap, 'mode', 'tap', 'user', String(NOBODY));
  ns.ip('link', 'add', veth, 'type', 'veth', 'peer', 'name', `${N}ve2`);
  try {
    for (const name of [tap, veth]) {
      const before = ns.link(name)!;
      t.is((await once(nobody, ct({ name }))).code, 'TB_E_DEVICE_EXISTS', `create-tap ${name}`);
      t.is((await once(nobody, ct({ name, persistent: true }))).code, 'TB_E_DEVICE_EXISTS', `persistent create-tap ${name}`);
      t.is((await once(nobody, cm({ name }))).code, 'TB_E_DEVICE_EXISTS', `create-macvtap ${name}`);
      t.is((await releaseAs(nobody, name)).code, 'TB_E_NO_SUCH_LEASE', `release ${name}`);
      const after = ns.link(name)!;
      t.is(after?.ifindex, before.ifindex, `${name} is still there`);
      t.is(after.master, undefined, `${name} was not attached to a bridge`);
      t.deepEqual(after.flags, before.flags, `${name} was not brought up or changed`);
      t.is(after.address, before.address);
    }
    await clean(t, { links: [tap, veth, `${N}ve2`] });
  } finally {
    ns.ip('link', 'del', tap);
    ns.ip('link', 'del', veth);
  }
  await clean(t);
});

test.serial('release: a lease whose device was replaced by a same-named veth leaves the veth alone', async (t) => {
  const name = `tb${OTHER_UID}-repl`;
  const ifindex = await victim(name);
  ns.ip('link', 'del', name);
  ns.ip('link', 'add', name, 'type', 'veth', 'peer', 'name', `tb${OTHER_UID}-rp2`);
  try {
    t.is((await releaseAs(other, name)).code, 'TB_E_NO_SUCH_LEASE');
    t.not(ns.link(name)?.ifindex, ifindex);
    t.is(ns.link(name)?.linkinfo?.info_kind, 'veth', 'the veth is still there');
    await clean(t, { links: [name, `tb${OTHER_UID}-rp2`] });
  } finally {
    ns.ip('link', 'del', name);
  }
  await clean(t);
});

test.serial('release: names that are not names', async (t) => {
  for (const name of ['', '..', `${N}a/b`, `${N}%d`, 'x'.repeat(64), `${N}a\0`]) {
    t.is((await releaseAs(nobody, name)).code, 'TB_E_NO_SUCH_LEASE', JSON.stringify(name));
  }
  t.is((await releaseAs(nobody, 'lo')).code, 'TB_E_NO_SUCH_LEASE');
  t.is((await releaseAs(nobody, 'br0')).code, 'TB_E_NO_SUCH_LEASE');
  t.truthy(ns.link('br0'));
  await clean(t);
});

test.serial('release: one\'s own fd-passed tap and macvtap are not releasable (they end with their fds and holder)', async (t) => {
  const conn = await helloed(nobody);
  try {
    const tap = judge(await nobody.exchange(conn, ct(), { hold: true }));
    const mv = judge(await nobody.exchange(conn, cm()));
    t.is(tap.code, 'create-tap');
    t.is(mv.code, 'create-macvtap');
    const names = [tap, mv].map((g) => (g.reply?.op === 'create-tap' || g.reply?.op === 'create-macvtap' ? g.reply.device.name : ''));
    for (const name of names) t.is((await releaseAs(nobody, name)).code, 'TB_E_NO_SUCH_LEASE', name);
    await clean(t, { links: names, leases: names, connections: 1 });
  } finally {
    await nobody.close(conn);
  }
  await clean(t);
});

// ---------------------------------------------------------------- races

test.serial('race: 10 concurrent releases of one persistent tap: exactly one succeeds', async (t) => {
  const name = `tb${OTHER_UID}-race`;
  await victim(name);
  const conns = await Promise.all(Array.from({ length: 10 }, () => helloed(other)));
  try {
    const frame = pack({ op: 'release', id: 9, name });
    await Promise.all(conns.map((c) => other.send(c, frame)));
    const codes = (await Promise.all(conns.map(async (c) => judge(await other.recv(c)).code))).sort();
    t.deepEqual(codes, ['release', ...Array(9).fill('TB_E_NO_SUCH_LEASE')].sort());
  } finally {
    await other.closeAll();
  }
  t.is(ns.link(name), undefined, 'the device is gone');
  await clean(t);
});

test.serial('race: a create of the same name racing its release: the lease table and the kernel agree', async (t) => {
  const name = `tb${OTHER_UID}-rr`;
  const rounds = Number(process.env['TB_RACE_ROUNDS'] ?? 5);
  const outcomes: string[] = [];
  for (let round = 0; round < rounds; round++) {
    await victim(name);
    const [a, b] = [await helloed(other), await helloed(other)];
    try {
      await Promise.all([other.send(a, pack({ op: 'release', id: 1, name })), other.send(b, ct({ name, persistent: true }))]);
      const [ra, rb] = [judge(await other.recv(a)), judge(await other.recv(b))];
      outcomes.push(rb.code);
      t.is(ra.code, 'release', ra.message);
      t.true(['create-tap', 'TB_E_DEVICE_EXISTS'].includes(rb.code), `${rb.code}: ${rb.message}`);
      await other.closeAll();
      if (rb.code === 'create-tap') {
        const dev = rb.reply?.op === 'create-tap' ? rb.reply.device : null;
        await clean(t, { links: [name], leases: [name] });
        t.is(ns.link(name)?.ifindex, dev?.ifindex, 'the new device is the new lease\'s');
        t.is((await releaseAs(other, name)).code, 'release');
      }
    } finally {
      await other.closeAll();
    }
    await clean(t);
  }
  t.log(`create outcomes: ${outcomes.join(' ')}`);
});

test.serial('quota: a fifth device is TB_E_QUOTA_EXCEEDED', async (t) => {
  const names = [0, 1, 2, 3].map((i) => `tb${OTHER_UID}-q${i}`);
  try {
    for (const name of names) t.is((await once(other, ct({ name, persistent: true }))).code, 'create-tap');
    t.is((await once(other, ct({ persistent: true }))).code, 'TB_E_QUOTA_EXCEEDED');
    t.is((await once(other, ct())).code, 'TB_E_QUOTA_EXCEEDED', 'fd-passed devices count against the same quota');
    t.is((await once(other, cm())).code, 'TB_E_QUOTA_EXCEEDED', 'and macvtaps');
    t.is((await once(nobody, ct())).code, 'create-tap', 'another user\'s quota is their own');
    await clean(t, { links: names, leases: names });
  } finally {
    for (const name of names) await releaseAs(other, name);
  }
  await clean(t);
});

test.serial('disconnect mid-request: a create-tap whose client is gone before the reply leaves nothing', async (t) => {
  for (let i = 0; i < 10; i++) {
    const conn = await helloed(nobody);
    await nobody.send(conn, ct());
    if (i % 2) await quiet(i, 'jitter: the close lands at another moment of the create');
    await nobody.close(conn);
  }
  await clean(t);
});

test.serial('disconnect mid-request: a create-macvtap whose client is gone before the reply leaves nothing', async (t) => {
  for (let i = 0; i < 10; i++) {
    const conn = await helloed(nobody);
    await nobody.send(conn, cm());
    if (i % 2) await quiet(i, 'jitter: the close lands at another moment of the create');
    await nobody.close(conn);
  }
  await clean(t);
});

// ---------------------------------------------------------------- load and abandonment

// The creates here are refused by the schema (a `uid' field: asking to be someone else), which is not
// audited. Refusals by the policy are audited, and 5,000 audit lines in a burst overrun a slow reader of
// the broker's stderr: that case is its own test below (a bug).
test.serial('10,000 requests on one connection, pipelined: every one answered, in order', async (t) => {
  const conn = await localConnect();
  t.is((await localExchange(conn, HELLO)).code, 'hello');
  const total = 10_000;
  const window = 256;
  const frameFor = (id: number) => (id % 2 ? encodeFrame({ op: 'hello', id, version: PROTOCOL_VERSION }) : pack({ op: 'create-tap', id, bridge: 'br0', uid: 0 }));
  let sent = 0;
  let received = 0;
  let bad = 0;
  const sends: Array<Promise<void>> = [];
  const pump = () => {
    while (sent < total && sends.length - received < window) sends.push(conn.send(frameFor(sent++)).catch((err: Error) => { t.fail(`send: ${err.message}`); }));
  };
  const started = Date.now();
  try {
    pump();
    while (received < total) {
      const got = judgeLocal(await conn.receive());
      const want = received % 2 ? 'hello' : 'TB_E_INVALID_REQUEST';
      const id = got.reply?.id;
      if (got.code !== want || id !== received) {
        if (bad++ < 5) t.fail(`reply ${received}: ${got.code} id ${id} (${got.message})`);
      }
      received++;
      pump();
    }
    await Promise.all(sends);
  } finally {
    conn.close();
  }
  t.log(`${total} requests in ${Date.now() - started} ms`);
  t.is(bad, 0);
  await clean(t);
});

test.serial('a client that never reads its replies holds up nobody else', async (t) => {
  const greedy = await localConnect();
  const sends: Array<Promise<void>> = [];
  let sent = 0;
  for (let i = 0; i < 20_000; i++) sends.push(greedy.send(encodeFrame({ op: 'hello', id: i, version: PROTOCOL_VERSION })).then(() => { sent++; }, () => {}));
  // The broker answers until its replies fill the greedy client's socket, then stops reading from it; the
  // client's sends stall. Only then does the polite client come.
  await steady(() => sent, { ms: 10_000, what: 'the greedy client\'s sends' });
  t.log(`the greedy client's sends stalled after ${sent} of 20000`);
  const polite = await localConnect();
  const started = Date.now();
  t.is((await localExchange(polite, HELLO)).code, 'hello');
  t.true(Date.now() - started < 1000, `another client waited ${Date.now() - started} ms`);
  t.is(judge(await nobody.exchange(await helloed(nobody), ct())).code, 'create-tap', 'and a grant still happens');
  await nobody.closeAll();
  polite.close();
  greedy.close();
  await Promise.all(sends);
  await clean(t);
});

/** Connections waiting in the broker's listening socket's queue, not accepted yet (its Recv-Q, as ss shows it). */
function acceptQueue(): number {
  const out = execFileSync('ip', ['netns', 'exec', ns.name, 'ss', '-xlnH'], { encoding: 'utf8' });
  const line = out.split('\n').find((l) => l.includes(broker.socket));
  return line ? Number(line.trim().split(/\s+/)[2]) : -1;
}

test.serial('200 connections opened at once and abandoned (silent, mid-hello, mid-frame)', async (t) => {
  const conns = await Promise.all(Array.from({ length: 200 }, () => localConnect()));
  try {
    const half = ct().subarray(0, 5);
    await Promise.all(conns.map((c, i) => (i % 3 === 0 ? c.send(HELLO) : i % 3 === 1 ? c.send(half) : Promise.resolve())));
    // Every one accepted: none left in the listening socket's queue. (An fd count of the broker said it less well: the
    // silent third goes at its hello timeout, and on a loaded machine that came before the last were accepted.)
    await poll(() => acceptQueue() === 0, { ms: 15_000 });
    t.is(acceptQueue(), 0, 'the broker accepted them all');
  } finally {
    // Closed whatever failed above (an outside review: a failed check left 200 open, and the next tests' fd counts
    // failed for the minute the broker gives a connection that said hello).
    for (const c of conns) c.close();
  }
  await clean(t);
});

test.serial('one uid cannot take every connection: the 65th of uid 65534 is TB_E_BUSY, and uid 64000 is still served', async (t) => {
  try {
    const conns = await nobody.connectMany(sock(), 70);
    const got = await Promise.all(conns.map(async (c) => judge(await nobody.recv(c, { timeoutMs: 500 })).code));
    t.deepEqual(got.filter((c) => c !== 'timeout'), Array(6).fill('TB_E_BUSY'), 'the six over the cap are refused');
    t.deepEqual(got.slice(0, 64), Array(64).fill('timeout'), 'the first 64 are accepted and waiting for hello');
    t.is((await once(other, ct())).code, 'create-tap', 'another uid is served meanwhile');
  } finally {
    await nobody.closeAll();
  }
  await clean(t);
});

test.serial('a client that connects and never speaks gets TB_E_TIMEOUT and is closed (broker with -T 300)', async (t) => {
  const quick = await BrokerProcess.start(ns, `[[rule]]\nname = "x"\nusers = [${NOBODY}]\nbridges = ["br0"]\n`, { tag: 'quiet', args: ['-T', '300', '--journal-socket', ''] });
  try {
    const base = await quick.settledFdCount();
    const silent = await localConnect(quick.socket);
    const chatty = await localConnect(quick.socket);
    const started = Date.now();
    // Garbage does not stand for a hello: refused, and before hello that ends the connection.
    t.is((await localExchange(chatty, Buffer.from('garbage'))).code, 'TB_E_MALFORMED');
    t.is(judgeLocal(await chatty.receive()).code, 'closed');
    const s = judgeLocal(await silent.receive());
    t.is(s.code, 'TB_E_TIMEOUT');
    t.is(s.reply?.id, null);
    t.true(Date.now() - started >= 250, 'not before the timeout');
    t.is(judgeLocal(await silent.receive()).code, 'closed');
    silent.close();
    chatty.close();
    const q = await localConnect(quick.socket);
    t.is((await localExchange(q, HELLO)).code, 'hello', 'the quick broker still serves');
    q.close();
    await poll(() => quick.fdCount() === base, { ms: 2000 });
    t.is(quick.fdCount(), base, 'the quick broker\'s fds are back to its baseline');
    t.true(quick.alive);
  } finally {
    await quick.stop();
  }
  await clean(t);
});

// A bug (since create became async for named networks, commit 3569122): Broker.create() decides — quota
// included — and then awaits resolveTarget() before the device is made and its lease added. Requests on
// other connections are decided in that gap, all against the same count: 10 concurrent creates from one
// uid with max_devices = 4 all succeed. (Sequential creates are refused correctly: "quota: a fifth device".)
// Last of the main broker's tests: the burst of link events of 10 creates can overrun the broker's
// rtnetlink socket and blind it for good (the bug tested at the end), which later tests would trip over.
test.serial('quota race: 10 concurrent persistent creates with room for 4', async (t) => {
  const conns = await Promise.all(Array.from({ length: 10 }, () => helloed(other)));
  let made: string[] = [];
  try {
    await Promise.all(conns.map((c) => other.send(c, ct({ persistent: true }))));
    const got = await Promise.all(conns.map(async (c) => judge(await other.recv(c))));
    made = got.flatMap((g) => (g.reply?.op === 'create-tap' ? [g.reply.device.name] : []));
    t.deepEqual(got.map((g) => g.code).sort(), [...Array(4).fill('create-tap'), ...Array(6).fill('TB_E_QUOTA_EXCEEDED')].sort());
    await other.closeAll();
    await clean(t, { links: made, leases: made });
  } finally {
    await other.closeAll();
    for (const name of made) await releaseAs(other, name);
  }
  await clean(t);
});

test.serial('the broker\'s own log, over the whole corpus: no error, warning or stack trace', (t) => {
  const lines = broker.stderr.split('\n').filter((l) => l && !l.startsWith('{"audit":'));
  t.log(lines.slice(0, 40).join('\n'));
  t.deepEqual(lines.filter((l) => /error|warning|exception|EAGAIN|^\s+at /i.test(l)), []);
  t.true(broker.alive);
});

// A bug: the broker writes each audit record with a synchronous write(2) to its stderr, which Node has
// made non-blocking. When whoever reads that stderr falls behind (a slow log collector; here the test
// simply stops reading it), the write fails with EAGAIN and the broker turns it into TB_E_INTERNAL:
//  - every refusal from then on is TB_E_INTERNAL instead of its code (any user can bring this about by
//    sending refused requests faster than the log is drained);
//  - a grant fails *after* the device was made and leased: the client gets TB_E_INTERNAL and no fds,
//    while the broker keeps the tap's fds open (leaked), so the tap, its lease and its quota charge
//    stay until the broker restarts — contrary to "TB_E_INTERNAL: nothing was left behind".
// Its own namespace and broker, so what it leaves behind cannot disturb the rest of the corpus.
test.serial('audit backpressure: refusals and a grant while the broker\'s stderr is not being read', async (t) => {
  const ns2 = Netns.create('secbp');
  ns2.bridge('br0');
  const b = await BrokerProcess.start(ns2, `[[rule]]\nname = "bp"\nusers = [${NOBODY}]\nbridges = ["br0"]\n`, { tag: 'secbp' });
  const base = await b.settledFdCount();
  const c = await localConnect(b.socket);
  try {
    t.is((await localExchange(c, HELLO)).code, 'hello');
    b.proc.stderr!.pause();
    const codes = new Map<string, number>();
    for (let id = 0; id < 300; id++) {
      const code = (await localExchange(c, encodeFrame({ op: 'create-tap', id, bridge: 'br0' }))).code;
      codes.set(code, (codes.get(code) ?? 0) + 1);
    }
    t.deepEqual([...codes], [['TB_E_POLICY_DENIED', 300]], 'every refusal keeps its code');
    const conn = await nobody.connect(b.socket);
    t.is(judge(await nobody.exchange(conn, HELLO)).code, 'hello');
    const grant = judge(await nobody.exchange(conn, ct()));
    await nobody.close(conn);
    b.proc.stderr!.resume();
    t.is(grant.code, 'create-tap', grant.message);
    c.close();
    await poll(() => ns2.extraLinks(['br0']).length === 0 && b.fdCount() === base, { ms: 2000 });
    t.deepEqual(ns2.extraLinks(['br0']), [], 'no link left behind');
    t.is(b.fdCount(), base, 'no fd leaked');
    t.deepEqual(await leaseNames(b), [], 'no lease left behind');
    t.true(b.alive);
  } finally {
    b.proc.stderr!.resume();
    c.close();
    await b.stop();
    ns2.destroy();
  }
});

/** A second broker in a namespace of its own, for a test that may leave it broken. */
async function isolated(tag: string, policy: string, start: { linkEventQueue?: number } = {}): Promise<{ ns2: Netns; b: BrokerProcess; done: () => Promise<void> }> {
  const ns2 = Netns.create(tag);
  ns2.bridge('br0');
  const b = await BrokerProcess.start(ns2, policy, { tag, ...start });
  return {
    ns2, b,
    done: async () => {
      try { process.kill(b.proc.pid!, 'SIGCONT'); } catch { /* gone */ }
      b.proc.stderr!.resume();
      await b.stop('SIGKILL');
      ns2.destroy();
    },
  };
}

async function helloWithin(socket: string, ms: number): Promise<string> {
  const c = await localConnect(socket);
  try {
    await c.send(HELLO);
    const p = await within(c.receive(), ms);
    return p === 'timeout' ? 'timeout' : judgeLocal(p).code;
  } finally {
    c.close();
  }
}

// A bug: the broker follows RTNLGRP_LINK with a poll handle on a netlink socket. When more link events
// arrive than the socket holds (any burst: a host creating many interfaces, or a user's concurrent
// creates), the kernel sets ENOBUFS on the socket, epoll reports POLLERR, and libuv *stops* the poll
// handle and reports UV_EBADF — which watchReadable() ignores. The monitor never reads again: leases of
// devices that vanish are never dropped, no cleanup is audited, named networks are never unplugged,
// and leases.json keeps growing. (The code meant for this, onOverrun → resync, is never reached.)
// Reproduced deterministically by stopping the broker (SIGSTOP) during a burst of 300 veth pairs.
test.serial('rtnetlink overrun: a burst of host link events does not blind the broker to devices vanishing', async (t) => {
  // The kernel's queue of link events for this broker is made small (64 KiB, not 4 MiB), so the burst below
  // overruns it for real: events are lost, and the broker must notice and check its leases against a dump.
  const { ns2, b, done } = await isolated('secovr', `[[rule]]\nname = "o"\nusers = [${NOBODY}]\nbridges = ["br0"]\n`,
    { linkEventQueue: 64 * 1024 });
  try {
    // A lease live through the burst: its tap must still be there, and still leased, afterwards.
    const holder = await nobody.connect(b.socket);
    t.is(judge(await nobody.exchange(holder, HELLO)).code, 'hello');
    const kept = judge(await nobody.exchange(holder, ct(), { hold: true }));
    t.is(kept.code, 'create-tap', kept.message);
    const keptName = kept.reply?.op === 'create-tap' ? kept.reply.device.name : '';
    process.kill(b.proc.pid!, 'SIGSTOP');
    const adds = Array.from({ length: 300 }, (_, i) => `link add ovr${i} type veth peer name ovp${i}`);
    const dels = Array.from({ length: 300 }, (_, i) => `link del ovr${i}`);
    execFileSync('ip', ['-n', ns2.name, '-batch', '-'], { input: `${[...adds, ...dels].join('\n')}\n` });
    process.kill(b.proc.pid!, 'SIGCONT');
    // Every event of the burst (and the overrun, if the kernel had to drop some) is queued by now: wait
    // until the broker has read them all, as its own loop does, before anything asks it for a device.
    await b.waitFor(() => b.linkEventsUnread() === 0, 5000, 'the broker did not read the burst of link events');
    const netlink = execFileSync('ip', ['netns', 'exec', ns2.name, 'cat', '/proc/net/netlink'], { encoding: 'utf8' });
    const mine = netlink.split('\n').filter((l) => / 00000001 /.test(l));
    t.log(`the broker's RTNLGRP_LINK socket after the burst (sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode):\n${mine.join('\n')}`);
    t.true(mine.some((l) => Number(l.trim().split(/\s+/)[8]) > 0), 'the kernel dropped events: the burst overran the queue');
    await b.waitFor(() => /link events were lost .* leases checked against a fresh list/.test(b.stderr), 3000,
      'the broker did not resynchronise after the overrun');
    t.truthy(ns2.link(keptName), 'the lease live through the burst still has its tap');
    t.true((await leaseNames(b)).includes(keptName), 'and is still leased');
    await nobody.close(holder);
    const conn = await nobody.connect(b.socket);
    t.is(judge(await nobody.exchange(conn, HELLO)).code, 'hello');
    const got = judge(await nobody.exchange(conn, ct()));
    t.is(got.code, 'create-tap', got.message);
    const name = got.reply?.op === 'create-tap' ? got.reply.device.name : '';
    await nobody.close(conn); // its fds close: the tap vanishes
    await poll(async () => !ns2.link(name) && (await leaseNames(b)).length === 0, { ms: 3000 });
    t.is(ns2.link(name), undefined, 'the tap is gone');
    t.deepEqual(await leaseNames(b), [], 'and so is its lease');
    // stderr is written asynchronously, after the lease table: wait for the record itself.
    const audited = () => b.records.some((r) => r.decision === 'cleanup' && (r.device as { name?: string } | undefined)?.name === name);
    await poll(audited, { ms: 3000 });
    t.true(audited(), 'the cleanup is audited');
  } finally {
    await done();
  }
});

// A bug, with the audit one above: when a leased device vanishes while the broker's stderr is full, the
// audit write in the link monitor's callback throws EAGAIN *inside a koffi poll callback*. koffi leaves
// the exception pending in N-API: from then on the broker answers nobody (every callback into JS fails),
// and at a later garbage collection V8 aborts the process (SIGTRAP, "Check failed:
// AllowJavascriptExecution::IsAllowed") — seen here after ~100 s. Any exception escaping watchReadable's
// callers (LinkMonitor, holder pidfd watches) would do the same, e.g. a lease-table write failing (ENOSPC).
test.serial('audit backpressure: a leased tap vanishing while the broker\'s stderr is not being read does not wedge the broker', async (t) => {
  const { ns2, b, done } = await isolated('secwedge', `[[rule]]\nname = "w"\nusers = [${NOBODY}]\nbridges = ["br0"]\n`);
  try {
    const conn = await nobody.connect(b.socket);
    t.is(judge(await nobody.exchange(conn, HELLO)).code, 'hello');
    const grant = judge(await nobody.exchange(conn, ct(), { hold: true }));
    t.is(grant.code, 'create-tap');
    const name = grant.reply?.op === 'create-tap' ? grant.reply.device.name : '';
    b.proc.stderr!.pause();
    const flood = await localConnect(b.socket);
    await localExchange(flood, HELLO);
    for (let id = 0; id < 300; id++) await localExchange(flood, encodeFrame({ op: 'create-tap', id, bridge: 'br0' }));
    flood.close();
    await nobody.close(conn); // the tap vanishes; the monitor records its cleanup
    // The peer's close of the tap's last fd deleted it, its RTM_DELLINK queued: once the broker has read
    // that, it has tried to write the cleanup record into the full pipe.
    await b.waitFor(() => ns2.link(name) === undefined && b.linkEventsUnread() === 0, 3000, 'the broker did not see the tap vanish');
    b.proc.stderr!.resume();
    t.is(await helloWithin(b.socket, 2000), 'hello', 'the broker still answers');
    t.true(b.alive);
  } finally {
    await done();
  }
});
