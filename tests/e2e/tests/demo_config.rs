//! `envoy/envoy.yaml` carries the demo plugin config inline; it must equal
//! `envoy/keygate-demo.json`, whose digests must match the documented demo secrets.
#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use keygate_e2e::{demo, paths};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The text of the `value: |` block scalar that follows the
/// `"@type": type.googleapis.com/google.protobuf.StringValue` line, dedented.
fn inline_plugin_config(yaml: &str) -> String {
    let lines: Vec<&str> = yaml.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim() == "\"@type\": type.googleapis.com/google.protobuf.StringValue")
        .expect("envoy.yaml has a StringValue plugin configuration");
    assert_eq!(
        lines[start + 1].trim(),
        "value: |",
        "the plugin configuration must be a literal block scalar right after its @type"
    );
    let key_indent = indent(lines[start + 1]);
    let block: Vec<&str> = lines[start + 2..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent(l) > key_indent)
        .copied()
        .collect();
    let body_indent = block
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| indent(l))
        .min()
        .unwrap_or(0);
    block
        .iter()
        .map(|l| l.get(body_indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

#[test]
fn envoy_yaml_inline_plugin_config_equals_keygate_demo_json() {
    let yaml = std::fs::read_to_string(paths::envoy_dir().join("envoy.yaml")).unwrap();
    let inline: Value = serde_json::from_str(&inline_plugin_config(&yaml))
        .expect("the inline plugin configuration in envoy.yaml is JSON");
    assert_eq!(inline, demo::config());
}

#[test]
fn demo_digests_are_sha256_of_the_documented_secrets() {
    let config = demo::config();
    let hex_sha256 = |s: &str| hex::encode(Sha256::digest(s.as_bytes()));
    for key in demo::ALL_KEYS {
        let entry = config["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["sid"] == key.sid)
            .unwrap_or_else(|| panic!("{} missing from keygate-demo.json", key.sid));
        assert_eq!(entry["account_sid"], key.account_sid, "{}", key.sid);
        assert_eq!(
            entry["secrets"][0]["digest"],
            hex_sha256(key.secret),
            "{}",
            key.sid
        );
    }
    let account = &config["accounts"][0];
    assert_eq!(account["sid"], demo::ACCOUNT_SID);
    assert_eq!(
        account["auth_tokens"][0]["digest"],
        hex_sha256(demo::ACCOUNT_AUTH_TOKEN)
    );
}

/// `envoy/envoy-control-plane.yaml` (what `make run` starts) names a feed path the control plane
/// really serves as a change feed, with a plugin configuration the filter accepts.
#[test]
fn the_control_plane_template_points_at_the_change_feed() {
    use keygate_core::plugin::{parse_plugin_config, PluginConfig};
    let yaml =
        std::fs::read_to_string(paths::envoy_dir().join("envoy-control-plane.yaml")).unwrap();
    let cp = keygate_e2e::ControlPlane::start();
    let text =
        inline_plugin_config(&yaml).replace("kg_edge_REPLACE_ME", cp.cred("KEYGATE_EDGE_TOKEN"));
    let Ok(PluginConfig::ControlPlane(source)) = parse_plugin_config(text.as_bytes()) else {
        panic!("the template's plugin configuration is not a control-plane source:\n{text}")
    };
    let r = cp.send(
        &keygate_e2e::Req::get(format!("{}?since=0&limit=1", source.path)).bearer(&source.token),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body_json()["schema"], "keygate.changes/v1", "{r:?}");
}
