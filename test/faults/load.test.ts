// 500 concurrent clients over 10 unprivileged uids, 20% misbehaving (silent, disconnecting mid-reply,
// garbage, sending fds): every well-behaved request is granted, and afterwards the broker's fd count
// is back at its baseline and no device is left.
import test from 'ava';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { BrokerProcess } from '../helpers/broker.js';
import { Netns } from '../helpers/netns.js';
import { spawnAs } from '../helpers/unpriv.js';

const LOAD = path.join(path.dirname(fileURLToPath(import.meta.url)), '../helpers/load-client.js');
const UIDS = Array.from({ length: 10 }, (_, i) => 60000 + i);

test('500 concurrent clients, 20% misbehaving', async (t) => {
  t.timeout(120_000);
  const ns = Netns.create('load');
  ns.bridge('br0');
  const broker = await BrokerProcess.start(ns, `[[rule]]\nname = "load"\nusers = [${UIDS.join(', ')}]\nbridges = ["br0"]\n`, { tag: 'load', args: ['--journal-socket', '', '-T', '10000'] });
  try {
    const baseline = broker.fdCount();
    const runs = UIDS.map((uid) => new Promise<Record<string, number | string[]>>((resolve, reject) => {
      const child = spawnAs({ uid }, process.execPath, [LOAD, broker.socket, '50', '0.2'], { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      let err = '';
      child.stdout!.on('data', (d) => (out += d));
      child.stderr!.on('data', (d) => (err += d));
      child.on('exit', (code) => (code === 0 ? resolve(JSON.parse(out) as Record<string, number | string[]>) : reject(new Error(`load client ${uid} exited ${code}: ${err}`))));
    }));
    const results = await Promise.all(runs);
    const sum = (k: string) => results.reduce((n, r) => n + (r[k] as number), 0);
    t.log(`granted ${sum('granted')}, failed ${sum('failed')}, slow ${sum('slow')}, dropped ${sum('dropped')}, garbage ${sum('garbage')}, fds ${sum('fds')}`);
    const errors = results.flatMap((r) => r['errors'] as string[]);
    if (errors.length) t.log(errors.join('\n'));
    t.deepEqual(errors, []);
    t.is(sum('granted'), 400, 'every well-behaved request was granted');
    t.is(sum('failed'), 0);
    t.is(sum('slow') + sum('dropped') + sum('garbage') + sum('fds'), 100);
    t.true(broker.alive);
    await broker.waitFor(() => broker.fdCount() === baseline, 5000, `broker fds ${broker.fdCount()} != baseline ${baseline}`);
    await broker.waitFor(() => ns.extraLinks(['br0']).length === 0, 5000, `devices left: ${ns.extraLinks(['br0']).length}`);
    t.is(broker.fdCount(), baseline, 'the broker\'s fds are back to their baseline');
    t.deepEqual(ns.extraLinks(['br0']), [], 'no device left');
  } finally {
    await broker.stop();
    ns.destroy();
  }
});
