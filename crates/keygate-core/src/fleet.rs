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

pub mod lease;
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

/// The messages of `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` the filter
/// sends and reads, with the field numbers of Envoy's `rls.proto` (fields keygate does not use
/// are left out: protobuf decoders skip what they do not know). keygate-ratelimit's tests check
/// these against the `envoy-types` crate's generated types.
pub mod rls {
    /// The gRPC method's path.
    pub const METHOD: &str = "ShouldRateLimit";
    /// The gRPC service's name.
    pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RateLimitRequest {
        #[prost(string, tag = "1")]
        pub domain: String,
        #[prost(message, repeated, tag = "2")]
        pub descriptors: Vec<RateLimitDescriptor>,
        /// Hits to add (0 means 1).
        #[prost(uint32, tag = "3")]
        pub hits_addend: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RateLimitDescriptor {
        #[prost(message, repeated, tag = "1")]
        pub entries: Vec<Entry>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Entry {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(string, tag = "2")]
        pub value: String,
    }

    /// `RateLimitResponse.Code`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
    #[repr(i32)]
    pub enum Code {
        Unknown = 0,
        Ok = 1,
        OverLimit = 2,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RateLimitResponse {
        #[prost(enumeration = "Code", tag = "1")]
        pub overall_code: i32,
        #[prost(message, repeated, tag = "2")]
        pub statuses: Vec<DescriptorStatus>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DescriptorStatus {
        #[prost(enumeration = "Code", tag = "1")]
        pub code: i32,
        #[prost(message, optional, tag = "2")]
        pub current_limit: Option<RateLimit>,
        #[prost(uint32, tag = "3")]
        pub limit_remaining: u32,
        #[prost(message, optional, tag = "4")]
        pub duration_until_reset: Option<Duration>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RateLimit {
        #[prost(uint32, tag = "1")]
        pub requests_per_unit: u32,
        /// `RateLimitResponse.RateLimit.Unit`: 1 second, 2 minute, 3 hour, 4 day.
        #[prost(int32, tag = "2")]
        pub unit: i32,
        #[prost(string, tag = "3")]
        pub name: String,
    }

    /// `envoy.config.core.v3.GrpcService` naming an Envoy cluster: what `dispatch_grpc_call`
    /// is given as its upstream (Envoy reads a cluster name only when this does not parse).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GrpcService {
        #[prost(message, optional, tag = "1")]
        pub envoy_grpc: Option<EnvoyGrpc>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct EnvoyGrpc {
        #[prost(string, tag = "1")]
        pub cluster_name: String,
    }

    /// `google.protobuf.Duration`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Duration {
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        #[prost(int32, tag = "2")]
        pub nanos: i32,
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
