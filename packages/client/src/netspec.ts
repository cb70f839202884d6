// `--net` SPECs: `bridge=NAME|macvtap=PARENT|network=NAME[,mode=M][,queues=N][,vhost=on|off]
//   [,mac=MAC][,id=ID][,model=MODEL][,name=IFNAME]`.
import {
  MACVTAP_MODES,
  TapbrokerError,
  checkIfName,
  checkMac,
  checkNetworkName,
  checkQueues,
  type MacvtapMode,
} from '@tapbroker/protocol';

export interface NetSpec {
  kind: 'tap' | 'macvtap';
  /** The bridge of a tap, the parent of a macvtap. */
  parent: string;
  /** Macvtap mode (default bridge); null for a tap. */
  mode: MacvtapMode | null;
  /** `parent` names a network the admin defined (`network=NAME`), not a bridge. */
  network: boolean;
  queues: number;
  vhost: boolean;
  mac: string | null;
  /** qemu netdev id; `net<index>` when not given. */
  id: string | null;
  model: string;
  /** Tap name the caller asks for (must begin with `tb<uid>-`); broker-chosen when null. */
  name: string | null;
}

export const DEFAULT_MODEL = 'virtio-net-pci';
const KEYS = new Set(['bridge', 'macvtap', 'network', 'mode', 'queues', 'vhost', 'mac', 'id', 'model', 'name']);
// qemu option values: nothing that could end the value (`,`) or start another option.
const QEMU_ID = /^[A-Za-z][A-Za-z0-9_.-]{0,31}$/;
const QEMU_MODEL = /^[A-Za-z0-9_-]{1,64}$/;

function bad(message: string): never {
  throw new TapbrokerError('TB_E_USAGE', message);
}

export function parseNetSpec(spec: string): NetSpec {
  const fields = new Map<string, string>();
  for (const part of spec.split(',')) {
    const eq = part.indexOf('=');
    if (eq <= 0) bad(`--net ${spec}: \`${part}' is not key=value`);
    const key = part.slice(0, eq);
    if (!KEYS.has(key)) bad(`--net ${spec}: unknown key \`${key}'; known: ${[...KEYS].join(', ')}`);
    if (fields.has(key)) bad(`--net ${spec}: \`${key}' given twice`);
    fields.set(key, part.slice(eq + 1));
  }
  const bridge = fields.get('bridge');
  const macvtap = fields.get('macvtap');
  const network = fields.get('network');
  if ([bridge, macvtap, network].filter((x) => x !== undefined).length !== 1) {
    bad(`--net ${spec}: exactly one of bridge=NAME, macvtap=PARENT or network=NAME is required`);
  }
  const kind = macvtap !== undefined ? 'macvtap' : 'tap';
  const parent = (bridge ?? macvtap ?? network)!;
  if (network !== undefined) {
    const why = checkNetworkName(network);
    if (why) bad(`--net ${spec}: network name \`${network}' ${why}`);
  } else {
    const parentWhy = checkIfName(parent);
    if (parentWhy) bad(`--net ${spec}: ${kind === 'tap' ? 'bridge' : 'parent'} name \`${parent}' ${parentWhy}`);
  }
  const modeText = fields.get('mode');
  if (modeText !== undefined && kind === 'tap') bad(`--net ${spec}: mode= is for macvtap`);
  if (modeText !== undefined && !(MACVTAP_MODES as readonly string[]).includes(modeText)) {
    bad(`--net ${spec}: mode must be one of ${MACVTAP_MODES.join(', ')}`);
  }
  const mode = kind === 'macvtap' ? ((modeText as MacvtapMode | undefined) ?? 'bridge') : null;
  const q = fields.get('queues') ?? '1';
  if (!/^[0-9]{1,4}$/.test(q) || checkQueues(Number(q))) {
    bad(`--net ${spec}: queues ${checkQueues(Number(q)) ?? 'must be an integer'}`);
  }
  const vhost = fields.get('vhost') ?? 'off';
  if (vhost !== 'on' && vhost !== 'off') bad(`--net ${spec}: vhost must be on or off, not \`${vhost}'`);
  const mac = fields.get('mac')?.toLowerCase() ?? null;
  if (mac !== null) {
    const why = checkMac(mac);
    if (why) bad(`--net ${spec}: mac \`${mac}' ${why}`);
  }
  const id = fields.get('id') ?? null;
  if (id !== null && !QEMU_ID.test(id)) {
    bad(`--net ${spec}: id \`${id}' must start with a letter and use A-Z a-z 0-9 _ . - (at most 32)`);
  }
  const model = fields.get('model') ?? DEFAULT_MODEL;
  if (!QEMU_MODEL.test(model)) bad(`--net ${spec}: model \`${model}' is not a device model name`);
  const name = fields.get('name') ?? null;
  if (name !== null) {
    const why = checkIfName(name);
    if (why) bad(`--net ${spec}: name \`${name}' ${why}`);
  }
  return {
    kind,
    parent,
    mode,
    network: network !== undefined,
    queues: Number(q),
    vhost: vhost === 'on',
    mac,
    id,
    model,
    name,
  };
}
