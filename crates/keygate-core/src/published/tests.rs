use std::cell::RefCell;

use super::layout::*;
use super::read::*;
use super::update::*;
use crate::compile::{Directory, Principal};
use crate::config::{AccountDoc, ChangesPage, KeyDoc, CHANGES_SCHEMA_V1};
use crate::config::{AccountStatus, ApiDoc, Role, SecretDoc, Settings};
use crate::headers::{AuthorizationHeader, RequestHead};
use crate::store::testing::FakeStore;
use crate::store::{slot_state_key, SetError, SharedStore, StoreError};
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

pub(crate) fn judge(
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

pub(crate) fn basic(user: &str, secret: &str) -> Vec<u8> {
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
pub(crate) struct Model {
    pub(crate) version: u64,
    pub(crate) apis: Vec<ApiDoc>,
    rows: BTreeMap<String, (u64, Option<Rec>)>,
    /// Pages whose follow-up request was asked for before the page was checked (as the
    /// poller does) and turned out to be the right one.
    predicted: u64,
}

impl Model {
    pub(crate) fn new() -> Model {
        let mut m = Model {
            version: 1,
            apis: serde_json::from_value(serde_json::json!([{"name": "calls", "methods": ["GET"], "paths": ["/v2/accounts/{account_sid}/calls"]}])).unwrap(),
            rows: BTreeMap::new(),
            predicted: 0,
        };
        m.put_account("AC1");
        m
    }
    pub(crate) fn put_account(&mut self, sid: &str) {
        self.version += 1;
        let a = AccountDoc {
            sid: sid.into(),
            status: AccountStatus::Active,
            auth_tokens: Vec::new(),
            allowed_ips: None,
            limits: None,
            region: None,
            regions: None,
        };
        self.rows
            .insert(sid.into(), (self.version, Some(Rec::Account(a))));
    }
    pub(crate) fn put_key(&mut self, sid: &str, secret: &str) {
        self.version += 1;
        self.rows.insert(
            sid.into(),
            (self.version, Some(Rec::Key(key_doc(sid, secret)))),
        );
    }
    pub(crate) fn delete(&mut self, sid: &str) {
        self.version += 1;
        self.rows.insert(sid.into(), (self.version, None));
    }
    pub(crate) fn page(&self, since: u64, after: &str, limit: usize) -> ChangesPage {
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
    fn update(
        &mut self,
        store: &dyn SharedStore,
        limit: usize,
        between: impl FnMut(&mut Model, u64),
    ) -> Result<(u64, Update), Rejection> {
        let sync = Update::begin(store)?;
        self.walk(store, limit, sync, between)
    }
    fn walk(
        &mut self,
        store: &dyn SharedStore,
        limit: usize,
        mut sync: Update,
        mut between: impl FnMut(&mut Model, u64),
    ) -> Result<(u64, Update), Rejection> {
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
    let mut bad = serde_json::from_slice::<serde_json::Value>(&doc(6, &[("SK9", "nine")])).unwrap();
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
        m.update(&store, 2, |_, _| {}).unwrap();
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
    m.update(&store, 50, |_, _| {}).unwrap();
    let mut after_warm_up = (0, 0);
    for i in 0..600 {
        let sid = format!("SKc{i:05}");
        m.put_key(&sid, &format!("first{i}"));
        m.update(&store, 50, |_, _| {}).unwrap();
        m.put_key(&sid, &format!("second{i}"));
        m.update(&store, 50, |_, _| {}).unwrap();
        assert_eq!(
            judge(&store, &cache, format!("Bearer second{i}").as_bytes()),
            Ok(m.version)
        );
        assert_eq!(
            judge(&store, &cache, format!("Bearer first{i}").as_bytes()),
            Err(Reason::InvalidCredentials)
        );
        m.delete(&sid);
        m.update(&store, 50, |_, _| {}).unwrap();
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
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
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
    m.update(&store, 4, |_, _| {}).unwrap();
    let old_head = read_head(&store).unwrap();
    let old = m.rows.clone();
    let old_digests = digests_of(&m);
    let old_settings =
        read_settings(&store, old_head.slot, old_head.floor, old_head.epoch).unwrap();
    // The head moves to the other slot (one change), so the old head's slot is free.
    m.put_key("SK09", "b9");
    m.update(&store, 4, |_, _| {}).unwrap();
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
            let settings = read_settings(s, old_head.slot, old_head.floor, old_head.epoch);
            assert!(
                settings.is_none() || settings.as_ref() == Some(&old_settings),
                "newer settings record"
            );
        })),
        steps: std::cell::Cell::new(0),
    };
    let (v, sync) = m
        .update(&watched, 2, |m, n| {
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
    let (v, sync) = m.update(&store, 100, |_, _| {}).unwrap();
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
    m.update(&store, 100, |_, _| {}).unwrap();
    for i in 0..6 {
        m.put_key(&format!("SK{i}"), "t");
    }
    let mut sync = Update::begin(&store).unwrap();
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
    let (v, sync) = m.update(&store, 4, |_, _| {}).unwrap();
    assert_eq!(v, m.version);
    assert_eq!(sync.pages, 7, "26 SIDs in pages of 4");
    assert_eq!(m.predicted, 6, "every page but the last names the next one");
    assert_eq!(
        sync.records,
        2 * (1 + 25 + 25),
        "the first walk fills both slots: every account, key and token twice"
    );
    assert!(!Update::free_slot_is_empty(&store), "no warm-up needed");
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
    let (v2, sync) = m.update(&store, 4, |_, _| {}).unwrap();
    assert_eq!(
        (sync.pages, sync.records),
        (1, 2),
        "the new key and its token"
    );
    assert_eq!(judge(&store, &cache, &basic("SK99", "new")), Ok(v2));
    // From now on each slot is complete at an older version: only changes travel.
    m.delete("SK03");
    m.put_key("SK04", "rotated");
    let (v3, sync) = m.update(&store, 4, |_, _| {}).unwrap();
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
    let (v4, sync) = m.update(&store, 4, |_, _| {}).unwrap();
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
        .update(&store, 3, |m, n| {
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
    let (v, _) = m.update(&store, 100, |_, _| {}).unwrap();
    m.delete("SK1");
    m.put_key("SK7", "s");
    let mut sync = Update::begin(&store).unwrap();
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
        Update::parse(b"{\"schema\":\"keygate.changes/v1\",\"version\":"),
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
    m.update(&store, 100, |_, _| {}).unwrap();
    for i in 0..10 {
        m.put_key(&format!("SK{i}"), "b");
    }
    // First attempt: two pages written into the free slot, then the poller goes away.
    let mut sync = Update::begin(&store).unwrap();
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
    let (v, _) = m.update(&store, 3, |_, _| {}).unwrap();
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
    m.update(&store, 100, |_, _| {}).unwrap();
    m.put_key("SK2", "b");
    m.update(&store, 100, |_, _| {}).unwrap();
    // Both slots are complete; now the catalogue changes (a control plane restarted with
    // another catalogue file) and one key changes.
    m.apis[0].methods = vec!["GET".into(), "POST".into()];
    m.put_key("SK3", "c");
    let (v, sync) = m.update(&store, 100, |_, _| {}).unwrap();
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
    assert!(!Update::free_slot_is_empty(&store), "nothing in force yet");
    let (v, _) = m.update(&store, 5, |_, _| {}).unwrap();
    // The first walk filled both slots; a free slot that lost its state (a version in
    // force from an older edge build, a fill that never finished) is empty.
    assert!(!Update::free_slot_is_empty(&store));
    let free = 1 - read_head(&store).unwrap().slot;
    store.map.borrow_mut().remove(&slot_state_key(free));
    assert!(Update::free_slot_is_empty(&store));
    // Without a warm-up the version in force is refused as "not newer".
    assert!(matches!(
        m.update(&store, 5, |_, _| {}),
        Err(Rejection::NotNewer { .. })
    ));
    let head = read_head(&store);
    let (ready, sync) = m
        .walk(&store, 5, Update::warm_up(&store).unwrap(), |_, _| {})
        .unwrap();
    assert_eq!((ready, sync.pages), (v, 3));
    assert_eq!(read_head(&store), head, "a warm-up does not move the head");
    assert!(!Update::free_slot_is_empty(&store));
    // The next change travels alone, into the warmed slot.
    m.delete("SK05");
    let (v2, sync) = m.update(&store, 5, |_, _| {}).unwrap();
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
    m.update(&fresh, 5, |_, _| {}).unwrap();
    let free = 1 - read_head(&fresh).unwrap().slot;
    fresh.map.borrow_mut().remove(&slot_state_key(free));
    let (v3, _) = m
        .walk(&fresh, 1, Update::warm_up(&fresh).unwrap(), |m, n| {
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
    m.update(&store, 10, |_, _| {}).unwrap();
    m.walk(&store, 10, Update::warm_up(&store).unwrap(), |_, _| {})
        .unwrap();
    m.delete("SK2");
    let mut sync = Update::begin(&store).unwrap();
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
