// The client's `--net SPEC` grammar (netspec.ts): exactly one of bridge=, macvtap= or network=, then
// optional keys in any order, each at most once, each value checked before anything reaches the broker
// or qemu's command line. Every refusal is TB_E_USAGE, with a message that quotes the SPEC (control
// characters escaped) and names what is wrong. client.test.ts covers dev.KEY and the qemu arguments
// built from a SPEC; this file covers every other key.
import test, { type ExecutionContext } from 'ava';
import { MACVTAP_MODES, MAX_QUEUES } from '@tapbroker/protocol';
import { DEFAULT_MODEL, TapbrokerError, parseNetSpec, type NetSpec } from '@tapbroker/client';

const TAP: NetSpec = {
  kind: 'tap', parent: 'br0', mode: null, network: false, queues: 1, vhost: false, mac: null, id: null,
  model: DEFAULT_MODEL, props: [], name: null,
};

/** The message of the TB_E_USAGE error `spec` is refused with (fails the test on any other outcome). */
function refusal(t: ExecutionContext, spec: string): string {
  const err = t.throws(() => parseNetSpec(spec), { instanceOf: TapbrokerError });
  t.is((err as TapbrokerError | undefined)?.code, 'TB_E_USAGE', spec);
  return err?.message ?? '';
}

const refused = test.macro({
  exec(t, spec: string, why: string) {
    t.is(refusal(t, spec), `--net ${spec}: ${why}`);
  },
  title: (what, spec: string) => `refused: ${what ?? spec}`,
});

test('bridge=NAME alone: a tap on that bridge with every default', (t) => {
  t.deepEqual(parseNetSpec('bridge=br0'), TAP);
  t.is(DEFAULT_MODEL, 'virtio-net-pci');
});

test('macvtap=PARENT alone: a macvtap in bridge mode', (t) => {
  t.deepEqual(parseNetSpec('macvtap=eth0'), { ...TAP, kind: 'macvtap', parent: 'eth0', mode: 'bridge' });
});

test('network=NAME alone: a tap whose parent names a network, not a bridge', (t) => {
  t.deepEqual(parseNetSpec('network=lab-2.v6_x'), { ...TAP, parent: 'lab-2.v6_x', network: true });
});

for (const mode of MACVTAP_MODES) {
  test(`mode=${mode} is taken for a macvtap`, (t) => {
    t.is(parseNetSpec(`macvtap=eth0,mode=${mode}`).mode, mode);
  });
}

test('queues=N from 1 to MAX_QUEUES', (t) => {
  t.is(MAX_QUEUES, 126);
  t.is(parseNetSpec('bridge=br0,queues=1').queues, 1);
  t.is(parseNetSpec('bridge=br0,queues=8').queues, 8);
  t.is(parseNetSpec(`bridge=br0,queues=${MAX_QUEUES}`).queues, MAX_QUEUES);
});

test('vhost=on and vhost=off', (t) => {
  t.true(parseNetSpec('bridge=br0,vhost=on').vhost);
  t.false(parseNetSpec('bridge=br0,vhost=off').vhost);
  t.true(parseNetSpec('macvtap=eth0,vhost=on').vhost, 'for a macvtap too');
});

test('mac=MAC is kept in lower case', (t) => {
  t.is(parseNetSpec('bridge=br0,mac=52:54:00:12:34:56').mac, '52:54:00:12:34:56');
  t.is(parseNetSpec('bridge=br0,mac=52:54:00:AB:cD:EF').mac, '52:54:00:ab:cd:ef');
});

test('id=ID: a letter, then up to 31 of A-Z a-z 0-9 _ . -', (t) => {
  t.is(parseNetSpec('bridge=br0,id=n').id, 'n');
  t.is(parseNetSpec('bridge=br0,id=Lan_0.a-b').id, 'Lan_0.a-b');
  t.is(parseNetSpec(`bridge=br0,id=a${'b'.repeat(31)}`).id, `a${'b'.repeat(31)}`);
});

test('model=MODEL names the -device; model=none leaves it to the user', (t) => {
  t.is(parseNetSpec('bridge=br0,model=e1000').model, 'e1000');
  t.is(parseNetSpec('bridge=br0,model=rtl8139_x-1').model, 'rtl8139_x-1');
  t.is(parseNetSpec('bridge=br0,model=none').model, null);
});

test('name=IFNAME is passed on for the broker to check against its prefix', (t) => {
  t.is(parseNetSpec('bridge=br0,name=tb1000-vm0').name, 'tb1000-vm0');
  t.is(parseNetSpec('macvtap=eth0,name=tb0-x').name, 'tb0-x');
});

test('keys may come in any order, the kind key included', (t) => {
  const spec = parseNetSpec('mac=52:54:00:00:00:01,queues=2,name=tb0-a,model=virtio-net-device,id=x,vhost=on,mode=vepa,'
    + 'macvtap=eth1');
  t.deepEqual(spec, {
    kind: 'macvtap', parent: 'eth1', mode: 'vepa', network: false, queues: 2, vhost: true, mac: '52:54:00:00:00:01',
    id: 'x', model: 'virtio-net-device', props: [], name: 'tb0-a',
  });
});

test('several queues need a virtio-net model (or model=none)', (t) => {
  const err = t.throws(() => parseNetSpec('bridge=br0,queues=2,model=e1000'));
  t.regex(err!.message, /queues=2 needs a virtio-net model: e1000 has one queue \(or model=none/);
  t.is(parseNetSpec('bridge=br0,queues=2,model=none').queues, 2);
  t.is(parseNetSpec('bridge=br0,queues=1,model=e1000').model, 'e1000');
});

test('a network takes the keys a tap takes', (t) => {
  t.deepEqual(parseNetSpec('network=lab,queues=4,vhost=on,mac=02:00:00:00:00:01,id=lan,model=none,name=tb0-n'), {
    ...TAP, parent: 'lab', network: true, queues: 4, vhost: true, mac: '02:00:00:00:00:01', id: 'lan', model: null,
    name: 'tb0-n',
  });
});

test('every refusal is a TapbrokerError with code TB_E_USAGE that quotes the SPEC', (t) => {
  for (const spec of ['', 'queues=2', 'bridge=br0,frob=1', 'bridge=br0,queues=0', 'bridge=br0,mac=x', 'bridge=br0,id=1']) {
    t.true(refusal(t, spec).startsWith(`--net ${spec}: `), spec);
  }
});

// One of bridge=, macvtap=, network=.
const oneOf = 'exactly one of bridge=NAME, macvtap=PARENT or network=NAME is required';
test('no kind key', refused, 'queues=2,vhost=on', oneOf);
test('bridge and network', refused, 'bridge=br0,network=lab', oneOf);
test('macvtap and network', refused, 'network=lab,macvtap=eth0', oneOf);
test('all three', refused, 'bridge=br0,macvtap=eth0,network=lab', oneOf);

// Keys given twice, each key.
for (const [key, value] of [
  ['bridge', 'br0'], ['macvtap', 'eth0'], ['network', 'lab'], ['mode', 'vepa'], ['queues', '2'], ['vhost', 'on'],
  ['mac', '52:54:00:00:00:01'], ['id', 'a'], ['model', 'e1000'], ['name', 'tb0-a'],
] as const) {
  const kind = key === 'macvtap' || key === 'mode' ? 'macvtap=eth0' : key === 'network' ? 'network=lab' : 'bridge=br0';
  const spec = key === 'bridge' || key === 'macvtap' || key === 'network'
    ? `${key}=${value},${key}=${value}`
    : `${kind},${key}=${value},${key}=${value}`;
  test(`${key} given twice, even with one value`, refused, spec, `\`${key}' given twice`);
}

// Not key=value.
test('an empty SPEC', refused, '', "`' is not key=value");
test('a trailing comma', refused, 'bridge=br0,', "`' is not key=value");
test('a leading comma', refused, ',bridge=br0', "`' is not key=value");
test('an empty key', refused, 'bridge=br0,=x', "`=x' is not key=value");
test('a bare word', refused, 'br0', "`br0' is not key=value");

// Unknown keys: names are case-sensitive, and the message lists the known ones.
const known = 'known: bridge, macvtap, network, mode, queues, vhost, mac, id, model, name, dev.KEY';
test('a key in the wrong case', refused, 'Bridge=br0', `unknown key \`Bridge'; ${known}`);
test('a key the grammar lacks', refused, 'bridge=br0,vlan=3', `unknown key \`vlan'; ${known}`);
test('a qemu -netdev option', refused, 'bridge=br0,fd=3', `unknown key \`fd'; ${known}`);

// Names.
test('an empty bridge name', refused, 'bridge=', "bridge name `' is empty");
test('a bridge name with a slash', refused, 'bridge=a/b', "bridge name `a/b' may only contain A-Z a-z 0-9 _ . -");
test('a bridge named ..', refused, 'bridge=..', "bridge name `..' is not a usable name");
test('a macvtap parent of 16 bytes', refused, `macvtap=${'e'.repeat(16)}`,
  `parent name \`${'e'.repeat(16)}' is 16 bytes long; the kernel allows at most 15`);
test('a parent name with a space', refused, 'macvtap=eth 0', "parent name `eth 0' may only contain A-Z a-z 0-9 _ . -");
test('an empty network name', refused, 'network=', "network name `' must be 1-64 characters of A-Z a-z 0-9 _ . -");
test('a network name of 65 characters', refused, `network=${'n'.repeat(65)}`,
  `network name \`${'n'.repeat(65)}' must be 1-64 characters of A-Z a-z 0-9 _ . -`);
test('a network name with a slash', refused, 'network=a/b', "network name `a/b' must be 1-64 characters of A-Z a-z 0-9 _ . -");
test('an interface name of 16 bytes', refused, `bridge=br0,name=tb1000-${'x'.repeat(9)}`,
  `name \`tb1000-${'x'.repeat(9)}' is 16 bytes long; the kernel allows at most 15`);
test('an interface name with a colon', refused, 'bridge=br0,name=tb0-a:1', "name `tb0-a:1' may only contain A-Z a-z 0-9 _ . -");
test('an interface named .', refused, 'bridge=br0,name=.', "name `.' is not a usable name");
test('an empty interface name', refused, 'bridge=br0,name=', "name `' is empty");

// mode=.
test('a mode for a network', refused, 'network=lab,mode=bridge', 'mode= is for macvtap');
test('a mode in upper case', refused, 'macvtap=eth0,mode=VEPA', 'mode must be one of bridge, vepa, private, passthru');
test('an empty mode', refused, 'macvtap=eth0,mode=', 'mode must be one of bridge, vepa, private, passthru');

// queues=: digits alone, no sign, no leading zero, from 1 to MAX_QUEUES; one message for every refusal.
const badQueues = (q: string) => `queues must be a whole number from 1 to 126, not \`${q}'`;
for (const [what, q] of [
  ['above MAX_QUEUES', '127'], ['of five digits', '10000'], ['negative', '-1'], ['fractional', '1.5'],
  ['written as a decimal fraction', '2.0'], ['with a sign', '+2'], ['in hex', '0x2'], ['in exponent form', '1e1'],
  ['with a space', ' 2'], ['with a leading zero', '02'], ['of zeros before a value in range', '00002'], ['zero', '0'],
  ['in words', 'two'], ['empty', ''],
] as const) test(`queues ${what}`, refused, `bridge=br0,queues=${q}`, badQueues(q));

// vhost=.
for (const v of ['ON', 'yes', '1', 'true', '']) {
  test(`vhost=${v}`, refused, `bridge=br0,vhost=${v}`, `vhost must be on or off, not \`${v}'`);
}

// mac=.
const macForm = 'must be six lower-case hex octets separated by colons';
for (const mac of ['52:54:00:12:34', '52:54:00:12:34:56:78', '52-54-00-12-34-56', '5254.0012.3456', '52:54:00:12:34:5g',
  '52:54:0:12:34:56', '']) {
  test(`mac=${mac}`, refused, `bridge=br0,mac=${mac}`, `mac \`${mac}' ${macForm}`);
}
test('an all-zero MAC', refused, 'bridge=br0,mac=00:00:00:00:00:00', "mac `00:00:00:00:00:00' is all zeros");
test('the broadcast MAC, quoted in lower case', refused, 'bridge=br0,mac=FF:FF:FF:FF:FF:FF',
  "mac `ff:ff:ff:ff:ff:ff' is a multicast address");
test('a multicast MAC of a macvtap', refused, 'macvtap=eth0,mac=33:33:00:00:00:01',
  "mac `33:33:00:00:00:01' is a multicast address");

// id= and model=: values qemu reads in an option list.
const idRule = 'must start with a letter and use A-Z a-z 0-9 _ . - (at most 32)';
for (const id of ['', '1net', '_n', `a${'b'.repeat(32)}`, 'a:b', 'a b', 'a=b']) {
  test(`id=${id}`, refused, `bridge=br0,id=${id}`, `id \`${id}' ${idRule}`);
}
for (const model of ['', 'virtio net', 'a.b', 'e1000=x', 'x'.repeat(65)]) {
  test(`model=${model.length > 20 ? `${model.length} characters` : model}`, refused, `bridge=br0,model=${model}`,
    `model \`${model}' is not a device model name`);
}

// Control characters: refused before any message quotes the SPEC, and shown escaped.
for (const [what, c, shown] of [
  ['an escape', '\u001b', '\\x1b'], ['a newline', '\n', '\\x0a'], ['a DEL', '\u007f', '\\x7f'],
  ['a C1 CSI', '\u009b', '\\x9b'], ['a NUL', '\u0000', '\\x00'],
] as const) {
  test(`a SPEC with ${what} is refused, the character shown as ${shown}`, (t) => {
    const message = refusal(t, `bridge=br${c}0,id=a${c}b`);
    t.is(message, `--net bridge=br${shown}0,id=a${shown}b: has a control character`);
  });
}
