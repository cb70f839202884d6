// A zod schema as a Shape (packages/protocol/src/shape.ts): how reply-shape.ts is generated, and how
// the unit test proves it still matches the schemas.
import type { Shape } from '@tapbroker/protocol/lite';

import { z } from 'zod';

interface ZodLike { _zod: { def: Record<string, any> } }
/** The name a refinement in code was given with `.meta({ check })` (policy-schema.ts), if any. */
const named = (s: ZodLike) => (z.globalRegistry.get(s as never) as { check?: string } | undefined)?.check;
const checks = (s: ZodLike) => ((s._zod.def['checks'] ?? []) as ZodLike[]).map((c) => c._zod.def);

export function shapeOf(schema: ZodLike): Shape {
  const def = schema._zod.def;
  switch (def['type']) {
    case 'object': {
      if (def['catchall']?._zod.def.type !== 'never') throw new Error('only strict objects are in the protocol');
      const fields: Record<string, Shape> = {};
      const optional: string[] = [];
      const defaults: Record<string, unknown> = {};
      for (const [k, v] of Object.entries(def['shape'] as Record<string, ZodLike>)) {
        const t = v._zod.def['type'];
        if (t === 'optional') optional.push(k);
        if (t === 'default') defaults[k] = v._zod.def['defaultValue'];
        fields[k] = shapeOf(t === 'optional' || t === 'default' ? v._zod.def['innerType'] : v);
      }
      const check = named(schema);
      if (!check && checks(schema).length > 0) throw new Error('a refinement of an object needs .meta({ check })');
      return check ? { t: 'object', fields, optional, defaults, check } : { t: 'object', fields, optional, defaults };
    }
    case 'record': return { t: 'record', key: shapeOf(def['keyType']), value: shapeOf(def['valueType']) };
    case 'union': {
      const key = def['discriminator'] as string | undefined;
      if (!key) return { t: 'anyOf', options: (def['options'] as ZodLike[]).map(shapeOf) };
      const options: Record<string, Shape> = {};
      for (const o of def['options'] as ZodLike[]) {
        const lit = (o._zod.def['shape'] as Record<string, ZodLike>)[key]!._zod.def['values'] as unknown[];
        for (const v of lit) options[String(v)] = shapeOf(o);
      }
      return { t: 'union', key, options };
    }
    case 'nullable': return { t: 'nullable', of: shapeOf(def['innerType']) };
    case 'literal': return { t: 'literal', values: def['values'] };
    case 'enum': return { t: 'enum', values: Object.values(def['entries'] as Record<string, string>) };
    case 'boolean': return { t: 'boolean' };
    case 'array': {
      const cs = checks(schema);
      return {
        t: 'array', of: shapeOf(def['element']),
        min: cs.find((c) => c['check'] === 'min_length')?.['minimum'] ?? 0,
        max: cs.find((c) => c['check'] === 'max_length')?.['maximum'] ?? Number.MAX_SAFE_INTEGER,
      };
    }
    case 'string': {
      const cs = checks(schema);
      const check = named(schema);
      const inCode = (c: Record<string, any>) => c['check'] === 'custom' || c['check'] === 'string_format';
      if (cs.some((c) => !['max_length', 'min_length'].includes(c['check']) && !(check && inCode(c)))) {
        throw new Error('a string refinement in code needs .meta({ check })');
      }
      const min = cs.find((c) => c['check'] === 'min_length')?.['minimum'];
      return {
        t: 'string', max: cs.find((c) => c['check'] === 'max_length')?.['maximum'] ?? Number.MAX_SAFE_INTEGER,
        ...(min !== undefined ? { min } : {}), ...(check ? { check } : {}),
      };
    }
    case 'number': {
      const cs = checks(schema);
      const bound = (check: string) => cs.find((c) => c['check'] === check);
      const lo = bound('greater_than');
      const hi = bound('less_than');
      const int = cs.some((c) => c['check'] === 'number_format' && /int/.test(c['format']));
      // An exclusive bound on an integer (`positive()`) is the inclusive one next to it.
      if (!int && ((lo && !lo['inclusive']) || (hi && !hi['inclusive']))) throw new Error('exclusive float bound');
      return {
        t: 'number', int,
        min: lo ? lo['value'] + (lo['inclusive'] ? 0 : 1) : -Number.MAX_SAFE_INTEGER,
        max: hi ? hi['value'] - (hi['inclusive'] ? 0 : 1) : Number.MAX_SAFE_INTEGER,
      };
    }
    default: throw new Error(`no shape for zod type ${String(def['type'])}`);
  }
}

/** A generated shape module (reply-shape.ts, request-shape.ts) as it must read. */
export function shapeModule(schema: 'Reply' | 'Request' | 'StateFile' | 'PolicySchema', shape: Shape): string {
  const file = { Reply: 'REPLY_SHAPE', Request: 'REQUEST_SHAPE', StateFile: 'STATE_SHAPE', PolicySchema: 'POLICY_SHAPE' }[schema];
  const source = { Reply: 'messages.ts', Request: 'messages.ts', StateFile: 'lease-schema.ts', PolicySchema: 'policy-schema.ts' }[schema];
  const from = schema === 'Reply' || schema === 'Request' ? './shape.js' : '@tapbroker/protocol/core';
  return `// Generated from the zod schema \`${schema}\` in ${source} by \`npm run gen:shapes\`: do not edit.\n`
    + '// test/unit/shape.test.ts fails when this and the schema disagree.\n'
    + `import type { Shape } from '${from}';\n\n`
    + `export const ${file}: Shape = ${pretty(shape, 0)};\n`;
}

/** reply-shape.ts as it must read. */
export function replyShapeModule(shape: Shape): string {
  return shapeModule('Reply', shape);
}

/** JSON on one line where it fits in 110 columns (with `lead` characters before it), else one member per line. */
function pretty(v: unknown, indent: number, lead = 0): string {
  const flat = JSON.stringify(v);
  if (indent + lead + flat.length <= 110 || v === null || typeof v !== 'object') return flat;
  const pad = ' '.repeat(indent + 2);
  const items = Array.isArray(v)
    ? v.map((x) => `${pad}${pretty(x, indent + 2)}`)
    : Object.entries(v as Record<string, unknown>)
      .map(([k, x]) => `${pad}${JSON.stringify(k)}: ${pretty(x, indent + 2, JSON.stringify(k).length + 2)}`);
  const [open, close] = Array.isArray(v) ? ['[', ']'] : ['{', '}'];
  return `${open}\n${items.join(',\n')},\n${' '.repeat(indent)}${close}`;
}
