// The man pages and README say what the code does: every option, command, policy key and MESSAGE_ID.
import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { AUDIT_OPS, MESSAGE_IDS, POLICY_KEYS, PRIORITY } from '@tapbroker/broker/internal';
import { parsePolicy } from '@tapbroker/broker';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const read = (f: string) => fs.readFileSync(path.join(root, f), 'utf8');
// roff escapes hyphens as \- ; compare on the rendered text.
const man = (f: string) => read(f).replace(/\\-/g, '-').replace(/\\\(em/g, '—');

const mentions = test.macro({
  exec(t, file: string, words: string[]) {
    const text = man(file);
    t.deepEqual(words.filter((w) => !text.includes(w)), [], `${file} does not mention them`);
  },
  title: (what) => `docs: ${what}`,
});

test('tapbrokerd(8) documents every option and subcommand', mentions, 'packages/broker/man/tapbrokerd.8',
  ['-n', '-f', '-s', '-m', '-g', '-T', '--state-dir', '--audit-file', '--journal-socket', '--linux-audit', '--idle-exit', 'check-policy', 'explain-policy', 'who-can', 'import-bridge-conf', 'test-policy', '--strict', 'SIGHUP', 'SIGTERM', 'LISTEN_FDS', 'NOTIFY_SOCKET', 'EXIT STATUS', 'FILES', 'SEE ALSO']);
test('tapbroker(1) documents every command', mentions, 'packages/client/man/tapbroker.1',
  ['run', 'qemu-args', 'create', '--persistent', 'list', 'release', 'can', 'reload', '.SH ENVIRONMENT', 'TAPBROKER_SOCKET', 'bridge=', 'macvtap=', 'queues=', 'vhost=', 'EXIT STATUS', 'SEE ALSO']);
test('tapbroker-policy(5) has a section for every table', mentions, 'packages/broker/man/tapbroker-policy.5',
  ['.SH ALLOW RULES', '.SH DENY RULES', '.SH NETWORKS', 'EXAMPLES', 'FILES', 'SEE ALSO']);

// The key list comes from the policy's schemas: a key added to the code and not to the page fails here.
test('tapbroker-policy(5) documents every key of every table, as a term in that table\'s section', (t) => {
  const page = man('packages/broker/man/tapbroker-policy.5');
  const section = (title: string) => {
    const start = page.indexOf(`.SH ${title}`);
    t.true(start >= 0, `section ${title}`);
    const end = page.indexOf('\n.SH ', start + 1);
    return page.slice(start, end < 0 ? undefined : end);
  };
  // A term: `.TP` then a line that names the key in bold (`.B key`, `.BR a ", " key`, `.BI [network. NAME ]`).
  const terms = (text: string) => new Set([...text.matchAll(/^\.TP\n\.B[IR]? (.*)$/gm)]
    .flatMap((m) => m[1]!.replace(/"[^"]*"/g, ' ').split(/\s+/)).filter(Boolean));
  const missing = (keys: readonly string[], text: string) => keys.filter((k) => !terms(text).has(k));
  t.deepEqual(missing(POLICY_KEYS.top.filter((k) => k === 'version'), section('FORMAT')), []);
  t.true(section('FORMAT').includes('[network.'), 'FORMAT names the network tables');
  t.deepEqual(missing(POLICY_KEYS.rule, section('ALLOW RULES')), [], 'allow rule keys');
  t.deepEqual(missing(POLICY_KEYS.deny, section('DENY RULES')), [], 'deny rule keys');
  t.deepEqual(missing(POLICY_KEYS.network, section('NETWORKS')), [], 'network keys');
  for (const k of POLICY_KEYS.macvtap) t.true(section('ALLOW RULES').includes(k), `macvtap key ${k}`);
});

// Found by an outside review: the page's list of ops lacked six the broker writes (connection floods, hostile frames,
// the counts of suppressed records), so a filter built from it missed them.
test('tapbrokerd(8) lists every audit op the broker writes, and nothing more', (t) => {
  const page = man('packages/broker/man/tapbrokerd.8');
  const field = page.slice(page.indexOf('.B op\nThe request:'), page.indexOf('.B decision\n'));
  t.true(field.length > 0, 'the op field');
  const listed = new Set([...field.matchAll(/^\.BR? ([a-z-]+)/gm)].map((m) => m[1]!).filter((w) => w !== 'op' && w !== 'down'));
  t.deepEqual([...listed].sort(), [...AUDIT_OPS, 'suppressed'].sort());
});

test('tapbrokerd(8) gives the journal PRIORITY of every kind of record', (t) => {
  const page = man('packages/broker/man/tapbrokerd.8').replace(/\n/g, ' ');
  const said = /PRIORITY \(([^)]*)\)/.exec(page)?.[1] ?? '';
  const levels = new Map<string, number>();
  for (const part of said.split(';')) {
    const level = Number(/(\d) for/.exec(part)?.[1]);
    for (const kind of part.replace(/^.*\d for/, '').split(/,| and /)) if (kind.trim()) levels.set(kind.trim(), level);
  }
  t.deepEqual(Object.fromEntries([...levels].sort()), Object.fromEntries(Object.entries(PRIORITY).sort()));
});

test('every journald MESSAGE_ID in the code is in tapbrokerd(8) and PROTOCOL.md', (t) => {
  for (const [kind, id] of Object.entries(MESSAGE_IDS)) {
    t.true(man('packages/broker/man/tapbrokerd.8').includes(id), `${kind} ${id} in tapbrokerd(8)`);
    t.true(read('docs/PROTOCOL.md').includes(id), `${kind} ${id} in PROTOCOL.md`);
  }
});

test('README links the documentation that exists', (t) => {
  for (const f of ['docs/PROTOCOL.md', 'SECURITY.md', 'packages/broker/man/tapbrokerd.8', 'packages/client/man/tapbroker.1', 'packages/broker/man/tapbroker-policy.5']) t.true(fs.existsSync(path.join(root, f)), f);
  t.regex(read('README.md'), /SECURITY\.md/);
});

// Found by an outside review: an example the page itself gives did not load (a name_pattern its own rules refuse).
test('every policy in tapbroker-policy(5)\'s EXAMPLES loads', (t) => {
  const page = man('packages/broker/man/tapbroker-policy.5');
  const examples = page.slice(page.indexOf('.SH EXAMPLES'), page.indexOf('.SH FILES'));
  const policies = [...examples.matchAll(/^\.EX\n([\s\S]*?)^\.EE$/gm)].map((m) => m[1]!.replace(/\\\(oq|\\\(cq/g, "'"))
    .filter((text) => /^\[\[(rule|deny)\]\]$/m.test(text));
  t.true(policies.length >= 5, `${policies.length} examples`);
  for (const text of policies) {
    try {
      parsePolicy(text, 'example');
    } catch (err) {
      t.fail(`${(err as Error).message}\n${text}`);
    }
  }
});

test('tapbroker-policy(5) names every sandbox setting of the shipped unit that a hook runs under', (t) => {
  // Found by an outside review: a hook setting a sysctl failed under ProcSubset=pid and ProtectKernelTunables=yes,
  // which the page's account of the sandbox left out.
  const unit = read('systemd/tapbrokerd.service').split('\n').filter((l) => !l.startsWith('#')).join('\n');
  const page = read('packages/broker/man/tapbroker-policy.5').replace(/\\-/g, '-');
  // What the unit says, and how the page says it.
  const limits = [['ProtectSystem=strict'], ['PrivateTmp=yes', 'a private\n.IR /tmp'], ['RestrictAddressFamilies='],
    ['IPAddressDeny=any'], ['ProcSubset=pid'], ['ProtectKernelTunables=yes'], ['CAP_NET_ADMIN'], ['CAP_AUDIT_WRITE'],
    ['ReadWritePaths=-/proc/sys/net/ipv6/conf']];
  for (const [inUnit, onPage = inUnit] of limits) if (unit.includes(inUnit!)) t.true(page.includes(onPage!), inUnit);
  // The drop-ins that lift them.
  if (unit.includes('ProcSubset=pid')) t.true(page.includes('ProcSubset=all'), 'ProcSubset=all');
  t.true(unit.includes('ProtectKernelTunables=yes'));
  t.true(page.includes('ReadWritePaths=/proc/sys/net/ipv4/conf'), 'the drop-in for an IPv4 sysctl');
});

// Found by an outside review of SECURITY.md as a contract: it named a test that does not exist and sent readers to
// the wrong file for three more. Every `dir › file › title` it names (a `…` in a title stands for words left out;
// a reference that starts with `…` is in the file of the one before) is a test in that file.
test('every test SECURITY.md names is a test in the file it names', (t) => {
  const sources = new Map<string, string>();
  for (const dir of fs.readdirSync(path.join(root, 'test'))) {
    if (!fs.statSync(path.join(root, 'test', dir)).isDirectory()) continue;
    for (const f of fs.readdirSync(path.join(root, 'test', dir)).filter((f) => f.endsWith('.test.ts'))) {
      sources.set(`${dir} › ${f.slice(0, -'.test.ts'.length)}`, read(`test/${dir}/${f}`).replace(/\\'/g, '\''));
    }
  }
  const text = read('SECURITY.md').replace(/\s*\n\s*/g, ' ');
  const unresolved: string[] = [];
  let file: string | null = null;
  let named = 0;
  for (const [, ref] of text.matchAll(/`([^`]+)`/g)) {
    let title: string;
    const parts = ref!.split(' › ');
    if (parts.length >= 2 && /^(unit|integration|security|faults|e2e)$/.test(parts[0]!)) {
      file = `${parts[0]} › ${parts[1]!.replace(/\s*…$/, '')}`;
      title = parts.slice(2).join(' › ');
    } else if (ref!.startsWith('…') && file !== null) {
      title = ref!;
    } else {
      continue;
    }
    named++;
    const source = sources.get(file);
    if (source === undefined) {
      unresolved.push(`${file}: no such test file`);
      continue;
    }
    const words = title.replace(/\s*\((all|both|all four|three|two)\)$/, '').split('…').map((w) => w.trim()).filter(Boolean);
    if (!words.every((w) => source.includes(w))) unresolved.push(`${file} › ${title}`);
  }
  t.log(`${named} tests named`);
  t.deepEqual(unresolved, []);
});
