// --linux-audit's record text: libvirt's fields, libaudit's value encoding, each decision's reason and res.
import test from 'ava';
import { spawnSync } from 'node:child_process';
import type { AuditRecord } from '@tapbroker/broker';
import { AUDIT_VIRT_RESOURCE, auditField, linuxAuditMessage } from '@tapbroker/broker/internal';

const SHA = 'a'.repeat(64);
const base: AuditRecord = {
  time: '2025-01-01T00:00:00.000Z', op: 'create-tap', decision: 'grant', rule: 'lab', policy_sha256: SHA,
  uid: 65534, gid: 65534, pid: 4242, exe: '/usr/bin/qemu-system-x86_64', user: 'nobody',
};
const tapDevice = {
  kind: 'tap', name: 'tb65534-k3x9', ifindex: 7, parent: 'br0', mac: '52:54:00:12:34:56', lease: '0f3c2a1b4d5e6f70',
};
const tapRequest = { kind: 'tap', parent: 'br0', mac: '52:54:00:12:34:56', name: null };

/** The fields of a message as name → raw value (values never contain a space: they are quoted or hex). */
function fields(msg: string): Map<string, string> {
  return new Map(msg.split(' ').map((f) => [f.slice(0, f.indexOf('=')), f.slice(f.indexOf('=') + 1)]));
}

test('the record type is libaudit\'s AUDIT_VIRT_RESOURCE, as libvirt sends it', (t) => {
  t.is(AUDIT_VIRT_RESOURCE, 2501);
});

test('values: plain ones quoted, numbers bare, unknown `?`; a space, quote, control or non-ASCII byte means hex', (t) => {
  t.is(auditField('path', '/dev/net/tun'), 'path="/dev/net/tun"');
  t.is(auditField('uid', 65534), 'uid=65534');
  t.is(auditField('auid', 4294967295), 'auid=4294967295');
  t.is(auditField('new-net', null), 'new-net=?');
  t.is(auditField('exe', undefined), 'exe=?');
  t.is(auditField('exe', '/opt/my vm/qemu'), 'exe=2F6F70742F6D7920766D2F71656D75');
  t.is(auditField('rule', 'a"b'), 'rule=612262');
  t.is(auditField('rule', 'tab\there'), 'rule=7461620968657265');
  t.is(auditField('rule', 'del\x7f'), 'rule=64656C7F');
  t.is(auditField('rule', 'café'), 'rule=636166C3A9');
  t.is(auditField('rule', "it's=ok"), 'rule="it\'s=ok"');
  t.is(auditField('rule', ''), 'rule=""');
  // A caller-chosen comm cannot add a field of its own: it has a space, so it is one hex value.
  const forged = fields(auditField('exe', 'comm:x res=success uid=0'));
  t.deepEqual([...forged.keys()], ['exe']);
});

test('a grant: reason=open, the guest MAC as new-net, /dev/net/tun, the caller, the lease, res=success', (t) => {
  const msg = linuxAuditMessage({ ...base, device: tapDevice, request: tapRequest }, 1000)!;
  t.is(msg,
    'virt=tapbroker resrc=net reason=open old-net=? new-net="52:54:00:12:34:56" path="/dev/net/tun" '
    + `ifname="tb65534-k3x9" lease="0f3c2a1b4d5e6f70" rule="lab" policy="${SHA}" op="create-tap" `
    + 'uid=65534 auid=1000 pid=4242 exe="/usr/bin/qemu-system-x86_64" res=success');
});

test('a macvtap grant names its /dev/tapN; a bridge-helper lease (no MAC) has new-net=?', (t) => {
  const mv = fields(linuxAuditMessage({
    ...base, op: 'create-macvtap', device: { ...tapDevice, kind: 'macvtap', ifindex: 1048577 },
  }, null)!);
  t.is(mv.get('path'), '"/dev/tap1048577"');
  t.is(mv.get('auid'), '?');
  const helper = fields(linuxAuditMessage({
    ...base, op: 'create', device: { ...tapDevice, mac: null }, request: { ...tapRequest, mac: 'unknown' },
  }, null)!);
  t.is(helper.get('new-net'), '?');
  t.is(helper.get('res'), 'success');
});

test('a denial or a refused create: reason=open res=failed, the MAC asked for, the rule that denied', (t) => {
  const deny = fields(linuxAuditMessage({
    ...base, decision: 'deny', rule: 'no-64001', uid: 64001, request: tapRequest, code: 'TB_E_POLICY_DENIED',
  }, 4294967295)!);
  t.is(deny.get('reason'), 'open');
  t.is(deny.get('res'), 'failed');
  t.is(deny.get('new-net'), '"52:54:00:12:34:56"');
  t.is(deny.get('rule'), '"no-64001"');
  t.is(deny.get('ifname'), '?');
  t.is(deny.get('lease'), '?');
  t.is(deny.get('path'), '"/dev/net/tun"');
  t.is(deny.get('uid'), '64001');
  // No rule allows it: rule=?; the broker picks the MAC: new-net=?; a macvtap not made has no node.
  const none = fields(linuxAuditMessage({
    ...base, decision: 'deny', rule: null, op: 'create-macvtap', request: { kind: 'macvtap', parent: 'eth0', mac: null },
  }, null)!);
  t.is(none.get('rule'), '?');
  t.is(none.get('new-net'), '?');
  t.is(none.get('path'), '?');
  const error = fields(linuxAuditMessage({
    ...base, op: 'create', decision: 'error', rule: null, request: tapRequest, code: 'TB_E_DEVICE_EXISTS',
  }, null)!);
  t.is(error.get('reason'), 'open');
  t.is(error.get('res'), 'failed');
});

test('release and cleanup: reason=close, the MAC as old-net, res=success; a failed delete: res=failed', (t) => {
  const lease = { ...tapDevice, id: '0f3c2a1b4d5e6f70', lease: undefined };
  const release = fields(linuxAuditMessage({ ...base, op: 'release', decision: 'release', device: lease }, 1000)!);
  t.is(release.get('reason'), 'close');
  t.is(release.get('old-net'), '"52:54:00:12:34:56"');
  t.is(release.get('new-net'), '?');
  t.is(release.get('lease'), '"0f3c2a1b4d5e6f70"');
  t.is(release.get('res'), 'success');
  // A cleanup is on the owner's behalf: uid alone.
  const cleanup = fields(linuxAuditMessage({
    ...base, op: 'cleanup', decision: 'cleanup', pid: null, exe: null, gid: null, user: null, device: lease,
  }, null)!);
  t.is(cleanup.get('reason'), 'close');
  t.is(cleanup.get('op'), '"cleanup"');
  t.deepEqual([cleanup.get('uid'), cleanup.get('pid'), cleanup.get('exe'), cleanup.get('auid')], ['65534', '?', '?', '?']);
  const failed = fields(linuxAuditMessage({
    ...base, op: 'cleanup', decision: 'error', device: { name: 'tb65534-k3x9', ifindex: 7 }, code: 'TB_E_KERNEL',
  }, null)!);
  t.is(failed.get('reason'), 'close');
  t.is(failed.get('res'), 'failed');
  t.is(failed.get('old-net'), '?');
  const refusedRelease = fields(linuxAuditMessage({
    ...base, op: 'release', decision: 'deny', rule: null, request: { name: 'eth0' }, code: 'TB_E_NO_SUCH_LEASE',
  }, null)!);
  t.is(refusedRelease.get('reason'), 'close');
  t.is(refusedRelease.get('res'), 'failed');
  t.is(refusedRelease.get('ifname'), '"eth0"');
});

test('records about no device are not sent: reloads, dry runs, reconcile notes, refusals no handler saw', (t) => {
  t.is(linuxAuditMessage({ ...base, op: 'reload', decision: 'reload', rule: null }, null), null);
  t.is(linuxAuditMessage({ ...base, op: 'can', decision: 'dry-run', request: tapRequest }, null), null);
  t.is(linuxAuditMessage({ ...base, op: 'reconcile', decision: 'reconcile', device: tapDevice }, null), null);
  t.is(linuxAuditMessage({ ...base, op: 'refusals', decision: 'suppressed', request: { counts: {} } }, null), null);
  t.is(linuxAuditMessage({ ...base, op: 'create-tap', decision: 'error', code: 'TB_E_TIMEOUT' }, null), null);
  t.is(linuxAuditMessage({ ...base, op: 'reload', decision: 'deny', rule: null, code: 'TB_E_POLICY_DENIED' }, null), null);
  // A network's down, after the device's own end (an outside review counted two closes per device).
  t.is(linuxAuditMessage({ ...base, op: 'unplug', decision: 'unplug', device: tapDevice }, null), null);
  t.is(linuxAuditMessage({ ...base, op: 'unplug', decision: 'error', device: tapDevice, code: 'TB_E_HOOK_FAILED' }, null),
    null);
});

test('an exe longer than the kernel keeps is cut (and so hex), leaving res= at the end', (t) => {
  const msg = linuxAuditMessage({ ...base, exe: `/${'x'.repeat(5000)}`, device: tapDevice }, null)!;
  t.true(Buffer.byteLength(msg) < 8560 - 200, `${Buffer.byteLength(msg)} bytes`);
  t.regex(msg, / res=success$/);
});

// What an auditor's tools read: libaudit's own parser (auparse, from python3-audit, which CI installs), given the
// record as the kernel writes a user message (its header, then `msg='TEXT'`). A caller chooses its exe's path, so
// a quote of either kind, a space, a line break or `'res=success` in it must stay inside the exe field: a `'` is
// left as libaudit's own encoder leaves it (audit_value_needs_encoding), and the parser must still read it as part
// of the value, not as the end of the message.
const AUPARSE = `
import auparse, json, sys
out = []
au = auparse.AuParser(auparse.AUSOURCE_BUFFER, sys.stdin.read())
while au.parse_next_event():
    fields = []
    au.first_field()
    while True:
        fields.append([au.get_field_name(), au.interpret_field()])
        if not au.next_field(): break
    out.append(fields)
print(json.dumps(out))
`;
const hasAuparse = spawnSync('/usr/bin/python3', ['-c', 'import auparse']).status === 0;
(hasAuparse ? test : test.skip)('libaudit\'s parser reads every field back as written, whatever the caller\'s exe', (t) => {
  if (!hasAuparse) t.log('skipped: no python3-audit (auparse) on this machine');
  const exes = ['/usr/bin/qemu-system-x86_64', "/home/u/a'b", "/tmp/x'res=success'uid=0", '/tmp/x"y', '/opt/my vm/q',
    '/tmp/a\nnode=x type=VIRT_RESOURCE msg=audit(1.1:1): res=success', '/tmp/caf\u00e9', `/${'x'.repeat(5000)}`];
  const records = exes.map((exe, i) => {
    const msg = linuxAuditMessage({ ...base, exe, decision: 'deny', code: 'TB_E_POLICY_DENIED', request: tapRequest },
      4294967295)!;
    return `type=VIRT_RESOURCE msg=audit(1700000000.${100 + i}:${i + 1}): pid=1 uid=0 auid=4294967295 `
      + `ses=4294967295 subj=unconfined msg='${msg}'\n`;
  });
  const r = spawnSync('/usr/bin/python3', ['-c', AUPARSE], { input: records.join(''), encoding: 'utf8' });
  t.is(r.status, 0, r.stderr);
  const events = JSON.parse(r.stdout) as Array<Array<[string, string]>>;
  t.is(events.length, exes.length, 'one event per record, none forged');
  const names = ['type', 'pid', 'uid', 'auid', 'ses', 'subj', 'virt', 'resrc', 'reason', 'old-net', 'new-net', 'path',
    'ifname', 'lease', 'rule', 'policy', 'op', 'uid', 'auid', 'pid', 'exe', 'res'];
  events.forEach((fields, i) => {
    t.deepEqual(fields.map(([n]) => n), names, `record ${i}: the fields written, no more`);
    const exe = fields.find(([n]) => n === 'exe')![1];
    // auparse shows a control character as its octal escape.
    const shown = exes[i]!.replace(/[\x00-\x1f]/g, (c) => `\\${c.charCodeAt(0).toString(8).padStart(3, '0')}`);
    if (exes[i]!.length < 2048) t.is(exe, shown, `record ${i}: exe read back`);
    else t.true(exe.startsWith(exes[i]!.slice(0, 2048)), 'a long exe, cut');
    t.is(fields.at(-1)![1], 'failed', `record ${i}: res as written`);
  });
});
