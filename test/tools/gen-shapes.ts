// npm run gen:shapes: writes the shapes that the client and the broker check what they read with, from the
// zod schemas `Reply` and `Request` (messages.ts), and the broker's `StateFile` (lease-schema.ts) and
// `PolicySchema` (policy-schema.ts).
import fs from 'node:fs';
import path from 'node:path';
import { Reply, Request } from '@tapbroker/protocol';
import { PolicySchema, StateFile } from '@tapbroker/broker/internal';
import { ROOT } from '../helpers/broker.js';
import { shapeModule, shapeOf } from '../helpers/zod-shape.js';

const targets = [
  ['Reply', Reply, 'packages/protocol/src/reply-shape.ts'],
  ['Request', Request, 'packages/protocol/src/request-shape.ts'],
  ['StateFile', StateFile, 'packages/broker/src/state-shape.ts'],
  ['PolicySchema', PolicySchema, 'packages/broker/src/policy-shape.ts'],
] as const;
for (const [name, schema, file] of targets) {
  const out = path.join(ROOT, file);
  fs.writeFileSync(out, shapeModule(name, shapeOf(schema as never)));
  process.stdout.write(`wrote ${out}\n`);
}
