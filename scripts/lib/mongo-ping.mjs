// Waits until a MongoDB wire-protocol server answers `ping` (used by services.sh for FerretDB).
// Usage: node mongo-ping.mjs URL TIMEOUT_MS. Exit 0 when it answered, 1 when the time ran out.
// The driver comes from @idemkit/test-services, which `pnpm install` has already installed.
import { createRequire } from 'node:module';

const [url, timeoutArg] = process.argv.slice(2);
const deadline = Date.now() + Number(timeoutArg ?? 30000);
const requireFromPkg = createRequire(new URL('../../packages/test-services/package.json', import.meta.url));
const { MongoClient } = requireFromPkg('mongodb');

async function tryOnce() {
  const client = new MongoClient(url, { serverSelectionTimeoutMS: 1000, connectTimeoutMS: 1000 });
  try {
    await client.connect();
    await client.db('admin').command({ ping: 1 });
    return true;
  } catch {
    return false;
  } finally {
    await client.close().catch(() => {});
  }
}

let ok = await tryOnce();
while (!ok && Date.now() < deadline) {
  await new Promise((resolve) => setTimeout(resolve, 200));
  ok = await tryOnce();
}
process.exit(ok ? 0 : 1);
