// A fresh network namespace per test file, removed even when tests fail.
import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';

const live = new Set<string>();
process.on('exit', () => {
  for (const name of live) spawnSync('ip', ['netns', 'del', name]);
});

export interface LinkInfo {
  ifindex: number;
  ifname: string;
  flags: string[];
  mtu: number;
  master?: string;
  address: string;
  operstate: string;
  ifalias?: string;
  linkinfo?: { info_kind?: string; info_slave_kind?: string; info_data?: Record<string, unknown> };
  stats64?: { rx: { packets: number; bytes: number }; tx: { packets: number; bytes: number } };
}

/**
 * A private clone device (char 10:200) of mode 0666 in `dir`, as udev makes /dev/net/tun on real hosts:
 * what any local user can open, without changing this machine's /dev/net/tun.
 */
export function tunNode(dir: string): string {
  const node = `${dir}/tun`;
  if (existsSync(node)) return node;
  execFileSync('mknod', ['-m', '0666', node, 'c', '10', '200']);
  return node;
}

export class Netns {
  private constructor(readonly name: string) {}

  static create(tag: string): Netns {
    const name = `tbt-${tag}-${randomBytes(3).toString('hex')}`;
    execFileSync('ip', ['netns', 'add', name]);
    live.add(name);
    const ns = new Netns(name);
    ns.ip('link', 'set', 'lo', 'up');
    return ns;
  }

  /** `ip -n NS ARGS…`, returning stdout. */
  ip(...args: string[]): string {
    return execFileSync('ip', ['-n', this.name, ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  }

  /**
   * A bridge with an address, up, its MAC pinned as the broker requires (addr_assign_type 3): a bridge
   * whose MAC nobody set takes its lowest port's, which a guest could choose.
   */
  /** `mcastSnooping: false` keeps the bridge from sending IGMP reports of its own (it sends them once up). */
  bridge(name: string, opts: { mtu?: number; address?: string; mcastSnooping?: boolean } = {}): void {
    this.ip('link', 'add', name, 'type', 'bridge', ...(opts.mcastSnooping === false ? ['mcast_snooping', '0'] : []));
    this.ip('link', 'set', name, 'address', `02:00:5e:${randomBytes(3).toString('hex').match(/../g)!.join(':')}`);
    if (opts.mtu) this.ip('link', 'set', name, 'mtu', String(opts.mtu));
    if (opts.address) this.ip('addr', 'add', opts.address, 'dev', name);
    this.ip('link', 'set', name, 'up');
  }

  links(): LinkInfo[] {
    return JSON.parse(this.ip('-j', '-d', '-s', 'link', 'show')) as LinkInfo[];
  }

  link(name: string): LinkInfo | undefined {
    return this.links().find((l) => l.ifname === name);
  }

  /** Names of every link that is not loopback and not in `keep`. */
  extraLinks(keep: readonly string[]): string[] {
    return this.links().map((l) => l.ifname).filter((n) => n !== 'lo' && !keep.includes(n));
  }

  destroy(): void {
    if (!live.delete(this.name)) return;
    spawnSync('ip', ['netns', 'del', this.name]);
  }
}
