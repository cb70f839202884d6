// One unprivileged process driving many concurrent connections, well-behaved or not, for the load test.
// argv: SOCKET COUNT MISBEHAVING_SHARE; prints one JSON line of counts.
import fs from 'node:fs';
import { MAX_REPLY_BYTES, PROTOCOL_VERSION, SeqpacketConnection, decodeReply, encodeFrame } from '@tapbroker/protocol';
import { TapbrokerClient } from '@tapbroker/client';

const [socket, countText, shareText] = process.argv.slice(2) as [string, string, string];
const count = Number(countText);
const bad = Math.round(count * Number(shareText));
const counts = { granted: 0, refused: 0, failed: 0, slow: 0, dropped: 0, garbage: 0, fds: 0, errors: [] as string[] };

async function wellBehaved(): Promise<void> {
  try {
    const c = await TapbrokerClient.connect(socket);
    try {
      const tap = await c.createTap({ bridge: 'br0' });
      counts.granted++;
      await new Promise((r) => setTimeout(r, 50));
      for (const fd of tap.tapFds) fs.closeSync(fd);
    } finally {
      c.close();
    }
  } catch (err) {
    counts.failed++;
    if (counts.errors.length < 5) counts.errors.push((err as Error).message);
  }
}

async function raw(): Promise<SeqpacketConnection> {
  return SeqpacketConnection.connect(socket, { maxPacket: MAX_REPLY_BYTES });
}

const misbehave = [
  // Connects and says nothing: the hello timeout ends it.
  async () => { const c = await raw(); await c.receive(); c.close(); counts.slow++; },
  // Asks for a tap and vanishes before the reply.
  async () => { const c = await raw(); await c.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION })); await c.receive(); await c.send(encodeFrame({ op: 'create-tap', id: 2, bridge: 'br0' })); c.close(); counts.dropped++; },
  // Garbage, then reads the refusal.
  async () => { const c = await raw(); await c.send(Buffer.from('\xc1 not msgpack')); const p = await c.receive(); if (p) decodeReply(p.data); c.close(); counts.garbage++; },
  // Sends descriptors to the broker: refused by its socket (EPERM), or received and refused where the
  // kernel cannot refuse them at the socket.
  async () => {
    const c = await raw();
    const fd = fs.openSync('/dev/null', 'r');
    try {
      await c.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION }), [fd, fd]);
      await c.receive();
    } catch (err) {
      if ((err as { code?: string }).code !== 'EPERM') throw err;
    } finally {
      fs.closeSync(fd);
      c.close();
    }
    counts.fds++;
  },
];

const jobs: Array<Promise<void>> = [];
for (let i = 0; i < count; i++) {
  jobs.push(i < bad ? misbehave[i % misbehave.length]!().catch((e: Error) => { counts.errors.push(`misbehaving: ${e.message}`); }) : wellBehaved());
}
await Promise.all(jobs);
process.stdout.write(`${JSON.stringify(counts)}\n`);
