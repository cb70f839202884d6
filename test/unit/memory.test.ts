// returnFreeMemory (malloc_trim): memory freed in the middle of glibc's heap goes back to the system. Measured in a
// child process of its own, whose heap this test shapes: 40 MB in 16 KiB blocks (below glibc's mmap threshold, so on
// its heap), seven in eight freed, which no trim of the heap's top alone could give back.
import test from 'ava';
import { spawnSync } from 'node:child_process';

const CHILD = `
const fs = require('node:fs');
const anon = () => Number(/RssAnon:\\s+(\\d+)/.exec(fs.readFileSync('/proc/self/status', 'utf8'))[1]);
import('@tapbroker/broker/internal').then(async ({ returnFreeMemory }) => {
  let blocks = [];
  for (let i = 0; i < 2560; i++) blocks.push(Buffer.allocUnsafeSlow(16384).fill(1));
  blocks = blocks.filter((_, i) => i % 8 === 0);
  // V8 frees array buffers' memory as it sweeps, on threads of its own: collected twice, a while apart.
  globalThis.gc();
  await new Promise((r) => setTimeout(r, 200));
  globalThis.gc();
  await new Promise((r) => setTimeout(r, 200));
  const before = anon();
  returnFreeMemory();
  console.log(JSON.stringify({ before, after: anon(), kept: blocks.length }));
});
`;

test('returnFreeMemory gives back memory freed in the middle of the heap', (t) => {
  const r = spawnSync(process.execPath, ['--expose-gc', '-e', CHILD], { encoding: 'utf8', cwd: process.cwd() });
  t.is(r.status, 0, r.stderr);
  const { before, after } = JSON.parse(r.stdout) as { before: number; after: number };
  t.log(`RssAnon ${before} kB before, ${after} kB after`);
  t.true(before - after > 20_000, `only ${before - after} kB given back`);
});
