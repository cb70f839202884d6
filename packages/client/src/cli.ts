#!/usr/bin/env node
// tapbroker: the unprivileged client. Usage in USAGE below.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import { constants as osConstants } from 'node:os';
import {
  MACVTAP_MODES,
  PROTOCOL_VERSION,
  TapbrokerError,
  exitFlushed,
  checkIfName,
  checkMac,
  checkNetworkName,
  checkQueues,
  sys,
  type Device,
  type ErrorCode,
  type Lease,
  type MacvtapMode,
} from '@tapbroker/protocol';
import { TapbrokerClient, closeTap, type Tap } from './client.js';
import { libvirtInterfaceXml } from './libvirt.js';
import { parseNetSpec, type NetSpec } from './netspec.js';
import { childFdNumbers, nicArgs, shellQuote } from './qemu-args.js';

const USAGE = `usage: tapbroker run [--socket PATH] --net SPEC... -- COMMAND [ARG...]
       tapbroker qemu-args --net SPEC...
       tapbroker create --persistent (--bridge BRIDGE | --network NAME | --macvtap PARENT [--mode MODE]) [--name NAME]
                        [--queues N] [--mac MAC] [--group GROUP] [--xml | --json] [--socket PATH]
       tapbroker list [--json] [--socket PATH]
       tapbroker release NAME [--socket PATH]
       tapbroker can [--socket PATH] --net SPEC...      (dry run: would the broker grant it, by which rule?)
       tapbroker status [--json] [--socket PATH]        (the broker, its policy, your leases and quotas)
       tapbroker reload [--socket PATH]                 (root: the broker re-reads its policy)
SPEC:  bridge=NAME|network=NAME|macvtap=PARENT[,mode=bridge|vepa|private|passthru][,queues=N][,vhost=on|off]
       [,mac=MAC][,id=ID][,model=MODEL][,name=IFNAME]`;

/** sysexits(3), documented in the README. */
export const EXIT = { USAGE: 64, DATAERR: 65, SOFTWARE: 70, UNAVAILABLE: 69, NOPERM: 77, CONFIG: 78 } as const;

export function exitCodeFor(code: ErrorCode): number {
  switch (code) {
    case 'TB_E_USAGE':
      return EXIT.USAGE;
    case 'TB_E_POLICY_INVALID': case 'TB_E_BRIDGE_ADDRESS':
      return EXIT.CONFIG;
    case 'TB_E_POLICY_DENIED': case 'TB_E_QUOTA_EXCEEDED':
      return EXIT.NOPERM;
    case 'TB_E_INVALID_NAME': case 'TB_E_INVALID_MAC': case 'TB_E_INVALID_QUEUES': case 'TB_E_NO_SUCH_BRIDGE':
    case 'TB_E_NOT_A_BRIDGE': case 'TB_E_DEVICE_EXISTS': case 'TB_E_INVALID_REQUEST': case 'TB_E_NO_SUCH_PARENT':
    case 'TB_E_BAD_PARENT': case 'TB_E_MAC_IN_USE': case 'TB_E_NO_SUCH_LEASE':
      return EXIT.DATAERR;
    case 'TB_E_CONNECT': case 'TB_E_BROKER_CLOSED': case 'TB_E_VHOST_UNAVAILABLE': case 'TB_E_BUSY':
    case 'TB_E_TIMEOUT': case 'TB_E_VERSION': case 'TB_E_STATE_UNWRITABLE':
      return EXIT.UNAVAILABLE;
    default:
      return EXIT.SOFTWARE;
  }
}

interface Args {
  command: 'run' | 'qemu-args' | 'can';
  socket: string | null;
  nets: NetSpec[];
  argv: string[];
}

export function parseArgs(argv: readonly string[]): Args {
  const command = argv[0];
  if (command !== 'run' && command !== 'qemu-args' && command !== 'can') {
    throw new TapbrokerError('TB_E_USAGE', command ? `unknown command \`${command}'` : 'no command');
  }
  const out: Args = { command, socket: null, nets: [], argv: [] };
  let i = 1;
  for (; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') {
      out.argv = argv.slice(i + 1);
      break;
    }
    const [flag, inline] = a.startsWith('--') && a.includes('=')
      ? [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)]
      : [a, undefined];
    const value = () => {
      const v = inline ?? argv[++i];
      if (v === undefined) throw new TapbrokerError('TB_E_USAGE', `${flag} needs a value`);
      return v;
    };
    if (flag === '--net') out.nets.push(parseNetSpec(value()));
    else if (flag === '--socket' && command !== 'qemu-args') out.socket = value();
    else throw new TapbrokerError('TB_E_USAGE', `unknown argument \`${a}'`);
  }
  if (out.nets.length === 0) throw new TapbrokerError('TB_E_USAGE', 'at least one --net SPEC is needed');
  if (command === 'run' && out.argv.length === 0) throw new TapbrokerError('TB_E_USAGE', 'no command after --');
  if (command !== 'run' && i < argv.length) throw new TapbrokerError('TB_E_USAGE', `${command} takes no command`);
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
    id: n.id ?? `net${k}`, model: n.model, mac: taps ? taps[k]!.device.mac ?? n.mac : n.mac,
    tapFds: numbers[2 * k]!, vhostFds: numbers[2 * k + 1]!,
  }));
}

export function describeDevice(d: Device): string {
  const net = d.network
    ? `network ${d.network}${d.parent !== '-' ? ` (${d.parent}${d.vlan !== null ? `, vlan ${d.vlan}` : ''})` : ''}`
    : '';
  const where = d.network ? `on ${net}` : d.kind === 'tap' ? `on ${d.parent}` : `macvtap on ${d.parent} (${d.mode})`;
  return `${d.name} ${where} (ifindex ${d.ifindex}, mtu ${d.mtu}, mac ${d.mac ?? 'set by the hypervisor'}, ` +
    `${d.queues} queue${d.queues > 1 ? 's' : ''}${d.vhost ? ', vhost' : ''}` +
    `${d.persistent ? ', persistent' : ''}, rule ${d.rule})`;
}

async function run(args: Args): Promise<number> {
  const client = await TapbrokerClient.connect(args.socket);
  let taps: Tap[];
  try {
    // Every NIC in one request: one round trip, and the broker grants all of them or none.
    taps = await client.createNics(args.nets.map((n) => {
      const common = { queues: n.queues, vhost: n.vhost, mac: n.mac, name: n.name };
      return n.kind === 'macvtap'
        ? { kind: 'macvtap' as const, parent: n.parent, mode: n.mode!, ...common }
        : { kind: 'tap' as const, ...(n.network ? { network: n.parent } : { bridge: n.parent }), ...common };
    }));
  } catch (err) {
    client.close();
    throw err;
  }
  // The connection stays open while the command runs: a macvtap lease ends when it closes.
  for (const t of taps) process.stderr.write(`tapbroker: ${describeDevice(t.device)}\n`);
  const fds = taps.flatMap((t) => [...t.tapFds, ...t.vhostFds]);
  const [cmd, ...rest] = args.argv as [string, ...string[]];
  const child = spawn(cmd, [...rest, ...buildNicArgs(args.nets, taps)], {
    stdio: ['inherit', 'inherit', 'inherit', ...fds],
  });
  // The child holds the devices now; our copies must go so they vanish with it.
  taps.forEach(closeTap);
  const forward = (sig: NodeJS.Signals) => () => child.kill(sig);
  const handlers = (['SIGINT', 'SIGTERM', 'SIGHUP'] as const).map((sig) => [sig, forward(sig)] as const);
  for (const [sig, h] of handlers) process.on(sig, h);
  return new Promise((resolve, reject) => {
    child.on('error', (err) => reject(new TapbrokerError('TB_E_USAGE', `cannot run ${cmd}: ${err.message}`)));
    child.on('exit', (code, signal) => {
      for (const [sig, h] of handlers) process.off(sig, h);
      client.close();
      if (signal) {
        // Die the way the child died, so our parent sees the same status.
        process.kill(process.pid, signal);
        resolve(128 + (osConstants.signals[signal] ?? 0));
      } else resolve(code ?? 0);
    });
  });
}

interface LeaseArgs {
  command: 'create' | 'list' | 'release';
  socket: string | null;
  persistent: boolean;
  bridge: string | null;
  network: string | null;
  macvtap: string | null;
  mode: MacvtapMode | null;
  name: string | null;
  queues: number;
  mac: string | null;
  group: number | null;
  output: 'text' | 'xml' | 'json';
}

export function parseLeaseArgs(argv: readonly string[]): LeaseArgs {
  const o: LeaseArgs = {
    command: argv[0] as LeaseArgs['command'], socket: null, persistent: false, bridge: null, network: null,
    macvtap: null, mode: null, name: null, queues: 1, mac: null, group: null, output: 'text',
  };
  const usage = (m: string): never => { throw new TapbrokerError('TB_E_USAGE', m); };
  for (let i = 1; i < argv.length; i++) {
    const a = argv[i]!;
    const [flag, inline] = a.startsWith('--') && a.includes('=')
      ? [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)]
      : [a, undefined];
    const value = () => inline ?? argv[++i] ?? usage(`${flag} needs a value`);
    const ifname = (what: string) => {
      const v = value();
      const why = checkIfName(v);
      return why ? usage(`${what} \`${v}' ${why}`) : v;
    };
    switch (flag) {
      case '--socket': o.socket = value(); break;
      case '--persistent': o.persistent = true; break;
      case '--bridge': o.bridge = ifname('bridge'); break;
      case '--macvtap': o.macvtap = ifname('parent'); break;
      case '--network': {
        const n = value();
        const why = checkNetworkName(n);
        if (why) usage(`network name \`${n}' ${why}`);
        o.network = n;
        break;
      }
      case '--mode': {
        const m = value();
        if (!(MACVTAP_MODES as readonly string[]).includes(m)) {
          usage(`--mode must be one of ${MACVTAP_MODES.join(', ')}`);
        }
        o.mode = m as MacvtapMode;
        break;
      }
      case '--name': o.name = ifname('name'); break;
      case '--queues': {
        const q = value();
        if (!/^[0-9]{1,4}$/.test(q) || checkQueues(Number(q))) {
          usage(`--queues ${checkQueues(Number(q)) ?? 'must be an integer'}`);
        }
        o.queues = Number(q);
        break;
      }
      case '--mac': {
        const m = value().toLowerCase();
        const why = checkMac(m);
        if (why) usage(`mac \`${m}' ${why}`);
        o.mac = m;
        break;
      }
      case '--group': {
        const g = value();
        const gid = /^\d+$/.test(g) ? Number(g) : sys.getgrnam(g);
        o.group = gid ?? usage(`no group \`${g}'`);
        break;
      }
      case '--xml': o.output = 'xml'; break;
      case '--json': o.output = 'json'; break;
      default:
        if (o.command === 'release' && !a.startsWith('-') && o.name === null) {
          o.name = a;
          break;
        }
        usage(`unknown argument \`${a}'`);
    }
  }
  if (o.command === 'create') {
    if (!o.persistent) {
      usage('create makes persistent devices: say --persistent (for a VM you start yourself, use tapbroker run)');
    }
    if ([o.bridge, o.network, o.macvtap].filter((x) => x !== null).length !== 1) {
      usage('create needs exactly one of --bridge, --network or --macvtap');
    }
    if (o.mode !== null && o.macvtap === null) usage('--mode is for --macvtap');
    if (o.group !== null && o.macvtap !== null) {
      usage('--group is for --bridge: a persistent macvtap is its owner\'s alone');
    }
  }
  if (o.command === 'release' && o.name === null) usage('release needs the NAME of a device');
  return o;
}

function leaseTable(leases: readonly Lease[]): string {
  const rows = [['NAME', 'KIND', 'PARENT', 'MODE', 'MAC', 'QUEUES', 'OWNER', 'RULE', 'ENDS', 'CREATED'],
    ...leases.map((l) => [l.name, l.kind, l.parent, l.mode ?? '-', l.mac ?? 'unknown', String(l.queues),
      l.user ?? String(l.uid), l.rule,
      l.ends === 'holder' ? `with pid ${l.holder}` : l.ends === 'fds' ? 'with its fds' : 'on release', l.created])];
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  return rows.map((r) => r.map((cell, c) => cell.padEnd(widths[c]!)).join('  ').trimEnd()).join('\n');
}

async function leaseCommand(o: LeaseArgs): Promise<number> {
  const client = await TapbrokerClient.connect(o.socket);
  try {
    if (o.command === 'list') {
      const { leases, truncated } = await client.list();
      process.stdout.write(
        o.output === 'json' ? `${JSON.stringify({ leases, truncated }, null, 2)}\n` : `${leaseTable(leases)}\n`,
      );
      if (truncated) process.stderr.write('tapbroker: more leases exist than one reply holds; the oldest are listed\n');
      return 0;
    }
    if (o.command === 'release') {
      const lease = await client.release(o.name!);
      process.stdout.write(
        o.output === 'json'
          ? `${JSON.stringify(lease, null, 2)}\n`
          : `released ${lease.name} (${lease.kind} on ${lease.parent})\n`,
      );
      return 0;
    }
    const common = { queues: o.queues, mac: o.mac, name: o.name, persistent: true };
    const tap = o.macvtap === null
      ? await client.createTap({
        ...(o.bridge !== null ? { bridge: o.bridge } : { network: o.network! }), group: o.group, ...common,
      })
      : await client.createMacvtap({ parent: o.macvtap, mode: o.mode ?? 'bridge', ...common });
    const d = tap.device;
    if (o.output === 'xml') process.stdout.write(libvirtInterfaceXml(d));
    else if (o.output === 'json') process.stdout.write(`${JSON.stringify(d, null, 2)}\n`);
    else process.stdout.write(`created ${describeDevice(d)}\nrelease it with: tapbroker release ${d.name}\n`);
    return 0;
  } finally {
    client.close();
  }
}

/** tapbroker status: what the broker says of itself and of the caller; the socket it reached. */
async function statusCommand(argv: readonly string[]): Promise<number> {
  let socket: string | null = null;
  let json = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--json') json = true;
    else if (a === '--socket') socket = argv[++i] ?? null;
    else if (a.startsWith('--socket=')) socket = a.slice(9);
    else throw new TapbrokerError('TB_E_USAGE', `unknown argument \`${a}'`);
    if (socket === '') throw new TapbrokerError('TB_E_USAGE', '--socket needs a value');
  }
  const client = await TapbrokerClient.connect(socket);
  try {
    const s = await client.status();
    if (json) {
      const { op: _op, id: _id, ...rest } = s;
      process.stdout.write(`${JSON.stringify({ socket: client.socket, ...rest }, null, 2)}\n`);
      return 0;
    }
    const lines = [
      `broker:   ${s.broker} (protocol ${s.version}) at ${client.socket}, up since ${s.started}`,
      `policy:   sha256 ${s.policy_sha256}`,
      `you:      ${s.user ?? 'uid'} (uid ${s.uid}), ${s.leases} live lease${s.leases === 1 ? '' : 's'}` +
        `${s.uid === 0 ? ' (everyone\'s)' : ''}`,
      ...(s.connections !== null ? [`clients:  ${s.connections} connection${s.connections === 1 ? '' : 's'}`] : []),
      s.rules.length === 0 ? 'rules:    none applies to you: the broker will refuse your requests'
        : `rules:    ${s.rules.map((r) => `${r.rule} (${r.used} of ${r.max_devices} devices)`).join(', ')}`,
    ];
    process.stdout.write(`${lines.join('\n')}\n`);
    return 0;
  } finally {
    client.close();
  }
}

export async function main(argv: readonly string[]): Promise<number> {
  if (argv[0] === '-V' || argv[0] === '--version') {
    const { version } = createRequire(import.meta.url)('../package.json') as { version: string };
    process.stdout.write(`tapbroker ${version} (protocol ${PROTOCOL_VERSION})\n`);
    return 0;
  }
  if (argv[0] === '-h' || argv[0] === '--help' || argv[0] === 'help') {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  try {
    if (argv[0] === 'create' || argv[0] === 'list' || argv[0] === 'release') {
      return await leaseCommand(parseLeaseArgs(argv));
    }
    if (argv[0] === 'status') return await statusCommand(argv.slice(1));
    if (argv[0] === 'reload') {
      const socket = argv[1]?.startsWith('--socket=')
        ? argv[1].slice(9)
        : argv[1] === '--socket' ? argv[2] ?? null : null;
      if (argv.length !== (socket === null ? 1 : argv[1] === '--socket' ? 3 : 2)) {
        throw new TapbrokerError('TB_E_USAGE', 'reload takes only --socket PATH');
      }
      const client = await TapbrokerClient.connect(socket);
      try {
        process.stdout.write(`policy reloaded: sha256 ${await client.reload()}\n`);
      } finally {
        client.close();
      }
      return 0;
    }
    const args = parseArgs(argv);
    if (args.command === 'can') {
      const client = await TapbrokerClient.connect(args.socket);
      let all = true;
      try {
        for (const n of args.nets) {
          const r = await client.can({
            kind: n.network ? 'network' : n.kind, parent: n.parent, mode: n.mode, queues: n.queues, vhost: n.vhost,
            mac: n.mac, name: n.name,
          });
          all &&= r.allow;
          const target = n.network
            ? `network=${n.parent}`
            : n.kind === 'tap' ? `bridge=${n.parent}` : `macvtap=${n.parent} (${n.mode})`;
          process.stdout.write(
            r.allow
              ? `${target}: yes, by rule ${r.rule}\n`
              : `${target}: no, ${r.code}: ${r.message}${r.rule ? ` (rule: ${r.rule})` : ''}` +
                `${r.hint ? `; hint: ${r.hint}` : ''}\n`,
          );
        }
      } finally {
        client.close();
      }
      return all ? 0 : EXIT.NOPERM;
    }
    if (args.command === 'qemu-args') {
      process.stdout.write(`${buildNicArgs(args.nets, null).map(shellQuote).join(' ')}\n`);
      if (args.nets.some((n) => !n.mac)) {
        process.stderr.write('tapbroker: without mac=, `run` adds the MAC the broker assigns\n');
      }
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
  main(process.argv.slice(2)).then((code) => exitFlushed(code), (err: Error) => {
    process.stderr.write(`tapbroker: internal error: ${err.stack}\n`);
    process.exit(EXIT.SOFTWARE);
  });
}
