//! Who is calling, and may they: every request to the control plane is judged by keygate-core's
//! own gate ([`keygate_core::gate::evaluate`]), the one the edge runs, so the two doors cannot
//! disagree.
//!
//! - The same `Authorization` parser, digest comparison (constant time, every secret of the
//!   SID), expiry, suspension, the account binding of the path (`{account_sid}`), the key's and
//!   the account's IP allowlists, role and API permissions, failed-authentication limiter, and
//!   request rates, with the edge's reason codes and statuses.
//! - The catalogue it decides with is the control plane's own ([`ApiCatalog::control_doc`]): the
//!   management routes (Twilio's `Keys.json`, keygate's `/v1/accounts/{sid}/...`) are the
//!   `keys` management API, so a `main` key limited to `apis: ["calls"]` is refused here exactly
//!   as at the edge (403 `permission_denied`), and a key limited to some addresses is refused
//!   from any other (403 `ip_not_allowed`).
//! - Principals are looked up in the store ([`StoreDirectory`], read connections) and compiled
//!   with the edge's compiler, record by record.
//! - Operator tokens (the admin's, the edges') are not keys: a Bearer credential whose digest is
//!   an operator token's is the operator, checked before the gate.
//! - The client address is the TCP peer, or, only when the peer is one of `--trusted-proxies`,
//!   the right-most untrusted `X-Forwarded-For` entry ([`keygate_core::ip::forwarded_client`]).
//! - The limiter's counters live in this process ([`MemStore`], the core's GCRA over the same
//!   compare-and-swap interface Envoy's shared data offers).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use keygate_core::compile::{compile_account_record, compile_key_record, Principal};
use keygate_core::credential::{parse_authorization, Credential, EnabledSchemes};
use keygate_core::gate::{self, FailedAuthKey, GateStats, Verdict};
use keygate_core::headers::{AuthorizationHeader, RequestHead};
use keygate_core::ip::IpAllowlist;
use keygate_core::store::{SetError, SharedStore, StoreError};
use keygate_core::{Directory, Reason};

use crate::catalog::{ApiCatalog, ControlLimits, MANAGEMENT_API};
use crate::error::Error;
use crate::model::Key;
use crate::policy::Holdings;
use crate::secret::{self, OperatorKind};
use crate::store::Tx;

/// Who made a request that the gate let through.
#[derive(Debug, Clone, PartialEq)]
pub enum Caller {
    /// The operator's admin token: everything.
    Admin,
    /// An edge token: the edge feeds only.
    Edge,
    /// An account's credentials or one of its keys.
    Tenant(Box<Tenant>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub account_sid: String,
    /// The key that authenticated, as stored; `None` for the account's own credentials.
    pub key: Option<Key>,
    /// The catalogue API the request matched; `None` for a route outside the tenant's APIs
    /// (an operator route, or no route at all).
    pub api: Option<String>,
}

impl Caller {
    /// What the caller holds, for the no-escalation rule.
    pub fn holdings(&self) -> Holdings {
        match self {
            Caller::Admin | Caller::Edge => Holdings::Operator,
            Caller::Tenant(t) => match &t.key {
                None => Holdings::Account,
                Some(k) => Holdings::Key(Box::new(k.clone())),
            },
        }
    }

    /// May manage keys and settings of `account_sid`: the admin, or a tenant the gate admitted
    /// to the management API of that account (the gate already refused anyone else with the
    /// edge's reason: another account's SID is 404 `account_mismatch`, a standard key 403
    /// `permission_denied`).
    pub fn managing(&self, account_sid: &str) -> Result<Holdings, Error> {
        match self {
            Caller::Admin => Ok(Holdings::Operator),
            Caller::Edge => Err(Error::Forbidden(
                "edge tokens may only read the edge config",
            )),
            Caller::Tenant(t)
                if t.account_sid == account_sid && t.api.as_deref() == Some(MANAGEMENT_API) =>
            {
                Ok(self.holdings())
            }
            Caller::Tenant(_) => Err(Error::NotFound),
        }
    }

    pub fn require_admin(&self) -> Result<(), Error> {
        match self {
            Caller::Admin => Ok(()),
            _ => Err(Error::Forbidden(
                "only the operator (admin token) may do this",
            )),
        }
    }

    pub fn may_read_feed(&self) -> Result<(), Error> {
        match self {
            Caller::Admin | Caller::Edge => Ok(()),
            _ => Err(Error::Forbidden(
                "only edge tokens (or the admin token) may read the edge config",
            )),
        }
    }
}

/// The control plane's door: its compiled catalogue, the limiter's counters, the trusted proxies.
pub struct Door {
    catalog: keygate_core::Catalog,
    counters: MemStore,
    /// This process's key of the failed-auth limiter's hash (random at start).
    failed_auth_key: FailedAuthKey,
    trusted_proxies: Option<IpAllowlist>,
}

impl std::fmt::Debug for Door {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Door")
            .field("trusted_proxies", &self.trusted_proxies)
            .finish_non_exhaustive()
    }
}

impl Door {
    /// Compiles the control plane's catalogue (refused with the compiler's message, naming the
    /// place, if the limits do not compile).
    pub fn new(
        cat: &ApiCatalog,
        limits: &ControlLimits,
        trusted_proxies: Option<IpAllowlist>,
    ) -> Result<Door, String> {
        let doc = cat.control_doc(limits);
        let catalog = keygate_core::compile::compile_catalog(&doc).map_err(|e| {
            let flag = if e.path.starts_with("limits.failed_auth") {
                "--failed-auth-limit"
            } else {
                "--credential-rate"
            };
            let field = e.path.rsplit('.').next().unwrap_or("");
            format!(
                "{flag}: {}{}",
                if field == "per" { "PERIOD: " } else { "" },
                e.message
            )
        })?;
        let mut key = [0u8; 16];
        getrandom::fill(&mut key).map_err(|e| format!("no randomness for the limiter: {e}"))?;
        Ok(Door {
            catalog,
            counters: MemStore::new(),
            failed_auth_key: FailedAuthKey::from_bytes(key),
            trusted_proxies,
        })
    }

    /// The request's client address: the TCP peer, or from `X-Forwarded-For` when the peer is
    /// a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, forwarded_for: &[&[u8]]) -> Option<IpAddr> {
        keygate_core::ip::forwarded_client(peer, forwarded_for, self.trusted_proxies.as_ref())
    }

    /// The failed-auth limiter's answer for a request, from memory, before a database
    /// connection is taken: a flood from an address over its limit is refused without touching
    /// the pool the change feed reads from. Requests without credentials and operator-looking
    /// tokens (`Bearer kg_...`, looked up before the gate so an edge behind a guesser's address
    /// keeps its feed) are left to [`Door::judge`], which runs the same limiter in the gate.
    pub fn refused_early(
        &self,
        authorization: &[Vec<u8>],
        client_ip: Option<IpAddr>,
        now_us: u64,
    ) -> Option<Error> {
        let ip = client_ip?;
        if authorization.is_empty() || operator_looking(authorization) {
            return None;
        }
        let d = gate::failed_auth_precheck(
            &self.catalog,
            &self.failed_auth_key,
            &self.counters,
            ip,
            now_us,
            &mut GateStats::default(),
        )?;
        Some(Error::Limited {
            reason: d.reason,
            retry_after_s: d.retry_after_s.unwrap_or(1),
        })
    }

    /// Judges one request: the operator's tokens, else keygate-core's gate over the store.
    pub fn judge(
        &self,
        tx: &mut dyn Tx,
        method: &[u8],
        path: &[u8],
        authorization: &[Vec<u8>],
        client_ip: Option<IpAddr>,
        now_us: u64,
    ) -> Result<Caller, Error> {
        let authorization = match authorization {
            [] => AuthorizationHeader::Absent,
            [one] => AuthorizationHeader::One(one),
            _ => AuthorizationHeader::Many,
        };
        if let AuthorizationHeader::One(value) = authorization {
            if let Some(token) = operator_token(value) {
                match tx.find_operator_token(&secret::digest(token))? {
                    Some(OperatorKind::Admin) => return Ok(Caller::Admin),
                    Some(OperatorKind::Edge) => return Ok(Caller::Edge),
                    None => {}
                }
            }
        }
        // Operator tokens are checked before the gate and so never meet its failed-auth
        // limiter: they are 256 random bits (nothing to guess), and an edge or the operator
        // behind the same address as a guesser (a NAT, a shared proxy) must never be locked out
        // of the feed by it. A wrong `kg_` token goes on to the gate and counts as a failure.
        let head = RequestHead {
            method,
            path,
            authorization,
            cors_preflight_headers: false,
        };
        let dir = StoreDirectory::new(tx, &self.catalog);
        let host = DoorHost {
            now_us,
            client_ip,
            store: &self.counters,
            failed_auth_key: &self.failed_auth_key,
        };
        let judged = gate::Parts {
            catalog: &self.catalog,
            directory: &dir,
        };
        let verdict = gate::evaluate(&judged, &head, &host, &mut GateStats::default());
        if let Some(e) = dir.failure.take() {
            return Err(e);
        }
        match verdict {
            Verdict::Allow { allow, .. } => {
                let id = allow.identity().ok_or(Error::Internal)?;
                Ok(Caller::Tenant(Box::new(Tenant {
                    account_sid: id.account_sid.to_owned(),
                    key: id.key_sid.and_then(|_| dir.key.take()),
                    api: id.api.map(str::to_owned),
                })))
            }
            // Authenticated, allowed in from this address, but no API of the tenant's matches:
            // an operator route (the handler answers 403) or no route at all (404).
            Verdict::Deny(d) if d.reason == Reason::UnknownRoute => {
                let account_sid = dir.account_sid.take().ok_or(Error::Internal)?;
                Ok(Caller::Tenant(Box::new(Tenant {
                    account_sid,
                    key: dir.key.take(),
                    api: None,
                })))
            }
            Verdict::Deny(d) => Err(match d.retry_after_s {
                Some(retry_after_s) => Error::Limited {
                    reason: d.reason,
                    retry_after_s,
                },
                None => Error::Denied(d.reason),
            }),
        }
    }
}

/// The token of a `Bearer kg_...` credential (the operator's and edges' token format), parsed
/// by the edge's parser.
fn operator_token(value: &[u8]) -> Option<&[u8]> {
    match parse_authorization(value, EnabledSchemes::ALL) {
        Ok(Credential::Bearer { token }) if token.starts_with(b"kg_") => Some(token),
        _ => None,
    }
}

fn operator_looking(authorization: &[Vec<u8>]) -> bool {
    matches!(authorization, [one] if operator_token(one).is_some())
}

/// Principals looked up in the store and compiled with the edge's compiler, one record at a
/// time. Remembers the stored key it resolved (for the escalation rule), and the first store
/// error (the request then fails with 500, never with a denial).
struct StoreDirectory<'a> {
    tx: RefCell<&'a mut dyn Tx>,
    cat: &'a keygate_core::Catalog,
    failure: RefCell<Option<Error>>,
    key: RefCell<Option<Key>>,
    account_sid: RefCell<Option<String>>,
}

impl<'a> StoreDirectory<'a> {
    fn new(tx: &'a mut dyn Tx, cat: &'a keygate_core::Catalog) -> StoreDirectory<'a> {
        StoreDirectory {
            tx: RefCell::new(tx),
            cat,
            failure: RefCell::new(None),
            key: RefCell::new(None),
            account_sid: RefCell::new(None),
        }
    }

    fn ok<T>(&self, r: Result<T, Error>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.failure.borrow_mut().get_or_insert(e);
                None
            }
        }
    }

    fn compiled_key(&self, sid: &str) -> Option<Arc<keygate_core::compile::Key>> {
        let key = self.ok(self.tx.borrow_mut().get_key_by_sid(sid))??;
        let secrets = self.ok(self.tx.borrow_mut().secrets_of(sid))?;
        // The control plane's own rates apply here, not the key's edge limits.
        let mut doc = key.to_doc(secrets.iter().map(|s| s.to_doc()).collect());
        doc.limits = None;
        let compiled = match compile_key_record(self.cat, &doc) {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(key_sid = sid, error = %e, "a stored key does not compile");
                return None;
            }
        };
        *self.account_sid.borrow_mut() = Some(key.account_sid.clone());
        *self.key.borrow_mut() = Some(key);
        Some(Arc::new(compiled))
    }
}

impl Directory for StoreDirectory<'_> {
    fn by_sid(&self, sid: &[u8]) -> Option<Principal> {
        let sid = std::str::from_utf8(sid).ok()?;
        if sid.starts_with("AC") {
            let account = self.account(sid)?;
            *self.account_sid.borrow_mut() = Some(sid.to_owned());
            Some(Principal::Account(account))
        } else {
            self.compiled_key(sid).map(Principal::Key)
        }
    }

    fn by_token(&self, digest: &[u8; 32]) -> Option<Arc<keygate_core::compile::Key>> {
        let found = self.ok(self.tx.borrow_mut().find_secret(&hex::encode(digest)))??;
        if found.owner_sid.starts_with("AC") {
            return None;
        }
        self.compiled_key(&found.owner_sid)
    }

    fn account(&self, sid: &str) -> Option<Arc<keygate_core::compile::Account>> {
        let account = self.ok(self.tx.borrow_mut().get_account(sid))??;
        let tokens = self.ok(self.tx.borrow_mut().secrets_of(sid))?;
        let mut doc = account.to_doc(tokens.iter().map(|s| s.to_doc()).collect());
        doc.limits = None;
        match compile_account_record(self.cat, &doc) {
            Ok(a) => Some(Arc::new(a)),
            Err(e) => {
                tracing::error!(account_sid = sid, error = %e, "a stored account does not compile");
                None
            }
        }
    }
}

struct DoorHost<'a> {
    now_us: u64,
    client_ip: Option<IpAddr>,
    store: &'a MemStore,
    failed_auth_key: &'a FailedAuthKey,
}

impl gate::Host for DoorHost<'_> {
    fn now_us(&self) -> u64 {
        self.now_us
    }
    fn client_ip(&self) -> Option<IpAddr> {
        self.client_ip
    }
    fn store(&self) -> &dyn SharedStore {
        self.store
    }
    fn vm_id(&self) -> u64 {
        0
    }
    fn failed_auth_key(&self) -> Option<FailedAuthKey> {
        Some(self.failed_auth_key.clone())
    }
}

/// Counters of the control plane's limits, in this process: a map with compare-and-swap, the
/// interface of Envoy's shared data that keygate-core's limiter runs on. Entries not written for
/// a day (longer than any rate's period, so their state has fully drained) are dropped every
/// 4,096 writes, so the map stays bounded by the addresses and credentials of the last day
/// (failed-auth subjects are hashed into a fixed number of buckets).
pub struct MemStore {
    map: Mutex<HashMap<String, Entry>>,
    next_cas: AtomicU32,
    writes: AtomicU32,
}

struct Entry {
    value: Vec<u8>,
    cas: u32,
    written: std::time::Instant,
}

const ANCHOR: &str = "anchor";
const IDLE: std::time::Duration = std::time::Duration::from_secs(86_400 + 60);

impl MemStore {
    pub fn new() -> MemStore {
        let s = MemStore {
            map: Mutex::new(HashMap::new()),
            next_cas: AtomicU32::new(1),
            writes: AtomicU32::new(0),
        };
        let _ = s.set(ANCHOR, b"", 0);
        s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries in the map (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore::new()
    }
}

impl SharedStore for MemStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        Ok(self.lock().get(key).map(|e| (e.value.clone(), e.cas)))
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        let mut map = self.lock();
        if let Some(e) = map.get(key) {
            if cas != 0 && cas != e.cas {
                return Err(SetError::CasMismatch);
            }
        }
        let cas = self.next_cas.fetch_add(1, Ordering::Relaxed).max(1);
        let now = std::time::Instant::now();
        map.insert(
            key.to_owned(),
            Entry {
                value: value.to_vec(),
                cas,
                written: now,
            },
        );
        if self.writes.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            map.retain(|k, e| k == ANCHOR || now.duration_since(e.written) < IDLE);
        }
        Ok(())
    }

    fn absent_cas(&self) -> u32 {
        self.lock().get(ANCHOR).map_or(0, |e| e.cas)
    }
}
