//! The decision: may this request go through, and as whom?
//!
//! Order of checks (each stops at the first failure):
//! 1. CORS preflight pass-through, only when the config enables it;
//! 2. exactly one `Authorization` header, which parses (400 / 401);
//! 3. the path canonicalises (400);
//! 4. the credential authenticates: known SID or token digest, secret matches in constant time,
//!    secret and key not expired, key enabled (one identical 401 for every failure);
//! 5. the account is active (403);
//! 6. the account is served in the edge's region, when both name regions (404 `wrong_region`,
//!    or the `invalid_credentials` 401 with `settings.wrong_region: "401"`, see
//!    [`crate::view`]);
//! 7. the client address is in the key's and the account's allowlists, read only if either has
//!    one (403);
//! 8. method and path match an API, with the path's `{account_sid}` equal to the principal's
//!    account (404 otherwise; a path that binds `{account_sid}` to another account is
//!    `account_mismatch` whatever the method, even with `unknown_routes: allow`);
//! 9. the role and the key's API list permit that API (403).

use std::net::IpAddr;
use std::sync::Arc;

use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};

use crate::compile::{
    role_allows, Account, Catalog, CompiledConfig, Directory, Key, Principal, Secret,
};
use crate::config::{CorsPreflight, Role, UnknownRoutes};
use crate::credential::{parse_authorization, Credential};
use crate::digest::{Digest32, Digester};
use crate::headers::{AuthorizationHeader, RequestHead};
use crate::path::{canonicalize, CanonicalPath, TemplateMatch};
use crate::reason::Reason;
use crate::secret_format;
use crate::usage::{secret_tag, SecretTag, Used};

/// What kind of credential authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    /// An API key (`key_sid` is set).
    Key,
    /// Account SID + auth token: a main-level principal.
    Account,
}

/// Who made an allowed request; the filter turns this into identity headers and filter state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity<'a> {
    pub account_sid: &'a str,
    pub key_sid: Option<&'a str>,
    pub kind: PrincipalKind,
    /// `main`, `standard`, `publishable`, or `account` for account credentials.
    pub role: &'static str,
    /// The matched API's name; `None` for an unknown route let through by `unknown_routes: allow`.
    pub api: Option<&'a str>,
}

impl<'a> Identity<'a> {
    /// The identity headers' values, in `identity_headers` order: account SID, key SID, role,
    /// API (`None`: the header is not set).
    pub fn header_values(self) -> [Option<&'a str>; 4] {
        [
            Some(self.account_sid),
            self.key_sid,
            Some(self.role),
            self.api,
        ]
    }
}

/// An authenticated principal and the API it may call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Admitted {
    pub(crate) key: Option<Arc<Key>>,
    pub(crate) account: Arc<Account>,
    /// Index into the catalogue's APIs, and the API's name.
    pub(crate) api: Option<(u32, Arc<str>)>,
    /// The secret that matched (its digest's tag), for usage.
    pub(crate) secret: SecretTag,
}

/// An admitted request.
#[derive(Debug, Clone, PartialEq)]
pub struct Allow {
    /// `None` for a CORS preflight passed without credentials.
    pub(crate) admitted: Option<Admitted>,
}

impl Allow {
    /// Who was admitted; `None` for a CORS preflight.
    pub fn identity(&self) -> Option<Identity<'_>> {
        self.admitted.as_ref().map(|a| Identity {
            account_sid: &a.account.sid,
            key_sid: a.key.as_ref().map(|k| &*k.sid),
            kind: if a.key.is_some() {
                PrincipalKind::Key
            } else {
                PrincipalKind::Account
            },
            role: a.key.as_ref().map_or("account", |k| k.role.as_str()),
            api: a.api.as_ref().map(|(_, name)| &**name),
        })
    }

    /// Who was admitted and which of its secrets matched (usage); `None` for a CORS preflight.
    pub fn used(&self) -> Option<Used> {
        self.admitted.as_ref().map(|a| Used {
            account_sid: a.account.sid.clone(),
            key_sid: a.key.as_ref().map(|k| k.sid.clone()),
            secret: a.secret,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Allow(Allow),
    Deny(Reason),
}

/// Where the decision reads the client address (in the filter, a host call through
/// [`crate::gate::Host`]): asked at most once, and only when an allowlist applies (reading it is
/// a host call the common case should not pay). Any `FnMut() -> Option<IpAddr>` is one. In the
/// filter it also digests presented secrets through the VM's memo
/// ([`crate::local::DigestMemo`]); by default every secret is digested.
pub trait ClientAddress {
    fn client_ip(&mut self) -> Option<IpAddr>;

    /// The digest of a presented secret.
    fn digest(&mut self, digester: &Digester, secret: &[u8]) -> Digest32 {
        digester.digest(secret)
    }

    /// The secret last digested authenticated its principal.
    fn authenticated(&mut self) {}

    /// The principal that authenticated, with its account, and the secret that matched: every
    /// later denial is this principal's (usage).
    fn admitted_as(&mut self, _used: &Used) {}
}

impl<F: FnMut() -> Option<IpAddr>> ClientAddress for F {
    fn client_ip(&mut self) -> Option<IpAddr> {
        self()
    }
}

/// Compared against when the SID is unknown, so that path costs what a wrong secret costs.
const DUMMY_DIGEST: Digest32 = [0u8; 32];

/// Decides one request against a static config (a test convenience over [`decide_in`]), at an
/// edge with no region.
pub fn decide(
    cfg: &CompiledConfig,
    req: &RequestHead<'_>,
    now_unix: u64,
    client: &mut dyn ClientAddress,
) -> Decision {
    decide_in(&cfg.catalog, &cfg.directory, req, now_unix, client)
}

/// Decides one request with principals looked up in `dir`, at an edge with no region (which
/// serves every account).
pub fn decide_in(
    cat: &Catalog,
    dir: &dyn Directory,
    req: &RequestHead<'_>,
    now_unix: u64,
    client: &mut dyn ClientAddress,
) -> Decision {
    decide_in_region(cat, dir, None, req, now_unix, client)
}

/// [`decide_in`] at an edge in `edge_region`: an account whose regions do not include it is
/// refused with `wrong_region`.
pub fn decide_in_region(
    cat: &Catalog,
    dir: &dyn Directory,
    edge_region: Option<&str>,
    req: &RequestHead<'_>,
    now_unix: u64,
    client: &mut dyn ClientAddress,
) -> Decision {
    match decide_inner(cat, dir, edge_region, req, now_unix, client) {
        Ok(allow) => Decision::Allow(allow),
        Err(reason) => Decision::Deny(reason),
    }
}

fn decide_inner(
    cat: &Catalog,
    dir: &dyn Directory,
    edge_region: Option<&str>,
    req: &RequestHead<'_>,
    now: u64,
    client: &mut dyn ClientAddress,
) -> Result<Allow, Reason> {
    if cat.cors_preflight == CorsPreflight::Allow
        && req.method == b"OPTIONS"
        && req.cors_preflight_headers
    {
        return Ok(Allow { admitted: None });
    }
    let value = match req.authorization {
        AuthorizationHeader::Absent => return Err(Reason::MissingCredentials),
        AuthorizationHeader::Many => return Err(Reason::MultipleCredentials),
        AuthorizationHeader::One(v) => v,
    };
    let credential = parse_authorization(value, cat.schemes)?;
    let path = canonicalize(req.path).ok_or(Reason::MalformedPath)?;
    let (principal, secret) =
        authenticate(cat, dir, &credential, now, client).ok_or(Reason::InvalidCredentials)?;
    client.authenticated();

    let (account, key) = match principal {
        Principal::Key(key) => {
            let account = dir
                .account(&key.account_sid)
                .ok_or(Reason::InvalidCredentials)?;
            (account, Some(key))
        }
        Principal::Account(account) => (account, None),
    };
    client.admitted_as(&Used {
        account_sid: account.sid.clone(),
        key_sid: key.as_ref().map(|k| k.sid.clone()),
        secret,
    });
    if account.suspended {
        return Err(Reason::AccountSuspended);
    }
    if !account.served_in(edge_region) {
        return Err(Reason::WrongRegion);
    }

    let key_list = key.as_ref().and_then(|k| k.allowed_ips.as_ref());
    if key_list.is_some() || account.allowed_ips.is_some() {
        let ip = client.client_ip().ok_or(Reason::IpNotAllowed)?;
        let admitted = key_list.is_none_or(|l| l.contains(ip))
            && account.allowed_ips.as_ref().is_none_or(|l| l.contains(ip));
        if !admitted {
            return Err(Reason::IpNotAllowed);
        }
    }

    let role = key.as_ref().map_or(Role::Main, |k| k.role);
    let mut wrong_account = false;
    let mut matched = None;
    'apis: for (i, api) in cat.apis.iter().enumerate() {
        if !api.methods.iter().any(|m| **m == *req.method) {
            continue;
        }
        for t in &api.templates {
            match t.matches(&path) {
                TemplateMatch::No => {}
                TemplateMatch::Yes {
                    account_sid: Some(sid),
                } if sid != &*account.sid => wrong_account = true,
                TemplateMatch::Yes { .. } => {
                    matched = Some(i);
                    break 'apis;
                }
            }
        }
    }
    // The account binding holds whatever the method: a path that binds `{account_sid}` to
    // another account is that account's, so it is never an unknown route (which
    // `unknown_routes: allow` would let through). Checked only when nothing matched, so the
    // common case pays nothing for it.
    if matched.is_none() && !wrong_account {
        wrong_account = binds_another_account(cat, &path, &account.sid);
    }

    let api = match matched {
        Some(i) => {
            let api = &cat.apis[i];
            if !role_allows(role, api) || !key.as_ref().is_none_or(|k| k.may_call(i)) {
                return Err(Reason::PermissionDenied);
            }
            let idx = u32::try_from(i).map_err(|_| Reason::UnknownRoute)?;
            Some((idx, api.name.clone()))
        }
        None if wrong_account => return Err(Reason::AccountMismatch),
        None if cat.unknown_routes == UnknownRoutes::Deny => return Err(Reason::UnknownRoute),
        None => {
            let unrestricted =
                role != Role::Publishable && key.as_ref().is_none_or(|k| k.apis.is_none());
            if !unrestricted {
                return Err(Reason::PermissionDenied);
            }
            None
        }
    };

    Ok(Allow {
        admitted: Some(Admitted {
            key,
            account,
            api,
            secret,
        }),
    })
}

/// Whether some API's template (whatever its methods) matches `path` with its `{account_sid}`
/// bound to an account other than `own`.
fn binds_another_account(cat: &Catalog, path: &CanonicalPath, own: &str) -> bool {
    cat.apis.iter().flat_map(|api| &api.templates).any(
        |t| matches!(t.matches(path), TemplateMatch::Yes { account_sid: Some(sid) } if sid != own),
    )
}

/// Whether a denial with `reason` is given only after the credential authenticated (the
/// requester proved it holds a valid secret): account, address, route and permission checks,
/// and the limits taken after them. Everything refused before or at authentication (missing,
/// malformed or invalid credentials, a path that does not canonicalise, the failed-auth
/// limiter, no or stale config) is not. Replies to unauthenticated requests carry nothing that
/// describes the deployment (e.g. the config version).
pub fn denied_after_authentication(reason: Reason) -> bool {
    match reason {
        Reason::AccountSuspended
        | Reason::IpNotAllowed
        | Reason::PermissionDenied
        | Reason::AccountMismatch
        | Reason::UnknownRoute
        | Reason::RateLimitedKey
        | Reason::RateLimitedAccount
        | Reason::RateLimitedApi
        | Reason::ConcurrencyLimited
        | Reason::LimiterUnavailable
        | Reason::WrongRegion => true,
        Reason::NoConfig
        | Reason::MissingCredentials
        | Reason::MultipleCredentials
        | Reason::MalformedCredentials
        | Reason::UnsupportedScheme
        | Reason::InvalidCredentials
        | Reason::MalformedPath
        | Reason::TooManyFailedAuth
        | Reason::ConfigStale => false,
    }
}

/// Whether `digest` equals a secret that is still valid at `now`, and which one (its tag).
/// Every secret is compared, in constant time, whatever the earlier ones gave; the match is
/// selected without a branch.
fn secret_matches(secrets: &[Secret], digest: &Digest32, now: u64) -> (Choice, SecretTag) {
    let mut ok = Choice::from(0);
    let mut tag = [0u8; 8];
    for s in secrets {
        let live = Choice::from(u8::from(s.not_after.is_none_or(|t| now <= t)));
        let hit = s.digest.ct_eq(digest) & live;
        let candidate = secret_tag(&s.digest);
        for (t, c) in tag.iter_mut().zip(candidate) {
            t.conditional_assign(&c, hit);
        }
        ok |= hit;
    }
    (ok, tag)
}

fn authenticate(
    cat: &Catalog,
    dir: &dyn Directory,
    credential: &Credential<'_>,
    now: u64,
    client: &mut dyn ClientAddress,
) -> Option<(Principal, SecretTag)> {
    if cat.check_secret_format {
        let secret = match credential {
            Credential::Basic { secret, .. } => secret.as_slice(),
            Credential::Bearer { token } => token,
        };
        // The format is public, so refusing a malformed secret early reveals nothing.
        if !secret_format::is_well_formed(secret) {
            return None;
        }
    }
    match credential {
        Credential::Basic { user, secret } => {
            let digest = client.digest(&cat.digester, secret);
            match dir.by_sid(user) {
                Some(Principal::Key(key)) => {
                    let (ok, tag) = secret_matches(&key.secrets, &digest, now);
                    let ok = bool::from(ok) & key_usable(key.enabled, key.expires_at, now);
                    ok.then_some((Principal::Key(key), tag))
                }
                Some(Principal::Account(account)) => {
                    let (ok, tag) = secret_matches(&account.auth_tokens, &digest, now);
                    bool::from(ok).then_some((Principal::Account(account), tag))
                }
                None => {
                    // Same work as a wrong secret, then fail.
                    let _ = bool::from(digest.ct_eq(&DUMMY_DIGEST));
                    None
                }
            }
        }
        Credential::Bearer { token } => {
            let digest = client.digest(&cat.digester, token);
            let key = dir.by_token(&digest)?;
            let (ok, tag) = secret_matches(&key.secrets, &digest, now);
            let ok = bool::from(ok) & key_usable(key.enabled, key.expires_at, now);
            ok.then_some((Principal::Key(key), tag))
        }
    }
}

fn key_usable(enabled: bool, expires_at: Option<u64>, now: u64) -> bool {
    enabled & expires_at.is_none_or(|t| now <= t)
}
