//! Wire types of the keygate config document (`keygate.config/v1`).
//!
//! These mirror the JSON exactly and carry no validation beyond shape; [`crate::compile`] checks
//! meaning and builds the lookup tables. The control plane produces these same types, so a
//! document it serves is, by construction, one the filter can read.

use serde::{Deserialize, Serialize};

/// The only schema identifier this version of keygate accepts.
pub const SCHEMA_V1: &str = "keygate.config/v1";

/// A whole config document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigDoc {
    /// Must be [`SCHEMA_V1`].
    pub schema: String,
    /// Monotonic config version; the edge never goes back to an older one.
    pub version: u64,
    #[serde(default)]
    pub settings: Settings,
    #[serde(default)]
    pub apis: Vec<ApiDoc>,
    #[serde(default)]
    pub accounts: Vec<AccountDoc>,
    #[serde(default)]
    pub keys: Vec<KeyDoc>,
    #[serde(default, skip_serializing_if = "LimitsDoc::is_empty")]
    pub limits: LimitsDoc,
}

/// Schema of one page of the edge's change feed.
pub const CHANGES_SCHEMA_V1: &str = "keygate.changes/v1";

/// One page of the change feed (`GET /v1/edge/changes`): every account and key whose state
/// changed after config version `since`, in ascending SID order, starting after the SID `after`,
/// as of config version `version` (one read transaction). `next` names the last SID of the page
/// when more may follow (the cursor for the next page), `None` on the last page. Each changed SID
/// is in exactly one of `accounts`, `keys` (its current state) or `deleted` (it no longer
/// exists). The settings, API catalogue and limits are the version's own (a
/// [`ConfigDoc`] without accounts and keys), repeated on every page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangesPage {
    /// Must be [`CHANGES_SCHEMA_V1`].
    pub schema: String,
    pub version: u64,
    pub since: u64,
    #[serde(default)]
    pub after: String,
    #[serde(default)]
    pub next: Option<String>,
    #[serde(default)]
    pub settings: Settings,
    #[serde(default)]
    pub apis: Vec<ApiDoc>,
    #[serde(default, skip_serializing_if = "LimitsDoc::is_empty")]
    pub limits: LimitsDoc,
    #[serde(default)]
    pub accounts: Vec<AccountDoc>,
    #[serde(default)]
    pub keys: Vec<KeyDoc>,
    #[serde(default)]
    pub deleted: Vec<String>,
}

impl ChangesPage {
    /// The version's settings, APIs and limits as a document without accounts and keys (what
    /// the edge keeps as a published slot's settings record).
    pub fn settings_doc(&self) -> ConfigDoc {
        ConfigDoc {
            schema: SCHEMA_V1.to_owned(),
            version: self.version,
            settings: self.settings.clone(),
            apis: self.apis.clone(),
            accounts: Vec::new(),
            keys: Vec::new(),
            limits: self.limits.clone(),
        }
    }
}

/// A rate: `requests` per `per` (a duration such as `"1s"`, `"1m"`, `"90s"`, `"1h"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateDoc {
    pub requests: u32,
    pub per: String,
    /// Count what would be refused, refuse nothing (roll a limit out safely).
    #[serde(default, skip_serializing_if = "is_false")]
    pub shadow: bool,
    /// Where the limit is counted: in each Envoy process (`local`, the default, exact) or
    /// across every edge of the fleet (`fleet`, through a rate-limit service).
    #[serde(default, skip_serializing_if = "is_default")]
    pub scope: LimitScope,
}

/// Where a rate is counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitScope {
    /// In each Envoy process, exactly (GCRA over shared data).
    #[default]
    Local,
    /// Across the fleet, by a rate-limit service speaking Envoy's `envoy.service.ratelimit.v3`
    /// protocol (fixed windows of the rate's period, counted in Redis); see [`crate::fleet`].
    Fleet,
}

/// Default per-key rates by role.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleRatesDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main: Option<RateDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standard: Option<RateDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publishable: Option<RateDoc>,
}

/// The failed-authentication limiter: per client IP (IPv6 per prefix), hashed into a fixed
/// number of buckets so memory stays bounded whatever addresses attackers use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailedAuthDoc {
    pub requests: u32,
    pub per: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub shadow: bool,
    /// Number of shared-data buckets (default 65536).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buckets: Option<u32>,
    /// IPv6 clients are grouped by this prefix length (default 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_prefix: Option<u8>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreErrorDoc {
    #[default]
    Deny,
    Allow,
}

/// Filter-wide limit defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsDoc {
    /// Per-key rate by role (overridable per key).
    #[serde(default, skip_serializing_if = "RoleRatesDoc::is_empty")]
    pub key: RoleRatesDoc,
    /// Per-account rate across all keys (overridable per account).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<RateDoc>,
    /// Per-account in-flight requests (overridable per account).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_concurrency: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_auth: Option<FailedAuthDoc>,
    /// Outcome when the counter store cannot answer (CAS retries exhausted, unreadable value).
    #[serde(default, skip_serializing_if = "is_default")]
    pub on_store_error: OnStoreErrorDoc,
    /// CAS retries per subject before the store-error outcome applies (default 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cas_retries: Option<u32>,
    /// Add `RateLimit-Policy` / `RateLimit` headers to allowed responses too.
    #[serde(default, skip_serializing_if = "is_false")]
    pub quota_headers: bool,
}

impl RoleRatesDoc {
    pub fn is_empty(&self) -> bool {
        self.main.is_none() && self.standard.is_none() && self.publishable.is_none()
    }
}

impl LimitsDoc {
    pub fn is_empty(&self) -> bool {
        *self == LimitsDoc::default()
    }
}

/// Per-account limit overrides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountLimitsDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<RateDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
}

/// Per-key limit overrides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLimitsDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<RateDoc>,
    /// Per key × API rates by API name (override the API's own default).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub apis: std::collections::BTreeMap<String, RateDoc>,
}

/// Filter-wide behaviour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Realm named in `WWW-Authenticate` (static; never derived from the request).
    pub realm: String,
    /// How secret digests in this document were computed.
    pub secret_digest: DigestAlgorithm,
    /// Hex-encoded HMAC key (at least 32 bytes) when `secret_digest` is `hmac-sha256`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hmac_key: Option<String>,
    /// Credential schemes accepted at the edge.
    pub schemes: Vec<Scheme>,
    /// Refuse secrets that are not in keygate's checksummed format (see
    /// [`crate::secret_format`]) without a lookup. On for configs from the control plane.
    #[serde(skip_serializing_if = "is_false")]
    pub check_secret_format: bool,
    /// Pass the client's `Authorization` header to the upstream (off by default).
    pub forward_authorization: bool,
    pub identity_headers: IdentityHeaders,
    /// What happens to an authenticated request whose method and path match no API.
    pub unknown_routes: UnknownRoutes,
    /// Whether CORS preflight requests pass without credentials.
    pub cors_preflight: CorsPreflight,
    /// The reply to a principal whose account is not served in the edge's region.
    #[serde(skip_serializing_if = "is_default")]
    pub wrong_region: WrongRegion,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            realm: "keygate".to_owned(),
            secret_digest: DigestAlgorithm::Sha256,
            hmac_key: None,
            schemes: vec![Scheme::Basic, Scheme::Bearer],
            check_secret_format: false,
            forward_authorization: false,
            identity_headers: IdentityHeaders::default(),
            unknown_routes: UnknownRoutes::Deny,
            cors_preflight: CorsPreflight::Deny,
            wrong_region: WrongRegion::NotFound,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DigestAlgorithm {
    Sha256,
    HmacSha256,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Basic,
    Bearer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownRoutes {
    /// 404 `unknown_route` (default).
    Deny,
    /// Let main and standard principals without an API restriction through.
    Allow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CorsPreflight {
    Deny,
    Allow,
}

/// How a request is refused whose principal's account is not served in the edge's region.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum WrongRegion {
    /// `"404"`: 404 `wrong_region` (default), as Exotel answers a wrong regional base URL.
    #[default]
    #[serde(rename = "404")]
    NotFound,
    /// `"401"`: byte for byte the `invalid_credentials` reply, as Twilio answers (the stat still
    /// counts `wrong_region`).
    #[serde(rename = "401")]
    Unauthorized,
}

impl<'de> Deserialize<'de> for WrongRegion {
    /// `"404"` or `"401"`, strings (a number is a likely slip: its message says so).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) if s == "404" => Ok(WrongRegion::NotFound),
            serde_json::Value::String(s) if s == "401" => Ok(WrongRegion::Unauthorized),
            _ => Err(serde::de::Error::custom(
                r#"must be "404" or "401" (a string)"#,
            )),
        }
    }
}

/// Names of the headers the filter sets on allowed requests (and strips from every request).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityHeaders {
    pub account_sid: String,
    pub key_sid: String,
    pub role: String,
    pub api: String,
}

impl Default for IdentityHeaders {
    fn default() -> Self {
        IdentityHeaders {
            account_sid: "x-keygate-account-sid".to_owned(),
            key_sid: "x-keygate-key-sid".to_owned(),
            role: "x-keygate-role".to_owned(),
            api: "x-keygate-api".to_owned(),
        }
    }
}

/// One entry of the API catalogue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiDoc {
    pub name: String,
    pub methods: Vec<String>,
    /// Path templates: `/v2/accounts/{account_sid}/calls`, `.../calls/**`, `.../Keys/{sid}.json`.
    pub paths: Vec<String>,
    /// Publishable (client-side) keys may call it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub publishable: bool,
    /// Key or account management: main keys and account credentials only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub management: bool,
    /// Default per key × API rate for this API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<RateDoc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountStatus {
    Active,
    Suspended,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountDoc {
    pub sid: String,
    pub status: AccountStatus,
    /// Digests of the account's auth tokens (account credentials act as a main-level principal).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub auth_tokens: Vec<SecretDoc>,
    /// CIDRs; omitted means any address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_ips: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<AccountLimitsDoc>,
    /// Home region ([`crate::region::valid_region`]). With `regions`, the regions whose edges
    /// serve the account; neither means every edge does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Further regions the account may be served in (at most 16, no duplicates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Main,
    Standard,
    Publishable,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Main => "main",
            Role::Standard => "standard",
            Role::Publishable => "publishable",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyDoc {
    pub sid: String,
    pub account_sid: String,
    pub role: Role,
    pub secrets: Vec<SecretDoc>,
    /// RFC 3339 UTC instant after which the key no longer authenticates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub enabled: bool,
    /// API names this key may call; omitted means every API its role allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apis: Option<Vec<String>>,
    /// CIDRs; omitted means any address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_ips: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<KeyLimitsDoc>,
}

/// A secret as the edge knows it: a digest, never the plaintext.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretDoc {
    /// Lowercase hex of the 32-byte digest (see [`crate::digest`]).
    pub digest: String,
    /// RFC 3339 UTC instant after which this secret stops working (a rotated secret's grace end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
}

fn default_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}
