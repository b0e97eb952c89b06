//! Did a limit admit more than GCRA allows? From the client's side only.
//!
//! GCRA with `L` requests per period and emission interval `T` admits at most `L + (b − a) / T`
//! requests whose decisions fall in any interval `[a, b]` (after `k` admissions from `a`, the
//! theoretical arrival time is at least `a + k·T`, and the next needs it within `(L − 1)·T` of
//! now). The filter decides a request at a wall-clock moment between the client's send and its
//! reading of the reply (the same clock: Envoy hands the filter the system time), so the requests
//! admitted that the client sent from `s_i` on and that were answered by `M_j` were decided within
//! `[s_i, M_j]`. With the admitted requests sorted by send time and `M_j` the latest answer among
//! the first `j + 1`, every window `i..=j` must hold `j − i + 1 <= L + (M_j − s_i) / T`; a window
//! that does not is an over-admission, whatever the timing of the client. The check is linear:
//! `(j − i + 1 − L)·T > M_j − s_i` iff `(j + 1 − L)·T − M_j > i·T − s_i`, so the running minimum
//! of `i·T − s_i` decides each `j`.

/// The tightest window of one key's admitted requests.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    /// Requests admitted in it.
    pub admitted: u64,
    /// What GCRA allows in it: `L + floor(span / T)`.
    pub allowed: u64,
    /// From the first request's send to the last answer, µs.
    pub from_us: u64,
    pub to_us: u64,
    /// `admitted − (L + span / T)`: above 0 is an over-admission; the closer to 0 from below, the
    /// tighter the limit held.
    pub excess: f64,
}

/// The window of `admitted` (send, answer) pairs, in µs of the wall clock, with the largest
/// excess over GCRA's `limit` requests per `limit · interval_us`. `None` if nothing was admitted.
pub fn tightest_window(
    admitted: &mut [(u64, u64)],
    limit: u32,
    interval_us: u64,
) -> Option<Window> {
    admitted.sort_unstable();
    let t = i128::from(interval_us.max(1));
    let l = i128::from(limit);
    let mut latest_answer = 0u64;
    // (i·T − s_i, i) with the smallest value so far.
    let mut best_start: Option<(i128, usize)> = None;
    let mut worst: Option<(i128, usize, usize, u64)> = None;
    for (j, &(sent, answered)) in admitted.iter().enumerate() {
        let start_term = j as i128 * t - i128::from(sent);
        if best_start.is_none_or(|(v, _)| start_term < v) {
            best_start = Some((start_term, j));
        }
        latest_answer = latest_answer.max(answered);
        let Some((min_start, i)) = best_start else {
            continue;
        };
        // (j + 1 − L)·T − M_j − min_i(i·T − s_i) = ((j − i + 1) − L)·T − (M_j − s_i)
        let excess_t = (j as i128 + 1 - l) * t - i128::from(latest_answer) - min_start;
        if worst.is_none_or(|(w, ..)| excess_t > w) {
            worst = Some((excess_t, i, j, latest_answer));
        }
    }
    let (excess_t, i, j, to) = worst?;
    let from = admitted[i].0;
    let span = i128::from(to.saturating_sub(from));
    Some(Window {
        admitted: (j - i + 1) as u64,
        allowed: (l + span / t) as u64,
        from_us: from,
        to_us: to,
        excess: excess_t as f64 / t as f64,
    })
}

/// What GCRA allows over a whole run of `span_us` from idle: `L + span / T`.
pub fn allowance(limit: u32, interval_us: u64, span_us: u64) -> u64 {
    u64::from(limit) + span_us / interval_us.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 200_000; // 50 per 10 s

    /// A GCRA limiter, deciding at `now` (µs).
    struct Gcra {
        tat: u64,
        limit: u64,
    }

    impl Gcra {
        fn admit(&mut self, now: u64) -> bool {
            let base = self.tat.max(now);
            if base - now <= (self.limit - 1) * T {
                self.tat = base + T;
                true
            } else {
                false
            }
        }
    }

    /// Requests every `gap` µs for `n`, decided by a true GCRA of `limit` 1 µs after sending and
    /// answered 300 µs after that: the admitted (send, answer) pairs.
    fn run(limit: u64, gap: u64, n: u64) -> Vec<(u64, u64)> {
        let mut g = Gcra { tat: 0, limit };
        let base = 1_700_000_000_000_000;
        (0..n)
            .map(|k| base + k * gap)
            .filter(|&s| g.admit(s + 1))
            .map(|s| (s, s + 301))
            .collect()
    }

    #[test]
    fn a_true_gcra_never_exceeds_and_comes_within_one_request() {
        for gap in [1_000, 13_000, 150_000, 199_999, 200_000, 450_000] {
            let mut admitted = run(50, gap, 20_000);
            let w = tightest_window(&mut admitted, 50, T).unwrap();
            assert!(w.excess <= 0.0, "gap {gap}: {w:?}");
            assert!(w.admitted <= w.allowed, "gap {gap}: {w:?}");
            if gap <= T / 2 {
                // Asked for at least twice its rate: some window is within a request of the bound.
                assert!(w.excess > -1.0, "gap {gap}: {w:?}");
            }
        }
    }

    #[test]
    fn one_request_too_many_is_caught() {
        // A limiter of 51 judged as 50: its burst and the next request, 0.2 s later, are 52
        // where 51 are allowed.
        let mut admitted = run(51, 1_000, 5_000);
        let w = tightest_window(&mut admitted, 50, T).unwrap();
        assert!(w.excess > 0.0, "{w:?}");
        assert_eq!((w.admitted, w.allowed), (52, 51), "{w:?}");
    }

    #[test]
    fn a_slow_leak_is_caught_over_a_long_window() {
        // Admits one extra request every 100 s, never more than L at once.
        let mut g = Gcra { tat: 0, limit: 50 };
        let base = 1_700_000_000_000_000u64;
        let mut admitted = Vec::new();
        for k in 0..400_000u64 {
            let s = base + k * 1_000;
            if g.admit(s + 1) || k % 100_000 == 99_999 {
                admitted.push((s, s + 301));
            }
        }
        let w = tightest_window(&mut admitted, 50, T).unwrap();
        assert!(w.excess > 0.0, "{w:?}");
    }

    #[test]
    fn requests_from_several_connections_out_of_order_are_judged_by_send_time() {
        let mut admitted = run(50, 10_000, 3_000);
        admitted.reverse();
        admitted.swap(3, 40);
        let w = tightest_window(&mut admitted, 50, T).unwrap();
        assert!(w.excess <= 0.0, "{w:?}");
        assert_eq!(tightest_window(&mut [], 50, T), None);
    }

    #[test]
    fn allowance_is_the_burst_plus_one_per_interval() {
        assert_eq!(allowance(50, T, 10_000_000), 100);
        assert_eq!(allowance(50, T, 199_999), 50);
    }
}
