// A macvtap holder that passes its connection on and exits: it asks for a macvtap on argv[3], hands its
// connection (not CLOEXEC in the child) to a `sleep` that outlives it, prints {"name":…}, and exits.
import { spawn } from 'node:child_process';
import { TapbrokerClient, closeTap } from '@tapbroker/client';

const [socket, parent] = process.argv.slice(2) as [string, string];
const client = await TapbrokerClient.connect(socket);
const tap = await client.createMacvtap({ parent });
closeTap(tap);
const fd = (client as unknown as { conn: { fd: number } }).conn.fd;
spawn('sleep', ['4'], { stdio: ['ignore', 'ignore', 'ignore', fd], detached: true }).unref();
process.stdout.write(`${JSON.stringify({ name: tap.device.name })}\n`);
process.exit(0);
