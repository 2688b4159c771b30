import type { Options } from 'tsup';

/** Shared build: ESM + CJS with matching .d.ts/.d.cts, as every @idemkit package ships. */
export const base: Options = {
  entry: ['src/index.ts'],
  format: ['esm', 'cjs'],
  dts: true,
  clean: true,
  sourcemap: true,
  target: 'node20',
  splitting: false,
  // Error class names are part of the API (`err.name`), so nothing is minified or renamed.
  // (No `keepNames`: unminified output keeps names anyway, and its __name() wrapper ran on every
  // closure created per request - visible in pnpm bench's profile.)
  minify: false,
};
