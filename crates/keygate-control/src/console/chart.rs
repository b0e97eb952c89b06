//! Usage charts, drawn on the server as SVG: requests by outcome per bucket (allowed, and denied
//! summed over reasons), stacked, with a text summary and the reasons for screen readers and for
//! anyone who wants the numbers.

use std::collections::BTreeMap;

use maud::{html, Markup};
use serde_json::Value;

/// One bucket of `GET /v1/accounts/{sid}/usage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub start: i64,
    pub allowed: u64,
    pub denied: BTreeMap<String, u64>,
}

impl Bucket {
    pub fn denied_total(&self) -> u64 {
        self.denied.values().sum()
    }
}

/// The buckets of a usage answer (`{"buckets": [{"start", "allowed", "denied": {reason: n}}]}`);
/// entries that do not have that shape are left out.
pub fn parse(answer: &Value) -> Vec<Bucket> {
    let Some(list) = answer["buckets"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|b| {
            let start = chrono::DateTime::parse_from_rfc3339(b["start"].as_str()?)
                .ok()?
                .timestamp();
            let denied = b["denied"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                        .collect()
                })
                .unwrap_or_default();
            Some(Bucket {
                start,
                allowed: b["allowed"].as_u64().unwrap_or(0),
                denied,
            })
        })
        .collect()
}

const WIDTH: u64 = 600;
const HEIGHT: u64 = 140;
const ALLOWED: &str = "#1a7f37";
const DENIED: &str = "#b42318";

/// The chart of `buckets` over `slots` buckets of `step` seconds from `from`: one bar per slot
/// (empty slots are zero).
pub fn chart(
    title: &str,
    id: &str,
    buckets: &[Bucket],
    from: i64,
    step: i64,
    slots: usize,
) -> Markup {
    let mut allowed = vec![0u64; slots];
    let mut denied = vec![0u64; slots];
    let mut reasons: BTreeMap<&str, u64> = BTreeMap::new();
    for b in buckets {
        let Some(i) = usize::try_from((b.start - from).div_euclid(step.max(1)))
            .ok()
            .filter(|i| *i < slots)
        else {
            continue;
        };
        allowed[i] += b.allowed;
        denied[i] += b.denied_total();
        for (r, n) in &b.denied {
            *reasons.entry(r.as_str()).or_default() += n;
        }
    }
    let total_allowed: u64 = allowed.iter().sum();
    let total_denied: u64 = denied.iter().sum();
    let top = allowed
        .iter()
        .zip(&denied)
        .map(|(a, d)| a + d)
        .max()
        .unwrap_or(0)
        .max(1);
    let slot_w = WIDTH / (slots.max(1) as u64);
    let bar_w = slot_w.saturating_sub(1).max(1);
    let scale = |n: u64| n * (HEIGHT - 20) / top;
    let summary = format!("{total_allowed} allowed, {total_denied} denied");
    html! {
        figure class="chart" data-chart=(id) {
            svg xmlns="http://www.w3.org/2000/svg" width=(WIDTH) height=(HEIGHT)
                viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img"
                aria-labelledby=(format!("{id}-title")) {
                title id=(format!("{id}-title")) { (title) ": " (summary) }
                rect x="0" y="0" width=(WIDTH) height=(HEIGHT) fill="#f6f8fa" {}
                line x1="0" y1=(HEIGHT - 20) x2=(WIDTH) y2=(HEIGHT - 20) stroke="#8c959f" {}
                @for i in 0..slots {
                    @let x = i as u64 * slot_w;
                    @let a = scale(allowed[i]);
                    @let d = scale(denied[i]);
                    @if a > 0 {
                        rect x=(x) y=(HEIGHT - 20 - a) width=(bar_w) height=(a) fill=(ALLOWED) {}
                    }
                    @if d > 0 {
                        rect x=(x) y=(HEIGHT - 20 - a - d) width=(bar_w) height=(d) fill=(DENIED) {}
                    }
                }
                text x="2" y="12" font-size="11" fill="#1b1f24" { "max " (top) " per bucket" }
                text x="2" y=(HEIGHT - 5) font-size="11" fill="#1b1f24" { (hhmm(from)) }
                text x=(WIDTH - 2) y=(HEIGHT - 5) font-size="11" fill="#1b1f24" text-anchor="end" {
                    (hhmm(from + step * slots as i64)) " UTC"
                }
            }
            figcaption {
                strong { (title) } ": "
                span class="summary" { (summary) }
                " (" span class="sw-allowed" { "■" } " allowed, " span class="sw-denied" { "■" } " denied)"
                @if !reasons.is_empty() {
                    " — denied by reason: "
                    @for (i, (r, n)) in reasons.iter().enumerate() {
                        @if i > 0 { ", " }
                        code { (r) } " " (n)
                    }
                }
            }
        }
    }
}

fn hhmm(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.format("%H:%M").to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn buckets_are_read_and_charted_by_slot() {
        let answer = json!({"buckets": [
            {"start": "2026-11-22T10:00:00Z", "allowed": 3, "denied": {}},
            {"start": "2026-11-22T10:02:00Z", "allowed": 1, "denied": {"rate_limited": 2, "ip_not_allowed": 1}},
            {"start": "not a time", "allowed": 9, "denied": {}},
        ]});
        let b = parse(&answer);
        assert_eq!(b.len(), 2);
        assert_eq!(b[1].denied_total(), 3);
        let from = b[0].start;
        let svg = chart("Last hour", "h", &b, from, 60, 60).into_string();
        assert!(svg.contains("4 allowed, 3 denied"), "{svg}");
        assert!(svg.contains("<code>ip_not_allowed</code> 1"), "{svg}");
        // One allowed bar in slot 0 and slot 2, one denied bar in slot 2 (x = 2 * 10).
        assert_eq!(svg.matches(ALLOWED).count(), 2);
        assert!(
            svg.contains(&format!(
                "x=\"20\" y=\"0\" width=\"9\" height=\"90\" fill=\"{DENIED}\""
            )),
            "{svg}"
        );
        // Outside the window: not drawn.
        let later = chart("Last hour", "h", &b, from + 3600, 60, 60).into_string();
        assert!(later.contains("0 allowed, 0 denied"));
    }
}
