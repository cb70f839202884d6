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

test('the broker loads neither msgpackr nor zod: requests, its lease table and the policy are checked with shapes', (t) => {
  const { modules, packages } = closure('packages/broker/src/main.ts');
  t.false(packages.has('msgpackr'), 'msgpackr stays out');
  t.false(packages.has('zod'), 'zod stays out');
  for (const schemas of ['protocol/src/messages.ts', 'protocol/src/codec.ts', 'broker/src/policy-schema.ts',
    'broker/src/lease-schema.ts']) t.false(modules.has(`packages/${schemas}`), `${schemas} stays out`);
  for (const shape of ['protocol/src/request-shape.ts', 'broker/src/state-shape.ts', 'broker/src/policy-shape.ts']) {
    t.true(modules.has(`packages/${shape}`), `${shape} is what it checks with`);
  }
});
