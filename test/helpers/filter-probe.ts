// Run as root inside a test's namespace: two sockets on the kernel's link events, one with the link monitor's
// filter (SKIP_BRIDGE_VIEWS), one without; a bridge and a tap on it made, brought up and deleted; every message
// read from each. Prints {filtered, unfiltered} as one JSON line: for each, the count of messages by family.
import { execFileSync } from 'node:child_process';
import { sys } from '@tapbroker/protocol';
import { SKIP_BRIDGE_VIEWS, attachFilter } from '@tapbroker/broker/internal';

const open = (filtered: boolean) => {
  const fd = sys.socket(sys.AF_NETLINK, sys.SOCK_RAW | sys.SOCK_CLOEXEC, sys.NETLINK_ROUTE);
  const sa = Buffer.alloc(12);
  sa.writeUInt16LE(sys.AF_NETLINK, 0);
  sa.writeUInt32LE(1 /* RTMGRP_LINK */, 8);
  sys.bind(fd, sa, 'RTMGRP_LINK');
  if (filtered) attachFilter(fd, SKIP_BRIDGE_VIEWS);
  return fd;
};
const socks = { filtered: open(true), unfiltered: open(false) };
execFileSync('ip', ['-batch', '-'], { input: 'link add fbr0 type bridge\ntuntap add ftap0 mode tap\n'
  + 'link set ftap0 master fbr0\nlink set ftap0 up\nlink set fbr0 up\nlink del ftap0\nlink del fbr0\n' });
const rx = new sys.Receiver(64 * 1024);
const out: Record<string, Record<string, number>> = {};
for (const [name, fd] of Object.entries(socks)) {
  const counts: Record<string, number> = {};
  for (let m = rx.recv(fd, sys.MSG_DONTWAIT); m !== null; m = rx.recv(fd, sys.MSG_DONTWAIT)) {
    // One message each, as the kernel sends notifications: ifinfomsg's family at 16.
    const family = String(m.data.readUInt8(16));
    counts[family] = (counts[family] ?? 0) + 1;
  }
  out[name] = counts;
  sys.close(fd);
}
process.stdout.write(`${JSON.stringify(out)}\n`);
