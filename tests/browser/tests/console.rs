//! The console in a real browser: headless Chromium over WebDriver, the real control plane
//! (`keygate-control serve`) and a real Envoy running the built filter in control-plane mode.
//!
//! One key's whole life from the console, checked at the edge at every step: sign in, create a
//! key, read its secret once, use it through Envoy and see its use reach the console (the
//! secret's last use, the hour's chart), regenerate it with the default grace (both secrets
//! work; the new one's last use starts, and with only the new one used the previous one's stays
//! where it was), revoke the previous one (only the new one works), delete the key (the edge
//! refuses it). Along the way: no page after the one that showed a secret shows it again and no
//! URL ever holds it, a form without its CSRF token is refused, a standard key cannot sign in,
//! and the operator's pages. Screenshots of the main pages go to `target/console-screenshots/`,
//! and to `docs/` with `KEYGATE_UPDATE_SCREENSHOTS=1` (the README shows those).
//!
//! Needs `KEYGATE_WASM`, `KEYGATE_ENVOY` and `KEYGATE_CONTROL` like the e2e suites (`make
//! test-browser` sets them) and Debian's chromium and chromium-driver (`make setup-browser`).

#![allow(clippy::panic, clippy::expect_used, clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use keygate_browser::Browser;
use keygate_e2e::wait::within;
use keygate_e2e::{ControlPlane, Echo, Envoy, EnvoyBuilder, Req};
use serde_json::json;

/// Runs blocking harness code (Envoy, raw sockets) from the async test.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// The status Envoy answers a `calls` request with this key's credentials, from a client
/// address no other request used (the failed-auth limiter never meets the test's probes).
fn edge_status(envoy: &Envoy, cp: &ControlPlane, sid: &str, secret: &str) -> u16 {
    Req::get(cp.calls_path())
        .basic(sid, secret)
        .send_from_new_client(envoy.port())
        .status
}

/// Waits until the edge answers `status` for the credentials (the feed carries a change to
/// every worker within seconds).
fn edge_comes_to(envoy: &Envoy, cp: &ControlPlane, sid: &str, secret: &str, status: u16) {
    blocking(|| {
        within(Duration::from_secs(20), || {
            edge_status(envoy, cp, sid, secret) == status
        })
        .unwrap_or_else(|| {
            panic!(
                "the edge never answered {status} for {sid}; it answers {}",
                edge_status(envoy, cp, sid, secret)
            )
        });
    });
}

fn screenshot_paths(name: &str) -> Vec<PathBuf> {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    let mut paths = vec![root.join("target/console-screenshots").join(name)];
    if std::env::var("KEYGATE_UPDATE_SCREENSHOTS").as_deref() == Ok("1") {
        paths.push(root.join("docs").join(name));
    }
    paths
}

async fn screenshot(b: &Browser, name: &str) {
    for p in screenshot_paths(name) {
        b.screenshot(&p).await;
    }
}

/// Every page and URL the browser saw, for the secret scan.
#[derive(Default)]
struct Seen {
    pages: Vec<(String, String)>,
}

impl Seen {
    async fn note(&mut self, b: &Browser) -> String {
        let source = b.source().await;
        self.pages.push((b.path().await, source.clone()));
        source
    }

    fn pages_with(&self, needle: &str) -> usize {
        self.pages
            .iter()
            .filter(|(_, s)| s.contains(needle))
            .count()
    }

    fn urls_with(&self, needle: &str) -> usize {
        self.pages
            .iter()
            .filter(|(u, _)| u.contains(needle))
            .count()
    }
}

/// Waits for the browser to reach `path`.
async fn arrive(b: &Browser, path: &str) {
    for _ in 0..100 {
        if b.path().await == path {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the browser is at {}, not {path}", b.path().await);
}

/// Waits until the page shows `needle` (a click's navigation may still be under way); answers
/// the page.
async fn shows(b: &Browser, needle: &str) -> String {
    for _ in 0..200 {
        let source = b.source().await;
        if source.contains(needle) {
            return source;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the page never showed {needle:?}: {}", b.source().await);
}

/// Replaces the shown secret by its first characters (for screenshots kept in the repository).
async fn mask_secret(b: &Browser) {
    b.client
        .execute(
            "const e = document.getElementById('new-secret'); e.textContent = e.textContent.slice(0, 12) + '…';",
            Vec::new(),
        )
        .await
        .unwrap();
}

/// Each secret's row on a key's page: ("current" or "previous", its "Last used" cell).
async fn secrets_last_used(b: &Browser) -> Vec<(String, String)> {
    let rows = b
        .client
        .execute(
            "return Array.from(document.querySelectorAll('#secrets tbody tr')).map(r => [r.cells[0].textContent.trim(), r.cells[3].textContent.trim()]);",
            Vec::new(),
        )
        .await
        .unwrap();
    serde_json::from_value(rows).unwrap()
}

/// Reloads `url` until `done` holds for the secrets' last use and the page (usage reaches the
/// control plane within seconds: the edge's tick, then its poller's batch); answers the rows.
async fn reload_until(
    b: &Browser,
    url: &str,
    what: &str,
    done: impl Fn(&[(String, String)], &str) -> bool,
) -> Vec<(String, String)> {
    for _ in 0..60 {
        let page = b.open(url).await;
        let rows = secrets_last_used(b).await;
        if done(&rows, &page) {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("{what} never showed: {:?}", secrets_last_used(b).await);
}

/// The "Last used" of the secret in the row named `which` ("current" or "previous").
fn last_used<'a>(rows: &'a [(String, String)], which: &str) -> &'a str {
    rows.iter()
        .find(|(w, _)| w == which)
        .map_or("", |(_, t)| t.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_life_in_the_console_is_what_the_edge_does() {
    let cp = blocking(ControlPlane::start);
    let echo = blocking(Echo::start);
    let envoy = blocking(|| {
        EnvoyBuilder::new()
            .plugin_config_json(&cp.plugin_config(json!({"edge_id": "edge-a", "region": "us1"})))
            .cluster("keygate_control", cp.port())
            .concurrency(2)
            .upstream_port(echo.port())
            .use_remote_address(true)
            .xff_num_trusted_hops(1)
            .start()
    });
    let console = format!("http://127.0.0.1:{}", cp.port());
    let b = Browser::start().await;
    let mut seen = Seen::default();

    // Sign in as the account.
    b.open(&format!("{console}/console/login")).await;
    screenshot(&b, "console-login.png").await;
    b.fill("#sid", cp.account_sid()).await;
    b.fill("#secret", cp.cred("AUTH_TOKEN")).await;
    b.click("#owner-login button[type=submit]").await;
    arrive(&b, "/console/keys").await;
    seen.note(&b).await;

    // Create a standard key for the calls API.
    b.fill("#create-name", "browser e2e").await;
    b.click("#create-role option[value=standard]").await;
    b.click("#create input[name=apis][value=calls]").await;
    b.click("#create button[type=submit]").await;
    let page = {
        for _ in 0..100 {
            if b.path().await.starts_with("/console/keys/SK") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        b.path().await
    };
    let sid = page.trim_start_matches("/console/keys/").to_owned();
    assert!(sid.starts_with("SK"), "{page}");
    let first = b.text("#new-secret").await;
    assert!(first.starts_with("sk_live_"), "{first}");
    seen.note(&b).await;
    mask_secret(&b).await;
    screenshot(&b, "console-key-created.png").await;

    // It works at the edge (once the feed has carried it).
    edge_comes_to(&envoy, &cp, &sid, &first, 200);
    // Its use reaches the console: the secret's last use and the hour's chart.
    let key_url = format!("{console}{page}");
    let rows = reload_until(&b, &key_url, "the first secret's last use", |rows, page| {
        last_used(rows, "current") != "never" && page.contains("<svg")
    })
    .await;
    assert!(last_used(&rows, "current").starts_with("20"), "{rows:?}");
    seen.note(&b).await;

    // Reloaded, and the list: the secret is not shown again.
    let again = b.open(&format!("{console}{page}")).await;
    seen.note(&b).await;
    assert!(!again.contains("new-secret"));
    b.open(&format!("{console}/console/keys")).await;
    let list = seen.note(&b).await;
    assert!(list.contains(&sid) && list.contains("browser e2e"));
    screenshot(&b, "console-keys.png").await;
    assert_eq!(seen.pages_with(&first), 1, "the secret is on one page only");

    // Regenerate with the default grace (48 h): both secrets work.
    b.open(&format!("{console}{page}")).await;
    assert_eq!(
        b.text("#grace option:checked").await,
        "48 hours (default)",
        "48 h is the default grace"
    );
    b.click("#regenerate button[type=submit]").await;
    arrive(&b, &page).await;
    shows(&b, "more seconds").await;
    let second = b.text("#new-secret").await;
    assert!(second.starts_with("sk_live_") && second != first);
    let shown = seen.note(&b).await;
    assert!(shown.contains("the previous secret works for 172800 more seconds"));
    edge_comes_to(&envoy, &cp, &sid, &second, 200);
    assert_eq!(blocking(|| edge_status(&envoy, &cp, &sid, &first)), 200);
    mask_secret(&b).await;
    screenshot(&b, "console-key.png").await;
    // The new secret's last use starts; then, with only the new one used, the previous one's
    // stops where it was.
    let rows = reload_until(&b, &key_url, "the new secret's last use", |rows, _| {
        last_used(rows, "current") != "never" && last_used(rows, "previous") != "never"
    })
    .await;
    let previous = last_used(&rows, "previous").to_owned();
    seen.note(&b).await;
    for _ in 0..5 {
        assert_eq!(blocking(|| edge_status(&envoy, &cp, &sid, &second)), 200);
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    b.open(&key_url).await;
    let rows = secrets_last_used(&b).await;
    seen.note(&b).await;
    assert_eq!(last_used(&rows, "previous"), previous, "{rows:?}");
    assert!(last_used(&rows, "current").starts_with("20"), "{rows:?}");

    // Revoke the previous secret early: only the new one works.
    b.click("form[action$='/revoke-previous'] button").await;
    arrive(&b, &page).await;
    shows(&b, "previous secrets of key").await;
    seen.note(&b).await;
    edge_comes_to(&envoy, &cp, &sid, &first, 401);
    assert_eq!(blocking(|| edge_status(&envoy, &cp, &sid, &second)), 200);

    // A form whose CSRF token was taken out is refused, and makes nothing.
    b.open(&format!("{console}/console/keys")).await;
    b.client
        .execute(
            "document.querySelector('#create input[name=csrf]').remove();",
            Vec::new(),
        )
        .await
        .unwrap();
    b.fill("#create-name", "no csrf").await;
    b.click("#create button[type=submit]").await;
    arrive(&b, "/console/keys").await;
    shows(&b, "csrf_invalid").await;
    seen.note(&b).await;
    b.open(&format!("{console}/console/keys")).await;
    assert!(!seen.note(&b).await.contains("no csrf"));

    // Delete the key, confirmed: the edge refuses its secret.
    b.open(&format!("{console}{page}")).await;
    b.click("a[href$='/delete']").await;
    arrive(&b, &format!("{page}/delete")).await;
    seen.note(&b).await;
    b.click("#confirm-delete button").await;
    arrive(&b, "/console/keys").await;
    assert!(!seen.note(&b).await.contains(&format!("data-sid=\"{sid}\"")));
    edge_comes_to(&envoy, &cp, &sid, &second, 401);

    assert_eq!(seen.pages_with(&first), 1);
    assert_eq!(seen.pages_with(&second), 1);
    assert_eq!(seen.urls_with("sk_live_") + seen.urls_with(&first), 0);

    // Sign out; a standard key cannot sign in (the door's permission_denied).
    b.click("form[action='/console/logout'] button").await;
    arrive(&b, "/console/login").await;
    let (std_sid, std_secret) = blocking(|| cp.create_key_v1(json!({"role": "standard"})));
    b.fill("#sid", &std_sid).await;
    b.fill("#secret", &std_secret).await;
    b.click("#owner-login button[type=submit]").await;
    arrive(&b, "/console/login").await;
    shows(&b, "permission_denied").await;
    seen.note(&b).await;
    b.open(&format!("{console}/console/keys")).await;
    assert_eq!(b.path().await, "/console/login");

    // The operator: accounts and the fleet (this test's Envoy is one edge of it).
    b.fill("#token", cp.cred("KEYGATE_ADMIN_TOKEN")).await;
    b.click("#operator-login button[type=submit]").await;
    arrive(&b, "/console/accounts").await;
    assert!(seen.note(&b).await.contains(cp.account_sid()));
    screenshot(&b, "console-accounts.png").await;
    b.open(&format!("{console}/console/fleet")).await;
    assert!(seen.note(&b).await.contains("edge-a"));
    screenshot(&b, "console-fleet.png").await;

    b.close().await;
    // Nothing the browser made reached a log.
    let logs = cp.logs();
    for s in [&first, &second, &std_secret] {
        assert!(
            !logs.contains(s.as_str()),
            "a secret in the control plane's log"
        );
        assert!(
            !envoy.logs().contains(s.as_str()),
            "a secret in Envoy's log"
        );
    }
}
