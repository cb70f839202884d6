// Opens an existing tap by name the way libvirt does for managed='no' (TUNSETIFF, no IFF_TUN_EXCL),
// as whatever user runs it; prints {"ok":true} or {"ok":false,"code":"EPERM"}. The clone device is
// argv[4] when given: hosts give /dev/net/tun mode 0666 (udev), some test machines 0600, so tests
// make a 0666 node of their own (see tunNode in netns.ts) instead of changing the host's.
import fs from 'node:fs';
import { IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, TUNSETIFF, TUNSETPERSIST, tunIfreq } from '@tapbroker/broker/internal';
import { sys } from '@tapbroker/protocol';

const [name, mq, tun, hold] = process.argv.slice(2) as [string, string | undefined, string | undefined, string | undefined];
const fd = fs.openSync(tun ?? '/dev/net/tun', 'r+');
try {
  sys.ioctlPtr(fd, TUNSETIFF, tunIfreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (mq === 'mq' ? IFF_MULTI_QUEUE : 0)));
  // `persist`: make the device outlive every fd (TUNSETPERSIST, which its owner may do).
  if (hold === 'persist') sys.ioctlInt(fd, TUNSETPERSIST, 1);
  process.stdout.write(`${JSON.stringify({ ok: true })}\n`);
  // `hold`: keep the queue attached until killed (a racing attacker keeps what it won).
  if (hold === 'hold') await new Promise(() => setInterval(() => {}, 1000));
  // `send:MAC`: write one frame from that source MAC (a guest spoofing), say what the write did, and keep the
  // queue attached until killed (a tap with none attached has its carrier off, which flushes what was learned);
  // on each SIGUSR1, five more.
  if (hold?.startsWith('send:')) {
    const frame = Buffer.alloc(10 + 60).fill(0xff, 10, 16);
    Buffer.from(hold.slice(5).split(':').map((h) => parseInt(h, 16))).copy(frame, 16);
    frame.writeUInt16BE(0x88b5, 22);
    const send = (n: number) => {
      let wrote: number | string = 0;
      try {
        for (let i = 0; i < n; i++) wrote = fs.writeSync(fd, frame);
      } catch (err) {
        wrote = (err as NodeJS.ErrnoException).code ?? String(err);
      }
      process.stdout.write(`${JSON.stringify({ wrote })}\n`);
    };
    send(1);
    process.on('SIGUSR1', () => send(5));
    await new Promise(() => setInterval(() => {}, 1000));
  }
  // `flip:MAC`: give the tap that MAC and its own back (SIOCGIFHWADDR, then SIOCSIFHWADDR twice on its fd).
  if (hold?.startsWith('flip:')) {
    const ifr = Buffer.alloc(40);
    sys.ioctlPtr(fd, 0x8927 /* SIOCGIFHWADDR */, ifr);
    const own = Buffer.from(ifr.subarray(16, 24));
    ifr.writeUInt16LE(1, 16);
    Buffer.from(hold.slice(5).split(':').map((h) => parseInt(h, 16))).copy(ifr, 18);
    sys.ioctlPtr(fd, 0x8924 /* SIOCSIFHWADDR */, ifr);
    own.copy(ifr, 16);
    sys.ioctlPtr(fd, 0x8924 /* SIOCSIFHWADDR */, ifr);
    process.stdout.write(`${JSON.stringify({ flipped: true })}\n`);
    await new Promise(() => setInterval(() => {}, 1000));
  }
  // `flood`: toggle its offloads 700 times at once (TUNSETOFFLOAD: one link event each), as a flooding holder.
  if (hold === 'flood') for (let i = 0; i < 700; i++) sys.ioctlInt(fd, 0x400454d0, (i + 1) % 2);
} catch (err) {
  process.stdout.write(`${JSON.stringify({ ok: false, code: (err as sys.SyscallError).code })}\n`);
} finally {
  fs.closeSync(fd);
}
