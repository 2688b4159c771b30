import { defineConfig } from 'tsup';

// An app, not a library: ESM only, no declarations, dependencies stay external.
export default defineConfig({
  entry: ['src/main.ts', 'src/server.ts'],
  format: ['esm'],
  dts: false,
  clean: true,
  sourcemap: true,
  target: 'node20',
});
