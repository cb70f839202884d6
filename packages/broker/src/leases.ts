// The lease table: one lease per device the broker made, persisted under the state directory with
// atomic writes (a crash at any moment leaves the old file or the new one, never a mix).
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { z } from 'zod';
import { Lease } from '@tapbroker/protocol';

/** A lease as stored: the wire Lease plus the holder's start time, so a reused pid is never taken for it. */
export const LeaseRecord = Lease.extend({ holder_start: z.number().int().min(0).nullable() });
export type LeaseRecord = z.infer<typeof LeaseRecord>;
const StateFile = z.strictObject({ version: z.literal(1), leases: z.array(LeaseRecord) });

export const STATE_FILE = 'leases.json';

export function newLeaseId(): string {
  return randomBytes(8).toString('hex');
}

/** The wire form of a lease (no bookkeeping fields). */
export function leaseView(l: LeaseRecord): Lease {
  const { holder_start: _ignored, ...view } = l;
  return view;
}

/** Process start time in clock ticks since boot (/proc/<pid>/stat field 22), or null if there is no such process. */
export function processStartTime(pid: number): number | null {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return Number(fields[19]);
  } catch {
    return null;
  }
}

export class LeaseTable {
  private readonly byId = new Map<string, LeaseRecord>();

  /** `dir` null keeps the table in memory only. */
  private constructor(readonly dir: string | null) {}

  /**
   * Reads the table. A missing file is an empty table; an unreadable or invalid one is reported in
   * `problem` and also yields an empty table, which reconciliation then rebuilds from the kernel.
   */
  static load(dir: string | null): { table: LeaseTable; problem: string | null } {
    const table = new LeaseTable(dir);
    if (!dir) return { table, problem: null };
    const file = path.join(dir, STATE_FILE);
    let text: string;
    try {
      text = fs.readFileSync(file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { table, problem: null };
      return { table, problem: `cannot read ${file}: ${(err as Error).message}` };
    }
    let parsed: z.ZodSafeParseResult<z.infer<typeof StateFile>>;
    try {
      parsed = StateFile.safeParse(JSON.parse(text));
    } catch (err) {
      return { table, problem: `${file} is not JSON (${(err as Error).message}); starting from the kernel's view` };
    }
    if (!parsed.success) return { table, problem: `${file} is not a lease table (${parsed.error.issues[0]?.message}); starting from the kernel's view` };
    for (const l of parsed.data.leases) table.byId.set(l.id, l);
    return { table, problem: null };
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
    for (const l of this.byId.values()) if (l.ifindex === ifindex) return l;
    return undefined;
  }

  add(lease: LeaseRecord): void {
    this.byId.set(lease.id, lease);
    this.save();
  }

  remove(id: string): LeaseRecord | undefined {
    const l = this.byId.get(id);
    if (l) {
      this.byId.delete(id);
      this.save();
    }
    return l;
  }

  /** Writes the table to a temporary file, syncs it, renames it over the old one, syncs the directory. */
  save(): void {
    if (!this.dir) return;
    const file = path.join(this.dir, STATE_FILE);
    const tmp = `${file}.${process.pid}.tmp`;
    const fd = fs.openSync(tmp, 'w', 0o600);
    try {
      fs.writeSync(fd, `${JSON.stringify({ version: 1, leases: this.all() })}\n`);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, file);
    const dfd = fs.openSync(this.dir, 'r');
    try {
      fs.fsyncSync(dfd);
    } finally {
      fs.closeSync(dfd);
    }
  }
}
