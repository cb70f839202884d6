// libvirt <interface> elements for devices precreated for rootless libvirtd (managed='no').

const escape = (s: string) =>
  s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/'/g, '&apos;');

/**
 * `<interface type='ethernet'>` with `<target dev=… managed='no'/>`: libvirt uses the existing device,
 * skips setting its MAC and state, opens it itself (TUNSETIFF for a tap, /dev/tap<ifindex> for a
 * macvtap), and must ask for as many queues as the device was made for.
 */
export function libvirtInterfaceXml(d: {
  name: string;
  mac: string | null;
  queues: number;
  kind: 'tap' | 'macvtap';
}): string {
  // An XML comment may not contain `--`, which an interface name may: such a name stays out of it.
  const how = d.name.includes('--')
    ? 'tapbroker release and the target dev below'
    : `tapbroker release ${escape(d.name)}`;
  const lines = [
    `<!-- ${d.kind}${d.name.includes('--') ? '' : ` ${escape(d.name)}`}, made by tapbroker; remove it with: ${how} -->`,
    `<interface type='ethernet'>`,
    ...(d.mac !== null ? [`  <mac address='${escape(d.mac)}'/>`] : []),
    `  <target dev='${escape(d.name)}' managed='no'/>`,
    `  <model type='virtio'/>`,
  ];
  if (d.queues > 1) lines.push(`  <driver queues='${d.queues}'/>`);
  lines.push('</interface>');
  return `${lines.join('\n')}\n`;
}
