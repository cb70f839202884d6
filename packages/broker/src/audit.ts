// One structured record per decision, written by the broker itself before the reply leaves.
import fs from 'node:fs';
import type { Identity } from './identity.js';

export type AuditDecision = 'grant' | 'deny' | 'error' | 'cleanup' | 'release' | 'reconcile';

export interface AuditEvent {
  op: string;
  decision: AuditDecision;
  rule: string | null;
  /** The caller, or for automatic actions the owner (uid alone). */
  caller: Partial<Identity> | null;
  request?: Record<string, unknown>;
  device?: Record<string, unknown>;
  code?: string;
  message?: string;
}

/** Stable field names: tools and tests match on them. */
export interface AuditRecord {
  time: string;
  op: string;
  decision: AuditDecision;
  rule: string | null;
  policy_sha256: string;
  uid: number | null;
  gid: number | null;
  pid: number | null;
  exe: string | null;
  user: string | null;
  request?: Record<string, unknown>;
  device?: Record<string, unknown>;
  code?: string;
  message?: string;
}

export class Audit {
  constructor(private readonly policySha: () => string, private readonly fd = 2) {}

  record(ev: AuditEvent): AuditRecord {
    const c = ev.caller;
    const rec: AuditRecord = {
      time: new Date().toISOString(), op: ev.op, decision: ev.decision, rule: ev.rule, policy_sha256: this.policySha(),
      uid: c?.uid ?? null, gid: c?.gid ?? null, pid: c?.pid ?? null, exe: c?.exe ?? null, user: c?.user ?? null,
    };
    if (ev.request) rec.request = ev.request;
    if (ev.device) rec.device = ev.device;
    if (ev.code) rec.code = ev.code;
    if (ev.message) rec.message = ev.message;
    fs.writeSync(this.fd, `${JSON.stringify({ audit: rec })}\n`);
    return rec;
  }
}
