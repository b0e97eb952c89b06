//! The decision: may this request go through, and as whom?
//!
//! Order of checks (each stops at the first failure):
//! 1. CORS preflight pass-through, only when the config enables it;
//! 2. exactly one `Authorization` header, which parses (400 / 401);
//! 3. the path canonicalises (400);
//! 4. the credential authenticates: known SID or token digest, secret matches in constant time,
//!    secret and key not expired, key enabled (one identical 401 for every failure);
//! 5. the account is active (403);
//! 6. the client address is in the key's and the account's allowlists, read only if either has
//!    one (403);
//! 7. method and path match an API, with the path's `{account_sid}` equal to the principal's
//!    account (404 otherwise);
//! 8. the role and the key's API list permit that API (403).

use std::net::IpAddr;

use subtle::{Choice, ConstantTimeEq};

use crate::compile::{role_allows, CompiledConfig, Principal, Secret};
use crate::config::{CorsPreflight, Role, UnknownRoutes};
use crate::credential::{parse_authorization, Credential};
use crate::digest::Digest32;
use crate::headers::{AuthorizationHeader, RequestHead};
use crate::path::{canonicalize, TemplateMatch};
use crate::reason::Reason;
use crate::secret_format;

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
pub struct Identity<'c> {
    pub account_sid: &'c str,
    pub key_sid: Option<&'c str>,
    pub kind: PrincipalKind,
    /// `main`, `standard`, `publishable`, or `account` for account credentials.
    pub role: &'static str,
    /// The matched API's name; `None` for an unknown route let through by `unknown_routes: allow`.
    pub api: Option<&'c str>,
}

/// An admitted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allow<'c> {
    /// `None` for a CORS preflight passed without credentials.
    pub identity: Option<Identity<'c>>,
    /// Indices into the config, for the limits (`None` with `identity`).
    pub(crate) refs: Option<Refs>,
}

/// Where the principal and the API sit in the compiled config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refs {
    pub(crate) key: Option<u32>,
    pub(crate) account: u32,
    pub(crate) api: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<'c> {
    Allow(Allow<'c>),
    Deny(Reason),
}

/// Compared against when the SID is unknown, so that path costs what a wrong secret costs.
const DUMMY_DIGEST: Digest32 = [0u8; 32];

/// Decides one request. `client_ip` is called at most once, and only when an allowlist applies
/// (reading it is a host call the common case should not pay).
pub fn decide<'c>(
    cfg: &'c CompiledConfig,
    req: &RequestHead<'_>,
    now_unix: u64,
    client_ip: &mut dyn FnMut() -> Option<IpAddr>,
) -> Decision<'c> {
    match decide_inner(cfg, req, now_unix, client_ip) {
        Ok(allow) => Decision::Allow(allow),
        Err(reason) => Decision::Deny(reason),
    }
}

fn decide_inner<'c>(
    cfg: &'c CompiledConfig,
    req: &RequestHead<'_>,
    now: u64,
    client_ip: &mut dyn FnMut() -> Option<IpAddr>,
) -> Result<Allow<'c>, Reason> {
    if cfg.cors_preflight == CorsPreflight::Allow
        && req.method == b"OPTIONS"
        && req.cors_preflight_headers
    {
        return Ok(Allow {
            identity: None,
            refs: None,
        });
    }
    let value = match req.authorization {
        AuthorizationHeader::Absent => return Err(Reason::MissingCredentials),
        AuthorizationHeader::Many => return Err(Reason::MultipleCredentials),
        AuthorizationHeader::One(v) => v,
    };
    let credential = parse_authorization(value, cfg.schemes)?;
    let path = canonicalize(req.path).ok_or(Reason::MalformedPath)?;
    let principal = authenticate(cfg, &credential, now).ok_or(Reason::InvalidCredentials)?;

    let (account_idx, key, key_idx) = match principal {
        Principal::Key(k) => {
            let key = cfg.keys.get(k as usize).ok_or(Reason::InvalidCredentials)?;
            (key.account, Some(key), Some(k))
        }
        Principal::Account(a) => (a, None, None),
    };
    let account = cfg
        .accounts
        .get(account_idx as usize)
        .ok_or(Reason::InvalidCredentials)?;
    if account.suspended {
        return Err(Reason::AccountSuspended);
    }

    let key_list = key.and_then(|k| k.allowed_ips.as_ref());
    if key_list.is_some() || account.allowed_ips.is_some() {
        let ip = client_ip().ok_or(Reason::IpNotAllowed)?;
        let admitted = key_list.is_none_or(|l| l.contains(ip))
            && account.allowed_ips.as_ref().is_none_or(|l| l.contains(ip));
        if !admitted {
            return Err(Reason::IpNotAllowed);
        }
    }

    let role = key.map_or(Role::Main, |k| k.role);
    let mut wrong_account = false;
    let mut matched = None;
    'apis: for (i, api) in cfg.apis.iter().enumerate() {
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

    let api = match matched {
        Some(i) => {
            let api = &cfg.apis[i];
            if !role_allows(role, api) || !key.is_none_or(|k| k.may_call(i)) {
                return Err(Reason::PermissionDenied);
            }
            Some((
                &*api.name,
                u32::try_from(i).map_err(|_| Reason::UnknownRoute)?,
            ))
        }
        None if wrong_account => return Err(Reason::AccountMismatch),
        None if cfg.unknown_routes == UnknownRoutes::Deny => return Err(Reason::UnknownRoute),
        None => {
            let unrestricted = role != Role::Publishable && key.is_none_or(|k| k.apis.is_none());
            if !unrestricted {
                return Err(Reason::PermissionDenied);
            }
            None
        }
    };

    Ok(Allow {
        identity: Some(Identity {
            account_sid: &account.sid,
            key_sid: key.map(|k| &*k.sid),
            kind: if key.is_some() {
                PrincipalKind::Key
            } else {
                PrincipalKind::Account
            },
            role: key.map_or("account", |k| k.role.as_str()),
            api: api.map(|(name, _)| name),
        }),
        refs: Some(Refs {
            key: key_idx,
            account: account_idx,
            api: api.map(|(_, i)| i),
        }),
    })
}

/// Whether `digest` equals a secret that is still valid at `now`. Every secret is compared, in
/// constant time, whatever the earlier ones gave.
fn secret_matches(secrets: &[Secret], digest: &Digest32, now: u64) -> bool {
    let mut ok = Choice::from(0);
    for s in secrets {
        let live = Choice::from(u8::from(s.not_after.is_none_or(|t| now <= t)));
        ok |= s.digest.ct_eq(digest) & live;
    }
    bool::from(ok)
}

fn authenticate(cfg: &CompiledConfig, credential: &Credential<'_>, now: u64) -> Option<Principal> {
    if cfg.check_secret_format {
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
            let digest = cfg.digester.digest(secret);
            match cfg.by_sid.get(user.as_slice()) {
                Some(&Principal::Key(k)) => {
                    let key = cfg.keys.get(k as usize)?;
                    let ok = secret_matches(&key.secrets, &digest, now)
                        & key_usable(key.enabled, key.expires_at, now);
                    ok.then_some(Principal::Key(k))
                }
                Some(&Principal::Account(a)) => {
                    let account = cfg.accounts.get(a as usize)?;
                    secret_matches(&account.auth_tokens, &digest, now)
                        .then_some(Principal::Account(a))
                }
                None => {
                    // Same work as a wrong secret, then fail.
                    let _ = bool::from(digest.ct_eq(&DUMMY_DIGEST));
                    None
                }
            }
        }
        Credential::Bearer { token } => {
            let digest = cfg.digester.digest(token);
            let &k = cfg.by_token.get(&digest)?;
            let key = cfg.keys.get(k as usize)?;
            let ok = secret_matches(&key.secrets, &digest, now)
                & key_usable(key.enabled, key.expires_at, now);
            ok.then_some(Principal::Key(k))
        }
    }
}

fn key_usable(enabled: bool, expires_at: Option<u64>, now: u64) -> bool {
    enabled & expires_at.is_none_or(|t| now <= t)
}
