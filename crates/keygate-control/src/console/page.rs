//! The console's HTML: the layout every page shares, the pieces pages are made of, and the
//! responses (headers every page has, redirects, the session cookie). Pages are built with maud,
//! which escapes every value it writes: no string from the API or the user reaches the page
//! unescaped.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup, DOCTYPE};

use super::session::{Flash, Session, Who, COOKIE};

/// The stylesheet and the script, served from `/console/static/` (our own, nothing third-party).
pub const CSS: &str = include_str!("console.css");
pub const JS: &str = include_str!("console.js");

/// Every console response's security headers: never cached (a page may show a secret once),
/// no framing, no sniffing, no referrer, and a policy that runs only our own script and style.
fn secure(resp: &mut Response) {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
}

/// An HTML page with `status`.
pub fn respond(status: StatusCode, page: Markup) -> Response {
    let mut resp = (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        page.into_string(),
    )
        .into_response();
    secure(&mut resp);
    resp
}

/// 303 See Other to `to` (a console path: never a secret in it).
pub fn redirect(to: &str) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    secure(&mut resp);
    resp
}

/// Sets the session cookie to `id` on `resp`.
pub fn set_cookie(resp: &mut Response, id: &str, tls: bool) {
    let secure = if tls { "; Secure" } else { "" };
    let cookie = format!("{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict{secure}");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// Clears the session cookie on `resp`.
pub fn clear_cookie(resp: &mut Response, tls: bool) {
    let secure = if tls { "; Secure" } else { "" };
    let cookie = format!("{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0{secure}");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

/// A static file's response.
pub fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    secure(&mut resp);
    resp
}

/// The hidden CSRF field every form carries.
pub fn csrf(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

/// A form posting to `action` with only the CSRF token and one button.
pub fn button_form(session: &Session, action: &str, label: &str, class: &str) -> Markup {
    html! {
        form method="post" action=(action) class="inline" {
            (csrf(session))
            button type="submit" class=(class) { (label) }
        }
    }
}

/// The page around `body`: header with navigation and sign-out, the flashes, `body`.
pub fn layout(title: &str, session: Option<&Session>, flashes: &[Flash], body: Markup) -> Markup {
    let who = session.and_then(|s| s.who.as_ref());
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · keygate console" }
                link rel="stylesheet" href="/console/static/console.css";
                script src="/console/static/console.js" defer {}
            }
            body {
                a class="skip" href="#main" { "Skip to content" }
                header {
                    span class="brand" { "keygate console" }
                    @if let Some(who) = who {
                        nav aria-label="Console" {
                            @match who {
                                Who::Owner { .. } => {
                                    a href="/console/keys" { "API keys" }
                                }
                                Who::Operator { .. } => {
                                    a href="/console/accounts" { "Accounts" }
                                    a href="/console/fleet" { "Fleet" }
                                }
                            }
                        }
                        span class="who" {
                            @match who {
                                Who::Owner { account_sid, key_sid: None, .. } => {
                                    "Account " code { (account_sid) }
                                }
                                Who::Owner { account_sid, key_sid: Some(k), .. } => {
                                    "Account " code { (account_sid) } " with main key " code { (k) }
                                }
                                Who::Operator { .. } => { "Operator" }
                            }
                        }
                        @if let Some(s) = session {
                            (button_form(s, "/console/logout", "Sign out", "secondary"))
                        }
                    }
                }
                main id="main" {
                    h1 { (title) }
                    @for f in flashes {
                        (flash(f))
                    }
                    (body)
                }
            }
        }
    }
}

fn flash(f: &Flash) -> Markup {
    match f {
        Flash::Notice(m) => html! { p class="notice" role="status" { (m) } },
        Flash::Refused { code, message } => html! {
            div class="refused" role="alert" {
                strong { "Refused: " } code class="code" { (code) } " — " span class="message" { (message) }
            }
        },
        // Shown by the owner's page itself, next to the copy button.
        Flash::Secret { .. } => html! {},
    }
}

/// The box that shows a secret once, with a copy button.
pub fn secret_box(what: &str, secret: &str) -> Markup {
    html! {
        section class="secret" aria-labelledby="secret-title" {
            h2 id="secret-title" { "Your new " (what) }
            p { "Copy it now: it is shown this once and cannot be shown again (keygate keeps only its digest)." }
            div class="secret-row" {
                code id="new-secret" class="secret-value" { (secret) }
                button type="button" class="copy" data-copy="new-secret" { "Copy" }
                span class="copied" aria-live="polite" {}
            }
        }
    }
}

/// A refusal page (`code`, `message`) with `status`.
pub fn refusal(
    status: StatusCode,
    code: &str,
    message: &str,
    session: Option<&Session>,
) -> Response {
    let body = html! {
        div class="refused" role="alert" {
            strong { "Refused: " } code class="code" { (code) } " — " span class="message" { (message) }
        }
        p { a href="/console" { "Back to the console" } }
    };
    respond(status, layout("Refused", session, &[], body))
}

/// `—` for a missing value.
pub fn or_dash(v: Option<&str>) -> Markup {
    match v {
        Some(s) if !s.is_empty() => html! { (s) },
        _ => html! { span class="muted" { "—" } },
    }
}
