// One lease per device the broker made. A tap handed out by fd vanishes when its last fd closes,
// so a lease is live only while a link with its ifindex and name still exists.
export interface Lease {
  uid: number;
  rule: string;
  kind: 'tap';
  name: string;
  ifindex: number;
  bridge: string;
  mac: string;
  created: string;
}

export class Leases {
  private readonly byIndex = new Map<number, Lease>();

  /** `exists(ifindex, name)` asks the kernel whether that very device is still there. */
  constructor(private readonly exists: (ifindex: number, name: string) => boolean) {}

  add(lease: Lease): void {
    this.byIndex.set(lease.ifindex, lease);
  }

  remove(ifindex: number): void {
    this.byIndex.delete(ifindex);
  }

  /** Live devices of `uid` charged to `rule`; leases whose device is gone are dropped first. */
  live(uid: number, rule: string): number {
    let n = 0;
    for (const l of [...this.byIndex.values()]) {
      if (l.uid !== uid || l.rule !== rule) continue;
      if (this.exists(l.ifindex, l.name)) n++;
      else this.byIndex.delete(l.ifindex);
    }
    return n;
  }

  get size(): number {
    return this.byIndex.size;
  }
}
