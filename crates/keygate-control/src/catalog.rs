//! The API catalogue and limit defaults the edge config carries.
//!
//! A catalogue is `{"apis": [...], "limits": {...}}` in the edge config's own wire types. It comes
//! from `--catalog FILE`, or is the built-in one (the demo's APIs, `envoy/keygate-demo.json`, with
//! Exotel-like defaults: 200 requests a minute and 50 in flight per account). It is checked at
//! startup by compiling it with keygate-core, and key `apis` permissions are validated against it.

use keygate_core::compile::compile_doc;
use keygate_core::config::{ApiDoc, ConfigDoc, LimitsDoc, Settings, SCHEMA_V1};
use serde::Deserialize;

/// The catalogue built into the binary.
pub const BUILT_IN: &str = include_str!("default_catalog.json");

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    pub apis: Vec<ApiDoc>,
    #[serde(default)]
    pub limits: LimitsDoc,
}

impl Catalog {
    pub fn built_in() -> Result<Catalog, String> {
        Catalog::parse(BUILT_IN.as_bytes())
    }

    /// Parses and validates a catalogue; the error names the place (`apis[2].paths[0]: ...`).
    pub fn parse(json: &[u8]) -> Result<Catalog, String> {
        let mut de = serde_json::Deserializer::from_slice(json);
        let cat: Catalog = serde_path_to_error::deserialize(&mut de).map_err(|e| {
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
                ..Settings::default()
            },
            apis: self.apis.clone(),
            accounts,
            keys,
            limits: self.limits.clone(),
        }
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
        let cat = Catalog::built_in().unwrap();
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
        let err = Catalog::parse(br#"{"apis":[{"name":"x","methods":["get"],"paths":["/x"]}]}"#)
            .unwrap_err();
        assert!(err.starts_with("apis[0].methods[0]: "), "{err}");
        let err = Catalog::parse(br#"{"apis":[],"extra":1}"#).unwrap_err();
        assert!(err.contains("extra"), "{err}");
    }
}
