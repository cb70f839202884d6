// Run by unit/stderr.test.ts in a private mount namespace: the daemon's stderr (a file on a 64 KiB tmpfs, DIR)
// filled up, then given room again. argv: the dist stderr.js to load, DIR.
import fs from 'node:fs';
const { toStderr, flushStderr } = await import(process.argv[2]);
const dir = process.argv[3];
const line = (i) => `{"audit":{"n":${i},"pad":"${'x'.repeat(300)}"}}\n`;
toStderr(line(0));
try { fs.writeFileSync(`${dir}/filler`, Buffer.alloc(1 << 20)); } catch {}
for (let i = 1; i < 20; i++) toStderr(line(i));
await new Promise((r) => setTimeout(r, 100));
fs.rmSync(`${dir}/filler`);
for (let i = 20; i < 25; i++) toStderr(line(i));
flushStderr(1000);
