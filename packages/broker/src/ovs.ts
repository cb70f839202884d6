// Open vSwitch attachment: a tap becomes a port of an OVS bridge, tagged with its lease in
// external-ids so the switch's own database says whose it is.
//
// Why ovs-vsctl and not OVSDB JSON-RPC: speaking RFC 7047 directly would save a fork+exec per call,
// but attaching a port correctly is more than one `transact`: insert Interface and Port, mutate
// Bridge.ports, bump Open_vSwitch.next_cfg, wait for ovs-vswitchd to reach it in cur_cfg, then read
// Interface.error/ofport to learn whether the device could be opened. ovs-vsctl is the documented
// admin tool that does exactly that, follows schema changes across OVS releases, and is what an admin
// will use to inspect what we did. The price is a fork+exec and a connection (~6 ms) per call, plus
// for add-port the wait for ovs-vswitchd (~6 ms more). So every call is an async `execFile`: no
// synchronous wait on the event loop, no shell (argv only, every value validated first), ovs-vsctl's
// own --timeout with our kill as a backstop, and an empty environment (the --db target is always
// explicit, so ovs-vsctl needs nothing from it).
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { TapbrokerError, checkIfName } from '@tapbroker/protocol/core';
import { getpwuid, limitAddressSpace } from './libc.js';
import { notRootsAlone } from './paths.js';

/** ovs-vsctl's address space (RLIMIT_AS): about 20 MB is what it maps for a database of thousands of ports. */
const VSCTL_ADDRESS_SPACE = 256 << 20;
/** ovs-vsctl's --timeout, seconds: how long it may wait for ovsdb-server and ovs-vswitchd. */
const VSCTL_TIMEOUT_S = 5;
/** Our kill, in case ovs-vsctl itself hangs past its own alarm. */
const EXEC_TIMEOUT_MS = (VSCTL_TIMEOUT_S + 2) * 1000;
/** Debian's (and upstream's) compiled-in rundir: `ovs-vsctl --help` shows unix:/var/run/openvswitch/db.sock. */
const DEFAULT_RUNDIR = '/var/run/openvswitch';
const FALLBACK_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';
const EXTERNAL_ID_KEY = /^tapbroker-[a-z]+$/;
const EXTERNAL_ID_VALUE = /^[A-Za-z0-9_.:-]{1,128}$/;
export const LEASE_KEY = 'tapbroker-lease';
export const BROKER_KEY = 'tapbroker-broker';
/** The boot a port was made in (the kernel's boot_id): a port of an earlier boot has no device, whoever made it. */
export const BOOT_KEY = 'tapbroker-boot';

let boot: string | null | undefined;
/**
 * This boot's id, 32 hex digits: the kernel's (/proc/sys/kernel/random/boot_id, dashes dropped), else the unit's
 * TAPBROKER_BOOT_ID (systemd's %b): a unit with ProcSubset=pid (the shipped one's before 0.5.0) hides /proc/sys (an
 * outside re-test: under the unit no port named its boot). Null where neither says.
 */
export function currentBoot(): string | null {
  if (boot === undefined) {
    let text = process.env['TAPBROKER_BOOT_ID'] ?? '';
    try {
      text = fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8');
    } catch {
      // Hidden (ProcSubset=pid): the unit's word.
    }
    boot = normalBoot(text);
  }
  return boot;
}

/** A boot id as ports carry it (32 lower-case hex digits), or null if `text` is none. */
export function normalBoot(text: string): string | null {
  const id = text.trim().replace(/-/g, '').toLowerCase();
  return /^[0-9a-f]{32}$/.test(id) ? id : null;
}

/** An OVSDB target this broker passes to ovs-vsctl: a unix socket path, no spaces or commas. */
export const OVSDB_TARGET = /^unix:\/[^\0\s,]+$/;

export interface AddPortOptions {
  /** Access VLAN: the port's tag. */
  tag?: number;
  /** Trunk VLANs the port carries tagged. */
  trunks?: number[];
  /** Written to both the Port and the Interface; must include `tapbroker-lease`. */
  externalIds: Record<string, string>;
}

export interface OvsPort {
  bridge: string;
  port: string;
  lease: string;
  /** The owner's uid from tapbroker-uid; -1 if the record's value is missing or malformed. */
  uid: number;
  /** The broker that made it (tapbroker-broker); null for ports made before 0.5.0. */
  broker: string | null;
  /** The boot it was made in (tapbroker-boot); null for ports that do not say. */
  boot: string | null;
}

/**
 * The --db target, found as ovs-vsctl finds it: an explicit one (the policy's `ovsdb`) wins, then
 * `$OVS_RUNDIR/db.sock` from the broker's environment, then the compiled-in default.
 */
export function ovsdbTarget(policyValue?: string): string {
  if (policyValue !== undefined) {
    // One unix socket only: a comma would make ovs-vsctl try a list of remotes.
    if (!OVSDB_TARGET.test(policyValue)) {
      throw new TapbrokerError('TB_E_INVALID_REQUEST', `ovsdb target \`${policyValue}' is not unix:/path`);
    }
    return policyValue;
  }
  const rundir = process.env.OVS_RUNDIR;
  return `unix:${rundir ? rundir : DEFAULT_RUNDIR}/db.sock`;
}

/**
 * Is `db` a unix socket gone with the directory it was in? An Open vSwitch retired, its run directory removed. Not
 * one stopped: ovsdb-server removes its socket when it exits, and leaves the directory (a re-test's Open vSwitch,
 * stopped for maintenance, was taken for retired).
 */
export function ovsdbGone(db: string): boolean {
  if (!db.startsWith('unix:')) return false;
  const dir = path.dirname(db.slice('unix:'.length));
  try {
    return fs.lstatSync(dir, { throwIfNoEntry: false }) === undefined;
  } catch {
    return false; // ENOTDIR, EACCES: not known to be gone.
  }
}

/**
 * add-port in one transaction: the port (tag, trunks) and our external-ids on Port and Interface,
 * then a wait for ovs-vswitchd. Never --may-exist: an existing port is someone's, not ours to adopt.
 * If ovs-vswitchd cannot open the device, or never answers, the port is removed again.
 */
export async function addPort(db: string, bridge: string, port: string, opts: AddPortOptions): Promise<void> {
  checkDb(db);
  checkName(bridge, 'bridge');
  checkName(port, 'port');
  const cols: string[] = [];
  if (opts.tag !== undefined) cols.push(`tag=${checkVlan(opts.tag)}`);
  if (opts.trunks !== undefined) {
    if (opts.trunks.length === 0) throw new TapbrokerError('TB_E_INVALID_REQUEST', `trunks for \`${port}' are empty`);
    cols.push(`trunks=${opts.trunks.map(checkVlan).join(',')}`);
  }
  const ids = externalIdArgs(port, opts.externalIds);
  const lease = opts.externalIds[LEASE_KEY]!;
  const what = `failed to add \`${port}' to ovs bridge \`${bridge}'`;
  let r: VsctlResult;
  try {
    r = await vsctl(
      db,
      ['--', 'add-port', bridge, port, ...cols, '--', 'set', 'Interface', port, ...ids,
        '--', 'set', 'Port', port, ...ids],
      what,
    );
  } catch (err) {
    // A timeout may come after the commit (ovs-vswitchd not applying it): take back what is ours.
    if (err instanceof TapbrokerError && (err as VsctlError).timedOut) await removeIfOurs(db, bridge, port, lease);
    throw err;
  }
  // ovs-vsctl commits, waits for ovs-vswitchd, and only warns (exit 0) when it could not set the port up: with the
  // reason, or without one where ovs-vswitchd recorded none (a bridge whose datapath it could not create).
  const failed = setUpFailed(r.stderr, port);
  if (failed !== null) {
    await removeIfOurs(db, bridge, port, lease);
    throw new TapbrokerError('TB_E_KERNEL', `${what}: ${failed}`);
  }
}

/** ovs-vsctl's warning that ovs-vswitchd could not set `port` up, as a reason; null if it gave none for it. */
export function setUpFailed(stderr: string, port: string): string | null {
  const said = `Error detected while setting up '${port}'`;
  const line = stderr.split('\n').find((l) => l.includes(said));
  if (line === undefined) return null;
  const rest = line.slice(line.indexOf(said) + said.length);
  const reason = rest.startsWith(':') ? rest.slice(1).replace(SEE_LOG, '').trim() : '';
  return reason || 'ovs-vswitchd could not set it up (it recorded no reason; its log may say why)';
}
const SEE_LOG = /\.?\s+See ovs-vswitchd log for details\.?\s*$/;

/**
 * del-port; true if the port existed. It does not wait for ovs-vswitchd: the record is what we own,
 * and ovs-vswitchd catches up on its own (waiting would turn a down ovs-vswitchd into a 5 s stall).
 */
export async function delPort(db: string, bridge: string, port: string): Promise<boolean> {
  checkDb(db);
  checkName(bridge, 'bridge');
  checkName(port, 'port');
  // The get runs in the same transaction, before the delete: it prints the name only if it existed.
  const r = await vsctl(
    db,
    ['--no-wait', '--', '--if-exists', 'get', 'Port', port, 'name', '--', '--if-exists', 'del-port', bridge, port],
    `failed to remove \`${port}' from ovs bridge \`${bridge}'`,
  );
  return r.stdout.trim() !== '';
}

/**
 * The ports carrying a tapbroker-lease external-id (`ours`, with their bridges) and the name of every interface
 * in the database (`names`, whoever made it: ovs-vswitchd takes any device of such a name into its port). One
 * ovs-vsctl call.
 */
export async function listPorts(db: string): Promise<{ ours: OvsPort[]; names: string[] }> {
  checkDb(db);
  // find's `key!=""` matches only records that have the key (ovs-vsctl(8)); Bridge.ports gives the bridge.
  const r = await vsctl(
    db,
    ['--no-wait', '--format=json', '--', '--columns=name,ports', 'list', 'Bridge',
      '--', '--columns=_uuid,name,external_ids', 'find', 'Port', `external_ids:${LEASE_KEY}!=""`,
      '--', '--columns=name', 'list', 'Interface'],
    'failed to list open vswitch ports',
  );
  const docs = r.stdout.split('\n').filter((l) => l.trim() !== '');
  if (docs.length !== 3) {
    throw new TapbrokerError('TB_E_KERNEL', `unexpected ovs-vsctl output listing ports: ${r.stdout.slice(0, 200)}`);
  }
  let bridges: Table;
  let ports: Table;
  let interfaces: Table;
  try {
    [bridges, ports, interfaces] = docs.map((d) => JSON.parse(d) as Table) as [Table, Table, Table];
  } catch (err) {
    throw new TapbrokerError('TB_E_KERNEL', `unparseable ovs-vsctl output listing ports: ${(err as Error).message}`);
  }
  const bridgeOf = new Map<string, string>();
  for (const [name, set] of bridges.data) for (const uuid of setOf(set)) bridgeOf.set(uuidOf(uuid), String(name));
  const ours: OvsPort[] = [];
  for (const [uuid, name, map] of ports.data) {
    const ids = mapOf(map);
    const lease = ids.get(LEASE_KEY);
    const bridge = bridgeOf.get(uuidOf(uuid));
    if (!lease || bridge === undefined) continue;
    const uidText = ids.get('tapbroker-uid') ?? '';
    ours.push({
      bridge, port: String(name), lease, uid: /^\d{1,10}$/.test(uidText) ? Number(uidText) : -1,
      broker: ids.get(BROKER_KEY) ?? null, boot: normalBoot(ids.get(BOOT_KEY) ?? ''),
    });
  }
  return { ours, names: interfaces.data.map(([name]) => String(name)) };
}

/** Is `name` an OVS bridge? (br-exists: exit 2 means no.) */
export async function isOvsBridge(db: string, name: string): Promise<boolean> {
  checkDb(db);
  checkName(name, 'bridge');
  const r = await vsctl(db, ['--no-wait', '--', 'br-exists', name], `failed to look up ovs bridge \`${name}'`, [0, 2]);
  return r.code === 0;
}

/** Removes a port only while it carries this lease: never a same-named port of someone else. */
async function removeIfOurs(db: string, bridge: string, port: string, lease: string): Promise<void> {
  try {
    await delPortOf(db, bridge, port, lease);
  } catch {
    // Best effort: a leftover record carries our lease, so the broker's reconcile finds it later.
  }
}

/**
 * del-port, only while the port still carries `lease` in its external-ids (a port of that name made since
 * for another lease is left alone); true if it was removed. From whichever bridge has it now: one moved to
 * another bridge, its record kept, is still this lease's (naming `bridge` made ovs-vsctl refuse, for good).
 */
export async function delPortOf(db: string, bridge: string, port: string, lease: string): Promise<boolean> {
  checkDb(db);
  checkName(bridge, 'bridge');
  checkName(port, 'port');
  const what = `failed to remove \`${port}' from ovs bridge \`${bridge}'`;
  // The whole map: a port without our key (an administrator's of that name) is not an error, only not ours.
  const r = await vsctl(db, ['--no-wait', '--', '--if-exists', 'get', 'Port', port, 'external_ids'], what);
  const held = new RegExp(`(?:^|[{ ,])"?${LEASE_KEY}"?="?([0-9a-f]+)"?(?:[,}]|$)`).exec(r.stdout.trim())?.[1];
  if (held !== lease) return false;
  await vsctl(db, ['--no-wait', '--', '--if-exists', 'del-port', port], what);
  return true;
}

interface Table {
  headings: string[];
  data: unknown[][];
}

/** OVSDB JSON: a set is ["set", [...]], except that a one-element set is the element itself. */
function setOf(v: unknown): unknown[] {
  if (Array.isArray(v) && v[0] === 'set' && Array.isArray(v[1])) return v[1] as unknown[];
  return [v];
}

function uuidOf(v: unknown): string {
  return Array.isArray(v) && v[0] === 'uuid' ? String(v[1]) : '';
}

function mapOf(v: unknown): Map<string, string> {
  const m = new Map<string, string>();
  if (Array.isArray(v) && v[0] === 'map' && Array.isArray(v[1])) {
    for (const pair of v[1] as unknown[][]) m.set(String(pair[0]), String(pair[1]));
  }
  return m;
}

function checkName(name: string, what: 'bridge' | 'port'): void {
  const why = checkIfName(name);
  // A leading '-' is a valid ifname but would read as an option to ovs-vsctl in some positions.
  const bad = why ?? (name.startsWith('-') ? 'may not start with -' : null);
  if (bad) throw new TapbrokerError('TB_E_INVALID_NAME', `ovs ${what} name \`${name}' ${bad}`);
}

function checkVlan(v: number): number {
  if (!Number.isInteger(v) || v < 1 || v > 4094) {
    throw new TapbrokerError('TB_E_INVALID_REQUEST', `vlan ${v} is not an integer from 1 to 4094`);
  }
  return v;
}

function checkDb(db: string): void {
  if (!OVSDB_TARGET.test(db)) {
    throw new TapbrokerError('TB_E_INVALID_REQUEST', `ovsdb target \`${db}' is not unix:/path`);
  }
}

/** `external-ids:k=v` arguments; values only from a set that needs no quoting in ovs-vsctl's syntax. */
function externalIdArgs(port: string, ids: Record<string, string>): string[] {
  if (typeof ids[LEASE_KEY] !== 'string') {
    throw new TapbrokerError('TB_E_INVALID_REQUEST', `external-ids for \`${port}' lack ${LEASE_KEY}`);
  }
  return Object.entries(ids).map(([k, v]) => {
    if (!EXTERNAL_ID_KEY.test(k)) {
      throw new TapbrokerError(
        'TB_E_INVALID_REQUEST',
        `external-id key \`${k}' for \`${port}' is not tapbroker-[a-z]+`,
      );
    }
    if (typeof v !== 'string' || !EXTERNAL_ID_VALUE.test(v)) {
      throw new TapbrokerError(
        'TB_E_INVALID_REQUEST',
        `external-id ${k} for \`${port}' may only contain A-Z a-z 0-9 _ . : -`,
      );
    }
    return `external-ids:${k}=${v}`;
  });
}

let vsctlPath: string | null = null;

/** ovs-vsctl's absolute path, from the broker's PATH (the child gets no environment to search with). */
function findVsctl(): string {
  if (vsctlPath) return vsctlPath;
  for (const dir of (process.env.PATH || FALLBACK_PATH).split(':')) {
    if (!path.isAbsolute(dir)) continue;
    const candidate = path.join(dir, 'ovs-vsctl');
    try {
      fs.accessSync(candidate, fs.constants.X_OK);
      if (fs.statSync(candidate).isFile()) return (vsctlPath = candidate);
    } catch {
      // not here
    }
  }
  throw new TapbrokerError('TB_E_KERNEL', 'open vswitch unavailable: ovs-vsctl not found (install openvswitch-switch)');
}

interface VsctlResult {
  code: number;
  stdout: string;
  stderr: string;
}

type VsctlError = TapbrokerError & { timedOut?: boolean };

/**
 * One ovs-vsctl run against `db`; exit codes outside `ok` become a TB_E_KERNEL naming `what`. Only through a
 * socket no user could have put there: one in a directory a user can write would let that user answer as
 * the switch (root's, or Open vSwitch's own account's, where the distribution runs it as `openvswitch`).
 */
function vsctl(db: string, args: string[], what: string, ok: readonly number[] = [0]): Promise<VsctlResult> {
  const socket = db.slice('unix:'.length);
  const unsafe = notRootsAlone(socket, (uid) => uid === 0 || getpwuid(uid)?.name === 'openvswitch');
  if (unsafe) {
    return Promise.reject(new TapbrokerError('TB_E_KERNEL', `open vswitch unavailable: ${what}: its database socket `
      + `${socket} ${unsafe}; not used`));
  }
  const file = findVsctl();
  // -vsyslog:off: ovs-vsctl would log every call to syslog, two lines per device in the broker's journal.
  const argv = [`--db=${db}`, `--timeout=${VSCTL_TIMEOUT_S}`, '-vsyslog:off', ...args];
  return new Promise((resolve, reject) => {
    const child = execFile(
      file,
      argv,
      { env: {}, timeout: EXEC_TIMEOUT_MS, killSignal: 'SIGKILL', maxBuffer: 16 << 20, encoding: 'utf8' },
      (err, stdout, stderr) => {
        if (!err) return resolve({ code: 0, stdout, stderr });
        const e = err as NodeJS.ErrnoException & {
          code?: number | string;
          signal?: NodeJS.Signals | null;
          killed?: boolean;
        };
        if (typeof e.code === 'number' && ok.includes(e.code)) return resolve({ code: e.code, stdout, stderr });
        const msg = stderr
          .trim()
          .split('\n')
          .map((l) => l.replace(/^ovs-vsctl: /, ''))
          .filter((l) => !/terminating with signal|default log directory/.test(l))
          .join('; ');
        let out: VsctlError;
        if (e.code === 'ENOENT' || e.code === 'EACCES') {
          out = new TapbrokerError('TB_E_KERNEL', `open vswitch unavailable: cannot run ${file}: ${e.code}`, {
            cause: err,
          });
        } else if (/database connection failed/.test(msg)) {
          out = new TapbrokerError('TB_E_KERNEL', `open vswitch unavailable: ${msg}`, { cause: err });
        } else if (e.signal === 'SIGALRM' || e.killed) {
          // ovs-vsctl's --timeout is SIGALRM; the usual cause is an ovs-vswitchd that is not running.
          out = new TapbrokerError(
            'TB_E_KERNEL',
            `open vswitch unavailable: ${what}: no answer within ${VSCTL_TIMEOUT_S} s (is ovs-vswitchd running?)`,
            { cause: err },
          );
          out.timedOut = true;
        } else {
          out = new TapbrokerError('TB_E_KERNEL', `${what}: ${msg || `ovs-vsctl exited with ${e.code ?? e.signal}`}`, {
            cause: err,
          });
        }
        reject(out);
      },
    );
    // Its memory bounded: a database that answers without end grew one past 1 GB in 3 s (an outside review's).
    if (child.pid !== undefined) limitAddressSpace(child.pid, VSCTL_ADDRESS_SPACE);
  });
}
