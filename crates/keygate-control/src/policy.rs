//! What a caller may make of keys and accounts, beyond whether it may call the API at all (that
//! is keygate-core's decision, in [`crate::auth`]): no escalation through management, and the
//! caps that keep one tenant from growing without bound.
//!
//! **No escalation.** A caller can never create, regenerate or edit a key into more than it
//! holds itself ([`Holdings::check_key`]): no higher role (main ⊇ standard ⊇ publishable), no
//! API outside its own list, no allowlist wider than its own (every network of the new key's
//! list inside one of the caller's), no later expiry than its own. The key after the change is
//! what is checked, so a restricted key cannot lift its own restriction, and cannot regenerate a
//! key that holds more than itself (the new secret would be a credential it does not hold).
//! Account credentials hold the whole account; the operator's admin token and the CLI hold
//! everything. Only the operator changes an account's status, region or limits. A key's own
//! rate limits are not a holding: any main key can make as many keys as the account's caps
//! allow, and the account's limits bound them all together. A rate's `scope` (`local` or
//! `fleet`) is part of the rate and follows the same rules: neither scope is "more" than the
//! other. Every refusal is a 403 whose code
//! names the rule (`escalation_role`, `escalation_apis`, `escalation_allowed_ips`,
//! `escalation_expiry`, `escalation_denied`); nothing is silently clamped.
//!
//! **Caps** ([`Caps`]): keys per account, allowlist entries per key and per account, secrets in
//! grace per key, regenerations per key per hour, request body size; each refused with an exact
//! error naming the cap and its flag.

use keygate_core::config::Role;
use keygate_core::ip::IpAllowlist;

use crate::error::{Error, Refusal};
use crate::model::{rfc3339, Key};

/// Caps on what one tenant may hold. Defaults suit an API provider's customers; each has a
/// `serve` flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caps {
    /// Keys per account (`--max-keys-per-account`).
    pub keys_per_account: u64,
    /// Entries of one allowlist, a key's or an account's (`--max-allowlist-entries`).
    pub allowlist_entries: usize,
    /// Rotated secrets still in their grace period, per key (`--max-secrets-in-grace`).
    pub secrets_in_grace: u64,
    /// Regenerations per key in any hour (`--max-regenerations-per-hour`).
    pub regenerations_per_hour: u64,
    /// Largest request body, in bytes (`--max-body-bytes`).
    pub body_bytes: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            keys_per_account: 1_000,
            allowlist_entries: 100,
            secrets_in_grace: 3,
            regenerations_per_hour: 10,
            body_bytes: 64 * 1024,
        }
    }
}

impl Caps {
    /// An allowlist within the entry cap, or 400 naming the field.
    pub fn check_allowlist(&self, field: &str, list: &Option<Vec<String>>) -> Result<(), Error> {
        match list {
            Some(l) if l.len() > self.allowlist_entries => Err(Error::bad(
                field,
                format!(
                    "at most {} entries (--max-allowlist-entries); got {}",
                    self.allowlist_entries,
                    l.len()
                ),
            )),
            _ => Ok(()),
        }
    }

    /// 409 `too_many_keys` when an account already holds `count` keys.
    pub fn check_key_count(&self, count: u64) -> Result<(), Error> {
        if count >= self.keys_per_account {
            return Err(Error::refused(
                Refusal::Conflict,
                "too_many_keys",
                format!(
                    "the account already has {count} keys, the most it may hold (--max-keys-per-account {}); delete one first",
                    self.keys_per_account
                ),
            ));
        }
        Ok(())
    }

    /// 409 `too_many_secrets_in_grace` when a regeneration with grace would keep more rotated
    /// secrets alive than the cap.
    pub fn check_in_grace(&self, in_grace_after: u64) -> Result<(), Error> {
        if in_grace_after > self.secrets_in_grace {
            return Err(Error::refused(
                Refusal::Conflict,
                "too_many_secrets_in_grace",
                format!(
                    "the key would have {in_grace_after} secrets in grace, more than {} (--max-secrets-in-grace); revoke the previous ones (DELETE .../secrets/previous) or regenerate with grace_seconds 0",
                    self.secrets_in_grace
                ),
            ));
        }
        Ok(())
    }

    /// 429 `too_many_regenerations` with `Retry-After` when a key was regenerated too often in
    /// the last hour (`count` includes this one; `oldest` is the first still counted).
    pub fn check_regenerations(&self, count: u64, oldest: i64, now: i64) -> Result<(), Error> {
        if count > self.regenerations_per_hour {
            let retry = (oldest + 3600 - now).max(1);
            return Err(Error::Refused {
                kind: Refusal::TooMany,
                code: "too_many_regenerations",
                message: format!(
                    "the key was regenerated {} times in the last hour, the most allowed (--max-regenerations-per-hour); retry later",
                    self.regenerations_per_hour
                ),
                retry_after_s: Some(u64::try_from(retry).unwrap_or(1)),
            });
        }
        Ok(())
    }

    /// 413 `body_too_large`.
    pub fn body_too_large(&self) -> Error {
        Error::refused(
            Refusal::TooLarge,
            "body_too_large",
            format!(
                "the request body must be at most {} bytes (--max-body-bytes)",
                self.body_bytes
            ),
        )
    }
}

/// What the caller of a management request holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Holdings {
    /// The operator's admin token, or the CLI: everything.
    Operator,
    /// The account's own credentials (account SID + auth token): the whole account.
    Account,
    /// A key: what the key holds itself (its role, API list, allowlist, expiry).
    Key(Box<Key>),
}

fn rank(role: Role) -> u8 {
    match role {
        Role::Publishable => 0,
        Role::Standard => 1,
        Role::Main => 2,
    }
}

fn allowlist(list: &[String]) -> Option<IpAllowlist> {
    // Stored lists compiled when they were stored; one that no longer parses covers nothing.
    IpAllowlist::parse(list).ok()
}

impl Holdings {
    pub fn is_operator(&self) -> bool {
        *self == Holdings::Operator
    }

    /// Refuses `target` (a key as it would be after the change) if it holds more than the
    /// caller: role, APIs, allowlist, expiry. Account credentials and the operator hold all.
    pub fn check_key(&self, target: &Key) -> Result<(), Error> {
        let Holdings::Key(own) = self else {
            return Ok(());
        };
        if rank(target.role) > rank(own.role) {
            return Err(Error::escalation(
                "escalation_role",
                format!(
                    "role: a {} key cannot give a key the {} role",
                    own.role.as_str(),
                    target.role.as_str()
                ),
            ));
        }
        if let Some(own_apis) = &own.apis {
            match &target.apis {
                None => {
                    return Err(Error::escalation(
                        "escalation_apis",
                        format!(
                            "apis: this key may call only {own_apis:?}; a key it creates, edits or regenerates must list its APIs, within those"
                        ),
                    ))
                }
                Some(apis) => {
                    if let Some((i, api)) =
                        apis.iter().enumerate().find(|(_, a)| !own_apis.contains(a))
                    {
                        return Err(Error::escalation(
                            "escalation_apis",
                            format!("apis[{i}]: {api:?} is not among this key's APIs {own_apis:?}"),
                        ));
                    }
                }
            }
        }
        if let Some(own_ips) = &own.allowed_ips {
            check_within(
                "allowed_ips",
                "this key's allowlist",
                own_ips,
                &target.allowed_ips,
            )?;
        }
        if let Some(own_exp) = own.expires_at {
            match target.expires_at {
                None => {
                    return Err(Error::escalation(
                        "escalation_expiry",
                        format!(
                            "expires_at: this key expires at {}; a key it creates, edits or regenerates must expire no later",
                            rfc3339(own_exp)
                        ),
                    ))
                }
                Some(t) if t > own_exp => {
                    return Err(Error::escalation(
                        "escalation_expiry",
                        format!(
                            "expires_at: {} is after this key's own expiry {}",
                            rfc3339(t),
                            rfc3339(own_exp)
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Refuses a change of the account's allowlist from `current` to `new` that would let the
    /// caller in from more addresses than it holds: a key may only set a list that lies within
    /// its own allowlist and within the account's current one.
    pub fn check_account_allowlist(
        &self,
        current: &Option<Vec<String>>,
        new: &Option<Vec<String>>,
    ) -> Result<(), Error> {
        let Holdings::Key(own) = self else {
            return Ok(());
        };
        if let Some(own_ips) = &own.allowed_ips {
            check_within("allowed_ips", "this key's allowlist", own_ips, new)?;
        }
        if let Some(cur) = current {
            match new {
                None => {
                    return Err(Error::escalation(
                        "escalation_allowed_ips",
                        format!(
                            "allowed_ips: the account is limited to {cur:?}; a key may narrow the account's allowlist, not lift it (account credentials or the operator may)"
                        ),
                    ))
                }
                Some(_) => check_within("allowed_ips", "the account's allowlist", cur, new)?,
            }
        }
        Ok(())
    }
}

/// Refuses a `target` allowlist with an entry outside `own` (or none at all).
fn check_within(
    field: &str,
    whose: &str,
    own: &[String],
    target: &Option<Vec<String>>,
) -> Result<(), Error> {
    let Some(target) = target else {
        return Err(Error::escalation(
                "escalation_allowed_ips",
                format!(
                    "{field}: {whose} is {own:?}; a list within it is required (null would allow every address)"
                ),
            ));
    };
    let ours = allowlist(own);
    for (i, entry) in target.iter().enumerate() {
        let theirs = allowlist(std::slice::from_ref(entry));
        let inside = match (&ours, &theirs) {
            (Some(o), Some(t)) => o.covers(t),
            _ => false,
        };
        if !inside {
            return Err(Error::escalation(
                "escalation_allowed_ips",
                format!("{field}[{i}]: {entry:?} is not within {whose} {own:?}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(role: Role) -> Key {
        Key {
            sid: "SK1".into(),
            account_sid: "AC1".into(),
            friendly_name: None,
            role,
            apis: None,
            allowed_ips: None,
            limits: None,
            expires_at: None,
            enabled: true,
            generation: 0,
            created_at: 0,
            updated_at: 0,
        }
    }

    fn code(r: Result<(), Error>) -> &'static str {
        r.err().map_or("ok", |e| e.code())
    }

    /// Main ⊇ standard ⊇ publishable: no key gives a higher role than its own; account
    /// credentials and the operator hold every role.
    #[test]
    fn no_key_gives_a_higher_role_than_its_own() {
        let holder = |r| Holdings::Key(Box::new(key(r)));
        assert_eq!(
            code(holder(Role::Standard).check_key(&key(Role::Main))),
            "escalation_role"
        );
        assert_eq!(
            code(holder(Role::Publishable).check_key(&key(Role::Standard))),
            "escalation_role"
        );
        assert_eq!(
            code(holder(Role::Standard).check_key(&key(Role::Publishable))),
            "ok"
        );
        assert_eq!(code(holder(Role::Main).check_key(&key(Role::Main))), "ok");
        assert_eq!(code(Holdings::Account.check_key(&key(Role::Main))), "ok");
        assert_eq!(code(Holdings::Operator.check_key(&key(Role::Main))), "ok");
    }

    #[test]
    fn an_allowlist_must_lie_inside_the_holders() {
        let mut own = key(Role::Main);
        own.allowed_ips = Some(vec!["10.0.0.0/8".into(), "2001:db8::/32".into()]);
        let h = Holdings::Key(Box::new(own));
        let mut t = key(Role::Main);
        for (list, want) in [
            (vec!["10.1.0.0/16", "2001:db8:1::/48"], "ok"),
            (vec!["10.0.0.0/7"], "escalation_allowed_ips"),
            (vec!["11.0.0.1"], "escalation_allowed_ips"),
        ] {
            t.allowed_ips = Some(list.iter().map(|s| s.to_string()).collect());
            assert_eq!(code(h.check_key(&t)), want, "{list:?}");
        }
        let err = h.check_key(&key(Role::Main)).unwrap_err();
        assert_eq!(
            err.message(),
            "allowed_ips: this key's allowlist is [\"10.0.0.0/8\", \"2001:db8::/32\"]; a list within it is required (null would allow every address)"
        );
    }
}
