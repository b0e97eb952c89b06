//! The console (`/console`) over a real socket, as a browser without JavaScript uses it: cookies
//! kept by hand, redirects not followed, forms posted as `application/x-www-form-urlencoded`.
//! Sign-in is the door's decision (a standard key is refused with `permission_denied`), every
//! POST needs the session's CSRF token, a secret is on one page only, refusals are the API's own.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Auth, InProc};
use serde_json::{json, Value};

/// A browser: one cookie jar (the console's cookie), no redirects followed, every page kept.
struct Browser {
    base: String,
    http: reqwest::Client,
    cookie: Option<String>,
    pages: Vec<String>,
}

struct Page {
    status: u16,
    location: Option<String>,
    set_cookie: Vec<String>,
    body: String,
}

impl Page {
    /// The first form's CSRF token on the page.
    fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .unwrap_or_else(|| panic!("no CSRF field: {}", self.body));
        let rest = &self.body[at + "name=\"csrf\" value=\"".len()..];
        rest[..rest.find('"').unwrap()].to_owned()
    }
}

impl Browser {
    fn new(s: &InProc) -> Browser {
        Browser {
            base: s.client.base.clone(),
            http: reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookie: None,
            pages: Vec::new(),
        }
    }

    async fn send(&mut self, req: reqwest::RequestBuilder) -> Page {
        let req = match &self.cookie {
            Some(c) => req.header("cookie", c.clone()),
            None => req,
        };
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_owned());
        let set_cookie: Vec<String> = resp
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        for c in &set_cookie {
            let pair = c.split(';').next().unwrap().to_owned();
            self.cookie = if pair.ends_with('=') {
                None
            } else {
                Some(pair)
            };
        }
        let body = resp.text().await.unwrap();
        self.pages
            .push(format!("{status} {location:?} {set_cookie:?}\n{body}"));
        Page {
            status,
            location,
            set_cookie,
            body,
        }
    }

    async fn get(&mut self, path: &str) -> Page {
        let req = self.http.get(format!("{}{path}", self.base));
        self.send(req).await
    }

    async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Page {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(serde_urlencoded::to_string(fields).unwrap());
        self.send(req).await
    }

    /// Signs in through the owner form; answers the sign-in POST's page.
    async fn sign_in(&mut self, sid: &str, secret: &str) -> Page {
        let login = self.get("/console/login").await;
        assert_eq!(login.status, 200);
        let csrf = login.csrf();
        self.post(
            "/console/login",
            &[
                ("csrf", &csrf),
                ("kind", "owner"),
                ("sid", sid),
                ("secret", secret),
            ],
        )
        .await
    }

    async fn sign_in_operator(&mut self, token: &str) -> Page {
        let csrf = self.get("/console/login").await.csrf();
        self.post(
            "/console/login",
            &[("csrf", &csrf), ("kind", "operator"), ("token", token)],
        )
        .await
    }
}

async fn new_key(s: &InProc, body: Value) -> (String, String) {
    let path = format!("/v1/accounts/{}/keys", s.creds.account_sid);
    let r = s.client.json("POST", &path, &s.account_auth(), body).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let v = r.json();
    (
        v["sid"].as_str().unwrap().to_owned(),
        v["secret"].as_str().unwrap().to_owned(),
    )
}

/// The refusal a page shows: `(code, message)`.
fn refusal(body: &str) -> (String, String) {
    let code_at = body.find("class=\"code\">").expect("a refusal on the page");
    let rest = &body[code_at + "class=\"code\">".len()..];
    let code = rest[..rest.find('<').unwrap()].to_owned();
    let msg_at = rest.find("class=\"message\">").unwrap();
    let rest = &rest[msg_at + "class=\"message\">".len()..];
    (code, unescape(&rest[..rest.find('<').unwrap()]))
}

/// Text as the page escaped it, back to itself.
fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

#[tokio::test]
async fn the_account_signs_in_with_a_strict_http_only_cookie_and_signs_out() {
    let s = InProc::start().await;
    let mut b = Browser::new(&s);
    // Signed out: every page leads to the sign-in page.
    for path in ["/console", "/console/keys", "/console/accounts"] {
        let p = b.get(path).await;
        assert_eq!(
            (p.status, p.location.as_deref()),
            (303, Some("/console/login")),
            "{path}"
        );
    }
    let login = b.get("/console/login").await;
    assert_eq!(login.status, 200);
    assert_eq!(login.set_cookie.len(), 1);
    let anon = login.set_cookie[0].clone();
    assert!(
        anon.ends_with("; Path=/console; HttpOnly; SameSite=Strict"),
        "{anon}"
    );

    let p = b.sign_in(&s.creds.account_sid, &s.creds.auth_token).await;
    assert_eq!((p.status, p.location.as_deref()), (303, Some("/console")));
    // A new id once signed in (no fixation), with the same attributes (no Secure over HTTP).
    let signed = p.set_cookie[0].clone();
    assert_ne!(signed.split(';').next(), anon.split(';').next());
    assert!(
        signed.ends_with("; Path=/console; HttpOnly; SameSite=Strict"),
        "{signed}"
    );
    assert_eq!(
        b.get("/console").await.location.as_deref(),
        Some("/console/keys")
    );
    let keys = b.get("/console/keys").await;
    assert_eq!(keys.status, 200);
    assert!(keys.body.contains(&s.creds.account_sid));
    // The operator's pages are not the owner's.
    assert_eq!(b.get("/console/accounts").await.status, 403);

    let csrf = keys.csrf();
    let out = b.post("/console/logout", &[("csrf", &csrf)]).await;
    assert_eq!(
        (out.status, out.location.as_deref()),
        (303, Some("/console/login"))
    );
    assert!(out.set_cookie[0].contains("Max-Age=0"));
    // The old cookie is worth nothing now.
    b.cookie = Some(signed.split(';').next().unwrap().to_owned());
    assert_eq!(
        b.get("/console/keys").await.location.as_deref(),
        Some("/console/login")
    );
}

#[tokio::test]
async fn a_post_without_the_sessions_csrf_token_is_refused_and_does_nothing() {
    let s = InProc::start().await;
    let mut b = Browser::new(&s);
    assert_eq!(
        b.sign_in(&s.creds.account_sid, &s.creds.auth_token)
            .await
            .status,
        303
    );
    let csrf = b.get("/console/keys").await.csrf();
    let mut other = Browser::new(&s);
    other
        .sign_in(&s.creds.account_sid, &s.creds.auth_token)
        .await;
    let foreign = other.get("/console/keys").await.csrf();
    for fields in [
        vec![("friendly_name", "no-token")],
        vec![("csrf", ""), ("friendly_name", "no-token")],
        vec![("csrf", foreign.as_str()), ("friendly_name", "no-token")],
        vec![("csrf", &csrf[..63]), ("friendly_name", "no-token")],
    ] {
        let p = b.post("/console/keys", &fields).await;
        assert_eq!(p.status, 403, "{fields:?}");
        assert_eq!(
            refusal(&p.body),
            (
                "csrf_invalid".to_owned(),
                "the form's CSRF token is missing or does not match this session; reload the page and submit it again".to_owned()
            )
        );
    }
    // Sign-in and sign-out need it too.
    let p = b.post("/console/logout", &[]).await;
    assert_eq!(p.status, 403);
    let mut fresh = Browser::new(&s);
    let p = fresh
        .post(
            "/console/login",
            &[
                ("kind", "owner"),
                ("sid", &s.creds.account_sid),
                ("secret", &s.creds.auth_token),
            ],
        )
        .await;
    assert_eq!(p.status, 403);
    let keys = s
        .client
        .get(
            &format!("/v1/accounts/{}/keys", s.creds.account_sid),
            &s.account_auth(),
        )
        .await;
    assert_eq!(keys.json()["keys"], json!([]), "nothing was created");
    // With it: created.
    let p = b
        .post(
            "/console/keys",
            &[("csrf", &csrf), ("friendly_name", "with-token")],
        )
        .await;
    assert_eq!(p.status, 303);
}

#[tokio::test]
async fn a_created_keys_secret_is_on_one_page_only_and_works() {
    let s = InProc::start().await;
    let mut b = Browser::new(&s);
    b.sign_in(&s.creds.account_sid, &s.creds.auth_token).await;
    let csrf = b.get("/console/keys").await.csrf();
    let p = b
        .post(
            "/console/keys",
            &[
                ("csrf", &csrf),
                ("friendly_name", "billing"),
                ("role", "standard"),
                ("apis", "calls"),
                ("apis", "messages"),
                ("allowed_ips", "10.0.0.0/8\n192.0.2.1"),
                ("rate_requests", "100"),
                ("rate_per", "1m"),
                ("api_calls_requests", "10"),
                ("api_calls_per", "1s"),
            ],
        )
        .await;
    assert_eq!(p.status, 303, "{}", p.body);
    let to = p.location.unwrap();
    assert!(to.starts_with("/console/keys/SK"), "{to}");
    let sid = to.trim_start_matches("/console/keys/").to_owned();
    let shown = b.get(&to).await;
    assert_eq!(shown.status, 200);
    let at = shown
        .body
        .find("id=\"new-secret\" class=\"secret-value\">")
        .unwrap();
    let rest = &shown.body[at + "id=\"new-secret\" class=\"secret-value\">".len()..];
    let secret = rest[..rest.find('<').unwrap()].to_owned();
    assert!(secret.starts_with("sk_live_"), "{secret}");
    assert!(shown.body.contains("data-copy=\"new-secret\""));
    // What the API stored is what the form said.
    let api = s
        .client
        .get(
            &format!("/v1/accounts/{}/keys/{sid}", s.creds.account_sid),
            &s.account_auth(),
        )
        .await
        .json();
    assert_eq!(api["friendly_name"], "billing");
    assert_eq!(api["apis"], json!(["calls", "messages"]));
    assert_eq!(api["allowed_ips"], json!(["10.0.0.0/8", "192.0.2.1"]));
    assert_eq!(
        api["limits"],
        json!({"rate": {"requests": 100, "per": "1m"}, "apis": {"calls": {"requests": 10, "per": "1s"}}})
    );
    // The secret is a working credential of that key (the door authenticates it: 403 for the
    // management API it may not call, not 401).
    let r = s
        .client
        .get(
            &format!("/v1/accounts/{}/keys", s.creds.account_sid),
            &Auth::basic(&sid, &secret),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    // Reloading, the list, the limits and usage: no page shows it again.
    for path in [to.as_str(), "/console/keys", "/console/login", "/console"] {
        b.get(path).await;
    }
    let again = b.get(&to).await;
    assert_eq!(again.status, 200);
    assert!(!again.body.contains("new-secret"));
    assert!(
        again.body.contains("no usage yet"),
        "usage answers 404 before it exists"
    );
    assert!(again.body.contains("10 per 1s"), "the key's own API limit");
    assert!(again.body.contains("200 per 1m"), "the catalogue's default");
    let with_secret = b.pages.iter().filter(|p| p.contains(&secret)).count();
    assert_eq!(with_secret, 1, "the secret is on exactly one page");
}

#[tokio::test]
async fn only_the_account_and_its_unrestricted_main_keys_sign_in() {
    let s = InProc::start().await;
    let (standard, standard_secret) = new_key(&s, json!({"role": "standard"})).await;
    let (main, main_secret) = new_key(&s, json!({"role": "main"})).await;
    let (calls_only, calls_secret) = new_key(&s, json!({"role": "main", "apis": ["calls"]})).await;
    let cases = [
        (
            standard.as_str(),
            standard_secret.as_str(),
            403,
            "permission_denied",
        ),
        (
            calls_only.as_str(),
            calls_secret.as_str(),
            403,
            "permission_denied",
        ),
        (
            main.as_str(),
            standard_secret.as_str(),
            401,
            "invalid_credentials",
        ),
        (
            "SK0123456789abcdef0123456789abcdef",
            main_secret.as_str(),
            401,
            "invalid_credentials",
        ),
        (
            s.creds.account_sid.as_str(),
            "at_live_wrong",
            401,
            "invalid_credentials",
        ),
    ];
    for (sid, secret, status, code) in cases {
        let mut b = Browser::new(&s);
        let p = b.sign_in(sid, secret).await;
        assert_eq!(p.status, status, "{sid}");
        assert_eq!(refusal(&p.body).0, code, "{sid}");
        assert!(!p.body.contains(secret), "the secret is not echoed");
        assert_eq!(
            b.get("/console/keys").await.location.as_deref(),
            Some("/console/login")
        );
    }
    let mut b = Browser::new(&s);
    assert_eq!(b.sign_in(&main, &main_secret).await.status, 303);
    let keys = b.get("/console/keys").await;
    assert!(keys
        .body
        .contains(&format!("with main key <code>{main}</code>")));
    // The edge token is not the admin's.
    let mut b = Browser::new(&s);
    let p = b.sign_in_operator(&s.creds.edge).await;
    assert_eq!((p.status, refusal(&p.body).0.as_str()), (403, "forbidden"));
}

#[tokio::test]
async fn the_apis_refusals_are_shown_exactly_and_a_revoked_credential_ends_the_session() {
    let s = InProc::start().await;
    let (sid, secret) = new_key(&s, json!({"role": "main", "apis": ["calls", "keys"]})).await;
    let mut b = Browser::new(&s);
    assert_eq!(b.sign_in(&sid, &secret).await.status, 303);
    let csrf = b.get("/console/keys").await.csrf();
    let p = b
        .post(
            "/console/keys",
            &[("csrf", &csrf), ("role", "standard"), ("apis", "messages")],
        )
        .await;
    assert_eq!(p.location.as_deref(), Some("/console/keys"));
    let page = b.get("/console/keys").await;
    let (code, message) = refusal(&page.body);
    assert_eq!(code, "escalation_apis");
    // The API's own message for the same request.
    let api = s
        .client
        .json(
            "POST",
            &format!("/v1/accounts/{}/keys", s.creds.account_sid),
            &Auth::basic(&sid, &secret),
            json!({"role": "standard", "apis": ["messages"]}),
        )
        .await;
    assert_eq!(api.json()["error"]["message"], json!(message));
    // Shown once.
    assert!(!b
        .get("/console/keys")
        .await
        .body
        .contains("escalation_apis"));

    // Regenerated without grace elsewhere: the session's credential is dead, so is the session.
    let r = s
        .client
        .json(
            "POST",
            &format!("/v1/accounts/{}/keys/{sid}/regenerate", s.creds.account_sid),
            &s.account_auth(),
            json!({"grace_seconds": 0}),
        )
        .await;
    assert_eq!(r.status, 200);
    let p = b.get("/console/keys").await;
    assert_eq!(p.location.as_deref(), Some("/console/login?ended=1"));
    assert!(b
        .get("/console/login?ended=1")
        .await
        .body
        .contains("session_ended"));
}

#[tokio::test]
async fn regenerate_with_grace_revoke_disable_and_delete_from_the_key_page() {
    let s = InProc::start().await;
    let (sid, first) = new_key(&s, json!({"role": "standard"})).await;
    let mut b = Browser::new(&s);
    b.sign_in(&s.creds.account_sid, &s.creds.auth_token).await;
    let page = format!("/console/keys/{sid}");
    let csrf = b.get(&page).await.csrf();
    let api_key = format!("/v1/accounts/{}/keys/{sid}", s.creds.account_sid);
    let works = |secret: String| {
        let client = s.client.clone();
        let sid = sid.clone();
        let path = common::calls_path(&s.creds.account_sid);
        async move {
            // The control plane judges the key like the edge: 401 once its secret is gone.
            let r = client.get(&path, &Auth::basic(&sid, &secret)).await;
            r.status != 401
        }
    };
    let p = b
        .post(
            &format!("{page}/regenerate"),
            &[("csrf", &csrf), ("grace_seconds", "172800")],
        )
        .await;
    assert_eq!(p.location.as_deref(), Some(page.as_str()));
    let shown = b.get(&page).await;
    assert!(shown
        .body
        .contains("the previous secret works for 172800 more seconds"));
    let at = shown.body.find("class=\"secret-value\">").unwrap() + "class=\"secret-value\">".len();
    let second = shown.body[at..at + shown.body[at..].find('<').unwrap()].to_owned();
    let key = s.client.get(&api_key, &s.account_auth()).await.json();
    assert_eq!(key["secrets"].as_array().unwrap().len(), 2);
    assert!(works(first.clone()).await && works(second.clone()).await);
    assert!(shown.body.contains("Revoke the previous secret now"));

    b.post(&format!("{page}/revoke-previous"), &[("csrf", &csrf)])
        .await;
    assert!(!works(first).await && works(second.clone()).await);
    b.post(&format!("{page}/disable"), &[("csrf", &csrf)]).await;
    assert_eq!(
        s.client.get(&api_key, &s.account_auth()).await.json()["enabled"],
        false
    );
    assert!(!works(second.clone()).await);
    b.post(&format!("{page}/enable"), &[("csrf", &csrf)]).await;
    assert!(works(second.clone()).await);

    let confirm = b.get(&format!("{page}/delete")).await;
    assert!(confirm.body.contains("This cannot be undone"));
    let p = b.post(&format!("{page}/delete"), &[("csrf", &csrf)]).await;
    assert_eq!(p.location.as_deref(), Some("/console/keys"));
    assert_eq!(s.client.get(&api_key, &s.account_auth()).await.status, 404);
    assert!(!works(second).await);
}

#[tokio::test]
async fn the_operator_creates_suspends_and_reactivates_accounts() {
    let s = InProc::start().await;
    let mut b = Browser::new(&s);
    let p = b.sign_in_operator(&s.creds.admin).await;
    assert_eq!(p.status, 303);
    assert_eq!(
        b.get("/console").await.location.as_deref(),
        Some("/console/accounts")
    );
    let list = b.get("/console/accounts").await;
    assert!(list.body.contains(&s.creds.account_sid));
    // Keys are the owners' business.
    assert_eq!(b.get("/console/keys").await.status, 403);
    let csrf = list.csrf();
    let p = b
        .post(
            "/console/accounts",
            &[
                ("csrf", &csrf),
                ("friendly_name", "Acme"),
                ("region", "in1"),
                ("rate_requests", "50"),
            ],
        )
        .await;
    let to = p.location.unwrap();
    let ac = to.trim_start_matches("/console/accounts/").to_owned();
    let shown = b.get(&to).await;
    let at = shown.body.find("class=\"secret-value\">").unwrap() + "class=\"secret-value\">".len();
    let token = shown.body[at..at + shown.body[at..].find('<').unwrap()].to_owned();
    assert!(!b.get(&to).await.body.contains(&token), "shown once");
    let fetched = s
        .client
        .get(&format!("/v1/accounts/{ac}"), &s.admin())
        .await
        .json();
    assert_eq!(
        (fetched["region"].clone(), fetched["limits"].clone()),
        (json!("in1"), json!({"rate": {"requests": 50, "per": "1m"}}))
    );
    // The new account's owner signs in with it.
    assert_eq!(Browser::new(&s).sign_in(&ac, &token).await.status, 303);

    b.post(
        &format!("/console/accounts/{ac}/suspend"),
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(
        s.client
            .get(&format!("/v1/accounts/{ac}"), &s.admin())
            .await
            .json()["status"],
        "suspended"
    );
    assert_eq!(Browser::new(&s).sign_in(&ac, &token).await.status, 403);
    b.post(
        &format!("/console/accounts/{ac}/reactivate"),
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(Browser::new(&s).sign_in(&ac, &token).await.status, 303);
    // A refusal of the API, shown as it answered.
    b.post(
        &format!("/console/accounts/{ac}/edit"),
        &[("csrf", &csrf), ("region", "not a region")],
    )
    .await;
    let (code, _) = refusal(&b.get(&to).await.body);
    assert_eq!(code, "invalid_request");
    assert_eq!(b.get("/console/fleet").await.status, 200);
}
