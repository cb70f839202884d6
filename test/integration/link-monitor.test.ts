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
const FILTER_PROBE = path.join(path.dirname(fileURLToPath(import.meta.url)), '../helpers/filter-probe.js');

test('a burst of 600 link events is applied DRAIN_BUDGET reads at a time, all of them, none lost', (t) => {
  const ns = Netns.create('drain');
  try {
    const out = JSON.parse(execFileSync('ip', ['netns', 'exec', ns.name, process.execPath, PROBE, '600'], { encoding: 'utf8' })) as {
      rounds: number[]; seen: number; overruns: number; filtered: boolean;
    };
    t.is(out.overruns, 0, 'the queue held the burst');
    t.true(out.filtered, 'the monitor\'s socket has its filter (next test)');
    t.true(out.seen >= 600, `${out.seen} events applied`);
    t.true(out.rounds.length >= Math.ceil(600 / DRAIN_BUDGET), `${out.rounds.length} drains`);
    t.true(out.rounds.every((r) => r <= DRAIN_BUDGET), `no drain applied more than ${DRAIN_BUDGET}: ${out.rounds.join(', ')}`);
    t.is(out.rounds[0], DRAIN_BUDGET, 'the first drain stopped at the budget');
  } finally {
    ns.destroy();
  }
});

test('the link monitor\'s filter drops a bridge port\'s own view of its link in the kernel, and nothing else', (t) => {
  const ns = Netns.create('filter');
  try {
    const out = JSON.parse(execFileSync('ip', ['netns', 'exec', ns.name, process.execPath, FILTER_PROBE],
      { encoding: 'utf8' })) as Record<'filtered' | 'unfiltered', Record<string, number>>;
    const AF_BRIDGE = '7';
    t.true((out.unfiltered[AF_BRIDGE] ?? 0) > 0, `a port's own view is sent: ${JSON.stringify(out.unfiltered)}`);
    t.is(out.filtered[AF_BRIDGE], undefined, 'and none is queued to the monitor');
    const { [AF_BRIDGE]: _dropped, ...rest } = out.unfiltered;
    t.deepEqual(out.filtered, rest, 'every other event is');
    t.true((rest['0'] ?? 0) >= 4, 'the tap\'s and the bridge\'s own events, deletions included');
  } finally {
    ns.destroy();
  }
});
