// --linux-audit against the real kernel: a broker in a namespace of its own sends AUDIT_VIRT_RESOURCE
// records, which this process (root, in the initial network namespace) reads from the audit log's
// multicast group. Audit is switched on only for as long as one test needs it, and the state found at
// the start is put back whatever happens.
import anyTest, { type TestFn } from 'ava';
import fs from 'node:fs';
import { BrokerProcess } from '../helpers/broker.js';
import { Netns } from '../helpers/netns.js';
import { NOBODY, probeOnce } from '../helpers/unpriv.js';
import {
  AuditLog, auditStatus, auditUnavailable, headerFields, innerFields, setAuditEnabled, type AuditStatus,
  type KernelRecord,
} from '../helpers/audit-netlink.js';

const test = anyTest as TestFn;
const DENIED_UID = 64001;
const POLICY = `
[[rule]]
name = "lab"
users = [${NOBODY}]
bridges = ["br0"]

[[deny]]
name = "no-64001"
users = [${DENIED_UID}]
`;
const ARGS = ['--journal-socket', '', '--linux-audit'];
const VIRT_RESOURCE = 2501;

const unavailable = await auditUnavailable();
if (unavailable) console.log(`# skip linux audit tests: ${unavailable}`);
const skipped = unavailable ? ` (skipped: ${unavailable})` : '';
/** Audit as found, put back after the tests. */
const before: AuditStatus | null = unavailable ? null : await auditStatus();
let ns: Netns;
const brokers: BrokerProcess[] = [];
const logs: AuditLog[] = [];

test.before(async () => {
  if (unavailable) return;
  ns = Netns.create('laud');
  ns.bridge('br0');
});

test.after.always(async () => {
  for (const b of brokers) await b.stop();
  for (const l of logs) l.close();
  ns?.destroy();
  // Whatever a test did, audit is left as it was found (a locked one was never touched).
  if (before && before.enabled !== 2 && (await auditStatus()).enabled !== before.enabled) {
    await setAuditEnabled(before.enabled as 0 | 1);
  }
});

const start = async (): Promise<BrokerProcess> => {
  const b = await BrokerProcess.start(ns, POLICY, { tag: 'laud', args: ARGS });
  brokers.push(b);
  return b;
};
/** This broker's records: the kernel's own pid= is the sender's. */
const from = (b: BrokerProcess, more: (r: KernelRecord) => boolean) => (r: KernelRecord) =>
  r.type === VIRT_RESOURCE && headerFields(r.text).get('pid') === String(b.proc.pid) && more(r);
const field = (r: KernelRecord, name: string) => innerFields(r.text).get(name);
const loginUid = fs.readFileSync('/proc/self/loginuid', 'utf8').trim();

(unavailable ? test.skip : test.serial)(`a grant, its cleanup and a denial reach the kernel's audit log in libvirt's fields${skipped}`, async (t) => {
  if (before!.enabled === 0) await setAuditEnabled(1);
  const log = AuditLog.open();
  logs.push(log);
  try {
    const broker = await start();
    await broker.waitFor(() => /linux audit: sending records \(audit enabled [12]/.test(broker.stderr), 5000, 'status line');

    const mac = '52:54:00:a0:d1:7e';
    const granted = await probeOnce({ socket: broker.socket, requests: [{ bridge: 'br0', mac }] });
    t.is(granted.error, null);
    const name = granted.taps[0]!.device.name;
    const grant = await broker.record((r) => r.decision === 'grant' && r.pid === granted.pid);
    const open = await log.find(from(broker, (r) => field(r, 'reason') === 'open' && field(r, 'res') === 'success'));
    t.log(open.text);
    const f = innerFields(open.text);
    t.is(f.get('virt'), 'tapbroker');
    t.is(f.get('resrc'), 'net');
    t.is(f.get('old-net'), '?');
    t.is(f.get('new-net'), `"${mac}"`);
    t.is(f.get('path'), '"/dev/net/tun"');
    t.is(f.get('ifname'), `"${name}"`);
    t.is(f.get('lease'), `"${(grant.device as { lease: string }).lease}"`);
    t.is(f.get('rule'), '"lab"');
    t.is(f.get('policy'), `"${grant.policy_sha256}"`);
    t.is(f.get('op'), '"create-tap"');
    t.is(f.get('uid'), String(NOBODY));
    t.is(f.get('pid'), String(granted.pid));
    t.is(f.get('auid'), loginUid, 'the caller\'s login uid, inherited from this test');
    t.is(f.get('exe'), `"${fs.realpathSync(process.execPath)}"`);
    // The kernel's head is the sender's: the broker, root.
    t.is(headerFields(open.text).get('uid'), '0');

    // The probe has exited: its fds are closed, the tap is gone, its lease ends: reason=close.
    const close = await log.find(from(broker, (r) => field(r, 'reason') === 'close' && field(r, 'ifname') === `"${name}"`));
    t.log(close.text);
    t.is(field(close, 'old-net'), `"${mac}"`);
    t.is(field(close, 'new-net'), '?');
    t.is(field(close, 'op'), '"cleanup"');
    t.is(field(close, 'res'), 'success');
    t.is(field(close, 'uid'), String(NOBODY));

    const denied = await probeOnce({ socket: broker.socket, requests: [{ bridge: 'br0' }] }, { uid: DENIED_UID });
    t.is(denied.error?.code, 'TB_E_POLICY_DENIED');
    const deny = await log.find(from(broker, (r) => field(r, 'res') === 'failed'));
    t.log(deny.text);
    t.is(field(deny, 'reason'), 'open');
    t.is(field(deny, 'rule'), '"no-64001"');
    t.is(field(deny, 'uid'), String(DENIED_UID));
    t.is(field(deny, 'new-net'), '?', 'the broker would have picked the MAC');
    t.is(field(deny, 'lease'), '?');

    // Three device records, nothing else from this broker (no reconcile or status noise).
    t.is(log.records.filter(from(broker, () => true)).length, 3);
    await broker.stop('SIGTERM', true);
    t.regex(broker.stderr, /linux audit records: 3 sent, 0 failed/);
  } finally {
    // Off again at once: other tests run meanwhile, and without auditd every record lands in the kernel log.
    if (before!.enabled === 0) await setAuditEnabled(0);
  }
});

(unavailable || before?.enabled === 2 ? test.skip : test.serial)(`with audit disabled, requests still succeed and the broker says so once${skipped}`, async (t) => {
  if ((await auditStatus()).enabled !== 0) await setAuditEnabled(0);
  const log = AuditLog.open();
  logs.push(log);
  const broker = await start();
  await broker.waitFor(() => /linux audit: audit is disabled/.test(broker.stderr), 5000, 'the disabled line');
  for (let i = 0; i < 2; i++) {
    const r = await probeOnce({ socket: broker.socket, requests: [{ bridge: 'br0' }] });
    t.is(r.error, null);
  }
  const denied = await probeOnce({ socket: broker.socket, requests: [{ bridge: 'br0' }] }, { uid: DENIED_UID });
  t.is(denied.error?.code, 'TB_E_POLICY_DENIED');
  await broker.record((r) => r.decision === 'cleanup');
  t.is(broker.stderr.match(/linux audit:/g)?.length, 1, broker.stderr);
  log.drain();
  t.is(log.records.filter(from(broker, () => true)).length, 0, 'the kernel dropped them');
  // The kernel took them (and dropped them): nothing failed.
  await broker.stop('SIGTERM', true);
  t.regex(broker.stderr, /linux audit records: [1-9]\d* sent, 0 failed/);
});
