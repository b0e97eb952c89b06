//! The documented demo fixtures (see envoy/README.md): one active account with an auth token,
//! one suspended account, and a key of each kind. These secrets are public test data; their
//! SHA-256 digests are what `envoy/keygate-demo.json` stores.

use crate::paths;

/// Request paths of the demo config's APIs on [`ACCOUNT_SID`]: `calls` (standard keys may call
/// it, and anything below it), `messages`, the management API `keys`, and the publishable
/// `balance`.
pub const CALLS: &str = "/v2/accounts/ACdemo0001/calls";
pub const MESSAGES: &str = "/2010-04-01/Accounts/ACdemo0001/Messages.json";
pub const KEYS: &str = "/2010-04-01/Accounts/ACdemo0001/Keys.json";
pub const BALANCE: &str = "/api/account/balance";

/// A demo API key and its plaintext secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DemoKey {
    pub sid: &'static str,
    pub account_sid: &'static str,
    pub secret: &'static str,
}

impl DemoKey {
    const fn new(sid: &'static str, account_sid: &'static str, secret: &'static str) -> DemoKey {
        DemoKey {
            sid,
            account_sid,
            secret,
        }
    }
}

/// The active demo account.
pub const ACCOUNT_SID: &str = "ACdemo0001";
/// Auth token of [`ACCOUNT_SID`] (Basic `ACdemo0001:demo_auth_token_0001`).
pub const ACCOUNT_AUTH_TOKEN: &str = "demo_auth_token_0001";
/// The suspended demo account.
pub const SUSPENDED_ACCOUNT_SID: &str = "ACdemo0002";

/// Role `main`: everything on ACdemo0001, management APIs included.
pub const MAIN: DemoKey = DemoKey::new("SKdemomain01", ACCOUNT_SID, "sk_live_demoMain0001");
/// Role `standard`, limited to the `calls` API.
pub const STANDARD: DemoKey = DemoKey::new("SKdemostd01", ACCOUNT_SID, "sk_live_demoStandard0001");
/// Role `publishable`: only APIs marked `publishable` (balance).
pub const PUBLISHABLE: DemoKey =
    DemoKey::new("SKdemopub01", ACCOUNT_SID, "pk_live_demoPublishable0001");
/// Role `standard`, only from 192.0.2.0/24.
pub const IP_LOCKED: DemoKey = DemoKey::new("SKdemoip01", ACCOUNT_SID, "sk_live_demoIpLocked0001");
/// A key of the suspended account ACdemo0002.
pub const SUSPENDED: DemoKey = DemoKey::new(
    "SKdemosusp01",
    SUSPENDED_ACCOUNT_SID,
    "sk_live_demoSuspended0001",
);

pub const ALL_KEYS: [DemoKey; 5] = [MAIN, STANDARD, PUBLISHABLE, IP_LOCKED, SUSPENDED];

/// The demo plugin configuration, exactly as in `envoy/keygate-demo.json`.
pub fn config_text() -> String {
    let path = paths::envoy_dir().join("keygate-demo.json");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The demo plugin configuration, parsed (to derive variants with `serde_json`).
pub fn config() -> serde_json::Value {
    serde_json::from_str(&config_text()).expect("envoy/keygate-demo.json is valid JSON")
}
