import { execFile } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { builtinModules } from 'node:module';
import { tmpdir } from 'node:os';
import { join, posix } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

/*
 * What an npm user installs: every published package packed with `pnpm pack` (as `changeset
 * publish` does), unpacked and read as a tarball, not as the workspace link the other tests use.
 * Offline: pnpm packs from the local dist/ (built by `pnpm test` / turbo's ^build).
 */
const run = promisify(execFile);
const root = fileURLToPath(new URL('../../..', import.meta.url));
const packagesDir = join(root, 'packages');

interface Manifest {
  name: string;
  version: string;
  private?: boolean;
  main?: string;
  module?: string;
  types?: string;
  exports?: unknown;
  files?: string[];
  engines?: { node?: string };
  dependencies?: Record<string, string>;
  peerDependencies?: Record<string, string>;
  optionalDependencies?: Record<string, string>;
  devDependencies?: Record<string, string>;
}

const readJson = (file: string): Manifest => JSON.parse(readFileSync(file, 'utf8')) as Manifest;

const workspace = readdirSync(packagesDir)
  .filter((dir) => existsSync(join(packagesDir, dir, 'package.json')))
  .map((dir) => ({ dir: join(packagesDir, dir), manifest: readJson(join(packagesDir, dir, 'package.json')) }));
const published = workspace.filter((p) => p.manifest.private !== true);
const privateNames = new Set(workspace.filter((p) => p.manifest.private === true).map((p) => p.manifest.name));
const versions = new Map(workspace.map((p) => [p.manifest.name, p.manifest.version]));

interface Packed {
  manifest: Manifest;
  /** Paths relative to the tarball's package/ folder, '/'-separated. */
  files: string[];
  dir: string;
}
const packed = new Map<string, Packed>();
let scratch: string;

function listFiles(dir: string, prefix = ''): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) =>
    entry.isDirectory() ? listFiles(join(dir, entry.name), `${prefix}${entry.name}/`) : [`${prefix}${entry.name}`],
  );
}

beforeAll(async () => {
  for (const { dir, manifest } of published) {
    if (!existsSync(join(dir, 'dist'))) throw new Error(`${manifest.name}: dist/ is missing; build first (pnpm build).`);
  }
  scratch = mkdtempSync(join(tmpdir(), 'idemkit-pack-'));
  // Two at a time: each pack is a pnpm process.
  const queue = [...published];
  await Promise.all(
    [0, 1].map(async () => {
      for (let next = queue.shift(); next; next = queue.shift()) {
        const out = join(scratch, next.manifest.name.replace('/', '__'));
        mkdirSync(out);
        await run('pnpm', ['pack', '--pack-destination', out], { cwd: next.dir });
        const tarball = readdirSync(out).find((f) => f.endsWith('.tgz'));
        if (!tarball) throw new Error(`${next.manifest.name}: pnpm pack wrote no tarball`);
        await run('tar', ['xzf', tarball], { cwd: out });
        const pkg = join(out, 'package');
        packed.set(next.manifest.name, { manifest: readJson(join(pkg, 'package.json')), files: listFiles(pkg), dir: pkg });
      }
    }),
  );
}, 120_000);

afterAll(() => {
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

/** Every file path a package.json `exports` map can point at. */
function exportTargets(value: unknown): string[] {
  if (typeof value === 'string') return [value];
  if (value === null || typeof value !== 'object') return [];
  return Object.values(value).flatMap(exportTargets);
}

/** The package name a bare specifier names (`@scope/name/sub` → `@scope/name`), or undefined for a relative one or a builtin. */
function packageOf(specifier: string): string | undefined {
  if (specifier.startsWith('.') || specifier.startsWith('/') || specifier.startsWith('node:')) return undefined;
  const parts = specifier.split('/');
  const name = specifier.startsWith('@') ? parts.slice(0, 2).join('/') : parts[0]!;
  return builtinModules.includes(name) ? undefined : name;
}

/** Modules a built file loads: import/export … from, side-effect imports, require() and import(). */
function importedModules(source: string): string[] {
  const found = new Set<string>();
  const patterns = [
    /^\s*(?:import|export)\b[^;]*?\bfrom\s*["']([^"']+)["']/gm,
    /^\s*import\s*["']([^"']+)["']/gm,
    /\brequire\(\s*["']([^"']+)["']\s*\)/g,
    /\bimport\(\s*["']([^"']+)["']\s*\)/g,
  ];
  for (const pattern of patterns) for (const match of source.matchAll(pattern)) found.add(match[1]!);
  return [...found];
}

describe('published packages, as packed for npm', () => {
  it('the set of published packages is the one SPEC §1 lists', () => {
    expect(published.map((p) => p.manifest.name).sort()).toEqual(
      ['client', 'core', 'express', 'fastify', 'koa', 'mongodb', 'postgres', 'redis', 'store-conformance'].map((n) => `@idemkit/${n}`),
    );
  });

  describe.each(published.map((p) => p.manifest.name))('%s', (name) => {
    const get = (): Packed => {
      const p = packed.get(name);
      if (!p) throw new Error(`${name} was not packed`);
      return p;
    };

    it('no workspace: or catalog: specifier is left, and sibling packages are pinned to ^their version', () => {
      const { manifest } = get();
      for (const field of ['dependencies', 'peerDependencies', 'optionalDependencies', 'devDependencies'] as const) {
        for (const [dep, range] of Object.entries(manifest[field] ?? {})) {
          expect(range, `${field}.${dep}`).not.toMatch(/^(workspace|catalog):/);
          if (field !== 'devDependencies' && versions.has(dep)) expect(range, `${field}.${dep}`).toBe(`^${versions.get(dep)}`);
        }
      }
    });

    it('depends on no private workspace package (it would not install from npm)', () => {
      const { manifest } = get();
      const runtime = { ...manifest.dependencies, ...manifest.peerDependencies, ...manifest.optionalDependencies };
      expect(Object.keys(runtime).filter((dep) => privateNames.has(dep))).toEqual([]);
    });

    it('main, module, types and every exports target are in the tarball', () => {
      const { manifest, files } = get();
      const targets = [manifest.main, manifest.module, manifest.types, ...exportTargets(manifest.exports)].filter((t): t is string => t !== undefined);
      expect(targets.length).toBeGreaterThan(0);
      for (const target of targets) expect(files, target).toContain(posix.normalize(target));
    });

    it('"." has an import and a require entry, each with its own types listed first', () => {
      // Without a require entry, a CommonJS TypeScript project (module node16/nodenext) cannot
      // even type-check an import of the package (TS1479), whatever runs it at run time.
      const { manifest } = get();
      const root = (manifest.exports as Record<string, unknown>)['.'] as Record<string, Record<string, string>>;
      expect(Object.keys(root)).toEqual(['import', 'require']);
      expect(Object.keys(root.import!)).toEqual(['types', 'default']);
      expect(Object.keys(root.require!)).toEqual(['types', 'default']);
      expect(root.import!.types).toMatch(/\.d\.ts$/);
      expect(root.require!.types).toMatch(/\.d\.cts$/);
      expect(root.require!.default).toMatch(/\.cjs$/);
    });

    it('ships README.md, LICENSE, CHANGELOG.md (once written) and engines.node, and no tests or sources', () => {
      const { manifest, files } = get();
      expect(files).toContain('README.md');
      expect(files).toContain('LICENSE');
      expect(manifest.engines?.node).toMatch(/^>=\d+/);
      // The CHANGELOG.md `changeset version` writes: pnpm and npm leave it out unless `files` names it.
      expect(manifest.files).toContain('CHANGELOG.md');
      expect(files.filter((f) => /(^|\/)(test|tests|__tests__|src)\/|\.(test|spec)\.[cm]?[jt]s$/.test(f))).toEqual([]);
    });

    it('source maps carry their sources (src/ is not shipped)', () => {
      const { files, dir } = get();
      for (const map of files.filter((f) => f.endsWith('.map'))) {
        const { sources, sourcesContent } = JSON.parse(readFileSync(join(dir, map), 'utf8')) as { sources: string[]; sourcesContent?: (string | null)[] };
        expect(sourcesContent?.length, map).toBe(sources.length);
        expect(sourcesContent?.filter((c) => typeof c !== 'string'), map).toEqual([]);
      }
    });

    it('every module the build loads is a builtin, itself, or a declared dependency or peer', () => {
      const { manifest, files, dir } = get();
      const declared = new Set([
        manifest.name,
        ...Object.keys(manifest.dependencies ?? {}),
        ...Object.keys(manifest.peerDependencies ?? {}),
        ...Object.keys(manifest.optionalDependencies ?? {}),
      ]);
      const undeclared: string[] = [];
      for (const file of files.filter((f) => /\.(c|m)?js$|\.d\.(c|m)?ts$/.test(f))) {
        const types = /\.d\.(c|m)?ts$/.test(file);
        for (const specifier of importedModules(readFileSync(join(dir, file), 'utf8'))) {
          const dep = packageOf(specifier);
          if (dep === undefined || declared.has(dep)) continue;
          // Declarations may lean on DefinitelyTyped's package for a peer that ships no types.
          const typesName = `@types/${dep.startsWith('@') ? dep.slice(1).replace('/', '__') : dep}`;
          if (types && declared.has(typesName)) continue;
          undeclared.push(`${file}: ${specifier}`);
        }
      }
      expect(undeclared).toEqual([]);
    });

    it("the README's relative links point at files in the tarball", () => {
      const { files, dir } = get();
      const readme = readFileSync(join(dir, 'README.md'), 'utf8');
      const broken = [...readme.matchAll(/\]\(([^)\s]+)\)/g)]
        .map((m) => m[1]!)
        .filter((href) => !/^[a-z][a-z0-9+.-]*:/i.test(href) && !href.startsWith('#'))
        .filter((href) => !files.includes(posix.normalize(posix.join(posix.dirname('README.md'), href.split('#')[0]!))));
      expect(broken).toEqual([]);
    });
  });
});
