// The sacrificial closer: a child process that receives fds the broker never asked for and closes
// them. Their last close may block for as long as their sender likes (a TCP socket with SO_LINGER and
// unsent data): it must never happen in the broker's event loop or its thread pool. The broker kills
// and replaces this process when it stops answering. Run as `node closer.js` with its socket on fd 3.
import { sys } from '@tapbroker/protocol/core';

const SOCK = 3;
const receiver = new sys.Receiver(16, sys.SCM_MAX_FD);
// Fds received but not closed yet: the broker's own copies may still be open, and the last close must be
// ours, not the broker's. Its `go` (a 1, sent once it has closed them) says they are closed.
let pending: number[] = [];
for (;;) {
  const m = receiver.recv(SOCK, sys.MSG_CMSG_CLOEXEC);
  if (m === null) continue;
  if (m.data.length === 0 && m.fds.length === 0) process.exit(0);
  pending.push(...m.fds);
  if (m.data[0] !== 1) continue;
  for (const fd of pending) {
    try {
      sys.close(fd);
    } catch {
      // Closed is closed.
    }
  }
  pending = [];
  // One byte back per go: the broker's sign that this process still makes progress.
  sys.sendMsg(SOCK, { data: Buffer.from([1]) }, sys.MSG_NOSIGNAL);
}
