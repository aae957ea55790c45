// The browser part of a device authorization grant (RFC 8628), over plain HTTP: what a
// user does on their phone after `postern login` prints a code. Opens
// VERIFICATION_URI_COMPLETE, submits the provider's forms as a browser would (the
// auto-submitted user-code form, the confirmation with its xsrf field, the login form of
// provider.mjs) with a small cookie jar, and expects the provider's success page.
//
//   node device.mjs VERIFICATION_URI_COMPLETE LOGIN PASSWORD [OTP]
//
// Exit 0 when the success page (element id "device-success") is reached; exit 1 with a
// message on stderr otherwise (wrong password, unknown or used code, an error page, 30 s).

const [start, login, password, otp] = process.argv.slice(2);
if (!start || login === undefined || password === undefined) {
  process.stderr.write('usage: node device.mjs VERIFICATION_URI_COMPLETE LOGIN PASSWORD [OTP]\n');
  process.exit(2);
}
const TIMEOUT_MS = 30_000;
const MAX_STEPS = 20;
const deadline = AbortSignal.timeout(TIMEOUT_MS);

function fail(message) {
  process.stderr.write(`device login failed: ${message}\n`);
  process.exit(1);
}

// Cookies by name and path; the provider sets host-only cookies on one origin.
const jar = new Map();
function remember(res) {
  for (const line of res.headers.getSetCookie()) {
    const [pair, ...attrs] = line.split(';').map((s) => s.trim());
    const eq = pair.indexOf('=');
    if (eq < 1) continue;
    const name = pair.slice(0, eq);
    const value = pair.slice(eq + 1);
    let path = '/';
    let expired = value === '';
    for (const attr of attrs) {
      const [k, v = ''] = attr.split('=');
      if (k.toLowerCase() === 'path' && v) path = v;
      if (k.toLowerCase() === 'expires' && Date.parse(v) <= Date.now()) expired = true;
      if (k.toLowerCase() === 'max-age' && Number(v) <= 0) expired = true;
    }
    const key = `${name};${path}`;
    if (expired) jar.delete(key);
    else jar.set(key, { name, value, path });
  }
}
function cookieHeader(url) {
  const { pathname } = new URL(url);
  return [...jar.values()]
    .filter((c) => pathname === c.path || pathname.startsWith(c.path.endsWith('/') ? c.path : `${c.path}/`))
    .map((c) => `${c.name}=${c.value}`)
    .join('; ');
}

function decodeEntities(s) {
  return s.replace(/&(#x[0-9a-f]+|#[0-9]+|amp|lt|gt|quot|#39|apos);/gi, (m, e) => {
    const lower = e.toLowerCase();
    if (lower.startsWith('#x')) return String.fromCodePoint(parseInt(lower.slice(2), 16));
    if (lower.startsWith('#')) return String.fromCodePoint(parseInt(lower.slice(1), 10));
    return { amp: '&', lt: '<', gt: '>', quot: '"', apos: "'" }[lower] ?? m;
  });
}
function attributes(tag) {
  const attrs = {};
  for (const m of tag.matchAll(/([a-zA-Z_:][-a-zA-Z0-9_:.]*)\s*(?:=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+)))?/g)) {
    attrs[m[1].toLowerCase()] = decodeEntities(m[2] ?? m[3] ?? m[4] ?? '');
  }
  return attrs;
}
// The first form of a page: its action, method and named inputs (with their values).
function firstForm(html, base) {
  const open = html.match(/<form\b([^>]*)>/i);
  if (!open) return undefined;
  const end = html.indexOf('</form>', open.index);
  const body = html.slice(open.index, end < 0 ? undefined : end);
  const attrs = attributes(open[1]);
  const fields = new URLSearchParams();
  for (const input of body.matchAll(/<input\b([^>]*)>/gi)) {
    const a = attributes(input[1]);
    if (a.name) fields.append(a.name, a.value ?? '');
  }
  return { action: new URL(attrs.action ?? '', base).href, method: (attrs.method ?? 'get').toUpperCase(), fields };
}

async function request(url, init = {}) {
  const headers = { ...init.headers };
  const cookies = cookieHeader(url);
  if (cookies) headers.cookie = cookies;
  const res = await fetch(url, { ...init, headers, redirect: 'manual', signal: deadline });
  remember(res);
  return res;
}

// Follows redirects, returns the final page's URL and HTML.
async function load(url, init) {
  let res = await request(url, init);
  for (let i = 0; [301, 302, 303, 307, 308].includes(res.status); i += 1) {
    if (i >= MAX_STEPS) fail(`too many redirects from ${url}`);
    url = new URL(res.headers.get('location'), url).href;
    res = await request(url);
  }
  return { url, status: res.status, html: await res.text() };
}

function text(html) {
  return html.replace(/<(script|style)\b[\s\S]*?<\/\1>/gi, '').replace(/<[^>]+>/g, ' ').replace(/\s+/g, ' ').trim();
}

try {
  let page = await load(start);
  for (let step = 0; ; step += 1) {
    if (step >= MAX_STEPS) fail(`no success page after ${MAX_STEPS} forms (at ${page.url})`);
    if (page.html.includes('id="device-success"')) {
      process.stdout.write(`${text(page.html)}\n`);
      process.exit(0);
    }
    for (const marker of ['login-error', 'device-error', 'oidc-error', 'interaction-error']) {
      if (page.html.includes(`id="${marker}"`)) fail(`the provider said (${page.url}, HTTP ${page.status}): ${text(page.html)}`);
    }
    const form = firstForm(page.html, page.url);
    if (!form) fail(`unexpected page at ${page.url} (HTTP ${page.status}): ${text(page.html).slice(0, 500)}`);
    if (form.fields.has('password')) {
      form.fields.set('login', login);
      form.fields.set('password', password);
      form.fields.set('otp', otp ?? '');
    }
    page = form.method === 'POST'
      ? await load(form.action, {
        method: 'POST',
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
        body: form.fields.toString(),
      })
      : await load(`${form.action.split('?')[0]}?${form.fields}`);
  }
} catch (err) {
  fail(err.name === 'TimeoutError' || err.name === 'AbortError' ? `no result within ${TIMEOUT_MS / 1000} s` : err.message);
}
