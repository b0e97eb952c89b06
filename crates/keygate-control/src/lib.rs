//! keygate-control: the control plane of keygate.
//!
//! Accounts and API keys the way Twilio and Exotel users expect them, stored in one SQLite file,
//! and the edge feed: the complete edge config (`keygate_core::config::ConfigDoc`, digests only)
//! at the current config version, with ETag / `If-None-Match` and a long-poll.
//!
//! [`app`] builds the router over an [`AppState`]; [`run`] serves it on a listener until a
//! shutdown future completes; `main.rs` only parses flags. Modules:
//! - [`twilio`]: the Twilio-compatible Keys resource under `/2010-04-01/Accounts/{sid}/Keys`;
//! - [`v1`]: keygate's own `/v1/accounts/...` (accounts, keys with roles, permissions,
//!   allowlists, limits, expiry, regeneration with grace);
//! - [`edge`] serves the edge feeds: `/v1/edge/config` (the whole document) and
//!   `/v1/edge/changes` (pages of what changed since a version, from the store's change log);
//! - [`ratelimit_config`]: `/v1/edge/ratelimit-config`, the fleet-wide limits as
//!   envoyproxy/ratelimit's or Limitador's configuration;
//! - [`service`]: the operations (one transaction and one version bump each), used by the
//!   handlers and the CLI; [`store`]: one interface over SQLite and Postgres; [`model`]:
//!   validation against the edge compiler; [`error`]: the service error, which [`http`] turns
//!   into a status and the `/v1` or Twilio shape;
//! - [`usage`]: `POST /v1/edge/usage` (the edges' counts, applied once per batch) and
//!   `GET /v1/accounts/{sid}/usage`; keys' `last_used_at`;
//! - [`fleet`]: the view of the edges polling the feed; [`ops`]: `/healthz`, `/readyz`,
//!   `/metrics`;
//! - [`console`]: the web console at `/console` (sessions; each page the `/v1` requests it
//!   stands for, judged by the same door);
//! - [`auth`]: every request judged by keygate-core's gate (the edge's own decision) over the
//!   store, before any handler runs; [`policy`]: no escalation through management, and caps;
//!   [`secret`]: CSPRNG secrets, digests, redaction.

pub mod auth;
pub mod catalog;
pub mod console;
pub mod edge;
pub mod error;
pub mod fleet;
pub mod http;
pub mod model;
pub mod ops;
pub mod policy;
#[doc(hidden)]
pub mod props;
pub mod ratelimit_config;
pub mod secret;
pub mod service;
pub mod store;
pub mod tls;
pub mod twilio;
pub mod usage;
pub mod v1;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use keygate_core::ip::IpAllowlist;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::Door;
pub use crate::catalog::{ApiCatalog, ControlLimits};
use crate::error::Error;
use crate::http::TwilioError;
pub use crate::policy::Caps;
pub use crate::store::Database;
use crate::store::Db;

/// Settings of a running control plane.
#[derive(Debug, Clone)]
pub struct Config {
    pub catalog: ApiCatalog,
    /// Region of accounts created without one.
    pub default_region: String,
    /// The control plane's own failed-authentication limiter and per-credential rate.
    pub limits: ControlLimits,
    /// Caps on what a tenant may hold.
    pub caps: Caps,
    /// Peers whose `X-Forwarded-For` names the client (`--trusted-proxies`; none by default).
    pub trusted_proxies: Option<IpAllowlist>,
    /// Edges not seen for this long leave the fleet view.
    pub edge_ttl: Duration,
    /// How often the server reads the config version from the database, to pick up versions
    /// committed elsewhere (the CLI; other replicas, whose NOTIFY normally comes first).
    pub version_poll: Duration,
    /// How long usage is kept per minute, then only per hour ([`usage`]).
    pub usage_retention: Duration,
    /// How long usage is kept per hour.
    pub usage_hourly_retention: Duration,
}

impl Config {
    pub fn with_built_in_catalog() -> Result<Config, String> {
        Ok(Config {
            catalog: ApiCatalog::built_in()?,
            default_region: DEFAULT_REGION.to_owned(),
            limits: ControlLimits::default(),
            caps: Caps::default(),
            trusted_proxies: None,
            edge_ttl: fleet::DEFAULT_EDGE_TTL,
            version_poll: Duration::from_millis(500),
            usage_retention: Duration::from_secs(usage::DEFAULT_RETENTION_DAYS * 86_400),
            usage_hourly_retention: Duration::from_secs(
                usage::DEFAULT_HOURLY_RETENTION_DAYS * 86_400,
            ),
        })
    }
}

pub const DEFAULT_REGION: &str = "us1";

/// Shared by every handler. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    config: Config,
    door: Arc<Door>,
    /// The latest config version known to this process (writes here, and a poll of the file for
    /// writes by other processes such as the CLI).
    version: watch::Sender<u64>,
    /// Set when the server shuts down, so long-polls return at once.
    closing: watch::Sender<bool>,
    /// The serialized edge config of one version.
    feed: tokio::sync::Mutex<Option<(u64, axum::body::Bytes)>>,
    fleet: fleet::Fleet,
    metrics: ops::Metrics,
    console: console::Console,
}

/// Checks every stored account and key with the edge's compiler against this catalogue, page
/// by page (memory bounded whatever the number of keys); returns the config version.
fn check_stored(db: &Db, cat: &ApiCatalog) -> Result<u64, String> {
    use keygate_core::compile::{compile_account_record, compile_catalog, compile_key_record};
    let refused = |sid: &str, e: keygate_core::compile::ConfigError| {
        format!("the stored keys do not compile with this catalogue: {sid}: {e}")
    };
    let mut after = String::new();
    loop {
        let page = db
            .read_blocking(|tx| {
                service::read_changes(tx, cat, 0, &after, service::MAX_CHANGES_LIMIT)
            })
            .map_err(|e| e.message())?;
        let compiled = compile_catalog(&page.settings_doc())
            .map_err(|e| format!("the catalogue does not compile: {e}"))?;
        for a in &page.accounts {
            compile_account_record(&compiled, a).map_err(|e| refused(&a.sid, e))?;
        }
        for k in &page.keys {
            compile_key_record(&compiled, k).map_err(|e| refused(&k.sid, e))?;
        }
        match page.next {
            Some(next) => after = next,
            None => return Ok(page.version),
        }
    }
}

impl AppState {
    /// Opens (creating and migrating) the database and checks that what it holds compiles as an
    /// edge config with this catalogue; refuses to start otherwise (the error names the place).
    /// Call from inside the tokio runtime that will serve (Postgres connections run on it).
    pub async fn open(database: &Database, config: Config) -> Result<AppState, String> {
        let db = Db::open(database).await?;
        let checked = db.clone();
        let cat = config.catalog.clone();
        let version = tokio::task::spawn_blocking(move || check_stored(&checked, &cat))
            .await
            .map_err(|e| format!("start-up check failed: {e}"))??;
        let door = Door::new(
            &config.catalog,
            &config.limits,
            config.trusted_proxies.clone(),
        )?;
        Ok(AppState {
            inner: Arc::new(Inner {
                db,
                door: Arc::new(door),
                fleet: fleet::Fleet::new(config.edge_ttl, version),
                metrics: ops::Metrics::new(),
                console: console::Console::new(console::session::Limits::default()),
                config,
                version: watch::Sender::new(version),
                closing: watch::Sender::new(false),
                feed: tokio::sync::Mutex::new(None),
            }),
        })
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    pub fn catalog(&self) -> &ApiCatalog {
        &self.inner.config.catalog
    }

    pub fn default_region(&self) -> &str {
        &self.inner.config.default_region
    }

    pub fn caps(&self) -> &Caps {
        &self.inner.config.caps
    }

    pub fn fleet(&self) -> &fleet::Fleet {
        &self.inner.fleet
    }

    pub fn metrics(&self) -> &ops::Metrics {
        &self.inner.metrics
    }

    pub fn console(&self) -> &console::Console {
        &self.inner.console
    }

    /// Records a committed config version and wakes long-polls.
    pub fn published(&self, version: u64) {
        self.inner.fleet.published(version);
        self.inner.version.send_if_modified(|v| {
            if version > *v {
                *v = version;
                true
            } else {
                false
            }
        });
    }

    pub fn current_version(&self) -> u64 {
        *self.inner.version.borrow()
    }
}

/// The router: Twilio-compatible Keys, keygate's `/v1`, the edge feed; JSON 404/405 elsewhere.
pub fn app(state: AppState) -> Router {
    Router::new()
        .merge(twilio::routes())
        .merge(v1::routes())
        .merge(edge::routes())
        .merge(ratelimit_config::routes())
        .merge(fleet::routes())
        .merge(usage::routes())
        .merge(ops::routes())
        .merge(console::routes())
        .fallback(|| async { Error::NotFound })
        .method_not_allowed_fallback(|| async { Error::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(state.clone(), gatekeeper))
        .layer(middleware::from_fn_with_state(state.clone(), log_request))
        .with_state(state)
}

/// Judges every request before any handler runs (see [`auth`]): the caller reaches handlers as
/// an [`auth::Caller`] extension; a refusal is answered here, in the Twilio shape on Twilio's
/// paths. The body is read (up to the cap) only once the caller is admitted.
async fn gatekeeper(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    // The console judges its own requests: by session, then each as the API request it makes.
    if ops::is_open_path(req.uri().path()) || console::is_console_path(req.uri().path()) {
        return next.run(req).await;
    }
    let twilio = req.uri().path().starts_with("/2010-04-01/");
    match admit(&state, req).await {
        Ok(req) => next.run(req).await,
        Err(e) if twilio => TwilioError(e).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn admit(state: &AppState, req: Request) -> Result<Request, Error> {
    let door = state.inner.door.clone();
    let client_ip = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .and_then(|ConnectInfo(peer)| {
            let xff: Vec<&[u8]> = req
                .headers()
                .get_all("x-forwarded-for")
                .iter()
                .map(|v| v.as_bytes())
                .collect();
            door.client_ip(peer.ip(), &xff)
        });
    let method = req.method().as_str().as_bytes().to_vec();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .as_bytes()
        .to_vec();
    let authorization: Vec<Vec<u8>> = req
        .headers()
        .get_all(axum::http::header::AUTHORIZATION)
        .iter()
        .map(|v| v.as_bytes().to_vec())
        .collect();
    let now_us = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros(),
    )
    .unwrap_or(u64::MAX);
    if let Some(refused) = door.refused_early(&authorization, client_ip, now_us) {
        return Err(refused);
    }
    let caller = state
        .db()
        .read(move |tx| door.judge(tx, &method, &path, &authorization, client_ip, now_us))
        .await?;
    let limit = state.caps().body_bytes;
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| state.caps().body_too_large())?;
    let mut req = Request::from_parts(parts, axum::body::Body::from(bytes));
    req.extensions_mut().insert(caller);
    Ok(req)
}

/// One structured line per request: method, route template (never the raw path or query, so a
/// secret pasted into a URL is not logged), status, duration; and the request counted in
/// `/metrics` with the same labels. Headers are never logged.
async fn log_request(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let started = Instant::now();
    let resp = next.run(req).await;
    let route = route.as_deref().unwrap_or("(unmatched)");
    tracing::info!(
        method = %method,
        route,
        status = resp.status().as_u16(),
        ms = started.elapsed().as_millis() as u64,
        "request"
    );
    state
        .metrics()
        .requests
        .get_or_create(&ops::RequestLabels {
            method: method.as_str().to_owned(),
            route: route.to_owned(),
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

/// Serves `app` on `listener` until `shutdown` completes, then drains in-flight requests.
/// Handlers get the TCP peer as `ConnectInfo<SocketAddr>`.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_on(listener, state, None, shutdown).await
}

/// [`run`] over TLS with `tls` (see [`tls::load`]); handlers get the TLS connection's TCP peer
/// as `ConnectInfo<SocketAddr>`, and shutdown drains the same way.
pub async fn run_tls(
    listener: TcpListener,
    state: AppState,
    tls: Arc<tls::ServerConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_on(listener, state, Some(tls), shutdown).await
}

async fn serve_on(
    listener: TcpListener,
    state: AppState,
    tls: Option<Arc<tls::ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let poller = tokio::spawn(poll_version(state.clone()));
    let fleet_writer = tokio::spawn(fleet::flush_every_second(state.clone()));
    let usage_pruner = {
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        let c = &state.inner.config;
        let (minutes, hours) = (secs(c.usage_retention), secs(c.usage_hourly_retention));
        tokio::spawn(usage::prune_every_minute(state.clone(), minutes, hours))
    };
    let listener_task = state.db().postgres().map(|pg| {
        let s = state.clone();
        tokio::spawn(pg.clone().listen(move |v| s.published(v)))
    });
    let closing = state.inner.closing.clone();
    let shutdown = async move {
        shutdown.await;
        closing.send_replace(true);
    };
    let result = match tls {
        None => {
            axum::serve(
                listener,
                app(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(shutdown)
            .await
        }
        Some(config) => tls::serve(listener, config, app(state), shutdown).await,
    };
    poller.abort();
    fleet_writer.abort();
    usage_pruner.abort();
    if let Some(t) = listener_task {
        t.abort();
    }
    result
}

/// Picks up versions committed by other processes (the CLI, other replicas) within
/// `version_poll` (half a second by default): on SQLite the only way, on Postgres a backstop
/// behind LISTEN/NOTIFY.
async fn poll_version(state: AppState) {
    let mut tick = tokio::time::interval(state.inner.config.version_poll);
    loop {
        tick.tick().await;
        if let Ok(v) = state.db().read(|tx| tx.version()).await {
            state.published(v);
        }
    }
}

/// A future that completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// Parses a JSON body into `T`; errors name the field (`limits.rate.per: invalid type ...`).
/// An empty body reads as `{}`.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "body".to_owned() } else { path };
        Error::bad(&field, without_position(e.into_inner()))
    })?;
    de.end()
        .map_err(|e| Error::bad("body", without_position(e)))?;
    Ok(value)
}

/// serde_json's message without its " at line 1 column 9" suffix (the field is already named).
fn without_position(e: serde_json::Error) -> String {
    let m = e.to_string();
    match m.rfind(" at line ") {
        Some(i) => m[..i].to_owned(),
        None => m,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::config::Role;

    /// A catalogue that no longer has an API some key is limited to would make the feed one the
    /// edge refuses: the server refuses to start instead, naming the key.
    #[tokio::test]
    async fn serve_refuses_a_catalogue_the_stored_keys_do_not_compile_with() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let cfg = Config::with_built_in_catalog().unwrap();
        let mut conn = store::sqlite::open(&path).unwrap();
        let out =
            store::sqlite::write(&mut conn, |tx| service::init(tx, &cfg.catalog, "us1", None))
                .unwrap();
        let mut new = service::NewKey::with_role(Role::Standard);
        new.apis = Some(vec!["messages".to_owned()]);
        let (key, _, _) = store::sqlite::write(&mut conn, |tx| {
            service::create_key(
                tx,
                &cfg.catalog,
                &Caps::default(),
                &policy::Holdings::Operator,
                &out.account.sid,
                new,
            )
        })
        .unwrap();
        drop(conn);
        let mut narrower = cfg.clone();
        narrower.catalog.apis.retain(|a| a.name != "messages");
        let database = Database::Sqlite(path);
        let err = AppState::open(&database, narrower).await.err().unwrap();
        assert_eq!(
            err,
            format!(
                "the stored keys do not compile with this catalogue: {}: key.apis[0]: unknown API \"messages\"",
                key.sid
            )
        );
        assert!(AppState::open(&database, cfg).await.is_ok());
    }
}
