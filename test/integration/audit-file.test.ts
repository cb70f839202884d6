// The audit file on a disk that fills up, for real (a 16 KiB tmpfs): a record it cannot take is lost, counted
// and said in the broker's log once until the file takes records again; a line cut short is ended before the
// next, so that every other line stays one JSON record. Found by an outside review: 8 of 12 grants were lost
// with nothing said anywhere, and the first record after the disk had room again was glued onto the cut one.
import test from 'ava';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { Audit } from '@tapbroker/broker/internal';
import { tempDir } from '../helpers/broker.js';

test('a full disk: records lost are said once, counted, and no line is glued to a cut one', (t) => {
  const dir = tempDir('auditfull');
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=16k,mode=0700', 'tmpfs', dir]);
  t.teardown(() => {
    execFileSync('umount', [dir]);
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const log: string[] = [];
  const file = path.join(dir, 'audit.log');
  const audit = new Audit(() => 'f'.repeat(64), { journalSocket: null, fd: fs.openSync('/dev/null', 'w'), file,
    log: (line) => log.push(line) });
  t.teardown(() => audit.close());
  // A filler that leaves the file less than a page.
  fs.writeFileSync(path.join(dir, 'filler'), Buffer.alloc(12 * 1024 - 700));
  const record = (i: number) => audit.record({
    op: 'create-tap', decision: 'grant', rule: 'lab', caller: { uid: 1000 },
    device: { name: `tb1000-${String(i).padStart(4, '0')}`, pad: 'x'.repeat(300) },
  });
  let i = 0;
  while (audit.dropped < 3 && i < 200) record(i++);
  t.is(audit.dropped, 3, 'the disk filled');
  t.is(log.length, 1, 'said once, not once per record');
  t.regex(log[0]!, /audit file .*audit\.log: a record could not be written \(ENOSPC\); records are being lost/);
  fs.rmSync(path.join(dir, 'filler'));
  record(i++);
  record(i++);
  t.is(log.length, 2);
  t.regex(log[1]!, /audit file .*: taking records again; 3 lost/);
  const lines = fs.readFileSync(file, 'utf8').split('\n').filter((l) => l !== '');
  const parsed = lines.map((l) => { try { return JSON.parse(l) as { audit: { op: string; device: { name: string } } }; } catch { return null; } });
  t.is(parsed.filter((p) => p === null).length, 1, 'the one line the disk cut short, alone');
  // The file says what it lacks, just before the first record it took again (an outside review: nothing did).
  const gap = parsed.findIndex((p) => p?.audit.op === 'audit-file');
  t.true(gap > 0, 'an audit-file record');
  const said = parsed[gap]!.audit as unknown as { decision: string; message: string };
  t.is(said.decision, 'error');
  t.regex(said.message, /^3 record\(s\) before this one could not be written to this file \(ENOSPC\) since \d{4}-.*Z; the journal \(or stderr\) has them$/);
  t.is(parsed[gap + 1]?.audit.device.name, `tb1000-${String(i - 2).padStart(4, '0')}`, 'then the record that ended the gap');
  t.is(parsed.filter((p) => p?.audit.op === 'audit-file').length, 1, 'once');
  const names = parsed.flatMap((p) => (p?.audit.device ? [p.audit.device.name] : []));
  t.deepEqual(names.slice(-2), [`tb1000-${String(i - 2).padStart(4, '0')}`, `tb1000-${String(i - 1).padStart(4, '0')}`],
    'the records after the disk had room are whole lines of their own');
});
