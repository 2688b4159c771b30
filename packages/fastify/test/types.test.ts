import { fileURLToPath } from 'node:url';
import ts from 'typescript';
import { expect, it } from 'vitest';

// tsc over test/types/augmentation.ts: the module augmentation accepts `config.idempotency`
// overrides and `request.idempotency`, and rejects wrong values (each `@ts-expect-error` must fire).
it('declaration merging types config.idempotency and request.idempotency', () => {
  const configPath = fileURLToPath(new URL('../tsconfig.json', import.meta.url));
  const { config } = ts.readConfigFile(configPath, (p) => ts.sys.readFile(p));
  const parsed = ts.parseJsonConfigFileContent(config, ts.sys, fileURLToPath(new URL('..', import.meta.url)));
  const file = fileURLToPath(new URL('./types/augmentation.ts', import.meta.url));
  const program = ts.createProgram([file], { ...parsed.options, noEmit: true });
  const diagnostics = ts.getPreEmitDiagnostics(program).map((d) => ts.flattenDiagnosticMessageText(d.messageText, '\n'));
  expect(diagnostics).toEqual([]);
}, 60_000);
