// The broker looks a bridge up once and then follows it through link events: every change that matters
// to a grant (a new MTU, a bridge deleted and made again under its name, without a pinned MAC) is seen
// by the next grant, and lost events make it look again.
import anyTest, { type TestFn } from 'ava';
import { BrokerProcess } from '../helpers/broker.js';
import { Netns } from '../helpers/netns.js';
import { NOBODY, probeOnce } from '../helpers/unpriv.js';

const test = anyTest as TestFn;
let ns: Netns;
let broker: BrokerProcess;
const POLICY = `[[rule]]\nname = "c"\nusers = [${NOBODY}]\nbridges = ["brc"]\n`;

test.before(async () => {
  ns = Netns.create('brcache');
  ns.bridge('brc', { mtu: 1400 });
  broker = await BrokerProcess.start(ns, POLICY, { tag: 'brcache' });
});

test.after.always(async () => {
  await broker?.stop();
  ns?.destroy();
});

const grant = () => probeOnce({ socket: broker.socket, requests: [{ bridge: 'brc' }] });

test.serial('a bridge\'s new MTU reaches the next tap', async (t) => {
  const first = await grant();
  t.is(first.error, null, first.error?.message);
  t.is(first.taps[0]!.device.mtu, 1400);
  ns.ip('link', 'set', 'brc', 'mtu', '1300');
  const second = await grant();
  t.is(second.error, null, second.error?.message);
  t.is(second.taps[0]!.device.mtu, 1300, 'the cached bridge was updated by its link event');
});

test.serial('a bridge deleted and made again without a pinned MAC is refused, though the broker knew the old one', async (t) => {
  t.is((await grant()).error, null);
  ns.ip('link', 'del', 'brc');
  ns.ip('link', 'add', 'brc', 'type', 'bridge');
  ns.ip('link', 'set', 'brc', 'up');
  const r = await grant();
  t.is(r.error?.code, 'TB_E_BRIDGE_ADDRESS', r.error?.message);
  // Pinned, it serves again.
  ns.ip('link', 'set', 'brc', 'address', '02:00:5e:00:00:42');
  const again = await grant();
  t.is(again.error, null, again.error?.message);
  t.is(ns.link(again.taps[0]!.device.name), undefined, 'the tap went with its fds');
});

test.serial('a bridge renamed away: the name no longer reaches it; a new bridge of that name is looked up', async (t) => {
  t.is((await grant()).error, null);
  ns.ip('link', 'set', 'brc', 'down');
  ns.ip('link', 'set', 'brc', 'name', 'brold');
  t.is((await grant()).error?.code, 'TB_E_NO_SUCH_BRIDGE');
  ns.bridge('brc', { mtu: 1280 });
  const r = await grant();
  t.is(r.error, null, r.error?.message);
  t.is(r.taps[0]!.device.mtu, 1280);
  t.is(r.taps[0]!.device.parent, 'brc');
});
