// The link monitor under a burst of events, against the real kernel in a fresh namespace: a drain applies at
// most DRAIN_BUDGET reads and says whether it emptied the queue, so a flood of events (a holder toggling its
// tap's offloads) is read over several turns of the event loop instead of holding it until the flood ends.
import test from 'ava';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { DRAIN_BUDGET } from '@tapbroker/broker/internal';
import { Netns } from '../helpers/netns.js';

const PROBE = path.join(path.dirname(fileURLToPath(import.meta.url)), '../helpers/drain-probe.js');

test('a burst of 600 link events is applied DRAIN_BUDGET reads at a time, all of them, none lost', (t) => {
  const ns = Netns.create('drain');
  try {
    const out = JSON.parse(execFileSync('ip', ['netns', 'exec', ns.name, process.execPath, PROBE, '600'], { encoding: 'utf8' })) as {
      rounds: number[]; seen: number; overruns: number;
    };
    t.is(out.overruns, 0, 'the queue held the burst');
    t.true(out.seen >= 600, `${out.seen} events applied`);
    t.true(out.rounds.length >= Math.ceil(600 / DRAIN_BUDGET), `${out.rounds.length} drains`);
    t.true(out.rounds.every((r) => r <= DRAIN_BUDGET), `no drain applied more than ${DRAIN_BUDGET}: ${out.rounds.join(', ')}`);
    t.is(out.rounds[0], DRAIN_BUDGET, 'the first drain stopped at the budget');
  } finally {
    ns.destroy();
  }
});
