#!/usr/bin/env node
// npm run package: the Debian binary package `tapbroker`, built with dpkg-deb from what `npm run build`
// made and what `npm ci` installed — no network, no other toolchain. Prints the .deb's path last.
// Layout (merged /usr): /usr/sbin/tapbrokerd, /usr/bin/tapbroker, the application and its production
// node_modules under /usr/lib/tapbroker, the units and sysusers/tmpfiles/modules-load entries under
// /usr/lib, man pages under /usr/share/man, /etc/tapbroker/policy.toml (a conffile that denies all).
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const HERE = path.join(ROOT, 'packaging');
const pkg = (name) => JSON.parse(fs.readFileSync(path.join(ROOT, 'packages', name, 'package.json'), 'utf8'));
const version = pkg('broker').version;
for (const p of ['protocol', 'client']) {
  if (pkg(p).version !== version) throw new Error(`packages/${p} is at ${pkg(p).version}, packages/broker at ${version}: one version for all`);
}
const arch = execFileSync('dpkg', ['--print-architecture'], { encoding: 'utf8' }).trim();
const nodeArch = { amd64: 'x64', arm64: 'arm64' }[arch];
if (!nodeArch) throw new Error(`no koffi build for ${arch}`);

// `node packaging/deb.mjs [DIR]`: into DIR (default build/), staged in DIR/deb.
const out = path.resolve(process.argv[2] ?? path.join(ROOT, 'build'));
const stage = path.join(out, 'deb');
fs.rmSync(stage, { recursive: true, force: true });
const at = (p) => path.join(stage, p);
const mkdir = (p) => fs.mkdirSync(at(p), { recursive: true });
const put = (p, content, mode = 0o644) => {
  mkdir(path.dirname(p));
  fs.writeFileSync(at(p), content);
  fs.chmodSync(at(p), mode);
};
const gz = (text) => zlib.gzipSync(text, { level: 9 });

// ---- the application: the three workspace packages materialised, and their production dependencies
const app = '/usr/lib/tapbroker';
const modules = `${app}/node_modules`;
const WORKSPACE = { '@tapbroker/protocol': 'protocol', '@tapbroker/broker': 'broker', '@tapbroker/client': 'client' };
// Optional native speed-ups that msgpackr works without: left out, so the only native code is koffi's.
const LEFT_OUT = /^(msgpackr-extract|@msgpackr-extract\/.*|node-gyp-build-optional-packages|detect-libc)$/;
const listed = execFileSync('npm', ['ls', '--omit=dev', '--all', '--parseable'], { cwd: ROOT, encoding: 'utf8' })
  .split('\n').filter(Boolean).map((p) => path.relative(path.join(ROOT, 'node_modules'), p)).filter((p) => p && !p.startsWith('..'));
for (const name of listed) {
  if (LEFT_OUT.test(name)) continue;
  const dest = at(`${modules}/${name}`);
  if (name in WORKSPACE) {
    const src = path.join(ROOT, 'packages', WORKSPACE[name]);
    fs.mkdirSync(dest, { recursive: true });
    fs.copyFileSync(path.join(src, 'package.json'), path.join(dest, 'package.json'));
    for (const d of ['dist', 'man']) {
      if (fs.existsSync(path.join(src, d))) fs.cpSync(path.join(src, d), path.join(dest, d), { recursive: true });
    }
    // Declarations and maps are for developers, not for a system package.
    for (const f of fs.readdirSync(path.join(dest, 'dist'), { recursive: true })) {
      if (/\.(d\.ts|d\.ts\.map|js\.map|tsbuildinfo)$/.test(f)) fs.rmSync(path.join(dest, 'dist', f));
    }
  } else {
    fs.cpSync(path.join(ROOT, 'node_modules', name), dest, { recursive: true, dereference: true });
  }
}
// Nothing for developers: type declarations, source maps, C sources and headers, build helpers.
const koffi = at(`${modules}/koffi`);
for (const d of ['vendor', 'doc']) fs.rmSync(path.join(koffi, d), { recursive: true, force: true });
fs.rmSync(path.join(koffi, 'cnoke.cjs'), { force: true });
for (const f of fs.readdirSync(at(modules), { recursive: true })) {
  if (/\.(d\.[cm]?ts|ts|map|cc|hh|h|S|asm|def|inc)$/.test(f)) fs.rmSync(at(`${modules}/${f}`));
}
// koffi: this architecture's glibc build only.
for (const d of fs.readdirSync(at(`${modules}/@koromix`))) {
  if (d !== `koffi-linux-${nodeArch}`) fs.rmSync(at(`${modules}/@koromix/${d}`), { recursive: true });
}
const native = at(`${modules}/@koromix/koffi-linux-${nodeArch}`);
for (const d of fs.readdirSync(native)) if (d.startsWith('musl')) fs.rmSync(path.join(native, d), { recursive: true });
// Every file readable by all, executables (and directories) searchable; nothing writable but by root.
execFileSync('chmod', ['-R', 'u=rwX,go=rX', at(app)]);
// The commands run the node the package depends on (/usr/bin/node), as the units and postinst do, never one earlier
// on root's PATH (`#!/usr/bin/env node`: an nvm node may load what /usr/bin/node does not, or the reverse).
for (const bin of ['broker/dist/main.js', 'client/dist/cli.js', 'client/dist/bridge-helper.js']) {
  const file = at(`${modules}/@tapbroker/${bin}`);
  fs.writeFileSync(file, fs.readFileSync(file, 'utf8').replace(/^#!\/usr\/bin\/env node\n/, '#!/usr/bin/node\n'));
  fs.chmodSync(file, 0o755);
}

// ---- commands: what the units and the README name
mkdir('/usr/sbin');
mkdir('/usr/bin');
fs.symlinkSync('../lib/tapbroker/node_modules/@tapbroker/broker/dist/main.js', at('/usr/sbin/tapbrokerd'));
fs.symlinkSync('../lib/tapbroker/node_modules/@tapbroker/client/dist/cli.js', at('/usr/bin/tapbroker'));
// qemu-bridge-helper's protocol, for `bridge_helper =` (libvirt session) and `helper=` (qemu): not on PATH.
fs.symlinkSync('node_modules/@tapbroker/client/dist/bridge-helper.js', at('/usr/lib/tapbroker/bridge-helper'));

// ---- systemd, sysusers, tmpfiles, modules-load
const unit = (f) => fs.readFileSync(path.join(ROOT, 'systemd', f), 'utf8');
put('/usr/lib/systemd/system/tapbrokerd.socket', unit('tapbrokerd.socket'));
put('/usr/lib/systemd/system/tapbrokerd.service', unit('tapbrokerd.service'));
// A user unit template: a user's persistent device made again at every start of their user manager.
put('/usr/lib/systemd/user/tapbroker-persistent@.service', unit('tapbroker-persistent@.service'));
put('/usr/lib/sysusers.d/tapbroker.conf', unit('tapbroker.sysusers'));
put('/usr/lib/tmpfiles.d/tapbroker.conf', unit('tapbroker.tmpfiles'));
put('/usr/lib/modules-load.d/tapbroker.conf', unit('tapbroker.modules-load'));

// ---- man pages, docs, the default policy
for (const [p, page] of [['client', 'tapbroker.1'], ['broker', 'tapbrokerd.8'], ['broker', 'tapbroker-policy.5']]) {
  put(`/usr/share/man/man${page.slice(-1)}/${page}.gz`, gz(fs.readFileSync(path.join(ROOT, 'packages', p, 'man', page))));
}
const doc = '/usr/share/doc/tapbroker';
put(`${doc}/copyright`, fs.readFileSync(path.join(HERE, 'copyright')));
// What lintian warns of on purpose, each with its reason.
put('/usr/share/lintian/overrides/tapbroker', fs.readFileSync(path.join(HERE, 'lintian-overrides')));
// A native package (no Debian revision): its changelog is changelog.gz.
put(`${doc}/changelog.gz`, gz(fs.readFileSync(path.join(HERE, 'changelog')).toString().replace(/@VERSION@/g, version)));
put(`${doc}/examples/policy.example.toml`, fs.readFileSync(path.join(ROOT, 'systemd', 'policy.example.toml')));
// Root's alone to read: its deny rules name users, and its networks say where they lead, which the broker tells no
// caller (an outside review read them all with cat; the broker's replies kept silent for nothing).
put('/etc/tapbroker/policy.toml', fs.readFileSync(path.join(HERE, 'policy.toml')), 0o640);
// Its fragment directory, empty: where an administrator's fragments go, and what the documented checks name
// (`--fragments policy.d`: an outside review's run of the README's migration failed on a missing one). Closed to
// others, so that a fragment written with the usual umask (0644) is root's to read too.
mkdir('/etc/tapbroker/policy.d');
fs.chmodSync(at('/etc/tapbroker/policy.d'), 0o750);

// ---- control
const installedKiB = Math.ceil(Number(execFileSync('du', ['-sk', '--apparent-size', stage], { encoding: 'utf8' }).split('\t')[0]));
const control = fs.readFileSync(path.join(HERE, 'control'), 'utf8')
  .replace('@VERSION@', version).replace('@ARCH@', arch).replace('@SIZE@', String(installedKiB));
put('/DEBIAN/control', control);
put('/DEBIAN/conffiles', '/etc/tapbroker/policy.toml\n');
for (const s of ['postinst', 'prerm', 'postrm']) put(`/DEBIAN/${s}`, fs.readFileSync(path.join(HERE, s)), 0o755);
const sums = execFileSync('sh', ['-c', "find . -path ./DEBIAN -prune -o -type f -print0 | sort -z | xargs -0 md5sum | sed 's# \\./# #'"], { cwd: stage, encoding: 'utf8' });
put('/DEBIAN/md5sums', sums);

fs.mkdirSync(out, { recursive: true });
const deb = path.join(out, `tapbroker_${version}_${arch}.deb`);
execFileSync('dpkg-deb', ['--root-owner-group', '-Zxz', '--build', stage, deb], { stdio: ['ignore', 'ignore', 'inherit'] });
process.stdout.write(`${deb}\n`);
