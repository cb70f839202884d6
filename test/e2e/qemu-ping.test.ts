// The headline: uid 65534 runs `tapbroker run --net bridge=br0 -- qemu-system-x86_64 …`; the broker
// hands it a tap; qemu, with no privilege at all, boots a real guest that pings the bridge.
import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import { BrokerProcess, CLIENT_CLI, ROOT } from '../helpers/broker.js';
import { QEMU, guestImage, guestQemuArgs, guestUnavailable } from '../helpers/guest.js';
import { Netns } from '../helpers/netns.js';
import { NOBODY, spawnAs } from '../helpers/unpriv.js';

const unavailable = guestUnavailable();
if (unavailable) console.log(`# skip qemu end-to-end: ${unavailable}`);

let ns: Netns | undefined;
let broker: BrokerProcess | undefined;

test.after.always(async () => {
  await broker?.stop();
  ns?.destroy();
});

/** Effective capabilities and uid of a running process, from /proc. */
function privileges(pid: number): { uid: string; capEff: string } | null {
  try {
    const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    return { uid: /^Uid:\s+(.*)$/m.exec(status)![1]!.trim(), capEff: /^CapEff:\s+(\S+)$/m.exec(status)![1]! };
  } catch {
    return null;
  }
}

function childPids(pid: number): number[] {
  try {
    return fs.readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

test.before(async () => {
  if (unavailable) return;
  ns = Netns.create('e2e');
  ns.bridge('br0', { address: '192.0.2.1/24' });
  ns.bridge('br1');
  ns.bridge('br2', { address: '203.0.113.1/24' });
  // A veth whose peer end answers for 198.51.100.1: the macvtap's parent and the guest's neighbour.
  ns.ip('link', 'add', 'vparent', 'type', 'veth', 'peer', 'name', 'vpeer');
  ns.ip('addr', 'add', '198.51.100.1/24', 'dev', 'vpeer');
  ns.ip('link', 'set', 'vparent', 'up');
  ns.ip('link', 'set', 'vpeer', 'up');
  broker = await BrokerProcess.start(ns, `[network.locked]\nbridge = "br2"\nmac_lock = true\n\n[[rule]]\nname = "vm"\nusers = [${NOBODY}]\nbridges = ["br0"]\nnetworks = ["locked"]\nmacvtap = [{ parent = "vparent" }]\n`, { tag: 'e2e' });
});

/** Boots the guest through `tapbroker run --net SPEC` as uid 65534; returns what happened. */
async function boot(spec: string, ip: string, ping: string, mac2?: string): Promise<{ code: number | null; out: string; err: string; qemuPrivileges: { uid: string; capEff: string } | null }> {
  const img = guestImage();
  const client = spawnAs({}, process.execPath, [CLIENT_CLI, 'run', '--socket', broker!.socket, '--net', spec, '--', QEMU, ...guestQemuArgs(img, { ip, ping, ...(mac2 ? { mac2 } : {}) })], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  client.stdout!.on('data', (d) => (out += d));
  client.stderr!.on('data', (d) => (err += d));
  // setpriv execs node in place, so the client's pid is the setpriv child's pid and qemu is its child.
  let qemuPrivileges = null as ReturnType<typeof privileges>;
  const watch = setInterval(() => {
    for (const pid of childPids(client.pid!)) qemuPrivileges ??= privileges(pid);
  }, 100);
  const timer = setTimeout(() => client.kill('SIGKILL'), 150_000);
  const code = await new Promise<number | null>((resolve) => client.on('exit', (c) => resolve(c)));
  clearInterval(watch);
  clearTimeout(timer);
  return { code, out, err, qemuPrivileges };
}

(unavailable ? test.skip : test.serial)('an unprivileged qemu guest on a brokered tap pings the bridge', async (t) => {
  t.timeout(180_000);
  // mac2: afterwards the guest takes another MAC and pings again, which an unlocked port lets through
  // (the control of the mac_lock test below).
  const { code, out, err, qemuPrivileges } = await boot('bridge=br0', '192.0.2.2/24', '192.0.2.1', '52:54:00:0e:2e:02');
  ns = ns!;
  broker = broker!;
  t.log(out.split('\n').filter((l) => l.startsWith('TB-')).join('\n'));

  t.is(code, 0, `client exit ${code}\nstdout:\n${out}\nstderr:\n${err}`);
  t.regex(out, /TB-GUEST-PING-OK 192\.0\.2\.1/);
  t.regex(out, /TB-GUEST-PING2-OK 192\.0\.2\.1/, 'without mac_lock, a guest that changes its MAC still gets through');
  const grant = await broker!.record((r) => r.decision === 'grant');
  t.truthy(grant);
  const device = grant!.device as { name: string; mac: string };
  t.true(out.includes(`TB-GUEST-MAC ${device.mac}`), 'the guest NIC has the MAC the broker assigned');
  t.regex(err, new RegExp(`tapbroker: ${device.name} on br0`));
  t.truthy(qemuPrivileges, 'qemu was observed running');
  t.is(qemuPrivileges!.uid.split(/\s+/)[0], String(NOBODY), 'qemu ran as uid 65534');
  t.is(qemuPrivileges!.capEff, '0000000000000000', 'qemu had no capabilities');
  t.is(ns.link(device.name), undefined, 'the tap vanished with qemu');
});

(unavailable ? test.skip : test.serial)('an unprivileged qemu guest on a brokered macvtap pings the parent\'s veth peer', async (t) => {
  t.timeout(180_000);
  const { code, out, err } = await boot('macvtap=vparent,mode=bridge', '198.51.100.2/24', '198.51.100.1');
  t.log(out.split('\n').filter((l) => l.startsWith('TB-')).join('\n'));
  t.is(code, 0, `client exit ${code}\nstdout:\n${out}\nstderr:\n${err}`);
  t.regex(out, /TB-GUEST-PING-OK 198\.51\.100\.1/);
  const name = /tapbroker: (\S+) macvtap on vparent/.exec(err)![1]!;
  const mac = /mac (52:54:00:[0-9a-f:]+)/.exec(err)![1]!;
  t.true(out.includes(`TB-GUEST-MAC ${mac}`), 'the guest uses the macvtap\'s MAC');
  await broker!.waitFor(() => ns!.link(name) === undefined, 1000, 'the macvtap outlived its VM');
});

const HELPER = path.join(ROOT, 'packages/client/dist/bridge-helper.js');

/** qemu itself, as uid 65534, with `-netdev bridge,helper=` naming tapbroker's helper (run by qemu, from C). */
async function bootWithHelper(br: string, mac: string, ip: string, ping: string) {
  const img = guestImage();
  const args = [
    ...guestQemuArgs(img, { ip, ping }),
    '-netdev', `bridge,id=n0,br=${br},helper=${HELPER}`, '-device', `virtio-net-pci,netdev=n0,mac=${mac}`,
  ];
  const qemu = spawnAs({}, QEMU, args, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { PATH: process.env['PATH'], TAPBROKER_SOCKET: broker!.socket },
  });
  let out = '';
  let err = '';
  qemu.stdout!.on('data', (d) => (out += d));
  qemu.stderr!.on('data', (d) => (err += d));
  const timer = setTimeout(() => qemu.kill('SIGKILL'), 150_000);
  const code = await new Promise<number | null>((resolve) => qemu.on('exit', (c) => resolve(c)));
  clearTimeout(timer);
  return { code, out, err, pid: qemu.pid! };
}

(unavailable ? test.skip : test.serial)('qemu -netdev bridge with tapbroker-bridge-helper boots a guest that pings, with no setuid binary', async (t) => {
  t.timeout(180_000);
  const mac = '52:54:00:7b:00:01';
  const { code, out, err, pid } = await bootWithHelper('br0', mac, '192.0.2.3/24', '192.0.2.1');
  t.log(out.split('\n').filter((l) => l.startsWith('TB-')).join('\n'));
  t.is(code, 0, `qemu exit ${code}\nstdout:\n${out}\nstderr:\n${err}`);
  t.regex(out, /TB-GUEST-PING-OK 192\.0\.2\.1/);
  t.true(out.includes(`TB-GUEST-MAC ${mac}`), 'the guest has the MAC qemu gave it');
  const grant = await broker!.record((r) => r.decision === 'grant' && r.ppid === pid);
  const device = grant!.device as { name: string; mac: string | null; vnet_hdr: boolean };
  t.is(device.mac, null, 'the broker does not claim a guest MAC it was never told');
  t.is((grant!.request as { mac: string }).mac, 'unknown');
  t.true(device.vnet_hdr, 'qemu asked for --use-vnet');
  // setpriv execs qemu in place: the pid spawned is qemu's, the helper's parent.
  t.regex(grant!.parent_exe ?? '', /\/qemu-system-x86_64$/, 'the helper\'s parent was qemu');
  t.is(grant!.client, 'tapbroker-bridge-helper', 'the helper names itself in its hello');
  t.is(ns!.link(device.name), undefined, 'the tap vanished with qemu');
});

(unavailable ? test.skip : test.serial)('a bridge the policy refuses makes qemu fail with the broker\'s code, and nothing is left', async (t) => {
  t.timeout(60_000);
  const { code, err } = await bootWithHelper('br1', '52:54:00:7b:00:02', '192.0.2.4/24', '192.0.2.1');
  t.not(code, 0);
  t.regex(err, /TB_E_POLICY_DENIED/, 'qemu\'s error carries the broker\'s code');
  t.regex(err, /hint:/);
  t.log(err.trim());
  t.deepEqual(ns!.extraLinks(['br0', 'br1', 'br2', 'vparent', 'vpeer']), [], 'no device was left behind');
});

(unavailable ? test.skip : test.serial)('on a locked port the guest pings with its own MAC, and nothing gets through once it changes it', async (t) => {
  t.timeout(180_000);
  const { code, out, err } = await boot('network=locked', '203.0.113.2/24', '203.0.113.1', '52:54:00:0e:2e:03');
  t.log(out.split('\n').filter((l) => l.startsWith('TB-')).join('\n'));
  t.is(code, 0, `client exit ${code}\nstdout:\n${out}\nstderr:\n${err}`);
  t.regex(err, /tapbroker: \S+ on network locked/);
  t.regex(out, /TB-GUEST-PING-OK 203\.0\.113\.1/, 'the guest pings with the MAC it was given');
  t.regex(out, /TB-GUEST-MAC2 52:54:00:0e:2e:03/);
  t.regex(out, /TB-GUEST-PING2-FAIL 203\.0\.113\.1/, 'with another MAC its frames no longer reach the bridge');
});
