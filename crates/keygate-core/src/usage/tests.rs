use super::*;
use crate::store::testing::FakeStore;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

/// 2026-11-24T10:00:00Z.
const T0_US: u64 = crate::testing::T0 * 1_000_000;

fn used(key: &str, tag: u8) -> Used {
    Used {
        account_sid: Arc::from("AC1"),
        key_sid: Some(Arc::from(key)),
        secret: [tag; 8],
    }
}

fn on() -> Usage {
    let u = Usage::default();
    u.enable(true);
    u
}

/// The sender's host: every post gets the next token; what was posted and reported is kept.
#[derive(Default)]
struct Wire {
    posted: Vec<(u32, String)>,
    events: Vec<SendEvent>,
    refuse_sends: bool,
}

impl Post for Wire {
    fn post(&mut self, body: &[u8]) -> Option<u32> {
        if self.refuse_sends {
            return None;
        }
        let token = self.posted.len() as u32 + 1;
        self.posted
            .push((token, String::from_utf8(body.to_vec()).unwrap()));
        Some(token)
    }
    fn report(&mut self, event: SendEvent) {
        self.events.push(event);
    }
}

impl Wire {
    fn last(&self) -> (u32, UsageBatch) {
        let (t, body) = self.posted.last().unwrap();
        (*t, serde_json::from_str(body).unwrap())
    }
}

/// Adds a batch's counts into `total` as the control plane would: once per batch id.
fn apply(total: &mut BTreeMap<(u64, String, Option<String>), (u64, u64)>, b: &UsageBatch) {
    for e in &b.entries {
        let t = total
            .entry((e.minute, e.account_sid.clone(), e.key_sid.clone()))
            .or_default();
        t.0 += e.allowed;
        t.1 += e.denied.values().sum::<u64>();
    }
}

#[test]
fn nothing_is_counted_until_usage_is_enabled() {
    let u = Usage::default();
    u.allowed(&used("SK1", 1), T0_US);
    assert!(u.is_empty());
    u.enable(true);
    u.allowed(&used("SK1", 1), T0_US);
    assert!(!u.is_empty());
}

#[test]
fn a_vm_counts_per_minute_principal_reason_and_secret() {
    let u = on();
    u.allowed(&used("SK1", 1), T0_US);
    u.allowed(&used("SK1", 2), T0_US + 5_000_000);
    u.denied(&used("SK1", 1), T0_US + 7_000_000, Reason::RateLimitedKey);
    u.allowed(&used("SK1", 1), T0_US + 61_000_000);
    let store = FakeStore::new();
    assert!(flush(&store, &u, 0xabc));
    assert!(u.is_empty());
    let r = read_record(&store).unwrap();
    assert_eq!(r.nonce, "0000000000000abc");
    assert_eq!(r.acc.len(), 2, "two minutes");
    let first = &r.acc[0];
    assert_eq!(first.minute, crate::testing::T0);
    assert_eq!(first.key_sid.as_deref(), Some("SK1"));
    assert_eq!(first.allowed, 2);
    assert_eq!(first.denied.get("rate_limited_key"), Some(&1));
    let mut secrets = first.secrets.clone();
    secrets.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(
        secrets,
        vec![
            SecretUse {
                id: "0101010101010101".into(),
                n: 2,
                last_used_s: crate::testing::T0 + 7,
            },
            SecretUse {
                id: "0202020202020202".into(),
                n: 1,
                last_used_s: crate::testing::T0 + 5,
            },
        ]
    );
    assert_eq!(r.acc[1].minute, crate::testing::T0 + 60);
}

#[test]
fn vms_add_into_one_record_and_a_vm_that_loses_every_cas_keeps_its_counts() {
    let store = FakeStore::new();
    let (a, b) = (on(), on());
    a.allowed(&used("SK1", 1), T0_US);
    b.allowed(&used("SK1", 1), T0_US);
    b.allowed(&used("SK2", 1), T0_US);
    assert!(flush(&store, &a, 1));
    store.conflicts.set(1000);
    assert!(!flush(&store, &b, 2));
    assert!(!b.is_empty(), "kept for the next tick");
    store.conflicts.set(0);
    b.allowed(&used("SK2", 1), T0_US);
    assert!(flush(&store, &b, 2));
    let r = read_record(&store).unwrap();
    assert_eq!(
        r.nonce,
        format!("{:016x}", 1),
        "the first VM's nonce names the process"
    );
    let counts: Vec<(Option<&str>, u64)> = r
        .acc
        .iter()
        .map(|e| (e.key_sid.as_deref(), e.allowed))
        .collect();
    assert_eq!(counts, vec![(Some("SK1"), 2), (Some("SK2"), 2)]);
}

#[test]
fn a_full_record_drops_new_entries_and_reports_their_requests() {
    let store = FakeStore::new();
    let u = on();
    for i in 0..ACC_MAX_ENTRIES + 3 {
        u.allowed(&used(&format!("SK{i}"), 1), T0_US);
    }
    u.denied(&used("SKx", 1), T0_US, Reason::PermissionDenied);
    assert!(flush(&store, &u, 1));
    let r = read_record(&store).unwrap();
    assert_eq!(r.acc.len(), ACC_MAX_ENTRIES);
    assert_eq!(r.dropped, 4);
    // An entry already held still adds up.
    let again = on();
    again.allowed(&used(&r.acc[0].key_sid.clone().unwrap(), 1), T0_US);
    assert!(flush(&store, &again, 1));
    assert_eq!(read_record(&store).unwrap().acc[0].allowed, 2);
}

#[test]
fn a_batch_is_resent_under_the_same_id_until_acknowledged_and_never_counted_twice() {
    let store = FakeStore::new();
    let vm = on();
    let mut sender = Sender::default();
    let mut wire = Wire::default();
    let mut applied = BTreeMap::new();
    let mut seen_ids = std::collections::HashSet::new();
    let mut sent_total = 0u64;
    let mut now = T0_US;
    // 40 rounds: each adds requests, ticks, and the control plane answers 503, times out, or
    // takes the batch (a taken batch is applied once per id whatever happens after).
    for round in 0..40u64 {
        for _ in 0..(round % 3 + 1) {
            vm.allowed(&used(&format!("SK{}", round % 4), 1), now);
            sent_total += 1;
        }
        assert!(flush(&store, &vm, 7));
        now += SEND_EVERY_US + MAX_BACKOFF_MS * 1500;
        sender.on_tick(&store, "edge-1", now, 1, &mut wire);
        if !sender.in_flight() {
            continue;
        }
        let (token, batch) = wire.last();
        let status: &[u8] = match round % 5 {
            0 => b"503",
            1 => b"",
            // Applied, but the answer is lost: sent again, must not count again.
            2 => {
                if seen_ids.insert(batch.batch.clone()) {
                    apply(&mut applied, &batch);
                }
                b""
            }
            _ => {
                if seen_ids.insert(batch.batch.clone()) {
                    apply(&mut applied, &batch);
                }
                b"200"
            }
        };
        assert!(sender.on_response(&store, token, status, now, 1, &mut wire));
    }
    // Drain what is left.
    for _ in 0..20 {
        now += SEND_EVERY_US + MAX_BACKOFF_MS * 1500;
        sender.on_tick(&store, "edge-1", now, 1, &mut wire);
        if sender.in_flight() {
            let (token, batch) = wire.last();
            if seen_ids.insert(batch.batch.clone()) {
                apply(&mut applied, &batch);
            }
            sender.on_response(&store, token, b"200", now, 1, &mut wire);
        }
    }
    let total: u64 = applied.values().map(|(a, _)| a).sum();
    assert_eq!(total, sent_total, "every request once");
    let r = read_record(&store).unwrap();
    assert!(r.acc.is_empty() && r.out.is_none());
    // Retries carried the same bytes: every id was posted with one body only.
    let mut bodies: HashMap<String, String> = HashMap::new();
    for (_, body) in &wire.posted {
        let b: UsageBatch = serde_json::from_str(body).unwrap();
        let prev = bodies.insert(b.batch.clone(), body.clone());
        assert!(prev.is_none_or(|p| p == *body), "{}", b.batch);
        assert!(b.batch.starts_with("edge-1.0000000000000007."));
    }
    assert!(wire
        .events
        .iter()
        .any(|e| matches!(e, SendEvent::Sent { again: true, .. })));
}

#[test]
fn a_new_poller_vm_sends_the_batch_its_predecessor_left() {
    let store = FakeStore::new();
    let vm = on();
    vm.allowed(&used("SK1", 1), T0_US);
    flush(&store, &vm, 1);
    let mut old = Sender::default();
    let mut wire = Wire::default();
    old.on_tick(&store, "e", T0_US + SEND_EVERY_US, 1, &mut wire);
    let (_, first) = wire.last();
    // The old VM goes away with its batch out; counts go on arriving.
    vm.allowed(&used("SK1", 1), T0_US);
    flush(&store, &vm, 1);
    let mut new = Sender::default();
    let mut wire2 = Wire::default();
    new.on_tick(&store, "e", T0_US + SEND_EVERY_US, 2, &mut wire2);
    let (token, again) = wire2.last();
    assert_eq!(again, first, "the same batch, not the newer counts");
    new.on_response(&store, token, b"200", T0_US, 2, &mut wire2);
    // The old VM's late answer to the same batch clears nothing more.
    let r = read_record(&store).unwrap();
    assert_eq!((r.out, r.acc.len(), r.seq), (None, 1, 1));
    new.on_tick(&store, "e", T0_US + 2 * SEND_EVERY_US, 2, &mut wire2);
    let (_, next) = wire2.last();
    assert_eq!(next.batch, "e.0000000000000001.2");
    assert_eq!(next.entries[0].allowed, 1);
}

#[test]
fn a_batch_the_control_plane_refuses_for_good_is_dropped_and_auth_failures_retry() {
    let store = FakeStore::new();
    let vm = on();
    vm.allowed(&used("SK1", 1), T0_US);
    flush(&store, &vm, 1);
    let mut s = Sender::default();
    let mut wire = Wire::default();
    let mut now = T0_US + SEND_EVERY_US;
    s.on_tick(&store, "e", now, 1, &mut wire);
    let (token, _) = wire.last();
    s.on_response(&store, token, b"401", now, 1, &mut wire);
    assert!(read_record(&store).unwrap().out.is_some(), "kept: 401");
    // Backing off: nothing is sent before the backoff ends.
    s.on_tick(&store, "e", now + 1000, 1, &mut wire);
    assert_eq!(wire.posted.len(), 1);
    now += MAX_BACKOFF_MS * 2000;
    s.on_tick(&store, "e", now, 1, &mut wire);
    let (token, _) = wire.last();
    assert_eq!(wire.posted.len(), 2);
    s.on_response(&store, token, b"400", now, 1, &mut wire);
    assert_eq!(read_record(&store).unwrap().out, None);
    assert_eq!(
        wire.events.last(),
        Some(&SendEvent::Refused {
            seq: 1,
            status: b"400".to_vec()
        })
    );
    // Nothing was sent when the call could not go out; the batch waits in the record.
    vm.allowed(&used("SK1", 1), T0_US);
    flush(&store, &vm, 1);
    wire.refuse_sends = true;
    now += SEND_EVERY_US;
    s.on_tick(&store, "e", now, 1, &mut wire);
    assert_eq!(wire.events.last(), Some(&SendEvent::NotSent));
    assert!(read_record(&store).unwrap().out.is_some());
    // An answer to a call that is not the sender's is left to the poller.
    assert!(!s.on_response(&store, 999, b"200", now, 1, &mut wire));
}

#[test]
fn batches_wait_for_the_send_period_and_hold_at_most_batch_max_entries() {
    let store = FakeStore::new();
    let vm = on();
    for i in 0..BATCH_MAX_ENTRIES + 5 {
        vm.allowed(&used(&format!("SK{i:04}"), 1), T0_US);
    }
    flush(&store, &vm, 1);
    let mut s = Sender::default();
    let mut wire = Wire::default();
    s.on_tick(&store, "e", T0_US + SEND_EVERY_US, 1, &mut wire);
    let (token, b) = wire.last();
    assert_eq!(b.entries.len(), BATCH_MAX_ENTRIES);
    s.on_response(&store, token, b"204", T0_US, 1, &mut wire);
    // Before the period is over, nothing new is taken.
    s.on_tick(&store, "e", T0_US + SEND_EVERY_US + 250_000, 1, &mut wire);
    assert_eq!(wire.posted.len(), 1);
    s.on_tick(&store, "e", T0_US + 2 * SEND_EVERY_US, 1, &mut wire);
    assert_eq!(wire.last().1.entries.len(), 5);
}

#[test]
fn the_control_plane_checks_every_field_of_a_batch() {
    let good = UsageBatch {
        batch: "edge-1.00ab.3".into(),
        entries: vec![UsageEntry {
            minute: 120,
            account_sid: "AC1".into(),
            key_sid: Some("SK1".into()),
            allowed: 1,
            denied: BTreeMap::from([("rate_limited_key".into(), 1)]),
            secrets: vec![SecretUse {
                id: "0123456789abcdef".into(),
                n: 2,
                last_used_s: 130,
            }],
        }],
        dropped: 0,
    };
    assert_eq!(check_batch(&good), Ok(()));
    let bad = |f: &dyn Fn(&mut UsageBatch)| {
        let mut b = good.clone();
        f(&mut b);
        check_batch(&b).unwrap_err()
    };
    let id_rule = "batch: must be 1 to 200 characters of A-Z, a-z, 0-9, '_', '-' and '.'";
    assert_eq!(bad(&|b| b.batch = "a b".into()), id_rule);
    assert_eq!(bad(&|b| b.batch = String::new()), id_rule);
    assert_eq!(
        bad(&|b| b.entries[0].minute = 61),
        "entries[0].minute: must be a multiple of 60"
    );
    assert_eq!(
        bad(&|b| b.entries[0].account_sid = "AC 1".into()),
        "entries[0].account_sid: not a SID"
    );
    assert_eq!(
        bad(&|b| b.entries[0].key_sid = Some(String::new())),
        "entries[0].key_sid: not a SID"
    );
    assert_eq!(
        bad(&|b| {
            b.entries[0].denied.insert("nope".into(), 1);
        }),
        "entries[0].denied: unknown reason \"nope\""
    );
    assert_eq!(
        bad(&|b| b.entries[0].secrets[0].id = "0123456789ABCDEF".into()),
        "entries[0].secrets[0].id: must be 16 lowercase hex digits"
    );
}

#[test]
fn the_usage_path_sits_beside_the_change_feed() {
    assert_eq!(usage_path("/v1/edge/changes"), "/v1/edge/usage");
    assert_eq!(usage_path("/kg/v1/edge/changes"), "/kg/v1/edge/usage");
    assert_eq!(usage_path("/other"), "/v1/edge/usage");
}
