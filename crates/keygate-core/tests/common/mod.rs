//! The fixture config shared by the integration tests (plaintexts listed in `decide.rs`).
#![allow(dead_code, clippy::unwrap_used)]

use keygate_core::config::*;
use keygate_core::digest::Digester;

/// 2026-11-24T10:00:00Z (the core's test clock starts there).
pub const T0: u64 = keygate_core::testing::T0;
pub const T0_STR: &str = keygate_core::testing::T0_STR;

pub fn d(secret: &str) -> SecretDoc {
    SecretDoc {
        digest: Digester::Sha256.digest_hex(secret.as_bytes()),
        not_after: None,
    }
}

pub fn key(sid: &str, account: &str, role: Role, secret: &str) -> KeyDoc {
    KeyDoc {
        sid: sid.into(),
        account_sid: account.into(),
        role,
        secrets: vec![d(secret)],
        expires_at: None,
        enabled: true,
        apis: None,
        allowed_ips: None,
        limits: None,
    }
}

pub fn api(name: &str, methods: &[&str], paths: &[&str]) -> ApiDoc {
    ApiDoc {
        name: name.into(),
        methods: methods.iter().map(|s| s.to_string()).collect(),
        paths: paths.iter().map(|s| s.to_string()).collect(),
        publishable: false,
        management: false,
        limit: None,
    }
}

pub fn fixture_doc() -> ConfigDoc {
    let mut keys_api = api(
        "keys",
        &["GET", "POST", "DELETE"],
        &[
            "/2010-04-01/Accounts/{account_sid}/Keys.json",
            "/2010-04-01/Accounts/{account_sid}/Keys/{key_sid}.json",
        ],
    );
    keys_api.management = true;
    let mut balance = api("balance", &["GET"], &["/api/account/balance"]);
    balance.publishable = true;
    let mut std = key("SKstd", "AC1", Role::Standard, "sk_live_std");
    std.apis = Some(vec!["calls".into()]);
    let mut ip = key("SKip", "AC1", Role::Standard, "sk_live_ip");
    ip.allowed_ips = Some(vec!["192.0.2.0/24".into(), "2001:db8::/32".into()]);
    let mut rot = key("SKrot", "AC1", Role::Standard, "sk_live_new");
    rot.secrets.push(SecretDoc {
        not_after: Some(T0_STR.into()),
        ..d("sk_live_old")
    });
    let mut off = key("SKoff", "AC1", Role::Standard, "sk_live_off");
    off.enabled = false;
    let mut exp = key("SKexp", "AC1", Role::Standard, "sk_live_exp");
    exp.expires_at = Some(T0_STR.into());
    ConfigDoc {
        schema: SCHEMA_V1.into(),
        version: 7,
        settings: Settings::default(),
        apis: vec![
            api(
                "calls",
                &["GET", "POST"],
                &[
                    "/v2/accounts/{account_sid}/calls",
                    "/v2/accounts/{account_sid}/calls/**",
                ],
            ),
            api(
                "messages",
                &["GET", "POST"],
                &["/2010-04-01/Accounts/{account_sid}/Messages.json"],
            ),
            keys_api,
            balance,
        ],
        accounts: vec![
            AccountDoc {
                sid: "AC1".into(),
                status: AccountStatus::Active,
                auth_tokens: vec![d("tok_ac1")],
                allowed_ips: None,
                limits: None,
                region: None,
                regions: None,
            },
            AccountDoc {
                sid: "AC2".into(),
                status: AccountStatus::Suspended,
                auth_tokens: vec![],
                allowed_ips: None,
                limits: None,
                region: None,
                regions: None,
            },
            AccountDoc {
                sid: "AC3".into(),
                status: AccountStatus::Active,
                auth_tokens: vec![],
                allowed_ips: Some(vec!["10.0.0.0/8".into()]),
                limits: None,
                region: None,
                regions: None,
            },
        ],
        keys: vec![
            key("SKmain", "AC1", Role::Main, "sk_live_main"),
            std,
            key("SKpub", "AC1", Role::Publishable, "pk_live_pub"),
            ip,
            rot,
            off,
            exp,
            key("SKsusp", "AC2", Role::Standard, "sk_live_susp"),
            key("SKac3", "AC3", Role::Standard, "sk_live_ac3"),
        ],
        limits: LimitsDoc::default(),
    }
}
