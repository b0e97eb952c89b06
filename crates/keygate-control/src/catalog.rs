//! The API catalogue and limit defaults the edge config carries.
//!
//! A catalogue is `{"apis": [...], "limits": {...}, "settings": {"wrong_region": "401"}}` in the
//! edge config's own wire types (`settings` optional, and only the fields [`CatalogSettings`]
//! names: the rest of the edge's settings are the control plane's). It comes
//! from `--catalog FILE`, or is the built-in one (the demo's APIs, `envoy/keygate-demo.json`, with
//! Exotel-like defaults: 200 requests a minute and 50 in flight per account). It is checked at
//! startup by compiling it with keygate-core, and key `apis` permissions are validated against it.

use keygate_core::compile::compile_doc;
use keygate_core::config::{
    ApiDoc, ConfigDoc, FailedAuthDoc, LimitsDoc, RateDoc, RoleRatesDoc, Settings, WrongRegion,
    SCHEMA_V1,
};
use serde::Deserialize;

/// The API the control plane's own management routes belong to, in the catalogue it decides its
/// requests with ([`ApiCatalog::control_doc`]). A key limited by `apis` may manage keys and account
/// settings at the control plane only if its list names it, as at the edge.
pub const MANAGEMENT_API: &str = "keys";

/// Methods and path templates of the control plane's management routes: Twilio's Keys resource
/// and keygate's `/v1/accounts/{sid}/...`. `{account_sid}` binds the path to the caller's
/// account, as at the edge.
const MANAGEMENT_METHODS: [&str; 4] = ["GET", "POST", "PATCH", "DELETE"];
const MANAGEMENT_PATHS: [&str; 4] = [
    "/2010-04-01/Accounts/{account_sid}/Keys.json",
    "/2010-04-01/Accounts/{account_sid}/Keys/{key_sid}.json",
    "/v1/accounts/{account_sid}",
    "/v1/accounts/{account_sid}/**",
];

/// The control plane's own limits, decided by keygate-core's gate like the edge's.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlLimits {
    /// Failed authentications per client address (`None`: off).
    pub failed_auth: Option<RateDoc>,
    /// Requests per credential (each key, and each account with all its credentials together;
    /// operator tokens are not limited). `None`: off.
    pub credential_rate: Option<RateDoc>,
}

impl Default for ControlLimits {
    fn default() -> Self {
        ControlLimits {
            failed_auth: Some(RateDoc {
                requests: 30,
                per: "1m".to_owned(),
                shadow: false,
                scope: Default::default(),
            }),
            credential_rate: Some(RateDoc {
                requests: 600,
                per: "1m".to_owned(),
                shadow: false,
                scope: Default::default(),
            }),
        }
    }
}

/// The catalogue built into the binary.
pub const BUILT_IN: &str = include_str!("default_catalog.json");

/// The operator's API catalogue and limit defaults (`--catalog`), which every published version
/// carries; keygate-core compiles it into a `keygate_core::Catalog` (what a request is judged
/// against).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiCatalog {
    pub apis: Vec<ApiDoc>,
    #[serde(default)]
    pub limits: LimitsDoc,
    #[serde(default)]
    pub settings: CatalogSettings,
}

/// The edge settings an operator chooses in the catalogue file; every published version carries
/// them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogSettings {
    /// The reply to a principal whose account is not served in the edge's region: `"404"`
    /// (default, `wrong_region`) or `"401"` (the `invalid_credentials` reply).
    #[serde(default)]
    pub wrong_region: WrongRegion,
}

impl ApiCatalog {
    pub fn built_in() -> Result<ApiCatalog, String> {
        ApiCatalog::parse(BUILT_IN.as_bytes())
    }

    /// Parses and validates a catalogue; the error names the place (`apis[2].paths[0]: ...`).
    pub fn parse(json: &[u8]) -> Result<ApiCatalog, String> {
        let mut de = serde_json::Deserializer::from_slice(json);
        let cat: ApiCatalog = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            match e.path().to_string().as_str() {
                ".." | "." => e.inner().to_string(),
                path => format!("{path}: {}", e.inner()),
            }
        })?;
        compile_doc(&cat.doc(0, Vec::new(), Vec::new())).map_err(|e| e.to_string())?;
        Ok(cat)
    }

    /// An edge config document with this catalogue and the given accounts and keys.
    pub fn doc(
        &self,
        version: u64,
        accounts: Vec<keygate_core::config::AccountDoc>,
        keys: Vec<keygate_core::config::KeyDoc>,
    ) -> ConfigDoc {
        ConfigDoc {
            schema: SCHEMA_V1.to_owned(),
            version,
            settings: Settings {
                check_secret_format: true,
                wrong_region: self.settings.wrong_region,
                ..Settings::default()
            },
            apis: self.apis.clone(),
            accounts,
            keys,
            limits: self.limits.clone(),
        }
    }

    /// The catalogue the control plane decides its own requests with: the management API
    /// ([`MANAGEMENT_API`], first, so it wins over any catalogue API whose templates overlap the
    /// control plane's routes; a catalogue API of that name is replaced by it), then every other
    /// API of this catalogue, so key API lists compile to the same names; unknown routes denied;
    /// `limits` as the control plane's own (per-credential rates for every role and per account,
    /// the failed-authentication limiter).
    pub fn control_doc(&self, limits: &ControlLimits) -> ConfigDoc {
        let management = ApiDoc {
            name: MANAGEMENT_API.to_owned(),
            methods: MANAGEMENT_METHODS.map(str::to_owned).to_vec(),
            paths: MANAGEMENT_PATHS.map(str::to_owned).to_vec(),
            publishable: false,
            management: true,
            limit: None,
        };
        let mut doc = self.doc(0, Vec::new(), Vec::new());
        doc.apis = std::iter::once(management)
            .chain(
                self.apis
                    .iter()
                    .filter(|a| a.name != MANAGEMENT_API)
                    .map(|a| ApiDoc {
                        limit: None,
                        ..a.clone()
                    }),
            )
            .collect();
        let rate = limits.credential_rate.clone();
        doc.limits = LimitsDoc {
            key: RoleRatesDoc {
                main: rate.clone(),
                standard: rate.clone(),
                publishable: rate.clone(),
            },
            account: rate,
            failed_auth: limits.failed_auth.as_ref().map(|r| FailedAuthDoc {
                requests: r.requests,
                per: r.per.clone(),
                shadow: false,
                buckets: None,
                ipv6_prefix: None,
            }),
            ..LimitsDoc::default()
        };
        doc
    }

    pub fn has_api(&self, name: &str) -> bool {
        self.apis.iter().any(|a| a.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_catalog_compiles_and_has_the_demo_apis() {
        let cat = ApiCatalog::built_in().unwrap();
        let demo: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../envoy/keygate-demo.json"
            ))
            .unwrap(),
        )
        .unwrap();
        let demo_apis: Vec<ApiDoc> = serde_json::from_value(demo["apis"].clone()).unwrap();
        assert_eq!(cat.apis, demo_apis);
        assert!(!cat.limits.is_empty());
    }

    #[test]
    fn bad_catalog_is_refused_with_its_path() {
        let err = ApiCatalog::parse(br#"{"apis":[{"name":"x","methods":["get"],"paths":["/x"]}]}"#)
            .unwrap_err();
        assert!(err.starts_with("apis[0].methods[0]: "), "{err}");
        let err = ApiCatalog::parse(br#"{"apis":[],"extra":1}"#).unwrap_err();
        assert!(err.contains("extra"), "{err}");
        let err = ApiCatalog::parse(br#"{"apis":[],"settings":{"realm":"x"}}"#).unwrap_err();
        assert!(
            err.starts_with("settings.realm: unknown field `realm`"),
            "{err}"
        );
        let err =
            ApiCatalog::parse(br#"{"apis":[],"settings":{"wrong_region":"403"}}"#).unwrap_err();
        assert!(
            err.starts_with(r#"settings.wrong_region: must be "404" or "401" (a string)"#),
            "{err}"
        );
    }

    #[test]
    fn wrong_region_reaches_every_published_version() {
        let default = ApiCatalog::parse(br#"{"apis":[]}"#).unwrap();
        assert_eq!(
            default.doc(1, vec![], vec![]).settings.wrong_region,
            WrongRegion::NotFound
        );
        let twilio =
            ApiCatalog::parse(br#"{"apis":[],"settings":{"wrong_region":"401"}}"#).unwrap();
        let doc = serde_json::to_value(twilio.doc(1, vec![], vec![])).unwrap();
        assert_eq!(doc["settings"]["wrong_region"], "401");
        assert_eq!(doc["settings"]["check_secret_format"], true);
    }
}
