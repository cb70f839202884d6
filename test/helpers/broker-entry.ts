// Test-only entry point: tapbrokerd with broker options a test injects, which the shipped main.js
// never reads. TB_TEST_FAULT=POINT SIGKILLs the broker at that fault point; TB_TEST_FAULT=POINT=wait:FILE
// creates FILE.reached there and blocks until FILE exists (then fails as a kernel refusal if FILE says `throw`); TB_TEST_FAULT=POINT=throw makes the kernel step
// there fail as a kernel refusal would (for refusals this kernel cannot be made to give). TB_TEST_FD_FALLBACK=1 skips SO_PASSRIGHTS,
// so fds pushed at the broker take the path every kernel before 6.16 relies on. TB_TEST_MAX_CONNECTIONS=N
// makes the broker's connection limit N (the default is 1024). TB_TEST_LINK_EVENT_QUEUE=BYTES makes the
// kernel's queue of link events for the broker that small, so a burst of events overruns it for real.
// TB_TEST_SUBUID_FILE=FILE lists subordinate uids there instead of /etc/subuid; TB_TEST_SUBGID_FILE, gids.
// TB_TEST_STDERR_BACKLOG=BYTES: stderr's backlog holds that much, not 16 MiB. TB_TEST_MAX_CONNECTIONS_PER_USER=N:
// each uid's cap of connections. TB_TEST_FROZEN_CLOCK=1: the clock each uid's share is counted on stands still,
// so a uid past its share stays past it (its window never turns). TB_TEST_MAX_UNREAD_FDS=N: fds of unread replies
// one uid may hold (all uids: 32 times as many). TB_TEST_CLOSER_IDLE_MS=N: the closer of the broker's own fd
// copies goes after N ms without work (default 30 s).
import fs from 'node:fs';
import { daemon, limitStderrBacklog, type FaultPoint } from '@tapbroker/broker/internal';
import { TapbrokerError } from '@tapbroker/protocol';

const spec = process.env['TB_TEST_FAULT'] ?? '';
const fallback = process.env['TB_TEST_FD_FALLBACK'] === '1';
const maxConnections = Number(process.env['TB_TEST_MAX_CONNECTIONS'] ?? 0) || undefined;
const maxConnectionsPerUser = Number(process.env['TB_TEST_MAX_CONNECTIONS_PER_USER'] ?? 0) || undefined;
const maxUnreadFds = Number(process.env['TB_TEST_MAX_UNREAD_FDS'] ?? 0) || undefined;
delete process.env['TB_TEST_MAX_UNREAD_FDS'];
const frozenClock = process.env['TB_TEST_FROZEN_CLOCK'] === '1';
const closerIdleMs = Number(process.env['TB_TEST_CLOSER_IDLE_MS'] ?? 0) || undefined;
const takerWaitMs = Number(process.env['TB_TEST_TAKER_WAIT_MS'] ?? 0) || undefined;
delete process.env['TB_TEST_CLOSER_IDLE_MS'];
delete process.env['TB_TEST_MAX_CONNECTIONS_PER_USER'];
delete process.env['TB_TEST_FROZEN_CLOCK'];
const linkEventQueue = Number(process.env['TB_TEST_LINK_EVENT_QUEUE'] ?? 0) || undefined;
const subuidFile = process.env['TB_TEST_SUBUID_FILE'];
const subgidFile = process.env['TB_TEST_SUBGID_FILE'];
delete process.env['TB_TEST_SUBUID_FILE'];
delete process.env['TB_TEST_SUBGID_FILE'];
if (process.env['TB_TEST_STDERR_BACKLOG']) limitStderrBacklog(Number(process.env['TB_TEST_STDERR_BACKLOG']));
delete process.env['TB_TEST_STDERR_BACKLOG'];
delete process.env['TB_TEST_MAX_CONNECTIONS'];
delete process.env['TB_TEST_LINK_EVENT_QUEUE'];
delete process.env['TB_TEST_FAULT'];
delete process.env['TB_TEST_FD_FALLBACK'];
const [armed, action] = spec.split(/=(.*)/s) as [string, string | undefined];

function fault(point: FaultPoint): void {
  if (point !== armed) return;
  if (action === 'throw') throw new TapbrokerError('TB_E_KERNEL', `injected kernel refusal at ${point}`);
  if (action?.startsWith('wait:')) {
    const file = action.slice(5);
    fs.writeFileSync(`${file}.reached`, point);
    const pause = new Int32Array(new SharedArrayBuffer(4));
    while (!fs.existsSync(file)) Atomics.wait(pause, 0, 0, 10);
    // A gate opened with `throw` in it: the step then fails as a kernel refusal would.
    if (fs.readFileSync(file, 'utf8') === 'throw') throw new TapbrokerError('TB_E_KERNEL', `injected kernel refusal at ${point}`);
    return;
  }
  process.kill(process.pid, 'SIGKILL');
}

daemon(process.argv.slice(2), {
  ...(spec ? { faults: fault } : {}), ...(maxConnections ? { maxConnections } : {}),
  ...(maxConnectionsPerUser ? { maxConnectionsPerUser } : {}), ...(frozenClock ? { clock: () => 0 } : {}),
  ...(maxUnreadFds ? { maxUnreadFds } : {}), ...(closerIdleMs ? { closerIdleMs } : {}), ...(takerWaitMs ? { takerWaitMs } : {}),
  ...(linkEventQueue ? { linkEventQueue } : {}), ...(subuidFile ? { subuidFile } : {}), ...(subgidFile ? { subgidFile } : {}),
  refuseFdsAtSocket: !fallback,
});
