use super::*;
use crate::config::LimitScope;
use crate::ratelimit::Rate;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const MIN: u64 = 60_000_000;

fn cfg() -> FleetLimits {
    FleetLimits {
        mode: FleetMode::Lease,
        cluster: "rls".into(),
        domain: "keygate".into(),
        timeout_ms: 200,
        max_lease: 100,
        lease_divisor: 16,
    }
}

fn need(sid: &str, requests: u32) -> Need {
    Need {
        subject: Subject::Account {
            account_sid: sid.into(),
        },
        limit: LimitRate {
            rate: Rate {
                requests,
                period_us: MIN,
            },
            shadow: false,
            scope: LimitScope::Fleet,
        },
    }
}

/// The service as the protocol describes it: a fixed window per subject, a grant all or
/// nothing. (The real one is keygate-ratelimit over Redis, tested on its own.)
struct Service {
    limit: u32,
    window_start_us: u64,
    used: u32,
}

impl Service {
    fn ask(&mut self, hits: u32, now_us: u64) -> Answer {
        if now_us >= self.window_start_us + MIN {
            self.window_start_us = now_us - (now_us - self.window_start_us) % MIN;
            self.used = 0;
        }
        let reset_us = Some(self.window_start_us + MIN - now_us);
        if self.used + hits <= self.limit {
            self.used += hits;
            Answer::Granted {
                remaining: Some(self.limit - self.used),
                reset_us,
            }
        } else {
            Answer::OverLimit {
                remaining: self.limit - self.used,
                reset_us,
            }
        }
    }
}

/// Sends `ask` and its re-asks to the service at once; false if the service failed.
fn ask_all(vm: &mut Leases, svc: &mut Service, mut ask: Ask, now: u64, calls: &mut u32) -> bool {
    loop {
        vm.sent(&ask, now, 1);
        *calls += 1;
        let answer = svc.ask(ask.hits, now);
        match vm.answered(&ask.subject, ask.hits, now, MIN, answer, now) {
            After::AskAgain(again) => ask = again,
            After::Claim => return true,
            After::Failed => return false,
        }
    }
}

/// One request on `vm`, answered at once (asks and re-asks until the claim settles), then the
/// root's tick (the leases due ahead, answered at once).
fn one_request(vm: &mut Leases, svc: &mut Service, n: &Need, now: u64, calls: &mut u32) -> bool {
    let admitted = loop {
        match vm.claim(std::slice::from_ref(n), now) {
            Claim::Admitted => break true,
            Claim::Refused { .. } => break false,
            Claim::Wait(asks) => {
                for ask in asks {
                    if !ask_all(vm, svc, ask, now, calls) {
                        return false;
                    }
                }
            }
        }
    };
    for (ask, _) in vm.due(now) {
        ask_all(vm, svc, ask, now, calls);
    }
    admitted
}

#[test]
fn a_fleet_never_admits_more_than_the_limit_and_loses_at_most_the_documented_bound() {
    // 8 VMs (2 edges x 4 workers), 60 a minute, 400 requests spread over them in a
    // pseudo-random order: exactly at most 60, and at least 60 − 8 × min(max_lease, 60/16).
    for seed in 0..50u64 {
        let mut vms: Vec<Leases> = (0..8).map(|_| Leases::new(&cfg())).collect();
        let mut svc = Service {
            limit: 60,
            window_start_us: 0,
            used: 0,
        };
        let n = need("AC1", 60);
        let (mut admitted, mut calls) = (0, 0);
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        for i in 0..400u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            let vm = (x >> 33) as usize % 8;
            if one_request(&mut vms[vm], &mut svc, &n, 1_000 + i, &mut calls) {
                admitted += 1;
            }
        }
        assert!(admitted <= 60, "seed {seed}: {admitted} admitted");
        assert!(admitted >= 60 - 8 * 3, "seed {seed}: {admitted} admitted");
        assert_eq!(svc.used, 60, "seed {seed}: the service granted all of it");
    }
}

#[test]
fn leases_shrink_to_one_near_the_limit_and_a_hot_key_asks_once_per_max_lease() {
    let mut vm = Leases::new(&cfg());
    let mut svc = Service {
        limit: 1_000_000,
        window_start_us: 0,
        used: 0,
    };
    let n = need("AChot", 1_000_000);
    let mut calls = 0;
    for i in 0..10_000 {
        assert!(one_request(&mut vm, &mut svc, &n, 1_000 + i, &mut calls));
    }
    // One call per 100 requests (the last lease asked for ahead of need).
    assert!((100..=101).contains(&calls), "{calls} calls");

    // Near the limit: 40 left of 60 → 2, then 1s.
    let mut vm = Leases::new(&cfg());
    let n = need("AC2", 60);
    let mut svc = Service {
        limit: 60,
        window_start_us: 0,
        used: 20,
    };
    let mut sizes = Vec::new();
    for i in 0..40 {
        if let Claim::Wait(asks) = vm.claim(std::slice::from_ref(&n), 1_000 + i) {
            for ask in asks {
                sizes.push(ask.hits);
                vm.sent(&ask, 1_000 + i, 1);
                let a = svc.ask(ask.hits, 1_000 + i);
                vm.answered(&ask.subject, ask.hits, 1_000 + i, MIN, a, 1_000 + i);
            }
            assert_eq!(
                vm.claim(std::slice::from_ref(&n), 1_000 + i),
                Claim::Admitted
            );
        }
    }
    // First ask knows nothing (60/16 = 3); then remaining/16 shrinks to 1.
    assert_eq!(sizes.first(), Some(&3));
    assert_eq!(sizes.last(), Some(&1));
    assert!(sizes.windows(2).all(|w| w[1] <= w[0]), "{sizes:?}");
    assert_eq!(svc.used, 60);
}

#[test]
fn over_limit_with_hits_left_asks_for_what_is_left_and_none_left_refuses_until_the_window_ends() {
    let mut vm = Leases::new(&cfg());
    let n = need("AC3", 60);
    let Claim::Wait(asks) = vm.claim(std::slice::from_ref(&n), 0) else {
        panic!("a first request waits for a lease")
    };
    assert_eq!(asks.len(), 1);
    vm.sent(&asks[0], 0, 7);
    let after = vm.answered(
        &n.subject,
        asks[0].hits,
        0,
        MIN,
        Answer::OverLimit {
            remaining: 2,
            reset_us: Some(30_000_000),
        },
        10,
    );
    assert_eq!(
        after,
        After::AskAgain(Ask {
            subject: n.subject.clone(),
            hits: 1
        })
    );
    let after = vm.answered(
        &n.subject,
        1,
        10,
        MIN,
        Answer::OverLimit {
            remaining: 0,
            reset_us: Some(29_999_990),
        },
        20,
    );
    assert_eq!(after, After::Claim);
    match vm.claim(std::slice::from_ref(&n), 1_000_000) {
        Claim::Refused {
            kind,
            retry_after_s,
            ..
        } => assert_eq!((kind, retry_after_s), (LimitKind::Account, 29)),
        other => panic!("{other:?}"),
    }
    // The window over: it asks again.
    assert!(matches!(
        vm.claim(std::slice::from_ref(&n), 30_000_000),
        Claim::Wait(a) if a.len() == 1
    ));
}

#[test]
fn one_ask_in_flight_per_subject_until_answered_forgotten_orphaned_or_timed_out() {
    let mut vm = Leases::new(&cfg());
    let n = need("AC4", 6000);
    let Claim::Wait(asks) = vm.claim(std::slice::from_ref(&n), 0) else {
        panic!()
    };
    vm.sent(&asks[0], 0, 7);
    // Others wait on it without asking again.
    assert_eq!(
        vm.claim(std::slice::from_ref(&n), 100),
        Claim::Wait(Vec::new())
    );
    // Its sender's stream ended: the next claim asks.
    vm.orphan(7);
    let Claim::Wait(asks) = vm.claim(std::slice::from_ref(&n), 200) else {
        panic!()
    };
    assert_eq!(asks.len(), 1);
    vm.sent(&asks[0], 200, 8);
    // No answer within the timeout (200 ms): asked again.
    assert_eq!(
        vm.claim(std::slice::from_ref(&n), 200_200),
        Claim::Wait(Vec::new())
    );
    assert!(matches!(vm.claim(std::slice::from_ref(&n), 200_201), Claim::Wait(a) if a.len() == 1));
    vm.forget(&n.subject);
    assert!(matches!(vm.claim(std::slice::from_ref(&n), 200_202), Claim::Wait(a) if a.len() == 1));
}

#[test]
fn a_request_takes_from_every_need_or_from_none() {
    let mut vm = Leases::new(&cfg());
    let (a, b) = (need("ACa", 6000), need("ACb", 6000));
    vm.sent(
        &Ask {
            subject: a.subject.clone(),
            hits: 5,
        },
        0,
        1,
    );
    let granted = Answer::Granted {
        remaining: Some(100),
        reset_us: Some(MIN),
    };
    vm.answered(&a.subject, 5, 0, MIN, granted, 1);
    // b has nothing: the request waits and a keeps its 5.
    let both = [a.clone(), b.clone()];
    assert!(
        matches!(vm.claim(&both, 2), Claim::Wait(asks) if asks.len() == 1 && asks[0].subject == b.subject)
    );
    for _ in 0..5 {
        assert_eq!(vm.claim(std::slice::from_ref(&a), 3), Claim::Admitted);
    }
    assert!(matches!(
        vm.claim(std::slice::from_ref(&a), 3),
        Claim::Wait(_)
    ));
}

#[test]
fn leased_hits_are_spent_only_inside_their_window() {
    let mut vm = Leases::new(&cfg());
    let n = need("AC5", 6000);
    let granted = Answer::Granted {
        remaining: Some(5000),
        reset_us: Some(1_000_000),
    };
    vm.answered(&n.subject, 50, 0, MIN, granted, 5);
    assert_eq!(vm.claim(std::slice::from_ref(&n), 999_999), Claim::Admitted);
    // The window ended (sent at 0 + 1 s): the 49 left are dropped, not carried over.
    assert!(
        matches!(vm.claim(std::slice::from_ref(&n), 1_000_000), Claim::Wait(a) if a.len() == 1)
    );
}

#[test]
fn answers_are_read_from_the_wire_messages() {
    let status = |code: rls::Code, limited: bool, remaining: u32| rls::RateLimitResponse {
        overall_code: code as i32,
        statuses: vec![rls::DescriptorStatus {
            code: code as i32,
            current_limit: limited.then(|| rls::RateLimit {
                requests_per_unit: 60,
                unit: 2,
                name: String::new(),
            }),
            limit_remaining: remaining,
            duration_until_reset: Some(rls::Duration {
                seconds: 12,
                nanos: 500_000_000,
            }),
        }],
    };
    assert_eq!(
        read_answer(&status(rls::Code::Ok, true, 7)),
        Answer::Granted {
            remaining: Some(7),
            reset_us: Some(12_500_000)
        }
    );
    assert_eq!(
        read_answer(&status(rls::Code::Ok, false, 0)),
        Answer::Granted {
            remaining: None,
            reset_us: None
        }
    );
    assert_eq!(
        read_answer(&status(rls::Code::OverLimit, true, 3)),
        Answer::OverLimit {
            remaining: 3,
            reset_us: Some(12_500_000)
        }
    );
    assert_eq!(
        read_answer(&status(rls::Code::Unknown, true, 3)),
        Answer::Failed
    );
    let req = request(
        "keygate",
        &Ask {
            subject: need("AC9", 1).subject,
            hits: 4,
        },
    );
    assert_eq!(req.hits_addend, 4);
    assert_eq!(req.descriptors[0].entries[1].value, "AC9");
}

#[test]
fn the_fleet_limits_section_is_checked_with_exact_messages() {
    let parse = |s: &str| parse_fleet_limits(s.as_bytes()).map_err(|e| e.to_string());
    assert_eq!(parse(r#"{"version":1}"#), Ok(None));
    // Blank or not JSON: the plugin configuration reports it, not this section.
    assert_eq!(parse(""), Ok(None));
    assert_eq!(parse("{"), Ok(None));
    let c = parse(r#"{"control_plane":{},"fleet_limits":{"cluster":"rls"}}"#)
        .unwrap()
        .unwrap();
    assert_eq!(c, cfg());
    let envoy = parse(r#"{"fleet_limits":{"mode":"envoy"}}"#)
        .unwrap()
        .unwrap();
    assert_eq!(envoy.mode, FleetMode::Envoy);
    for (doc, message) in [
        (
            r#"{"fleet_limits":{}}"#,
            "fleet_limits.cluster: must name the Envoy cluster of the rate-limit service",
        ),
        (
            r#"{"fleet_limits":{"mode":"redis","cluster":"r"}}"#,
            "fleet_limits.mode: must be \"lease\" or \"envoy\"",
        ),
        (
            r#"{"fleet_limits":{"cluster":"r","timeout_ms":5}}"#,
            "fleet_limits.timeout_ms: must be between 10 and 5000",
        ),
        (
            r#"{"fleet_limits":{"cluster":"r","max_lease":0}}"#,
            "fleet_limits.max_lease: must be between 1 and 10000",
        ),
        (
            r#"{"fleet_limits":{"cluster":"r","lease_divisor":0}}"#,
            "fleet_limits.lease_divisor: must be between 1 and 1000",
        ),
        (
            r#"{"fleet_limits":{"cluster":"r","domain":""}}"#,
            "fleet_limits.domain: must be a non-empty printable name",
        ),
    ] {
        assert_eq!(parse(doc), Err(message.to_owned()), "{doc}");
    }
    assert!(parse(r#"{"fleet_limits":{"cluster":"r","extra":1}}"#)
        .unwrap_err()
        .starts_with("fleet_limits.extra: unknown field `extra`"));
    // The plugin configuration takes the section out of the document it compiles.
    let static_doc =
        br#"{"schema":"keygate.config/v1","version":3,"fleet_limits":{"cluster":"r"}}"#;
    assert!(crate::plugin::parse_plugin_config(static_doc).is_ok());
}

#[test]
fn a_lease_below_half_is_due_ahead_once_while_the_requests_spend_the_rest() {
    let mut vm = Leases::new(&cfg());
    let n = need("AC6", 1_000_000);
    let granted = Answer::Granted {
        remaining: Some(900_000),
        reset_us: Some(MIN),
    };
    vm.answered(&n.subject, 100, 0, MIN, granted.clone(), 1);
    // Every request is admitted; the 51st leaves 49 < 50 and makes the lease due, once.
    for i in 0..50 {
        assert_eq!(vm.claim(std::slice::from_ref(&n), 10 + i), Claim::Admitted);
        assert!(vm.due(10 + i).is_empty(), "request {i}");
    }
    assert_eq!(vm.claim(std::slice::from_ref(&n), 60), Claim::Admitted);
    assert_eq!(vm.claim(std::slice::from_ref(&n), 61), Claim::Admitted);
    let due = vm.due(62);
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].0.hits, due[0].1), (100, MIN));
    vm.sent(&due[0].0, 62, 1);
    assert!(vm.asking(&n.subject, 63));
    for i in 0..9 {
        assert_eq!(vm.claim(std::slice::from_ref(&n), 70 + i), Claim::Admitted);
    }
    assert!(vm.due(80).is_empty(), "asked already");
    // Its answer adds to what is left: 100 − 52 − 9 + 100.
    vm.answered(&n.subject, 100, 62, MIN, granted, 100);
    assert!(!vm.asking(&n.subject, 101));
    let mut admitted = 0;
    while vm.claim(std::slice::from_ref(&n), 200) == Claim::Admitted {
        admitted += 1;
        if admitted > 1000 {
            break;
        }
    }
    assert_eq!(admitted, 139);
}

#[test]
fn with_leases_asked_ahead_a_fleet_still_never_admits_more_than_the_limit() {
    // 1,600 a minute: leases of up to 100, asked ahead below 50; 8 VMs, 4,000 requests.
    for seed in 0..20u64 {
        let mut vms: Vec<Leases> = (0..8).map(|_| Leases::new(&cfg())).collect();
        let mut svc = Service {
            limit: 1600,
            window_start_us: 0,
            used: 0,
        };
        let n = need("ACbig", 1600);
        let (mut admitted, mut calls) = (0, 0);
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        for i in 0..4000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            let vm = (x >> 33) as usize % 8;
            if one_request(&mut vms[vm], &mut svc, &n, 1_000 + i, &mut calls) {
                admitted += 1;
            }
        }
        assert!(admitted <= 1600, "seed {seed}: {admitted}");
        // Bcap = 100, so at most 100 + 50 − 1 unspent per VM.
        assert!(admitted >= 1600 - 8 * 149, "seed {seed}: {admitted}");
    }
}
