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
  // Another process (an earlier demo, say) holds the port: say so, and how to pick another.
  if ((error as NodeJS.ErrnoException).code === 'EADDRINUSE') {
    const { port } = error as { port?: number };
    console.error(`[idemkit demo] Port ${port ?? ''} is in use. Stop what runs there, or pick another port: PORT=3001 pnpm demo (PORT=0 picks a free one).`);
    process.exit(2);
  }
  // A HOST this machine does not have, or a name that does not resolve: say which setting it is.
  const { code, message } = error as NodeJS.ErrnoException;
  if (code === 'EADDRNOTAVAIL' || code === 'ENOTFOUND' || code === 'EAI_AGAIN' || code === 'EACCES') {
    console.error(`[idemkit demo] Cannot listen on HOST=${process.env.HOST ?? ''} PORT=${process.env.PORT ?? ''}: ${message}. Use an address of this machine (127.0.0.1, 0.0.0.0) and a free port.`);
    process.exit(2);
  }
  throw error;
}
