// Subordinate uids (/etc/subuid): the uids a user may map in a user namespace of its own (newuidmap, the
// rootless containers' way). A process of that namespace connects as any of them, each a uid of its own
// to the kernel and without an account: one user would be thousands, each with its own connection cap,
// quota and cool-down, and outside every deny rule naming that user. They are refused at accept.
// Subordinate gids (/etc/subgid) the same way: newgidmap lets a user map them and setgroups() to any of
// them, and the kernel then shows the broker those host gids; a rule's group is not had that way.
import fs from 'node:fs';
import { getpwnam, getpwuid, groupsOf } from './libc.js';

export const SUBUID_FILE = '/etc/subuid';
export const SUBGID_FILE = '/etc/subgid';

/** One line of /etc/subuid: `owner:start:count` (the owner a name or a uid). */
export interface SubRange {
  start: number;
  count: number;
  owner: string;
  /** The owner's uid, where the account database knows it. */
  ownerUid: number | null;
}

/** The ranges of `file`; a missing file has none. Lines that are not ranges are skipped. */
export function loadSubuids(file: string = SUBUID_FILE): SubRange[] {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return [];
  }
  const ranges: SubRange[] = [];
  for (const line of text.split('\n', 1_000_000)) {
    const m = /^([^:#\s][^:]*):(\d+):(\d+)\s*$/.exec(line);
    if (!m) continue;
    const owner = m[1]!;
    const ownerUid = /^\d+$/.test(owner) ? Number(owner) : lookup(owner);
    ranges.push({ start: Number(m[2]), count: Number(m[3]), owner, ownerUid });
  }
  return ranges.sort((a, b) => a.start - b.start);
}

function lookup(name: string): number | null {
  try {
    return getpwnam(name)?.uid ?? null;
  } catch {
    return null;
  }
}

/**
 * /etc/subuid as last read, read again whenever the file changes (useradd adds a range for every new user):
 * a stat per connection, a read only after a change.
 */
export class Subuids {
  private ranges: SubRange[] = [];
  private stamp = '';

  constructor(readonly file: string = SUBUID_FILE) {
    this.refresh();
  }

  /** The range `uid` is a subordinate uid of, or null. */
  of(uid: number): SubRange | null {
    return subordinateOf(this.current(), uid);
  }

  /** The ranges as the file lists them now. */
  current(): readonly SubRange[] {
    this.refresh();
    return this.ranges;
  }

  private refresh(): void {
    let stamp = 'missing';
    try {
      const st = fs.statSync(this.file);
      stamp = `${st.ino}:${st.size}:${st.mtimeMs}:${st.ctimeMs}`;
    } catch {
      // A missing file has no ranges.
    }
    if (stamp === this.stamp) return;
    this.stamp = stamp;
    this.ranges = loadSubuids(this.file);
  }
}

/**
 * A caller's groups without the subordinate gids the account database does not give it (where subordinate
 * ranges overlap real groups, a real member keeps its group); `refused` when its primary gid is such a gid (a
 * process running as a container's group), which is refused as a subordinate uid is.
 */
export function ownGroups(
  peer: { uid: number; gid: number; groups: readonly number[] }, subgids: Subuids,
): { groups: number[]; refused: SubRange | null } {
  const ranges = subgids.current();
  const subordinate = (g: number) => subordinateOf(ranges, g) !== null;
  if (!subordinate(peer.gid) && !peer.groups.some(subordinate)) return { groups: [...peer.groups], refused: null };
  const mine = databaseGroups(peer.uid);
  const foreign = (g: number) => subordinate(g) && !mine.has(g);
  return {
    groups: peer.groups.filter((g) => !foreign(g)),
    refused: foreign(peer.gid) ? subordinateOf(ranges, peer.gid) : null,
  };
}

/** The host's subordinate ids (/etc/subuid, /etc/subgid), which the broker screens every caller by. */
export interface HostIds {
  subuids: Subuids;
  subgids: Subuids;
}

/** This host's, as the broker reads them (for the policy tools). */
export const hostIds = (): HostIds => ({ subuids: new Subuids(SUBUID_FILE), subgids: new Subuids(SUBGID_FILE) });

/** What the broker makes of a caller's ids: its groups as it counts them, or why it gets nothing at all. */
export interface Screened {
  groups: number[];
  /** The subordinate gids left out of `groups`: a deny rule still holds for them (decide.ts Caller). */
  claimed: number[];
  /** Refused: a subordinate uid, or a subordinate gid as the primary group. */
  refused: { range: SubRange; byUid: boolean; message: string } | null;
}

/**
 * Subordinate gids a caller may hold beyond its own groups (a rootless container's few): each is kept with its
 * connection and named in its records, and a user can hold all 65,536 of its range (an outside review: 460 KB
 * records, 16-25 MB/s of audit from one create-and-close loop). A caller holding more is refused, its gids unkept.
 */
export const MAX_CLAIMED_GROUPS = 256;

/** The one screening of a caller's ids, for the broker at accept and for test-policy's cases alike. */
export function screenIds(
  peer: { uid: number; gid: number; groups: readonly number[] }, subuids: Subuids, subgids: Subuids,
): Screened {
  // The kernel keeps a group as often as setgroups() named it (a re-test listed its own gid 65,536 times).
  peer = { ...peer, groups: [...new Set(peer.groups)] };
  if (peer.uid === 0) return { groups: [...peer.groups], claimed: [], refused: null };
  const sub = subuids.of(peer.uid);
  if (sub) {
    const message = `uid ${peer.uid} is a subordinate uid of ${sub.owner} (${subuids.file}): it gets no devices`;
    return { groups: [], claimed: [], refused: { range: sub, byUid: true, message } };
  }
  const own = ownGroups(peer, subgids);
  const claimed = peer.groups.filter((g) => !own.groups.includes(g));
  if (claimed.length > MAX_CLAIMED_GROUPS) {
    const message = `uid ${peer.uid} holds ${claimed.length} subordinate gids the account database does not give it `
      + `(${subgids.file}); at most ${MAX_CLAIMED_GROUPS} are taken: it gets no devices; connect without them`;
    return { groups: own.groups, claimed: [], refused: { range: subgids.of(claimed[0]!)!, byUid: false, message } };
  }
  if (!own.refused) return { groups: own.groups, claimed, refused: null };
  const message = `gid ${peer.gid} is a subordinate gid of ${own.refused.owner} (${subgids.file}): it gets no `
    + 'devices; connect with a group of your own';
  return { groups: own.groups, claimed, refused: { range: own.refused, byUid: false, message } };
}

/** uid → its groups by the account database, looked up again after a minute (one NSS query, not an enumeration). */
const known = new Map<number, { groups: ReadonlySet<number>; at: number }>();

function databaseGroups(uid: number): ReadonlySet<number> {
  const hit = known.get(uid);
  if (hit && Date.now() - hit.at < 60_000) return hit.groups;
  let groups = new Set<number>();
  // A failed lookup (a directory service down) keeps no group it alone could vouch for, and is tried again after
  // 10 s, not at every connection: each is a wait on the broker's one thread.
  let at = Date.now();
  try {
    const pw = getpwuid(uid);
    if (pw) groups = new Set(groupsOf(pw.name, pw.gid));
  } catch {
    at -= 50_000;
  }
  if (known.size >= 4096) known.clear();
  known.set(uid, { groups, at });
  return groups;
}

/** The range `uid` is a subordinate uid of, or null; `ranges` sorted by start (as loadSubuids returns them). */
export function subordinateOf(ranges: readonly SubRange[], uid: number): SubRange | null {
  // Bisection to the last range starting at or below uid, then back over the ones before it while any range
  // so far could still reach uid (ranges may overlap, and a site may list one per user).
  let lo = 0;
  let hi = ranges.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (ranges[mid]!.start <= uid) lo = mid + 1;
    else hi = mid;
  }
  for (let i = lo - 1; i >= 0; i--) {
    const r = ranges[i]!;
    if (uid - r.start < r.count) return r;
    if (reach(ranges, i) <= uid) break;
  }
  return null;
}

/** The furthest uid (exclusive) any of ranges[0..i] reaches: computed once per array. */
const reaches = new WeakMap<readonly SubRange[], number[]>();
function reach(ranges: readonly SubRange[], i: number): number {
  let r = reaches.get(ranges);
  if (!r) {
    r = [];
    let far = 0;
    for (const x of ranges) r.push((far = Math.max(far, x.start + x.count)));
    reaches.set(ranges, r);
  }
  return r[i]!;
}
