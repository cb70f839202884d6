// --net SPEC parsing and qemu argv building.
import test from 'ava';
import { TapbrokerError, buildNicArgs, childFdNumbers, exitCodeFor, libvirtInterfaceXml, nicArgs, parseArgs, parseLeaseArgs, parseNetSpec, shellQuote } from '@tapbroker/client';

test('a bare bridge spec takes the defaults', (t) => {
  t.deepEqual(parseNetSpec('bridge=br0'), { kind: 'tap', parent: 'br0', mode: null, network: false, queues: 1, vhost: false, mac: null, id: null, model: 'virtio-net-pci', name: null });
  t.deepEqual(parseNetSpec('macvtap=eth0'), { kind: 'macvtap', parent: 'eth0', mode: 'bridge', network: false, queues: 1, vhost: false, mac: null, id: null, model: 'virtio-net-pci', name: null });
});

test('every key', (t) => {
  t.deepEqual(parseNetSpec('bridge=br0,queues=4,vhost=on,mac=52:54:00:AA:BB:CC,id=lan,model=e1000,name=tb1000-vm0'), {
    kind: 'tap', parent: 'br0', mode: null, network: false, queues: 4, vhost: true, mac: '52:54:00:aa:bb:cc', id: 'lan', model: 'e1000', name: 'tb1000-vm0',
  });
  t.like(parseNetSpec('macvtap=eth0,mode=passthru,mac=52:54:00:aa:bb:01'), { kind: 'macvtap', parent: 'eth0', mode: 'passthru' });
});

const badSpec = test.macro({
  exec(t, spec: string, pattern: RegExp) {
    const err = t.throws(() => parseNetSpec(spec));
    t.is((err as TapbrokerError).code, 'TB_E_USAGE');
    t.regex(err!.message, pattern);
  },
  title: (what) => `spec refused: ${what}`,
});
test('no bridge', badSpec, 'queues=2', /exactly one of bridge=NAME, macvtap=PARENT or network=NAME/);
test('a network name with a comma trick', badSpec, 'network=a b', /network name/);
test('both bridge and macvtap', badSpec, 'bridge=br0,macvtap=eth0', /exactly one of/);
test('a mode for a tap', badSpec, 'bridge=br0,mode=vepa', /mode= is for macvtap/);
test('a mode that does not exist', badSpec, 'macvtap=eth0,mode=source', /mode must be one of/);
test('unknown key', badSpec, 'bridge=br0,script=/bin/sh', /unknown key `script'/);
test('repeated key', badSpec, 'bridge=br0,bridge=br1', /given twice/);
test('not key=value', badSpec, 'bridge=br0,vhost', /not key=value/);
test('queues zero', badSpec, 'bridge=br0,queues=0', /queues/);
test('queues text', badSpec, 'bridge=br0,queues=two', /queues/);
test('vhost yes', badSpec, 'bridge=br0,vhost=yes', /vhost must be on or off/);
test('multicast mac', badSpec, 'bridge=br0,mac=01:00:5e:00:00:01', /multicast/);
test('an id that would inject a qemu option', badSpec, 'bridge=br0,id=a.b=c', /id/);
test('a bridge name of 16 bytes', badSpec, 'bridge=br0123456789abcd', /16 bytes/);

test('one queue: fd= and no mq', (t) => {
  t.deepEqual(nicArgs({ id: 'net0', model: 'virtio-net-pci', mac: '52:54:00:12:34:56', tapFds: [3], vhostFds: [] }), [
    '-netdev', 'tap,id=net0,fd=3', '-device', 'virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56',
  ]);
});

test('four queues: fds=, mq=on and 2N+2 vectors', (t) => {
  t.deepEqual(nicArgs({ id: 'net0', model: 'virtio-net-pci', mac: '52:54:00:12:34:56', tapFds: [3, 4, 5, 6], vhostFds: [] }), [
    '-netdev', 'tap,id=net0,fds=3:4:5:6', '-device', 'virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,mq=on,vectors=10',
  ]);
});

test('vhost: vhostfd= for one queue, vhostfds= for several', (t) => {
  t.is(nicArgs({ id: 'n', model: 'virtio-net-pci', mac: null, tapFds: [3], vhostFds: [4] })[1], 'tap,id=n,fd=3,vhost=on,vhostfd=4');
  t.is(nicArgs({ id: 'n', model: 'virtio-net-pci', mac: null, tapFds: [3, 4], vhostFds: [5, 6] })[1], 'tap,id=n,fds=3:4,vhost=on,vhostfds=5:6');
});

test('never vnet_hdr= (qemu refuses it with fd=)', (t) => {
  const args = nicArgs({ id: 'n', model: 'virtio-net-pci', mac: null, tapFds: [3, 4], vhostFds: [5, 6] }).join(' ');
  t.notRegex(args, /vnet_hdr/);
});

test('a non-virtio model gets no mq options', (t) => {
  t.is(nicArgs({ id: 'n', model: 'e1000', mac: null, tapFds: [3, 4], vhostFds: [] })[3], 'e1000,netdev=n');
});

test('mismatched vhost fds are a bug, not a command line', (t) => {
  t.throws(() => nicArgs({ id: 'n', model: 'virtio-net-pci', mac: null, tapFds: [3, 4], vhostFds: [5] }));
});

test('child fds are numbered from 3 in order', (t) => {
  t.deepEqual(childFdNumbers([2, 0, 1, 1]), [[3, 4], [], [5], [6]]);
});

test('several NICs number their fds in order and get ids net0, net1…', (t) => {
  const { nets } = parseArgs(['qemu-args', '--net', 'bridge=br0,queues=2,vhost=on', '--net', 'bridge=br1,mac=52:54:00:00:00:02']);
  t.deepEqual(buildNicArgs(nets, null), [
    '-netdev', 'tap,id=net0,fds=3:4,vhost=on,vhostfds=5:6', '-device', 'virtio-net-pci,netdev=net0,mq=on,vectors=6',
    '-netdev', 'tap,id=net1,fd=7', '-device', 'virtio-net-pci,netdev=net1,mac=52:54:00:00:00:02',
  ]);
});

test('run needs a command; ids must be unique', (t) => {
  t.is((t.throws(() => parseArgs(['run', '--net', 'bridge=br0'])) as TapbrokerError).code, 'TB_E_USAGE');
  t.regex(t.throws(() => parseArgs(['run', '--net', 'bridge=br0,id=a', '--net', 'bridge=br1,id=a', '--', 'q']))!.message, /used twice/);
  t.deepEqual(parseArgs(['run', '--socket=/s', '--net', 'bridge=br0', '--', 'qemu', '-m', '256']).argv, ['qemu', '-m', '256']);
});

test('exit codes follow sysexits', (t) => {
  t.is(exitCodeFor('TB_E_USAGE'), 64);
  t.is(exitCodeFor('TB_E_INVALID_NAME'), 65);
  t.is(exitCodeFor('TB_E_CONNECT'), 69);
  t.is(exitCodeFor('TB_E_POLICY_DENIED'), 77);
  t.is(exitCodeFor('TB_E_QUOTA_EXCEEDED'), 77);
  t.is(exitCodeFor('TB_E_KERNEL'), 70);
});

test('shell quoting only where needed', (t) => {
  t.is(shellQuote('tap,id=net0,fd=3'), 'tap,id=net0,fd=3');
  t.is(shellQuote("it's"), `'it'\\''s'`);
});

test('create needs --persistent and exactly one kind', (t) => {
  t.regex(t.throws(() => parseLeaseArgs(['create', '--bridge', 'br0']))!.message, /--persistent/);
  t.regex(t.throws(() => parseLeaseArgs(['create', '--persistent']))!.message, /exactly one of --bridge, --network or --macvtap/);
  t.regex(t.throws(() => parseLeaseArgs(['create', '--persistent', '--bridge', 'br0', '--mode', 'vepa']))!.message, /--mode is for --macvtap/);
  t.like(parseLeaseArgs(['create', '--persistent', '--macvtap', 'eth0', '--mode', 'vepa', '--mac', '52:54:00:AA:BB:02', '--xml']), { macvtap: 'eth0', mode: 'vepa', mac: '52:54:00:aa:bb:02', output: 'xml' });
  t.like(parseLeaseArgs(['release', 'tb1000-x']), { command: 'release', name: 'tb1000-x' });
});

test('libvirt XML for a precreated device', (t) => {
  const xml = libvirtInterfaceXml({ kind: 'tap', name: 'tb1000-vm0', mac: '52:54:00:12:34:56', queues: 4 });
  t.regex(xml, /<interface type='ethernet'>/);
  t.regex(xml, /<target dev='tb1000-vm0' managed='no'\/>/);
  t.regex(xml, /<mac address='52:54:00:12:34:56'\/>/);
  t.regex(xml, /<driver queues='4'\/>/);
  t.notRegex(libvirtInterfaceXml({ kind: 'macvtap', name: 'tb1000-m', mac: '52:54:00:12:34:57', queues: 1 }), /driver/);
});
