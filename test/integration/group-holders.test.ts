// A tap given to a group reaches whoever holds the group, and a session keeps a group its user was taken out of
// (`gpasswd -d` does not reach running processes). Found by an outside review: a deny rule naming mallory did not
// reach alice's tap given to a group whose membership mallory kept only in his running session; he opened it. The
// broker now asks /proc which processes hold the group as well as the account database.
import test from 'ava';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import { once } from 'node:events';
import { brokerFixture } from '../helpers/fixture.js';
import { NOBODY, probeOnce, setprivArgs } from '../helpers/unpriv.js';
import { until } from '../helpers/wait.js';

/** The group, and mallory's uid: neither is in the account database, so only his process holds the group. */
const GROUP = 4210070;
const MALLORY = 4210071;

const fx = brokerFixture(test, {
  tag: 'gholders',
  policy: `[[rule]]\nname = "team"\nusers = [${NOBODY}]\nbridges = ["br0", "br1"]\npersistent = true\n\n`
    + `[[deny]]\nname = "no-mallory"\nusers = [${MALLORY}]\nbridges = ["br0"]\n`,
  bridges: ['br0', 'br1'],
});

test.serial('a deny reaches a tap given to a group while a denied user\'s process holds that group', async (t) => {
  // mallory's session, which kept the group: as the kernel sees it, a process of his uid holding the gid.
  const session: ChildProcess = spawn('setpriv', [...setprivArgs({ uid: MALLORY, gid: 65534, groups: [GROUP] }),
    'sleep', '60'], { stdio: 'ignore' });
  try {
    await until(() => session.pid !== undefined && /Groups:.*\b4210070\b/.test(procStatus(session.pid)),
      { ms: 5000, what: 'mallory\'s session holds the group' });
    const ask = (bridge: string) => probeOnce({ socket: fx.broker.socket,
      requests: [{ bridge, persistent: true, group: GROUP }] }, { uid: NOBODY, groups: [GROUP] });
    const refused = await ask('br0');
    t.is(refused.error?.code, 'TB_E_POLICY_DENIED', JSON.stringify(refused));
    t.notRegex(refused.error?.message ?? '', /4210071|no-mallory/, 'neither the uid nor the rule is told');
    const rec = await fx.broker.record((r) => r.decision === 'deny' && r.rule === 'no-mallory');
    t.regex(rec.message ?? '', /keeps uid 4210071, whose running process holds the group, off bridge `br0'/);
    t.deepEqual(fx.ns.links().filter((l) => l.linkinfo?.info_kind === 'tun'), [], 'nothing was made');
    const elsewhere = await ask('br1');
    t.is(elsewhere.error, null, 'a bridge the deny does not cover');
    await probeOnce({ socket: fx.broker.socket, release: [elsewhere.taps[0]!.device.name] });
  } finally {
    session.kill('SIGKILL');
    if (session.exitCode === null && session.signalCode === null) await once(session, 'exit');
  }
  // Its session ended: nobody denied holds the group, and the tap is granted (once the broker's list of processes,
  // kept for a second, is made again).
  const ask = () => probeOnce({ socket: fx.broker.socket, requests: [{ bridge: 'br0', persistent: true,
    group: GROUP }] }, { uid: NOBODY, groups: [GROUP] });
  let granted = await ask();
  for (let i = 0; i < 10 && granted.error !== null; i++) {
    await new Promise((r) => setTimeout(r, 300));
    granted = await ask();
  }
  t.is(granted.error, null, granted.error?.message);
  await probeOnce({ socket: fx.broker.socket, release: [granted.taps[0]!.device.name] });
});

function procStatus(pid: number): string {
  try {
    return fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  } catch {
    return '';
  }
}
