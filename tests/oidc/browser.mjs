// The browser part of an authorization code login, for end-to-end tests: headless Chromium
// (Debian's /usr/bin/chromium, driven by playwright-core) opens URL, signs in on the test
// provider's login page (provider.mjs) and follows the redirects until it lands on the
// application's loopback page.
//
//   node browser.mjs URL LOGIN PASSWORD [OTP]
//
// Success (exit 0): the browser reached an http://127.0.0.1:* or http://localhost:* page
// on another origin than the login page; stdout gets that page's URL on the first line and
// its text after it. Failure (exit 1): the login form came back with an error, the
// provider showed an error page, or 30 s passed; stderr says which.

import { chromium } from 'playwright-core';

const [url, login, password, otp] = process.argv.slice(2);
if (!url || login === undefined || password === undefined) {
  process.stderr.write('usage: node browser.mjs URL LOGIN PASSWORD [OTP]\n');
  process.exit(2);
}
const TIMEOUT_MS = 30_000;
const executablePath = process.env.POSTERN_TEST_CHROMIUM || '/usr/bin/chromium';

function fail(message) {
  process.stderr.write(`browser login failed: ${message}\n`);
  process.exit(1);
}

const timer = setTimeout(() => fail(`no result within ${TIMEOUT_MS / 1000} s`), TIMEOUT_MS);

function isLoopback(u) {
  try {
    const parsed = new URL(u);
    return parsed.protocol === 'http:' && (parsed.hostname === '127.0.0.1' || parsed.hostname === 'localhost');
  } catch {
    return false;
  }
}

let browser;
try {
  browser = await chromium.launch({
    executablePath,
    headless: true,
    // Tests run as root in CI, where Chromium's sandbox cannot start.
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run', '--disable-extensions'],
    timeout: TIMEOUT_MS,
  });
} catch (err) {
  fail(`cannot start ${executablePath}: ${err.message}`);
}

try {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT_MS);
  await page.goto(url);

  const form = page.locator('#login-form');
  const providerError = page.locator('#oidc-error, #interaction-error');
  await form.or(providerError).first().waitFor();
  if (await providerError.count()) {
    fail(`the provider showed an error at ${page.url()}: ${await providerError.first().innerText()}`);
  }
  const providerOrigin = new URL(page.url()).origin;

  await page.fill('input[name=login]', login);
  await page.fill('input[name=password]', password);
  if (otp) await page.fill('input[name=otp]', otp);
  // The losers of the race below reject when the browser closes; that is not an error.
  const never = new Promise(() => {});
  const outcomeOf = (promise, name) => promise.then(() => name, () => never);
  const landed = outcomeOf(
    page.waitForURL((u) => isLoopback(u.href) && u.origin !== providerOrigin, { waitUntil: 'load' }),
    'landed',
  );
  await page.click('#login-form button[type=submit]');

  const loginError = page.locator('#login-error');
  const outcome = await Promise.race([
    landed,
    outcomeOf(loginError.waitFor(), 'login-error'),
    outcomeOf(providerError.waitFor(), 'provider-error'),
  ]);
  if (outcome === 'login-error') fail(`the provider refused the login: ${await loginError.innerText()}`);
  if (outcome === 'provider-error') fail(`the provider showed an error at ${page.url()}: ${await providerError.first().innerText()}`);

  const text = await page.locator('body').innerText().catch(() => '');
  process.stdout.write(`${page.url()}\n${text}\n`);
  clearTimeout(timer);
  await browser.close();
  process.exit(0);
} catch (err) {
  fail(err.message);
}
