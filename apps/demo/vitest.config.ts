import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 60_000,
    hookTimeout: 120_000,
    // The browser and multi-process tests start servers and Chromium: one file at a time on 2 cores.
    fileParallelism: false,
  },
});
