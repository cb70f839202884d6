// Preloaded into the broker with NODE_OPTIONS=--import=…/cpuprof.js when bench.js runs with --profile DIR
// (Node 20 refuses --cpu-prof in NODE_OPTIONS): a V8 CPU profile of the whole process, written to
// DIR/broker-<pid>.cpuprofile when it exits. Open it in Chrome DevTools or speedscope.
import fs from 'node:fs';
import { Session } from 'node:inspector';
import path from 'node:path';

const dir = process.env['TB_CPUPROF_DIR'];
if (dir) {
  const session = new Session();
  session.connect();
  session.post('Profiler.enable');
  session.post('Profiler.setSamplingInterval', { interval: Number(process.env['TB_CPUPROF_INTERVAL_US'] ?? 100) });
  session.post('Profiler.start');
  process.on('exit', () => {
    // Same-thread inspector sessions answer synchronously, so this completes inside 'exit'.
    session.post('Profiler.stop', (err, res) => {
      if (!err) fs.writeFileSync(path.join(dir, `broker-${process.pid}.cpuprofile`), JSON.stringify(res.profile));
    });
  });
}
