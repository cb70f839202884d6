// libvirt's session mode with tapbroker-bridge-helper as its `bridge_helper`: an unchanged
// `<interface type='bridge'><source bridge='br0'/>` guest, defined by uid 65534 through a real unprivileged
// libvirtd (qemu:///session), gets its tap from the broker, boots and pings the bridge. libvirt runs the
// helper with a cleared environment, so the broker is reached at the default socket path, which only
// libvirtd's private mount namespace has (see helpers/libvirt.ts): the host's /run is untouched.
import test from 'ava';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { BrokerProcess, ROOT } from '../helpers/broker.js';
import { guestImage, guestUnavailable } from '../helpers/guest.js';
import { LibvirtSession, PRIVATE_RUN_SOURCE, guestDomainXml, libvirtUnavailable } from '../helpers/libvirt.js';
import { Netns } from '../helpers/netns.js';
import { NOBODY } from '../helpers/unpriv.js';
import { poll } from '../helpers/wait.js';

const HELPER = path.join(ROOT, 'packages/client/dist/bridge-helper.js');
const POLICY = `[[rule]]\nname = "vm"\nusers = [${NOBODY}]\nbridges = ["br0"]\n`;

const unavailable = libvirtUnavailable() ?? guestUnavailable();
if (unavailable) console.log(`# skip libvirt session end-to-end: ${unavailable}`);
const serial = unavailable ? test.skip : test.serial;

let ns: Netns | undefined;
let broker: BrokerProcess | undefined;
let session: LibvirtSession | undefined;

/** `dev:ino` of a path as a process in `pid`'s mount namespace sees it (the host's: this process). */
function inode(file: string, pid?: number): string | null {
  const r = pid === undefined
    ? spawnSync('stat', ['-c', '%d:%i', file], { encoding: 'utf8' })
    : spawnSync('nsenter', ['-t', String(pid), '-m', 'stat', '-c', '%d:%i', file], { encoding: 'utf8' });
  return r.status === 0 ? r.stdout.trim() : null;
}

/** Lines of the host's mount table that would be ours: over /run/tapbroker, or the private /run tmpfs. */
function hostMounts(): string[] {
  return fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n')
    .filter((l) => / \/run\/tapbroker /.test(l) || l.includes(PRIVATE_RUN_SOURCE));
}

test.before(async () => {
  if (unavailable) return;
  ns = Netns.create('lvh');
  ns.bridge('br0', { address: '192.0.2.1/24' });
  ns.bridge('br1');
  broker = await BrokerProcess.start(ns, POLICY, { tag: 'lvh' });
  session = await LibvirtSession.start(ns, path.dirname(broker.socket), {
    tag: 'lvh-home', qemuConf: `bridge_helper = "${HELPER}"\n`,
  });
});

test.after.always(async () => {
  await session?.stop();
  await broker?.stop();
  ns?.destroy();
});

/** Polls the serial console log until the guest reports its ping, fails, or `ms` pass. */
async function waitForConsole(file: string, ms: number): Promise<string> {
  const read = () => (fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '');
  return (await poll(() => { const text = read(); return /TB-GUEST-PING-(OK|FAIL)|TB-GUEST-FAIL/.test(text) ? text : null; }, { ms, every: 200 })) ?? read();
}

serial('an unchanged libvirt bridge interface, via a session libvirtd and the helper, boots and pings', async (t) => {
  t.timeout(240_000);
  const s = session!;
  const img = guestImage();
  const name = `tb-lvh-${process.pid}`;
  const mac = '52:54:00:7b:20:01';
  const consoleLog = path.join(s.home, 'console-br0.log');
  const xml = s.writeFile('br0.xml', guestDomainXml({
    name, img, bridge: 'br0', mac, ip: '192.0.2.6/24', ping: '192.0.2.1', console: consoleLog,
  }));

  const t0 = Date.now();
  const created = await s.virsh('create', xml);
  const tCreated = Date.now();
  t.is(created.code, 0, `virsh create failed:\n${created.stdout}${created.stderr}\nlibvirtd:\n${s.output}`);
  if (created.code !== 0) return;
  // Whatever fails below, the next test starts with no domain (and no tap) of this one.
  t.teardown(async () => void (await s.virsh('destroy', name)));

  const grant = await broker!.record((r) => r.decision === 'grant' && r.uid === NOBODY);
  const request = grant.request as { parent: string; mac: string; vnet_hdr: boolean };
  const device = grant.device as { name: string };
  t.log(`helper's parent: ${grant.parent_exe} (pid ${grant.ppid}; libvirtd is pid ${s.pid})`);
  t.regex(grant.parent_exe ?? '', /libvirtd|qemu-system/, 'libvirt (or its qemu) ran the helper');
  t.is(grant.client, 'tapbroker-bridge-helper', 'the helper names itself in its hello');
  t.is(request.parent, 'br0');
  t.is(request.mac, 'unknown', 'qemu-bridge-helper\'s protocol carries no MAC');
  t.true(request.vnet_hdr, 'libvirt passes --use-vnet');
  t.is(ns!.link(device.name)?.master, 'br0', 'the tap is a port of br0 while the domain runs');

  const out = await waitForConsole(consoleLog, 120_000);
  const tPinged = Date.now();
  t.log(out.split('\n').filter((l) => l.startsWith('TB-')).join('\n'));
  t.regex(out, /TB-GUEST-PING-OK 192\.0\.2\.1/, `guest console:\n${out}`);
  t.true(out.includes(`TB-GUEST-MAC ${mac}`), 'the guest NIC has the MAC of the domain XML');

  const destroyed = await s.virsh('destroy', name);
  const tDestroyed = Date.now();
  t.is(destroyed.code, 0, destroyed.stderr);
  await broker!.waitFor(() => ns!.link(device.name) === undefined, 5000, 'the tap outlived its domain');
  const tGone = Date.now();
  t.false((await s.virsh('list', '--all', '--name')).stdout.includes(name), 'the transient domain is gone');
  t.log(`virsh create ${tCreated - t0} ms, then ping ${tPinged - tCreated} ms, virsh destroy `
    + `${tDestroyed - tPinged} ms, tap gone ${tGone - tDestroyed} ms after`);
});

serial('a bridge the policy refuses makes virsh fail with the broker\'s code, and no tap is left', async (t) => {
  t.timeout(240_000);
  const s = session!;
  const name = `tb-lvh-deny-${process.pid}`;
  const xml = s.writeFile('br1.xml', guestDomainXml({
    name, img: guestImage(), bridge: 'br1', mac: '52:54:00:7b:20:02', ip: '192.0.2.7/24', ping: '192.0.2.1',
    console: path.join(s.home, 'console-br1.log'),
  }));
  const created = await s.virsh('create', xml);
  t.log(created.stderr.trim());
  t.not(created.code, 0, 'virsh create must fail');
  t.regex(created.stderr, /TB_E_POLICY_DENIED/, 'libvirt\'s error carries the helper\'s stderr');
  const deny = await broker!.record((r) => r.decision === 'deny' && r.request?.['parent'] === 'br1');
  t.is(deny.code, 'TB_E_POLICY_DENIED');
  t.false((await s.virsh('list', '--all', '--name')).stdout.includes(name), 'no domain was left');
  t.deepEqual(ns!.extraLinks(['br0', 'br1']), [], 'no device was left behind');
});

serial('libvirtd sees the broker at the default path; the host\'s /run is untouched', (t) => {
  const ours = inode(broker!.socket);
  t.truthy(ours);
  t.is(inode('/run/tapbroker/tapbroker.sock', session!.pid), ours, 'libvirtd\'s /run/tapbroker is the broker\'s dir');
  t.not(inode('/run/tapbroker/tapbroker.sock'), ours, 'the host\'s /run/tapbroker is not');
  t.deepEqual(hostMounts(), [], 'no mount of the test shows in the host\'s mount table');
  t.log(`host /run/tapbroker: ${fs.existsSync('/run/tapbroker') ? 'exists (not the test\'s)' : 'absent'}`);
});
