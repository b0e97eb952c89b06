//! Who is calling: the `Authorization` header resolved to a [`Principal`], and what each
//! principal may do.
//!
//! - HTTP Basic with an account SID and its auth token: the account itself (main-level);
//! - HTTP Basic with a key SID and its secret, or Bearer with a key secret: the key (its role);
//! - Bearer with an operator token: the admin (everything) or an edge (the feed only).
//!
//! Presented secrets are digested and compared with the stored digests in constant time, against
//! every live secret of the SID; an unknown SID costs the same digest and comparison. Every
//! failure is the same 401.

use axum::http::{header, HeaderMap};
use base64::Engine as _;
use keygate_core::config::Role;
use rusqlite::Connection;
use subtle::{Choice, ConstantTimeEq};

use crate::error::ApiError;
use crate::model::StoredSecret;
use crate::secret::{self, OperatorKind};
use crate::store;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Admin,
    Edge,
    /// Account SID + auth token.
    Account {
        account_sid: String,
        suspended: bool,
    },
    Key {
        key_sid: String,
        account_sid: String,
        role: Role,
        suspended: bool,
    },
}

enum Presented {
    Basic { user: String, secret: Vec<u8> },
    Bearer { token: Vec<u8> },
}

/// Longest `Authorization` value considered (as at the edge).
const MAX_AUTHORIZATION: usize = 4096;

fn presented(headers: &HeaderMap) -> Option<Presented> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() || value.len() > MAX_AUTHORIZATION {
        return None;
    }
    let value = value.as_bytes();
    let sp = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = (&value[..sp], value[sp + 1..].trim_ascii());
    if scheme.eq_ignore_ascii_case(b"basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let colon = decoded.iter().position(|&b| b == b':')?;
        let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
        Some(Presented::Basic {
            user,
            secret: decoded[colon + 1..].to_vec(),
        })
    } else if scheme.eq_ignore_ascii_case(b"bearer") && !rest.is_empty() {
        Some(Presented::Bearer {
            token: rest.to_vec(),
        })
    } else {
        None
    }
}

fn parse_digest(hex_digest: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    // Stored digests are written by us; a malformed one simply never matches.
    let _ = hex::decode_to_slice(hex_digest, &mut out);
    out
}

/// Whether `digest` equals a live secret; compares against every one, in constant time.
fn matches(secrets: &[StoredSecret], digest: &[u8; 32], now: i64) -> bool {
    let mut ok = Choice::from(0);
    for s in secrets {
        ok |= parse_digest(&s.digest).ct_eq(digest) & Choice::from(u8::from(s.live_at(now)));
    }
    if secrets.is_empty() {
        // Unknown SID: the same comparison work as a wrong secret, then fail.
        let _ = bool::from([0u8; 32].ct_eq(digest));
    }
    bool::from(ok)
}

/// Resolves the caller, or 401.
pub fn authenticate(
    conn: &Connection,
    headers: &HeaderMap,
    now: i64,
) -> Result<Principal, ApiError> {
    match presented(headers).ok_or(ApiError::Unauthorized)? {
        Presented::Basic { user, secret } => {
            let digest = keygate_core::digest::Digester::Sha256.digest(&secret);
            if user.starts_with("AC") {
                let secrets = store::secrets_of(conn, &user)?;
                let account = store::get_account(conn, &user)?;
                match account {
                    Some(a) if matches(&secrets, &digest, now) => Ok(Principal::Account {
                        suspended: a.suspended(),
                        account_sid: a.sid,
                    }),
                    _ => Err(ApiError::Unauthorized),
                }
            } else {
                let key = store::get_key_by_sid(conn, &user)?;
                let secrets = match &key {
                    Some(k) => store::secrets_of(conn, &k.sid)?,
                    None => Vec::new(),
                };
                let ok = matches(&secrets, &digest, now);
                match key {
                    Some(k) if ok => key_principal(conn, k, now),
                    _ => Err(ApiError::Unauthorized),
                }
            }
        }
        Presented::Bearer { token } => {
            let digest = secret::digest(&token);
            if let Some(s) = store::find_secret(conn, &digest)? {
                if !s.live_at(now) {
                    return Err(ApiError::Unauthorized);
                }
                let key =
                    store::get_key_by_sid(conn, &s.owner_sid)?.ok_or(ApiError::Unauthorized)?;
                return key_principal(conn, key, now);
            }
            match store::find_operator_token(conn, &digest)? {
                Some(OperatorKind::Admin) => Ok(Principal::Admin),
                Some(OperatorKind::Edge) => Ok(Principal::Edge),
                None => Err(ApiError::Unauthorized),
            }
        }
    }
}

fn key_principal(conn: &Connection, k: crate::model::Key, now: i64) -> Result<Principal, ApiError> {
    if !k.enabled || k.expires_at.is_some_and(|t| now > t) {
        return Err(ApiError::Unauthorized);
    }
    let account = store::get_account(conn, &k.account_sid)?.ok_or(ApiError::Unauthorized)?;
    Ok(Principal::Key {
        key_sid: k.sid,
        account_sid: k.account_sid,
        role: k.role,
        suspended: account.suspended(),
    })
}

impl Principal {
    /// May manage keys and settings of `account_sid` (account credentials, a main key, or the
    /// admin). Another account's SID is 404, as at the edge; a standard or publishable key is 403.
    pub fn may_manage(&self, account_sid: &str) -> Result<(), ApiError> {
        let (own, role, suspended) = match self {
            Principal::Admin => return Ok(()),
            Principal::Edge => {
                return Err(ApiError::Forbidden(
                    "edge tokens may only read the edge config",
                ))
            }
            Principal::Account {
                account_sid,
                suspended,
            } => (account_sid, Role::Main, *suspended),
            Principal::Key {
                account_sid,
                role,
                suspended,
                ..
            } => (account_sid, *role, *suspended),
        };
        if own != account_sid {
            return Err(ApiError::NotFound);
        }
        if role != Role::Main {
            return Err(ApiError::Forbidden(
                "only account credentials or a main key may manage keys and account settings",
            ));
        }
        if suspended {
            return Err(ApiError::Forbidden("account suspended"));
        }
        Ok(())
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Principal::Admin => Ok(()),
            _ => Err(ApiError::Forbidden(
                "only the operator (admin token) may do this",
            )),
        }
    }

    pub fn may_read_feed(&self) -> Result<(), ApiError> {
        match self {
            Principal::Admin | Principal::Edge => Ok(()),
            _ => Err(ApiError::Forbidden(
                "only edge tokens (or the admin token) may read the edge config",
            )),
        }
    }
}
