// The headline: uid 65534 runs `tapbroker run --net bridge=br0 -- qemu-system-x86_64 …`; the broker
// hands it a tap; qemu, with no privilege at all, boots a real guest that pings the bridge.
import test from 'ava';
import fs from 'node:fs';
import { BrokerProcess, CLIENT_CLI } from '../helpers/broker.js';
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

(unavailable ? test.skip : test)('an unprivileged qemu guest on a brokered tap pings the bridge', async (t) => {
  t.timeout(180_000);
  const img = guestImage();
  ns = Netns.create('e2e');
  ns.bridge('br0', { address: '192.0.2.1/24' });
  broker = await BrokerProcess.start(ns, `[[rule]]\nname = "vm"\nusers = [${NOBODY}]\nbridges = ["br0"]\n`, { tag: 'e2e' });

  const client = spawnAs({}, process.execPath, [CLIENT_CLI, 'run', '--socket', broker.socket, '--net', 'bridge=br0', '--', QEMU, ...guestQemuArgs(img, { ip: '192.0.2.2/24', ping: '192.0.2.1' })], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  client.stdout!.on('data', (d) => (out += d));
  client.stderr!.on('data', (d) => (err += d));
  // setpriv execs node in place, so the client's pid is the setpriv child's pid and qemu is its child.
  let qemuPrivileges: ReturnType<typeof privileges> = null;
  const watch = setInterval(() => {
    for (const pid of childPids(client.pid!)) qemuPrivileges ??= privileges(pid);
  }, 100);
  const timer = setTimeout(() => client.kill('SIGKILL'), 150_000);
  const code = await new Promise<number | null>((resolve) => client.on('exit', (c) => resolve(c)));
  clearInterval(watch);
  clearTimeout(timer);
  t.log(out.split('\n').filter((l) => l.startsWith('TB-')).join('\n'));

  t.is(code, 0, `client exit ${code}\nstdout:\n${out}\nstderr:\n${err}`);
  t.regex(out, /TB-GUEST-PING-OK 192\.0\.2\.1/);
  const grant = broker.records.find((r) => r.decision === 'grant');
  t.truthy(grant);
  const device = grant!.device as { name: string; mac: string };
  t.true(out.includes(`TB-GUEST-MAC ${device.mac}`), 'the guest NIC has the MAC the broker assigned');
  t.regex(err, new RegExp(`tapbroker: ${device.name} on br0`));
  t.truthy(qemuPrivileges, 'qemu was observed running');
  t.is(qemuPrivileges!.uid.split(/\s+/)[0], String(NOBODY), 'qemu ran as uid 65534');
  t.is(qemuPrivileges!.capEff, '0000000000000000', 'qemu had no capabilities');
  t.is(ns.link(device.name), undefined, 'the tap vanished with qemu');
});
