// qemu's command line for fds that the child inherits: `-netdev tap,…,fd(s)=…` and `-device …`.

export interface NicArgs {
  /** qemu netdev id. */
  id: string;
  /** The -device model; null (`model=none`): no -device, the user writes it with `netdev=ID`. */
  model: string | null;
  /** Guest MAC; omitted from -device when null. */
  mac: string | null;
  /** Fd numbers as the child will see them, one per queue. */
  tapFds: readonly number[];
  /** vhost-net fd numbers in the child, one per queue, or none. */
  vhostFds: readonly number[];
  /** Extra -device properties (`dev.KEY=VALUE`), appended in order. */
  props?: readonly (readonly [string, string])[];
}

const VIRTIO_NET = /^virtio-net(-pci|-device|-ccw)?(-non-transitional|-transitional)?$/;
// MSI-X vectors are a PCI proxy's property: virtio-net-device (virtio-mmio, microvm) and virtio-net-ccw have
// none, and qemu refuses to start with one. Plain `virtio-net` is qemu's alias for virtio-net-pci on every
// target with PCI (x86, arm, riscv, ppc); s390x users name virtio-net-ccw.
const VIRTIO_NET_PCI = /^virtio-net(-pci)?(-non-transitional|-transitional)?$/;

export function isVirtioNet(model: string): boolean {
  return VIRTIO_NET.test(model);
}

/** A qemu netdev id, and a -device model name: nothing qemu would read as a second property. */
export const QEMU_ID = /^[A-Za-z][A-Za-z0-9_.-]{0,31}$/;
export const QEMU_MODEL = /^[A-Za-z0-9_-]{1,64}$/;
const MAC = /^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$/;

/** -device properties the client sets itself (`driver` is the model's own key in qemu's syntax). */
export const RESERVED_PROPERTIES: readonly string[] = ['netdev', 'mac', 'mq', 'vectors', 'id', 'driver'];
const PROPERTY_KEY = /^[A-Za-z][A-Za-z0-9_.-]{0,63}$/;

/**
 * Why `key=value` cannot be a -device property, or null. qemu splits -device on `,` (`,,` escapes one);
 * we refuse commas rather than escape them, so a value never reads as a second property.
 */
export function checkDeviceProperty(key: string, value: string): string | null {
  if (!PROPERTY_KEY.test(key)) return 'must start with a letter and use A-Z a-z 0-9 _ . - (at most 64)';
  if (RESERVED_PROPERTIES.includes(key.toLowerCase())) return 'is set by tapbroker';
  if (value.includes(',')) return 'has a comma, which qemu would read as the start of another property';
  if (/[\u0000-\u001f\u007f-\u009f]/.test(value)) return 'has a control character';
  if (value.length > 256) return 'is longer than 256 characters';
  return null;
}

/**
 * The arguments for one NIC. One queue uses `fd=`/`vhostfd=`; several use `fds=`/`vhostfds=`
 * and a multiqueue virtio device (`mq=on`), with 2N+2 MSI-X vectors on PCI. No `vnet_hdr=`: qemu detects it from the
 * fd and refuses the option together with `fd=`.
 */
export function nicArgs(nic: NicArgs): string[] {
  const n = nic.tapFds.length;
  if (n === 0) throw new Error('a NIC needs at least one tap fd');
  // Checked again here, as the -device properties below: the library's callers need not have come through
  // parseNetSpec, and a comma in any of these would add options of the caller's to qemu's (an outside review).
  if (!QEMU_ID.test(nic.id)) {
    throw new Error(`netdev id \`${nic.id}' must start with a letter and use A-Z a-z 0-9 _ . -`);
  }
  if (nic.model !== null && !QEMU_MODEL.test(nic.model)) throw new Error(`\`${nic.model}' is not a device model name`);
  if (nic.mac && !MAC.test(nic.mac)) throw new Error(`\`${nic.mac}' is not a MAC address`);
  if (![...nic.tapFds, ...nic.vhostFds].every((fd) => Number.isInteger(fd) && fd >= 0)) {
    throw new Error('fd numbers must be whole numbers');
  }
  if (nic.vhostFds.length !== 0 && nic.vhostFds.length !== n) {
    throw new Error('vhost fds must match tap fds one to one');
  }
  const multi = n > 1;
  let netdev = `tap,id=${nic.id},${multi ? 'fds' : 'fd'}=${nic.tapFds.join(':')}`;
  if (nic.vhostFds.length > 0) netdev += `,vhost=on,${multi ? 'vhostfds' : 'vhostfd'}=${nic.vhostFds.join(':')}`;
  if (nic.model === null) {
    if (nic.props?.length) throw new Error('-device properties need a -device');
    return ['-netdev', netdev];
  }
  let device = `${nic.model},netdev=${nic.id}`;
  if (nic.mac) device += `,mac=${nic.mac}`;
  if (multi && isVirtioNet(nic.model)) device += ',mq=on';
  if (multi && VIRTIO_NET_PCI.test(nic.model)) device += `,vectors=${2 * n + 2}`;
  for (const [key, value] of nic.props ?? []) {
    const why = checkDeviceProperty(key, value);
    if (why) throw new Error(`-device property \`${key}' ${why}`);
    device += `,${key}=${value}`;
  }
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
