//! Config published record by record in the shared store (Envoy shared data), so every worker
//! judges against the same version while each VM holds only a bounded cache, fed page by page
//! from the control plane's change feed.
//!
//! Layout (all values start with a tag byte):
//! - `kg:cfg:head` → the version in force; the slot holding it, the range of epochs its records
//!   were written at (`floor..=epoch`) and its number of buckets; when the control plane was last
//!   heard from;
//! - `kg:cfg:<slot>:state` → the slot's floor and newest epoch, the version it is complete at,
//!   its number of buckets and of live entries;
//! - `kg:cfg:<slot>:meta:-` → the version's settings, API catalogue and limits (a [`ConfigDoc`]
//!   without accounts and keys), with the epoch it was written at;
//! - `kg:cfg:<slot>:b:<n>` → bucket `n` of the slot's `2^bits`: every entry whose name hashes
//!   there, each `(kind, id, epoch, payload)`: an account or key ([`AccountDoc`] / [`KeyDoc`]
//!   JSON) by SID, or the SID of the key a Bearer token digest belongs to, by digest;
//! - `kg:cfg:epoch` → the last epoch handed out.
//!
//! There are two slots; requests read only the one the head names, and only entries written at
//! an epoch in the head's range (anything else reads as absent). A new version is written into
//! the other slot, which is never read while it is written, and then the head moves: no request
//! sees a mix of two versions. The free slot is complete at an older version `X` (the one it held
//! when it was last in force), so bringing it to the new version `V` only needs what changed
//! after `X` ([`Sync`]): a change of one key at a million keys writes one entry, not a million.
//!
//! Epochs (handed out by a counter, so always increasing): every update of a slot writes at a
//! fresh epoch, above the epoch of any head that ever named the slot, while entries it leaves
//! alone keep theirs. A request still holding the head that named the slot before (`floor..=e`)
//! therefore never sees an entry of the update (its epoch is above `e`); an entry the update
//! replaced or removed reads as absent to it, never as the newer version. The new head names
//! `floor..=fresh`: the unchanged entries and the update's. A slot with no usable state (first
//! start, the API catalogue changed, the control plane lost the changes since `X`, too many
//! entries per bucket) gets a new floor, which empties it at once, and is filled from scratch.
//!
//! Bounded under churn (Envoy's shared data cannot delete a key, only store an empty value):
//! entries live in a bounded set of bucket names per slot, sized by the number of live entries
//! (a slot holding more than [`MAX_LOAD`] per bucket is refilled with more buckets), never by
//! how many SIDs or secrets ever existed. A deleted SID's entry and the Bearer entry of a
//! rotated-out or deleted secret are removed from their bucket (a bucket left with nothing is
//! stored as an empty value); entries below the floor are dropped whenever their bucket is
//! written, and a refill from scratch sweeps the buckets the slot had before when it completes.
//!
//! Consistency across pages: each page is one read of the control plane at its own version. If
//! all pages of a walk report the same version, their union is that version. Otherwise the walk
//! is repeated for what changed after its first page's version (normally one small page), until
//! a walk sees one version. Until then, nothing is in force that was not complete.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
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
const RECORD_TAG: u8 = 7;
const EPOCH_TAG: u8 = 9;
/// This layout's head, slot state and buckets. The head and state of the layout before buckets
/// (tags 6 and 8) read as absent, so a filter upgraded in a running Envoy starts over.
const HEAD_TAG: u8 = 10;
const STATE_TAG: u8 = 11;
const BUCKET_TAG: u8 = 12;
/// Entry kinds: an account or key by SID; a Bearer token by digest.
const PRINCIPAL: u8 = b'p';
const TOKEN: u8 = b't';
/// A slot starts with `2^MIN_BUCKET_BITS` buckets and grows up to `2^MAX_BUCKET_BITS`.
pub const MIN_BUCKET_BITS: u8 = 8;
pub const MAX_BUCKET_BITS: u8 = 22;
/// Live entries per bucket (on average) above which a slot is refilled with more buckets.
pub const MAX_LOAD: u64 = 4;
/// A refill from scratch sweeps the buckets the slot had before when it completes, if they are
/// at most `2^MAX_SWEEP_BITS` (more would hold the poller's thread too long in one callback;
/// the leftovers are then dropped as their buckets are written).
const MAX_SWEEP_BITS: u8 = 16;
/// Walks of the change feed one update may take before it gives up (each walk after the first
/// fetches only what changed during the previous one).
pub const MAX_WALKS: u32 = 16;

/// The published version, where it lives, and when the control plane was last heard from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub version: u64,
    pub contacted_at_s: u64,
    /// The version's entries are those of `slot` written at an epoch in `floor..=epoch`.
    pub floor: u64,
    pub epoch: u64,
    pub slot: u8,
    /// The slot has `2^bits` buckets.
    pub bits: u8,
}

impl Head {
    fn same_config(&self, other: &Head) -> bool {
        (self.version, self.floor, self.epoch, self.slot, self.bits)
            == (
                other.version,
                other.floor,
                other.epoch,
                other.slot,
                other.bits,
            )
    }
}

fn le_u64(b: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(b).ok().map(u64::from_le_bytes)
}

fn valid_bits(bits: u8) -> bool {
    (MIN_BUCKET_BITS..=MAX_BUCKET_BITS).contains(&bits)
}

fn encode_head(h: Head) -> [u8; 35] {
    let mut v = [0u8; 35];
    v[0] = HEAD_TAG;
    v[1..9].copy_from_slice(&h.version.to_le_bytes());
    v[9..17].copy_from_slice(&h.contacted_at_s.to_le_bytes());
    v[17..25].copy_from_slice(&h.floor.to_le_bytes());
    v[25..33].copy_from_slice(&h.epoch.to_le_bytes());
    v[33] = h.slot;
    v[34] = h.bits;
    v
}

fn decode_head(b: &[u8]) -> Option<Head> {
    match b {
        [HEAD_TAG, rest @ ..] if rest.len() == 34 && rest[32] < 2 && valid_bits(rest[33]) => {
            Some(Head {
                version: le_u64(&rest[..8])?,
                contacted_at_s: le_u64(&rest[8..16])?,
                floor: le_u64(&rest[16..24])?,
                epoch: le_u64(&rest[24..32])?,
                slot: rest[32],
                bits: rest[33],
            })
        }
        _ => None,
    }
}

/// Reads the head; `None` before the first publication (or if unreadable).
pub fn read_head(store: &dyn SharedStore) -> Option<Head> {
    let (bytes, _) = store.get(HEAD_KEY).ok()??;
    decode_head(&bytes)
}

/// A slot's state: its entries are those at epochs from `floor` on, the newest written at
/// `epoch`; it is complete at version `base` (or, while it is being written, was complete at:
/// applying every change after `base` brings it to the newest version); `2^bits` buckets
/// holding `count` live entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SlotState {
    floor: u64,
    epoch: u64,
    base: u64,
    bits: u8,
    count: u64,
}

fn state_key(slot: u8) -> String {
    format!("kg:cfg:{slot}:state")
}

fn read_state(store: &dyn SharedStore, slot: u8) -> Option<SlotState> {
    let (bytes, _) = store.get(&state_key(slot)).ok()??;
    match bytes.as_slice() {
        [STATE_TAG, rest @ ..] if rest.len() == 33 && valid_bits(rest[24]) => Some(SlotState {
            floor: le_u64(&rest[..8])?,
            epoch: le_u64(&rest[8..16])?,
            base: le_u64(&rest[16..24])?,
            bits: rest[24],
            count: le_u64(&rest[25..])?,
        }),
        _ => None,
    }
}

fn write_state(store: &dyn SharedStore, slot: u8, st: SlotState) -> Result<(), Rejection> {
    let mut v = [0u8; 34];
    v[0] = STATE_TAG;
    v[1..9].copy_from_slice(&st.floor.to_le_bytes());
    v[9..17].copy_from_slice(&st.epoch.to_le_bytes());
    v[17..25].copy_from_slice(&st.base.to_le_bytes());
    v[25] = st.bits;
    v[26..].copy_from_slice(&st.count.to_le_bytes());
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

fn meta_key(slot: u8) -> String {
    format!("kg:cfg:{slot}:meta:-")
}

/// A record: [`RECORD_TAG`], its epoch (8 bytes, little-endian), the payload.
fn record(epoch: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(9 + payload.len());
    v.push(RECORD_TAG);
    v.extend_from_slice(&epoch.to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// The slot's meta record if it was written at an epoch in `floor..=upto`.
fn read_meta(store: &dyn SharedStore, slot: u8, floor: u64, upto: u64) -> Option<Vec<u8>> {
    let (bytes, _) = store.get(&meta_key(slot)).ok()??;
    match bytes.as_slice() {
        [RECORD_TAG, rest @ ..] if rest.len() >= 8 => {
            let epoch = le_u64(&rest[..8])?;
            (floor..=upto).contains(&epoch).then(|| rest[8..].to_vec())
        }
        _ => None,
    }
}

/// The bucket an entry's name hashes to (FNV-1a, then a 64-bit finalizer so the low bits mix).
/// SIDs are chosen by the control plane and digests are SHA-256 outputs: nobody picks them to
/// collide.
fn bucket_of(kind: u8, id: &[u8], bits: u8) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in std::iter::once(kind).chain(id.iter().copied()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    let mask = (1u64 << bits.min(MAX_BUCKET_BITS)) - 1;
    u32::try_from(h & mask).unwrap_or(0)
}

/// Writes `kg:cfg:<slot>:b:<n>` into `key` (reusing its buffer).
fn put_bucket_key(key: &mut String, slot: u8, n: u32) {
    use std::fmt::Write as _;
    key.clear();
    let _ = write!(key, "kg:cfg:{}:b:{n}", if slot == 0 { 0 } else { 1 });
}

/// One entry of a bucket, borrowed from its encoded value.
struct EntryRef<'a> {
    kind: u8,
    id: &'a [u8],
    epoch: u64,
    payload: &'a [u8],
}

/// The entries of an encoded bucket: [`BUCKET_TAG`], then per entry its kind, the length of its
/// id (1 byte), the id, its epoch (8 bytes), the length of its payload (4 bytes), the payload
/// (integers little-endian). Stops at anything malformed.
struct Entries<'a>(&'a [u8]);

fn entries(value: &[u8]) -> Entries<'_> {
    match value {
        [BUCKET_TAG, rest @ ..] => Entries(rest),
        _ => Entries(&[]),
    }
}

impl<'a> Iterator for Entries<'a> {
    type Item = EntryRef<'a>;

    fn next(&mut self) -> Option<EntryRef<'a>> {
        let b = self.0;
        let parsed = (|| {
            let (&kind, rest) = b.split_first()?;
            let (&id_len, rest) = rest.split_first()?;
            let id = rest.get(..usize::from(id_len))?;
            let rest = rest.get(usize::from(id_len)..)?;
            let epoch = le_u64(rest.get(..8)?)?;
            let len = <[u8; 4]>::try_from(rest.get(8..12)?).ok()?;
            let len = usize::try_from(u32::from_le_bytes(len)).ok()?;
            let payload = rest.get(12..12usize.checked_add(len)?)?;
            let rest = rest.get(12 + len..)?;
            Some((
                EntryRef {
                    kind,
                    id,
                    epoch,
                    payload,
                },
                rest,
            ))
        })();
        match parsed {
            Some((e, rest)) => {
                self.0 = rest;
                Some(e)
            }
            None => {
                self.0 = &[];
                None
            }
        }
    }
}

/// An entry a writer holds while it rewrites a bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: u8,
    id: Vec<u8>,
    epoch: u64,
    payload: Vec<u8>,
}

fn encode_bucket(entries: &[Entry]) -> Vec<u8> {
    if entries.is_empty() {
        return Vec::new(); // an empty value: the name stays, its memory goes
    }
    let size: usize = entries
        .iter()
        .map(|e| 14 + e.id.len() + e.payload.len())
        .sum();
    let mut v = Vec::with_capacity(1 + size);
    v.push(BUCKET_TAG);
    for e in entries {
        v.push(e.kind);
        v.push(u8::try_from(e.id.len()).unwrap_or(u8::MAX));
        v.extend_from_slice(&e.id);
        v.extend_from_slice(&e.epoch.to_le_bytes());
        let len = u32::try_from(e.payload.len()).unwrap_or(u32::MAX);
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&e.payload);
    }
    v
}

/// The payload of entry `(kind, id)` as the version `head` names sees it.
fn read_entry(store: &dyn SharedStore, head: &Head, kind: u8, id: &[u8]) -> Option<Vec<u8>> {
    let mut key = String::with_capacity(24);
    put_bucket_key(&mut key, head.slot, bucket_of(kind, id, head.bits));
    let (bytes, _) = store.get(&key).ok()??;
    let found = entries(&bytes).find(|e| e.kind == kind && e.id == id)?;
    (head.floor..=head.epoch)
        .contains(&found.epoch)
        .then(|| found.payload.to_vec())
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

/// A principal's payload: `tag` (`A`ccount, `K`ey) and the document as JSON, in one buffer.
fn principal_payload<T: serde::Serialize>(tag: u8, doc: &T) -> Result<Vec<u8>, Rejection> {
    let mut v = Vec::with_capacity(256);
    v.push(tag);
    serde_json::to_writer(&mut v, doc).map_err(|e| invalid("", e.to_string()))?;
    Ok(v)
}

/// A version's settings, APIs and limits without its version number (to tell whether the
/// catalogue changed between two versions).
fn meta_fingerprint(meta: &ConfigDoc) -> Result<Vec<u8>, Rejection> {
    to_json(&ConfigDoc {
        version: 0,
        ..meta.clone()
    })
}

/// Whether `next`, a page's next cursor, may name the following request: a SID (the SID
/// alphabet, at most 64 bytes) strictly after the page's own cursor `after`. The poller formats
/// it into a request path only then.
pub fn valid_next_cursor(after: &str, next: &str) -> bool {
    plausible_sid(next.as_bytes()).is_some() && (after.is_empty() || next > after)
}

/// One change a page makes to a slot: entry `(kind, id)` gets `payload`, or is removed (`None`;
/// a token only while it still names `owner`).
struct Op<'p> {
    kind: u8,
    id: Cow<'p, [u8]>,
    payload: Option<Vec<u8>>,
    owner: Option<&'p [u8]>,
}

/// What a checked page writes: its entries, and the SIDs it changes with the token digests each
/// still holds (the Bearer entries of the digests their earlier records held, and no longer do,
/// are removed).
struct PageOps<'p> {
    ops: Vec<Op<'p>>,
    changed: Vec<(&'p [u8], Vec<[u8; 32]>)>,
}

/// A slot an update writes into: its entries at epochs from `floor` on are its content, this
/// update writes at `epoch`; `2^bits` buckets, `count` live entries; `sweep`: after a refill
/// from scratch, the bucket bits of what the slot held before (swept when the refill completes).
#[derive(Debug, Clone, Copy)]
struct Target {
    slot: u8,
    floor: u64,
    epoch: u64,
    bits: u8,
    count: u64,
    sweep: Option<u8>,
}

impl Target {
    fn new(slot: u8) -> Target {
        Target {
            slot,
            floor: 0,
            epoch: 0,
            bits: MIN_BUCKET_BITS,
            count: 0,
            sweep: None,
        }
    }

    fn state(&self, base: u64) -> SlotState {
        SlotState {
            floor: self.floor,
            epoch: self.epoch,
            base,
            bits: self.bits,
            count: self.count,
        }
    }

    /// Applies `page` to this slot: every bucket it touches is read once, changed and written
    /// once. Returns `(records written, entries emptied)`: a deletion counts as a record written
    /// (it is what a tombstone was), a Bearer entry removed as emptied.
    fn write(
        &mut self,
        store: &dyn SharedStore,
        page: &PageOps<'_>,
    ) -> Result<(u64, u64), Rejection> {
        let mut buckets: BTreeMap<u32, (bool, bool, Vec<Entry>)> = BTreeMap::new();
        let mut key = String::with_capacity(24);
        let mut load = |n: u32,
                        buckets: &mut BTreeMap<u32, (bool, bool, Vec<Entry>)>|
         -> Result<(), Rejection> {
            if buckets.contains_key(&n) {
                return Ok(());
            }
            put_bucket_key(&mut key, self.slot, n);
            let (existed, list) = match store.get(&key) {
                Ok(Some((bytes, _))) => (
                    !bytes.is_empty(),
                    entries(&bytes)
                        .map(|e| Entry {
                            kind: e.kind,
                            id: e.id.to_vec(),
                            epoch: e.epoch,
                            payload: e.payload.to_vec(),
                        })
                        .collect(),
                ),
                Ok(None) => (false, Vec::new()),
                Err(_) => return Err(Rejection::Store),
            };
            buckets.insert(n, (existed, false, list));
            Ok(())
        };
        // The Bearer entries of digests a changed SID's earlier record (at any epoch) held and
        // its new one does not.
        let mut dropped_tokens: Vec<Op<'_>> = Vec::new();
        for (sid, keeps) in &page.changed {
            let n = bucket_of(PRINCIPAL, sid, self.bits);
            load(n, &mut buckets)?;
            let old = buckets.get(&n).and_then(|(_, _, list)| {
                list.iter()
                    .find(|e| e.kind == PRINCIPAL && e.id == *sid)
                    .map(|e| e.payload.as_slice())
            });
            let Some((b'K', json)) = old.and_then(|p| p.split_first()) else {
                continue;
            };
            let Ok(doc) = serde_json::from_slice::<KeyDoc>(json) else {
                continue;
            };
            for s in &doc.secrets {
                let Some(d) = digest_bytes(&s.digest) else {
                    continue;
                };
                if !keeps.contains(&d) {
                    dropped_tokens.push(Op {
                        kind: TOKEN,
                        id: Cow::Owned(d.to_vec()),
                        payload: None,
                        owner: Some(sid),
                    });
                }
            }
        }
        let (mut written, mut emptied) = (0u64, 0u64);
        for op in page.ops.iter().chain(&dropped_tokens) {
            let n = bucket_of(op.kind, &op.id, self.bits);
            load(n, &mut buckets)?;
            let Some((_, dirty, list)) = buckets.get_mut(&n) else {
                return Err(Rejection::Store);
            };
            let at = list
                .iter()
                .position(|e| e.kind == op.kind && e.id.as_slice() == &*op.id);
            match (&op.payload, at) {
                (Some(payload), Some(i)) => {
                    if list[i].epoch < self.floor {
                        self.count += 1;
                    }
                    list[i].epoch = self.epoch;
                    list[i].payload.clone_from(payload);
                    *dirty = true;
                    written += 1;
                }
                (Some(payload), None) => {
                    list.push(Entry {
                        kind: op.kind,
                        id: op.id.to_vec(),
                        epoch: self.epoch,
                        payload: payload.clone(),
                    });
                    self.count += 1;
                    *dirty = true;
                    written += 1;
                }
                (None, Some(i)) if op.owner.is_none_or(|o| list[i].payload == o) => {
                    let gone = list.remove(i);
                    if gone.epoch >= self.floor {
                        self.count = self.count.saturating_sub(1);
                    }
                    *dirty = true;
                    if op.kind == TOKEN {
                        emptied += 1;
                    } else {
                        written += 1;
                    }
                }
                (None, _) => {}
            }
        }
        for (n, (existed, dirty, mut list)) in buckets {
            let before = list.len();
            list.retain(|e| e.epoch >= self.floor); // below the floor: left over, never read
            if !dirty && list.len() == before {
                continue;
            }
            if list.is_empty() && !existed {
                continue; // nothing there, nothing to store
            }
            put_bucket_key(&mut key, self.slot, n);
            store
                .set(&key, &encode_bucket(&list), 0)
                .map_err(|_| Rejection::Store)?;
        }
        Ok((written, emptied))
    }

    /// Drops every entry below the floor from the buckets the slot had before a refill from
    /// scratch (if there are at most `2^MAX_SWEEP_BITS` of them).
    fn sweep(&mut self, store: &dyn SharedStore) -> Result<(), Rejection> {
        let Some(bits) = self.sweep.take() else {
            return Ok(());
        };
        if bits > MAX_SWEEP_BITS {
            return Ok(());
        }
        let mut key = String::with_capacity(24);
        for n in 0..(1u32 << bits) {
            put_bucket_key(&mut key, self.slot, n);
            let Ok(Some((bytes, _))) = store.get(&key) else {
                continue;
            };
            if bytes.is_empty() || entries(&bytes).all(|e| e.epoch >= self.floor) {
                continue;
            }
            let kept: Vec<Entry> = entries(&bytes)
                .filter(|e| e.epoch >= self.floor)
                .map(|e| Entry {
                    kind: e.kind,
                    id: e.id.to_vec(),
                    epoch: e.epoch,
                    payload: e.payload.to_vec(),
                })
                .collect();
            store
                .set(&key, &encode_bucket(&kept), 0)
                .map_err(|_| Rejection::Store)?;
        }
        Ok(())
    }
}

fn digest_bytes(hex_digest: &str) -> Option<[u8; 32]> {
    let v = hex::decode(hex_digest).ok()?;
    <[u8; 32]>::try_from(v.as_slice()).ok()
}

/// Bucket bits for a slot of `count` live entries: room for 16 times as many (so a slot that
/// grows is refilled rarely), within the bounds.
fn bits_for(count: u64) -> u8 {
    let need = count.max(1).next_power_of_two().trailing_zeros() + 4;
    u8::try_from(need)
        .unwrap_or(MAX_BUCKET_BITS)
        .clamp(MIN_BUCKET_BITS, MAX_BUCKET_BITS)
}

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
    target: Target,
    /// `target.epoch` was handed out to this update (a delta takes a fresh one when it writes
    /// its first page, so that no head that ever named the slot sees what it writes).
    fresh: bool,
    /// The version the slot was complete at when the update began (0: filled from scratch).
    base: u64,
    /// Bucket bits the slot is refilled with the next time it starts from scratch.
    grow_to: Option<u8>,
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
    /// Nothing is in force yet: the walk fills the other slot too, with its own epoch, so that
    /// the first change after the first publication travels alone (no second walk to warm it up).
    mirror: Option<Target>,
    /// Pages applied, records written (a deletion counts as one) and Bearer entries emptied so
    /// far (for logs).
    pub pages: u64,
    pub records: u64,
    pub emptied: u64,
}

impl Sync {
    /// Starts an update of the free slot from the version it is complete at.
    pub fn begin(store: &dyn SharedStore) -> Result<Sync, Rejection> {
        let in_force = read_head(store);
        let slot = in_force.map_or(0, |h| 1 - h.slot);
        let mut sync = Sync {
            in_force,
            prepare: false,
            target: Target::new(slot),
            fresh: false,
            base: 0,
            grow_to: None,
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
            emptied: 0,
        };
        if in_force.is_none() {
            // The first publication: one walk of the whole feed fills both slots.
            sync.mirror = Some(Target::new(1 - slot));
            sync.restart_from_scratch(store)?;
            return Ok(sync);
        }
        match read_state(store, slot) {
            Some(st) if st.epoch != 0 => {
                sync.target = Target {
                    slot,
                    floor: st.floor,
                    epoch: st.epoch,
                    bits: st.bits,
                    count: st.count,
                    sweep: None,
                };
                sync.base = st.base;
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

    /// Empties the free slot (a new floor) and fetches everything.
    fn restart_from_scratch(&mut self, store: &dyn SharedStore) -> Result<(), Rejection> {
        let grow_to = self.grow_to.take();
        for t in std::iter::once(&mut self.target).chain(self.mirror.as_mut()) {
            // What the slot held before is swept when the refill completes.
            let before = read_state(store, t.slot).map(|st| st.bits);
            if let Some(bits) = before.into_iter().chain(t.sweep).max() {
                t.sweep = Some(bits);
            }
            if let Some(bits) = grow_to {
                t.bits = t.bits.max(bits);
            }
            let epoch = next_epoch(store)?;
            t.floor = epoch;
            t.epoch = epoch;
            t.count = 0;
            write_state(store, t.slot, t.state(0))?;
        }
        self.fresh = true;
        self.base = 0;
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
    /// as it is: `page` answers [`Sync::request`] and names a next cursor that is a SID after
    /// its own ([`valid_next_cursor`]; any other cursor refuses the page, so nothing is asked
    /// for with it). The poller asks for it before checking `page`, so that the control plane
    /// reads the next page meanwhile; if after the check [`Sync::request`] is something else,
    /// that answer is dropped.
    pub fn request_after(&self, page: &ChangesPage) -> Option<(u64, String)> {
        let next = page.next.as_ref()?;
        (page.since == self.since
            && page.after == self.after
            && valid_next_cursor(&page.after, next))
        .then(|| (self.since, next.clone()))
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
        if let Some(next) = &page.next {
            if !valid_next_cursor(&page.after, next) {
                return Err(invalid(
                    "next",
                    format!(
                        "invalid next cursor {:?}: not a SID after the page's cursor {:?}",
                        next.chars().take(80).collect::<String>(),
                        page.after
                    ),
                ));
            }
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
            let t = &self.target;
            let same = read_meta(store, t.slot, t.floor, u64::MAX)
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
        let ops = page_ops(page, catalog)?;
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
        if !self.fresh {
            // Above every epoch a head of this slot ever named: requests still reading the
            // slot by an older head see none of what this update writes.
            self.target.epoch = next_epoch(store)?;
            self.fresh = true;
        }
        // Into the slot, and on a first publication the same entries into the other slot, at
        // its own epoch.
        for t in std::iter::once(&mut self.target).chain(self.mirror.as_mut()) {
            let (written, emptied) = t.write(store, &ops)?;
            self.records += written;
            self.emptied += emptied;
            write_state(store, t.slot, t.state(self.base))?;
        }
        self.pages += 1;
        self.newest = page.version;
        let t = &self.target;
        if t.count > MAX_LOAD << t.bits && t.bits < MAX_BUCKET_BITS {
            // Too many entries per bucket: refill with more buckets.
            self.grow_to = Some(bits_for(t.count));
            self.restart_from_scratch(store)?;
            return Ok(Step::More);
        }
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

    fn finish(
        &mut self,
        store: &dyn SharedStore,
        meta: &ConfigDoc,
        now_s: u64,
    ) -> Result<Step, Rejection> {
        let v = meta.version;
        let json = to_json(meta)?;
        for t in std::iter::once(&mut self.target).chain(self.mirror.as_mut()) {
            store
                .set(&meta_key(t.slot), &record(t.epoch, &json), 0)
                .map_err(|_| Rejection::Store)?;
            t.sweep(store)?;
            write_state(store, t.slot, t.state(v))?;
        }
        if self.in_force.is_some_and(|h| h.version >= v) {
            return Ok(Step::Ready(v));
        }
        let t = &self.target;
        set_head(
            store,
            Head {
                version: v,
                contacted_at_s: now_s,
                floor: t.floor,
                epoch: t.epoch,
                slot: t.slot,
                bits: t.bits,
            },
        )?;
        Ok(Step::Done(v))
    }
}

/// Checks every record of a page and encodes what it writes (nothing is written unless the
/// whole page is acceptable).
fn page_ops<'p>(page: &'p ChangesPage, catalog: &Catalog) -> Result<PageOps<'p>, Rejection> {
    // Record paths (`keys[3]`) are formatted into one buffer, and kept only for an error.
    use std::fmt::Write as _;
    let path_of = |list: &str, i: usize| format!("{list}[{i}]");
    let mut path = String::new();
    let mut sids: Vec<(&str, &'static str, usize)> =
        Vec::with_capacity(page.accounts.len() + page.keys.len() + page.deleted.len());
    let mut ops = Vec::with_capacity(page.accounts.len() + 2 * page.keys.len());
    let mut changed = Vec::with_capacity(page.keys.len() + page.deleted.len());
    for (i, a) in page.accounts.iter().enumerate() {
        path.clear();
        let _ = write!(path, "accounts[{i}]");
        compile_account_record_at(catalog, a, &path).map_err(Rejection::Invalid)?;
        sids.push((&a.sid, "accounts", i));
        ops.push(Op {
            kind: PRINCIPAL,
            id: Cow::Borrowed(a.sid.as_bytes()),
            payload: Some(principal_payload(b'A', a)?),
            owner: None,
        });
    }
    let bearer = page.settings.schemes.contains(&Scheme::Bearer);
    for (i, k) in page.keys.iter().enumerate() {
        path.clear();
        let _ = write!(path, "keys[{i}]");
        compile_key_record_at(catalog, k, &path).map_err(Rejection::Invalid)?;
        sids.push((&k.sid, "keys", i));
        ops.push(Op {
            kind: PRINCIPAL,
            id: Cow::Borrowed(k.sid.as_bytes()),
            payload: Some(principal_payload(b'K', k)?),
            owner: None,
        });
        let mut keeps = Vec::with_capacity(k.secrets.len());
        for (j, s) in k.secrets.iter().enumerate() {
            let d = digest_bytes(&s.digest)
                .ok_or_else(|| invalid(format!("keys[{i}].secrets[{j}].digest"), "not a digest"))?;
            keeps.push(d);
            if bearer {
                ops.push(Op {
                    kind: TOKEN,
                    id: Cow::Owned(d.to_vec()),
                    payload: Some(k.sid.as_bytes().to_vec()),
                    owner: None,
                });
            }
        }
        if !bearer {
            keeps.clear(); // no Bearer entries to keep
        }
        changed.push((k.sid.as_bytes(), keeps));
    }
    for (i, sid) in page.deleted.iter().enumerate() {
        sids.push((sid, "deleted", i));
        ops.push(Op {
            kind: PRINCIPAL,
            id: Cow::Borrowed(sid.as_bytes()),
            payload: None,
            owner: None,
        });
        changed.push((sid.as_bytes(), Vec::new()));
    }
    // SIDs name shared-data entries: the SID alphabet only, each once, all after the cursor,
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
    Ok(PageOps { ops, changed })
}

/// Validates a whole `keygate.config/v1` document and publishes it as the complete new version
/// (a fresh floor in the free slot, one page). Returns the published version.
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
    let bytes = read_meta(store, head.slot, head.floor, head.epoch)?;
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

    fn judge(
        store: &dyn SharedStore,
        cache: &RefCell<RecordCache>,
        auth: &[u8],
    ) -> Result<u64, Reason> {
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

    #[derive(Clone, Debug)]
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
            store: &dyn SharedStore,
            limit: usize,
            between: impl FnMut(&mut Model, u64),
        ) -> Result<(u64, Sync), Rejection> {
            let sync = Sync::begin(store)?;
            self.walk(store, limit, sync, between)
        }
        fn walk(
            &mut self,
            store: &dyn SharedStore,
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

    /// Every live entry of `slot` (kind, id, payload), read bucket by bucket.
    fn live_entries(store: &FakeStore, slot: u8) -> Vec<(u8, Vec<u8>, Vec<u8>)> {
        let st = read_state(store, slot).unwrap();
        let prefix = format!("kg:cfg:{slot}:b:");
        let map = store.map.borrow();
        let mut out: Vec<_> = map
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .flat_map(|(_, (v, _))| {
                entries(v)
                    .filter(|e| e.epoch >= st.floor)
                    .map(|e| (e.kind, e.id.to_vec(), e.payload.to_vec()))
                    .collect::<Vec<_>>()
            })
            .collect();
        out.sort();
        out
    }

    /// Shared-data names, and the bytes of their values (names that hold an empty value count
    /// as names only).
    fn footprint(store: &FakeStore) -> (usize, usize) {
        let map = store.map.borrow();
        (map.len(), map.values().map(|(v, _)| v.len()).sum())
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
        // Each slot holds the account, the two keys and their two Bearer entries: the digests
        // SK1 held in earlier versions are gone, not piled up.
        for slot in 0..2 {
            let live = live_entries(&store, slot);
            let kinds: Vec<u8> = live.iter().map(|e| e.0).collect();
            assert_eq!(kinds, b"ppptt", "slot {slot}: {live:?}");
        }
        // anchor + head + epoch counter + 2 × (state + meta) + buckets, at most one per entry.
        let (names, _) = footprint(&store);
        assert!(names <= 3 + 2 * (2 + 5 + 20), "{names}");
        let non_empty = store
            .map
            .borrow()
            .values()
            .filter(|(v, _)| !v.is_empty())
            .count();
        assert!(non_empty <= 3 + 2 * (2 + 5), "{non_empty}");
    }

    /// Creations, rotations and deletions of ever new SIDs and secrets: shared data keeps a
    /// bounded set of names (the slots' buckets) and, in them, only what is live.
    #[test]
    fn churn_leaves_only_live_entries_under_a_bounded_set_of_names() {
        let store = FakeStore::new();
        let cache = RefCell::new(RecordCache::default());
        let mut m = Model::new();
        m.put_key("SKsteady", "steady");
        m.sync(&store, 50, |_, _| {}).unwrap();
        let mut after_warm_up = (0, 0);
        for i in 0..600 {
            let sid = format!("SKc{i:05}");
            m.put_key(&sid, &format!("first{i}"));
            m.sync(&store, 50, |_, _| {}).unwrap();
            m.put_key(&sid, &format!("second{i}"));
            m.sync(&store, 50, |_, _| {}).unwrap();
            assert_eq!(
                judge(&store, &cache, format!("Bearer second{i}").as_bytes()),
                Ok(m.version)
            );
            assert_eq!(
                judge(&store, &cache, format!("Bearer first{i}").as_bytes()),
                Err(Reason::InvalidCredentials)
            );
            m.delete(&sid);
            m.sync(&store, 50, |_, _| {}).unwrap();
            if i == 99 {
                after_warm_up = footprint(&store);
            }
        }
        assert_eq!(
            judge(&store, &cache, &basic("SKsteady", "steady")),
            Ok(m.version)
        );
        // The slot in force: the account, the steady key, its token. The free one is one
        // version behind (the last key still there, with the Bearer entry of its second secret only).
        let in_force = read_head(&store).unwrap().slot;
        for (slot, want) in [(in_force, &b"ppt"[..]), (1 - in_force, &b"ppptt"[..])] {
            let kinds: Vec<u8> = live_entries(&store, slot).iter().map(|e| e.0).collect();
            assert_eq!(kinds, want, "slot {slot}");
            assert_eq!(read_state(&store, slot).unwrap().count, want.len() as u64);
        }
        let (names, bytes) = footprint(&store);
        // At most every bucket of both slots was ever used; the values hold three live entries
        // a slot (and the fixed records).
        assert!(
            names <= 3 + 2 * (2 + (1 << MIN_BUCKET_BITS)),
            "{names} names"
        );
        assert!(bytes < 4096, "{bytes} bytes");
        // And nothing grew after the first 100 cycles but names of buckets not used before.
        assert!(
            bytes <= after_warm_up.1 + 64,
            "{bytes} bytes, {after_warm_up:?} after 100 cycles"
        );
    }

    type Check<'a> = Box<dyn FnMut(&FakeStore) + 'a>;

    /// A store that runs `check` after every write: a request reading between any two steps of
    /// an update.
    struct Watched<'a> {
        inner: &'a FakeStore,
        check: RefCell<Check<'a>>,
        steps: std::cell::Cell<u32>,
    }

    impl SharedStore for Watched<'_> {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, crate::ratelimit::StoreError> {
            self.inner.get(key)
        }
        fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
            let r = self.inner.set(key, value, cas);
            self.steps.set(self.steps.get() + 1);
            (self.check.borrow_mut())(self.inner);
            r
        }
        fn absent_cas(&self) -> u32 {
            self.inner.absent_cas()
        }
    }

    fn payload_of(rec: &Rec) -> Vec<u8> {
        match rec {
            Rec::Account(a) => principal_payload(b'A', a).unwrap(),
            Rec::Key(k) => principal_payload(b'K', k).unwrap(),
        }
    }

    fn digests_of(m: &Model) -> Vec<(Vec<u8>, String)> {
        m.rows
            .iter()
            .filter_map(|(sid, (_, rec))| match rec {
                Some(Rec::Key(k)) => Some((k, sid)),
                _ => None,
            })
            .flat_map(|(k, sid)| {
                k.secrets
                    .iter()
                    .map(|s| (digest_bytes(&s.digest).unwrap().to_vec(), sid.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The slot that just went out of force is written at a fresh epoch: a request that read
    /// the head before it moved away (and still reads that slot) sees, at every step of the
    /// next update's writes into it, the entries of its own version or nothing, never one of the
    /// newer version; the new head sees exactly the newer version.
    #[test]
    fn a_request_holding_the_old_head_never_sees_the_next_version_while_it_is_written() {
        let store = FakeStore::new();
        let mut m = Model::new();
        for i in 0..10 {
            m.put_key(&format!("SK{i:02}"), &format!("a{i}"));
        }
        m.sync(&store, 4, |_, _| {}).unwrap();
        let old_head = read_head(&store).unwrap();
        let old = m.rows.clone();
        let old_digests = digests_of(&m);
        let old_meta = read_meta(&store, old_head.slot, old_head.floor, old_head.epoch).unwrap();
        // The head moves to the other slot (one change), so the old head's slot is free.
        m.put_key("SK09", "b9");
        m.sync(&store, 4, |_, _| {}).unwrap();
        let in_force = read_head(&store).unwrap();
        assert_ne!(in_force.slot, old_head.slot);
        let at_v2 = m.rows.clone();
        // The next update rotates, deletes, creates and leaves keys alone, over several pages,
        // with a change during its walk (a second walk).
        m.put_key("SK01", "b1");
        m.delete("SK02");
        m.put_key("SK05", "b5");
        m.put_key("SK77", "new");
        let checks = std::cell::Cell::new(0u32);
        let changed = |sid: &str, now: &BTreeMap<String, (u64, Option<Rec>)>| {
            now.get(sid).map(|r| r.0) != old.get(sid).map(|r| r.0)
        };
        let rows_now = RefCell::new(m.rows.clone());
        let watched = Watched {
            inner: &store,
            check: RefCell::new(Box::new(|s: &FakeStore| {
                checks.set(checks.get() + 1);
                let now = rows_now.borrow();
                for (sid, (_, rec)) in now.iter().chain(old.iter()) {
                    let seen = read_entry(s, &old_head, PRINCIPAL, sid.as_bytes());
                    let was = old.get(sid).and_then(|r| r.1.as_ref()).map(payload_of);
                    if changed(sid, &now) {
                        assert!(
                            seen.is_none() || seen == was,
                            "{sid}: a newer record {rec:?}"
                        );
                    } else {
                        assert_eq!(seen, was, "{sid}: unchanged, still readable");
                    }
                    // The version in force is not touched at all.
                    let in_force_sees = read_entry(s, &in_force, PRINCIPAL, sid.as_bytes());
                    let want = at_v2.get(sid).and_then(|r| r.1.as_ref()).map(payload_of);
                    assert_eq!(in_force_sees, want, "{sid} in force");
                }
                for (d, sid) in &old_digests {
                    let seen = read_entry(s, &old_head, TOKEN, d);
                    assert!(seen.is_none() || seen.as_deref() == Some(sid.as_bytes()));
                }
                for (d, _) in digests_of_rows(&now) {
                    if !old_digests.iter().any(|(o, _)| *o == d) {
                        assert_eq!(read_entry(s, &old_head, TOKEN, &d), None, "a new digest");
                    }
                }
                let meta = read_meta(s, old_head.slot, old_head.floor, old_head.epoch);
                assert!(
                    meta.is_none() || meta.as_ref() == Some(&old_meta),
                    "newer meta"
                );
            })),
            steps: std::cell::Cell::new(0),
        };
        let (v, sync) = m
            .sync(&watched, 2, |m, n| {
                if n == 1 {
                    m.put_key("SK03", "b3");
                    *rows_now.borrow_mut() = m.rows.clone();
                }
            })
            .unwrap();
        assert!(sync.pages > 3, "a second walk: {} pages", sync.pages);
        assert!(checks.get() >= 10, "{} steps checked", checks.get());
        drop(watched);
        let new_head = read_head(&store).unwrap();
        assert_eq!((new_head.version, new_head.slot), (v, old_head.slot));
        assert_eq!(new_head.floor, old_head.floor, "a delta, not a refill");
        assert!(new_head.epoch > old_head.epoch);
        // The new head sees exactly the new version.
        for (sid, (_, rec)) in m.rows.iter().chain(old.iter()) {
            let want = m.rows.get(sid).and_then(|r| r.1.as_ref()).map(payload_of);
            assert_eq!(
                read_entry(&store, &new_head, PRINCIPAL, sid.as_bytes()),
                want,
                "{sid} {rec:?}"
            );
        }
        let now_digests = digests_of(&m);
        for (d, sid) in &now_digests {
            assert_eq!(
                read_entry(&store, &new_head, TOKEN, d).as_deref(),
                Some(sid.as_bytes())
            );
        }
        for (d, _) in &old_digests {
            if !now_digests.iter().any(|(n, _)| n == d) {
                assert_eq!(read_entry(&store, &new_head, TOKEN, d), None, "rotated out");
            }
        }
    }

    fn digests_of_rows(rows: &BTreeMap<String, (u64, Option<Rec>)>) -> Vec<(Vec<u8>, String)> {
        let mut m = Model::new();
        m.rows = rows.clone();
        digests_of(&m)
    }

    /// A slot with more than `MAX_LOAD` entries per bucket is refilled from scratch with more
    /// buckets (the walk starts over), and the buckets it had before are swept.
    #[test]
    fn a_slot_that_outgrows_its_buckets_is_refilled_with_more() {
        let store = FakeStore::new();
        let cache = RefCell::new(RecordCache::default());
        let mut m = Model::new();
        for i in 0..600 {
            m.put_key(&format!("SK{i:04}"), &format!("s{i}"));
        }
        let (v, sync) = m.sync(&store, 100, |_, _| {}).unwrap();
        let head = read_head(&store).unwrap();
        assert_eq!(head.bits, 15, "1201 entries: 2^15 buckets");
        assert!(
            sync.pages > 7,
            "the walk started over: {} pages",
            sync.pages
        );
        for i in (0..600).step_by(37) {
            assert_eq!(
                judge(
                    &store,
                    &cache,
                    &basic(&format!("SK{i:04}"), &format!("s{i}"))
                ),
                Ok(v)
            );
            assert_eq!(
                judge(&store, &cache, format!("Bearer s{i}").as_bytes()),
                Ok(v)
            );
        }
        // What was written with 2^8 buckets before the refill is gone (swept), not just hidden.
        for slot in 0..2 {
            let st = read_state(&store, slot).unwrap();
            assert_eq!((st.bits, st.count), (15, 1201));
            assert_eq!(live_entries(&store, slot).len(), 1201);
            let map = store.map.borrow();
            let stale = map
                .iter()
                .filter(|(k, _)| k.starts_with(&format!("kg:cfg:{slot}:b:")))
                .flat_map(|(_, (v, _))| {
                    entries(v)
                        .filter(|e| e.epoch < st.floor)
                        .count()
                        .checked_sub(0)
                })
                .sum::<usize>();
            assert_eq!(stale, 0, "slot {slot}");
        }
    }

    /// A page's next cursor is checked before anything is asked for with it: only a SID after
    /// the page's own cursor is, anything else refuses the page and writes nothing.
    #[test]
    fn a_next_cursor_that_is_not_a_sid_after_the_cursor_refuses_the_page() {
        let store = FakeStore::new();
        let mut m = Model::new();
        for i in 0..6 {
            m.put_key(&format!("SK{i}"), "s");
        }
        m.sync(&store, 100, |_, _| {}).unwrap();
        for i in 0..6 {
            m.put_key(&format!("SK{i}"), "t");
        }
        let mut sync = Sync::begin(&store).unwrap();
        let (since, after) = sync.request();
        let first = m.page(since, after, 2);
        assert_eq!(first.next.as_deref(), Some("SK1"));
        assert_eq!(sync.request_after(&first), Some((since, "SK1".to_owned())));
        assert_eq!(sync.apply_page(&store, &first, 200), Ok(Step::More));
        let (since, after) = sync.request();
        let second = m.page(since, after, 2);
        let before = store.map.borrow().clone();
        let long = format!("SK{}", "9".repeat(63));
        for bad in [
            "SK3&known=0&wait=0",
            "SK3/../../v1/accounts",
            "SK3 HTTP/1.1",
            "SK3%26x",
            "",
            "SK0",
            "SK1",
            long.as_str(),
        ] {
            let page = ChangesPage {
                next: Some(bad.to_owned()),
                ..second.clone()
            };
            assert_eq!(sync.request_after(&page), None, "{bad:?} asked for");
            let err = sync.apply_page(&store, &page, 200).unwrap_err();
            assert!(
                matches!(&err, Rejection::Invalid(e) if e.path == "next" && e.message.contains("invalid next cursor")),
                "{bad:?}: {err:?}"
            );
            assert_eq!(*store.map.borrow(), before, "{bad:?}: nothing written");
        }
        assert!(valid_next_cursor("SK1", "SK3"));
        assert!(valid_next_cursor("", &"S".repeat(64)));
        assert!(!valid_next_cursor("", &"S".repeat(65)));
        assert_eq!(sync.apply_page(&store, &second, 200), Ok(Step::More));
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
