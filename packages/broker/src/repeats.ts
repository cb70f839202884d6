// Link events that repeat a state of a lease's device already judged as granted. Any holder can make its tap send
// events without end (an offload toggled: no capability needed), each of which costs the broker a decode and four
// sysfs reads (an event numbers a tap's owner as the task that sent it sees it: see Lifetimes.onLink); an outside
// review kept everyone's requests waiting up to 0.3 s every second that way, under every flood limit. An event that
// repeats a judged state of an fd-bound tap is not judged again at once: the device is looked at once more within
// REPEAT_CHECK_MS. What such an event may hide is an owner numbered alike from another user namespace, and what that
// owner could do there, attach a queue, is a queue beyond the lease's: a state of its own, judged at once, and a
// breach whoever did it. A persistent tap's queues are anyone's its owner or group lets in: its events are all
// judged at once (a re-test hid a group tap's regroup in the window and let a denied uid attach).
import type { LeaseRecord } from './leases.js';
import type { Link } from './rtnetlink.js';

/** How soon a device whose events repeated a judged state is looked at again. */
export const REPEAT_CHECK_MS = 50;
/** States kept per device (a holder may alternate between a few: a queue disabled and enabled). */
const KEPT = 4;

/** A device's state as an event shows it: what a judgement reads, nothing that moves with traffic. */
export function stateOf(link: Link): string {
  const t = link.tun;
  return [link.flags, link.name, link.master, link.address?.toString('hex'), link.mtu, link.alias, link.persist,
    t?.owner, t?.group, t?.queues, link.portLocked, link.kind, link.link].join('|');
}

export class Repeats {
  private readonly states = new WeakMap<LeaseRecord, string[]>();
  private readonly due = new Map<number, NodeJS.Timeout>();

  /** `again`: judges `link` (a copy of a repeated event) as a fresh event, once the delay is over. */
  constructor(private readonly again: (link: Link) => void) {}

  /**
   * Does `link` repeat a state of `l` judged as granted (and is it not that judgement `again`)? Then it is judged
   * again within REPEAT_CHECK_MS.
   */
  repeated(l: LeaseRecord, link: Link, state: string, again: boolean): boolean {
    // Not a persistent tap's: whoever its owner or group lets in may attach a queue, so an owner or group changed
    // for a moment from another user namespace let someone in unseen by a state of its own (an outside re-test).
    if (again || l.ends === 'release' || !this.states.get(l)?.includes(state)) return false;
    if (!this.due.has(link.index)) {
      const copy: Link = { ...link, address: link.address ? Buffer.from(link.address) : null };
      this.due.set(link.index, setTimeout(() => {
        this.due.delete(link.index);
        this.again(copy);
      }, REPEAT_CHECK_MS).unref());
    }
    return true;
  }

  /** `state` of `l`'s device was judged as granted. */
  granted(l: LeaseRecord, state: string): void {
    const kept = this.states.get(l) ?? [];
    if (kept.includes(state)) return;
    this.states.set(l, [state, ...kept].slice(0, KEPT));
  }

  close(): void {
    for (const t of this.due.values()) clearTimeout(t);
    this.due.clear();
  }
}
