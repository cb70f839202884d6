// A holder that hands its connection on and exits (an outside review found the broker then tied later macvtaps
// to nobody). Run as an unprivileged uid inside the test's namespace:
//   node handoff.js SOCKET PARENT FIRST     FIRST: yes (a macvtap asked for before the hand-off) | no
// The process that connected asks for a macvtap on PARENT (if FIRST), then hands the connection to a detached
// child and exits. The child waits until that process is gone, asks for a second macvtap on the same
// connection, prints one JSON line {first, second, pid} (device names or error codes), and holds the connection
// until it is killed. (Not until its stdin closes: the test's end of that pipe is closed when the first process
// exits, and the child then ended, closing the connection, in a race with the broker's reading of the exit.)
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { MAX_REPLY_BYTES, PROTOCOL_VERSION, SeqpacketConnection, decodeReply, encodeFrame } from '@tapbroker/protocol';

const [socket, parent, first, role, connected] = process.argv.slice(2) as [string, string, string, string?, string?];

async function ask(conn: SeqpacketConnection, req: Record<string, unknown>): Promise<string> {
  await conn.send(encodeFrame(req as never));
  const got = (await conn.receive())!;
  for (const fd of got.fds) fs.closeSync(fd);
  const reply = decodeReply(got.data) as { op: string; code?: string; device?: { name: string } };
  return reply.device?.name ?? reply.code ?? reply.op;
}

if (role !== 'child') {
  const conn = await SeqpacketConnection.connect(socket, { maxPacket: MAX_REPLY_BYTES });
  await ask(conn, { op: 'hello', id: 1, version: PROTOCOL_VERSION });
  const a = first === 'yes' ? await ask(conn, { op: 'create-macvtap', id: 2, parent }) : null;
  // The child's stdin and stdout are the test's pipes; fd 3 is the connection.
  const child = spawn(process.execPath, [process.argv[1]!, socket, parent, first, 'child', String(process.pid), a ?? ''],
    { stdio: ['inherit', 'inherit', 'inherit', conn.fd], detached: true });
  child.unref();
  process.exit(0);
} else {
  const firstName = process.argv[7] || null;
  while (fs.existsSync(`/proc/${connected}`)) await new Promise((r) => setTimeout(r, 10));
  const conn = new SeqpacketConnection(3, { maxPacket: MAX_REPLY_BYTES });
  const second = await ask(conn, { op: 'create-macvtap', id: 3, parent });
  process.stdout.write(`${JSON.stringify({ first: firstName, second, pid: process.pid })}\n`);
  setInterval(() => conn, 60_000);
}
