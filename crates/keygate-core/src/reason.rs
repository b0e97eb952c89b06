//! The closed set of denial reasons: each has a stable code, an HTTP status and a fixed message.
//!
//! Codes are part of keygate's public interface (documented in the README); never rename one.
//! Bodies are static: nothing from the request is ever echoed back.

/// Why a request was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No usable config is in force yet.
    NoConfig,
    /// No `Authorization` header.
    MissingCredentials,
    /// More than one credential: two `Authorization` headers, or a comma-joined list.
    MultipleCredentials,
    /// An `Authorization` header that does not parse (not token68, bad base64, no colon, ...).
    MalformedCredentials,
    /// A scheme other than the enabled ones (Basic, Bearer).
    UnsupportedScheme,
    /// Unknown key, wrong secret, expired secret, disabled or expired key: one identical reply.
    InvalidCredentials,
    /// A path keygate refuses to match (dot segments, encoded slashes, `;`, non-ASCII, ...).
    MalformedPath,
    /// The principal's account is suspended.
    AccountSuspended,
    /// The client address is outside the key's or the account's allowlist.
    IpNotAllowed,
    /// The key's role or API list does not include this API.
    PermissionDenied,
    /// The account SID in the path is not the key's account.
    AccountMismatch,
    /// Method and path match no API in the catalogue.
    UnknownRoute,
    /// The key's own rate limit.
    RateLimitedKey,
    /// The account's rate limit (all its keys together).
    RateLimitedAccount,
    /// The key's limit for this API.
    RateLimitedApi,
    /// The account already has its maximum of requests in flight.
    ConcurrencyLimited,
    /// Too many failed authentications from this client address.
    TooManyFailedAuth,
    /// The limit counters could not be read or updated and the configured outcome is deny.
    LimiterUnavailable,
    /// The control plane has not been heard from for longer than allowed (`on_stale: deny`).
    ConfigStale,
    /// The principal's account is not served in the edge's region.
    WrongRegion,
}

impl Reason {
    /// Every reason, for docs, stats and tests.
    pub const ALL: [Reason; 20] = [
        Reason::NoConfig,
        Reason::MissingCredentials,
        Reason::MultipleCredentials,
        Reason::MalformedCredentials,
        Reason::UnsupportedScheme,
        Reason::InvalidCredentials,
        Reason::MalformedPath,
        Reason::AccountSuspended,
        Reason::IpNotAllowed,
        Reason::PermissionDenied,
        Reason::AccountMismatch,
        Reason::UnknownRoute,
        Reason::RateLimitedKey,
        Reason::RateLimitedAccount,
        Reason::RateLimitedApi,
        Reason::ConcurrencyLimited,
        Reason::TooManyFailedAuth,
        Reason::LimiterUnavailable,
        Reason::ConfigStale,
        Reason::WrongRegion,
    ];

    /// Stable reason code, used in the JSON body and in stat names.
    pub fn code(self) -> &'static str {
        match self {
            Reason::NoConfig => "no_config",
            Reason::MissingCredentials => "missing_credentials",
            Reason::MultipleCredentials => "multiple_credentials",
            Reason::MalformedCredentials => "malformed_credentials",
            Reason::UnsupportedScheme => "unsupported_scheme",
            Reason::InvalidCredentials => "invalid_credentials",
            Reason::MalformedPath => "malformed_path",
            Reason::AccountSuspended => "account_suspended",
            Reason::IpNotAllowed => "ip_not_allowed",
            Reason::PermissionDenied => "permission_denied",
            Reason::AccountMismatch => "account_mismatch",
            Reason::UnknownRoute => "unknown_route",
            Reason::RateLimitedKey => "rate_limited_key",
            Reason::RateLimitedAccount => "rate_limited_account",
            Reason::RateLimitedApi => "rate_limited_api",
            Reason::ConcurrencyLimited => "concurrency_limited",
            Reason::TooManyFailedAuth => "too_many_failed_auth",
            Reason::LimiterUnavailable => "limiter_unavailable",
            Reason::ConfigStale => "config_stale",
            Reason::WrongRegion => "wrong_region",
        }
    }

    pub fn status(self) -> u32 {
        match self {
            Reason::NoConfig | Reason::LimiterUnavailable | Reason::ConfigStale => 503,
            Reason::RateLimitedKey
            | Reason::RateLimitedAccount
            | Reason::RateLimitedApi
            | Reason::ConcurrencyLimited
            | Reason::TooManyFailedAuth => 429,
            Reason::MissingCredentials | Reason::UnsupportedScheme | Reason::InvalidCredentials => {
                401
            }
            Reason::MultipleCredentials | Reason::MalformedCredentials | Reason::MalformedPath => {
                400
            }
            Reason::AccountSuspended | Reason::IpNotAllowed | Reason::PermissionDenied => 403,
            Reason::AccountMismatch | Reason::UnknownRoute | Reason::WrongRegion => 404,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Reason::NoConfig => "The gateway has no key configuration yet; retry shortly",
            Reason::MissingCredentials => "Missing API key: send HTTP Basic or Bearer credentials",
            Reason::MultipleCredentials => "More than one credential in the request",
            Reason::MalformedCredentials => "Malformed Authorization header",
            Reason::UnsupportedScheme => "Unsupported authorization scheme",
            Reason::InvalidCredentials => "Invalid or missing API key",
            Reason::MalformedPath => "Request path is not in canonical form",
            Reason::AccountSuspended => "Account suspended",
            Reason::IpNotAllowed => "Client IP address not allowed for this key",
            Reason::PermissionDenied => "This key is not permitted to call this API",
            Reason::AccountMismatch => "Account not found",
            Reason::UnknownRoute => "Not found",
            Reason::RateLimitedKey => "Rate limit exceeded for this API key",
            Reason::RateLimitedAccount => "Rate limit exceeded for this account",
            Reason::RateLimitedApi => "Rate limit exceeded for this API with this key",
            Reason::ConcurrencyLimited => "Too many concurrent requests for this account",
            Reason::TooManyFailedAuth => "Too many failed authentication attempts; retry later",
            Reason::LimiterUnavailable => "Rate limiting is temporarily unavailable; retry shortly",
            Reason::ConfigStale => "The gateway's key configuration is out of date; retry shortly",
            Reason::WrongRegion => "This account is not served in this region",
        }
    }

    /// The JSON body: `{"error":{"code":"...","message":"..."}}`. Codes and messages contain no
    /// characters that need escaping, which a test checks.
    pub fn body(self) -> String {
        format!(
            r#"{{"error":{{"code":"{}","message":"{}"}}}}"#,
            self.code(),
            self.message()
        )
    }

    /// Whether the reply carries `WWW-Authenticate` challenges.
    pub fn challenges(self) -> bool {
        self.status() == 401
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn every_body_is_valid_json_with_its_code() {
        for r in Reason::ALL {
            let v: serde_json::Value = serde_json::from_str(&r.body()).unwrap();
            assert_eq!(v["error"]["code"], r.code());
            assert_eq!(v["error"]["message"], r.message());
        }
    }

    #[test]
    fn discriminants_index_all() {
        // The filter indexes its per-reason counters with `reason as usize`.
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{}", r.code());
        }
    }

    #[test]
    fn codes_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert!(seen.insert(r.code()), "duplicate code {}", r.code());
            assert!(r
                .code()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
    }

    #[test]
    fn statuses_follow_the_seed_documents() {
        assert_eq!(Reason::InvalidCredentials.status(), 401);
        assert_eq!(Reason::IpNotAllowed.status(), 403);
        assert_eq!(Reason::AccountSuspended.status(), 403);
        assert_eq!(Reason::AccountMismatch.status(), 404);
        // Exotel: "HTTP 404 | Incorrect Account SID or region".
        assert_eq!(Reason::WrongRegion.status(), 404);
        assert_eq!(Reason::NoConfig.status(), 503);
    }
}
