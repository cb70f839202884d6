#!/usr/bin/env node
// tapbroker-bridge-helper: qemu-bridge-helper's protocol, without a setuid binary. qemu (`-netdev
// bridge,br=BR,helper=…`) and libvirt's session mode (`bridge_helper = "…"`) run it as the VM's user with
// `[--use-vnet] --br=BR --fd=N`; it asks the broker for a tap on BR, sends the tap's fd over the unix
// socket N with SCM_RIGHTS and a one-byte payload, and exits 0. Errors go to stderr, where qemu and
// libvirt show them. The tap lives as long as its fd: qemu holds it.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import {
  PROTOCOL_VERSION, TapbrokerError, checkIfName, checkNetworkName, dropUnwritableOutput, exitFlushed, keepInspectorShut,
  sys,
} from '@tapbroker/protocol/lite';
import { TapbrokerClient, closeTap } from './client.js';

/** qemu-bridge-helper's own usage line: scripts and people that know it see the same. */
export const HELPER_USAGE = 'Usage: qemu-bridge-helper [--use-vnet] --br=bridge --fd=unixfd';

const HELP = `${HELPER_USAGE}

tapbroker-bridge-helper speaks qemu-bridge-helper's protocol and gets the tap from tapbrokerd, so no
setuid binary is needed. --br=NAME asks for a tap on the Linux bridge NAME; --br=network:NAME asks for
the network NAME of the broker's policy (Open vSwitch, a VLAN or a hook). The broker's socket is
$TAPBROKER_SOCKET, else /run/tapbroker/tapbroker.sock. See tapbroker(1), "BRIDGE HELPER".`;

/** The prefix that names a policy network: `:` never appears in a Linux interface name. */
const NETWORK_PREFIX = 'network:';

export interface HelperArgs {
  vnetHdr: boolean;
  bridge: string | null;
  network: string | null;
  fd: number;
}

/** qemu-bridge-helper's arguments, checked: anything else is a usage error. */
export function parseHelperArgs(argv: readonly string[]): HelperArgs {
  const usage = (why: string): never => {
    throw new TapbrokerError('TB_E_USAGE', why);
  };
  let vnetHdr = false;
  let br: string | null = null;
  let fd: number | null = null;
  for (const a of argv) {
    if (a === '--use-vnet') vnetHdr = true;
    else if (a.startsWith('--br=')) br = a.slice(5);
    else if (a.startsWith('--fd=')) {
      const v = a.slice(5);
      if (!/^[0-9]{1,9}$/.test(v)) usage(`--fd must be a file descriptor number, not \`${v}'`);
      fd = Number(v);
    } else usage(`unknown argument \`${a}'`);
  }
  if (br === null || br === '') return usage('--br=bridge is needed');
  if (fd === null) return usage('--fd=unixfd is needed');
  if (br.startsWith(NETWORK_PREFIX)) {
    const network = br.slice(NETWORK_PREFIX.length);
    const why = checkNetworkName(network);
    if (why) usage(`network name \`${network}' ${why}`);
    return { vnetHdr, bridge: null, network, fd };
  }
  const why = checkIfName(br);
  if (why) usage(`bridge name \`${br}' ${why}`);
  return { vnetHdr, bridge: br, network: null, fd };
}

/** `--fd` must be the unix socket qemu or libvirt gave, checked before the broker is asked for anything. */
function checkSocket(unixFd: number): void {
  let st: fs.Stats;
  try {
    st = fs.fstatSync(unixFd);
  } catch {
    throw new TapbrokerError('TB_E_USAGE', `--fd=${unixFd} is not an open file descriptor`);
  }
  let unix = false;
  try {
    unix = st.isSocket() && sys.getsockoptInt(unixFd, sys.SOL_SOCKET, sys.SO_DOMAIN) === sys.AF_UNIX;
  } catch {
    // Not a socket after all: refused below.
  }
  if (!unix) throw new TapbrokerError('TB_E_USAGE', `--fd=${unixFd} is not a unix socket`);
}

/** The tap's fd, sent over the unix socket qemu or libvirt gave: SCM_RIGHTS with a one-byte payload. */
function sendFd(unixFd: number, tapFd: number): void {
  for (;;) {
    try {
      sys.sendMsg(unixFd, { data: Buffer.from([0]), fds: [tapFd] }, sys.MSG_NOSIGNAL);
      return;
    } catch (err) {
      if (err instanceof sys.SyscallError && err.code === 'EINTR') continue;
      // The hypervisor's end, not the broker's: --fd is what failed (qemu or libvirt closed it, say).
      throw new TapbrokerError(
        'TB_E_USAGE',
        `--fd=${unixFd}: cannot send the tap to the hypervisor over it: ${(err as Error).message}`,
      );
    }
  }
}

export async function helperMain(argv: readonly string[]): Promise<number> {
  if (argv[0] === '-h' || argv[0] === '--help') {
    process.stdout.write(`${HELP}\n`);
    return 0;
  }
  if (argv[0] === '-V' || argv[0] === '--version') {
    const { version } = createRequire(import.meta.url)('../package.json') as { version: string };
    process.stdout.write(`tapbroker-bridge-helper ${version} (protocol ${PROTOCOL_VERSION})\n`);
    return 0;
  }
  let client: TapbrokerClient | null = null;
  // qemu waits for the helper with its main lock held (its start, a hotplug: the monitor freezes): a broker that
  // does not answer must not hang it (an outside review stopped the broker; qemu hung until killed). Its hello
  // within $TAPBROKER_HELPER_TIMEOUT; the tap within as long again past the longest a plug hook may run (a
  // network's `up` may take up to 300 s: a re-test's took 35 s, past a single 30 s deadline).
  const seconds = helperTimeout();
  const deadline = (s: number, what: string) => {
    let timer: NodeJS.Timeout | undefined;
    const expired = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new TapbrokerError('TB_E_TIMEOUT', `the broker did not ${what} within ${s} s`,
        { hint: 'is tapbrokerd stuck? see systemctl status tapbrokerd (TAPBROKER_HELPER_TIMEOUT sets the seconds)' })),
      s * 1000);
    });
    expired.catch(() => {});
    return { expired, clear: () => clearTimeout(timer) };
  };
  const hello = deadline(seconds, 'answer');
  const grant = deadline(seconds + MAX_HOOK_SECONDS, 'grant the tap');
  try {
    const args = parseHelperArgs(argv);
    checkSocket(args.fd);
    client = await Promise.race([TapbrokerClient.connect(null, { client: 'tapbroker-bridge-helper' }), hello.expired]);
    hello.clear();
    // qemu and libvirt set the guest's MAC on their own -device and never tell the helper: the broker is
    // told it does not know it.
    const tap = await Promise.race([client.createTap({
      ...(args.network !== null ? { network: args.network } : { bridge: args.bridge! }),
      vnetHdr: args.vnetHdr,
      macUnknown: true,
    }), grant.expired]);
    try {
      sendFd(args.fd, tap.tapFds[0]!);
    } finally {
      // qemu holds the tap now; ours goes, so the tap ends with qemu.
      closeTap(tap);
    }
    return 0;
  } catch (err) {
    if (!(err instanceof TapbrokerError)) throw err;
    const lines = [`tapbroker-bridge-helper: ${err.code}: ${helperWords(err.message)}`];
    if (err.rule) lines.push(`tapbroker-bridge-helper: rule: ${err.rule}`);
    if (err.hint) lines.push(`tapbroker-bridge-helper: hint: ${helperWords(err.hint)}`);
    if (err.code === 'TB_E_USAGE') lines.push(HELPER_USAGE);
    process.stderr.write(`${lines.join('\n')}\n`);
    return 1;
  } finally {
    hello.clear();
    grant.clear();
    client?.close();
  }
}

/**
 * The client's words for the helper, which takes no --socket (qemu and libvirt pass only its own arguments):
 * only the variable applies (an outside review: a hint said `check --socket and $TAPBROKER_SOCKET').
 */
export function helperWords(text: string): string {
  return text.replace(/--socket (?:or|and) \$TAPBROKER_SOCKET/g, '$TAPBROKER_SOCKET');
}

/** The longest a network's plug hook may run (the policy's hook_timeout, at most). */
const MAX_HOOK_SECONDS = 300;

/** Seconds the helper waits for the broker's hello: $TAPBROKER_HELPER_TIMEOUT (1 to 3600), else 30, said if set. */
function helperTimeout(): number {
  const set = process.env['TAPBROKER_HELPER_TIMEOUT'];
  if (set === undefined || set === '') return 30;
  const v = Number(set);
  if (/^\d+$/.test(set) && v >= 1 && v <= 3600) return v;
  process.stderr.write('tapbroker-bridge-helper: warning: TAPBROKER_HELPER_TIMEOUT is not 1 to 3600 seconds: '
    + '30 used\n');
  return 30;
}

if (process.argv[1] && fs.realpathSync(process.argv[1]) === fs.realpathSync(new URL(import.meta.url).pathname)) {
  keepInspectorShut();
  dropUnwritableOutput();
  helperMain(process.argv.slice(2)).then((code) => exitFlushed(code), (err: Error) => {
    process.stderr.write(`tapbroker-bridge-helper: internal error: ${err.stack}\n`);
    process.exit(1);
  });
}
