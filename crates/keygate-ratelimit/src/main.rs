//! `keygate-ratelimit`: the binary. Flags only; everything else is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Parser, ValueEnum};
use keygate_ratelimit::{ControlPlane, LimitSet, Limits, Options};

const ENV_HELP: &str = "\
Environment variables (each sets the flag of the same meaning; flags win):
  KEYGATE_RATELIMIT_LISTEN  --listen         gRPC address (default 127.0.0.1:8081)
  KEYGATE_RATELIMIT_HTTP    --http           HTTP address (default 127.0.0.1:8082)
  KEYGATE_REDIS_URL         --redis          Redis URL (default redis://127.0.0.1:6379)
  KEYGATE_CONTROL_PLANE     --control-plane  control plane base URL
  KEYGATE_CONTROL_CA        --control-ca     PEM CA for an https control plane
  KEYGATE_RATELIMIT_LIMITS  --limits         static limits file
  KEYGATE_RATELIMIT_POLL_S  --poll-s         seconds between polls (default 2)
  KEYGATE_LOG_FORMAT        --log-format     json | text (default json)
  KEYGATE_LOG               --log            log filter (default info)
  KEYGATE_EDGE_TOKEN        (no flag)        the edge token, for --control-plane

Exit status: 0 after a clean stop (SIGINT, SIGTERM), 1 with a one-line
`keygate-ratelimit: error: ...` on stderr.";

/// keygate-ratelimit: Envoy's rate-limit service (envoy.service.ratelimit.v3, gRPC) for keygate's
/// fleet-wide limits, counted in Redis by the limitador crate (exact: one atomic reservation per
/// call). Its limits are the control plane's export
/// (GET /v1/edge/ratelimit-config?format=limitador, polled with the edge token) or a file in the
/// same format (the Limitador server's limits file).
#[derive(Debug, Parser)]
#[command(name = "keygate-ratelimit", version, after_long_help = ENV_HELP)]
#[command(group(ArgGroup::new("source").required(true).args(["control_plane", "limits"])))]
struct Cli {
    /// gRPC address to listen on (port 0 picks a free port; the log line "listening" names it).
    #[arg(
        long,
        env = "KEYGATE_RATELIMIT_LISTEN",
        default_value = "127.0.0.1:8081",
        value_name = "ADDR"
    )]
    listen: SocketAddr,
    /// HTTP address for /healthz, /readyz and /metrics (port 0 picks a free port).
    #[arg(
        long,
        env = "KEYGATE_RATELIMIT_HTTP",
        default_value = "127.0.0.1:8082",
        value_name = "ADDR"
    )]
    http: SocketAddr,
    /// Redis holding the counters (redis://[user:password@]host:port[/db], rediss:// for TLS).
    #[arg(
        long,
        env = "KEYGATE_REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        value_name = "URL"
    )]
    redis: String,
    /// The keygate control plane to follow (base URL; the edge token comes from
    /// KEYGATE_EDGE_TOKEN). The last good limits stay in force while it cannot be read.
    #[arg(long, env = "KEYGATE_CONTROL_PLANE", value_name = "URL")]
    control_plane: Option<String>,
    /// PEM certificate(s) to trust for an https control plane (besides the system's).
    #[arg(
        long,
        env = "KEYGATE_CONTROL_CA",
        value_name = "FILE",
        requires = "control_plane"
    )]
    control_ca: Option<PathBuf>,
    /// A static limits file (the Limitador server's format) instead of a control plane.
    #[arg(long, env = "KEYGATE_RATELIMIT_LIMITS", value_name = "FILE")]
    limits: Option<PathBuf>,
    /// Seconds between two polls of the control plane (1 to 3600).
    #[arg(
        long,
        env = "KEYGATE_RATELIMIT_POLL_S",
        default_value_t = 2,
        value_name = "SECONDS",
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    poll_s: u64,
    /// Log format (logs go to stderr and never contain the edge token).
    #[arg(long, env = "KEYGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    /// Log filter, in tracing-subscriber's EnvFilter syntax (`info`, `keygate_ratelimit=debug`).
    #[arg(
        long,
        env = "KEYGATE_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    log: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

fn options(cli: &Cli) -> Result<Options, String> {
    keygate_ratelimit::check_redis_url(&cli.redis)?;
    let limits = match (&cli.limits, &cli.control_plane) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--limits {}: {e}", path.display()))?;
            let set =
                LimitSet::parse(&text).map_err(|e| format!("--limits {}: {e}", path.display()))?;
            Limits::Static(set)
        }
        (None, Some(url)) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "--control-plane {url:?}: not an http:// or https:// URL"
                ));
            }
            let token = std::env::var("KEYGATE_EDGE_TOKEN").unwrap_or_default();
            if token.trim().is_empty() {
                return Err(
                    "--control-plane needs the edge token in KEYGATE_EDGE_TOKEN".to_string()
                );
            }
            let ca_pem = match &cli.control_ca {
                Some(path) => Some(
                    std::fs::read(path)
                        .map_err(|e| format!("--control-ca {}: {e}", path.display()))?,
                ),
                None => None,
            };
            Limits::ControlPlane(ControlPlane {
                url: url.clone(),
                token: token.trim().to_string(),
                ca_pem,
                every: Duration::from_secs(cli.poll_s),
            })
        }
        // clap's group requires one of them.
        (None, None) => return Err("give --control-plane URL or --limits FILE".to_string()),
    };
    Ok(Options {
        redis_url: cli.redis.clone(),
        limits,
    })
}

fn init_logs(cli: &Cli) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .map_err(|e| format!("--log {:?}: {e}", cli.log))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
    tracing::info!("stopping");
}

fn run(cli: Cli) -> Result<(), String> {
    let options = options(&cli)?;
    init_logs(&cli)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async {
        let grpc = tokio::net::TcpListener::bind(cli.listen)
            .await
            .map_err(|e| format!("--listen {}: {e}", cli.listen))?;
        let http = tokio::net::TcpListener::bind(cli.http)
            .await
            .map_err(|e| format!("--http {}: {e}", cli.http))?;
        let grpc_addr = grpc.local_addr().map_err(|e| e.to_string())?;
        let http_addr = http.local_addr().map_err(|e| e.to_string())?;
        let source = match &options.limits {
            Limits::Static(set) => format!("file ({} limits)", set.len()),
            Limits::ControlPlane(control) => format!("control plane {}", control.url),
        };
        tracing::info!(grpc = %grpc_addr, http = %http_addr, limits = %source, "listening");
        keygate_ratelimit::serve(grpc, http, options, shutdown_signal()).await
    })
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keygate-ratelimit: error: {e}");
            ExitCode::FAILURE
        }
    }
}
