// The public surface of @tapbroker/client.
export { TapbrokerClient, closeTap, socketPath, DEFAULT_SOCKET, type Tap, type TapOptions, type MacvtapOptions,
  type NicOptions, type CanNic } from './client.js';
export { parseNetSpec, DEFAULT_MODEL, type NetSpec } from './netspec.js';
export { nicArgs, childFdNumbers, isVirtioNet, shellQuote, type NicArgs } from './qemu-args.js';
export { main, parseArgs, parseLeaseArgs, buildNicArgs, exitCodeFor, describeDevice, EXIT } from './cli.js';
export { libvirtInterfaceXml } from './libvirt.js';
export {
  TapbrokerError,
  ERROR_CODES,
  type ErrorCode,
  type Device,
  type Lease,
  type TapDevice,
} from '@tapbroker/protocol/lite';
