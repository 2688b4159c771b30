// Aggregates a V8 .cpuprofile (what `node --cpu-prof` writes) by function: self time is the sum
// of the sample intervals spent in a node, so it is exact to V8's sampling, not a hit count guess.

interface CallFrame {
  readonly functionName: string;
  readonly url: string;
  /** 0-based. */
  readonly lineNumber: number;
  readonly columnNumber: number;
}

interface ProfileNode {
  readonly id: number;
  readonly callFrame: CallFrame;
  readonly children?: readonly number[];
}

export interface CpuProfile {
  readonly nodes: readonly ProfileNode[];
  readonly startTime: number;
  readonly endTime: number;
  readonly samples: readonly number[];
  /** Microseconds between a sample and the one before it. */
  readonly timeDeltas: readonly number[];
}

export interface FunctionTime {
  /** `name (where:line)`, where = package-relative file. */
  readonly name: string;
  readonly where: string;
  /** Where the time goes, coarse: a package name, `node:` internals, `(gc)`, `(program)`, `(idle)`. */
  readonly owner: string;
  readonly selfMs: number;
  readonly selfPercent: number;
  /** Time with this function anywhere on the stack (each sample counted once). */
  readonly totalMs: number;
  readonly totalPercent: number;
}

export interface ProfileSummary {
  readonly totalMs: number;
  /** Time not counted as (idle). */
  readonly busyMs: number;
  readonly functions: FunctionTime[];
  readonly owners: Array<{ readonly owner: string; readonly selfMs: number; readonly selfPercent: number }>;
}

/** Short location: `@idemkit/core dist/index.js` for workspace packages, `fastify lib/reply.js` for node_modules. */
export function ownerOf(url: string, functionName: string): { owner: string; file: string } {
  if (url === '') return { owner: functionName.startsWith('(') ? functionName : '(native)', file: '' };
  if (url.startsWith('node:')) return { owner: 'node:internals', file: url.slice(5) };
  const path = url.replace(/^file:\/\//, '');
  const modules = path.lastIndexOf('/node_modules/');
  if (modules >= 0) {
    const rest = path.slice(modules + '/node_modules/'.length).split('/');
    const scoped = rest[0]?.startsWith('@') ?? false;
    const owner = (scoped ? rest.slice(0, 2) : rest.slice(0, 1)).join('/');
    return { owner, file: rest.slice(scoped ? 2 : 1).join('/') };
  }
  const workspace = /\/packages\/([^/]+)\/(.*)$/.exec(path);
  if (workspace) return { owner: `@idemkit/${workspace[1] ?? ''}`, file: workspace[2] ?? '' };
  return { owner: '(app)', file: path };
}

export function summarize(profile: CpuProfile): ProfileSummary {
  const parent = new Map<number, number>();
  for (const node of profile.nodes) for (const child of node.children ?? []) parent.set(child, node.id);
  const selfUs = new Map<number, number>();
  profile.samples.forEach((id, i) => selfUs.set(id, (selfUs.get(id) ?? 0) + (profile.timeDeltas[i] ?? 0)));
  const keyOf = new Map<number, { key: string; name: string; where: string; owner: string }>();
  for (const node of profile.nodes) {
    const frame = node.callFrame;
    const { owner, file } = ownerOf(frame.url, frame.functionName);
    const where = file === '' ? '' : `${owner === 'node:internals' ? 'node:' : `${owner} `}${file}:${frame.lineNumber + 1}`;
    const name = frame.functionName || '(anonymous)';
    keyOf.set(node.id, { key: `${name}\u0000${where}`, name, where, owner });
  }
  // Inclusive time: every function on a sampled node's stack gets the node's self time, once.
  const inclusiveUs = new Map<string, number>();
  for (const [id, us] of selfUs) {
    const seen = new Set<string>();
    for (let at: number | undefined = id; at !== undefined; at = parent.get(at)) {
      const key = keyOf.get(at)?.key;
      if (key !== undefined && !seen.has(key)) {
        seen.add(key);
        inclusiveUs.set(key, (inclusiveUs.get(key) ?? 0) + us);
      }
    }
  }
  const functions = new Map<string, { name: string; where: string; owner: string; selfUs: number; totalUs: number }>();
  for (const { key, name, where, owner } of keyOf.values()) {
    const totalUs = inclusiveUs.get(key);
    if (totalUs !== undefined && !functions.has(key)) functions.set(key, { name, where, owner, selfUs: 0, totalUs });
  }
  const owners = new Map<string, number>();
  let totalUs = 0;
  let idleUs = 0;
  for (const [id, us] of selfUs) {
    const info = keyOf.get(id);
    if (!info) continue;
    totalUs += us;
    if (info.name === '(idle)') idleUs += us;
    const entry = functions.get(info.key);
    if (entry) entry.selfUs += us;
    owners.set(info.owner, (owners.get(info.owner) ?? 0) + us);
  }
  const busyUs = totalUs - idleUs;
  const percent = (us: number): number => (busyUs > 0 ? (100 * us) / busyUs : 0);
  return {
    totalMs: totalUs / 1000,
    busyMs: busyUs / 1000,
    functions: [...functions.values()]
      .filter((f) => f.name !== '(idle)' && f.name !== '(root)')
      .sort((a, b) => b.selfUs - a.selfUs)
      .map((f) => ({
        name: f.name,
        where: f.where,
        owner: f.owner,
        selfMs: f.selfUs / 1000,
        selfPercent: percent(f.selfUs),
        totalMs: f.totalUs / 1000,
        totalPercent: percent(f.totalUs),
      })),
    owners: [...owners.entries()]
      .filter(([owner]) => owner !== '(idle)')
      .sort((a, b) => b[1] - a[1])
      .map(([owner, us]) => ({ owner, selfMs: us / 1000, selfPercent: percent(us) })),
  };
}
