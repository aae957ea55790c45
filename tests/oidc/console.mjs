// The web console in a real browser, for end-to-end tests: headless Chromium (Debian's
// /usr/bin/chromium through playwright-core) opens the sign-in link, takes a screenshot of
// the page it lands on, filters by labels when asked, signs out, and then tries the link
// once more (it must be refused).
//
//   node console.mjs SIGNIN_URL SCREENSHOT.png [LABELS]
//
// stdout: one JSON object {landed, text, filtered, after_signout, reused}. The console's
// certificate comes from the gateway's own CA, which this browser does not know: TLS
// errors are ignored (the tests check the certificate chain separately).

import { deadline, fail, launch } from './lib.mjs';

const [url, screenshot, labels] = process.argv.slice(2);
if (!url || !screenshot) {
  process.stderr.write('usage: node console.mjs SIGNIN_URL SCREENSHOT.png [LABELS]\n');
  process.exit(2);
}
const TIMEOUT_MS = 30_000;
const timer = deadline('console', TIMEOUT_MS);

const browser = await launch(TIMEOUT_MS);
const out = {};
let page;
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1200, height: 700 } });
  page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT_MS);
  await page.goto(url);
  out.landed = page.url();
  out.text = await page.locator('main').innerText();
  await page.screenshot({ path: screenshot, fullPage: true });
  if (labels !== undefined) {
    await page.fill('input[name=labels]', labels);
    await page.click('form.filter button');
    await page.waitForLoadState();
    out.filtered = await page.locator('main').innerText();
  }
  await page.click('header form button');
  await page.waitForLoadState();
  out.after_signout = await page.locator('main').innerText();
  await page.goto(url);
  out.reused = await page.locator('main').innerText();
} catch (err) {
  await fail('console', err, browser, page);
}
await browser.close();
clearTimeout(timer);
process.stdout.write(JSON.stringify(out) + '\n');
