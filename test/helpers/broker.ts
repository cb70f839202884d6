// tapbrokerd as a real child process inside a test's namespace, with its audit records parsed.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { AuditRecord } from '@tapbroker/broker/internal';
import type { Netns } from './netns.js';
import { steady, until } from './wait.js';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
export const BROKER_MAIN = path.join(ROOT, 'packages/broker/dist/main.js');
export const CLIENT_CLI = path.join(ROOT, 'packages/client/dist/cli.js');
/** The test-only entry point: the same daemon with injected faults or the fd fallback. */
export const BROKER_TEST_ENTRY = path.join(ROOT, 'test/build/helpers/broker-entry.js');

const running = new Set<ChildProcess>();
process.on('exit', () => {
  for (const p of running) p.kill('SIGKILL');
});

/** A world-traversable temporary directory (the unprivileged client must reach the socket). */
export function tempDir(tag: string): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `tb-${tag}-`));
  fs.chmodSync(dir, 0o755);
  return dir;
}

export class BrokerProcess {
  readonly records: AuditRecord[] = [];
  stderr = '';
  private exitPromise: Promise<number | null>;

  private constructor(readonly proc: ChildProcess, readonly socket: string, readonly dir: string) {
    running.add(proc);
    proc.stderr!.setEncoding('utf8');
    let partial = '';
    proc.stderr!.on('data', (chunk: string) => {
      this.stderr += chunk;
      const lines = (partial + chunk).split('\n');
      partial = lines.pop()!;
      for (const line of lines) {
        if (line.startsWith('{"audit":')) this.records.push((JSON.parse(line) as { audit: AuditRecord }).audit);
      }
    });
    this.exitPromise = new Promise((resolve) => proc.on('exit', (code) => { running.delete(proc); resolve(code); }));
  }

  /** Writes `policy` and starts the broker in `ns`, resolving once it listens. */
  /**
   * `fault` (POINT or POINT=wait:FILE) and `fdFallback` run the test-only entry point instead of the
   * shipped main.js.
   */
  static async start(ns: Netns, policy: string, opts: {
    tag?: string; args?: string[]; dir?: string; env?: NodeJS.ProcessEnv; fault?: string; fdFallback?: boolean;
    /** Another main.js to run (an installed package's). */
    main?: string;
    /** The broker's connection limit (runs the test-only entry point). */
    maxConnections?: number;
    /** Fds of unread replies one uid may hold (runs the test-only entry point). */
    maxUnreadFds?: number;
    /** The kernel's queue of link events for the broker, in bytes (runs the test-only entry point). */
    linkEventQueue?: number;
    /** Subordinate uids listed in this file instead of /etc/subuid (the test entry point). */
    subuidFile?: string;
    /** Subordinate gids listed in this file instead of /etc/subgid (the test entry point). */
    subgidFile?: string;
    /** Each uid's cap of connections (the test entry point). */
    maxConnectionsPerUser?: number;
    /** The clock each uid's share is counted on stands still: past its share, a uid stays so (the test entry point). */
    frozenClock?: boolean;
    /** The closer of the broker's own fd copies goes after this long without work (the test entry point). */
    closerIdleMs?: number;
    /** BrokerOptions.takerWaitMs (see forwarding.ts). */
    takerWaitMs?: number;
    /** A file bind-mounted over /etc/passwd in the broker's own mount namespace (its account database). */
    passwd?: string;
    /** A program and its arguments that exec node (e.g. one that sets a prctl first), and node's own flags. */
    wrap?: string[];
    nodeArgs?: string[];
  } = {}): Promise<BrokerProcess> {
    const dir = opts.dir ?? tempDir(opts.tag ?? 'broker');
    const policyPath = path.join(dir, 'policy.toml');
    fs.writeFileSync(policyPath, policy);
    const socket = path.join(dir, 'tapbroker.sock');
    const state = path.join(dir, 'state');
    // TB_TEST_BROKER_MAIN runs another build's main.js instead (to show a test fails on the code before a fix).
    const entry = opts.main ?? process.env['TB_TEST_BROKER_MAIN'] ?? (opts.fault || opts.fdFallback || opts.maxConnections || opts.linkEventQueue || opts.subuidFile || opts.subgidFile || opts.maxConnectionsPerUser || opts.frozenClock || opts.maxUnreadFds
      || opts.closerIdleMs || opts.takerWaitMs
      ? BROKER_TEST_ENTRY : BROKER_MAIN);
    const env: NodeJS.ProcessEnv = { ...process.env, ...opts.env };
    if (opts.fault) env['TB_TEST_FAULT'] = opts.fault;
    if (opts.fdFallback) env['TB_TEST_FD_FALLBACK'] = '1';
    if (opts.maxConnections) env['TB_TEST_MAX_CONNECTIONS'] = String(opts.maxConnections);
    if (opts.linkEventQueue) env['TB_TEST_LINK_EVENT_QUEUE'] = String(opts.linkEventQueue);
    if (opts.subuidFile) env['TB_TEST_SUBUID_FILE'] = opts.subuidFile;
    if (opts.subgidFile) env['TB_TEST_SUBGID_FILE'] = opts.subgidFile;
    if (opts.maxConnectionsPerUser) env['TB_TEST_MAX_CONNECTIONS_PER_USER'] = String(opts.maxConnectionsPerUser);
    if (opts.frozenClock) env['TB_TEST_FROZEN_CLOCK'] = '1';
    if (opts.maxUnreadFds) env['TB_TEST_MAX_UNREAD_FDS'] = String(opts.maxUnreadFds);
    if (opts.closerIdleMs) env['TB_TEST_CLOSER_IDLE_MS'] = String(opts.closerIdleMs);
    if (opts.takerWaitMs) env['TB_TEST_TAKER_WAIT_MS'] = String(opts.takerWaitMs);
    const argv = ['ip', 'netns', 'exec', ns.name, ...(opts.wrap ?? []), process.execPath, ...(opts.nodeArgs ?? []), entry, '-f', policyPath, '-s', socket, '-m', '0666', '--state-dir', state, ...(opts.args ?? ['--journal-socket', ''])];
    // `ip netns exec` keeps the pid it is started with, so the broker's pid is this child's either way.
    const [cmd, ...args] = opts.passwd
      ? ['unshare', '-m', '--propagation', 'private', 'sh', '-c', 'mount --bind "$0" /etc/passwd && exec "$@"', opts.passwd, ...argv]
      : argv;
    const proc = spawn(cmd!, args, {
      stdio: ['ignore', 'ignore', 'pipe'], env,
    });
    const b = new BrokerProcess(proc, socket, dir);
    try {
      await b.waitFor(() => b.stderr.includes('listening on'), 10_000, 'broker did not start');
    } catch (err) {
      // A broker that never said it listens is still a process: it must not outlive the test, nor its directory
      // (a CI run whose brokers could not start left a dozen behind).
      proc.kill('SIGKILL');
      if (!opts.dir) fs.rmSync(dir, { recursive: true, force: true });
      throw err;
    }
    return b;
  }

  get policyPath(): string {
    return path.join(this.dir, 'policy.toml');
  }

  /** Waits up to `ms` for `cond`; fails with `what` and the broker's output, at once if the broker exits. */
  async waitFor(cond: () => boolean, ms: number, what: string): Promise<void> {
    await until(() => {
      if (cond()) return true;
      if (this.proc.exitCode !== null) throw new Error(`${what}: broker exited ${this.proc.exitCode}:\n${this.stderr}`);
      return false;
    }, { ms, what, detail: () => this.stderr });
  }

  /** The first audit record matching `pred`, waiting for it: records arrive through the stderr pipe,
   * which the test reads independently of the client's pipes. */
  async record(pred: (r: AuditRecord) => boolean, ms = 3000): Promise<AuditRecord> {
    await this.waitFor(() => this.records.some(pred), ms, 'no matching audit record');
    return this.records.find(pred)!;
  }

  get alive(): boolean {
    return this.proc.exitCode === null && this.proc.signalCode === null;
  }

  /** Open fds of the broker process (the `ip netns exec` wrapper execs node in place). */
  /**
   * The broker's open fds, less its ends of the sockets to its closer processes while they run: a closer stays
   * a while after its last work (30 s for the broker's own copies), so a count taken before a grant and one after
   * would differ by it. A socket whose closer is gone counts.
   */
  /** What each of the broker's fds is (`fd -> target`), for a failure's message. */
  fds(): string[] {
    const dir = `/proc/${this.proc.pid!}/fd`;
    return fs.readdirSync(dir).map((fd) => {
      try {
        return `${fd}->${fs.readlinkSync(`${dir}/${fd}`)}`;
      } catch {
        return `${fd}->?`;
      }
    });
  }

  fdCount(): number {
    const pid = this.proc.pid!;
    const fds = fs.readdirSync(`/proc/${pid}/fd`);
    const closers = this.closerEnds();
    if (closers.size === 0) return fds.length;
    return fds.filter((fd) => {
      try {
        return !closers.has(fs.readlinkSync(`/proc/${pid}/fd/${fd}`));
      } catch {
        return false;
      }
    }).length;
  }

  /** The pids of the broker's closer processes running now. */
  closers(): number[] {
    const pid = this.proc.pid!;
    let children: string[];
    try {
      children = fs.readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean);
    } catch {
      return [];
    }
    return children.filter((c) => {
      try {
        return fs.readFileSync(`/proc/${c}/cmdline`, 'utf8').includes('closer.js');
      } catch {
        return false;
      }
    }).map(Number);
  }

  /** `socket:[INODE]` of the broker's end of each socket whose other end is a running closer's fd 3. */
  private closerEnds(): Set<string> {
    const pid = this.proc.pid!;
    let children: string[];
    try {
      children = fs.readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean);
    } catch {
      return new Set();
    }
    const theirs = new Set<string>();
    for (const child of children) {
      try {
        if (!fs.readFileSync(`/proc/${child}/cmdline`, 'utf8').includes('closer.js')) continue;
        theirs.add(fs.readlinkSync(`/proc/${child}/fd/3`).replace(/^socket:\[(\d+)\]$/, '$1'));
      } catch {
        // Gone meanwhile.
      }
    }
    if (theirs.size === 0) return new Set();
    // ss (sock_diag) names each Unix socket's peer: Netid State Recv-Q Send-Q Local Inode Peer PeerInode.
    const out = execFileSync('nsenter', [`--net=/proc/${pid}/ns/net`, 'ss', '-xH'], { encoding: 'utf8' });
    const ends = new Set<string>();
    for (const line of out.split('\n')) {
      const f = line.trim().split(/\s+/);
      if (f.length >= 8 && theirs.has(f[5]!)) ends.add(`socket:[${f[7]}]`);
    }
    return ends;
  }

  /**
   * Bytes of link events the kernel has queued on the broker's RTNLGRP_LINK socket that it has not read
   * yet (its /proc net/netlink line). 0 after an event was sent: the broker has read, and so applied, it.
   */
  linkEventsUnread(): number {
    const pid = this.proc.pid!;
    const sockets = new Set(fs.readdirSync(`/proc/${pid}/fd`).map((fd) => {
      try { return fs.readlinkSync(`/proc/${pid}/fd/${fd}`); } catch { return ''; }
    }));
    // sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode: NETLINK_ROUTE (0), RTMGRP_LINK (1), one of its fds.
    const monitor = fs.readFileSync(`/proc/${pid}/net/netlink`, 'utf8').split('\n').slice(1).map((l) => l.trim().split(/\s+/))
      .find((f) => f[1] === '0' && f[3] === '00000001' && sockets.has(`socket:[${f[9]}]`));
    if (!monitor) throw new Error(`the broker (pid ${pid}) has no RTNLGRP_LINK socket`);
    return Number(monitor[4]);
  }

  /** The broker's fd count once it has held still for 200 ms (after a burst, no one event says it settled). */
  settledFdCount(): Promise<number> {
    // Still for longer than a closer for pushed fds stays idle (1 s): its socket is one of the fds while it runs.
    return steady(() => this.fdCount(), { ms: 10_000, what: 'the broker\'s fd count', still: 1600 });
  }

  get stateFile(): string {
    return path.join(this.dir, 'state', 'leases.json');
  }

  /** Stops the broker; `keep` leaves its directory (policy, state) for a restart. */
  async stop(signal: NodeJS.Signals = 'SIGTERM', keep = false): Promise<number | null> {
    if (this.alive) this.proc.kill(signal);
    // Bounded: a broker that does not stop fails the test with its log, not at ava's timeout with nothing said.
    let late: NodeJS.Timeout | undefined;
    const stuck = new Promise<'stuck'>((resolve) => (late = setTimeout(() => resolve('stuck'), 60_000)));
    const code = await Promise.race([this.exitPromise, stuck]).finally(() => clearTimeout(late));
    if (code === 'stuck') {
      const fds = this.fds().join(' ');
      this.proc.kill('SIGKILL');
      await this.exitPromise;
      if (!keep) fs.rmSync(this.dir, { recursive: true, force: true });
      throw new Error(`the broker did not stop within 60 s of ${signal}; its fds: ${fds}\n${this.stderr}`);
    }
    if (!keep) fs.rmSync(this.dir, { recursive: true, force: true });
    return code;
  }
}
