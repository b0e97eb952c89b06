//! keygate's own API: what Exotel and Telephony.io add to Twilio's keys. JSON in, JSON out,
//! errors `{"error":{"code","message"}}`, times RFC 3339.
//!
//! | method | path | who | |
//! |---|---|---|---|
//! | `GET` `POST` | `/v1/accounts` | admin | list every account, by SID; create an account (201, `auth_token` shown once) |
//! | `GET` | `/v1/accounts/{sid}` | admin, account, main key | fetch |
//! | `PATCH` | `/v1/accounts/{sid}` | admin (all fields); account, main key (`friendly_name`, `allowed_ips`) | suspend / reactivate, region, regions, allowlist, limits |
//! | `GET` `POST` | `/v1/accounts/{sid}/keys` | admin, account, main key | list; create (201, `secret` shown once) |
//! | `GET` `PATCH` `DELETE` | `/v1/accounts/{sid}/keys/{key_sid}` | same | fetch; change role, apis, allowed_ips, limits, expires_at, enabled, friendly_name; delete (204) |
//! | `POST` | `/v1/accounts/{sid}/keys/{key_sid}/regenerate` | same | new secret (shown once); old one valid for `grace_seconds` (default 172800; 0 = revoke now) |
//! | `DELETE` | `/v1/accounts/{sid}/keys/{key_sid}/secrets/previous` | same | revoke rotated secrets before their grace ends (204) |
//! | `GET` | `/v1/accounts/{sid}/usage` | same | requests per minute or hour by outcome ([`crate::usage`]) |
//!
//! A key's JSON has `last_used_at` and each of its `secrets[]` one: when the edges last saw it
//! used (RFC 3339, `null` if never), from their usage batches.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use keygate_core::config::{AccountLimitsDoc, AccountStatus, KeyLimitsDoc, Role};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::Error;
use crate::model::{self, rfc3339, Account, Key, StoredSecret};
use crate::service::{self, NewAccount, NewKey, DEFAULT_GRACE_SECONDS};
use crate::store::LastUsed;
use crate::{parse_json, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/accounts", get(list_accounts).post(create_account))
        .route(
            "/v1/accounts/{sid}",
            get(fetch_account).patch(update_account),
        )
        .route("/v1/accounts/{sid}/keys", get(list_keys).post(create_key))
        .route(
            "/v1/accounts/{sid}/keys/{key_sid}",
            get(fetch_key).patch(update_key).delete(delete_key),
        )
        .route(
            "/v1/accounts/{sid}/keys/{key_sid}/regenerate",
            post(regenerate),
        )
        .route(
            "/v1/accounts/{sid}/keys/{key_sid}/secrets/previous",
            delete(revoke_previous),
        )
}

/// `Some(None)` for an explicit `null` (clear the field), `None` when absent (keep it).
fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

fn account_json(a: &Account) -> Value {
    json!({
        "sid": a.sid,
        "friendly_name": a.friendly_name,
        "status": model::status_str(a.status),
        "region": a.region,
        "regions": a.regions.as_deref().unwrap_or_default(),
        "allowed_ips": a.allowed_ips,
        "limits": a.limits,
        "created_at": rfc3339(a.created_at),
        "updated_at": rfc3339(a.updated_at),
    })
}

fn key_json(k: &Key, secrets: &[StoredSecret], last: &LastUsed) -> Value {
    let mut body = json!({
        "sid": k.sid,
        "account_sid": k.account_sid,
        "friendly_name": k.friendly_name,
        "role": k.role.as_str(),
        "apis": k.apis,
        "allowed_ips": k.allowed_ips,
        "limits": k.limits,
        "expires_at": k.expires_at.map(rfc3339),
        "enabled": k.enabled,
        "created_at": rfc3339(k.created_at),
        "updated_at": rfc3339(k.updated_at),
        // Metadata only: never a digest, never a plaintext.
        "secrets": secrets.iter().map(|s| json!({
            "current": s.not_after.is_none(),
            "created_at": rfc3339(s.created_at),
            "not_after": s.not_after.map(rfc3339),
        })).collect::<Vec<_>>(),
    });
    crate::usage::last_used_json(&mut body, secrets, last);
    body
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAccount {
    friendly_name: Option<String>,
    region: Option<String>,
    regions: Option<Vec<String>>,
    status: Option<AccountStatus>,
    allowed_ips: Option<Vec<String>>,
    limits: Option<AccountLimitsDoc>,
}

async fn create_account(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, Error> {
    caller.require_admin()?;
    let req: CreateAccount = parse_json(&body)?;
    let new = NewAccount {
        friendly_name: req.friendly_name,
        region: req.region,
        regions: req.regions,
        status: req.status,
        allowed_ips: req.allowed_ips,
        limits: req.limits,
    };
    let (cat, region) = (state.catalog().clone(), state.default_region().to_owned());
    let caps = state.caps().clone();
    let (account, token, version) = state
        .db()
        .write(move |c| service::create_account(c, &cat, &caps, &region, new))
        .await?;
    state.published(version);
    let mut body = account_json(&account);
    body["auth_token"] = json!(token.expose());
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn list_accounts(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, Error> {
    caller.require_admin()?;
    let accounts = state.db().read(|c| c.all_accounts()).await?;
    let accounts: Vec<Value> = accounts.iter().map(account_json).collect();
    Ok(Json(json!({ "accounts": accounts })))
}

async fn fetch_account(
    State(state): State<AppState>,
    Path(sid): Path<String>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, Error> {
    caller.managing(&sid)?;
    let account = state
        .db()
        .read(move |c| c.get_account(&sid))
        .await?
        .ok_or(Error::NotFound)?;
    Ok(Json(account_json(&account)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchAccount {
    #[serde(default, deserialize_with = "nullable")]
    friendly_name: Option<Option<String>>,
    status: Option<AccountStatus>,
    region: Option<String>,
    /// `null` or `[]` clears.
    #[serde(default, deserialize_with = "nullable")]
    regions: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "nullable")]
    allowed_ips: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "nullable")]
    limits: Option<Option<AccountLimitsDoc>>,
}

async fn update_account(
    State(state): State<AppState>,
    Path(sid): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Json<Value>, Error> {
    let holder = caller.managing(&sid)?;
    let req: PatchAccount = parse_json(&body)?;
    let (cat, caps) = (state.catalog().clone(), state.caps().clone());
    let (account, version) = state
        .db()
        .write(move |c| {
            service::update_account(c, &cat, &caps, &holder, &sid, |a| {
                if let Some(v) = req.friendly_name {
                    a.friendly_name = v;
                }
                if let Some(v) = req.status {
                    a.status = v;
                }
                if let Some(v) = req.region {
                    a.region = v;
                }
                if let Some(v) = req.regions {
                    a.regions = v;
                }
                if let Some(v) = req.allowed_ips {
                    a.allowed_ips = v;
                }
                if let Some(v) = req.limits {
                    a.limits = v;
                }
                Ok(())
            })
        })
        .await?;
    state.published(version);
    Ok(Json(account_json(&account)))
}

async fn list_keys(
    State(state): State<AppState>,
    Path(sid): Path<String>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, Error> {
    caller.managing(&sid)?;
    let keys = state
        .db()
        .read(move |c| {
            if c.get_account(&sid)?.is_none() {
                return Err(Error::NotFound);
            }
            c.list_keys(&sid, 0, u64::MAX)?
                .into_iter()
                .map(|k| {
                    let s = c.secrets_of(&k.sid)?;
                    let last = c.last_used(&k.sid)?;
                    Ok(key_json(&k, &s, &last))
                })
                .collect::<Result<Vec<_>, Error>>()
        })
        .await?;
    Ok(Json(json!({ "keys": keys })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    friendly_name: Option<String>,
    role: Option<Role>,
    apis: Option<Vec<String>>,
    allowed_ips: Option<Vec<String>>,
    limits: Option<KeyLimitsDoc>,
    expires_at: Option<String>,
    enabled: Option<bool>,
}

async fn create_key(
    State(state): State<AppState>,
    Path(sid): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, Error> {
    let holder = caller.managing(&sid)?;
    let req: CreateKey = parse_json(&body)?;
    if let Some(n) = &req.friendly_name {
        model::validate_friendly_name("friendly_name", n)?;
    }
    let new = NewKey {
        friendly_name: req.friendly_name,
        role: req.role.unwrap_or(Role::Standard),
        apis: req.apis,
        allowed_ips: req.allowed_ips,
        limits: req.limits,
        expires_at: req
            .expires_at
            .as_deref()
            .map(|t| model::parse_rfc3339("expires_at", t))
            .transpose()?,
        enabled: req.enabled.unwrap_or(true),
    };
    let (cat, caps) = (state.catalog().clone(), state.caps().clone());
    let (key, secret, secrets, version) = state
        .db()
        .write(move |c| {
            let (key, secret, version) = service::create_key(c, &cat, &caps, &holder, &sid, new)?;
            let secrets = service::secrets_of_new_key(&key, &secret);
            Ok((key, secret, secrets, version))
        })
        .await?;
    state.published(version);
    let mut body = key_json(&key, &secrets, &LastUsed::default());
    body["secret"] = json!(secret.expose());
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn fetch_key(
    State(state): State<AppState>,
    Path((sid, key_sid)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, Error> {
    caller.managing(&sid)?;
    let (key, secrets, last) = state
        .db()
        .read(move |c| {
            let key = c.get_key(&sid, &key_sid)?.ok_or(Error::NotFound)?;
            let secrets = c.secrets_of(&key.sid)?;
            let last = c.last_used(&key.sid)?;
            Ok((key, secrets, last))
        })
        .await?;
    Ok(Json(key_json(&key, &secrets, &last)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchKey {
    #[serde(default, deserialize_with = "nullable")]
    friendly_name: Option<Option<String>>,
    role: Option<Role>,
    #[serde(default, deserialize_with = "nullable")]
    apis: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "nullable")]
    allowed_ips: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "nullable")]
    limits: Option<Option<KeyLimitsDoc>>,
    #[serde(default, deserialize_with = "nullable")]
    expires_at: Option<Option<String>>,
    enabled: Option<bool>,
}

async fn update_key(
    State(state): State<AppState>,
    Path((sid, key_sid)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Json<Value>, Error> {
    let holder = caller.managing(&sid)?;
    let req: PatchKey = parse_json(&body)?;
    let expires_at = match &req.expires_at {
        None => None,
        Some(None) => Some(None),
        Some(Some(t)) => Some(Some(model::parse_rfc3339("expires_at", t)?)),
    };
    let (cat, caps) = (state.catalog().clone(), state.caps().clone());
    let (key, version) = state
        .db()
        .write(move |c| {
            service::update_key(c, &cat, &caps, &holder, &sid, &key_sid, |k| {
                if let Some(v) = req.friendly_name {
                    k.friendly_name = v;
                }
                if let Some(v) = req.role {
                    k.role = v;
                }
                if let Some(v) = req.apis {
                    k.apis = v;
                }
                if let Some(v) = req.allowed_ips {
                    k.allowed_ips = v;
                }
                if let Some(v) = req.limits {
                    k.limits = v;
                }
                if let Some(v) = expires_at {
                    k.expires_at = v;
                }
                if let Some(v) = req.enabled {
                    k.enabled = v;
                }
                Ok(())
            })
        })
        .await?;
    state.published(version);
    // Read after the write's commit: the bump is a write's last statement.
    let owner = key.sid.clone();
    let (secrets, last) = state
        .db()
        .read(move |c| Ok((c.secrets_of(&owner)?, c.last_used(&owner)?)))
        .await?;
    Ok(Json(key_json(&key, &secrets, &last)))
}

async fn delete_key(
    State(state): State<AppState>,
    Path((sid, key_sid)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
) -> Result<StatusCode, Error> {
    caller.managing(&sid)?;
    let version = state
        .db()
        .write(move |c| service::delete_key(c, &sid, &key_sid))
        .await?;
    state.published(version);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Regenerate {
    grace_seconds: Option<u64>,
}

async fn regenerate(
    State(state): State<AppState>,
    Path((sid, key_sid)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Json<Value>, Error> {
    let holder = caller.managing(&sid)?;
    let req: Regenerate = parse_json(&body)?;
    let grace = req.grace_seconds.unwrap_or(DEFAULT_GRACE_SECONDS);
    let caps = state.caps().clone();
    let r = state
        .db()
        .write(move |c| service::regenerate(c, &caps, &holder, &sid, &key_sid, grace))
        .await?;
    state.published(r.version);
    let owner = r.key.sid.clone();
    let last = state.db().read(move |c| c.last_used(&owner)).await?;
    let mut body = key_json(&r.key, &r.secrets, &last);
    body["secret"] = json!(r.secret.expose());
    Ok(Json(body))
}

async fn revoke_previous(
    State(state): State<AppState>,
    Path((sid, key_sid)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
) -> Result<StatusCode, Error> {
    caller.managing(&sid)?;
    let (_, version) = state
        .db()
        .write(move |c| service::revoke_previous(c, &sid, &key_sid))
        .await?;
    if let Some(v) = version {
        state.published(v);
    }
    Ok(StatusCode::NO_CONTENT)
}
