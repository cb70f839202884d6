// The lease table's file as zod schemas: the source that state-shape.ts is generated from (npm run gen:shapes)
// and the types the broker uses. The broker itself checks the file with the generated shape and never
// loads this module (it imports only its types).
import { z } from 'zod';
import { Lease } from '@tapbroker/protocol';

/**
 * How a device was joined to its network, recorded with its lease so that undoing it never depends on
 * a later policy (a reload may retire or re-point the network).
 */
export const Plug = z.union([
  z.strictObject({ ovs: z.string(), db: z.string() }),
  z.strictObject({ hook: z.string(), timeout_ms: z.number().int().positive() }),
]);
export type Plug = z.infer<typeof Plug>;

/**
 * A lease as stored: the wire Lease plus the holder's start time (so a reused pid is never taken for
 * it), the group a persistent tap was given, and its plugging.
 */
export const LeaseRecord = Lease.extend({
  holder_start: z.number().int().min(0).nullable(),
  group: z.number().int().min(0).nullable().default(null),
  plug: Plug.nullable().default(null),
  /** The device's own address at the grant, judged at every link event (null in records before 0.4.0). */
  host_mac: z.string().nullable().default(null),
  /** Its access VLAN on a Linux bridge (the port lock's static entry is in it). */
  vlan: z.number().int().nullable().default(null),
});
export type LeaseRecord = z.infer<typeof LeaseRecord>;
/**
 * A macvtap about to be created. The kernel ignores IFLA_IFALIAS when it creates a link, so between
 * RTM_NEWLINK and tagging the device there is a moment when only this record says it is ours.
 */
export const Intent = z.strictObject({ id: z.string(), name: z.string(), parent: z.string(), mac: z.string() });
export type Intent = z.infer<typeof Intent>;
export const StateFile = z.strictObject({
  version: z.literal(1),
  /** Who wrote it (`tapbrokerd X.Y.Z`; absent before 0.5.0): a table of another version is not trusted whole. */
  broker: z.string().max(128).optional(),
  leases: z.array(LeaseRecord),
  intents: z.array(Intent).default([]),
  /** Every Open vSwitch database a lease was ever plugged into: reconcile looks there for stale ports. */
  ovsdbs: z.array(z.string()).default([]),
  /**
   * Leases that ended but whose network still owes its `down` (a hook's, an OVS port's removal): kept
   * until it has run, so a broker stopped meanwhile runs it at its next start.
   */
  downs: z.array(LeaseRecord).default([]),
  /**
   * Leases written while their create was still running (ids): a broker stopped before the grant deletes
   * their devices at its next start, as the failed create the client saw.
   */
  pending: z.array(z.string()).default([]),
  /**
   * Devices tagged as ours whose lease was lost with an unreadable table and whose tag is too short to
   * rebuild it (ids): left alone at every start, never taken for orphans of a crash.
   */
  kept: z.array(z.string()).default([]),
  /**
   * MACs a holder's tap took lately (`u:UID` or `g:GID` → `bridge/mac` → until when, ms since the epoch): kept
   * from those takers' port locks across a restart too (forwarding.ts).
   */
  taken: z.array(z.strictObject({ who: z.string().max(32), key: z.string().max(64), until: z.number().int() }))
    .default([]),
  /**
   * Leases out of the table whose device is being deleted, with the record that deletion is to write: a broker
   * killed meanwhile (the kernel finishes the deletion) writes it at its next start.
   */
  retiring: z.array(z.strictObject({
    lease: LeaseRecord, op: z.string().max(32), decision: z.enum(['cleanup', 'release', 'reconcile']),
    message: z.string().max(4096),
  })).default([]),
});
export type StateFile = z.infer<typeof StateFile>;
