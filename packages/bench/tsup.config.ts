import { defineConfig } from 'tsup';

// Executables, not a library: ESM only, no declarations.
export default defineConfig({
  entry: ['src/run.ts', 'src/server.ts', 'src/profile.ts', 'src/instructions.ts'],
  format: ['esm'],
  dts: false,
  clean: true,
  sourcemap: true,
  target: 'node20',
  splitting: true,
  minify: false,
  keepNames: true,
  // Load every dependency from node_modules, so profiles point at the real @idemkit dist files.
  skipNodeModulesBundle: true,
});
