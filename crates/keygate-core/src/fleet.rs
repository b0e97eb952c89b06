//! Fleet-wide limits: the descriptors keygate's identities become in Envoy's rate-limit protocol
//! (`envoy.service.ratelimit.v3`), shared by the filter's leases, Envoy's own
//! `envoy.filters.http.ratelimit` (its route actions build the same entries from keygate's
//! identity headers) and the control plane's export of the limits
//! (`GET /v1/edge/ratelimit-config`).
//!
//! A rate with `"scope": "fleet"` is counted by a rate-limit service (keygate-ratelimit, or
//! envoyproxy/ratelimit, or Limitador) in fixed windows of the rate's period, instead of in each
//! Envoy process. One descriptor per subject, always in this order:
//!
//! | subject | entries |
//! |---|---|
//! | account rate | `keygate=account`, `account_sid=<AC…>` |
//! | key rate | `keygate=key`, `role=<main\|standard\|publishable>`, `key_sid=<SK…>` |
//! | key × API rate | `keygate=key_api`, `api=<name>`, `key_sid=<SK…>` |
//!
//! The first entry names the kind (Envoy's `generic_key` action with `descriptor_key: keygate`);
//! the role and the API come before the key so that defaults (by role, by API) and per-key
//! overrides nest the way envoyproxy/ratelimit's configuration does.

use std::sync::Arc;

use crate::config::Role;
use crate::ratelimit::LimitKind;

/// The rate-limit domain keygate's descriptors belong to, unless configured otherwise.
pub const DEFAULT_DOMAIN: &str = "keygate";

/// The descriptor key of the first entry, whose value names the kind of subject.
pub const KIND_ENTRY: &str = "keygate";

/// Who a fleet-wide rate counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    /// An account: all its keys together.
    Account { account_sid: Arc<str> },
    /// A key on its own.
    Key { role: Role, key_sid: Arc<str> },
    /// A key calling one API.
    KeyApi { api: Arc<str>, key_sid: Arc<str> },
}

impl Subject {
    /// The value of the kind entry.
    pub fn kind_value(&self) -> &'static str {
        match self {
            Subject::Account { .. } => "account",
            Subject::Key { .. } => "key",
            Subject::KeyApi { .. } => "key_api",
        }
    }

    /// Which limit refuses when this subject is over its rate.
    pub fn limit_kind(&self) -> LimitKind {
        match self {
            Subject::Account { .. } => LimitKind::Account,
            Subject::Key { .. } => LimitKind::Key,
            Subject::KeyApi { .. } => LimitKind::KeyApi,
        }
    }

    /// The descriptor's entries, `(key, value)`, in order.
    pub fn entries(&self) -> Vec<(&'static str, &str)> {
        let kind = (KIND_ENTRY, self.kind_value());
        match self {
            Subject::Account { account_sid } => vec![kind, ("account_sid", account_sid)],
            Subject::Key { role, key_sid } => {
                vec![kind, ("role", role.as_str()), ("key_sid", key_sid)]
            }
            Subject::KeyApi { api, key_sid } => vec![kind, ("api", api), ("key_sid", key_sid)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn descriptors_name_the_kind_first_and_the_key_last() {
        let account = Subject::Account {
            account_sid: "AC1".into(),
        };
        assert_eq!(
            account.entries(),
            vec![("keygate", "account"), ("account_sid", "AC1")]
        );
        let key = Subject::Key {
            role: Role::Standard,
            key_sid: "SK1".into(),
        };
        assert_eq!(
            key.entries(),
            vec![("keygate", "key"), ("role", "standard"), ("key_sid", "SK1")]
        );
        let key_api = Subject::KeyApi {
            api: "calls".into(),
            key_sid: "SK1".into(),
        };
        assert_eq!(
            key_api.entries(),
            vec![("keygate", "key_api"), ("api", "calls"), ("key_sid", "SK1")]
        );
        assert_eq!(key_api.limit_kind(), LimitKind::KeyApi);
    }

    #[test]
    fn a_fleet_rate_is_whole_seconds_and_never_shadow() {
        use crate::compile::compile_rate;
        use crate::config::{LimitScope, RateDoc};
        let rate = |per: &str, shadow: bool| RateDoc {
            requests: 60,
            per: per.into(),
            shadow,
            scope: LimitScope::Fleet,
        };
        let fleet = compile_rate("limits.account", &rate("1m", false)).unwrap();
        assert_eq!(
            (fleet.scope, fleet.rate.period_us),
            (LimitScope::Fleet, 60_000_000)
        );
        let e = compile_rate("limits.account", &rate("1500ms", false)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "limits.account.per: \"1500ms\": a fleet limit's period must be a whole number of seconds"
        );
        let e = compile_rate("limits.account", &rate("1m", true)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "limits.account.shadow: a fleet limit cannot be in shadow mode"
        );
        // The same periods are fine locally.
        let local = RateDoc {
            scope: LimitScope::Local,
            ..rate("1500ms", true)
        };
        assert!(compile_rate("limits.account", &local).is_ok());
    }
}
