//! `keygate-control keys ...` and `keygate-control accounts ...`: HTTP clients of a running
//! control plane's `/v1` API (unlike `account create`, which writes the database directly).
//!
//! - Where: `--url` (`KEYGATE_URL`, default `http://127.0.0.1:8088`); for `https`, `--ca`
//!   (`KEYGATE_CA`) names the PEM CA to trust, and then only it (default: the web's public roots).
//! - Who: credentials come from the environment only, never from flags (a flag shows in `ps`),
//!   under the names `serve` prints them: a main key's `KEYGATE_KEY_SID` + `KEYGATE_KEY_SECRET`,
//!   or `ACCOUNT_SID` + `AUTH_TOKEN`, or `KEYGATE_ADMIN_TOKEN` ([`keys_credential`]).
//! - What comes back: a table or a list of fields, or with `--json` the API's JSON as it came
//!   (one line); a new secret is printed once, on a line of its own, and nowhere else. Nothing is
//!   logged.
//! - Exit status ([`Failure::exit_code`]): 0 done, 1 usage or local error, 2 the server refused
//!   (its status, code and message), 3 no answer from the server (cannot connect, TLS, timeout,
//!   or an answer that is not the API's).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::{Method, StatusCode, Url};
use serde_json::{json, Map, Value};

/// Exit status of a usage or local error (bad flag, missing credential, unreadable `--ca`).
pub const EXIT_USAGE: u8 = 1;
/// Exit status when the server answered with a refusal (4xx, 5xx).
pub const EXIT_REFUSED: u8 = 2;
/// Exit status when no usable answer came back from `--url`.
pub const EXIT_UNREACHABLE: u8 = 3;

pub const HELP: &str = "\
Credentials come from the environment only (as `serve` prints them; `source` its output):
  keys:      KEYGATE_KEY_SID + KEYGATE_KEY_SECRET (a main key of --account), else
             ACCOUNT_SID + AUTH_TOKEN (the account), else KEYGATE_ADMIN_TOKEN (any --account)
  accounts:  KEYGATE_ADMIN_TOKEN
  KEYGATE_URL  --url  the control plane (default http://127.0.0.1:8088)
  KEYGATE_CA   --ca   PEM CA certificate(s) to trust for an https URL (then only these)

Output: tables, or with --json the API's JSON on one line (nothing else on stdout). A new key's
secret is printed once: on a line of its own, or in the JSON's \"secret\".

Exit status: 0 done; 1 usage or local error; 2 the server refused (its status, code and
message on stderr); 3 no answer from --url (cannot connect, TLS failure, timeout, or not the
keygate API).";

/// Why a command failed, and so its exit status.
#[derive(Debug)]
pub enum Failure {
    /// A usage or local error (exit 1); also every error of the database commands.
    Local(String),
    /// The server refused (exit 2).
    Refused(String),
    /// No usable answer from the server (exit 3).
    Unreachable(String),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Local(_) => EXIT_USAGE,
            Failure::Refused(_) => EXIT_REFUSED,
            Failure::Unreachable(_) => EXIT_UNREACHABLE,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Local(m) | Failure::Refused(m) | Failure::Unreachable(m) => f.write_str(m),
        }
    }
}

impl From<String> for Failure {
    fn from(m: String) -> Self {
        Failure::Local(m)
    }
}

/// Where the control plane is, and how to print its answers.
#[derive(Debug, Args)]
pub struct Remote {
    /// The control plane's base URL (`http://` or `https://`).
    #[arg(
        long,
        env = "KEYGATE_URL",
        default_value = "http://127.0.0.1:8088",
        value_name = "URL",
        global = true
    )]
    url: String,
    /// PEM CA certificate(s) to trust for an https URL, and only those (default: the web's
    /// public roots).
    #[arg(long, env = "KEYGATE_CA", value_name = "FILE", global = true)]
    ca: Option<PathBuf>,
    /// Print the API's JSON (one line) instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(flatten)]
    remote: Remote,
    /// The account whose keys these are.
    #[arg(long, env = "ACCOUNT_SID", value_name = "ACCOUNT_SID", global = true)]
    account: Option<String>,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a key; prints its secret once.
    Create(CreateKey),
    /// List the account's keys.
    List,
    /// Show one key and its secrets (metadata only: a secret is never shown again).
    Show {
        #[arg(value_name = "KEY_SID")]
        sid: String,
    },
    /// Give a key a new secret (printed once); the old one works for the grace period.
    Regenerate {
        #[arg(value_name = "KEY_SID")]
        sid: String,
        /// Seconds the previous secret keeps working (0 revokes it now; default: the server's,
        /// 172800 = 48 h).
        #[arg(long, value_name = "SECONDS")]
        grace_seconds: Option<u64>,
    },
    /// Delete a key: the edge refuses it from the next config version.
    Delete {
        #[arg(value_name = "KEY_SID")]
        sid: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RoleArg {
    Main,
    Standard,
    Publishable,
}

impl RoleArg {
    fn as_str(self) -> &'static str {
        match self {
            RoleArg::Main => "main",
            RoleArg::Standard => "standard",
            RoleArg::Publishable => "publishable",
        }
    }
}

#[derive(Debug, Args)]
struct CreateKey {
    /// The key's role (default: the server's, standard).
    #[arg(long, value_enum)]
    role: Option<RoleArg>,
    /// Friendly name (at most 64 characters).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// An API of the catalogue the key may call (repeat or comma-separate; default: every API).
    #[arg(long = "api", value_name = "API", value_delimiter = ',')]
    apis: Vec<String>,
    /// A CIDR the key may be used from (repeat or comma-separate; default: any address).
    #[arg(long = "allow-ip", value_name = "CIDR", value_delimiter = ',')]
    allowed_ips: Vec<String>,
    /// The key's own rate, REQUESTS/PERIOD (`100/1m`; default: the catalogue's).
    #[arg(long, value_name = "N/PERIOD")]
    rate: Option<String>,
    /// The key's rate for one API, API=REQUESTS/PERIOD (`calls=10/1s`; repeat for more).
    #[arg(long = "api-rate", value_name = "API=N/PERIOD")]
    api_rates: Vec<String>,
    /// When the key stops working (RFC 3339, `2027-01-01T00:00:00Z`).
    #[arg(long, value_name = "TIME")]
    expires_at: Option<String>,
    /// Create it disabled.
    #[arg(long)]
    disabled: bool,
}

#[derive(Debug, Args)]
pub struct AccountsArgs {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    command: AccountsCommand,
}

#[derive(Debug, Subcommand)]
enum AccountsCommand {
    /// List every account.
    List,
    /// Show one account.
    Show {
        #[arg(value_name = "ACCOUNT_SID")]
        sid: String,
    },
    /// Suspend an account: every credential of it is refused (403 account_suspended).
    Suspend {
        #[arg(value_name = "ACCOUNT_SID")]
        sid: String,
    },
    /// Reactivate a suspended account.
    Reactivate {
        #[arg(value_name = "ACCOUNT_SID")]
        sid: String,
    },
}

/// How a request authenticates. `Debug` never shows the secret.
enum Credential {
    Basic { user: String, secret: String },
    Bearer(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Basic { user, .. } => write!(f, "Basic({user}, <secret>)"),
            Credential::Bearer(_) => f.write_str("Bearer(<token>)"),
        }
    }
}

/// An environment variable's value; unset and empty are the same.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The credential for `keys`, from the environment: a main key's (`KEYGATE_KEY_SID` +
/// `KEYGATE_KEY_SECRET`), else the account's own (`ACCOUNT_SID` + `AUTH_TOKEN`), else the admin
/// token: the least powerful of what is there.
fn keys_credential() -> Result<Credential, Failure> {
    match (env("KEYGATE_KEY_SID"), env("KEYGATE_KEY_SECRET")) {
        (Some(user), Some(secret)) => return Ok(Credential::Basic { user, secret }),
        (Some(_), None) => {
            return Err(Failure::Local(
                "KEYGATE_KEY_SID is set but KEYGATE_KEY_SECRET is not".to_owned(),
            ))
        }
        (None, Some(_)) => {
            return Err(Failure::Local(
                "KEYGATE_KEY_SECRET is set but KEYGATE_KEY_SID is not".to_owned(),
            ))
        }
        (None, None) => {}
    }
    if let Some(secret) = env("AUTH_TOKEN") {
        let user = env("ACCOUNT_SID").ok_or_else(|| {
            Failure::Local("AUTH_TOKEN is set but ACCOUNT_SID (its account) is not".to_owned())
        })?;
        return Ok(Credential::Basic { user, secret });
    }
    env("KEYGATE_ADMIN_TOKEN")
        .map(Credential::Bearer)
        .ok_or_else(|| {
            Failure::Local(
                "no credentials: set KEYGATE_KEY_SID and KEYGATE_KEY_SECRET (a main key), or \
             ACCOUNT_SID and AUTH_TOKEN, or KEYGATE_ADMIN_TOKEN"
                    .to_owned(),
            )
        })
}

fn admin_credential() -> Result<Credential, Failure> {
    env("KEYGATE_ADMIN_TOKEN")
        .map(Credential::Bearer)
        .ok_or_else(|| {
            Failure::Local("no credentials: accounts needs KEYGATE_ADMIN_TOKEN".to_owned())
        })
}

/// A client of one control plane with one credential.
struct Api {
    client: Client,
    base: Url,
    credential: Credential,
    json: bool,
}

/// A 2xx answer: its JSON as sent (for `--json`) and parsed (empty and `null` for a 204).
struct Answer {
    raw: String,
    body: Value,
}

impl Api {
    fn new(remote: &Remote, credential: Credential) -> Result<Api, Failure> {
        let base = Url::parse(&remote.url)
            .map_err(|e| Failure::Local(format!("--url {:?}: {e}", remote.url)))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(Failure::Local(format!(
                "--url {:?}: must be an http:// or https:// URL",
                remote.url
            )));
        }
        if !base.username().is_empty() || base.password().is_some() {
            return Err(Failure::Local(
                "--url: must not carry credentials (they come from the environment)".to_owned(),
            ));
        }
        let mut builder = Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            // A redirect could carry the credential elsewhere; the API never redirects.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(path) = &remote.ca {
            if base.scheme() != "https" {
                return Err(Failure::Local(format!(
                    "--ca is for an https URL; --url is {base}"
                )));
            }
            let pem = std::fs::read(path)
                .map_err(|e| Failure::Local(format!("--ca {}: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| Failure::Local(format!("--ca {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(Failure::Local(format!(
                    "--ca {}: no PEM certificate in it",
                    path.display()
                )));
            }
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder
            .build()
            .map_err(|e| Failure::Local(format!("cannot make an HTTP client: {e}")))?;
        Ok(Api {
            client,
            base,
            credential,
            json: remote.json,
        })
    }

    /// The URL of `segments` under the base, each one percent-encoded (a SID cannot leave
    /// its place in the path).
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    fn send(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<Value>,
    ) -> Result<Answer, Failure> {
        let url = self.url(segments);
        let mut request: RequestBuilder = self
            .client
            .request(method, url.clone())
            .header(reqwest::header::ACCEPT, "application/json");
        request = match &self.credential {
            Credential::Basic { user, secret } => request.basic_auth(user, Some(secret)),
            Credential::Bearer(token) => request.bearer_auth(token),
        };
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let response = request.send().map_err(|e| unreachable(&self.base, &e))?;
        answer(&self.base, response)
    }
}

/// The innermost cause of a transport error: the part that says what went wrong.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

fn unreachable(base: &Url, e: &reqwest::Error) -> Failure {
    let cause = root_cause(e);
    let what = if e.is_timeout() {
        "no answer in time from"
    } else {
        "cannot connect to"
    };
    let mut message = format!("{what} {}: {cause}", base.as_str().trim_end_matches('/'));
    if base.scheme() == "https" && cause.contains("certificate") {
        message.push_str(" (give the server's CA with --ca or KEYGATE_CA)");
    }
    Failure::Unreachable(message)
}

/// A response, judged: 2xx is an [`Answer`] (JSON, or nothing for 204); 4xx and 5xx are the
/// server's refusal, in its own words when it is the API's error shape.
fn answer(base: &Url, response: Response) -> Result<Answer, Failure> {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let raw = response.text().map_err(|e| unreachable(base, &e))?;
    let shown = base.as_str().trim_end_matches('/');
    if status.is_success() {
        if status == StatusCode::NO_CONTENT {
            return Ok(Answer {
                raw: String::new(),
                body: Value::Null,
            });
        }
        let body = serde_json::from_str(&raw).map_err(|_| {
            Failure::Unreachable(format!(
                "{shown} answered {status} without JSON: is it a keygate control plane?"
            ))
        })?;
        return Ok(Answer { raw, body });
    }
    if status.is_client_error() || status.is_server_error() {
        let parsed: Option<Value> = serde_json::from_str(&raw).ok();
        let error = parsed.as_ref().map(|v| &v["error"]);
        let mut message = match error.map(|e| (&e["code"], &e["message"])) {
            Some((Value::String(code), Value::String(text))) => {
                format!("the server refused: {} {code}: {text}", status.as_u16())
            }
            _ => format!("the server refused: {status} (not the keygate API's error shape)"),
        };
        if let Some(s) = retry_after {
            let _ = write!(message, " (retry after {s} s)");
        }
        return Err(Failure::Refused(message));
    }
    Err(Failure::Unreachable(format!(
        "{shown} answered {status}: is it a keygate control plane?"
    )))
}

/// `N/PERIOD` as the API's rate object; the period is the server's to judge.
fn rate(flag: &str, v: &str) -> Result<Value, Failure> {
    let (n, per) = v.split_once('/').ok_or_else(|| {
        Failure::Local(format!(
            "{flag}: expected REQUESTS/PERIOD (like 100/1m), got {v:?}"
        ))
    })?;
    let requests: u32 = n
        .parse()
        .map_err(|_| Failure::Local(format!("{flag}: {n:?} is not a number of requests")))?;
    Ok(json!({ "requests": requests, "per": per }))
}

fn create_body(k: &CreateKey) -> Result<Value, Failure> {
    let mut body = Map::new();
    if let Some(role) = k.role {
        body.insert("role".into(), json!(role.as_str()));
    }
    if let Some(name) = &k.name {
        body.insert("friendly_name".into(), json!(name));
    }
    if !k.apis.is_empty() {
        body.insert("apis".into(), json!(k.apis));
    }
    if !k.allowed_ips.is_empty() {
        body.insert("allowed_ips".into(), json!(k.allowed_ips));
    }
    let mut limits = Map::new();
    if let Some(r) = &k.rate {
        limits.insert("rate".into(), rate("--rate", r)?);
    }
    let mut apis = Map::new();
    for entry in &k.api_rates {
        let (api, r) = entry.split_once('=').ok_or_else(|| {
            Failure::Local(format!(
                "--api-rate: expected API=REQUESTS/PERIOD (like calls=10/1s), got {entry:?}"
            ))
        })?;
        apis.insert(api.to_owned(), rate("--api-rate", r)?);
    }
    if !apis.is_empty() {
        limits.insert("apis".into(), Value::Object(apis));
    }
    if !limits.is_empty() {
        body.insert("limits".into(), Value::Object(limits));
    }
    if let Some(t) = &k.expires_at {
        body.insert("expires_at".into(), json!(t));
    }
    if k.disabled {
        body.insert("enabled".into(), json!(false));
    }
    Ok(Value::Object(body))
}

/// `keygate-control keys ...`.
pub fn keys(args: KeysArgs) -> Result<(), Failure> {
    let account = args.account.clone().ok_or_else(|| {
        Failure::Local("no account: give --account or set ACCOUNT_SID".to_owned())
    })?;
    let api = Api::new(&args.remote, keys_credential()?)?;
    let keys_path = ["v1", "accounts", account.as_str(), "keys"];
    match args.command {
        KeysCommand::Create(k) => {
            let a = api.send(Method::POST, &keys_path, Some(create_body(&k)?))?;
            print_with_secret(&api, &a);
        }
        KeysCommand::List => {
            let a = api.send(Method::GET, &keys_path, None)?;
            if api.json {
                println!("{}", a.raw.trim_end());
            } else {
                print!("{}", keys_table(&a.body));
            }
        }
        KeysCommand::Show { sid } => {
            let a = api.send(
                Method::GET,
                &[&keys_path[..], &[sid.as_str()]].concat(),
                None,
            )?;
            if api.json {
                println!("{}", a.raw.trim_end());
            } else {
                print!("{}", key_fields(&a.body));
            }
        }
        KeysCommand::Regenerate { sid, grace_seconds } => {
            let body = match grace_seconds {
                Some(s) => json!({ "grace_seconds": s }),
                None => json!({}),
            };
            let path = [&keys_path[..], &[sid.as_str(), "regenerate"]].concat();
            let a = api.send(Method::POST, &path, Some(body))?;
            print_with_secret(&api, &a);
        }
        KeysCommand::Delete { sid } => {
            api.send(
                Method::DELETE,
                &[&keys_path[..], &[sid.as_str()]].concat(),
                None,
            )?;
            if !api.json {
                println!("deleted key {sid}");
            }
        }
    }
    Ok(())
}

/// `keygate-control accounts ...`.
pub fn accounts(args: AccountsArgs) -> Result<(), Failure> {
    let api = Api::new(&args.remote, admin_credential()?)?;
    let a = match &args.command {
        AccountsCommand::List => {
            let a = api.send(Method::GET, &["v1", "accounts"], None)?;
            if api.json {
                println!("{}", a.raw.trim_end());
            } else {
                print!("{}", accounts_table(&a.body));
            }
            return Ok(());
        }
        AccountsCommand::Show { sid } => api.send(Method::GET, &["v1", "accounts", sid], None)?,
        AccountsCommand::Suspend { sid } => api.send(
            Method::PATCH,
            &["v1", "accounts", sid],
            Some(json!({ "status": "suspended" })),
        )?,
        AccountsCommand::Reactivate { sid } => api.send(
            Method::PATCH,
            &["v1", "accounts", sid],
            Some(json!({ "status": "active" })),
        )?,
    };
    if api.json {
        println!("{}", a.raw.trim_end());
    } else {
        print!("{}", account_fields(&a.body));
    }
    Ok(())
}

/// A created or regenerated key: its fields, then the secret alone on the last line; or the
/// API's JSON (which holds the secret) and nothing else.
fn print_with_secret(api: &Api, a: &Answer) {
    if api.json {
        println!("{}", a.raw.trim_end());
        return;
    }
    print!("{}", key_fields(&a.body));
    println!("# The secret, shown this once (only its digest is stored); the next line is it:");
    println!("{}", text(&a.body["secret"]));
}

/// A JSON value as a cell: strings bare, `null` as `-`, lists comma-joined, the rest as JSON.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Bool(true) => "yes".to_owned(),
        Value::Bool(false) => "no".to_owned(),
        Value::Array(items) if items.is_empty() => "-".to_owned(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Left-aligned columns, two spaces apart; the last column is not padded.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i == last {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `current`, or `in grace until T`, with the last use when the server reports it.
fn secret_state(s: &Value) -> String {
    let mut state = if s["current"] == Value::Bool(true) {
        format!("current, created {}", text(&s["created_at"]))
    } else {
        format!(
            "previous, created {}, works until {}",
            text(&s["created_at"]),
            text(&s["not_after"])
        )
    };
    if let Some(used) = s.get("last_used_at") {
        let _ = write!(state, ", last used {}", used.as_str().unwrap_or("never"));
    }
    state
}

fn keys_table(body: &Value) -> String {
    let keys = body["keys"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if keys.is_empty() {
        return "no keys\n".to_owned();
    }
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            let secrets = k["secrets"].as_array().map(Vec::len).unwrap_or_default();
            vec![
                text(&k["sid"]),
                text(&k["role"]),
                text(&k["enabled"]),
                if k["apis"].is_null() {
                    "*".to_owned()
                } else {
                    text(&k["apis"])
                },
                secrets.to_string(),
                text(&k["created_at"]),
                text(&k["friendly_name"]),
            ]
        })
        .collect();
    table(
        &[
            "SID", "ROLE", "ENABLED", "APIS", "SECRETS", "CREATED", "NAME",
        ],
        &rows,
    )
}

fn key_fields(k: &Value) -> String {
    let mut rows = vec![
        vec!["sid".to_owned(), text(&k["sid"])],
        vec!["account_sid".to_owned(), text(&k["account_sid"])],
        vec!["friendly_name".to_owned(), text(&k["friendly_name"])],
        vec!["role".to_owned(), text(&k["role"])],
        vec![
            "apis".to_owned(),
            if k["apis"].is_null() {
                "every API".to_owned()
            } else {
                text(&k["apis"])
            },
        ],
        vec![
            "allowed_ips".to_owned(),
            if k["allowed_ips"].is_null() {
                "any address".to_owned()
            } else {
                text(&k["allowed_ips"])
            },
        ],
        vec![
            "limits".to_owned(),
            if k["limits"].is_null() {
                "the catalogue's".to_owned()
            } else {
                k["limits"].to_string()
            },
        ],
        vec!["expires_at".to_owned(), text(&k["expires_at"])],
        vec!["enabled".to_owned(), text(&k["enabled"])],
        vec!["created_at".to_owned(), text(&k["created_at"])],
        vec!["updated_at".to_owned(), text(&k["updated_at"])],
    ];
    if let Some(used) = k.get("last_used_at") {
        rows.push(vec![
            "last_used_at".to_owned(),
            used.as_str().unwrap_or("never").to_owned(),
        ]);
    }
    for (i, s) in k["secrets"].as_array().into_iter().flatten().enumerate() {
        rows.push(vec![format!("secrets[{i}]"), secret_state(s)]);
    }
    fields(&rows)
}

/// `name  value` lines, the names padded to one width.
fn fields(rows: &[Vec<String>]) -> String {
    let width = rows.iter().map(|r| r[0].len()).max().unwrap_or_default();
    let mut out = String::new();
    for r in rows {
        let _ = writeln!(out, "{:<width$}  {}", r[0], r[1]);
    }
    out
}

fn accounts_table(body: &Value) -> String {
    let accounts = body["accounts"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if accounts.is_empty() {
        return "no accounts\n".to_owned();
    }
    let rows: Vec<Vec<String>> = accounts
        .iter()
        .map(|a| {
            vec![
                text(&a["sid"]),
                text(&a["status"]),
                text(&a["region"]),
                text(&a["regions"]),
                text(&a["created_at"]),
                text(&a["friendly_name"]),
            ]
        })
        .collect();
    table(
        &["SID", "STATUS", "REGION", "REGIONS", "CREATED", "NAME"],
        &rows,
    )
}

fn account_fields(a: &Value) -> String {
    let rows = vec![
        vec!["sid".to_owned(), text(&a["sid"])],
        vec!["friendly_name".to_owned(), text(&a["friendly_name"])],
        vec!["status".to_owned(), text(&a["status"])],
        vec!["region".to_owned(), text(&a["region"])],
        vec!["regions".to_owned(), text(&a["regions"])],
        vec![
            "allowed_ips".to_owned(),
            if a["allowed_ips"].is_null() {
                "any address".to_owned()
            } else {
                text(&a["allowed_ips"])
            },
        ],
        vec![
            "limits".to_owned(),
            if a["limits"].is_null() {
                "the catalogue's".to_owned()
            } else {
                a["limits"].to_string()
            },
        ],
        vec!["created_at".to_owned(), text(&a["created_at"])],
        vec!["updated_at".to_owned(), text(&a["updated_at"])],
    ];
    fields(&rows)
}
