import { DemoConfigError, readConfig } from './config.js';
import { startDemo } from './server.js';

try {
  const config = readConfig();
  const demo = await startDemo(config);
  console.log(`idemkit demo (${config.framework}, ${config.store} store) on ${demo.url}`);
  const stop = () => {
    demo.close().then(() => process.exit(0), () => process.exit(1));
  };
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
} catch (error) {
  if (error instanceof DemoConfigError) {
    console.error(`[idemkit demo] ${error.message}`);
    process.exit(2);
  }
  throw error;
}
