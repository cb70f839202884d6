// Every error code is documented in docs/PROTOCOL.md with its meaning, and the doc names no other.
import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ERROR_CODES } from '@tapbroker/protocol';

const doc = fs.readFileSync(path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../docs/PROTOCOL.md'), 'utf8');
const documented = new Map([...doc.matchAll(/^\| `(TB_E_[A-Z_]+)` \| (.+?) \|/gm)].map((m) => [m[1]!, m[2]!]));

test('every code in the code is documented', (t) => {
  const missing = Object.keys(ERROR_CODES).filter((c) => !documented.has(c));
  t.deepEqual(missing, []);
});

test('the doc documents no code the code lacks', (t) => {
  const extra = [...documented.keys()].filter((c) => !Object.hasOwn(ERROR_CODES, c));
  t.deepEqual(extra, []);
});

test('each documented meaning is the one the code carries', (t) => {
  for (const [code, meaning] of Object.entries(ERROR_CODES)) t.is(documented.get(code), meaning, code);
});
