// Live watch in the web console, in a real browser, for end-to-end tests: headless Chromium
// (Debian's /usr/bin/chromium through playwright-core) signs in with the one-time link as
// an administrator, opens the Sessions page, clicks Watch on SESSION and waits until the
// page is watching; prints {"ready": ...}. Then it reads one line from stdin, the text to
// wait for: once a line of the watcher's screen is exactly that, it takes a screenshot and
// prints {"done": {"seen": true, "screen": ...}} (or seen: false after 20 s), and closes.
//
//   node watch.mjs SIGNIN_URL SESSION SCREENSHOT.png
//
// TLS errors are ignored: the console's certificate is from the gateway's own CA.

import { collectErrors, deadline, fail, launch, screen } from './lib.mjs';
import { createInterface } from 'node:readline';

const [url, session, screenshot] = process.argv.slice(2);
if (!url || !session || !screenshot) {
  process.stderr.write('usage: node watch.mjs SIGNIN_URL SESSION SCREENSHOT.png\n');
  process.exit(2);
}
const TIMEOUT_MS = 60_000;
const timer = deadline('watch', TIMEOUT_MS);
const say = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

const errors = [];
let page;
const browser = await launch(TIMEOUT_MS);
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1100, height: 640 } });
  page = await context.newPage();
  page.setDefaultTimeout(20_000);
  collectErrors(page, errors);
  await page.goto(url);
  await page.click('header nav a[href="/sessions"]');
  await page.locator(`tr[data-session="${session}"] a[href^="/watch"]`).click();
  await page.waitForURL(/\/watch\?/);
  await page.waitForFunction(() => document.getElementById('state').textContent.includes('watching'));
  say({ ready: { title: await page.title(), errors } });
  const { value: want = '' } = await lines.next();
  const until = Date.now() + 20_000;
  let seen = false;
  let shown = '';
  while (Date.now() < until) {
    shown = await screen(page);
    if (shown.split('\n').some((l) => l.trim() === want)) {
      seen = true;
      break;
    }
    await page.waitForTimeout(25);
  }
  await page.screenshot({ path: screenshot });
  say({ done: { seen, screen: shown, errors } });
} catch (err) {
  await fail('watch', err, browser, page, errors);
}
await browser.close();
clearTimeout(timer);
