import { defineConfig } from 'tsup';
import { base } from '../../tsup.base.js';

// tsup bundles optionalDependencies; the Testcontainers modules must stay runtime imports
// (loaded only when no TEST_* variable is set), and ssh2's native addons cannot be bundled anyway.
export default defineConfig({
  ...base,
  external: ['testcontainers', '@testcontainers/postgresql', '@testcontainers/redis', '@testcontainers/mongodb'],
});
