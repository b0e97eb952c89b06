//! What the soak found: Envoy's stats at the start and the end, its memory over the run, the
//! checks' verdicts, the summary table and the JSON file.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use keygate_e2e::Envoy;

/// Envoy's `/stats` counters and gauges (`name: integer` lines).
pub fn stats(envoy: &Envoy) -> BTreeMap<String, u64> {
    envoy
        .stats()
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(": ")?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Envoy's resident set (`VmRSS` of `/proc/<pid>/status`), KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

pub fn median(values: &mut [u64]) -> Option<u64> {
    values.sort_unstable();
    match values.len() {
        0 => None,
        n if n % 2 == 1 => Some(values[n / 2]),
        n => Some((values[n / 2 - 1] + values[n / 2]) / 2),
    }
}

/// The medians of the second and the last third (by time) of `samples` (seconds, KiB): the
/// first third is the warm-up.
pub fn thirds(samples: &[(f64, u64)]) -> Option<(u64, u64, usize)> {
    let end = samples.last()?.0;
    let in_third = |k: f64| {
        samples
            .iter()
            .filter(|(t, _)| *t >= end * k / 3.0 && *t < end * (k + 1.0) / 3.0 + f64::EPSILON)
            .map(|&(_, v)| v)
            .collect::<Vec<u64>>()
    };
    let (mut second, mut last) = (in_third(1.0), in_third(2.0));
    let n = second.len().min(last.len());
    Some((median(&mut second)?, median(&mut last)?, n))
}

/// One check's verdict.
pub struct Verdict {
    pub check: &'static str,
    /// `None` when it passed; else the exact failure message.
    pub failure: Option<String>,
    /// The figure it judged, for the summary.
    pub figure: String,
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The UTC time as `YYYYMMDDTHHMMSSZ` (for file names) and RFC 3339.
pub fn stamp() -> (String, String) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    (
        format!("{year:04}{month:02}{day:02}T{h:02}{m:02}{s:02}Z"),
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thirds_skip_the_warm_up() {
        let samples: Vec<(f64, u64)> = (0..=30)
            .map(|t| (f64::from(t), if t < 10 { 100 + t as u64 } else { 120 }))
            .collect();
        let (second, last, n) = thirds(&samples).unwrap();
        assert_eq!((second, last), (120, 120));
        assert!(n >= 9);
        assert_eq!(median(&mut [3, 1, 2, 10]), Some(2));
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(10_000_000), "10,000,000");
    }
}
