// The web console's session history in a real browser, for end-to-end tests: headless
// Chromium (Debian's /usr/bin/chromium through playwright-core) signs in with the one-time
// link, opens the Sessions page, searches by INSTANCE, opens SESSION's replay and waits
// until the player has shown WANT, then takes a screenshot of the replay page.
//
//   node history.mjs SIGNIN_URL INSTANCE SESSION WANT SCREENSHOT.png
//
// stdout: one JSON object {list, found, replay, shown, errors}. TLS errors are ignored:
// the console's certificate is from the gateway's own CA.

import { collectErrors, deadline, fail, launch } from './lib.mjs';

const [url, instance, session, want, screenshot] = process.argv.slice(2);
if (!url || !instance || !session || !want || !screenshot) {
  process.stderr.write('usage: node history.mjs SIGNIN_URL INSTANCE SESSION WANT SCREENSHOT.png\n');
  process.exit(2);
}
const TIMEOUT_MS = 45_000;
const timer = deadline('history', TIMEOUT_MS);

const errors = [];
let page;
const browser = await launch(TIMEOUT_MS);
const out = {};
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1200, height: 760 } });
  page = await context.newPage();
  page.setDefaultTimeout(20_000);
  collectErrors(page, errors);
  await page.goto(url);
  await page.click('header nav a[href="/sessions"]');
  await page.fill('input[name=instance]', instance);
  await page.click('form.search button');
  await page.waitForLoadState();
  out.list = await page.locator('main').innerText();
  const row = page.locator(`tr[data-session="${session}"]`);
  out.found = (await row.count()) === 1;
  await row.locator('a.open').click();
  await page.waitForURL(/\/sessions\/[0-9a-f]+$/);
  out.replay = await page.locator('main dl').innerText();
  // The player renders the terminal as text; wait until the recording showed WANT.
  const until = Date.now() + 20_000;
  for (;;) {
    const shown = await page.locator('#player').innerText();
    if (shown.split('\n').some((l) => l.trim() === want)) {
      out.shown = true;
      break;
    }
    if (Date.now() > until) {
      out.shown = false;
      out.player = shown;
      break;
    }
    await page.waitForTimeout(50);
  }
  await page.screenshot({ path: screenshot, fullPage: true });
  out.errors = errors;
} catch (err) {
  await fail('history', err, browser, page, errors);
}
await browser.close();
clearTimeout(timer);
process.stdout.write(JSON.stringify(out) + '\n');
