// Plug hooks: an admin's program that joins a device to a network that is neither a Linux bridge nor
// Open vSwitch. Run by the broker (not by qemu, which keeps its confinement), from the policy's path
// only, re-checked before each run, with a fixed argv, an empty environment plus documented variables,
// a timeout, and its output captured for the audit record.
import { execFile } from 'node:child_process';
import { TapbrokerError } from '@tapbroker/protocol';
import { hookUnsafe } from './policy.js';

export const HOOK_TIMEOUT_MS = 10_000;
const OUTPUT_CAP = 4096;

export interface HookContext {
  device: string;
  ifindex: number;
  mac: string;
  uid: number;
  network: string;
  lease: string;
}

export interface HookResult {
  code: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
  ms: number;
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
export function runHook(file: string, action: 'up' | 'down', ctx: HookContext, timeoutMs = HOOK_TIMEOUT_MS): Promise<HookResult> {
  const unsafe = hookUnsafe(file);
  if (unsafe) return Promise.reject(new TapbrokerError('TB_E_HOOK_FAILED', `hook ${file} ${unsafe}; not run`));
  const vars: Record<string, string> = {
    TAPBROKER_ACTION: action, TAPBROKER_DEVICE: ctx.device, TAPBROKER_IFINDEX: String(ctx.ifindex), TAPBROKER_MAC: ctx.mac,
    TAPBROKER_UID: String(ctx.uid), TAPBROKER_NETWORK: ctx.network, TAPBROKER_LEASE: ctx.lease,
  };
  const argv = [action, ctx.device, `ifindex=${ctx.ifindex}`, `mac=${ctx.mac}`, `uid=${ctx.uid}`, `network=${ctx.network}`, `lease=${ctx.lease}`];
  const started = Date.now();
  return new Promise((resolve, reject) => {
    execFile(file, argv, { env: { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', ...vars }, cwd: '/', timeout: timeoutMs, killSignal: 'SIGKILL', maxBuffer: 1024 * 1024, encoding: 'utf8' },
      (err, stdout, stderr) => {
        const result: HookResult = {
          code: err ? (typeof err.code === 'number' ? err.code : null) : 0, signal: err?.signal ?? null,
          stdout: captured(stdout ?? ''), stderr: captured(stderr ?? ''), ms: Date.now() - started,
        };
        if (!err) return resolve(result);
        const why = err.killed && err.signal === 'SIGKILL' ? `timed out after ${timeoutMs} ms` : result.code !== null ? `exited ${result.code}` : `died of ${result.signal}`;
        reject(Object.assign(new TapbrokerError('TB_E_HOOK_FAILED', `hook ${file} ${action} ${ctx.device} ${why}${result.stderr ? `: ${result.stderr.trim().split('\n').pop()}` : ''}`), { hook: result }));
      });
  });
}
