// A real AF_UNIX datagram socket for tests: stands in for journald and for systemd's NOTIFY_SOCKET.
import fs from 'node:fs';
import { sys, watchReadable } from '@tapbroker/protocol';
import { until } from './wait.js';

export class DatagramSink {
  readonly messages: Buffer[] = [];
  private readonly fd: number;
  private readonly watch: { close(): void };
  private readonly rx = new sys.Receiver(256 * 1024);

  constructor(readonly path: string) {
    this.fd = sys.socket(sys.AF_UNIX, sys.SOCK_DGRAM | sys.SOCK_NONBLOCK | sys.SOCK_CLOEXEC);
    sys.bind(this.fd, sys.sockaddrUn(path));
    fs.chmodSync(path, 0o666);
    this.watch = watchReadable(this.fd, () => {
      for (;;) {
        const m = this.rx.recv(this.fd, sys.MSG_DONTWAIT);
        if (m === null) return;
        this.messages.push(Buffer.from(m.data));
      }
    });
  }

  texts(): string[] {
    return this.messages.map((m) => m.toString('utf8'));
  }

  async waitFor(pred: (texts: string[]) => boolean, ms = 3000): Promise<void> {
    await until(() => pred(this.texts()), { ms, what: 'no matching datagram', detail: () => `got:\n${this.texts().join('\n---\n')}` });
  }

  close(): void {
    this.watch.close();
    sys.close(this.fd);
    fs.rmSync(this.path, { force: true });
  }
}

/** journald's native format read back: [KEY, value] in order, in both forms (KEY=value; KEY, length, bytes). */
export function journalEntries(msg: Buffer): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  let o = 0;
  while (o < msg.length) {
    const nl = msg.indexOf(0x0a, o);
    const line = msg.toString('utf8', o, nl);
    const eq = line.indexOf('=');
    if (eq >= 0) {
      out.push([line.slice(0, eq), line.slice(eq + 1)]);
      o = nl + 1;
    } else {
      const len = Number(msg.readBigUInt64LE(nl + 1));
      out.push([line, msg.toString('utf8', nl + 9, nl + 9 + len)]);
      if (msg[nl + 9 + len] !== 0x0a) throw new Error(`${line}: no newline after its ${len} bytes`);
      o = nl + 9 + len + 1;
    }
  }
  return out;
}

/** The same as a map (the last value of a key). */
export function journalFields(msg: Buffer): Map<string, string> {
  return new Map(journalEntries(msg));
}
