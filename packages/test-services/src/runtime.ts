import type { RuntimeProbe } from './types.js';

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/**
 * Asks Testcontainers whether a container runtime answers. testcontainers is an optional
 * dependency and only loaded here, so runs that give TEST_* variables never import it. With no
 * engine, `getContainerRuntimeClient()` throws "Could not find a working container runtime
 * strategy" within a second, which is what makes this probe cheap enough to run per resolve.
 */
export async function probeContainerRuntime(): Promise<RuntimeProbe> {
  let tc: typeof import('testcontainers');
  try {
    tc = await import('testcontainers');
  } catch (err) {
    return { available: false, reason: `the optional dependency "testcontainers" is not installed (${message(err)})` };
  }
  try {
    await tc.getContainerRuntimeClient();
    return { available: true };
  } catch (err) {
    return { available: false, reason: message(err) };
  }
}
