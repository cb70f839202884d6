// Internals of @tapbroker/broker for tests and benchmarks: the modules on the privileged path as they
// are, not test-only code. Not a stable interface.
export * from './index.js';
export { daemon, type DaemonExtras } from './daemon.js';
export { createNamed, namePrefix, printable, tapName, randomMac, freeMac, shown, auditJson } from './naming.js';
export { bytesShown, callerStartTime, SHOWN_BYTES } from './identity.js';
export { ForeignFds, orphan } from './foreign.js';
export { createSpec, checkSpec, specView, type CreateSpec } from './spec.js';
export {
  matches, matchesDeny, macInPrefix, nameMatches, resolveTarget, denyCovers, ANY_BRIDGE, grantsBridge,
  bridgeList, locksPort,
} from './decide.js';
// The policy tools, off the privileged path (daemon.ts loads them only for their commands).
export { deniedToUnit, denyScope, kernelLocksPorts, policyWarnings } from './policy-tools.js';
export { POLICY_CHECKS, POLICY_KEYS, loadTrustedPolicy, lostSince, movedSince, parseSources } from './policy.js';
export { fragmentDir, policyFiles, untrustedPolicyFile } from './policy-files.js';
export { didYouMean, lineIndex } from './policy-text.js';
export { importBridgeConf, parseAclLine, type ImportResult } from './bridge-conf.js';
export {
  runPolicyTests, parseCases, parseRequest, runCase, DECIDED_CODES, type Case, type CaseError, type CaseResult,
  type TestRun,
} from './policy-test.js';
export { Netdev } from './netdev.js';
export { stallLog } from './broker.js';
export { Session, type SessionHost } from './session.js';
export { ForeignPorts } from './plug.js';
export { devNumbers, macvtapParent } from './macvtap.js';
export {
  tunIfreq, tapFlags, hostMac, vhostUnavailable, TUNSETIFF, TUNSETOWNER, TUNSETGROUP, TUNSETPERSIST, IFF_TAP,
  IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE, IFF_TUN_EXCL, type FaultPoint, type Faults, type Kernel, type Cleanup,
  type CreatedTap, type TapRequest, type MacvtapRequest,
} from './kernel.js';
export type { Identity, Outcome } from './broker.js';
export {
  Rtnetlink,
  linkMessage,
  macvtapMessage,
  bridgeVlanMessage,
  joinedVlan,
  parseLink,
  masterOf,
  nameOf,
  portLockMessage,
  deleteLinkInBackground,
  MACVLAN_MODES,
  type Link,
} from './rtnetlink.js';
export { parseAttrs, rtattr, attrU32, attrString, attrNested, splitMessages } from './netlink.js';
export { LinkMonitor, DRAIN_BUDGET, SKIP_BRIDGE_VIEWS, type Wants } from './link-monitor.js';
export { REPEAT_CHECK_MS } from './repeats.js';
export { Forwarding } from './forwarding.js';
export { limitStderrBacklog } from './stderr.js';
export { Floods, MAX_LINK_EVENTS_PER_SECOND } from './floods.js';
export { Fairness, SHARE_MS, WINDOW_MS } from './fairness.js';
export { Audit, AUDIT_OPS, journalEntry, PRIORITY, REFUSALS_PER_WINDOW } from './audit.js';
export { LinuxAudit, linuxAuditMessage, auditField, AUDIT_VIRT_RESOURCE } from './linux-audit.js';
export { StateFile, LeaseRecord } from './lease-schema.js';
export { PolicySchema } from './policy-schema.js';
export { POLICY_SHAPE } from './policy-shape.js';
export {
  LeaseTable, leaseView, processStartTime, STATE_FILE, ALIAS_MAX, leaseTag, kernelBound, leaseFromAlias, BrokerId,
  aliasIdentity, aliasBroker,
} from './leases.js';
export { addPort, delPort, delPortOf, listPorts, isOvsBridge, ovsdbGone, ovsdbTarget, setUpFailed } from './ovs.js';
export { runHook, type HookResult } from './hook.js';
export { Reaper } from './reaper.js';
export {
  accountMembers, aclUserOnly, attachFilter, grantUserOnly, getpwnam, getpwuid, returnFreeMemory,
} from './libc.js';
export {
  MAX_CLAIMED_GROUPS, Subuids, loadSubuids, ownGroups, screenIds, subordinateOf, type HostIds, type SubRange,
} from './subids.js';
export { Unplugs } from './plug.js';
export { hookRun, killOrphanHooks } from './hook.js';
