//! 5. Indistinguishable failures: byte-identical 401s, and a wrong secret costs the same however
//!    many leading bytes match.

use std::time::{Duration, Instant};

use keygate_e2e::{demo, Conn, EnvoyBuilder, Req};

use crate::common::*;

/// `secret` with its last character replaced (by a token68 character, so the Bearer form still
/// parses): every leading byte but the last matches.
fn all_but_last(secret: &str) -> String {
    let mut s = secret[..secret.len() - 1].to_owned();
    s.push(if secret.ends_with('Q') { 'R' } else { 'Q' });
    s
}

#[test]
fn every_authentication_failure_is_byte_identical_in_basic_and_bearer_form() {
    let mut bench = Bench::start(EnvoyBuilder::new());
    let (reference, _) = bench.send(&Req::get(CALLS).basic("SKnope", "sk_live_nope"));
    let reference = reference.without_date();
    *bench.denied.entry("invalid_credentials").or_default() += 1;
    assert_eq!(reference.status, 401);
    let basic = |c: Canary, secret: &str| Req::get(CALLS).basic(c.sid, secret);
    let bearer = |token: &str| Req::get(CALLS).bearer(token);
    #[rustfmt::skip]
    let cases: Vec<(&str, Req)> = vec![
        ("Basic: wrong secret, all but the last byte right", basic(STD, &all_but_last(STD.secret))),
        ("Basic: wrong secret, nothing right", basic(STD, &"Z".repeat(STD.secret.len()))),
        ("Basic: empty secret", basic(STD, "")),
        ("Basic: main key, wrong secret", basic(MAIN, &all_but_last(MAIN.secret))),
        ("Basic: revoked (removed) key, its old secret", basic(REVOKED, REVOKED.secret)),
        ("Basic: disabled key, right secret", basic(DISABLED, DISABLED.secret)),
        ("Basic: expired key, right secret", basic(EXPIRED, EXPIRED.secret)),
        ("Basic: rotated key, old secret after its grace", basic(ROTATED_OLD, ROTATED_OLD.secret)),
        ("Basic: IP-locked key, wrong secret", basic(IP_LOCKED, &all_but_last(IP_LOCKED.secret))),
        ("Basic: account SID, wrong auth token", basic(ACCOUNT_TOKEN, &all_but_last(ACCOUNT_TOKEN.secret))),
        ("Basic: unknown account SID", Req::get(CALLS).basic("ACnope0001", ACCOUNT_TOKEN.secret)),
        ("Basic: suspended account's key, wrong secret", Req::get(CALLS).basic(demo::SUSPENDED.sid, "sk_live_wrong")),
        ("Basic: a key SID used with another key's secret", basic(STD, MAIN.secret)),
        ("Basic: lowercase scheme, revoked key", auth(format!("basic {}", b64(REVOKED.sid, REVOKED.secret.as_bytes())))),
        ("Bearer: revoked key's secret", bearer(REVOKED.secret)),
        ("Bearer: disabled key's secret", bearer(DISABLED.secret)),
        ("Bearer: expired key's secret", bearer(EXPIRED.secret)),
        ("Bearer: rotated key's old secret", bearer(ROTATED_OLD.secret)),
        ("Bearer: main secret, all but the last byte right", bearer(&all_but_last(MAIN.secret))),
        ("Bearer: rotated key's secret with one byte more", bearer(&format!("{}x", ROTATED_NEW.secret))),
        ("Bearer: an auth token (account credentials are Basic only)", bearer(ACCOUNT_TOKEN.secret)),
        ("Bearer: a key SID", bearer(STD.sid)),
        ("lowercase `bearer`, revoked key's secret", auth(format!("bearer {}", REVOKED.secret))),
    ];
    for (name, req) in &cases {
        let (r, seen) = bench.send(req);
        assert_eq!(r.without_date(), reference, "{name}");
        assert!(seen.is_empty(), "{name}: upstream saw {seen:?}");
        *bench.denied.entry("invalid_credentials").or_default() += 1;
        bench.assert_alive(name);
    }
    // The fixtures are live: each right secret on a usable key still works.
    for (c, bearer_form) in [(STD, false), (ROTATED_NEW, false), (MAIN, true)] {
        let req = if bearer_form {
            bearer(c.secret)
        } else {
            basic(c, c.secret)
        };
        assert_eq!(bench.send(&req).0.status, 200, "{c:?}");
        bench.allowed += 1;
    }
    println!("byte-identical failures: {} cases", cases.len());
    bench.finish();
}

/// Sends `a` and `b` alternately (`n` of each, order swapped every pair) on one keep-alive
/// connection and returns the median time of each.
fn interleaved_medians(port: u16, a: &Req, b: &Req, n: usize) -> (Duration, Duration) {
    let mut conn = Conn::open(port).unwrap();
    let mut time = |req: &Req| {
        let t = Instant::now();
        let r = conn.send(req).unwrap();
        let elapsed = t.elapsed();
        assert_eq!(r.status, 401, "{r:?}");
        elapsed
    };
    for _ in 0..30 {
        time(a);
        time(b);
    }
    let (mut ta, mut tb) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        if i % 2 == 0 {
            ta.push(time(a));
            tb.push(time(b));
        } else {
            tb.push(time(b));
            ta.push(time(a));
        }
    }
    ta.sort();
    tb.sort();
    (ta[n / 2], tb[n / 2])
}

/// A wrong secret costs the same whether no leading byte or every byte but the last matches the
/// real one (the presented secret is digested, then compared in constant time). Statistical, on
/// a noisy 2-core machine: 300 interleaved samples of each, medians compared within a wide band.
#[test]
fn rejecting_a_wrong_secret_takes_as_long_whatever_prefix_matches() {
    let mut bench = Bench::start(EnvoyBuilder::new());
    let p = bench.port();
    const SAMPLES: usize = 300;
    let pairs = [
        (
            "Basic",
            Req::get(CALLS).basic(STD.sid, "Z".repeat(STD.secret.len())),
            Req::get(CALLS).basic(STD.sid, all_but_last(STD.secret)),
        ),
        (
            "Bearer",
            Req::get(CALLS).bearer("Z".repeat(MAIN.secret.len())),
            Req::get(CALLS).bearer(all_but_last(MAIN.secret)),
        ),
    ];
    for (name, none_right, all_but_last_right) in &pairs {
        let (m_none, m_most) = interleaved_medians(p, none_right, all_but_last_right, SAMPLES);
        let ratio = m_most.as_secs_f64() / m_none.as_secs_f64();
        println!(
            "{name}: median {m_none:?} (no prefix) vs {m_most:?} (all but last), ratio {ratio:.3}"
        );
        assert!(
            (0.7..=1.3).contains(&ratio),
            "{name}: medians {m_none:?} vs {m_most:?} (ratio {ratio:.3})"
        );
        *bench.denied.entry("invalid_credentials").or_default() += 2 * (SAMPLES as u64 + 30);
        bench.assert_alive(name);
    }
    bench.finish();
}
