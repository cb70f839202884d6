// Plug hooks: an admin's program that joins a device to a network that is neither a Linux bridge nor
// Open vSwitch. Run by the broker (not by qemu, which keeps its confinement), from the policy's path
// only, re-checked before each run, with a fixed argv, an empty environment plus documented variables,
// a timeout, and its output captured for the audit record.
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import os from 'node:os';
import { TapbrokerError, sys } from '@tapbroker/protocol/core';
import { pidfdSignal } from './libc.js';
import { hookUnsafe, replaceFile } from './paths.js';

export const HOOK_TIMEOUT_MS = 10_000;
const OUTPUT_CAP = 4096;
const { SIGKILL } = os.constants.signals;

export interface HookContext {
  device: string;
  ifindex: number;
  mac: string;
  uid: number;
  network: string;
  lease: string;
  /** This broker run's secret (hookRun): what its hooks' processes are found by after it stopped. */
  run: string;
}

export interface HookResult {
  code: number | null;
  /** The signal it died of: the broker's SIGKILL when `timed_out`, else someone else's (a service manager's stop). */
  signal: string | null;
  timed_out: boolean;
  stdout: string;
  stderr: string;
  ms: number;
}

/**
 * A hook the kernel would not start for want of processes, memory or fds (EAGAIN at the task limit, ENOMEM, EMFILE,
 * ENFILE): no answer of its own, so a `down` is tried again and owed to the next start, as one killed by someone
 * else is (an outside review filled the unit's task limit with one user's hook processes, and root's downs were lost
 * for good). Not one that cannot start at all (its interpreter gone): that is its answer (an outside audit).
 */
export class HookNotRun extends TapbrokerError {
  constructor(message: string) {
    super('TB_E_HOOK_FAILED', message);
  }
}

/** Printable, bounded: a hook's output goes into audit records. */
function captured(s: string): string {
  const t = s.length > OUTPUT_CAP ? `${s.slice(0, OUTPUT_CAP)}…` : s;
  return t.replace(/[^\x20-\x7e\n\t]/g, '?');
}

/**
 * `HOOK up|down DEVICE ifindex=N mac=M uid=U network=NAME lease=ID`, environment: PATH and the same as
 * TAPBROKER_* variables. Resolves with the outcome; throws TB_E_HOOK_FAILED when it fails.
 */
export function runHook(
  file: string,
  action: 'up' | 'down',
  ctx: HookContext,
  timeoutMs = HOOK_TIMEOUT_MS,
): Promise<HookResult> {
  const unsafe = hookUnsafe(file);
  if (unsafe) return Promise.reject(new TapbrokerError('TB_E_HOOK_FAILED', `hook ${file} ${unsafe}; not run`));
  const vars: Record<string, string> = {
    TAPBROKER_ACTION: action, TAPBROKER_DEVICE: ctx.device, TAPBROKER_IFINDEX: String(ctx.ifindex),
    TAPBROKER_MAC: ctx.mac,
    TAPBROKER_UID: String(ctx.uid), TAPBROKER_NETWORK: ctx.network, TAPBROKER_LEASE: ctx.lease,
    TAPBROKER_RUN: ctx.run,
  };
  const argv = [
    action, ctx.device, `ifindex=${ctx.ifindex}`, `mac=${ctx.mac}`, `uid=${ctx.uid}`, `network=${ctx.network}`,
    `lease=${ctx.lease}`,
  ];
  const started = Date.now();
  return new Promise((resolve, reject) => {
    let timer: NodeJS.Timeout | undefined;
    const notRun = (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      const message = `hook ${file} ${action} ${ctx.device} could not run: ${err.message}`;
      // Out of processes, memory or fds, or its file being written (an administrator's `cp` over it): it may run
      // later. Anything else (an interpreter gone) is its answer.
      const later = ['EAGAIN', 'ENOMEM', 'EMFILE', 'ENFILE', 'ETXTBSY'].includes(err.code ?? '');
      reject(later ? new HookNotRun(message) : new TapbrokerError('TB_E_HOOK_FAILED', message));
    };
    let child: ReturnType<typeof spawn>;
    try {
      // Its own process group, killed whole: a hook's children must not finish `up` after a rollback.
      child = spawn(file, argv, {
        env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', ...vars },
        cwd: '/',
        detached: true,
        stdio: ['ignore', 'pipe', 'pipe'],
      });
    } catch (err) {
      // Node throws most spawn failures (ENOMEM, ETXTBSY) and emits a few ('error', next): both are sorted alike (an
      // outside re-test lost downs that Node threw).
      return notRun(err as NodeJS.ErrnoException);
    }
    // First, and its streams looked for: a spawn that fails (EMFILE at the open-files limit) has none, and its
    // 'error' comes on the next tick; unheard, it ended the broker (an outside review's test of a down that could
    // not start found it).
    child.on('error', notRun);
    let stdout = '';
    let stderr = '';
    child.stdout?.setEncoding('utf8').on('data', (d: string) => { if (stdout.length < OUTPUT_CAP + 1) stdout += d; });
    child.stderr?.setEncoding('utf8').on('data', (d: string) => { if (stderr.length < OUTPUT_CAP + 1) stderr += d; });
    let timedOut = false;
    const killGroup = () => {
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {
        // The group is already gone.
      }
    };
    timer = setTimeout(() => { timedOut = true; killGroup(); }, timeoutMs);
    // Done when the hook exits, not when its output closes: a child that keeps the pipes open must not
    // hold the grant. Whatever it left running in its group is killed.
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      killGroup();
      child.stdout?.destroy();
      child.stderr?.destroy();
      const result: HookResult = {
        code,
        signal,
        timed_out: timedOut,
        stdout: captured(stdout),
        stderr: captured(stderr),
        ms: Date.now() - started,
      };
      if (code === 0 && !timedOut) return resolve(result);
      const why = timedOut ? `timed out after ${timeoutMs} ms` : code !== null ? `exited ${code}` : `died of ${signal}`;
      const last = result.stderr ? `: ${result.stderr.trim().split('\n').pop()}` : '';
      reject(
        Object.assign(new TapbrokerError('TB_E_HOOK_FAILED', `hook ${file} ${action} ${ctx.device} ${why}${last}`), {
          hook: result,
        }),
      );
    });
  });
}

/**
 * This run's secret, which its hooks inherit (TAPBROKER_RUN), and those of earlier runs whose hooks no start has
 * killed yet: kept in the state directory (root's alone) and in root's processes' environments, which no other user
 * can read, so nobody can make the broker take a process for a hook of its own. None for a broker without a state
 * directory. The file is written only when it must change: `save` before this run's first hook (its id joins the
 * earlier ones), `cleaned` once their hooks are killed (they go). A start that dies before either leaves it as it
 * was, so no number of such starts can push a crashed run's id out of it (an outside re-test did, with 17: the
 * crashed run's hooks then outlived the next start's `down`).
 */
export function hookRun(stateDir: string | null): HookRun & { previous: string[]; cleaned(): void } {
  const current = randomBytes(16).toString('hex');
  if (!stateDir) return { current, previous: [], save: () => {}, cleaned: () => {} };
  const file = path.join(stateDir, 'hook-run');
  let previous: string[] = [];
  try {
    const fd = fs.openSync(file, fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK);
    try {
      previous = [...new Set(fs.readFileSync(fd, 'latin1').split('\n').filter((l) => /^[0-9a-f]{32}$/.test(l)))];
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    // None yet (a first start), or not a file: no hooks of a last run to find.
  }
  let pending = previous;
  let saved = false;
  const write = () => replaceFile(file, [...(saved ? [current] : []), ...pending].map((id) => `${id}\n`).join(''));
  const save = () => {
    if (saved) return;
    saved = true;
    try {
      write();
    } catch (err) {
      saved = false;
      throw new TapbrokerError('TB_E_STATE_UNWRITABLE', `the broker cannot write ${file}, by which a next start finds `
        + `this run's hooks: no hook runs until it can (${(err as Error).message})`, {
        hint: 'an administrator frees space in the broker\'s state directory (or remounts it read-write)',
      });
    }
  };
  const cleaned = () => {
    if (pending.length === 0) return;
    pending = [];
    try {
      write();
    } catch {
      // Still listed: a later start looks for their hooks once more, and finds none.
    }
  };
  return { current, previous, save, cleaned };
}

/** This run's secret, and its writing where the next start reads it (before a hook's `up`; throws if it cannot). */
export interface HookRun {
  readonly current: string;
  save(): void;
}

/**
 * Hooks the broker's last run left running when it stopped (killed mid-`up`): killed, with every process they
 * started that kept their environment, before the start runs any `down`, so that no `up` finishes after its
 * `down`. Returns how many processes were killed.
 */
export function killOrphanHooks(runs: readonly string[]): number {
  const marks = runs.map((run) => `\0TAPBROKER_RUN=${run}\0`);
  const killed = new Set<number>();
  // Pass after pass until QUIET_PASSES in a row find none: a process forked while a pass ran, at a pid it had already
  // gone by, is found by a later one (a re-test's hook forked during the scan, and a child finished part of an `up`
  // after `down`; another's child that forked and exited in turn outran one empty pass). One that hops pids faster
  // than a pass can still outrun them: under the shipped unit, its cgroup is killed whole when the broker dies.
  for (let pass = 0, quiet = 0; quiet < QUIET_PASSES && pass < MAX_KILL_PASSES; pass++) {
    let found = 0;
    for (const pid of fs.readdirSync('/proc').filter((d) => /^\d+$/.test(d))) {
      if (Number(pid) === process.pid) continue;
      // Held by a pidfd from before the reads to the kill: what was read is this process's only if it is still
      // alive after the reads, and the kill cannot reach another process that took its pid meanwhile.
      let pidfd: number | null = null;
      try {
        pidfd = sys.pidfdOpen(Number(pid));
        if (pidfd === null) continue;
        const environ = `\0${fs.readFileSync(`/proc/${pid}/environ`, 'latin1')}`;
        if (!marks.some((mark) => environ.includes(mark))) continue;
        const group = groupOf(pid);
        if (!pidfdSignal(pidfd, 0)) continue;
        // Its process group at once (the hook's own, unless it left it): one that forks and exits in turn is caught
        // there, where a pass over /proc would chase its pids (a re-test's did, every 0.5 ms). By the group's id:
        // pidfd_send_signal's group flag means the group this process leads, which is none once the hook's first
        // process has exited (an outside audit's cleared child lived on). The group exists: its member was alive
        // after the read above.
        if (group !== null && group > 1 && group !== ownGroup) process.kill(-group, 'SIGKILL');
        pidfdSignal(pidfd, SIGKILL);
        found++;
        killed.add(Number(pid));
      } catch {
        // Gone meanwhile, or not ours to read (another user's, a process with more capabilities).
      } finally {
        if (pidfd !== null) sys.close(pidfd);
      }
    }
    quiet = found === 0 ? quiet + 1 : 0;
  }
  return killed.size;
}

/** A process's group (/proc/PID/stat), or null. */
function groupOf(pid: string | number): number | null {
  try {
    // The command name, in parentheses, may hold anything: the fields are counted after its last `)`.
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
    return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[2]);
  } catch {
    return null;
  }
}
const ownGroup = groupOf('self');

/** Passes over /proc at most (each kills what it finds; a killed process forks no more), and empty ones in a row. */
const MAX_KILL_PASSES = 64;
const QUIET_PASSES = 3;
