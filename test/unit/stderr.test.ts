// The daemon's stderr on a file system that fills up (stderr.ts): what could not be written is counted and said
// once there is room, with its reason, and a line cut off by the full disk does not swallow the next one.
import test from 'ava';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { ROOT } from '../helpers/broker.js';

// Found by an outside re-test: the drop line said "it had no reader", and the next record ran on after the cut one.
test('a full disk: lines dropped are said once there is room, as a write error; a cut line ends before the next', (t) => {
  const script = 'd=$(mktemp -d); mount -t tmpfs -o size=64k tmpfs "$d"; '
    + '"$1" "$2" "$3" "$d" 2>"$d/err.log"; cat "$d/err.log"; umount "$d"; rmdir "$d"';
  const r = spawnSync('unshare', ['-m', '--propagation', 'private', 'sh', '-c', script, 'sh', process.execPath,
    path.join(ROOT, 'test/helpers/stderr-full-disk.mjs'), path.join(ROOT, 'packages/broker/dist/stderr.js')],
  { encoding: 'utf8' });
  t.is(r.status, 0, r.stderr);
  const lines = r.stdout.split('\n').filter(Boolean);
  t.true(lines.some((l) => /^tapbrokerd: stderr: \d+ line\(s\), \d+ bytes, were dropped since \S+: writing to it failed \(ENOSPC\)/.test(l)),
    r.stdout.slice(0, 2000));
  t.false(lines.some((l) => l.indexOf('{"audit"') > 0), 'a record runs on after a cut one');
  // Every record written once there was room again is whole.
  const after = lines.filter((l) => /^\{"audit":\{"n":2[0-4],/.test(l));
  t.is(after.length, 5);
  for (const l of after) t.notThrows(() => JSON.parse(l));
});
