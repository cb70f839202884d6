// The Debian package (`npm run package`): built from this checkout, checked for what it carries, then
// installed with dpkg into a throwaway root (overlayfs over /usr, /etc and /var in a private mount
// namespace, so this machine is untouched), used, and purged.
import anyTest, { type TestFn } from 'ava';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { PROTOCOL_VERSION } from '@tapbroker/protocol';
import { BrokerProcess, ROOT, tempDir } from '../helpers/broker.js';
import { Netns } from '../helpers/netns.js';
import { NOBODY, probeOnce } from '../helpers/unpriv.js';

const test = anyTest as TestFn<{ deb: string }>;
const version = (JSON.parse(fs.readFileSync(path.join(ROOT, 'packages/broker/package.json'), 'utf8')) as { version: string }).version;
const hasDpkg = spawnSync('dpkg-deb', ['--version']).status === 0;
if (!hasDpkg) console.log('# skip package tests: dpkg-deb is not installed');
const maybe = hasDpkg ? test.serial : test.serial.skip;

let deb = '';
test.before(() => {
  if (!hasDpkg) return;
  const out = execFileSync(process.execPath, [path.join(ROOT, 'packaging/deb.mjs'), path.join(ROOT, 'build/test-package')], { encoding: 'utf8' }).trim().split('\n');
  deb = out[out.length - 1]!;
});

test.after.always(() => fs.rmSync(path.join(ROOT, 'build/test-package'), { recursive: true, force: true }));

maybe('npm run package: a .deb of this version and architecture, whose control file says what it needs', (t) => {
  const arch = execFileSync('dpkg', ['--print-architecture'], { encoding: 'utf8' }).trim();
  t.is(path.basename(deb), `tapbroker_${version}_${arch}.deb`, 'its path is the last line printed');
  const field = (f: string) => execFileSync('dpkg-deb', ['--field', deb, f], { encoding: 'utf8' }).trim();
  t.is(field('Package'), 'tapbroker');
  t.is(field('Version'), version, 'the version of the packages\' package.json');
  t.is(field('Architecture'), arch);
  t.regex(field('Depends'), /nodejs \(>= 20\.19\)/);
  // The native code it carries (koffi's) needs exactly these libraries.
  for (const lib of ['libc6', 'libstdc++6', 'libgcc-s1']) t.regex(field('Depends'), new RegExp(lib.replace(/\+/g, '\\+')));
  t.is(execFileSync('dpkg-deb', ['--info', deb, 'conffiles'], { encoding: 'utf8' }).trim(), '/etc/tapbroker/policy.toml');
});

maybe('the package carries the application and its production dependencies only', (t) => {
  const files = execFileSync('dpkg-deb', ['--contents', deb], { encoding: 'utf8', maxBuffer: 64 << 20 })
    .split('\n').filter(Boolean).map((l) => l.split(/\s+/).slice(5).join(' ').replace(/^\.\//, '/').replace(/ -> .*/, ''));
  for (const f of ['/usr/sbin/tapbrokerd', '/usr/bin/tapbroker', '/usr/lib/systemd/system/tapbrokerd.socket', '/usr/lib/systemd/system/tapbrokerd.service',
    '/usr/lib/sysusers.d/tapbroker.conf', '/usr/lib/tmpfiles.d/tapbroker.conf', '/usr/lib/modules-load.d/tapbroker.conf',
    '/usr/share/man/man1/tapbroker.1.gz', '/usr/share/man/man5/tapbroker-policy.5.gz', '/usr/share/man/man8/tapbrokerd.8.gz',
    '/etc/tapbroker/policy.toml', '/usr/share/doc/tapbroker/copyright', '/usr/share/doc/tapbroker/changelog.gz',
    '/usr/share/doc/tapbroker/examples/policy.example.toml',
    '/usr/lib/tapbroker/node_modules/@tapbroker/broker/dist/main.js', '/usr/lib/tapbroker/node_modules/@tapbroker/client/dist/cli.js',
    '/usr/lib/tapbroker/bridge-helper', '/usr/lib/systemd/user/tapbroker-persistent@.service']) {
    t.true(files.includes(f), `${f} is in the package`);
  }
  const unwanted = files.filter((f) => /\.ts$|\.map$|\/test\/|node_modules\/(typescript|ava|fast-check|@types)\/|musl|\.(cc|hh|S|asm)$|msgpackr-extract/.test(f));
  t.deepEqual(unwanted, [], 'no sources, tests, dev dependencies, other platforms\' builds or optional native parts');
  const unit = execFileSync('sh', ['-c', `dpkg-deb --fsys-tarfile '${deb}' | tar -xO ./usr/lib/systemd/system/tapbrokerd.service`], { encoding: 'utf8' });
  const exec = /^ExecStart=\S+ .*?(\/usr\/lib\/\S+main\.js)/m.exec(unit)?.[1];
  t.true(exec !== undefined && files.includes(exec), `ExecStart= runs ${exec}, which the package installs`);
});

const lintian = spawnSync('lintian', ['--version']).status === 0;
if (hasDpkg && !lintian) console.log('# skip lintian: not installed (apt-get install lintian)');
(hasDpkg && lintian ? test.serial : test.serial.skip)('lintian finds no error and no warning in the package', (t) => {
  const r = spawnSync('lintian', ['--allow-root', deb], { encoding: 'utf8' });
  const lines = `${r.stdout}${r.stderr}`.split('\n').filter((l) => /^[EW]: /.test(l));
  t.log(lines.join('\n') || 'lintian: clean');
  // The README says so; what lintian would warn of on purpose is overridden with its reason (packaging/lintian-overrides).
  t.deepEqual(lines, []);
});

// Installed for real: dpkg -i, used, dpkg --purge, all inside a private mount namespace whose /usr, /etc
// and /var are overlays that vanish with it.
const SCRIPT = String.raw`
set -eu
deb=$1; work=$2
mount -t tmpfs tmpfs "$work"
for d in usr etc var; do
  mkdir -p "$work/$d-up" "$work/$d-work"
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=$work/$d-up,workdir=$work/$d-work" "/$d"
done
# /run too: the package makes /run/tapbroker, and a purge removes it (never this machine's).
mount -t tmpfs tmpfs /run
# An administrator's copy from the earlier manual set-up shadows the packaged unit: postinst says so.
mkdir -p /etc/systemd/system && echo '[Service]' > /etc/systemd/system/tapbrokerd.service
echo "shadow: $(dpkg -i "$deb" 2>&1 >/dev/null | grep -c 'overrides the packaged')"
rm /etc/systemd/system/tapbrokerd.service
echo "version: $(tapbrokerd --version)"
echo "client: $(tapbroker --version)"
echo "helper: $(/usr/lib/tapbroker/bridge-helper --version)"
echo "check: $(tapbrokerd check-policy | tail -n 1)"
echo "warn: $(tapbrokerd check-policy | head -n 1)"
echo "group: $(getent group tapbroker | cut -d: -f1)"
echo "man: $(man -w tapbrokerd tapbroker tapbroker-policy | tr '\n' ' ')"
echo "n: $(tapbrokerd -n | tail -n 1)"
echo "shebang: $(head -c 64 /usr/sbin/tapbrokerd | head -n 1) $(head -c 64 /usr/bin/tapbroker | head -n 1) $(head -c 64 /usr/lib/tapbroker/bridge-helper | head -n 1)"
dpkg --purge tapbroker >/dev/null
left=$(find /usr/lib/tapbroker /etc/tapbroker /usr/sbin/tapbrokerd /usr/bin/tapbroker /usr/lib/systemd/system/tapbrokerd.socket 2>/dev/null || true)
echo "left: $left"
# What an administrator put in /etc/tapbroker is theirs: a purge keeps it, and says so.
dpkg -i "$deb" >/dev/null 2>&1
mkdir -p /etc/tapbroker/policy.d /etc/tapbroker/hooks
echo '# fragment' > /etc/tapbroker/policy.d/10-site.toml
echo '#!/bin/sh' > /etc/tapbroker/hooks/up
echo "kept-note: $(dpkg --purge tapbroker 2>&1 >/dev/null | grep -c 'is kept: it holds files the package did not install')"
echo "kept: $(find /etc/tapbroker -type f | sort | tr '\n' ' ')"
rm -rf /etc/tapbroker
# The fragment directory ships (empty): the README's migration check names it.
dpkg -i "$deb" >/dev/null 2>&1
echo "fragments: $(stat -c '%U %a' /etc/tapbroker/policy.d) $(tapbrokerd check-policy /etc/tapbroker/policy.toml --fragments /etc/tapbroker/policy.d >/dev/null 2>&1; echo $?)"
echo "policy-mode: $(stat -c '%U %a' /etc/tapbroker/policy.toml) $(setpriv --reuid 65534 --regid 65534 --clear-groups cat /etc/tapbroker/policy.toml >/dev/null 2>&1 && echo read || echo closed)"
chmod 0644 /etc/tapbroker/policy.toml
echo "open-note: $(dpkg -i "$deb" 2>&1 >/dev/null | grep -c 'policy.toml is readable by every user')"
chmod 0640 /etc/tapbroker/policy.toml
# A purge while a device the broker made is still there keeps the state directory (its lease, the broker's
# identity): a broker installed again takes it back. In a network namespace of its own, with its own sysfs.
echo id > /run/tapbroker/broker-id
unshare -n sh -c '
  set -eu
  mount -t sysfs sysfs /sys
  ip link add tbk0 type veth peer name tbk1
  ip link set tbk0 alias "tapbroker tap uid=1000 broker=id"
  echo "run-note: $(dpkg --purge tapbroker 2>&1 >/dev/null | tr "\n" " ")"
  echo "run-kept: $(cat /run/tapbroker/broker-id)"
  ip link del tbk0
  dpkg -i "$1" >/dev/null 2>&1
  dpkg --purge tapbroker >/dev/null 2>&1
  echo "run-gone: $(test -e /run/tapbroker && echo kept || echo gone)"
  # And while its lease table owes work for devices already gone (the down of a hook network: an outside review purged
  # after a removal, once the VMs had exited, and the downs never ran); a table that owes nothing goes.
  dpkg -i "$1" >/dev/null 2>&1
  printf "{\"version\":1,\"leases\":[],\"downs\":[{\"id\":\"x\"}],\"pending\":[]}\n" > /run/tapbroker/leases.json
  echo "owed-note: $(dpkg --purge tapbroker 2>&1 >/dev/null | tr "\n" " ")"
  echo "owed-kept: $(test -e /run/tapbroker/leases.json && echo kept || echo gone)"
  printf "{\"version\":1,\"leases\":[],\"downs\":[],\"pending\":[],\"kept\":[\"y\"]}\n" > /run/tapbroker/leases.json
  dpkg -i "$1" >/dev/null 2>&1
  dpkg --purge tapbroker >/dev/null 2>&1
  echo "owed-gone: $(test -e /run/tapbroker && echo kept || echo gone)"
' sh "$deb"
`;

maybe('installed with dpkg: commands on PATH answer --version, the default policy denies everything, man finds the pages; purge leaves nothing of the package\'s', (t) => {
  const work = tempDir('pkgroot');
  try {
    const r = spawnSync('unshare', ['-m', '--propagation', 'private', 'sh', '-c', SCRIPT, 'sh', deb, work], { encoding: 'utf8' });
    t.is(r.status, 0, r.stderr);
    const got = Object.fromEntries(r.stdout.split('\n').filter((l) => l.includes(': ')).map((l) => [l.slice(0, l.indexOf(': ')), l.slice(l.indexOf(': ') + 2)]));
    t.is(got['version'], `tapbrokerd ${version} (protocol ${PROTOCOL_VERSION})`);
    t.is(got['client'], `tapbroker ${version} (protocol ${PROTOCOL_VERSION})`);
    t.is(got['helper'], `tapbroker-bridge-helper ${version} (protocol ${PROTOCOL_VERSION})`);
    t.regex(got['check'] ?? '', /^\/etc\/tapbroker\/policy\.toml: ok: 0 rules, 0 deny rules/, 'the default policy loads and allows nothing');
    t.regex(got['warn'] ?? '', /policy\.toml:1: warning: the policy allows nothing: every request will be denied/);
    t.is(got['group'], 'tapbroker', 'the group exists after install');
    for (const page of ['man8/tapbrokerd.8.gz', 'man1/tapbroker.1.gz', 'man5/tapbroker-policy.5.gz']) t.true((got['man'] ?? '').includes(page), `man -w finds ${page}`);
    t.is(got['left'], '', 'purge leaves no file of the package');
    t.is(got['kept'], '/etc/tapbroker/hooks/up /etc/tapbroker/policy.d/10-site.toml ', 'nor takes the administrator\'s');
    t.is(got['kept-note'], '1');
    t.is(got['fragments'], 'root 750 0', 'an empty policy.d of root\'s, which the documented check takes');
    // Root's to read (an outside review read every deny rule and network of the 0644 one as any user).
    t.is(got['policy-mode'], 'root 640 closed');
    t.is(got['open-note'], '1', 'a policy others may read (a 0644 one an earlier version installed) is said at configure');
    t.regex(got['run-note'] ?? '', /\/run\/tapbroker is kept: .* \(tbk0 \); a broker installed again takes them back/);
    t.is(got['run-kept'], 'id', 'the broker\'s identity stays while its device does');
    t.is(got['run-gone'], 'gone', 'and goes with the next purge once no device is left');
    t.regex(got['owed-note'] ?? '', /\/run\/tapbroker is kept: its lease table still owes work \(downs\)/);
    t.is(got['owed-kept'], 'kept', 'a down still owed keeps the lease table');
    t.is(got['owed-gone'], 'gone', 'one that owes nothing goes');
    // The commands run /usr/bin/node, which the package depends on, never a node earlier on root's PATH.
    t.is(got['shebang'], '#!/usr/bin/node #!/usr/bin/node #!/usr/bin/node');
    t.is(got['shadow'], '1', 'postinst tells about a unit copy under /etc/systemd/system that shadows the packaged one');
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
});

// The maintainer scripts' calls to systemd, through stand-ins for deb-systemd-helper, deb-systemd-invoke and
// systemctl that log their arguments, with /run/systemd/system present (a tmpfs over /run in a private mount
// namespace): install, remove (config files kept), install again, upgrade, upgrade with a policy that does not load.
const LIFECYCLE = String.raw`
set -eu
pkg=$1; bin=$2
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/system
# A fresh sysfs of a network namespace of its own (unshare -n): the devices postinst looks for are this test's.
mount -t sysfs sysfs /sys
# /usr/sbin as a host without a policy-rc.d has it (a container image's forbids every start), in an overlay.
mkdir -p "$bin/sbin-up" "$bin/sbin-work"
mount -t overlay overlay -o "lowerdir=/usr/sbin,upperdir=$bin/sbin-up,workdir=$bin/sbin-work" /usr/sbin
rm -f /usr/sbin/policy-rc.d
for tool in deb-systemd-helper deb-systemd-invoke systemctl modprobe; do
  printf '#!/bin/sh
echo "%s $*" >> %s/calls
case "$1 $2" in
  "--quiet was-enabled") [ -e %s/enabled ];;
  "--quiet is-active") [ ! -e %s/idle ];;
esac
' "$tool" "$bin" "$bin" "$bin" > "$bin/$tool"
  chmod 755 "$bin/$tool"
done
for tool in systemd-sysusers systemd-tmpfiles; do printf '#!/bin/sh
' > "$bin/$tool"; chmod 755 "$bin/$tool"; done
# The policy check: passes unless $bin/broken exists.
printf '#!/bin/sh
echo "tapbrokerd $*" >> %s/calls
[ ! -e %s/broken ]
' "$bin" "$bin" > "$bin/tapbrokerd"; chmod 755 "$bin/tapbrokerd"
export PATH="$bin:$PATH"
step() { echo "== $*" >> "$bin/calls"; }
step install;   sh "$pkg/postinst" configure; touch "$bin/enabled"
step remove;    sh "$pkg/prerm" remove; sh "$pkg/postrm" remove
step reinstall; sh "$pkg/postinst" configure 0.4.0
step upgrade;   sh "$pkg/prerm" upgrade 0.5.0; sh "$pkg/postinst" configure 0.4.0
touch "$bin/broken"
step broken;    sh "$pkg/prerm" upgrade 0.5.0; sh "$pkg/postinst" configure 0.4.0 2> "$bin/said"
sed 's/^/said: /' "$bin/said" >> "$bin/calls"
touch "$bin/idle"
step idle-broken; sh "$pkg/postinst" configure 0.4.0 2> "$bin/said"
sed 's/^/said: /' "$bin/said" >> "$bin/calls"
rm "$bin/broken"
step idle;      sh "$pkg/postinst" configure 0.4.0
# A lease table that owes a network's down, its device gone: the broker is started to run it.
mkdir -p /run/tapbroker
printf '{"version":1,"leases":[],"downs":[{"id":"x"}]}\n' > /run/tapbroker/leases.json
step owed;      sh "$pkg/postinst" configure 0.4.0
rm /run/tapbroker/leases.json
ip link add tbleft0 type bridge
ip link set tbleft0 alias 'tapbroker lease=0123456789abcdef broker=x uid=65534 kind=macvtap ends=fd'
step leftover;  sh "$pkg/postinst" configure 0.4.0
# A policy-rc.d that forbids starting services (an image build): nothing is started.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d
step forbidden; sh "$pkg/postinst" configure 0.4.0
cat "$bin/calls"
`;

test.serial('maintainer scripts: the socket runs after an install, after a removal and an install again, and after an upgrade; a policy that does not load is not restarted into', (t) => {
  const bin = tempDir('pkgcalls');
  try {
    const r = spawnSync('unshare', ['-m', '-n', '--propagation', 'private', 'sh', '-c', LIFECYCLE, 'sh', path.join(ROOT, 'packaging'), bin], { encoding: 'utf8' });
    t.is(r.status, 0, r.stderr);
    const phases = new Map<string, string[]>();
    let cur = '';
    for (const line of r.stdout.split('\n').filter(Boolean)) {
      if (line.startsWith('== ')) phases.set((cur = line.slice(3)), []);
      else phases.get(cur)!.push(line);
    }
    const starts = (p: string) => phases.get(p)!.some((l) => l === 'deb-systemd-invoke start tapbrokerd.socket');
    t.true(starts('install'), phases.get('install')!.join('\n'));
    t.deepEqual(phases.get('remove'), ['deb-systemd-invoke stop tapbrokerd.socket tapbrokerd.service', 'deb-systemd-helper mask tapbrokerd.socket', 'systemctl --system daemon-reload']);
    // Installed again over the config files a removal kept: $2 names the old version, as in an upgrade.
    t.true(phases.get('reinstall')!.includes('deb-systemd-helper unmask tapbrokerd.socket'), phases.get('reinstall')!.join('\n'));
    t.true(starts('reinstall'), `the socket stays stopped after a reinstall: ${phases.get('reinstall')!.join('; ')}`);
    t.true(starts('upgrade'));
    t.true(phases.get('upgrade')!.includes('deb-systemd-invoke try-restart tapbrokerd.service'), 'an upgrade restarts a running broker');
    t.false(phases.get('upgrade')!.some((l) => / stop /.test(` ${l} `)), 'an upgrade stops nothing (running VMs keep their NICs)');
    // --unit: as the unit runs the broker (a hook under /root passed outside its sandbox: an outside review).
    t.true(phases.get('upgrade')!.includes('tapbrokerd check-policy --unit /etc/tapbroker/policy.toml'), 'the policy is checked first');
    // A policy edited but never applied that no longer loads: the running broker is left as it is, and told.
    const broken = phases.get('broken')!;
    t.false(broken.some((l) => /try-restart/.test(l)), `a broker that would not start again is not restarted: ${broken.join('; ')}`);
    t.true(broken.some((l) => /^said: tapbroker: \/etc\/tapbroker\/policy\.toml does not load/.test(l)), broken.join('\n'));
    t.true(broken.some((l) => /^said: .*systemctl restart tapbrokerd/.test(l)));
    // The same with no broker running (socket activation's usual state): said too, with what will happen (an outside
    // review of the package: the upgrade said nothing, and the next clients found the socket gone).
    const idleBroken = phases.get('idle-broken')!;
    t.true(idleBroken.some((l) => /^said: tapbroker: \/etc\/tapbroker\/policy\.toml does not load/.test(l)), idleBroken.join('\n'));
    t.true(idleBroken.some((l) => /^said: .*will not start when a client connects/.test(l)), idleBroken.join('\n'));
    // The whole way back, as the README gives it: reset-failed alone leaves the socket stopped (an outside review).
    t.true(idleBroken.some((l) => /^said: .*systemctl reset-failed tapbrokerd\.service tapbrokerd\.socket && systemctl start tapbrokerd\.socket$/.test(l)),
      idleBroken.join('\n'));
    // A device a broker made and none watches is dealt with at once: the broker is started (an outside review: a
    // reinstall left a removed package's macvtap until some client connected); with none, nothing is started.
    const startsBroker = (p: string) => phases.get(p)!.includes('systemctl start --no-block tapbrokerd.service');
    t.false(startsBroker('idle'), phases.get('idle')!.join('\n'));
    t.false(startsBroker('install'));
    t.true(startsBroker('leftover'), phases.get('leftover')!.join('\n'));
    t.true(startsBroker('owed'), `a down owed for a device gone: ${phases.get('owed')!.join('; ')}`);
    t.false(startsBroker('forbidden'), `policy-rc.d forbids it: ${phases.get('forbidden')!.join('; ')}`);
    // macvtap is loaded at once where it is a module not loaded yet (modules-load.d waits for the next boot, and
    // the unit's DeviceAllow=char-macvtap finds no major without it: an outside review).
    t.is(phases.get('install')!.includes('modprobe -q macvtap'), !fs.existsSync('/sys/module/macvtap'));
  } finally {
    fs.rmSync(bin, { recursive: true, force: true });
  }
});

maybe('the installed broker grants a tap to a client, from the package\'s own files', async (t) => {
  const root = tempDir('pkgx');
  const ns = Netns.create('pkg');
  try {
    execFileSync('dpkg', ['-x', deb, root]);
    fs.chmodSync(root, 0o755);
    ns.bridge('br0');
    const broker = await BrokerProcess.start(ns, `[[rule]]\nname = "p"\nusers = [${NOBODY}]\nbridges = ["br0"]\n`, {
      tag: 'pkgb', main: path.join(root, 'usr/lib/tapbroker/node_modules/@tapbroker/broker/dist/main.js'),
    });
    try {
      const r = await probeOnce({ socket: broker.socket, requests: [{ bridge: 'br0' }] });
      t.is(r.error, null, r.error?.message);
      const list = spawnSync('setpriv', ['--reuid', String(NOBODY), '--regid', String(NOBODY), '--clear-groups', '--', path.join(root, 'usr/bin/tapbroker'), 'list', '--socket', broker.socket], { encoding: 'utf8' });
      t.is(list.status, 0, list.stderr);
    } finally {
      await broker.stop();
    }
  } finally {
    ns.destroy();
    fs.rmSync(root, { recursive: true, force: true });
  }
});
