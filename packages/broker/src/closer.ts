// The sacrificial closer: a child process that receives fds the broker never asked for and closes
// them. Their last close may block for as long as their sender likes (a TCP socket with SO_LINGER and
// unsent data): it must never happen in the broker's event loop or its thread pool. The broker kills
// and replaces this process when it stops answering. Run as `node closer.js` with its socket on fd 3.
import fs from 'node:fs';
import koffi from 'koffi';
import { sys, watchReadable } from '@tapbroker/protocol/core';

const SOCK = 3;

// Dies with the broker, even stopped (SIGKILL ends a stopped process): the broker's copies it holds close with it.
// A closer stopped when its broker died kept them, and the next broker took their taps back as live leases nobody
// held, counted against their user's quota, for good (an outside review). Its broker gone already: nothing to keep.
// (A broker of an earlier version, still running after an upgrade, names no parent: it starts this file too.)
const PR_SET_PDEATHSIG = 1;
const SIGKILL = 9;
koffi.load('libc.so.6').func('int prctl(int option, ...)')(PR_SET_PDEATHSIG, 'unsigned long', SIGKILL);
const parent = process.env['TAPBROKER_CLOSER_OF'];
if (parent !== undefined && String(process.ppid) !== parent) process.exit(0);
// A reload signal is the broker's: `systemctl kill -s HUP` signals every process of the unit (an outside review's
// closer died of it).
process.on('SIGHUP', () => {});
// Ready: the broker sends nothing before this byte (a closer stopped before its prctl kept what it had been sent).
sys.sendMsg(SOCK, { data: Buffer.from([2]) }, sys.MSG_NOSIGNAL);
const receiver = new sys.Receiver(16, sys.SCM_MAX_FD);
// Fds received but not closed yet: the broker's own copies may still be open, and the last close must be
// ours, not the broker's. Its `go` (a 1, sent once it has closed them) says they are closed.
let pending: number[] = [];

watchReadable(SOCK, () => {
  for (;;) {
    const m = receiver.recv(SOCK, sys.MSG_CMSG_CLOEXEC | sys.MSG_DONTWAIT);
    if (m === null) return;
    if (m.data.length === 0 && m.fds.length === 0) process.exit(0);
    pending.push(...m.fds);
    if (m.data[0] === 1) closeAll(pending.splice(0));
  }
});

/**
 * Closes one `go`'s fds, each on a pool thread of its own (the broker sizes the pool), then acknowledges:
 * a tap's last close takes the kernel ~20 ms, and one user's taps closed one by one would keep every
 * other user's devices alive behind them; forty at once take about as long as two.
 */
function closeAll(fds: number[]): void {
  // One byte back per go: the broker's sign that this process still makes progress.
  const ack = () => sys.sendMsg(SOCK, { data: Buffer.from([1]) }, sys.MSG_NOSIGNAL);
  let left = fds.length;
  if (left === 0) ack();
  for (const fd of fds) fs.close(fd, () => --left === 0 && ack());
}
