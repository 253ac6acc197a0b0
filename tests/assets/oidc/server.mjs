// An independent OpenID provider for idgate's integration tests: node-oidc-provider with the
// client credentials grant, RFC 9068 JWT access tokens for one resource (audience), a `groups`
// claim per client, and signing-key rotation on SIGHUP.
//
//   node server.mjs --clients clients.json [--listen 127.0.0.1:0] [--issuer URL] [--alg ES256]
//
// Every option may also come from the environment: OIDC_CLIENTS, OIDC_LISTEN, OIDC_ISSUER,
// OIDC_ALG. Without --issuer, the issuer is http://<the address actually listened on>, so port 0
// works. The issuer must have no path: the provider is served at the root.
//
// The clients file:
//   { "audience": "api://idgate",
//     "clients": [ { "client_id": "alice", "client_secret": "s3cret", "groups": ["eng"],
//                    "scope": "ssh", "ttl": 300 } ] }
// `groups`, `scope` (space-separated), `ttl` (seconds, default 300) and `username` (put in the
// token as `preferred_username`, so several clients can stand for one user) are optional.
//
// Lines on stdout a harness can wait for (anything else there is the library's chatter):
//   KEY <kid>        the signing key at start
//   READY <issuer>   listening; discovery and the token endpoint answer
//   ROTATED <kid>    after SIGHUP: new tokens are signed with <kid>, and the key set lists it
//                    first, followed by the previous keys (so their tokens still verify)
// Errors go to stderr; a bad argument or file exits with status 2.

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { parseArgs } from 'node:util';

import Provider from 'oidc-provider';

/** Previous keys kept in the key set after a rotation: enough for tokens signed just before. */
const RETAINED_KEYS = 3;
const SUPPORTED_ALGS = ['ES256', 'RS256', 'EdDSA'];

function fail(message) {
  process.stderr.write(`oidc test provider: ${message}\n`);
  process.exit(2);
}

function options() {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        clients: { type: 'string' },
        listen: { type: 'string' },
        issuer: { type: 'string' },
        alg: { type: 'string' },
      },
    }));
  } catch (e) {
    fail(e.message);
  }
  const clients = values.clients ?? process.env.OIDC_CLIENTS;
  if (!clients) fail('--clients FILE is required');
  const issuer = values.issuer ?? process.env.OIDC_ISSUER;
  let listen = values.listen ?? process.env.OIDC_LISTEN;
  if (!listen) {
    if (!issuer) fail('give --listen HOST:PORT, --issuer URL, or both');
    const url = new URL(issuer);
    listen = `${url.hostname}:${url.port || '80'}`;
  }
  const split = listen.lastIndexOf(':');
  if (split < 0) fail(`--listen ${listen}: expected HOST:PORT`);
  const host = listen.slice(0, split).replace(/^\[(.*)\]$/, '$1');
  const port = Number(listen.slice(split + 1));
  if (!Number.isInteger(port) || port < 0 || port > 65535) fail(`--listen ${listen}: bad port`);
  const alg = values.alg ?? process.env.OIDC_ALG ?? 'ES256';
  if (!SUPPORTED_ALGS.includes(alg)) fail(`--alg ${alg}: expected one of ${SUPPORTED_ALGS}`);
  return { clientsFile: clients, issuer, host, port, alg };
}

function readClients(file) {
  let doc;
  try {
    doc = JSON.parse(readFileSync(file, 'utf8'));
  } catch (e) {
    fail(`reading ${file}: ${e.message}`);
  }
  const audience = doc.audience ?? 'api://idgate';
  if (!Array.isArray(doc.clients) || doc.clients.length === 0) {
    fail(`${file}: "clients" must be a non-empty array`);
  }
  const byId = new Map();
  for (const c of doc.clients) {
    if (typeof c.client_id !== 'string' || typeof c.client_secret !== 'string') {
      fail(`${file}: every client needs a string client_id and client_secret`);
    }
    if (byId.has(c.client_id)) fail(`${file}: client ${c.client_id} is listed twice`);
    const ttl = c.ttl ?? 300;
    if (!Number.isInteger(ttl) || ttl < 1) fail(`${file}: client ${c.client_id}: ttl must be a positive integer`);
    byId.set(c.client_id, {
      id: c.client_id,
      secret: c.client_secret,
      groups: c.groups ?? [],
      scope: c.scope ?? '',
      ttl,
      username: c.username,
    });
  }
  return { audience, byId };
}

function generateKey(alg) {
  const { privateKey } = alg === 'ES256'
    ? generateKeyPairSync('ec', { namedCurve: 'P-256' })
    : alg === 'RS256'
      ? generateKeyPairSync('rsa', { modulusLength: 2048 })
      : generateKeyPairSync('ed25519');
  // A random kid, not a thumbprint: a test can tell keys apart without computing anything.
  return { ...privateKey.export({ format: 'jwk' }), kid: randomBytes(9).toString('base64url'), alg, use: 'sig' };
}

function providerFor(issuer, keys, clients, alg) {
  const { audience, byId } = clients;
  const scopes = new Set(['openid']);
  for (const c of byId.values()) for (const s of c.scope.split(' ').filter(Boolean)) scopes.add(s);
  const resourceScope = [...scopes].filter((s) => s !== 'openid').join(' ');
  const activeKid = keys[0].kid;

  const provider = new Provider(issuer, {
    clients: [...byId.values()].map((c) => ({
      client_id: c.id,
      client_secret: c.secret,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      // HTTP Basic, what the test harness sends (oidc-provider allows one method per client).
      token_endpoint_auth_method: 'client_secret_basic',
      ...(c.scope ? { scope: c.scope } : {}),
    })),
    // Private JWKs; oidc-provider publishes only the public halves at /jwks.
    jwks: { keys },
    scopes: [...scopes],
    // The default (RS256) would make every client's metadata invalid with an EC or OKP key.
    clientDefaults: { id_token_signed_response_alg: alg },
    cookies: { keys: [randomBytes(32).toString('base64url')] },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        // Clients need not send `resource`: every token is for idgate.
        defaultResource: async () => audience,
        // `accessTokenFormat: 'jwt'` is what makes client-credentials tokens RFC 9068 JWTs
        // (header typ at+jwt) instead of opaque handles; `kid` pins signing to the newest key
        // whatever order the key store would pick.
        getResourceServerInfo: async (_ctx, resource) => {
          if (resource !== audience) throw new Provider.errors.InvalidTarget();
          return {
            scope: resourceScope,
            audience,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg, kid: activeKid } },
          };
        },
      },
    },
    // The groups claim, per client; oidc-provider merges these into the JWT payload.
    extraTokenClaims: async (_ctx, token) => {
      const client = byId.get(token.clientId);
      if (!client) return undefined;
      return client.username === undefined
        ? { groups: client.groups }
        : { groups: client.groups, preferred_username: client.username };
    },
    ttl: {
      // Per client, so one client can have tokens that expire within a test.
      ClientCredentials: (_ctx, _token, client) => byId.get(client.clientId)?.ttl ?? 300,
    },
  });
  provider.on('server_error', (_ctx, err) => process.stderr.write(`server_error: ${err.stack}\n`));
  provider.on('grant.error', (_ctx, err) => process.stderr.write(`grant.error: ${err.message}: ${err.error_description ?? ''}\n`));
  return provider;
}

const opts = options();
const clients = readClients(opts.clientsFile);
let keys = [generateKey(opts.alg)];
let handler = null;

// The HTTP server outlives providers: rotation swaps the handler, connections and port stay.
const server = createServer((req, res) => {
  if (handler) return handler(req, res);
  res.writeHead(503).end();
});
server.on('error', (e) => fail(`listening on ${opts.host}:${opts.port}: ${e.message}`));
server.listen(opts.port, opts.host, () => {
  const { address, port } = server.address();
  const host = address.includes(':') ? `[${address}]` : address;
  const issuer = opts.issuer ?? `http://${host}:${port}`;
  if (new URL(issuer).pathname !== '/') fail(`--issuer ${issuer}: must have no path`);
  try {
    handler = providerFor(issuer, keys, clients, opts.alg).callback();
  } catch (e) {
    fail(`configuring the provider: ${e.stack}`);
  }

  process.on('SIGHUP', () => {
    // Newest first: it signs, and verifiers fetching the set find it with the old ones after it.
    keys = [generateKey(opts.alg), ...keys].slice(0, RETAINED_KEYS + 1);
    handler = providerFor(issuer, keys, clients, opts.alg).callback();
    process.stdout.write(`ROTATED ${keys[0].kid}\n`);
  });
  for (const signal of ['SIGTERM', 'SIGINT']) {
    process.on(signal, () => {
      server.closeAllConnections();
      server.close(() => process.exit(0));
    });
  }
  process.stdout.write(`KEY ${keys[0].kid}\nREADY ${issuer}\n`);
});
