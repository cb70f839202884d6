// A tap given to a group reaches whoever holds the group when it is opened, and no account database tells who that
// is: a session keeps a group its user was taken out of (`gpasswd -d` does not reach running processes). Found by
// outside reviews: a deny rule naming mallory did not reach alice's tap given to a group mallory still held in a
// session, and he opened it; a look at /proc for such sessions missed one that kept changing pid. Such a tap is now
// refused wherever a deny covers its target, and granted where none does.
import test from 'ava';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
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

const ask = (bridge: string) => probeOnce({ socket: fx.broker.socket,
  requests: [{ bridge, persistent: true, group: GROUP }] }, { uid: NOBODY, groups: [GROUP] });

test.serial('a tap given to a group is refused on a bridge a deny covers, whoever holds the group now', async (t) => {
  // mallory's session, which kept the group: as the kernel sees it, a process of his uid holding the gid.
  const session: ChildProcess = spawn('setpriv', [...setprivArgs({ uid: MALLORY, gid: 65534, groups: [GROUP] }),
    'sleep', '60'], { stdio: 'ignore' });
  try {
    await until(() => session.pid !== undefined && /Groups:.*\b4210070\b/.test(procStatus(session.pid)),
      { ms: 5000, what: 'mallory\'s session holds the group' });
    const refused = await ask('br0');
    t.is(refused.error?.code, 'TB_E_POLICY_DENIED', JSON.stringify(refused));
    t.regex(refused.error?.message ?? '', /^a deny rule covers bridge `br0', and a tap given to a group reaches every/);
    t.notRegex(refused.error?.message ?? '', /4210071|no-mallory/, 'neither the uid nor the rule is told');
    const rec = await fx.broker.record((r) => r.decision === 'deny' && r.rule === 'no-mallory');
    t.regex(rec.message ?? '', /the tap would be given to group 4210070, whose holders no account database tells/);
    t.deepEqual(fx.ns.links().filter((l) => l.linkinfo?.info_kind === 'tun'), [], 'nothing was made');
  } finally {
    session.kill('SIGKILL');
    if (session.exitCode === null && session.signalCode === null) await once(session, 'exit');
  }
  // With nobody holding the group but the caller, the same: the broker cannot know who will.
  t.is((await ask('br0')).error?.code, 'TB_E_POLICY_DENIED');
});

test.serial('a tap given to a group is granted on a bridge no deny covers; one given to nobody on the other', async (t) => {
  const granted = await ask('br1');
  t.is(granted.error, null, granted.error?.message);
  await probeOnce({ socket: fx.broker.socket, release: [granted.taps[0]!.device.name] });
  const own = await probeOnce({ socket: fx.broker.socket, requests: [{ bridge: 'br0', persistent: true }] });
  t.is(own.error, null, 'the caller\'s own tap, given to no group, on the bridge the deny covers for mallory');
  await probeOnce({ socket: fx.broker.socket, release: [own.taps[0]!.device.name] });
});

function procStatus(pid: number): string {
  try {
    return fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  } catch {
    return '';
  }
}
