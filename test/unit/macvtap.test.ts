// Which devices may carry a macvtap (macvtap.ts, macvtapParent). The kernel's Open vSwitch datapath is absent
// here (the OVS tests run a userspace switch, whose ports are tun devices), so its internal port is a link
// object of kind `openvswitch` handed in place of rtnetlink's lookup: the only fake here.
import test from 'ava';
import { TapbrokerError } from '@tapbroker/protocol';
import { macvtapParent } from '@tapbroker/broker/internal';

const link = (kind: string | null, flags = 0x1) =>
  ({ getLinkByName: (name: string) => ({ index: 7, name, kind, flags, mtu: 1500 }) }) as never;

for (const [kind, what] of [
  ['bridge', 'a bridge'], ['openvswitch', 'an Open vSwitch port'], ['macvlan', 'a macvlan device'],
  ['macvtap', 'a macvtap device'], ['tun', 'a tun device'],
] as const) {
  test(`a parent of kind ${kind} is refused (TB_E_BAD_PARENT)`, (t) => {
    const err = t.throws(() => macvtapParent(link(kind), 'p0'), { instanceOf: TapbrokerError });
    t.is(err?.code, 'TB_E_BAD_PARENT');
    t.is(err?.message, `\`p0' is ${what} and cannot carry a macvtap`);
  });
}

test('loopback is refused whatever its kind; a physical NIC, a veth or a VLAN device carries one', (t) => {
  t.is(t.throws(() => macvtapParent(link(null, 0x8 | 0x1), 'lo'), { instanceOf: TapbrokerError })?.message,
    '`lo\' is loopback and cannot carry a macvtap');
  for (const kind of [null, 'veth', 'vlan', 'bond', 'constructor']) t.is(macvtapParent(link(kind), 'p0').name, 'p0');
});

test('a parent that does not exist is TB_E_NO_SUCH_PARENT', (t) => {
  const none = { getLinkByName: () => null } as never;
  t.is(t.throws(() => macvtapParent(none, 'nope'), { instanceOf: TapbrokerError })?.code, 'TB_E_NO_SUCH_PARENT');
});
