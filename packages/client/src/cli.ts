#!/usr/bin/env node
// tapbroker: the unprivileged client.
//   tapbroker run [--socket P] --net SPEC... -- CMD ARGS...
//   tapbroker qemu-args --net SPEC...
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { constants as osConstants } from 'node:os';
import { TapbrokerError, type ErrorCode } from '@tapbroker/protocol';
import { TapbrokerClient, closeTap, type Tap } from './client.js';
import { parseNetSpec, type NetSpec } from './netspec.js';
import { childFdNumbers, nicArgs, shellQuote } from './qemu-args.js';

const USAGE = `usage: tapbroker run [--socket PATH] --net SPEC... -- COMMAND [ARG...]
       tapbroker qemu-args --net SPEC...
SPEC:  bridge=NAME[,queues=N][,vhost=on|off][,mac=MAC][,id=ID][,model=MODEL][,name=IFNAME]`;

/** sysexits(3), documented in the README. */
export const EXIT = { USAGE: 64, DATAERR: 65, SOFTWARE: 70, UNAVAILABLE: 69, NOPERM: 77 } as const;

export function exitCodeFor(code: ErrorCode): number {
  switch (code) {
    case 'TB_E_USAGE':
      return EXIT.USAGE;
    case 'TB_E_POLICY_DENIED': case 'TB_E_QUOTA_EXCEEDED':
      return EXIT.NOPERM;
    case 'TB_E_INVALID_NAME': case 'TB_E_INVALID_MAC': case 'TB_E_INVALID_QUEUES': case 'TB_E_NO_SUCH_BRIDGE':
    case 'TB_E_NOT_A_BRIDGE': case 'TB_E_DEVICE_EXISTS': case 'TB_E_INVALID_REQUEST':
      return EXIT.DATAERR;
    case 'TB_E_CONNECT': case 'TB_E_BROKER_CLOSED': case 'TB_E_VHOST_UNAVAILABLE': case 'TB_E_BUSY': case 'TB_E_TIMEOUT':
    case 'TB_E_VERSION':
      return EXIT.UNAVAILABLE;
    default:
      return EXIT.SOFTWARE;
  }
}

interface Args {
  command: 'run' | 'qemu-args';
  socket: string | null;
  nets: NetSpec[];
  argv: string[];
}

export function parseArgs(argv: readonly string[]): Args {
  const command = argv[0];
  if (command !== 'run' && command !== 'qemu-args') throw new TapbrokerError('TB_E_USAGE', command ? `unknown command \`${command}'` : 'no command');
  const out: Args = { command, socket: null, nets: [], argv: [] };
  let i = 1;
  for (; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') {
      out.argv = argv.slice(i + 1);
      break;
    }
    const [flag, inline] = a.startsWith('--') && a.includes('=') ? [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)] : [a, undefined];
    const value = () => {
      const v = inline ?? argv[++i];
      if (v === undefined) throw new TapbrokerError('TB_E_USAGE', `${flag} needs a value`);
      return v;
    };
    if (flag === '--net') out.nets.push(parseNetSpec(value()));
    else if (flag === '--socket' && command === 'run') out.socket = value();
    else throw new TapbrokerError('TB_E_USAGE', `unknown argument \`${a}'`);
  }
  if (out.nets.length === 0) throw new TapbrokerError('TB_E_USAGE', 'at least one --net SPEC is needed');
  if (command === 'run' && out.argv.length === 0) throw new TapbrokerError('TB_E_USAGE', 'no command after --');
  if (command === 'qemu-args' && i < argv.length) throw new TapbrokerError('TB_E_USAGE', 'qemu-args takes no command');
  const ids = out.nets.map((n, k) => n.id ?? `net${k}`);
  const dup = ids.find((id, k) => ids.indexOf(id) !== k);
  if (dup) throw new TapbrokerError('TB_E_USAGE', `netdev id \`${dup}' used twice`);
  return out;
}

/** The qemu arguments for granted taps (or, with `taps` null, for the specs alone). */
export function buildNicArgs(nets: readonly NetSpec[], taps: readonly Tap[] | null): string[] {
  const counts = nets.map((n, k) => {
    const q = taps ? taps[k]!.tapFds.length : n.queues;
    const v = taps ? taps[k]!.vhostFds.length : n.vhost ? n.queues : 0;
    return [q, v] as const;
  });
  const numbers = childFdNumbers(counts.flatMap(([q, v]) => [q, v]));
  return nets.flatMap((n, k) => nicArgs({
    id: n.id ?? `net${k}`, model: n.model, mac: taps ? taps[k]!.device.mac : n.mac,
    tapFds: numbers[2 * k]!, vhostFds: numbers[2 * k + 1]!,
  }));
}

async function run(args: Args): Promise<number> {
  const client = await TapbrokerClient.connect(args.socket);
  const taps: Tap[] = [];
  try {
    for (const n of args.nets) {
      taps.push(await client.createTap({ bridge: n.bridge, queues: n.queues, vhost: n.vhost, mac: n.mac, name: n.name }));
    }
  } catch (err) {
    taps.forEach(closeTap);
    throw err;
  } finally {
    client.close();
  }
  for (const t of taps) {
    const d = t.device;
    process.stderr.write(`tapbroker: ${d.name} on ${d.bridge} (ifindex ${d.ifindex}, mtu ${d.mtu}, mac ${d.mac}, ${d.queues} queue${d.queues > 1 ? 's' : ''}${d.vhost ? ', vhost' : ''}, rule ${d.rule})\n`);
  }
  const fds = taps.flatMap((t) => [...t.tapFds, ...t.vhostFds]);
  const [cmd, ...rest] = args.argv as [string, ...string[]];
  const child = spawn(cmd, [...rest, ...buildNicArgs(args.nets, taps)], { stdio: ['inherit', 'inherit', 'inherit', ...fds] });
  // The child holds the devices now; our copies must go so they vanish with it.
  taps.forEach(closeTap);
  const forward = (sig: NodeJS.Signals) => () => child.kill(sig);
  const handlers = (['SIGINT', 'SIGTERM', 'SIGHUP'] as const).map((sig) => [sig, forward(sig)] as const);
  for (const [sig, h] of handlers) process.on(sig, h);
  return new Promise((resolve, reject) => {
    child.on('error', (err) => reject(new TapbrokerError('TB_E_USAGE', `cannot run ${cmd}: ${err.message}`)));
    child.on('exit', (code, signal) => {
      for (const [sig, h] of handlers) process.off(sig, h);
      if (signal) {
        // Die the way the child died, so our parent sees the same status.
        process.kill(process.pid, signal);
        resolve(128 + (osConstants.signals[signal] ?? 0));
      } else resolve(code ?? 0);
    });
  });
}

export async function main(argv: readonly string[]): Promise<number> {
  if (argv[0] === '-h' || argv[0] === '--help' || argv[0] === 'help') {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  try {
    const args = parseArgs(argv);
    if (args.command === 'qemu-args') {
      process.stdout.write(`${buildNicArgs(args.nets, null).map(shellQuote).join(' ')}\n`);
      if (args.nets.some((n) => !n.mac)) process.stderr.write('tapbroker: without mac=, `run` adds the MAC the broker assigns\n');
      return 0;
    }
    return await run(args);
  } catch (err) {
    if (!(err instanceof TapbrokerError)) throw err;
    let text = `tapbroker: ${err.code}: ${err.message}`;
    if (err.rule) text += `\ntapbroker: rule: ${err.rule}`;
    if (err.hint) text += `\ntapbroker: hint: ${err.hint}`;
    process.stderr.write(`${text}\n`);
    if (err.code === 'TB_E_USAGE') process.stderr.write(`${USAGE}\n`);
    return exitCodeFor(err.code);
  }
}

// Run when executed directly (not when imported by tests).
if (process.argv[1] && fs.realpathSync(process.argv[1]) === fs.realpathSync(new URL(import.meta.url).pathname)) {
  main(process.argv.slice(2)).then((code) => process.exit(code), (err: Error) => {
    process.stderr.write(`tapbroker: internal error: ${err.stack}\n`);
    process.exit(EXIT.SOFTWARE);
  });
}
