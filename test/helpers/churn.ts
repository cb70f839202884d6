// A client that asks for taps as fast as it can and closes each at once, so the broker's own copies
// are the last: N grants on one connection; prints {"granted":…,"refused":{code:count}}.
import { TapbrokerClient, closeTap } from '@tapbroker/client';

const [socket, n, bridge] = process.argv.slice(2) as [string, string, string];
const client = await TapbrokerClient.connect(socket);
let granted = 0;
const refused: Record<string, number> = {};
for (let i = 0; i < Number(n); i++) {
  try {
    closeTap(await client.createTap({ bridge }));
    granted++;
  } catch (err) {
    const code = (err as { code?: string }).code ?? 'thrown';
    refused[code] = (refused[code] ?? 0) + 1;
  }
}
client.close();
process.stdout.write(`${JSON.stringify({ granted, refused })}\n`);
