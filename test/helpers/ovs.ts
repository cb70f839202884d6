// A private Open vSwitch (ovsdb-server + ovs-vswitchd, userspace datapath) inside a test's network
// namespace, with its own run directory so nothing touches /var/run/openvswitch; stopped by its pid
// files, also when the test process exits abnormally.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { Netns } from './netns.js';
import { poll } from './wait.js';

export const OVS_SCHEMA = '/usr/share/openvswitch/vswitch.ovsschema';
const BINARIES = ['ovsdb-tool', 'ovsdb-server', 'ovs-vswitchd', 'ovs-vsctl', 'ovs-appctl'];
const DAEMONS = ['ovs-vswitchd', 'ovsdb-server'] as const;

const live = new Set<OvsInstance>();
process.on('exit', () => {
  for (const ovs of live) ovs.kill();
});

function which(bin: string): string | null {
  for (const dir of (process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin').split(':')) {
    const p = path.join(dir, bin);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch {
      // next
    }
  }
  return null;
}

/** Why Open vSwitch cannot run here, or null if it can. */
export function ovsUnavailable(): string | null {
  const missing = BINARIES.filter((b) => !which(b));
  if (missing.length) return `${missing.join(', ')} not installed (apt-get install openvswitch-switch)`;
  if (!fs.existsSync(OVS_SCHEMA)) return `${OVS_SCHEMA} missing`;
  if (process.getuid?.() !== 0) return 'needs root (network namespaces)';
  return null;
}

/** Is the process gone (or a zombie awaiting its reaper)? */
function gone(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z');
  } catch {
    return true;
  }
}

export class OvsInstance {
  /** The `--db=` target: `unix:RUN/db.sock`. */
  readonly db: string;
  private stopped = false;

  private constructor(readonly ns: Netns, readonly run: string) {
    this.db = `unix:${run}/db.sock`;
  }

  /** The environment every OVS program gets: rundir, logdir and dbdir all in our run directory. */
  get env(): NodeJS.ProcessEnv {
    return { ...process.env, OVS_RUNDIR: this.run, OVS_LOGDIR: this.run, OVS_DBDIR: this.run };
  }

  static async start(ns: Netns): Promise<OvsInstance> {
    const run = fs.mkdtempSync(path.join(os.tmpdir(), 'tb-ovs-'));
    const ovs = new OvsInstance(ns, run);
    live.add(ovs);
    try {
      const x = (file: string, ...args: string[]): string => execFileSync(file, args, { env: ovs.env, encoding: 'utf8', timeout: 20_000, stdio: ['ignore', 'pipe', 'pipe'] });
      const inNs = (...args: string[]): string => x('ip', 'netns', 'exec', ns.name, ...args);
      x('ovsdb-tool', 'create', `${run}/conf.db`, OVS_SCHEMA);
      inNs('ovsdb-server', `${run}/conf.db`, `--remote=punix:${run}/db.sock`, `--pidfile=${run}/ovsdb-server.pid`, '--detach',
        `--unixctl=${run}/ovsdb-server.ctl`, `--log-file=${run}/ovsdb-server.log`);
      x('ovs-vsctl', `--db=${ovs.db}`, '--no-wait', 'init');
      inNs('ovs-vswitchd', ovs.db, `--pidfile=${run}/ovs-vswitchd.pid`, '--detach', `--unixctl=${run}/ovs-vswitchd.ctl`, `--log-file=${run}/ovs-vswitchd.log`);
    } catch (err) {
      await ovs.stop();
      throw err;
    }
    return ovs;
  }

  /** `ovs-vsctl --db=… ARGS…` (waiting for ovs-vswitchd unless told --no-wait), returning stdout. */
  vsctl(...args: string[]): string {
    return execFileSync('ovs-vsctl', [`--db=${this.db}`, '--timeout=10', ...args], { env: this.env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  }

  /** `ovs-appctl -t RUN/ovs-vswitchd.ctl ARGS…`. */
  appctl(...args: string[]): string {
    return execFileSync('ovs-appctl', ['-t', `${this.run}/ovs-vswitchd.ctl`, ...args], { env: this.env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  }

  /** A bridge on the userspace datapath (the kernel datapath is absent here). */
  addBridge(name: string): void {
    this.vsctl('add-br', name, '--', 'set', 'Bridge', name, 'datapath_type=netdev');
  }

  /** The tail of ovs-vswitchd's log, for failure messages. */
  log(lines = 20): string {
    try {
      return fs.readFileSync(`${this.run}/ovs-vswitchd.log`, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
    } catch {
      return '';
    }
  }

  private pids(): number[] {
    const pids: number[] = [];
    for (const d of DAEMONS) {
      try {
        const pid = Number(fs.readFileSync(`${this.run}/${d}.pid`, 'utf8').trim());
        // Only that daemon: a stale pid file must never make us signal an unrelated process.
        if (Number.isInteger(pid) && pid > 1 && fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim() === d) pids.push(pid);
      } catch {
        // not started, or already gone
      }
    }
    return pids;
  }

  /** Stops (SIGSTOP) or resumes (SIGCONT) ovsdb-server: an Open vSwitch that does not answer, as in an upgrade. */
  pauseDb(paused: boolean): void {
    const [db] = this.pids().filter((pid) => fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim() === 'ovsdb-server');
    if (db === undefined) throw new Error('no ovsdb-server of this instance runs');
    signal(db, paused ? 'SIGSTOP' : 'SIGCONT');
  }

  /** SIGTERM both daemons (they remove their pid files and sockets), SIGKILL after 3 s, then remove the run directory. */
  async stop(): Promise<void> {
    if (this.stopped) return;
    const pids = this.pids();
    for (const pid of pids) signal(pid, 'SIGTERM');
    await poll(() => pids.every(gone), { ms: 3000 });
    for (const pid of pids) if (!gone(pid)) signal(pid, 'SIGKILL');
    this.stopped = true;
    live.delete(this);
    fs.rmSync(this.run, { recursive: true, force: true });
  }

  /** Synchronous last resort, for process exit. */
  kill(): void {
    if (this.stopped) return;
    for (const pid of this.pids()) signal(pid, 'SIGKILL');
    this.stopped = true;
    live.delete(this);
    fs.rmSync(this.run, { recursive: true, force: true });
  }
}

function signal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    // already gone
  }
}
