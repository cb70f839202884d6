// Msgpack written out in hex, as the specification spells each type, for frames no encoder would make.

/** Bytes from hex; spaces are ignored. */
export const h = (...parts: string[]) => Buffer.from(parts.join('').replace(/\s+/g, ''), 'hex');

/** A fixstr, in hex. */
export const s = (text: string) => {
  const b = Buffer.from(text, 'utf8');
  return (0xa0 | b.length).toString(16) + b.toString('hex');
};

/** A string's UTF-8 bytes alone (no header), in hex: the body of a str8, str16 or str32. */
export const utf8 = (text: string) => Buffer.from(text, 'utf8').toString('hex');
