//! The request mix: every class of request the soak sends, how often, and the one reply class
//! each must get. A class is one fault at most (a wrong secret, a malformed path, ...), so its
//! expected reply is exact: the status and the reason code of the body, and for rate limits the
//! `RateLimit-Policy` of the limit that refused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use keygate_e2e::{Req, Response};

use crate::churn::{Churn, Cred, Verdict};
use crate::now_us;

/// A key of a pool: its SID and secret.
#[derive(Clone, Debug)]
pub struct Key {
    pub sid: String,
    pub secret: String,
}

/// A rate as the control plane takes it and as the checker holds the admitted requests to it.
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    pub requests: u32,
    /// `per` in seconds (a whole number, so `RateLimit-Policy`'s `w=` is exact).
    pub per_s: u32,
}

impl Rate {
    pub fn json(self) -> serde_json::Value {
        serde_json::json!({"requests": self.requests, "per": format!("{}s", self.per_s)})
    }

    /// GCRA's emission interval `T = per / requests`, in microseconds.
    pub fn interval_us(self) -> u64 {
        u64::from(self.per_s) * 1_000_000 / u64::from(self.requests.max(1))
    }

    pub fn label(self) -> String {
        format!("{}/{}s", self.requests, self.per_s)
    }
}

/// The pools of rate-limited keys whose admitted requests are checked against GCRA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pool {
    /// Asked for far more than their own rate, all the time.
    Near,
    /// Asked for far more than their `calls` rate, all the time.
    Api,
    /// Asked for less than their rate, then far more, then nothing (see [`Pulse`]).
    Pulsed,
}

/// The demand on the pulsed keys, on a cycle of [`Pulse::CYCLE_MS`] (each key shifted by
/// [`Pulse::SHIFT_MS`]): a trickle at half the key's rate, then a burst (every request the mix
/// draws), then nothing, long enough for the key's bucket to refill whole. What a lease taken
/// in the trickle and spent after a refill would over-admit is what the limit check sees.
pub struct Pulse {
    /// The load's start, wall clock (µs).
    pub start_us: u64,
    /// Per key: the earliest next trickle request (µs).
    pub next_us: Vec<AtomicU64>,
}

impl Pulse {
    pub const CYCLE_MS: u64 = 16_000;
    pub const TRICKLE_MS: u64 = 4_000;
    pub const BURST_MS: u64 = 1_500;
    pub const SHIFT_MS: u64 = 4_000;

    pub fn new(keys: usize) -> Pulse {
        Pulse {
            start_us: now_us(),
            next_us: (0..keys).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Whether key `k` (of `rate`) takes a request now.
    fn wants(&self, k: usize, rate: Rate) -> bool {
        let now = now_us();
        let at_ms = (now.saturating_sub(self.start_us) / 1_000 + k as u64 * Pulse::SHIFT_MS)
            % Pulse::CYCLE_MS;
        if at_ms < Pulse::TRICKLE_MS {
            let Some(next) = self.next_us.get(k) else {
                return false;
            };
            let due = next.load(Ordering::Relaxed);
            now >= due
                && next
                    .compare_exchange(
                        due,
                        now + 2 * rate.interval_us(),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    )
                    .is_ok()
        } else {
            at_ms < Pulse::TRICKLE_MS + Pulse::BURST_MS
        }
    }
}

/// What the soak sends to: the account, the pools of keys, the churned credentials.
pub struct Target {
    pub account: String,
    /// Another real account of the control plane (its SID in a path is `account_mismatch`).
    pub other_account: String,
    /// Keys whose own rate is small (`near_rate`): driven well over it, 200 or 429.
    pub near: Vec<Key>,
    pub near_rate: Rate,
    /// Keys whose `calls` API rate is small (`api_rate`), the key's own rate far.
    pub api: Vec<Key>,
    pub api_rate: Rate,
    /// Keys whose own rate (`pulsed_rate`) is met by a demand that comes and goes (`pulse`).
    pub pulsed: Vec<Key>,
    pub pulsed_rate: Rate,
    pub pulse: Pulse,
    /// Keys far from every limit: always 200.
    pub far: Vec<Key>,
    /// A publishable key, far from its limit.
    pub publishable: Key,
    pub churn: Arc<Churn>,
}

/// One class of request. The order is the summary table's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    NearBasic,
    NearBearer,
    ApiLimited,
    ApiOther,
    Pulsed,
    FarBasic,
    FarBearer,
    Publishable,
    Churn,
    WrongSecret,
    UnknownBearer,
    BadBase64,
    NoColon,
    TwoCredentials,
    Missing,
    UnsupportedScheme,
    DotSegment,
    DoubleSlash,
    WrongAccount,
    UnknownRoute,
    StandardOnKeys,
    PublishableOnCalls,
}

impl Class {
    /// Every class with its weight (out of 1,000).
    pub const MIX: [(Class, u32); 22] = [
        (Class::NearBasic, 100),
        (Class::NearBearer, 100),
        (Class::ApiLimited, 60),
        (Class::ApiOther, 30),
        (Class::Pulsed, 60),
        (Class::FarBasic, 100),
        (Class::FarBearer, 70),
        (Class::Publishable, 30),
        (Class::Churn, 100),
        (Class::WrongSecret, 60),
        (Class::UnknownBearer, 20),
        (Class::BadBase64, 30),
        (Class::NoColon, 20),
        (Class::TwoCredentials, 20),
        (Class::Missing, 30),
        (Class::UnsupportedScheme, 20),
        (Class::DotSegment, 30),
        (Class::DoubleSlash, 20),
        (Class::WrongAccount, 40),
        (Class::UnknownRoute, 20),
        (Class::StandardOnKeys, 20),
        (Class::PublishableOnCalls, 20),
    ];

    pub fn name(self) -> &'static str {
        match self {
            Class::NearBasic => "near limit, Basic",
            Class::NearBearer => "near limit, Bearer",
            Class::ApiLimited => "near API limit (calls)",
            Class::ApiOther => "same keys, other API",
            Class::Pulsed => "pulsed demand",
            Class::FarBasic => "far from limits, Basic",
            Class::FarBearer => "far from limits, Bearer",
            Class::Publishable => "publishable, balance",
            Class::Churn => "churned keys",
            Class::WrongSecret => "wrong secret",
            Class::UnknownBearer => "unknown Bearer token",
            Class::BadBase64 => "Basic, bad base64",
            Class::NoColon => "Basic, no ':'",
            Class::TwoCredentials => "two Authorization",
            Class::Missing => "no credentials",
            Class::UnsupportedScheme => "Digest scheme",
            Class::DotSegment => "path with %2e%2e",
            Class::DoubleSlash => "path with //",
            Class::WrongAccount => "other account in path",
            Class::UnknownRoute => "unknown route",
            Class::StandardOnKeys => "standard key on Keys.json",
            Class::PublishableOnCalls => "publishable key on calls",
        }
    }

    /// What the class expects, for the summary table.
    pub fn expects(self) -> &'static str {
        match self {
            Class::NearBasic | Class::NearBearer | Class::Pulsed => "200 or 429 rate_limited_key",
            Class::ApiLimited => "200 or 429 rate_limited_api",
            Class::ApiOther | Class::FarBasic | Class::FarBearer | Class::Publishable => "200",
            Class::Churn => "200 or 401 invalid_credentials, by the key's timeline",
            Class::WrongSecret | Class::UnknownBearer => "401 invalid_credentials",
            Class::BadBase64 | Class::NoColon => "400 malformed_credentials",
            Class::TwoCredentials => "400 multiple_credentials",
            Class::Missing => "401 missing_credentials",
            Class::UnsupportedScheme => "401 unsupported_scheme",
            Class::DotSegment | Class::DoubleSlash => "400 malformed_path",
            Class::WrongAccount => "404 account_mismatch",
            Class::UnknownRoute => "404 unknown_route",
            Class::StandardOnKeys | Class::PublishableOnCalls => "403 permission_denied",
        }
    }

    /// A class drawn by weight from `roll` in `0..1000`.
    pub fn pick(roll: u32) -> Class {
        let mut left = roll;
        for (class, weight) in Class::MIX {
            if left < weight {
                return class;
            }
            left -= weight;
        }
        Class::FarBasic
    }
}

/// The reply a request must get.
pub enum Expect {
    /// 200.
    Ok,
    /// 200, or 429 with this reason code and exactly this `RateLimit-Policy`.
    OkOrLimited { code: &'static str, policy: String },
    /// This status and reason code.
    Denied { status: u16, code: &'static str },
    /// 200 or 401 `invalid_credentials`, as the credential's timeline requires.
    Churn(Arc<Cred>),
}

/// One request of the mix, ready to send.
pub struct Planned {
    /// Its class (a pulsed key at rest sends a far key's request instead).
    pub class: Class,
    /// The near- or API-limited key it uses (index in its pool), for the limit check.
    pub limited_key: Option<(Pool, usize)>,
    pub req: Req,
    pub expect: Expect,
}

/// How a reply was judged.
pub enum Judged {
    /// Of its expected class; the label (`200`, `429 rate_limited_key`, ...) is tallied.
    Expected(String),
    /// Not: the label and why.
    Unexpected(String, String),
}

impl Target {
    fn calls(&self) -> String {
        format!("/v2/accounts/{}/calls", self.account)
    }

    fn messages(&self) -> String {
        format!("/2010-04-01/Accounts/{}/Messages.json", self.account)
    }

    /// The request of `class`; `n` picks among keys and variants.
    pub fn plan(&self, class: Class, n: u64) -> Planned {
        let pick = |pool: &[Key]| (n as usize) % pool.len().max(1);
        let near_policy = format!(
            "\"key\";q={};w={}",
            self.near_rate.requests, self.near_rate.per_s
        );
        let api_policy = format!(
            "\"key_api\";q={};w={}",
            self.api_rate.requests, self.api_rate.per_s
        );
        let denied = |status, code| Expect::Denied { status, code };
        let plain = |req: Req, expect: Expect| Planned {
            class,
            limited_key: None,
            req,
            expect,
        };
        let far = &self.far[pick(&self.far)];
        match class {
            Class::NearBasic | Class::NearBearer => {
                let i = pick(&self.near);
                let key = &self.near[i];
                let req = Req::get(self.calls());
                let req = if class == Class::NearBasic {
                    req.basic(&key.sid, &key.secret)
                } else {
                    req.bearer(&key.secret)
                };
                Planned {
                    class,
                    limited_key: Some((Pool::Near, i)),
                    req,
                    expect: Expect::OkOrLimited {
                        code: "rate_limited_key",
                        policy: near_policy,
                    },
                }
            }
            Class::ApiLimited => {
                let i = pick(&self.api);
                let key = &self.api[i];
                Planned {
                    class,
                    limited_key: Some((Pool::Api, i)),
                    req: Req::post(self.calls())
                        .basic(&key.sid, &key.secret)
                        .body("To=%2B15550100&From=%2B15550101"),
                    expect: Expect::OkOrLimited {
                        code: "rate_limited_api",
                        policy: api_policy,
                    },
                }
            }
            Class::ApiOther => {
                let key = &self.api[pick(&self.api)];
                plain(Req::get(self.messages()).bearer(&key.secret), Expect::Ok)
            }
            Class::Pulsed => {
                let i = pick(&self.pulsed);
                if !self.pulse.wants(i, self.pulsed_rate) {
                    return self.plan(Class::FarBasic, n);
                }
                let key = &self.pulsed[i];
                Planned {
                    class,
                    limited_key: Some((Pool::Pulsed, i)),
                    req: Req::get(self.calls()).basic(&key.sid, &key.secret),
                    expect: Expect::OkOrLimited {
                        code: "rate_limited_key",
                        policy: format!(
                            "\"key\";q={};w={}",
                            self.pulsed_rate.requests, self.pulsed_rate.per_s
                        ),
                    },
                }
            }
            Class::FarBasic => plain(
                Req::get(format!("{}/CA{n:032x}", self.calls())).basic(&far.sid, &far.secret),
                Expect::Ok,
            ),
            Class::FarBearer => plain(Req::get(self.messages()).bearer(&far.secret), Expect::Ok),
            Class::Publishable => plain(
                Req::get("/api/account/balance").bearer(&self.publishable.secret),
                Expect::Ok,
            ),
            Class::Churn => match self.churn.pick(n) {
                Some(cred) => {
                    let req = Req::get(self.calls());
                    let req = if n.is_multiple_of(2) {
                        req.basic(&cred.sid, &cred.secret)
                    } else {
                        req.bearer(&cred.secret)
                    };
                    plain(req, Expect::Churn(cred))
                }
                // Never after start-up (the load waits for the first churned key); a far key
                // would stand in.
                None => plain(
                    Req::get(self.calls()).basic(&far.sid, &far.secret),
                    Expect::Ok,
                ),
            },
            Class::WrongSecret => {
                let pool = if n.is_multiple_of(2) {
                    &self.near
                } else {
                    &self.far
                };
                let key = &pool[pick(pool)];
                plain(
                    Req::get(self.calls()).basic(&key.sid, format!("sk_live_wrong{n:016x}")),
                    denied(401, "invalid_credentials"),
                )
            }
            Class::UnknownBearer => plain(
                Req::get(self.calls()).bearer(format!("sk_live_unknown{n:024x}")),
                denied(401, "invalid_credentials"),
            ),
            Class::BadBase64 => plain(
                Req::get(self.calls()).header("authorization", "Basic !!not*base64!!"),
                denied(400, "malformed_credentials"),
            ),
            Class::NoColon => plain(
                // base64("SKnocolonhere")
                Req::get(self.calls()).header("authorization", "Basic U0tub2NvbG9uaGVyZQ=="),
                denied(400, "malformed_credentials"),
            ),
            Class::TwoCredentials => plain(
                Req::get(self.calls())
                    .basic(&far.sid, &far.secret)
                    .bearer(&far.secret),
                denied(400, "multiple_credentials"),
            ),
            Class::Missing => plain(Req::get(self.calls()), denied(401, "missing_credentials")),
            Class::UnsupportedScheme => plain(
                Req::get(self.calls()).header("authorization", "Digest username=\"soak\""),
                denied(401, "unsupported_scheme"),
            ),
            Class::DotSegment => plain(
                Req::get(format!("{}/%2e%2e/x", self.calls())).basic(&far.sid, &far.secret),
                denied(400, "malformed_path"),
            ),
            Class::DoubleSlash => plain(
                Req::get(format!("/v2/accounts/{}//calls", self.account))
                    .basic(&far.sid, &far.secret),
                denied(400, "malformed_path"),
            ),
            Class::WrongAccount => plain(
                Req::get(format!("/v2/accounts/{}/calls", self.other_account)).bearer(&far.secret),
                denied(404, "account_mismatch"),
            ),
            Class::UnknownRoute => plain(
                Req::get("/v3/nothing/here").basic(&far.sid, &far.secret),
                denied(404, "unknown_route"),
            ),
            Class::StandardOnKeys => plain(
                Req::get(format!("/2010-04-01/Accounts/{}/Keys.json", self.account))
                    .basic(&far.sid, &far.secret),
                denied(403, "permission_denied"),
            ),
            Class::PublishableOnCalls => plain(
                Req::get(self.calls()).bearer(&self.publishable.secret),
                denied(403, "permission_denied"),
            ),
        }
    }
}

/// The reason code of a denial's body (`{"error":{"code":"..."}}`), if any.
pub fn reason_code(res: &Response) -> Option<&str> {
    let body = std::str::from_utf8(&res.body).ok()?;
    let start = body.find("\"code\":\"")? + "\"code\":\"".len();
    let len = body[start..].find('"')?;
    Some(&body[start..start + len])
}

/// `200`, or the status and reason code (`429 rate_limited_key`).
pub fn label(res: &Response) -> String {
    match (res.status, reason_code(res)) {
        (200, _) => "200".to_owned(),
        (status, Some(code)) => format!("{status} {code}"),
        (status, None) => format!("{status} (no reason code)"),
    }
}

/// Judges `res` to a request sent at `sent_us` and answered at `done_us` (wall clock, µs).
pub fn judge(expect: &Expect, res: &Response, sent_us: u64, done_us: u64) -> Judged {
    let got = label(res);
    match expect {
        Expect::Ok if res.status == 200 => Judged::Expected(got),
        Expect::Ok => Judged::Unexpected(got, "expected 200".to_owned()),
        Expect::OkOrLimited { code, policy } => {
            if res.status == 200 {
                return Judged::Expected(got);
            }
            if res.status != 429 || reason_code(res) != Some(code) {
                return Judged::Unexpected(got, format!("expected 200 or 429 {code}"));
            }
            let got_policy = res.header_str("ratelimit-policy");
            let retry_after = res
                .header_str("retry-after")
                .and_then(|v| v.parse::<u64>().ok());
            if got_policy != Some(policy.as_str()) || retry_after.is_none_or(|s| s < 1) {
                return Judged::Unexpected(
                    got,
                    format!(
                        "429 {code} with RateLimit-Policy {got_policy:?} and Retry-After \
                         {retry_after:?}, expected {policy:?} and at least 1"
                    ),
                );
            }
            Judged::Expected(got)
        }
        Expect::Denied { status, code } => {
            if res.status == *status && reason_code(res) == Some(code) {
                Judged::Expected(got)
            } else {
                Judged::Unexpected(got, format!("expected {status} {code}"))
            }
        }
        Expect::Churn(cred) => {
            let verdict = cred.verdict(sent_us, done_us);
            let ok = res.status == 200;
            let refused = res.status == 401 && reason_code(res) == Some("invalid_credentials");
            match (verdict, ok, refused) {
                (Verdict::MustAdmit, true, _) => Judged::Expected("200 (must)".to_owned()),
                (Verdict::MustRefuse, _, true) => {
                    Judged::Expected("401 invalid_credentials (must)".to_owned())
                }
                (Verdict::Either, true, _) => Judged::Expected("200 (either)".to_owned()),
                (Verdict::Either, _, true) => {
                    Judged::Expected("401 invalid_credentials (either)".to_owned())
                }
                (verdict, _, _) => Judged::Unexpected(
                    got,
                    format!("churned credential: {}", cred.explain(verdict, sent_us)),
                ),
            }
        }
    }
}
