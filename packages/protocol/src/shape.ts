// Messages and records checked without zod. The shapes are generated from the zod schemas (reply-shape.ts,
// request-shape.ts, the broker's state-shape.ts and policy-shape.ts; a unit test fails when they drift apart),
// so the schemas stay the one source of truth; neither the client nor the broker loads zod to check what it
// reads. A refinement a schema makes with code (a grammar, a rule across fields) is named in the shape and
// run from the table of checks the caller passes.

export type Shape =
  | {
    t: 'object'; fields: Record<string, Shape>; optional: string[]; defaults: Record<string, unknown>; check?: string;
  }
  | { t: 'union'; key: string; options: Record<string, Shape> }
  | { t: 'anyOf'; options: Shape[] }
  | { t: 'record'; key: Shape; value: Shape }
  | { t: 'literal'; values: ReadonlyArray<string | number | boolean | null> }
  | { t: 'enum'; values: readonly string[] }
  | { t: 'boolean' }
  | { t: 'array'; of: Shape; min: number; max: number }
  | { t: 'string'; max: number; min?: number; check?: string }
  | { t: 'number'; int: boolean; min: number; max: number }
  | { t: 'nullable'; of: Shape };

/** Named refinements: the reason a value is refused, or null. */
export type Checks = Readonly<Record<string, (value: never) => string | null>>;

export interface Issue {
  /** Where, as keys and indexes from the top. */
  path: Array<string | number>;
  message: string;
  /** Set when the issue is a key the shape does not know: the key. */
  unknown?: string;
}

/** The value as the schema would give it (defaults filled in), or the first thing wrong with it. */
export function checkShape(shape: Shape, v: unknown): { ok: true; value: unknown } | { ok: false; issue: string } {
  const issues: Issue[] = [];
  const value = walk(shape, v, [], issues, {}, true);
  const [first] = issues;
  if (!first) return { ok: true, value };
  return { ok: false, issue: `${first.path.length ? `${first.path.join('.')}: ` : ''}${first.message}` };
}

/** Every issue of `v` against `shape` (named refinements from `checks`), and the value with defaults. */
export function validate(shape: Shape, v: unknown, checks: Checks): { value: unknown; issues: Issue[] } {
  const issues: Issue[] = [];
  const value = walk(shape, v, [], issues, checks, false);
  return { value, issues };
}

/** Checks `v`; issues go to `out` (only the first when `first`); returns the value with defaults. */
function walk(shape: Shape, v: unknown, path: Issue['path'], out: Issue[], checks: Checks, first: boolean): unknown {
  const bad = (message: string, unknown?: string) => {
    out.push(unknown === undefined ? { path, message } : { path, message, unknown });
    return undefined;
  };
  const named = (name: string | undefined, value: unknown): void => {
    if (name === undefined) return;
    const check = checks[name];
    const why = check ? check(value as never) : `no check \`${name}'`;
    if (why) bad(why);
  };
  const done = () => first && out.length > 0;
  switch (shape.t) {
    case 'nullable':
      return v === null ? null : walk(shape.of, v, path, out, checks, first);
    case 'boolean':
      return typeof v === 'boolean' ? v : bad(`expected boolean, received ${kind(v)}`);
    case 'string':
      if (typeof v !== 'string') return bad(`expected string, received ${kind(v)}`);
      // In code points, as zod counts (a surrogate pair is one).
      if (v.length > shape.max && [...v].length > shape.max) return bad(`string longer than ${shape.max}`);
      if (shape.min !== undefined && [...v].length < shape.min) return bad(`string shorter than ${shape.min}`);
      named(shape.check, v);
      return v;
    case 'number':
      if (typeof v !== 'number' || Number.isNaN(v)) return bad(`expected number, received ${kind(v)}`);
      if (shape.int && !Number.isSafeInteger(v)) return bad('expected an integer');
      return v >= shape.min && v <= shape.max ? v : bad(`number out of range (${shape.min} to ${shape.max})`);
    case 'literal':
      return shape.values.includes(v as never) ? v : bad(`expected ${shape.values.join(' or ')}`);
    case 'enum':
      return typeof v === 'string' && shape.values.includes(v) ? v : bad(`expected one of ${shape.values.join(', ')}`);
    case 'array': {
      if (!Array.isArray(v)) return bad(`expected array, received ${kind(v)}`);
      if (v.length < shape.min || v.length > shape.max) return bad(`array of ${v.length} items`);
      const items: unknown[] = [];
      for (const [i, x] of v.entries()) {
        items.push(walk(shape.of, x, [...path, i], out, checks, first));
        if (done()) return undefined;
      }
      return items;
    }
    case 'anyOf': {
      for (const option of shape.options) {
        const mine: Issue[] = [];
        const value = walk(option, v, path, mine, checks, first);
        if (mine.length === 0) return value;
      }
      return bad('matches none of its forms');
    }
    case 'union': {
      if (!isObject(v)) return bad(`expected object, received ${kind(v)}`);
      // The tag is looked up only as a string: any other value (an object whose toString throws) is refused.
      const tag = v[shape.key];
      const option = typeof tag === 'string' && Object.hasOwn(shape.options, tag) ? shape.options[tag] : undefined;
      if (!option) return bad(`unknown ${shape.key} ${typeof tag === 'string' ? JSON.stringify(tag) : kind(tag)}`);
      return walk(option, v, path, out, checks, first);
    }
    case 'record': {
      if (!isObject(v)) return bad(`expected table, received ${kind(v)}`);
      const entries: Record<string, unknown> = {};
      for (const [k, x] of Object.entries(v)) {
        // As a key of the result it would set its prototype, not add an entry (zod drops it without a word).
        if (k === '__proto__') bad('`__proto__\' is reserved');
        else {
          walk(shape.key, k, [...path, k], out, checks, first);
          entries[k] = walk(shape.value, x, [...path, k], out, checks, first);
        }
        if (done()) return undefined;
      }
      return entries;
    }
    case 'object': {
      if (!isObject(v)) return bad(`expected object, received ${kind(v)}`);
      const before = out.length;
      for (const k of Object.keys(v)) {
        if (!Object.hasOwn(shape.fields, k)) bad(`unknown field \`${k}'`, k);
        if (done()) return undefined;
      }
      const fields: Record<string, unknown> = {};
      for (const [k, s] of Object.entries(shape.fields)) {
        if (v[k] === undefined) {
          const d = shape.defaults[k];
          // A default that is an array or a table is each value's own copy.
          if (Object.hasOwn(shape.defaults, k)) fields[k] = typeof d === 'object' ? structuredClone(d) : d;
          else if (!shape.optional.includes(k)) bad(`missing field \`${k}'`);
        } else {
          fields[k] = walk(s, v[k], [...path, k], out, checks, first);
        }
        if (done()) return undefined;
      }
      // A rule across fields is judged only on fields that are each right.
      if (out.length === before) named(shape.check, fields);
      return fields;
    }
  }
}

/** A plain table (a decoded map, parsed JSON or TOML), not an array, a Date or any other kind of object. */
function isObject(v: unknown): v is Record<string, unknown> {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return false;
  const proto = Object.getPrototypeOf(v) as unknown;
  return proto === Object.prototype || proto === null;
}

function kind(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'array';
  return typeof v === 'object' && !isObject(v) ? (v.constructor?.name ?? 'object') : typeof v;
}
