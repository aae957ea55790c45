// What the browser scripts of the end-to-end tests share: headless Chromium (Debian's
// /usr/bin/chromium, or POSTERN_TEST_CHROMIUM) through playwright-core, an overall
// deadline, the xterm.js screen as text, and a failure report with what the page showed.

import { chromium } from 'playwright-core';

/// Exit with an error if the script has not finished within `ms`.
export function deadline(name, ms) {
  return setTimeout(() => {
    process.stderr.write(`${name}: no result within ${ms / 1000} s\n`);
    process.exit(1);
  }, ms);
}

/// Start headless Chromium. Tests run as root in CI, where its sandbox cannot start.
export function launch(timeout) {
  return chromium.launch({
    executablePath: process.env.POSTERN_TEST_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run', '--disable-extensions'],
    timeout,
  });
}

/// Collect the page's console errors (a CSP violation shows there) into `errors`.
export function collectErrors(page, errors) {
  page.on('console', (m) => {
    if (m.type() === 'error') errors.push(m.text());
  });
}

/// The console's terminal (window.posternTerminal, xterm.js) as text, one line per row.
export function screen(page) {
  return page.evaluate(() => {
    const b = window.posternTerminal.buffer.active;
    const out = [];
    for (let i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true));
    return out.join('\n');
  });
}

/// Report `err` with the page's address and text and the console errors, close the
/// browser and exit 1.
export async function fail(name, err, browser, page, errors = []) {
  let seen = '';
  try {
    if (page) seen = `\npage ${page.url()}: ${await page.locator('body').innerText({ timeout: 2000 })}`;
  } catch {}
  process.stderr.write(`${name}: ${err.message}${seen}\nconsole errors: ${JSON.stringify(errors)}\n`);
  await browser.close();
  process.exit(1);
}
