// The lease table: one lease per device the broker made, persisted under the state directory with
// atomic writes (a crash at any moment leaves the old file or the new one, never a mix).
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { checkShape, macFromBuffer, type Lease, type Shape } from '@tapbroker/protocol/core';
import type { Intent, LeaseRecord, StateFile } from './lease-schema.js';
import { randomOctets } from './naming.js';
import { readRegular, replaceFile } from './paths.js';
import { STATE_SHAPE } from './state-shape.js';

const PACKAGE_VERSION = (createRequire(import.meta.url)('../package.json') as { version: string }).version;
/**
 * `tapbrokerd X.Y.Z`, from the package's own version: one version for the whole product. The lease table names it:
 * a table another version wrote (an upgrade, or a downgrade and back) is not trusted to list every device.
 */
export const BROKER_VERSION = `tapbrokerd ${PACKAGE_VERSION}`;

export type { Intent, LeaseRecord, Plug } from './lease-schema.js';

export const STATE_FILE = 'leases.json';

/** The kernel's link kind (IFLA_INFO_KIND) of each kind of lease. */
export const KERNEL_KIND = { tap: 'tun', macvtap: 'macvtap' } as const;

/** One lease as the table holds it: an element of the state file's `leases`. */
function leaseShape(): Shape {
  const leases = STATE_SHAPE.t === 'object' ? STATE_SHAPE.fields['leases'] : undefined;
  if (leases?.t !== 'array') throw new Error('state-shape.ts has no array of leases');
  return leases.of;
}

export function newLeaseId(): string {
  return randomOctets(8).toString('hex');
}

/** The wire form of a lease (no bookkeeping fields). */
export function leaseView(l: LeaseRecord): Lease {
  const { holder_start: _start, group: _group, plug: _plug, host_mac: _host, vlan: _vlan, ...view } = l;
  return view;
}

/** Process start time in clock ticks since boot (/proc/<pid>/stat field 22), or null if there is no such process. */
export function processStartTime(pid: number): number | null {
  let stat: string;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch (err) {
    // Gone is gone; anything else (out of fds: EMFILE) says nothing about the process, and is thrown.
    if (['ENOENT', 'ESRCH'].includes((err as NodeJS.ErrnoException).code ?? '')) return null;
    throw err;
  }
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return Number(fields[19]);
}

/** Far more than any table (a lease is ~400 bytes): a file beyond it is not one. */
const MAX_STATE_BYTES = 64 * 1024 * 1024;

/** The table's file, only if it is one (never through a link: readRegular). */
const readStateFile = (file: string) => readRegular(file, MAX_STATE_BYTES, false);

export class LeaseTable {
  private readonly byId = new Map<string, LeaseRecord>();
  /** The lease of each ifindex, for link events (a lookup per event, not a scan of every lease). */
  private readonly byIndex = new Map<number, LeaseRecord>();
  /** Leases kept in memory only (kernelBound): never written, so adding or removing one writes nothing. */
  private readonly volatile = new Set<string>();
  /** Table writes since the broker started (a grant of a kernel-bound lease makes none: a unit test counts). */
  writes = 0;
  private readonly intents = new Map<string, Intent>();
  private readonly dbs = new Set<string>();
  /** Ended leases whose network's `down` has not run yet (see StateFile.downs). */
  private readonly downs = new Map<string, LeaseRecord>();
  /** Leases written mid-create, not granted yet (see StateFile.pending). */
  private readonly pending = new Set<string>();
  /** Tagged devices left alone, their leases lost (see StateFile.kept). */
  readonly kept = new Set<string>();
  /** Leases whose device is being deleted, with the record owed for it (see StateFile.retiring). */
  readonly retiring = new Map<string, StateFile['retiring'][number]>();
  /** MACs taken lately, to be kept across a restart (see StateFile.taken; Forwarding owns them). */
  taken: StateFile['taken'] = [];

  /** `dir` null keeps the table in memory only. */
  private constructor(readonly dir: string | null) {}

  /**
   * Reads the table. A missing file is an empty table; an unreadable or invalid one is reported in
   * `problem` and also yields an empty table. `trusted`: read whole and written by this very version, so a tagged
   * device without a lease in it is an orphan of a crash; `intact`: read whole, whoever wrote it (see reconcile for
   * what a table of another version, or none, leaves to the devices' tags).
   */
  static load(dir: string | null): { table: LeaseTable; problem: string | null; trusted: boolean; intact: boolean } {
    const table = new LeaseTable(dir);
    if (!dir) return { table, problem: null, trusted: true, intact: true };
    const file = path.join(dir, STATE_FILE);
    // A broker killed mid-write leaves its temporary file (named after its pid): the state directory is this
    // broker's alone (it holds the lock), and an outside review found 24 of them after 107 kills; the hook-run
    // file's too (hook.ts).
    try {
      const stale = fs.readdirSync(dir).filter((n) => /^(leases\.json|hook-run)\.\d+\.tmp$/.test(n));
      for (const n of stale) fs.rmSync(path.join(dir, n), { force: true });
    } catch {
      // No directory yet, or not readable: the load below says what it finds.
    }
    let text: string;
    try {
      text = readStateFile(file);
    } catch (err) {
      const none = { table, trusted: false, intact: false };
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { ...none, problem: null };
      return { table, problem: `cannot read ${file}: ${(err as Error).message}; rebuilding from the kernel`,
        trusted: false, intact: false };
    }
    let parsed: ReturnType<typeof checkShape>;
    try {
      parsed = checkShape(STATE_SHAPE, JSON.parse(text));
    } catch (err) {
      return {
        table,
        problem: `${file} is not JSON (${(err as Error).message}); rebuilding from the kernel`,
        trusted: false,
        intact: false,
      };
    }
    if (!parsed.ok)
      return {
        table,
        problem: `${file} is not a lease table (${parsed.issue}); rebuilding from the kernel`,
        trusted: false,
        intact: false,
      };
    const state = parsed.value as StateFile;
    for (const l of state.leases) table.put(l);
    // A stop's snapshot (see snapshot): memory-only leases again, dropped from the file at its next write.
    for (const l of state.leases) if (kernelBound(l, true)) table.volatile.add(l.id);
    for (const i of state.intents) table.intents.set(i.id, i);
    for (const d of state.ovsdbs) table.dbs.add(d);
    for (const l of state.downs) table.downs.set(l.id, l);
    for (const id of state.pending) table.pending.add(id);
    for (const id of state.kept) table.kept.add(id);
    table.taken = state.taken;
    for (const r of state.retiring) table.retiring.set(r.lease.id, r);
    // Written by another version (0.4.0 wrote no `broker`): it may lack leases that version kept in memory only or
    // could not read back (an outside review: a downgrade and back, and the upgrade deleted two running VMs' taps
    // as orphans of a crash). Tagged devices without a lease are then taken back from their tags, not deleted.
    if (state.broker !== BROKER_VERSION) {
      return { table, trusted: false, intact: true, problem: `${file} was written by `
        + `${state.broker ?? 'tapbrokerd 0.4 or older'}, not ${BROKER_VERSION}: taps tagged as this broker's that go `
        + 'with their fds and have no lease are taken back from their tags' };
    }
    return { table, problem: null, trusted: true, intact: true };
  }

  all(): LeaseRecord[] {
    return [...this.byId.values()];
  }

  get size(): number {
    return this.byId.size;
  }

  get(id: string): LeaseRecord | undefined {
    return this.byId.get(id);
  }

  byIfindex(ifindex: number): LeaseRecord | undefined {
    return this.byIndex.get(ifindex);
  }

  /** Leases whose guest MAC is `mac` (a grant looks them up on every tap: not a scan of the whole table). */
  withMac(mac: string): LeaseRecord[] {
    return [...(this.byMac.get(mac)?.values() ?? [])];
  }

  private readonly byMac = new Map<string, Map<string, LeaseRecord>>();

  private put(l: LeaseRecord): void {
    const before = this.byId.get(l.id);
    if (before) this.drop(before.id);
    this.byId.set(l.id, l);
    if (l.mac !== null) {
      const same = this.byMac.get(l.mac) ?? new Map<string, LeaseRecord>();
      this.byMac.set(l.mac, same.set(l.id, l));
    }
    if (this.byIndex.has(l.ifindex)) this.shared++;
    this.byIndex.set(l.ifindex, l);
  }

  /** How many times a lease took an ifindex another lease had: only then does a removal look for the other. */
  private shared = 0;

  private drop(id: string): void {
    const l = this.byId.get(id);
    if (!l) return;
    this.byId.delete(id);
    const same = l.mac !== null ? this.byMac.get(l.mac) : undefined;
    if (same?.delete(id) && same.size === 0) this.byMac.delete(l.mac!);
    if (this.byIndex.get(l.ifindex)?.id !== id) return;
    this.byIndex.delete(l.ifindex);
    // Two leases of one ifindex (a stale one and its successor) are rare: the other keeps the index.
    if (this.shared === 0) return;
    for (const o of this.byId.values()) if (o.ifindex === l.ifindex) this.byIndex.set(o.ifindex, o);
  }

  /** Open vSwitch databases leases were plugged into, now or before (kept after their leases end). */
  ovsdbs(): string[] {
    return [...this.dbs];
  }

  /**
   * Adds a lease, durably unless `durable` is false (a kernel-bound lease: memory only); throws (and keeps
   * nothing) when the table cannot be written.
   */
  add(lease: LeaseRecord, durable = true, unfinished = false): void {
    const before = this.byId.get(lease.id);
    const wasVolatile = this.volatile.has(lease.id);
    // A lease put back (a release whose deletion failed) owes no `down`.
    const owed = this.downs.get(lease.id);
    this.downs.delete(lease.id);
    this.put(lease);
    if (!durable) {
      this.volatile.add(lease.id);
      return;
    }
    this.volatile.delete(lease.id);
    if (lease.plug && 'ovs' in lease.plug) this.dbs.add(lease.plug.db);
    if (unfinished) this.pending.add(lease.id);
    try {
      this.save();
    } catch (err) {
      if (before) this.put(before);
      else this.drop(lease.id);
      if (wasVolatile) this.volatile.add(lease.id);
      if (owed) this.downs.set(lease.id, owed);
      this.pending.delete(lease.id);
      throw err;
    }
  }

  /** These creates are done: their leases are granted, durably (one write); throws, changing nothing, when not. */
  confirm(ids: readonly string[]): void {
    const done = ids.filter((id) => this.pending.delete(id));
    if (done.length === 0) return;
    try {
      this.save();
    } catch (err) {
      for (const id of done) this.pending.add(id);
      throw err;
    }
  }

  /** Leases whose create was still running when the table was last written. */
  unfinished(): string[] {
    return [...this.pending];
  }

  /** Is this lease written to disk? */
  durable(id: string): boolean {
    return this.byId.has(id) && !this.volatile.has(id);
  }

  /** Drops a lease from memory only (a failed add already did). */
  forget(id: string): void {
    this.drop(id);
    this.volatile.delete(id);
  }

  /**
   * Removes a lease; one plugged into a network stays owed its `down` (in the same write) until
   * `unplugged`. Never throws: a table that cannot be written then lists a lease too many, which the next
   * start drops (its device is gone); a removal must never fail the teardown it records.
   */
  remove(id: string, retiring?: Omit<StateFile['retiring'][number], 'lease'>): LeaseRecord | undefined {
    const l = this.byId.get(id);
    if (l) {
      this.drop(id);
      this.pending.delete(id);
      if (l.plug) this.downs.set(id, l);
      // A deletion to come: its record is written with the removal (a memory-only lease's too).
      if (retiring) this.retiring.set(id, { lease: l, ...retiring });
      if (!this.volatile.delete(id) || retiring) this.trySave();
    }
    return l;
  }

  /** A device of ours gone out of reach with its tag (moved to another network namespace): left alone for good. */
  keep(id: string): void {
    this.kept.add(id);
    this.trySave();
  }

  /** A retiring lease's record is written: it is owed no more. */
  retired(id: string): void {
    if (this.retiring.delete(id)) this.trySave();
  }

  /** An ended lease's network `down` has run (or failed for good): it is owed no more. */
  unplugged(id: string): void {
    if (this.downs.delete(id)) this.trySave();
  }

  /** Forgets Open vSwitch database `db` (a retired one) once no lease and no owed `down` names it. */
  forgetDb(db: string): void {
    const names = (l: LeaseRecord) => !!l.plug && 'ovs' in l.plug && l.plug.db === db;
    if ([...this.byId.values(), ...this.downs.values()].some(names) || !this.dbs.delete(db)) return;
    this.trySave();
  }

  /** Ended leases whose network's `down` has not run. */
  owedDowns(): LeaseRecord[] {
    return [...this.downs.values()];
  }

  /** Records, durably, that a device is about to be made; throws when it cannot. */
  intend(intent: Intent): void {
    this.intents.set(intent.id, intent);
    try {
      this.save();
    } catch (err) {
      this.intents.delete(intent.id);
      throw err;
    }
  }

  /** The intent is carried out (its lease added) or abandoned; `save` false when a save follows anyway. */
  settle(id: string, save = true): void {
    if (this.intents.delete(id) && save) this.trySave();
  }

  /** The last write's failure, or null: reported once by whoever watches (status, logs). */
  writeError: string | null = null;
  /** The broker's log (Lifetimes sets it): where a table that stops being written, and starts again, is said. */
  log: (line: string) => void = () => {};

  private trySave(): void {
    try {
      this.save();
    } catch {
      // Recorded in writeError by save().
    }
  }

  unsettled(): Intent[] {
    return [...this.intents.values()];
  }

  /**
   * At a stop: the table with its memory-only leases too, so that the next start finds a lease whose tap
   * went while the broker was down, and records its end (an outside review found grants whose end was never
   * recorded). That start keeps them in memory again, and its first write leaves them out.
   */
  snapshot(): void {
    this.save(true);
  }

  /** Leases loaded from a stop's snapshot still in the file (see snapshot). */
  get snapshotted(): boolean {
    return this.volatile.size > 0;
  }

  /** Writes the table to a temporary file, syncs it, renames it over the old one, syncs the directory. */
  save(all = false): void {
    this.writes++;
    if (!this.dir) return;
    const file = path.join(this.dir, STATE_FILE);
    try {
      const leases = this.all().filter((l) => all || !this.volatile.has(l.id));
      const table = {
        version: 1, broker: BROKER_VERSION, leases, intents: this.unsettled(), ovsdbs: this.ovsdbs(),
        downs: this.owedDowns(), pending: this.unfinished(), kept: [...this.kept], taken: this.taken,
        retiring: [...this.retiring.values()],
      };
      replaceFile(file, `${JSON.stringify(table)}\n`);
      if (this.writeError !== null) this.log(`the lease table is written again (${file})`);
      this.writeError = null;
    } catch (err) {
      const was = this.writeError;
      this.writeError = `cannot write ${file}: ${(err as Error).message}`;
      // Said once until it is written again: a release meanwhile leaves the file listing a device that is gone.
      if (was === null) {
        this.log(`warning: the lease table cannot be written (${this.writeError}); until it can, devices whose lease `
          + 'must be (persistent devices, macvtaps, locked ports, Open vSwitch and hook networks) are refused, and '
          + 'the file may list devices that are gone (the next start finds them gone)');
      }
      throw err;
    }
  }
}

/** The kernel's limit on an ifalias (IFALIASZ 256, with its NUL): a longer one is refused (EINVAL). */
export const ALIAS_MAX = 255;

/**
 * The ifalias every device carries: who made it and for whom first (`lease broker uid kind ends`), then
 * the rest of its lease, so the kernel alone can tell whose it is and, when `complete`, rebuild the
 * lease whole. Where the whole lease does not fit (long rule and network names), the tag names only
 * who made it, and the lease must live in the table (`complete` false).
 */
export function leaseTag(l: LeaseRecord, broker: string): { alias: string; complete: boolean } {
  const who = `tapbroker lease=${l.id} broker=${broker} uid=${l.uid} kind=${l.kind} ends=${l.ends}`;
  // A tap's guest MAC, or the host side's own address when the hypervisor sets the guest's.
  const mac = l.kind !== 'tap' ? ''
    : l.mac !== null ? ` mac=${l.mac}` : l.host_mac !== null ? ` host=${l.host_mac}` : '';
  const holder = l.holder !== null ? ` holder=${l.holder}:${l.holder_start ?? 0}` : '';
  const group = l.group !== null ? ` group=${l.group}` : '';
  // When it was made, in seconds (base 36): a lease taken back after a restart keeps its age.
  const made = Date.parse(l.created);
  const at = Number.isFinite(made) ? ` at=${Math.floor(made / 1000).toString(36)}` : '';
  // A port lock and a VLAN, so that a lease taken back from its tag (the table lost) is locked and placed as it
  // was granted (an outside review: rebuilt leases came back unlocked).
  const lock = `${l.locked ? ' locked=1' : ''}${l.vlan !== null ? ` vlan=${l.vlan}` : ''}`;
  const alias = `${who} rule=${l.rule} parent=${l.parent} queues=${l.queues}${mac}${l.mode ? ` mode=${l.mode}` : ''}`
    + `${l.network ? ` network=${l.network}` : ''}${lock}${holder}${group}${at}`;
  return alias.length <= ALIAS_MAX ? { alias, complete: true } : { alias: who, complete: false };
}

/**
 * A lease the kernel bounds by itself and its tag describes whole: a tap that goes with its last fd, on a
 * Linux bridge, with no port lock to restore. The broker keeps it in memory only (no write, no fsync per
 * grant) and, after a restart, takes it back from the device's tag. Every other lease is written to disk.
 */
export function kernelBound(l: LeaseRecord, complete: boolean): boolean {
  return complete && l.kind === 'tap' && l.ends === 'fds' && l.plug === null && !l.locked;
}

/** Who a tag says made a device, even one that names no more (a lease too long for its tag); null if not ours. */
export function aliasIdentity(alias: string | null): { id: string; uid: number; kind: 'tap' | 'macvtap' } | null {
  const m = /^tapbroker lease=([0-9a-f]{16}) (?:.* )?uid=(\d+) kind=(tap|macvtap)(?: |$)/.exec(alias ?? '');
  return m ? { id: m[1]!, uid: Number(m[2]), kind: m[3] as 'tap' | 'macvtap' } : null;
}

/**
 * Which broker tagged a device: its state directory's identity (brokerId). Null for tags written before
 * brokers tagged themselves, which every broker takes for its own.
 */
export function aliasBroker(alias: string | null): string | null {
  return / broker=([0-9a-f]+)(?: |$)/.exec(alias ?? '')?.[1] ?? null;
}

const KEEP_ID = 'another would leave this broker\'s devices to no one: put back the one its devices\' tags carry '
  + '(broker=… in `ip -d link` ifalias), or remove the file if none carries one';

/**
 * A broker's identity in its devices' tags and ports, so that two brokers never take each other's: drawn at random
 * where the state directory has none, and kept in it (`broker-id`). It was the digest of the directory's path,
 * which two brokers in two mount namespaces (two containers on the host's network, each with its own /run/tapbroker)
 * shared: an outside review's restart of one deleted the other's VM's tap and port. 0.4 (and 0.5 builds before
 * `broker-id`) tagged devices with that digest: where the file is missing, a broker ran here before (its lease table
 * is there, whatever it holds) and a device's tag carries the digest, it is this broker's identity still, kept in
 * the file from then on (an outside review's upgrade from 0.4 drew another, and left every device 0.4 made to no
 * one; its re-test's fresh broker, at the same path in another container, took the digest from an upgraded one's
 * devices alone, and with it their devices). A file that is there and holds no id is an error, never replaced: another
 * identity would leave this broker's devices to no one (a re-test's garbage in it did, with nothing said). One drawn
 * and not kept (a full or read-only state directory) tags no device until it is (keep): it fell back to that digest,
 * and the next start, on a writable directory, drew another and left the devices tagged meanwhile to no one (two
 * outside reviews: a VM's tap outside its quota and its terms).
 */
export class BrokerId {
  private constructor(readonly value: string, private readonly file: string | null, private kept: boolean,
    private readonly log: (line: string) => void) {}

  /** `aliases`: the tags of the devices in the namespace (read only where the file is missing). */
  static load(
    stateDir: string | null, log: (line: string) => void = () => {},
    aliases: () => ReadonlyArray<string | null> = () => [],
  ): BrokerId {
    const digest = (dir: string) => createHash('sha256').update(dir).digest('hex').slice(0, 8);
    if (stateDir === null) return new BrokerId(digest('-'), null, true, log);
    const file = path.join(stateDir, 'broker-id');
    let kept: string | null = null;
    try {
      kept = readRegular(file, 64, false).trim();
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') {
        throw new Error(`cannot read the broker's identity from ${file}: ${(err as Error).message}; ${KEEP_ID}`);
      }
    }
    if (kept !== null && !/^[0-9a-f]{8}$/.test(kept)) {
      throw new Error(`${file} holds no broker identity (8 hex digits); ${KEEP_ID}`);
    }
    let drawn = randomOctets(4).toString('hex');
    if (kept === null) {
      let dir = stateDir;
      try {
        dir = fs.realpathSync(stateDir);
      } catch {
        // Not created: the name as given, as 0.4 had it.
      }
      const ranHere = fs.lstatSync(path.join(stateDir, STATE_FILE), { throwIfNoEntry: false }) !== undefined;
      if (ranHere && aliases().some((a) => aliasBroker(a) === digest(dir))) {
        drawn = digest(dir);
        log(`the broker's identity is ${drawn}, its state directory's digest, which its devices' tags carry (made by `
          + `an earlier version): kept in ${file}`);
      }
    }
    const id = new BrokerId(kept ?? drawn, file, kept !== null, log);
    id.keep();
    return id;
  }

  private failing = false;

  /** Keeps the identity in the state directory if it is not yet: null once it is, else why not (tried again). */
  keep(): Error | null {
    if (this.kept || this.file === null) return null;
    const why = this.store();
    if (why) {
      if (!this.failing) {
        this.log(`warning: the broker's identity cannot be kept in ${this.file} (${why.message}): no device is made `
          + 'until it is');
      }
      this.failing = true;
      return why;
    }
    if (this.failing) this.log(`the broker's identity is kept in ${this.file} now: devices are made again`);
    this.kept = true;
    return null;
  }

  private store(): Error | null {
    try {
      replaceFile(this.file!, `${this.value}\n`);
      return null;
    } catch (err) {
      // The file may be in place with a later step failed (the directory's fsync): kept all the same.
      try {
        return readRegular(this.file!, 64, false).trim() === this.value ? null : err as Error;
      } catch {
        return err as Error;
      }
    }
  }
}

/**
 * The lease a device's ifalias describes, with name, ifindex and MAC from the device itself; null if it is not
 * ours.
 */
export function leaseFromAlias(
  alias: string | null,
  dev: { name: string; index: number; address: Buffer | null },
): LeaseRecord | null {
  if (!alias?.startsWith('tapbroker ')) return null;
  const f = new Map(alias.slice(10).split(' ').map((kv) => kv.split('=', 2) as [string, string]));
  const [holder, start] = (f.get('holder') ?? '').split(':');
  const own = dev.address ? macFromBuffer(dev.address) : '00:00:00:00:00:00';
  const candidate = {
    id: f.get('lease'), uid: Number(f.get('uid')), user: null, kind: f.get('kind'), name: dev.name, ifindex: dev.index,
    parent: f.get('parent'), network: f.get('network') ?? null, mode: f.get('mode') ?? null,
    // A tap's guest MAC is in its tag (before 0.5.0 it was not: then, like a macvtap's, the device's own).
    mac: f.get('kind') === 'tap' && (f.has('mac') || f.has('host')) ? (f.get('mac') ?? null) : own,
    queues: Number(f.get('queues') ?? 1), rule: f.get('rule'), created: createdAt(f.get('at')), ends: f.get('ends'),
    holder: holder ? Number(holder) : null, holder_start: start ? Number(start) : null,
    group: f.has('group') ? Number(f.get('group')) : null, plug: null, host_mac: f.get('host') ?? null,
    locked: f.get('locked') === '1', vlan: f.has('vlan') ? Number(f.get('vlan')) : null,
  };
  const parsed = checkShape(leaseShape(), candidate);
  return parsed.ok ? (parsed.value as LeaseRecord) : null;
}

/** A tag's `at=` (seconds, base 36) as a lease's `created`; tags before 0.5.0 have none: now. */
function createdAt(at: string | undefined): string {
  const seconds = at && /^[0-9a-z]{1,10}$/.test(at) ? parseInt(at, 36) : NaN;
  const when = new Date(seconds * 1000);
  return Number.isFinite(seconds) && !Number.isNaN(when.getTime()) ? when.toISOString() : new Date().toISOString();
}
