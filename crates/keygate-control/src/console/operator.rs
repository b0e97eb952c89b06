//! The operator's pages: every account (create; suspend / reactivate; region, regions, allowlist
//! and limits) and the fleet view of the edges. Each read and each change is the `/v1` request
//! it stands for, sent with the admin token the session was opened with.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use maud::{html, Markup};
use serde_json::{json, Map, Value};

use super::api::Refused;
use super::owner::rate_text;
use super::page::{button_form, csrf, layout, or_dash, redirect, respond, secret_box};
use super::session::{Flash, Who};
use super::{call, posted, refused_page, refused_then, sid_ok, Ctx, Form, SignedIn};
use crate::AppState;

fn operator(ctx: &Ctx) -> Result<SignedIn, Response> {
    let Some(me) = ctx.signed_in() else {
        return Err(redirect("/console/login"));
    };
    match me.who {
        Who::Operator { .. } => Ok(me),
        Who::Owner { .. } => Err(super::page::refusal(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only the operator (admin token) may do this",
            Some(&me.session),
        )),
    }
}

fn bad(field: &str, message: &str) -> Refused {
    Refused {
        status: StatusCode::BAD_REQUEST,
        code: "invalid_request".to_owned(),
        message: format!("{field}: {message}"),
    }
}

fn list(v: &Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn status_badge(status: &str) -> Markup {
    let class = if status == "active" {
        "badge on"
    } else {
        "badge off"
    };
    html! { span class=(class) { (status) } }
}

/// The account fields of the create / edit form (`a`: the account being edited).
fn account_form(me: &SignedIn, a: Option<&Value>, action: &str, submit: &str, id: &str) -> Markup {
    let a = a.cloned().unwrap_or(Value::Null);
    let ips = a["allowed_ips"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default();
    let rate = &a["limits"]["rate"];
    html! {
        form method="post" action=(action) class="stack" id=(id) {
            (csrf(&me.session))
            div {
                label for=(format!("{id}-name")) { "Name" }
                input type="text" id=(format!("{id}-name")) name="friendly_name" maxlength="64"
                    value=(a["friendly_name"].as_str().unwrap_or(""));
            }
            div class="row" {
                div {
                    label for=(format!("{id}-region")) { "Home region " span class="hint" { "(empty: the default)" } }
                    input type="text" id=(format!("{id}-region")) name="region" spellcheck="false"
                        value=(a["region"].as_str().unwrap_or(""));
                }
                div {
                    label for=(format!("{id}-regions")) { "Further regions " span class="hint" { "(comma-separated)" } }
                    input type="text" id=(format!("{id}-regions")) name="regions" spellcheck="false"
                        value=(list(&a["regions"]));
                }
            }
            div {
                label for=(format!("{id}-ips")) { "IP allowlist " span class="hint" { "(one address or CIDR a line; empty: any address)" } }
                textarea id=(format!("{id}-ips")) name="allowed_ips" rows="3" spellcheck="false" { (ips) }
            }
            fieldset {
                legend { "Limits " span class="hint" { "(empty: the catalogue's default)" } }
                div class="row" {
                    div {
                        label for=(format!("{id}-rate")) { "Account rate: requests" }
                        input type="number" min="1" id=(format!("{id}-rate")) name="rate_requests"
                            value=(rate["requests"].as_u64().map(|n| n.to_string()).unwrap_or_default());
                    }
                    div {
                        label for=(format!("{id}-per")) { "per" }
                        input type="text" id=(format!("{id}-per")) name="rate_per" size="6" placeholder="1m"
                            value=(rate["per"].as_str().unwrap_or(""));
                    }
                    div {
                        label for=(format!("{id}-conc")) { "Requests in flight" }
                        input type="number" min="1" id=(format!("{id}-conc")) name="concurrency"
                            value=(a["limits"]["concurrency"].as_u64().map(|n| n.to_string()).unwrap_or_default());
                    }
                }
            }
            div { button type="submit" { (submit) } }
        }
    }
}

/// The form as the API's account JSON (`before`: the account being edited; a rate keeps its
/// `scope` and `shadow`).
fn account_body(form: &Form, before: &Value, creating: bool) -> Result<Value, Refused> {
    let ips: Vec<&str> = form
        .get("allowed_ips")
        .unwrap_or("")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let regions: Vec<&str> = form
        .get("regions")
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .collect();
    let mut limits = Map::new();
    if let Some(n) = form.get("rate_requests") {
        let n: u32 = n
            .parse()
            .map_err(|_| bad("rate_requests", "must be a whole number"))?;
        let mut rate = json!({"requests": n, "per": form.get("rate_per").unwrap_or("1m")});
        for kept in ["scope", "shadow"] {
            if let Some(v) = before["limits"]["rate"].get(kept) {
                rate[kept] = v.clone();
            }
        }
        limits.insert("rate".to_owned(), rate);
    }
    if let Some(c) = form.get("concurrency") {
        let c: u32 = c
            .parse()
            .map_err(|_| bad("concurrency", "must be a whole number"))?;
        limits.insert("concurrency".to_owned(), json!(c));
    }
    let mut body = json!({
        "friendly_name": form.get("friendly_name"),
        "allowed_ips": if ips.is_empty() { Value::Null } else { json!(ips) },
        "limits": if limits.is_empty() { Value::Null } else { Value::Object(limits) },
    });
    if !creating || !regions.is_empty() {
        body["regions"] = json!(regions);
    }
    if let Some(r) = form.get("region") {
        body["region"] = json!(r);
    }
    if creating {
        // `null` is "keep" on create: leave out what is not given.
        if let Some(o) = body.as_object_mut() {
            o.retain(|_, v| !v.is_null());
        }
    }
    Ok(body)
}

pub async fn accounts(State(state): State<AppState>, ctx: Ctx) -> Response {
    let me = match operator(&ctx) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let listed = match call(&state, &ctx, &me.who, Method::GET, "/v1/accounts", None).await {
        Ok(v) => v,
        Err(r) => return refused_page(&state, &ctx, &me, r),
    };
    let flashes = state.console().sessions.take_flash(&me.id);
    let accounts = listed["accounts"].as_array().cloned().unwrap_or_default();
    let body = html! {
        table id="accounts" {
            caption class="muted" { (accounts.len()) " accounts" }
            thead { tr {
                th scope="col" { "Name" } th scope="col" { "SID" } th scope="col" { "Status" }
                th scope="col" { "Region" } th scope="col" { "Further regions" } th scope="col" { "Limits" }
                th scope="col" { "Created" } th scope="col" { "" }
            } }
            tbody {
                @for a in &accounts {
                    @let sid = a["sid"].as_str().unwrap_or("");
                    @let status = a["status"].as_str().unwrap_or("");
                    tr data-sid=(sid) {
                        td { a href=(format!("/console/accounts/{sid}")) { (a["friendly_name"].as_str().unwrap_or("(no name)")) } }
                        td { code { (sid) } }
                        td { (status_badge(status)) }
                        td { (a["region"].as_str().unwrap_or("")) }
                        td { (or_dash(Some(&list(&a["regions"])))) }
                        td { (or_dash(limits_text(&a["limits"]).as_deref())) }
                        td { (or_dash(a["created_at"].as_str())) }
                        td {
                            @if status == "active" {
                                (button_form(&me.session, &format!("/console/accounts/{sid}/suspend"), "Suspend", "danger"))
                            } @else {
                                (button_form(&me.session, &format!("/console/accounts/{sid}/reactivate"), "Reactivate", "secondary"))
                            }
                        }
                    }
                }
            }
        }
        h2 { "Create an account" }
        (account_form(&me, None, "/console/accounts", "Create account", "create"))
    };
    respond(
        StatusCode::OK,
        layout("Accounts", Some(&me.session), &flashes, body),
    )
}

fn limits_text(l: &Value) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(r) = rate_text(&l["rate"]) {
        parts.push(r);
    }
    if let Some(c) = l["concurrency"].as_u64() {
        parts.push(format!("{c} in flight"));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

pub async fn create(State(state): State<AppState>, ctx: Ctx, body: Bytes) -> Response {
    let (me, form) = match posted(&ctx, &body) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    if let Err(resp) = operator(&ctx) {
        return resp;
    }
    let answer = match account_body(&form, &Value::Null, true) {
        Ok(b) => {
            call(
                &state,
                &ctx,
                &me.who,
                Method::POST,
                "/v1/accounts",
                Some(&b),
            )
            .await
        }
        Err(r) => Err(r),
    };
    match answer {
        Ok(v) => {
            let sid = v["sid"].as_str().unwrap_or("").to_owned();
            let sessions = &state.console().sessions;
            if let Some(token) = v["auth_token"].as_str() {
                sessions.flash(
                    &me.id,
                    Flash::Secret {
                        owner: sid.clone(),
                        what: "auth token",
                        secret: token.to_owned(),
                    },
                );
            }
            sessions.flash(&me.id, Flash::Notice(format!("Account {sid} created.")));
            redirect(&format!("/console/accounts/{sid}"))
        }
        Err(r) => refused_then(&state, &ctx, &me, r, "/console/accounts"),
    }
}

pub async fn account(State(state): State<AppState>, ctx: Ctx, Path(sid): Path<String>) -> Response {
    let me = match operator(&ctx) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    if !sid_ok(&sid) {
        return redirect("/console/accounts");
    }
    let a = match call(
        &state,
        &ctx,
        &me.who,
        Method::GET,
        &format!("/v1/accounts/{sid}"),
        None,
    )
    .await
    {
        Ok(v) => v,
        Err(r) => return refused_page(&state, &ctx, &me, r),
    };
    let flashes = state.console().sessions.take_flash(&me.id);
    let shown = flashes.iter().find_map(|f| match f {
        Flash::Secret {
            owner,
            what,
            secret,
        } if *owner == sid => Some((*what, secret.as_str())),
        _ => None,
    });
    let status = a["status"].as_str().unwrap_or("");
    let base = format!("/console/accounts/{sid}");
    let body = html! {
        @if let Some((what, secret)) = shown { (secret_box(what, secret)) }
        table id="account" {
            tbody {
                tr { th scope="row" { "SID" } td { code { (sid) } } }
                tr { th scope="row" { "Status" } td { (status_badge(status)) } }
                tr { th scope="row" { "Region" } td { (a["region"].as_str().unwrap_or("")) } }
                tr { th scope="row" { "Further regions" } td { (or_dash(Some(&list(&a["regions"])))) } }
                tr { th scope="row" { "Limits" } td { (or_dash(limits_text(&a["limits"]).as_deref())) } }
                tr { th scope="row" { "Created" } td { (or_dash(a["created_at"].as_str())) } }
            }
        }
        p {
            @if status == "active" {
                (button_form(&me.session, &format!("{base}/suspend"), "Suspend account", "danger"))
            } @else {
                (button_form(&me.session, &format!("{base}/reactivate"), "Reactivate account", "secondary"))
            }
        }
        h2 { "Edit" }
        (account_form(&me, Some(&a), &format!("{base}/edit"), "Save changes", "edit"))
    };
    let title = format!("Account {}", a["friendly_name"].as_str().unwrap_or(&sid));
    respond(
        StatusCode::OK,
        layout(&title, Some(&me.session), &flashes, body),
    )
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
    if let Err(resp) = operator(&ctx) {
        return resp;
    }
    if !sid_ok(&sid) {
        return redirect("/console/accounts");
    }
    let path = format!("/v1/accounts/{sid}");
    let (answer, back) = match action.as_str() {
        "suspend" | "reactivate" => {
            let status = if action == "suspend" {
                "suspended"
            } else {
                "active"
            };
            let b = json!({"status": status});
            let r = call(&state, &ctx, &me.who, Method::PATCH, &path, Some(&b)).await;
            (
                r.map(|_| format!("Account {sid} is {status}.")),
                "/console/accounts".to_owned(),
            )
        }
        "edit" => {
            let before = call(&state, &ctx, &me.who, Method::GET, &path, None).await;
            let r = match before.and_then(|before| account_body(&form, &before, false)) {
                Ok(b) => call(&state, &ctx, &me.who, Method::PATCH, &path, Some(&b))
                    .await
                    .map(|_| format!("Account {sid} saved.")),
                Err(r) => Err(r),
            };
            (r, format!("/console/accounts/{sid}"))
        }
        _ => (
            Err(Refused {
                status: StatusCode::NOT_FOUND,
                code: "not_found".to_owned(),
                message: "The requested resource was not found".to_owned(),
            }),
            "/console/accounts".to_owned(),
        ),
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

pub async fn fleet(State(state): State<AppState>, ctx: Ctx) -> Response {
    let me = match operator(&ctx) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let view = match call(&state, &ctx, &me.who, Method::GET, "/v1/edge/fleet", None).await {
        Ok(v) => v,
        Err(r) => return refused_page(&state, &ctx, &me, r),
    };
    let flashes = state.console().sessions.take_flash(&me.id);
    let edges = view["edges"].as_array().cloned().unwrap_or_default();
    let current = view["version"].as_u64().unwrap_or(0);
    let at = edges
        .iter()
        .filter(|e| e["version"].as_u64() == Some(current))
        .count();
    let body = html! {
        p { "Config version " strong { (current) } " is in force at " strong { (at) } " of " (edges.len()) " edges seen in the last ten minutes." }
        table id="fleet" {
            thead { tr {
                th scope="col" { "Edge" } th scope="col" { "Region" } th scope="col" { "Version held" }
                th scope="col" { "Behind for" } th scope="col" { "Last seen" }
            } }
            tbody {
                @for e in &edges {
                    tr {
                        td { code { (e["id"].as_str().unwrap_or("")) } }
                        td { (e["region"].as_str().unwrap_or("")) }
                        td { (e["version"].as_u64().unwrap_or(0)) }
                        td { @match e["lag_s"].as_i64() { Some(0) | None => { "up to date" } Some(s) => { (s) " s" } } }
                        td { (e["last_seen"].as_str().unwrap_or("")) }
                    }
                }
            }
        }
        @if edges.is_empty() { p class="muted" { "No edge has polled the feed in the last ten minutes." } }
    };
    respond(
        StatusCode::OK,
        layout("Fleet", Some(&me.session), &flashes, body),
    )
}
