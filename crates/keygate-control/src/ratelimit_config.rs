//! `GET /v1/edge/ratelimit-config?format=envoy-ratelimit|limitador`: keygate's fleet-wide limits
//! (`"scope": "fleet"`) as the configuration of a rate-limit service, for operators who run
//! envoyproxy/ratelimit or Kuadrant's Limitador server instead of keygate-ratelimit (which loads
//! the `limitador` form itself).
//!
//! The limits are those of keygate-core's descriptors ([`keygate_core::fleet`]), in the domain
//! (Limitador: namespace) [`DEFAULT_DOMAIN`]: per account (`keygate=account`, `account_sid`),
//! per key by role (`keygate=key`, `role`, `key_sid`) and per key × API (`keygate=key_api`,
//! `api`, `key_sid`). Each kind has a default (the catalogue's: `limits.account`,
//! `limits.key.<role>`, an API's `limit`) and per-subject overrides (an account's or key's own
//! `limits`). As at the edge, a subject with an override of its own, of either scope, is not
//! under the default: a `local` override means the fleet does not count that subject at all.
//! Local rates are not exported.
//!
//! - `envoy-ratelimit`: envoyproxy/ratelimit's YAML. Defaults are descriptors with a key and no
//!   value; overrides have the SID as value (the service picks the value match first). A subject
//!   whose override is not counted by the fleet gets `unlimited: true`, so the default does not
//!   reach it. envoyproxy/ratelimit counts only per second, minute, hour or day (it has no unit
//!   multiplier): a rate of another period (`90s`, `2m`) is left out with a YAML comment that says
//!   so, never rounded to another rate.
//! - `limitador`: the Limitador server's limits file (a YAML list; conditions and variables in
//!   the CEL of limitador 0.14). Limitador applies every limit whose conditions hold, so a
//!   default's conditions exclude the subjects that have an override
//!   (`!(descriptors[0].account_sid in ['AC…', …])`) and an override matches its SID exactly:
//!   exactly one limit applies to any subject. Each limit names `descriptors[0]`, the descriptor
//!   being checked: the service must check each descriptor of a request on its own
//!   (keygate-ratelimit does). The Limitador server binds all of a request's descriptors into
//!   one list, so behind Envoy's ratelimit filter it must get one descriptor per request (one
//!   `rate_limits` entry per filter stage).
//!
//! The document is built from one read transaction; its `ETag` is the config version
//! (`"<version>"`), and `If-None-Match` naming it gets 304. Edge tokens and the admin token may
//! read it, as the edge feed.

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use keygate_core::compile::compile_rate;
use keygate_core::config::{LimitScope, RateDoc, Role};
use keygate_core::fleet::{Subject, DEFAULT_DOMAIN};

use crate::auth::Caller;
use crate::catalog::ApiCatalog;
use crate::error::{internal, Error};
use crate::model::{Account, Key};
use crate::AppState;

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/edge/ratelimit-config", get(ratelimit_config))
}

/// The export's forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// envoyproxy/ratelimit's YAML configuration.
    EnvoyRatelimit,
    /// The Limitador server's limits file.
    Limitador,
}

const FORMATS: &str = "envoy-ratelimit or limitador";

impl Format {
    /// Reads `format` from a query string; the error is the 400's message.
    pub fn from_query(query: Option<&str>) -> Result<Format, Error> {
        let fields: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
            .map_err(|_| Error::bad("query", "must be URL-encoded"))?;
        let format = fields
            .iter()
            .rev()
            .find(|(k, _)| k == "format")
            .map(|(_, v)| v.as_str());
        match format {
            Some("envoy-ratelimit") => Ok(Format::EnvoyRatelimit),
            Some("limitador") => Ok(Format::Limitador),
            None => Err(Error::bad("format", format!("required: {FORMATS}"))),
            Some(other) => Err(Error::bad(
                "format",
                format!("unknown format {other:?} (expected {FORMATS})"),
            )),
        }
    }
}

/// A fleet rate: `max` requests in fixed windows of `seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetRate {
    pub max: u32,
    pub seconds: u64,
}

impl FleetRate {
    /// The fleet rate of `r`, or `None` when `r` is counted locally.
    fn of(path: &str, r: &RateDoc) -> Result<Option<FleetRate>, Error> {
        if r.scope != LimitScope::Fleet {
            return Ok(None);
        }
        // What is stored was compiled when it was written; a failure here is a bug.
        let c = compile_rate(path, r).map_err(|e| internal("stored fleet rate", e))?;
        Ok(Some(FleetRate {
            max: c.rate.requests,
            seconds: c.rate.period_us / 1_000_000,
        }))
    }

    /// envoyproxy/ratelimit's unit for this window, if it has one.
    fn envoy_unit(self) -> Option<&'static str> {
        match self.seconds {
            1 => Some("second"),
            60 => Some("minute"),
            3600 => Some("hour"),
            86_400 => Some("day"),
            _ => None,
        }
    }

    fn describe(self) -> String {
        format!("{} requests per {}s", self.max, self.seconds)
    }
}

/// The limits of one kind of descriptor below one prefix: `keygate=account`, or
/// `keygate=key, role=main`, or `keygate=key_api, api=calls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// The descriptor's entries before the subject's.
    pub prefix: Vec<(&'static str, String)>,
    /// The subject's entry key (`account_sid`, `key_sid`).
    pub subject_key: &'static str,
    /// The default's fleet rate (`None`: no default, or a local one).
    pub default: Option<FleetRate>,
    /// Subjects with an override of their own, by SID: its fleet rate, or `None` when the
    /// override is local (the fleet does not count that subject).
    pub overrides: Vec<(String, Option<FleetRate>)>,
}

impl Group {
    fn new(subject: Subject, default: Option<FleetRate>) -> Group {
        let mut entries = subject.entries();
        let subject_key = entries.pop().map_or("", |(k, _)| k);
        Group {
            prefix: entries
                .into_iter()
                .map(|(k, v)| (k, v.to_owned()))
                .collect(),
            subject_key,
            default,
            overrides: Vec::new(),
        }
    }

    /// Whether the fleet counts anyone in this group.
    fn counts_anyone(&self) -> bool {
        self.default.is_some() || self.overrides.iter().any(|(_, r)| r.is_some())
    }
}

const ROLES: [Role; 3] = [Role::Main, Role::Standard, Role::Publishable];

/// The fleet limits of a catalogue and its accounts and keys: groups in a fixed order (accounts;
/// keys by role: main, standard, publishable; key × API in catalogue order), subjects by SID.
/// Groups that count no one are left out.
pub fn fleet_groups(
    cat: &ApiCatalog,
    accounts: &[Account],
    keys: &[Key],
) -> Result<Vec<Group>, Error> {
    let mut accounts: Vec<&Account> = accounts.iter().collect();
    accounts.sort_by(|a, b| a.sid.cmp(&b.sid));
    let mut keys: Vec<&Key> = keys.iter().collect();
    keys.sort_by(|a, b| a.sid.cmp(&b.sid));
    let fleet = |path: &str, r: Option<&RateDoc>| match r {
        Some(r) => FleetRate::of(path, r),
        None => Ok(None),
    };
    let mut groups = Vec::new();

    let mut group = Group::new(
        Subject::Account {
            account_sid: "".into(),
        },
        fleet("limits.account", cat.limits.account.as_ref())?,
    );
    for a in &accounts {
        if let Some(r) = a.limits.as_ref().and_then(|l| l.rate.as_ref()) {
            let path = format!("{}.limits.rate", a.sid);
            group
                .overrides
                .push((a.sid.clone(), FleetRate::of(&path, r)?));
        }
    }
    groups.push(group);

    for role in ROLES {
        let default = match role {
            Role::Main => &cat.limits.key.main,
            Role::Standard => &cat.limits.key.standard,
            Role::Publishable => &cat.limits.key.publishable,
        };
        let path = format!("limits.key.{}", role.as_str());
        let mut group = Group::new(
            Subject::Key {
                role,
                key_sid: "".into(),
            },
            fleet(&path, default.as_ref())?,
        );
        for k in keys.iter().filter(|k| k.role == role) {
            if let Some(r) = k.limits.as_ref().and_then(|l| l.rate.as_ref()) {
                let path = format!("{}.limits.rate", k.sid);
                group
                    .overrides
                    .push((k.sid.clone(), FleetRate::of(&path, r)?));
            }
        }
        groups.push(group);
    }

    for (i, api) in cat.apis.iter().enumerate() {
        let mut group = Group::new(
            Subject::KeyApi {
                api: api.name.as_str().into(),
                key_sid: "".into(),
            },
            fleet(&format!("apis[{i}].limit"), api.limit.as_ref())?,
        );
        for k in &keys {
            if let Some(r) = k.limits.as_ref().and_then(|l| l.apis.get(&api.name)) {
                let path = format!("{}.limits.apis.{}", k.sid, api.name);
                group
                    .overrides
                    .push((k.sid.clone(), FleetRate::of(&path, r)?));
            }
        }
        groups.push(group);
    }
    groups.retain(Group::counts_anyone);
    Ok(groups)
}

/// A YAML double-quoted scalar (JSON's string syntax is YAML's).
fn q(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// A CEL string literal (single quotes). keygate's SIDs, roles and API names never hold a quote
/// or a backslash (the compiler's rules), but escape them anyway.
fn cel(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// envoyproxy/ratelimit's configuration of `groups` at config `version`.
pub fn envoy_ratelimit_yaml(groups: &[Group], version: u64) -> String {
    let mut out = format!(
        "# keygate fleet limits (\"scope\": \"fleet\") at config version {version}, for envoyproxy/ratelimit.\n\
         # Descriptors: keygate=account, account_sid; keygate=key, role, key_sid; keygate=key_api, api, key_sid.\n\
         domain: {}\n",
        q(DEFAULT_DOMAIN)
    );
    if groups.is_empty() {
        out.push_str("descriptors: []\n");
        return out;
    }
    out.push_str("descriptors:\n");
    nest(&mut out, groups, 0, 0);
    out
}

/// Writes the descriptors of `groups` (which share their first `depth` prefix entries) at
/// `indent`, merging consecutive groups that share the next prefix entry.
fn nest(out: &mut String, groups: &[Group], depth: usize, indent: usize) {
    let pad = " ".repeat(indent);
    let mut i = 0;
    while i < groups.len() {
        let Some((key, value)) = groups[i].prefix.get(depth) else {
            leaves(out, &groups[i], indent);
            i += 1;
            continue;
        };
        let same = groups[i..]
            .iter()
            .take_while(|g| g.prefix.get(depth) == Some(&(*key, value.clone())))
            .count();
        out.push_str(&format!(
            "{pad}- key: {}\n{pad}  value: {}\n{pad}  descriptors:\n",
            q(key),
            q(value)
        ));
        nest(out, &groups[i..i + same], depth + 1, indent + 4);
        i += same;
    }
}

/// The default and the overrides of one group, as descriptors at `indent`.
fn leaves(out: &mut String, g: &Group, indent: usize) {
    let pad = " ".repeat(indent);
    let path: Vec<String> = g.prefix.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let path = path.join(", ");
    let limit = |out: &mut String, r: FleetRate| {
        if let Some(unit) = r.envoy_unit() {
            out.push_str(&format!(
                "{pad}  rate_limit:\n{pad}    unit: {unit}\n{pad}    requests_per_unit: {}\n",
                r.max
            ));
        }
    };
    // Whether the default reaches subjects in this export (then overridden subjects that the
    // fleet does not count, or counts at a period it cannot express, must be held off it).
    let default_in = g.default.is_some_and(|r| r.envoy_unit().is_some());
    match g.default {
        Some(r) if r.envoy_unit().is_none() => out.push_str(&format!(
            "{pad}# {path}: the default, {}, is left out: envoyproxy/ratelimit counts only per second, minute, hour or day\n",
            r.describe()
        )),
        Some(r) => {
            out.push_str(&format!("{pad}- key: {}\n", q(g.subject_key)));
            limit(out, r);
        }
        None => {}
    }
    for (sid, rate) in &g.overrides {
        match rate {
            Some(r) if r.envoy_unit().is_some() => {
                out.push_str(&format!(
                    "{pad}- key: {}\n{pad}  value: {}\n",
                    q(g.subject_key),
                    q(sid)
                ));
                limit(out, *r);
            }
            Some(r) => {
                out.push_str(&format!(
                    "{pad}# {path}, {}={sid}: {} is left out: envoyproxy/ratelimit counts only per second, minute, hour or day\n",
                    g.subject_key,
                    r.describe()
                ));
                if default_in {
                    unlimited(out, &pad, g.subject_key, sid);
                }
            }
            None if default_in => {
                out.push_str(&format!(
                    "{pad}# {}={sid} has a local limit of its own: not counted by the fleet\n",
                    g.subject_key
                ));
                unlimited(out, &pad, g.subject_key, sid);
            }
            None => {}
        }
    }
}

fn unlimited(out: &mut String, pad: &str, key: &str, sid: &str) {
    out.push_str(&format!(
        "{pad}- key: {}\n{pad}  value: {}\n{pad}  rate_limit:\n{pad}    unlimited: true\n",
        q(key),
        q(sid)
    ));
}

/// The Limitador server's limits file for `groups` at config `version`.
pub fn limitador_yaml(groups: &[Group], version: u64) -> String {
    let mut out = format!(
        "# keygate fleet limits (\"scope\": \"fleet\") at config version {version}, for Limitador (limits file).\n\
         # Each limit tests descriptors[0], the descriptor being checked; a default excludes the subjects\n\
         # that have an override, so exactly one limit applies to any subject.\n"
    );
    let mut limits = Vec::new();
    for g in groups {
        let d = |k: &str| format!("descriptors[0].{k}");
        let conditions: Vec<String> = g
            .prefix
            .iter()
            .map(|(k, v)| format!("{} == {}", d(k), cel(v)))
            .collect();
        let base: Vec<&str> = g.prefix.iter().map(|(_, v)| v.as_str()).collect();
        let name = base.join("/");
        let variables = vec![d(g.subject_key)];
        if let Some(r) = g.default {
            let mut conds = conditions.clone();
            if !g.overrides.is_empty() {
                let sids: Vec<String> = g.overrides.iter().map(|(s, _)| cel(s)).collect();
                conds.push(format!("!({} in [{}])", d(g.subject_key), sids.join(", ")));
            }
            limits.push((name.clone(), r, conds, variables.clone()));
        }
        for (sid, rate) in &g.overrides {
            if let Some(r) = rate {
                let mut conds = conditions.clone();
                conds.push(format!("{} == {}", d(g.subject_key), cel(sid)));
                limits.push((format!("{name}/{sid}"), *r, conds, variables.clone()));
            }
        }
    }
    if limits.is_empty() {
        out.push_str("[]\n");
        return out;
    }
    for (name, r, conditions, variables) in limits {
        out.push_str(&format!(
            "- namespace: {}\n  name: {}\n  max_value: {}\n  seconds: {}\n  conditions:\n",
            q(DEFAULT_DOMAIN),
            q(&name),
            r.max,
            r.seconds
        ));
        for c in conditions {
            out.push_str(&format!("    - {}\n", q(&c)));
        }
        out.push_str("  variables:\n");
        for v in variables {
            out.push_str(&format!("    - {}\n", q(&v)));
        }
    }
    out
}

async fn ratelimit_config(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, Error> {
    caller.may_read_feed()?;
    let format = Format::from_query(query.as_deref())?;
    let cat = state.catalog().clone();
    // One read transaction: the version and the accounts and keys it names.
    let read = state
        .db()
        .read(move |tx| {
            let version = tx.version()?;
            if crate::edge::not_modified(&headers, version) {
                return Ok((version, None));
            }
            let groups = fleet_groups(&cat, &tx.all_accounts()?, &tx.all_keys()?)?;
            Ok((version, Some(groups)))
        })
        .await?;
    let (version, groups) = match read {
        (version, None) => return Ok(crate::edge::not_modified_response(version)),
        (version, Some(groups)) => (version, groups),
    };
    let body = match format {
        Format::EnvoyRatelimit => envoy_ratelimit_yaml(&groups, version),
        Format::Limitador => limitador_yaml(&groups, version),
    };
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/yaml"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&crate::edge::etag(version)) {
        h.insert(header::ETAG, v);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_is_required_and_known() {
        let msg = |q: Option<&str>| Format::from_query(q).map_err(|e| e.message());
        assert_eq!(
            msg(Some("format=envoy-ratelimit")),
            Ok(Format::EnvoyRatelimit)
        );
        assert_eq!(
            msg(Some("format=yaml&format=limitador")),
            Ok(Format::Limitador)
        );
        assert_eq!(
            msg(None),
            Err("format: required: envoy-ratelimit or limitador".to_owned())
        );
        assert_eq!(
            msg(Some("format=json")),
            Err(
                "format: unknown format \"json\" (expected envoy-ratelimit or limitador)"
                    .to_owned()
            )
        );
    }
}
