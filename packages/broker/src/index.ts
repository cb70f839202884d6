// The public surface of @tapbroker/broker (for tests, benchmarks and embedding).
export { Broker, BROKER_VERSION, namePrefix, tapName, randomMac, type BrokerOptions } from './broker.js';
export { loadPolicy, parsePolicy, decide, matches, macInPrefix, DEFAULT_MAC_PREFIX, MAX_QUEUES } from './policy.js';
export type { Policy, AllowRule, DenyRule, Caller, TapAsk, Decision, Selector } from './policy.js';
export { Netdev, tunIfreq, tapFlags, hostMac, closeInBackground, TUNSETIFF, IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE, IFF_TUN_EXCL } from './netdev.js';
export { Rtnetlink, linkMessage, parseLink, parseAttrs, rtattr, attrU32, attrString, splitMessages } from './rtnetlink.js';
export type { Link } from './rtnetlink.js';
export { Audit, type AuditRecord } from './audit.js';
export { Leases, type Lease } from './leases.js';
