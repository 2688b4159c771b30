import { defineConfig } from 'tsup';
import { base } from '../../tsup.base.js';

// ESM and CJS like every package. The suite runs only under vitest, which loads it with `import`;
// the CJS build is there for the `require` condition's types: without them a CommonJS TypeScript
// project (module node16/nodenext) cannot type-check `import … from '@idemkit/store-conformance'`
// (TS1479). Loaded with require() outside vitest it throws vitest's own "use import" error.
export default defineConfig(base);
