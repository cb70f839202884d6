// Opens an existing tap by name the way libvirt does for managed='no' (TUNSETIFF, no IFF_TUN_EXCL),
// as whatever user runs it; prints {"ok":true} or {"ok":false,"code":"EPERM"}.
import fs from 'node:fs';
import { IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, TUNSETIFF, tunIfreq } from '@tapbroker/broker';
import { sys } from '@tapbroker/protocol';

const [name, mq] = process.argv.slice(2) as [string, string | undefined];
const fd = fs.openSync('/dev/net/tun', 'r+');
try {
  sys.ioctlPtr(fd, TUNSETIFF, tunIfreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (mq === 'mq' ? IFF_MULTI_QUEUE : 0)));
  process.stdout.write(`${JSON.stringify({ ok: true })}\n`);
} catch (err) {
  process.stdout.write(`${JSON.stringify({ ok: false, code: (err as sys.SyscallError).code })}\n`);
} finally {
  fs.closeSync(fd);
}
