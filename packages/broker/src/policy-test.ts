// `tapbrokerd test-policy [POLICY] CASES`: a table of expectations (who asks for what, allow or deny, by
// which rule, with which code) run through the broker's own grammar checks and decide(), with no broker
// and no kernel. A policy tool, loaded only by its command: never on the broker's path.
import fs from 'node:fs';
import { parse as parseToml, TomlError } from 'smol-toml';
import { z } from 'zod';
import { EX, MACVTAP_MODES, TapbrokerError, type ErrorCode, type MacvtapMode, type Nic } from '@tapbroker/protocol';
import type { Identity } from './identity.js';
import { getgrnam, getpwnam, getpwuid } from './libc.js';
import { decide, recorded, type Caller, type Policy } from './decide.js';
import { shown } from './naming.js';
import { loadPolicy, parsePolicy } from './policy.js';
import { FRAGMENTS_HELP, policyPaths, readFragmentsFrom, stagedWithout, untrustedForTools } from './policy-files.js';
import { didYouMean, lineIndex, locate, ruleAt } from './policy-text.js';
import { checkSpec, createSpec, type CreateSpec } from './spec.js';
import { hostIds, screenIds, type HostIds } from './subids.js';

const EX_FAILED = 1;

const USAGE = `usage: tapbrokerd test-policy [policy] cases [--fragments dir] [--json]

Runs each [[case]] of the TOML file cases (who asks, what they ask for as a tapbroker --net SPEC,
what the policy must decide) through the broker's own checks and decision, without a broker or a
kernel. The policy defaults to the broker's. Status 0: every case holds; 1: some case fails;
65: the cases file is malformed; 78: the policy is invalid.
${FRAGMENTS_HELP}
See tapbrokerd(8).`;

/** The codes a decision can carry: the grammar checks' and the policy's. The kernel's are never reached here. */
export const DECIDED_CODES: readonly ErrorCode[] = [
  'TB_E_POLICY_DENIED', 'TB_E_QUOTA_EXCEEDED', 'TB_E_INVALID_NAME', 'TB_E_INVALID_MAC', 'TB_E_INVALID_QUEUES',
  'TB_E_INVALID_REQUEST', 'TB_E_MAC_LOCK',
];

const Id = z.union([z.string().min(1).max(256), z.number().int().min(0).max(0xfffffffe)]);
/**
 * A user or group given as a number is an id; a string is a name, as the policy reads it, or (no such name) an id if
 * it is digits (an outside review: "1001", a user's name in the policy, was uid 1001 here, and a case passed that the
 * broker would fail).
 */
const asId = (x: string | number, named: (name: string) => boolean): number | null =>
  typeof x === 'number' ? x
    : !named(x) && /^[0-9]{1,10}$/.test(x) && Number(x) <= 0xfffffffe ? Number(x) : null;
const userNamed = (name: string) => getpwnam(name) !== null;
const groupNamed = (name: string) => getgrnam(name) !== null;
const guessed = (guess: string | null) => (guess ? ` (did you mean \`${guess}'?)` : '');

/**
 * A case's schema; each field checked on its own (a user through NSS, a request by its grammar), so one
 * pass reports every error in the file. `devices` may only name `allowRules`.
 */
function caseSchema(allowRules: readonly string[]) {
  return z.strictObject({
    name: z.string().min(1).max(256).optional(),
    user: Id.transform((u, ctx) => {
      const uid = asId(u, userNamed);
      if (uid !== null) {
        const pw = getpwuid(uid);
        return { uid, gid: pw?.gid ?? null, user: pw?.name ?? null };
      }
      // The broker knows a caller by its uid, and its name by getpwuid: where accounts share a uid, the first.
      const pw = getpwnam(u as string);
      if (pw) return { uid: pw.uid, gid: pw.gid as number | null, user: getpwuid(pw.uid)?.name ?? (u as string) };
      ctx.addIssue({ code: 'custom', message: `no user \`${u}' on this host (give a uid instead)` });
      return z.NEVER;
    }),
    groups: z.array(Id.transform((g, ctx) => {
      const gid = asId(g, groupNamed) ?? getgrnam(g as string);
      if (gid !== null) return gid;
      ctx.addIssue({ code: 'custom', message: `no group \`${g}' on this host (give a gid instead)` });
      return z.NEVER;
    })).default([]),
    gid: z.number().int().min(0).max(0xfffffffe).optional(),
    request: z.string().transform((spec, ctx) => {
      const nic = parseRequest(spec);
      if (typeof nic !== 'string') return { text: spec, nic };
      ctx.addIssue({ code: 'custom', message: `\`${shown(spec)}': ${nic}` });
      return z.NEVER;
    }),
    expect: z.enum(['allow', 'deny']),
    rule: z.string().min(1).optional(),
    code: z.string().refine((c) => (DECIDED_CODES as readonly string[]).includes(c), {
      error: (iss) => `\`${String(iss.input)}' is not one a decision gives`
        + (guessed(didYouMean(String(iss.input), DECIDED_CODES)) || `; those are ${DECIDED_CODES.join(', ')}`),
    }).transform((c) => c as ErrorCode).optional(),
    devices: z.record(z.string(), z.number().int().min(0)).default({}).superRefine((d, ctx) => {
      for (const r of Object.keys(d).filter((k) => !allowRules.includes(k))) {
        const message = `the policy has no allow rule \`${r}'${guessed(didYouMean(r, allowRules))}`;
        ctx.addIssue({ code: 'custom', path: [r], message });
      }
    }),
  }).superRefine((c, ctx) => {
    if (c.code !== undefined && c.expect === 'allow') {
      ctx.addIssue({ code: 'custom', path: ['code'], message: 'is for expect = "deny"' });
    }
  });
}
export const CASE_KEYS = Object.keys(caseSchema([]).shape);

/** One problem with the cases file, at a line of it. */
export interface CaseError {
  line: number;
  column?: number;
  message: string;
}

/** One case, resolved: a caller, a request, and what must be decided. */
export interface Case {
  index: number;
  name: string;
  line: number;
  request: string;
  caller: Caller & { user: string | null };
  nic: Nic;
  expected: { decision: 'allow' | 'deny'; rule: string | null; code: ErrorCode | null };
  devices: Readonly<Record<string, number>>;
}

export interface CaseResult {
  index: number;
  name: string;
  line: number;
  request: string;
  caller: Caller & { user: string | null };
  expected: Case['expected'];
  decided: {
    decision: 'allow' | 'deny';
    rule: string | null;
    /** The deciding rule's file (the main one or a fragment) and line, when a rule decided. */
    file: string | null;
    line: number | null;
    code: ErrorCode | null;
    message: string;
    hint: string | null;
  };
  passed: boolean;
  /** What went wrong, in words: `expected allow by rule `a', got deny …`; null when it passed. */
  failure: string | null;
}

export interface TestRun {
  /** The cases file is malformed: no case was run. */
  errors: CaseError[];
  results: CaseResult[];
  passed: number;
  failed: number;
}

const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;
const SPEC_KEYS = ['bridge', 'network', 'macvtap', 'mode', 'queues', 'vhost', 'mac', 'name', 'persistent', 'group'];

/**
 * A `--net` SPEC as the request the client would send: the client's grammar for the keys that reach the
 * broker (its own parser lives in the client package, which the broker never imports), and `group=` as
 * `tapbroker create --group` sends it. What the broker
 * checks itself (names, queue counts, MACs) is left to checkSpec, so a case can expect its refusal.
 */
export function parseRequest(spec: string): Nic | string {
  if (CONTROL.test(spec)) return 'has a control character';
  const fields = new Map<string, string>();
  for (const part of spec.split(',')) {
    const eq = part.indexOf('=');
    if (eq <= 0) return `\`${part}' is not key=value`;
    const key = part.slice(0, eq);
    if (key === 'id' || key === 'model' || key.startsWith('dev.')) {
      return `\`${key}' only shapes qemu's command line and never reaches the broker; leave it out`;
    }
    if (!SPEC_KEYS.includes(key)) {
      const guess = didYouMean(key, SPEC_KEYS);
      return `unknown key \`${key}'${guess ? ` (did you mean \`${guess}'?)` : ''}; known: ${SPEC_KEYS.join(', ')}`;
    }
    if (fields.has(key)) return `\`${key}' given twice`;
    fields.set(key, part.slice(eq + 1));
  }
  const bridge = fields.get('bridge');
  const macvtap = fields.get('macvtap');
  const network = fields.get('network');
  if ([bridge, macvtap, network].filter((x) => x !== undefined).length !== 1) {
    return 'exactly one of bridge=NAME, macvtap=PARENT or network=NAME is required';
  }
  const mode = fields.get('mode');
  if (mode !== undefined && macvtap === undefined) return 'mode= is for macvtap';
  if (mode !== undefined && !(MACVTAP_MODES as readonly string[]).includes(mode)) {
    return `mode must be one of ${MACVTAP_MODES.join(', ')}, not \`${mode}'`;
  }
  const onOff = (key: string): boolean | string => {
    const v = fields.get(key) ?? 'off';
    return v === 'on' || (v === 'off' ? false : `${key} must be on or off, not \`${v}'`);
  };
  const vhost = onOff('vhost');
  const persistent = onOff('persistent');
  if (typeof vhost === 'string') return vhost;
  if (typeof persistent === 'string') return persistent;
  const queues = fields.get('queues') ?? '1';
  if (!/^[0-9]{1,9}$/.test(queues)) return `queues must be an integer, not \`${queues}'`;
  // `tapbroker create --group G`'s field (a persistent tap also given to a group): a gid or a group name.
  const group = fields.get('group');
  // As `tapbroker create --group` sends it: digits are a gid (its re-test: read as a name here, a case passed that the
  // client's request fails).
  const gid = group === undefined ? undefined : asId(group, () => false) ?? getgrnam(group);
  if (gid === null) return `no group \`${group}' on this host (give a gid instead)`;
  const common = {
    queues: Number(queues), vhost, persistent, ...(gid !== undefined ? { group: gid } : {}),
    // The client sends a MAC in lower case; the broker then checks it as it is.
    ...(fields.has('mac') ? { mac: fields.get('mac')!.toLowerCase() } : {}),
    ...(fields.has('name') ? { name: fields.get('name')! } : {}),
  };
  if (macvtap !== undefined) {
    return { kind: 'macvtap', parent: macvtap, mode: (mode ?? 'bridge') as MacvtapMode, ...common };
  }
  return { kind: 'tap', ...(bridge !== undefined ? { bridge } : { network: network! }), ...common };
}

/** `case 3: request`, from a zod path such as ['case', 2, 'request']. */
function where(path: ReadonlyArray<PropertyKey>): string {
  if (path.length === 0) return 'top level';
  if (path[0] !== 'case' || typeof path[1] !== 'number') return path.map(String).join('.');
  const rest = path.slice(2).map(String).join('.');
  return `case ${path[1] + 1}${rest ? `: ${rest}` : ''}`;
}

function valueAt(doc: unknown, path: ReadonlyArray<PropertyKey>): unknown {
  let v = doc;
  for (const k of path) v = v !== null && typeof v === 'object' ? (v as Record<PropertyKey, unknown>)[k] : undefined;
  return v;
}

/**
 * Reads a cases file: TOML, strict keys, each user and group resolved through NSS, each request parsed.
 * Rule names in `devices` must be allow rules of `policy`. Errors carry the line of the key at fault.
 */
export function parseCases(text: string, policy: Policy): { cases: Case[]; errors: CaseError[] } {
  let doc: unknown;
  try {
    doc = parseToml(text);
  } catch (err) {
    const first = (err as Error).message.split('\n')[0]!;
    const at = err instanceof TomlError ? { line: err.line, column: err.column } : { line: 1 };
    return { cases: [], errors: [{ ...at, message: first }] };
  }
  const lineOf = lineIndex(text);
  const errors: CaseError[] = [];
  const error = (at: ReadonlyArray<PropertyKey>, message: string) => errors.push({ line: lineOf(at), message });
  const parsed = z.strictObject({ case: z.array(caseSchema(policy.allow.map((r) => r.name))).min(1) }).safeParse(doc);
  if (!parsed.success) {
    for (const i of parsed.error.issues) {
      if (i.code === 'unrecognized_keys') {
        for (const k of i.keys) {
          const guess = didYouMean(k, i.path.length === 0 ? ['case'] : CASE_KEYS);
          // A key, or an array of tables ([[cases]]: lineIndex knows its entries, not the key).
          const line = Math.max(lineOf([...i.path, k]), lineOf([...i.path, k, 0]));
          errors.push({ line, message: `${where(i.path)}: unknown key \`${k}'${guessed(guess)}` });
        }
      } else if (i.path.length === 1 && i.path[0] === 'case' && (i.code === 'too_small' || !valueAt(doc, i.path))) {
        error(i.path, 'no [[case]]: a cases file holds at least one');
      } else if (valueAt(doc, i.path) === undefined) {
        error(i.path, `${where(i.path)}: missing${i.path.at(-1) === 'expect' ? ' (expect = "allow" or "deny")' : ''}`);
      } else {
        error(i.path, `${where(i.path)}: ${i.message}`);
      }
    }
    return { cases: [], errors: errors.sort((a, b) => a.line - b.line) };
  }
  const cases = parsed.data.case.map((c, i): Case => ({
    index: i + 1, name: c.name ?? `case ${i + 1}`, line: lineOf(['case', i]), request: c.request.text,
    // The primary group: as given, else the account database's, else none (no account: a uid's number is
    // never taken for a gid, as the broker does not).
    caller: { uid: c.user.uid, gid: c.gid ?? c.user.gid ?? -1, groups: c.groups, user: c.user.user },
    nic: c.request.nic, devices: c.devices,
    expected: { decision: c.expect, rule: c.rule ?? null, code: c.code ?? null },
  }));
  return { cases, errors };
}


/**
 * One case, as the broker decides a create request: its caller screened as at accept (when `host` is given),
 * then createSpec, checkSpec, decide.
 */
export function runCase(policy: Policy, c: Case, host?: HostIds): CaseResult {
  // Where the deciding rule is written: its file (a fragment's own) and line.
  const at = (name: string | null) => {
    const r = [...policy.deny, ...policy.allow].find((x) => x.name === name);
    return { file: r?.file ?? null, line: r?.line ?? null };
  };
  let decided: CaseResult['decided'];
  try {
    const screened = host ? screenIds(c.caller, host.subuids, host.subgids) : null;
    if (screened?.refused) throw new TapbrokerError('TB_E_POLICY_DENIED', screened.refused.message);
    const caller = screened ? { ...c.caller, groups: screened.groups, claimed: screened.claimed } : c.caller;
    const spec: CreateSpec = createSpec(c.nic);
    // checkSpec wants the kernel's identity; of it, only the credentials count.
    const identity: Identity = { ...caller, pid: 0, pidfd: null, exe: null, parent: null };
    if (host) identity.subordinateGid = (gid) => host.subgids.of(gid)?.owner ?? null;
    checkSpec(spec, identity);
    // A port lock that cannot be had is an objection of its rule's, as by the broker and `can`.
    const d = decide(policy, caller, spec, (rule) => c.devices[rule] ?? 0);
    decided = d.allow
      ? {
          decision: 'allow', rule: d.rule.name, file: d.rule.file, line: d.rule.line, code: null,
          message: `rule \`${d.rule.name}' would grant it`, hint: null,
        }
      : { decision: 'deny', ...recorded(d), ...at(recorded(d).rule), code: d.code, hint: d.hint };
  } catch (err) {
    if (!(err instanceof TapbrokerError)) throw err;
    // A grammar error (refused before deciding, no rule) or a port that cannot be locked (its rule's).
    const rule = err.rule ?? null;
    decided = {
      decision: 'deny', rule, ...at(rule), code: err.code, message: err.message, hint: err.hint ?? null,
    };
  }
  const e = c.expected;
  const passed = decided.decision === e.decision && (e.rule === null || decided.rule === e.rule)
    && (e.code === null || decided.code === e.code);
  const expected = `${e.decision}${e.rule !== null ? ` by rule \`${e.rule}'` : ''}${e.code ? ` with ${e.code}` : ''}`;
  const { file, line } = decided;
  const where = line === null || file === null ? '' : ` (${ruleAt(policy.path, { file, line }, true)})`;
  const by = decided.rule !== null ? ` by rule \`${decided.rule}'${where}` : '';
  const got = decided.decision === 'allow'
    ? `allow${by}`
    : `deny${by || ' by no rule'} with ${decided.code}: ${decided.message}`;
  return {
    index: c.index, name: c.name, line: c.line, request: c.request, caller: c.caller, expected: e, decided, passed,
    failure: passed ? null : `expected ${expected}, got ${got}`,
  };
}

/**
 * Runs a cases file against a policy (a Policy, or its text: then an invalid one throws TB_E_POLICY_INVALID
 * as parsePolicy does). The pure core of test-policy: NSS lookups and `host`'s files aside, no broker, no kernel.
 */
export function runPolicyTests(policy: Policy | string, casesText: string, host?: HostIds): TestRun {
  const p = typeof policy === 'string' ? parsePolicy(policy) : policy;
  const { cases, errors } = parseCases(casesText, p);
  const results = cases.map((c) => runCase(p, c, host));
  const passed = results.filter((r) => r.passed).length;
  return { errors, results, passed, failed: results.length - passed };
}

/** The policy loader's errors (`FILE:LINE[:COLUMN]: message`, or `FILE: message`) as check-policy reads them. */
/** A policy's load errors, each at its own file (a fragment's, not the main file's) and line. */
function policyErrors(file: string, message: string): PolicyError[] {
  const paths = policyPaths(file);
  return message.split('\n').map((m) => {
    const { file: at, ...rest } = locate(m, paths);
    return { file: at ?? file, ...rest };
  });
}

type PolicyError = Omit<CaseError, 'line'> & { file?: string; line: number | null };

/** `FILE:LINE[:COLUMN]: error: MESSAGE`, as check-policy prints its findings (escaped: see shown). */
const located = (file: string, e: PolicyError) =>
  shown(`${e.file ?? file}:${e.line ?? '-'}${e.column ? `:${e.column}` : ''}: error: ${e.message}`);

/** The command: `args` after `test-policy`; returns the exit status. */
export function testPolicyTool(args: readonly string[], defaultPolicy: string): number {
  const out = (s: string) => process.stdout.write(`${s}\n`);
  const usage = (why: string) => {
    process.stderr.write(`tapbrokerd: ${why}\n${USAGE.split('\n')[0]}\nsee tapbrokerd test-policy --help\n`);
    return EX.USAGE;
  };
  if (args.includes('--help') || args.includes('-h')) {
    out(USAGE);
    return EX.OK;
  }
  let json = false;
  let fragments: string | null = null;
  const files: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--json') json = true;
    else if (a === '--fragments' || a.startsWith('--fragments=')) {
      fragments = a.includes('=') ? a.slice(a.indexOf('=') + 1) : args[++i] ?? null;
      if (fragments === null) return usage('--fragments needs a value');
    } else if (a.startsWith('-')) return usage(`unknown argument \`${a}'`);
    else files.push(a);
  }
  // One file is the cases (the policy is the broker's); two are the policy, then the cases.
  if (files.length < 1 || files.length > 2) return usage('test-policy needs a cases file, and may name a policy first');
  const [policyFile, casesFile] = files.length === 2 ? [files[0]!, files[1]!] : [defaultPolicy, files[0]!];
  if (fragments === '') return usage('--fragments needs a directory, not an empty string');
  if (fragments !== null) readFragmentsFrom(policyFile, fragments);

  let policy: Policy;
  try {
    policy = loadPolicy(policyFile);
  } catch (err) {
    const errors = policyErrors(policyFile, (err as Error).message);
    if (json) out(JSON.stringify({ policy: policyFile, ok: false, errors }, null, 2));
    else for (const e of errors) process.stderr.write(`${located(policyFile, e)}\n`);
    return EX.CONFIG;
  }
  // As for the other policy tools: as root, a file the broker would refuse is refused (see untrustedForTools).
  const untrusted = untrustedForTools(policyFile);
  if (untrusted?.refuse) {
    process.stderr.write(`${untrusted.message}\n`);
    return EX.CONFIG;
  }
  if (untrusted) process.stderr.write(`tapbrokerd: note: ${untrusted.message}\n`);
  const staged = stagedWithout(policyFile);
  if (staged) process.stderr.write(`tapbrokerd: warning: ${shown(staged)}\n`);
  let text: string;
  try {
    text = fs.readFileSync(casesFile, 'utf8');
  } catch (err) {
    process.stderr.write(`tapbrokerd: cannot read cases file \`${casesFile}': ${(err as Error).message}\n`);
    return EX.NOINPUT;
  }
  // The broker screens callers by this host's subordinate ids; so do the cases.
  const run = runPolicyTests(policy, text, hostIds());
  if (run.errors.length > 0) {
    if (json) out(JSON.stringify({ cases_file: casesFile, ok: false, errors: run.errors }, null, 2));
    else for (const e of run.errors) process.stderr.write(`${located(casesFile, e)}\n`);
    return EX.DATAERR;
  }
  const total = run.results.length;
  if (json) {
    out(JSON.stringify({
      policy: policyFile, sha256: policy.sha256, cases_file: casesFile, ok: run.failed === 0,
      cases: total, passed: run.passed, failed: run.failed, results: run.results,
    }, null, 2));
  } else {
    for (const r of run.results) if (!r.passed) out(shown(`${casesFile}:${r.line}: fail: ${r.name}: ${r.failure}`));
    out(`${total} case${total === 1 ? '' : 's'}, ${run.passed} passed, ${run.failed} failed`);
  }
  return run.failed === 0 ? EX.OK : EX_FAILED;
}
