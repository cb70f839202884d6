// Names and MACs the broker picks (naming.ts): a name no other user can mimic that the kernel takes,
// random MACs inside a rule's prefix, and text as an operator is shown it (shown, auditJson; printable is tested
// through checkSpec's messages in spec.test.ts).
import test from 'ava';
import { TapbrokerError, checkIfName, checkMac } from '@tapbroker/protocol';
import {
  SHOWN_BYTES, auditJson, bytesShown, createNamed, freeMac, namePrefix, randomMac, shown, tapName,
} from '@tapbroker/broker/internal';

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

// Found by an outside re-test: a hand-made list of characters to escape let a zero-width space through (a deny of
// `nobody<U+200B>' read as a deny of nobody in who-can, check-policy and the log), and an unescaped backslash made
// the four characters `\x1b' print as an escaped ESC does.
const HIDDEN_SAMPLES = [
  '\u200b', '\u200c', '\u200d', '\u2060', '\u2064', '\ufeff', '\u00ad', '\u180e', '\ufe0f', '\u{e0041}', '\u{e007f}',
  '\u115f', '\u3164', '\ue000', '\u{f0000}', '\u0378', '\ud800', '\u202e', '\u2066', '\u2028', '\u0085', '\u001b', '\u007f',
];

test('shown escapes every character that renders as nothing or acts on a terminal, and doubles a backslash', (t) => {
  for (const c of HIDDEN_SAMPLES) {
    const out = shown(`a${c}b`);
    t.regex(out, /^a\\(x[0-9a-f]{2}|u\{[0-9a-f]+\})b$/, JSON.stringify(c));
  }
  t.is(shown('nobody\u200b'), 'nobody\\u{200b}');
  t.is(shown('\u{e0041}'), '\\u{e0041}', 'an astral character is escaped whole');
  t.is(shown('10-a\\x1b.toml'), '10-a\\\\x1b.toml', 'a backslash is doubled');
  t.not(shown('10-a\\x1b.toml'), shown('10-a\x1b.toml'), 'the escape of ESC and its four characters differ');
  for (const plain of ['br0', 'caf\u00e9', '\u65e5\u672c', 'a-b_c.d', 'emoji \u{1f600}', '']) t.is(shown(plain), plain);
});

test('auditJson escapes the same characters as \\uNNNN and stays JSON that reads back the same', (t) => {
  for (const c of HIDDEN_SAMPLES) {
    const v = { name: `a${c}b`, list: [c] };
    const out = auditJson(v);
    t.regex(out, /^[\x20-\x7e]*$/, `${JSON.stringify(c)}: only printable ASCII`);
    t.deepEqual(JSON.parse(out), v);
  }
  t.is(auditJson({ n: 'x\u{e0041}' }), '{"n":"x\\udb40\\udc41"}', 'an astral character as its surrogate pair');
  t.is(auditJson({ n: 'caf\u00e9' }), '{"n":"caf\u00e9"}', 'visible text stays as it is');
});

// Found by an outside review: a program path of 4,000 non-ASCII bytes (and a client name of 128 astral characters)
// made every record of its caller some 40 KB, and one uid wrote MB/s of audit.
test('a program\'s bytes as records show them: escaped, at most SHOWN_BYTES, the rest counted by a mark none forges', (t) => {
  t.is(bytesShown(Buffer.from('/usr/bin/qemu\\x\xff')), '/usr/bin/qemu\\\\x\\xc3\\xbf');
  const long = bytesShown(Buffer.alloc(4000, 0xe9));
  t.is(long, `${'\\xe9'.repeat(SHOWN_BYTES)}\\+${4000 - SHOWN_BYTES}`);
  t.is(bytesShown(Buffer.from('abcdef'), 4), 'abcd\\+2');
  // A path that holds the mark's characters shows them with the backslash doubled: never the mark.
  t.is(bytesShown(Buffer.from('a\\+2')), 'a\\\\+2');
});

// Found as a flaky test: from a prefix of 256 MACs with 96 taken, eight draws all hit taken ones about once in 200
// runs, and the eighth was granted though in use.
test('freeMac finds the last free MAC of a short prefix, and says when there is none', (t) => {
  const prefix = '52:54:00:12:34';
  const all = Array.from({ length: 256 }, (_, i) => `${prefix}:${i.toString(16).padStart(2, '0')}`);
  for (let round = 0; round < 20; round++) {
    const left = all[(round * 37) % 256]!;
    t.is(freeMac(prefix, (m) => m !== left), left);
  }
  t.is(freeMac(prefix, () => true), null);
  t.is(freeMac('52:54:00:12:34:56', () => false), '52:54:00:12:34:56');
  t.is(freeMac('52:54:00', () => true), null, 'a long prefix: eight misses and it is taken for full');
  const two = freeMac('52:54:00:12', (m) => m !== '52:54:00:12:ab:cd');
  t.is(two, '52:54:00:12:ab:cd');
});

// Found by an outside audit: a broker-chosen name was drawn again only when the kernel had it, not while a `down` of
// a device of that name still ran (a uid of ten digits leaves two random characters: 4 overlaps in 241 creates).
test('createNamed draws again a name still held by another device\'s down or up', (t) => {
  const uid = 4000000001;
  const made: string[] = [];
  // The first eight names drawn are held, the ninth is not (by its draw, not its name: two random characters draw a
  // name twice in nine about once in 160 runs, which made a CI run fail when it was by name).
  let draws = 0;
  const got = createNamed(uid, null, () => ++draws < 9, (name) => (made.push(name), { ok: true }));
  t.true(draws >= 9, 'eight held names drawn, then one not held');
  t.deepEqual(made, [got.name], 'only a name not held reaches the kernel step');
  t.regex(got.name, new RegExp(`^tb${uid}-[a-z0-9]{2}$`));
  const refused = t.throws(() => createNamed(uid, null, () => true, () => ({ ok: true }))) as TapbrokerError;
  t.is(refused.message, `every name the broker picks for uid ${uid} (\`tb${uid}-' and 2 characters) is taken`);
  t.is(refused.hint, 'name the device yourself (name=…)');
  // A name the caller asked for is its own business (refused before, as busy, by the admission).
  t.like(createNamed(uid, 'tbmine', () => true, () => ({ ok: true })), { name: 'tbmine', ok: true });
});

// Found by an outside review: a ten-digit uid's names have two random characters (1,296 names), and nine random
// draws then a refusal failed ever more of its creates from about 600 devices on, naming a device it never asked
// for. Past eight draws, a name of three random characters or fewer is looked for among all of them.
test('createNamed finds the one free name among a ten-digit uid\'s 1,296, and says so when none is', (t) => {
  const uid = 4000000002;
  const all: string[] = [];
  for (const a of '0123456789abcdefghijklmnopqrstuvwxyz') {
    for (const b of '0123456789abcdefghijklmnopqrstuvwxyz') all.push(`tb${uid}-${a}${b}`);
  }
  t.is(all.length, 1296);
  const free = all[777]!;
  const present = new Set(all.filter((n) => n !== free));
  let listed = 0;
  const exists = (name: string) => {
    if (present.has(name)) throw new TapbrokerError('TB_E_DEVICE_EXISTS', `a device named \`${name}' already exists`);
    return { ok: true };
  };
  const got = createNamed(uid, null, () => false, exists, () => (listed++, present));
  t.is(got.name, free);
  t.is(listed, 1, 'the kernel\'s names are listed once, and only past the random draws');
  const full = t.throws(() => createNamed(uid, null, () => false, exists, () => new Set(all))) as TapbrokerError;
  t.is(full.code, 'TB_E_DEVICE_EXISTS');
  t.regex(full.message, /^every name the broker picks for uid 4000000002 .* is taken$/);
  // Six random characters (a short uid): the random draws alone, as the space is far too large to fill.
  let drawn = 0;
  t.regex(createNamed(1000, null, () => false, (n) => (++drawn < 3 ? exists(`tb${uid}-00`) : { ok: true, n }),
    () => t.fail('listed') as never).name, /^tb1000-[a-z0-9]{6}$/);
});
