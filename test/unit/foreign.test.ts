// ForeignFds (foreign.ts): what the broker must not close last goes to a closer process. An fd the kernel
// will not carry over a socket (ETOOMANYREFS: a unix socket with others nested too deep in its queue, on
// kernels that limit nesting; 6.18, which the tests run on, does not, so that fault is put in place of
// sendmsg here: the only fake in this file) must neither stop what waits behind it nor get the closer
// replaced: it goes to a throwaway process by inheritance. Serial: throwaway processes are counted process-wide.
import test from 'ava';
import { ForeignFds, orphan } from '@tapbroker/broker/internal';
import { sys } from '@tapbroker/protocol';
import { until } from '../helpers/wait.js';

const rx = new sys.Receiver(64);

/** A socket whose peer reads EOF once every copy of it is closed. */
function watched(): { fd: number; gone: () => boolean; close: () => void } {
  const [fd, peer] = sys.socketpair(sys.SOCK_SEQPACKET);
  sys.fcntlSet(peer, sys.F_SETFL, sys.fcntlGet(peer, sys.F_GETFL) | sys.O_NONBLOCK);
  return { fd, gone: () => rx.recv(peer, sys.MSG_DONTWAIT)?.data.length === 0, close: () => sys.close(peer) };
}

test.serial('orphan: a throwaway process inherits the fd, and its exit is the last close', async (t) => {
  const w = watched();
  try {
    t.true(orphan(w.fd));
    sys.close(w.fd);
    await until(() => w.gone(), { ms: 5000, what: 'the throwaway process never closed it' });
    t.pass();
  } finally {
    w.close();
  }
});

test.serial('an fd no socket will carry goes to a throwaway process; the rest reach the closer, which stays', async (t) => {
  const [good1, bad, good2] = [watched(), watched(), watched()];
  const logged: string[] = [];
  const send: typeof sys.sendMsg = (fd, msg, flags) => {
    if (msg.fds?.includes(bad.fd)) throw new sys.SyscallError('sendmsg', 109 /* ETOOMANYREFS */, 'too many references');
    return sys.sendMsg(fd, msg, flags);
  };
  const fds = new ForeignFds((line) => logged.push(line), send);
  try {
    fds.take([good1.fd, bad.fd, good2.fd]);
    await until(() => good1.gone() && bad.gone() && good2.gone(), { ms: 10_000, what: `not all closed (${logged.join('; ')})` });
    t.is(fds.replaced, 0, 'the closer was not taken for stuck or gone');
    t.true(logged.some((l) => /an fd no socket will carry \(.*too many references.*\): a throwaway process closes it/.test(l)), logged.join('\n'));
  } finally {
    fds.close();
    for (const w of [good1, bad, good2]) w.close();
  }
});

test.serial('fds no socket will carry, more than throwaway processes may run at once: all closed, a few at a time', async (t) => {
  const ws = Array.from({ length: 20 }, () => watched());
  const bad = new Set(ws.map((w) => w.fd));
  const logged: string[] = [];
  const send: typeof sys.sendMsg = (fd, msg, flags) => {
    if (msg.fds?.some((f) => bad.has(f))) throw new sys.SyscallError('sendmsg', 109 /* ETOOMANYREFS */, 'too many references');
    return sys.sendMsg(fd, msg, flags);
  };
  const fds = new ForeignFds((line) => logged.push(line), send);
  try {
    fds.take(ws.map((w) => w.fd));
    // Sent once the closer says it is ready (it dies with the broker): then past the bound, fds wait.
    await until(() => logged.some((l) => /it waits for a throwaway process/.test(l)), { ms: 10_000, what: 'past the bound, fds wait' });
    await until(() => ws.every((w) => w.gone()), { ms: 15_000, what: 'not all closed' });
    t.is(fds.replaced, 0);
  } finally {
    fds.close();
    for (const w of ws) w.close();
  }
});

// Found by an outside re-test: the broker sent a new closer its fds at once, before the closer had set itself to die
// with the broker; one stopped in that window outlived a killed broker, holding the broker's copies of taps.
test.serial('nothing is sent to a closer before it says it is ready; then what waited goes to it', async (t) => {
  const w = watched();
  const carried: number[] = [];
  const send: typeof sys.sendMsg = (fd, msg, flags) => {
    carried.push(...(msg.fds ?? []));
    return sys.sendMsg(fd, msg, flags);
  };
  const fds = new ForeignFds(() => {}, send);
  let pid = 0;
  try {
    fds.give([w.fd]);
    pid = (fds as unknown as { child: { pid: number } }).child.pid;
    process.kill(pid, 'SIGSTOP');
    await new Promise((r) => setTimeout(r, 1500));
    t.deepEqual(carried, [], 'sent to a closer not ready');
    process.kill(pid, 'SIGCONT');
    await until(() => carried.length === 1, { ms: 10_000, what: 'never sent once ready' });
    await until(() => w.gone(), { ms: 10_000, what: 'never closed' });
    t.pass();
  } finally {
    if (pid > 0) process.kill(pid, 'SIGCONT');
    fds.close();
    w.close();
  }
});

// Every closer wedged in the kernel (a user's FUSE file; round2's wedge test does it for real) is the second
// fake here: `jammed` is forced, so pushed connections go to bins at once.
class Jammed extends ForeignFds {
  override get jammed(): boolean {
    return true;
  }
}

test.serial('every closer wedged: an fd no bin will carry goes to a throwaway process, the rest into a bin', async (t) => {
  const [good1, bad, good2] = [watched(), watched(), watched()];
  const logged: string[] = [];
  const send: typeof sys.sendMsg = (fd, msg, flags) => {
    if (msg.fds?.includes(bad.fd)) throw new sys.SyscallError('sendmsg', 109 /* ETOOMANYREFS */, 'too many references');
    return sys.sendMsg(fd, msg, flags);
  };
  const fds = new Jammed((line) => logged.push(line), send);
  try {
    fds.take([good1.fd, bad.fd, good2.fd]);
    await until(() => bad.gone(), { ms: 5000, what: `the unsendable fd still waits (${logged.join('; ')})` });
    t.true(logged.some((l) => /an fd no socket will carry \(.*too many references.*\): a throwaway process closes it/.test(l)), logged.join('\n'));
    t.false(logged.some((l) => /no bin/.test(l)), logged.join('\n'));
    // The others are in a bin (not closed: a bin's queue holds them in flight) until the stop hands it over.
    t.false(good1.gone() || good2.gone());
    fds.close();
    await until(() => good1.gone() && good2.gone(), { ms: 10_000, what: 'the bin was not closed at stop' });
  } finally {
    fds.close();
    for (const w of [good1, bad, good2]) w.close();
  }
});
