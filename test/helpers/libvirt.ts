// A real unprivileged libvirt session daemon (qemu:///session as uid 65534) inside a test's network
// namespace. libvirt runs `bridge_helper` with a cleared environment, so the helper finds the broker only at
// the default path /run/tapbroker/tapbroker.sock: libvirtd runs in a private mount namespace whose /run is
// a fresh tmpfs with the broker's directory bind-mounted at /run/tapbroker. The host's /run is never
// touched. libvirtd also runs in its own PID namespace, whose init is a shell tied to this process: when
// the test ends, fails or is killed, the kernel kills libvirtd and the virtlogd and qemu it daemonized.
// Everything libvirt writes lives in one temporary HOME.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { tempDir } from './broker.js';
import type { GuestImage } from './guest.js';
import { guestQemuArgs } from './guest.js';
import type { Netns } from './netns.js';
import { NOBODY, setprivArgs } from './unpriv.js';
import { poll } from './wait.js';

/** The source name of the private /run tmpfs: the host's mount table must never show it. */
export const PRIVATE_RUN_SOURCE = 'tapbroker-test-run';

const LIBVIRTD = ['/usr/sbin/libvirtd', '/usr/bin/libvirtd'].find((p) => fs.existsSync(p));
const DRIVER_DIRS = ['/usr/lib/x86_64-linux-gnu', '/usr/lib64', '/usr/lib']
  .map((d) => `${d}/libvirt/connection-driver`);

const live = new Set<LibvirtSession>();
process.on('exit', () => {
  for (const s of live) s.killAll();
});

function which(bin: string): string | null {
  for (const dir of (process.env['PATH'] ?? '/usr/sbin:/usr/bin:/sbin:/bin').split(':')) {
    try {
      fs.accessSync(path.join(dir, bin), fs.constants.X_OK);
      return path.join(dir, bin);
    } catch {
      // next
    }
  }
  return null;
}

/** Why a libvirt session daemon cannot run here, or null when it can. */
export function libvirtUnavailable(): string | null {
  if (!which('virsh')) return 'virsh is not installed (apt-get install libvirt-clients)';
  if (!LIBVIRTD) return 'libvirtd is not installed (apt-get install libvirt-daemon)';
  if (!DRIVER_DIRS.some((d) => fs.existsSync(`${d}/libvirt_driver_qemu.so`))) {
    return 'libvirt\'s qemu driver is not installed (apt-get install libvirt-daemon-driver-qemu)';
  }
  if (process.getuid?.() !== 0) return 'needs root (network and mount namespaces)';
  return null;
}

export interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

function escapeXml(s: string): string {
  return s.replace(/[<>&'"]/g, (c) => `&#${c.charCodeAt(0)};`);
}

/**
 * A domain that boots the test guest under TCG with an unchanged `<interface type='bridge'>`, its serial
 * console in `console`. No <acpi/>: the guest's poweroff then only halts it, and the domain stays until it
 * is destroyed, so the tap's end follows `virsh destroy`.
 */
export function guestDomainXml(opts: {
  name: string; img: GuestImage; bridge: string; mac: string; ip: string; ping: string; console: string;
}): string {
  const args = guestQemuArgs(opts.img, { ip: opts.ip, ping: opts.ping });
  const cmdline = args[args.indexOf('-append') + 1]!;
  const e = escapeXml;
  return `<domain type='qemu'>
  <name>${e(opts.name)}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>${e(opts.img.kernel)}</kernel>
    <initrd>${e(opts.img.initrd)}</initrd>
    <cmdline>${e(cmdline)}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <interface type='bridge'>
      <source bridge='${e(opts.bridge)}'/>
      <mac address='${e(opts.mac)}'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='${e(opts.console)}'/>
      <target port='0'/>
    </serial>
  </devices>
</domain>
`;
}

/** uid of a process and whether its command line or environment mentions `needle`; null once it is gone. */
function mentions(pid: number, needle: string): { uid: number; hit: boolean } | null {
  try {
    const uid = Number(/^Uid:\s+(\d+)/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))![1]);
    const cmdline = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    const environ = fs.readFileSync(`/proc/${pid}/environ`, 'utf8');
    return { uid, hit: cmdline.includes(needle) || environ.includes(needle) };
  } catch {
    return null;
  }
}

function exeOf(pid: number): string | null {
  try {
    return fs.readlinkSync(`/proc/${pid}/exe`);
  } catch {
    return null;
  }
}

export class LibvirtSession {
  /** libvirtd's output (its log goes to stderr), for failure messages. */
  output = '';
  /** libvirtd's pid (in this process's PID namespace). */
  pid = 0;

  /** `proc` is `unshare`, the parent of the PID namespace's init; killing it ends the namespace. */
  private constructor(readonly proc: ChildProcess, readonly dir: string, readonly home: string) {
    live.add(this);
    proc.stdout!.setEncoding('utf8').on('data', (d: string) => (this.output += d));
    proc.stderr!.setEncoding('utf8').on('data', (d: string) => (this.output += d));
  }

  /**
   * Starts libvirtd as uid 65534 in `ns` and a private mount namespace where /run/tapbroker is `brokerDir`,
   * with `qemuConf` as the user's ~/.config/libvirt/qemu.conf; resolves once virsh can talk to it.
   */
  static async start(ns: Netns, brokerDir: string, opts: { tag: string; qemuConf: string }): Promise<LibvirtSession> {
    const dir = tempDir(opts.tag);
    const home = path.join(dir, 'home');
    for (const sub of ['run', 'config/libvirt', 'cache', 'data']) {
      fs.mkdirSync(path.join(home, sub), { recursive: true });
    }
    fs.writeFileSync(path.join(home, 'config/libvirt/qemu.conf'), opts.qemuConf);
    fs.chmodSync(path.join(home, 'run'), 0o700);
    for (const sub of ['', 'run', 'config', 'config/libvirt', 'config/libvirt/qemu.conf', 'cache', 'data']) {
      fs.chownSync(path.join(home, sub), NOBODY, NOBODY);
    }
    // The shell stays as the PID namespace's init (no exec): it reaps what libvirt daemonizes (virtlogd, qemu),
    // which libvirt needs to see a destroyed qemu gone.
    const script = [
      `mount -t tmpfs -o mode=0755 ${PRIVATE_RUN_SOURCE} /run`,
      'mkdir /run/tapbroker',
      'mount --bind "$1" /run/tapbroker',
      'shift',
      '"$@"',
    ].join(' && ');
    // setpriv, ip netns exec and unshare exec in place; unshare ignores SIGTERM and SIGINT while it waits, and
    // dies with this process (--pdeathsig); the namespace's init dies with unshare (--kill-child).
    const args = [
      '--pdeathsig', 'KILL', '--', 'ip', 'netns', 'exec', ns.name,
      'unshare', '--mount', '--pid', '--fork', '--kill-child', '--mount-proc', '--propagation', 'private',
      'sh', '-c', script, 'sh', brokerDir,
      'setpriv', ...setprivArgs(), 'env', '-i', ...LibvirtSession.envList(home), LIBVIRTD!,
    ];
    const proc = spawn('setpriv', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const session = new LibvirtSession(proc, dir, home);
    const sock = path.join(home, 'run/libvirt/libvirt-sock');
    const outcome = await poll(async () => {
      if (!session.alive) return 'exited';
      if (fs.existsSync(sock) && (await session.virsh('uri')).code === 0) {
        session.pid = session.processes().find((pid) => exeOf(pid) === LIBVIRTD) ?? 0;
        if (session.pid) return 'up';
      }
      return null;
    }, { ms: 30_000, every: 100 });
    if (outcome === 'up') return session;
    await session.stop();
    throw new Error(outcome === 'exited'
      ? `libvirtd exited (${proc.exitCode ?? proc.signalCode}):\n${session.output}`
      : `libvirtd did not come up in 30 s:\n${session.output}`);
  }

  /** The session's environment. PATH finds this node for the helper's `#!/usr/bin/env node`. */
  private static envList(home: string): string[] {
    const bin = path.dirname(process.execPath);
    return [
      `PATH=${bin === '/usr/bin' ? '' : `${bin}:`}/usr/sbin:/usr/bin:/sbin:/bin`, 'LC_ALL=C', `HOME=${home}`,
      `XDG_RUNTIME_DIR=${home}/run`, `XDG_CONFIG_HOME=${home}/config`, `XDG_CACHE_HOME=${home}/cache`,
      `XDG_DATA_HOME=${home}/data`,
    ];
  }

  get alive(): boolean {
    return this.proc.exitCode === null && this.proc.signalCode === null;
  }

  /**
   * `virsh -c qemu:///session ARGS…` as uid 65534, from outside the namespaces: it only needs the session
   * socket. LIBVIRT_AUTOSTART=0: should libvirtd be gone, fail instead of starting one outside them.
   */
  virsh(...args: string[]): Promise<Run> {
    const env: NodeJS.ProcessEnv = {};
    for (const kv of [...LibvirtSession.envList(this.home), 'LIBVIRT_AUTOSTART=0']) {
      env[kv.slice(0, kv.indexOf('='))] = kv.slice(kv.indexOf('=') + 1);
    }
    const argv = [...setprivArgs(), 'virsh', '-c', 'qemu:///session', ...args];
    return new Promise((resolve) => {
      execFile('setpriv', argv, { env, timeout: 60_000, encoding: 'utf8' }, (err, stdout, stderr) => {
        resolve({ code: err ? (typeof err.code === 'number' ? err.code : null) : 0, stdout, stderr });
      });
    });
  }

  /** Writes a file the session's user owns into its HOME; returns its path. */
  writeFile(name: string, content: string): string {
    const p = path.join(this.home, name);
    fs.writeFileSync(p, content);
    fs.chownSync(p, NOBODY, NOBODY);
    return p;
  }

  /** Pids of every process of uid 65534 whose command line or environment names this session's directory. */
  processes(): number[] {
    const needle = `${this.dir}/`;
    return fs.readdirSync('/proc').filter((n) => /^\d+$/.test(n)).map(Number).filter((pid) => {
      const m = mentions(pid, needle);
      return m !== null && m.uid === NOBODY && m.hit;
    });
  }

  /** Kills the PID namespace (and with it everything in it), and whatever of the session escaped it. */
  killAll(): void {
    for (const pid of new Set([...(this.alive ? [this.proc.pid!] : []), ...this.processes()])) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone already
      }
    }
  }

  /** Destroys and undefines every domain, stops libvirtd, ends its namespace, removes the directory. */
  async stop(): Promise<void> {
    if (this.alive && this.pid) {
      const list = await this.virsh('list', '--all', '--name');
      for (const name of list.stdout.split('\n').map((l) => l.trim()).filter(Boolean)) {
        await this.virsh('destroy', name);
        await this.virsh('undefine', name);
      }
      process.kill(this.pid, 'SIGTERM');
      await poll(() => exeOf(this.pid) === null, { ms: 5000, every: 50 });
    }
    const gone = () => !this.alive && this.processes().length === 0;
    for (let i = 0; i < 3 && !gone(); i++) {
      this.killAll();
      await poll(gone, { ms: 2000, every: 50 });
    }
    live.delete(this);
    fs.rmSync(this.dir, { recursive: true, force: true });
  }
}
