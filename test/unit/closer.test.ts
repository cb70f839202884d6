// The closer process (closer.ts, driven by foreign.ts): it closes the fds it receives only at the broker's
// `go`, which the broker sends once it has closed its own copies, so a last close is never the broker's (a
// client can close its own copies first, and a last close can take ~20 ms or block). Found by an outside
// re-test: the closer used to close on receipt, racing the broker's own closes.
import test from 'ava';
import { spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';
import { sys } from '@tapbroker/protocol';
import { ROOT } from '../helpers/broker.js';
import { quiet, until } from '../helpers/wait.js';

const CLOSER = path.join(path.dirname(createRequire(import.meta.url).resolve('@tapbroker/broker/package.json')), 'dist/closer.js');

test('the closer holds what it receives until `go`, then closes it and acknowledges', async (t) => {
  const [mine, theirs] = sys.socketpair(sys.SOCK_SEQPACKET);
  const child = spawn(process.execPath, [CLOSER], {
    stdio: ['ignore', 'ignore', 'inherit', theirs], env: { ...process.env, TAPBROKER_CLOSER_OF: String(process.pid) },
  });
  sys.close(theirs);
  const [sent, watched] = sys.socketpair(sys.SOCK_SEQPACKET);
  const rx = new sys.Receiver(16);
  // EOF on `watched` once the last copy of `sent` is closed; null (EAGAIN) while someone still holds it.
  const eof = () => rx.recv(watched, sys.MSG_DONTWAIT)?.data.length === 0;
  try {
    sys.sendMsg(mine, { data: Buffer.from([0]), fds: [sent] }, sys.MSG_NOSIGNAL);
    sys.close(sent);
    // Until `go`, the closer keeps its copy: no EOF, though it has had the time to act on its receipt.
    await quiet(300, 'the closer acting on the fd it received, had it not waited for go');
    t.false(eof(), 'closed before go');
    sys.sendMsg(mine, { data: Buffer.from([1]) }, sys.MSG_NOSIGNAL);
    await until(() => eof(), { ms: 3000, what: 'the closer never closed it after go' });
    await until(() => rx.recv(mine, sys.MSG_DONTWAIT)?.data[0] === 1, { ms: 3000, what: 'no acknowledgement' });
    t.pass();
  } finally {
    child.kill('SIGKILL');
    sys.close(mine);
    sys.close(watched);
  }
});

// Found by an outside review: a closer stopped (SIGSTOP, a debugger, a freezer) when its broker died outlived it,
// holding the broker's copies of the taps it had been sent; the next broker took those taps back as live leases.
test('a closer dies with its broker, stopped or not, and what it held closes with it', async (t) => {
  const [sent, watched] = sys.socketpair(sys.SOCK_SEQPACKET);
  // The broker: spawns the closer as foreign.ts does, hands it `sent` (no go), says the closer's pid, waits.
  const broker = `
    import { spawn } from 'node:child_process';
    import { sys } from '@tapbroker/protocol';
    const [mine, theirs] = sys.socketpair(sys.SOCK_SEQPACKET);
    const closer = spawn(process.execPath, [${JSON.stringify(CLOSER)}], { stdio: ['ignore', 'ignore', 'inherit', theirs],
      env: { ...process.env, TAPBROKER_CLOSER_OF: String(process.pid) } });
    sys.close(theirs);
    sys.sendMsg(mine, { data: Buffer.from([0]), fds: [3] }, sys.MSG_NOSIGNAL);
    sys.close(3);
    console.log(closer.pid);
    setInterval(() => {}, 1000);`;
  const parent = spawn(process.execPath, ['--input-type=module', '-e', broker], {
    cwd: ROOT, stdio: ['ignore', 'pipe', 'inherit', sent],
  });
  sys.close(sent);
  const rx = new sys.Receiver(16);
  const eof = () => rx.recv(watched, sys.MSG_DONTWAIT)?.data.length === 0;
  let closer = 0;
  try {
    closer = Number(await new Promise<string>((resolve) => parent.stdout!.once('data', (d: Buffer) => resolve(String(d)))));
    await quiet(300, 'the closer taking its fd');
    t.false(eof(), 'the closer holds what it was sent');
    process.kill(closer, 'SIGSTOP');
    parent.kill('SIGKILL');
    await until(() => eof(), { ms: 5000, what: 'the stopped closer outlived its broker, holding what it was sent' });
    await until(() => !fs.existsSync(`/proc/${closer}`) || /^State:\s+Z/m.test(fs.readFileSync(`/proc/${closer}/status`, 'utf8')),
      { ms: 3000, what: 'the closer is still there' });
    t.pass();
  } finally {
    parent.kill('SIGKILL');
    if (closer > 0 && fs.existsSync(`/proc/${closer}`)) process.kill(closer, 'SIGKILL');
    sys.close(watched);
  }
});

// A broker of an earlier version, still running after an upgrade (its new policy did not load), starts the closer
// from disk without naming itself: that closer serves it.
test('a closer started without its broker named (an earlier version\'s) serves as before', async (t) => {
  const env = { ...process.env };
  delete env['TAPBROKER_CLOSER_OF'];
  const [mine, theirs] = sys.socketpair(sys.SOCK_SEQPACKET);
  const child = spawn(process.execPath, [CLOSER], { stdio: ['ignore', 'ignore', 'inherit', theirs], env });
  sys.close(theirs);
  const rx = new sys.Receiver(16);
  try {
    sys.sendMsg(mine, { data: Buffer.from([1]) }, sys.MSG_NOSIGNAL);
    await until(() => rx.recv(mine, sys.MSG_DONTWAIT)?.data[0] === 1, { ms: 5000, what: 'no acknowledgement' });
    t.is(child.exitCode, null, 'it exited');
  } finally {
    child.kill('SIGKILL');
    sys.close(mine);
  }
});

test('a closer whose broker is gone before it starts exits at once', async (t) => {
  const child = spawn(process.execPath, [CLOSER], {
    stdio: ['ignore', 'ignore', 'inherit', 'ignore'], env: { ...process.env, TAPBROKER_CLOSER_OF: '1' },
  });
  const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
  const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
  clearTimeout(timer);
  t.is(code, 0, 'it stayed (killed after 5 s)');
});

// Found by an outside review of an install: `systemctl kill -s HUP tapbrokerd` (a reload the systemd way) signals
// every process of the unit, and the closer died of it, unsaid. It takes SIGHUP as the broker does: not as an end.
test('a closer lives through SIGHUP and serves on', async (t) => {
  const [mine, theirs] = sys.socketpair(sys.SOCK_SEQPACKET);
  const child = spawn(process.execPath, [CLOSER], {
    stdio: ['ignore', 'ignore', 'inherit', theirs], env: { ...process.env, TAPBROKER_CLOSER_OF: String(process.pid) },
  });
  sys.close(theirs);
  const rx = new sys.Receiver(16);
  try {
    // Ready (its first byte): its handlers are in place.
    await until(() => rx.recv(mine, sys.MSG_DONTWAIT)?.data[0] === 2, { ms: 5000, what: 'the closer never said ready' });
    child.kill('SIGHUP');
    await quiet(300, 'the closer dying of SIGHUP');
    t.is(child.exitCode, null, 'it exited');
    t.is(child.signalCode, null, `it died of ${child.signalCode}`);
    sys.sendMsg(mine, { data: Buffer.from([1]) }, sys.MSG_NOSIGNAL);
    await until(() => rx.recv(mine, sys.MSG_DONTWAIT)?.data[0] === 1, { ms: 5000, what: 'no acknowledgement' });
  } finally {
    child.kill('SIGKILL');
    sys.close(mine);
  }
});
