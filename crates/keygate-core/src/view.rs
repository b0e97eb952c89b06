//! The config a request is judged against, and the reply it gets: what the filter's glue asks
//! for each request, with no policy of its own.
//!
//! [`Source`] is where a plugin's config comes from (none, a static document compiled at
//! configure time, or the control plane's published version). [`Source::view`] resolves the view
//! in force for one request at one clock reading: in control-plane mode it reads the head, refuses
//! a stale config (503 `config_stale`) unless `on_stale: serve`, and compiles each version's
//! catalogue once per VM. [`View::answer`] turns the gate's verdict into what the glue sends:
//! a denial's status, headers and body, or an allow's response headers and concurrency ticket.

use std::cell::RefCell;
use std::sync::Arc;

use crate::compile::{Catalog, CompiledConfig, Directory, Principal, StaticDirectory};
use crate::config::WrongRegion;
use crate::decision::Allow;
use crate::digest::Digest32;
use crate::gate::{self, Denial, FleetHold, InForce, InflightTicket, Verdict};
use crate::plugin::{parse_plugin_config, ControlPlane, OnStale, PluginConfig};
use crate::poller::{Level, TICK_MS};
use crate::published::{load_catalog, read_head, Head, RecordCache, SharedDirectory};
use crate::ratelimit::Quota;
use crate::reason::Reason;
use crate::store::SharedStore;

/// Seconds a client is told to wait (`Retry-After`) when no config, or only a stale one, is in
/// force.
pub const NO_CONFIG_RETRY_AFTER_S: u64 = 5;

/// Compare-and-swap tries when no config says otherwise.
const DEFAULT_CAS_RETRIES: u32 = 16;

/// Where a plugin's config comes from.
#[derive(Default)]
pub enum Source {
    /// Nothing configured: every request gets 503 `no_config`.
    #[default]
    None,
    /// A whole document, compiled at configure time.
    Static {
        catalog: Arc<Catalog>,
        directory: StaticDirectory,
        /// The edge's region, from the plugin configuration.
        region: Option<String>,
    },
    /// The control plane's version in force, published in shared data by the elected poller.
    Published(Published),
}

/// Control-plane mode: the source, and this VM's compiled view of the published version.
pub struct Published {
    pub control_plane: ControlPlane,
    /// The catalogue of the version this VM last judged with.
    catalog: RefCell<Option<(u64, Arc<Catalog>)>>,
    /// Compiled keys and accounts of that version (bounded).
    cache: RefCell<RecordCache>,
}

/// What a new plugin configuration does.
pub struct Configured {
    /// The new source; `None` keeps the one in force.
    pub source: Option<Source>,
    /// Whether the host may take the configuration (a rejected one is refused, so Envoy keeps
    /// the filter config in force).
    pub accepted: bool,
    /// What to log (never the edge token nor a secret).
    pub log: (Level, String),
    /// The tick period to set, in ms: the poller's, or the lease heartbeat's when a static
    /// config has concurrency or rate limits.
    pub tick_ms: Option<u64>,
    /// The static version now in force (the version gauge).
    pub version: Option<u64>,
}

impl Source {
    /// What the plugin configuration `bytes` makes of this source: blank keeps it (every
    /// request gets `no_config` if nothing is in force), a static document or a control-plane
    /// source replaces it, anything that does not compile is rejected and it stays.
    pub fn configure(&self, bytes: &[u8]) -> Configured {
        let keep = |accepted, log| Configured {
            source: None,
            accepted,
            log,
            tick_ms: None,
            version: None,
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            let line = "empty plugin configuration; every request gets 503 no_config";
            return keep(true, (Level::Warn, line.to_owned()));
        }
        match parse_plugin_config(bytes) {
            Ok(PluginConfig::Static {
                config: cfg,
                region,
            }) => {
                let (accounts, keys, apis) = cfg.counts();
                let version = cfg.version();
                let line = format!(
                    "config version {version} in force: {accounts} accounts, {keys} keys, {apis} apis"
                );
                Configured {
                    // Rate leases ended before they expire (every TICK_MS), concurrency
                    // heartbeats.
                    tick_ms: if cfg.uses_rate_limits() {
                        Some(TICK_MS)
                    } else {
                        (cfg.uses_concurrency_limits()).then_some(gate::INFLIGHT_HEARTBEAT_S * 1000)
                    },
                    source: Some(Source::from_static_in(*cfg, region)),
                    accepted: true,
                    log: (Level::Info, line),
                    version: Some(version),
                }
            }
            Ok(PluginConfig::ControlPlane(cp)) => {
                // Never the token.
                let line = format!(
                    "control-plane mode: feed {}{} on cluster {:?}, long-poll {} s",
                    cp.authority, cp.path, cp.cluster, cp.wait_s
                );
                Configured {
                    source: Some(Source::from_control_plane(cp)),
                    accepted: true,
                    log: (Level::Info, line),
                    // Ticks drive the poller election, fetch retries and lease heartbeats.
                    tick_ms: Some(TICK_MS),
                    version: None,
                }
            }
            Err(e) => {
                let kept = match self {
                    Source::Static { catalog, .. } => {
                        format!("keeping version {}", catalog.version())
                    }
                    Source::Published(_) => "keeping the control-plane source".to_owned(),
                    Source::None => "no config in force".to_owned(),
                };
                // ConfigError messages name paths and values from the document, never digests'
                // preimages (the document holds none) nor the edge token.
                keep(
                    false,
                    (Level::Error, format!("config rejected: {e} ({kept})")),
                )
            }
        }
    }

    /// A static config at an edge with no region.
    pub fn from_static(cfg: CompiledConfig) -> Source {
        Source::from_static_in(cfg, None)
    }

    /// A static config at an edge in `region`.
    pub fn from_static_in(cfg: CompiledConfig, region: Option<String>) -> Source {
        Source::Static {
            catalog: Arc::new(cfg.catalog),
            directory: cfg.directory,
            region,
        }
    }

    pub fn from_control_plane(control_plane: ControlPlane) -> Source {
        Source::Published(Published {
            control_plane,
            catalog: RefCell::new(None),
            cache: RefCell::new(RecordCache::default()),
        })
    }

    /// The view in force for a request at `now_us`, or the reason it is refused: 503
    /// `no_config` (nothing configured, nothing published yet, or the published catalogue does
    /// not load), 503 `config_stale` (the control plane has not been heard from for
    /// `max_staleness_s` plus `wait_s`, unless `on_stale: serve`).
    pub fn view<'a>(&'a self, store: &'a dyn SharedStore, now_us: u64) -> Result<View<'a>, Reason> {
        match self {
            Source::None => Err(Reason::NoConfig),
            Source::Static {
                catalog,
                directory,
                region,
            } => Ok(View {
                catalog: catalog.clone(),
                directory: ViewDirectory::Static(directory),
                region: region.as_deref(),
                version: None,
                stale_served: false,
                compiled: None,
            }),
            Source::Published(p) => {
                let head = read_head(store).ok_or(Reason::NoConfig)?;
                let cp = &p.control_plane;
                let stale = cp.is_stale(now_us / 1_000_000, head.contacted_at_s);
                if stale && cp.on_stale == OnStale::Deny {
                    return Err(Reason::ConfigStale);
                }
                let (catalog, compiled) = p.catalog(store, &head).ok_or(Reason::NoConfig)?;
                Ok(View {
                    catalog,
                    directory: ViewDirectory::Published {
                        store,
                        head,
                        cache: &p.cache,
                    },
                    region: cp.region.as_deref(),
                    version: cp.debug_version_header.then(|| head.version.to_string()),
                    stale_served: stale,
                    compiled: compiled.then_some(head.version),
                })
            }
        }
    }

    /// Compare-and-swap tries for work outside a request (lease heartbeats on a tick): the
    /// static config's, the catalogue this VM last judged with, or the one the head names now
    /// (read again); 16 if there is none.
    pub fn max_cas_retries(&self, store: &dyn SharedStore) -> u32 {
        match self {
            Source::None => DEFAULT_CAS_RETRIES,
            Source::Static { catalog, .. } => catalog.max_cas_retries(),
            Source::Published(p) => {
                let cached = p
                    .catalog
                    .borrow()
                    .as_ref()
                    .map(|(_, c)| c.max_cas_retries());
                cached
                    .or_else(|| {
                        read_head(store)
                            .and_then(|h| load_catalog(store, &h))
                            .map(|c| c.max_cas_retries())
                    })
                    .unwrap_or(DEFAULT_CAS_RETRIES)
            }
        }
    }
}

impl Published {
    /// The catalogue of the head's version, compiled once per version per VM; true if this call
    /// compiled it.
    fn catalog(&self, store: &dyn SharedStore, head: &Head) -> Option<(Arc<Catalog>, bool)> {
        if let Some((v, c)) = &*self.catalog.borrow() {
            if *v == head.version {
                return Some((c.clone(), false));
            }
        }
        let c = Arc::new(load_catalog(store, head)?);
        *self.catalog.borrow_mut() = Some((head.version, c.clone()));
        Some((c, true))
    }
}

enum ViewDirectory<'a> {
    Static(&'a StaticDirectory),
    Published {
        store: &'a dyn SharedStore,
        head: Head,
        cache: &'a RefCell<RecordCache>,
    },
}

/// The config in force for one request: a catalogue and its principals, at an edge in a region
/// or in none.
pub struct View<'a> {
    catalog: Arc<Catalog>,
    directory: ViewDirectory<'a>,
    region: Option<&'a str>,
    /// `x-keygate-config-version`, when enabled.
    version: Option<String>,
    /// The config is stale, and `on_stale: serve` lets the request be judged (count it).
    pub stale_served: bool,
    /// This request compiled the catalogue of a version this VM had not judged with before.
    pub compiled: Option<u64>,
}

impl View<'_> {
    /// The catalogue that judges the request (its identity headers, `Authorization` policy).
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// What the glue does with the gate's verdict. `x-keygate-config-version` (when enabled)
    /// goes only on replies to requests whose credential authenticated: an unauthenticated
    /// client learns nothing about the deployment. With `settings.wrong_region: "401"` a
    /// `wrong_region` denial gets the `invalid_credentials` reply, byte for byte (its reason,
    /// for stats, stays `wrong_region`).
    pub fn answer(&self, verdict: Verdict) -> Answer {
        match verdict {
            Verdict::Deny(denial) => {
                let reason = denial.reason;
                let shown = Denial {
                    reason: replied_as(&self.catalog, reason),
                    ..denial
                };
                let version = self.version.as_deref().filter(|_| shown.authenticated());
                Answer::Deny {
                    reason,
                    reply: denial_reply(&shown, self.catalog.www_authenticate(), version),
                }
            }
            Verdict::Allow {
                allow,
                quota,
                inflight,
                fleet,
            } => {
                // A CORS preflight passed without credentials has no identity.
                let version = self
                    .version
                    .as_deref()
                    .filter(|_| allow.identity().is_some());
                Answer::Allow {
                    response_headers: response_headers(quota.as_ref(), version),
                    allow,
                    ticket: inflight,
                    fleet,
                }
            }
        }
    }
}

impl InForce for View<'_> {
    fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    fn directory(&self) -> &dyn Directory {
        self
    }

    fn region(&self) -> Option<&str> {
        self.region
    }
}

/// The reason a denial's reply is made from: `wrong_region` replies as `invalid_credentials`
/// under `settings.wrong_region: "401"`.
fn replied_as(catalog: &Catalog, reason: Reason) -> Reason {
    match (reason, catalog.wrong_region) {
        (Reason::WrongRegion, WrongRegion::Unauthorized) => Reason::InvalidCredentials,
        _ => reason,
    }
}

impl View<'_> {
    fn with<T>(&self, f: impl FnOnce(&dyn Directory) -> T) -> T {
        match &self.directory {
            ViewDirectory::Static(d) => f(*d),
            ViewDirectory::Published { store, head, cache } => f(&SharedDirectory {
                store: *store,
                head: *head,
                catalog: &self.catalog,
                cache,
            }),
        }
    }
}

impl Directory for View<'_> {
    fn by_sid(&self, sid: &[u8]) -> Option<Principal> {
        self.with(|d| d.by_sid(sid))
    }

    fn by_token(&self, digest: &Digest32) -> Option<Arc<crate::compile::Key>> {
        self.with(|d| d.by_token(digest))
    }

    fn account(&self, sid: &str) -> Option<Arc<crate::compile::Account>> {
        self.with(|d| d.account(sid))
    }
}

/// What the glue does with a request.
#[derive(Debug)]
pub enum Answer {
    /// Send `reply` (and strip the client's identity headers: access logs see them).
    Deny { reason: Reason, reply: Reply },
    /// Forward the request as `allow`'s identity; add `response_headers` to the response; give
    /// `ticket` back when the stream ends. With `fleet`, only once its fleet limits admit it
    /// ([`crate::fleet::lease`]).
    Allow {
        allow: Allow,
        ticket: Option<InflightTicket>,
        response_headers: Vec<(&'static str, String)>,
        fleet: Option<Box<FleetHold>>,
    },
}

/// A local reply: status, headers, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

/// The reply to a request refused before any config judged it (`no_config`, `config_stale`).
pub fn refusal(reason: Reason) -> Reply {
    denial_reply(
        &Denial {
            reason,
            retry_after_s: None,
            quota: None,
        },
        &[],
        None,
    )
}

/// The reply for a denial: the reason's status and JSON body, `no-store`, the challenges of a
/// 401, `Retry-After` (5 s for `no_config` and `config_stale`), `RateLimit-Policy` /
/// `RateLimit` for the limit that refused, and `version` as `x-keygate-config-version`.
pub fn denial_reply(denial: &Denial, www_authenticate: &[String], version: Option<&str>) -> Reply {
    let reason = denial.reason;
    let mut headers = vec![
        ("content-type", "application/json".to_owned()),
        ("cache-control", "no-store".to_owned()),
    ];
    if reason.challenges() {
        headers.extend(
            www_authenticate
                .iter()
                .map(|v| ("www-authenticate", v.clone())),
        );
    }
    let retry_after = match (reason, denial.retry_after_s) {
        (Reason::NoConfig | Reason::ConfigStale, _) => Some(NO_CONFIG_RETRY_AFTER_S),
        (_, s) => s,
    };
    if let Some(s) = retry_after {
        headers.push(("retry-after", s.to_string()));
    }
    headers.extend(
        denial
            .quota
            .as_ref()
            .map(ratelimit_pair)
            .into_iter()
            .flatten(),
    );
    headers.extend(version.map(|v| ("x-keygate-config-version", v.to_owned())));
    Reply {
        status: reason.status(),
        headers,
        body: reason.body(),
    }
}

/// The headers an allowed request's response gets: the tightest limit (when quota headers are
/// on) and `version` as `x-keygate-config-version`.
pub fn response_headers(
    quota: Option<&Quota>,
    version: Option<&str>,
) -> Vec<(&'static str, String)> {
    let mut headers: Vec<_> = quota.map(ratelimit_pair).into_iter().flatten().collect();
    headers.extend(version.map(|v| ("x-keygate-config-version", v.to_owned())));
    headers
}

fn ratelimit_pair(q: &Quota) -> [(&'static str, String); 2] {
    let (policy, state) = gate::ratelimit_headers(q);
    [("ratelimit-policy", policy), ("ratelimit", state)]
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::gate::{FailedAuthKey, GateStats, Host};
    use crate::headers::{AuthorizationHeader, RequestHead};
    use crate::plugin::{parse_plugin_config, PluginConfig};
    use crate::published::publish;
    use crate::store::testing::FakeStore;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    const NOW_S: u64 = 1_800_000_000;

    /// Key `SK1` (secret `s1`) of account `AC1`, API `calls`; version `version`.
    fn doc(version: u64) -> Vec<u8> {
        let digest = crate::digest::Digester::Sha256.digest_hex(b"s1");
        serde_json::to_vec(&serde_json::json!({
            "schema": "keygate.config/v1", "version": version,
            "apis": [{"name": "calls", "methods": ["GET"], "paths": ["/v2/accounts/{account_sid}/calls"]}],
            "accounts": [{"sid": "AC1", "status": "active"}],
            "keys": [{"sid": "SK1", "account_sid": "AC1", "role": "main", "secrets": [{"digest": digest}]}],
        }))
        .unwrap()
    }

    fn control_plane(extra: &str) -> Source {
        let json = format!(
            r#"{{"control_plane":{{"cluster":"c","authority":"a","token":"t","max_staleness_s":60,"wait_s":10{extra}}}}}"#
        );
        match parse_plugin_config(json.as_bytes()).unwrap() {
            PluginConfig::ControlPlane(cp) => Source::from_control_plane(cp),
            PluginConfig::Static { .. } => unreachable!(),
        }
    }

    struct TestHost<'s>(&'s FakeStore);

    impl Host for TestHost<'_> {
        fn now_us(&self) -> u64 {
            NOW_S * 1_000_000
        }
        fn client_ip(&self) -> Option<IpAddr> {
            None
        }
        fn store(&self) -> &dyn SharedStore {
            self.0
        }
        fn vm_id(&self) -> u64 {
            1
        }
        fn failed_auth_key(&self) -> Option<FailedAuthKey> {
            None
        }
    }

    /// `SK1:s1`, or a wrong secret.
    fn ask(view: &View<'_>, store: &FakeStore, path: &str, secret: &str) -> Answer {
        use base64::Engine as _;
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("SK1:{secret}"))
        );
        let head = RequestHead {
            method: b"GET",
            path: path.as_bytes(),
            authorization: AuthorizationHeader::One(auth.as_bytes()),
            cors_preflight_headers: false,
        };
        let verdict = gate::evaluate(view, &head, &TestHost(store), &mut GateStats::default());
        view.answer(verdict)
    }

    fn header<'r>(headers: &'r [(&'static str, String)], name: &str) -> Vec<&'r str> {
        headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    #[test]
    fn nothing_configured_or_published_is_no_config_with_retry_after() {
        let store = FakeStore::new();
        assert_eq!(Source::None.view(&store, 0).err(), Some(Reason::NoConfig));
        let source = control_plane("");
        assert_eq!(source.view(&store, 0).err(), Some(Reason::NoConfig));
        let reply = refusal(Reason::NoConfig);
        assert_eq!(reply.status, 503);
        assert_eq!(header(&reply.headers, "retry-after"), ["5"]);
        assert_eq!(header(&reply.headers, "cache-control"), ["no-store"]);
        assert_eq!(reply.body, Reason::NoConfig.body());
        assert_eq!(
            header(&refusal(Reason::ConfigStale).headers, "retry-after"),
            ["5"]
        );
    }

    #[test]
    fn a_stale_config_is_refused_unless_on_stale_serve() {
        let store = FakeStore::new();
        publish(&store, &doc(3), NOW_S).unwrap();
        // Stale after max_staleness_s (60) + wait_s (10).
        let fresh = (NOW_S + 70) * 1_000_000;
        let stale = (NOW_S + 71) * 1_000_000;
        let deny = control_plane("");
        assert!(deny.view(&store, fresh).is_ok_and(|v| !v.stale_served));
        assert_eq!(deny.view(&store, stale).err(), Some(Reason::ConfigStale));
        let serve = control_plane(r#","on_stale":"serve""#);
        assert!(serve.view(&store, stale).is_ok_and(|v| v.stale_served));
    }

    #[test]
    fn each_version_s_catalogue_is_compiled_once_per_vm() {
        let store = FakeStore::new();
        publish(&store, &doc(3), NOW_S).unwrap();
        let source = control_plane("");
        let now = NOW_S * 1_000_000;
        assert_eq!(source.view(&store, now).unwrap().compiled, Some(3));
        assert_eq!(source.view(&store, now).unwrap().compiled, None);
        publish(&store, &doc(4), NOW_S).unwrap();
        assert_eq!(source.view(&store, now).unwrap().compiled, Some(4));
        assert_eq!(source.max_cas_retries(&store), 16);
    }

    #[test]
    fn the_version_header_goes_only_on_replies_to_authenticated_requests() {
        let store = FakeStore::new();
        publish(&store, &doc(3), NOW_S).unwrap();
        let source = control_plane(r#","debug_version_header":true"#);
        let view = source.view(&store, NOW_S * 1_000_000).unwrap();
        match ask(&view, &store, "/v2/accounts/AC1/calls", "s1") {
            Answer::Allow {
                allow,
                ticket,
                response_headers,
                fleet: None,
            } => {
                assert_eq!(allow.identity().map(|i| i.key_sid), Some(Some("SK1")));
                assert_eq!(ticket, None);
                assert_eq!(response_headers, [("x-keygate-config-version", "3".into())]);
            }
            other => panic!("{other:?}"),
        }
        let Answer::Deny { reason, reply } = ask(&view, &store, "/v2/accounts/AC1/calls", "x")
        else {
            panic!("a wrong secret is refused")
        };
        assert_eq!((reason, reply.status), (Reason::InvalidCredentials, 401));
        assert_eq!(header(&reply.headers, "x-keygate-config-version"), [""; 0]);
        assert_eq!(
            header(&reply.headers, "www-authenticate"),
            view.catalog().www_authenticate()
        );
        let Answer::Deny { reason, reply } = ask(&view, &store, "/v2/accounts/AC2/calls", "s1")
        else {
            panic!("another account's path is refused")
        };
        assert_eq!(reason, Reason::AccountMismatch);
        assert_eq!(header(&reply.headers, "x-keygate-config-version"), ["3"]);
        assert_eq!(header(&reply.headers, "www-authenticate"), [""; 0]);
    }

    #[test]
    fn a_static_source_judges_with_its_compiled_config() {
        let store = FakeStore::new();
        let source = Source::from_static(crate::compile(&doc(9)).unwrap());
        let view = source.view(&store, 0).unwrap();
        assert_eq!((view.compiled, view.stale_served), (None, false));
        assert!(matches!(
            ask(&view, &store, "/v2/accounts/AC1/calls", "s1"),
            Answer::Allow { response_headers, .. } if response_headers.is_empty()
        ));
    }

    /// Key `SK1` (secret `s1`) of account `AC1`, home region `us1`, with `settings.wrong_region`
    /// `mode`; version 3.
    fn regional_doc(mode: &str) -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_slice(&doc(3)).unwrap();
        v["accounts"][0]["region"] = "us1".into();
        v["settings"] = serde_json::json!({ "wrong_region": mode });
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn a_wrong_region_is_a_404_or_byte_for_byte_the_invalid_credentials_reply() {
        let calls = "/v2/accounts/AC1/calls";
        for mode in ["404", "401"] {
            let store = FakeStore::new();
            publish(&store, &regional_doc(mode), NOW_S).unwrap();
            let now = NOW_S * 1_000_000;
            // Served at its home edge and at an edge with no region.
            for edge in [r#","region":"us1""#, ""] {
                let source = control_plane(edge);
                let view = source.view(&store, now).unwrap();
                assert!(
                    matches!(ask(&view, &store, calls, "s1"), Answer::Allow { .. }),
                    "{mode} {edge}"
                );
            }
            let source = control_plane(r#","region":"in1","debug_version_header":true"#);
            let view = source.view(&store, now).unwrap();
            let Answer::Deny { reason, reply } = ask(&view, &store, calls, "s1") else {
                panic!("{mode}: refused at the in1 edge")
            };
            // Counted as wrong_region whatever the reply.
            assert_eq!(reason, Reason::WrongRegion, "{mode}");
            let Answer::Deny {
                reason: invalid,
                reply: invalid_reply,
            } = ask(&view, &store, calls, "x")
            else {
                panic!("a wrong secret is refused")
            };
            assert_eq!(invalid, Reason::InvalidCredentials);
            if mode == "401" {
                assert_eq!(reply, invalid_reply);
                assert_eq!(reply.status, 401);
                assert_eq!(header(&reply.headers, "x-keygate-config-version"), [""; 0]);
                assert_eq!(
                    header(&reply.headers, "www-authenticate"),
                    view.catalog().www_authenticate()
                );
            } else {
                assert_eq!(reply.status, 404);
                assert_eq!(
                    reply.body,
                    r#"{"error":{"code":"wrong_region","message":"This account is not served in this region"}}"#
                );
                assert_eq!(
                    reply.headers,
                    [
                        ("content-type", "application/json".to_owned()),
                        ("cache-control", "no-store".to_owned()),
                        ("x-keygate-config-version", "3".to_owned()),
                    ]
                );
            }
        }
    }

    #[test]
    fn a_static_plugin_configuration_names_its_edge_s_region() {
        let store = FakeStore::new();
        let calls = "/v2/accounts/AC1/calls";
        let with_region = |region: &str| {
            let mut v: serde_json::Value = serde_json::from_slice(&regional_doc("404")).unwrap();
            v["region"] = region.into();
            serde_json::to_vec(&v).unwrap()
        };
        let configured = Source::None.configure(&with_region("in1"));
        assert!(configured.accepted, "{:?}", configured.log);
        let source = configured.source.unwrap();
        let view = source.view(&store, 0).unwrap();
        assert!(matches!(
            ask(&view, &store, calls, "s1"),
            Answer::Deny { reason: Reason::WrongRegion, reply } if reply.status == 404
        ));
        let source = Source::None.configure(&with_region("us1")).source.unwrap();
        let view = source.view(&store, 0).unwrap();
        assert!(matches!(
            ask(&view, &store, calls, "s1"),
            Answer::Allow { .. }
        ));
        let refused = source.configure(&with_region("IN1"));
        assert!(!refused.accepted && refused.source.is_none());
        assert_eq!(
            refused.log.1,
            "config rejected: region: must be 1 to 32 lowercase letters, digits or '-' (keeping version 3)"
        );
    }

    #[test]
    fn a_rate_limit_denial_carries_retry_after_and_the_limit() {
        let denial = Denial {
            reason: Reason::RateLimitedKey,
            retry_after_s: Some(7),
            quota: Some(Quota {
                kind: crate::ratelimit::LimitKind::Key,
                rate: crate::ratelimit::Rate {
                    requests: 10,
                    period_us: 1_000_000,
                },
                remaining: 0,
                reset_s: 7,
            }),
        };
        let reply = denial_reply(&denial, &["Basic".into()], None);
        assert_eq!(reply.status, 429);
        assert_eq!(
            reply.headers,
            [
                ("content-type", "application/json".to_owned()),
                ("cache-control", "no-store".to_owned()),
                ("retry-after", "7".to_owned()),
                ("ratelimit-policy", "\"key\";q=10;w=1".to_owned()),
                ("ratelimit", "\"key\";r=0;t=7".to_owned()),
            ]
        );
    }
}
