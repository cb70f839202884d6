#!/usr/bin/env node
// tapbroker: the unprivileged client. Usage in USAGE below.
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import { constants as osConstants } from 'node:os';
import path from 'node:path';
import {
  MACVTAP_MODES,
  MAX_NICS,
  PROTOCOL_VERSION,
  TapbrokerError,
  dropUnwritableOutput,
  exitFlushed,
  keepInspectorShut,
  checkIfName,
  checkMac,
  checkNetworkName,
  checkQueues,
  sys,
  type Device,
  type ErrorCode,
  type Lease,
  type MacvtapMode,
} from '@tapbroker/protocol/lite';
import { TapbrokerClient, closeTap, socketPath, type CanNic, type Tap } from './client.js';
import { libvirtInterfaceXml } from './libvirt.js';
import { parseNetSpec, type NetSpec } from './netspec.js';
import { childFdNumbers, nicArgs, shellQuote } from './qemu-args.js';

type Command = 'run' | 'qemu-args' | 'create' | 'list' | 'release' | 'can' | 'status' | 'reload';

const SPEC = [
  'SPEC:  bridge=NAME|network=NAME|macvtap=PARENT[,mode=bridge|vepa|private|passthru][,queues=N][,vhost=on|off]',
  '       [,mac=MAC][,id=ID][,model=MODEL|none][,name=IFNAME][,dev.KEY=VALUE...]',
];

/** Each command's usage lines (`COMMAND --help` and its usage errors), what it does, and the flags it takes. */
const COMMANDS: Record<Command, { usage: string[]; about: string[]; flags: string[] }> = {
  run: {
    usage: ['tapbroker run [--socket PATH] --net SPEC... -- COMMAND [ARG...]'],
    about: [
      'Ask the broker for one device per --net SPEC, then run COMMAND (qemu) with their fds as 3, 4, ...',
      'and their -netdev and -device arguments appended; exit with COMMAND\'s status.',
    ],
    flags: ['--socket', '--net'],
  },
  'qemu-args': {
    usage: ['tapbroker qemu-args --net SPEC...'],
    about: ['Print the qemu arguments `run\' would add for these SPECs, without asking the broker.'],
    flags: ['--net'],
  },
  create: {
    usage: [
      'tapbroker create --persistent (--bridge BRIDGE | --network NAME | --macvtap PARENT [--mode MODE]) [--name NAME]',
      '                 [--queues N] [--mac MAC] [--group GROUP] [--exist-ok] [--xml | --json] [--socket PATH]',
    ],
    about: [
      'Make a persistent device owned by you (with --group: given to that group instead), for rootless libvirtd; it '
        + 'lives until `tapbroker release NAME\'.',
      '--xml prints the libvirt <interface> element. --exist-ok (with --name): your device of that name, made',
      'the same way, is success, not an error (for a unit that makes it at every boot).',
    ],
    flags: ['--socket', '--persistent', '--bridge', '--network', '--macvtap', '--mode', '--name', '--queues', '--mac',
      '--group', '--exist-ok', '--xml', '--json'],
  },
  list: {
    usage: ['tapbroker list [--json] [--socket PATH]'],
    about: ['Your leases (root: everyone\'s), oldest first; --json prints the raw values.'],
    flags: ['--socket', '--json'],
  },
  release: {
    usage: ['tapbroker release NAME [--json] [--socket PATH]'],
    about: ['Delete your persistent device NAME (made by `tapbroker create --persistent\').'],
    flags: ['--socket', '--json'],
  },
  can: {
    usage: ['tapbroker can [--socket PATH] [--persistent [--group GROUP]] --net SPEC...'],
    about: [
      'Dry run: would the broker grant each SPEC now, and by which rule? Nothing is created.',
      '--persistent asks about a persistent device (`tapbroker create --persistent\'), --group about one given',
      'to GROUP too (`create --group\').',
    ],
    flags: ['--socket', '--net', '--persistent', '--group'],
  },
  status: {
    usage: ['tapbroker status [--json] [--socket PATH]'],
    about: ['The broker, its policy, your leases and your quotas.'],
    flags: ['--socket', '--json'],
  },
  reload: {
    usage: ['tapbroker reload [--socket PATH]'],
    about: ['Root only: the broker re-reads its policy file.'],
    flags: ['--socket'],
  },
};

function isCommand(word: string | undefined): word is Command {
  return word !== undefined && Object.hasOwn(COMMANDS, word);
}

/** Usage lines as a block: `usage: ` before the first, aligned below it. */
function usageBlock(lines: readonly string[]): string {
  return lines.map((l, i) => `${i === 0 ? 'usage: ' : '       '}${l}`).join('\n');
}

const USAGE = [
  usageBlock(Object.values(COMMANDS).flatMap((c) => c.usage)),
  ...SPEC,
  '`tapbroker COMMAND --help\' explains one command; `tapbroker --version\' (-V) prints the version and the protocol.',
].join('\n');

/** `tapbroker COMMAND --help`: its usage, what it does, and the SPEC syntax where it takes one. */
function commandHelp(command: Command): string {
  const c = COMMANDS[command];
  return [usageBlock(c.usage), ...c.about, ...(c.flags.includes('--net') ? SPEC : [])].join('\n');
}

/** Why `flag` is refused: another command's flag is named as such, anything else as unknown. */
function refuse(command: Command, arg: string, flag: string): never {
  const known = Object.values(COMMANDS).some((c) => c.flags.includes(flag));
  throw new TapbrokerError('TB_E_USAGE', known ? `${command} does not take ${flag}` : `unknown argument \`${arg}'`);
}

/** sysexits(3), documented in the README. */
export const EXIT = {
  USAGE: 64, DATAERR: 65, SOFTWARE: 70, OSERR: 71, UNAVAILABLE: 69, NOPERM: 77, CONFIG: 78,
} as const;

export function exitCodeFor(code: ErrorCode): number {
  switch (code) {
    case 'TB_E_USAGE':
      return EXIT.USAGE;
    case 'TB_E_POLICY_INVALID': case 'TB_E_BRIDGE_ADDRESS':
      return EXIT.CONFIG;
    // A port lock the policy asks for and cannot have is the policy's refusal, as `can` says (77).
    case 'TB_E_POLICY_DENIED': case 'TB_E_QUOTA_EXCEEDED': case 'TB_E_MAC_LOCK':
      return EXIT.NOPERM;
    case 'TB_E_INVALID_NAME': case 'TB_E_INVALID_MAC': case 'TB_E_INVALID_QUEUES': case 'TB_E_NO_SUCH_BRIDGE':
    case 'TB_E_NOT_A_BRIDGE': case 'TB_E_DEVICE_EXISTS': case 'TB_E_INVALID_REQUEST': case 'TB_E_NO_SUCH_PARENT':
    case 'TB_E_BAD_PARENT': case 'TB_E_MAC_IN_USE': case 'TB_E_NO_SUCH_LEASE':
      return EXIT.DATAERR;
    case 'TB_E_CONNECT': case 'TB_E_BROKER_CLOSED': case 'TB_E_VHOST_UNAVAILABLE': case 'TB_E_VLAN_UNAVAILABLE':
    case 'TB_E_BUSY':
    case 'TB_E_TIMEOUT': case 'TB_E_VERSION': case 'TB_E_STATE_UNWRITABLE': case 'TB_E_DEVICE_IN_USE':
    // The network's own set-up (the site's hook) failed, not the broker (an outside review: it read as 70).
    case 'TB_E_HOOK_FAILED':
      return EXIT.UNAVAILABLE;
    // The broker, the kernel or this client failed: a frame one side could not read is a bug, not the user's doing.
    case 'TB_E_KERNEL': case 'TB_E_INTERNAL': case 'TB_E_BAD_REPLY': case 'TB_E_MALFORMED': case 'TB_E_UNKNOWN_OP':
    case 'TB_E_HELLO_REQUIRED': case 'TB_E_UNEXPECTED_FDS': case 'TB_E_FRAME_TOO_LARGE': case 'TB_E_UNSUPPORTED_TYPE':
      return EXIT.SOFTWARE;
    default: {
      // Every code has its status, which tapbroker(1) gives: a new code does not compile until it has one.
      const unlisted: never = code;
      return unlisted;
    }
  }
}

interface Args {
  command: 'run' | 'qemu-args' | 'can';
  socket: string | null;
  nets: NetSpec[];
  argv: string[];
  /** can: ask about a persistent device, given to this group too. */
  persistent: boolean;
  group: number | null;
}

/** A group given by name or number, as `create --group` and `can --group` take it. */
function groupId(g: string): number {
  const gid = /^\d+$/.test(g) ? Number(g) : sys.getgrnam(g);
  if (gid === null || gid === undefined) throw new TapbrokerError('TB_E_USAGE', `no group \`${g}'`);
  return gid;
}

/** `--flag=value` as [flag, value]; anything else as [arg, undefined]. */
function splitFlag(a: string): [string, string | undefined] {
  const eq = a.startsWith('--') ? a.indexOf('=') : -1;
  return eq > 0 ? [a.slice(0, eq), a.slice(eq + 1)] : [a, undefined];
}

/** The place a NIC's MAC must be unique: a bridge or parent link, or a network. */
function target(n: NetSpec): string {
  return n.network ? `network=${n.parent}` : n.kind === 'tap' ? `bridge=${n.parent}` : `macvtap=${n.parent}`;
}

export function parseArgs(argv: readonly string[]): Args {
  const command = argv[0];
  if (command !== 'run' && command !== 'qemu-args' && command !== 'can') {
    throw new TapbrokerError('TB_E_USAGE', command ? `unknown command \`${command}'` : 'no command');
  }
  const out: Args = { command, socket: null, nets: [], argv: [], persistent: false, group: null };
  const seen = new Set<string>();
  let i = 1;
  for (; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') {
      out.argv = argv.slice(i + 1);
      break;
    }
    const [flag, inline] = splitFlag(a);
    const value = () => {
      const v = inline ?? argv[++i];
      // An empty value is refused (an outside review: `--socket "$SOCK"` with SOCK empty went to the default broker).
      if (v === undefined || v === '') throw new TapbrokerError('TB_E_USAGE', `${flag} needs a value`);
      return v;
    };
    if (!COMMANDS[command].flags.includes(flag)) refuse(command, a, flag);
    // A flag given twice is a mistake, not a vote (--net is given once per NIC), as for the other commands.
    if (flag !== '--net' && seen.has(flag)) throw new TapbrokerError('TB_E_USAGE', `${flag} given twice`);
    seen.add(flag);
    if (flag === '--net') out.nets.push(parseNetSpec(value()));
    else if (flag === '--socket') out.socket = value();
    else if (flag === '--group') out.group = groupId(value());
    else if (inline !== undefined) throw new TapbrokerError('TB_E_USAGE', `${flag} takes no value`);
    else out.persistent = true;
  }
  if (out.group !== null && !out.persistent) {
    throw new TapbrokerError('TB_E_USAGE', '--group is for --persistent devices');
  }
  if (out.group !== null && out.nets.some((n) => n.kind === 'macvtap')) {
    throw new TapbrokerError('TB_E_USAGE', '--group is for taps: a persistent macvtap is its owner\'s alone');
  }
  if (out.nets.length === 0) throw new TapbrokerError('TB_E_USAGE', 'at least one --net SPEC is needed');
  if (command === 'run' && out.argv.length === 0) throw new TapbrokerError('TB_E_USAGE', 'no command after --');
  if (command !== 'run' && i < argv.length) throw new TapbrokerError('TB_E_USAGE', `${command} takes no command`);
  const ids = out.nets.map((n, k) => n.id ?? `net${k}`);
  const dup = ids.find((id, k) => ids.indexOf(id) !== k);
  if (dup) throw new TapbrokerError('TB_E_USAGE', `netdev id \`${dup}' used twice`);
  // qemu refuses a second netdev of one id only once it runs, after the devices were made (an outside review).
  const theirs = commandNetdevIds(out.argv);
  const clash = out.nets.findIndex((_, k) => theirs.has(ids[k]!));
  if (clash >= 0) {
    throw new TapbrokerError('TB_E_USAGE', `netdev id \`${ids[clash]}' of --net SPEC ${clash + 1} is also the id of `
      + `a -netdev or -nic in COMMAND: give the SPEC another (${target(out.nets[clash]!)},id=tb${ids[clash]})`);
  }
  // Two guest NICs with one MAC on one segment confuse every switch and guest (`can' refuses them as `run' does).
  const where = out.nets.map((n) => (n.mac ? `${n.network ? 'network' : 'link'}:${n.parent}/${n.mac}` : null));
  const k = where.findIndex((w, j) => w !== null && where.indexOf(w) !== j);
  if (k >= 0) {
    const first = where.indexOf(where[k]!);
    throw new TapbrokerError('TB_E_USAGE', `--net SPECs ${first + 1} and ${k + 1} both have mac ${out.nets[k]!.mac} `
      + `on ${target(out.nets[k]!)}: give each NIC its own MAC`);
  }
  // One request's worth (its `before` fits a request frame): `run` asks for more in several requests.
  if (command === 'can' && out.nets.length > MAX_NICS) {
    throw new TapbrokerError('TB_E_USAGE', `can weighs at most ${MAX_NICS} SPECs together (one request's worth)`);
  }
  return out;
}

/**
 * The ids of the netdevs a qemu command line makes itself: `-netdev`, `-nic` and `-net` with `id=X` (`,,` is
 * a comma within a value, as qemu reads it), and `-netdev` in JSON (`{"id": "X", …}`).
 */
function commandNetdevIds(argv: readonly string[]): Set<string> {
  const ids = new Set<string>();
  argv.forEach((a, k) => {
    const value = argv[k + 1];
    if (!/^--?(netdev|nic|net)$/.test(a) || value === undefined) return;
    if (value.startsWith('{')) {
      try {
        const id = (JSON.parse(value) as { id?: unknown }).id;
        if (typeof id === 'string') ids.add(id);
      } catch {
        // Not JSON qemu would take either: qemu says why.
      }
      return;
    }
    for (const opt of value.replaceAll(',,', '\0').split(',')) {
      if (opt.startsWith('id=')) ids.add(opt.slice(3).replaceAll('\0', ','));
    }
  });
  return ids;
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
    tapFds: numbers[2 * k]!, vhostFds: numbers[2 * k + 1]!, props: n.props,
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

/** execvp's search path when PATH is unset (glibc's _CS_PATH). */
const DEFAULT_PATH = '/bin:/usr/bin';

/**
 * Where `cmd` would run from, found as a shell finds it (a name with a `/` is that file; else the first
 * executable file in the PATH entries, an empty one meaning `.`), or the shell's status for why not:
 * 127 not found, 126 found but not runnable.
 */
export function resolveCommand(cmd: string, pathVar = process.env['PATH']):
  { file: string } | { status: 126 | 127; reason: string } {
  if (cmd === '') return { status: 127, reason: 'not found' };
  const searched = !cmd.includes('/');
  const files = searched ? (pathVar ?? DEFAULT_PATH).split(':').map((d) => path.join(d || '.', cmd)) : [cmd];
  let denied: string | null = null;
  for (const file of files) {
    let st: fs.Stats;
    try {
      st = fs.statSync(file);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? '';
      // In a PATH search, a directory we may not search is skipped as shells do (execvp would say EACCES
      // for a qemu that is simply not installed).
      if (!searched && code !== 'ENOENT' && code !== 'ENOTDIR') denied = ERRNO_REASONS[code] ?? code;
      continue;
    }
    if (st.isDirectory()) {
      if (!searched) denied = 'is a directory';
      continue;
    }
    try {
      fs.accessSync(file, fs.constants.X_OK);
      return { file };
    } catch {
      // A file we may not run is remembered, and the search goes on.
      denied ??= 'permission denied';
    }
  }
  return denied ? { status: 126, reason: denied } : { status: 127, reason: 'not found' };
}

const ERRNO_REASONS: Record<string, string> = {
  EACCES: 'permission denied', ELOOP: 'too many levels of symbolic links', ENAMETOOLONG: 'file name too long',
  ENOEXEC: 'exec format error', ENOENT: 'not found',
};

/** What a refusal adds to the broker's hint; printed after it. */
const moreHints = new WeakMap<TapbrokerError, string>();

/**
 * The broker's quota refusal speaks of stopping a VM, but persistent devices count too and no VM holds
 * them: name the caller's under the refusing rule, asked on the same connection.
 */
async function persistentHint(client: TapbrokerClient, rule: string | undefined): Promise<string | null> {
  let leases: Lease[];
  try {
    ({ leases } = await client.list());
  } catch {
    return 'persistent devices count too (`tapbroker list\' shows them); free one with `tapbroker release NAME\'';
  }
  const uid = process.getuid?.();
  const names = leases.filter((l) => l.ends === 'release' && (uid === undefined || l.uid === uid)
    && (!rule || l.rule === rule)).map((l) => l.name);
  if (names.length === 0) return null;
  const shown = names.length > 4 ? `${names.slice(0, 4).join(', ')} and ${names.length - 4} more` : names.join(', ');
  return `persistent devices count too, and no VM holds them: you have ${shown}${rule ? ` under rule ${rule}` : ''}; `
    + 'free one with `tapbroker release NAME\'';
}

/** On a quota refusal, the persistent-device hint for `err`; then rethrows it. */
async function rethrowWithHint(client: TapbrokerClient, err: unknown): Promise<never> {
  if (err instanceof TapbrokerError && err.code === 'TB_E_QUOTA_EXCEEDED') {
    const hint = await persistentHint(client, err.rule);
    if (hint) moreHints.set(err, hint);
  }
  throw err;
}

/** model=none: the -device the user writes, with what the client knows of it. */
function ownDeviceNote(id: string, mac: string | null, queues: number): string {
  return `tapbroker: ${id}: model=none, so no -device: write your own, e.g. -device virtio-net-pci,netdev=${id}`
    + `${mac ? `,mac=${mac}` : ',mac=MAC'}${queues > 1 ? `,mq=on,vectors=${2 * queues + 2}` : ''}\n`
    // Without one the guest has qemu's MAC, not the one the broker leased (and may lock the port to).
    + (mac ? '' : `tapbroker: ${id}: give mac= in the SPEC, so that your -device can carry the MAC of the lease\n`);
}

async function run(args: Args): Promise<number> {
  const [cmd, ...rest] = args.argv as [string, ...string[]];
  // Before the broker makes anything: a typo in the qemu binary's name costs no devices, as in a shell.
  const found = resolveCommand(cmd);
  if ('status' in found) {
    process.stderr.write(`tapbroker: cannot run ${cmd}: ${found.reason}\n`);
    return found.status;
  }
  const stop = patience(args.socket);
  const client = await TapbrokerClient.connect(args.socket).catch((err: unknown) => (stop(), Promise.reject(err)));
  let taps: Tap[];
  try {
    // Every NIC in one request: one round trip, and the broker grants all of them or none.
    const nics = args.nets.map((n) => {
      const common = { queues: n.queues, vhost: n.vhost, mac: n.mac, name: n.name };
      return n.kind === 'macvtap'
        ? { kind: 'macvtap' as const, parent: n.parent, mode: n.mode!, ...common }
        : { kind: 'tap' as const, ...(n.network ? { network: n.parent } : { bridge: n.parent }), ...common };
    });
    const onRetry = (why: string) => void process.stderr.write(`tapbroker: ${why}\n`);
    taps = await client.createNics(nics, { onRetry }).catch((err: unknown) => rethrowWithHint(client, err));
  } catch (err) {
    client.close();
    throw err;
  } finally {
    stop();
  }
  // The connection stays open while the command runs: a macvtap lease ends when it closes.
  for (const t of taps) process.stderr.write(`tapbroker: ${describeDevice(t.device)}\n`);
  args.nets.forEach((n, k) => {
    if (n.model === null) process.stderr.write(ownDeviceNote(n.id ?? `net${k}`, taps[k]!.device.mac, n.queues));
  });
  const fds = taps.flatMap((t) => [...t.tapFds, ...t.vhostFds]);
  // Caught before the command starts: it can say it is ready (and be signalled) before spawn() has returned here,
  // and a signal between the two ended the client alone. Handlers run once this turn is over: `child` is set by then.
  let child: ChildProcess | undefined;
  const handlers = FORWARDED.map((sig) => [sig, () => child?.kill(sig)] as const);
  for (const [sig, h] of handlers) process.on(sig, h);
  let finished = false;
  const done = () => {
    if (finished) return;
    finished = true;
    for (const [sig, h] of handlers) process.off(sig, h);
    client.close();
  };
  try {
    child = spawn(cmd, [...rest, ...buildNicArgs(args.nets, taps)], {
      stdio: ['inherit', 'inherit', 'inherit', ...fds],
    });
  } catch (err) {
    // Node throws the errors it does not emit (ENOEXEC, ELOOP, ...).
    taps.forEach(closeTap);
    done();
    return cannotRun(cmd, found.file, err as NodeJS.ErrnoException);
  }
  // The child holds the devices now; our copies must go so they vanish with it.
  taps.forEach(closeTap);
  // Not reaped before this turn ends (libuv reaps in the event loop): the pidfd is the child's.
  const pidfd = child.pid === undefined ? null : pidfdOrNull(child.pid);
  return new Promise((resolve) => {
    // Checked above, but the file may have changed since: the shell's status, not a usage error.
    child.once('error', (err: NodeJS.ErrnoException) => {
      if (pidfd !== null) sys.close(pidfd);
      done();
      resolve(cannotRun(cmd, found.file, err));
    });
    child.once('exit', (code, named) => {
      const signal = named ?? (code === 0 ? namelessSignal(pidfd) : null);
      if (pidfd !== null) sys.close(pidfd);
      done();
      if (signal) {
        // Die the way the child died, so our parent sees the same status; where this process cannot (SIGUSR1
        // stays taken from Node's inspector, Node ignores SIGPIPE), exit with the status a shell would show. The
        // crash was the child's: its core is the one to keep, and ours (of node) would replace it.
        if (signal !== 'SIGUSR1' && signal !== 'SIGPIPE') {
          sys.dumpNoCore();
          process.kill(process.pid, signal);
        }
        resolve(128 + (typeof signal === 'number' ? signal : osConstants.signals[signal] ?? 0));
      } else resolve(code ?? 0);
    });
  });
}

/**
 * The signals `run` passes on to its command: every one that would end it otherwise and that Node lets it catch
 * (outside reviews: SIGQUIT, SIGUSR2, SIGALRM, then SIGPROF, SIGABRT … ended the client alone, its qemu left running
 * with no parent and a macvtap the broker then deleted). SIGUSR1 too: Node's inspector never sees it
 * (keepInspectorShut). Real-time signals have no name Node takes: they still end the client alone. Nor SIGSEGV,
 * SIGBUS, SIGFPE, SIGILL: a listener for those turns a real fault into a loop of the faulting instruction (Node's
 * own warning); a client killed with one is a crash, and its command is left as in any crash (rv63 F2).
 */
const FORWARDED: readonly NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP', 'SIGUSR1', 'SIGQUIT', 'SIGUSR2', 'SIGALRM',
  'SIGVTALRM', 'SIGPROF', 'SIGXCPU', 'SIGXFSZ', 'SIGPWR', 'SIGIO', 'SIGSTKFLT', 'SIGSYS', 'SIGTRAP', 'SIGABRT'];

function pidfdOrNull(pid: number): number | null {
  try {
    return sys.pidfdOpen(pid);
  } catch {
    return null;
  }
}

/**
 * The real-time signal (SIGRTMIN … SIGRTMAX) that killed a child Node reports as `exit(0)`: Node names only the
 * classic signals (an outside review: a VM killed by SIGRTMIN+2 made `tapbroker run` exit 0). Null for a real exit 0,
 * or where the kernel cannot tell (before Linux 6.15).
 */
function namelessSignal(pidfd: number | null): number | null {
  const status = pidfd === null ? null : sys.exitStatusOf(pidfd);
  return status !== null && (status & 0x7f) !== 0 ? status & 0x7f : null;
}

/**
 * This process's own limits, met while starting the command: not the command's fault, so not 126 (an outside review:
 * `spawn sh EMFILE' exited 126, which says the command cannot be run). sysexits' EX_OSERR ("cannot fork"), 71.
 */
const OWN_LIMITS: Record<string, [why: string, hint: string]> = {
  EMFILE: ['tapbroker\'s open-files limit is reached', 'raise it (ulimit -n)'],
  ENFILE: ['the system\'s open-files limit is reached', 'an administrator raises fs.file-max, or closes some files'],
  EAGAIN: ['no process can be made: the user\'s process limit is reached',
    'raise it (ulimit -u) or end some processes'],
  ENOMEM: ['out of memory', 'free some memory or raise the memory limit of this session'],
};

/** A command that did not start, as a shell reports it: 127 not found, else 126 (71: this process's limits). */
function cannotRun(cmd: string, file: string, err: NodeJS.ErrnoException): number {
  const own = OWN_LIMITS[err.code ?? ''];
  if (own) {
    process.stderr.write(`tapbroker: cannot start ${cmd}: ${own[0]} (${err.code}); its devices were given back\n`
      + `tapbroker: hint: ${own[1]}\n`);
    return EXIT.OSERR;
  }
  // ENOENT for a file that is there: its `#!' interpreter (or ELF loader) is not, as bash reports it.
  const missing = err.code === 'ENOENT' && !fs.existsSync(file);
  const reason = err.code === 'ENOENT' && !missing
    ? 'bad interpreter: not found' : ERRNO_REASONS[err.code ?? ''] ?? err.message;
  process.stderr.write(`tapbroker: cannot run ${cmd}: ${reason}\n`);
  return missing ? 127 : 126;
}

interface LeaseArgs {
  command: 'create' | 'list' | 'release' | 'status' | 'reload';
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
  /** create: the caller's own persistent device of that name, made the same way, is not an error. */
  existOk: boolean;
  output: 'text' | 'xml' | 'json';
}

/** The arguments of the commands that only talk to the broker: create, list, release, status and reload. */
export function parseLeaseArgs(argv: readonly string[]): LeaseArgs {
  const command = argv[0];
  if (command !== 'create' && command !== 'list' && command !== 'release' && command !== 'status'
    && command !== 'reload') {
    throw new TapbrokerError('TB_E_USAGE', command ? `unknown command \`${command}'` : 'no command');
  }
  const o: LeaseArgs = {
    command, socket: null, persistent: false, bridge: null, network: null,
    macvtap: null, mode: null, name: null, queues: 1, mac: null, group: null, existOk: false, output: 'text',
  };
  const usage = (m: string): never => { throw new TapbrokerError('TB_E_USAGE', m); };
  const seen = new Set<string>();
  for (let i = 1; i < argv.length; i++) {
    const a = argv[i]!;
    const [flag, inline] = splitFlag(a);
    const value = () => {
      const v = inline ?? argv[++i] ?? usage(`${flag} needs a value`);
      return v === '' ? usage(`${flag} needs a value`) : v;
    };
    if (command === 'release' && !a.startsWith('-')) {
      if (o.name !== null) usage(`release takes one NAME, not also \`${a}'`);
      o.name = a;
      continue;
    }
    if (!COMMANDS[command].flags.includes(flag)) refuse(command, a, flag);
    // A flag given twice is a mistake, not a vote: the last one would win silently.
    if (seen.has(flag)) usage(`${flag} given twice`);
    seen.add(flag);
    const noValue = () => inline === undefined || usage(`${flag} takes no value`);
    const ifname = (what: string) => {
      const v = value();
      const why = checkIfName(v);
      return why ? usage(`${what} \`${v}' ${why}`) : v;
    };
    switch (flag) {
      case '--socket': o.socket = value(); break;
      case '--persistent': noValue(); o.persistent = true; break;
      case '--exist-ok': noValue(); o.existOk = true; break;
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
      case '--group':
        o.group = groupId(value());
        break;
      case '--xml': case '--json':
        noValue();
        if (o.output !== 'text') usage('--xml and --json conflict: give one');
        o.output = flag === '--xml' ? 'xml' : 'json';
        break;
      default:
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
    if (o.existOk && o.name === null) usage('--exist-ok needs --name: it is about a device of that name');
    if (o.group !== null && o.macvtap !== null) {
      usage('--group is for --bridge: a persistent macvtap is its owner\'s alone');
    }
  }
  if (o.command === 'release' && o.name === null) usage('release needs the NAME of a device');
  return o;
}

/** An ISO time as the local `YYYY-MM-DD HH:MM:SS`; anything unparsable as it came. */
function localTime(iso: string): string {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  const p = (n: number) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} `
    + `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

// No VLAN column: a lease names its network, not the network's VLAN (that is policy, and may have changed).
function leaseTable(leases: readonly Lease[]): string {
  const rows = [['NAME', 'KIND', 'PARENT', 'NETWORK', 'MODE', 'MAC', 'QUEUES', 'OWNER', 'RULE', 'ENDS', 'CREATED'],
    ...leases.map((l) => [l.name, l.kind, l.parent, l.network ?? '-', l.mode ?? '-',
      `${l.mac ?? 'unknown'}${l.locked ? ' (locked)' : ''}`,
      String(l.queues), l.user ?? String(l.uid), l.rule,
      l.ends === 'holder' ? `with pid ${l.holder}` : l.ends === 'fds' ? 'with its fds' : 'on release',
      localTime(l.created)])];
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  return rows.map((r) => r.map((cell, c) => cell.padEnd(widths[c]!)).join('  ').trimEnd()).join('\n');
}

async function leaseCommand(o: LeaseArgs): Promise<number> {
  const stop = patience(o.socket);
  const client = await TapbrokerClient.connect(o.socket).catch((err: unknown) => (stop(), Promise.reject(err)));
  try {
    if (o.command === 'status') return await statusCommand(client, o.output === 'json');
    if (o.command === 'reload') {
      const { policy_sha256: sha, warnings } = await client.reload();
      process.stdout.write(`policy reloaded: sha256 ${sha}\n`);
      for (const w of warnings) process.stderr.write(`tapbroker: warning: ${w}\n`);
      return 0;
    }
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
    // --exist-ok looks first: a device of yours that is already there must not meet your quota (it is counted in
    // it) or any other refusal a new one would.
    const had = o.existOk ? await sameDevice(client, o) : null;
    let existed = had !== null;
    const tap = had ? { device: had, tapFds: [], vhostFds: [] } : await (o.macvtap === null
      ? client.createTap({
        ...(o.bridge !== null ? { bridge: o.bridge } : { network: o.network! }), group: o.group, ...common,
      })
      : client.createMacvtap({ parent: o.macvtap, mode: o.mode ?? 'bridge', ...common })
    ).catch(async (err: unknown) => {
      if (o.existOk && err instanceof TapbrokerError && err.code === 'TB_E_DEVICE_EXISTS') {
        const mine = await sameDevice(client, o);
        if (mine) {
          existed = true;
          return { device: mine, tapFds: [], vhostFds: [] };
        }
      }
      // The broker stopped after the request went: it may have made the device, and keeps it if it did.
      if (err instanceof TapbrokerError && err.code === 'TB_E_BROKER_CLOSED') {
        moreHints.set(err, `the device may have been made before the broker stopped: \`tapbroker list' shows it, `
          + (o.name !== null ? 'and --exist-ok takes it as made' : 'and `tapbroker release NAME\' removes it'));
      }
      return rethrowWithHint(client, err);
    });
    const d = tap.device;
    if (o.output === 'xml') process.stdout.write(libvirtInterfaceXml(d));
    else if (o.output === 'json') process.stdout.write(`${JSON.stringify(d, null, 2)}\n`);
    else if (existed) {
      process.stdout.write(`exists: ${d.name} (${d.kind} on ${d.network ?? d.parent}, rule ${d.rule})\n`);
    }
    else process.stdout.write(`created ${describeDevice(d)}\nrelease it with: tapbroker release ${d.name}\n`);
    return 0;
  } finally {
    client.close();
    stop();
  }
}

/**
 * What the kernel shows of a lease's device (/sys/class/net/NAME; the lease does not carry it): the group a tap was
 * given to (null for none), its MTU, its own MAC and a tap's flags; null where this process cannot see that device
 * (another namespace: not compared, not told).
 */
function shownByKernel(l: Lease): { group: number | null; mtu: number; address: string; flags: number } | null {
  try {
    const read = (f: string) => fs.readFileSync(`/sys/class/net/${l.name}/${f}`, 'utf8').trim();
    // Its index and its tag both: another namespace's sysfs may show a device of that name and index (a re-test).
    if (Number(read('ifindex')) !== l.ifindex || !read('ifalias').startsWith(`tapbroker lease=${l.id} `)) return null;
    const g = l.kind === 'tap' ? Number(read('group')) : -1;
    return { group: g < 0 || g === 0xffffffff ? null : g, mtu: Number(read('mtu')), address: read('address'),
      flags: l.kind === 'tap' ? Number.parseInt(read('tun_flags'), 16) : IFF_VNET_HDR };
  } catch {
    return null;
  }
}
const IFF_VNET_HDR = 0x4000;

/**
 * `create --exist-ok`: the caller's own persistent device named `o.name` (root's too: `list` shows root everyone's,
 * and another user's device is not root's, an outside review found), made as `o` asks (kind, parent or network,
 * queues, and the MAC when one is given), as a device to print; null when it is not that.
 */
async function sameDevice(client: TapbrokerClient, o: LeaseArgs): Promise<Device | null> {
  const { leases } = await client.list();
  const uid = process.getuid?.();
  const l = leases.find((x) => x.name === o.name && x.ends === 'release' && x.uid === uid);
  if (!l) return null;
  const kind = o.macvtap !== null ? 'macvtap' : 'tap';
  const where = o.network !== null ? `network ${o.network}` : `${o.bridge ?? o.macvtap}`;
  const seen = shownByKernel(l);
  const group = l.kind === 'tap' && seen ? seen.group : undefined;
  const differs = [
    l.kind !== kind && `a ${l.kind}, not a ${kind}`,
    (o.network !== null ? l.network !== o.network : l.network !== null || l.parent !== (o.bridge ?? o.macvtap))
      && `on ${l.network !== null ? `network ${l.network}` : l.parent}, not ${where}`,
    l.queues !== o.queues && `${l.queues} queue${l.queues === 1 ? '' : 's'}, not ${o.queues}`,
    o.mac !== null && l.mac !== o.mac && `MAC ${l.mac ?? '(the guest\'s own)'}, not ${o.mac}`,
    l.kind === 'macvtap' && kind === 'macvtap' && l.mode !== (o.mode ?? 'bridge')
      && `mode ${l.mode}, not ${o.mode ?? 'bridge'}`,
    group !== undefined && kind === 'tap' && group !== o.group
      && `given to ${group === null ? 'no group' : `group ${group}`}, `
        + `not to ${o.group === null ? 'none' : `group ${o.group}`}`,
  ].filter((x): x is string => typeof x === 'string');
  if (differs.length > 0) {
    throw new TapbrokerError('TB_E_DEVICE_EXISTS', `your device ${o.name} exists but is not what you ask: `
      + `${differs.join('; ')}`, {
      hint: `ask for it as it is, or release it first (tapbroker release ${o.name}) and create it anew`,
    });
  }
  return {
    // As the kernel shows them where it can (an outside review: MTU 0 and no host MAC, which the create had told).
    kind: l.kind, name: l.name, ifindex: l.ifindex, parent: l.parent, network: l.network, vlan: null, mode: l.mode,
    mtu: seen?.mtu ?? 0, host_mac: seen?.address ?? '', mac: l.mac, locked: l.locked, queues: l.queues,
    vnet_hdr: seen ? (seen.flags & IFF_VNET_HDR) !== 0 : true, vhost: false, persistent: true, rule: l.rule,
  };
}

/** tapbroker status: what the broker says of itself and of the caller; the socket it reached. */
async function statusCommand(client: TapbrokerClient, json: boolean): Promise<number> {
  const s = await client.status();
  if (json) {
    const { op: _op, id: _id, ...rest } = s;
    process.stdout.write(`${JSON.stringify({ socket: client.socket, ...rest }, null, 2)}\n`);
    return 0;
  }
  const lines = [
    `broker:   ${s.broker} (protocol ${s.version}) at ${client.socket}, up since ${s.started}`,
    `policy:   sha256 ${s.policy_sha256}${(s.policy_loads ?? 1) > 1 ? `, after ${s.policy_loads! - 1} reload${
      s.policy_loads === 2 ? '' : 's'}` : ''}`,
    `you:      ${s.user !== null ? `${s.user} (uid ${s.uid})` : `uid ${s.uid}`}, `
    + `${s.leases} live lease${s.leases === 1 ? '' : 's'}` +
      `${s.uid === 0 ? ' (everyone\'s)' : ''}`,
    ...((s.tearing_down ?? 0) > 0 ? [`          and ${s.tearing_down} device${s.tearing_down === 1 ? '' : 's'} `
      + 'still being torn down'] : []),
    ...(s.connections !== null ? [`clients:  ${s.connections} connection${s.connections === 1 ? '' : 's'}`] : []),
    s.rules.length === 0 ? 'rules:    none applies to you: the broker will refuse your requests'
      : `rules:    ${s.rules.map((r) => `${r.rule} (${r.used} of ${r.max_devices} devices)`).join(', ')}`,
    // Deny wins: a rule above grants nothing a deny here covers.
    ...s.denies.map((d) => `denied:   by rule ${d.rule}: ${d.covers}${d.covers === 'everything'
      ? ' (the broker will refuse your requests)' : ''}`),
    ...(s.truncated ? ['          (more rules or denies apply than one reply holds: `tapbroker can\' asks of '
      + 'one)'] : []),
  ];
  process.stdout.write(`${lines.join('\n')}\n`);
  return 0;
}

/** `run --help`, `-h`: anywhere before a `--` (after it, the words are the command's). */
function wantsHelp(args: readonly string[]): boolean {
  const end = args.indexOf('--');
  return (end < 0 ? args : args.slice(0, end)).some((a) => a === '--help' || a === '-h');
}

/** What follows a usage error: only the usage of the command at fault, and where to read more. */
function usageReminder(command: string | undefined): string {
  return isCommand(command)
    ? `${usageBlock(COMMANDS[command].usage)}\nsee tapbroker ${command} --help`
    : 'see tapbroker --help';
}

export async function main(argv: readonly string[]): Promise<number> {
  if (argv[0] === '-V' || argv[0] === '--version') {
    const { version } = createRequire(import.meta.url)('../package.json') as { version: string };
    process.stdout.write(`tapbroker ${version} (protocol ${PROTOCOL_VERSION})\n`);
    return 0;
  }
  if (argv[0] === '-h' || argv[0] === '--help' || (argv[0] === 'help' && argv.length === 1)) {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  // `tapbroker help run` too, as git and ip have it.
  const command = argv[0] === 'help' && argv.length === 2 ? argv[1] : argv[0];
  if (isCommand(command) && (argv[0] === 'help' || wantsHelp(argv.slice(1)))) {
    process.stdout.write(`${commandHelp(command)}\n`);
    return 0;
  }
  try {
    if (argv[0] === 'help') throw new TapbrokerError('TB_E_USAGE', `unknown command \`${argv.slice(1).join(' ')}'`);
    if (command === 'run' || command === 'qemu-args' || command === 'can' || !isCommand(command)) {
      const args = parseArgs(argv);
      if (args.command === 'can') return await canCommand(args);
      if (args.command === 'run') return await run(args);
      process.stdout.write(`${buildNicArgs(args.nets, null).map(shellQuote).join(' ')}\n`);
      args.nets.forEach((n, k) => {
        if (n.model === null) process.stderr.write(ownDeviceNote(n.id ?? `net${k}`, n.mac, n.queues));
      });
      if (args.nets.some((n) => !n.mac && n.model !== null)) {
        process.stderr.write('tapbroker: without mac=, `run` adds the MAC the broker assigns\n');
      }
      return 0;
    }
    return await leaseCommand(parseLeaseArgs(argv));
  } catch (err) {
    if (!(err instanceof TapbrokerError)) throw err;
    let text = `tapbroker: ${err.code}: ${err.message}`;
    if (err.rule) text += `\ntapbroker: rule: ${err.rule}`;
    if (err.hint) text += `\ntapbroker: hint: ${err.hint}`;
    if (moreHints.has(err)) text += `\ntapbroker: hint: ${moreHints.get(err)}`;
    if (err.code === 'TB_E_USAGE') text += `\n${usageReminder(command)}`;
    process.stderr.write(`${text}\n`);
    return exitCodeFor(err.code);
  }
}

/** After this long without the broker's answer, the user is told what it waits for (it may be stopped or stuck). */
const PATIENCE_MS = 5000;

/** Says once, after PATIENCE_MS, that the command still waits for the broker; the returned function stops it. */
function patience(socket: string | null): () => void {
  const said = `tapbroker: still waiting for the broker at ${socketPath(socket)} `
    + '(it may be stopped or overloaded, or waiting on a network\'s hook or Open vSwitch; Ctrl-C gives up)\n';
  const timer = setTimeout(() => process.stderr.write(said), PATIENCE_MS);
  timer.unref();
  return () => clearTimeout(timer);
}

/**
 * tapbroker can: each SPEC asked on its own; 0 if the broker would grant every one, else the status `run` would
 * exit with for the first refused one (77 for the policy's refusals; 65, 69, 78 … for the host's).
 */
async function canCommand(args: Args): Promise<number> {
  const stop = patience(args.socket);
  const client = await TapbrokerClient.connect(args.socket).catch((err: unknown) => (stop(), Promise.reject(err)));
  let status = 0;
  // Each SPEC is weighed with the ones before it that would be granted, as `run` asks for them together.
  const before: CanNic[] = [];
  try {
    for (const n of args.nets) {
      const nic: CanNic = {
        kind: n.network ? 'network' : n.kind, parent: n.parent, mode: n.mode, queues: n.queues, vhost: n.vhost,
        mac: n.mac, name: n.name, persistent: args.persistent, group: args.group,
      };
      const r = await client.can({ ...nic, before });
      if (r.allow) before.push(nic);
      if (!r.allow && status === 0) status = r.code ? exitCodeFor(r.code) : EXIT.NOPERM;
      const what = `${target(n)}${n.kind === 'macvtap' ? ` (${n.mode})` : ''}${args.persistent ? ' (persistent)' : ''}`
        + `${args.group !== null ? ` (group ${args.group})` : ''}`;
      const more = r.code === 'TB_E_QUOTA_EXCEEDED' ? await persistentHint(client, r.rule ?? undefined) : null;
      process.stdout.write(
        r.allow
          ? `${what}: yes, by rule ${r.rule}\n`
          : `${what}: no, ${r.code}: ${r.message}${r.rule ? ` (rule: ${r.rule})` : ''}` +
            `${r.hint ? `; hint: ${r.hint}` : ''}${more ? `; hint: ${more}` : ''}\n`,
      );
    }
  } finally {
    client.close();
    stop();
  }
  return status;
}

// Run when executed directly (not when imported by tests).
if (process.argv[1] && fs.realpathSync(process.argv[1]) === fs.realpathSync(new URL(import.meta.url).pathname)) {
  keepInspectorShut();
  const output = dropUnwritableOutput();
  // `run` passes on its command's status whatever became of its own lines; the other commands' output is their result.
  const lost = process.argv[2] === 'run' ? undefined : output.lost;
  main(process.argv.slice(2)).then((code) => exitFlushed(code, lost), (err: Error) => {
    process.stderr.write(`tapbroker: internal error: ${err.stack}\n`);
    process.exit(EXIT.SOFTWARE);
  });
}
