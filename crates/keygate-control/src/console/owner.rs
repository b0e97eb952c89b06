//! An account owner's pages: the keys list and the create form, one key's page (its secrets and
//! their last use, regenerate with a grace, revoke the previous secrets, enable / disable, edit,
//! throttle limits, usage charts) and the delete confirmation. Each read and each change is the
//! `/v1` request it stands for, sent with the session's credential.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use maud::{html, Markup};
use serde_json::{json, Map, Value};

use super::api::Refused;
use super::page::{button_form, csrf, layout, or_dash, redirect, respond, secret_box};
use super::session::{Flash, Session, Who};
use super::{call, chart, posted, refused_page, refused_then, sid_ok, Ctx, Form, SignedIn};
use crate::catalog::ApiCatalog;
use crate::model::{now, rfc3339};
use crate::AppState;

/// The signed-in owner, or the response for anyone else (sign-in page; 403 for the operator).
fn owner(ctx: &Ctx) -> Result<(SignedIn, String), Response> {
    let Some(me) = ctx.signed_in() else {
        return Err(redirect("/console/login"));
    };
    match &me.who {
        Who::Owner { account_sid, .. } => {
            let ac = account_sid.clone();
            Ok((me, ac))
        }
        Who::Operator { .. } => Err(super::page::refusal(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the operator manages accounts and the fleet; keys are managed by each account's owner",
            Some(&me.session),
        )),
    }
}

fn s(v: &Value) -> Option<&str> {
    v.as_str()
}

/// `200 per 1m`, with `(fleet)` / `(shadow)` when the rate says so.
pub fn rate_text(r: &Value) -> Option<String> {
    let requests = r["requests"].as_u64()?;
    let per = r["per"].as_str()?;
    let mut t = format!("{requests} per {per}");
    if r["scope"].as_str() == Some("fleet") {
        t.push_str(" (fleet)");
    }
    if r["shadow"].as_bool() == Some(true) {
        t.push_str(" (shadow)");
    }
    Some(t)
}

fn list_text(v: &Value) -> Option<String> {
    let items: Vec<&str> = v.as_array()?.iter().filter_map(Value::as_str).collect();
    Some(items.join(", "))
}

fn limits_text(l: &Value) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(r) = rate_text(&l["rate"]) {
        parts.push(r);
    }
    if let Some(apis) = l["apis"].as_object() {
        for (api, r) in apis {
            if let Some(r) = rate_text(r) {
                parts.push(format!("{api}: {r}"));
            }
        }
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// When `obj` (a key or a secret) was last used, as the API wrote it: `never` for `null`, `not
/// recorded` when the field is absent (a control plane that records no usage).
fn last_used_of(obj: &Value) -> Markup {
    match obj.get("last_used_at") {
        Some(Value::String(t)) => html! { time datetime=(t) { (t) } },
        Some(_) => html! { "never" },
        None => html! { span class="muted" { "not recorded" } },
    }
}

fn enabled_badge(on: bool) -> Markup {
    if on {
        html! { span class="badge on" { "enabled" } }
    } else {
        html! { span class="badge off" { "disabled" } }
    }
}

/// The create / edit form of a key (`key`: its values when editing).
fn key_form(
    cat: &ApiCatalog,
    session: &Session,
    key: Option<&Value>,
    action: &str,
    submit: &str,
    id: &str,
) -> Markup {
    let k = key.cloned().unwrap_or(Value::Null);
    let role = k["role"].as_str().unwrap_or("standard");
    let chosen: Vec<&str> = k["apis"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let allowlist = k["allowed_ips"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default();
    let rate = &k["limits"]["rate"];
    html! {
        form method="post" action=(action) class="stack" id=(id) {
            (csrf(session))
            div {
                label for=(format!("{id}-name")) { "Name" }
                input type="text" id=(format!("{id}-name")) name="friendly_name" maxlength="64"
                    value=(k["friendly_name"].as_str().unwrap_or(""));
            }
            div {
                label for=(format!("{id}-role")) { "Role" }
                select id=(format!("{id}-role")) name="role" {
                    @for r in ["main", "standard", "publishable"] {
                        option value=(r) selected[r == role] { (r) }
                    }
                }
            }
            fieldset {
                legend { "APIs " span class="hint" { "(none ticked: every API its role may call)" } }
                @for api in &cat.apis {
                    label class="check" {
                        input type="checkbox" name="apis" value=(api.name) checked[chosen.contains(&api.name.as_str())];
                        " " (api.name)
                    }
                }
            }
            div {
                label for=(format!("{id}-ips")) { "IP allowlist " span class="hint" { "(one address or CIDR a line; empty: any address)" } }
                textarea id=(format!("{id}-ips")) name="allowed_ips" rows="3" spellcheck="false" { (allowlist) }
            }
            div {
                label for=(format!("{id}-expires")) { "Expires at " span class="hint" { "(RFC 3339, like 2026-12-31T00:00:00Z; empty: never)" } }
                input type="text" id=(format!("{id}-expires")) name="expires_at" spellcheck="false"
                    value=(k["expires_at"].as_str().unwrap_or(""));
            }
            fieldset {
                legend { "Limits " span class="hint" { "(empty: the catalogue's default)" } }
                div class="row" {
                    div {
                        label for=(format!("{id}-rate")) { "Key rate: requests" }
                        input type="number" min="1" id=(format!("{id}-rate")) name="rate_requests"
                            value=(rate["requests"].as_u64().map(|n| n.to_string()).unwrap_or_default());
                    }
                    div {
                        label for=(format!("{id}-per")) { "per" }
                        input type="text" id=(format!("{id}-per")) name="rate_per" placeholder="1m" size="6"
                            value=(rate["per"].as_str().unwrap_or(""));
                    }
                }
                @for api in &cat.apis {
                    @let r = &k["limits"]["apis"][api.name.as_str()];
                    div class="row" {
                        div {
                            label for=(format!("{id}-api-{}", api.name)) { "API " (api.name) ": requests" }
                            input type="number" min="1" id=(format!("{id}-api-{}", api.name))
                                name=(format!("api_{}_requests", api.name))
                                value=(r["requests"].as_u64().map(|n| n.to_string()).unwrap_or_default());
                        }
                        div {
                            label for=(format!("{id}-api-{}-per", api.name)) { "per" }
                            input type="text" id=(format!("{id}-api-{}-per", api.name)) size="6" placeholder="1m"
                                name=(format!("api_{}_per", api.name))
                                value=(r["per"].as_str().unwrap_or(""));
                        }
                    }
                }
            }
            div { button type="submit" { (submit) } }
        }
    }
}

fn bad(field: &str, message: &str) -> Refused {
    Refused {
        status: StatusCode::BAD_REQUEST,
        code: "invalid_request".to_owned(),
        message: format!("{field}: {message}"),
    }
}

/// A rate from fields `{prefix}_requests` / `{prefix}_per`; keeps `scope` and `shadow` of the
/// rate it replaces. `None` when no number is given.
fn rate_field(form: &Form, prefix: &str, before: &Value) -> Result<Option<Value>, Refused> {
    let Some(requests) = form.get(&format!("{prefix}_requests")) else {
        return Ok(None);
    };
    let requests: u32 = requests
        .parse()
        .map_err(|_| bad(&format!("{prefix}_requests"), "must be a whole number"))?;
    let per = form.get(&format!("{prefix}_per")).unwrap_or("1m");
    let mut rate = json!({"requests": requests, "per": per});
    for kept in ["scope", "shadow"] {
        if let Some(v) = before.get(kept) {
            rate[kept] = v.clone();
        }
    }
    Ok(Some(rate))
}

/// The key fields of a create / edit form as the API's JSON (`before`: the key being edited).
fn key_body(cat: &ApiCatalog, form: &Form, before: &Value) -> Result<Value, Refused> {
    let apis: Vec<&str> = form.all("apis");
    let ips: Vec<&str> = form
        .get("allowed_ips")
        .unwrap_or("")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let mut limits = Map::new();
    if let Some(r) = rate_field(form, "rate", &before["limits"]["rate"])? {
        limits.insert("rate".to_owned(), r);
    }
    let mut per_api = Map::new();
    for api in &cat.apis {
        let prefix = format!("api_{}", api.name);
        if let Some(r) = rate_field(form, &prefix, &before["limits"]["apis"][api.name.as_str()])? {
            per_api.insert(api.name.clone(), r);
        }
    }
    if !per_api.is_empty() {
        limits.insert("apis".to_owned(), Value::Object(per_api));
    }
    Ok(json!({
        "friendly_name": form.get("friendly_name"),
        "role": form.get("role").unwrap_or("standard"),
        "apis": if apis.is_empty() { Value::Null } else { json!(apis) },
        "allowed_ips": if ips.is_empty() { Value::Null } else { json!(ips) },
        "limits": if limits.is_empty() { Value::Null } else { Value::Object(limits) },
        "expires_at": form.get("expires_at"),
    }))
}

pub async fn keys(State(state): State<AppState>, ctx: Ctx) -> Response {
    let (me, ac) = match owner(&ctx) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let path = format!("/v1/accounts/{ac}/keys");
    let listed = match call(&state, &ctx, &me.who, Method::GET, &path, None).await {
        Ok(v) => v,
        Err(r) => return refused_page(&state, &ctx, &me, r),
    };
    let flashes = state.console().sessions.take_flash(&me.id);
    let keys = listed["keys"].as_array().cloned().unwrap_or_default();
    let body = html! {
        p { "Keys of account " code { (ac) } ". A key's secret is shown once, when the key is made or regenerated." }
        table id="keys" {
            caption class="muted" { (keys.len()) " keys" }
            thead { tr {
                th scope="col" { "Name" } th scope="col" { "SID" } th scope="col" { "Role" }
                th scope="col" { "APIs" } th scope="col" { "Allowlist" } th scope="col" { "Limits" }
                th scope="col" { "State" } th scope="col" { "Created" } th scope="col" { "Last used" }
            } }
            tbody {
                @for k in &keys {
                    @let sid = k["sid"].as_str().unwrap_or("");
                    tr data-sid=(sid) {
                        td { a href=(format!("/console/keys/{sid}")) { (k["friendly_name"].as_str().unwrap_or("(no name)")) } }
                        td { code { (sid) } }
                        td { (k["role"].as_str().unwrap_or("")) }
                        td { (or_dash(list_text(&k["apis"]).as_deref().or(Some("all")))) }
                        td { (or_dash(list_text(&k["allowed_ips"]).as_deref().or(Some("any")))) }
                        td { (or_dash(limits_text(&k["limits"]).as_deref())) }
                        td { (enabled_badge(k["enabled"].as_bool().unwrap_or(false))) }
                        td { (or_dash(s(&k["created_at"]))) }
                        td { (last_used_of(k)) }
                    }
                }
            }
        }
        h2 { "Create a key" }
        (key_form(state.catalog(), &me.session, None, "/console/keys", "Create key", "create"))
    };
    respond(
        StatusCode::OK,
        layout("API keys", Some(&me.session), &flashes, body),
    )
}

pub async fn create(State(state): State<AppState>, ctx: Ctx, body: Bytes) -> Response {
    let (me, form) = match posted(&ctx, &body) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let Who::Owner {
        account_sid: ac, ..
    } = &me.who
    else {
        return owner(&ctx).err().unwrap_or_else(|| redirect("/console"));
    };
    let answer = match key_body(state.catalog(), &form, &Value::Null) {
        Ok(b) => {
            let path = format!("/v1/accounts/{ac}/keys");
            call(&state, &ctx, &me.who, Method::POST, &path, Some(&b)).await
        }
        Err(r) => Err(r),
    };
    match answer {
        Ok(v) => {
            let sid = v["sid"].as_str().unwrap_or("").to_owned();
            let sessions = &state.console().sessions;
            if let Some(secret) = v["secret"].as_str() {
                sessions.flash(
                    &me.id,
                    Flash::Secret {
                        owner: sid.clone(),
                        what: "key secret",
                        secret: secret.to_owned(),
                    },
                );
            }
            sessions.flash(&me.id, Flash::Notice(format!("Key {sid} created.")));
            redirect(&format!("/console/keys/{sid}"))
        }
        Err(r) => refused_then(&state, &ctx, &me, r, "/console/keys"),
    }
}

/// The usage of one key over a window, charted; "no usage yet" when the API has none.
async fn usage(
    state: &AppState,
    ctx: &Ctx,
    me: &SignedIn,
    ac: &str,
    sid: &str,
    (title, id, step, slots): (&str, &str, i64, usize),
) -> Markup {
    let t = now();
    let from = (t / step) * step - step * (slots as i64 - 1);
    let to = from + step * slots as i64;
    let bucket = if step == 60 { "1m" } else { "1h" };
    let path = format!(
        "/v1/accounts/{ac}/usage?key_sid={sid}&from={}&to={}&bucket={bucket}",
        rfc3339(from),
        rfc3339(to)
    );
    match call(state, ctx, &me.who, Method::GET, &path, None).await {
        Ok(answer) => {
            let buckets = chart::parse(&answer);
            if buckets
                .iter()
                .all(|b| b.allowed == 0 && b.denied_total() == 0)
            {
                html! { p class="no-usage" data-chart=(id) { strong { (title) } ": no usage yet." } }
            } else {
                chart::chart(title, id, &buckets, from, step, slots)
            }
        }
        Err(r) if r.status == StatusCode::NOT_FOUND => {
            html! { p class="no-usage" data-chart=(id) { strong { (title) } ": no usage yet." } }
        }
        Err(r) => html! {
            p class="no-usage" data-chart=(id) {
                strong { (title) } ": usage unavailable (" code { (r.code) } " — " (r.message) ")."
            }
        },
    }
}

fn throttle_table(cat: &ApiCatalog, key: &Value, account: &Value) -> Markup {
    let role = key["role"].as_str().unwrap_or("standard");
    let role_default = match role {
        "main" => cat.limits.key.main.as_ref(),
        "publishable" => cat.limits.key.publishable.as_ref(),
        _ => cat.limits.key.standard.as_ref(),
    };
    let to_value = |r: Option<&keygate_core::config::RateDoc>| {
        r.and_then(|r| serde_json::to_value(r).ok())
            .unwrap_or(Value::Null)
    };
    let row = |what: Markup, default: Value, own: &Value| {
        let d = rate_text(&default);
        let o = rate_text(own);
        let in_force = o.clone().or(d.clone());
        html! {
            tr {
                th scope="row" { (what) }
                td { (or_dash(d.as_deref())) }
                td { (or_dash(o.as_deref())) }
                td { (or_dash(in_force.as_deref())) }
            }
        }
    };
    let concurrency_default = cat.limits.account_concurrency.map(|c| c.to_string());
    let concurrency_own = account["limits"]["concurrency"]
        .as_u64()
        .map(|c| c.to_string());
    html! {
        table id="limits" {
            thead { tr {
                th scope="col" { "Limit" } th scope="col" { "Catalogue default" }
                th scope="col" { "Own" } th scope="col" { "In force" }
            } }
            tbody {
                (row(html! { "This key (role " (role) ")" }, to_value(role_default), &key["limits"]["rate"]))
                @for api in &cat.apis {
                    (row(html! { "API " code { (api.name) } " for this key" }, to_value(api.limit.as_ref()), &key["limits"]["apis"][api.name.as_str()]))
                }
                (row(html! { "The account (all its keys)" }, to_value(cat.limits.account.as_ref()), &account["limits"]["rate"]))
                tr {
                    th scope="row" { "The account's requests in flight" }
                    td { (or_dash(concurrency_default.as_deref())) }
                    td { (or_dash(concurrency_own.as_deref())) }
                    td { (or_dash(concurrency_own.as_deref().or(concurrency_default.as_deref()))) }
                }
            }
        }
    }
}

pub async fn key(State(state): State<AppState>, ctx: Ctx, Path(sid): Path<String>) -> Response {
    let (me, ac) = match owner(&ctx) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    if !sid_ok(&sid) {
        return refused_page(&state, &ctx, &me, not_found());
    }
    let path = format!("/v1/accounts/{ac}/keys/{sid}");
    let key = match call(&state, &ctx, &me.who, Method::GET, &path, None).await {
        Ok(v) => v,
        Err(r) => return refused_page(&state, &ctx, &me, r),
    };
    let account = call(
        &state,
        &ctx,
        &me.who,
        Method::GET,
        &format!("/v1/accounts/{ac}"),
        None,
    )
    .await
    .unwrap_or(Value::Null);
    let hour = usage(
        &state,
        &ctx,
        &me,
        &ac,
        &sid,
        ("Last hour, per minute", "hour", 60, 60),
    )
    .await;
    let day = usage(
        &state,
        &ctx,
        &me,
        &ac,
        &sid,
        ("Last day, per hour", "day", 3600, 24),
    )
    .await;
    let flashes = state.console().sessions.take_flash(&me.id);
    let shown = flashes.iter().find_map(|f| match f {
        Flash::Secret {
            owner,
            what,
            secret,
        } if *owner == sid => Some((*what, secret.as_str())),
        _ => None,
    });
    let secrets = key["secrets"].as_array().cloned().unwrap_or_default();
    let previous = secrets.iter().any(|s| s["current"] == json!(false));
    let enabled = key["enabled"].as_bool().unwrap_or(false);
    let base = format!("/console/keys/{sid}");
    let title = format!("Key {}", key["friendly_name"].as_str().unwrap_or(&sid));
    let body = html! {
        @if let Some((what, secret)) = shown { (secret_box(what, secret)) }
        table id="key" {
            tbody {
                tr { th scope="row" { "SID" } td { code { (sid) } } }
                tr { th scope="row" { "Name" } td { (or_dash(s(&key["friendly_name"]))) } }
                tr { th scope="row" { "Role" } td { (key["role"].as_str().unwrap_or("")) } }
                tr { th scope="row" { "APIs" } td { (or_dash(list_text(&key["apis"]).as_deref().or(Some("all")))) } }
                tr { th scope="row" { "IP allowlist" } td { (or_dash(list_text(&key["allowed_ips"]).as_deref().or(Some("any")))) } }
                tr { th scope="row" { "State" } td { (enabled_badge(enabled)) } }
                tr { th scope="row" { "Expires" } td { (or_dash(s(&key["expires_at"]))) } }
                tr { th scope="row" { "Created" } td { (or_dash(s(&key["created_at"]))) } }
                tr { th scope="row" { "Last used" } td { (last_used_of(&key)) } }
            }
        }
        div class="row" {
            @if enabled {
                (button_form(&me.session, &format!("{base}/disable"), "Disable key", "secondary"))
            } @else {
                (button_form(&me.session, &format!("{base}/enable"), "Enable key", "secondary"))
            }
            a href=(format!("{base}/delete")) { "Delete key…" }
        }
        h2 { "Secrets" }
        table id="secrets" {
            thead { tr {
                th scope="col" { "Secret" } th scope="col" { "Created" }
                th scope="col" { "Valid until" } th scope="col" { "Last used" }
            } }
            tbody {
                @for sec in &secrets {
                    tr {
                        td { @if sec["current"] == json!(true) { "current" } @else { "previous" } }
                        td { (or_dash(s(&sec["created_at"]))) }
                        td { (or_dash(s(&sec["not_after"]).or(Some("until regenerated")))) }
                        td { (last_used_of(sec)) }
                    }
                }
            }
        }
        form method="post" action=(format!("{base}/regenerate")) class="stack" id="regenerate" {
            (csrf(&me.session))
            div {
                label for="grace" { "Regenerate the secret; the current one keeps working for" }
                select id="grace" name="grace_seconds" {
                    option value="172800" selected { "48 hours (default)" }
                    option value="86400" { "24 hours" }
                    option value="3600" { "1 hour" }
                    option value="0" { "no time: revoke it now" }
                }
            }
            div { button type="submit" { "Regenerate secret" } }
        }
        @if previous {
            p {
                (button_form(&me.session, &format!("{base}/revoke-previous"), "Revoke the previous secret now", "danger"))
            }
        }
        h2 { "Usage" }
        div class="charts" { (hour) (day) }
        h2 { "Throttle limits" }
        (throttle_table(state.catalog(), &key, &account))
        h2 { "Edit" }
        (key_form(state.catalog(), &me.session, Some(&key), &format!("{base}/edit"), "Save changes", "edit"))
    };
    respond(
        StatusCode::OK,
        layout(&title, Some(&me.session), &flashes, body),
    )
}

fn not_found() -> Refused {
    let e = crate::error::Error::NotFound;
    Refused {
        status: StatusCode::NOT_FOUND,
        code: e.code().to_owned(),
        message: e.message(),
    }
}

pub async fn act(
    State(state): State<AppState>,
    ctx: Ctx,
    Path((sid, action)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let (me, form) = match posted(&ctx, &body) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let Who::Owner {
        account_sid: ac, ..
    } = &me.who
    else {
        return owner(&ctx).err().unwrap_or_else(|| redirect("/console"));
    };
    if !sid_ok(&sid) {
        return refused_page(&state, &ctx, &me, not_found());
    }
    let base = format!("/v1/accounts/{ac}/keys/{sid}");
    let back = format!("/console/keys/{sid}");
    let who = &me.who;
    let answer = match action.as_str() {
        "enable" | "disable" => {
            let b = json!({"enabled": action == "enable"});
            call(&state, &ctx, who, Method::PATCH, &base, Some(&b))
                .await
                .map(|_| format!("Key {sid} {action}d."))
        }
        "edit" => {
            let before = call(&state, &ctx, who, Method::GET, &base, None).await;
            match before.and_then(|before| key_body(state.catalog(), &form, &before)) {
                Ok(b) => call(&state, &ctx, who, Method::PATCH, &base, Some(&b))
                    .await
                    .map(|_| format!("Key {sid} saved.")),
                Err(r) => Err(r),
            }
        }
        "regenerate" => {
            let grace = form.get("grace_seconds").unwrap_or("172800");
            match grace.parse::<u64>() {
                Ok(g) => {
                    let b = json!({"grace_seconds": g});
                    let path = format!("{base}/regenerate");
                    call(&state, &ctx, who, Method::POST, &path, Some(&b))
                        .await
                        .map(|v| {
                            if let Some(secret) = v["secret"].as_str() {
                                state.console().sessions.flash(
                                    &me.id,
                                    Flash::Secret {
                                        owner: sid.clone(),
                                        what: "key secret",
                                        secret: secret.to_owned(),
                                    },
                                );
                            }
                            if g == 0 {
                                format!("Key {sid} regenerated; the previous secret no longer works.")
                            } else {
                                format!("Key {sid} regenerated; the previous secret works for {g} more seconds.")
                            }
                        })
                }
                Err(_) => Err(bad("grace_seconds", "must be a whole number of seconds")),
            }
        }
        "revoke-previous" => {
            let path = format!("{base}/secrets/previous");
            call(&state, &ctx, who, Method::DELETE, &path, None)
                .await
                .map(|_| format!("The previous secrets of key {sid} are revoked."))
        }
        _ => Err(not_found()),
    };
    match answer {
        Ok(notice) => {
            state
                .console()
                .sessions
                .flash(&me.id, Flash::Notice(notice));
            redirect(&back)
        }
        Err(r) => refused_then(&state, &ctx, &me, r, &back),
    }
}

pub async fn confirm_delete(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(sid): Path<String>,
) -> Response {
    let (me, ac) = match owner(&ctx) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    if !sid_ok(&sid) {
        return refused_page(&state, &ctx, &me, not_found());
    }
    let path = format!("/v1/accounts/{ac}/keys/{sid}");
    let key = match call(&state, &ctx, &me.who, Method::GET, &path, None).await {
        Ok(v) => v,
        Err(r) => return refused_page(&state, &ctx, &me, r),
    };
    let body = html! {
        p {
            "Delete key " code { (sid) } " (" (key["friendly_name"].as_str().unwrap_or("no name")) ")? "
            "Every secret of it stops working at the edge within seconds. This cannot be undone."
        }
        form method="post" action=(format!("/console/keys/{sid}/delete")) class="row" id="confirm-delete" {
            (csrf(&me.session))
            button type="submit" class="danger" { "Delete this key" }
            a href=(format!("/console/keys/{sid}")) { "Cancel" }
        }
    };
    respond(
        StatusCode::OK,
        layout("Delete a key", Some(&me.session), &[], body),
    )
}

pub async fn delete(
    State(state): State<AppState>,
    ctx: Ctx,
    Path(sid): Path<String>,
    body: Bytes,
) -> Response {
    let (me, _) = match posted(&ctx, &body) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let Who::Owner {
        account_sid: ac, ..
    } = &me.who
    else {
        return owner(&ctx).err().unwrap_or_else(|| redirect("/console"));
    };
    if !sid_ok(&sid) {
        return refused_page(&state, &ctx, &me, not_found());
    }
    let path = format!("/v1/accounts/{ac}/keys/{sid}");
    match call(&state, &ctx, &me.who, Method::DELETE, &path, None).await {
        Ok(_) => {
            state
                .console()
                .sessions
                .flash(&me.id, Flash::Notice(format!("Key {sid} deleted.")));
            redirect("/console/keys")
        }
        Err(r) => refused_then(&state, &ctx, &me, r, &format!("/console/keys/{sid}")),
    }
}
