// npm run pack: tarballs that install with `npm install -g` into a fresh prefix and give working
// commands, without npm ever looking up @tapbroker on a registry (the scope is not ours there).
import test from 'ava';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { PROTOCOL_VERSION } from '@tapbroker/protocol';
import { ROOT, tempDir } from '../helpers/broker.js';

const version = (JSON.parse(fs.readFileSync(path.join(ROOT, 'packages/broker/package.json'), 'utf8')) as { version: string }).version;

test('npm run pack: each tarball carries its dist/ and man pages, and none depends on @tapbroker', (t) => {
  const out = tempDir('npmpack');
  try {
    const tarballs = execFileSync(process.execPath, [path.join(ROOT, 'packaging/npm-pack.mjs'), out], { encoding: 'utf8' }).trim().split('\n');
    t.deepEqual(tarballs.map((f) => path.basename(f)), ['protocol', 'broker', 'client'].map((p) => `tapbroker-${p}-${version}.tgz`));
    const list = (f: string) => execFileSync('tar', ['tzf', f], { encoding: 'utf8' }).split('\n');
    const manifest = (f: string) => JSON.parse(execFileSync('tar', ['xzf', f, '-O', 'package/package.json'], { encoding: 'utf8' })) as { dependencies?: Record<string, string> };
    t.true(list(tarballs[0]!).includes('package/dist/index.js'), 'protocol: dist/');
    t.false(list(tarballs[0]!).some((f) => f.startsWith('package/src/')), 'protocol: no TypeScript sources');
    t.true(list(tarballs[1]!).includes('package/man/tapbrokerd.8'), 'broker: its man pages');
    t.true(list(tarballs[1]!).includes('package/dist/protocol/index.js'), 'broker: the protocol\'s code inside');
    t.true(list(tarballs[2]!).includes('package/man/tapbroker.1'), 'client: its man page');
    for (const f of tarballs.slice(1)) t.deepEqual(Object.keys(manifest(f).dependencies ?? {}).filter((d) => d.startsWith('@tapbroker/')), [], `${path.basename(f)} names no @tapbroker dependency`);
  } finally {
    fs.rmSync(out, { recursive: true, force: true });
  }
});

// Needs the npm registry (or npm's cache) for koffi, msgpackr, zod and smol-toml, as any npm install does.
test('npm install -g of the broker and client tarballs into a fresh prefix: tapbrokerd and tapbroker work', (t) => {
  const out = tempDir('npmpack2');
  const prefix = tempDir('npmprefix');
  try {
    const tarballs = execFileSync(process.execPath, [path.join(ROOT, 'packaging/npm-pack.mjs'), out], { encoding: 'utf8' }).trim().split('\n');
    const r = spawnSync('npm', ['install', '-g', '--prefer-offline', '--no-audit', '--no-fund', '--prefix', prefix, tarballs[1]!, tarballs[2]!], { encoding: 'utf8' });
    t.is(r.status, 0, r.stderr);
    const run = (bin: string, ...args: string[]) => execFileSync(path.join(prefix, 'bin', bin), args, { encoding: 'utf8' }).trim();
    t.is(run('tapbrokerd', '--version'), `tapbrokerd ${version} (protocol ${PROTOCOL_VERSION})`);
    t.is(run('tapbroker', '--version'), `tapbroker ${version} (protocol ${PROTOCOL_VERSION})`);
    t.is(run('tapbroker-bridge-helper', '--version'), `tapbroker-bridge-helper ${version} (protocol ${PROTOCOL_VERSION})`);
    t.regex(run('tapbrokerd', 'check-policy', path.join(ROOT, 'packaging/policy.toml')), /ok: 0 rules/);
    t.true(fs.existsSync(path.join(prefix, 'share/man/man8/tapbrokerd.8')), 'man pages in the prefix');
  } finally {
    fs.rmSync(out, { recursive: true, force: true });
    fs.rmSync(prefix, { recursive: true, force: true });
  }
});
