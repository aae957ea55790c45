// A real, certified OpenID Provider (panva's oidc-provider) for Postern's single sign-on
// end-to-end tests. Nothing here mocks token validation: the tokens are signed by the
// provider's own key and published at its JWKS endpoint like any company IdP's.
//
//   node provider.mjs CONFIG.json
//
// CONFIG.json (written by the Rust helper `OidcProvider` in tests/src/lib.rs):
//   port            listen port on 127.0.0.1 (0: pick one)
//   issuer          the issuer URL; defaults to http://127.0.0.1:<port>. It may differ from
//                   the listen address when a test proxy (OidcProxy) sits in front.
//   clients         oidc-provider client metadata objects
//   users           name -> {password, email, email_verified, groups, otp?}
//   id_token_ttl    seconds (default 3600)
//
// What the provider does:
// - scopes openid, email, profile, groups; claims sub ("sub-<name>"), preferred_username,
//   email, email_verified, groups — all of them also in the ID token
//   (conformIdTokenClaims: false), because the gateway reads the ID token only;
// - the authorization code flow with PKCE required (S256), and the device flow;
// - its own login page (fields login, password, otp): a right otp makes the login
//   amr ["pwd","otp"] / acr "mfa", otherwise amr ["pwd"] / acr "pwd"; a wrong password
//   shows the form again with an error (element id "login-error");
// - no consent page: the scopes and claims a client asks for are granted;
// - native clients' http://127.0.0.1 redirect URIs match with any port (RFC 8252 7.3).
//
// It prints exactly one line `ready <port>` on stdout once it listens, logs one line per
// request on stderr, and exits 0 on SIGTERM or SIGINT.

import { createServer } from 'node:http';
import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import Provider from 'oidc-provider';

// stdout carries the `ready` line only; oidc-provider's notices go to the log with the rest.
console.log = console.error;
console.info = console.error;

const configPath = process.argv[2];
if (!configPath) {
  process.stderr.write('usage: node provider.mjs CONFIG.json\n');
  process.exit(2);
}
const config = JSON.parse(readFileSync(configPath, 'utf8'));
const users = config.users ?? {};
const MAX_BODY = 64 * 1024;

// Accounts are keyed by their subject ("sub-alice"), logins by name ("alice").
function subjectOf(name) {
  return `sub-${name}`;
}
function userBySubject(sub) {
  for (const [name, user] of Object.entries(users)) {
    if (subjectOf(name) === sub) return { name, user };
  }
  return undefined;
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);
}

function page(title, body) {
  return `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head>
<body><h1>${escapeHtml(title)}</h1>
${body}
</body></html>`;
}

function loginForm(uid, error) {
  const err = error ? `<p id="login-error" class="error">${escapeHtml(error)}</p>` : '';
  return page('Sign in', `${err}
<form id="login-form" method="post" action="/interaction/${escapeHtml(uid)}/login">
<label>Login <input type="text" name="login" autocomplete="username" autofocus></label>
<label>Password <input type="password" name="password" autocomplete="current-password"></label>
<label>One-time code (optional) <input type="text" name="otp" autocomplete="one-time-code"></label>
<button type="submit">Sign in</button>
</form>`);
}

// One signing key per run: tokens from another run do not verify, as with a rotated key.
const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: randomBytes(8).toString('hex'), use: 'sig', alg: 'RS256' };

let port = Number(config.port ?? 0);
const server = createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(port, '127.0.0.1', resolve);
});
port = server.address().port;
const issuer = config.issuer || `http://127.0.0.1:${port}`;

const provider = new Provider(issuer, {
  clients: config.clients ?? [],
  jwks: { keys: [signingKey] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  scopes: ['openid', 'email', 'profile', 'groups', 'offline_access'],
  claims: {
    // acr, amr and auth_time reach the ID token only when a granted scope lists them.
    openid: ['sub', 'acr', 'amr', 'auth_time'],
    email: ['email', 'email_verified'],
    profile: ['preferred_username'],
    groups: ['groups'],
  },
  conformIdTokenClaims: false,
  acrValues: ['pwd', 'mfa'],
  ttl: {
    IdToken: Number(config.id_token_ttl ?? 3600),
    Interaction: 600,
    Session: 3600,
    Grant: 3600,
    DeviceCode: 600,
  },
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: false },
    deviceFlow: {
      enabled: true,
      userCodeInputSource: async (ctx, form, out, err) => {
        const msg = err ? `<p id="device-error" class="error">${escapeHtml(err.message || err.name)}</p>` : '<p>Enter the code shown on your device.</p>';
        ctx.body = page('Device sign-in', `${msg}\n${form}\n<button type="submit" form="op.deviceInputForm">Continue</button>`);
      },
      userCodeConfirmSource: async (ctx, form, client, deviceInfo, userCode) => {
        ctx.body = page('Confirm device', `<p>Client <strong>${escapeHtml(client.clientId)}</strong> shows the code <code>${escapeHtml(userCode)}</code>.</p>
${form}
<button type="submit" form="op.deviceConfirmForm">Continue</button>`);
      },
      successSource: async (ctx) => {
        ctx.body = page('Sign-in success', '<p id="device-success">Your device is signed in; you can close this page.</p>');
      },
    },
  },
  interactions: {
    url: (ctx, interaction) => `/interaction/${interaction.uid}`,
  },
  findAccount: async (ctx, sub) => {
    const found = userBySubject(sub);
    if (!found) return undefined;
    const { name, user } = found;
    return {
      accountId: sub,
      claims: async () => ({
        sub,
        preferred_username: name,
        email: user.email,
        email_verified: user.email_verified ?? true,
        groups: user.groups ?? [],
      }),
    };
  },
  renderError: async (ctx, out) => {
    ctx.type = 'html';
    ctx.body = page('Error', `<pre id="oidc-error">${escapeHtml(JSON.stringify(out, null, 2))}</pre>`);
  },
});
provider.on('server_error', (ctx, err) => process.stderr.write(`server_error: ${err.stack}\n`));
// Why a request was refused (the detail is not in the response), for the test's log.
for (const event of ['authorization.error', 'grant.error', 'device_authorization.error', 'code_verification.error', 'userinfo.error']) {
  provider.on(event, (ctx, err) => process.stderr.write(`${event}: ${err.error}: ${err.error_detail ?? err.error_description ?? err.message}\n`));
}

function readForm(req) {
  return new Promise((resolve, reject) => {
    let size = 0;
    const chunks = [];
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY) {
        reject(new Error('form too large'));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(new URLSearchParams(Buffer.concat(chunks).toString('utf8'))));
    req.on('error', reject);
  });
}

function send(res, status, html) {
  res.statusCode = status;
  res.setHeader('Content-Type', 'text/html; charset=utf-8');
  res.setHeader('Cache-Control', 'no-store');
  res.end(html);
}

async function finishConsent(req, res, details) {
  const { Grant } = provider;
  const grant = (details.grantId && await Grant.find(details.grantId))
    || new Grant({ accountId: details.session.accountId, clientId: details.params.client_id });
  const { missingOIDCScope, missingOIDCClaims, missingResourceScopes } = details.prompt.details;
  if (missingOIDCScope) grant.addOIDCScope(missingOIDCScope.join(' '));
  if (missingOIDCClaims) grant.addOIDCClaims(missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  const grantId = await grant.save();
  await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
}

async function interaction(req, res, path) {
  const [, , uid, action] = path.split('/');
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) {
    send(res, 400, page('Error', '<p>Unknown sign-in request.</p>'));
    return;
  }
  if (req.method === 'GET' && !action && details.prompt.name === 'consent') {
    // oidc-provider always asks native clients for consent (reason native_client_prompt):
    // answer it here, granting what was asked for.
    await finishConsent(req, res, details);
    return;
  }
  if (req.method === 'GET' && !action) {
    send(res, 200, loginForm(uid));
    return;
  }
  if (req.method === 'POST' && action === 'login') {
    const form = await readForm(req);
    const name = form.get('login') ?? '';
    const user = Object.hasOwn(users, name) ? users[name] : undefined;
    if (!user || user.password !== form.get('password')) {
      send(res, 200, loginForm(uid, 'Invalid login or password.'));
      return;
    }
    const otp = form.get('otp');
    const mfa = Boolean(otp) && user.otp !== undefined && otp === String(user.otp);
    await provider.interactionFinished(req, res, {
      login: { accountId: subjectOf(name), amr: mfa ? ['pwd', 'otp'] : ['pwd'], acr: mfa ? 'mfa' : 'pwd' },
    }, { mergeWithLastSubmission: false });
    return;
  }
  send(res, 405, page('Error', '<p>Method not allowed.</p>'));
}

const callback = provider.callback();
server.on('request', (req, res) => {
  const started = Date.now();
  res.on('finish', () => {
    // The path only: queries carry codes and state.
    process.stderr.write(`${req.method} ${req.url.split('?')[0]} -> ${res.statusCode} (${Date.now() - started} ms)\n`);
  });
  const path = req.url.split('?')[0];
  if (path.startsWith('/interaction/')) {
    interaction(req, res, path).catch((err) => {
      process.stderr.write(`interaction error: ${err.message}\n`);
      if (!res.headersSent) send(res, 400, page('Error', `<p id="interaction-error">${escapeHtml(err.message)}</p>`));
      else res.end();
    });
    return;
  }
  callback(req, res);
});

function shutdown(signal) {
  process.stderr.write(`${signal}: stopping\n`);
  server.close(() => process.exit(0));
  server.closeAllConnections();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));

process.stderr.write(`oidc-provider listening on 127.0.0.1:${port}, issuer ${issuer}\n`);
process.stdout.write(`ready ${port}\n`);
