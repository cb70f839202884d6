// Runs test programs as an unprivileged user (setpriv), never as root.
import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { ProbeArgs, ProbeResult } from './probe.js';

export const NOBODY = 65534;
/** A second unprivileged uid with no passwd entry: it matches only numeric rules. */
export const OTHER_UID = 64000;
const PROBE = path.join(path.dirname(fileURLToPath(import.meta.url)), 'probe.js');

export interface As {
  uid?: number;
  gid?: number;
  groups?: number[];
  /** A network namespace to run in (`ip netns exec`), for what opens devices by name. */
  netns?: string;
  /** Its open-files limit (RLIMIT_NOFILE, soft and hard: `prlimit --nofile`). */
  nofile?: number;
}

export function setprivArgs(as: As = {}): string[] {
  const uid = as.uid ?? NOBODY;
  const gid = as.gid ?? uid;
  const groups = as.groups?.length ? ['--groups', as.groups.join(',')] : ['--clear-groups'];
  return ['--reuid', String(uid), '--regid', String(gid), ...groups, '--'];
}

const children = new Set<ChildProcess>();
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
});

export function spawnAs(as: As, cmd: string, args: string[], opts: { stdio?: Array<'pipe' | 'inherit' | 'ignore'>; env?: NodeJS.ProcessEnv } = {}): ChildProcess {
  const argv = ['setpriv', ...setprivArgs(as), ...(as.nofile ? ['prlimit', `--nofile=${as.nofile}`] : []), cmd, ...args];
  if (as.netns) argv.unshift('ip', 'netns', 'exec', as.netns);
  const child = spawn(argv[0]!, argv.slice(1), { stdio: opts.stdio ?? ['pipe', 'pipe', 'pipe'], env: opts.env ?? process.env });
  children.add(child);
  child.on('exit', () => children.delete(child));
  return child;
}

export interface Probe {
  result: ProbeResult;
  child: ChildProcess;
  /** Closes the probe's stdin so it releases its fds and exits; resolves on exit. */
  release(): Promise<void>;
}

/**
 * Starts the probe as `as` and resolves with its report while it still holds the fds. `spawned` is given the probe's
 * process at once (setpriv execs node in place: its pid is the probe's), to act on it before it reports.
 */
export function probe(args: ProbeArgs, as: As = {}, spawned?: (child: ChildProcess) => void): Promise<Probe> {
  const child = spawnAs(as, process.execPath, [PROBE, JSON.stringify(args)]);
  spawned?.(child);
  return new Promise((resolve, reject) => {
    let out = '';
    let err = '';
    child.stderr!.on('data', (d) => (err += d));
    child.stdout!.on('data', (d) => {
      out += d;
      if (!out.includes('\n')) return;
      const result = JSON.parse(out.slice(0, out.indexOf('\n'))) as ProbeResult;
      const exited = new Promise<void>((r) => child.once('exit', () => r()));
      resolve({ result, child, release: async () => { child.stdin!.end(); await exited; } });
    });
    child.on('exit', (code) => reject(new Error(`probe exited ${code} before reporting: ${err}`)));
  });
}

/** Runs the probe to completion: report, release, exit. */
export async function probeOnce(args: ProbeArgs, as: As = {}): Promise<ProbeResult> {
  const p = await probe(args, as);
  await p.release();
  return p.result;
}
