// Runs inside the benchmark's network namespace (`ip netns exec NS node floor.js MODE JSON`) and prints
// one JSON line of timings, then waits for its stdin to close. Each tap is destroyed right after it is
// timed (its last close, ~20 ms of kernel time, off the clock), so every grant meets the same kernel
// state; with "hold": true the fds are kept instead, for the parent to reap in one batch.
//
//   floor  — the kernel floor: Netdev.createTap() in this process, no IPC, no policy, no audit.
//   tagged — N taps on the given bridges, each carrying the ifalias of a broker lease (uid, rule), all
//            held: a broker started afterwards with an empty state directory adopts them as its leases.
//   teardown — the floor while taps die: rounds of N taps (held) whose fds are then closed all at once on
//            libuv's pool (size it with UV_THREADPOOL_SIZE), createTap timed back to back until the last
//            close returns.
//   helper — qemu-bridge-helper --br=B --fd=3 spawned per grant, the tap fd received over SCM_RIGHTS
//            on a socketpair (as qemu does it), timed from spawn to fd received.
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import { Netdev } from '@tapbroker/broker/internal';
import { SeqpacketConnection, sys } from '@tapbroker/protocol';
import { closeAll, now, socketpair } from './common.js';

interface Args {
  n: number;
  warmup: number;
  bridge: string;
  /** A name prefix unique to this run (taps are named PREFIX<i>). */
  prefix?: string;
  helper?: string;
  /** Keep every tap until stdin closes instead of destroying each one after it is timed. */
  hold?: boolean;
  /** teardown: taps torn down at once per round. */
  dying?: number;
  /** tagged: bridges to spread the taps over (a bridge takes at most 1,024 ports), and the lease's owner. */
  bridges?: string[];
  uid?: number;
  rule?: string;
}

export interface FloorResult {
  mode: 'floor' | 'helper' | 'tagged' | 'teardown';
  /** teardown: the length of each teardown window, ms. */
  windows?: number[];
  /** Per-grant milliseconds, warm-up excluded. */
  samples: number[];
  /** Helper only: spawn to exit, ms. */
  exits?: number[];
  held: number;
}

const mode = process.argv[2];
const args = JSON.parse(process.argv[3] ?? '{}') as Args;
const held: number[] = [];

/** The floor undoes a failed create at once, in this thread: it measures kernel steps, not the broker's queues. */
const SYNC_CLEANUP = {
  closeFds: (fds: readonly number[]) => { for (const fd of fds) fs.closeSync(fd); },
  deleteLink: () => {},
};

function guestMac(): Buffer {
  return Buffer.from([0x52, 0x54, 0x00, ...randomBytes(3)]);
}

function floor(): FloorResult {
  const netdev = new Netdev(SYNC_CLEANUP, os.tmpdir());
  // The bridge is looked up once; createTap itself does TUNSETIFF, one RTM_GETLINK by name and one
  // RTM_NEWLINK (address, MTU, master, up, ifalias), like the broker.
  const bridge = netdev.bridge(args.bridge);
  const samples: number[] = [];
  const alias = 'tapbroker lease=0123456789abcdef uid=0 kind=tap rule=bench ends=fds parent=br0 queues=1';
  for (let i = 0; i < args.warmup + args.n; i++) {
    const mac = guestMac();
    const name = `${args.prefix ?? 'fl'}${i}`;
    const t0 = now();
    const tap = netdev.createTap({ uid: 0, name, queues: 1, vnetHdr: true, vhost: false, guestMac: mac, bridge, persistent: null, alias });
    const dt = now() - t0;
    if (i >= args.warmup) samples.push(dt);
    // Off the clock: the last close destroys the tap (~20 ms, synchronously, in this thread), so every
    // create meets the same kernel state, as the broker's grants do in bench.js.
    if (args.hold) held.push(...tap.tapFds);
    else for (const fd of tap.tapFds) fs.closeSync(fd);
  }
  netdev.close();
  return { mode: 'floor', samples, held: held.length };
}

async function teardown(): Promise<FloorResult> {
  const netdev = new Netdev(SYNC_CLEANUP, os.tmpdir());
  const bridge = netdev.bridge(args.bridge);
  const dyingOn = netdev.bridge(args.bridges?.[0] ?? args.bridge);
  const samples: number[] = [];
  const windows: number[] = [];
  const alias = 'tapbroker lease=0123456789abcdef uid=0 kind=tap rule=bench ends=fds parent=br0 queues=1';
  let k = 0;
  const started = now();
  while (samples.length < args.n && now() - started < 60_000) {
    const dying: number[] = [];
    for (let i = 0; i < (args.dying ?? 50); i++) {
      dying.push(...netdev.createTap({ uid: 0, name: `td${k++}`, queues: 1, vnetHdr: true, vhost: false, guestMac: guestMac(), bridge: dyingOn, persistent: null, alias }).tapFds);
    }
    const mine: number[] = [];
    let done = false;
    const t0 = now();
    const closing = closeAll(dying).then(() => { done = true; windows.push(now() - t0); });
    while (!done) {
      const t1 = now();
      const tap = netdev.createTap({ uid: 0, name: `tm${k++}`, queues: 1, vnetHdr: true, vhost: false, guestMac: guestMac(), bridge, persistent: null, alias });
      samples.push(now() - t1);
      mine.push(...tap.tapFds);
      // Let the pool's completions in: createTap is synchronous.
      await new Promise((r) => setImmediate(r));
    }
    await closing;
    await closeAll(mine);
  }
  netdev.close();
  return { mode: 'teardown', samples, windows, held: 0 };
}

/** Taps tagged as the broker tagged its own before 0.5.0 (no broker=, no mac=), for it to take back at start. */
function tagged(): FloorResult {
  const netdev = new Netdev(SYNC_CLEANUP, os.tmpdir());
  const bridges = (args.bridges ?? [args.bridge]).map((b) => netdev.bridge(b));
  const samples: number[] = [];
  for (let i = 0; i < args.n; i++) {
    const bridge = bridges[i % bridges.length]!;
    const alias = `tapbroker lease=${randomBytes(8).toString('hex')} uid=${args.uid ?? 0} kind=tap rule=${args.rule ?? 'hold'} ends=fds parent=${bridge.name} queues=1`;
    const t0 = now();
    const tap = netdev.createTap({ uid: 0, name: `tb${args.uid ?? 0}-h${i}`, queues: 1, vnetHdr: true, vhost: false, guestMac: guestMac(), bridge, persistent: null, alias });
    samples.push(now() - t0);
    held.push(...tap.tapFds);
  }
  netdev.close();
  return { mode: 'tagged', samples, held: held.length };
}

async function helperOnce(helper: string, bridge: string): Promise<{ fdMs: number; exitMs: number }> {
  const [mine, theirs] = socketpair(sys.SOCK_SEQPACKET | sys.SOCK_CLOEXEC);
  sys.fcntlSet(mine, sys.F_SETFL, sys.fcntlGet(mine, sys.F_GETFL) | sys.O_NONBLOCK);
  const conn = new SeqpacketConnection(mine, { maxPacket: 64, maxFds: 4 });
  const t0 = now();
  // fd 3 in the child is `theirs` with CLOEXEC cleared (Node dup2s stdio entries).
  const child = spawn(helper, ['--use-vnet', `--br=${bridge}`, '--fd=3'], { stdio: ['ignore', 'ignore', 'pipe', theirs] });
  let stderr = '';
  child.stderr!.on('data', (d) => (stderr += d));
  const exited = new Promise<number>((resolve) => child.on('exit', () => resolve(now())));
  sys.close(theirs);
  const packet = await conn.receive();
  const fdAt = now();
  conn.close();
  const exitAt = await exited;
  if (!packet || packet.fds.length !== 1) {
    for (const fd of packet?.fds ?? []) sys.close(fd);
    throw new Error(`qemu-bridge-helper sent no fd (exit ${child.exitCode}): ${stderr.trim()}`);
  }
  if (args.hold) held.push(packet.fds[0]!);
  else fs.closeSync(packet.fds[0]!);
  return { fdMs: fdAt - t0, exitMs: exitAt - t0 };
}

async function helper(): Promise<FloorResult> {
  const samples: number[] = [];
  const exits: number[] = [];
  for (let i = 0; i < args.warmup + args.n; i++) {
    const r = await helperOnce(args.helper ?? '/usr/lib/qemu/qemu-bridge-helper', args.bridge);
    if (i >= args.warmup) {
      samples.push(r.fdMs);
      exits.push(r.exitMs);
    }
  }
  return { mode: 'helper', samples, exits, held: held.length };
}

async function main(): Promise<void> {
  const result = mode === 'floor' ? floor() : mode === 'tagged' ? tagged() : mode === 'teardown' ? await teardown() : mode === 'helper' ? await helper() : null;
  if (!result) throw new Error(`unknown mode ${mode}`);
  process.stdout.write(`${JSON.stringify(result)}\n`);
  // Hold every fd until the parent says so (it reaps the devices first, in one batch).
  process.stdin.resume();
  process.stdin.on('end', () => process.exit(0));
}

main().catch((err: Error) => {
  process.stderr.write(`floor: ${err.stack ?? err.message}\n`);
  process.exit(1);
});
