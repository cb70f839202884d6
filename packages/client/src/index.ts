// The public surface of @tapbroker/client.
export { TapbrokerClient, closeTap, socketPath, DEFAULT_SOCKET, type Tap, type TapOptions } from './client.js';
export { parseNetSpec, DEFAULT_MODEL, type NetSpec } from './netspec.js';
export { nicArgs, childFdNumbers, isVirtioNet, shellQuote, type NicArgs } from './qemu-args.js';
export { main, parseArgs, buildNicArgs, exitCodeFor, EXIT } from './cli.js';
export { TapbrokerError, ERROR_CODES, type ErrorCode, type TapDevice } from '@tapbroker/protocol';
