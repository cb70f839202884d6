// The reaper (reaper.ts), driven with a deletion function whose promises the test settles: at most two
// deletions run at once and the rest queue in order, each counted against its uid until it ends; a
// failure (a rejection or a synchronous throw) rejects only its own deletion; idle() waits for
// everything queued, running and closing; closeFds closes real descriptors at once, off the queue.
import test from 'ava';
import fs from 'node:fs';
import { sys } from '@tapbroker/protocol';
import { Reaper } from '@tapbroker/broker/internal';

interface Deferred<T> {
  promise: Promise<T>;
  resolve: (v: T) => void;
  reject: (e: unknown) => void;
}

function deferred<T>(): Deferred<T> {
  let resolve!: (v: T) => void;
  let reject!: (e: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/** A kernel whose deletions end when the test says: `started` lists the ifindexes asked for, in order. */
class SlowKernel {
  readonly calls = new Map<number, Deferred<boolean>>();
  readonly started: number[] = [];
  readonly deleteLink = (ifindex: number): Promise<boolean> => {
    const d = deferred<boolean>();
    this.calls.set(ifindex, d);
    this.started.push(ifindex);
    return d.promise;
  };

  end(ifindex: number, deleted = true): void {
    this.calls.get(ifindex)!.resolve(deleted);
  }

  fail(ifindex: number, err: unknown): void {
    this.calls.get(ifindex)!.reject(err);
  }
}

/** Whether `p` has settled once everything already due has run (one turn of the event loop). */
async function settled(p: Promise<unknown>): Promise<boolean> {
  let done = false;
  p.then(() => (done = true), () => (done = true));
  await new Promise(setImmediate);
  return done;
}

function setup() {
  const kernel = new SlowKernel();
  return { kernel, reaper: new Reaper(kernel.deleteLink) };
}

const devNull = (n: number) => Array.from({ length: n }, () => fs.openSync('/dev/null', 'r'));

function isClosed(fd: number): boolean {
  try {
    fs.fstatSync(fd);
    return false;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EBADF';
  }
}

test('at most two deletions run at once; the others wait', async (t) => {
  const { kernel, reaper } = setup();
  const done = [1, 2, 3, 4, 5].map((i) => reaper.deleteLink(i, 1000));
  t.deepEqual(kernel.started, [1, 2]);
  t.is(reaper.backlog, 5, 'two running, three queued');
  kernel.end(1);
  await done[0];
  t.deepEqual(kernel.started, [1, 2, 3], 'one ends, one starts');
  kernel.end(2);
  kernel.end(3);
  await Promise.all(done.slice(0, 3));
  t.deepEqual(kernel.started, [1, 2, 3, 4, 5]);
  kernel.end(4);
  kernel.end(5);
  await Promise.all(done);
  t.is(reaper.backlog, 0);
});

test('queued deletions start in the order they were asked for, whichever running one ends first', async (t) => {
  const { kernel, reaper } = setup();
  const done = [10, 20, 30, 40].map((i, n) => reaper.deleteLink(i, 1000 + n));
  kernel.end(20);
  await done[1];
  t.deepEqual(kernel.started, [10, 20, 30]);
  kernel.end(10);
  await done[0];
  t.deepEqual(kernel.started, [10, 20, 30, 40]);
  kernel.end(30);
  kernel.end(40);
  await Promise.all(done);
});

test("a deletion's promise gives the kernel's answer: true deleted, false already gone", async (t) => {
  const { kernel, reaper } = setup();
  const deleted = reaper.deleteLink(1, 1000);
  const gone = reaper.deleteLink(2, 1000);
  kernel.end(1, true);
  kernel.end(2, false);
  t.true(await deleted);
  t.false(await gone);
});

test('pending(uid) counts queued and running deletions of that uid, and drops to 0 when they end', async (t) => {
  const { kernel, reaper } = setup();
  const done = [reaper.deleteLink(1, 1000), reaper.deleteLink(2, 1000), reaper.deleteLink(3, 1001), reaper.deleteLink(4, 1000)];
  t.deepEqual(kernel.started, [1, 2], 'deletions 3 and 4 are queued');
  t.is(reaper.pending(1000), 3, 'two running, one queued');
  t.is(reaper.pending(1001), 1, 'queued only');
  t.is(reaper.pending(0), 0, 'a uid with nothing on its way out');
  kernel.end(1);
  await done[0];
  t.is(reaper.pending(1000), 2);
  kernel.end(2);
  kernel.end(3);
  await Promise.all(done.slice(0, 3));
  t.is(reaper.pending(1001), 0);
  t.is(reaper.pending(1000), 1);
  kernel.end(4);
  await done[3];
  t.is(reaper.pending(1000), 0);
});

test('a failed deletion rejects its own promise only; its uid stops counting it and the queue goes on', async (t) => {
  const { kernel, reaper } = setup();
  const done = [1, 2, 3].map((i) => reaper.deleteLink(i, 1000));
  const err = new sys.SyscallError('sendmsg', sys.errno.ENOBUFS);
  kernel.fail(1, err);
  t.is(await t.throwsAsync(done[0]!), err);
  t.is(reaper.pending(1000), 2);
  t.deepEqual(kernel.started, [1, 2, 3], 'the next queued deletion started');
  kernel.end(2);
  kernel.end(3);
  t.deepEqual(await Promise.all(done.slice(1)), [true, true]);
  t.is(reaper.pending(1000), 0);
});

test('a deletion function that throws at once becomes a rejection of that deletion, not a throw', async (t) => {
  const boom = new Error('boom');
  const started: number[] = [];
  const reaper = new Reaper((ifindex) => {
    started.push(ifindex);
    if (ifindex === 1) throw boom;
    return Promise.resolve(true);
  });
  let first!: Promise<boolean>;
  t.notThrows(() => (first = reaper.deleteLink(1, 1000)));
  t.is(await t.throwsAsync(first), boom);
  t.true(await reaper.deleteLink(2, 1000), 'the slot it held is free again');
  t.deepEqual(started, [1, 2]);
  t.is(reaper.pending(1000), 0);
});

test('a throw of something not an Error rejects with EIO, naming the reaper', async (t) => {
  const reaper = new Reaper(() => {
    throw 'not an error';
  });
  const err = await t.throwsAsync(reaper.deleteLink(1, 1000));
  t.true(err instanceof sys.SyscallError);
  t.like(err as sys.SyscallError, { syscall: 'reaper', errno: sys.errno.EIO, code: 'EIO' });
  t.regex(err!.message, /not an error/);
});

test('idle() resolves at once when nothing is queued, running or closing', async (t) => {
  const { reaper } = setup();
  t.is(reaper.backlog, 0);
  t.true(await settled(reaper.idle()));
});

test('idle() waits for every queued and running deletion, failed ones included', async (t) => {
  const { kernel, reaper } = setup();
  const done = [1, 2, 3].map((i) => reaper.deleteLink(i, 1000));
  const idle = reaper.idle();
  kernel.end(1);
  kernel.fail(2, new Error('gone wrong'));
  t.false(await settled(idle), 'deletion 3 still runs');
  kernel.end(3);
  await Promise.allSettled(done);
  t.true(await settled(idle));
  t.is(reaper.backlog, 0);
});

test('idle() waits for closes as well as deletions', async (t) => {
  const { kernel, reaper } = setup();
  const deletion = reaper.deleteLink(1, 1000);
  let closed = false;
  const closing = reaper.closeFds(devNull(2), 1000).then(() => (closed = true));
  const idle = reaper.idle();
  kernel.end(1);
  await deletion;
  await idle;
  t.true(closed, 'idle() resolved only after the close');
  await closing;
});

test('idle() resolves when the last close ends with no deletion pending', async (t) => {
  const { reaper } = setup();
  const closing = reaper.closeFds(devNull(1), 1000);
  const idle = reaper.idle();
  t.is(reaper.backlog, 1);
  await closing;
  t.true(await settled(idle));
});

test.serial('closeFds closes the descriptors, counting in backlog until done, and not against the uid', async (t) => {
  const { reaper } = setup();
  const fds = devNull(3);
  for (const fd of fds) t.false(isClosed(fd));
  const closing = reaper.closeFds(fds, 1000);
  t.is(reaper.backlog, 1, 'one close of three fds');
  t.is(reaper.pending(1000), 0, 'the device lives on with its holder: not counted as going');
  await closing;
  for (const fd of fds) t.true(isClosed(fd), `fd ${fd} closed`);
  t.is(reaper.backlog, 0);
});

test.serial('closes go ahead at once, even while deletions fill every slot', async (t) => {
  const { kernel, reaper } = setup();
  const done = [1, 2, 3].map((i) => reaper.deleteLink(i, 1000));
  const fds = devNull(2);
  await reaper.closeFds(fds, 1000);
  for (const fd of fds) t.true(isClosed(fd));
  t.deepEqual(kernel.started, [1, 2], 'the deletions are where they were');
  kernel.end(1);
  kernel.end(2);
  await Promise.all(done.slice(0, 2));
  kernel.end(3);
  await done[2];
});

test('closeFds([]) resolves at once and adds nothing to the backlog', async (t) => {
  const { reaper } = setup();
  const closing = reaper.closeFds([], 1000);
  t.is(reaper.backlog, 0);
  t.true(await settled(closing));
});
