// The unprivileged side of integration tests, run as its own process under an unprivileged uid:
// asks the broker for taps, proves each fd works by writing a frame, prints one JSON line, then
// holds the fds until its stdin closes.
import fs from 'node:fs';
import { TapbrokerClient, TapbrokerError, type Tap, type TapOptions } from '@tapbroker/client';

export interface ProbeArgs {
  socket: string;
  requests: TapOptions[];
  /** Write one Ethernet frame into every tap fd. */
  write?: boolean;
}

export interface ProbeResult {
  uid: number;
  taps: Array<{ device: Tap['device']; tapFds: number; vhostFds: number; written: number[] }>;
  error: { code: string; message: string; rule?: string; hint?: string } | null;
}

/** virtio_net_hdr (10 bytes, all zero) + a broadcast frame with a local experimental ethertype. */
export function testFrame(srcMac: string): Buffer {
  const frame = Buffer.alloc(10 + 60);
  frame.fill(0xff, 10, 16);
  Buffer.from(srcMac.split(':').map((h) => parseInt(h, 16))).copy(frame, 16);
  frame.writeUInt16BE(0x88b5, 22);
  frame.write('tapbroker probe', 24);
  return frame;
}

async function main(): Promise<void> {
  const args = JSON.parse(process.argv[2]!) as ProbeArgs;
  const result: ProbeResult = { uid: process.getuid!(), taps: [], error: null };
  const held: Tap[] = [];
  try {
    const client = await TapbrokerClient.connect(args.socket);
    try {
      for (const r of args.requests) {
        const tap = await client.createTap(r);
        held.push(tap);
        const written = args.write ? tap.tapFds.map((fd) => fs.writeSync(fd, testFrame(tap.device.mac))) : [];
        result.taps.push({ device: tap.device, tapFds: tap.tapFds.length, vhostFds: tap.vhostFds.length, written });
      }
    } finally {
      client.close();
    }
  } catch (err) {
    if (!(err instanceof TapbrokerError)) throw err;
    result.error = { code: err.code, message: err.message, ...(err.rule ? { rule: err.rule } : {}), ...(err.hint ? { hint: err.hint } : {}) };
  }
  process.stdout.write(`${JSON.stringify(result)}\n`);
  process.stdin.resume();
  process.stdin.on('end', () => process.exit(0));
}

void main();
