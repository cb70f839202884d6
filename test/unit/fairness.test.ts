// Each uid's share of the broker's thread (fairness.ts), on a clock the test moves: the only fake here.
import test from 'ava';
import { Fairness, SHARE_MS, WINDOW_MS } from '@tapbroker/broker/internal';

function clocked() {
  let t = 1_000_000;
  return { f: new Fairness(() => t), at: (ms: number) => (t = 1_000_000 + ms) };
}

test('a uid goes on until it took its share of the window, then waits for the next one', async (t) => {
  const { f, at } = clocked();
  t.is(f.turn(1000), null);
  f.spent(1000, SHARE_MS - 1);
  t.is(f.turn(1000), null, 'under its share');
  f.spent(1000, 2);
  const wait = f.turn(1000);
  t.true(wait instanceof Promise, 'its share taken');
  t.is(f.turn(1000), wait, 'all its sessions wait on the same turn');
  t.is(f.turn(1001), null, 'another uid is not held up by it');
  at(WINDOW_MS);
  t.is(f.turn(1000), null, 'the next window: it goes on');
});

test('root is never held up; uids whose window is over are swept as new ones come: the table stays bounded', (t) => {
  // Found by an outside review: a uid was only ever forgotten by a getter the tests called, so each of a user's
  // 65,536 subordinate uids that connected stayed for the broker's lifetime.
  const { f, at } = clocked();
  f.spent(0, 10 * SHARE_MS);
  t.is(f.turn(0), null);
  t.is(f.size, 0, 'root is not counted');
  // A new uid every 10 ms: about a window's worth (100) are live at any time.
  for (let i = 0; i < 10_000; i++) {
    at(i * 10);
    f.spent(2000 + i, 1);
  }
  t.true(f.size <= 256, `${f.size} uids kept`);
  t.truthy(f.turn(2000 + 9_999) === null, 'the live ones are still counted');
});

test('the wait ends, on the real clock, once the window has turned', async (t) => {
  const f = new Fairness();
  f.spent(1000, SHARE_MS);
  const wait = f.turn(1000);
  t.truthy(wait);
  await wait;
  t.is(f.turn(1000), null, 'it goes on then');
});

test('a meter charges each section of a request after its first await, and only those', async (t) => {
  const { f, at } = clocked();
  const m = f.meter(1000);
  at(100); // the session's section (it charges that one itself)
  await m.wait(Promise.resolve());
  at(180); // 80 ms
  await m.wait(Promise.resolve());
  at(250); // 70 ms
  m.end();
  m.end();
  f.spent(1000, SHARE_MS - 151);
  t.is(f.turn(1000), null, '150 ms charged by the meter, under the share with the rest');
  f.spent(1000, 1);
  const wait = f.turn(1000);
  t.truthy(wait, 'and not a millisecond less');
  at(180 + WINDOW_MS);
  await wait;
});

test('a multi-NIC request holds its uid\'s turn to create: the uid\'s other creates wait, other uids do not', async (t) => {
  const { f } = clocked();
  const end = f.alone(1000, true);
  t.is(typeof end, 'function', 'nothing in flight: its turn now');
  const single = f.alone(1000, false);
  const batch = f.alone(1000, true);
  t.true(single instanceof Promise && batch instanceof Promise, 'the uid\'s others wait');
  t.is(typeof f.alone(1001, true), 'function', 'another uid does not');
  const order: string[] = [];
  void (single as Promise<() => void>).then(() => order.push('single'));
  void (batch as Promise<() => void>).then((next) => {
    order.push('batch');
    next();
  });
  (end as () => void)();
  await new Promise((r) => setImmediate(r));
  t.deepEqual(order.sort(), ['batch', 'single'], 'both go on once it ends');
  t.is(typeof f.alone(1000, true), 'function', 'and the turn is free again');
});

test('past 4 multi-NIC requests rolled back in 10 s, a uid\'s next ones wait 10 s; other uids do not', (t) => {
  const { f, at } = clocked();
  for (let i = 0; i < 4; i++) f.rolledBack(1000);
  t.is(f.rollbackWait(1000), 0, 'four are within bounds');
  f.rolledBack(1000);
  t.is(f.rollbackWait(1000), 10_000, 'the fifth: a window to wait');
  t.is(f.rollbackWait(1001), 0);
  at(10_000);
  t.is(f.rollbackWait(1000), 0, 'waited out');
});

// Found by an outside review: what a window's last requests took past the share was forgotten at the window's turn, so
// a uid could take far more than its share in one go, every window.
test('time taken past the share is owed to the next window, one share at most', async (t) => {
  const { f, at } = clocked();
  const waits: Array<Promise<void>> = [];
  const held = () => {
    const w = f.turn(1000);
    if (w) waits.push(w);
    return w !== null;
  };
  f.spent(1000, SHARE_MS + 100); // 100 ms past: owed
  at(WINDOW_MS);
  t.false(held(), '100 ms owed: under the share');
  f.spent(1000, SHARE_MS - 101);
  t.false(held(), '249 ms');
  f.spent(1000, 1);
  t.true(held(), 'the owed 100 ms counted: the share is taken sooner');
  at(2 * WINDOW_MS);
  f.spent(1000, 5000); // a request the clock says took 5 s (the broker stopped mid-request): one window's wait
  at(3 * WINDOW_MS);
  t.true(held(), 'a whole share owed');
  at(4 * WINDOW_MS);
  t.false(held(), 'and no more');
  at(20 * WINDOW_MS);
  f.spent(1000, 1);
  t.false(held(), 'a window long past owes nothing');
  await Promise.all(waits);
});

// Found by the same review: a uid's 64 connections ran 64 requests to every one of another user's, each time that
// user's create waited (on the kernel, or on its own turn). One request per uid per turn of the event loop.
test('one request per uid in each turn of the event loop, in the order asked; other uids and root are not held up', async (t) => {
  const f = new Fairness();
  const order: string[] = [];
  const ask = (uid: number, who: string) => {
    const slot = f.slot(uid);
    if (!slot) return void order.push(`${who} now`);
    void slot.then(() => order.push(who));
  };
  ask(1000, 'a1');
  ask(1000, 'a2');
  ask(1000, 'a3');
  ask(1001, 'b1');
  ask(0, 'root1');
  ask(0, 'root2');
  t.deepEqual(order, ['a1 now', 'b1 now', 'root1 now', 'root2 now']);
  await new Promise((r) => setImmediate(r));
  await Promise.resolve();
  t.deepEqual(order.slice(4), ['a2'], 'the next turn: the next of uid 1000 alone');
  ask(1001, 'b2');
  t.deepEqual(order.slice(5), ['b2 now'], 'uid 1001 began nothing in this turn');
  await new Promise((r) => setImmediate(r));
  await Promise.resolve();
  t.deepEqual(order.slice(6), ['a3']);
  await new Promise((r) => setImmediate(r));
  t.is(f.slot(1000), null, 'nothing waiting: at once');
});
