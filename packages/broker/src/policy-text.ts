// Pointing at the policy's text: the line a [[table]] or key is written on, and the key a typo meant.
// Used for the load's error messages and by the policy tools.
import path from 'node:path';

/**
 * Where each table, array-table entry and key starts in a policy's text, found in one pass (a lookup per
 * rule then costs nothing: a policy of 16,000 rules loads in linear time). Paths as zod reports them:
 * ['rule', 3, 'bridges'], ['network', 'lan', 'vlan'], ['version'].
 */
export function lineIndex(text: string): (where: ReadonlyArray<PropertyKey>) => number {
  const at = new Map<string, number>();
  const count = new Map<string, number>();
  let section: string[] = [];
  const put = (k: string, line: number) => {
    if (!at.has(k)) at.set(k, line);
  };
  text.split('\n').forEach((raw, n) => {
    const line = raw.trim();
    const array = /^\[\[\s*([A-Za-z0-9_-]+)\s*\]\]/.exec(line);
    // [[rule.macvtap]]: an entry of an array inside the latest entry of its parent array.
    const nested = array ? null : /^\[\[\s*([A-Za-z0-9_-]+)\s*\.\s*([A-Za-z0-9_-]+)\s*\]\]/.exec(line);
    const table = array || nested ? null
      : /^\[\s*([A-Za-z0-9_-]+)\s*\.\s*("(?:[^"\\]|\\.)*"|[A-Za-z0-9_-]+)\s*\]/.exec(line);
    if (nested) {
      const parent = [nested[1]!, String((count.get(nested[1]!) ?? 1) - 1), nested[2]!];
      const i = count.get(parent.join('\0')) ?? 0;
      count.set(parent.join('\0'), i + 1);
      section = [...parent, String(i)];
      put(parent.join('\0'), n + 1);
      put(section.join('\0'), n + 1);
    } else if (array) {
      const i = count.get(array[1]!) ?? 0;
      count.set(array[1]!, i + 1);
      section = [array[1]!, String(i)];
      put(section.join('\0'), n + 1);
    } else if (table) {
      const name = table[2]!.startsWith('"') ? unquote(table[2]!) : table[2]!;
      section = [table[1]!, name];
      put(section.join('\0'), n + 1);
      put(table[1]!, n + 1);
    } else {
      const key = /^("(?:[^"\\]|\\.)*"|[A-Za-z0-9_-]+)\s*=/.exec(line);
      if (key) put([...section, key[1]!.startsWith('"') ? unquote(key[1]!) : key[1]!].join('\0'), n + 1);
    }
  });
  return (where) => {
    for (let k = where.length; k > 0; k--) {
      const hit = at.get(where.slice(0, k).map(String).join('\0'));
      if (hit !== undefined) return hit;
    }
    return 1;
  };
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
