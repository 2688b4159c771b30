/** A service handed to a test: its connection value and how to stop what was started for it. */
export interface ResolvedService<T> {
  readonly value: T;
  /** Stops what the resolver started (containers); a no-op for URL-provided services. */
  stop(): Promise<void>;
}

export interface ClusterNode {
  readonly host: string;
  readonly port: number;
}

/** What the container-runtime probe found. `reason` explains a missing runtime in the error. */
export type RuntimeProbe = { readonly available: true } | { readonly available: false; readonly reason: string };

/** Starts one service in containers; the resolver's seam for the Testcontainers branch. */
export interface ContainerStarters {
  postgres(): Promise<ResolvedService<string>>;
  redis(): Promise<ResolvedService<string>>;
  redisCluster(): Promise<ResolvedService<ClusterNode[]>>;
  mongo(): Promise<ResolvedService<string>>;
}

/**
 * Seams for tests of the resolver itself. Real test files call the resolvers with no options:
 * the environment is `process.env`, the probe asks Testcontainers, the starters run containers.
 */
export interface ResolveOptions {
  readonly env?: Readonly<Record<string, string | undefined>>;
  readonly probeRuntime?: () => Promise<RuntimeProbe>;
  readonly starters?: Partial<ContainerStarters>;
}
