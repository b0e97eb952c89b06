//! `keygate-control keys ...` and `accounts ...` as a script runs them: the real binary as a
//! subprocess against the real binary serving on a free port, with credentials only in its
//! environment. Checks what is printed (tables, `--json`, the secret once), the exact errors
//! and the exit statuses (0 done, 1 usage, 2 refused, 3 no answer).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::*;
use keygate_core::secret_format::is_well_formed;
use serde_json::Value;

/// What one CLI run printed and its exit status.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts exit 0 and nothing on stderr; the stdout parsed as JSON.
    fn json(&self) -> Value {
        self.ok();
        assert_eq!(
            self.stdout.lines().count(),
            1,
            "--json prints one line: {}",
            self.stdout
        );
        serde_json::from_str(&self.stdout).unwrap()
    }

    fn ok(&self) -> &Run {
        assert_eq!(self.code, 0, "{self:?}");
        assert_eq!(self.stderr, "", "{self:?}");
        self
    }
}

/// Runs `keygate-control ARGS` with exactly `env` as its environment (nothing inherited: no
/// credentials the developer has sourced).
fn kg(env: &[(&str, &str)], args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_keygate-control"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// The key round trip with the account's credentials as `serve` prints them, then with a main
/// key's: each secret printed once, `--json` the API's JSON, the grace, the delete.
#[test]
fn keys_create_list_show_regenerate_delete_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let db = test_database(dir.path());
    let (creds, _) = init_with_binary(&db);
    let server = Binary::spawn(&db);
    let url = format!("http://{}", server.addr);
    let account = [
        ("KEYGATE_URL", url.as_str()),
        ("ACCOUNT_SID", creds.account_sid.as_str()),
        ("AUTH_TOKEN", creds.auth_token.as_str()),
    ];
    let mut secrets = Vec::new();

    // create --json: the API's JSON, one line, the secret in it once.
    let created = kg(
        &account,
        &[
            "keys",
            "create",
            "--json",
            "--role",
            "main",
            "--name",
            "ci",
            "--api",
            "calls,keys",
            "--rate",
            "100/1m",
            "--api-rate",
            "calls=10/1s",
        ],
    );
    let key = created.json();
    let main_sid = key["sid"].as_str().unwrap().to_owned();
    let main_secret = key["secret"].as_str().unwrap().to_owned();
    assert!(main_sid.starts_with("SK"), "{key}");
    assert!(is_well_formed(main_secret.as_bytes()), "{main_secret}");
    assert_eq!(created.stdout.matches(&main_secret).count(), 1);
    assert_eq!(key["role"], "main");
    assert_eq!(key["friendly_name"], "ci");
    assert_eq!(key["apis"], serde_json::json!(["calls", "keys"]));
    assert_eq!(key["limits"]["rate"]["requests"], 100);
    assert_eq!(key["limits"]["rate"]["per"], "1m");
    assert_eq!(key["limits"]["apis"]["calls"]["per"], "1s");
    assert_eq!(key["account_sid"], creds.account_sid);
    secrets.push(main_secret.clone());

    // create, human: the fields, then the secret alone on the last line, and only there.
    let human = kg(&account, &["keys", "create", "--name", "web"]);
    human.ok();
    let secret = human.stdout.lines().last().unwrap().to_owned();
    assert!(is_well_formed(secret.as_bytes()), "{}", human.stdout);
    assert_eq!(human.stdout.matches(&secret).count(), 1, "{}", human.stdout);
    assert!(
        human.stdout.contains("role           standard\n"),
        "{}",
        human.stdout
    );
    let web_sid = human
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("sid"))
        .unwrap()
        .trim()
        .to_owned();
    secrets.push(secret);

    // list: a table with both keys; --json the API's list.
    let table = kg(&account, &["keys", "list"]);
    table.ok();
    let mut lines = table.stdout.lines();
    assert!(lines
        .next()
        .unwrap()
        .starts_with("SID                                 ROLE      ENABLED  APIS"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 2, "{}", table.stdout);
    let main_row = rows.iter().find(|r| r.starts_with(&main_sid)).unwrap();
    assert!(
        main_row.contains(" main ") && main_row.contains(" calls,keys "),
        "{main_row}"
    );
    assert!(main_row.ends_with(" ci"), "{main_row}");
    let web_row = rows.iter().find(|r| r.starts_with(&web_sid)).unwrap();
    assert!(
        web_row.contains(" standard ") && web_row.contains(" * "),
        "{web_row}"
    );
    let listed = kg(&account, &["keys", "list", "--json"]).json();
    assert_eq!(listed["keys"].as_array().unwrap().len(), 2);

    // The main key manages the account's keys itself (KEYGATE_KEY_SID + KEYGATE_KEY_SECRET).
    let as_key = [
        ("KEYGATE_URL", url.as_str()),
        ("ACCOUNT_SID", creds.account_sid.as_str()),
        ("KEYGATE_KEY_SID", main_sid.as_str()),
        ("KEYGATE_KEY_SECRET", main_secret.as_str()),
    ];
    let shown = kg(&as_key, &["keys", "show", &web_sid, "--json"]).json();
    assert_eq!(shown["sid"], web_sid.as_str());
    assert!(shown.get("secret").is_none(), "{shown}");
    assert_eq!(shown["secrets"].as_array().unwrap().len(), 1);

    // regenerate with a grace: a new secret once; the old one still works until it ends.
    let regenerated = kg(
        &account,
        &[
            "keys",
            "regenerate",
            &main_sid,
            "--grace-seconds",
            "3600",
            "--json",
        ],
    )
    .json();
    let new_secret = regenerated["secret"].as_str().unwrap().to_owned();
    assert!(is_well_formed(new_secret.as_bytes()));
    assert_ne!(new_secret, main_secret);
    secrets.push(new_secret.clone());
    let show = kg(&account, &["keys", "show", &main_sid]);
    show.ok();
    assert!(
        show.stdout.contains("secrets[0]     current, created "),
        "{}",
        show.stdout
    );
    assert!(
        show.stdout.contains("secrets[1]     previous, created "),
        "{}",
        show.stdout
    );
    assert!(!show.stdout.contains("sk_live_"), "{}", show.stdout);
    kg(&as_key, &["keys", "list"]).ok();
    let with_new = [
        ("KEYGATE_URL", url.as_str()),
        ("ACCOUNT_SID", creds.account_sid.as_str()),
        ("KEYGATE_KEY_SID", main_sid.as_str()),
        ("KEYGATE_KEY_SECRET", new_secret.as_str()),
    ];
    kg(&with_new, &["keys", "list"]).ok();

    // regenerate with grace 0 (human): the old secrets stop at once.
    let now = kg(
        &with_new,
        &["keys", "regenerate", &main_sid, "--grace-seconds", "0"],
    );
    now.ok();
    let newest = now.stdout.lines().last().unwrap().to_owned();
    assert!(is_well_formed(newest.as_bytes()), "{}", now.stdout);
    secrets.push(newest);
    let stale = kg(&with_new, &["keys", "list"]);
    assert_eq!(stale.code, 2, "{stale:?}");
    assert_eq!(
        stale.stderr,
        "keygate-control: error: the server refused: 401 invalid_credentials: Invalid or missing API key\n"
    );

    // delete: gone; deleting again is the server's 404.
    let deleted = kg(&account, &["keys", "delete", &web_sid]);
    deleted.ok();
    assert_eq!(deleted.stdout, format!("deleted key {web_sid}\n"));
    let again = kg(&account, &["keys", "delete", &web_sid]);
    assert_eq!(again.code, 2, "{again:?}");
    assert_eq!(
        again.stderr,
        "keygate-control: error: the server refused: 404 not_found: The requested resource was not found\n"
    );
    let after = kg(&account, &["keys", "list", "--json"]).json();
    assert_eq!(after["keys"].as_array().unwrap().len(), 1);
    assert_eq!(after["keys"][0]["sid"], main_sid.as_str());

    // No secret in the server's logs.
    let logs = server.logs();
    for s in secrets.iter().chain([&creds.auth_token]) {
        assert!(!logs.contains(s.as_str()), "a secret in the logs");
    }
}

/// `accounts` with the admin token: the list, a suspension every credential of the account
/// meets (403 account_suspended), reactivation; anyone else is refused with the exact error.
#[test]
fn accounts_list_show_suspend_reactivate() {
    let dir = tempfile::tempdir().unwrap();
    let db = test_database(dir.path());
    let (creds, _) = init_with_binary(&db);
    let server = Binary::spawn(&db);
    let url = format!("http://{}", server.addr);
    let admin = [
        ("KEYGATE_URL", url.as_str()),
        ("KEYGATE_ADMIN_TOKEN", creds.admin.as_str()),
    ];
    let account = [
        ("KEYGATE_URL", url.as_str()),
        ("ACCOUNT_SID", creds.account_sid.as_str()),
        ("AUTH_TOKEN", creds.auth_token.as_str()),
    ];
    let ac = creds.account_sid.as_str();

    let listed = kg(&admin, &["accounts", "list", "--json"]).json();
    let accounts = listed["accounts"].as_array().unwrap();
    assert_eq!(accounts.len(), 1, "{listed}");
    assert_eq!(accounts[0]["sid"], ac);
    assert_eq!(accounts[0]["status"], "active");
    let table = kg(&admin, &["accounts", "list"]);
    table.ok();
    assert_eq!(
        table.stdout.lines().next().unwrap(),
        "SID                                 STATUS  REGION  REGIONS  CREATED               NAME"
    );
    assert!(table
        .stdout
        .lines()
        .nth(1)
        .unwrap()
        .starts_with(&format!("{ac}  active  us1 ")));

    let suspended = kg(&admin, &["accounts", "suspend", ac]);
    suspended.ok();
    assert!(
        suspended.stdout.contains("status         suspended\n"),
        "{}",
        suspended.stdout
    );
    assert_eq!(
        kg(&admin, &["accounts", "show", ac, "--json"]).json()["status"],
        "suspended"
    );
    let refused = kg(&account, &["keys", "list"]);
    assert_eq!(refused.code, 2, "{refused:?}");
    assert_eq!(
        refused.stderr,
        "keygate-control: error: the server refused: 403 account_suspended: Account suspended\n"
    );

    let reactivated = kg(&admin, &["accounts", "reactivate", ac, "--json"]).json();
    assert_eq!(reactivated["status"], "active");
    kg(&account, &["keys", "list"]).ok();

    // Not the admin: the edge token is an operator credential, but not for this.
    let edge = [
        ("KEYGATE_URL", url.as_str()),
        ("KEYGATE_ADMIN_TOKEN", creds.edge.as_str()),
    ];
    let forbidden = kg(&edge, &["accounts", "list"]);
    assert_eq!(forbidden.code, 2, "{forbidden:?}");
    assert_eq!(
        forbidden.stderr,
        "keygate-control: error: the server refused: 403 forbidden: only the operator (admin token) may do this\n"
    );
    let unknown = kg(
        &admin,
        &["accounts", "show", "AC00000000000000000000000000000000"],
    );
    assert_eq!(unknown.code, 2, "{unknown:?}");
    assert!(unknown.stderr.contains(" 404 not_found: "), "{unknown:?}");
    // No admin token: a usage error before any request.
    let none = kg(&account, &["accounts", "list"]);
    assert_eq!(none.code, 1, "{none:?}");
    assert_eq!(
        none.stderr,
        "keygate-control: error: no credentials: accounts needs KEYGATE_ADMIN_TOKEN\n"
    );
}

/// Bad credentials are the server's refusal (exit 2, its code and message); missing ones and
/// bad flags are usage errors (exit 1); neither prints anything on stdout.
#[test]
fn bad_credentials_exit_2_and_usage_errors_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let db = test_database(dir.path());
    let (creds, _) = init_with_binary(&db);
    let server = Binary::spawn(&db);
    let url = format!("http://{}", server.addr);

    let wrong = kg(
        &[
            ("KEYGATE_URL", &url),
            ("ACCOUNT_SID", &creds.account_sid),
            ("AUTH_TOKEN", "at_live_wrong"),
        ],
        &["keys", "list"],
    );
    assert_eq!(wrong.code, 2, "{wrong:?}");
    assert_eq!(wrong.stdout, "");
    assert_eq!(
        wrong.stderr,
        "keygate-control: error: the server refused: 401 invalid_credentials: Invalid or missing API key\n"
    );
    // Another account's SID in the path: the edge's own refusal.
    let other = kg(
        &[
            ("KEYGATE_URL", &url),
            ("ACCOUNT_SID", &creds.account_sid),
            ("AUTH_TOKEN", &creds.auth_token),
        ],
        &[
            "keys",
            "list",
            "--account",
            "AC00000000000000000000000000000000",
        ],
    );
    assert_eq!(other.code, 2, "{other:?}");
    assert!(
        other.stderr.contains(" 404 account_mismatch: "),
        "{other:?}"
    );

    let none = kg(
        &[("KEYGATE_URL", &url), ("ACCOUNT_SID", &creds.account_sid)],
        &["keys", "list"],
    );
    assert_eq!(none.code, 1, "{none:?}");
    assert_eq!(
        none.stderr,
        "keygate-control: error: no credentials: set KEYGATE_KEY_SID and KEYGATE_KEY_SECRET (a main key), or ACCOUNT_SID and AUTH_TOKEN, or KEYGATE_ADMIN_TOKEN\n"
    );
    let half = kg(
        &[
            ("KEYGATE_URL", &url),
            ("ACCOUNT_SID", &creds.account_sid),
            ("KEYGATE_KEY_SID", "SKx"),
        ],
        &["keys", "list"],
    );
    assert_eq!(half.code, 1, "{half:?}");
    assert!(half
        .stderr
        .contains("KEYGATE_KEY_SID is set but KEYGATE_KEY_SECRET is not"));
    let unknown_flag = kg(&[("KEYGATE_URL", &url)], &["keys", "list", "--frob"]);
    assert_eq!(unknown_flag.code, 1, "{unknown_flag:?}");
    assert!(
        unknown_flag
            .stderr
            .starts_with("error: unexpected argument '--frob'"),
        "{unknown_flag:?}"
    );
    let bad_rate = kg(
        &[
            ("KEYGATE_URL", &url),
            ("ACCOUNT_SID", &creds.account_sid),
            ("AUTH_TOKEN", &creds.auth_token),
        ],
        &["keys", "create", "--rate", "lots"],
    );
    assert_eq!(bad_rate.code, 1, "{bad_rate:?}");
    assert_eq!(
        bad_rate.stderr,
        "keygate-control: error: --rate: expected REQUESTS/PERIOD (like 100/1m), got \"lots\"\n"
    );
    let creds_in_url = kg(
        &[
            ("ACCOUNT_SID", &creds.account_sid),
            ("AUTH_TOKEN", &creds.auth_token),
        ],
        &[
            "keys",
            "list",
            "--url",
            &format!("http://u:p@{}", server.addr),
        ],
    );
    assert_eq!(creds_in_url.code, 1, "{creds_in_url:?}");
    assert!(creds_in_url
        .stderr
        .contains("--url: must not carry credentials"));
    // A field the server judges: its 400, exit 2.
    let bad_api = kg(
        &[
            ("KEYGATE_URL", &url),
            ("ACCOUNT_SID", &creds.account_sid),
            ("AUTH_TOKEN", &creds.auth_token),
        ],
        &["keys", "create", "--api", "calls,nope"],
    );
    assert_eq!(bad_api.code, 2, "{bad_api:?}");
    assert!(bad_api.stderr.contains(" 400 "), "{bad_api:?}");
    assert!(
        bad_api.stderr.contains("apis[1]: unknown API \"nope\""),
        "{bad_api:?}"
    );
}

/// Nothing listening: exit 3, naming the URL and the cause.
#[test]
fn unreachable_url_exits_3_naming_the_url() {
    // A port that was free a moment ago and that nothing listens on now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let run = kg(
        &[
            ("KEYGATE_URL", &url),
            ("ACCOUNT_SID", "AC0"),
            ("AUTH_TOKEN", "at_live_x"),
        ],
        &["keys", "list"],
    );
    assert_eq!(run.code, 3, "{run:?}");
    assert_eq!(run.stdout, "");
    assert!(
        run.stderr.starts_with(&format!(
            "keygate-control: error: cannot connect to {url}: "
        )),
        "{run:?}"
    );
    assert!(run.stderr.contains("Connection refused"), "{run:?}");
    let admin = kg(
        &[("KEYGATE_ADMIN_TOKEN", "kg_admin_x")],
        &["accounts", "list", "--url", &url],
    );
    assert_eq!(admin.code, 3, "{admin:?}");
}

/// An https control plane: trusted with `--ca` (only that CA), refused without it (exit 3 with
/// the TLS error and a hint).
#[test]
fn https_with_the_servers_ca() {
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("tls");
    let made = kg(&[], &["tls-init", "--dir", tls_dir.to_str().unwrap()]);
    made.ok();
    let db = test_database(dir.path());
    let (creds, _) = init_with_binary(&db);
    let cert = tls_dir.join("server.pem");
    let key = tls_dir.join("server.key");
    let server = Binary::spawn_with(
        &db,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let url = format!("https://{}", server.addr);
    let ca = tls_dir.join("ca.pem");
    let admin = [
        ("KEYGATE_URL", url.as_str()),
        ("KEYGATE_ADMIN_TOKEN", creds.admin.as_str()),
    ];

    let listed = kg(
        &admin,
        &["accounts", "list", "--json", "--ca", ca.to_str().unwrap()],
    )
    .json();
    assert_eq!(listed["accounts"][0]["sid"], creds.account_sid.as_str());

    let untrusted = kg(&admin, &["accounts", "list"]);
    assert_eq!(untrusted.code, 3, "{untrusted:?}");
    assert!(
        untrusted.stderr.starts_with(&format!(
            "keygate-control: error: cannot connect to {url}: "
        )),
        "{untrusted:?}"
    );
    assert!(
        untrusted
            .stderr
            .ends_with("(give the server's CA with --ca or KEYGATE_CA)\n"),
        "{untrusted:?}"
    );
    // Another CA (a second tls-init) is not this server's.
    let other_dir = dir.path().join("other");
    kg(&[], &["tls-init", "--dir", other_dir.to_str().unwrap()]).ok();
    let other_ca = other_dir.join("ca.pem");
    let wrong_ca = kg(
        &admin,
        &["accounts", "list", "--ca", other_ca.to_str().unwrap()],
    );
    assert_eq!(wrong_ca.code, 3, "{wrong_ca:?}");
    // A CA for an http URL is a usage error.
    let plain = kg(
        &[("KEYGATE_ADMIN_TOKEN", creds.admin.as_str())],
        &[
            "accounts",
            "list",
            "--url",
            "http://127.0.0.1:1",
            "--ca",
            ca.to_str().unwrap(),
        ],
    );
    assert_eq!(plain.code, 1, "{plain:?}");
}
