// qemu's command line for fds that the child inherits: `-netdev tap,…,fd(s)=…` and `-device …`.

export interface NicArgs {
  /** qemu netdev id. */
  id: string;
  model: string;
  /** Guest MAC; omitted from -device when null. */
  mac: string | null;
  /** Fd numbers as the child will see them, one per queue. */
  tapFds: readonly number[];
  /** vhost-net fd numbers in the child, one per queue, or none. */
  vhostFds: readonly number[];
}

const VIRTIO_NET = /^virtio-net(-pci|-device|-ccw)?(-non-transitional|-transitional)?$/;

export function isVirtioNet(model: string): boolean {
  return VIRTIO_NET.test(model);
}

/**
 * The arguments for one NIC. One queue uses `fd=`/`vhostfd=`; several use `fds=`/`vhostfds=`
 * and a multiqueue virtio device with 2N+2 MSI-X vectors. No `vnet_hdr=`: qemu detects it from the
 * fd and refuses the option together with `fd=`.
 */
export function nicArgs(nic: NicArgs): string[] {
  const n = nic.tapFds.length;
  if (n === 0) throw new Error('a NIC needs at least one tap fd');
  if (nic.vhostFds.length !== 0 && nic.vhostFds.length !== n) {
    throw new Error('vhost fds must match tap fds one to one');
  }
  const multi = n > 1;
  let netdev = `tap,id=${nic.id},${multi ? 'fds' : 'fd'}=${nic.tapFds.join(':')}`;
  if (nic.vhostFds.length > 0) netdev += `,vhost=on,${multi ? 'vhostfds' : 'vhostfd'}=${nic.vhostFds.join(':')}`;
  let device = `${nic.model},netdev=${nic.id}`;
  if (nic.mac) device += `,mac=${nic.mac}`;
  if (multi && isVirtioNet(nic.model)) device += `,mq=on,vectors=${2 * n + 2}`;
  return ['-netdev', netdev, '-device', device];
}

/** Fd numbers in the child for fds passed as extra stdio entries: the first lands on 3. */
export function childFdNumbers(counts: readonly number[], first = 3): number[][] {
  let next = first;
  return counts.map((c) => Array.from({ length: c }, () => next++));
}

/** A word quoted for a POSIX shell only when it needs it. */
export function shellQuote(word: string): string {
  return /^[A-Za-z0-9_./:=,@%+-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}
