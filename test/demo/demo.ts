// `npm run demo`: the main job on an embedded default, as root, leaving nothing behind.
// A throwaway namespace with a bridge, a policy allowing uid 65534, the broker on a temporary socket,
// the client as uid 65534 receiving a tap; then, when qemu is installed, a real guest on that tap
// pinging the bridge.
import { spawn } from 'node:child_process';
import { BrokerProcess, CLIENT_CLI } from '../helpers/broker.js';
import { QEMU, guestImage, guestQemuArgs, guestUnavailable } from '../helpers/guest.js';
import { Netns } from '../helpers/netns.js';
import { NOBODY, setprivArgs } from '../helpers/unpriv.js';

const POLICY = `# The demo's policy: uid ${NOBODY} (nobody) may have up to 2 taps of up to 2 queues on br0.
[[rule]]
name = "demo"
users = [${NOBODY}]
bridges = ["br0"]
max_queues = 2
max_devices = 2
`;

const say = (s: string) => process.stdout.write(`\n== ${s}\n`);

function run(cmd: string, args: string[]): Promise<number | null> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'inherit', 'inherit'] });
    child.on('exit', (code) => resolve(code));
  });
}

async function main(): Promise<number> {
  if (process.getuid!() !== 0) {
    process.stderr.write('demo: run as root: it creates a network namespace and starts the broker (the client still runs unprivileged)\n');
    return 77;
  }
  let ns: Netns | null = null;
  let broker: BrokerProcess | null = null;
  const cleanup = async () => {
    await broker?.stop();
    ns?.destroy();
  };
  process.on('SIGINT', () => void cleanup().then(() => process.exit(130)));
  try {
    ns = Netns.create('demo');
    ns.bridge('br0', { address: '192.0.2.1/24' });
    say(`namespace ${ns.name}: bridge br0 with 192.0.2.1/24`);
    broker = await BrokerProcess.start(ns, POLICY, { tag: 'demo' });
    say(`broker (root) listening on ${broker.socket} with this policy:`);
    process.stdout.write(POLICY);

    say(`client as uid ${NOBODY}: tapbroker run --net bridge=br0,queues=2 -- <show what I got>`);
    const show = 'echo "argv the client appended: $*"; for fd in 3 4; do echo "fd $fd -> $(readlink /proc/$$/fd/$fd)"; done; echo "running as uid $(id -u)"';
    const code = await run('setpriv', [...setprivArgs(), process.execPath, CLIENT_CLI, 'run', '--socket', broker.socket, '--net', 'bridge=br0,queues=2', '--', 'sh', '-c', show, 'sh']);
    if (code !== 0) throw new Error(`client exited ${code}`);
    const grant = broker.records.find((r) => r.decision === 'grant');
    say('the broker\'s audit record for that grant:');
    process.stdout.write(`${JSON.stringify(grant, null, 2)}\n`);

    const why = guestUnavailable();
    if (why) {
      say(`no guest boot: ${why}`);
    } else {
      say(`booting a guest as uid ${NOBODY} on a brokered tap (TCG, a few seconds)`);
      const img = guestImage();
      const rc = await run('setpriv', [...setprivArgs(), process.execPath, CLIENT_CLI, 'run', '--socket', broker.socket, '--net', 'bridge=br0', '--', QEMU, ...guestQemuArgs(img, { ip: '192.0.2.2/24', ping: '192.0.2.1' })]);
      say(rc === 0 ? 'the guest pinged the bridge and powered off' : `qemu exited ${rc}`);
    }
    say('cleaning up: broker stopped, namespace deleted');
    return 0;
  } finally {
    await cleanup();
  }
}

main().then((code) => process.exit(code), (err: Error) => {
  process.stderr.write(`demo: ${err.message}\n`);
  process.exit(1);
});
