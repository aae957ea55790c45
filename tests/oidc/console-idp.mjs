// Signing in to the web console through the identity provider, in a real browser, for
// end-to-end tests: headless Chromium (Debian's /usr/bin/chromium through playwright-core)
// opens the console's sign-in page, clicks "Sign in with your identity provider", signs in
// on the test provider's login page (provider.mjs) and follows the redirects back to the
// console.
//
//   node console-idp.mjs CONSOLE_URL LOGIN PASSWORD
//
// stdout: one JSON object {landed, user, text}: where the browser ended up, the signed-in
// user the page shows, and the page's text. TLS errors are ignored: the console's
// certificate is from the gateway's own CA.

import { deadline, fail, launch } from './lib.mjs';

const [origin, login, password] = process.argv.slice(2);
if (!origin || login === undefined || password === undefined) {
  process.stderr.write('usage: node console-idp.mjs CONSOLE_URL LOGIN PASSWORD\n');
  process.exit(2);
}
const TIMEOUT_MS = 45_000;
const timer = deadline('console-idp', TIMEOUT_MS);

let page;
const browser = await launch(TIMEOUT_MS);
const out = {};
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true });
  page = await context.newPage();
  page.setDefaultTimeout(30_000);
  await page.goto(`${origin}/`);
  await page.click('#idp');
  await page.locator('#login-form').waitFor();
  await page.fill('input[name=login]', login);
  await page.fill('input[name=password]', password);
  await page.click('#login-form button[type=submit]');
  // Back at the console: the sign-in page with a problem, or the instances page.
  await page.waitForURL((u) => u.href.startsWith(origin) && !u.pathname.startsWith('/signin/oidc'), { waitUntil: 'load' })
    .catch(() => {});
  await page.locator('#user, #problem').first().waitFor();
  out.landed = page.url();
  out.user = (await page.locator('#user').count()) ? await page.locator('#user').innerText() : null;
  out.text = await page.locator('main').innerText();
} catch (err) {
  await fail('console-idp', err, browser, page);
}
await browser.close();
clearTimeout(timer);
process.stdout.write(JSON.stringify(out) + '\n');
