import { defineConfig } from 'tsup';

// The fixture server and job worker the tests start as child processes: ESM only, dependencies stay external.
export default defineConfig({
  entry: ['src/app.ts', 'src/job-worker.ts', 'src/job-once.ts', 'src/soak.ts'],
  format: ['esm'],
  dts: false,
  clean: true,
  sourcemap: true,
  target: 'node20',
  // Everything comes from node_modules at run time (the deps are devDependencies of a private package).
  skipNodeModulesBundle: true,
});
