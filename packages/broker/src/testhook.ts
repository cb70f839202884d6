// TEST-ONLY fault injection, inert unless TAPBROKER_TEST_HOOK is set when the broker starts.
// `TAPBROKER_TEST_HOOK=point` SIGKILLs the broker when it reaches `point`;
// `TAPBROKER_TEST_HOOK=point=wait:FILE` creates FILE.reached there and blocks until FILE exists.
// Points: tap:created tap:configured tap:persisted macvtap:created macvtap:opened create:leased
// release:unleased release:deleted. The fault-injection suite (test/faults) uses it; nothing else may.
import fs from 'node:fs';

const spec = process.env['TAPBROKER_TEST_HOOK'] ?? '';
delete process.env['TAPBROKER_TEST_HOOK'];
const [armed, action] = spec.split(/=(.*)/s) as [string, string | undefined];

export function hook(point: string): void {
  if (!spec || point !== armed) return;
  if (action?.startsWith('wait:')) {
    const file = action.slice(5);
    fs.writeFileSync(`${file}.reached`, point);
    const pause = new Int32Array(new SharedArrayBuffer(4));
    while (!fs.existsSync(file)) Atomics.wait(pause, 0, 0, 10);
    return;
  }
  process.kill(process.pid, 'SIGKILL');
}
