#!/usr/bin/env node
// npm run pack: installable npm tarballs of the three packages into build/npm/ (or argv[2]). The
// @tapbroker scope is not ours on the public registry: a tarball that named @tapbroker/protocol as a
// dependency would make npm fetch whatever someone published there. So the broker's and the client's
// tarballs carry the protocol package's code in dist/protocol/ (imports rewritten to it) and name its
// dependencies themselves: nothing @tapbroker is ever looked up. (npm's bundleDependencies would not do:
// npm then expects the bundled package's own dependencies in the tarball too, native koffi included.)
// Prints the tarballs' paths.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const out = path.resolve(process.argv[2] ?? path.join(ROOT, 'build/npm'));
const stage = path.join(out, 'stage');
fs.rmSync(out, { recursive: true, force: true });
const read = (p) => JSON.parse(fs.readFileSync(path.join(ROOT, 'packages', p, 'package.json'), 'utf8'));
const protocol = read('protocol');

/** A copy of a package as npm would pack it: package.json, dist/, man/. */
function copy(name, dest) {
  fs.mkdirSync(dest, { recursive: true });
  for (const d of ['dist', 'man']) {
    const src = path.join(ROOT, 'packages', name, d);
    if (fs.existsSync(src)) fs.cpSync(src, path.join(dest, d), { recursive: true });
  }
}

const tarballs = [];
for (const name of ['protocol', 'broker', 'client']) {
  const dir = path.join(stage, name);
  copy(name, dir);
  const pkg = read(name);
  if (name !== 'protocol') {
    const into = path.join(dir, 'dist/protocol');
    fs.cpSync(path.join(ROOT, 'packages/protocol/dist'), into, { recursive: true });
    for (const f of fs.readdirSync(path.join(dir, 'dist'), { recursive: true })) {
      const file = path.join(dir, 'dist', f);
      if (file.startsWith(into) || !/\.(js|d\.ts)$/.test(f)) continue;
      const rel = (entry) => {
        const r = path.relative(path.dirname(file), path.join(into, entry));
        return r.startsWith('.') ? r : `./${r}`;
      };
      // Every entry point the protocol package exports ('.', './lite', './core', …), to its file.
      let text = fs.readFileSync(file, 'utf8');
      for (const [sub, target] of Object.entries(protocol.exports)) {
        const spec = `'@tapbroker/protocol${sub.slice(1)}'`;
        text = text.replaceAll(spec, `'${rel(path.relative('dist', target.default))}'`);
      }
      fs.writeFileSync(file, text);
    }
    const { '@tapbroker/protocol': _bundled, ...own } = pkg.dependencies;
    pkg.dependencies = { ...protocol.dependencies, ...own };
  }
  fs.writeFileSync(path.join(dir, 'package.json'), `${JSON.stringify(pkg, null, 2)}\n`);
  const file = execFileSync('npm', ['pack', '--silent', '--pack-destination', out], { cwd: dir, encoding: 'utf8' }).trim().split('\n').pop();
  tarballs.push(path.join(out, file));
}
fs.rmSync(stage, { recursive: true, force: true });
process.stdout.write(`${tarballs.join('\n')}\n`);
