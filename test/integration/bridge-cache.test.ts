// The broker looks a bridge up once and then follows it through link events: every change that matters
// to a grant (a new MTU, a bridge deleted and made again under its name, without a pinned MAC) is seen
// by the next grant, and lost events make it look again.
import anyTest, { type TestFn } from 'ava';
import { brokerFixture } from '../helpers/fixture.js';
import { NOBODY, probeOnce } from '../helpers/unpriv.js';

const test = anyTest as TestFn;
const POLICY = `[[rule]]\nname = "c"\nusers = [${NOBODY}]\nbridges = ["brc"]\n`;

const fx = brokerFixture(test, { tag: 'brcache', policy: POLICY, bridges: [['brc', { mtu: 1400 }]] });

const grant = () => probeOnce({ socket: fx.broker.socket, requests: [{ bridge: 'brc' }] });

test.serial('a bridge\'s new MTU reaches the next tap', async (t) => {
  const first = await grant();
  t.is(first.error, null, first.error?.message);
  t.is(first.taps[0]!.device.mtu, 1400);
  fx.ns.ip('link', 'set', 'brc', 'mtu', '1300');
  const second = await grant();
  t.is(second.error, null, second.error?.message);
  t.is(second.taps[0]!.device.mtu, 1300, 'the cached bridge was updated by its link event');
});

test.serial('a bridge deleted and made again without a pinned MAC is refused, though the broker knew the old one', async (t) => {
  t.is((await grant()).error, null);
  fx.ns.ip('link', 'del', 'brc');
  fx.ns.ip('link', 'add', 'brc', 'type', 'bridge');
  fx.ns.ip('link', 'set', 'brc', 'up');
  const r = await grant();
  t.is(r.error?.code, 'TB_E_BRIDGE_ADDRESS', r.error?.message);
  // Pinned the way the message says (a bridge without ports has no address of its own: all zeros, which
  // the kernel refuses), it serves again.
  const hint = /`ip link set brc address ([0-9a-f:]{17})'/.exec(r.error?.message ?? '');
  t.truthy(hint, `the message names an address to pin: ${r.error?.message}`);
  t.not(hint![1], '00:00:00:00:00:00');
  fx.ns.ip('link', 'set', 'brc', 'address', hint![1]!);
  const again = await grant();
  t.is(again.error, null, again.error?.message);
  t.is(fx.ns.link(again.taps[0]!.device.name), undefined, 'the tap went with its fds');
});

// Found by an outside review: the message had an administrator pin the bridge's address as it was, which for a
// bridge whose lowest port is a tap is that tap's: an address whoever holds the tap may set.
test.serial('an unpinned bridge whose address is a tap\'s: the message names another address to pin', async (t) => {
  fx.ns.ip('link', 'del', 'brc');
  fx.ns.ip('link', 'add', 'brc', 'type', 'bridge');
  fx.ns.ip('tuntap', 'add', 'dev', 'tport0', 'mode', 'tap');
  try {
    fx.ns.ip('link', 'set', 'tport0', 'address', '02:00:00:00:00:01', 'master', 'brc');
    fx.ns.ip('link', 'set', 'brc', 'up');
    t.is(fx.ns.link('brc')?.address, '02:00:00:00:00:01', 'the bridge took its port\'s address');
    const r = await grant();
    t.is(r.error?.code, 'TB_E_BRIDGE_ADDRESS', r.error?.message);
    const hint = /`ip link set brc address ([0-9a-f:]{17})'/.exec(r.error?.message ?? '');
    t.truthy(hint, r.error?.message);
    t.not(hint![1], '02:00:00:00:00:01', 'not the tap\'s');
    t.regex(r.error?.message ?? '', /an administrator pins it/);
    fx.ns.ip('link', 'set', 'brc', 'address', hint![1]!);
    t.is((await grant()).error, null);
  } finally {
    fx.ns.ip('link', 'del', 'tport0');
  }
});

test.serial('a bridge renamed away: the name no longer reaches it; a new bridge of that name is looked up', async (t) => {
  t.is((await grant()).error, null);
  fx.ns.ip('link', 'set', 'brc', 'down');
  fx.ns.ip('link', 'set', 'brc', 'name', 'brold');
  t.is((await grant()).error?.code, 'TB_E_NO_SUCH_BRIDGE');
  fx.ns.bridge('brc', { mtu: 1280 });
  const r = await grant();
  t.is(r.error, null, r.error?.message);
  t.is(r.taps[0]!.device.mtu, 1280);
  t.is(r.taps[0]!.device.parent, 'brc');
});
