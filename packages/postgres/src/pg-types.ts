import type { CustomTypesConfig } from 'pg';

// OIDs of the types the store reads back (pg_type).
const BOOL = 16;
const BYTEA = 17;
const JSON_OID = 114;
const JSONB = 3802;

/**
 * The parsers of the store's own statements, whatever the pool was given (`new Pool({ types })`)
 * or `pg.types.setTypeParser` changed for the app: a pool that keeps `bool` as text made every
 * completed key look new (`'f'` is truthy), one that keeps `bytea` as text replayed empty bodies.
 * Every other type arrives as text, which the store reads with `Number()` where it wants a number.
 */
export const STORE_TYPES: CustomTypesConfig = {
  getTypeParser: ((oid: number) => {
    switch (oid) {
      case BOOL:
        return parseBool;
      case BYTEA:
        return parseBytea;
      case JSON_OID:
      case JSONB:
        return parseJson;
      default:
        return asText;
    }
  }) as CustomTypesConfig['getTypeParser'],
};

function parseBool(value: string): boolean {
  return value === 't' || value === 'true';
}

function parseJson(value: string): unknown {
  return JSON.parse(value);
}

function asText(value: string): string {
  return value;
}

/**
 * `bytea` in either output format: hex (`\x…`, the default) or escape (`bytea_output = 'escape'`:
 * a printable byte as itself, `\\` for a backslash, `\ooo` in octal for any other). Escape is
 * decoded into one buffer of its size: a number[] grown a byte at a time froze the process for
 * seconds per MiB, and past about 100 MiB (within maxResponseBytes) V8 ended the process
 * ("invalid size error") on the first read of the key.
 */
export function parseBytea(value: string): Buffer {
  if (value.startsWith('\\x')) return Buffer.from(value.slice(2), 'hex');
  // Sized first (a random body is mostly `\ooo`, four characters a byte): no buffer of 4x its size.
  let size = value.length;
  for (let i = value.indexOf('\\'); i !== -1; i = value.indexOf('\\', i)) {
    const pair = value.charCodeAt(i + 1) === 0x5c;
    size -= pair ? 1 : 3;
    i += pair ? 2 : 4;
  }
  const out = Buffer.allocUnsafe(size);
  let n = 0;
  for (let i = 0; i < value.length; i++) {
    const c = value.charCodeAt(i);
    if (c !== 0x5c) out[n++] = c;
    else if (value.charCodeAt(i + 1) === 0x5c) {
      out[n++] = 0x5c;
      i++;
    } else {
      out[n++] = ((value.charCodeAt(i + 1) - 48) << 6) | ((value.charCodeAt(i + 2) - 48) << 3) | (value.charCodeAt(i + 3) - 48);
      i += 3;
    }
  }
  return out;
}
