// A broker in a PID namespace of its own (a container's), its callers outside: the kernel gives it their pid as 0.
// Found by an outside review: a macvtap whose lease ends with its holder was written with holder 0, which the lease
// table's shape refuses: `list' failed for root and the owner, and the next start dropped the whole table and left
// the macvtap for good. Such a caller cannot be found again after a restart, so it is refused that macvtap, and told
// why and what works instead; taps (their fds end them) and persistent macvtaps (released) are granted as before.
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { CLIENT_CLI } from '../helpers/broker.js';
import { brokerFixture } from '../helpers/fixture.js';
import { NOBODY, probeOnce, setprivArgs } from '../helpers/unpriv.js';

/**
 * unshare ignores SIGTERM while it waits for its child (the broker, pid 1 of the new namespace): the shell passes
 * the broker's stop on to it.
 */
const IN_PIDNS = ['sh', '-c', 'unshare -pf --mount-proc --kill-child "$@" & u=$!; '
  + 'trap \'kill -TERM $(pgrep -P $u)\' TERM; wait $u; wait $u', 'sh'];

const fx = brokerFixture(test, {
  tag: 'pidns',
  policy: `[[rule]]\nname = "m"\nusers = [${NOBODY}]\nbridges = ["br0"]\npersistent = true\n`
    + 'macvtap = [{ parent = "vparent", modes = ["bridge"] }]\n',
  bridges: ['br0'],
  veths: [['vparent', 'vpeer']],
  start: { wrap: IN_PIDNS },
});

function tapbroker(args: string[]) {
  const [command, ...rest] = args;
  const r = spawnSync('setpriv', [...setprivArgs(), process.execPath, CLIENT_CLI, command!, '--socket', fx.broker.socket,
    ...rest],
    { encoding: 'utf8', timeout: 20_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

test.serial('a macvtap that ends with its holder is refused to a caller the broker cannot see; nothing is made', async (t) => {
  const r = await probeOnce({ socket: fx.broker.socket, requests: [{ parent: 'vparent', mode: 'bridge' }] });
  t.is(r.error?.code, 'TB_E_INVALID_REQUEST', JSON.stringify(r));
  t.regex(r.error!.message, /cannot see your process \(it runs in a PID namespace of its own/);
  t.regex(r.error!.hint ?? '', /ask for a tap, or a persistent macvtap/);
  t.deepEqual(fx.ns.links().filter((l) => l.linkinfo?.info_kind === 'macvtap'), [], 'a macvtap was made');
  const rec = await fx.broker.record((x) => x.op === 'create-macvtap' && x.decision === 'error');
  t.is(rec.pid, 0, 'the kernel gives an outside caller\'s pid as 0, and the record says so');
  // `can` says the same as `run` would.
  const can = tapbroker(['can', '--net', 'macvtap=vparent,mode=bridge']);
  t.is(can.code, 65, can.stderr);
  t.regex(can.stdout + can.stderr, /TB_E_INVALID_REQUEST.*cannot see your process/);
});

test.serial('taps and persistent macvtaps still work, and list shows them', async (t) => {
  const run = tapbroker(['run', '--net', 'bridge=br0', '--', 'true']);
  t.is(run.code, 0, run.stderr);
  const made = tapbroker(['create', '--persistent', '--macvtap', 'vparent', '--mode', 'bridge', '--name',
    `tb${NOBODY}-pidns`]);
  t.is(made.code, 0, made.stderr);
  const list = tapbroker(['list', '--json']);
  t.is(list.code, 0, list.stderr);
  t.is((JSON.parse(list.stdout) as { leases: Array<{ name: string }> }).leases.map((l) => l.name).join(), `tb${NOBODY}-pidns`);
  const gone = tapbroker(['release', `tb${NOBODY}-pidns`]);
  t.is(gone.code, 0, gone.stderr);
  t.notRegex(fx.broker.stderr, /not a lease table/);
});
