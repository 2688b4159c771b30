import { existsSync, mkdirSync } from 'node:fs';
import { networkInterfaces } from 'node:os';
import { chromium, type Browser } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FRAMEWORKS, readConfig } from '../src/config.js';
import { startDemo, type RunningDemo } from '../src/server.js';

const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const ARTIFACTS = new URL('../../../test-artifacts/', import.meta.url);

let browser: Browser;
beforeAll(async () => {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`Chromium not found at ${CHROMIUM}. Install Debian's chromium (apt-get install -y chromium) or set CHROMIUM_PATH.`);
  }
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic', '--no-first-run'],
  });
  mkdirSync(ARTIFACTS, { recursive: true });
});
afterAll(() => browser?.close());

async function serverOrders(url: string): Promise<Array<{ key: string }>> {
  return ((await (await fetch(`${url}/orders`)).json()) as { orders: Array<{ key: string }> }).orders;
}

describe.each(FRAMEWORKS)('checkout page in Chromium (%s)', (framework) => {
  let demo: RunningDemo;
  beforeAll(async () => {
    // The payment takes long enough that the second click of a double click overlaps the first,
    // and that a reload right after Pay unloads the page before the answer lands, on a slow
    // machine too (300 ms left Chromium's reload little room on a busy CI host).
    demo = await startDemo(readConfig({ FRAMEWORK: framework, PORT: '0', DEMO_WORK_MS: '1000' }));
  });
  afterAll(() => demo.close());

  it('a double click and a flaky network each make exactly one order, and the page shows the replays', async () => {
    const page = await browser.newPage();
    try {
      await page.goto(demo.url);
      await page.waitForFunction(() => document.getElementById('count')?.textContent === '0 orders');

      const settled = () =>
        page.waitForFunction(() => document.getElementById('status')?.dataset.inflight === '0', undefined, { timeout: 20_000 });
      await page.dblclick('#pay');
      // Both clicks' calls must finish: a retry still in flight would use up the flaky drops below.
      await settled();
      expect(await page.textContent('#status')).toMatch(/^Paid/);
      await page.waitForFunction(() => document.getElementById('count')?.dataset.count === '1');
      const firstRow = page.locator('#orders tr').first();
      // Two clicks, one order: the duplicate attempts were absorbed (409 → replay).
      expect(Number(await firstRow.locator('.replays').getAttribute('data-absorbed'))).toBeGreaterThanOrEqual(1);

      await page.check('#flaky');
      await page.click('#pay');
      await settled();
      expect(await page.textContent('#status')).toMatch(/^Paid/);
      await page.waitForFunction(() => document.getElementById('count')?.dataset.count === '2');
      // Two responses were dropped after the server answered: two attempts absorbed, one replay seen.
      expect(Number(await page.locator('#orders tr').first().locator('.replays').getAttribute('data-absorbed'))).toBe(2);
      const flakyBadge = await page.locator('#orders tr').first().locator('.replays').textContent();
      expect(flakyBadge).toBe('2 absorbed · 1 replayed');

      const orders = await serverOrders(demo.url);
      expect(orders).toHaveLength(2);
      expect(new Set(orders.map((o) => o.key)).size).toBe(2);
      await page.screenshot({ path: new URL(`demo-${framework}.png`, ARTIFACTS).pathname, fullPage: true });
    } finally {
      await page.close();
    }
  });

  it('a reload during the payment, then Pay again, is still one order (the key survives the reload)', async () => {
    const before = (await serverOrders(demo.url)).length;
    const page = await browser.newPage();
    try {
      const loaded = () => page.waitForFunction(() => document.getElementById('count')?.dataset.count !== undefined);
      await page.goto(demo.url);
      await loaded();
      const sent = page.waitForRequest((request) => request.method() === 'POST' && request.url().endsWith('/orders'));
      await page.click('#pay');
      await sent;
      // The payment is on the server (it takes 1 s); the page goes away before its answer.
      await page.reload();
      await loaded();
      await page.click('#pay');
      await page.waitForFunction(() => document.getElementById('status')?.dataset.inflight === '0', undefined, { timeout: 20_000 });
      expect(await page.textContent('#status')).toMatch(/^Paid/);
      // Before, the key lived in a variable: the second Pay sent a new one and charged twice.
      const orders = await serverOrders(demo.url);
      expect(orders).toHaveLength(before + 1);
    } finally {
      await page.close();
    }
  });
});

/** This machine's first non-loopback IPv4 address: a page served there is not a secure context. */
function lanAddress(): string {
  const address = Object.values(networkInterfaces()).flat().find((i) => i?.family === 'IPv4' && !i.internal)?.address;
  if (!address) throw new Error('This test needs a non-loopback IPv4 interface (a page on http://localhost is a secure context).');
  return address;
}

// HOST=0.0.0.0, as the README suggests to reach the demo from elsewhere: the page is then on plain
// http:// at a LAN address, where crypto.randomUUID does not exist. Before, the page called it to
// make the checkout key, so Pay sent nothing and no order was made.
describe('checkout page on a LAN address (not a secure context)', () => {
  let demo: RunningDemo;
  const host = lanAddress();
  beforeAll(async () => {
    demo = await startDemo(readConfig({ PORT: '0', HOST: host, DEMO_WORK_MS: '50' }));
  });
  afterAll(() => demo?.close());

  it('Pay makes one order with a UUID key', async () => {
    const page = await browser.newPage();
    try {
      await page.goto(demo.url);
      expect(await page.evaluate(() => window.isSecureContext)).toBe(false);
      await page.waitForFunction(() => document.getElementById('count')?.textContent === '0 orders');
      await page.click('#pay');
      await page.waitForFunction(() => document.getElementById('status')?.textContent?.startsWith('Paid'), undefined, { timeout: 20_000 });
      const orders = await serverOrders(demo.url);
      expect(orders).toHaveLength(1);
      expect(orders[0]!.key).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    } finally {
      await page.close();
    }
  });
});
