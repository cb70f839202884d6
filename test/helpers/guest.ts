// The tiny end-to-end guest: a Debian kernel and a busybox initramfs built by test/guest/build-guest.sh
// from installed Debian packages, cached under .cache/guest.
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT } from './broker.js';

export interface GuestImage {
  kernel: string;
  initrd: string;
}

export const QEMU = 'qemu-system-x86_64';

/** Why the guest cannot run here, or null when it can. */
export function guestUnavailable(): string | null {
  if (spawnSync(QEMU, ['--version']).status !== 0) return `${QEMU} is not installed (apt-get install qemu-system-x86)`;
  if (!fs.readdirSync('/boot').some((f) => f.startsWith('vmlinuz-'))) return 'no kernel in /boot (apt-get install linux-image-amd64)';
  if (!fs.existsSync('/bin/busybox')) return 'no /bin/busybox (apt-get install busybox-static)';
  return null;
}

/** Builds the guest (a no-op when the cache is current) and returns its files, readable by anyone. */
export function guestImage(): GuestImage {
  const cache = path.join(ROOT, '.cache');
  fs.mkdirSync(cache, { recursive: true, mode: 0o755 });
  fs.chmodSync(cache, 0o755);
  const out = path.join(cache, 'guest');
  execFileSync('bash', [path.join(ROOT, 'test/guest/build-guest.sh'), out], { stdio: ['ignore', 'ignore', 'inherit'] });
  return { kernel: path.join(out, 'vmlinuz'), initrd: path.join(out, 'initrd.img') };
}

/** qemu arguments to boot the guest under TCG, console on stdio, with instructions on the cmdline. */
export function guestQemuArgs(
  img: GuestImage, opts: { ip: string; ping: string; count?: number; timeout?: number; mac2?: string },
): string[] {
  const cmdline = `console=ttyS0 quiet panic=-1 tb.ip=${opts.ip} tb.ping=${opts.ping}`
    + `${opts.count ? ` tb.count=${opts.count}` : ''}${opts.timeout ? ` tb.timeout=${opts.timeout}` : ''}`
    + `${opts.mac2 ? ` tb.mac2=${opts.mac2}` : ''}`;
  return ['-accel', 'tcg', '-m', '256', '-nodefaults', '-display', 'none', '-serial', 'stdio', '-no-reboot', '-kernel', img.kernel, '-initrd', img.initrd, '-append', cmdline];
}
