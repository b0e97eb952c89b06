//! The Keys resource of Twilio's REST API, unchanged apart from the base URL.
//!
//! | method | path | |
//! |---|---|---|
//! | `POST` | `/2010-04-01/Accounts/{AccountSid}/Keys.json` | create (201, with `secret`, the only time it is shown) |
//! | `GET` | `/2010-04-01/Accounts/{AccountSid}/Keys.json` | list, sorted by date updated, Twilio paging |
//! | `GET` | `/2010-04-01/Accounts/{AccountSid}/Keys/{Sid}.json` | fetch |
//! | `POST` | `/2010-04-01/Accounts/{AccountSid}/Keys/{Sid}.json` | update `FriendlyName` |
//! | `DELETE` | `/2010-04-01/Accounts/{AccountSid}/Keys/{Sid}.json` | delete = revoke (204) |
//!
//! Bodies are `application/x-www-form-urlencoded`; dates are RFC 2822 GMT; errors are Twilio's
//! `{"code","message","more_info","status"}`. Keys created here are `standard`, as Twilio's API
//! creates them, unless the keygate extension field `KeyType` (`main`, `standard`,
//! `publishable`) says otherwise.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use keygate_core::config::Role;
use serde_json::{json, Map, Value};

use crate::auth::Caller;
use crate::error::Error;
use crate::http::TwilioError;
use crate::model::{self, rfc2822, Key};
use crate::service::{self, NewKey};
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/2010-04-01/Accounts/{account_sid}/Keys.json",
            get(list).post(create),
        )
        .route(
            "/2010-04-01/Accounts/{account_sid}/Keys/{key_file}",
            get(fetch).post(update).delete(delete),
        )
}

const DEFAULT_PAGE_SIZE: u64 = 50;
const MAX_PAGE_SIZE: u64 = 1000;

/// The Twilio representation (never with the secret).
fn key_json(k: &Key) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("sid".into(), json!(k.sid));
    m.insert("friendly_name".into(), json!(k.friendly_name));
    m.insert("date_created".into(), json!(rfc2822(k.created_at)));
    m.insert("date_updated".into(), json!(rfc2822(k.updated_at)));
    m
}

/// Form fields; the last of a repeated field wins.
fn form(body: &[u8]) -> Result<Vec<(String, String)>, Error> {
    serde_urlencoded::from_bytes(body)
        .map_err(|_| Error::bad("body", "must be application/x-www-form-urlencoded"))
}

fn field<'f>(fields: &'f [(String, String)], name: &str) -> Option<&'f str> {
    fields
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn key_sid(key_file: &str) -> Result<String, Error> {
    key_file
        .strip_suffix(".json")
        .map(str::to_owned)
        .ok_or(Error::NotFound)
}

async fn create(
    State(state): State<AppState>,
    Path(account_sid): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, TwilioError> {
    let holder = caller.managing(&account_sid)?;
    let fields = form(&body)?;
    let role = match field(&fields, "KeyType") {
        None => Role::Standard,
        Some(t) => model::parse_role(t)
            .ok_or_else(|| Error::bad("KeyType", "must be main, standard or publishable"))?,
    };
    let mut new = NewKey::with_role(role);
    if let Some(name) = field(&fields, "FriendlyName") {
        model::validate_friendly_name("FriendlyName", name)?;
        new.friendly_name = Some(name.to_owned());
    }
    let (cat, caps) = (state.catalog().clone(), state.caps().clone());
    let (key, secret, version) = state
        .db()
        .write(move |c| service::create_key(c, &cat, &caps, &holder, &account_sid, new))
        .await?;
    state.published(version);
    let mut body = key_json(&key);
    body.insert("secret".into(), json!(secret.expose()));
    Ok((StatusCode::CREATED, Json(Value::Object(body))).into_response())
}

async fn fetch(
    State(state): State<AppState>,
    Path((account_sid, key_file)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, TwilioError> {
    caller.managing(&account_sid)?;
    let sid = key_sid(&key_file)?;
    let key = state
        .db()
        .read(move |c| c.get_key(&account_sid, &sid))
        .await?
        .ok_or(Error::NotFound)?;
    Ok(Json(Value::Object(key_json(&key))))
}

async fn update(
    State(state): State<AppState>,
    Path((account_sid, key_file)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Json<Value>, TwilioError> {
    let holder = caller.managing(&account_sid)?;
    let sid = key_sid(&key_file)?;
    let fields = form(&body)?;
    let name = field(&fields, "FriendlyName").map(str::to_owned);
    if let Some(n) = &name {
        model::validate_friendly_name("FriendlyName", n)?;
    }
    let (cat, caps) = (state.catalog().clone(), state.caps().clone());
    let (key, version) = state
        .db()
        .write(move |c| {
            service::update_key(c, &cat, &caps, &holder, &account_sid, &sid, |k| {
                if name.is_some() {
                    k.friendly_name = name;
                }
                Ok(())
            })
        })
        .await?;
    state.published(version);
    Ok(Json(Value::Object(key_json(&key))))
}

async fn delete(
    State(state): State<AppState>,
    Path((account_sid, key_file)): Path<(String, String)>,
    Extension(caller): Extension<Caller>,
) -> Result<StatusCode, TwilioError> {
    caller.managing(&account_sid)?;
    let sid = key_sid(&key_file)?;
    let version = state
        .db()
        .write(move |c| service::delete_key(c, &account_sid, &sid))
        .await?;
    state.published(version);
    Ok(StatusCode::NO_CONTENT)
}

fn page_param(
    fields: &[(String, String)],
    name: &str,
    min: u64,
    max: u64,
    default: u64,
) -> Result<u64, Error> {
    match field(fields, name) {
        None => Ok(default),
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .ok_or_else(|| Error::bad(name, format!("must be an integer from {min} to {max}"))),
    }
}

async fn list(
    State(state): State<AppState>,
    Path(account_sid): Path<String>,
    RawQuery(query): RawQuery,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, TwilioError> {
    caller.managing(&account_sid)?;
    let fields: Vec<(String, String)> = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|_| Error::bad("query", "must be URL-encoded"))?;
    let page_size = page_param(&fields, "PageSize", 1, MAX_PAGE_SIZE, DEFAULT_PAGE_SIZE)?;
    let page = page_param(&fields, "Page", 0, u64::from(u32::MAX), 0)?;
    // PageToken is accepted (clients copy next_page_uri verbatim); Page and PageSize position.
    let start = page * page_size;
    let acc = account_sid.clone();
    let (account_known, mut keys) = state
        .db()
        .read(move |c| {
            Ok((
                c.get_account(&acc)?.is_some(),
                c.list_keys(&acc, start, page_size + 1)?,
            ))
        })
        .await?;
    if !account_known {
        return Err(Error::NotFound.into());
    }
    let more = keys.len() as u64 > page_size;
    keys.truncate(usize::try_from(page_size).unwrap_or(usize::MAX));
    let base = format!("/2010-04-01/Accounts/{account_sid}/Keys.json");
    let uri = |p: u64| format!("{base}?PageSize={page_size}&Page={p}");
    let next = match keys.last() {
        Some(last) if more => json!(format!("{}&PageToken=PA{}", uri(page + 1), last.sid)),
        _ => Value::Null,
    };
    let previous = if page > 0 {
        json!(uri(page - 1))
    } else {
        Value::Null
    };
    let count = keys.len() as u64;
    Ok(Json(json!({
        "keys": keys.iter().map(|k| Value::Object(key_json(k))).collect::<Vec<_>>(),
        "first_page_uri": uri(0),
        "end": if count == 0 { start } else { start + count - 1 },
        "previous_page_uri": previous,
        "next_page_uri": next,
        "page": page,
        "page_size": page_size,
        "start": start,
        "uri": uri(page),
    })))
}
