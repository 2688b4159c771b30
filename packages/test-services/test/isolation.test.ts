import { describe, expect, it } from 'vitest';
import { uniqueMongoDbName, uniquePrefix, withSearchPath } from '../src/index.js';

describe('isolation names', () => {
  it('uniquePrefix: readable, distinct per call, no hash tag (keys may spread over cluster slots)', () => {
    const a = uniquePrefix('Store Conformance');
    const b = uniquePrefix('Store Conformance');
    expect(a).toMatch(/^idemkit-test:store_conformance:[0-9a-f]{10}:$/);
    expect(a).not.toBe(b);
    expect(a).not.toMatch(/[{}]/);
  });

  it('uniqueMongoDbName: at most 63 chars of [a-z0-9_], distinct per call', () => {
    const long = uniqueMongoDbName('x'.repeat(200) + '.$/ weird');
    expect(long.length).toBeLessThanOrEqual(63);
    expect(long).toMatch(/^t_[a-z0-9_]+_[0-9a-f]{10}$/);
    expect(uniqueMongoDbName('mongo')).not.toBe(uniqueMongoDbName('mongo'));
  });

  it('withSearchPath keeps the URL and adds the libpq options parameter', () => {
    const u = new URL(withSearchPath('postgres://postgres@127.0.0.1:5432/test?sslmode=disable', 't_x_0123456789'));
    expect(u.searchParams.get('sslmode')).toBe('disable');
    expect(u.searchParams.get('options')).toBe('-c search_path=t_x_0123456789');
    expect(u.pathname).toBe('/test');
  });
});
