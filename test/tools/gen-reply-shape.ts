// npm run gen:shapes: writes packages/protocol/src/reply-shape.ts from the zod schema `Reply`.
import fs from 'node:fs';
import path from 'node:path';
import { Reply } from '@tapbroker/protocol';
import { ROOT } from '../helpers/broker.js';
import { replyShapeModule, shapeOf } from '../helpers/zod-shape.js';

const file = path.join(ROOT, 'packages/protocol/src/reply-shape.ts');
fs.writeFileSync(file, replyShapeModule(shapeOf(Reply as never)));
process.stdout.write(`wrote ${file}\n`);
