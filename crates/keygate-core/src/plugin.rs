//! The filter's plugin configuration: either a whole config document (static mode, for
//! deployments with no control plane) or where to fetch it from (control-plane mode). Either
//! may name the edge's region (`"region"` beside the document's fields, or
//! `control_plane.region`): accounts not served there are refused (`wrong_region`).

use serde::Deserialize;

use crate::compile::{compile, CompiledConfig, ConfigError};
use crate::region::{valid_region, REGION_RULE};

/// What to do when the control plane has not been heard from for longer than `max_staleness_s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnStale {
    /// Keep judging with the last good config: revocations made meanwhile are not seen, but
    /// secrets and keys with an absolute `not_after` / `expires_at` still stop on time.
    Serve,
    /// Answer 503 `config_stale` (default): a key deleted or suspended while the edge could not
    /// hear the control plane stops working after `max_staleness_s` at the latest.
    #[default]
    Deny,
}

/// Default `max_staleness_s`: one hour.
pub const DEFAULT_MAX_STALENESS_S: u64 = 3600;

/// The control-plane source, as written in the plugin configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneDoc {
    /// Envoy cluster of the control plane.
    pub cluster: String,
    /// `:authority` sent to it.
    pub authority: String,
    /// Change-feed path (default `/v1/edge/changes`).
    #[serde(default)]
    pub path: Option<String>,
    /// The edge's own credential (sent as `Authorization: Bearer`); never logged.
    pub token: String,
    /// Long-poll wait the feed is asked for (default 20 s, at most 60).
    #[serde(default)]
    pub wait_s: Option<u32>,
    /// Past this many seconds without hearing from the control plane, `on_stale` applies
    /// (default [`DEFAULT_MAX_STALENESS_S`]).
    #[serde(default)]
    pub max_staleness_s: Option<u64>,
    #[serde(default)]
    pub on_stale: OnStale,
    /// Add `x-keygate-config-version` to responses (which version judged the request).
    #[serde(default)]
    pub debug_version_header: bool,
    /// Longest wait between failed fetches, in ms (default 1000; backoff starts at 250 ms and
    /// doubles, with jitter).
    #[serde(default)]
    pub max_backoff_ms: Option<u64>,
    /// Accounts and keys asked for per page of the change feed (default 2000, at most 10000).
    #[serde(default)]
    pub page_size: Option<u32>,
    /// This edge's stable name, sent on every feed request (`&edge=`) so the control plane's
    /// fleet view can tell edges apart ([`valid_edge_name`]).
    #[serde(default)]
    pub edge_id: Option<String>,
    /// This edge's region ([`valid_region`]): accounts not served in it are refused
    /// (`wrong_region`). Sent on every feed request (`&region=`) when the edge has an
    /// `edge_id` (the fleet view knows edges by id).
    #[serde(default)]
    pub region: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlPlaneWrapper {
    control_plane: ControlPlaneDoc,
}

/// A validated control-plane source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlane {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub token: String,
    pub wait_s: u32,
    pub timeout_ms: u64,
    pub max_staleness_s: u64,
    pub on_stale: OnStale,
    pub debug_version_header: bool,
    pub max_backoff_ms: u64,
    pub page_size: u32,
    /// Sent as `&edge=` on every feed request (already checked by [`valid_edge_name`]).
    pub edge_id: Option<String>,
    /// The edge's region (already checked by [`valid_region`]); sent as `&region=` beside
    /// `&edge=`.
    pub region: Option<String>,
}

/// Default change-feed path.
pub const DEFAULT_FEED_PATH: &str = "/v1/edge/changes";

/// Longest `edge_id`.
pub const MAX_EDGE_NAME_LEN: usize = 64;

/// Whether `name` may be an `edge_id`: 1 to [`MAX_EDGE_NAME_LEN`] bytes of `A-Z a-z 0-9 _ - .`
/// (the control plane's rule for the feed's `edge=`), so it goes into the query string as it
/// is, with nothing to escape.
pub fn valid_edge_name(name: &str) -> bool {
    (1..=MAX_EDGE_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

const EDGE_NAME_RULE: &str = "must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '-' and '.'";

impl ControlPlane {
    /// Whether the config is stale at `now_s`, given when the control plane last answered. A
    /// long-poll legitimately stays open for `wait_s`, so the staleness clock starts when its
    /// answer was due, not when it was sent.
    pub fn is_stale(&self, now_s: u64, contacted_at_s: u64) -> bool {
        now_s.saturating_sub(contacted_at_s)
            > self.max_staleness_s.saturating_add(u64::from(self.wait_s))
    }
}

/// The parsed plugin configuration.
#[derive(Debug)]
pub enum PluginConfig {
    Static {
        config: Box<CompiledConfig>,
        /// The edge's region (top-level `"region"`, already checked by [`valid_region`]).
        region: Option<String>,
    },
    ControlPlane(ControlPlane),
}

fn cp_err(path: &str, message: &str) -> ConfigError {
    ConfigError {
        path: format!("control_plane.{path}"),
        message: message.to_owned(),
    }
}

/// Parses the plugin configuration: a document with `"control_plane"` selects control-plane
/// mode; anything else must be a whole `keygate.config/v1` document, with the edge's
/// `"region"` beside its fields if it has one (taken out before the document compiles).
pub fn parse_plugin_config(json: &[u8]) -> Result<PluginConfig, ConfigError> {
    let mut probe: serde_json::Value = serde_json::from_slice(json).map_err(|e| ConfigError {
        path: String::new(),
        message: e.to_string(),
    })?;
    // The edge's own fields, not the document's: `fleet_limits` (read by
    // crate::fleet::lease::parse_fleet_limits) and, beside a static document, `region`.
    let is_static = probe.get("control_plane").is_none();
    let (fleet_limits, region) = match probe.as_object_mut() {
        Some(o) => (
            o.remove("fleet_limits"),
            if is_static { o.remove("region") } else { None },
        ),
        None => (None, None),
    };
    let rest;
    let json = if fleet_limits.is_some() || region.is_some() {
        rest = serde_json::to_vec(&probe).unwrap_or_default();
        &rest[..]
    } else {
        json
    };
    if is_static {
        let region = match region {
            None => None,
            Some(serde_json::Value::String(r)) if valid_region(&r) => Some(r),
            Some(_) => {
                return Err(ConfigError {
                    path: "region".to_owned(),
                    message: REGION_RULE.to_owned(),
                })
            }
        };
        let config = compile(json)?;
        return Ok(PluginConfig::Static {
            config: Box::new(config),
            region,
        });
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    let w: ControlPlaneWrapper =
        serde_path_to_error::deserialize(&mut de).map_err(|e| ConfigError {
            path: e.path().to_string(),
            message: e.inner().to_string(),
        })?;
    let d = w.control_plane;
    if d.cluster.is_empty() {
        return Err(cp_err("cluster", "must name an Envoy cluster"));
    }
    if d.authority.is_empty()
        || d.authority
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(cp_err("authority", "must be a host name"));
    }
    let path = d.path.unwrap_or_else(|| DEFAULT_FEED_PATH.to_owned());
    if !path.starts_with('/') || path.contains('?') || path.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(cp_err("path", "must be an absolute path without a query"));
    }
    if d.token.is_empty() || d.token.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(cp_err("token", "must be a non-empty printable token"));
    }
    let wait_s = d.wait_s.unwrap_or(20);
    if !(1..=60).contains(&wait_s) {
        return Err(cp_err("wait_s", "must be between 1 and 60"));
    }
    let max_backoff_ms = d.max_backoff_ms.unwrap_or(1000);
    if !(100..=60_000).contains(&max_backoff_ms) {
        return Err(cp_err("max_backoff_ms", "must be between 100 and 60000"));
    }
    let page_size = d.page_size.unwrap_or(2000);
    if !(1..=10_000).contains(&page_size) {
        return Err(cp_err("page_size", "must be between 1 and 10000"));
    }
    if d.edge_id.as_deref().is_some_and(|v| !valid_edge_name(v)) {
        return Err(cp_err("edge_id", EDGE_NAME_RULE));
    }
    if d.region.as_deref().is_some_and(|v| !valid_region(v)) {
        return Err(cp_err("region", REGION_RULE));
    }
    let max_staleness_s = d.max_staleness_s.unwrap_or(DEFAULT_MAX_STALENESS_S);
    if max_staleness_s == 0 {
        return Err(cp_err(
            "max_staleness_s",
            "must be at least 1 (on_stale: serve keeps serving a stale config)",
        ));
    }
    Ok(PluginConfig::ControlPlane(ControlPlane {
        cluster: d.cluster,
        authority: d.authority,
        path,
        token: d.token,
        wait_s,
        timeout_ms: u64::from(wait_s) * 1000 + 10_000,
        max_staleness_s,
        on_stale: d.on_stale,
        debug_version_header: d.debug_version_header,
        max_backoff_ms,
        page_size,
        edge_id: d.edge_id,
        region: d.region,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn control_plane_mode_with_defaults() {
        let c = parse_plugin_config(
            br#"{"control_plane":{"cluster":"kc","authority":"control","token":"kg_edge_x"}}"#,
        )
        .unwrap();
        match c {
            PluginConfig::ControlPlane(cp) => {
                assert_eq!((cp.path.as_str(), cp.page_size), ("/v1/edge/changes", 2000));
                assert_eq!(
                    (cp.wait_s, cp.timeout_ms, cp.on_stale, cp.max_staleness_s),
                    (20, 30_000, OnStale::Deny, 3600)
                );
            }
            PluginConfig::Static { .. } => panic!("static"),
        }
    }

    #[test]
    fn control_plane_errors_name_the_field() {
        let cases: [(&[u8], &str); 5] = [
            (
                br#"{"control_plane":{"cluster":"","authority":"a","token":"t"}}"#,
                "control_plane.cluster: must name an Envoy cluster",
            ),
            (
                br#"{"control_plane":{"cluster":"c","authority":"a","token":"t","wait_s":90}}"#,
                "control_plane.wait_s: must be between 1 and 60",
            ),
            (
                br#"{"control_plane":{"cluster":"c","authority":"a","token":"t","path":"x"}}"#,
                "control_plane.path: must be an absolute path without a query",
            ),
            (
                br#"{"control_plane":{"cluster":"c","authority":"a","token":"t","page_size":0}}"#,
                "control_plane.page_size: must be between 1 and 10000",
            ),
            (
                br#"{"control_plane":{"cluster":"c","authority":"a","token":"t","tokn":"t"}}"#,
                "control_plane.tokn: unknown field `tokn`",
            ),
        ];
        for (json, want) in cases {
            let got = parse_plugin_config(json).unwrap_err().to_string();
            assert!(got.starts_with(want), "{got}");
        }
    }

    #[test]
    fn edge_id_and_region_name_the_edge_and_are_checked() {
        let parse = |fields: &str| {
            parse_plugin_config(
                format!(
                    r#"{{"control_plane":{{"cluster":"c","authority":"a","token":"t"{fields}}}}}"#
                )
                .as_bytes(),
            )
        };
        let Ok(PluginConfig::ControlPlane(unnamed)) = parse("") else {
            panic!("control plane")
        };
        assert_eq!((unnamed.edge_id, unnamed.region), (None, None));
        let longest_id = "a".repeat(64);
        let longest_region = "a".repeat(32);
        for (edge, region) in [
            ("edge-a", "us1"),
            ("Edge_7.fra", "eu-central-1"),
            (longest_id.as_str(), longest_region.as_str()),
            ("e", "-"),
        ] {
            let Ok(PluginConfig::ControlPlane(cp)) =
                parse(&format!(r#","edge_id":"{edge}","region":"{region}""#))
            else {
                panic!("{edge} {region}")
            };
            assert_eq!(
                (cp.edge_id.as_deref(), cp.region.as_deref()),
                (Some(edge), Some(region))
            );
        }
        let id_too_long = "a".repeat(65);
        let id_rule = "must be 1 to 64 characters of A-Z, a-z, 0-9, '_', '-' and '.'";
        for bad in [
            "",
            id_too_long.as_str(),
            "edge a",
            "a&b=c",
            "a/b",
            "a%20",
            "é",
            "a+b",
        ] {
            let got = parse(&format!(r#","edge_id":"{bad}""#))
                .unwrap_err()
                .to_string();
            assert_eq!(got, format!("control_plane.edge_id: {id_rule}"), "{bad:?}");
        }
        // A region follows the one region rule of accounts and the control plane: stricter than
        // an edge id (no capitals, '_' or '.', at most 32).
        let region_too_long = "a".repeat(33);
        for bad in [
            "",
            region_too_long.as_str(),
            "US1",
            "eu_1",
            "eu.1",
            "a&b=c",
            "é",
        ] {
            let got = parse(&format!(r#","edge_id":"e","region":"{bad}""#))
                .unwrap_err()
                .to_string();
            assert_eq!(
                got, "control_plane.region: must be 1 to 32 lowercase letters, digits or '-'",
                "{bad:?}"
            );
        }
        // A region alone is enforced at the edge (and not sent: the fleet view knows edges by id).
        let Ok(PluginConfig::ControlPlane(region_only)) = parse(r#","region":"in1""#) else {
            panic!("a region without an id")
        };
        assert_eq!(
            (region_only.edge_id, region_only.region.as_deref()),
            (None, Some("in1"))
        );
        let Ok(PluginConfig::ControlPlane(id_only)) = parse(r#","edge_id":"edge-b""#) else {
            panic!("an id without a region")
        };
        assert_eq!(
            (id_only.edge_id.as_deref(), id_only.region),
            (Some("edge-b"), None)
        );
        assert_eq!(
            parse(r#","edge_id":7"#).unwrap_err().path,
            "control_plane.edge_id"
        );
    }

    #[test]
    fn a_static_document_may_name_the_edge_s_region_beside_its_fields() {
        let doc = |extra: &str| {
            format!(
                r#"{{"schema":"keygate.config/v1","version":4{extra},"accounts":[{{"sid":"AC1","status":"active","region":"us1"}}]}}"#
            )
        };
        let Ok(PluginConfig::Static { config, region }) =
            parse_plugin_config(doc(r#","region":"in1""#).as_bytes())
        else {
            panic!("static")
        };
        assert_eq!((config.version(), region.as_deref()), (4, Some("in1")));
        assert_eq!(config.counts(), (1, 0, 0));
        let Ok(PluginConfig::Static { region: None, .. }) = parse_plugin_config(doc("").as_bytes())
        else {
            panic!("static without a region")
        };
        for bad in [r#""IN1""#, r#""""#, "7", "null", r#"["in1"]"#] {
            let got = parse_plugin_config(doc(&format!(r#","region":{bad}"#)).as_bytes())
                .unwrap_err()
                .to_string();
            assert_eq!(
                got, "region: must be 1 to 32 lowercase letters, digits or '-'",
                "{bad}"
            );
        }
        // The document itself is still checked whole, with its paths.
        let got = parse_plugin_config(
            br#"{"schema":"keygate.config/v1","version":1,"region":"in1","accounts":[{"sid":"AC1","status":"active","regions":["in1","EU"]}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            got,
            "accounts[0].regions[1]: invalid region \"EU\": must be 1 to 32 lowercase letters, digits or '-'"
        );
    }

    #[test]
    fn staleness_counts_from_when_the_long_poll_answer_was_due() {
        let Ok(PluginConfig::ControlPlane(cp)) = parse_plugin_config(
            br#"{"control_plane":{"cluster":"c","authority":"a","token":"t","wait_s":10,"max_staleness_s":2}}"#,
        ) else {
            panic!("control plane")
        };
        assert!(
            !cp.is_stale(1012, 1000),
            "an idle long-poll is not staleness"
        );
        assert!(cp.is_stale(1013, 1000));
        // By default a config goes stale an hour after the answer was due, and is then refused.
        let Ok(PluginConfig::ControlPlane(default)) = parse_plugin_config(
            br#"{"control_plane":{"cluster":"c","authority":"a","token":"t","wait_s":10}}"#,
        ) else {
            panic!("control plane")
        };
        assert!(!default.is_stale(1000 + 3610, 1000));
        assert!(default.is_stale(1000 + 3611, 1000));
        assert_eq!(default.on_stale, OnStale::Deny);
        // An operator who prefers availability says so.
        let Ok(PluginConfig::ControlPlane(serve)) = parse_plugin_config(
            br#"{"control_plane":{"cluster":"c","authority":"a","token":"t","on_stale":"serve","max_staleness_s":86400}}"#,
        ) else {
            panic!("control plane")
        };
        assert_eq!(
            (serve.on_stale, serve.max_staleness_s),
            (OnStale::Serve, 86_400)
        );
        assert_eq!(
            parse_plugin_config(
                br#"{"control_plane":{"cluster":"c","authority":"a","token":"t","max_staleness_s":0}}"#
            )
            .unwrap_err()
            .to_string(),
            "control_plane.max_staleness_s: must be at least 1 (on_stale: serve keeps serving a stale config)"
        );
    }

    #[test]
    fn anything_else_is_a_static_document() {
        assert!(matches!(
            parse_plugin_config(br#"{"schema":"keygate.config/v1","version":1}"#),
            Ok(PluginConfig::Static { region: None, .. })
        ));
        assert!(parse_plugin_config(br#"{"schema":"nope","version":1}"#).is_err());
    }
}
