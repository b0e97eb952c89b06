//! The reader: the head in force, its catalogue, and the principals of its version looked up
//! entry by entry through a bounded per-VM cache.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use super::layout::*;
use crate::compile::{
    compile_account_record, compile_catalog, compile_key_record, Account, Catalog, Directory, Key,
    Principal,
};
use crate::config::{AccountDoc, ConfigDoc, KeyDoc};
use crate::digest::Digest32;
use crate::store::{put_bucket_key, SharedStore, HEAD_KEY};

/// Reads the head; `None` before the first publication (or if unreadable).
pub fn read_head(store: &dyn SharedStore) -> Option<Head> {
    let (bytes, _) = store.get(HEAD_KEY).ok()??;
    decode_head(&bytes)
}

/// The payload of entry `(kind, id)` as the version `head` names sees it.
pub(super) fn read_entry(
    store: &dyn SharedStore,
    head: &Head,
    kind: u8,
    id: &[u8],
) -> Option<Vec<u8>> {
    let mut key = String::with_capacity(24);
    put_bucket_key(&mut key, head.slot, bucket_of(kind, id, head.bits));
    let (bytes, _) = store.get(&key).ok()??;
    let found = entries(&bytes).find(|e| e.kind == kind && e.id == id)?;
    (head.floor..=head.epoch)
        .contains(&found.epoch)
        .then(|| found.payload.to_vec())
}

/// Loads and compiles the catalogue of the version a head names.
pub fn load_catalog(store: &dyn SharedStore, head: &Head) -> Option<Catalog> {
    let bytes = read_settings(store, head.slot, head.floor, head.epoch)?;
    let doc: ConfigDoc = serde_json::from_slice(&bytes).ok()?;
    (doc.version == head.version).then_some(())?;
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

/// A [`Directory`] over the published records of the version a head names.
pub struct SharedDirectory<'a> {
    pub store: &'a dyn SharedStore,
    pub head: Head,
    pub catalog: &'a Catalog,
    pub cache: &'a RefCell<RecordCache>,
}

impl SharedDirectory<'_> {
    fn load_principal(&self, sid: &str) -> Option<Principal> {
        let bytes = read_entry(self.store, &self.head, PRINCIPAL, sid.as_bytes())?;
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
        cache.for_version(self.head.version);
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
            cache.for_version(self.head.version);
            if let Some(hit) = cache.tokens.get(digest) {
                return hit.clone();
            }
        }
        let key = read_entry(self.store, &self.head, TOKEN, digest)
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
