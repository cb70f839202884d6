// Names and MACs the broker picks (naming.ts): a name no other user can mimic that the kernel takes,
// and random MACs inside a rule's prefix. (printable, its third export, is not in
// @tapbroker/broker/internal: spec.test.ts tests it through checkSpec's messages.)
import test from 'ava';
import { checkIfName, checkMac } from '@tapbroker/protocol';
import { namePrefix, randomMac, tapName } from '@tapbroker/broker/internal';

const draws = <T>(n: number, f: () => T): T[] => Array.from({ length: n }, f);

test('the prefix names the uid', (t) => {
  t.is(namePrefix(0), 'tb0-');
  t.is(namePrefix(1000), 'tb1000-');
  t.is(namePrefix(4294967294), 'tb4294967294-');
});

// The random part: as many base-36 characters as fit 15 bytes, 6 at most, 2 at least.
for (const [uid, randomChars] of [[0, 6], [1000, 6], [65534, 6], [1234567, 5], [12345678, 4], [4294967294, 2]] as const) {
  test(`uid ${uid}: tb${uid}- and ${randomChars} random characters, a name the kernel takes`, (t) => {
    for (const name of draws(50, () => tapName(uid))) {
      t.true(name.startsWith(`tb${uid}-`), name);
      t.regex(name.slice(`tb${uid}-`.length), new RegExp(`^[0-9a-z]{${randomChars}}$`), name);
      t.is(checkIfName(name), null, name);
    }
  });
}

test("one uid's prefix is never a prefix of another's names", (t) => {
  // The dash ends the uid: tb1- cannot begin a name of uid 10 or 100.
  for (const name of draws(50, () => tapName(10))) t.false(name.startsWith(namePrefix(1)), name);
});

test('names are random: many draws, few repeats, every base-36 character used', (t) => {
  const names = draws(2000, () => tapName(1000));
  t.true(new Set(names).size >= 1990, 'six characters from 36: a repeat in 2000 draws is rare');
  const used = new Set(names.flatMap((n) => [...n.slice('tb1000-'.length)]));
  t.is(used.size, 36, [...used].sort().join(''));
});

test('a MAC inside each prefix length, in the form checkMac takes', (t) => {
  for (const prefix of ['52', '52:54', '52:54:00', '02:aa:bb:cc', '02:00:5e:10:20']) {
    for (const mac of draws(50, () => randomMac(prefix))) {
      t.true(mac.startsWith(`${prefix}:`), `${mac} in ${prefix}`);
      t.is(checkMac(mac), null, mac);
    }
  }
});

test('a six-octet prefix is the MAC itself', (t) => {
  t.is(randomMac('52:54:00:12:34:56'), '52:54:00:12:34:56');
});

test('an all-zero prefix never yields the all-zero MAC (which a caller could not ask for)', (t) => {
  // 1 in 256 draws would be all zeros without the redraw: 5,000 draws see it about 20 times.
  for (const mac of draws(5000, () => randomMac('00:00:00:00:00'))) t.is(checkMac(mac), null, mac);
});

test('the octets after the prefix are random: each takes many values, small ones padded', (t) => {
  const macs = draws(2000, () => randomMac('52:54:00'));
  t.true(new Set(macs).size >= 1990, '2^24 MACs: a repeat in 2000 draws is rare');
  for (const i of [3, 4, 5]) {
    const octets = new Set(macs.map((m) => m.split(':')[i]));
    t.true(octets.size > 200, `octet ${i} took ${octets.size} values`);
    t.true([...octets].some((o) => o!.startsWith('0')), 'values below 0x10 are written with two digits');
  }
});
