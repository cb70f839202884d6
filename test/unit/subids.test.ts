// Subordinate uids (subids.ts): /etc/subuid's ranges, looked up per connection; the file read again when it
// changes. The broker refuses these uids at accept (security › round2 › F2 runs that against a real broker).
import test from 'ava';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { MAX_CLAIMED_GROUPS, Subuids, loadSubuids, ownGroups, screenIds, subordinateOf } from '@tapbroker/broker/internal';

function file(t: import('ava').ExecutionContext, text: string): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-subuid-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const f = path.join(dir, 'subuid');
  fs.writeFileSync(f, text);
  return f;
}

test('ranges by name or uid; comments, blanks and malformed lines skipped; a missing file has none', (t) => {
  const ranges = loadSubuids(file(t, '# comment\nroot:100000:65536\n\n1000:200000:10\nbad line\nx:1:\n'));
  t.deepEqual(ranges.map((r) => [r.owner, r.start, r.count, r.ownerUid]), [['root', 100000, 65536, 0], ['1000', 200000, 10, 1000]]);
  t.deepEqual(loadSubuids('/nonexistent/subuid'), []);
});

test('a uid is looked up in the range that holds it, bounds included, overlapping and unsorted ranges too', (t) => {
  const ranges = loadSubuids(file(t, [
    'b:500000:100', 'a:100000:1000000', ...Array.from({ length: 200 }, (_, i) => `u${i}:${200000 + i * 10}:5`),
  ].join('\n')));
  t.is(subordinateOf(ranges, 99999), null);
  t.is(subordinateOf(ranges, 100000)?.owner, 'a');
  t.is(subordinateOf(ranges, 200003)?.owner, 'u0');
  // Past 200 small ranges, still inside the long one that starts before them all.
  t.is(subordinateOf(ranges, 205000)?.owner, 'a');
  t.is(subordinateOf(ranges, 1099999)?.owner, 'a');
  t.is(subordinateOf(ranges, 1100000), null);
});

test('Subuids reads the file again when it changes, also when it is replaced or removed', (t) => {
  const f = file(t, 'a:100000:10\n');
  const subs = new Subuids(f);
  t.is(subs.of(100005)?.owner, 'a');
  t.is(subs.of(300000), null);
  fs.appendFileSync(f, 'b:300000:10\n');
  t.is(subs.of(300000)?.owner, 'b', 'a range appended');
  const tmp = `${f}.new`;
  fs.writeFileSync(tmp, 'c:400000:10\n');
  fs.renameSync(tmp, f);
  t.is(subs.of(300000), null, 'the file replaced by rename');
  t.is(subs.of(400001)?.owner, 'c');
  fs.rmSync(f);
  t.is(subs.of(400001), null, 'the file removed');
});

test('subordinate gids leave a caller\'s groups unless the account database gives them; a primary one is refused', (t) => {
  const subgids = new Subuids(file(t, 'nobody:4200000:65536\n'));
  // nobody (65534) is a member of none of 4200000..4265535 by the account database.
  t.deepEqual(ownGroups({ uid: 65534, gid: 65534, groups: [27, 4200500, 65534, 4265535, 4265536] }, subgids),
    { groups: [27, 65534, 4265536], refused: null });
  const refused = ownGroups({ uid: 65534, gid: 4200001, groups: [] }, subgids).refused;
  t.is(refused?.owner, 'nobody');
  // Root's own groups (gid 0) are no subordinate ones; nothing in range: the groups as given.
  t.deepEqual(ownGroups({ uid: 0, gid: 0, groups: [0, 4] }, subgids), { groups: [0, 4], refused: null });
});

test('a caller holding more subordinate gids than it may is refused, and none of them is kept', (t) => {
  // Found by an outside review: a user's whole range (65,536 gids, setgroups in a user namespace) was kept with each
  // connection and written into every record about it: 460 KB records, 16-25 MB/s of audit from one loop.
  const subuids = new Subuids(file(t, ''));
  const subgids = new Subuids(file(t, 'nobody:300000:65536\n'));
  const peer = (n: number) => ({ uid: 65534, gid: 65534, groups: [65534, ...Array.from({ length: n }, (_, i) => 300000 + i)] });
  const most = screenIds(peer(MAX_CLAIMED_GROUPS), subuids, subgids);
  t.is(most.refused, null);
  t.is(most.claimed.length, MAX_CLAIMED_GROUPS);
  const more = screenIds(peer(65536), subuids, subgids);
  t.regex(more.refused?.message ?? '', /^uid 65534 holds 65536 subordinate gids the account database does not give it .*at most 256 are taken/);
  t.deepEqual(more.claimed, []);
});

test('a caller\'s groups are counted once each, however often the kernel shows them', (t) => {
  // Found by a re-test: a caller listing its own gid 65,536 times passed the cap on subordinate gids and made every
  // record about it ~400 KB (the kernel keeps a group as often as setgroups() named it).
  const subuids = new Subuids(file(t, ''));
  const subgids = new Subuids(file(t, 'nobody:300000:65536\n'));
  const own = screenIds({ uid: 65534, gid: 65534, groups: Array(65536).fill(65534) }, subuids, subgids);
  t.deepEqual(own.groups, [65534]);
  const mixed = screenIds({ uid: 65534, gid: 65534, groups: [...Array.from({ length: 256 }, (_, i) => 300000 + i),
    ...Array(65280).fill(65534)] }, subuids, subgids);
  t.is(mixed.refused, null);
  t.deepEqual(mixed.groups, [65534]);
  t.is(mixed.claimed.length, 256);
  const root = screenIds({ uid: 0, gid: 0, groups: [0, 0, 0] }, subuids, subgids);
  t.deepEqual(root.groups, [0]);
});
