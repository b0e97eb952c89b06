//! Validating a config document once and compiling it into lookup tables.
//!
//! Every error names the exact place in the document (`keys[3].allowed_ips[0]: ...`). A config
//! either compiles whole or not at all; callers keep the previous [`CompiledConfig`] on error.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use crate::config::{
    AccountDoc, AccountStatus, ApiDoc, ConfigDoc, CorsPreflight, KeyDoc, LimitScope, LimitsDoc,
    OnStoreErrorDoc, RateDoc, Role, Scheme, SecretDoc, UnknownRoutes, WrongRegion, SCHEMA_V1,
};
use crate::credential::EnabledSchemes;
use crate::digest::{parse_digest_hex, Digest32, Digester};
use crate::ip::IpAllowlist;
use crate::path::Template;
use crate::ratelimit::{OnStoreError, Rate};
use crate::region::{valid_region, REGION_RULE};

/// A config rejected at compile time: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// JSON path such as `keys[3].allowed_ips[0]`; empty for the document itself.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() || self.path == "." {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(path: impl Into<String>, message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        path: path.into(),
        message: message.into(),
    })
}

/// Who a credential identifies.
#[derive(Debug, Clone, PartialEq)]
pub enum Principal {
    Key(Arc<Key>),
    Account(Arc<Account>),
}

/// Where principals are looked up: the compiled tables of a static config
/// ([`StaticDirectory`]), or the filter's view of config published in Envoy shared data.
pub trait Directory {
    /// A key or an account by its SID (the Basic user-id).
    fn by_sid(&self, sid: &[u8]) -> Option<Principal>;
    /// A key by the digest of one of its secrets (Bearer).
    fn by_token(&self, digest: &Digest32) -> Option<Arc<Key>>;
    /// An account by SID.
    fn account(&self, sid: &str) -> Option<Arc<Account>>;
}

/// A compiled API catalogue entry.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    pub(crate) name: Arc<str>,
    pub(crate) methods: Vec<Box<[u8]>>,
    pub(crate) templates: Vec<Template>,
    pub(crate) publishable: bool,
    pub(crate) management: bool,
    /// Default per key × API limit.
    pub(crate) limit: Option<LimitRate>,
}

/// A compiled rate with its shadow flag and where it is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitRate {
    pub rate: Rate,
    pub shadow: bool,
    pub scope: LimitScope,
}

/// The failed-authentication limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FailedAuth {
    pub(crate) limit: LimitRate,
    pub(crate) buckets: u32,
    pub(crate) ipv6_prefix: u8,
}

/// Filter-wide limit settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) failed_auth: Option<FailedAuth>,
    pub(crate) on_store_error: OnStoreError,
    pub(crate) max_cas_retries: u32,
    pub(crate) quota_headers: bool,
}

/// A secret digest with its optional end of validity (unix seconds, inclusive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Secret {
    pub(crate) digest: Digest32,
    pub(crate) not_after: Option<u64>,
}

/// A compiled account.
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub(crate) sid: Arc<str>,
    pub(crate) suspended: bool,
    pub(crate) auth_tokens: Vec<Secret>,
    pub(crate) allowed_ips: Option<IpAllowlist>,
    pub(crate) rate: Option<LimitRate>,
    pub(crate) concurrency: Option<u32>,
    /// The regions whose edges serve the account (home region first); `None`: every edge.
    pub(crate) regions: Option<Box<[Box<str>]>>,
}

impl Account {
    /// Whether an edge in `region` serves the account (an edge with no region serves all).
    pub(crate) fn served_in(&self, region: Option<&str>) -> bool {
        match (region, &self.regions) {
            (Some(edge), Some(set)) => set.iter().any(|r| **r == *edge),
            _ => true,
        }
    }
}

/// A compiled key. API indices refer to the [`Catalog`] it was compiled against.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub(crate) sid: Arc<str>,
    pub(crate) account_sid: Arc<str>,
    pub(crate) role: Role,
    pub(crate) secrets: Vec<Secret>,
    pub(crate) expires_at: Option<u64>,
    pub(crate) enabled: bool,
    /// Bitset over `CompiledConfig::apis`; `None` = every API the role allows.
    pub(crate) apis: Option<Box<[u64]>>,
    pub(crate) allowed_ips: Option<IpAllowlist>,
    /// Per-key rate (the key's override, else its role's default).
    pub(crate) rate: Option<LimitRate>,
    /// Per key × API overrides: (API index, rate).
    pub(crate) api_rates: Vec<(u32, LimitRate)>,
}

impl Key {
    pub(crate) fn may_call(&self, api: usize) -> bool {
        match &self.apis {
            None => true,
            Some(bits) => bits
                .get(api / 64)
                .is_some_and(|w| w & (1u64 << (api % 64)) != 0),
        }
    }
}

/// Everything of a config except its accounts and keys: settings, API catalogue, limits.
#[derive(Debug)]
pub struct Catalog {
    version: u64,
    pub(crate) digester: Digester,
    pub(crate) schemes: EnabledSchemes,
    pub(crate) forward_authorization: bool,
    pub(crate) check_secret_format: bool,
    pub(crate) identity_headers: [Box<str>; 4],
    pub(crate) unknown_routes: UnknownRoutes,
    pub(crate) cors_preflight: CorsPreflight,
    pub(crate) wrong_region: WrongRegion,
    pub(crate) apis: Vec<Api>,
    pub(crate) limits: Limits,
    /// Default per-key rates by role: main, standard, publishable.
    key_rates: [Option<LimitRate>; 3],
    account_rate: Option<LimitRate>,
    account_concurrency: Option<u32>,
    www_authenticate: [String; 2],
}

impl Catalog {
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn forward_authorization(&self) -> bool {
        self.forward_authorization
    }

    /// Header names the filter sets on allowed requests and strips from every request:
    /// account SID, key SID, role, API (in that order).
    pub fn identity_headers(&self) -> &[Box<str>; 4] {
        &self.identity_headers
    }

    /// `WWW-Authenticate` values sent with every 401 (static realm; same bytes for every 401 of a
    /// kind, so unknown key and wrong secret are indistinguishable).
    pub fn www_authenticate(&self) -> &[String] {
        let n = usize::from(self.schemes.basic) + usize::from(self.schemes.bearer);
        let first = if self.schemes.basic { 0 } else { 1 };
        &self.www_authenticate[first..first + n]
    }

    /// CAS retries per subject (for releasing and refreshing concurrency slots).
    pub fn max_cas_retries(&self) -> u32 {
        self.limits.max_cas_retries
    }

    pub fn api_count(&self) -> usize {
        self.apis.len()
    }
}

/// The accounts and keys of a static config, in hash maps.
#[derive(Debug, Default)]
pub struct StaticDirectory {
    by_sid: HashMap<Box<[u8]>, Principal>,
    by_token: HashMap<Digest32, Arc<Key>>,
    accounts: HashMap<Arc<str>, Arc<Account>>,
    keys: usize,
}

impl Directory for StaticDirectory {
    fn by_sid(&self, sid: &[u8]) -> Option<Principal> {
        self.by_sid.get(sid).cloned()
    }

    fn by_token(&self, digest: &Digest32) -> Option<Arc<Key>> {
        self.by_token.get(digest).cloned()
    }

    fn account(&self, sid: &str) -> Option<Arc<Account>> {
        self.accounts.get(sid).cloned()
    }
}

/// A validated config, ready for [`crate::decide`].
#[derive(Debug)]
pub struct CompiledConfig {
    pub catalog: Catalog,
    pub directory: StaticDirectory,
}

impl CompiledConfig {
    pub fn version(&self) -> u64 {
        self.catalog.version
    }

    pub fn forward_authorization(&self) -> bool {
        self.catalog.forward_authorization
    }

    pub fn identity_headers(&self) -> &[Box<str>; 4] {
        self.catalog.identity_headers()
    }

    pub fn www_authenticate(&self) -> &[String] {
        self.catalog.www_authenticate()
    }

    /// Counts for logs: (accounts, keys, apis).
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.directory.accounts.len(),
            self.directory.keys,
            self.catalog.apis.len(),
        )
    }

    pub fn max_cas_retries(&self) -> u32 {
        self.catalog.max_cas_retries()
    }

    /// Whether any account has an in-flight limit (the filter then runs a heartbeat timer).
    pub fn uses_concurrency_limits(&self) -> bool {
        self.directory
            .accounts
            .values()
            .any(|a| a.concurrency.is_some())
    }

    /// Whether any account, key or API has a rate limit (the filter's leases are then given
    /// back on a tick).
    pub fn uses_rate_limits(&self) -> bool {
        let d = &self.directory;
        (d.accounts.values()).any(|a| a.rate.is_some())
            || (d.by_sid.values()).any(|p| match p {
                Principal::Key(k) => k.rate.is_some() || !k.api_rates.is_empty(),
                Principal::Account(a) => a.rate.is_some(),
            })
            || self.catalog.apis.iter().any(|a| a.limit.is_some())
    }
}

/// Parses and compiles a JSON config document.
pub fn compile(json: &[u8]) -> Result<CompiledConfig, ConfigError> {
    let doc = parse(json)?;
    compile_doc(&doc)
}

/// Parses a JSON config document into its wire types, with the path of any shape error.
pub fn parse(json: &[u8]) -> Result<ConfigDoc, ConfigError> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let doc: ConfigDoc = serde_path_to_error::deserialize(&mut de).map_err(|e| ConfigError {
        path: e.path().to_string(),
        message: e.inner().to_string(),
    })?;
    de.end().map_err(|e| ConfigError {
        path: String::new(),
        message: e.to_string(),
    })?;
    Ok(doc)
}

fn parse_time(path: &str, s: &str) -> Result<u64, ConfigError> {
    match humantime::parse_rfc3339(s) {
        Ok(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Ok(d.as_secs()),
            Err(_) => err(path, format!("{s:?} is before 1970")),
        },
        Err(_) => err(
            path,
            format!("invalid RFC 3339 UTC time {s:?} (expected like \"2026-11-24T10:00:00Z\")"),
        ),
    }
}

/// SIDs appear in URLs and headers: ASCII letters, digits, `_` and `-`, 1 to 64 characters.
/// `p` and `field` make the error's path (formatted only for an error: a page of the change feed
/// checks thousands of records).
fn check_sid(p: &str, field: &str, sid: &str) -> Result<(), ConfigError> {
    if sid.is_empty()
        || sid.len() > 64
        || !sid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return err(
            format!("{p}{field}"),
            format!("invalid SID {sid:?}: use 1 to 64 ASCII letters, digits, '_' or '-'"),
        );
    }
    Ok(())
}

fn check_header_name(path: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !ok {
        return err(
            path,
            format!("invalid header name {name:?}: use lowercase letters, digits, '-' and '_'"),
        );
    }
    if matches!(
        name,
        "authorization" | "host" | "content-length" | "transfer-encoding" | "connection" | "te"
    ) {
        return err(path, format!("{name:?} cannot be an identity header"));
    }
    Ok(())
}

struct SecretSeen {
    /// Whole-document compile: each digest seen so far → (its owner in `owners`, its index).
    /// `None` when a record is compiled on its own (only its own secrets must differ).
    by_digest: Option<HashMap<Digest32, (usize, usize)>>,
    /// `keys[3].secrets` of every owner in `by_digest`.
    owners: Vec<String>,
}

impl SecretSeen {
    /// Secrets unique across a whole document.
    fn document() -> SecretSeen {
        SecretSeen {
            by_digest: Some(HashMap::new()),
            owners: Vec::new(),
        }
    }

    /// Secrets unique within one record.
    fn record() -> SecretSeen {
        SecretSeen {
            by_digest: None,
            owners: Vec::new(),
        }
    }

    /// The secrets at `{p}{field}`; paths are formatted only for an error.
    fn compile(
        &mut self,
        p: &str,
        field: &str,
        docs: &[SecretDoc],
        required: bool,
    ) -> Result<Vec<Secret>, ConfigError> {
        let at = |i: usize| format!("{p}{field}[{i}]");
        if required && docs.is_empty() {
            return err(format!("{p}{field}"), "must have at least one secret");
        }
        let owner = self.owners.len();
        let mut out: Vec<Secret> = Vec::with_capacity(docs.len());
        // A record's own secrets: a scan for the usual few, a map past that.
        let mut mine: Option<HashMap<Digest32, usize>> = (docs.len() > 16).then(HashMap::new);
        for (i, s) in docs.iter().enumerate() {
            let digest = parse_digest_hex(&s.digest).map_err(|m| ConfigError {
                path: format!("{}.digest", at(i)),
                message: m,
            })?;
            let earlier = match &mut mine {
                Some(m) => m.insert(digest, i),
                None => out.iter().position(|o| o.digest == digest),
            };
            let other = match (earlier, &self.by_digest) {
                (Some(j), _) => Some(at(j)),
                (None, Some(map)) => map
                    .get(&digest)
                    .map(|&(o, j)| format!("{}[{j}]", self.owners[o])),
                (None, None) => None,
            };
            if let Some(other) = other {
                return err(
                    format!("{}.digest", at(i)),
                    format!("same digest as {other}; every secret must be unique"),
                );
            }
            let not_after = s
                .not_after
                .as_deref()
                .map(|t| parse_time(&format!("{}.not_after", at(i)), t))
                .transpose()?;
            out.push(Secret { digest, not_after });
        }
        if let Some(map) = &mut self.by_digest {
            if !out.is_empty() {
                self.owners.push(format!("{p}{field}"));
                for (i, s) in out.iter().enumerate() {
                    map.insert(s.digest, (owner, i));
                }
            }
        }
        Ok(out)
    }
}

fn compile_allowlist(
    p: &str,
    list: &Option<Vec<String>>,
) -> Result<Option<IpAllowlist>, ConfigError> {
    list.as_deref()
        .map(|l| {
            IpAllowlist::parse(l).map_err(|(i, message)| ConfigError {
                path: match i {
                    Some(i) => format!("{p}.allowed_ips[{i}]"),
                    None => format!("{p}.allowed_ips"),
                },
                message,
            })
        })
        .transpose()
}

fn compile_api(i: usize, a: &ApiDoc) -> Result<Api, ConfigError> {
    let p = format!("apis[{i}]");
    if a.name.is_empty()
        || !a.name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.')
        })
    {
        return err(
            format!("{p}.name"),
            format!(
                "invalid API name {:?}: use lowercase letters, digits, '_', '-', '.'",
                a.name
            ),
        );
    }
    if a.publishable && a.management {
        return err(&p, "an API cannot be both publishable and management");
    }
    if a.methods.is_empty() {
        return err(format!("{p}.methods"), "must list at least one method");
    }
    let mut methods = Vec::with_capacity(a.methods.len());
    for (j, m) in a.methods.iter().enumerate() {
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
            return err(
                format!("{p}.methods[{j}]"),
                format!("invalid method {m:?}: use an uppercase HTTP method"),
            );
        }
        if a.methods[..j].contains(m) {
            return err(
                format!("{p}.methods[{j}]"),
                format!("duplicate method {m:?}"),
            );
        }
        methods.push(m.as_bytes().into());
    }
    if a.paths.is_empty() {
        return err(format!("{p}.paths"), "must list at least one path template");
    }
    let mut templates = Vec::with_capacity(a.paths.len());
    for (j, t) in a.paths.iter().enumerate() {
        templates.push(Template::parse(t).map_err(|m| ConfigError {
            path: format!("{p}.paths[{j}]"),
            message: format!("template {t:?}: {m}"),
        })?);
    }
    let limit = a
        .limit
        .as_ref()
        .map(|r| compile_rate(&format!("{p}.limit"), r))
        .transpose()?;
    Ok(Api {
        name: a.name.as_str().into(),
        methods,
        templates,
        publishable: a.publishable,
        management: a.management,
        limit,
    })
}

fn compile_account(
    p: &str,
    a: &AccountDoc,
    seen: &mut SecretSeen,
    cat: &Catalog,
) -> Result<Account, ConfigError> {
    check_sid(p, ".sid", &a.sid)?;
    let own = a.limits.clone().unwrap_or_default();
    let rate = match &own.rate {
        Some(r) => Some(compile_rate(&format!("{p}.limits.rate"), r)?),
        None => cat.account_rate,
    };
    let concurrency = match (own.concurrency, cat.account_concurrency) {
        (Some(0), _) => return err(format!("{p}.limits.concurrency"), "must be at least 1"),
        (Some(n), _) => Some(n),
        (None, d) => d,
    };
    Ok(Account {
        regions: compile_regions(p, a)?,
        rate,
        concurrency,
        sid: a.sid.as_str().into(),
        suspended: a.status == AccountStatus::Suspended,
        auth_tokens: seen.compile(p, ".auth_tokens", &a.auth_tokens, false)?,
        allowed_ips: compile_allowlist(p, &a.allowed_ips)?,
    })
}

/// Most `regions` an account may list (besides its home `region`).
pub const MAX_ACCOUNT_REGIONS: usize = 16;

/// An account's home `region` and further `regions` as one set, home first; `None` when it
/// names neither.
fn compile_regions(p: &str, a: &AccountDoc) -> Result<Option<Box<[Box<str>]>>, ConfigError> {
    let check = |path: String, name: &str| {
        if valid_region(name) {
            Ok(())
        } else {
            err(path, format!("invalid region {name:?}: {REGION_RULE}"))
        }
    };
    if let Some(home) = &a.region {
        check(format!("{p}.region"), home)?;
    }
    let more = match &a.regions {
        None if a.region.is_none() => return Ok(None),
        None => &[][..],
        Some(list) if list.is_empty() => {
            return err(
                format!("{p}.regions"),
                "must not be empty; omit the field for none",
            )
        }
        Some(list) if list.len() > MAX_ACCOUNT_REGIONS => {
            return err(
                format!("{p}.regions"),
                format!("at most {MAX_ACCOUNT_REGIONS} regions"),
            )
        }
        Some(list) => list.as_slice(),
    };
    let mut set: Vec<Box<str>> = Vec::with_capacity(1 + more.len());
    set.extend(a.region.as_deref().map(Box::from));
    for (j, name) in more.iter().enumerate() {
        let jp = format!("{p}.regions[{j}]");
        check(jp.clone(), name)?;
        if let Some(i) = more[..j].iter().position(|r| r == name) {
            return err(jp, format!("duplicate region {name:?} (also regions[{i}])"));
        }
        if a.region.as_deref() == Some(name.as_str()) {
            return err(jp, format!("duplicate region {name:?} (the home region)"));
        }
        set.push(name.as_str().into());
    }
    Ok(Some(set.into_boxed_slice()))
}

fn compile_key(
    p: &str,
    k: &KeyDoc,
    cat: &Catalog,
    seen: &mut SecretSeen,
) -> Result<Key, ConfigError> {
    let apis = &cat.apis;
    check_sid(p, ".sid", &k.sid)?;
    check_sid(p, ".account_sid", &k.account_sid)?;
    let secrets = seen.compile(p, ".secrets", &k.secrets, true)?;
    let expires_at = k
        .expires_at
        .as_deref()
        .map(|t| parse_time(&format!("{p}.expires_at"), t))
        .transpose()?;
    let key_apis = match &k.apis {
        None => None,
        Some(names) if names.is_empty() => {
            return err(
                format!("{p}.apis"),
                "must not be empty; omit the field to allow every API the role allows",
            );
        }
        Some(names) => {
            let mut bits = vec![0u64; apis.len().div_ceil(64)].into_boxed_slice();
            for (j, name) in names.iter().enumerate() {
                let jp = format!("{p}.apis[{j}]");
                let Some(idx) = apis.iter().position(|a| *a.name == **name) else {
                    return err(jp, format!("unknown API {name:?}"));
                };
                let api = &apis[idx];
                if !role_allows(k.role, api) {
                    return err(
                        jp,
                        format!(
                            "a {} key can never call {name:?} ({})",
                            k.role.as_str(),
                            api_kind(api)
                        ),
                    );
                }
                bits[idx / 64] |= 1u64 << (idx % 64);
            }
            Some(bits)
        }
    };
    let own = k.limits.clone().unwrap_or_default();
    let role_default = match k.role {
        Role::Main => cat.key_rates[0],
        Role::Standard => cat.key_rates[1],
        Role::Publishable => cat.key_rates[2],
    };
    let rate = match &own.rate {
        Some(r) => Some(compile_rate(&format!("{p}.limits.rate"), r)?),
        None => role_default,
    };
    let mut api_rates = Vec::with_capacity(own.apis.len());
    for (name, r) in &own.apis {
        let path = format!("{p}.limits.apis.{name}");
        let Some(idx) = apis.iter().position(|a| *a.name == **name) else {
            return err(path, format!("unknown API {name:?}"));
        };
        api_rates.push((index_u32(idx)?, compile_rate(&path, r)?));
    }
    Ok(Key {
        rate,
        api_rates,
        sid: k.sid.as_str().into(),
        account_sid: k.account_sid.as_str().into(),
        role: k.role,
        secrets,
        expires_at,
        enabled: k.enabled,
        apis: key_apis,
        allowed_ips: compile_allowlist(p, &k.allowed_ips)?,
    })
}

fn api_kind(api: &Api) -> &'static str {
    if api.management {
        "a management API"
    } else if !api.publishable {
        "not publishable"
    } else {
        "publishable"
    }
}

/// Whether a role may call an API at all (before the key's own API list).
pub(crate) fn role_allows(role: Role, api: &Api) -> bool {
    match role {
        Role::Main => true,
        Role::Standard => !api.management,
        Role::Publishable => api.publishable,
    }
}

/// Validates wire types and builds the lookup tables.
pub fn compile_doc(doc: &ConfigDoc) -> Result<CompiledConfig, ConfigError> {
    let catalog = compile_catalog(doc)?;
    let mut seen = SecretSeen::document();
    let mut dir = StaticDirectory {
        keys: doc.keys.len(),
        ..StaticDirectory::default()
    };
    dir.by_sid.reserve(doc.accounts.len() + doc.keys.len());
    let mut sid_owner: HashMap<&str, String> =
        HashMap::with_capacity(doc.accounts.len() + doc.keys.len());
    fn claim<'d>(
        owners: &mut HashMap<&'d str, String>,
        sid: &'d str,
        path: String,
    ) -> Result<(), ConfigError> {
        if let Some(other) = owners.get(sid) {
            return err(
                format!("{path}.sid"),
                format!("duplicate SID {sid:?} (also {other})"),
            );
        }
        owners.insert(sid, path);
        Ok(())
    }

    for (i, a) in doc.accounts.iter().enumerate() {
        let p = format!("accounts[{i}]");
        let acc = Arc::new(compile_account(&p, a, &mut seen, &catalog)?);
        claim(&mut sid_owner, &a.sid, p)?;
        dir.by_sid
            .insert(a.sid.as_bytes().into(), Principal::Account(acc.clone()));
        dir.accounts.insert(acc.sid.clone(), acc);
    }

    for (i, k) in doc.keys.iter().enumerate() {
        let p = format!("keys[{i}]");
        if !dir.accounts.contains_key(k.account_sid.as_str()) {
            return err(
                format!("{p}.account_sid"),
                format!("unknown account {:?}", k.account_sid),
            );
        }
        let key = Arc::new(compile_key(&p, k, &catalog, &mut seen)?);
        claim(&mut sid_owner, &k.sid, p)?;
        dir.by_sid
            .insert(k.sid.as_bytes().into(), Principal::Key(key.clone()));
        if catalog.schemes.bearer {
            for s in &key.secrets {
                dir.by_token.insert(s.digest, key.clone());
            }
        }
    }
    Ok(CompiledConfig {
        catalog,
        directory: dir,
    })
}

/// Compiles one key on its own against a catalogue (for configs published record by record; the
/// whole document was validated by [`compile_doc`] before it was published).
pub fn compile_key_record(cat: &Catalog, k: &KeyDoc) -> Result<Key, ConfigError> {
    compile_key_record_at(cat, k, "key")
}

/// [`compile_key_record`], naming the record `path` in errors (`keys[3]`).
pub fn compile_key_record_at(cat: &Catalog, k: &KeyDoc, path: &str) -> Result<Key, ConfigError> {
    compile_key(path, k, cat, &mut SecretSeen::record())
}

/// Compiles one account on its own against a catalogue.
pub fn compile_account_record(cat: &Catalog, a: &AccountDoc) -> Result<Account, ConfigError> {
    compile_account_record_at(cat, a, "account")
}

/// [`compile_account_record`], naming the record `path` in errors (`accounts[0]`).
pub fn compile_account_record_at(
    cat: &Catalog,
    a: &AccountDoc,
    path: &str,
) -> Result<Account, ConfigError> {
    compile_account(path, a, &mut SecretSeen::record(), cat)
}

/// Validates and compiles the settings, API catalogue and limits of a document (its accounts and
/// keys are ignored).
pub fn compile_catalog(doc: &ConfigDoc) -> Result<Catalog, ConfigError> {
    if doc.schema != SCHEMA_V1 {
        return err(
            "schema",
            format!(
                "unsupported schema {:?}; expected {SCHEMA_V1:?}",
                doc.schema
            ),
        );
    }
    let s = &doc.settings;
    if s.realm.is_empty()
        || !s
            .realm
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        return err(
            "settings.realm",
            "must be non-empty printable ASCII without '\"' or '\\'",
        );
    }
    let hmac_key = match &s.hmac_key {
        None => None,
        Some(h) => Some(hex::decode(h).map_err(|_| ConfigError {
            path: "settings.hmac_key".into(),
            message: "must be hex".into(),
        })?),
    };
    let digester =
        Digester::new(s.secret_digest, hmac_key.as_deref()).map_err(|m| ConfigError {
            path: "settings".into(),
            message: m,
        })?;
    if s.schemes.is_empty() {
        return err(
            "settings.schemes",
            "must enable at least one of \"basic\", \"bearer\"",
        );
    }
    let schemes = EnabledSchemes {
        basic: s.schemes.contains(&Scheme::Basic),
        bearer: s.schemes.contains(&Scheme::Bearer),
    };
    let ih = &s.identity_headers;
    let names = [
        ("account_sid", &ih.account_sid),
        ("key_sid", &ih.key_sid),
        ("role", &ih.role),
        ("api", &ih.api),
    ];
    for (i, (field, name)) in names.iter().enumerate() {
        check_header_name(&format!("settings.identity_headers.{field}"), name)?;
        if let Some((other, _)) = names[..i].iter().find(|(_, n)| n == name) {
            return err(
                format!("settings.identity_headers.{field}"),
                format!("{name:?} is already used for {other}"),
            );
        }
    }

    let mut apis = Vec::with_capacity(doc.apis.len());
    for (i, a) in doc.apis.iter().enumerate() {
        if let Some(j) = doc.apis[..i].iter().position(|b| b.name == a.name) {
            return err(
                format!("apis[{i}].name"),
                format!("duplicate API name {:?} (also apis[{j}])", a.name),
            );
        }
        apis.push(compile_api(i, a)?);
    }

    let limits = compile_limits(&doc.limits)?;
    let realm = &s.realm;
    let rate =
        |path: &str, r: &Option<RateDoc>| r.as_ref().map(|r| compile_rate(path, r)).transpose();
    Ok(Catalog {
        key_rates: [
            rate("limits.key.main", &doc.limits.key.main)?,
            rate("limits.key.standard", &doc.limits.key.standard)?,
            rate("limits.key.publishable", &doc.limits.key.publishable)?,
        ],
        account_rate: rate("limits.account", &doc.limits.account)?,
        account_concurrency: doc.limits.account_concurrency,
        limits,
        version: doc.version,
        digester,
        schemes,
        forward_authorization: s.forward_authorization,
        check_secret_format: s.check_secret_format,
        identity_headers: [
            ih.account_sid.as_str().into(),
            ih.key_sid.as_str().into(),
            ih.role.as_str().into(),
            ih.api.as_str().into(),
        ],
        unknown_routes: s.unknown_routes,
        cors_preflight: s.cors_preflight,
        wrong_region: s.wrong_region,
        apis,
        www_authenticate: [
            format!("Basic realm=\"{realm}\", charset=\"UTF-8\""),
            format!("Bearer realm=\"{realm}\""),
        ],
    })
}

fn index_u32(i: usize) -> Result<u32, ConfigError> {
    u32::try_from(i).map_err(|_| ConfigError {
        path: String::new(),
        message: "too many entries".into(),
    })
}

/// Longest period a rate may have.
const MAX_PERIOD_US: u64 = 86_400 * 1_000_000;

/// Compiles `{"requests": N, "per": "1m"}`.
pub fn compile_rate(path: &str, r: &RateDoc) -> Result<LimitRate, ConfigError> {
    if r.requests == 0 {
        return err(format!("{path}.requests"), "must be at least 1");
    }
    let period = humantime::parse_duration(&r.per).map_err(|_| ConfigError {
        path: format!("{path}.per"),
        message: format!(
            "invalid duration {:?} (expected like \"1s\", \"1m\", \"90s\", \"1h\")",
            r.per
        ),
    })?;
    let period_us = u64::try_from(period.as_micros()).unwrap_or(u64::MAX);
    if !(1_000..=MAX_PERIOD_US).contains(&period_us) {
        return err(
            format!("{path}.per"),
            format!("{:?} is outside 1ms..24h", r.per),
        );
    }
    if period_us < u64::from(r.requests) {
        return err(
            path,
            format!(
                "{} requests per {} is more than one per microsecond",
                r.requests, r.per
            ),
        );
    }
    if r.scope == LimitScope::Fleet && r.shadow {
        return err(
            format!("{path}.shadow"),
            "a fleet limit cannot be in shadow mode",
        );
    }
    if r.scope == LimitScope::Fleet && period_us % 1_000_000 != 0 {
        // Rate-limit services count fixed windows of whole seconds.
        return err(
            format!("{path}.per"),
            format!(
                "{:?}: a fleet limit's period must be a whole number of seconds",
                r.per
            ),
        );
    }
    Ok(LimitRate {
        rate: Rate {
            requests: r.requests,
            period_us,
        },
        shadow: r.shadow,
        scope: r.scope,
    })
}

fn compile_limits(l: &LimitsDoc) -> Result<Limits, ConfigError> {
    if l.account_concurrency == Some(0) {
        return err("limits.account_concurrency", "must be at least 1");
    }
    let failed_auth = match &l.failed_auth {
        None => None,
        Some(f) => {
            let limit = compile_rate(
                "limits.failed_auth",
                &RateDoc {
                    requests: f.requests,
                    per: f.per.clone(),
                    shadow: f.shadow,
                    scope: Default::default(),
                },
            )?;
            let buckets = f.buckets.unwrap_or(65_536);
            if !(1..=1 << 20).contains(&buckets) {
                return err(
                    "limits.failed_auth.buckets",
                    "must be between 1 and 1048576",
                );
            }
            let ipv6_prefix = f.ipv6_prefix.unwrap_or(64);
            if !(16..=128).contains(&ipv6_prefix) {
                return err(
                    "limits.failed_auth.ipv6_prefix",
                    "must be between 16 and 128",
                );
            }
            Some(FailedAuth {
                limit,
                buckets,
                ipv6_prefix,
            })
        }
    };
    let max_cas_retries = l.max_cas_retries.unwrap_or(16);
    if max_cas_retries > 1000 {
        return err("limits.max_cas_retries", "must be at most 1000");
    }
    Ok(Limits {
        failed_auth,
        on_store_error: match l.on_store_error {
            OnStoreErrorDoc::Deny => OnStoreError::Deny,
            OnStoreErrorDoc::Allow => OnStoreError::Allow,
        },
        max_cas_retries,
        quota_headers: l.quota_headers,
    })
}
