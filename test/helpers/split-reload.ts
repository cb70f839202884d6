// A VM's NICs made in several requests while root reloads the policy between them. Run as an unprivileged uid:
//   node split-reload.js SOCKET NETWORK COUNT
// Asks for COUNT NICs on NETWORK with TapbrokerClient.createNics. After each attempt's first request (the client
// sends at most 32 NICs a request) it prints `between` and waits for a line on stdin: the test reloads the policy
// meanwhile. This is the one place where the test steps into the client (its private createBatch): a reload that
// lands between two of its requests cannot otherwise be timed for certain. Then it prints one JSON line
// {parents, code, retries} (the bridges of the NICs it holds, or the refusal's code) and holds the fds until stdin closes.
import readline from 'node:readline';
import { TapbrokerClient } from '@tapbroker/client';
import { TapbrokerError } from '@tapbroker/protocol';

const [socket, network, count] = process.argv.slice(2) as [string, string, string];
const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const client = await TapbrokerClient.connect(socket);
const inner = client as unknown as { createBatch(nics: unknown[]): Promise<unknown[]> };
const createBatch = inner.createBatch.bind(client);
let sent = 0;
inner.createBatch = async (nics) => {
  const got = await createBatch(nics);
  if (sent++ % 2 === 0) {
    process.stdout.write('between\n');
    await lines.next();
  }
  return got;
};
let out: { parents: string[]; code: string | null; retries: string[] };
const retries: string[] = [];
try {
  const nics = Array.from({ length: Number(count) }, () => ({ kind: 'tap' as const, network }));
  const taps = await client.createNics(nics, { onRetry: (why) => void retries.push(why) });
  out = { parents: taps.map((t) => t.device.parent), code: null, retries };
} catch (err) {
  out = { parents: [], code: err instanceof TapbrokerError ? err.code : String(err), retries };
}
process.stdout.write(`${JSON.stringify(out)}\n`);
await lines.next();
client.close();
process.exit(0);
