//! What the control plane does, independent of HTTP and of the database: every operation is
//! one function over a store transaction ([`Tx`]: SQLite or Postgres), run by
//! [`store::Db::write`] as one write transaction with one config version bump, always its last
//! statement (on Postgres the bump is sent with the commit). Handlers and the CLI call these.

use std::collections::{HashMap, HashSet};

use keygate_core::compile;
use keygate_core::config::{
    AccountDoc, AccountLimitsDoc, AccountStatus, ChangesPage, ConfigDoc, KeyDoc, KeyLimitsDoc,
    Role, SecretDoc, CHANGES_SCHEMA_V1,
};
use keygate_core::secret_format::SecretKind;

use crate::catalog::ApiCatalog;
use crate::error::{internal, Error};
use crate::model::{self, now, Account, Key, StoredSecret};
use crate::policy::{Caps, Holdings};
use crate::secret::{self, new_operator_token, new_secret, new_sid, OperatorKind, Secret};
use crate::store::{self, Tx};

/// Default grace of a regenerated key's old secret: 48 hours, as Exotel does.
pub const DEFAULT_GRACE_SECONDS: u64 = 48 * 3600;
/// Longest grace a regeneration may ask for (30 days).
pub const MAX_GRACE_SECONDS: u64 = 30 * 86_400;

#[derive(Debug, Clone, Default)]
pub struct NewAccount {
    pub friendly_name: Option<String>,
    pub region: Option<String>,
    /// Further regions (`[]` is none).
    pub regions: Option<Vec<String>>,
    pub status: Option<AccountStatus>,
    pub allowed_ips: Option<Vec<String>>,
    pub limits: Option<AccountLimitsDoc>,
}

#[derive(Debug, Clone)]
pub struct NewKey {
    pub friendly_name: Option<String>,
    pub role: Role,
    pub apis: Option<Vec<String>>,
    pub allowed_ips: Option<Vec<String>>,
    pub limits: Option<KeyLimitsDoc>,
    pub expires_at: Option<i64>,
    pub enabled: bool,
}

impl NewKey {
    pub fn with_role(role: Role) -> NewKey {
        NewKey {
            friendly_name: None,
            role,
            apis: None,
            allowed_ips: None,
            limits: None,
            expires_at: None,
            enabled: true,
        }
    }
}

fn secret_kind(role: Role) -> SecretKind {
    match role {
        Role::Main | Role::Standard => SecretKind::SecretLive,
        Role::Publishable => SecretKind::PublishableLive,
    }
}

/// Creates an account and its auth token (returned once).
pub fn create_account(
    tx: &mut dyn Tx,
    cat: &ApiCatalog,
    caps: &Caps,
    default_region: &str,
    new: NewAccount,
) -> Result<(Account, Secret, u64), Error> {
    if let Some(n) = &new.friendly_name {
        model::validate_friendly_name("friendly_name", n)?;
    }
    caps.check_allowlist("allowed_ips", &new.allowed_ips)?;
    let region = new.region.unwrap_or_else(|| default_region.to_owned());
    model::validate_region("region", &region)?;
    let t = now();
    let account = Account {
        sid: new_sid("AC")?,
        friendly_name: new.friendly_name,
        status: new.status.unwrap_or(AccountStatus::Active),
        region,
        regions: new.regions.filter(|r| !r.is_empty()),
        allowed_ips: new.allowed_ips,
        limits: new.limits,
        created_at: t,
        updated_at: t,
    };
    model::validate_account(cat, &account)?;
    let token = new_secret(SecretKind::AuthToken)?;
    tx.insert_account(&account)?;
    tx.insert_secret(&account.sid, &secret::digest(token.expose().as_bytes()), t)?;
    let version = tx.bump()?;
    tracing::info!(account_sid = %account.sid, version, "account created");
    Ok((account, token, version))
}

/// Applies `patch` to an account, validates the result (caps, and that `holder` does not widen
/// the account's allowlist beyond what it holds), stores it.
pub fn update_account(
    tx: &mut dyn Tx,
    cat: &ApiCatalog,
    caps: &Caps,
    holder: &Holdings,
    sid: &str,
    patch: impl FnOnce(&mut Account) -> Result<(), Error>,
) -> Result<(Account, u64), Error> {
    let mut account = tx.get_account(sid)?.ok_or(Error::NotFound)?;
    let before = account.clone();
    patch(&mut account)?;
    // `[]` and `null` both mean no further region.
    account.regions = account.regions.take().filter(|r| !r.is_empty());
    if !holder.is_operator()
        && (account.status != before.status
            || account.region != before.region
            || account.regions != before.regions
            || account.limits != before.limits)
    {
        return Err(Error::escalation(
            "escalation_denied",
            "only the operator (admin token) may change an account's status, region, regions or limits",
        ));
    }
    caps.check_allowlist("allowed_ips", &account.allowed_ips)?;
    if account.allowed_ips != before.allowed_ips {
        holder.check_account_allowlist(&before.allowed_ips, &account.allowed_ips)?;
    }
    if let Some(n) = &account.friendly_name {
        model::validate_friendly_name("friendly_name", n)?;
    }
    model::validate_region("region", &account.region)?;
    model::validate_account(cat, &account)?;
    account.updated_at = now();
    tx.update_account(&account)?;
    let version = tx.bump()?;
    tracing::info!(account_sid = %sid, status = model::status_str(account.status), version, "account updated");
    Ok((account, version))
}

/// Creates a key with a fresh secret (returned once), refused if it would hold more than
/// `holder` or the account is at its key cap.
pub fn create_key(
    tx: &mut dyn Tx,
    cat: &ApiCatalog,
    caps: &Caps,
    holder: &Holdings,
    account_sid: &str,
    new: NewKey,
) -> Result<(Key, Secret, u64), Error> {
    let t = now();
    let key = Key {
        sid: new_sid("SK")?,
        account_sid: account_sid.to_owned(),
        friendly_name: new.friendly_name,
        role: new.role,
        apis: new.apis,
        allowed_ips: new.allowed_ips,
        limits: new.limits,
        expires_at: new.expires_at,
        enabled: new.enabled,
        generation: 0,
        created_at: t,
        updated_at: t,
    };
    let secret = new_secret(secret_kind(key.role))?;
    if tx.get_account(account_sid)?.is_none() {
        return Err(Error::NotFound);
    }
    caps.check_allowlist("allowed_ips", &key.allowed_ips)?;
    model::validate_key(cat, &key)?;
    holder.check_key(&key)?;
    caps.check_key_count(tx.count_keys(account_sid)?)?;
    tx.insert_key(&key)?;
    tx.insert_secret(&key.sid, &secret::digest(secret.expose().as_bytes()), t)?;
    let version = tx.bump()?;
    tracing::info!(account_sid, key_sid = %key.sid, role = key.role.as_str(), version, "key created");
    Ok((key, secret, version))
}

/// The secrets of a key [`create_key`] just made, as stored: its one current secret.
pub fn secrets_of_new_key(key: &Key, secret: &Secret) -> Vec<StoredSecret> {
    vec![StoredSecret {
        digest: secret::digest(secret.expose().as_bytes()),
        owner_sid: key.sid.clone(),
        not_after: None,
        created_at: key.created_at,
    }]
}

/// Applies `patch` to a key, validates the result (caps; never more than `holder` holds),
/// stores it (generation-checked).
#[allow(clippy::too_many_arguments)]
pub fn update_key(
    tx: &mut dyn Tx,
    cat: &ApiCatalog,
    caps: &Caps,
    holder: &Holdings,
    account_sid: &str,
    sid: &str,
    patch: impl FnOnce(&mut Key) -> Result<(), Error>,
) -> Result<(Key, u64), Error> {
    let old = tx.get_key(account_sid, sid)?.ok_or(Error::NotFound)?;
    let mut key = old.clone();
    patch(&mut key)?;
    if (key.role == Role::Publishable) != (old.role == Role::Publishable) {
        return Err(Error::bad(
            "role",
            "cannot change between publishable and secret roles (the secret's prefix shows which); create a new key",
        ));
    }
    if let Some(n) = &key.friendly_name {
        model::validate_friendly_name("friendly_name", n)?;
    }
    caps.check_allowlist("allowed_ips", &key.allowed_ips)?;
    model::validate_key(cat, &key)?;
    holder.check_key(&key)?;
    key.updated_at = now();
    if !tx.update_key(&key)? {
        return Err(Error::Conflict(
            "the key was changed by a concurrent request; retry",
        ));
    }
    key.generation += 1;
    let version = tx.bump()?;
    tracing::info!(account_sid, key_sid = sid, version, "key updated");
    Ok((key, version))
}

/// Deletes a key and all its secrets: it stops authenticating at the next config version.
pub fn delete_key(tx: &mut dyn Tx, account_sid: &str, sid: &str) -> Result<u64, Error> {
    if tx.get_key(account_sid, sid)?.is_none() {
        return Err(Error::NotFound);
    }
    tx.delete_key(sid)?;
    let version = tx.bump()?;
    tracing::info!(account_sid, key_sid = sid, version, "key deleted");
    Ok(version)
}

/// The outcome of a regeneration.
#[derive(Debug)]
pub struct Regenerated {
    pub key: Key,
    pub secret: Secret,
    /// The key's secrets after the change (the new current one first).
    pub secrets: Vec<StoredSecret>,
    pub version: u64,
}

/// Gives a key a new secret. The current one keeps working for `grace` seconds (its `not_after`);
/// with `grace == 0` every older secret stops working at once. In one write transaction with
/// a generation check, so concurrent regenerations serialize: each caller gets a secret that is
/// stored, and no secret is stored that its caller did not get back.
///
/// Refused if the key holds more than `holder` (its new secret would be a credential the caller
/// does not hold), if it would keep more secrets in grace than the cap, or if it was regenerated
/// too often in the last hour.
pub fn regenerate(
    tx: &mut dyn Tx,
    caps: &Caps,
    holder: &Holdings,
    account_sid: &str,
    sid: &str,
    grace: u64,
) -> Result<Regenerated, Error> {
    if grace > MAX_GRACE_SECONDS {
        return Err(Error::bad(
            "grace_seconds",
            format!("must be at most {MAX_GRACE_SECONDS} (30 days)"),
        ));
    }
    let mut key = tx.get_key(account_sid, sid)?.ok_or(Error::NotFound)?;
    holder.check_key(&key)?;
    let t = now();
    let (count, oldest) = tx.note_regeneration(sid, t, t - 3600)?;
    caps.check_regenerations(count, oldest, t)?;
    let secret = new_secret(secret_kind(key.role))?;
    tx.delete_previous(sid, Some(t))?;
    if grace > 0 {
        // What remains is the current secret and those still in grace; all of them will be.
        let in_grace = tx.secrets_of(sid)?.len();
        caps.check_in_grace(u64::try_from(in_grace).unwrap_or(u64::MAX))?;
    }
    if grace == 0 {
        tx.delete_all_secrets(sid)?;
    } else {
        tx.retire_current(
            sid,
            t.saturating_add(i64::try_from(grace).unwrap_or(i64::MAX)),
        )?;
    }
    tx.insert_secret(sid, &secret::digest(secret.expose().as_bytes()), t)?;
    key.updated_at = t;
    if !tx.update_key(&key)? {
        // Dropping `tx` rolls back: the new secret was never stored, and is not returned.
        return Err(Error::Conflict(
            "the key was regenerated by a concurrent request; retry",
        ));
    }
    key.generation += 1;
    let secrets = tx.secrets_of(sid)?;
    // The bump is each write's last statement (on Postgres it commits).
    let version = tx.bump()?;
    tracing::info!(
        account_sid,
        key_sid = sid,
        grace_seconds = grace,
        version,
        "key secret regenerated"
    );
    Ok(Regenerated {
        key,
        secret,
        secrets,
        version,
    })
}

/// Revokes a key's rotated secrets before their grace ends. Returns how many were revoked, and
/// the new config version if any were.
pub fn revoke_previous(
    tx: &mut dyn Tx,
    account_sid: &str,
    sid: &str,
) -> Result<(usize, Option<u64>), Error> {
    if tx.get_key(account_sid, sid)?.is_none() {
        return Err(Error::NotFound);
    }
    let n = tx.delete_previous(sid, None)?;
    let version = if n > 0 { Some(tx.bump()?) } else { None };
    tracing::info!(
        account_sid,
        key_sid = sid,
        revoked = n,
        "previous key secrets revoked"
    );
    Ok((n, version))
}

/// Creates an operator token (admin or edge); returns its SID and the token (shown once).
pub fn create_operator_token(
    tx: &mut dyn Tx,
    kind: OperatorKind,
) -> Result<(String, Secret), Error> {
    let sid = new_sid(match kind {
        OperatorKind::Admin => "OA",
        OperatorKind::Edge => "OE",
    })?;
    let token = new_operator_token(kind)?;
    tx.insert_operator_token(
        &sid,
        kind,
        &secret::digest(token.expose().as_bytes()),
        now(),
    )?;
    tracing::info!(sid = %sid, kind = kind.as_str(), "operator token created");
    Ok((sid, token))
}

/// What `init` prints once.
#[derive(Debug)]
pub struct Initialized {
    pub admin_token: Secret,
    pub account: Account,
    pub auth_token: Secret,
    pub edge_token: Secret,
    pub version: u64,
}

/// Bootstraps an empty database: an admin token, a first account, an edge token.
pub fn init(
    tx: &mut dyn Tx,
    cat: &ApiCatalog,
    region: &str,
    account_name: Option<String>,
) -> Result<Initialized, Error> {
    if tx.has_admin()? {
        return Err(Error::Conflict(
            "already initialized (an admin token exists)",
        ));
    }
    let (_, admin_token) = create_operator_token(tx, OperatorKind::Admin)?;
    let (_, edge_token) = create_operator_token(tx, OperatorKind::Edge)?;
    // Last: its version bump is the transaction's last statement.
    let (account, auth_token, version) = create_account(
        tx,
        cat,
        &Caps::default(),
        region,
        NewAccount {
            friendly_name: account_name,
            ..NewAccount::default()
        },
    )?;
    Ok(Initialized {
        admin_token,
        account,
        auth_token,
        edge_token,
        version,
    })
}

/// Accounts and keys as the edge reads them, each with its secrets' digests.
fn to_docs(
    accounts: &[Account],
    keys: &[Key],
    secrets: &[StoredSecret],
) -> (Vec<AccountDoc>, Vec<KeyDoc>) {
    let mut by_owner: HashMap<&str, Vec<SecretDoc>> = HashMap::new();
    for s in secrets {
        by_owner
            .entry(s.owner_sid.as_str())
            .or_default()
            .push(s.to_doc());
    }
    let mut take = |sid: &str| by_owner.remove(sid).unwrap_or_default();
    let accounts = accounts.iter().map(|a| a.to_doc(take(&a.sid))).collect();
    let keys = keys.iter().map(|k| k.to_doc(take(&k.sid))).collect();
    (accounts, keys)
}

/// The complete edge config at the current version, read in one transaction.
pub fn snapshot(tx: &mut dyn Tx, cat: &ApiCatalog) -> Result<ConfigDoc, Error> {
    let version = tx.version()?;
    let accounts = tx.all_accounts()?;
    let keys = tx.all_keys()?;
    let secrets = tx.all_secrets()?;
    let (accounts, keys) = to_docs(&accounts, &keys, &secrets);
    Ok(cat.doc(version, accounts, keys))
}

/// Largest page of the change feed.
pub const MAX_CHANGES_LIMIT: usize = 10_000;

/// One page of the change feed: the accounts and keys changed after config version `since`
/// whose SIDs follow `after`, at most `limit` of them, ascending by SID, as of the current
/// version, read in one transaction (so the page is one version's state). Every record is
/// checked with the edge's compiler first (500 if one would not compile).
pub fn changes(
    tx: &mut dyn Tx,
    cat: &ApiCatalog,
    since: u64,
    after: &str,
    limit: usize,
) -> Result<ChangesPage, Error> {
    let page = read_changes(tx, cat, since, after, limit)?;
    check_page(&page)?;
    Ok(page)
}

/// The database half of [`changes`] (the HTTP handler runs [`check_page`] after releasing the
/// connection): one read transaction.
pub fn read_changes(
    tx: &mut dyn Tx,
    cat: &ApiCatalog,
    since: u64,
    after: &str,
    limit: usize,
) -> Result<ChangesPage, Error> {
    let version = tx.version()?;
    if since > 0 {
        let floor = tx.changelog_floor()?;
        if since < floor {
            return Err(Error::Gone(format!(
                "since: the change log starts at version {floor}; changes since an older version are not known (sync again from since=0)"
            )));
        }
    }
    let sids = tx.changed_sids(since, after, limit)?;
    // A full walk's page holds every SID in its range (each account and key ever written is
    // in the change log): read the range. A delta's SIDs are scattered: read them one by one.
    let owners = match (since, sids.first(), sids.last()) {
        (0, Some(_), Some(last)) => store::Owners::Between(after, last),
        _ => store::Owners::Listed(&sids),
    };
    let mut accounts = tx.accounts_in(owners)?;
    let mut keys = tx.keys_in(owners)?;
    let mut secrets = tx.secrets_in(owners)?;
    // The page is its SIDs: a row in the range the log does not name stays off it.
    let listed = |sid: &str| sids.binary_search_by(|s| s.as_str().cmp(sid)).is_ok();
    accounts.retain(|a| listed(&a.sid));
    keys.retain(|k| listed(&k.sid));
    secrets.retain(|s| listed(&s.owner_sid));

    let (accounts, keys) = to_docs(&accounts, &keys, &secrets);
    let present: HashSet<&str> = accounts
        .iter()
        .map(|a| a.sid.as_str())
        .chain(keys.iter().map(|k| k.sid.as_str()))
        .collect();
    let deleted: Vec<String> = sids
        .iter()
        .filter(|s| !present.contains(s.as_str()))
        .cloned()
        .collect();
    let next = if limit > 0 && sids.len() >= limit {
        sids.last().cloned()
    } else {
        None
    };
    let meta = cat.doc(version, Vec::new(), Vec::new());
    Ok(ChangesPage {
        schema: CHANGES_SCHEMA_V1.to_owned(),
        version,
        since,
        after: after.to_owned(),
        next,
        settings: meta.settings,
        apis: meta.apis,
        limits: meta.limits,
        accounts,
        keys,
        deleted,
    })
}

/// Checks a page as the edge will read it: its settings, APIs and limits with
/// `compile_catalog`, then each account and key on its own against them. A record the edge
/// would refuse is an internal error (logged with its SID), never served.
pub fn check_page(page: &ChangesPage) -> Result<(), Error> {
    let compiled = compile::compile_catalog(&page.settings_doc())
        .map_err(|e| internal("change feed catalogue does not compile", e))?;
    for a in &page.accounts {
        compile::compile_account_record(&compiled, a).map_err(|e| {
            internal(
                "change feed account does not compile",
                format!("{}: {e}", a.sid),
            )
        })?;
    }
    for k in &page.keys {
        compile::compile_key_record(&compiled, k).map_err(|e| {
            internal(
                "change feed key does not compile",
                format!("{}: {e}", k.sid),
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;
    use std::collections::BTreeSet;

    fn setup() -> (tempfile::TempDir, std::path::PathBuf, ApiCatalog, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let cat = ApiCatalog::built_in().unwrap();
        let mut conn = store::sqlite::open(&path).unwrap();
        let out = store::sqlite::write(&mut conn, |tx| init(tx, &cat, "us1", None)).unwrap();
        (dir, path, cat, out.account.sid)
    }

    /// A key of `role` created by the operator.
    fn new_key(
        conn: &mut Connection,
        cat: &ApiCatalog,
        ac: &str,
        role: Role,
    ) -> (Key, Secret, u64) {
        let new = NewKey::with_role(role);
        let op = Holdings::Operator;
        store::sqlite::write(conn, |tx| {
            create_key(tx, cat, &Caps::default(), &op, ac, new)
        })
        .unwrap()
    }

    /// Two connections (as two processes would have) regenerate the same key at once, many
    /// times: every stored digest belongs to a secret some caller got back.
    #[test]
    fn regenerations_on_separate_connections_serialize() {
        let (_dir, path, cat, ac) = setup();
        let mut conn = store::sqlite::open(&path).unwrap();
        let (key, first, _) = new_key(&mut conn, &cat, &ac, Role::Standard);
        let handed_out =
            std::sync::Mutex::new(BTreeSet::from([secret::digest(first.expose().as_bytes())]));
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    let mut c = store::sqlite::open(&path).unwrap();
                    for _ in 0..20 {
                        // Caps off: this test is about concurrent writers.
                        let caps = Caps {
                            secrets_in_grace: u64::MAX,
                            regenerations_per_hour: u64::MAX,
                            ..Caps::default()
                        };
                        match store::sqlite::write(&mut c, |tx| {
                            regenerate(tx, &caps, &Holdings::Operator, &ac, &key.sid, 3600)
                        }) {
                            Ok(r) => {
                                handed_out
                                    .lock()
                                    .unwrap()
                                    .insert(secret::digest(r.secret.expose().as_bytes()));
                            }
                            Err(Error::Conflict(_)) => {}
                            Err(e) => panic!("{e:?}"),
                        }
                    }
                });
            }
        });
        let stored: BTreeSet<String> = store::sqlite::secrets_of(&conn, &key.sid)
            .unwrap()
            .into_iter()
            .map(|s| s.digest)
            .collect();
        let handed_out = handed_out.into_inner().unwrap();
        assert!(stored.is_subset(&handed_out));
        assert_eq!(
            store::sqlite::secrets_of(&conn, &key.sid)
                .unwrap()
                .iter()
                .filter(|s| s.not_after.is_none())
                .count(),
            1
        );
        assert_eq!(
            store::sqlite::get_key_by_sid(&conn, &key.sid)
                .unwrap()
                .unwrap()
                .generation as usize,
            stored.len() - 1
        );
    }

    #[test]
    fn a_new_keys_secrets_are_what_was_stored() {
        let (_dir, path, cat, ac) = setup();
        let mut conn = store::sqlite::open(&path).unwrap();
        let (key, secret, _) = new_key(&mut conn, &cat, &ac, Role::Main);
        assert_eq!(
            secrets_of_new_key(&key, &secret),
            store::sqlite::secrets_of(&conn, &key.sid).unwrap()
        );
    }

    #[test]
    fn a_stale_generation_writes_nothing() {
        let (_dir, path, cat, ac) = setup();
        let mut conn = store::sqlite::open(&path).unwrap();
        let (key, _, _) = new_key(&mut conn, &cat, &ac, Role::Main);
        store::sqlite::write(&mut conn, |tx| {
            regenerate(tx, &Caps::default(), &Holdings::Operator, &ac, &key.sid, 0)
        })
        .unwrap();
        let tx = store::sqlite::write_tx(&mut conn).unwrap();
        assert!(
            !store::sqlite::update_key(&tx, &key).unwrap(),
            "generation 0 is stale after a regeneration"
        );
    }

    fn sids(page: &ChangesPage) -> (Vec<&str>, Vec<&str>, Vec<&str>) {
        (
            page.accounts.iter().map(|a| a.sid.as_str()).collect(),
            page.keys.iter().map(|k| k.sid.as_str()).collect(),
            page.deleted.iter().map(String::as_str).collect(),
        )
    }

    /// Each write path records exactly the account or key it changed, at its own version; a
    /// deleted key stays as a tombstone.
    #[test]
    fn every_write_records_what_it_changed_at_its_version() {
        let (_dir, path, cat, ac) = setup();
        let mut conn = store::sqlite::open(&path).unwrap();
        let v0 = store::sqlite::version(&conn).unwrap();
        let full = store::sqlite::write(&mut conn, |tx| changes(tx, &cat, 0, "", 100)).unwrap();
        assert_eq!(sids(&full), (vec![ac.as_str()], vec![], vec![]));
        assert_eq!((full.version, full.next.clone()), (v0, None));
        // What changed after `since`, and the version the page is at.
        let delta = |conn: &mut Connection, since: u64| {
            let p = store::sqlite::write(conn, |tx| changes(tx, &cat, since, "", 100)).unwrap();
            let (a, k, d) = sids(&p);
            let own = |v: Vec<&str>| v.into_iter().map(str::to_owned).collect::<Vec<_>>();
            (p.version, own(a), own(k), own(d))
        };
        let none: Vec<String> = vec![];
        let one = |s: &str| vec![s.to_owned()];

        let (key, _, v1) = new_key(&mut conn, &cat, &ac, Role::Main);
        assert_eq!(
            delta(&mut conn, v0),
            (v1, none.clone(), one(&key.sid), none.clone())
        );
        let (other, _, v2) = new_key(&mut conn, &cat, &ac, Role::Standard);
        assert_eq!(
            delta(&mut conn, v1),
            (v2, none.clone(), one(&other.sid), none.clone())
        );
        let (_, v3) = store::sqlite::write(&mut conn, |tx| {
            update_key(
                tx,
                &cat,
                &Caps::default(),
                &Holdings::Operator,
                &ac,
                &key.sid,
                |k| {
                    k.enabled = false;
                    Ok(())
                },
            )
        })
        .unwrap();
        assert_eq!(
            delta(&mut conn, v2),
            (v3, none.clone(), one(&key.sid), none.clone())
        );
        let v4 = store::sqlite::write(&mut conn, |tx| {
            regenerate(
                tx,
                &Caps::default(),
                &Holdings::Operator,
                &ac,
                &other.sid,
                60,
            )
        })
        .unwrap()
        .version;
        assert_eq!(
            delta(&mut conn, v3),
            (v4, none.clone(), one(&other.sid), none.clone())
        );
        let v5 = store::sqlite::write(&mut conn, |tx| revoke_previous(tx, &ac, &other.sid))
            .unwrap()
            .1
            .unwrap();
        assert_eq!(
            delta(&mut conn, v4),
            (v5, none.clone(), one(&other.sid), none.clone())
        );
        let (_, v6) = store::sqlite::write(&mut conn, |tx| {
            update_account(tx, &cat, &Caps::default(), &Holdings::Operator, &ac, |a| {
                a.allowed_ips = Some(vec!["10.0.0.0/8".to_owned()]);
                Ok(())
            })
        })
        .unwrap();
        assert_eq!(
            delta(&mut conn, v5),
            (v6, one(&ac), none.clone(), none.clone())
        );
        let v7 = store::sqlite::write(&mut conn, |tx| delete_key(tx, &ac, &key.sid)).unwrap();
        assert_eq!(
            delta(&mut conn, v6),
            (v7, none.clone(), none.clone(), one(&key.sid))
        );
        let (ac2, _, v8) = store::sqlite::write(&mut conn, |tx| {
            create_account(tx, &cat, &Caps::default(), "us1", NewAccount::default())
        })
        .unwrap();
        assert_eq!(
            delta(&mut conn, v7),
            (v8, one(&ac2.sid), none.clone(), none.clone())
        );
        assert_eq!([v1, v8], [v0 + 1, v0 + 8]);

        // Refused and no-op writes record nothing; operator tokens are not in the feed.
        assert!(store::sqlite::write(&mut conn, |tx| update_key(
            tx,
            &cat,
            &Caps::default(),
            &Holdings::Operator,
            &ac,
            &other.sid,
            |_| Err(Error::NotFound)
        ))
        .is_err());
        assert_eq!(
            store::sqlite::write(&mut conn, |tx| revoke_previous(tx, &ac, &other.sid)).unwrap(),
            (0, None)
        );
        store::sqlite::write(&mut conn, |tx| {
            create_operator_token(tx, OperatorKind::Edge)
        })
        .unwrap();
        let pending: i64 = conn
            .query_row("SELECT count(*) FROM pending_changes", [], |r| r.get(0))
            .unwrap();
        assert_eq!(pending, 0);
        assert_eq!(
            delta(&mut conn, v8),
            (v8, none.clone(), none.clone(), none.clone())
        );

        // Since the start, each SID once, in the state of now.
        let mut acs = vec![ac.clone(), ac2.sid.clone()];
        acs.sort_unstable();
        assert_eq!(
            delta(&mut conn, v0),
            (v8, acs, one(&other.sid), one(&key.sid))
        );
    }

    /// Whole pages (read, checked with the edge's compiler, serialized) at 200k keys, timed. Run
    /// with `cargo test --release -p keygate-control --lib -- --ignored --nocapture pages_at`.
    #[test]
    #[ignore]
    fn changes_pages_at_200k_keys() {
        use std::time::Instant;
        let (_dir, path, cat, ac) = setup();
        let mut conn = store::sqlite::open(&path).unwrap();
        let n: usize = std::env::var("KEYGATE_BENCH_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200_000);
        let started = Instant::now();
        let tx = store::sqlite::write_tx(&mut conn).unwrap();
        for i in 0..n {
            let mut key = Key {
                sid: new_sid("SK").unwrap(),
                account_sid: ac.clone(),
                friendly_name: None,
                role: Role::Standard,
                apis: None,
                allowed_ips: None,
                limits: None,
                expires_at: None,
                enabled: true,
                generation: 0,
                created_at: 0,
                updated_at: 0,
            };
            if i % 10 == 0 {
                key.allowed_ips = Some(vec!["10.0.0.0/8".to_owned()]);
            }
            store::sqlite::insert_key(&tx, &key).unwrap();
            store::sqlite::insert_secret(&tx, &key.sid, &secret::digest(key.sid.as_bytes()), 0)
                .unwrap();
        }
        let v = store::sqlite::bump(&tx).unwrap();
        tx.commit().unwrap();
        println!(
            "{n} keys written in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        for limit in [1000, 10_000] {
            let (mut read, mut check, mut ser, mut bytes, mut pages) =
                (0f64, 0f64, 0f64, 0usize, 0);
            let mut after = String::new();
            loop {
                let t = Instant::now();
                let page =
                    store::sqlite::write(&mut conn, |tx| read_changes(tx, &cat, 0, &after, limit))
                        .unwrap();
                read += t.elapsed().as_secs_f64();
                let t = Instant::now();
                check_page(&page).unwrap();
                check += t.elapsed().as_secs_f64();
                let t = Instant::now();
                bytes += serde_json::to_vec(&page).unwrap().len();
                ser += t.elapsed().as_secs_f64();
                pages += 1;
                assert_eq!(page.version, v);
                match page.next {
                    Some(n) => after = n,
                    None => break,
                }
            }
            let per = |s: f64| s * 1e3 / pages as f64;
            println!(
                "since=0 limit={limit}: {pages} pages, per page: read {:.1} ms, check {:.1} ms, serialize {:.1} ms, {} kB",
                per(read), per(check), per(ser), bytes / pages / 1000
            );
        }
    }

    /// A page whose records would not compile at the edge is an error, not served.
    #[test]
    fn a_page_the_edge_would_refuse_is_not_served() {
        let (_dir, path, cat, ac) = setup();
        let mut conn = store::sqlite::open(&path).unwrap();
        new_key(&mut conn, &cat, &ac, Role::Main);
        conn.execute(
            "UPDATE secrets SET digest = 'not hex' WHERE owner_sid LIKE 'SK%'",
            [],
        )
        .unwrap();
        assert!(store::sqlite::write(&mut conn, |tx| read_changes(tx, &cat, 0, "", 10)).is_ok());
        assert_eq!(
            store::sqlite::write(&mut conn, |tx| changes(tx, &cat, 0, "", 10)).unwrap_err(),
            Error::Internal
        );
    }

    #[test]
    fn every_change_bumps_the_version_once() {
        let (_dir, path, cat, ac) = setup();
        let mut conn = store::sqlite::open(&path).unwrap();
        let v0 = store::sqlite::version(&conn).unwrap();
        let (key, _, v1) = new_key(&mut conn, &cat, &ac, Role::Main);
        let (_, v2) = store::sqlite::write(&mut conn, |tx| {
            update_key(
                tx,
                &cat,
                &Caps::default(),
                &Holdings::Operator,
                &ac,
                &key.sid,
                |k| {
                    k.enabled = false;
                    Ok(())
                },
            )
        })
        .unwrap();
        let v3 = store::sqlite::write(&mut conn, |tx| {
            regenerate(tx, &Caps::default(), &Holdings::Operator, &ac, &key.sid, 60)
        })
        .unwrap()
        .version;
        let (_, v4) =
            store::sqlite::write(&mut conn, |tx| revoke_previous(tx, &ac, &key.sid)).unwrap();
        let v5 = store::sqlite::write(&mut conn, |tx| delete_key(tx, &ac, &key.sid)).unwrap();
        assert_eq!(
            [v1, v2, v3, v4.unwrap(), v5],
            [v0 + 1, v0 + 2, v0 + 3, v0 + 4, v0 + 5]
        );
        // A refused change bumps nothing.
        assert!(store::sqlite::write(&mut conn, |tx| update_key(
            tx,
            &cat,
            &Caps::default(),
            &Holdings::Operator,
            &ac,
            "SKnope",
            |_| Ok(())
        ))
        .is_err());
        assert_eq!(store::sqlite::version(&conn).unwrap(), v5);
    }
}
