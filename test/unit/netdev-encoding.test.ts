// Byte layouts that reach the kernel: ifreq for TUNSETIFF and rtnetlink link messages.
import test from 'ava';
import {
  IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TAP, IFF_TUN_EXCL, IFF_VNET_HDR, attrString, attrU32, hostMac, linkMessage,
  bridgeVlanMessage, joinedVlan, masterOf, nameOf, parseAttrs, parseLink, portLockMessage, randomMac, rtattr, tapFlags, tapName, tunIfreq,
} from '@tapbroker/broker/internal';

test('TUNSETIFF flags: always tap, no PI and exclusive for the creating open', (t) => {
  t.is(tapFlags({ vnetHdr: true, multiQueue: false, exclusive: true }), IFF_TAP | IFF_NO_PI | IFF_TUN_EXCL | IFF_VNET_HDR);
  t.is(tapFlags({ vnetHdr: false, multiQueue: true, exclusive: false }), IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE);
  t.is(IFF_TUN_EXCL, 0x8000);
});

test('ifreq: name at 0, NUL-terminated, flags u16 at 16, 40 bytes', (t) => {
  const ifr = tunIfreq('tb1000-abc', 0x9002);
  t.is(ifr.length, 40);
  t.is(ifr.toString('utf8', 0, 10), 'tb1000-abc');
  t.is(ifr[10], 0);
  t.is(ifr.readUInt16LE(16), 0x9002);
});

test('ifreq: a 16-byte name is refused, never truncated', (t) => {
  t.throws(() => tunIfreq('a'.repeat(16), 0), { message: /longer than 15 bytes/ });
  t.notThrows(() => tunIfreq('a'.repeat(15), 0));
});

test('rtattr: length excludes padding, payload padded to 4', (t) => {
  const a = rtattr(3, Buffer.from('br0\0'));
  t.deepEqual([...a], [8, 0, 3, 0, 0x62, 0x72, 0x30, 0]);
  const b = attrString(3, 'tap1');
  t.is(b.readUInt16LE(0), 9);
  t.is(b.length, 12);
  t.deepEqual([...attrU32(10, 7)], [8, 0, 10, 0, 7, 0, 0, 0]);
});

test('RTM_NEWLINK: header, ifinfomsg, attributes', (t) => {
  const m = linkMessage(16, 0x5, 99, { index: 42, flags: 1, change: 1 }, [attrU32(4, 1400), attrU32(10, 3)]);
  t.is(m.readUInt32LE(0), m.length);
  t.is(m.length, 16 + 16 + 16);
  t.is(m.readUInt16LE(4), 16);
  t.is(m.readUInt16LE(6), 0x5);
  t.is(m.readUInt32LE(8), 99);
  t.is(m.readInt32LE(20), 42);
  t.is(m.readUInt32LE(24), 1);
  t.is(m.readUInt32LE(28), 1);
  const attrs = parseAttrs(m, 32);
  t.is(attrs.get(4)!.readUInt32LE(0), 1400);
  t.is(attrs.get(10)!.readUInt32LE(0), 3);
});

test('parseLink reads what the kernel sends back', (t) => {
  const linkinfo = rtattr(18, attrString(1, 'bridge'));
  const m = linkMessage(16, 0, 1, { index: 5, flags: 0x1043 }, [attrString(3, 'br0'), attrU32(4, 9000), rtattr(1, Buffer.from([2, 0, 0, 0, 0, 1])), linkinfo]);
  t.deepEqual(parseLink(m), { family: 0, index: 5, flags: 0x1043, name: 'br0', mtu: 9000, master: null, address: Buffer.from([2, 0, 0, 0, 0, 1]), kind: 'bridge', link: null, alias: null, persist: null, tun: null, vlanFiltering: null, defaultPvid: null, portLocked: null, movedTo: null });
});

test('a bridge\'s VLAN filtering and default PVID are read from its IFLA_INFO_DATA', (t) => {
  const pvid = Buffer.alloc(2);
  pvid.writeUInt16LE(10);
  const data = rtattr(2, Buffer.concat([rtattr(7, Buffer.from([1])), rtattr(39, pvid)]));
  const m = linkMessage(16, 0, 1, { index: 5 }, [attrString(3, 'br0'), rtattr(18, Buffer.concat([attrString(1, 'bridge'), data]))]);
  t.like(parseLink(m), { kind: 'bridge', vlanFiltering: true, defaultPvid: 10 });
});

test('an access port leaves the VLAN it joined its bridge in: the bridge\'s default_pvid, not always VLAN 1', (t) => {
  // A bridge whose default_pvid is 10: removing VLAN 1 failed (ENOENT) and the port stayed in VLAN 10.
  t.is(joinedVlan({ defaultPvid: 10 }, 100), 10);
  t.is(joinedVlan({ defaultPvid: 1 }, 100), 1);
  t.is(joinedVlan({ defaultPvid: 100 }, 100), null, 'it joined its own VLAN: nothing to leave');
  t.is(joinedVlan({ defaultPvid: 0 }, 100), null, 'default_pvid 0: a new port joins no VLAN');
  t.is(joinedVlan({ defaultPvid: null }, 100), 1, 'no attribute: the kernel\'s default, VLAN 1');
  t.is(joinedVlan(null, 1), null);
});

test('masterOf reads an event\'s IFLA_MASTER alone, whatever comes before it, and null without one', (t) => {
  const info = rtattr(18, attrString(1, 'tun'));
  t.is(masterOf(linkMessage(16, 0, 1, { index: 7 }, [attrString(3, 'tb1-x'), info, attrU32(10, 4)])), 4);
  t.is(masterOf(linkMessage(16, 0, 1, { index: 7 }, [attrString(3, 'tb1-x'), info])), null);
  t.is(masterOf(linkMessage(16, 0, 1, { index: 7 }, [attrU32(10, 0)])), null, 'index 0 is no bridge');
  // A truncated attribute (the message cut short) ends the walk: nothing past the message is read.
  const m = linkMessage(16, 0, 1, { index: 7 }, [attrString(3, 'tb1-x'), attrU32(10, 4)]);
  t.is(masterOf(m.subarray(0, m.length - 2)), null);
});

test('nameOf reads an event\'s IFLA_IFNAME alone, wherever it is, and null without one', (t) => {
  const info = rtattr(18, attrString(1, 'tun'));
  t.is(nameOf(linkMessage(16, 0, 1, { index: 7 }, [attrU32(10, 4), info, attrString(3, 'tb1-x')])), 'tb1-x');
  t.is(nameOf(linkMessage(16, 0, 1, { index: 7 }, [attrU32(10, 4), info])), null);
});

test('a port lock: locked, learning and unknown-unicast flooding off, BPDU guard and root block, learned entries flushed',
  (t) => {
  const m = portLockMessage(7, 12, true);
  t.is(m.readUInt8(16), 7 /* AF_BRIDGE */);
  t.is(m.readInt32LE(20), 12);
  const protinfo = parseAttrs(parseAttrs(m, 32).get(12 /* IFLA_PROTINFO */)!);
  t.deepEqual([...protinfo.keys()].sort((a, b) => a - b), [5, 6, 8, 9, 24, 39]);
  t.is(protinfo.get(39 /* LOCKED */)![0], 1);
  t.is(protinfo.get(8 /* LEARNING */)![0], 0);
  t.is(protinfo.get(9 /* UNICAST_FLOOD */)![0], 0);
  const unlock = parseAttrs(parseAttrs(portLockMessage(8, 12, false), 32).get(12)!);
  t.deepEqual([39, 8, 9].map((k) => unlock.get(k)![0]), [0, 1, 1], 'unlocked: learning and flooding on again');
  t.is(protinfo.get(24 /* FLUSH: a flag, no payload */)!.length, 0);
});

test('host MAC: guest MAC with first octet 0xfe', (t) => {
  t.deepEqual([...hostMac(Buffer.from([0x52, 0x54, 0, 1, 2, 3]))], [0xfe, 0x54, 0, 1, 2, 3]);
});

test('broker-chosen names embed the uid and fit IFNAMSIZ for every uid', (t) => {
  for (const uid of [0, 1000, 65534, 4294967294]) {
    const n = tapName(uid);
    t.true(n.startsWith(`tb${uid}-`));
    t.true(n.length <= 15, n);
    t.regex(n, /^tb\d+-[0-9a-z]{2,6}$/);
  }
});

test('random MACs stay inside the prefix and are unicast', (t) => {
  for (const prefix of ['52:54:00', '02', '02:aa:bb:cc:dd:ee']) {
    const mac = randomMac(prefix);
    t.true(mac.startsWith(prefix));
    t.regex(mac, /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/);
    t.is(parseInt(mac.slice(0, 2), 16) & 1, 0);
  }
});

test('bridge VLAN: AF_BRIDGE RTM_SETLINK with IFLA_AF_SPEC/IFLA_BRIDGE_VLAN_INFO {PVID|UNTAGGED, vid}', (t) => {
  const m = bridgeVlanMessage(7, 42, 100, true);
  t.is(m.readUInt16LE(4), 19, 'RTM_SETLINK');
  t.is(m[16], 7, 'AF_BRIDGE');
  t.is(m.readInt32LE(20), 42, 'the port');
  const spec = parseAttrs(m, 32).get(26)!;
  const info = parseAttrs(spec).get(2)!;
  t.is(info.readUInt16LE(0), 0x2 | 0x4, 'PVID | UNTAGGED');
  t.is(info.readUInt16LE(2), 100);
  const del = bridgeVlanMessage(8, 42, 1, false);
  t.is(del.readUInt16LE(4), 17, 'RTM_DELLINK removes the default VLAN');
  t.is(parseAttrs(parseAttrs(del, 32).get(26)!).get(2)!.readUInt16LE(0), 0);
});
