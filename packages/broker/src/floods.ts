// Floods of link events: a holder toggling its tap's offloads, MTU or carrier in a loop (no capability
// needed) makes one link event per change, which every other user's request would wait behind. Counted per
// device and per uid each second; a flood's device is deleted (lifetimes.ts) and its uid's creates wait.
import type { LeaseRecord } from './leases.js';

/** Link events one device may send per second; real devices send a handful when they change. */
export const MAX_LINK_EVENTS_PER_SECOND = 500;
/** Link events the devices of one uid may send per second together (many taps, each under the limit). */
export const MAX_LINK_EVENTS_PER_UID = 2000;
/** After a flood, the uid's creates wait this long, doubling with each flood up to FLOOD_COOLDOWN_MAX_MS. */
const FLOOD_COOLDOWN_MS = 1000;
const FLOOD_COOLDOWN_MAX_MS = 300_000;
/**
 * After a device's bridge changes (root moving it on or off a bridge: nothing its holder can do), its events
 * are not counted for this long: the kernel's follow-ups (carrier, promiscuity, the broker's relock) are
 * root's doing too, and a root toggling a port fast is not its holder's flood.
 */
const MOVED_GRACE_MS = 100;
/** Per-uid entries (windows, cool-downs) past which the stale ones are dropped. */
const PRUNE_AT = 256;

/** A count of events in the current second. */
interface EventWindow {
  n: number;
  since: number;
}

/** Counts one event in `key`'s window at `now` (ms); returns the window's count. */
function tick(windows: Map<number, EventWindow>, key: number, now: number): number {
  let w = windows.get(key);
  if (!w || now - w.since > 1000) windows.set(key, (w = { n: 0, since: now }));
  return ++w.n;
}

/** A flood found: the lease whose device goes, and the record's message. */
export interface Flood {
  victim: LeaseRecord;
  message: string;
}

export class Floods {
  /** Link events per device (by ifindex) and per uid in the current second. */
  private readonly events = new Map<number, EventWindow>();
  private readonly uidEvents = new Map<number, EventWindow>();
  /** Uids whose devices flooded: their creates wait until `until`; the next flood waits `next`. */
  private readonly cooldowns = new Map<number, { until: number; next: number }>();
  /** Each device's bridge (IFLA_MASTER, 0 for none) as its last counted event had it, and its grace's end. */
  private readonly masters = new Map<number, { master: number; graceUntil: number }>();

  /** `leaseOf`: the live lease (create finished) of a device, for finding a uid's loudest one. */
  constructor(private readonly leaseOf: (ifindex: number) => LeaseRecord | undefined) {}

  /**
   * Counts one link event of `l`'s device. A device sending more than MAX_LINK_EVENTS_PER_SECOND, or one
   * of a uid whose devices send more than MAX_LINK_EVENTS_PER_UID together, is being used against the
   * broker: returns the flood (the device to delete), and the uid's creates wait from now on. `master`:
   * the event's bridge; events right after it changes are not the holder's (MOVED_GRACE_MS).
   */
  count(l: LeaseRecord, master: number | null): Flood | null {
    const now = performance.now();
    if (this.moved(l.ifindex, master ?? 0, now)) return null;
    if (this.uidEvents.size + this.cooldowns.size > PRUNE_AT) this.prune(now);
    const device = tick(this.events, l.ifindex, now) > MAX_LINK_EVENTS_PER_SECOND;
    // Per uid too, and kept after its devices go: a uid that floods from a new tap each time is still seen.
    if (!device && tick(this.uidEvents, l.uid, now) <= MAX_LINK_EVENTS_PER_UID) return null;
    // Of the uid's devices, the one that sent the most this second goes (not whichever sent the last event),
    // and the uid's count starts over: one flood takes one device, and the cool-down grows once.
    const victim = device ? l : this.loudest(l);
    this.events.delete(victim.ifindex);
    if (!device) this.uidEvents.delete(l.uid);
    // Charged to the owner even for a tap it gave to a group, whose flood any member may have made: the owner
    // chose the group, and a charge a group could lift would let an owner flood through its own group freely.
    const wait = this.coolDown(l.uid, now);
    // The record does not claim to know who it was: the kernel does not say which holder made the changes.
    const holder = l.group !== null ? `a holder (its owner or a member of group ${l.group}, which it was given to)`
      : 'its holder';
    const message = (device
      ? `${holder} made it send more than ${MAX_LINK_EVENTS_PER_SECOND} link events in a second`
      : `the devices of uid ${l.uid} sent more than ${MAX_LINK_EVENTS_PER_UID} link events in a second, this one `
        + 'the most')
      + ` (a flood of changes): deleted; the uid's new devices wait ${Math.ceil(wait / 1000)} s`;
    return { victim, message };
  }

  /** A device gone: its count with it. */
  forget(ifindex: number): void {
    this.events.delete(ifindex);
    this.masters.delete(ifindex);
  }

  /** Did root just move this device to or off a bridge (its first event's bridge is taken as it is)? */
  private moved(ifindex: number, master: number, now: number): boolean {
    const m = this.masters.get(ifindex);
    if (!m) this.masters.set(ifindex, { master, graceUntil: 0 });
    else if (m.master !== master) Object.assign(m, { master, graceUntil: now + MOVED_GRACE_MS });
    return !!m && now < m.graceUntil;
  }

  /** How long `uid`'s creates must still wait after a flood of link events from its devices (ms; 0: none). */
  coolingDown(uid: number): number {
    const c = this.cooldowns.get(uid);
    return c ? Math.max(0, Math.ceil(c.until - performance.now())) : 0;
  }

  /** The lease of `l`'s uid whose device sent the most link events this second. */
  private loudest(l: LeaseRecord): LeaseRecord {
    let top = l;
    let most = this.events.get(l.ifindex)?.n ?? 0;
    for (const [ifindex, w] of this.events) {
      const o = w.n > most ? this.leaseOf(ifindex) : undefined;
      if (o && o.uid === l.uid) {
        top = o;
        most = w.n;
      }
    }
    return top;
  }

  /**
   * After a flood: the uid's creates are refused for a while, twice as long as after its last flood. Floods
   * within a cool-down (more of its devices flooding at once) do not lengthen it; what remains is returned.
   */
  private coolDown(uid: number, now: number): number {
    const c = this.cooldowns.get(uid);
    if (c && now < c.until) return c.until - now;
    // A flood long after the last cool-down ended starts over.
    const wait = c && now < c.until + FLOOD_COOLDOWN_MAX_MS ? c.next : FLOOD_COOLDOWN_MS;
    this.cooldowns.set(uid, { until: now + wait, next: Math.min(2 * wait, FLOOD_COOLDOWN_MAX_MS) });
    return wait;
  }

  /** Drops per-uid windows and cool-downs that no longer count for anything. */
  private prune(now: number): void {
    for (const [uid, w] of this.uidEvents) if (now - w.since > 1000) this.uidEvents.delete(uid);
    for (const [uid, c] of this.cooldowns) if (now > c.until + FLOOD_COOLDOWN_MAX_MS) this.cooldowns.delete(uid);
  }
}
