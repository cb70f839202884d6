// tapbrokerd's command line and lifecycle: options, policy, listener, signals, sd_notify. Usage in
// USAGE below. main.ts runs it; a test entry point may run it with broker options of its own.
import fs from 'node:fs';
import path from 'node:path';
import v8 from 'node:v8';
import {
  EX, SeqpacketListener, dropUnwritableOutput, exitFlushed, keepInspectorShut, sys,
} from '@tapbroker/protocol/core';
import { BROKER_VERSION, Broker, PROTOCOL_VERSION, type BrokerOptions } from './broker.js';
import type { Policy } from './decide.js';
import { loadTrustedPolicy } from './policy.js';
import { lockExclusive } from './libc.js';
import { notRootsAlone } from './paths.js';
import { LinuxAudit } from './linux-audit.js';
import { shown } from './naming.js';
import { toStderr } from './stderr.js';

export const DEFAULT_POLICY = '/etc/tapbroker/policy.toml';
export const DEFAULT_SOCKET = '/run/tapbroker/tapbroker.sock';
const DAEMON_USAGE = `usage: tapbrokerd [-n] [-f policy] [-s socket] [-m mode] [-g group] [-T hello-timeout-ms]
                  [--state-dir dir] [--audit-file file] [--journal-socket path] [--linux-audit]
                  [--idle-exit seconds] [-V | --version] [-h | --help]`;
const USAGE = `${DAEMON_USAGE}
       tapbrokerd check-policy [file] [--fragments dir] [--json] [--strict] [--unit]
       tapbrokerd explain-policy [file] [--fragments dir] --user name [--json]
       tapbrokerd who-can [file] [--fragments dir] (--bridge name | --network name | --macvtap parent
                      [--mode mode]) [--json]
       tapbrokerd import-bridge-conf [file]
       tapbrokerd test-policy [file] cases [--fragments dir] [--json]`;
export const DEFAULT_STATE_DIR = '/run/tapbroker';
// sysexits(3)
const CAP_NET_ADMIN = 12;
/** The open files the broker wants: two per connection at its cap of 1,024, and room for leases and undo steps. */
const FDS_WANTED = 4096;

/** Whether this process holds CAP_NET_ADMIN now (CapEff in /proc/self/status). */
function hasNetAdmin(): boolean {
  const eff = /^CapEff:\s*([0-9a-f]+)$/m.exec(fs.readFileSync('/proc/self/status', 'utf8'))?.[1];
  return eff !== undefined && (BigInt(`0x${eff}`) & (1n << BigInt(CAP_NET_ADMIN))) !== 0n;
}

interface Options {
  check: boolean;
  policy: string;
  socket: string;
  mode: number;
  group: string | null;
  helloTimeoutMs: number;
  stateDir: string;
  auditFile: string | null;
  journalSocket: string | null | undefined;
  linuxAudit: boolean;
  idleExit: number | null;
}

function parseArgs(argv: string[]): Options {
  const o: Options = {
    check: false,
    policy: DEFAULT_POLICY,
    socket: DEFAULT_SOCKET,
    mode: 0o660,
    group: null,
    helloTimeoutMs: 5000,
    stateDir: DEFAULT_STATE_DIR,
    auditFile: null,
    journalSocket: undefined,
    linuxAudit: false,
    idleExit: null,
  };
  for (let i = 0; i < argv.length; i++) {
    // --opt=value and --opt value alike, as tapbroker takes them.
    const eq = argv[i]!.startsWith('--') ? argv[i]!.indexOf('=') : -1;
    const a = eq > 0 ? argv[i]!.slice(0, eq) : argv[i]!;
    const inline = eq > 0 ? argv[i]!.slice(eq + 1) : undefined;
    const value = () => {
      const v = inline ?? argv[++i];
      if (v === undefined) usage(`option ${a} needs a value`);
      return v;
    };
    switch (a) {
      case '-n':
        o.check = true;
        break;
      case '-f':
        o.policy = value();
        break;
      case '-s':
        o.socket = value();
        break;
      case '-m': {
        const m = value();
        if (!/^[0-7]{3,4}$/.test(m)) usage(`bad mode \`${m}'`);
        o.mode = parseInt(m, 8);
        break;
      }
      case '-g':
        o.group = value();
        break;
      case '--state-dir':
        o.stateDir = value();
        break;
      case '--audit-file':
        o.auditFile = value();
        break;
      case '--journal-socket':
        o.journalSocket = value();
        break;
      case '--linux-audit':
        if (inline !== undefined) usage('option --linux-audit takes no value');
        o.linuxAudit = true;
        break;
      case '--idle-exit': {
        const sec = value();
        if (!/^[1-9][0-9]{0,5}$/.test(sec)) usage(`bad idle time \`${sec}'`);
        o.idleExit = Number(sec);
        break;
      }
      case '-T': {
        const ms = value();
        if (!/^[1-9][0-9]{0,6}$/.test(ms)) usage(`bad hello timeout \`${ms}'`);
        o.helloTimeoutMs = Number(ms);
        break;
      }
      case '-h':
      case '--help':
        process.stdout.write(`${USAGE}\n`);
        process.exit(0);
      case '-V':
      case '--version':
        process.stdout.write(`${BROKER_VERSION} (protocol ${PROTOCOL_VERSION})\n`);
        process.exit(0);
      default:
        usage(`unknown argument \`${a}'`);
    }
  }
  return o;
}

/** A usage error: the message and the daemon's own usage, not every tool's. */
function usage(why: string): never {
  process.stderr.write(`tapbrokerd: ${why}\n${DAEMON_USAGE}\nsee tapbrokerd --help\n`);
  process.exit(EX.USAGE);
}

/** sd-daemon(3) priorities: a start refused, a warning (a line that says so), the rest. */
const ERR = 3;
const WARNING = 4;
const INFO = 6;

/**
 * Under journald (fd 2 is the stream JOURNAL_STREAM names), each line opens with its priority (`<4>`), which journald
 * stores and strips (an outside review: every line was stored as info, so `journalctl -p warning` never showed why
 * the unit failed). Anywhere else the lines are as written.
 */
const journalStream = ((): boolean => {
  const named = process.env['JOURNAL_STREAM'];
  if (!named) return false;
  try {
    const st = fs.fstatSync(2);
    return named === `${st.dev}:${st.ino}`;
  } catch {
    return false;
  }
})();

/** One line per line of `text`, each with the daemon's name (and its priority, under journald). */
function log(text: string, priority = text.startsWith('warning: ') ? WARNING : INFO): void {
  const prefix = `${journalStream ? `<${priority}>` : ''}tapbrokerd: `;
  toStderr(text.split('\n').map((l) => `${prefix}${l}\n`).join(''));
}

/**
 * A policy's errors (one a line) as a log shows them: what a key or value held that a terminal or journald acts on
 * escaped, as its warnings are (an outside re-test: a refused policy's lines reached stderr raw).
 */
const shownLines = (text: string): string => text.split('\n').map(shown).join('\n');

function load(file: string): Policy {
  const policy = loadTrustedPolicy(file);
  for (const w of policy.warnings) log(`warning: ${shown(w)}`);
  return policy;
}

/** The inherited listening socket under socket activation (sd_listen_fds), or null. */
function activationFd(): number | null {
  if (process.env['LISTEN_PID'] !== String(process.pid)) return null;
  const n = Number(process.env['LISTEN_FDS'] ?? '0');
  delete process.env['LISTEN_PID'];
  delete process.env['LISTEN_FDS'];
  delete process.env['LISTEN_FDNAMES'];
  if (n !== 1) throw new Error(`expected exactly one socket from the service manager, got ${n}`);
  return 3;
}

/** sd_notify(3): a datagram to $NOTIFY_SOCKET when the service manager set one. */
function notify(state: string): void {
  const target = process.env['NOTIFY_SOCKET'];
  if (!target) return;
  try {
    sys.sendDatagram(target, Buffer.from(state));
  } catch (err) {
    log(`sd_notify failed: ${(err as Error).message}`);
  }
}

/** Extra broker options a caller of daemon() may set (a test entry point: faults, the fd fallback). */
export type DaemonExtras = Pick<
  BrokerOptions,
  'faults' | 'refuseFdsAtSocket' | 'maxConnections' | 'maxConnectionsPerUser' | 'linkEventQueue' | 'subuidFile'
  | 'subgidFile' | 'clock'
>;

export function daemon(argv: string[], extras: DaemonExtras = {}): void {
  // Root's Node must never open its debugger, whoever signals it.
  keepInspectorShut();
  // The tools' output is their result: one that cannot be written (a full disk) is status 74, not a stack trace and 1,
  // which reads as a failed case or a warning (an outside review).
  const tool = (run: () => Promise<number>) => {
    const output = dropUnwritableOutput();
    void run().then((code) => exitFlushed(code, output.lost));
  };
  if (argv[0] === 'check-policy' || argv[0] === 'explain-policy' || argv[0] === 'who-can') {
    // Loaded only for the tools: the daemon's start-up does not pay for them.
    return tool(() => import('./policy-tools.js').then(({ policyTool }) => policyTool(argv, DEFAULT_POLICY)));
  }
  if (argv[0] === 'import-bridge-conf') {
    // A tool like the above: qemu-bridge-helper's ACL files in, a policy out; never on the broker's path.
    return tool(() => import('./bridge-conf.js').then((m) => m.importBridgeConfTool(argv.slice(1))));
  }
  if (argv[0] === 'test-policy') {
    // A policy tool too: a table of expected decisions run through decide(), with no broker and no kernel.
    return tool(() => import('./policy-test.js').then((m) => m.testPolicyTool(argv.slice(1), DEFAULT_POLICY)));
  }
  const opts = parseArgs(argv);
  // Resolved first, so that -n refuses it as a start would, and before anything is made (an outside review: -n said
  // ok, and a start made the state directory before it refused the group).
  let gid: number | undefined;
  if (opts.group !== null) {
    const g = /^\d+$/.test(opts.group) ? Number(opts.group) : sys.getgrnam(opts.group);
    if (g === null) usage(`no group \`${opts.group}'`);
    gid = g;
  }
  // V8 doubles its young generation under a burst of allocation (up to 16 MB here) and never gives it back:
  // the broker stayed ~12 MB above its start after 330 grants. A request's garbage dies young, so the first
  // size (about 1 MB) serves; the flag is read at each growth, so it takes effect now.
  v8.setFlagsFromString('--semi-space-growth-factor=1');
  if (opts.check) {
    // -n checks the policy exactly as check-policy does (same findings, same streams), but as the broker
    // would load it: a file a user other than root could change is an error, not a warning.
    return tool(() => import('./policy-tools.js')
      .then(({ policyTool }) => policyTool(['check-policy', opts.policy], DEFAULT_POLICY, { asBroker: true })));
  }
  let policy: Policy;
  try {
    policy = load(opts.policy);
  } catch (err) {
    log(shownLines((err as Error).message), ERR);
    process.exit(EX.CONFIG);
  }
  // Without CAP_NET_ADMIN every request would fail with EPERM: refuse to start instead, with a status
  // the unit's RestartPreventExitStatus= lists, so no restart loop follows.
  if (!hasNetAdmin()) {
    log('needs CAP_NET_ADMIN to create and configure network devices, and does not have it; run it as root, '
      + 'or under tapbrokerd.service (CapabilityBoundingSet=CAP_NET_ADMIN)', ERR);
    process.exit(EX.NOPERM);
  }

  // Where the broker writes as root: nobody else may be able to swap what is there.
  let locked: boolean;
  let made: string | undefined;
  try {
    made = fs.mkdirSync(opts.stateDir, { recursive: true, mode: 0o755 });
  } catch (err) {
    log(`cannot start: ${(err as Error).message}`, ERR);
    process.exit(EX.UNAVAILABLE);
  }
  // A start refused from here on leaves the directories it made if they are empty (an outside review: a start refused
  // for its audit file's directory had made the state directory), one level at a time: a recursive delete as root
  // inside a directory others may write to could be steered. Never its lock file, once made: another start may have
  // it open, about to lock it, and would lock a file no longer there while a third made and locked a new one (two
  // re-tests ran two brokers on one state directory so).
  const refuse: (status: number) => never = (status) => {
    for (let d = path.resolve(opts.stateDir); made !== undefined; d = path.dirname(d)) {
      try {
        fs.rmdirSync(d);
      } catch {
        break;
      }
      if (d === made || d === path.dirname(d)) break;
    }
    return process.exit(status);
  };
  const rootsDirs = [
    ['state directory', opts.stateDir], ['audit file\'s directory', opts.auditFile && path.dirname(opts.auditFile)],
  ] as const;
  for (const [what, p] of rootsDirs) {
    const why = p ? notRootsAlone(p) : null;
    if (why) {
      log(`the ${what} ${p} ${why}; refusing to start`, ERR);
      refuse(EX.CONFIG);
    }
  }
  // One broker per state directory: two would write its lease table over each other and take each other's
  // devices for orphans. The lock goes with the process (its fd is never closed).
  const lockFile = path.join(opts.stateDir, 'lock');
  try {
    let fd: number;
    try {
      fd = fs.openSync(lockFile, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_NOFOLLOW, 0o600);
    } catch (err) {
      // A read-only state directory (an error remount): its lock is taken read-only, and the broker serves what
      // needs no table write (an outside review: it did not start at all, and macvtaps outlived their VMs).
      if ((err as NodeJS.ErrnoException).code !== 'EROFS') throw err;
      fd = fs.openSync(lockFile, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW);
    }
    locked = lockExclusive(fd);
  } catch (err) {
    log(`cannot start: cannot lock the state directory: ${(err as Error).message}`, ERR);
    refuse(EX.UNAVAILABLE);
  }
  if (!locked) {
    log(`another tapbrokerd uses the state directory ${opts.stateDir} (it holds ${path.join(opts.stateDir, 'lock')}); `
      + 'refusing to start', ERR);
    refuse(EX.UNAVAILABLE);
  }

  let listener: SeqpacketListener;
  try {
    const inherited = activationFd();
    if (inherited !== null) {
      listener = SeqpacketListener.adopt(inherited);
    } else {
      fs.mkdirSync(path.dirname(opts.socket), { recursive: true, mode: 0o755 });
      const why = notRootsAlone(path.dirname(opts.socket));
      if (why) {
        log(`the socket's directory ${path.dirname(opts.socket)} ${why}; refusing to start`, ERR);
        refuse(EX.CONFIG);
      }
      listener = SeqpacketListener.listen(
        opts.socket,
        gid === undefined ? { mode: opts.mode } : { mode: opts.mode, gid },
      );
    }
  } catch (err) {
    log(`cannot listen: ${(err as Error).message}`, ERR);
    refuse(EX.UNAVAILABLE);
  }

  let broker: Broker;
  // Says once whether the kernel has audit and whether it is on; never fails a request.
  const linux = opts.linuxAudit ? new LinuxAudit(log) : null;
  try {
    broker = new Broker({
      ...extras,
      policy,
      policyPath: opts.policy,
      stateDir: opts.stateDir,
      helloTimeoutMs: opts.helloTimeoutMs,
      log,
      audit: {
        file: opts.auditFile,
        linux,
        ...(opts.journalSocket !== undefined ? { journalSocket: opts.journalSocket } : {}),
      },
    });
    broker.start(listener);
  } catch (err) {
    log(`cannot start: ${(err as Error).message}`, ERR);
    // Its socket goes with it: one left with nobody listening reads as a broker that refuses (a re-test).
    listener.close();
    refuse(EX.UNAVAILABLE);
  }
  const status = () =>
    `STATUS=serving ${broker.connections} connection(s), ${broker.leases.size} lease(s); `
    + `policy ${broker.policy.sha256.slice(0, 12)}`;
  // Each connection takes two fds (socket, pidfd) and a failed step's undo may need one more: too few, and users
  // together can leave a device without its lease (an outside review, at a limit of 60).
  let limits = '';
  try {
    limits = fs.readFileSync('/proc/self/limits', 'utf8');
  } catch {
    // No /proc: nothing to say.
  }
  const fdLimit = Number(/^Max open files\s+(\d+)/m.exec(limits)?.[1] ?? Infinity);
  if (fdLimit < FDS_WANTED) log(`warning: the broker may open only ${fdLimit} files (RLIMIT_NOFILE); it needs `
    + `${FDS_WANTED} to serve its 1,024 connections with room to undo a failed step (LimitNOFILE= in its unit)`);
  if (!broker.fdsRefusedAtSocket)
    log(
      'warning: this kernel cannot refuse fds at the socket (SO_PASSRIGHTS, Linux 6.16); '
        + 'fds sent to the broker go to a closer process',
    );
  log(
    `listening on ${listener.path ?? `inherited fd ${listener.fd}`}; policy ${policy.files.join(', ')} `
      + `sha256 ${policy.sha256}; `
      + `${broker.leases.size} lease${broker.leases.size === 1 ? '' : 's'} in ${opts.stateDir}; `
      + `audit to ${broker.audit.sink}${opts.auditFile ? ` and ${opts.auditFile}` : ''}`
      + `${linux ? ' and the kernel audit log (--linux-audit)' : ''}`,
  );
  notify(`READY=1\n${status()}`);
  // STATUS= follows connections and leases (`systemctl status` shows it): re-sent within a second of a
  // change, and only then.
  let told = status();
  setInterval(() => {
    const now = status();
    if (now !== told) notify((told = now));
  }, 1000).unref();

  // One reload at a time, and at most one more owed: every SIGHUP received before it starts is answered by it, and
  // clients are served between two (an outside review's SIGHUP every 20 ms queued 202 reloads; a request waited 13 s).
  let reloadOwed = false;
  process.on('SIGHUP', () => {
    if (reloadOwed) return;
    reloadOwed = true;
    setImmediate(() => {
      reloadOwed = false;
      reload();
    });
  });
  const reload = () => {
    notify(`RELOADING=1\nMONOTONIC_USEC=${process.hrtime.bigint() / 1000n}`);
    try {
      broker.reload(null);
      log(`policy reloaded from ${broker.policy.files.join(', ')}; sha256 ${broker.policy.sha256}`
        + `${linux ? `; linux audit records: ${linux.stats}` : ''}`);
    } catch (err) {
      log(`policy reload failed; keeping sha256 ${broker.policy.sha256}: ${shownLines((err as Error).message)}`, ERR);
    }
    notify(`READY=1\n${status()}`);
  };
  let stopping = false;
  const stop = (why: string) => {
    if (stopping) return;
    stopping = true;
    log(`${why}: finishing requests in flight`);
    notify(`STOPPING=1\nSTATUS=${why}: stopping`);
    void broker.shutdown().then(async () => {
      if (linux) {
        await linux.flush();
        log(`linux audit records: ${linux.stats}`);
      }
      process.exit(0);
    });
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
  if (opts.idleExit !== null) {
    let idleFor = 0;
    setInterval(() => {
      idleFor = broker.idle ? idleFor + 1 : 0;
      if (idleFor >= opts.idleExit!) stop(`idle for ${opts.idleExit} s with no connections and no leases`);
    }, 1000).unref();
  }
}
