import { defineConfig } from 'tsup';
import { base } from '../../tsup.base.js';

// ESM only: the suite imports vitest, which cannot be loaded with require().
export default defineConfig({ ...base, format: ['esm'] });
