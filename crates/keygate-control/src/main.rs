//! `keygate-control`: the control plane binary. Flags only; everything else is in the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use keygate_control::secret::OperatorKind;
use keygate_control::{service, store, AppState, Catalog, Config, DEFAULT_REGION};

/// keygate control plane: accounts and API keys (Twilio-compatible Keys API, Exotel-style
/// regeneration with grace), and the edge config feed for keygate's Envoy filter.
///
/// Start with `keygate-control serve --data ./keygate.db`: on an empty database it initializes
/// it first and prints the admin token, the first account's SID and auth token, and an edge
/// token, once. Secrets are shown once and stored only as SHA-256 digests.
const ENV_HELP: &str = "\
Environment variables (each sets the flag of the same meaning; flags win):
  KEYGATE_DATA            --data            database file (default ./keygate.db)
  KEYGATE_LISTEN          --listen          serve: listen address (default 127.0.0.1:8088)
  KEYGATE_CATALOG         --catalog         API catalogue JSON (default: built in)
  KEYGATE_DEFAULT_REGION  --default-region  region of new accounts (default us1)
  KEYGATE_LOG_FORMAT      --log-format      json | text (default json)
  KEYGATE_LOG             --log             log filter (default info)
  KEYGATE_ACCOUNT_NAME    --account-name    init: first account's name; account create: --name
  KEYGATE_ACCOUNT_REGION  --region          account create: the account's region

Exit status: 0 on success, 1 with a one-line `keygate-control: error: ...` on stderr.";

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
        None => Catalog::built_in()?,
        Some(path) => {
            let bytes = std::fs::read(path)
                .map_err(|e| format!("cannot read catalogue {}: {e}", path.display()))?;
            Catalog::parse(&bytes).map_err(|e| format!("catalogue {}: {e}", path.display()))?
        }
    };
    Ok(Config {
        catalog,
        default_region: args.default_region.clone(),
    })
}

fn open(path: &Path) -> Result<rusqlite::Connection, String> {
    store::open(path)
}

fn print_init(out: &service::Initialized, data: &Path) {
    println!(
        "# keygate-control initialized {} (config version {})",
        data.display(),
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
    let cfg = config(&args.data)?;
    {
        let mut conn = open(&args.data.data)?;
        if !store::has_admin(&conn).map_err(|e| e.message())? {
            tracing::info!(data = %args.data.data.display(), "empty database: initializing (credentials on stdout)");
            let out = service::init(&mut conn, &cfg.catalog, &cfg.default_region, None)
                .map_err(|e| e.message())?;
            print_init(&out, &args.data.data);
        }
    }
    let state = AppState::open(&args.data.data, cfg)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(addr = %addr, data = %args.data.data.display(), version = state.current_version(), "listening");
    keygate_control::run(listener, state, keygate_control::shutdown_signal())
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!("stopped");
    Ok(())
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Serve(args) => {
            init_logs(&args.data);
            let rt =
                tokio::runtime::Runtime::new().map_err(|e| format!("cannot start runtime: {e}"))?;
            rt.block_on(serve(args))
        }
        Command::Init(args) => {
            init_logs(&args.data);
            let cfg = config(&args.data)?;
            let mut conn = open(&args.data.data)?;
            let out = service::init(
                &mut conn,
                &cfg.catalog,
                &cfg.default_region,
                args.account_name,
            )
            .map_err(|e| e.message())?;
            print_init(&out, &args.data.data);
            Ok(())
        }
        Command::Account(AccountCommand::Create { data, name, region }) => {
            init_logs(&data);
            let cfg = config(&data)?;
            let mut conn = open(&data.data)?;
            let new = service::NewAccount {
                friendly_name: name,
                region,
                ..Default::default()
            };
            let (account, token, version) =
                service::create_account(&mut conn, &cfg.catalog, &cfg.default_region, new)
                    .map_err(|e| e.message())?;
            println!("# Account created (config version {version}); the auth token is shown once.");
            println!("ACCOUNT_SID={}", account.sid);
            println!("AUTH_TOKEN={}", token.expose());
            Ok(())
        }
        Command::EdgeToken(EdgeTokenCommand::Create { data }) => {
            init_logs(&data);
            let mut conn = open(&data.data)?;
            let (sid, token) = service::create_operator_token(&mut conn, OperatorKind::Edge)
                .map_err(|e| e.message())?;
            println!("# Edge token {sid} created; shown once.");
            println!("KEYGATE_EDGE_TOKEN={}", token.expose());
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keygate-control: error: {e}");
            ExitCode::FAILURE
        }
    }
}
