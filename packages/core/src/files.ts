import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';

/** A `multipart/*` request (`multipart/form-data`): the only kind whose parsers keep files beside the body. */
export function isMultipart(contentType: string | undefined): boolean {
  return contentType !== undefined && contentType.length >= 10 && contentType.slice(0, 10).toLowerCase() === 'multipart/';
}

/**
 * One uploaded file as the common multipart parsers describe it: formidable (koa-body) gives
 * `filepath` (`path` before v2), multer gives `fieldname` and `buffer` (memory storage) or `path`
 * (disk storage), express-fileupload gives `data`, or `tempFilePath` with `useTempFiles`.
 */
interface UploadedFile {
  readonly fieldname?: unknown;
  readonly buffer?: unknown;
  readonly data?: unknown;
  readonly tempFilePath?: unknown;
  readonly filepath?: unknown;
  readonly path?: unknown;
}

/**
 * The SHA-256 of each uploaded file's bytes, by field, for `IncomingRequest.files` (and so the
 * default fingerprint). Takes what the parser left on the request: koa-body's
 * `ctx.request.files` (`{ field: file | file[] }`), multer's `req.file` or `req.files` (an
 * array, or `{ field: file[] }`). Resolves `undefined` when there are none. Files on disk are
 * read once, as a stream. A file with neither bytes nor a path rejects: its content cannot be
 * told apart from another's, and two different uploads must not pass for one.
 */
export async function uploadedFileDigests(files: unknown, field = 'file'): Promise<Record<string, string[]> | undefined> {
  if (files === undefined || files === null) return undefined;
  const byField = new Map<string, UploadedFile[]>();
  const add = (name: string, file: unknown): void => {
    if (typeof file !== 'object' || file === null) return;
    const list = byField.get(name) ?? [];
    list.push(file as UploadedFile);
    byField.set(name, list);
  };
  if (Array.isArray(files)) {
    for (const file of files) add(fieldOf(file, field), file);
  } else if (isFile(files)) {
    add(fieldOf(files, field), files);
  } else if (typeof files === 'object') {
    for (const [name, value] of Object.entries(files)) {
      if (Array.isArray(value)) for (const file of value) add(name, file);
      else add(name, value);
    }
  }
  if (byField.size === 0) return undefined;
  const out: Record<string, string[]> = {};
  for (const [name, list] of byField) out[name] = await Promise.all(list.map(digestOf));
  return out;
}

/** One file rather than a map of fields (multer names its field; a storage engine may keep no bytes). */
function isFile(value: object): boolean {
  const f = value as UploadedFile;
  return typeof f.fieldname === 'string' || f.buffer instanceof Uint8Array || typeof f.filepath === 'string' || typeof f.path === 'string' || typeof f.tempFilePath === 'string';
}

function fieldOf(file: unknown, fallback: string): string {
  const name = (file as UploadedFile | null)?.fieldname;
  return typeof name === 'string' ? name : fallback;
}

async function digestOf(file: UploadedFile): Promise<string> {
  const hash = createHash('sha256');
  if (file.buffer instanceof Uint8Array) return hash.update(file.buffer).digest('base64url');
  const path = [file.tempFilePath, file.filepath, file.path].find((p): p is string => typeof p === 'string' && p !== '');
  // express-fileupload leaves `data` empty when the bytes went to `tempFilePath`.
  if (path === undefined && file.data instanceof Uint8Array) return hash.update(file.data).digest('base64url');
  if (path === undefined) {
    throw new TypeError('[idemkit] An uploaded file has neither its bytes (`buffer`) nor a path on disk, so the fingerprint cannot see it: pass a `fingerprint` function that covers it.');
  }
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('base64url');
}
