// Messages and records checked without zod. The shapes are generated from the zod schemas (reply-shape.ts,
// request-shape.ts, the broker's state-shape.ts and policy-shape.ts; a unit test fails when they drift apart),
// so the schemas stay the one source of truth; neither the client nor the broker loads zod to check what it
// reads. A refinement a schema makes with code (a grammar, a rule across fields) is named in the shape and
// run from the table of checks the caller passes.

import { jsonShown, printable } from './text.js';

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
export function checkShape(
  shape: Shape, v: unknown,
): { ok: true; value: unknown } | { ok: false; issue: string; path: Issue['path'] } {
  const w = new Walk({}, true);
  const value = w.walk(shape, v, null);
  const [first] = w.out;
  if (!first) return { ok: true, value };
  const issue = `${first.path.length ? `${first.path.join('.')}: ` : ''}${first.message}`;
  return { ok: false, issue, path: first.path };
}

/** Every issue of `v` against `shape` (named refinements from `checks`), and the value with defaults. */
export function validate(shape: Shape, v: unknown, checks: Checks): { value: unknown; issues: Issue[] } {
  const w = new Walk(checks, false);
  const value = w.walk(shape, v, null);
  return { value, issues: w.out };
}

/**
 * Where a value is, as a chain to the top: built into a path only for an issue. (Replies are checked in
 * clients that live milliseconds, before any code is compiled: a path array per value cost more than
 * the rest of the walk.)
 */
interface At {
  up: At | null;
  key: string | number;
}

function pathOf(at: At | null): Issue['path'] {
  const path: Issue['path'] = [];
  for (let a = at; a; a = a.up) path.unshift(a.key);
  return path;
}

/** Field names of an object shape, listed once per shape. */
const fieldNames = new WeakMap<object, string[]>();

/** One check of a value: issues go to `out` (only the first when `first`). */
class Walk {
  readonly out: Issue[] = [];
  constructor(private readonly checks: Checks, private readonly first: boolean) {}

  private bad(at: At | null, message: string, unknown?: string): undefined {
    const path = pathOf(at);
    this.out.push(unknown === undefined ? { path, message } : { path, message, unknown });
    return undefined;
  }

  private named(at: At | null, name: string | undefined, value: unknown): void {
    if (name === undefined) return;
    const check = this.checks[name];
    const why = check ? check(value as never) : `no check \`${name}'`;
    if (why) this.bad(at, why);
  }

  private done(): boolean {
    return this.first && this.out.length > 0;
  }

  /** Checks `v`; returns the value with defaults. */
  walk(shape: Shape, v: unknown, at: At | null): unknown {
    switch (shape.t) {
      case 'nullable':
        return v === null ? null : this.walk(shape.of, v, at);
      case 'boolean':
        return typeof v === 'boolean' ? v : this.bad(at, `expected boolean, received ${kind(v)}`);
      case 'string':
        if (typeof v !== 'string') return this.bad(at, `expected string, received ${kind(v)}`);
        // In code points, as zod counts (a surrogate pair is one).
        if (v.length > shape.max && [...v].length > shape.max) {
          return this.bad(at, `string longer than ${shape.max}`);
        }
        if (shape.min !== undefined && [...v].length < shape.min) {
          return this.bad(at, `string shorter than ${shape.min}`);
        }
        this.named(at, shape.check, v);
        return v;
      case 'number':
        if (typeof v !== 'number' || Number.isNaN(v)) return this.bad(at, `expected number, received ${kind(v)}`);
        if (shape.int && !Number.isSafeInteger(v)) return this.bad(at, 'expected an integer');
        if (v >= shape.min && v <= shape.max) return v;
        return this.bad(at, `number out of range (${shape.min} to ${shape.max})`);
      case 'literal':
        return shape.values.includes(v as never) ? v : this.bad(at, `expected ${shape.values.join(' or ')}`);
      case 'enum':
        return typeof v === 'string' && shape.values.includes(v)
          ? v
          : this.bad(at, `expected one of ${shape.values.join(', ')}`);
      case 'array': {
        if (!Array.isArray(v)) return this.bad(at, `expected array, received ${kind(v)}`);
        if (v.length < shape.min || v.length > shape.max) return this.bad(at, `array of ${v.length} items`);
        const items: unknown[] = [];
        for (let i = 0; i < v.length; i++) {
          items.push(this.walk(shape.of, v[i], { up: at, key: i }));
          if (this.done()) return undefined;
        }
        return items;
      }
      case 'anyOf': {
        for (const option of shape.options) {
          const mine = new Walk(this.checks, this.first);
          const value = mine.walk(option, v, at);
          if (mine.out.length === 0) return value;
        }
        return this.bad(at, 'matches none of its forms');
      }
      case 'union': {
        if (!isObject(v)) return this.bad(at, `expected object, received ${kind(v)}`);
        // The tag is looked up only as a string: any other value (an object whose toString throws) is refused.
        const tag = v[shape.key];
        const option = typeof tag === 'string' && Object.hasOwn(shape.options, tag) ? shape.options[tag] : undefined;
        if (!option) {
          const named = typeof tag === 'string' ? jsonShown(tag.slice(0, 64)) : kind(tag);
          return this.bad(at, `unknown ${shape.key} ${named}`);
        }
        return this.walk(option, v, at);
      }
      case 'record': {
        if (!isObject(v)) return this.bad(at, `expected table, received ${kind(v)}`);
        const entries: Record<string, unknown> = {};
        for (const [k, x] of Object.entries(v)) {
          // As a key of the result it would set its prototype, not add an entry (zod drops it without a word).
          if (k === '__proto__') this.bad(at, '`__proto__\' is reserved');
          else {
            const here = { up: at, key: k };
            this.walk(shape.key, k, here);
            entries[k] = this.walk(shape.value, x, here);
          }
          if (this.done()) return undefined;
        }
        return entries;
      }
      case 'object': {
        if (!isObject(v)) return this.bad(at, `expected object, received ${kind(v)}`);
        const before = this.out.length;
        for (const k in v) {
          if (!Object.hasOwn(v, k)) continue;
          if (!Object.hasOwn(shape.fields, k)) this.bad(at, `unknown field \`${printable(k)}'`, k);
          if (this.done()) return undefined;
        }
        let names = fieldNames.get(shape);
        if (!names) fieldNames.set(shape, (names = Object.keys(shape.fields)));
        const fields: Record<string, unknown> = {};
        for (const k of names) {
          if (v[k] === undefined) {
            const d = shape.defaults[k];
            // A default that is an array or a table is each value's own copy.
            if (Object.hasOwn(shape.defaults, k)) fields[k] = typeof d === 'object' ? structuredClone(d) : d;
            else if (!shape.optional.includes(k)) this.bad(at, `missing field \`${k}'`);
          } else {
            fields[k] = this.walk(shape.fields[k]!, v[k], { up: at, key: k });
          }
          if (this.done()) return undefined;
        }
        // A rule across fields is judged only on fields that are each right.
        if (this.out.length === before) this.named(at, shape.check, fields);
        return fields;
      }
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
  if (typeof v === 'number' && Number.isNaN(v)) return 'NaN';
  return typeof v === 'object' && !isObject(v) ? (v.constructor?.name ?? 'object') : typeof v;
}
