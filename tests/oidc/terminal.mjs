// A terminal in the web console, driven in a real browser for end-to-end tests: headless
// Chromium (Debian's /usr/bin/chromium through playwright-core) signs in with the one-time
// link, opens a terminal on INSTANCE from the instances page, types a command and waits
// for its output, resizes the window and checks that the shell sees the new size, sends
// UTF-8 both ways, pastes a command (a paste event on the terminal), takes a
// screenshot, then obeys one line on stdin:
//
//   exit   type `exit` and wait for the page to say the session ended
//   wait   wait (up to 20 s) for the gateway to end the session
//   ws URL try a WebSocket from a page of another origin (URL: the console's terminal
//          socket) and report whether it opened
//
//   node terminal.mjs SIGNIN_URL INSTANCE SCREENSHOT.png
//
// stdout: JSON lines. {"ready": {...}} once the command's output was seen (the test then
// writes its line), and {"done": {...}} at the end. TLS errors are ignored: the console's
// certificate is from the gateway's own CA (the tests check the chain separately).

import { collectErrors, deadline, fail, launch, screen } from './lib.mjs';
import { createInterface } from 'node:readline';

const [url, instance, screenshot] = process.argv.slice(2);
if (!url || !instance || !screenshot) {
  process.stderr.write('usage: node terminal.mjs SIGNIN_URL INSTANCE SCREENSHOT.png\n');
  process.exit(2);
}
const TIMEOUT_MS = 60_000;
const timer = deadline('terminal', TIMEOUT_MS);
const say = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

let page;
const violations = [];
const browser = await launch(TIMEOUT_MS);
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1100, height: 640 } });
  page = await context.newPage();
  page.setDefaultTimeout(20_000);
  collectErrors(page, violations);
  await page.goto(url);
  // From the instances page, as a person would.
  const row = page.locator('#instances tr', { hasText: instance });
  await row.locator('a.open').first().click();
  await page.waitForURL(/\/terminal\?/);
  await page.waitForFunction(() => document.getElementById('state').textContent.includes('recorded'));
  const waitFor = async (re) => {
    const until = Date.now() + 20_000;
    for (;;) {
      const s = await screen(page);
      if (re.test(s)) return s;
      if (Date.now() > until) throw new Error(`not on the screen: ${re}\n${s}`);
      await page.waitForTimeout(25);
    }
  };
  await page.locator('#terminal').click();
  await page.keyboard.type('echo $((6*7))');
  await page.keyboard.press('Enter');
  const echoed = await waitFor(/^42$/m);
  // Resize the window: the terminal refits and tells the shell.
  const before = await page.evaluate(() => [window.posternTerminal.cols, window.posternTerminal.rows]);
  await page.setViewportSize({ width: 800, height: 480 });
  await page.waitForFunction((b) => window.posternTerminal.cols !== b[0], before);
  const after = await page.evaluate(() => [window.posternTerminal.cols, window.posternTerminal.rows]);
  await page.keyboard.type('stty size');
  await page.keyboard.press('Enter');
  const sized = await waitFor(new RegExp(`^${after[1]} ${after[0]}$`, 'm'));
  // UTF-8 both ways.
  await page.keyboard.type('echo "grüße ✓"');
  await page.keyboard.press('Enter');
  await waitFor(/^grüße ✓$/m);
  // A paste, as the browser delivers one to the terminal (headless Chromium does not turn
  // Ctrl+V into a paste event, so the event is dispatched as the browser would).
  await page.evaluate(() => {
    const data = new DataTransfer();
    data.setData('text/plain', 'echo pasted-$((2+3))');
    const target = document.querySelector('#terminal textarea');
    target.dispatchEvent(new ClipboardEvent('paste', { clipboardData: data, bubbles: true, cancelable: true }));
  });
  await page.keyboard.press('Enter');
  const pasted = await waitFor(/^pasted-5$/m);
  await page.setViewportSize({ width: 1100, height: 640 });
  await page.waitForFunction((b) => window.posternTerminal.cols === b[0], before);
  await page.screenshot({ path: screenshot });
  say({
    ready: {
      session: await page.locator('#session').innerText(),
      before,
      after,
      echoed: echoed.includes('42'),
      sized: sized.includes(`${after[1]} ${after[0]}`),
      pasted: /^pasted-5$/m.test(pasted),
      violations,
    },
  });
  const { value: command = '' } = await lines.next();
  const started = Date.now();
  if (command === 'exit') {
    await page.keyboard.type('exit');
    await page.keyboard.press('Enter');
  }
  if (command.startsWith('ws ')) {
    // A page on another origin (about:blank is an opaque origin) tries the socket.
    const other = await context.newPage();
    const opened = await other.evaluate((u) => new Promise((resolve) => {
      const ws = new WebSocket(u);
      ws.onopen = () => resolve('opened');
      ws.onerror = () => resolve('refused');
    }), command.slice(3));
    say({ done: { cross_origin: opened } });
  } else {
    await page.waitForSelector('#ended.shown', { timeout: 20_000 });
    say({
      done: {
        ended: await page.locator('#ended').innerText(),
        state: await page.locator('#state').innerText(),
        ms: Date.now() - started,
        screen: await screen(page),
      },
    });
  }
} catch (err) {
  await fail('terminal', err, browser, page, violations);
}
await browser.close();
clearTimeout(timer);
