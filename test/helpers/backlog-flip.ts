// A holder who hides a MAC it took behind a backlog of harmless link events (an outside re-test's attack on the
// broker's memory of MACs taken): as the unprivileged user that runs it, it makes N+1 taps, sets taps 1..N to
// their own MAC again COUNT times each (a link event each, no change), gives tap 0 the MAC TAKE and its own
// back, and at once asks for a locked tap with TAKE. Prints {"error": code or null, "events": n}.
// argv: SOCKET BRIDGE N COUNT TAKE
import { sys } from '@tapbroker/protocol';
import { TapbrokerClient, TapbrokerError } from '@tapbroker/client';

const [socket, bridge, n, count, take] = process.argv.slice(2) as [string, string, string, string, string];
const client = await TapbrokerClient.connect(socket);
const taps = [];
for (let i = 0; i <= Number(n); i++) taps.push(await client.createTap({ bridge }));
const setMac = (fd: number, mac: string) => {
  // struct ifreq: ifr_hwaddr (a sockaddr) at 16: ARPHRD_ETHER, then the MAC.
  const ifr = Buffer.alloc(40);
  ifr.writeUInt16LE(1, 16);
  Buffer.from(mac.split(':').map((h) => parseInt(h, 16))).copy(ifr, 18);
  sys.ioctlPtr(fd, 0x8924 /* SIOCSIFHWADDR */, ifr);
};
let events = 0;
for (let k = 0; k < Number(count); k++) {
  for (const tap of taps.slice(1)) {
    setMac(tap.tapFds[0]!, tap.device.host_mac);
    events++;
  }
}
setMac(taps[0]!.tapFds[0]!, take);
setMac(taps[0]!.tapFds[0]!, taps[0]!.device.host_mac);
let error: string | null = null;
try {
  await client.createTap({ bridge, mac: take });
} catch (err) {
  error = err instanceof TapbrokerError ? err.code : String(err);
}
process.stdout.write(`${JSON.stringify({ error, events })}\n`);
client.close();
process.exit(0);
