// The test suite's company IdP: a real, certified OpenID Provider (the npm `oidc-provider`) with
// our own minimal login page and test-only admin endpoints.
//
//   node tests/idp/server.mjs --port P --issuer http://127.0.0.1:P --config idp.json
//
// prints `IDP_READY <issuer>` on stdout once it listens. `--port 0` (with no --issuer) picks a free
// port and derives the issuer from it. The JSON config file holds:
//
//   clients   oidc-provider client metadata (client_id, client_secret, redirect_uris,
//             token_endpoint_auth_method, jwks for private_key_jwt, backchannel_logout_uri, ...)
//   accounts  {accountId: {email, email_verified, groups: [...], password, ...more claims}}
//   optional: jwks (private JWK set to reuse across restarts), ttl (seconds per artifact),
//             claims (extra scope -> claim names), rotate_refresh_tokens (default true)
//
// Test-only control endpoints (JSON, loopback callers only) let a test play the IdP's admin:
//   POST /_test/accounts/:id/disable   refresh and login then fail; its grants and sessions go
//   POST /_test/accounts/:id/enable
//   POST /_test/accounts/:id/groups    {"groups": [...]}: what the next refresh / userinfo says
//   POST /_test/accounts/:id/logout    real OIDC Back-Channel Logout to every RP of its sessions
//   GET  /_test/health

import { AsyncLocalStorage } from 'node:async_hooks';
import * as crypto from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    host: { type: 'string', default: '127.0.0.1' },
    issuer: { type: 'string' },
    config: { type: 'string' },
  },
});
if (!args.config) {
  console.error('usage: server.mjs --port P --issuer URL --config FILE');
  process.exit(2);
}
const config = JSON.parse(readFileSync(args.config, 'utf8'));

// Listen first, so that `--port 0` can name the issuer after the port it got.
const server = createServer();
await new Promise((resolve, reject) => {
  server.once('error', reject);
  server.listen(Number(args.port), args.host, resolve);
});
const issuer = args.issuer ?? `http://${args.host}:${server.address().port}`;

// --- Accounts ---------------------------------------------------------------------------------
// The account store is a plain in-memory map the control endpoints edit. Everything in an
// account except `password` and `disabled` is released as claims (filtered by granted scopes).

const accounts = new Map(Object.entries(config.accounts ?? {}));

function accountClaims(accountId) {
  const { password, disabled, ...claims } = accounts.get(accountId);
  return { ...claims, sub: accountId };
}

// Login accepts the account id or its email (case-insensitive).
function findLogin(login) {
  const wanted = String(login ?? '').trim().toLowerCase();
  for (const [id, account] of accounts) {
    if (id.toLowerCase() === wanted || String(account.email ?? '').toLowerCase() === wanted) {
      return id;
    }
  }
  return undefined;
}

// oidc-provider asks for the account on every login, token exchange, refresh and userinfo call.
// A disabled (or unknown) account yields undefined, which the provider turns into invalid_grant.
async function findAccount(_ctx, id) {
  const account = accounts.get(id);
  if (!account || account.disabled) return undefined;
  return {
    accountId: id,
    async claims() {
      return accountClaims(id);
    },
  };
}

// --- Signing keys -----------------------------------------------------------------------------
// RS256 first (the default for ID and logout tokens), ES256 for clients that ask for it. Fresh
// per process unless the config supplies a private JWK set.

function generateJwks() {
  const rsa = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;
  const ec = crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey;
  return {
    keys: [
      { ...rsa.export({ format: 'jwk' }), kid: `rs-${crypto.randomUUID()}`, alg: 'RS256', use: 'sig' },
      { ...ec.export({ format: 'jwk' }), kid: `es-${crypto.randomUUID()}`, alg: 'ES256', use: 'sig' },
    ],
  };
}

// --- Back-channel logout plumbing -------------------------------------------------------------
// oidc-provider POSTs logout tokens through `configuration.fetch`. Two things to know:
//  * its default dispatcher refuses special-use addresses (SSRF guard), 127.0.0.0/8 included, so
//    a loopback RP would never be reached: drop that dispatcher, this IdP only ever talks to tests;
//  * client.backchannelLogout() does not return the RP's status, so record it per call here.

const fetchRecord = new AsyncLocalStorage();

async function loopbackFetch(url, options) {
  delete options.dispatcher;
  const response = await fetch(url, options);
  const record = fetchRecord.getStore();
  if (record) record.status = response.status;
  return response;
}

// --- The provider -----------------------------------------------------------------------------

const ttl = {
  AccessToken: 600,
  AuthorizationCode: 60,
  IdToken: 600,
  RefreshToken: 86400,
  Interaction: 600,
  Session: 86400,
  Grant: 86400,
  ...config.ttl,
};

const provider = new Provider(issuer, {
  clients: config.clients ?? [],
  findAccount,
  jwks: config.jwks ?? generateJwks(),
  fetch: loopbackFetch,
  cookies: {
    keys: [crypto.randomBytes(32).toString('hex')],
    // Cookies ignore ports: keep clear of the gateway's cookie names on the same 127.0.0.1.
    names: { session: '_idp_session', interaction: '_idp_interaction', resume: '_idp_interaction_resume' },
  },
  claims: {
    openid: ['sub'],
    email: ['email', 'email_verified'],
    groups: ['groups'],
    profile: ['name', 'preferred_username', 'groups'],
    ...config.claims,
  },
  // Put the scope-granted claims (email, email_verified, groups) in the ID token itself, not only
  // behind userinfo as the spec's default split would.
  conformIdTokenClaims: false,
  responseTypes: ['code'],
  pkce: { required: () => true }, // S256 is the only method oidc-provider 9 knows
  // By default refresh tokens need the offline_access scope, and oidc-provider drops that scope
  // from any authorization request without prompt=consent (OIDC Core 11). Like most company IdPs,
  // issue one whenever the client may use the refresh_token grant, and let tokens outlive the IdP's
  // browser session (logout and disable below revoke them explicitly).
  issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token'),
  expiresWithSession: async () => false,
  // Rotate on every use (a reused refresh token then revokes the whole grant), unless told not to.
  rotateRefreshToken: config.rotate_refresh_tokens ?? true,
  ttl,
  features: {
    devInteractions: { enabled: false }, // our own pages below
    backchannelLogout: { enabled: true },
    revocation: { enabled: true },
    userinfo: { enabled: true },
    rpInitiatedLogout: { enabled: true },
  },
  interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
  renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = `<!DOCTYPE html><title>IdP error</title><h1>${escapeHtml(out.error)}</h1>`
      + `<p id="error">${escapeHtml(out.error_description ?? '')}</p>`;
  },
});

provider.on('server_error', (_ctx, err) => console.error('idp server_error', err));
provider.on('backchannel.error', (_ctx, err, client) => console.error('idp backchannel.error', client.clientId, err.message));

// Which sessions and grants belong to which account: the memory adapter has no index by account.
const sessionUids = new Map(); // accountId -> Set(session uid)
const grantIds = new Map(); // accountId -> Set(grant id)

function remember(index, accountId, value) {
  if (!accountId) return;
  if (!index.has(accountId)) index.set(accountId, new Set());
  index.get(accountId).add(value);
}

provider.on('session.saved', (session) => remember(sessionUids, session.accountId, session.uid));
provider.on('grant.saved', (grant) => remember(grantIds, grant.accountId, grant.jti));

// What end_session does to a grant: every token and code minted from it, then the grant itself.
async function revokeGrant(grantId) {
  await Promise.all([
    provider.AccessToken.revokeByGrantId(grantId),
    provider.RefreshToken.revokeByGrantId(grantId),
    provider.AuthorizationCode.revokeByGrantId(grantId),
    provider.Grant.adapter.destroy(grantId),
  ]);
}

async function liveSessions(accountId) {
  const sessions = [];
  for (const uid of sessionUids.get(accountId) ?? []) {
    const session = await provider.Session.findByUid(uid);
    if (session && session.accountId === accountId) sessions.push(session);
  }
  return sessions;
}

async function disableAccount(accountId) {
  accounts.get(accountId).disabled = true;
  for (const grantId of grantIds.get(accountId) ?? []) await revokeGrant(grantId);
  grantIds.delete(accountId);
  for (const session of await liveSessions(accountId)) await session.destroy();
  sessionUids.delete(accountId);
}

// OIDC Back-Channel Logout 1.0 for every session of the account, through oidc-provider's own
// client.backchannelLogout(sub, sid) (it signs the logout token with the provider's keys), then
// end the sessions the way RP-initiated logout does: revoke their grants, destroy them.
async function backchannelLogout(accountId) {
  const results = [];
  for (const session of await liveSessions(accountId)) {
    for (const [clientId, authorization] of Object.entries(session.authorizations ?? {})) {
      const client = await provider.Client.find(clientId);
      if (client?.backchannelLogoutUri) {
        const record = { client_id: clientId, sid: authorization.sid, status: 0 };
        await fetchRecord.run(record, async () => {
          try {
            await client.backchannelLogout(accountId, authorization.sid);
          } catch (err) {
            record.error = err.message;
          }
        });
        results.push(record);
      }
      if (authorization.grantId) await revokeGrant(authorization.grantId);
    }
    await session.destroy();
  }
  sessionUids.delete(accountId);
  return results;
}

// --- Pages and control endpoints (Koa middleware in front of the provider's routes) -----------

function escapeHtml(value) {
  return String(value).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}

function loginPage(uid, clientId, login, error) {
  return `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Test IdP sign-in</title></head>
<body>
  <h1>Sign in</h1>
  <p>to continue to <span id="client">${escapeHtml(clientId)}</span></p>
  ${error ? `<p id="error" role="alert">${escapeHtml(error)}</p>` : ''}
  <form method="post" action="/interaction/${escapeHtml(uid)}/login" autocomplete="off">
    <label>Username <input name="login" value="${escapeHtml(login ?? '')}" autofocus></label>
    <label>Password <input name="password" type="password"></label>
    <button id="submit" type="submit">Sign in</button>
  </form>
  <form method="post" action="/interaction/${escapeHtml(uid)}/abort">
    <button id="cancel" type="submit">Cancel</button>
  </form>
</body></html>`;
}

// Finish an interaction the Koa way: interactionResult is what interactionFinished wraps.
async function finish(ctx, result, options) {
  const returnTo = await provider.interactionResult(ctx.req, ctx.res, result, options);
  ctx.redirect(returnTo);
  ctx.status = 303;
}

// Consent is granted automatically: every requested OIDC scope (offline_access included), claim
// and resource scope.
async function grantConsent(ctx, details) {
  const { prompt, params, session } = details;
  const grant = details.grantId
    ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  const missing = prompt.details;
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
    grant.addResourceScope(indicator, scopes.join(' '));
  }
  const grantId = await grant.save();
  await finish(ctx, { consent: details.grantId ? {} : { grantId } }, { mergeWithLastSubmission: true });
}

async function interactions(ctx, next) {
  const match = ctx.path.match(/^\/interaction\/([^/]+)(?:\/(login|abort))?$/);
  if (!match) return next();
  ctx.set('cache-control', 'no-store');
  const [, uid, action] = match;
  const details = await provider.interactionDetails(ctx.req, ctx.res);
  if (details.uid !== uid) ctx.throw(400, 'interaction mismatch');

  if (ctx.method === 'GET' && !action) {
    if (details.prompt.name === 'consent') return grantConsent(ctx, details);
    ctx.type = 'html';
    ctx.body = loginPage(uid, details.params.client_id, details.params.login_hint);
    return undefined;
  }
  if (ctx.method === 'POST' && action === 'abort') {
    return finish(ctx, { error: 'access_denied', error_description: 'End-User aborted interaction' },
      { mergeWithLastSubmission: false });
  }
  if (ctx.method === 'POST' && action === 'login') {
    const form = new URLSearchParams(await readBody(ctx.req));
    const accountId = findLogin(form.get('login'));
    const account = accountId && accounts.get(accountId);
    let error;
    if (!account || account.password !== form.get('password')) error = 'Invalid username or password.';
    else if (account.disabled) error = 'This account is disabled.';
    if (error) {
      ctx.status = 401;
      ctx.type = 'html';
      ctx.body = loginPage(uid, details.params.client_id, form.get('login'), error);
      return undefined;
    }
    return finish(ctx, { login: { accountId } }, { mergeWithLastSubmission: false });
  }
  return ctx.throw(405);
}

const LOOPBACK = new Set(['127.0.0.1', '::1', '::ffff:127.0.0.1']);

async function control(ctx, next) {
  if (!ctx.path.startsWith('/_test/')) return next();
  if (!LOOPBACK.has(ctx.req.socket.remoteAddress)) ctx.throw(403, 'loopback only');
  ctx.set('cache-control', 'no-store');

  if (ctx.method === 'GET' && ctx.path === '/_test/health') {
    ctx.body = { ok: true, issuer: provider.issuer };
    return undefined;
  }
  const match = ctx.path.match(/^\/_test\/accounts\/([^/]+)\/(disable|enable|groups|logout)$/);
  if (!match || ctx.method !== 'POST') {
    ctx.status = 404;
    ctx.body = { error: 'not_found' };
    return undefined;
  }
  const accountId = decodeURIComponent(match[1]);
  if (!accounts.has(accountId)) {
    ctx.status = 404;
    ctx.body = { error: 'unknown_account', account: accountId };
    return undefined;
  }
  const account = accounts.get(accountId);
  switch (match[2]) {
    case 'disable':
      await disableAccount(accountId);
      break;
    case 'enable':
      account.disabled = false;
      break;
    case 'groups': {
      const body = JSON.parse((await readBody(ctx.req)) || '{}');
      if (!Array.isArray(body.groups)) ctx.throw(400, 'groups must be an array');
      account.groups = body.groups;
      break;
    }
    case 'logout': {
      const results = await backchannelLogout(accountId);
      ctx.body = { account: accountId, statuses: results.map((r) => r.status), results };
      return undefined;
    }
    default:
  }
  const { password, ...shown } = account;
  ctx.body = { account: accountId, ...shown, disabled: Boolean(account.disabled) };
  return undefined;
}

// oidc-provider follows OIDC Core 11 to the letter: it drops offline_access from an authorization
// request whose prompt lacks `consent`, and then refuses a refresh that asks for the original scope
// back (authlib sends the client's scope on refresh by default) with invalid_scope. Company IdPs
// (Okta, Entra ID, Keycloak) grant offline_access without it, so do what they do: add `consent` to
// the prompt of such a request; our consent step is automatic, so nobody sees a difference.
async function keepOfflineAccess(ctx, next) {
  if (ctx.method === 'GET' && ctx.path === provider.pathFor('authorization')) {
    const { scope, prompt } = ctx.query;
    const prompts = new Set(String(prompt ?? '').split(' ').filter(Boolean));
    if (String(scope ?? '').split(' ').includes('offline_access') && !prompts.has('consent') && !prompts.has('none')) {
      prompts.add('consent');
      ctx.query = { ...ctx.query, prompt: [...prompts].join(' ') };
    }
  }
  return next();
}

provider.use(control);
provider.use(keepOfflineAccess);
provider.use(interactions);

// --- Serve ------------------------------------------------------------------------------------

server.on('request', provider.callback());
console.log(`IDP_READY ${provider.issuer}`);

for (const signal of ['SIGINT', 'SIGTERM']) process.on(signal, () => process.exit(0));
