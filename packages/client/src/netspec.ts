// `--net` SPECs: `bridge=NAME|macvtap=PARENT|network=NAME[,mode=M][,queues=N][,vhost=on|off]
//   [,mac=MAC][,id=ID][,model=MODEL|none][,name=IFNAME][,dev.KEY=VALUE...]`.
import {
  MACVTAP_MODES,
  MAX_QUEUES,
  TapbrokerError,
  checkIfName,
  checkMac,
  checkNetworkName,
  checkQueues,
  type MacvtapMode,
} from '@tapbroker/protocol/lite';
import { QEMU_ID, QEMU_MODEL, checkDeviceProperty, isVirtioNet } from './qemu-args.js';

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
  /** The -device model; null for `model=none`: only the -netdev, the user writes the -device. */
  model: string | null;
  /** `dev.KEY=VALUE` properties appended to the -device, in SPEC order. */
  props: Array<[string, string]>;
  /** Tap name the caller asks for (must begin with `tb<uid>-`); broker-chosen when null. */
  name: string | null;
}

export const DEFAULT_MODEL = 'virtio-net-pci';
const KEYS = new Set(['bridge', 'macvtap', 'network', 'mode', 'queues', 'vhost', 'mac', 'id', 'model', 'name']);
// qemu option values: nothing that could end the value (`,`) or start another option.
const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;

function bad(message: string): never {
  throw new TapbrokerError('TB_E_USAGE', message);
}

export function parseNetSpec(spec: string): NetSpec {
  // Before any message quotes the SPEC: terminal escapes stay off the user's screen.
  if (CONTROL.test(spec)) {
    const hex = (c: string) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`;
    bad(`--net ${spec.replace(new RegExp(CONTROL, 'g'), hex)}: has a control character`);
  }
  const fields = new Map<string, string>();
  const props: Array<[string, string]> = [];
  for (const part of spec.split(',')) {
    const eq = part.indexOf('=');
    if (eq <= 0) bad(`--net ${spec}: \`${part}' is not key=value`);
    const key = part.slice(0, eq);
    if (key.startsWith('dev.')) {
      const prop = key.slice(4);
      const why = checkDeviceProperty(prop, part.slice(eq + 1));
      if (why) bad(`--net ${spec}: -device property \`${prop}' ${why}`);
      if (props.some(([k]) => k === prop)) bad(`--net ${spec}: \`${key}' given twice`);
      props.push([prop, part.slice(eq + 1)]);
      continue;
    }
    if (!KEYS.has(key)) bad(`--net ${spec}: unknown key \`${key}'; known: ${[...KEYS].join(', ')}, dev.KEY`);
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
  // Digits alone, no sign, no leading zero: what a person means by a queue count, and nothing else.
  if (!/^[1-9][0-9]{0,2}$/.test(q) || checkQueues(Number(q))) {
    bad(`--net ${spec}: queues must be a whole number from 1 to ${MAX_QUEUES}, not \`${q}'`);
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
  const modelText = fields.get('model') ?? DEFAULT_MODEL;
  if (!QEMU_MODEL.test(modelText)) bad(`--net ${spec}: model \`${modelText}' is not a device model name`);
  // `none`: the user writes their own -device (qemu has no device model of that name).
  const model = modelText === 'none' ? null : modelText;
  if (model === null && props.length > 0) {
    bad(`--net ${spec}: dev.* adds to the -device tapbroker writes; with model=none, put them in your own -device`);
  }
  // Only virtio-net devices take more than one queue; another model would use one of them and leave the rest.
  if (model !== null && Number(q) > 1 && !isVirtioNet(model)) {
    bad(`--net ${spec}: queues=${q} needs a virtio-net model: ${model} has one queue (or model=none, and write your `
      + 'own -device)');
  }
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
    props,
    name,
  };
}
