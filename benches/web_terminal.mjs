// Timing and load for the web console's terminal (benches/web-terminal.sh), in headless
// Chromium (Debian's /usr/bin/chromium through playwright-core from tests/oidc).
//
//   node web_terminal.mjs echo SIGNIN_URL INSTANCE N
//     Sign in with the one-time link, open /terminal?instance=INSTANCE, make the shell echo
//     every byte (`stty raw -echo; exec cat`, as ssh_bench.py's echo does), then N times
//     press one key and time it from the page's keydown to the character in the xterm.js
//     buffer, then Enter (cat echoes the CR: the cursor returns to column 0). Prints one
//     JSON line: the times in ms from keydown to the key sent, its echo arrived, parsed
//     into the buffer and drawn, and as Playwright saw it.
//
//     Then the same N keys handed to xterm.js by script (term.input), without a browser
//     input event.
//
//   node web_terminal.mjs wsecho SIGNIN_URL INSTANCE N
//     The same echo from Node's own WebSocket client (node --experimental-websocket; the
//     gateway's CA in NODE_EXTRA_CA_CERTS): the gateway's part, without a browser.
//
//   node web_terminal.mjs load SIGNIN_URL INSTANCE CLIENTS SECONDS GATEWAY_PID CLK_TCK AGENT_PID
//     Sign in, then from one page of the console open CLIENTS terminal WebSockets at once
//     (the browser sends the console's Origin and cookie, as for a person's terminal); each
//     waits for `started`, then every second for SECONDS sends `echo k''<id>x<n>\r` and
//     times its output `k<id>x<n>` (the quotes keep the echoed command line from matching);
//     then `exit`, waiting for `ended`. Meanwhile the gateway's RSS (VmRSS) and CPU time
//     (utime + stime), the agent's CPU time (not its shells') and the machine's busy time
//     are read from /proc. Prints one JSON line.
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';

const require = createRequire(new URL('../tests/oidc/package.json', import.meta.url));
const { chromium } = require('playwright-core');

const [mode, url, instance, ...rest] = process.argv.slice(2);
if (!['echo', 'load', 'wsecho'].includes(mode) || !url || !instance) {
  process.stderr.write('usage: node web_terminal.mjs echo|wsecho|load SIGNIN_URL INSTANCE ...\n');
  process.exit(2);
}
const say = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const percentile = (xs, p) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.min(s.length - 1, Math.max(0, Math.ceil(s.length * p) - 1))] : null;
};
const summary = (xs) => ({ n: xs.length, median: percentile(xs, 0.5), p90: percentile(xs, 0.9), p99: percentile(xs, 0.99), max: percentile(xs, 1) });

if (mode === 'wsecho') {
  say(await wsEcho(Number(rest[0] || 200)));
  process.exit(0);
}
const browser = await chromium.launch({
  executablePath: process.env.POSTERN_TEST_CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run', '--disable-extensions'],
  timeout: 60_000,
});
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1100, height: 640 } });
  const page = await context.newPage();
  page.setDefaultTimeout(30_000);
  await page.goto(url); // signs in (cookie) and lands on the instances page
  if (!new URL(page.url()).pathname.endsWith('/')) throw new Error(`sign-in landed on ${page.url()}`);
  const origin = new URL(page.url()).origin;
  if (mode === 'echo') say(await echo(page, origin, Number(rest[0] || 200)));
  else say(await load(page, Number(rest[0] || 100), Number(rest[1] || 30), Number(rest[2]), Number(rest[3] || 100), Number(rest[4])));
} catch (err) {
  process.stderr.write(`web_terminal: ${err.stack || err}\n`);
  await browser.close();
  process.exit(1);
}
await browser.close();

async function echo(page, origin, n) {
  await page.goto(`${origin}/terminal?instance=${encodeURIComponent(instance)}`);
  await page.waitForFunction(() => document.getElementById('state').textContent.includes('recorded'));
  await page.locator('#terminal').click();
  const screenHas = (re) =>
    page.waitForFunction((src) => {
      const b = window.posternTerminal.buffer.active;
      const lines = [];
      for (let i = 0; i < b.length; i++) lines.push(b.getLine(i).translateToString(true));
      return new RegExp(src, 'm').test(lines.join('\n'));
    }, re.source, { polling: 10 });
  await page.keyboard.type('stty raw -echo; echo READY; exec cat');
  await page.keyboard.press('Enter');
  await screenHas(/^READY\s*$/);
  // Raw mode prints READY's newline without a carriage return: one Enter (echoed CR) puts
  // the cursor at column 0, where every measured key then lands.
  const home = async () => {
    await page.keyboard.press('Enter');
    await page.waitForFunction(() => window.posternTerminal.buffer.active.cursorX === 0, null, { polling: 'raf' });
  };
  await home();
  await page.evaluate(() => {
    // Times of one key's way, from the page's keydown: xterm.js hands it to the page's
    // script (onData, which sends it), the echo arrives (the page's script calls
    // term.write: this wrapper), xterm.js has parsed it into the buffer (write's
    // callback), and has drawn it (onRender, on the next animation frame).
    const term = window.posternTerminal;
    const write = term.write.bind(term);
    let probe = null;
    term.write = (data, cb) => {
      const p = probe;
      if (p && p.sent !== undefined && p.arrived === undefined && data.includes(p.code)) p.arrived = performance.now();
      write(data, () => {
        if (p && p.arrived !== undefined && p.parsed === undefined) {
          const b = term.buffer.active;
          const line = b.getLine(b.baseY + b.cursorY);
          if (b.cursorX === 1 && line && line.getCell(0).getChars() === p.c) p.parsed = performance.now();
        }
        if (cb) cb();
      });
    };
    term.onData((d) => {
      if (probe && probe.down !== undefined && probe.sent === undefined && d === probe.c) probe.sent = performance.now();
    });
    term.onRender(() => {
      if (probe && probe.parsed !== undefined && probe.rendered === undefined) {
        probe.rendered = performance.now();
        probe.done();
      }
    });
    window.addEventListener('keydown', () => {
      if (probe && probe.down === undefined) probe.down = performance.now();
    }, { capture: true });
    window.benchArm = (c) => {
      window.benchTimed = new Promise((resolve) => {
        probe = { c, code: c.charCodeAt(0) };
        const p = probe;
        const timer = setTimeout(() => p.done(), 10_000);
        p.done = () => {
          clearTimeout(timer);
          probe = null;
          const since = (t) => (t === undefined || p.down === undefined ? null : t - p.down);
          resolve({ sent: since(p.sent), arrived: since(p.arrived), parsed: since(p.parsed), rendered: since(p.rendered) });
        };
      });
    };
  });
  const times = { sent: [], arrived: [], parsed: [], rendered: [], playwright: [] };
  for (let i = 0; i < n; i++) {
    const c = String.fromCharCode(97 + (i % 26));
    await page.evaluate((ch) => window.benchArm(ch), c);
    const t = performance.now();
    await page.keyboard.press(c);
    const r = await page.evaluate(() => window.benchTimed);
    times.playwright.push(performance.now() - t);
    for (const k of ['sent', 'arrived', 'parsed', 'rendered']) {
      if (r[k] === null) throw new Error(`key ${i} (${c}): no time for "${k}": ${JSON.stringify(r)}`);
      times[k].push(r[k]);
    }
    await home();
  }
  // The same keys handed to xterm.js by the page's script (term.input: what a key press
  // becomes, without the browser's input event).
  const injected = { arrived: [], parsed: [], rendered: [] };
  for (let i = 0; i < n; i++) {
    const c = String.fromCharCode(97 + (i % 26));
    await page.evaluate((ch) => window.benchArm(ch), c);
    const r = await page.evaluate((ch) => {
      window.dispatchEvent(new KeyboardEvent('keydown')); // starts the clock
      window.posternTerminal.input(ch, true);
      return window.benchTimed;
    }, c);
    for (const k of Object.keys(injected)) {
      if (r[k] === null) throw new Error(`injected key ${i} (${c}): no time for "${k}": ${JSON.stringify(r)}`);
      injected[k].push(r[k]);
    }
    await home();
  }
  const sum = (o) => Object.fromEntries(Object.entries(o).map(([k, v]) => [k, summary(v)]));
  return { echo: sum(times), injected: sum(injected) };
}

async function load(page, clients, seconds, gatewayPid, clkTck, agentPid) {
  const ticksOf = () => {
    // /proc/PID/stat: fields after the command name; utime and stime are fields 14 and 15.
    const s = readFileSync(`/proc/${gatewayPid}/stat`, 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    return Number(f[11]) + Number(f[12]);
  };
  const agentTicks = () => {
    const s = readFileSync(`/proc/${agentPid}/stat`, 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    return Number(f[11]) + Number(f[12]);
  };
  // The whole machine (all cores): busy and total clock ticks from /proc/stat.
  const machine = () => {
    const f = readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
    const total = f.slice(0, 8).reduce((a, b) => a + b, 0);
    return { busy: total - f[3] - f[4], total };
  };
  const rssKiB = () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${gatewayPid}/status`, 'utf8'))[1]);
  const marks = {};
  const mark = (name) => { marks[name] = { at: Date.now(), ticks: ticksOf(), agent: agentTicks(), machine: machine(), rss: rssKiB() }; };
  let peak = 0;
  const sampler = setInterval(() => { peak = Math.max(peak, rssKiB()); }, 250);
  await page.exposeFunction('benchMark', mark);
  mark('before');
  peak = marks.before.rss;
  const r = await page.evaluate(async ({ instance, clients, seconds }) => {
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    const failures = [];
    const opened = [];
    const ready = [];
    const ticks = [];
    let ticksSent = 0;
    const q = (cols, rows) => new URLSearchParams({ instance, cols, rows });
    // A terminal, resolved once its shell answers (null if it never does).
    const open = (id) =>
      new Promise((resolve) => {
        const t0 = performance.now();
        const ws = new WebSocket(`wss://${location.host}/ws/terminal?${q(80, 24)}`);
        ws.binaryType = 'arraybuffer';
        const dec = new TextDecoder();
        const c = { id, ws, out: '', pending: new Map(), started: false, ready: false, ended: null, onEnded: null };
        let settled = false;
        const fail = (why) => {
          if (settled) return;
          settled = true;
          failures.push(`terminal ${id}: ${why}`);
          resolve(null);
        };
        ws.onmessage = (e) => {
          if (typeof e.data !== 'string') {
            c.out = (c.out + dec.decode(e.data, { stream: true })).slice(-8192);
            for (const [marker, t] of c.pending) {
              if (!c.out.includes(marker + '\r\n')) continue;
              c.pending.delete(marker);
              if (t >= 0) {
                ticks.push(performance.now() - t);
              } else if (!settled) {
                settled = c.ready = true;
                ready.push(performance.now() - t0);
                resolve(c);
              }
            }
            return;
          }
          const m = JSON.parse(e.data);
          if (m.started) {
            // Usable once a first command answers: typed before the shell's first prompt,
            // a command waits for the shell to start.
            c.started = true;
            opened.push(performance.now() - t0);
            c.pending.set(`k${id}r`, -1);
            ws.send(new TextEncoder().encode(`echo k''${id}r\r`));
          } else if (m.refused) {
            fail(`refused: ${m.refused}`);
          } else if (m.ended) {
            c.ended = m.ended;
            if (c.onEnded) c.onEnded();
          }
        };
        ws.onclose = (e) => {
          if (!c.ready) fail(`closed before its shell answered (code ${e.code})`);
          else if (!c.ended) failures.push(`terminal ${id}: closed mid-session (code ${e.code})`);
          if (c.onEnded) c.onEnded();
        };
        setTimeout(() => {
          if (!c.ready) {
            fail('no shell within 60 s');
            ws.close();
          }
        }, 60_000);
      });
    await window.benchMark('opening');
    const t0 = performance.now();
    const terms = (await Promise.all(Array.from({ length: clients }, (_, i) => open(i)))).filter(Boolean);
    const openAll = performance.now() - t0;
    await window.benchMark('opened');
    // Every terminal: a command a second, started at a random point of the first second.
    const until = performance.now() + seconds * 1000;
    let lost = 0;
    await Promise.all(terms.map(async (c) => {
      await sleep(Math.random() * 1000);
      for (let n = 0; performance.now() < until; n++) {
        if (c.ended || c.ws.readyState !== WebSocket.OPEN) return;
        const marker = `k${c.id}x${n}`;
        c.pending.set(marker, performance.now());
        c.ws.send(new TextEncoder().encode(`echo k''${c.id}x${n}\r`));
        ticksSent++;
        await sleep(1000);
      }
    }));
    await window.benchMark('ticked');
    await sleep(5000); // the last commands' output
    await window.benchMark('loaded');
    for (const c of terms) {
      lost += c.pending.size;
      if (c.pending.size) failures.push(`terminal ${c.id}: ${c.pending.size} commands without output within 5 s`);
    }
    // Orderly ends: `exit`, and the gateway's `ended`.
    const ends = await Promise.all(terms.map((c) => new Promise((resolve) => {
      if (c.ended) return resolve(true);
      c.onEnded = () => resolve(!!c.ended);
      c.ws.send(new TextEncoder().encode('exit\r'));
      setTimeout(() => resolve(false), 20_000);
    })));
    const notEnded = ends.filter((e) => !e).length;
    if (notEnded) failures.push(`${notEnded} terminals did not end within 20 s of exit`);
    for (const c of terms) if (c.ws.readyState === WebSocket.OPEN) c.ws.close();
    return { started: terms.length, openAll, opened, ready, ticks, ticksSent, lost, failures };
  }, { instance, clients, seconds });
  mark('closed');
  clearInterval(sampler);
  const agentCpu = (a, b) => (100 * (marks[b].agent - marks[a].agent)) / clkTck / ((marks[b].at - marks[a].at) / 1000);
  const busy = (a, b) => (100 * (marks[b].machine.busy - marks[a].machine.busy)) / (marks[b].machine.total - marks[a].machine.total);
  const cpu = (a, b) => (100 * (marks[b].ticks - marks[a].ticks)) / clkTck / ((marks[b].at - marks[a].at) / 1000);
  return {
    load: {
      clients,
      seconds,
      started: r.started,
      open_all_ms: r.openAll,
      open_ms: summary(r.opened),
      ready_ms: summary(r.ready),
      ticks_sent: r.ticksSent,
      ticks_lost: r.lost,
      tick_ms: summary(r.ticks),
      failures: r.failures.length,
      first_failures: r.failures.slice(0, 10),
      rss_kib: { before: marks.before.rss, opened: marks.opened.rss, peak, loaded: marks.loaded.rss },
      cpu_percent: { opening: cpu('opening', 'opened'), steady: cpu('opened', 'ticked'), closing: cpu('loaded', 'closed') },
      agent_cpu_percent: { opening: agentCpu('opening', 'opened'), steady: agentCpu('opened', 'ticked') },
      machine_busy_percent: { opening: busy('opening', 'opened'), steady: busy('opened', 'ticked') },
      cpu_seconds: { opening: (marks.opened.ticks - marks.opening.ticks) / clkTck, steady: (marks.ticked.ticks - marks.opened.ticks) / clkTck },
      wall_s: { opening: (marks.opened.at - marks.opening.at) / 1000, steady: (marks.ticked.at - marks.opened.at) / 1000, closing: (marks.closed.at - marks.loaded.at) / 1000 },
    },
  };
}

// The same echo as `echo` mode's, from Node's WebSocket client (no browser): sign in with
// the link (its cookie), then the console's Origin and that cookie on the socket.
async function wsEcho(n) {
  const signin = await fetch(url, { redirect: 'manual' });
  const cookie = (signin.headers.get('set-cookie') || '').split(';')[0];
  if (!cookie.startsWith('postern_session=')) throw new Error(`sign-in gave no cookie (HTTP ${signin.status})`);
  const origin = new URL(url).origin;
  const ws = new WebSocket(`${origin.replace(/^https/, 'wss')}/ws/terminal?instance=${encodeURIComponent(instance)}&cols=80&rows=24`, {
    headers: { Origin: origin, Cookie: cookie },
  });
  ws.binaryType = 'arraybuffer';
  const dec = new TextDecoder();
  let out = '';
  let check = () => {};
  ws.onmessage = (e) => {
    if (typeof e.data !== 'string') {
      out += dec.decode(e.data, { stream: true });
      check();
    }
  };
  const seen = (text) =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`not seen within 20 s: ${text}; got ${JSON.stringify(out.slice(-200))}`)), 20_000);
      check = () => {
        if (out.includes(text)) {
          clearTimeout(timer);
          check = () => {};
          resolve();
        }
      };
      check();
    });
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error('the WebSocket did not open'));
  });
  const enc = new TextEncoder();
  ws.send(enc.encode("stty raw -echo; echo RE''ADY; exec cat\r"));
  await seen('READY');
  const times = [];
  for (let i = 0; i < n; i++) {
    const c = String.fromCharCode(97 + (i % 26));
    out = '';
    const t = performance.now();
    ws.send(enc.encode(c));
    await seen(c);
    times.push(performance.now() - t);
  }
  ws.close();
  return { wsecho: summary(times) };
}
