// Joining a device to a named network that is not a plain Linux bridge: an Open vSwitch port, or an
// administrator's hook. The lease records how it was plugged, so unplugging never consults a later policy.
import { BOOT_KEY, addPort, currentBoot, delPortOf, ovsdbGone, ovsdbTarget } from './ovs.js';
import { HookNotRun, runHook, type HookResult, type HookRun } from './hook.js';
import type { AuditEvent } from './audit.js';
import type { Network } from './decide.js';
import { leaseView, type LeaseRecord, type LeaseTable, type Plug } from './leases.js';

/**
 * Tries at a `down` cut short (a hook's), 1 s, 2 s, 4 s … apart (about 8.5 minutes in all), then owed to the next
 * start. A lease's Open vSwitch port is tried for as long as the broker runs, 5 minutes apart past these, its
 * failures recorded no more: ovs-vswitchd would take any device of its name into it (an outside review's outage of
 * 9 minutes left one, its name held with nobody trying).
 */
const UNPLUG_ATTEMPTS = 10;
const UNPLUG_SLOWEST_S = 300;
/**
 * Failed tries in a row (about an hour: 1 + 2 + … + 256 s, then 300 s apart) that found a port's database retired
 * (named by no network, its socket's directory gone) before its removal is dropped: an outside review's retired Open
 * vSwitch kept one owed for good, tried and recorded at every start. A service manager removes that directory when it
 * stops some Open vSwitch units (its re-test): an hour of maintenance is waited for.
 */
const RETIRED_TRIES = 20;

/** The Open vSwitch databases `networks` (the policy's) name. */
export function namedDbs(networks: Iterable<Network>): Set<string> {
  const dbs = new Set<string>();
  for (const n of networks) if (n.kind === 'ovs') dbs.add(ovsdbTarget(n.ovsdb ?? undefined));
  return dbs;
}

/** Is a database retired: named by no network of `networks()` (the policy's now), and gone (see ovsdbGone)? */
export function retired(networks: () => ReadonlyMap<string, Network>): (db: string) => boolean {
  return (db) => !namedDbs(networks().values()).has(db) && ovsdbGone(db);
}

/** How a device joins `net`, or null for a Linux bridge (attached by the kernel step itself). */
export function plugOf(net: Network | undefined): Plug | null {
  if (!net || net.kind === 'bridge') return null;
  if (net.kind === 'ovs') return { ovs: net.target, db: ovsdbTarget(net.ovsdb ?? undefined) };
  return { hook: net.target, timeout_ms: net.hookTimeoutMs };
}

/** Plugs (`up`) a lease's device as its lease says; the OVS port carries the lease in its external-ids. */
export async function plugUp(
  l: LeaseRecord,
  net: Network | undefined,
  broker: string,
  run: HookRun,
): Promise<Record<string, unknown> | null> {
  const p = l.plug;
  if (!p) return null;
  if ('ovs' in p) {
    const carries = net?.vlan != null ? { tag: net.vlan } : net?.trunk ? { trunks: [...net.trunk] } : {};
    await addPort(p.db, p.ovs, l.name, {
      ...carries,
      externalIds: {
        'tapbroker-lease': l.id,
        'tapbroker-uid': String(l.uid),
        ...(l.mac !== null ? { 'tapbroker-mac': l.mac } : {}),
        'tapbroker-rule': l.rule,
        // Which broker's: another broker in this namespace (another state directory) leaves it alone.
        'tapbroker-broker': broker,
        // Which boot's: after a reboot (a new identity, /run being empty) it is stale, whoever's it was.
        ...(currentBoot() !== null ? { [BOOT_KEY]: currentBoot()! } : {}),
      },
    });
    // The record says what the port carries, as addPort was told (an outside review found a trunk's said nothing).
    return { ovs: p.ovs, action: 'up', ...carries };
  }
  run.save();
  return runPlugHook(l, p, 'up', run.current);
}

/** Unplugs a lease's device (`down`) as its lease says. */
export async function plugDown(l: LeaseRecord, run: HookRun): Promise<Record<string, unknown> | null> {
  const p = l.plug;
  if (!p) return null;
  if ('ovs' in p) {
    // Only the port that carries this lease: one of that name made by someone else (an administrator's, on
    // which this lease's add-port failed) is not ours to remove.
    const removed = await delPortOf(p.db, p.ovs, l.name, l.id);
    return removed ? { ovs: p.ovs, action: 'down' } : null;
  }
  try {
    run.save();
  } catch {
    // A `down` runs all the same (its device is going); only a crash during it would leave it running.
  }
  return runPlugHook(l, p, 'down', run.current);
}

async function runPlugHook(
  l: LeaseRecord, p: { hook: string; timeout_ms: number }, action: 'up' | 'down', run: string,
) {
  const ctx = {
    device: l.name,
    ifindex: l.ifindex,
    mac: l.mac ?? '-',
    uid: l.uid,
    network: l.network ?? '-',
    lease: l.id,
    run,
  };
  const r = await runHook(p.hook, action, ctx, p.timeout_ms);
  return { hook: p.hook, action, code: r.code, stdout: r.stdout, stderr: r.stderr, ms: r.ms };
}

type Note = (
  op: AuditEvent['op'], decision: AuditEvent['decision'], l: LeaseRecord, message: string, extra?: Partial<AuditEvent>,
) => void;

/** Devices being unplugged from their networks, by name and by uid; a port not removed is tried again. */
export class Unplugs {
  private readonly running = new Set<Promise<unknown>>();
  /** Names whose device is being unplugged, with how many: no new device takes the name meanwhile. */
  private readonly names = new Map<string, number>();
  /** Unpluggings running (a hook's `down`, an OVS del-port) per uid: counted with its teardowns (see of). */
  private readonly uids = new Map<number, number>();
  private closing = false;
  /** Tries waiting for their time. */
  private retries = 0;
  /** Open vSwitch ports that are not this broker's: no new device takes their names. */
  readonly foreign = new ForeignPorts();

  constructor(
    private readonly table: Pick<LeaseTable, 'unplugged' | 'forgetDb'>,
    private readonly note: Note,
    private readonly run: HookRun,
    /** Is this database retired: named by no network of the policy, and gone? (None is, unless told.) */
    private readonly retired: (db: string) => boolean = () => false,
    /** Milliseconds before the try after `attempt` (tests shorten them). */
    private readonly delayMs = (attempt: number) => 1000 * delay(attempt),
  ) {}

  /**
   * Undoes a device's OVS port or runs its hook's `down`, as its lease says. Never throws. `gone`: the tries before
   * this one, in a row, that found its database retired.
   */
  unplug(l: LeaseRecord, attempt = 1, gone = 0): void {
    if (!l.plug) return;
    const db = 'ovs' in l.plug ? l.plug.db : null;
    const ovs = db !== null;
    // Counted once per lease, across its tries.
    if (attempt === 1) count(this.names, l.name, +1);
    count(this.uids, l.uid, +1);
    let again = false;
    let failed = false;
    let cut = false;
    const p = plugDown(l, this.run).then(
      (r) => {
        this.table.unplugged(l.id);
        const device = { ...leaseView(l), plug: r };
        // Its own op: the device's end has its record already (an outside review counted two ends per device). After
        // failed tries, the one that found nothing to remove says so: the trail of its failures ends (a review's
        // never did).
        if (r) this.note('unplug', 'unplug', l, 'unplugged from its network', { device });
        else if (attempt > 1) {
          this.note('unplug', 'unplug', l, 'nothing was left to remove from its network', { device });
        }
      },
      (err: Error) => {
        // An Open vSwitch port left behind would take any later device of that name (vswitchd opens it by
        // name): tried again, later and later, and the name is not given out meanwhile. A hook said what it
        // said: its failure is recorded, not repeated.
        failed = true;
        // A hook killed by someone else (a service manager stopping the unit signals its whole cgroup, the broker
        // and this `down` at once: an outside review lost downs to every upgrade) gave no answer: tried again, as a
        // port is, and owed to the next start if the broker is stopping.
        const r = (err as { hook?: HookResult }).hook;
        cut = !ovs && ((!!r?.signal && !r.timed_out) || err instanceof HookNotRun);
        again = (ovs || (cut && attempt < UNPLUG_ATTEMPTS)) && !this.closing;
        // A port not removed stays owed (the next start tries again); a hook's failure is its answer.
        if (!ovs && !cut) this.table.unplugged(l.id);
        gone = db !== null && this.retired(db) ? gone + 1 : 0;
        if (gone >= RETIRED_TRIES) {
          // No port to remove can come back but with its database, which no network names now: dropped, said once.
          again = failed = false;
          this.table.unplugged(l.id);
          this.table.forgetDb(db!);
          this.note('unplug', 'unplug', l, `its port's removal is dropped: no network names Open vSwitch database ${db}`
            + ` any more, and it has been gone (its socket's directory too) at ${gone} tries in a row`);
          return;
        }
        if (attempt > UNPLUG_ATTEMPTS) return;
        const next = !again ? (cut ? '; it runs again at the broker\'s next start' : '')
          : attempt < UNPLUG_ATTEMPTS ? `; trying again in ${delay(attempt)} s`
          : `; tried again every ${UNPLUG_SLOWEST_S / 60} minutes from now on, its failures no more recorded`;
        const retiring = gone > 0 && again
          ? ` (no network names its database and it is gone: dropped if still so at ${RETIRED_TRIES} tries in a row)`
          : '';
        this.note('unplug', 'error', l, `unplugging failed: ${err.message}${next}${retiring}`,
          { code: 'TB_E_HOOK_FAILED' });
      },
    );
    this.running.add(p);
    void p.finally(() => {
      this.running.delete(p);
      count(this.uids, l.uid, -1);
      if (again) {
        this.retries++;
        setTimeout(() => (this.retries--, this.unplug(l, attempt + 1, gone)), this.delayMs(attempt)).unref();
      }
      // A port never removed, or a `down` still owed, keeps its name from new devices until the broker restarts.
      if (again || ((ovs || cut) && failed && !this.closing)) return;
      count(this.names, l.name, -1);
    });
  }

  /**
   * `uid`'s devices whose `down` (or OVS port removal) runs now: their leases have left the table and its quota,
   * but each may hold a root process for up to the hook's timeout (an outside review kept 104 running from
   * max_devices = 2), so they count as its teardowns do.
   */
  of(uid: number): number {
    return this.uids.get(uid) ?? 0;
  }

  /**
   * Nothing running or to try again (a broker that exits when idle would leave a port until its next start). A `down`
   * owed to the next start keeps its name, not the broker: its re-test's never exited, and the start runs it.
   */
  get idle(): boolean {
    return this.running.size === 0 && this.retries === 0;
  }

  /** Is a device named `name` still being unplugged from its network (its hook's `down`, its OVS port)? */
  pending(name: string): boolean {
    return this.names.has(name);
  }

  /** May no new device be named `name` (pending, or a port not this broker's)? For names the broker picks. */
  taken(name: string): boolean {
    return this.pending(name) || this.foreign.of(name) !== null;
  }

  /**
   * Keeps `name` from new devices while a create plugs a device of that name, from its `up` to the create's end
   * (its rollback's `down` holds it from there): an outside review deleted its tap while the `up` ran, got the
   * name again at once, and the new lease's `up` overlapped the old one's `up` and rollback `down`. Returns the
   * release, which does nothing the second time.
   */
  hold(name: string): () => void {
    count(this.names, name, +1);
    let held = true;
    return () => {
      if (held) count(this.names, name, -1);
      held = false;
    };
  }

  /**
   * Waits for the unpluggings running, at most `ms` (a hook's `down` may run for up to 300 s, past a service
   * manager's stop timeout: an outside review saw a stop take 109 s); none is tried again after. One still
   * running stays owed in the lease table, and the next start runs it (after killing what this run left).
   */
  async close(ms: number): Promise<void> {
    this.closing = true;
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([Promise.all([...this.running]), new Promise((r) => (timer = setTimeout(r, ms)))]);
    clearTimeout(timer);
  }
}

/** Seconds before the try after `attempt`: 1, 2, 4 … up to UNPLUG_SLOWEST_S. */
const delay = (attempt: number) => Math.min(2 ** (attempt - 1), UNPLUG_SLOWEST_S);

function count<K>(m: Map<K, number>, k: K, by: number): void {
  const n = (m.get(k) ?? 0) + by;
  if (n > 0) m.set(k, n);
  else m.delete(k);
}

/**
 * The names of the ports in each Open vSwitch database this broker uses that are not its own (another broker's, one
 * made before 0.5.0 or by hand), listed at start and at each reload: ovs-vswitchd takes a new device of such a name
 * into its port, on that port's VLAN, whatever the device was granted for (an outside review's user with no rule for
 * an OVS network). Until a database the policy names has been listed once, no device gets a name its caller chose
 * (a re-test's did, while Open vSwitch was not answering yet at the broker's start).
 */
export class ForeignPorts {
  private readonly lists = new Map<string, { generation: number; names: ReadonlySet<string> }>();
  private wanted: ReadonlySet<string> = new Set();
  private unlisted = new Set<string>();
  private generation = 0;
  /** Leases whose port was found gone, said once (see reconcile.ts lostPorts). */
  readonly saidLost = new Set<string>();

  /**
   * A listing of `dbs` begins: the databases no longer among them are forgotten. Of those not listed yet, the ones
   * the policy names (`waited`) keep chosen names from devices until they are: a database the lease table alone
   * remembers (Open vSwitch since retired) is listed where it answers, never waited for (an outside re-test's
   * retired one refused every chosen name for good). Returns its generation.
   */
  listing(dbs: ReadonlySet<string>, waited: ReadonlySet<string>): number {
    this.wanted = dbs;
    for (const db of this.lists.keys()) if (!dbs.has(db)) this.lists.delete(db);
    this.unlisted = new Set([...waited].filter((db) => dbs.has(db) && !this.lists.has(db)));
    return ++this.generation;
  }

  /** A database's ports that are not this broker's, from listing `generation` (an older one's come too late). */
  listed(db: string, names: ReadonlySet<string>, generation: number): void {
    const known = this.lists.get(db);
    if (!this.wanted.has(db) || (known && known.generation > generation)) return;
    this.lists.set(db, { generation, names });
    this.unlisted.delete(db);
  }

  /** The database where a port named `name` is not this broker's, or null. */
  of(name: string): string | null {
    for (const [db, { names }] of this.lists) if (names.has(name)) return db;
    return null;
  }

  /** Is `db` still to be listed, by listing `generation` as the latest? (Waited for or not: see listing.) */
  awaits(db: string, generation: number): boolean {
    return generation === this.generation && this.wanted.has(db) && !this.lists.has(db);
  }

  /** A database not listed yet (not answering since the broker started, or named by a reload), or null. */
  waiting(): string | null {
    return this.unlisted.values().next().value ?? null;
  }
}
