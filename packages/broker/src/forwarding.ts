// Forwarding entries a holder took: whoever holds a tap fd can set the tap's MAC (SIOCSIFHWADDR needs no
// capability on it), and a bridge port taking a MAC makes the bridge move or drop that MAC's entries, a locked
// guest's static one included. What the broker can put back, it does: the entry of the lease whose MAC was
// taken, and every locked lease's static entry after a window in which it could not judge a holder's changes.
import { macFromBuffer, macToBuffer } from '@tapbroker/protocol/core';
import type { AuditEvent } from './audit.js';
import type { Kernel } from './kernel.js';
import type { LeaseRecord, LeaseTable } from './leases.js';

type Note = (
  op: string, decision: AuditEvent['decision'], l: LeaseRecord, message: string, extra?: Partial<AuditEvent>,
) => void;

/**
 * How long a MAC a holder's tap took stays unlockable on that bridge: the bridge deleted that MAC's entries
 * elsewhere (whoever it belongs to: another guest, a router behind the uplink), and a lock asked for it now
 * would find no entry to refuse it by. The bridge's default ageing time: by then its owner has sent again.
 */
const TAKEN_MS = 300_000;
/** MACs remembered as taken at most (the oldest go first): each took the deletion of a holder's tap. */
const MAX_TAKEN = 4096;

export class Forwarding {
  /** `bridge/mac` → until when no lock takes it (see TAKEN_MS). */
  private readonly taken = new Map<string, number>();

  constructor(
    private readonly kernel: Kernel,
    private readonly table: LeaseTable,
    private readonly note: Note,
    private readonly log: (line: string) => void,
    private readonly creating: (id: string) => boolean,
  ) {}

  /** A holder's tap on `bridge` showed `mac` as its own address: no lock takes that MAC there for a while. */
  noteTaken(bridge: string, mac: string): void {
    const key = `${bridge}/${mac}`;
    this.taken.delete(key);
    this.taken.set(key, Date.now() + TAKEN_MS);
    if (this.taken.size > MAX_TAKEN) this.taken.delete(this.taken.keys().next().value!);
  }

  /** Did a holder's tap on `bridge` take `mac` lately (noteTaken)? */
  takenLately(bridge: string, mac: string): boolean {
    const until = this.taken.get(`${bridge}/${mac}`);
    if (until === undefined) return false;
    if (until > Date.now()) return true;
    this.taken.delete(`${bridge}/${mac}`);
    return false;
  }

  /** `l`'s holder took `mac`: the port of the lease whose guest MAC it is (on `l`'s bridge) gets its entry back. */
  restoreTaken(l: LeaseRecord, mac: Buffer): void {
    const taken = macFromBuffer(mac);
    // A locked lease's if one holds it (no other tap there is granted a MAC a locked lease holds; one granted
    // before the lock loses it to the lock), else the oldest's.
    const holders = this.table.all().filter((v) => v.id !== l.id && v.kind === 'tap' && v.parent === l.parent
      && v.mac === taken);
    const victim = holders.find((v) => v.locked) ?? oldest(holders)[0];
    if (!victim) return;
    try {
      // A locked victim's entry is static again: its port forwards from that MAC only through it.
      this.kernel.restoreFdbEntry(victim.ifindex, mac, { static: victim.locked, vlan: victim.vlan });
      const message = `its forwarding entry for ${victim.mac}, taken by \`${l.name}', restored`;
      this.note('cleanup', 'cleanup', victim, message);
    } catch (err) {
      this.note('cleanup', 'error', victim, `its forwarding entry for ${victim.mac} could not be restored: `
        + `${(err as Error).message}`, { code: 'TB_E_KERNEL' });
    }
  }

  /** A locked lease's static forwarding entry, put back as it was granted (idempotent). */
  relock(l: LeaseRecord, why: string): void {
    try {
      this.kernel.restoreFdbEntry(l.ifindex, macToBuffer(l.mac!), { static: true, vlan: l.vlan });
    } catch (err) {
      this.note('cleanup', 'error', l, `its forwarding entry for ${l.mac} could not be put back (${why}): `
        + `${(err as Error).message}`, { code: 'TB_E_KERNEL' });
    }
  }

  /**
   * Every locked lease's static entry on `bridge`, put back: after a window in which a holder could change a
   * device's MAC with no lease to judge its events by (a persistent tap being made, a device being deleted).
   * Only ports still on that bridge; nothing is looked up where no lease there is locked.
   */
  relockBridge(bridge: string, why: string): void {
    // One lease per MAC and VLAN, the oldest (a state from before MACs locked were kept unique may have two).
    const seen = new Set<string>();
    const locked = oldest(this.table.all().filter((o) => o.locked && o.mac !== null && o.parent === bridge
      && !this.creating(o.id))).filter((o) => !seen.has(`${o.mac}/${o.vlan}`) && !!seen.add(`${o.mac}/${o.vlan}`));
    if (locked.length === 0) return;
    try {
      const master = this.kernel.linkNamed(bridge)?.index;
      for (const o of locked) {
        if (master !== undefined && this.kernel.link(o.ifindex)?.master === master) this.relock(o, why);
      }
    } catch (err) {
      this.log(`warning: locked ports of ${bridge} not checked (${why}): ${(err as Error).message}`);
    }
  }
}

/** Leases, the oldest first (by their creation time; ties in table order). */
function oldest(ls: LeaseRecord[]): LeaseRecord[] {
  return [...ls].sort((a, b) => a.created.localeCompare(b.created));
}
