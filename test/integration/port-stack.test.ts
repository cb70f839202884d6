// A bridge port's own IP stack, closed to its guest (kernel.ts closePortStack). The bridge hands a frame sent to a
// link-local group address (01:80:c2:00:00:0X) to the port device itself, before any port lock and whatever its
// source MAC; an outside review's guest gave the host a default route through its tap with one router advertisement,
// and reached a host socket on the tap's interface from a spoofed MAC. A namespace with the kernel's IPv6 defaults
// (on, accepting router advertisements; DAD off so that an open stack takes them at once). Each frame goes into a
// bridge port and, the control, into a tap of a hook network (no bridge: its stack is the operator's and stays
// open): the control shows the frame is one the host takes, and when, since both are written together.
import anyTest, { type TestFn } from 'ava';
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { BrokerProcess } from '../helpers/broker.js';
import { Netns } from '../helpers/netns.js';
import { CLIENT_CLI } from '../helpers/broker.js';
import { NOBODY, OTHER_UID, probe, setprivArgs } from '../helpers/unpriv.js';
import { poll } from '../helpers/wait.js';

const test = anyTest as TestFn;

const POLICY = `
[network.routed]
hook = "/bin/true"

[[rule]]
name = "open"
users = [${NOBODY}]
bridges = ["br0"]
networks = ["routed"]
persistent = true

[[rule]]
name = "locked"
users = [${OTHER_UID}]
bridges = ["br0"]
mac_lock = true
`;

let ns: Netns;
let broker: BrokerProcess;

test.before(async () => {
  ns = Netns.create('stack');
  sysctl('net.ipv6.conf.all.disable_ipv6=0', 'net.ipv6.conf.default.disable_ipv6=0',
    'net.ipv6.conf.default.accept_ra=1', 'net.ipv6.conf.all.forwarding=0', 'net.ipv6.conf.default.dad_transmits=0',
    'net.ipv6.conf.default.accept_dad=0');
  ns.bridge('br0', { mcastSnooping: false, address: '10.77.0.1/24' });
  broker = await BrokerProcess.start(ns, POLICY, { tag: 'stack' });
});

test.after.always(async () => {
  await broker?.stop();
  ns?.destroy();
});

const inNs = (...argv: string[]) => execFileSync('ip', ['netns', 'exec', ns.name, ...argv], { encoding: 'utf8' });
const sysctl = (...settings: string[]) => inNs('sysctl', '-q', '-w', ...settings);

function spawnIn(argv: string[]): ChildProcess {
  return spawn('ip', ['netns', 'exec', ns.name, ...argv], { stdio: ['ignore', 'pipe', 'pipe'] });
}

const readConf = (family: string, dev: string, key: string) =>
  inNs('cat', `/proc/sys/net/${family}/conf/${dev}/${key}`).trim();

/** `tapbroker run` as uid 65534 with NICs `nets`, its command `python3 -c SCRIPT ARGS…` (a guest): how it went. */
const runGuest = (nets: string[], script: string, ...args: string[]) => spawnSync('setpriv', [...setprivArgs(),
  process.execPath, CLIENT_CLI, 'run', '--socket', broker.socket, ...nets.flatMap((n) => ['--net', n]), '--', 'python3',
  '-c', script, ...args], { encoding: 'utf8', timeout: 30_000 });

/** A persistent device uid 65534 asks for (`request`): its name, its probe let go. */
async function persistentTap(request: { bridge: string } | { network: string }): Promise<string> {
  const made = await probe({ socket: broker.socket, requests: [{ ...request, persistent: true }] }, { uid: NOBODY });
  await made.release();
  return made.result.taps[0]!.device.name;
}

/** The broker started again as the file's tests run it, and uid 65534's device `name` released. */
async function restartAndRelease(name: string): Promise<void> {
  await broker.stop('SIGTERM', true);
  broker = await BrokerProcess.start(ns, POLICY, { dir: broker.dir });
  await (await probe({ socket: broker.socket, release: [name] }, { uid: NOBODY })).release();
}

/** Internet checksum of `b`. */
function checksum(b: Buffer): number {
  let sum = 0;
  for (let i = 0; i < b.length; i += 2) sum += (b[i]! << 8) + (b[i + 1] ?? 0);
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

const SPOOFED = '525400000099';

/** An IPv6 router advertisement from fe80::bad to ff02::1 (default route, prefix 2001:db8:bad::/64), to :0e. */
function routerAdvertisement(): string {
  const ip6 = (s: string) => Buffer.from(s.padEnd(32, '0'), 'hex');
  const src = Buffer.from('fe800000000000000000000000000bad', 'hex');
  const dst = Buffer.from('ff020000000000000000000000000001', 'hex');
  const pio = Buffer.alloc(32);
  pio.writeUInt8(3, 0); pio.writeUInt8(4, 1); pio.writeUInt8(64, 2); pio.writeUInt8(0xc0, 3);
  pio.writeUInt32BE(86400, 4); pio.writeUInt32BE(14400, 8);
  ip6('20010db80bad').copy(pio, 16);
  const icmp = Buffer.concat([Buffer.from([134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0]), pio]);
  const pseudo = Buffer.concat([src, dst, Buffer.from([0, 0, 0, icmp.length, 0, 0, 0, 58])]);
  icmp.writeUInt16BE(checksum(Buffer.concat([pseudo, icmp])), 2);
  const hdr = Buffer.from([0x60, 0, 0, 0, 0, icmp.length, 58, 255]);
  return `0180c200000e${SPOOFED}86dd${Buffer.concat([hdr, src, dst, icmp]).toString('hex')}`;
}

/** A UDP datagram from 10.77.0.99 to `to`:7777 ("tb-port-stack"), to the link-local group `group`. */
function udp(to: string, group: string): string {
  const payload = Buffer.from('tb-port-stack');
  const u = Buffer.alloc(8);
  u.writeUInt16BE(40000, 0); u.writeUInt16BE(7777, 2); u.writeUInt16BE(8 + payload.length, 4);
  const ip = Buffer.alloc(20);
  ip.writeUInt8(0x45, 0); ip.writeUInt16BE(20 + 8 + payload.length, 2); ip.writeUInt8(64, 8); ip.writeUInt8(17, 9);
  Buffer.from([10, 77, 0, 99]).copy(ip, 12);
  Buffer.from(to.split('.').map(Number)).copy(ip, 16);
  ip.writeUInt16BE(checksum(ip), 10);
  return `0180c20000${group}${SPOOFED}0800${Buffer.concat([ip, u, payload]).toString('hex')}`;
}

/** A UDP listener on *:7777 in the namespace: the ifindex each datagram came in on. */
async function listener(): Promise<{ ifindexes: number[]; stop(): void }> {
  const py = 'import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n'
    + 's.setsockopt(socket.SOL_SOCKET,socket.SO_BROADCAST,1)\ns.setsockopt(socket.IPPROTO_IP,8,1)\n'
    + 's.bind(("0.0.0.0",7777))\nprint("ready",flush=True)\nwhile True:\n'
    + ' d,a,_,_=s.recvmsg(64,64)\n import struct\n print(struct.unpack_from("i",a[0][2])[0],flush=True)\n';
  const child = spawnIn(['python3', '-c', py]);
  const ifindexes: number[] = [];
  let out = '';
  let ready = false;
  child.stdout!.on('data', (d) => {
    out += d;
    const lines = out.split('\n');
    out = lines.pop()!;
    for (const l of lines) if (l === 'ready') ready = true; else ifindexes.push(Number(l));
  });
  await poll(() => ready, { ms: 5000 });
  return { ifindexes, stop: () => child.kill('SIGKILL') };
}

/** A bridge port and a hook network's tap, the same frame written into each (the port's first). */
async function both(frame: string) {
  const p = await probe({
    socket: broker.socket, write: true, writeRaw: frame, requests: [{ bridge: 'br0' }, { network: 'routed' }],
  }, { uid: NOBODY });
  if (p.result.error !== null) throw new Error(`probe failed: ${JSON.stringify(p.result.error)}`);
  const [port, control] = p.result.taps.map((t) => t.device);
  return { p, port: port!, control: control! };
}

test.serial('a router advertisement a guest sends to a link-local group gives the host no route', async (t) => {
  const { p, port, control } = await both(routerAdvertisement());
  try {
    const routes = () => ns.ip('-6', 'route', 'show');
    await poll(() => routes().includes(`dev ${control.name}`) && routes().includes('fe80::bad'), { ms: 3000 });
    t.regex(routes(), new RegExp(`default via fe80::bad dev ${control.name}`), 'the control: an open stack takes it');
    t.notRegex(routes(), new RegExp(`dev ${port.name}`), 'nothing routes through the bridge port');
    t.is(ns.ip('-6', 'addr', 'show', 'dev', port.name).trim(), '', 'the port has no IPv6 address');
  } finally {
    await p.release();
  }
});

test.serial('a datagram from a spoofed MAC to a link-local group reaches no host socket through a port', async (t) => {
  const l = await listener();
  try {
    for (const [to, group] of [['10.77.0.1', '03'], ['255.255.255.255', '0e']] as const) {
      const { p, port, control } = await both(udp(to, group));
      try {
        await poll(() => l.ifindexes.includes(control.ifindex), { ms: 3000 });
        t.false(l.ifindexes.includes(port.ifindex), `${to}: nothing came in through the bridge port`);
      } finally {
        await p.release();
      }
    }
  } finally {
    l.stop();
  }
});

test.serial('every port the broker makes has its stack closed, locked or not, and a hook network\'s tap is left open',
  async (t) => {
    const locked = await probe({ socket: broker.socket, requests: [{ bridge: 'br0' }] }, { uid: OTHER_UID });
    const { p, port, control } = await both(udp('10.77.0.1', '03'));
    try {
      const lockedPort = locked.result.taps[0]!.device;
      t.true(lockedPort.locked);
      for (const dev of [port.name, lockedPort.name]) {
        t.is(readConf('ipv6', dev, 'disable_ipv6'), '1', `${dev}: IPv6 off`);
        t.is(readConf('ipv4', dev, 'drop_unicast_in_l2_multicast'), '1', `${dev}: unicast in multicast dropped`);
        t.is(readConf('ipv4', dev, 'rp_filter'), '1', `${dev}: sources checked strictly`);
        t.is(readConf('ipv4', dev, 'arp_ignore'), '8', `${dev}: no ARP answered`);
      }
      t.is(readConf('ipv6', control.name, 'disable_ipv6'), '0', 'a tap on no bridge is the operator\'s');
    } finally {
      await p.release();
      await locked.release();
    }
  });

test.serial('a persistent port an earlier version left open is closed at the next start', async (t) => {
  const name = await persistentTap({ bridge: 'br0' });
  try {
    t.is(readConf('ipv6', name, 'disable_ipv6'), '1');
    await broker.stop('SIGTERM', true);
    try {
      sysctl(`net.ipv6.conf.${name}.disable_ipv6=0`, `net.ipv4.conf.${name}.rp_filter=0`);
    } finally {
      broker = await BrokerProcess.start(ns, POLICY, { dir: broker.dir });
    }
    t.is(readConf('ipv6', name, 'disable_ipv6'), '1', 'IPv6 off again');
    t.is(readConf('ipv4', name, 'rp_filter'), '1', 'strict again');
  } finally {
    const r = await probe({ socket: broker.socket, release: [name] }, { uid: NOBODY });
    await r.release();
  }
});

// Found by an outside re-test: a broker that could not write the IPv6 sysctl at its start skipped the IPv4 settings of
// the ports it took back too. Here /proc/sys is read-only to it (a bind in its own mount namespace, as a unit that
// hides it would): IPv4 is closed again over netlink, the sysctl's failure is said, and a new port is refused.
const RO_PROC_SYS = ['unshare', '-m', '--propagation', 'private', 'sh', '-c',
  'mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec "$@"', 'sh'];

test.serial('a broker that cannot turn IPv6 off still closes IPv4 on the ports it takes back, and refuses new ones',
  async (t) => {
    const name = await persistentTap({ bridge: 'br0' });
    const before = ns.extraLinks([]).length;
    try {
      await broker.stop('SIGTERM', true);
      sysctl(`net.ipv4.conf.${name}.rp_filter=0`, `net.ipv4.conf.${name}.arp_ignore=0`);
      broker = await BrokerProcess.start(ns, POLICY, { dir: broker.dir, wrap: RO_PROC_SYS });
      t.is(readConf('ipv4', name, 'rp_filter'), '1', 'IPv4 closed again');
      t.is(readConf('ipv4', name, 'arp_ignore'), '8');
      t.regex(broker.stderr, new RegExp(`warning: cannot turn IPv6 off on port \`${name}'`));
      const refused = await probe({ socket: broker.socket, requests: [{ bridge: 'br0' }] }, { uid: NOBODY });
      await refused.release();
      t.like(refused.result.error, { code: 'TB_E_KERNEL' });
      t.regex(refused.result.error?.hint ?? '', /ReadWritePaths=-\/proc\/sys\/net\/ipv6\/conf/);
      await poll(() => ns.extraLinks([]).length === before, { ms: 3000 });
      t.is(ns.extraLinks([]).length, before, 'nothing left of the refused port');
    } finally {
      await restartAndRelease(name);
    }
  });

// Found by an outside re-test: a guest's ARP probe (sender 0.0.0.0, from a spoofed MAC, to a link-local group) was
// answered on the port for any of the host's addresses. The guest writes one into each of its two NICs (the port, then
// the control) and counts the replies each gets; the port's would be queued before the control's.
const ARP_GUEST = `
import fcntl, json, os, re, select, struct, sys, time
fds = [int(m) for a in sys.argv[1:] for m in re.findall(r'[,=]fds?=(\\d+)', a)]
def off(fd):
    ifr = bytearray(40); fcntl.ioctl(fd, 0x800454d2, ifr)
    return 10 if struct.unpack_from('<H', ifr, 16)[0] & 0x4000 else 0
hdr = {fd: off(fd) for fd in fds}
smac = bytes.fromhex('${SPOOFED}'); host = bytes([10, 77, 0, 1])
arp = b'\\x08\\x06' + struct.pack('!HHBBH', 1, 0x0800, 6, 4, 1)
probe = bytes.fromhex('0180c200000e') + smac + arp + smac + bytes(10) + host
for fd in fds: os.write(fd, bytes(hdr[fd]) + probe)
got = {fd: 0 for fd in fds}
end = time.time() + 5
while time.time() < end and got[fds[-1]] == 0:
    for fd in select.select(fds, [], [], 0.05)[0]:
        b = os.read(fd, 65535)[hdr[fd]:]
        if b[12:14] == b'\\x08\\x06' and b[20:22] == b'\\x00\\x02' and b[28:32] == host: got[fd] += 1
for fd in select.select(fds, [], [], 0)[0]:
    b = os.read(fd, 65535)[hdr[fd]:]
    if b[12:14] == b'\\x08\\x06' and b[20:22] == b'\\x00\\x02' and b[28:32] == host: got[fd] += 1
print(json.dumps([got[fd] for fd in fds]), flush=True)
`;

test.serial('a guest\'s ARP probe to a link-local group is not answered on its port', (t) => {
  const r = runGuest(['bridge=br0,model=none', 'network=routed,model=none'], ARP_GUEST);
  t.is(r.status, 0, r.stderr);
  const [port, control] = JSON.parse(r.stdout.trim().split('\n').pop()!) as number[];
  t.true(control! > 0, 'the control: an open stack answers');
  t.is(port, 0, 'the port does not');
});

// Found by an outside re-test: writing net.ipv6.conf.all.disable_ipv6 sets every device's, and 1 then 0 opened every
// port again. The address the kernel gives a reopened port is seen, and the port closed again.
test.serial('a port whose IPv6 the host turned on again (all.disable_ipv6 1, then 0) is closed again', async (t) => {
  const p = await probe({ socket: broker.socket, requests: [{ bridge: 'br0' }] }, { uid: NOBODY });
  const port = p.result.taps[0]!.device;
  try {
    t.is(readConf('ipv6', port.name, 'disable_ipv6'), '1');
    // Duplicate address detection stretched to an hour on the port, as a guest's router advertisements can (an outside
    // audit): its address stays tentative, and the broker must not wait for it.
    sysctl(`net.ipv6.conf.${port.name}.accept_dad=1`, `net.ipv6.conf.${port.name}.dad_transmits=1`,
      `net.ipv6.neigh.${port.name}.retrans_time_ms=3600000`);
    sysctl('net.ipv6.conf.all.disable_ipv6=1');
    sysctl('net.ipv6.conf.all.disable_ipv6=0');
    await broker.record((r) => r.decision === 'reconcile' && (r.device as { name?: string }).name === port.name
      && /IPv6 came on again on its port/.test(r.message ?? ''), 5000);
    t.is(readConf('ipv6', port.name, 'disable_ipv6'), '1', 'turned off again');
    await poll(() => ns.ip('-6', 'addr', 'show', 'dev', port.name).trim() === '', { ms: 2000 });
    t.is(ns.ip('-6', 'addr', 'show', 'dev', port.name).trim(), '', 'and its address gone');
  } finally {
    sysctl('net.ipv6.conf.all.disable_ipv6=0');
    await p.release();
  }
});

// Found by an outside audit: news of IPv6 coming up that the kernel dropped (its queue for them overran) were never
// made up. Here the broker is stopped while the host turns the bridge's IPv6 off and on 300 times (a notice each),
// then every device's: the queue overruns, the last notices (the port reopened) are the ones lost, and the broker,
// told of the loss, looks at every port.
test.serial('a port reopened while its notice was lost in an overrun is found and closed again', async (t) => {
  const p = await probe({ socket: broker.socket, requests: [{ bridge: 'br0' }] }, { uid: NOBODY });
  const port = p.result.taps[0]!.device;
  const pid = broker.proc.pid!;
  try {
    process.kill(pid, 'SIGSTOP');
    try {
      // The bridge's own IPv6 turned off and on first, to fill the queue; then every device's, the port's included.
      inNs('sh', '-c', 'c=/proc/sys/net/ipv6/conf; for i in $(seq 300); do echo 1 > $c/br0/disable_ipv6; '
        + 'echo 0 > $c/br0/disable_ipv6; done; echo 1 > $c/all/disable_ipv6; echo 0 > $c/all/disable_ipv6');
      t.is(readConf('ipv6', port.name, 'disable_ipv6'), '0', 'reopened while the broker was stopped');
    } finally {
      process.kill(pid, 'SIGCONT');
    }
    await broker.record((r) => r.decision === 'reconcile' && (r.device as { name?: string }).name === port.name
      && /IPv6 came on again on its port/.test(r.message ?? ''), 10_000);
    t.is(readConf('ipv6', port.name, 'disable_ipv6'), '1', 'turned off again');
    t.true(brokerNetlink().some((l) => l.groups === RTMGRP_IPV6_IFINFO && l.drops > 0), 'the notices overran');
  } finally {
    sysctl('net.ipv6.conf.all.disable_ipv6=0');
    await p.release();
  }
});

// Found by an outside audit: IPv6 news read with the link events let a guest overrun that queue by flooding the host's
// bridge with router advertisements of 16 prefixes (an address event each): 39 resyncs in 6 s, each a dump and every
// lease judged. A guest floods its bridge so for 3 s; the link events lose nothing, and the broker serves on.
const RA_FLOOD = `
import fcntl, os, re, struct, sys, time
fd = [int(m) for a in sys.argv[3:] for m in re.findall(r'[,=]fds?=(\\d+)', a)][0]
ifr = bytearray(40); fcntl.ioctl(fd, 0x800454d2, ifr)
hdr = bytes(10 if struct.unpack_from('<H', ifr, 16)[0] & 0x4000 else 0)
mac = bytes.fromhex(sys.argv[1])
src = bytes.fromhex('fe800000000000000000000000000bad'); dst = bytes.fromhex('ff020000000000000000000000000001')
pios = b''.join(struct.pack('!BBBBIII', 3, 4, 64, 0xc0, 86400, 14400, 0) + bytes.fromhex('20010db8%04x' % i) + bytes(10)
                for i in range(16))
# 'prefixes': one advertisement of 16 prefixes; 'flags': four of none, flipping the M and O flags in turn.
kinds = [(0, pios)] if sys.argv[2] == 'prefixes' else [(f, b'') for f in (0x80, 0x40, 0xc0, 0x00)]
frames = []
for flags, opts in kinds:
    body = struct.pack('!BBHBBHII', 134, 0, 0, 64, flags, 0, 0, 0) + opts
    pseudo = src + dst + struct.pack('!I3xB', len(body), 58) + body
    cs = sum(struct.unpack('!%dH' % (len(pseudo) // 2), pseudo))
    while cs >> 16: cs = (cs & 0xffff) + (cs >> 16)
    body = body[:2] + struct.pack('!H', ~cs & 0xffff) + body[4:]
    ip6 = struct.pack('!IHBB', 0x60000000, len(body), 58, 255) + src + dst
    frames.append(hdr + bytes.fromhex('333300000001') + mac + b'\\x86\\xdd' + ip6 + body)
end = time.time() + 3; sent = 0
while time.time() < end:
    try:
        os.write(fd, frames[sent % len(frames)]); sent += 1
    except BlockingIOError:
        time.sleep(0.0005)
print(sent, flush=True)
`;

test.serial('a guest flooding its bridge with router advertisements costs the link events nothing', (t) => {
  const mac = '52:54:00:77:00:01';
  const before = broker.stderr.split('link events were lost').length;
  const r = runGuest([`bridge=br0,model=none,mac=${mac}`], RA_FLOOD, mac.replace(/:/g, ''), 'prefixes');
  t.is(r.status, 0, r.stderr);
  t.true(Number(r.stdout.trim()) > 1000, `the flood was sent: ${r.stdout}`);
  t.true(/2001:db8/.test(ns.ip('-6', 'addr', 'show', 'dev', 'br0')), 'the bridge took its prefixes: events were sent');
  t.is(broker.stderr.split('link events were lost').length, before, 'no link event was lost');
  // The kernel's own word: the broker's link-event socket listens to link events alone, nothing was dropped from it,
  // and IPv6's news come on another.
  const groups = brokerNetlink().map((l) => l.groups);
  t.true(groups.includes(RTMGRP_LINK), groups.join(' '));
  t.true(groups.includes(RTMGRP_IPV6_IFINFO), groups.join(' '));
  t.is(brokerNetlink().find((l) => l.groups === RTMGRP_LINK)?.drops, 0);
});

const RTMGRP_LINK = 0x1;
const RTMGRP_IPV6_IFINFO = 0x800;

/** The broker's rtnetlink sockets that listen to groups, as /proc/PID/net/netlink shows them. */
function brokerNetlink(): Array<{ groups: number; drops: number }> {
  const pid = broker.proc.pid!;
  const inodes = new Set(fs.readdirSync(`/proc/${pid}/fd`).map((fd) => {
    try {
      return /^socket:\[(\d+)\]$/.exec(fs.readlinkSync(`/proc/${pid}/fd/${fd}`))?.[1];
    } catch {
      return undefined;
    }
  }).filter((i) => i !== undefined));
  const rows = fs.readFileSync(`/proc/${pid}/net/netlink`, 'utf8').trim().split('\n').slice(1);
  return rows.map((l) => l.trim().split(/\s+/))
    .filter((c) => c[1] === '0' && inodes.has(c[9]!) && c[3] !== '00000000')
    .map((c) => ({ groups: parseInt(c[3]!, 16), drops: Number(c[8]) }));
}

// Found by an outside re-test: a guest's router advertisements flipping its bridge's M/O flags make one notice each on
// the IPv6 socket, and the broker read every one (70 % of a core while it lasted). Past IPV6_FLOOD a second, the socket
// is left unread for a while and every port looked at once instead. What is counted is the broker's CPU time
// (/proc/PID/stat), not how long anything took.
test.serial('a guest flipping its bridge\'s router flags with advertisements costs the broker little', (t) => {
  const mac = '52:54:00:77:00:02';
  const cpu = () => fs.readFileSync(`/proc/${broker.proc.pid!}/stat`, 'utf8').split(') ')[1]!.split(' ').slice(11, 13)
    .reduce((a, b) => a + Number(b), 0);
  const [c0, t0] = [cpu(), performance.now()];
  const r = runGuest([`bridge=br0,model=none,mac=${mac}`], RA_FLOOD, mac.replace(/:/g, ''), 'flags');
  const share = ((cpu() - c0) * 10) / (performance.now() - t0); // clock ticks of 10 ms
  t.is(r.status, 0, r.stderr);
  t.true(Number(r.stdout.trim()) > 10_000, `the flood was sent: ${r.stdout}`);
  t.true(share < 0.3, `the broker used ${(share * 100).toFixed(0)} % of a core during the flood`);
});

// Found by an outside re-test: a port taken off its bridge had its reopening skipped, and put back, stayed open.
test.serial('a port off its bridge whose IPv6 the host turned on again is closed again, and stays so once back',
  async (t) => {
    const p = await probe({ socket: broker.socket, requests: [{ bridge: 'br0' }] }, { uid: NOBODY });
    const port = p.result.taps[0]!.device;
    try {
      ns.ip('link', 'set', 'dev', port.name, 'nomaster');
      sysctl('net.ipv6.conf.all.disable_ipv6=1');
      sysctl('net.ipv6.conf.all.disable_ipv6=0');
      await broker.record((r) => r.decision === 'reconcile' && (r.device as { name?: string }).name === port.name
        && /IPv6 came on again on its port/.test(r.message ?? ''), 5000);
      t.is(readConf('ipv6', port.name, 'disable_ipv6'), '1', 'closed off its bridge');
      ns.ip('link', 'set', 'dev', port.name, 'master', 'br0');
      t.is(readConf('ipv6', port.name, 'disable_ipv6'), '1', 'and back on it');
    } finally {
      sysctl('net.ipv6.conf.all.disable_ipv6=0');
      await p.release();
    }
  });

// Found by an outside re-test: a hook network's tap whose lease was taken back from its tag (the lease table lost)
// after its network left the policy has no plug, and was closed as a bridge port: the routed guest lost its host
// addresses. Such a tap, on no bridge, is left as it is.
test.serial('a hook network\'s tap taken back from its tag, its network gone from the policy, keeps its stack',
  async (t) => {
    const name = await persistentTap({ network: 'routed' });
    const without = POLICY.replace('[network.routed]\nhook = "/bin/true"\n', '').replace('networks = ["routed"]\n', '');
    try {
      t.is(readConf('ipv6', name, 'disable_ipv6'), '0', 'the operator\'s');
      await broker.stop('SIGTERM', true);
      fs.rmSync(path.join(broker.dir, 'state', 'leases.json'));
      broker = await BrokerProcess.start(ns, without, { dir: broker.dir });
      await broker.waitFor(() => /lease taken back from the device's tag/.test(broker.stderr), 3000, 'not taken back');
      t.is(readConf('ipv6', name, 'disable_ipv6'), '0', 'still the operator\'s');
      t.is(readConf('ipv4', name, 'arp_ignore'), '0');
    } finally {
      await restartAndRelease(name);
    }
  });
