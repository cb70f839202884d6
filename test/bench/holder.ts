// A client process that holds taps granted by the broker, driven by JSON lines on stdin:
//   {"cmd":"take","n":N,"bridge":"br1"}  → N grants on one connection, fds kept; replies {"held":…,"ms":[…]}
//   {"cmd":"close"}                       → closes every held fd at once (libuv pool; size it with
//                                           UV_THREADPOOL_SIZE) and replies {"closeMs":…} when all returned
// It exits when stdin ends. Usage: node holder.js SOCKET
import { TapbrokerClient } from '@tapbroker/client';
import { closeAll, now, onLines } from './common.js';

const socket = process.argv[2]!;
const fds: number[] = [];
let client: TapbrokerClient | null = null;
let queue = Promise.resolve();

function reply(obj: unknown): void {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

async function handle(cmd: { cmd: string; n?: number; bridge?: string }): Promise<void> {
  if (cmd.cmd === 'take') {
    client ??= await TapbrokerClient.connect(socket);
    const ms: number[] = [];
    for (let i = 0; i < cmd.n!; i++) {
      const t0 = now();
      const tap = await client.createTap({ bridge: cmd.bridge! });
      ms.push(now() - t0);
      fds.push(...tap.tapFds);
    }
    reply({ held: fds.length, ms });
  } else if (cmd.cmd === 'close') {
    const t0 = now();
    await closeAll(fds.splice(0));
    reply({ closeMs: now() - t0 });
  } else {
    throw new Error(`unknown command ${cmd.cmd}`);
  }
}

onLines(process.stdin, (line) => {
  queue = queue.then(() => handle(JSON.parse(line) as { cmd: string })).catch((err: Error) => {
    reply({ error: err.message });
  });
});
process.stdin.on('end', () => void queue.then(() => process.exit(0)));
reply({ ready: true, pid: process.pid });
