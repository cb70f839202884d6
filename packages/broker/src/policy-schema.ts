// The policy's format as zod schemas: the source that policy-shape.ts is generated from (npm run gen:shapes),
// the types of a parsed policy file, and the reference the tests hold the generated shape to. The broker
// checks policies with the generated shape and the same named checks (POLICY_CHECKS), and never loads this.
import { z } from 'zod';
import { MACVTAP_MODES, MAX_QUEUES } from '@tapbroker/protocol';
import { DEFAULT_MAC_PREFIX, DEFAULT_NAME_PATTERN, POLICY_CHECKS } from './policy.js';

/** A refinement in code, named in the generated shape: the broker runs the same function from POLICY_CHECKS. */
function refined<T extends z.ZodType>(schema: T, check: string): T {
  const run = (POLICY_CHECKS as Record<string, (v: never) => string | null>)[check];
  if (!run) throw new Error(`no policy check \`${check}'`);
  return schema.superRefine((v, ctx) => {
    const why = run(v as never);
    if (why) ctx.addIssue({ code: 'custom', message: why });
  }).meta({ check }) as unknown as T;
}

const Principal = z.union([z.string().min(1).max(256), z.number().int().min(0).max(0xfffffffe)]);
const IfName = refined(z.string(), 'ifname');
const PolicyName = refined(z.string(), 'policy-name');
const RuleName = PolicyName;
const BridgeName = refined(z.string(), 'bridge-name');
const NamePattern = refined(z.string(), 'name-pattern');

export const MacvtapGrant = z.strictObject({
  parent: IfName,
  /** passthru takes the whole NIC: it is only allowed where named. */
  modes: z.array(z.enum(MACVTAP_MODES)).min(1).default(['bridge']),
});

const NetworkName = PolicyName;
const Vlan = z.number().int().min(1).max(4094);

export const NetworkSchema = refined(z.strictObject({
  bridge: IfName.optional(),
  ovs: IfName.optional(),
  /** Absolute path of a plug program, run by the broker as `PATH up|down DEVICE key=value…`. */
  hook: refined(z.string(), 'hook-path').optional(),
  /** Access VLAN: the port's PVID, untagged. */
  vlan: Vlan.optional(),
  /** Trunk VLANs (Open vSwitch only). */
  trunk: z.array(Vlan).min(1).optional(),
  /** Seconds a hook may run (default 10). */
  hook_timeout: z.number().int().min(1).max(300).optional(),
  /** OVSDB to use instead of the one ovs-vsctl would find. */
  ovsdb: refined(z.string(), 'ovsdb').optional(),
  /** Every tap on this network is a locked port that forwards only its lease's guest MAC. */
  mac_lock: z.boolean().optional(),
}), 'network');

export const RuleSchema = z.strictObject({
  name: RuleName,
  users: z.array(Principal).optional(),
  groups: z.array(Principal).optional(),
  bridges: z.array(BridgeName).default([]),
  macvtap: z.array(MacvtapGrant).default([]),
  networks: z.array(NetworkName).default([]),
  persistent: z.boolean().default(false),
  name_pattern: NamePattern.default(DEFAULT_NAME_PATTERN),
  max_queues: z.number().int().min(1).max(MAX_QUEUES).default(1),
  vhost: z.boolean().default(false),
  mac_prefix: refined(z.string(), 'mac-prefix').default(DEFAULT_MAC_PREFIX),
  max_devices: z.number().int().min(0).optional(),
  /** Every tap it grants on a Linux bridge is a locked port that forwards only its lease's guest MAC. */
  mac_lock: z.boolean().default(false),
});

export const DenySchema = z.strictObject({
  name: RuleName.optional(),
  users: z.array(Principal).optional(),
  groups: z.array(Principal).optional(),
  bridges: z.array(BridgeName).min(1).optional(),
  parents: z.array(IfName).min(1).optional(),
  networks: z.array(NetworkName).min(1).optional(),
});

export const PolicySchema = z.strictObject({
  version: z.literal(1).optional(),
  network: z.record(NetworkName, NetworkSchema).default({}),
  rule: z.array(RuleSchema).default([]),
  deny: z.array(DenySchema).default([]),
});
export type PolicyDoc = z.infer<typeof PolicySchema>;
