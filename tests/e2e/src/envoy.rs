//! A real Envoy with the keygate filter, for end-to-end tests.
//!
//! [`EnvoyBuilder`] renders a bootstrap into a temporary directory: one listener on
//! 127.0.0.1:0 whose HTTP connection manager runs the wasm filter (root_id `keygate`, V8,
//! `fail_open: false`, plugin configuration passed byte for byte as a `StringValue`) and then the
//! router, which sends everything to cluster `upstream` = 127.0.0.1:`upstream_port`. Admin also
//! binds 127.0.0.1:0; its address is read from `--admin-address-path`, the listener port from
//! admin `/listeners?format=json`, and start-up waits for admin `/ready` to say `LIVE`.
//!
//! ```no_run
//! use keygate_e2e::{demo, Echo, EnvoyBuilder, Req};
//! let echo = Echo::start();
//! let envoy = EnvoyBuilder::new().upstream_port(echo.port()).start();
//! let res = Req::get("/api/account/balance").basic(demo::MAIN.sid, demo::MAIN.secret).send(envoy.port());
//! assert_eq!(envoy.counter("http.keygate.downstream_rq_2xx"), Some(1));
//! ```
//!
//! The process is killed when the [`Envoy`] is dropped; its files (bootstrap, logs, access log)
//! live in [`Envoy::dir`] until then.

use std::fmt;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::client::{Req, Response};
use crate::{demo, paths};

/// Default access-log line: request, status, response details, and the identity the filter
/// established (filter state, identity headers, dynamic metadata).
/// How long after a request keygate's counters are surely in Envoy's (`Envoy::stats`): the
/// filter's tick (250 ms) and a margin.
pub const STATS_SETTLE: std::time::Duration = std::time::Duration::from_millis(400);

pub const DEFAULT_ACCESS_LOG_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%\" %RESPONSE_CODE% %RESPONSE_CODE_DETAILS% identity=%FILTER_STATE(wasm.keygate.identity:PLAIN)% key=%REQ(X-KEYGATE-KEY-SID)% role=%REQ(X-KEYGATE-ROLE)% api=%REQ(X-KEYGATE-API)% meta=%DYNAMIC_METADATA(keygate)% client=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%\n";

/// Name of the listener, the HCM stat prefix (`http.keygate.*`) and the wasm filter.
pub const NAME: &str = "keygate";

/// Port used when no upstream is configured: nothing listens there, so a request that gets
/// past the filter fails with 503 instead of reaching anything.
const NO_UPSTREAM_PORT: u16 = 9;

/// How long to wait for `/ready` unless told otherwise (V8 compiling the filter once per worker
/// on a busy 2-core machine can take a few seconds).
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Builds and starts an [`Envoy`].
#[derive(Clone, Debug)]
pub struct EnvoyBuilder {
    plugin_config: String,
    concurrency: u32,
    upstream_port: u16,
    /// Each cluster's name and its endpoints' ports (round robin).
    clusters: Vec<(String, Vec<u16>)>,
    transport_sockets: Map<String, Value>,
    /// Active health checks, by cluster name.
    health_checks: Map<String, Value>,
    hcm: Map<String, Value>,
    log_level: String,
    component_log_level: Option<String>,
    access_log_format: String,
    /// Whether the listener writes an access log ([`EnvoyBuilder::no_access_log`]).
    access_log: bool,
    envoy_bin: Option<PathBuf>,
    wasm: Option<PathBuf>,
    ready_timeout: Duration,
    /// The `upstream` cluster sends HTTP/1.1 trailers ([`EnvoyBuilder::http1_trailers`]).
    upstream_trailers: bool,
    /// Clusters spoken to over HTTP/2 ([`EnvoyBuilder::grpc_cluster`]).
    http2_clusters: Vec<String>,
}

impl Default for EnvoyBuilder {
    fn default() -> Self {
        EnvoyBuilder::new()
    }
}

impl EnvoyBuilder {
    /// Defaults: the demo plugin config (`envoy/keygate-demo.json`), one worker, Envoy's own
    /// path handling, no upstream (requests that pass the filter get 503), log level `info`,
    /// [`DEFAULT_ACCESS_LOG_FORMAT`].
    pub fn new() -> EnvoyBuilder {
        EnvoyBuilder {
            plugin_config: demo::config_text(),
            concurrency: 1,
            upstream_port: NO_UPSTREAM_PORT,
            clusters: Vec::new(),
            transport_sockets: Map::new(),
            health_checks: Map::new(),
            hcm: Map::new(),
            log_level: "info".to_string(),
            component_log_level: None,
            access_log_format: DEFAULT_ACCESS_LOG_FORMAT.to_string(),
            access_log: true,
            envoy_bin: None,
            wasm: None,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            upstream_trailers: false,
            http2_clusters: Vec::new(),
        }
    }

    /// The plugin configuration, passed to the filter exactly as given.
    pub fn plugin_config(mut self, json: impl Into<String>) -> Self {
        self.plugin_config = json.into();
        self
    }

    /// The plugin configuration from a JSON value (serialised compactly).
    pub fn plugin_config_json(self, json: &Value) -> Self {
        self.plugin_config(json.to_string())
    }

    /// Worker threads (`--concurrency`); each runs its own copy of the filter VM.
    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = n;
        self
    }

    /// HCM `normalize_path`.
    pub fn normalize_path(self, on: bool) -> Self {
        self.hcm_field("normalize_path", json!(on))
    }

    /// HCM `merge_slashes`.
    pub fn merge_slashes(self, on: bool) -> Self {
        self.hcm_field("merge_slashes", json!(on))
    }

    /// HCM `use_remote_address`.
    pub fn use_remote_address(self, on: bool) -> Self {
        self.hcm_field("use_remote_address", json!(on))
    }

    /// HCM `xff_num_trusted_hops`.
    pub fn xff_num_trusted_hops(self, n: u32) -> Self {
        self.hcm_field("xff_num_trusted_hops", json!(n))
    }

    /// Sets any other HttpConnectionManager field (JSON form of the proto), e.g.
    /// `("path_with_escaped_slashes_action", json!("UNESCAPE_AND_REDIRECT"))`.
    pub fn hcm_field(mut self, name: &str, value: Value) -> Self {
        self.hcm.insert(name.to_string(), value);
        self
    }

    /// Port of the `upstream` cluster on 127.0.0.1 (usually [`crate::Echo::port`]).
    pub fn upstream_port(mut self, port: u16) -> Self {
        self.upstream_port = port;
        self
    }

    /// HTTP/1.1 trailers end to end: the listener parses them and the `upstream` cluster sends
    /// them (Envoy drops HTTP/1.1 trailers unless `enable_trailers` is set on both sides).
    pub fn http1_trailers(mut self) -> Self {
        self.upstream_trailers = true;
        self.hcm_field("http_protocol_options", json!({"enable_trailers": true}))
    }

    /// Adds another static cluster `name` = 127.0.0.1:`port` (e.g. for the filter's HTTP calls).
    pub fn cluster(mut self, name: &str, port: u16) -> Self {
        self.clusters.push((name.to_string(), vec![port]));
        self
    }

    /// Adds a static cluster `name` = 127.0.0.1:`port` spoken to over HTTP/2 (a gRPC service:
    /// the rate-limit service of fleet limits).
    pub fn grpc_cluster(mut self, name: &str, port: u16) -> Self {
        self.clusters.push((name.to_string(), vec![port]));
        self.http2_clusters.push(name.to_string());
        self
    }

    /// Adds a static cluster `name` with one endpoint per port on 127.0.0.1, each actively
    /// health-checked with `GET health_path` as envoy/envoy-fleet.yaml does (every second, out
    /// of the rotation after 2 failures, back after 1 success; `Host: keygate-control`): a
    /// control-plane cluster that fails over between replicas.
    pub fn health_checked_cluster(mut self, name: &str, ports: &[u16], health_path: &str) -> Self {
        self.clusters.push((name.to_string(), ports.to_vec()));
        self.health_checks.insert(
            name.to_string(),
            json!([{
                "timeout": "1s",
                "interval": "1s",
                "no_traffic_interval": "1s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "http_health_check": {"path": health_path, "host": "keygate-control"}
            }]),
        );
        self
    }

    /// Adds a static cluster `name` = 127.0.0.1:`port` reached over TLS: the server must present
    /// a certificate for `sni` (sent as SNI, required among its DNS SANs) issued by the CA in
    /// `trusted_ca` (a PEM file), as the control plane's reference bootstrap does.
    pub fn tls_cluster(mut self, name: &str, port: u16, trusted_ca: &Path, sni: &str) -> Self {
        self.clusters.push((name.to_string(), vec![port]));
        self.transport_sockets
            .insert(name.to_string(), upstream_tls(trusted_ca, sni));
        self
    }

    /// Envoy's log level (`-l`), default `info`.
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_string();
        self
    }

    /// Per-component levels (`--component-log-level`), e.g. `"wasm:debug"`.
    pub fn component_log_level(mut self, levels: &str) -> Self {
        self.component_log_level = Some(levels.to_string());
        self
    }

    /// The access-log line format (Envoy command operators; end it with `\n`).
    pub fn access_log_format(mut self, format: &str) -> Self {
        self.access_log_format = format.to_string();
        self
    }

    /// No access log (for long runs: the soak's millions of requests would fill the disk);
    /// [`Envoy::access_log`] then stays empty.
    pub fn no_access_log(mut self) -> Self {
        self.access_log = false;
        self
    }

    /// Envoy binary to run instead of [`paths::envoy_bin`].
    pub fn envoy_bin(mut self, path: impl Into<PathBuf>) -> Self {
        self.envoy_bin = Some(path.into());
        self
    }

    /// Filter module to load instead of [`paths::wasm_path`].
    pub fn wasm(mut self, path: impl Into<PathBuf>) -> Self {
        self.wasm = Some(path.into());
        self
    }

    /// How long start-up may take before it is declared failed.
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// The bootstrap this builder renders for `wasm` and `access_log` paths (JSON, which Envoy
    /// reads as YAML).
    pub fn bootstrap(&self, wasm: &Path, access_log: &Path) -> Value {
        let cluster = |name: &str, ports: &[u16]| {
            let endpoints: Vec<Value> = ports
                .iter()
                .map(|port| {
                    json!({"endpoint": {"address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": port}
                    }}})
                })
                .collect();
            json!({
                "name": name,
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": name,
                    "endpoints": [{"lb_endpoints": endpoints}]
                }
            })
        };
        let mut upstream = cluster("upstream", &[self.upstream_port]);
        if let (true, Some(obj)) = (self.upstream_trailers, upstream.as_object_mut()) {
            obj.insert(
                "typed_extension_protocol_options".to_string(),
                json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http_protocol_options": {"enable_trailers": true}}
                }}),
            );
        }
        let mut clusters = vec![upstream];
        clusters.extend(
            self.clusters
                .iter()
                .map(|(name, ports)| cluster(name, ports)),
        );
        for c in &mut clusters {
            let name = c["name"].as_str().unwrap_or_default().to_string();
            if let Some(obj) = c.as_object_mut() {
                if let Some(socket) = self.transport_sockets.get(&name) {
                    obj.insert("transport_socket".to_string(), socket.clone());
                }
                if let Some(checks) = self.health_checks.get(&name) {
                    obj.insert("health_checks".to_string(), checks.clone());
                }
                if self.http2_clusters.contains(&name) {
                    obj.insert(
                        "typed_extension_protocol_options".to_string(),
                        json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}}
                        }}),
                    );
                }
            }
        }

        let mut hcm = json!({
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": NAME,
            "codec_type": "AUTO",
            "access_log": [{
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": access_log,
                    "log_format": {"text_format_source": {"inline_string": self.access_log_format}}
                }
            }],
            "route_config": {
                "name": NAME,
                "virtual_hosts": [{
                    "name": "upstream",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]
                }]
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.wasm",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                        "config": {
                            "name": NAME,
                            "root_id": NAME,
                            "vm_config": {
                                "vm_id": NAME,
                                "runtime": "envoy.wasm.runtime.v8",
                                "code": {"local": {"filename": wasm}}
                            },
                            "configuration": {
                                "@type": "type.googleapis.com/google.protobuf.StringValue",
                                "value": self.plugin_config
                            },
                            "fail_open": false
                        }
                    }
                },
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
                }
            ]
        });
        if let Some(obj) = hcm.as_object_mut() {
            if !self.access_log {
                obj.remove("access_log");
            }
            obj.extend(self.hcm.clone());
        }

        json!({
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "static_resources": {
                "listeners": [{
                    "name": NAME,
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": hcm
                    }]}]
                }],
                "clusters": clusters
            }
        })
    }

    /// Starts Envoy and waits until it is ready; panics with the log tail if it exits or does
    /// not become ready in time.
    pub fn start(self) -> Envoy {
        match self.try_start() {
            Ok(envoy) => envoy,
            Err(e) => panic!("{e}"),
        }
    }

    /// Starts Envoy expecting it to refuse the configuration (exit during start-up); returns its
    /// log. Panics if it becomes ready instead, or neither exits nor becomes ready in time.
    pub fn start_expect_failure(self) -> String {
        match self.try_start() {
            Ok(envoy) => panic!(
                "Envoy accepted a configuration it should have refused; log tail:\n{}",
                tail(&envoy.logs(), 60)
            ),
            Err(e) if e.exited => e.log,
            Err(e) => panic!("{e}"),
        }
    }

    /// Starts Envoy; `Err` if it exits before becoming ready or is not ready in time.
    pub fn try_start(self) -> Result<Envoy, StartError> {
        let envoy_bin = self.envoy_bin.clone().unwrap_or_else(paths::envoy_bin);
        let wasm = self.wasm.clone().unwrap_or_else(paths::wasm_path);
        let dir = tempfile::Builder::new()
            .prefix("keygate-envoy-")
            .tempdir()
            .expect("create a temporary directory for Envoy");
        let files = Files::new(dir.path());
        let bootstrap = self.bootstrap(&wasm, &files.access_log);
        let bootstrap_text =
            serde_json::to_string_pretty(&bootstrap).expect("serialise the bootstrap");
        fs::write(&files.bootstrap, &bootstrap_text).expect("write the bootstrap");
        File::create(&files.access_log).expect("create the access log");

        let mut cmd = Command::new(&envoy_bin);
        cmd.arg("-c")
            .arg(&files.bootstrap)
            .arg("--concurrency")
            .arg(self.concurrency.to_string())
            // No hot restart: nothing in /dev/shm to leak when the process is killed, and no
            // base-id clash between parallel instances. --use-dynamic-base-id is belt and braces.
            .arg("--disable-hot-restart")
            .arg("--use-dynamic-base-id")
            .arg("--admin-address-path")
            .arg(&files.admin_address)
            .arg("--log-path")
            .arg(&files.log)
            .arg("-l")
            .arg(&self.log_level)
            .arg("--file-flush-interval-msec")
            .arg("50")
            .arg("--drain-time-s")
            .arg("0")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(File::create(&files.stdout).expect("create Envoy's stdout file"))
            .stderr(File::create(&files.stderr).expect("create Envoy's stderr file"));
        if let Some(levels) = &self.component_log_level {
            cmd.arg("--component-log-level").arg(levels);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", envoy_bin.display()));

        let mut envoy = Envoy {
            child,
            files,
            port: 0,
            admin_port: 0,
            dir,
        };
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                return Err(StartError {
                    exited: true,
                    reason: format!("Envoy exited ({status}) before becoming ready"),
                    log: envoy.logs(),
                });
            }
            if envoy.admin_port == 0 {
                envoy.admin_port = read_admin_port(&envoy.files.admin_address).unwrap_or(0);
            }
            if envoy.admin_port != 0 {
                if let Ok(res) = Req::get("/ready").try_send(envoy.admin_port) {
                    if res.status == 200 && res.body_text().trim() == "LIVE" {
                        break;
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(StartError {
                    exited: false,
                    reason: format!("Envoy was not ready within {:?}", self.ready_timeout),
                    log: envoy.logs(),
                });
            }
            thread::sleep(Duration::from_millis(25));
        }
        envoy.port = envoy.listener_port().map_err(|reason| StartError {
            exited: false,
            reason,
            log: envoy.logs(),
        })?;
        Ok(envoy)
    }
}

/// A TLS transport socket for an upstream cluster: TLS 1.3 (Envoy's upstream default maximum is
/// 1.2, so both bounds are set), SNI `sni`, the peer's chain checked against `trusted_ca` and
/// `sni` required among its DNS SANs.
pub fn upstream_tls(trusted_ca: &Path, sni: &str) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": sni,
            "common_tls_context": {
                "tls_params": {
                    "tls_minimum_protocol_version": "TLSv1_3",
                    "tls_maximum_protocol_version": "TLSv1_3"
                },
                "validation_context": {
                    "trusted_ca": {"filename": trusted_ca},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": sni}}
                    ]
                }
            }
        }
    })
}

/// Envoy did not start: it exited (`exited`, e.g. it refused the config) or was not ready in
/// time. `log` is everything it wrote.
#[derive(Debug)]
pub struct StartError {
    pub exited: bool,
    pub reason: String,
    pub log: String,
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}; Envoy log tail:\n{}",
            self.reason,
            tail(&self.log, 80)
        )
    }
}

impl std::error::Error for StartError {}

struct Files {
    bootstrap: PathBuf,
    admin_address: PathBuf,
    log: PathBuf,
    access_log: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Files {
    fn new(dir: &Path) -> Files {
        Files {
            bootstrap: dir.join("bootstrap.yaml"),
            admin_address: dir.join("admin-address"),
            log: dir.join("envoy.log"),
            access_log: dir.join("access.log"),
            stdout: dir.join("stdout.log"),
            stderr: dir.join("stderr.log"),
        }
    }
}

/// A running Envoy; killed on drop.
pub struct Envoy {
    child: Child,
    files: Files,
    port: u16,
    admin_port: u16,
    dir: tempfile::TempDir,
}

impl Envoy {
    /// The keygate listener's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The admin port on 127.0.0.1.
    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// The directory holding the bootstrap, logs and access log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The rendered bootstrap.
    pub fn bootstrap(&self) -> String {
        read_lossy(&self.files.bootstrap)
    }

    /// `GET` on the admin API.
    pub fn admin_get(&self, path: &str) -> Response {
        Req::get(path).send(self.admin_port)
    }

    /// `POST` on the admin API (e.g. `/reset_counters`).
    pub fn admin_post(&self, path: &str) -> Response {
        Req::post(path).body("").send(self.admin_port)
    }

    /// Admin `/stats` as text (`name: value` lines). keygate counts its stats in each VM and adds
    /// them to Envoy's counters on the VM's tick (every 250 ms): this waits [`STATS_SETTLE`]
    /// first, so the counts include every request answered before the call.
    pub fn stats(&self) -> String {
        std::thread::sleep(STATS_SETTLE);
        self.admin_get("/stats").body_text()
    }

    /// The value of counter `name` (exact name as in `/stats`), if it exists.
    pub fn counter(&self, name: &str) -> Option<u64> {
        self.stats().lines().find_map(|line| {
            let (n, v) = line.split_once(": ")?;
            if n == name {
                v.trim().parse().ok()
            } else {
                None
            }
        })
    }

    /// A metric the filter defined itself: Envoy lists those as `wasmcustom.<name>`, so
    /// `custom_metric("keygate.allowed")` reads `wasmcustom.keygate.allowed`.
    pub fn custom_metric(&self, name: &str) -> Option<u64> {
        self.counter(&format!("wasmcustom.{name}"))
    }

    /// The value of gauge `name` (same lookup as [`Envoy::counter`]).
    pub fn gauge(&self, name: &str) -> Option<u64> {
        self.counter(name)
    }

    /// Everything Envoy logged so far (log file, then anything on stderr/stdout).
    pub fn logs(&self) -> String {
        let mut out = read_lossy(&self.files.log);
        for (label, path) in [
            ("stderr", &self.files.stderr),
            ("stdout", &self.files.stdout),
        ] {
            let text = read_lossy(path);
            if !text.trim().is_empty() {
                out.push_str(&format!("\n--- Envoy {label} ---\n{text}"));
            }
        }
        out
    }

    /// The access log so far (flushed every 50 ms).
    pub fn access_log(&self) -> String {
        read_lossy(&self.files.access_log)
    }

    /// Waits until the access log has at least `n` lines and returns them; panics after
    /// `timeout`. Access-log lines are written when a request completes.
    pub fn wait_access_log(&self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines: Vec<String> = self.access_log().lines().map(str::to_string).collect();
            if lines.len() >= n {
                return lines;
            }
            if Instant::now() > deadline {
                panic!(
                    "access log has {} lines, expected {n} within {timeout:?}: {lines:#?}",
                    lines.len()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn listener_port(&self) -> Result<u16, String> {
        let res = Req::get("/listeners?format=json")
            .try_send(self.admin_port)
            .map_err(|e| format!("admin /listeners: {e}"))?;
        let json: Value = serde_json::from_slice(&res.body)
            .map_err(|e| format!("admin /listeners is not JSON ({e}): {}", res.body_text()))?;
        json["listener_statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["name"] == NAME)
            .and_then(|l| l["local_address"]["socket_address"]["port_value"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| format!("no port for listener {NAME:?} in {json}"))
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_admin_port(path: &Path) -> Option<u16> {
    let text = fs::read_to_string(path).ok()?;
    text.trim().rsplit_once(':')?.1.parse().ok()
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_passes_the_plugin_config_verbatim_and_applies_hcm_options() {
        let config = "{ \"schema\" : \"keygate.config/v1\",\n \"x\": \"\\u00e9\" }";
        let b = EnvoyBuilder::new()
            .plugin_config(config)
            .upstream_port(4242)
            .normalize_path(false)
            .merge_slashes(true)
            .cluster("control", 5151)
            .bootstrap(Path::new("/f.wasm"), Path::new("/a.log"));
        let hcm = &b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"];
        let wasm = &hcm["http_filters"][0]["typed_config"]["config"];
        assert_eq!(wasm["configuration"]["value"], config);
        assert_eq!(wasm["root_id"], "keygate");
        assert_eq!(wasm["fail_open"], false);
        assert_eq!(wasm["vm_config"]["code"]["local"]["filename"], "/f.wasm");
        assert_eq!(hcm["http_filters"][1]["name"], "envoy.filters.http.router");
        assert_eq!(hcm["normalize_path"], false);
        assert_eq!(hcm["merge_slashes"], true);
        let clusters = &b["static_resources"]["clusters"];
        assert_eq!(clusters[0]["name"], "upstream");
        assert_eq!(
            clusters[0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
                ["address"]["socket_address"]["port_value"],
            4242
        );
        assert_eq!(clusters[1]["name"], "control");
    }

    #[test]
    fn no_access_log_leaves_the_listener_without_one() {
        let hcm = |b: EnvoyBuilder| {
            b.bootstrap(Path::new("/f.wasm"), Path::new("/a.log"))["static_resources"]["listeners"]
                [0]["filter_chains"][0]["filters"][0]["typed_config"]
                .clone()
        };
        assert_eq!(
            hcm(EnvoyBuilder::new())["access_log"][0]["typed_config"]["path"],
            "/a.log"
        );
        assert!(hcm(EnvoyBuilder::new().no_access_log())
            .get("access_log")
            .is_none());
    }

    #[test]
    fn a_health_checked_cluster_lists_every_endpoint_with_its_check() {
        let b = EnvoyBuilder::new()
            .health_checked_cluster("keygate_control", &[8088, 8089], "/readyz")
            .bootstrap(Path::new("/f.wasm"), Path::new("/a.log"));
        let c = &b["static_resources"]["clusters"][1];
        assert_eq!(c["name"], "keygate_control");
        let ports: Vec<&Value> = c["load_assignment"]["endpoints"][0]["lb_endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| &e["endpoint"]["address"]["socket_address"]["port_value"])
            .collect();
        assert_eq!(ports, [8088, 8089]);
        let check = &c["health_checks"][0];
        assert_eq!(check["http_health_check"]["path"], "/readyz");
        assert_eq!(
            (
                &check["interval"],
                &check["unhealthy_threshold"],
                &check["healthy_threshold"]
            ),
            (&json!("1s"), &json!(2), &json!(1))
        );
        assert!(b["static_resources"]["clusters"][0]
            .get("health_checks")
            .is_none());
    }
}
