// SECURITY.md's "The privileged path, in reading order" must list every module the broker's executable
// loads (its static import closure, index files aside), so a reviewer who reads the list has read the
// whole path. The total count of lines to read is printed: the figure to keep small.
import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT } from '../helpers/broker.js';

const SRC = {
  '@tapbroker/protocol': 'packages/protocol/src/index.ts',
  '@tapbroker/protocol/lite': 'packages/protocol/src/lite.ts',
  '@tapbroker/protocol/core': 'packages/protocol/src/core.ts',
  '@tapbroker/protocol/requests': 'packages/protocol/src/requests.ts',
  '@tapbroker/broker': 'packages/broker/src/index.ts',
} as const;

/** Modules reached from `entry` by static imports (`import … from`, `export … from`); not `import()` nor types. */
function closure(entry: string): Set<string> {
  const seen = new Set<string>();
  const visit = (file: string) => {
    if (seen.has(file)) return;
    seen.add(file);
    const text = fs.readFileSync(path.join(ROOT, file), 'utf8');
    for (const m of text.matchAll(/^(?:import|export)\s+(?!type\s)[^;]*?\sfrom\s+'([^']+)'/gms)) {
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

test('SECURITY.md lists every module of the privileged path, and the totals are printed', (t) => {
  const security = fs.readFileSync(path.join(ROOT, 'SECURITY.md'), 'utf8');
  const section = security.slice(security.indexOf('### The privileged path, in reading order'));
  // Two tables: what a create-tap request runs through, then what the broker also loads.
  const tables = section.slice(0, section.indexOf('\n## ')).split(/\n\n(?=\| module \| role \|)/).slice(1)
    .map((table) => [...table.matchAll(/^\| `(packages\/[^`]+)` \|/gm)].map((m) => m[1]!));
  t.is(tables.length, 2, 'a table for create-tap and one for the rest');
  const [request, rest] = tables as [string[], string[]];
  t.true(request.length > 10, 'the request path is listed');
  const listed = [...request, ...rest];
  t.deepEqual(listed.filter((f, i) => listed.indexOf(f) !== i), [], 'no module is listed twice');
  for (const f of listed) t.true(fs.existsSync(path.join(ROOT, f)), `${f} exists`);
  // Entry points that only re-export are not read for themselves.
  const loaded = [...closure('packages/broker/src/main.ts')]
    .filter((f) => !f.endsWith('/index.ts') && f !== 'packages/protocol/src/core.ts');
  // Run as a process of its own (spawned by foreign.ts), so no import reaches it.
  t.regex(fs.readFileSync(path.join(ROOT, 'packages/broker/src/foreign.ts'), 'utf8'), /closer\.js/);
  loaded.push('packages/broker/src/closer.ts');
  // Reached only by Open vSwitch and hook networks: listed after the tables, by name.
  const networksOnly = ['packages/broker/src/ovs.ts', 'packages/broker/src/hook.ts'];
  const missing = loaded.filter((f) => !listed.includes(f) && !networksOnly.includes(f));
  t.deepEqual(missing, [], 'every module the broker loads is in a list');
  t.deepEqual(listed.filter((f) => !loaded.includes(f)), [], 'every module listed is one the broker loads');
  const total = (files: string[]) => files.reduce((n, f) => n + codeLines(f), 0);
  t.log(request.map((f) => `${String(codeLines(f)).padStart(5)}  ${f}`).join('\n'));
  t.log(`${total(request)} lines that a create-tap request runs through (non-blank, non-comment), in ${request.length} `
    + `modules; ${total(listed)} in all ${listed.length} modules the broker loads`);
  const long = listed.filter((f) => codeLines(f) > 420).map((f) => `${f} (${codeLines(f)})`);
  t.deepEqual(long, [], 'no module on the privileged path is much over 400 lines');
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
