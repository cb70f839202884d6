// SECURITY.md's "The privileged path, in reading order" must list every module the broker's executable
// loads (its static import closure, index files aside), so a reviewer who reads the list has read the
// whole path. The total count of lines to read is printed: the figure to keep small.
import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT } from '../helpers/broker.js';

const SRC = { '@tapbroker/protocol': 'packages/protocol/src/index.ts', '@tapbroker/broker': 'packages/broker/src/index.ts' } as const;

/** Modules reached from `entry` by static imports (`import … from`, `export … from`); not `import()`. */
function closure(entry: string): Set<string> {
  const seen = new Set<string>();
  const visit = (file: string) => {
    if (seen.has(file)) return;
    seen.add(file);
    const text = fs.readFileSync(path.join(ROOT, file), 'utf8');
    for (const m of text.matchAll(/^(?:import|export)\s[^;]*?\sfrom\s+'([^']+)'/gms)) {
      const spec = m[1]!;
      if (spec.startsWith('.')) visit(path.join(path.dirname(file), spec.replace(/\.js$/, '.ts')));
      else if (spec in SRC) visit(SRC[spec as keyof typeof SRC]);
    }
  };
  visit(entry);
  return seen;
}

/** Non-blank lines that are not comments. */
function codeLines(file: string): number {
  return fs.readFileSync(path.join(ROOT, file), 'utf8').split('\n')
    .filter((l) => l.trim() !== '' && !/^\s*(\/\/|\/\*|\*)/.test(l)).length;
}

test('SECURITY.md lists every module of the privileged path, and the total is printed', (t) => {
  const security = fs.readFileSync(path.join(ROOT, 'SECURITY.md'), 'utf8');
  const section = security.slice(security.indexOf('### The privileged path, in reading order'));
  const listed = [...section.slice(0, section.indexOf('\n## ')).matchAll(/^\| `(packages\/[^`]+)` \|/gm)].map((m) => m[1]!);
  t.true(listed.length > 10, 'the table is there');
  for (const f of listed) t.true(fs.existsSync(path.join(ROOT, f)), `${f} exists`);
  const loaded = [...closure('packages/broker/src/main.ts')].filter((f) => !f.endsWith('/index.ts'));
  // Reached only by Open vSwitch and hook networks: listed after the table, by name.
  const networksOnly = ['packages/broker/src/ovs.ts', 'packages/broker/src/hook.ts'];
  const missing = loaded.filter((f) => !listed.includes(f) && !networksOnly.includes(f));
  t.deepEqual(missing, [], 'every module the broker loads is in the list');
  const rows = listed.map((f) => [f, codeLines(f)] as const);
  const total = rows.reduce((n, [, c]) => n + c, 0);
  t.log(rows.map(([f, c]) => `${String(c).padStart(5)}  ${f}`).join('\n'));
  t.log(`${total} lines on the privileged path (non-blank, non-comment), in ${rows.length} modules`);
});

test('no source line is wider than 120 columns', (t) => {
  const wide: string[] = [];
  for (const pkg of ['protocol', 'broker', 'client']) {
    const dir = path.join(ROOT, 'packages', pkg, 'src');
    for (const f of fs.readdirSync(dir).filter((n) => n.endsWith('.ts'))) {
      fs.readFileSync(path.join(dir, f), 'utf8').split('\n').forEach((line, i) => {
        if ([...line].length > 120) wide.push(`packages/${pkg}/src/${f}:${i + 1} (${[...line].length})`);
      });
    }
  }
  t.deepEqual(wide, []);
});
