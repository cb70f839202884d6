// Floods of link events (floods.ts): what is counted against a device's holder, and what is not.
import test from 'ava';
import { Floods, MAX_LINK_EVENTS_PER_SECOND, type LeaseRecord } from '@tapbroker/broker/internal';

const lease = (ifindex: number, uid = 1000): LeaseRecord => ({
  id: `${String(ifindex).padStart(16, '0')}`, uid, user: 'alice', kind: 'tap', name: `tb${uid}-f${ifindex}`, ifindex,
  parent: 'br0', network: null, mode: null, mac: null, locked: false, queues: 1, rule: 'lab',
  created: '2026-12-02T00:00:00.000Z', ends: 'fds', holder: null, holder_start: null, group: null, plug: null,
  host_mac: null, vlan: null,
});

test('a device sending more than its limit of events in a second, on one bridge, is its holder\'s flood', (t) => {
  const l = lease(10);
  const floods = new Floods(() => l);
  for (let i = 0; i < MAX_LINK_EVENTS_PER_SECOND; i++) t.is(floods.count(l, 3), null);
  const flood = floods.count(l, 3);
  t.is(flood?.victim, l);
  t.regex(flood!.message, /its holder made it send more than 500 link events in a second/);
  t.true(floods.coolingDown(1000) > 0);
});

test('events right after root moves a device to or off a bridge are not counted (only root can do that)', (t) => {
  const l = lease(11);
  const floods = new Floods(() => l);
  // Root toggles the port 1,000 times, each move followed by a few of the kernel's own events.
  for (let i = 0; i < 1000; i++) {
    for (const master of [null, 3]) for (let k = 0; k < 4; k++) t.is(floods.count(l, master), null);
  }
  t.is(floods.coolingDown(1000), 0);
});

test('the first event\'s bridge is taken as it is: a flood that never changes bridge is counted from its first event', (t) => {
  const l = lease(12);
  const floods = new Floods(() => l);
  let flood = null;
  let n = 0;
  while (!flood && n < 10 * MAX_LINK_EVENTS_PER_SECOND) {
    flood = floods.count(l, null);
    n++;
  }
  t.is(n, MAX_LINK_EVENTS_PER_SECOND + 1);
});

test('a device forgotten and its index reused starts with no bridge of its own on record', (t) => {
  const l = lease(13);
  const floods = new Floods(() => l);
  floods.count(l, 3);
  floods.forget(13);
  // The new device's first event is on another bridge: no grace, it counts.
  for (let i = 0; i < MAX_LINK_EVENTS_PER_SECOND; i++) t.is(floods.count(l, 4), null);
  t.truthy(floods.count(l, 4));
});
