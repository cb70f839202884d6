// Run as root inside a test's namespace: a LinkMonitor, N link events made while the event loop is busy
// (one `ip -batch` changing a bridge's MTU N times), then drain() called by hand until it says the
// queue is empty. Prints {rounds: [events applied per drain], seen, overruns, filtered} as one JSON line.
//   node drain-probe.js N
import { execFileSync } from 'node:child_process';
import { LinkMonitor } from '@tapbroker/broker/internal';

const n = Number(process.argv[2]);
let seen = 0;
let overruns = 0;
const monitor = new LinkMonitor(() => seen++, () => overruns++, () => true);
execFileSync('ip', ['link', 'add', 'ev0', 'type', 'bridge']);
execFileSync('ip', ['-batch', '-'], { input: Array.from({ length: n }, (_, i) => `link set ev0 mtu ${1300 + (i % 100)}\n`).join('') });
const rounds: number[] = [];
for (let i = 0; i < 10_000; i++) {
  const before = seen;
  const emptied = monitor.drain();
  rounds.push(seen - before);
  if (emptied) break;
}
monitor.close();
execFileSync('ip', ['link', 'del', 'ev0']);
process.stdout.write(`${JSON.stringify({ rounds, seen, overruns, filtered: monitor.filtered })}\n`);
