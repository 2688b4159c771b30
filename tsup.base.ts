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
  // Error class names are part of the API (`err.name`), so keep them unminified.
  minify: false,
  keepNames: true,
};
