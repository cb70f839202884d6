// Pointing at the policy's text: the line a [[table]] or key is written on, and the key a typo meant.
// Used for the load's error messages and by the policy tools.
import { createHash } from 'node:crypto';
import path from 'node:path';
import { parse as parseToml } from 'smol-toml';

/**
 * Where each table, array-table entry and key starts in a policy's text, found in one pass (a lookup per
 * rule then costs nothing: a policy of 16,000 rules loads in linear time). Paths as zod reports them:
 * ['rule', 3, 'bridges'], ['network', 'lan', 'vlan'], ['version']. Headers are read as TOML reads them (a quoted
 * `[["rule"]]` is a rule), and nothing inside a multi-line string is taken for one: an outside review made the
 * tools name another rule's line for a rule that grants everything.
 */
export function lineIndex(text: string): (where: ReadonlyArray<PropertyKey>) => number {
  const at = new Map<string, number>();
  const count = new Map<string, number>();
  /** The key of the table the lines are in now, or null before the first header. */
  let sectionKey: string | null = null;
  const put = (k: string, line: number) => {
    if (!at.has(k)) at.set(k, line);
  };
  let open: Multi = null;
  text.split('\n').forEach((raw, n) => {
    const inString = open !== null;
    open = multiAfter(raw, open);
    if (inString) return;
    const line = raw.trim();
    const header = line.startsWith('[') ? headerPath(line) : null;
    if (header?.array && header.path.length === 2) {
      // [[rule.macvtap]]: an entry of an array inside the latest entry of its parent array.
      const [outer, inner] = header.path as [string, string];
      const parent = pathKey([outer, String((count.get(short(outer)) ?? 1) - 1), inner]);
      const i = count.get(parent) ?? 0;
      count.set(parent, i + 1);
      sectionKey = joinKey(parent, String(i));
      put(parent, n + 1);
      put(sectionKey, n + 1);
    } else if (header?.array && header.path.length === 1) {
      const name = short(header.path[0]!);
      const i = count.get(name) ?? 0;
      count.set(name, i + 1);
      sectionKey = joinKey(name, String(i));
      put(sectionKey, n + 1);
    } else if (header && header.path.length >= 1) {
      sectionKey = pathKey(header.path);
      put(sectionKey, n + 1);
      put(short(header.path[0]!), n + 1);
    } else if (!header) {
      const key = /^("(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_-]+)\s*=/.exec(line);
      const name = key?.[1]!.startsWith('"') || key?.[1]!.startsWith("'") ? unquote(key[1]!) : key?.[1];
      if (name !== undefined) put(sectionKey === null ? short(name) : joinKey(sectionKey, name), n + 1);
    }
  });
  return (where) => {
    // Every prefix's key, built as the index built them: each step from the last, so a long path costs its length.
    const keys: string[] = [];
    for (const part of where.map(String)) keys.push(keys.length === 0 ? short(part) : joinKey(keys.at(-1)!, part));
    for (let k = keys.length - 1; k >= 0; k--) {
      const hit = at.get(keys[k]!);
      if (hit !== undefined) return hit;
    }
    return 1;
  };
}

/**
 * Keys of the index are bounded: a longer one stands for its digest. Found by an outside review: a draft's 20,000-
 * character header made every key line copy it whole, and V8 hashes strings past 16,383 characters by their length
 * alone, so all such keys collided; check-policy ran for minutes and gigabytes on a 51 KB draft.
 */
const MAX_KEY = 512;
const short = (k: string): string =>
  k.length <= MAX_KEY ? k : `\u0001${createHash('sha256').update(k).digest('base64')}`;
/** The key of a path one part longer than the path `parent` is the key of. */
const joinKey = (parent: string, part: string): string => short(`${parent}\0${part}`);
const pathKey = (parts: readonly string[]): string => parts.slice(1).reduce(joinKey, short(parts[0]!));

/**
 * A message as one line: a line break a key or value carried (TOML's "\\n") shown as U+2424. The load's messages are
 * joined with newlines and the tools split them back: an outside review forged a finding, with a file, line and text
 * of its choosing, from a draft's key.
 */
export function oneLine(message: string): string {
  return message.replace(/\r\n|\n|\r/g, '\u2424');
}

/** The multi-line string a line ends inside, if any. */
type Multi = '"""' | "'''" | null;

/** Inside which multi-line string `line` ends, starting inside `open` (strings, comments and escapes skipped). */
function multiAfter(line: string, open: Multi): Multi {
  let i = 0;
  while (i < line.length) {
    if (open !== null) {
      const close = open === '"""' ? basicEnd(line, i, '"""') : line.indexOf(open, i);
      if (close < 0) return open;
      // Up to two quotes may end the string's content right before its delimiter.
      i = close + 3;
      while (line[i] === open[0]) i++;
      open = null;
    } else if (line[i] === '#') {
      return null;
    } else if (line.startsWith('"""', i) || line.startsWith("'''", i)) {
      open = line.slice(i, i + 3) as Multi;
      i += 3;
    } else if (line[i] === '"') {
      const end = basicEnd(line, i + 1, '"');
      i = end < 0 ? line.length : end + 1;
    } else if (line[i] === "'") {
      const end = line.indexOf("'", i + 1);
      i = end < 0 ? line.length : end + 1;
    } else {
      i++;
    }
  }
  return open;
}

/** Where `quote` next ends a basic string in `line` from `from` (backslash escapes skipped), or -1. */
function basicEnd(line: string, from: number, quote: string): number {
  for (let i = from; i < line.length; i++) {
    if (line[i] === '\\') i++;
    else if (line.startsWith(quote, i)) return i;
  }
  return -1;
}

/** The path a table header names, as TOML reads it (quoted keys and escapes too), and whether it is an array's. */
function headerPath(line: string): { path: string[]; array: boolean } | null {
  // The common forms without a parse: 16,000 rules' headers cost nothing.
  const bare = /^(\[\[?)\s*([A-Za-z0-9_-]+)(?:\s*\.\s*([A-Za-z0-9_-]+))?\s*(\]\]?)\s*(?:#.*)?$/.exec(line);
  if (bare && bare[1]!.length === bare[4]!.length) {
    return { path: bare[3] === undefined ? [bare[2]!] : [bare[2]!, bare[3]], array: bare[1] === '[[' };
  }
  const m = /^\[\[?(?:[^\]"']|"(?:[^"\\]|\\.)*"|'[^']*')*\]\]?/.exec(line);
  if (!m) return null;
  let v: unknown;
  try {
    v = parseToml(`${m[0]}\n`);
  } catch {
    return null;
  }
  const path: string[] = [];
  for (;;) {
    if (Array.isArray(v)) return { path, array: true };
    const keys = Object.keys(v as object);
    if (keys.length !== 1) return { path, array: false };
    path.push(keys[0]!);
    v = (v as Record<string, unknown>)[keys[0]!];
  }
}

/**
 * A load's error or warning (`FILE:LINE[:COLUMN]: message`, `FILE: message`) taken apart: its file is the longest of
 * the policy's `files` it begins with, never read back out of the text (a fragment named `…T10:30:00.toml` was told
 * as file `…T10`, line 30, and one with a space in its name was not named at all).
 */
export function locate(text: string, files: readonly string[]): {
  file: string | null; line: number | null; column?: number; message: string;
} {
  const file = files.filter((f) => text.startsWith(`${f}:`)).sort((a, b) => b.length - a.length)[0] ?? null;
  const rest = file === null ? text : text.slice(file.length);
  const m = /^:(\d+)(?::(\d+))?: ?/.exec(rest);
  if (m) {
    return { file, line: Number(m[1]), ...(m[2] ? { column: Number(m[2]) } : {}), message: rest.slice(m[0].length) };
  }
  return { file, line: null, message: file === null ? text : rest.replace(/^: ?/, '') };
}

/** A TOML basic string as JSON reads it; TOML escapes JSON has not (\\U, literal tabs) keep the raw text. */
function unquote(s: string): string {
  try {
    return JSON.parse(s) as string;
  } catch {
    return s.slice(1, -1);
  }
}

/** The known key closest to `key` (a typo's likely intent), or null when none is close. */
export function didYouMean(key: string, known: readonly string[]): string | null {
  let best: string | null = null;
  let bestD = Math.max(2, Math.floor(key.length / 3)) + 1;
  for (const k of known) {
    const d = editDistance(key.toLowerCase(), k.toLowerCase());
    if (d < bestD) [best, bestD] = [k, d];
  }
  return best;
}

function editDistance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++) {
      cur[j] = Math.min(prev[j]! + 1, cur[j - 1]! + 1, prev[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    prev = cur;
  }
  return prev[b.length]!;
}

/**
 * Where a rule is written, as the policy tools show it: its line in the main file, or FRAGMENT:LINE for one of
 * policy.d (relative to the main file's directory). `words`: `line N` for the main file's.
 */
export function ruleAt(mainFile: string, rule: { file: string; line: number }, words = false): string {
  if (rule.file === mainFile) return words ? `line ${rule.line}` : String(rule.line);
  return `${path.relative(path.dirname(mainFile), rule.file)}:${rule.line}`;
}
