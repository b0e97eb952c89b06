//! `keygate-control`: the control plane binary. Flags only; everything else is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use keygate_control::secret::OperatorKind;
use keygate_control::store::{Database, Db};
use keygate_control::{service, tls, ApiCatalog, AppState, Config, DEFAULT_REGION};

mod cli;

/// keygate control plane: accounts and API keys (Twilio-compatible Keys API, Exotel-style
/// regeneration with grace), and the edge config feed for keygate's Envoy filter.
///
/// Start with `keygate-control serve --data ./keygate.db`: on an empty database it initializes
/// it first and prints the admin token, the first account's SID and auth token, and an edge
/// token, once. Secrets are shown once and stored only as SHA-256 digests.
const ENV_HELP: &str = "\
Environment variables (each sets the flag of the same meaning; flags win):
  KEYGATE_DATA            --data            database file (default ./keygate.db)
  KEYGATE_DATABASE        --database        Postgres URL instead of the file (postgres://user:pw@host:port/db)
  KEYGATE_LISTEN          --listen          serve: listen address (default 127.0.0.1:8088)
  KEYGATE_CATALOG         --catalog         API catalogue JSON (default: built in)
  KEYGATE_DEFAULT_REGION  --default-region  region of new accounts (default us1)
  KEYGATE_LOG_FORMAT      --log-format      json | text (default json)
  KEYGATE_LOG             --log             log filter (default info)
  KEYGATE_ACCOUNT_NAME    --account-name    init: first account's name; account create: --name
  KEYGATE_ACCOUNT_REGION  --region          account create: the account's region
  KEYGATE_TLS_CERT        --tls-cert        serve: TLS certificate chain, PEM (with --tls-key; default plain HTTP)
  KEYGATE_TLS_KEY         --tls-key         serve: TLS private key, PEM (with --tls-cert)
  KEYGATE_TRUSTED_PROXIES --trusted-proxies serve: peers whose X-Forwarded-For is believed (default none)
  KEYGATE_EDGE_TTL        --edge-ttl        serve: seconds until a silent edge leaves the fleet view (default 600)
  KEYGATE_USAGE_RETENTION_DAYS --usage-retention-days serve: days usage is kept per minute (default 7)
  KEYGATE_USAGE_HOURLY_RETENTION_DAYS --usage-hourly-retention-days serve: days usage is kept per hour (default 400)
  KEYGATE_FAILED_AUTH_LIMIT --failed-auth-limit serve: failed authentications per client address (default 30/1m)
  KEYGATE_CREDENTIAL_RATE --credential-rate serve: requests per key and per account (default 600/1m)
  KEYGATE_MAX_KEYS_PER_ACCOUNT, KEYGATE_MAX_ALLOWLIST_ENTRIES, KEYGATE_MAX_SECRETS_IN_GRACE,
  KEYGATE_MAX_REGENERATIONS_PER_HOUR, KEYGATE_MAX_BODY_BYTES: serve: the caps of the same names

Exit status: 0 on success, 1 with a one-line `keygate-control: error: ...` on stderr (also for a
flag that does not parse); `keys` and `accounts` add 2 (the server refused) and 3 (no answer):
see `keygate-control keys --help`.";

#[derive(Debug, Parser)]
#[command(name = "keygate-control", version, propagate_version = true, after_long_help = ENV_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the REST API and the edge feed (initializes an empty database first).
    Serve(ServeArgs),
    /// Create the database and print, once: an admin token, the first account's SID and auth
    /// token, and an edge token. Refuses an initialized database.
    Init(InitArgs),
    /// Manage accounts directly in the database (works while `serve` runs).
    #[command(subcommand)]
    Account(AccountCommand),
    /// Manage edge tokens (the credential edges use to read the feed).
    #[command(subcommand, name = "edge-token")]
    EdgeToken(EdgeTokenCommand),
    /// Make a CA and a server certificate for `serve --tls-cert/--tls-key` (ca.pem, server.pem,
    /// server.key in --dir). The CA's private key is not kept. Refuses to overwrite.
    #[command(name = "tls-init")]
    TlsInit(TlsInitArgs),
    /// Create, list, show, regenerate and delete keys through a running control plane's API.
    #[command(after_long_help = cli::HELP)]
    Keys(cli::KeysArgs),
    /// List, show, suspend and reactivate accounts through a running control plane's API
    /// (admin token).
    #[command(after_long_help = cli::HELP)]
    Accounts(cli::AccountsArgs),
}

#[derive(Debug, Args)]
struct DataArgs {
    /// SQLite database file (created if missing; WAL files live next to it).
    #[arg(
        long,
        env = "KEYGATE_DATA",
        default_value = "./keygate.db",
        value_name = "FILE"
    )]
    data: PathBuf,
    /// Postgres instead of the SQLite file: `postgres://user:password@host:port/db`. Every
    /// replica of a fleet names the same database; its schema is created on first start.
    #[arg(long, env = "KEYGATE_DATABASE", value_name = "URL")]
    database: Option<String>,
    /// API catalogue and limit defaults (JSON `{"apis": [...], "limits": {...}}`, the edge
    /// config's schema). Default: the built-in catalogue (the demo's APIs).
    #[arg(long, env = "KEYGATE_CATALOG", value_name = "FILE")]
    catalog: Option<PathBuf>,
    /// Region of accounts created without one.
    #[arg(long, env = "KEYGATE_DEFAULT_REGION", default_value = DEFAULT_REGION, value_name = "REGION")]
    default_region: String,
    /// Log format (logs go to stderr and never contain secrets).
    #[arg(long, env = "KEYGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    /// Log filter, in tracing-subscriber's EnvFilter syntax (`info`, `keygate_control=debug`).
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

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Address to listen on (port 0 picks a free port; the log line "listening" names it).
    #[arg(
        long,
        env = "KEYGATE_LISTEN",
        default_value = "127.0.0.1:8088",
        value_name = "ADDR"
    )]
    listen: SocketAddr,
    /// Seconds after which an edge that stopped polling leaves the fleet view (1 to 604800).
    #[arg(
        long,
        env = "KEYGATE_EDGE_TTL",
        default_value_t = 600,
        value_name = "SECONDS"
    )]
    edge_ttl: u64,
    /// Days usage is kept per minute (then per hour only), 1 to 366.
    #[arg(
        long,
        env = "KEYGATE_USAGE_RETENTION_DAYS",
        default_value_t = keygate_control::usage::DEFAULT_RETENTION_DAYS,
        value_name = "DAYS"
    )]
    usage_retention_days: u64,
    /// Days usage is kept per hour, 1 to 3660 (at least the minute retention).
    #[arg(
        long,
        env = "KEYGATE_USAGE_HOURLY_RETENTION_DAYS",
        default_value_t = keygate_control::usage::DEFAULT_HOURLY_RETENTION_DAYS,
        value_name = "DAYS"
    )]
    usage_hourly_retention_days: u64,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    door: DoorArgs,
}

/// Who may call the control plane, how often, and how much a tenant may hold.
#[derive(Debug, Args)]
struct DoorArgs {
    /// Comma-separated CIDRs of proxies in front of the control plane. Only when the TCP peer is
    /// one of them is the client address taken from X-Forwarded-For (its right-most entry that is
    /// not a trusted proxy); otherwise the peer is the client. Default: none (the peer, always).
    #[arg(
        long,
        env = "KEYGATE_TRUSTED_PROXIES",
        value_name = "CIDR,...",
        value_delimiter = ','
    )]
    trusted_proxies: Vec<String>,
    /// Failed authentications allowed per client address (IPv6 per /64), as REQUESTS/PERIOD
    /// (`30/1m`), or `off`. Past it: 429 too_many_failed_auth with Retry-After.
    #[arg(
        long,
        env = "KEYGATE_FAILED_AUTH_LIMIT",
        default_value = "30/1m",
        value_name = "N/PERIOD"
    )]
    failed_auth_limit: String,
    /// Requests per credential: each key, and each account with all its credentials together
    /// (operator tokens are not limited), as REQUESTS/PERIOD, or `off`. Past it: 429.
    #[arg(
        long,
        env = "KEYGATE_CREDENTIAL_RATE",
        default_value = "600/1m",
        value_name = "N/PERIOD"
    )]
    credential_rate: String,
    /// Keys an account may hold (409 too_many_keys beyond).
    #[arg(
        long,
        env = "KEYGATE_MAX_KEYS_PER_ACCOUNT",
        default_value_t = 1000,
        value_name = "N"
    )]
    max_keys_per_account: u64,
    /// Entries of one allowlist, a key's or an account's (400 beyond).
    #[arg(
        long,
        env = "KEYGATE_MAX_ALLOWLIST_ENTRIES",
        default_value_t = 100,
        value_name = "N"
    )]
    max_allowlist_entries: usize,
    /// Rotated secrets a key may keep in their grace period (409 too_many_secrets_in_grace).
    #[arg(
        long,
        env = "KEYGATE_MAX_SECRETS_IN_GRACE",
        default_value_t = 3,
        value_name = "N"
    )]
    max_secrets_in_grace: u64,
    /// Regenerations of one key in any hour (429 too_many_regenerations beyond).
    #[arg(
        long,
        env = "KEYGATE_MAX_REGENERATIONS_PER_HOUR",
        default_value_t = 10,
        value_name = "N"
    )]
    max_regenerations_per_hour: u64,
    /// Largest request body in bytes (413 body_too_large beyond).
    #[arg(
        long,
        env = "KEYGATE_MAX_BODY_BYTES",
        default_value_t = 65536,
        value_name = "BYTES"
    )]
    max_body_bytes: usize,
}

/// `N/PERIOD` (`30/1m`) or `off`; the period is checked when the limits compile.
fn rate_flag(flag: &str, v: &str) -> Result<Option<keygate_core::config::RateDoc>, String> {
    if v == "off" {
        return Ok(None);
    }
    let (n, per) = v.split_once('/').ok_or_else(|| {
        format!("{flag}: expected REQUESTS/PERIOD (like 30/1m) or off, got {v:?}")
    })?;
    let requests = n
        .parse::<u32>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{flag}: {n:?} is not a number of requests from 1"))?;
    Ok(Some(keygate_core::config::RateDoc {
        requests,
        per: per.to_owned(),
        shadow: false,
        scope: Default::default(),
    }))
}

impl DoorArgs {
    fn apply(&self, cfg: &mut Config) -> Result<(), String> {
        cfg.limits = keygate_control::ControlLimits {
            failed_auth: rate_flag("--failed-auth-limit", &self.failed_auth_limit)?,
            credential_rate: rate_flag("--credential-rate", &self.credential_rate)?,
        };
        cfg.caps = keygate_control::Caps {
            keys_per_account: self.max_keys_per_account,
            allowlist_entries: self.max_allowlist_entries,
            secrets_in_grace: self.max_secrets_in_grace,
            regenerations_per_hour: self.max_regenerations_per_hour,
            body_bytes: self.max_body_bytes,
        };
        let proxies: Vec<String> = self
            .trusted_proxies
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        cfg.trusted_proxies = if proxies.is_empty() {
            None
        } else {
            Some(
                keygate_core::ip::IpAllowlist::parse(&proxies).map_err(|(i, m)| match i {
                    Some(i) => format!("--trusted-proxies[{i}]: {m}"),
                    None => format!("--trusted-proxies: {m}"),
                })?,
            )
        };
        Ok(())
    }
}

/// TLS for the API and the edge feeds: both files or neither (plain HTTP).
#[derive(Debug, Args)]
struct TlsArgs {
    /// Serve HTTPS with this certificate chain (PEM, server certificate first).
    #[arg(long, env = "KEYGATE_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "KEYGATE_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct TlsInitArgs {
    /// Directory to write ca.pem, server.pem and server.key into (created if missing).
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// A DNS name or IP address the server certificate is for (repeat for more; the first is
    /// also its common name). Default: keygate-control, localhost, 127.0.0.1, ::1.
    #[arg(long = "name", value_name = "NAME")]
    names: Vec<String>,
    /// Days the certificates stay valid.
    #[arg(long, default_value_t = 365, value_name = "N")]
    days: u32,
}

#[derive(Debug, Args)]
struct InitArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Friendly name of the first account.
    #[arg(long, env = "KEYGATE_ACCOUNT_NAME", value_name = "NAME")]
    account_name: Option<String>,
}

#[derive(Debug, Subcommand)]
enum AccountCommand {
    /// Create an account; prints its SID and auth token once.
    Create {
        #[command(flatten)]
        data: DataArgs,
        /// Friendly name (at most 64 characters).
        #[arg(long, env = "KEYGATE_ACCOUNT_NAME", value_name = "NAME")]
        name: Option<String>,
        /// Home region (default: --default-region).
        #[arg(long, env = "KEYGATE_ACCOUNT_REGION", value_name = "REGION")]
        region: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum EdgeTokenCommand {
    /// Create an edge token; prints it once.
    Create {
        #[command(flatten)]
        data: DataArgs,
    },
}

fn init_logs(args: &DataArgs) {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn config(args: &DataArgs) -> Result<Config, String> {
    let catalog = match &args.catalog {
        None => ApiCatalog::built_in()?,
        Some(path) => {
            let bytes = std::fs::read(path)
                .map_err(|e| format!("cannot read catalogue {}: {e}", path.display()))?;
            ApiCatalog::parse(&bytes).map_err(|e| format!("catalogue {}: {e}", path.display()))?
        }
    };
    Ok(Config {
        catalog,
        default_region: args.default_region.clone(),
        ..Config::with_built_in_catalog()?
    })
}

impl DataArgs {
    fn database(&self) -> Result<Database, String> {
        match &self.database {
            None => Ok(Database::Sqlite(self.data.clone())),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Ok(Database::Postgres(url.clone()))
            }
            Some(_) => Err(
                "--database: must be a postgres:// or postgresql:// URL (use --data FILE for SQLite)"
                    .to_owned(),
            ),
        }
    }
}

/// Opens the database on a runtime of its own and runs `f` (a CLI command) against it.
fn with_db<R>(args: &DataArgs, f: impl FnOnce(&Db) -> Result<R, String>) -> Result<R, String> {
    let database = args.database()?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| format!("cannot start runtime: {e}"))?;
    let db = rt.block_on(Db::open(&database))?;
    f(&db)
}

fn print_init(out: &service::Initialized, database: &Database) {
    println!(
        "# keygate-control initialized {} (config version {})",
        database.display(),
        out.version
    );
    println!("# Shown once, stored only as digests. Keep them in a secrets manager.");
    println!("# Operator credential (Bearer) for /v1/accounts and everything else:");
    println!("KEYGATE_ADMIN_TOKEN={}", out.admin_token.expose());
    println!("# First account: HTTP Basic with the SID and the auth token:");
    println!("ACCOUNT_SID={}", out.account.sid);
    println!("AUTH_TOKEN={}", out.auth_token.expose());
    println!(
        "# Edge credential (Bearer) for the edge feeds, GET /v1/edge/changes and /v1/edge/config:"
    );
    println!("KEYGATE_EDGE_TOKEN={}", out.edge_token.expose());
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    let tls = tls::TlsFiles::from_options(args.tls.tls_cert.clone(), args.tls.tls_key.clone())?
        .map(|files| tls::load(&files))
        .transpose()?;
    let mut cfg = config(&args.data)?;
    args.door.apply(&mut cfg)?;
    if !(1..=604_800).contains(&args.edge_ttl) {
        return Err("--edge-ttl: must be between 1 and 604800 seconds".to_owned());
    }
    cfg.edge_ttl = std::time::Duration::from_secs(args.edge_ttl);
    if !(1..=366).contains(&args.usage_retention_days) {
        return Err("--usage-retention-days: must be between 1 and 366".to_owned());
    }
    if !(args.usage_retention_days..=3660).contains(&args.usage_hourly_retention_days) {
        return Err(
            "--usage-hourly-retention-days: must be between --usage-retention-days and 3660"
                .to_owned(),
        );
    }
    let days = |d: u64| std::time::Duration::from_secs(d * 86_400);
    cfg.usage_retention = days(args.usage_retention_days);
    cfg.usage_hourly_retention = days(args.usage_hourly_retention_days);
    let database = args.data.database()?;
    {
        let db = Db::open(&database).await?;
        let (cat, region) = (cfg.catalog.clone(), cfg.default_region.clone());
        // One transaction: replicas that start together on an empty database initialize once
        // (the others see the admin token and skip).
        let out = db
            .write(move |tx| {
                if tx.has_admin()? {
                    return Ok(None);
                }
                service::init(tx, &cat, &region, None).map(Some)
            })
            .await
            .map_err(|e| e.message())?;
        if let Some(out) = out {
            tracing::info!(database = %database.display(), "empty database: initialized (credentials on stdout)");
            print_init(&out, &database);
        }
    }
    let state = AppState::open(&database, cfg).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(addr = %addr, tls = tls.is_some(), database = %database.display(), version = state.current_version(), "listening");
    let shutdown = keygate_control::shutdown_signal();
    match tls {
        Some(tls) => keygate_control::run_tls(listener, state, tls, shutdown).await,
        None => keygate_control::run(listener, state, shutdown).await,
    }
    .map_err(|e| e.to_string())?;
    tracing::info!("stopped");
    Ok(())
}

fn run(cli: Cli) -> Result<(), cli::Failure> {
    match cli.command {
        Command::Serve(args) => {
            init_logs(&args.data);
            let rt =
                tokio::runtime::Runtime::new().map_err(|e| format!("cannot start runtime: {e}"))?;
            Ok(rt.block_on(serve(args))?)
        }
        Command::Keys(args) => cli::keys(args),
        Command::Accounts(args) => cli::accounts(args),
        Command::Init(args) => {
            init_logs(&args.data);
            let cfg = config(&args.data)?;
            let out = with_db(&args.data, |db| {
                db.write_blocking(move |tx| {
                    service::init(tx, &cfg.catalog, &cfg.default_region, args.account_name)
                })
                .map_err(|e| e.message())
            })?;
            print_init(&out, &args.data.database()?);
            Ok(())
        }
        Command::Account(AccountCommand::Create { data, name, region }) => {
            init_logs(&data);
            let cfg = config(&data)?;
            let new = service::NewAccount {
                friendly_name: name,
                region,
                ..Default::default()
            };
            let (account, token, version) = with_db(&data, |db| {
                db.write_blocking(move |tx| {
                    service::create_account(tx, &cfg.catalog, &cfg.caps, &cfg.default_region, new)
                })
                .map_err(|e| e.message())
            })?;
            println!("# Account created (config version {version}); the auth token is shown once.");
            println!("ACCOUNT_SID={}", account.sid);
            println!("AUTH_TOKEN={}", token.expose());
            Ok(())
        }
        Command::TlsInit(args) => {
            let names = if args.names.is_empty() {
                ["keygate-control", "localhost", "127.0.0.1", "::1"]
                    .map(str::to_owned)
                    .to_vec()
            } else {
                args.names
            };
            let out = tls::init(&args.dir, &names, args.days)?;
            println!(
                "# keygate-control tls-init: a new CA and a server certificate for {}, valid {} days.",
                names.join(", "),
                args.days
            );
            println!("# The CA's private key was not kept: this CA signed this one certificate.");
            println!(
                "# Serve: keygate-control serve --tls-cert {} --tls-key {}",
                out.cert.display(),
                out.key.display()
            );
            println!(
                "# Trust (Envoy validation_context.trusted_ca, curl --cacert): {}",
                out.ca.display()
            );
            Ok(())
        }
        Command::EdgeToken(EdgeTokenCommand::Create { data }) => {
            init_logs(&data);
            let (sid, token) = with_db(&data, |db| {
                db.write_blocking(|tx| service::create_operator_token(tx, OperatorKind::Edge))
                    .map_err(|e| e.message())
            })?;
            println!("# Edge token {sid} created; shown once.");
            println!("KEYGATE_EDGE_TOKEN={}", token.expose());
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let parsed = match Cli::try_parse() {
        Ok(parsed) => parsed,
        // --help and --version print to stdout and succeed; a usage error is status 1.
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(cli::EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(parsed) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keygate-control: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
