// Files root trusts (paths.ts): a file, after symlinks, and every directory above it must be root's and
// writable by nobody else, except a sticky directory whose entry is root's. paths.ts's notRootsAlone is
// not in @tapbroker/broker/internal; untrustedPolicyFile returns its reason verbatim for a file with no
// fragment directory beside it (`x.d` for `x`), so the cases are asked through it, on files made here.
// Run as root (as CI does): ownership by root is what is tested.
import test, { type ExecutionContext } from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import { untrustedPolicyFile } from '@tapbroker/broker/internal';
import { tempDir } from '../helpers/broker.js';

const asRoot = process.getuid?.() === 0 ? test : test.skip;

const made: string[] = [];
test.after.always(() => {
  for (const d of made) fs.rmSync(d, { recursive: true, force: true });
});

/** A root-owned 0755 directory in the (sticky, root's) temporary directory, with a 0644 root file `f` in it. */
function setUp(): { dir: string; file: string } {
  const dir = tempDir('paths');
  made.push(dir);
  const file = path.join(dir, 'f');
  fs.writeFileSync(file, 'x');
  fs.chmodSync(file, 0o644);
  return { dir, file };
}

/** Why a user other than root could change `file`, or null. */
function why(t: ExecutionContext, file: string): string | null {
  const bad = untrustedPolicyFile(file);
  if (bad) t.is(bad.file, file, 'the file asked about is the one named');
  return bad?.why ?? null;
}

asRoot('a root file in a root directory under the sticky temporary directory', (t) => {
  const { file } = setUp();
  t.is(why(t, file), null);
  for (const mode of [0o600, 0o444, 0o755, 0o4755]) {
    fs.chmodSync(file, mode);
    t.is(why(t, file), null, mode.toString(8));
  }
});

asRoot('a file others may write', (t) => {
  const { file } = setUp();
  fs.chmodSync(file, 0o646);
  t.is(why(t, file), 'is writable by others');
});

asRoot('a file its group may write, even when the group is root', (t) => {
  const { file } = setUp();
  fs.chmodSync(file, 0o664);
  t.is(why(t, file), 'is writable by its group');
  fs.chmodSync(file, 0o666);
  t.is(why(t, file), 'is writable by others', 'both: others is named');
});

asRoot("a file of another group that the group may only read", (t) => {
  const { file } = setUp();
  fs.chownSync(file, 0, 1000);
  t.is(why(t, file), null);
  fs.chmodSync(file, 0o664);
  t.is(why(t, file), 'is writable by its group');
});

asRoot('a file another user owns, whatever its mode', (t) => {
  const { file } = setUp();
  fs.chownSync(file, 1000, 0);
  t.is(why(t, file), 'is owned by uid 1000, not root');
  fs.chmodSync(file, 0o400);
  t.is(why(t, file), 'is owned by uid 1000, not root');
});

asRoot('a directory above the file that its group or others may write', (t) => {
  const { dir, file } = setUp();
  fs.chmodSync(dir, 0o775);
  t.is(why(t, file), `is writable by its group (through ${dir})`);
  fs.chmodSync(dir, 0o757);
  t.is(why(t, file), `is writable by others (through ${dir})`);
});

asRoot('a directory above the file that another user owns', (t) => {
  const { dir, file } = setUp();
  fs.chownSync(dir, 1000, 1000);
  t.is(why(t, file), `is owned by uid 1000 (through ${dir}), not root`);
});

asRoot('a sticky directory above is safe for a root entry: others cannot rename or remove it', (t) => {
  const { dir } = setUp();
  const sticky = path.join(dir, 'sticky');
  fs.mkdirSync(sticky);
  fs.chmodSync(sticky, 0o1777);
  const file = path.join(sticky, 'g');
  fs.writeFileSync(file, 'x', { mode: 0o644 });
  t.is(why(t, file), null);
  fs.chmodSync(sticky, 0o0777);
  t.is(why(t, file), `is writable by others (through ${sticky})`, 'without the sticky bit it is not');
});

asRoot('a sticky, world-writable directory is not itself trusted', (t) => {
  const { dir } = setUp();
  fs.chmodSync(dir, 0o1777);
  t.is(why(t, dir), 'is writable by others', 'the exemption is for directories above, not the one asked about');
});

asRoot('symlinks are judged by what they lead to', (t) => {
  const { dir, file } = setUp();
  const link = path.join(dir, 'link');
  fs.symlinkSync(file, link);
  t.is(why(t, link), null);
  fs.chmodSync(file, 0o666);
  t.is(why(t, link), 'is writable by others');
  fs.chmodSync(file, 0o644);
  const open = path.join(dir, 'open');
  fs.mkdirSync(open);
  fs.chmodSync(open, 0o777);
  const inOpen = path.join(open, 'h');
  fs.writeFileSync(inOpen, 'x', { mode: 0o644 });
  const link2 = path.join(dir, 'link2');
  fs.symlinkSync(inOpen, link2);
  t.is(why(t, link2), `is writable by others (through ${open})`, 'the target directory is the one named');
});

asRoot('a symlink is judged by the directory it sits in, too: whoever writes there could repoint it', (t) => {
  const { dir, file } = setUp();
  // A directory root's group (or another user's) may write, holding only a symlink to root's good file.
  const shared = path.join(dir, 'shared');
  fs.mkdirSync(shared);
  fs.chownSync(shared, 0, 65534);
  fs.chmodSync(shared, 0o775);
  const link = path.join(shared, 'policy.toml');
  fs.symlinkSync(file, link);
  t.is(why(t, link), `is writable by its group (through ${shared})`);
  // A relative link, and a chain of two links: every directory holding one counts.
  fs.chmodSync(shared, 0o755);
  const hop = path.join(dir, 'hop');
  fs.symlinkSync('shared/policy.toml', hop);
  t.is(why(t, hop), null, 'root\'s directories all the way: trusted');
  fs.chmodSync(shared, 0o757);
  t.is(why(t, hop), `is writable by others (through ${shared})`);
  fs.chmodSync(shared, 0o755);
  fs.chownSync(shared, 65534, 0);
  t.is(why(t, hop), `is owned by uid 65534 (through ${shared}), not root`);
});

asRoot('a symlink in a sticky directory counts only when root owns the link itself', (t) => {
  const { dir, file } = setUp();
  const sticky = path.join(dir, 'sticky');
  fs.mkdirSync(sticky);
  fs.chmodSync(sticky, 0o1777);
  const link = path.join(sticky, 'l');
  fs.symlinkSync(file, link);
  t.is(why(t, link), null, 'root\'s link in a sticky directory: nobody else may rename or replace it');
  fs.lchownSync(link, 65534, 65534);
  t.is(why(t, link), `is writable by others (through ${sticky})`, 'another user\'s link there is theirs to repoint');
});

asRoot('`..` after a symlink is taken from where the link led, as the kernel does', (t) => {
  const { dir, file } = setUp();
  const deep = path.join(dir, 'a', 'b');
  fs.mkdirSync(deep, { recursive: true });
  const open = path.join(dir, 'open');
  fs.mkdirSync(open);
  fs.chmodSync(open, 0o777);
  const viaOpen = path.join(open, 'to-b');
  fs.symlinkSync(deep, viaOpen);
  fs.copyFileSync(file, path.join(dir, 'a', 'g'));
  // open/to-b/../g is a/g, reached through the world-writable directory holding the link.
  t.is(why(t, `${viaOpen}/../g`), `is writable by others (through ${open})`);
  t.is(why(t, `${deep}/../g`), null);
});

asRoot('a file that cannot be resolved', (t) => {
  const { dir } = setUp();
  t.is(why(t, path.join(dir, 'absent')), 'cannot be resolved (ENOENT)');
  const dangling = path.join(dir, 'dangling');
  fs.symlinkSync(path.join(dir, 'absent'), dangling);
  t.is(why(t, dangling), 'cannot be resolved (ENOENT)');
  const loop = path.join(dir, 'loop');
  fs.symlinkSync(loop, loop);
  t.is(why(t, loop), 'cannot be resolved (ELOOP)');
});

// Found by an outside review: a directory a user named, on the way to a fragment root linked into its home, reached the
// broker's log, test-policy's output and the reload's reply raw (its newline forged a `policy reloaded' line).
asRoot('a directory a user named is escaped in the reason', (t) => {
  const { dir } = setUp();
  const home = path.join(dir, 'x\ntapbrokerd: policy reloaded\u001b[8m');
  fs.mkdirSync(home);
  fs.chownSync(home, 65534, 65534);
  const file = path.join(home, 'f');
  fs.writeFileSync(file, 'x');
  const reason = why(t, file) ?? '';
  t.regex(reason, /^is owned by uid 65534 \(through .*x\\x0atapbrokerd: policy reloaded\\x1b\[8m\), not root$/);
  t.false(/[\u0000-\u001f]/.test(reason), 'no control character left');
});
