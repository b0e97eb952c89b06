//! Config published record by record in the shared store (Envoy shared data), so every worker
//! judges against the same version while each VM holds only a bounded cache.
//!
//! Layout (all values start with a tag byte):
//! - `kg:cfg:head` → version in force and when the control plane was last heard from;
//! - `kg:cfg:<slot>:meta` → the version's settings, API catalogue and limits (a [`ConfigDoc`]
//!   without accounts and keys);
//! - `kg:cfg:<slot>:p:<sid>` → one account or key ([`AccountDoc`] / [`KeyDoc`] JSON);
//! - `kg:cfg:<slot>:t:<digest hex>` → the SID of the key a Bearer token digest belongs to.
//!
//! Every record carries the version it was written for, and version `V` is written into slot
//! `V % 2` before the head moves to `V`. A reader takes the head's version, then reads only
//! records of that version from that slot: records of other versions (older leftovers, keys
//! deleted since) read as absent. Publishing `V + 1` writes the other slot, so requests still
//! judged at `V` keep reading a complete `V`; no request sees a mix of two versions. Memory is
//! two slots of records, whatever the number of workers and however many versions go by (keys
//! are reused; a deleted SID leaves only its stale record behind).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use crate::compile::{
    compile_account_record, compile_catalog, compile_doc, compile_key_record, Account, Catalog,
    ConfigError, Directory, Key, Principal,
};
use crate::config::{AccountDoc, ConfigDoc, KeyDoc, Scheme};
use crate::digest::Digest32;
use crate::ratelimit::{SetError, SharedStore};

pub const HEAD_KEY: &str = "kg:cfg:head";
const HEAD_TAG: u8 = 4;
const RECORD_TAG: u8 = 5;

/// The published version and when the control plane was last heard from (200 or 304).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub version: u64,
    pub contacted_at_s: u64,
}

fn encode_head(h: Head) -> [u8; 17] {
    let mut v = [0u8; 17];
    v[0] = HEAD_TAG;
    v[1..9].copy_from_slice(&h.version.to_le_bytes());
    v[9..].copy_from_slice(&h.contacted_at_s.to_le_bytes());
    v
}

fn le_u64(b: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(b).ok().map(u64::from_le_bytes)
}

fn decode_head(b: &[u8]) -> Option<Head> {
    match b {
        [HEAD_TAG, rest @ ..] if rest.len() == 16 => Some(Head {
            version: le_u64(&rest[..8])?,
            contacted_at_s: le_u64(&rest[8..])?,
        }),
        _ => None,
    }
}

/// Reads the head; `None` before the first publication (or if unreadable).
pub fn read_head(store: &dyn SharedStore) -> Option<Head> {
    let (bytes, _) = store.get(HEAD_KEY).ok()??;
    decode_head(&bytes)
}

fn slot_key(version: u64, kind: &str, id: &str) -> String {
    format!("kg:cfg:{}:{kind}:{id}", version % 2)
}

fn record(version: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + payload.len());
    v.push(RECORD_TAG);
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// Reads a record of exactly `version`.
fn read_record(store: &dyn SharedStore, version: u64, kind: &str, id: &str) -> Option<Vec<u8>> {
    let (bytes, _) = store.get(&slot_key(version, kind, id)).ok()??;
    match bytes.as_slice() {
        [RECORD_TAG, rest @ ..] if rest.len() >= 8 && le_u64(&rest[..8]) == Some(version) => {
            Some(rest[8..].to_vec())
        }
        _ => None,
    }
}

/// Why a fetched document was not published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// It does not compile (malformed, partial, invalid): the message names the place.
    Invalid(ConfigError),
    /// Its version is not newer than the one in force (an older or replayed document).
    NotNewer { offered: u64, in_force: u64 },
    /// The store refused a write; nothing was switched.
    Store,
}

/// Validates a whole document and, if it is newer than the version in force, writes it into the
/// free slot and then moves the head. Returns the published version.
pub fn publish(store: &dyn SharedStore, json: &[u8], now_s: u64) -> Result<u64, Rejection> {
    let doc = crate::compile::parse(json).map_err(Rejection::Invalid)?;
    // Validate the whole document; the compiled form is not kept (records are compiled per VM).
    compile_doc(&doc).map_err(Rejection::Invalid)?;
    let in_force = read_head(store).map_or(0, |h| h.version);
    if doc.version <= in_force {
        return Err(Rejection::NotNewer {
            offered: doc.version,
            in_force,
        });
    }
    let v = doc.version;
    let put = |key: String, payload: &[u8]| {
        store
            .set(&key, &record(v, payload), 0)
            .map_err(|_| Rejection::Store)
    };
    let meta = ConfigDoc {
        accounts: Vec::new(),
        keys: Vec::new(),
        ..doc.clone()
    };
    put(slot_key(v, "meta", "-"), &to_json(&meta)?)?;
    for a in &doc.accounts {
        put(
            slot_key(v, "p", &a.sid),
            &[b"A".as_slice(), &to_json(a)?].concat(),
        )?;
    }
    let bearer = doc.settings.schemes.contains(&Scheme::Bearer);
    for k in &doc.keys {
        put(
            slot_key(v, "p", &k.sid),
            &[b"K".as_slice(), &to_json(k)?].concat(),
        )?;
        if bearer {
            for s in &k.secrets {
                put(slot_key(v, "t", &s.digest), k.sid.as_bytes())?;
            }
        }
    }
    set_head(
        store,
        Head {
            version: v,
            contacted_at_s: now_s,
        },
    )?;
    Ok(v)
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, Rejection> {
    serde_json::to_vec(v).map_err(|e| {
        Rejection::Invalid(ConfigError {
            path: String::new(),
            message: e.to_string(),
        })
    })
}

fn set_head(store: &dyn SharedStore, head: Head) -> Result<(), Rejection> {
    match store.set(HEAD_KEY, &encode_head(head), 0) {
        Ok(()) => Ok(()),
        Err(SetError::CasMismatch | SetError::Other) => Err(Rejection::Store),
    }
}

/// Records that the control plane answered (e.g. 304 Not Modified) without a new version.
pub fn touch(store: &dyn SharedStore, now_s: u64) {
    if let Some(h) = read_head(store) {
        let _ = set_head(
            store,
            Head {
                contacted_at_s: now_s,
                ..h
            },
        );
    }
}

/// Loads and compiles the catalogue of a published version.
pub fn load_catalog(store: &dyn SharedStore, version: u64) -> Option<Catalog> {
    let bytes = read_record(store, version, "meta", "-")?;
    let doc: ConfigDoc = serde_json::from_slice(&bytes).ok()?;
    (doc.version == version).then_some(())?;
    compile_catalog(&doc).ok()
}

/// Per-VM cache of compiled records of one version (cleared when the version changes or when
/// it reaches its capacity, so its size never depends on the number of keys).
#[derive(Default)]
pub struct RecordCache {
    version: u64,
    principals: HashMap<Box<[u8]>, Option<Principal>>,
    tokens: HashMap<Digest32, Option<Arc<Key>>>,
}

/// Entries kept per VM before the cache starts over.
pub const CACHE_CAPACITY: usize = 16_384;

impl RecordCache {
    fn for_version(&mut self, version: u64) {
        if self.version != version || self.principals.len() + self.tokens.len() > CACHE_CAPACITY {
            self.principals.clear();
            self.tokens.clear();
            self.version = version;
        }
    }

    pub fn len(&self) -> usize {
        self.principals.len() + self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A [`Directory`] over published records of one version.
pub struct SharedDirectory<'a> {
    pub store: &'a dyn SharedStore,
    pub version: u64,
    pub catalog: &'a Catalog,
    pub cache: &'a RefCell<RecordCache>,
}

/// SIDs name shared-data keys: only the SID alphabet is looked up at all.
fn plausible_sid(sid: &[u8]) -> Option<&str> {
    let ok = !sid.is_empty()
        && sid.len() <= 64
        && sid
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-');
    if ok {
        std::str::from_utf8(sid).ok()
    } else {
        None
    }
}

impl SharedDirectory<'_> {
    fn load_principal(&self, sid: &str) -> Option<Principal> {
        let bytes = read_record(self.store, self.version, "p", sid)?;
        match bytes.split_first()? {
            (b'K', json) => {
                let doc: KeyDoc = serde_json::from_slice(json).ok()?;
                (doc.sid == sid).then_some(())?;
                compile_key_record(self.catalog, &doc)
                    .ok()
                    .map(|k| Principal::Key(Arc::new(k)))
            }
            (b'A', json) => {
                let doc: AccountDoc = serde_json::from_slice(json).ok()?;
                (doc.sid == sid).then_some(())?;
                compile_account_record(self.catalog, &doc)
                    .ok()
                    .map(|a| Principal::Account(Arc::new(a)))
            }
            _ => None,
        }
    }
}

impl Directory for SharedDirectory<'_> {
    fn by_sid(&self, sid: &[u8]) -> Option<Principal> {
        let name = plausible_sid(sid)?;
        let mut cache = self.cache.borrow_mut();
        cache.for_version(self.version);
        if let Some(hit) = cache.principals.get(sid) {
            return hit.clone();
        }
        let loaded = self.load_principal(name);
        cache.principals.insert(sid.into(), loaded.clone());
        loaded
    }

    fn by_token(&self, digest: &Digest32) -> Option<Arc<Key>> {
        {
            let mut cache = self.cache.borrow_mut();
            cache.for_version(self.version);
            if let Some(hit) = cache.tokens.get(digest) {
                return hit.clone();
            }
        }
        let hexd = hex::encode(digest);
        let key = read_record(self.store, self.version, "t", &hexd)
            .and_then(|sid| match self.by_sid(&sid) {
                Some(Principal::Key(k)) => Some(k),
                _ => None,
            })
            .filter(|k| k.secrets.iter().any(|s| s.digest == *digest));
        self.cache.borrow_mut().tokens.insert(*digest, key.clone());
        key
    }

    fn account(&self, sid: &str) -> Option<Arc<Account>> {
        match self.by_sid(sid.as_bytes()) {
            Some(Principal::Account(a)) => Some(a),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::{AuthorizationHeader, RequestHead};
    use crate::ratelimit::testing::FakeStore;
    use crate::{decide_in, Decision, Reason};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn digest(s: &str) -> String {
        crate::digest::Digester::Sha256.digest_hex(s.as_bytes())
    }

    fn doc(version: u64, keys: &[(&str, &str)]) -> Vec<u8> {
        let keys: Vec<serde_json::Value> = keys
            .iter()
            .map(|(sid, secret)| serde_json::json!({"sid": sid, "account_sid": "AC1", "role": "main", "secrets": [{"digest": digest(secret)}]}))
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "schema": "keygate.config/v1", "version": version,
            "apis": [{"name": "calls", "methods": ["GET"], "paths": ["/v2/accounts/{account_sid}/calls"]}],
            "accounts": [{"sid": "AC1", "status": "active"}],
            "keys": keys,
        }))
        .unwrap()
    }

    fn judge(store: &FakeStore, cache: &RefCell<RecordCache>, auth: &[u8]) -> Result<(), Reason> {
        let head = read_head(store).ok_or(Reason::NoConfig)?;
        let catalog = load_catalog(store, head.version).ok_or(Reason::NoConfig)?;
        let dir = SharedDirectory {
            store,
            version: head.version,
            catalog: &catalog,
            cache,
        };
        let req = RequestHead {
            method: b"GET",
            path: b"/v2/accounts/AC1/calls",
            authorization: AuthorizationHeader::One(auth),
            cors_preflight_headers: false,
        };
        match decide_in(&catalog, &dir, &req, 1_800_000_000, &mut || None) {
            Decision::Allow(_) => Ok(()),
            Decision::Deny(r) => Err(r),
        }
    }

    fn basic(user: &str, secret: &str) -> Vec<u8> {
        use base64::Engine as _;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"))
        )
        .into_bytes()
    }

    #[test]
    fn published_keys_authenticate_and_deleted_ones_stop() {
        let store = FakeStore::new();
        let cache = RefCell::new(RecordCache::default());
        assert_eq!(
            judge(&store, &cache, &basic("SK1", "one")),
            Err(Reason::NoConfig)
        );
        assert_eq!(
            publish(&store, &doc(1, &[("SK1", "one"), ("SK2", "two")]), 100),
            Ok(1)
        );
        assert_eq!(judge(&store, &cache, &basic("SK1", "one")), Ok(()));
        assert_eq!(judge(&store, &cache, b"Bearer two"), Ok(()));
        assert_eq!(
            judge(&store, &cache, &basic("SK1", "two")),
            Err(Reason::InvalidCredentials)
        );
        // Version 2 deletes SK2 and adds SK3; version 3 leaves slot 1 holding version 1's SK2.
        assert_eq!(
            publish(&store, &doc(2, &[("SK1", "one"), ("SK3", "three")]), 101),
            Ok(2)
        );
        assert_eq!(
            judge(&store, &cache, &basic("SK2", "two")),
            Err(Reason::InvalidCredentials)
        );
        assert_eq!(
            judge(&store, &cache, b"Bearer two"),
            Err(Reason::InvalidCredentials)
        );
        assert_eq!(judge(&store, &cache, &basic("SK3", "three")), Ok(()));
        assert_eq!(publish(&store, &doc(3, &[("SK1", "one")]), 102), Ok(3));
        assert_eq!(
            judge(&store, &cache, &basic("SK2", "two")),
            Err(Reason::InvalidCredentials),
            "stale slot record ignored"
        );
        assert_eq!(
            judge(&store, &cache, &basic("SK3", "three")),
            Err(Reason::InvalidCredentials)
        );
    }

    #[test]
    fn invalid_older_and_replayed_documents_change_nothing() {
        let store = FakeStore::new();
        let cache = RefCell::new(RecordCache::default());
        assert_eq!(publish(&store, &doc(5, &[("SK1", "one")]), 100), Ok(5));
        let before = store.map.borrow().len();
        assert!(matches!(
            publish(&store, b"{\"schema\":", 101),
            Err(Rejection::Invalid(_))
        ));
        assert!(matches!(
            publish(&store, &doc(5, &[("SK9", "nine")]), 101),
            Err(Rejection::NotNewer {
                offered: 5,
                in_force: 5
            })
        ));
        assert!(matches!(
            publish(&store, &doc(4, &[("SK9", "nine")]), 101),
            Err(Rejection::NotNewer {
                offered: 4,
                in_force: 5
            })
        ));
        let mut bad =
            serde_json::from_slice::<serde_json::Value>(&doc(6, &[("SK9", "nine")])).unwrap();
        bad["keys"][0]["allowed_ips"] = serde_json::json!(["10.0.0.1/8"]);
        assert!(
            matches!(publish(&store, &serde_json::to_vec(&bad).unwrap(), 101), Err(Rejection::Invalid(e)) if e.path == "keys[0].allowed_ips[0]")
        );
        assert_eq!(store.map.borrow().len(), before, "nothing written");
        assert_eq!(read_head(&store).map(|h| h.version), Some(5));
        assert_eq!(judge(&store, &cache, &basic("SK1", "one")), Ok(()));
        assert_eq!(
            judge(&store, &cache, &basic("SK9", "nine")),
            Err(Reason::InvalidCredentials)
        );
    }

    #[test]
    fn a_reader_at_the_old_version_keeps_a_complete_old_version_while_the_next_is_written() {
        let store = FakeStore::new();
        let cache_old = RefCell::new(RecordCache::default());
        publish(&store, &doc(1, &[("SK1", "one")]), 100).unwrap();
        let catalog_v1 = load_catalog(&store, 1).unwrap();
        publish(&store, &doc(2, &[("SK2", "two")]), 101).unwrap();
        // A request that read head = 1 before the switch still sees version 1, whole.
        let dir = SharedDirectory {
            store: &store,
            version: 1,
            catalog: &catalog_v1,
            cache: &cache_old,
        };
        assert!(matches!(dir.by_sid(b"SK1"), Some(Principal::Key(_))));
        assert!(dir.by_sid(b"SK2").is_none());
    }

    #[test]
    fn memory_is_two_slots_whatever_the_number_of_versions() {
        let store = FakeStore::new();
        for v in 1..=20 {
            publish(&store, &doc(v, &[("SK1", "one"), ("SK2", "two")]), v).unwrap();
        }
        // anchor + head + 2 × (meta + account + 2 keys + 2 tokens)
        assert_eq!(store.map.borrow().len(), 2 + 2 * 6);
    }

    #[test]
    fn implausible_sids_never_reach_the_store_and_the_cache_is_bounded() {
        let store = FakeStore::new();
        let cache = RefCell::new(RecordCache::default());
        publish(&store, &doc(1, &[("SK1", "one")]), 100).unwrap();
        let catalog = load_catalog(&store, 1).unwrap();
        let dir = SharedDirectory {
            store: &store,
            version: 1,
            catalog: &catalog,
            cache: &cache,
        };
        assert!(dir.by_sid(b"kg:cfg:head").is_none());
        assert!(dir.by_sid(b"../x").is_none());
        assert!(cache.borrow().is_empty());
        for i in 0..(CACHE_CAPACITY + 10) {
            let _ = dir.by_sid(format!("SKx{i}").as_bytes());
        }
        assert!(cache.borrow().len() <= CACHE_CAPACITY + 1);
    }

    #[test]
    fn contact_time_moves_without_a_new_version() {
        let store = FakeStore::new();
        publish(&store, &doc(1, &[("SK1", "one")]), 100).unwrap();
        touch(&store, 160);
        assert_eq!(
            read_head(&store),
            Some(Head {
                version: 1,
                contacted_at_s: 160
            })
        );
    }
}
