// The public surface of @tapbroker/broker (for tests, benchmarks and embedding).
export { Broker, BROKER_VERSION, namePrefix, tapName, randomMac, type BrokerOptions } from './broker.js';
export { loadPolicy, parsePolicy, decide, matches, macInPrefix, nameMatches, DEFAULT_MAC_PREFIX, DEFAULT_NAME_PATTERN, MAX_QUEUES } from './policy.js';
export type { Policy, AllowRule, DenyRule, Caller, Ask, Decision, Selector } from './policy.js';
export { Netdev, tunIfreq, tapFlags, hostMac, devNumbers, closeInBackground, TUNSETIFF, IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE, IFF_TUN_EXCL } from './netdev.js';
export { Rtnetlink, LinkMonitor, linkMessage, macvtapMessage, bridgeVlanMessage, parseLink, parseAttrs, rtattr, attrU32, attrString, attrNested, splitMessages, deleteLinkInBackground, MACVLAN_MODES } from './rtnetlink.js';
export type { Link } from './rtnetlink.js';
export { Audit, MESSAGE_IDS, journalEntry, type AuditRecord } from './audit.js';
export { LeaseTable, LeaseRecord, leaseView, processStartTime, STATE_FILE } from './leases.js';
export { addPort, delPort, listOurPorts, isOvsBridge, ovsdbTarget } from './ovs.js';
export { runHook, type HookResult } from './hook.js';
export type { Network } from './policy.js';
