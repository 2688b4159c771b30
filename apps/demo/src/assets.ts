import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

/** The page and the browser build of @idemkit/client, read once at startup (no build step). */
export interface Assets {
  readonly page: string;
  readonly client: string;
}

export function loadAssets(): Assets {
  const page = readFileSync(new URL('../public/index.html', import.meta.url), 'utf8');
  // The client's ESM build has no imports, so the browser can load it as it is.
  const client = readFileSync(fileURLToPath(import.meta.resolve('@idemkit/client')), 'utf8');
  return { page, client };
}
