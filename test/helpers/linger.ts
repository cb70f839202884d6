// An attacker for the fds-pushed-at-the-broker class, run as an unprivileged uid inside the test's
// namespace: it makes TCP sockets whose close() blocks (SO_LINGER 30 s, unsent data, a peer that never
// reads: connections left unaccepted on a listener of its own), pushes them at the broker among copies
// of /dev/null (lingering ones last, where a short control buffer makes the kernel release them inside
// the broker's recvmsg), closes its own copies so the broker's would be the last, prints one JSON line,
// and holds the listener until its stdin closes.
//   node linger.js SOCKET LINGERING COPIES MODE [FILE]   MODE: hello | behind (after a frame refused pre-hello)
//   | empty (after an empty packet, which the broker takes for the end of the connection: the lingering
//   sockets are closed here at once, before the broker reads it);
//   COPIES of FILE (default /dev/null) go before the lingering sockets.
import fs from 'node:fs';
import { MAX_REPLY_BYTES, PROTOCOL_VERSION, SeqpacketConnection, decodeReply, encodeFrame, sys } from '@tapbroker/protocol';

const [socket, lingering, nulls, mode, copied] = process.argv.slice(2) as [string, string, string, 'hello' | 'behind' | 'empty', string | undefined];
const AF_INET = 2;
const SOCK_STREAM = 1;
const SO_LINGER = 13;

function inet(port: number): Buffer {
  const sa = Buffer.alloc(16);
  sa.writeUInt16LE(AF_INET, 0);
  sa.writeUInt16BE(port, 2);
  Buffer.from([127, 0, 0, 1]).copy(sa, 4);
  return sa;
}

const port = 20000 + Math.floor(Math.random() * 20000);
const listener = sys.socket(AF_INET, SOCK_STREAM | sys.SOCK_CLOEXEC);
sys.bind(listener, inet(port));
sys.listen(listener, 64);

const stuck: number[] = [];
for (let i = 0; i < Number(lingering); i++) {
  const s = sys.socket(AF_INET, SOCK_STREAM | sys.SOCK_CLOEXEC);
  sys.connect(s, inet(port));
  sys.fcntlSet(s, sys.F_SETFL, sys.fcntlGet(s, sys.F_GETFL) | sys.O_NONBLOCK);
  const chunk = Buffer.alloc(64 * 1024, 0x61);
  while (sys.sendMsg(s, { data: chunk }, sys.MSG_DONTWAIT | sys.MSG_NOSIGNAL) >= 0);
  const linger = Buffer.alloc(8);
  linger.writeInt32LE(1, 0);
  linger.writeInt32LE(30, 4);
  sys.setsockopt(s, sys.SOL_SOCKET, SO_LINGER, linger);
  stuck.push(s);
}
const nul = fs.openSync(copied ?? '/dev/null', 'r');
const fds = [...Array<number>(Number(nulls)).fill(nul), ...stuck];

const out: Record<string, unknown> = { port };
const reply = async (conn: SeqpacketConnection) => {
  const p = await Promise.race([conn.receive(), new Promise<null>((r) => setTimeout(() => r(null), 3000))]);
  return p ? (decodeReply(p.data) as { op: string; code?: string }) : null;
};
// In `behind` and `empty` modes the broker may end the connection at the first packet, before the second is
// queued (EPIPE here): then the case did not happen, and is tried again on a new connection, a few times at most.
for (let attempt = 1; ; attempt++) {
  const conn = await SeqpacketConnection.connect(socket, { maxPacket: MAX_REPLY_BYTES });
  try {
    if (mode === 'hello') {
      await conn.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION }));
      out['hello'] = (await reply(conn))?.op ?? null;
      await conn.send(encodeFrame({ op: 'list', id: 2 }), fds);
    } else if (mode === 'empty') {
      // No frame is empty: the broker reads one as the end, with the fds queued right behind it. It reads
      // nothing after `list` until the hello's reply is read, so both are queued, and our copies of the
      // lingering sockets gone, before it does.
      await conn.send(encodeFrame({ op: 'hello', id: 1, version: PROTOCOL_VERSION }));
      await conn.send(encodeFrame({ op: 'list', id: 2 }));
      await new Promise((r) => setTimeout(r, 200));
      await conn.send(Buffer.alloc(0));
      await conn.send(encodeFrame({ op: 'list', id: 3 }), fds);
      for (const s of stuck.splice(0)) sys.close(s);
      out['hello'] = (await reply(conn))?.op ?? null;
      out['list'] = (await reply(conn))?.op ?? null;
    } else {
      // Refused before hello, which ends the connection, with the fds queued right behind it.
      await conn.send(encodeFrame({ op: 'list', id: 2 }));
      await conn.send(encodeFrame({ op: 'list', id: 3 }), fds);
    }
    out['sent'] = 'ok';
    const r = await reply(conn);
    out['reply'] = r ? (r.code ?? r.op) : null;
    out['attempts'] = attempt;
    break;
  } catch (err) {
    out['sent'] = (err as { code?: string }).code ?? String(err);
    if (!(mode !== 'hello' && out['sent'] === 'EPIPE' && attempt < 5)) break;
    conn.close();
  }
}
process.stdout.write(`${JSON.stringify(out)}\n`);
// Our copies go now: where the broker holds the others, its close would be the last. (Where the send
// was refused, these closes are the last and block this process instead, which is the point.)
fs.closeSync(nul);
process.stdin.resume();
process.stdin.on('end', () => process.exit(0));
for (const s of stuck) sys.close(s);
