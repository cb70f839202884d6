// The @tapbroker scope is not ours on the public npm registry: a dependency of one workspace package on
// another must name its folder (`file:`), never a version. With a version, a bump that missed one place made
// `npm ci` ask the registry for @tapbroker/protocol, and install whatever anyone published under that name
// (found by an outside review of the package's lifecycle).
import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const read = (p: string) => JSON.parse(fs.readFileSync(path.join(ROOT, p), 'utf8')) as Record<string, unknown>;

test('workspace packages depend on each other by folder, in package.json and in the lockfile', (t) => {
  const lock = read('package-lock.json') as { packages: Record<string, { dependencies?: Record<string, string> }> };
  let seen = 0;
  for (const name of ['protocol', 'broker', 'client']) {
    const pkg = read(`packages/${name}/package.json`) as { dependencies?: Record<string, string> };
    for (const where of [pkg.dependencies ?? {}, lock.packages[`packages/${name}`]?.dependencies ?? {}]) {
      for (const [dep, spec] of Object.entries(where)) {
        if (!dep.startsWith('@tapbroker/')) continue;
        seen++;
        t.is(spec, `file:../${dep.slice('@tapbroker/'.length)}`, `packages/${name}: ${dep}`);
      }
    }
  }
  t.is(seen, 4, 'the broker and the client each name the protocol package, in both files');
  for (const [key, entry] of Object.entries(lock.packages)) {
    if (!key.includes('node_modules/@tapbroker/')) continue;
    t.like(entry, { link: true }, `${key} is a link to its workspace folder, never fetched`);
  }
});
