//! Accounts, keys and stored secrets as the control plane holds them, their validation, and their
//! translation into the edge config's wire types.
//!
//! Validation reuses the edge's own compiler: a key or account is checked by compiling a
//! one-account, one-key document with the catalogue ([`validate_key`], [`validate_account`]), so
//! whatever the store accepts, the edge accepts; errors keep the compiler's path, minus the
//! `keys[0].` prefix (`allowed_ips[0]: invalid CIDR "10.0.0/8"`).

use chrono::{DateTime, SecondsFormat, Utc};
use keygate_core::compile::compile_doc;
use keygate_core::config::{
    AccountDoc, AccountLimitsDoc, AccountStatus, KeyDoc, KeyLimitsDoc, Role, SecretDoc,
};

use crate::catalog::ApiCatalog;
use crate::error::Error;

#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub sid: String,
    pub friendly_name: Option<String>,
    pub status: AccountStatus,
    /// Home region.
    pub region: String,
    /// Further regions the account may be served in (`None`: its home region only).
    pub regions: Option<Vec<String>>,
    pub allowed_ips: Option<Vec<String>>,
    pub limits: Option<AccountLimitsDoc>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub sid: String,
    pub account_sid: String,
    pub friendly_name: Option<String>,
    pub role: Role,
    pub apis: Option<Vec<String>>,
    pub allowed_ips: Option<Vec<String>>,
    pub limits: Option<KeyLimitsDoc>,
    pub expires_at: Option<i64>,
    pub enabled: bool,
    /// Bumped by every change of the key's secrets; regeneration checks it (optimistic lock).
    pub generation: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A secret as stored: its digest, never its plaintext.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSecret {
    pub digest: String,
    pub owner_sid: String,
    /// End of a rotated secret's grace period (unix seconds); `None` for the current secret.
    pub not_after: Option<i64>,
    pub created_at: i64,
}

impl StoredSecret {
    pub fn live_at(&self, now: i64) -> bool {
        self.not_after.is_none_or(|t| now <= t)
    }

    pub fn to_doc(&self) -> SecretDoc {
        SecretDoc {
            digest: self.digest.clone(),
            not_after: self.not_after.map(rfc3339),
        }
    }
}

impl Account {
    pub fn to_doc(&self, auth_tokens: Vec<SecretDoc>) -> AccountDoc {
        AccountDoc {
            sid: self.sid.clone(),
            status: self.status,
            auth_tokens,
            allowed_ips: self.allowed_ips.clone(),
            limits: self.limits.clone(),
            region: Some(self.region.clone()),
            regions: self.regions.clone(),
        }
    }

    pub fn suspended(&self) -> bool {
        self.status == AccountStatus::Suspended
    }
}

impl Key {
    pub fn to_doc(&self, secrets: Vec<SecretDoc>) -> KeyDoc {
        KeyDoc {
            sid: self.sid.clone(),
            account_sid: self.account_sid.clone(),
            role: self.role,
            secrets,
            expires_at: self.expires_at.map(rfc3339),
            enabled: self.enabled,
            apis: self.apis.clone(),
            allowed_ips: self.allowed_ips.clone(),
            limits: self.limits.clone(),
        }
    }
}

pub fn role_str(r: Role) -> &'static str {
    r.as_str()
}

pub fn parse_role(s: &str) -> Option<Role> {
    match s {
        "main" => Some(Role::Main),
        "standard" => Some(Role::Standard),
        "publishable" => Some(Role::Publishable),
        _ => None,
    }
}

pub fn status_str(s: AccountStatus) -> &'static str {
    match s {
        AccountStatus::Active => "active",
        AccountStatus::Suspended => "suspended",
    }
}

pub fn parse_status(s: &str) -> Option<AccountStatus> {
    match s {
        "active" => Some(AccountStatus::Active),
        "suspended" => Some(AccountStatus::Suspended),
        _ => None,
    }
}

/// Most characters a friendly name may have (Twilio's limit).
pub const MAX_FRIENDLY_NAME: usize = 64;

pub fn validate_friendly_name(field: &str, name: &str) -> Result<(), Error> {
    if name.chars().count() > MAX_FRIENDLY_NAME {
        return Err(Error::bad(
            field,
            format!("must be at most {MAX_FRIENDLY_NAME} characters"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::bad(field, "must not contain control characters"));
    }
    Ok(())
}

/// keygate-core's one region rule ([`keygate_core::region::valid_region`]), the edge's too.
pub fn validate_region(field: &str, region: &str) -> Result<(), Error> {
    if !keygate_core::region::valid_region(region) {
        return Err(Error::bad(field, keygate_core::region::REGION_RULE));
    }
    Ok(())
}

const PLACEHOLDER_DIGEST: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn strip(path: &str, prefix: &str) -> String {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.trim_start_matches('.').to_owned(),
        None => path.to_owned(),
    }
}

/// Checks a key exactly as the edge will: compiles it alone with the catalogue.
pub fn validate_key(cat: &ApiCatalog, key: &Key) -> Result<(), Error> {
    let account = AccountDoc {
        sid: key.account_sid.clone(),
        status: AccountStatus::Active,
        auth_tokens: Vec::new(),
        allowed_ips: None,
        limits: None,
        region: None,
        regions: None,
    };
    let doc = cat.doc(
        0,
        vec![account],
        vec![key.to_doc(vec![SecretDoc {
            digest: PLACEHOLDER_DIGEST.to_owned(),
            not_after: None,
        }])],
    );
    compile_doc(&doc)
        .map(|_| ())
        .map_err(|e| Error::bad(&strip(&e.path, "keys[0]"), e.message))
}

/// Checks an account exactly as the edge will.
pub fn validate_account(cat: &ApiCatalog, account: &Account) -> Result<(), Error> {
    let doc = cat.doc(0, vec![account.to_doc(Vec::new())], Vec::new());
    compile_doc(&doc)
        .map(|_| ())
        .map_err(|e| Error::bad(&strip(&e.path, "accounts[0]"), e.message))
}

pub fn now() -> i64 {
    Utc::now().timestamp()
}

fn datetime(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap_or_default()
}

/// `Mon, 22 Nov 2026 06:13:27 +0000`: RFC 2822 in GMT, as Twilio writes `date_created`.
pub fn rfc2822(secs: i64) -> String {
    datetime(secs)
        .format("%a, %d %b %Y %H:%M:%S +0000")
        .to_string()
}

/// `2026-11-22T06:13:27Z`: RFC 3339 UTC, as the edge config and keygate's paths write times.
pub fn rfc3339(secs: i64) -> String {
    datetime(secs).to_rfc3339_opts(SecondsFormat::Secs, true)
}

pub fn parse_rfc3339(field: &str, s: &str) -> Result<i64, Error> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp())
        .map_err(|_| {
            Error::bad(
                field,
                format!("invalid RFC 3339 time {s:?} (expected like \"2026-11-24T10:00:00Z\")"),
            )
        })
        .and_then(|t| {
            if t < 0 {
                Err(Error::bad(field, "must be after 1970"))
            } else {
                Ok(t)
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_in_twilio_and_edge_formats() {
        assert_eq!(rfc2822(1_795_328_007), "Sun, 22 Nov 2026 06:13:27 +0000");
        assert_eq!(rfc3339(1_795_328_007), "2026-11-22T06:13:27Z");
        assert_eq!(
            parse_rfc3339("x", "2026-11-22T07:13:27+01:00").unwrap(),
            1_795_328_007
        );
        assert!(parse_rfc3339("expires_at", "tomorrow")
            .unwrap_err()
            .message()
            .starts_with("expires_at: "));
    }

    #[test]
    fn friendly_name_limit_counts_characters() {
        assert!(validate_friendly_name("FriendlyName", &"é".repeat(64)).is_ok());
        let e = validate_friendly_name("FriendlyName", &"a".repeat(65)).unwrap_err();
        assert_eq!(e.message(), "FriendlyName: must be at most 64 characters");
    }
}
