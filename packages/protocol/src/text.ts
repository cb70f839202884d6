// Text that came from a caller or a file, made fit to show: in a reply, a log line, an audit record, a terminal.

/**
 * What renders as nothing or acts on a terminal, by Unicode property rather than a list (an outside re-test got a
 * zero-width space past a list: a deny of `nobody<U+200B>' read as a deny of nobody): controls, format characters
 * (bidirectional marks, zero-width spaces, tags), line and paragraph separators, private-use, unassigned and
 * default-ignorable code points (variation selectors, fillers), and lone surrogates.
 */
export const HIDDEN = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}\p{Co}\p{Cn}\p{Cs}\p{DI}]/gu;
export const PLAIN = /^[\x20-\x7e]*$/;

/**
 * JSON as the audit trail writes it: JSON.stringify's, with what JSON leaves raw but hides or acts on a terminal (C1
 * controls, line separators, bidirectional overrides, zero-width characters: see HIDDEN) as \uNNNN.
 */
export function jsonShown(v: unknown): string {
  const json = JSON.stringify(v);
  if (PLAIN.test(json)) return json;
  return json.replace(HIDDEN, (c) => [...Array(c.length).keys()]
    .map((i) => `\\u${c.charCodeAt(i).toString(16).padStart(4, '0')}`).join(''));
}

/** Caller-supplied text as it may appear in a message: control characters escaped, length bounded. */
export function printable(s: string): string {
  return jsonShown(s.slice(0, 64)).slice(1, -1);
}

/** Reply text within the protocol's limits (1,024 characters for a message or a hint), cut with an ellipsis. */
export function bounded(s: string, max = 1024): string {
  return s.length <= max ? s : `${s.slice(0, max - 1)}…`;
}
