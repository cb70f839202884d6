// The closer process (closer.ts, driven by foreign.ts): it closes the fds it receives only at the broker's
// `go`, which the broker sends once it has closed its own copies, so a last close is never the broker's (a
// client can close its own copies first, and a last close can take ~20 ms or block). Found by an outside
// re-test: the closer used to close on receipt, racing the broker's own closes.
import test from 'ava';
import { spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import path from 'node:path';
import { sys } from '@tapbroker/protocol';
import { quiet, until } from '../helpers/wait.js';

const CLOSER = path.join(path.dirname(createRequire(import.meta.url).resolve('@tapbroker/broker/package.json')), 'dist/closer.js');

test('the closer holds what it receives until `go`, then closes it and acknowledges', async (t) => {
  const [mine, theirs] = sys.socketpair(sys.SOCK_SEQPACKET);
  const child = spawn(process.execPath, [CLOSER], { stdio: ['ignore', 'ignore', 'inherit', theirs] });
  sys.close(theirs);
  const [sent, watched] = sys.socketpair(sys.SOCK_SEQPACKET);
  const rx = new sys.Receiver(16);
  // EOF on `watched` once the last copy of `sent` is closed; null (EAGAIN) while someone still holds it.
  const eof = () => rx.recv(watched, sys.MSG_DONTWAIT)?.data.length === 0;
  try {
    sys.sendMsg(mine, { data: Buffer.from([0]), fds: [sent] }, sys.MSG_NOSIGNAL);
    sys.close(sent);
    // Until `go`, the closer keeps its copy: no EOF, though it has had the time to act on its receipt.
    await quiet(300, 'the closer acting on the fd it received, had it not waited for go');
    t.false(eof(), 'closed before go');
    sys.sendMsg(mine, { data: Buffer.from([1]) }, sys.MSG_NOSIGNAL);
    await until(() => eof(), { ms: 3000, what: 'the closer never closed it after go' });
    await until(() => rx.recv(mine, sys.MSG_DONTWAIT)?.data[0] === 1, { ms: 3000, what: 'no acknowledgement' });
    t.pass();
  } finally {
    child.kill('SIGKILL');
    sys.close(mine);
    sys.close(watched);
  }
});
