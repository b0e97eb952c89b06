//! Config published record by record in the shared store (Envoy shared data), so every worker
//! judges against the same version while each VM holds only a bounded cache, fed page by page
//! from the control plane's change feed.
//!
//! Layout (all values start with a tag byte):
//! - `kg:cfg:head` → the version in force, the slot and epoch holding it, and when the control
//!   plane was last heard from;
//! - `kg:cfg:<slot>:state` → the slot's epoch and the version it is complete at;
//! - `kg:cfg:<slot>:meta` → the version's settings, API catalogue and limits (a [`ConfigDoc`]
//!   without accounts and keys);
//! - `kg:cfg:<slot>:p:<sid>` → one account or key ([`AccountDoc`] / [`KeyDoc`] JSON) or a
//!   tombstone (the SID was deleted);
//! - `kg:cfg:<slot>:t:<digest hex>` → the SID of the key a Bearer token digest belongs to;
//! - `kg:cfg:epoch` → the last epoch handed out.
//!
//! There are two slots; requests read only the one the head names, and only records written in
//! the head's epoch (anything else reads as absent). A new version is written into the other
//! slot, which is never read while it is written, and then the head moves: no request sees a mix
//! of two versions. The free slot is complete at an older version `X` (the one it held when it was
//! last in force), so bringing it to the new version `V` only needs what changed after `X`
//! ([`Sync`]): a change of one key at a million keys writes one record, not a million. A slot
//! with no usable state (first start, or the API catalogue changed) gets a new epoch, which
//! empties it at once, and is filled from scratch (`since = 0`). Memory is two slots, whatever
//! the number of workers and however many versions go by.
//!
//! Consistency across pages: each page is one read of the control plane at its own version. If
//! all pages of a walk report the same version, their union is that version. Otherwise the walk
//! is repeated for what changed after its first page's version (normally one small page), until
//! a walk sees one version. Until then, nothing is in force that was not complete.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use crate::compile::{
    compile_account_record, compile_account_record_at, compile_catalog, compile_doc,
    compile_key_record, compile_key_record_at, Account, Catalog, ConfigError, Directory, Key,
    Principal,
};
use crate::config::{AccountDoc, ChangesPage, ConfigDoc, KeyDoc, Scheme, CHANGES_SCHEMA_V1};
use crate::digest::Digest32;
use crate::ratelimit::{SetError, SharedStore};

pub const HEAD_KEY: &str = "kg:cfg:head";
const EPOCH_KEY: &str = "kg:cfg:epoch";
const HEAD_TAG: u8 = 6;
const RECORD_TAG: u8 = 7;
const STATE_TAG: u8 = 8;
const EPOCH_TAG: u8 = 9;
/// Walks of the change feed one update may take before it gives up (each walk after the first
/// fetches only what changed during the previous one).
pub const MAX_WALKS: u32 = 16;

/// The published version, where it lives, and when the control plane was last heard from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub version: u64,
    pub contacted_at_s: u64,
    pub epoch: u64,
    pub slot: u8,
}

impl Head {
    fn same_config(&self, other: &Head) -> bool {
        (self.version, self.epoch, self.slot) == (other.version, other.epoch, other.slot)
    }
}

fn le_u64(b: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(b).ok().map(u64::from_le_bytes)
}

fn encode_head(h: Head) -> [u8; 26] {
    let mut v = [0u8; 26];
    v[0] = HEAD_TAG;
    v[1..9].copy_from_slice(&h.version.to_le_bytes());
    v[9..17].copy_from_slice(&h.contacted_at_s.to_le_bytes());
    v[17..25].copy_from_slice(&h.epoch.to_le_bytes());
    v[25] = h.slot;
    v
}

fn decode_head(b: &[u8]) -> Option<Head> {
    match b {
        [HEAD_TAG, rest @ ..] if rest.len() == 25 && rest[24] < 2 => Some(Head {
            version: le_u64(&rest[..8])?,
            contacted_at_s: le_u64(&rest[8..16])?,
            epoch: le_u64(&rest[16..24])?,
            slot: rest[24],
        }),
        _ => None,
    }
}

/// Reads the head; `None` before the first publication (or if unreadable).
pub fn read_head(store: &dyn SharedStore) -> Option<Head> {
    let (bytes, _) = store.get(HEAD_KEY).ok()??;
    decode_head(&bytes)
}

/// A slot's epoch and the version it is complete at (or, while it is being written, the version
/// it was complete at: applying every change after `base` brings it to the newest version).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SlotState {
    epoch: u64,
    base: u64,
}

fn state_key(slot: u8) -> String {
    format!("kg:cfg:{slot}:state")
}

fn read_state(store: &dyn SharedStore, slot: u8) -> Option<SlotState> {
    let (bytes, _) = store.get(&state_key(slot)).ok()??;
    match bytes.as_slice() {
        [STATE_TAG, rest @ ..] if rest.len() == 16 => Some(SlotState {
            epoch: le_u64(&rest[..8])?,
            base: le_u64(&rest[8..])?,
        }),
        _ => None,
    }
}

fn write_state(store: &dyn SharedStore, slot: u8, st: SlotState) -> Result<(), Rejection> {
    let mut v = [0u8; 17];
    v[0] = STATE_TAG;
    v[1..9].copy_from_slice(&st.epoch.to_le_bytes());
    v[9..].copy_from_slice(&st.base.to_le_bytes());
    store
        .set(&state_key(slot), &v, 0)
        .map_err(|_| Rejection::Store)
}

/// Hands out a new epoch (compare-and-swap on a counter, so two VMs never share one).
fn next_epoch(store: &dyn SharedStore) -> Result<u64, Rejection> {
    for _ in 0..8 {
        let (last, cas) = match store.get(EPOCH_KEY) {
            Ok(Some((b, cas))) => match b.as_slice() {
                [EPOCH_TAG, rest @ ..] => (le_u64(rest).ok_or(Rejection::Store)?, cas),
                _ => return Err(Rejection::Store),
            },
            Ok(None) => (0, store.absent_cas()),
            Err(_) => return Err(Rejection::Store),
        };
        let next = last.saturating_add(1);
        let mut v = [0u8; 9];
        v[0] = EPOCH_TAG;
        v[1..].copy_from_slice(&next.to_le_bytes());
        match store.set(EPOCH_KEY, &v, cas) {
            Ok(()) => return Ok(next),
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Other) => return Err(Rejection::Store),
        }
    }
    Err(Rejection::Store)
}

fn slot_key(slot: u8, kind: &str, id: &str) -> String {
    let mut key = String::with_capacity(16 + id.len());
    put_slot_key(&mut key, slot, kind, id);
    key
}

/// Writes `kg:cfg:<slot>:<kind>:<id>` into `key` (reusing its buffer).
fn put_slot_key(key: &mut String, slot: u8, kind: &str, id: &str) {
    key.clear();
    key.push_str("kg:cfg:");
    key.push(if slot == 0 { '0' } else { '1' }); // the two slots
    key.push(':');
    key.push_str(kind);
    key.push(':');
    key.push_str(id);
}

/// A record's header: [`RECORD_TAG`], then its epoch (8 bytes, little-endian); the payload
/// follows.
fn record_header(epoch: u64, capacity: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + capacity);
    v.push(RECORD_TAG);
    v.extend_from_slice(&epoch.to_le_bytes());
    v
}

/// Rewrites the epoch in a record's header.
fn set_record_epoch(record: &mut [u8], epoch: u64) {
    if let Some(e) = record.get_mut(1..9) {
        e.copy_from_slice(&epoch.to_le_bytes());
    }
}

/// A record holding `tag` and `doc` as JSON, encoded straight into one buffer.
fn json_record<T: serde::Serialize>(epoch: u64, tag: u8, doc: &T) -> Result<Vec<u8>, Rejection> {
    let mut v = record_header(epoch, 256);
    v.push(tag);
    serde_json::to_writer(&mut v, doc).map_err(|e| invalid("", e.to_string()))?;
    Ok(v)
}

fn record(epoch: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = record_header(epoch, payload.len());
    v.extend_from_slice(payload);
    v
}

/// Reads a record of exactly `epoch` from `slot`.
fn read_record(
    store: &dyn SharedStore,
    slot: u8,
    epoch: u64,
    kind: &str,
    id: &str,
) -> Option<Vec<u8>> {
    let (bytes, _) = store.get(&slot_key(slot, kind, id)).ok()??;
    match bytes.as_slice() {
        [RECORD_TAG, rest @ ..] if rest.len() >= 8 && le_u64(&rest[..8]) == Some(epoch) => {
            Some(rest[8..].to_vec())
        }
        _ => None,
    }
}

/// Why a fetched page or document was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// It does not parse or compile (malformed, partial, invalid): the message names the place.
    Invalid(ConfigError),
    /// Its version is not newer than the one in force (an older or replayed document).
    NotNewer { offered: u64, in_force: u64 },
    /// The store refused a write; nothing was switched.
    Store,
    /// Another VM published while this update was under way; it is abandoned.
    Superseded,
}

fn invalid(path: impl Into<String>, message: impl Into<String>) -> Rejection {
    Rejection::Invalid(ConfigError {
        path: path.into(),
        message: message.into(),
    })
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, Rejection> {
    serde_json::to_vec(v).map_err(|e| invalid("", e.to_string()))
}

/// A version's settings, APIs and limits without its version number (to tell whether the
/// catalogue changed between two versions).
fn meta_fingerprint(meta: &ConfigDoc) -> Result<Vec<u8>, Rejection> {
    to_json(&ConfigDoc {
        version: 0,
        ..meta.clone()
    })
}

/// One shared-data write of a page: `(kind, id, value)` of the slot's key `kg:cfg:<slot>:<kind>:<id>`.
type SlotWrite<'p> = (&'static str, &'p str, Vec<u8>);

/// What the caller does after a page was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Fetch the page [`Sync::request`] names now.
    More,
    /// The version is complete and in force.
    Done(u64),
    /// The free slot is complete at the version in force (a warm-up, [`Sync::prepare`]); the
    /// head did not move.
    Ready(u64),
}

/// Progress of one update: the free slot being brought to the newest version, page by page.
/// Lives in the poller's VM; if that VM goes away, the next poller starts over from the slot's
/// state (anything written since is rewritten).
pub struct Sync {
    in_force: Option<Head>,
    /// A warm-up: the version in force itself is acceptable.
    prepare: bool,
    slot: u8,
    epoch: u64,
    since: u64,
    after: String,
    walk_version: Option<u64>,
    walk_consistent: bool,
    walks: u32,
    newest: u64,
    /// The update's settings, APIs and limits (fingerprint) and their compiled form.
    meta: Option<Vec<u8>>,
    catalog: Option<Catalog>,
    checked_slot_meta: bool,
    /// Nothing is in force yet: the walk fills the other slot too, with this epoch, so that the
    /// first change after the first publication travels alone (no second walk to warm it up).
    mirror: Option<u64>,
    /// Pages applied and records written so far (for logs).
    pub pages: u64,
    pub records: u64,
}

impl Sync {
    /// Starts an update of the free slot from the version it is complete at.
    pub fn begin(store: &dyn SharedStore) -> Result<Sync, Rejection> {
        let in_force = read_head(store);
        let slot = in_force.map_or(0, |h| 1 - h.slot);
        let mut sync = Sync {
            in_force,
            prepare: false,
            slot,
            epoch: 0,
            since: 0,
            after: String::new(),
            walk_version: None,
            walk_consistent: true,
            walks: 0,
            newest: 0,
            meta: None,
            catalog: None,
            checked_slot_meta: false,
            mirror: None,
            pages: 0,
            records: 0,
        };
        if in_force.is_none() {
            // The first publication: one walk of the whole feed fills both slots.
            sync.mirror = Some(0);
            sync.restart_from_scratch(store)?;
            return Ok(sync);
        }
        match read_state(store, slot) {
            Some(st) if st.epoch != 0 => {
                sync.epoch = st.epoch;
                sync.since = st.base;
            }
            _ => sync.restart_from_scratch(store)?,
        }
        Ok(sync)
    }

    /// Whether the free slot holds nothing usable yet (it has never been filled, or its filling
    /// from scratch did not finish) while a version is in force. The first update after start
    /// would then have to fetch everything again; [`Sync::prepare`] does that ahead of time.
    pub fn free_slot_is_empty(store: &dyn SharedStore) -> bool {
        match read_head(store) {
            Some(h) => read_state(store, 1 - h.slot).is_none_or(|st| st.epoch == 0 || st.base == 0),
            None => false,
        }
    }

    /// Starts filling the free slot up to (at least) the version in force, so that later
    /// updates only carry changes. If a newer version arrives during the walk, it is published
    /// as usual when the walk completes.
    pub fn prepare(store: &dyn SharedStore) -> Result<Sync, Rejection> {
        let mut sync = Sync::begin(store)?;
        sync.prepare = true;
        Ok(sync)
    }

    /// Starts this update over from scratch (the control plane no longer knows the changes
    /// since the slot's version: `410 Gone`).
    pub fn start_over(&mut self, store: &dyn SharedStore) -> Result<(), Rejection> {
        self.newest = 0;
        self.walks = 0;
        self.restart_from_scratch(store)
    }

    /// Empties the free slot (a new epoch) and fetches everything.
    fn restart_from_scratch(&mut self, store: &dyn SharedStore) -> Result<(), Rejection> {
        self.epoch = next_epoch(store)?;
        write_state(
            store,
            self.slot,
            SlotState {
                epoch: self.epoch,
                base: 0,
            },
        )?;
        if self.mirror.is_some() {
            let epoch = next_epoch(store)?;
            write_state(store, 1 - self.slot, SlotState { epoch, base: 0 })?;
            self.mirror = Some(epoch);
        }
        self.since = 0;
        self.after.clear();
        self.walk_version = None;
        self.walk_consistent = true;
        self.checked_slot_meta = true;
        self.meta = None;
        self.catalog = None;
        Ok(())
    }

    /// The page to fetch next: changes after version `since`, SIDs after `after`.
    pub fn request(&self) -> (u64, &str) {
        (self.since, &self.after)
    }

    /// Whether this update fills both slots (the first publication).
    pub fn fills_both_slots(&self) -> bool {
        self.mirror.is_some()
    }

    /// The version in force when this update began.
    pub fn in_force(&self) -> Option<Head> {
        self.in_force
    }

    /// Parses a page of the change feed (nothing is checked but its JSON shape).
    pub fn parse(json: &[u8]) -> Result<ChangesPage, Rejection> {
        let mut de = serde_json::Deserializer::from_slice(json);
        let page: ChangesPage = serde_path_to_error::deserialize(&mut de)
            .map_err(|e| invalid(e.path().to_string(), e.inner().to_string()))?;
        de.end().map_err(|e| invalid("", e.to_string()))?;
        Ok(page)
    }

    /// The request that follows `page` if [`Sync::apply_page`] accepts it and the walk goes on
    /// as it is: `page` answers [`Sync::request`] and names a next cursor. The poller asks for
    /// it before checking `page`, so that the control plane reads the next page meanwhile; if
    /// after the check [`Sync::request`] is something else, that answer is dropped.
    pub fn request_after(&self, page: &ChangesPage) -> Option<(u64, String)> {
        let next = page.next.as_ref()?;
        (page.since == self.since && page.after == self.after).then(|| (self.since, next.clone()))
    }

    /// Validates one page (from [`Sync::parse`]) completely and, if it is acceptable, writes its
    /// records into the free slot; after the last page of a consistent walk, moves the head.
    pub fn apply_page(
        &mut self,
        store: &dyn SharedStore,
        page: &ChangesPage,
        now_s: u64,
    ) -> Result<Step, Rejection> {
        if page.schema != CHANGES_SCHEMA_V1 {
            return Err(invalid(
                "schema",
                format!(
                    "unsupported schema {:?}; expected {CHANGES_SCHEMA_V1:?}",
                    page.schema
                ),
            ));
        }
        let in_force = self.in_force.map_or(0, |h| h.version);
        if page.version < in_force || (page.version == in_force && !self.prepare) {
            return Err(Rejection::NotNewer {
                offered: page.version,
                in_force,
            });
        }
        if page.version < self.newest {
            return Err(Rejection::NotNewer {
                offered: page.version,
                in_force: self.newest,
            });
        }
        if page.since != self.since || page.after != self.after {
            return Err(invalid(
                "since",
                format!(
                    "the page answers since={} after={:?}, not the request (since={} after={:?})",
                    page.since, page.after, self.since, self.after
                ),
            ));
        }
        let meta = page.meta();
        let fingerprint = meta_fingerprint(&meta)?;
        // The catalogue is compiled once per update: later pages repeat the same meta.
        let compiled = match (&self.meta, &self.catalog) {
            (Some(m), Some(_)) if *m == fingerprint => None,
            _ => Some(compile_catalog(&meta).map_err(Rejection::Invalid)?),
        };
        if !self.checked_slot_meta {
            // The slot's records were validated against its own catalogue: if that changed,
            // they must all be fetched and checked again.
            self.checked_slot_meta = true;
            let same = read_record(store, self.slot, self.epoch, "meta", "-")
                .and_then(|b| serde_json::from_slice::<ConfigDoc>(&b).ok())
                .and_then(|d| meta_fingerprint(&d).ok())
                .is_some_and(|f| f == fingerprint);
            if !same {
                self.restart_from_scratch(store)?;
                return Ok(Step::More);
            }
        }
        match &self.meta {
            Some(m) if *m != fingerprint => {
                return Err(invalid(
                    "",
                    "the settings, APIs or limits changed during the update",
                ))
            }
            Some(_) => {}
            None => self.meta = Some(fingerprint),
        }
        if let Some(c) = compiled {
            self.catalog = Some(c);
        }
        let catalog = self.catalog.as_ref().ok_or(Rejection::Store)?;
        let writes = self.page_records(page, catalog)?;
        // Nobody else may have moved the head since this update began.
        let now = read_head(store);
        let unchanged = match (now, self.in_force) {
            (Some(a), Some(b)) => a.same_config(&b),
            (None, None) => true,
            _ => false,
        };
        if !unchanged {
            return Err(Rejection::Superseded);
        }
        // Into the slot, and on a first publication the same records into the other slot,
        // tagged with its epoch. `slot_key`, built in one buffer.
        let mirror = self.mirror.map(|epoch| (1 - self.slot, Some(epoch)));
        let mut key = String::with_capacity(96);
        let mut copy = Vec::new();
        for (slot, retag) in std::iter::once((self.slot, None)).chain(mirror) {
            for (kind, id, value) in &writes {
                put_slot_key(&mut key, slot, kind, id);
                let value = match retag {
                    None => value.as_slice(),
                    Some(epoch) => {
                        copy.clear();
                        copy.extend_from_slice(value);
                        set_record_epoch(&mut copy, epoch);
                        copy.as_slice()
                    }
                };
                store.set(&key, value, 0).map_err(|_| Rejection::Store)?;
            }
        }
        self.pages += 1;
        self.records += writes.len() as u64 * if self.mirror.is_some() { 2 } else { 1 };
        self.newest = page.version;
        match self.walk_version {
            None => self.walk_version = Some(page.version),
            Some(v) if v != page.version => self.walk_consistent = false,
            Some(_) => {}
        }
        if let Some(next) = &page.next {
            self.after.clone_from(next);
            return Ok(Step::More);
        }
        if !self.walk_consistent {
            // Pages of this walk saw different versions: fetch again what changed after the
            // walk began (state as of one newer version), until one walk sees one version.
            self.walks += 1;
            if self.walks >= MAX_WALKS {
                return Err(invalid(
                    "",
                    format!("the config kept changing through {MAX_WALKS} walks of the feed"),
                ));
            }
            self.since = self.walk_version.unwrap_or(self.since);
            self.after.clear();
            self.walk_version = None;
            self.walk_consistent = true;
            return Ok(Step::More);
        }
        self.finish(store, &meta, now_s)
    }

    /// Checks every record of a page and encodes what it writes (nothing is written unless the
    /// whole page is acceptable).
    fn page_records<'p>(
        &self,
        page: &'p ChangesPage,
        catalog: &Catalog,
    ) -> Result<Vec<SlotWrite<'p>>, Rejection> {
        // Record paths (`keys[3]`) are formatted into one buffer, and kept only for an error.
        use std::fmt::Write as _;
        let path_of = |list: &str, i: usize| format!("{list}[{i}]");
        let mut path = String::new();
        let mut sids: Vec<(&str, &'static str, usize)> =
            Vec::with_capacity(page.accounts.len() + page.keys.len() + page.deleted.len());
        let mut writes = Vec::with_capacity(page.accounts.len() + 2 * page.keys.len());
        for (i, a) in page.accounts.iter().enumerate() {
            path.clear();
            let _ = write!(path, "accounts[{i}]");
            compile_account_record_at(catalog, a, &path).map_err(Rejection::Invalid)?;
            sids.push((&a.sid, "accounts", i));
            writes.push(("p", a.sid.as_str(), json_record(self.epoch, b'A', a)?));
        }
        let bearer = page.settings.schemes.contains(&Scheme::Bearer);
        for (i, k) in page.keys.iter().enumerate() {
            path.clear();
            let _ = write!(path, "keys[{i}]");
            compile_key_record_at(catalog, k, &path).map_err(Rejection::Invalid)?;
            sids.push((&k.sid, "keys", i));
            writes.push(("p", k.sid.as_str(), json_record(self.epoch, b'K', k)?));
            if bearer {
                for s in &k.secrets {
                    writes.push(("t", s.digest.as_str(), record(self.epoch, k.sid.as_bytes())));
                }
            }
        }
        for (i, sid) in page.deleted.iter().enumerate() {
            sids.push((sid, "deleted", i));
            writes.push(("p", sid.as_str(), record(self.epoch, b"D")));
        }
        // SIDs name shared-data keys: the SID alphabet only, each once, all after the cursor,
        // none after the next cursor.
        for (sid, list, i) in &sids {
            let path = || format!("{}.sid", path_of(list, *i));
            if plausible_sid(sid.as_bytes()).is_none() {
                return Err(invalid(path(), format!("invalid SID {sid:?}")));
            }
            if !page.after.is_empty() && *sid <= page.after.as_str() {
                return Err(invalid(
                    path(),
                    format!("{sid:?} is not after the page's cursor {:?}", page.after),
                ));
            }
            if let Some(next) = &page.next {
                if *sid > next.as_str() {
                    return Err(invalid(
                        path(),
                        format!("{sid:?} is after the page's next cursor {next:?}"),
                    ));
                }
            }
        }
        sids.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for w in sids.windows(2) {
            if w[0].0 == w[1].0 {
                return Err(invalid(
                    format!("{}.sid", path_of(w[1].1, w[1].2)),
                    format!(
                        "duplicate SID {:?} (also {})",
                        w[1].0,
                        path_of(w[0].1, w[0].2)
                    ),
                ));
            }
        }
        Ok(writes)
    }

    fn finish(
        &mut self,
        store: &dyn SharedStore,
        meta: &ConfigDoc,
        now_s: u64,
    ) -> Result<Step, Rejection> {
        let v = meta.version;
        let json = to_json(meta)?;
        let mirror = self.mirror.map(|epoch| (1 - self.slot, epoch));
        for (slot, epoch) in std::iter::once((self.slot, self.epoch)).chain(mirror) {
            store
                .set(&slot_key(slot, "meta", "-"), &record(epoch, &json), 0)
                .map_err(|_| Rejection::Store)?;
            write_state(store, slot, SlotState { epoch, base: v })?;
        }
        if self.in_force.is_some_and(|h| h.version >= v) {
            return Ok(Step::Ready(v));
        }
        set_head(
            store,
            Head {
                version: v,
                contacted_at_s: now_s,
                epoch: self.epoch,
                slot: self.slot,
            },
        )?;
        Ok(Step::Done(v))
    }
}

/// Validates a whole `keygate.config/v1` document and publishes it as the complete new version
/// (a fresh epoch in the free slot, one page). Returns the published version.
pub fn publish(store: &dyn SharedStore, json: &[u8], now_s: u64) -> Result<u64, Rejection> {
    let doc = crate::compile::parse(json).map_err(Rejection::Invalid)?;
    compile_doc(&doc).map_err(Rejection::Invalid)?;
    let mut sync = Sync::begin(store)?;
    let in_force = sync.in_force.map_or(0, |h| h.version);
    if doc.version <= in_force {
        return Err(Rejection::NotNewer {
            offered: doc.version,
            in_force,
        });
    }
    // A whole document says nothing about SIDs it leaves out: start from an empty slot.
    sync.restart_from_scratch(store)?;
    let mut accounts = doc.accounts.clone();
    accounts.sort_by(|a, b| a.sid.cmp(&b.sid));
    let mut keys = doc.keys.clone();
    keys.sort_by(|a, b| a.sid.cmp(&b.sid));
    let page = ChangesPage {
        schema: CHANGES_SCHEMA_V1.to_owned(),
        version: doc.version,
        since: 0,
        after: String::new(),
        next: None,
        settings: doc.settings.clone(),
        apis: doc.apis.clone(),
        limits: doc.limits.clone(),
        accounts,
        keys,
        deleted: Vec::new(),
    };
    match sync.apply_page(store, &page, now_s)? {
        Step::Done(v) => Ok(v),
        Step::More | Step::Ready(_) => Err(Rejection::Store),
    }
}

fn set_head(store: &dyn SharedStore, head: Head) -> Result<(), Rejection> {
    store
        .set(HEAD_KEY, &encode_head(head), 0)
        .map_err(|_| Rejection::Store)
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

/// Loads and compiles the catalogue of the version a head names.
pub fn load_catalog(store: &dyn SharedStore, head: &Head) -> Option<Catalog> {
    let bytes = read_record(store, head.slot, head.epoch, "meta", "-")?;
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
    fn record(&self, kind: &str, id: &str) -> Option<Vec<u8>> {
        read_record(self.store, self.head.slot, self.head.epoch, kind, id)
    }

    fn load_principal(&self, sid: &str) -> Option<Principal> {
        let bytes = self.record("p", sid)?;
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
            // b'D': deleted.
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
        let hexd = hex::encode(digest);
        let key = self
            .record("t", &hexd)
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
    use crate::config::{AccountStatus, ApiDoc, Role, SecretDoc, Settings};
    use crate::headers::{AuthorizationHeader, RequestHead};
    use crate::ratelimit::testing::FakeStore;
    use crate::{decide_in, Decision, Reason};
    use std::collections::BTreeMap;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn digest(s: &str) -> String {
        crate::digest::Digester::Sha256.digest_hex(s.as_bytes())
    }

    fn key_doc(sid: &str, secret: &str) -> KeyDoc {
        serde_json::from_value(serde_json::json!({"sid": sid, "account_sid": "AC1", "role": "main", "secrets": [{"digest": digest(secret)}]})).unwrap()
    }

    fn doc(version: u64, keys: &[(&str, &str)]) -> Vec<u8> {
        let keys: Vec<KeyDoc> = keys
            .iter()
            .map(|(sid, secret)| key_doc(sid, secret))
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "schema": "keygate.config/v1", "version": version,
            "apis": [{"name": "calls", "methods": ["GET"], "paths": ["/v2/accounts/{account_sid}/calls"]}],
            "accounts": [{"sid": "AC1", "status": "active"}],
            "keys": keys,
        }))
        .unwrap()
    }

    fn judge(store: &FakeStore, cache: &RefCell<RecordCache>, auth: &[u8]) -> Result<u64, Reason> {
        let head = read_head(store).ok_or(Reason::NoConfig)?;
        let catalog = load_catalog(store, &head).ok_or(Reason::NoConfig)?;
        let dir = SharedDirectory {
            store,
            head,
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
            Decision::Allow(_) => Ok(head.version),
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

    #[derive(Clone)]
    enum Rec {
        Account(AccountDoc),
        Key(KeyDoc),
    }

    /// A control plane in miniature: every SID with the version it last changed at and its
    /// state (`None` once deleted), served as change-feed pages like `/v1/edge/changes`.
    struct Model {
        version: u64,
        apis: Vec<ApiDoc>,
        rows: BTreeMap<String, (u64, Option<Rec>)>,
        /// Pages whose follow-up request was asked for before the page was checked (as the
        /// poller does) and turned out to be the right one.
        predicted: u64,
    }

    impl Model {
        fn new() -> Model {
            let mut m = Model {
                version: 1,
                apis: serde_json::from_value(serde_json::json!([{"name": "calls", "methods": ["GET"], "paths": ["/v2/accounts/{account_sid}/calls"]}])).unwrap(),
                rows: BTreeMap::new(),
                predicted: 0,
            };
            m.put_account("AC1");
            m
        }
        fn put_account(&mut self, sid: &str) {
            self.version += 1;
            let a = AccountDoc {
                sid: sid.into(),
                status: AccountStatus::Active,
                auth_tokens: Vec::new(),
                allowed_ips: None,
                limits: None,
            };
            self.rows
                .insert(sid.into(), (self.version, Some(Rec::Account(a))));
        }
        fn put_key(&mut self, sid: &str, secret: &str) {
            self.version += 1;
            self.rows.insert(
                sid.into(),
                (self.version, Some(Rec::Key(key_doc(sid, secret)))),
            );
        }
        fn delete(&mut self, sid: &str) {
            self.version += 1;
            self.rows.insert(sid.into(), (self.version, None));
        }
        fn page(&self, since: u64, after: &str, limit: usize) -> ChangesPage {
            let mut p = ChangesPage {
                schema: CHANGES_SCHEMA_V1.into(),
                version: self.version,
                since,
                after: after.into(),
                next: None,
                settings: Settings::default(),
                apis: self.apis.clone(),
                limits: Default::default(),
                accounts: Vec::new(),
                keys: Vec::new(),
                deleted: Vec::new(),
            };
            let rows: Vec<_> = self
                .rows
                .iter()
                .filter(|(sid, (v, _))| *v > since && sid.as_str() > after)
                .take(limit)
                .collect();
            if rows.len() == limit {
                p.next = rows.last().map(|(sid, _)| (*sid).clone());
            }
            for (sid, (_, rec)) in rows {
                match rec {
                    Some(Rec::Account(a)) => p.accounts.push(a.clone()),
                    Some(Rec::Key(k)) => p.keys.push(k.clone()),
                    None => p.deleted.push(sid.clone()),
                }
            }
            p
        }
        /// One whole update, fetching pages of `limit`; `between` runs before each page.
        fn sync(
            &mut self,
            store: &FakeStore,
            limit: usize,
            between: impl FnMut(&mut Model, u64),
        ) -> Result<(u64, Sync), Rejection> {
            let sync = Sync::begin(store)?;
            self.walk(store, limit, sync, between)
        }
        fn walk(
            &mut self,
            store: &FakeStore,
            limit: usize,
            mut sync: Sync,
            mut between: impl FnMut(&mut Model, u64),
        ) -> Result<(u64, Sync), Rejection> {
            for n in 0.. {
                between(self, n);
                let (since, after) = sync.request();
                let page = self.page(since, after, limit);
                let ahead = sync.request_after(&page);
                match sync.apply_page(store, &page, 100 + n)? {
                    Step::Done(v) | Step::Ready(v) => {
                        assert_eq!(ahead, None, "a page with a next cursor never ends a walk");
                        return Ok((v, sync));
                    }
                    Step::More => {}
                }
                // Asked for ahead of the check, the next page is the one the walk needs, unless
                // the check started the slot over from scratch.
                let (since, after) = sync.request();
                if let Some(ahead) = ahead {
                    if ahead == (since, after.to_owned()) {
                        self.predicted += 1;
                    } else {
                        assert_eq!((since, after), (0, ""), "wrong request ahead: {ahead:?}");
                    }
                }
            }
            unreachable!()
        }
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
        assert_eq!(judge(&store, &cache, &basic("SK1", "one")), Ok(1));
        assert_eq!(judge(&store, &cache, b"Bearer two"), Ok(1));
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
        assert_eq!(judge(&store, &cache, &basic("SK3", "three")), Ok(2));
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
        let head = read_head(&store);
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
        assert_eq!(read_head(&store), head, "head untouched");
        assert_eq!(judge(&store, &cache, &basic("SK1", "one")), Ok(5));
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
        let head_v1 = read_head(&store).unwrap();
        let catalog_v1 = load_catalog(&store, &head_v1).unwrap();
        publish(&store, &doc(2, &[("SK2", "two")]), 101).unwrap();
        // A request that read head = 1 before the switch still sees version 1, whole.
        let dir = SharedDirectory {
            store: &store,
            head: head_v1,
            catalog: &catalog_v1,
            cache: &cache_old,
        };
        assert!(matches!(dir.by_sid(b"SK1"), Some(Principal::Key(_))));
        assert!(dir.by_sid(b"SK2").is_none());
    }

    #[test]
    fn memory_is_two_slots_whatever_the_number_of_versions() {
        let store = FakeStore::new();
        let mut m = Model::new();
        m.put_key("SK1", "one");
        m.put_key("SK2", "two");
        for i in 0..20 {
            m.put_key("SK1", &format!("one-{i}"));
            m.sync(&store, 2, |_, _| {}).unwrap();
        }
        // anchor + head + epoch counter + 2 × (state + meta + account + 2 keys)
        // + the token index: SK2's one digest per slot, SK1's digest of each version (and the
        // first one in both slots: the first walk fills both).
        let tokens = store
            .map
            .borrow()
            .keys()
            .filter(|k| k.contains(":t:"))
            .count();
        assert_eq!(store.map.borrow().len(), 3 + 2 * 5 + tokens);
        assert!(tokens <= 2 + 20 + 1, "{tokens}");
    }

    #[test]
    fn implausible_sids_never_reach_the_store_and_the_cache_is_bounded() {
        let store = FakeStore::new();
        let cache = RefCell::new(RecordCache::default());
        publish(&store, &doc(1, &[("SK1", "one")]), 100).unwrap();
        let head = read_head(&store).unwrap();
        let catalog = load_catalog(&store, &head).unwrap();
        let dir = SharedDirectory {
            store: &store,
            head,
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
        let h = read_head(&store).unwrap();
        assert_eq!((h.version, h.contacted_at_s), (1, 160));
    }

    #[test]
    fn paged_full_sync_then_deltas_write_only_what_changed() {
        let store = FakeStore::new();
        let cache = RefCell::new(RecordCache::default());
        let mut m = Model::new();
        for i in 0..25 {
            m.put_key(&format!("SK{i:02}"), &format!("secret{i}"));
        }
        let (v, sync) = m.sync(&store, 4, |_, _| {}).unwrap();
        assert_eq!(v, m.version);
        assert_eq!(sync.pages, 7, "26 SIDs in pages of 4");
        assert_eq!(m.predicted, 6, "every page but the last names the next one");
        assert_eq!(
            sync.records,
            2 * (1 + 25 + 25),
            "the first walk fills both slots: every account, key and token twice"
        );
        assert!(!Sync::free_slot_is_empty(&store), "no warm-up needed");
        for i in 0..25 {
            assert_eq!(
                judge(
                    &store,
                    &cache,
                    &basic(&format!("SK{i:02}"), &format!("secret{i}"))
                ),
                Ok(v)
            );
        }
        // The free slot is complete at v too: the first change travels alone.
        m.put_key("SK99", "new");
        let (v2, sync) = m.sync(&store, 4, |_, _| {}).unwrap();
        assert_eq!(
            (sync.pages, sync.records),
            (1, 2),
            "the new key and its token"
        );
        assert_eq!(judge(&store, &cache, &basic("SK99", "new")), Ok(v2));
        // From now on each slot is complete at an older version: only changes travel.
        m.delete("SK03");
        m.put_key("SK04", "rotated");
        let (v3, sync) = m.sync(&store, 4, |_, _| {}).unwrap();
        // Slot 0 is complete at v: since then SK99 was created, SK03 deleted, SK04 rotated.
        assert_eq!((sync.pages, sync.records), (1, 1 + 2 + 2));
        assert_eq!(
            judge(&store, &cache, &basic("SK03", "secret3")),
            Err(Reason::InvalidCredentials)
        );
        assert_eq!(
            judge(&store, &cache, &basic("SK04", "secret4")),
            Err(Reason::InvalidCredentials)
        );
        assert_eq!(judge(&store, &cache, &basic("SK04", "rotated")), Ok(v3));
        assert_eq!(judge(&store, &cache, &basic("SK99", "new")), Ok(v3));
        assert_eq!(judge(&store, &cache, &basic("SK24", "secret24")), Ok(v3));
        assert_eq!(
            judge(&store, &cache, b"Bearer secret4"),
            Err(Reason::InvalidCredentials)
        );
        assert_eq!(judge(&store, &cache, b"Bearer rotated"), Ok(v3));
        // And the slot just freed catches up the same way (one more change).
        m.put_key("SK05", "again");
        let (v4, sync) = m.sync(&store, 4, |_, _| {}).unwrap();
        assert_eq!(sync.pages, 1);
        assert_eq!(
            judge(&store, &cache, &basic("SK03", "secret3")),
            Err(Reason::InvalidCredentials)
        );
        assert_eq!(judge(&store, &cache, &basic("SK04", "rotated")), Ok(v4));
        assert_eq!(judge(&store, &cache, &basic("SK05", "again")), Ok(v4));
        assert_eq!(
            judge(&store, &cache, &basic("SK05", "secret5")),
            Err(Reason::InvalidCredentials)
        );
    }

    #[test]
    fn changes_during_a_walk_are_fetched_again_until_one_walk_sees_one_version() {
        let store = FakeStore::new();
        let cache = RefCell::new(RecordCache::default());
        let mut m = Model::new();
        for i in 0..20 {
            m.put_key(&format!("SK{i:02}"), "old");
        }
        // While the first walk is under way, an early key (already fetched) is rotated and a
        // late one is deleted; the edge must not publish the mixed state.
        let (v, sync) = m
            .sync(&store, 3, |m, n| {
                if n == 3 {
                    m.put_key("SK00", "new");
                    m.delete("SK19");
                }
            })
            .unwrap();
        assert_eq!(v, m.version);
        assert!(sync.pages > 7, "a second walk: {}", sync.pages);
        assert_eq!(judge(&store, &cache, &basic("SK00", "new")), Ok(v));
        assert_eq!(
            judge(&store, &cache, &basic("SK00", "old")),
            Err(Reason::InvalidCredentials)
        );
        assert_eq!(
            judge(&store, &cache, &basic("SK19", "old")),
            Err(Reason::InvalidCredentials)
        );
        assert_eq!(judge(&store, &cache, &basic("SK10", "old")), Ok(v));
    }

    #[test]
    fn a_bad_page_writes_nothing_and_a_failed_update_leaves_the_version_in_force() {
        let store = FakeStore::new();
        let cache = RefCell::new(RecordCache::default());
        let mut m = Model::new();
        for i in 0..6 {
            m.put_key(&format!("SK{i}"), "s");
        }
        let (v, _) = m.sync(&store, 100, |_, _| {}).unwrap();
        m.delete("SK1");
        m.put_key("SK7", "s");
        let mut sync = Sync::begin(&store).unwrap();
        let (since, after) = sync.request();
        let good = m.page(since, after, 100);
        let before = store.map.borrow().clone();
        let cases: Vec<(ChangesPage, &str)> = vec![
            (
                ChangesPage {
                    version: v,
                    ..good.clone()
                },
                "not newer",
            ),
            (
                ChangesPage {
                    since: since + 1,
                    ..good.clone()
                },
                "since",
            ),
            (
                ChangesPage {
                    after: "SK0".into(),
                    ..good.clone()
                },
                "since",
            ),
            (
                ChangesPage {
                    deleted: vec!["SK1".into(), "../x".into()],
                    ..good.clone()
                },
                "deleted[1].sid: invalid SID \"../x\"",
            ),
            (
                ChangesPage {
                    deleted: vec!["SK7".into()],
                    ..good.clone()
                },
                "duplicate SID \"SK7\"",
            ),
            (
                ChangesPage {
                    next: Some("SK2".into()),
                    ..good.clone()
                },
                "is after the page's next cursor",
            ),
            (
                ChangesPage {
                    schema: "keygate.config/v1".into(),
                    ..good.clone()
                },
                "schema: unsupported schema",
            ),
            (
                {
                    let mut p = good.clone();
                    p.keys[0].allowed_ips = Some(vec!["10.0.0.1/8".into()]);
                    p
                },
                "keys[0].allowed_ips[0]",
            ),
            (
                {
                    let mut p = good.clone();
                    p.keys[0].secrets = vec![SecretDoc {
                        digest: "zz".into(),
                        not_after: None,
                    }];
                    p
                },
                "keys[0].secrets[0].digest",
            ),
            (
                {
                    let mut p = good.clone();
                    p.keys[0].role = Role::Main;
                    p.keys[0].apis = Some(vec!["nope".into()]);
                    p
                },
                "keys[0].apis[0]",
            ),
        ];
        for (page, want) in cases {
            let err = sync.apply_page(&store, &page, 200).unwrap_err();
            let text = match &err {
                Rejection::Invalid(e) => e.to_string(),
                Rejection::NotNewer { .. } => "not newer".into(),
                other => format!("{other:?}"),
            };
            assert!(text.contains(want), "{want:?} not in {text:?}");
            assert_eq!(*store.map.borrow(), before, "{want}: nothing written");
        }
        assert!(matches!(
            Sync::parse(b"{\"schema\":\"keygate.changes/v1\",\"version\":"),
            Err(Rejection::Invalid(_))
        ));
        assert_eq!(judge(&store, &cache, &basic("SK1", "s")), Ok(v));
        assert_eq!(
            judge(&store, &cache, &basic("SK7", "s")),
            Err(Reason::InvalidCredentials)
        );
        // The good page still applies afterwards.
        assert_eq!(
            sync.apply_page(&store, &good, 200),
            Ok(Step::Done(m.version))
        );
        assert_eq!(judge(&store, &cache, &basic("SK7", "s")), Ok(m.version));
    }

    #[test]
    fn an_update_abandoned_half_way_is_completed_by_the_next_one() {
        let store = FakeStore::new();
        let cache = RefCell::new(RecordCache::default());
        let mut m = Model::new();
        for i in 0..10 {
            m.put_key(&format!("SK{i}"), "a");
        }
        m.sync(&store, 100, |_, _| {}).unwrap();
        for i in 0..10 {
            m.put_key(&format!("SK{i}"), "b");
        }
        // First attempt: two pages written into the free slot, then the poller goes away.
        let mut sync = Sync::begin(&store).unwrap();
        for _ in 0..2 {
            let (since, after) = sync.request();
            let page = m.page(since, after, 3);
            assert_eq!(sync.apply_page(&store, &page, 300), Ok(Step::More));
        }
        assert_eq!(
            judge(&store, &cache, &basic("SK0", "a")),
            Ok(m.version - 10)
        );
        m.delete("SK0");
        let (v, _) = m.sync(&store, 3, |_, _| {}).unwrap();
        assert_eq!(
            judge(&store, &cache, &basic("SK0", "b")),
            Err(Reason::InvalidCredentials)
        );
        for i in 1..10 {
            assert_eq!(judge(&store, &cache, &basic(&format!("SK{i}"), "b")), Ok(v));
        }
    }

    #[test]
    fn a_changed_api_catalogue_refills_the_slot_from_scratch() {
        let store = FakeStore::new();
        let cache = RefCell::new(RecordCache::default());
        let mut m = Model::new();
        m.put_key("SK1", "a");
        m.sync(&store, 100, |_, _| {}).unwrap();
        m.put_key("SK2", "b");
        m.sync(&store, 100, |_, _| {}).unwrap();
        // Both slots are complete; now the catalogue changes (a control plane restarted with
        // another catalogue file) and one key changes.
        m.apis[0].methods = vec!["GET".into(), "POST".into()];
        m.put_key("SK3", "c");
        let (v, sync) = m.sync(&store, 100, |_, _| {}).unwrap();
        assert_eq!(
            sync.records,
            1 + 3 + 3,
            "everything again: account, keys, tokens"
        );
        for (k, s) in [("SK1", "a"), ("SK2", "b"), ("SK3", "c")] {
            assert_eq!(judge(&store, &cache, &basic(k, s)), Ok(v));
        }
    }

    #[test]
    fn a_warm_up_fills_the_free_slot_at_the_version_in_force_so_the_first_change_is_small() {
        let store = FakeStore::new();
        let cache = RefCell::new(RecordCache::default());
        let mut m = Model::new();
        for i in 0..12 {
            m.put_key(&format!("SK{i:02}"), "a");
        }
        assert!(!Sync::free_slot_is_empty(&store), "nothing in force yet");
        let (v, _) = m.sync(&store, 5, |_, _| {}).unwrap();
        // The first walk filled both slots; a free slot that lost its state (a version in
        // force from an older edge build, a fill that never finished) is empty.
        assert!(!Sync::free_slot_is_empty(&store));
        let free = 1 - read_head(&store).unwrap().slot;
        store.map.borrow_mut().remove(&state_key(free));
        assert!(Sync::free_slot_is_empty(&store));
        // Without a warm-up the version in force is refused as "not newer".
        assert!(matches!(
            m.sync(&store, 5, |_, _| {}),
            Err(Rejection::NotNewer { .. })
        ));
        let head = read_head(&store);
        let (ready, sync) = m
            .walk(&store, 5, Sync::prepare(&store).unwrap(), |_, _| {})
            .unwrap();
        assert_eq!((ready, sync.pages), (v, 3));
        assert_eq!(read_head(&store), head, "a warm-up does not move the head");
        assert!(!Sync::free_slot_is_empty(&store));
        // The next change travels alone, into the warmed slot.
        m.delete("SK05");
        let (v2, sync) = m.sync(&store, 5, |_, _| {}).unwrap();
        assert_eq!((sync.pages, sync.records), (1, 1));
        assert_eq!(
            judge(&store, &cache, &basic("SK05", "a")),
            Err(Reason::InvalidCredentials)
        );
        assert_eq!(judge(&store, &cache, &basic("SK06", "a")), Ok(v2));
        // A change that lands during a warm-up is published when the warm-up completes.
        let fresh = FakeStore::new();
        let mut m = Model::new();
        m.put_key("SK1", "a");
        m.sync(&fresh, 5, |_, _| {}).unwrap();
        let free = 1 - read_head(&fresh).unwrap().slot;
        fresh.map.borrow_mut().remove(&state_key(free));
        let (v3, _) = m
            .walk(&fresh, 1, Sync::prepare(&fresh).unwrap(), |m, n| {
                if n == 1 {
                    m.put_key("SK2", "b");
                }
            })
            .unwrap();
        assert_eq!(read_head(&fresh).map(|h| h.version), Some(v3));
        assert_eq!(judge(&fresh, &cache, &basic("SK2", "b")), Ok(v3));
    }

    #[test]
    fn starting_over_empties_the_free_slot_and_walks_from_zero() {
        let store = FakeStore::new();
        let cache = RefCell::new(RecordCache::default());
        let mut m = Model::new();
        m.put_key("SK1", "a");
        m.put_key("SK2", "a");
        m.sync(&store, 10, |_, _| {}).unwrap();
        m.walk(&store, 10, Sync::prepare(&store).unwrap(), |_, _| {})
            .unwrap();
        m.delete("SK2");
        let mut sync = Sync::begin(&store).unwrap();
        assert_ne!(sync.request().0, 0, "a delta");
        // The control plane answered 410: changes since that version are unknown.
        sync.start_over(&store).unwrap();
        assert_eq!(sync.request(), (0, ""));
        let (v, sync) = m.walk(&store, 10, sync, |_, _| {}).unwrap();
        assert_eq!(
            sync.records, 4,
            "account, SK1 and its token, SK2's tombstone"
        );
        assert_eq!(judge(&store, &cache, &basic("SK1", "a")), Ok(v));
        assert_eq!(
            judge(&store, &cache, &basic("SK2", "a")),
            Err(Reason::InvalidCredentials)
        );
    }
}
