// The public surface of @tapbroker/broker: embedding the broker and reading its policy and audit
// records. Internals (kernel steps, encodings) are reachable through `@tapbroker/broker/internal` only.
export { Broker, BROKER_VERSION, type BrokerOptions } from './broker.js';
export { decide, recorded } from './decide.js';
export { loadPolicy, parsePolicy, DEFAULT_MAC_PREFIX, DEFAULT_NAME_PATTERN } from './policy.js';
export type { Policy, AllowRule, DenyRule, Caller, Ask, Decision, Selector, Network, Target } from './decide.js';
export { MESSAGE_IDS, type AuditOp, type AuditRecord } from './audit.js';
