//! The update writer: brings the free slot to the newest version page by page from the change
//! feed, checking every page completely before it writes, then moves the head.

use std::borrow::Cow;
use std::collections::BTreeMap;

use super::layout::*;
use super::read::read_head;
use crate::compile::{
    compile_account_record_at, compile_catalog, compile_key_record_at, Catalog, ConfigError,
};
use crate::config::{ChangesPage, ConfigDoc, KeyDoc, Scheme, CHANGES_SCHEMA_V1};
use crate::store::{put_bucket_key, slot_settings_key, SharedStore, HEAD_KEY};

/// Live entries per bucket (on average) above which a slot is refilled with more buckets.
pub const MAX_LOAD: u64 = 4;
/// A refill from scratch sweeps the buckets the slot had before when it completes, if they are
/// at most `2^MAX_SWEEP_BITS` (more would hold the poller's thread too long in one callback;
/// the leftovers are then dropped as their buckets are written).
pub(super) const MAX_SWEEP_BITS: u8 = 16;
/// Walks of the change feed one update may take before it gives up (each walk after the first
/// fetches only what changed during the previous one).
pub const MAX_WALKS: u32 = 16;

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

pub(super) fn invalid(path: impl Into<String>, message: impl Into<String>) -> Rejection {
    Rejection::Invalid(ConfigError {
        path: path.into(),
        message: message.into(),
    })
}

pub(super) fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, Rejection> {
    serde_json::to_vec(v).map_err(|e| invalid("", e.to_string()))
}

/// A principal's payload: `tag` (`A`ccount, `K`ey) and the document as JSON, in one buffer.
pub(super) fn principal_payload<T: serde::Serialize>(
    tag: u8,
    doc: &T,
) -> Result<Vec<u8>, Rejection> {
    let mut v = Vec::with_capacity(256);
    v.push(tag);
    serde_json::to_writer(&mut v, doc).map_err(|e| invalid("", e.to_string()))?;
    Ok(v)
}

/// A version's settings, APIs and limits without its version number (to tell whether the
/// catalogue changed between two versions).
pub(super) fn settings_fingerprint(settings: &ConfigDoc) -> Result<Vec<u8>, Rejection> {
    to_json(&ConfigDoc {
        version: 0,
        ..settings.clone()
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
pub(super) struct Op<'p> {
    kind: u8,
    id: Cow<'p, [u8]>,
    payload: Option<Vec<u8>>,
    owner: Option<&'p [u8]>,
}

/// What a checked page writes: its entries, and the SIDs it changes with the token digests each
/// still holds (the Bearer entries of the digests their earlier records held, and no longer do,
/// are removed).
pub(super) struct PageOps<'p> {
    ops: Vec<Op<'p>>,
    changed: Vec<(&'p [u8], Vec<[u8; 32]>)>,
}

/// A slot an update writes into: its entries at epochs from `floor` on are its content, this
/// update writes at `epoch`; `2^bits` buckets, `count` live entries; `sweep`: after a refill
/// from scratch, the bucket bits of what the slot held before (swept when the refill completes).
#[derive(Debug, Clone, Copy)]
pub(super) struct Target {
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

pub(super) fn digest_bytes(hex_digest: &str) -> Option<[u8; 32]> {
    let v = hex::decode(hex_digest).ok()?;
    <[u8; 32]>::try_from(v.as_slice()).ok()
}

/// Bucket bits for a slot of `count` live entries: room for 16 times as many (so a slot that
/// grows is refilled rarely), within the bounds.
pub(super) fn bits_for(count: u64) -> u8 {
    let need = count.max(1).next_power_of_two().trailing_zeros() + 4;
    u8::try_from(need)
        .unwrap_or(MAX_BUCKET_BITS)
        .clamp(MIN_BUCKET_BITS, MAX_BUCKET_BITS)
}

/// What the caller does after a page was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Fetch the page [`Update::request`] names now.
    More,
    /// The version is complete and in force.
    Done(u64),
    /// The free slot is complete at the version in force (a warm-up, [`Update::warm_up`]); the
    /// head did not move.
    Ready(u64),
}

/// What an update is for.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Nothing is in force yet: one walk of the whole feed fills the free slot and, with the
    /// same entries at its own epoch, the other one (`mirror`), so that the first change after
    /// the first publication travels alone (no second walk to warm it up).
    FirstFill { mirror: Target },
    /// A version newer than the one in force is written into the free slot, then the head moves.
    Delta,
    /// The free slot is filled up to (at least) the version in force, which is acceptable
    /// itself ([`Step::Ready`]); a newer version arriving during the walk is published as usual.
    WarmUp,
}

impl Mode {
    /// The other slot a first fill writes too.
    fn mirror(&mut self) -> Option<&mut Target> {
        match self {
            Mode::FirstFill { mirror } => Some(mirror),
            Mode::Delta | Mode::WarmUp => None,
        }
    }
}

/// Progress of one update: the free slot being brought to the newest version, page by page.
/// Lives in the poller's VM; if that VM goes away, the next poller starts over from the slot's
/// state (anything written since is rewritten).
pub struct Update {
    in_force: Option<Head>,
    mode: Mode,
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
    settings: Option<Vec<u8>>,
    catalog: Option<Catalog>,
    /// The slot's settings record was compared with the update's (a slot whose catalogue
    /// differs is filled from scratch).
    checked_slot_settings: bool,
    /// Pages applied, records written (a deletion counts as one) and Bearer entries emptied so
    /// far (for logs).
    pub pages: u64,
    pub records: u64,
    pub emptied: u64,
}

impl Update {
    /// Starts an update of the free slot from the version it is complete at (with nothing in
    /// force, the first fill of both slots).
    pub fn begin(store: &dyn SharedStore) -> Result<Update, Rejection> {
        let in_force = read_head(store);
        let slot = in_force.map_or(0, |h| 1 - h.slot);
        let mut sync = Update {
            in_force,
            mode: match in_force {
                None => Mode::FirstFill {
                    mirror: Target::new(1 - slot),
                },
                Some(_) => Mode::Delta,
            },
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
            settings: None,
            catalog: None,
            checked_slot_settings: false,
            pages: 0,
            records: 0,
            emptied: 0,
        };
        if in_force.is_none() {
            // The first publication: one walk of the whole feed fills both slots.
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
    /// would then have to fetch everything again; [`Update::warm_up`] does that ahead of time.
    pub fn free_slot_is_empty(store: &dyn SharedStore) -> bool {
        match read_head(store) {
            Some(h) => read_state(store, 1 - h.slot).is_none_or(|st| st.epoch == 0 || st.base == 0),
            None => false,
        }
    }

    /// Starts filling the free slot up to (at least) the version in force, so that later
    /// updates only carry changes (a warm-up). If a newer version arrives during the walk, it is
    /// published as usual when the walk completes. With nothing in force there is nothing to
    /// warm up: this is the first fill ([`Update::begin`]).
    pub fn warm_up(store: &dyn SharedStore) -> Result<Update, Rejection> {
        let mut update = Update::begin(store)?;
        if let Mode::Delta = update.mode {
            update.mode = Mode::WarmUp;
        }
        Ok(update)
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
        for t in std::iter::once(&mut self.target).chain(self.mode.mirror()) {
            // What the slot held before is swept when the refill completes.
            let before = read_state(store, t.slot).map(|st| st.bits);
            if let Some(bits) = before.into_iter().chain(t.sweep).max() {
                t.sweep = Some(bits);
            }
            if let Some(bits) = grow_to {
                t.bits = t.bits.max(bits);
            }
            let epoch = next_epoch(store).ok_or(Rejection::Store)?;
            t.floor = epoch;
            t.epoch = epoch;
            t.count = 0;
            write_state(store, t.slot, t.state(0)).map_err(|_| Rejection::Store)?;
        }
        self.fresh = true;
        self.base = 0;
        self.since = 0;
        self.after.clear();
        self.walk_version = None;
        self.walk_consistent = true;
        self.checked_slot_settings = true;
        self.settings = None;
        self.catalog = None;
        Ok(())
    }

    /// The page to fetch next: changes after version `since`, SIDs after `after`.
    pub fn request(&self) -> (u64, &str) {
        (self.since, &self.after)
    }

    /// Whether this update fills both slots (the first publication).
    pub fn fills_both_slots(&self) -> bool {
        matches!(self.mode, Mode::FirstFill { .. })
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

    /// The request that follows `page` if [`Update::apply_page`] accepts it and the walk goes on
    /// as it is: `page` answers [`Update::request`] and names a next cursor that is a SID after
    /// its own ([`valid_next_cursor`]; any other cursor refuses the page, so nothing is asked
    /// for with it). The poller asks for it before checking `page`, so that the control plane
    /// reads the next page meanwhile; if after the check [`Update::request`] is something else,
    /// that answer is dropped.
    pub fn request_after(&self, page: &ChangesPage) -> Option<(u64, String)> {
        let next = page.next.as_ref()?;
        (page.since == self.since
            && page.after == self.after
            && valid_next_cursor(&page.after, next))
        .then(|| (self.since, next.clone()))
    }

    /// Validates one page (from [`Update::parse`]) completely and, if it is acceptable, writes its
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
        if page.version < in_force
            || (page.version == in_force && !matches!(self.mode, Mode::WarmUp))
        {
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
        let settings = page.settings_doc();
        let fingerprint = settings_fingerprint(&settings)?;
        // The catalogue is compiled once per update: later pages repeat the same settings.
        let compiled = match (&self.settings, &self.catalog) {
            (Some(m), Some(_)) if *m == fingerprint => None,
            _ => Some(compile_catalog(&settings).map_err(Rejection::Invalid)?),
        };
        if !self.checked_slot_settings {
            // The slot's records were validated against its own catalogue: if that changed,
            // they must all be fetched and checked again.
            self.checked_slot_settings = true;
            let t = &self.target;
            let same = read_settings(store, t.slot, t.floor, u64::MAX)
                .and_then(|b| serde_json::from_slice::<ConfigDoc>(&b).ok())
                .and_then(|d| settings_fingerprint(&d).ok())
                .is_some_and(|f| f == fingerprint);
            if !same {
                self.restart_from_scratch(store)?;
                return Ok(Step::More);
            }
        }
        match &self.settings {
            Some(m) if *m != fingerprint => {
                return Err(invalid(
                    "",
                    "the settings, APIs or limits changed during the update",
                ))
            }
            Some(_) => {}
            None => self.settings = Some(fingerprint),
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
            self.target.epoch = next_epoch(store).ok_or(Rejection::Store)?;
            self.fresh = true;
        }
        // Into the slot, and on a first publication the same entries into the other slot, at
        // its own epoch.
        for t in std::iter::once(&mut self.target).chain(self.mode.mirror()) {
            let (written, emptied) = t.write(store, &ops)?;
            self.records += written;
            self.emptied += emptied;
            write_state(store, t.slot, t.state(self.base)).map_err(|_| Rejection::Store)?;
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
        self.finish(store, &settings, now_s)
    }

    fn finish(
        &mut self,
        store: &dyn SharedStore,
        settings: &ConfigDoc,
        now_s: u64,
    ) -> Result<Step, Rejection> {
        let v = settings.version;
        let json = to_json(settings)?;
        for t in std::iter::once(&mut self.target).chain(self.mode.mirror()) {
            store
                .set(&slot_settings_key(t.slot), &record(t.epoch, &json), 0)
                .map_err(|_| Rejection::Store)?;
            t.sweep(store)?;
            write_state(store, t.slot, t.state(v)).map_err(|_| Rejection::Store)?;
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
pub(super) fn page_ops<'p>(
    page: &'p ChangesPage,
    catalog: &Catalog,
) -> Result<PageOps<'p>, Rejection> {
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
/// (a fresh floor in the free slot, one page). Returns the published version. Test support: the
/// filter publishes from the change feed ([`Update`]).
#[cfg(any(test, feature = "testing"))]
pub fn publish(store: &dyn SharedStore, json: &[u8], now_s: u64) -> Result<u64, Rejection> {
    let doc = crate::compile::parse(json).map_err(Rejection::Invalid)?;
    crate::compile::compile_doc(&doc).map_err(Rejection::Invalid)?;
    let mut sync = Update::begin(store)?;
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

pub(super) fn set_head(store: &dyn SharedStore, head: Head) -> Result<(), Rejection> {
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
