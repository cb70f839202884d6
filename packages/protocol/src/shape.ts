// Messages and records checked without zod. The shapes are generated from the zod schemas (reply-shape.ts,
// request-shape.ts, the broker's state-shape.ts; a unit test fails when they drift apart), so the schemas
// stay the one source of truth; neither the client nor the broker loads zod to check what it reads.

export type Shape =
  | { t: 'object'; fields: Record<string, Shape>; optional: string[]; defaults: Record<string, unknown> }
  | { t: 'union'; key: string; options: Record<string, Shape> }
  | { t: 'anyOf'; options: Shape[] }
  | { t: 'literal'; values: ReadonlyArray<string | number | boolean | null> }
  | { t: 'enum'; values: readonly string[] }
  | { t: 'boolean' }
  | { t: 'array'; of: Shape; min: number; max: number }
  | { t: 'string'; max: number }
  | { t: 'number'; int: boolean; min: number; max: number }
  | { t: 'nullable'; of: Shape };

/** The value as the schema would give it (defaults filled in), or the first thing wrong with it. */
export function checkShape(
  shape: Shape, v: unknown, path = '',
): { ok: true; value: unknown } | { ok: false; issue: string } {
  const bad = (what: string) => ({ ok: false as const, issue: `${path ? `${path}: ` : ''}${what}` });
  const at = (k: string | number) => (path ? `${path}.${k}` : String(k));
  switch (shape.t) {
    case 'nullable':
      return v === null ? { ok: true, value: null } : checkShape(shape.of, v, path);
    case 'boolean':
      return typeof v === 'boolean' ? { ok: true, value: v } : bad(`expected boolean, received ${kind(v)}`);
    case 'string':
      if (typeof v !== 'string') return bad(`expected string, received ${kind(v)}`);
      // In code points, as zod counts (a surrogate pair is one).
      return (v.length <= shape.max || [...v].length <= shape.max) ? { ok: true, value: v }
        : bad(`string longer than ${shape.max}`);
    case 'number':
      if (typeof v !== 'number' || Number.isNaN(v)) return bad(`expected number, received ${kind(v)}`);
      if (shape.int && !Number.isSafeInteger(v)) return bad('expected an integer');
      return v >= shape.min && v <= shape.max ? { ok: true, value: v } : bad(`number out of range`);
    case 'literal':
      return shape.values.includes(v as never) ? { ok: true, value: v } : bad(`expected ${shape.values.join(' or ')}`);
    case 'enum':
      return typeof v === 'string' && shape.values.includes(v) ? { ok: true, value: v }
        : bad(`expected one of ${shape.values.join(', ')}`);
    case 'array': {
      if (!Array.isArray(v)) return bad(`expected array, received ${kind(v)}`);
      if (v.length < shape.min || v.length > shape.max) return bad(`array of ${v.length} items`);
      const out: unknown[] = [];
      for (const [i, x] of v.entries()) {
        const r = checkShape(shape.of, x, at(i));
        if (!r.ok) return r;
        out.push(r.value);
      }
      return { ok: true, value: out };
    }
    case 'union': {
      if (!isObject(v)) return bad(`expected object, received ${kind(v)}`);
      const tag = String(v[shape.key]);
      const option = Object.hasOwn(shape.options, tag) ? shape.options[tag] : undefined;
      return option ? checkShape(option, v, path) : bad(`unknown ${shape.key} ${JSON.stringify(v[shape.key])}`);
    }
    case 'anyOf': {
      for (const option of shape.options) {
        const r = checkShape(option, v, path);
        if (r.ok) return r;
      }
      return bad('matches none of its forms');
    }
    case 'object': {
      if (!isObject(v)) return bad(`expected object, received ${kind(v)}`);
      const extra = Object.keys(v).find((k) => !Object.hasOwn(shape.fields, k));
      if (extra !== undefined) return bad(`unknown field \`${extra}'`);
      const out: Record<string, unknown> = {};
      for (const [k, s] of Object.entries(shape.fields)) {
        if (v[k] === undefined) {
          if (Object.hasOwn(shape.defaults, k)) out[k] = shape.defaults[k];
          else if (!shape.optional.includes(k)) return bad(`missing field \`${k}'`);
          continue;
        }
        const r = checkShape(s, v[k], at(k));
        if (!r.ok) return r;
        out[k] = r.value;
      }
      return { ok: true, value: out };
    }
  }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function kind(v: unknown): string {
  return v === null ? 'null' : Array.isArray(v) ? 'array' : typeof v;
}
