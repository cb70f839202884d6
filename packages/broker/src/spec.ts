// One normalised request: built once from the wire message with every default applied, checked
// against the kernel's grammar, then handed unchanged to the decision, the kernel step, the lease and
// the audit record.
import {
  TapbrokerError,
  checkIfName,
  checkMac,
  checkNetworkName,
  checkQueues,
  type CanRequest,
  type CreateMacvtapRequest,
  type CreateTapRequest,
  type MacvtapMode,
  type Nic,
} from '@tapbroker/protocol/core';
import type { Identity } from './identity.js';
import { printable } from './naming.js';

export interface CreateSpec {
  kind: 'tap' | 'macvtap';
  /** The bridge of a tap, the parent of a macvtap, or the name of a network. */
  parent: string;
  /** `parent` names a network. */
  network: boolean;
  mode: MacvtapMode | null;
  queues: number;
  vhost: boolean;
  vnetHdr: boolean;
  /** The guest's MAC, or null: the broker picks one, or (`macUnknown`) the hypervisor sets it. */
  mac: string | null;
  /** The caller said the hypervisor sets the guest's MAC (qemu-bridge-helper's way): the broker does not know it. */
  macUnknown: boolean;
  /** A name the caller picked, or null for a broker-chosen one. */
  name: string | null;
  persistent: boolean;
  /** A group (one of the caller's) that may use a persistent tap. */
  group: number | null;
}

/** The spec of a create request, one NIC of a `create` request, or a `can` dry run, defaults applied. */
export function createSpec(req: CreateTapRequest | CreateMacvtapRequest | CanRequest | Nic): CreateSpec {
  const common = {
    queues: req.queues ?? 1,
    vhost: req.vhost ?? false,
    mac: req.mac ?? null,
    macUnknown: req.mac === null,
    name: req.name ?? null,
    persistent: req.persistent ?? false,
  };
  const op = 'op' in req ? req.op : req.kind === 'tap' ? 'create-tap' : 'create-macvtap';
  switch (op) {
    case 'create-tap': {
      req = req as CreateTapRequest;
      if ((req.bridge === undefined) === (req.network === undefined)) {
        throw new TapbrokerError('TB_E_INVALID_REQUEST', 'create-tap needs exactly one of bridge or network');
      }
      return {
        ...common,
        kind: 'tap',
        parent: (req.bridge ?? req.network)!,
        network: req.network !== undefined,
        mode: null,
        vnetHdr: req.vnet_hdr ?? true,
        group: req.group ?? null,
      };
    }
    case 'create-macvtap':
      req = req as CreateMacvtapRequest;
      return {
        ...common,
        kind: 'macvtap',
        parent: req.parent,
        network: false,
        mode: req.mode ?? 'bridge',
        vnetHdr: req.vnet_hdr ?? true,
        group: null,
      };
    case 'can':
      req = req as CanRequest;
      return {
        ...common,
        kind: req.kind === 'macvtap' ? 'macvtap' : 'tap',
        parent: req.parent,
        network: req.kind === 'network',
        mode: req.kind === 'macvtap' ? (req.mode ?? 'bridge') : null,
        vnetHdr: true,
        group: req.group ?? null,
      };
    default:
      throw new TapbrokerError('TB_E_UNKNOWN_OP', `not a create request: ${op as string}`);
  }
}

/** Grammar of every field, exactly as it will reach the kernel; the caller's own groups only. */
export function checkSpec(s: CreateSpec, caller: Identity): void {
  const invalid = (
    code: 'TB_E_INVALID_NAME' | 'TB_E_INVALID_QUEUES' | 'TB_E_INVALID_MAC' | 'TB_E_INVALID_REQUEST',
    m: string,
  ) => {
    throw new TapbrokerError(code, m);
  };
  const what = s.network ? 'network' : s.kind === 'tap' ? 'bridge' : 'parent';
  const parentWhy = s.network ? checkNetworkName(s.parent) : checkIfName(s.parent);
  if (parentWhy) invalid('TB_E_INVALID_NAME', `${what} name \`${printable(s.parent)}' ${parentWhy}`);
  const queuesWhy = checkQueues(s.queues);
  if (queuesWhy) invalid('TB_E_INVALID_QUEUES', `queues ${queuesWhy}`);
  const macWhy = s.mac === null ? null : checkMac(s.mac);
  if (macWhy) invalid('TB_E_INVALID_MAC', `mac \`${printable(s.mac!)}' ${macWhy}`);
  const nameWhy = s.name === null ? null : checkIfName(s.name);
  if (nameWhy) invalid('TB_E_INVALID_NAME', `name \`${printable(s.name!)}' ${nameWhy}`);
  if (s.persistent && s.vhost) {
    invalid('TB_E_INVALID_REQUEST', 'vhost-net fds travel with a fd-passed device; a persistent one gets none');
  }
  if (s.macUnknown && s.kind === 'macvtap') {
    invalid('TB_E_INVALID_REQUEST', "mac null is for taps: a macvtap's MAC is the guest's, set when it is created; "
      + 'name it or let the broker pick it');
  }
  if (s.group !== null && !s.persistent) invalid('TB_E_INVALID_REQUEST', 'group is for persistent devices');
  if (s.group !== null && s.kind === 'macvtap') {
    invalid('TB_E_INVALID_REQUEST', 'group is for taps: a macvtap is its owner\'s');
  }
  if (s.group !== null && s.group !== caller.gid && !caller.groups.includes(s.group)) {
    throw new TapbrokerError('TB_E_POLICY_DENIED', `you are not in group ${s.group}`, {
      hint: 'name one of your own groups',
    });
  }
  // The kernel lets every process holding the group open the tap, a subordinate gid included (an outside re-test).
  const owner = s.group !== null ? caller.subordinateGid?.(s.group) : null;
  if (owner) {
    throw new TapbrokerError('TB_E_POLICY_DENIED', `group ${s.group} lies in the subordinate gid range of ${owner} `
      + '(/etc/subgid): that user can take it in a user namespace of its own and open the tap',
    { hint: 'give it to a group outside every subordinate gid range, or to none' });
  }
}

/** The request as audit records show it. */
export function specView(s: CreateSpec): Record<string, unknown> {
  return {
    kind: s.kind,
    parent: s.parent,
    network: s.network ? s.parent : null,
    mode: s.mode,
    queues: s.queues,
    vhost: s.vhost,
    vnet_hdr: s.vnetHdr,
    mac: s.macUnknown ? 'unknown' : s.mac,
    name: s.name,
    persistent: s.persistent,
    group: s.group,
  };
}

