// A connect/close flood for the benchmark (review A5): as many connections as it can open, each closed
// at once without a word, 32 at a time, until it is killed. Run as a uid no rule names.
import { MAX_REPLY_BYTES, SeqpacketConnection } from '@tapbroker/protocol';

const socket = process.argv[2]!;
let opened = 0;
async function worker(): Promise<void> {
  for (;;) {
    try {
      const c = await SeqpacketConnection.connect(socket, { maxPacket: MAX_REPLY_BYTES, connectTimeoutMs: 1000 });
      c.close();
      opened++;
    } catch {
      await new Promise((r) => setTimeout(r, 1));
    }
  }
}
setInterval(() => process.stdout.write(`${opened}\n`), 1000).unref();
await Promise.all(Array.from({ length: 32 }, worker));
