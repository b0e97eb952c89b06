//! The console: server-rendered pages at `/console` for account owners (the account's SID and
//! auth token, or a main key's SID and secret) and for the operator (the admin token).
//!
//! - Who may sign in is decided by the door, as for the API: signing in is the API request the
//!   console's first page makes (`GET /v1/accounts/{sid}` for an owner, an admin-only read for
//!   the operator), and every later page and action is the `/v1` request it stands for, sent
//!   in-process with the session's credential ([`api`]). A standard or publishable key is
//!   refused at sign-in with the door's `permission_denied`, as its API request would be.
//! - Sessions, CSRF tokens and the one-time flash: [`session`]. Every POST carries the session's
//!   CSRF token or is refused (403 `csrf_invalid`) before anything is done.
//! - A secret (a created or regenerated key's, a new account's auth token) is shown once: the
//!   POST that made it keeps it in the session's flash and redirects (303) to the owner's page,
//!   whose GET takes it out of the session as it shows it; a reload shows it no more. No secret
//!   is ever in a URL, and the request log names routes only.
//! - Pages: [`owner`] (keys, one key: secrets and their last use, regenerate, revoke, enable,
//!   edit, limits, usage charts, delete) and [`operator`] (accounts, fleet); HTML in [`page`],
//!   usage charts in [`chart`]. No third-party script or style; the one script (copy buttons) is
//!   ours and every page works without it.

// Guards and checks answer the page to send instead (`Result<_, Response>`): the handler returns
// it at once, so boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

pub mod api;
pub mod chart;
mod operator;
mod owner;
pub mod page;
pub mod session;

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{header, Method, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use maud::html;
use serde_json::Value;

use crate::AppState;
use api::{Origin, Refused};
use page::{csrf, layout, redirect, respond};
use session::{Credential, Flash, Session, Sessions, Who, COOKIE};

/// The console's state, held by [`AppState`].
#[derive(Debug)]
pub struct Console {
    pub sessions: Sessions,
}

impl Console {
    pub fn new(limits: session::Limits) -> Console {
        Console {
            sessions: Sessions::new(limits),
        }
    }
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/console", get(home))
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/static/console.css", get(css))
        .route("/console/static/console.js", get(js))
        .route("/console/keys", get(owner::keys).post(owner::create))
        .route("/console/keys/{key_sid}", get(owner::key))
        .route(
            "/console/keys/{key_sid}/delete",
            get(owner::confirm_delete).post(owner::delete),
        )
        .route("/console/keys/{key_sid}/{action}", post(owner::act))
        .route(
            "/console/accounts",
            get(operator::accounts).post(operator::create),
        )
        .route("/console/accounts/{sid}", get(operator::account))
        .route("/console/accounts/{sid}/{action}", post(operator::act))
        .route("/console/fleet", get(operator::fleet))
}

/// Whether a path is the console's (judged by its sessions, not by the API's door directly).
pub fn is_console_path(path: &str) -> bool {
    path == "/console" || path.starts_with("/console/")
}

/// What every console handler knows about its request.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The session cookie's id and its session, when it names a live one.
    pub session: Option<(String, Session)>,
    pub origin: Origin,
    /// Served over TLS (the cookie is then `Secure`).
    pub tls: bool,
}

impl FromRequestParts<AppState> for Ctx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Ctx, Self::Rejection> {
        let id = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| *k == COOKIE)
            .map(|(_, v)| v.to_owned());
        let sessions = &state.console().sessions;
        let session = id.and_then(|id| sessions.get(&id, Instant::now()).map(|s| (id, s)));
        let peer = parts
            .extensions
            .get::<ConnectInfo<std::net::SocketAddr>>()
            .cloned();
        Ok(Ctx {
            session,
            origin: Origin::of(&parts.headers, peer),
            tls: parts
                .extensions
                .get::<crate::tls::ServedOverTls>()
                .is_some(),
        })
    }
}

/// A signed-in session: its id, the session and who it is.
pub struct SignedIn {
    pub id: String,
    pub session: Session,
    pub who: Who,
}

impl Ctx {
    fn signed_in(&self) -> Option<SignedIn> {
        let (id, session) = self.session.clone()?;
        let who = session.who.clone()?;
        Some(SignedIn { id, session, who })
    }
}

/// A form's fields (repeated names kept, in order).
#[derive(Debug, Default)]
pub struct Form(Vec<(String, String)>);

impl Form {
    fn parse(body: &[u8]) -> Form {
        Form(serde_urlencoded::from_bytes(body).unwrap_or_default())
    }
    /// The field's value, trimmed; `None` when absent or empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }
    /// Every value of a repeated field (checkboxes).
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .collect()
    }
}

/// The refusal of a POST whose CSRF token is missing or wrong.
pub const CSRF_CODE: &str = "csrf_invalid";
pub const CSRF_MESSAGE: &str =
    "the form's CSRF token is missing or does not match this session; reload the page and submit it again";

/// The session and the form of a POST, once its CSRF token is checked; else the refusal (403
/// `csrf_invalid`; nothing is done).
fn checked(ctx: &Ctx, body: &Bytes) -> Result<(String, Session, Form), Response> {
    let form = Form::parse(body);
    match &ctx.session {
        Some((id, s)) if Sessions::check_csrf(s, form.get("csrf")) => {
            Ok((id.clone(), s.clone(), form))
        }
        other => Err(page::refusal(
            StatusCode::FORBIDDEN,
            CSRF_CODE,
            CSRF_MESSAGE,
            other.as_ref().map(|(_, s)| s),
        )),
    }
}

/// A POST by a signed-in session: CSRF checked, else refused; no session: to the sign-in page.
fn posted(ctx: &Ctx, body: &Bytes) -> Result<(SignedIn, Form), Response> {
    let (id, session, form) = checked(ctx, body)?;
    match session.who.clone() {
        Some(who) => Ok((SignedIn { id, session, who }, form)),
        None => Err(redirect("/console/login")),
    }
}

/// The API's answer to the session's request `method path`.
async fn call(
    state: &AppState,
    ctx: &Ctx,
    who: &Who,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, Refused> {
    api::call(state, &ctx.origin, who.credential(), method, path, body).await
}

/// After a refused POST: a 401 means the session's credential no longer authenticates (revoked,
/// regenerated without grace, deleted, account suspended): the session ends. Otherwise the
/// refusal is shown once on `back`.
fn refused_then(state: &AppState, ctx: &Ctx, me: &SignedIn, r: Refused, back: &str) -> Response {
    if r.status == StatusCode::UNAUTHORIZED {
        return ended(state, ctx, &me.id);
    }
    state.console().sessions.flash(
        &me.id,
        Flash::Refused {
            code: r.code,
            message: r.message,
        },
    );
    redirect(back)
}

/// A GET whose API read was refused: the refusal page (a 401 ends the session).
fn refused_page(state: &AppState, ctx: &Ctx, me: &SignedIn, r: Refused) -> Response {
    if r.status == StatusCode::UNAUTHORIZED {
        return ended(state, ctx, &me.id);
    }
    page::refusal(r.status, &r.code, &r.message, Some(&me.session))
}

fn ended(state: &AppState, ctx: &Ctx, id: &str) -> Response {
    state.console().sessions.end(id);
    let mut resp = redirect("/console/login?ended=1");
    page::clear_cookie(&mut resp, ctx.tls);
    resp
}

async fn home(ctx: Ctx) -> Response {
    match ctx.signed_in().map(|s| s.who) {
        Some(Who::Owner { .. }) => redirect("/console/keys"),
        Some(Who::Operator { .. }) => redirect("/console/accounts"),
        None => redirect("/console/login"),
    }
}

async fn css() -> Response {
    page::asset("text/css; charset=utf-8", page::CSS)
}

async fn js() -> Response {
    page::asset("text/javascript; charset=utf-8", page::JS)
}

#[derive(Debug, serde::Deserialize)]
struct LoginQuery {
    ended: Option<String>,
}

async fn login_page(
    State(state): State<AppState>,
    ctx: Ctx,
    Query(q): Query<LoginQuery>,
) -> Response {
    if ctx.signed_in().is_some() {
        return redirect("/console");
    }
    let flashes: Vec<Flash> = q
        .ended
        .map(|_| {
            Flash::Refused {
                code: "session_ended".to_owned(),
                message: "the credential this session was opened with no longer authenticates (revoked, regenerated, deleted or suspended); sign in again".to_owned(),
            }
        })
        .into_iter()
        .collect();
    login_form(&state, &ctx, StatusCode::OK, &flashes, None)
}

/// The sign-in page, with an anonymous session for its CSRF token (a new one unless the
/// request has one).
fn login_form(
    state: &AppState,
    ctx: &Ctx,
    status: StatusCode,
    flashes: &[Flash],
    sid: Option<&str>,
) -> Response {
    let sessions = &state.console().sessions;
    let (id, session, new) = match &ctx.session {
        Some((id, s)) => (id.clone(), s.clone(), false),
        None => {
            let Ok(id) = sessions.start(None, Instant::now()) else {
                return page::refusal(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "Internal error",
                    None,
                );
            };
            let Some(s) = sessions.get(&id, Instant::now()) else {
                return page::refusal(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "Internal error",
                    None,
                );
            };
            (id, s, true)
        }
    };
    let body = html! {
        p { "Account owners sign in with their account SID and auth token, or with a main key's SID and secret. Standard and publishable keys cannot sign in. The operator signs in with the admin token." }
        div class="login" {
            section aria-labelledby="owner-title" {
                h2 id="owner-title" { "Account owner" }
                form method="post" action="/console/login" class="stack" id="owner-login" {
                    (csrf(&session))
                    input type="hidden" name="kind" value="owner";
                    div {
                        label for="sid" { "Account SID or main key SID" }
                        input type="text" id="sid" name="sid" autocomplete="username" required
                            spellcheck="false" value=(sid.unwrap_or(""));
                    }
                    div {
                        label for="secret" { "Auth token or key secret" }
                        input type="password" id="secret" name="secret" autocomplete="current-password" required;
                    }
                    div { button type="submit" { "Sign in" } }
                }
            }
            section aria-labelledby="operator-title" {
                h2 id="operator-title" { "Operator" }
                form method="post" action="/console/login" class="stack" id="operator-login" {
                    (csrf(&session))
                    input type="hidden" name="kind" value="operator";
                    div {
                        label for="token" { "Admin token" }
                        input type="password" id="token" name="token" autocomplete="current-password" required;
                    }
                    div { button type="submit" { "Sign in as operator" } }
                }
            }
        }
    };
    let mut resp = respond(status, layout("Sign in", None, flashes, body));
    if new {
        page::set_cookie(&mut resp, &id, ctx.tls);
    }
    resp
}

/// A SID as typed at sign-in: letters and digits only (it goes into an API path).
fn sid_ok(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A stand-in account SID for a key SID that names no key: the door then refuses the sign-in
/// exactly as it refuses a wrong secret.
const NO_ACCOUNT: &str = "AC00000000000000000000000000000000";

async fn login(State(state): State<AppState>, ctx: Ctx, body: Bytes) -> Response {
    let (anon_id, _, form) = match checked(&ctx, &body) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let refused = |r: Refused, sid: Option<&str>| {
        let f = [Flash::Refused {
            code: r.code,
            message: r.message,
        }];
        login_form(&state, &ctx, r.status, &f, sid)
    };
    let who = match form.get("kind") {
        Some("operator") => {
            let token = form.get("token").unwrap_or("");
            let credential = Credential::new(format!("Bearer {token}"));
            let who = Who::Operator { credential };
            match call(
                &state,
                &ctx,
                &who,
                Method::GET,
                "/v1/edge/fleet?version=0",
                None,
            )
            .await
            {
                Ok(_) => who,
                Err(r) => return refused(r, None),
            }
        }
        _ => {
            let sid = form.get("sid").unwrap_or("");
            if !sid_ok(sid) {
                let r = Refused {
                    status: StatusCode::BAD_REQUEST,
                    code: "invalid_request".to_owned(),
                    message: "sid: must be an account SID (AC…) or a key SID (SK…)".to_owned(),
                };
                return refused(r, None);
            }
            let account_sid = if sid.starts_with("AC") {
                sid.to_owned()
            } else {
                let key_sid = sid.to_owned();
                match state.db().read(move |tx| tx.get_key_by_sid(&key_sid)).await {
                    Ok(Some(k)) => k.account_sid,
                    Ok(None) => NO_ACCOUNT.to_owned(),
                    Err(e) => {
                        return page::refusal(crate::http::status(&e), e.code(), &e.message(), None)
                    }
                }
            };
            let secret = form.get("secret").unwrap_or("");
            let basic = base64::engine::general_purpose::STANDARD.encode(format!("{sid}:{secret}"));
            let who = Who::Owner {
                account_sid: account_sid.clone(),
                key_sid: (!sid.starts_with("AC")).then(|| sid.to_owned()),
                credential: Credential::new(format!("Basic {basic}")),
            };
            let path = format!("/v1/accounts/{account_sid}");
            match call(&state, &ctx, &who, Method::GET, &path, None).await {
                Ok(_) => who,
                Err(r) => return refused(r, Some(sid)),
            }
        }
    };
    let sessions = &state.console().sessions;
    let now = Instant::now();
    sessions.end(&anon_id);
    sessions.sweep(now);
    let id = match sessions.start(Some(who), now) {
        Ok(id) => id,
        Err(e) => return page::refusal(crate::http::status(&e), e.code(), &e.message(), None),
    };
    let mut resp = redirect("/console");
    page::set_cookie(&mut resp, &id, ctx.tls);
    resp
}

async fn logout(State(state): State<AppState>, ctx: Ctx, body: Bytes) -> Response {
    let (id, _, _) = match checked(&ctx, &body) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    state.console().sessions.end(&id);
    let mut resp = redirect("/console/login");
    page::clear_cookie(&mut resp, ctx.tls);
    resp
}
