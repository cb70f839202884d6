// The client starts like bare node only if it does not load what only the broker needs: zod and msgpackr
// cost it more than its whole start otherwise (docs/PERFORMANCE.md). Counted, not timed: the static
// import closure of each client executable, through the packages' own entry points.
import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT } from '../helpers/broker.js';

const ENTRIES: Record<string, string> = {
  '@tapbroker/protocol': 'packages/protocol/src/index.ts',
  '@tapbroker/protocol/lite': 'packages/protocol/src/lite.ts',
  '@tapbroker/protocol/core': 'packages/protocol/src/core.ts',
  '@tapbroker/protocol/requests': 'packages/protocol/src/requests.ts',
};

/** Every module and external package reached by static, non-type imports from `entry`. */
function closure(entry: string): { modules: Set<string>; packages: Set<string> } {
  const modules = new Set<string>();
  const packages = new Set<string>();
  const visit = (file: string) => {
    if (modules.has(file)) return;
    modules.add(file);
    const text = fs.readFileSync(path.join(ROOT, file), 'utf8');
    for (const m of text.matchAll(/^(import|export)\s+(?!type\s)[^;]*?\sfrom\s+'([^']+)'/gms)) {
      const spec = m[2]!;
      if (spec.startsWith('.')) visit(path.join(path.dirname(file), spec.replace(/\.js$/, '.ts')));
      else if (ENTRIES[spec]) visit(ENTRIES[spec]!);
      else if (!spec.startsWith('node:')) packages.add(spec);
    }
  };
  visit(entry);
  return { modules, packages };
}

for (const bin of ['packages/client/src/cli.ts', 'packages/client/src/bridge-helper.ts', 'packages/client/src/index.ts']) {
  test(`${bin} loads neither zod nor msgpackr, nor the protocol's schemas`, (t) => {
    const { modules, packages } = closure(bin);
    t.deepEqual([...packages].sort(), ['koffi'], 'koffi is the one package a client needs');
    t.false(modules.has('packages/protocol/src/messages.ts'), 'the zod schemas stay out');
    t.false(modules.has('packages/protocol/src/codec.ts'), 'msgpackr stays out');
    t.log(`${modules.size} modules`);
  });
}

test('the broker decodes requests without msgpackr or zod; zod is loaded only to check the policy', (t) => {
  const { modules, packages } = closure('packages/broker/src/main.ts');
  t.false(packages.has('msgpackr'), 'msgpackr stays out');
  t.false(modules.has('packages/protocol/src/codec.ts'), 'the msgpackr codec stays out');
  t.false(modules.has('packages/protocol/src/messages.ts'), 'the zod schemas of messages stay out');
  t.true(modules.has('packages/protocol/src/request-shape.ts'), 'requests are checked with the generated shapes');
  const zodUsers = [...modules].filter((f) => /^import .* from 'zod';$/m.test(fs.readFileSync(path.join(ROOT, f), 'utf8')));
  t.deepEqual(zodUsers, ['packages/broker/src/policy.ts']);
});
