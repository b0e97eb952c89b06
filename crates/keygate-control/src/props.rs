//! The property the fuzz target `control_auth` checks (`fuzz/`), also replayed from the corpus
//! by `tests/corpus_replay.rs`: the control plane's request authentication ([`Door::judge`],
//! principals looked up in SQLite record by record) decides every request exactly as
//! keygate-core's decision over the same accounts and keys compiled as one document. Test
//! support; nothing serving requests calls it.
//!
//! Input: `method \n path \n authorization [\n client address]`. In the path, `{AC}`, `{AC2}`
//! and `{SK<n>}` stand for the fixture's SIDs; an authorization of `#<n>` stands for the n-th
//! known credential (Basic and Bearer of every key, the accounts' tokens, the operator's and an
//! edge's tokens), so the fuzzer reaches the allowed paths as well as the refusals.

// Panicking is how a property reports a finding to libFuzzer and to the replay test.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::net::IpAddr;

use base64::Engine as _;
use keygate_core::compile::{compile_doc, CompiledConfig};
use keygate_core::config::Role;
use keygate_core::credential::{parse_authorization, Credential, EnabledSchemes};
use keygate_core::headers::{AuthorizationHeader, RequestHead};
use keygate_core::{decide, Decision, Reason};
use rusqlite::Connection;

use crate::auth::{Caller, Door};
use crate::catalog::{ApiCatalog, ControlLimits};
use crate::error::Error;
use crate::policy::{Caps, Holdings};
use crate::service::{self, NewAccount, NewKey};
use crate::store;

/// The fixture: a database with accounts and keys of every kind, the door over it, and the
/// same state compiled as one document.
pub struct Fixture {
    door: Door,
    conn: std::sync::Mutex<Connection>,
    reference: CompiledConfig,
    /// `{AC}`, `{AC2}`, `{SK0}`, ... and their SIDs.
    names: Vec<(String, String)>,
    /// Known `Authorization` values.
    credentials: Vec<String>,
    admin: String,
    edge: String,
}

fn basic(user: &str, secret: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"))
    )
}

impl Fixture {
    /// Builds the fixture in a new database file under the system's temporary directory.
    pub fn new() -> Fixture {
        let path = std::env::temp_dir().join(format!(
            "keygate-control-props-{}-{}.db",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let cat = ApiCatalog::built_in().unwrap();
        let caps = Caps::default();
        let op = Holdings::Operator;
        let mut conn = store::sqlite::open(&path).unwrap();
        let init =
            store::sqlite::write(&mut conn, |tx| service::init(tx, &cat, "us1", None)).unwrap();
        let ac = init.account.sid.clone();
        let mut names = vec![("{AC}".to_owned(), ac.clone())];
        let mut credentials = vec![basic(&ac, init.auth_token.expose())];
        let now = crate::model::now();
        let add_key = |conn: &mut Connection,
                       names: &mut Vec<(String, String)>,
                       credentials: &mut Vec<String>,
                       account: &str,
                       f: &dyn Fn(&mut NewKey)| {
            let mut new = NewKey::with_role(Role::Main);
            f(&mut new);
            let (key, secret, _) = store::sqlite::write(conn, |tx| {
                service::create_key(tx, &cat, &caps, &op, account, new)
            })
            .unwrap();
            names.push((format!("{{SK{}}}", names.len() - 1), key.sid.clone()));
            credentials.push(basic(&key.sid, secret.expose()));
            credentials.push(format!("Bearer {}", secret.expose()));
            key.sid
        };
        let main = add_key(&mut conn, &mut names, &mut credentials, &ac, &|_| {});
        add_key(&mut conn, &mut names, &mut credentials, &ac, &|k| {
            k.apis = Some(vec!["calls".into()])
        });
        add_key(&mut conn, &mut names, &mut credentials, &ac, &|k| {
            k.apis = Some(vec!["keys".into(), "calls".into()]);
            k.allowed_ips = Some(vec!["192.0.2.0/24".into()]);
        });
        add_key(&mut conn, &mut names, &mut credentials, &ac, &|k| {
            k.role = Role::Standard
        });
        add_key(&mut conn, &mut names, &mut credentials, &ac, &|k| {
            k.role = Role::Publishable
        });
        add_key(&mut conn, &mut names, &mut credentials, &ac, &|k| {
            k.expires_at = Some(now - 60)
        });
        add_key(&mut conn, &mut names, &mut credentials, &ac, &|k| {
            k.enabled = false
        });
        // A rotation: the old secret (already a known credential) stays valid in its grace.
        let r = store::sqlite::write(&mut conn, |tx| {
            service::regenerate(tx, &caps, &op, &ac, &main, 3600)
        })
        .unwrap();
        credentials.push(format!("Bearer {}", r.secret.expose()));
        let (second, token, _) = store::sqlite::write(&mut conn, |tx| {
            service::create_account(
                tx,
                &cat,
                &caps,
                "us1",
                NewAccount {
                    allowed_ips: Some(vec!["198.51.100.0/24".into(), "127.0.0.1".into()]),
                    ..NewAccount::default()
                },
            )
        })
        .unwrap();
        credentials.push(basic(&second.sid, token.expose()));
        add_key(
            &mut conn,
            &mut names,
            &mut credentials,
            &second.sid,
            &|_| {},
        );
        let (suspended, token, _) = store::sqlite::write(&mut conn, |tx| {
            service::create_account(tx, &cat, &caps, "us1", NewAccount::default())
        })
        .unwrap();
        credentials.push(basic(&suspended.sid, token.expose()));
        add_key(
            &mut conn,
            &mut names,
            &mut credentials,
            &suspended.sid,
            &|_| {},
        );
        store::sqlite::write(&mut conn, |tx| {
            service::update_account(tx, &cat, &caps, &op, &suspended.sid, |a| {
                a.status = keygate_core::config::AccountStatus::Suspended;
                Ok(())
            })
        })
        .unwrap();
        names.push(("{AC2}".to_owned(), second.sid.clone()));
        names.push(("{AC3}".to_owned(), suspended.sid.clone()));

        // No limits: the outcome of a request must not depend on the ones before it.
        let limits = ControlLimits {
            failed_auth: None,
            credential_rate: None,
        };
        let door = Door::new(&cat, &limits, None).unwrap();
        let snapshot = store::sqlite::write(&mut conn, |tx| service::snapshot(tx, &cat)).unwrap();
        let mut doc = cat.control_doc(&limits);
        doc.accounts = snapshot.accounts;
        doc.keys = snapshot.keys;
        for a in &mut doc.accounts {
            a.limits = None;
        }
        for k in &mut doc.keys {
            k.limits = None;
        }
        let reference = compile_doc(&doc).unwrap();
        drop(conn);
        let conn = store::sqlite::open(&path).unwrap();
        // The file stays open through `conn`; its name is not needed any more.
        let _ = std::fs::remove_file(&path);
        Fixture {
            door,
            conn: std::sync::Mutex::new(conn),
            reference,
            names,
            credentials,
            admin: init.admin_token.expose().to_owned(),
            edge: init.edge_token.expose().to_owned(),
        }
    }

    fn expand(&self, bytes: &[u8]) -> Vec<u8> {
        let mut s = bytes.to_vec();
        for (name, sid) in &self.names {
            let (name, sid) = (name.as_bytes(), sid.as_bytes());
            let mut out = Vec::with_capacity(s.len());
            let mut i = 0;
            while i < s.len() {
                if s[i..].starts_with(name) {
                    out.extend_from_slice(sid);
                    i += name.len();
                } else {
                    out.push(s[i]);
                    i += 1;
                }
            }
            s = out;
        }
        s
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Fixture::new()
    }
}

/// What a request came to, in terms both sides share.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Operator(&'static str),
    /// Admitted: account, key, API (`None`: authenticated, but no API of the catalogue).
    Admitted(String, Option<String>, Option<String>),
    Refused(&'static str),
}

/// The property: see the module documentation.
pub fn control_auth(fixture: &Fixture, data: &[u8]) {
    let mut parts = data.splitn(4, |&b| b == b'\n');
    let method = parts.next().unwrap_or_default().to_vec();
    let path = fixture.expand(parts.next().unwrap_or_default());
    let auth: Option<Vec<u8>> = parts.next().map(|a| {
        match a
            .strip_prefix(b"#")
            .and_then(|n| std::str::from_utf8(n).ok())
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => {
                let all = fixture.credentials.len() + 2;
                match n % all {
                    i if i < fixture.credentials.len() => {
                        fixture.credentials[i].clone().into_bytes()
                    }
                    i if i == fixture.credentials.len() => {
                        format!("Bearer {}", fixture.admin).into_bytes()
                    }
                    _ => format!("Bearer {}", fixture.edge).into_bytes(),
                }
            }
            None => a.to_vec(),
        }
    });
    let ip: IpAddr = parts
        .next()
        .and_then(|b| std::str::from_utf8(b).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let now_s = u64::try_from(crate::model::now()).unwrap_or(0);
    let headers: Vec<Vec<u8>> = auth.iter().cloned().collect();
    let mut conn = fixture.conn.lock().unwrap_or_else(|p| p.into_inner());
    let judged = match store::sqlite::read(&mut conn, |tx| {
        fixture
            .door
            .judge(tx, &method, &path, &headers, Some(ip), now_s * 1_000_000)
    }) {
        Ok(Caller::Admin) => Outcome::Operator("admin"),
        Ok(Caller::Edge) => Outcome::Operator("edge"),
        Ok(Caller::Tenant(t)) => Outcome::Admitted(t.account_sid, t.key.map(|k| k.sid), t.api),
        Err(Error::Denied(r)) => Outcome::Refused(r.code()),
        Err(e) => panic!("the control plane answered {e:?} instead of a decision"),
    };
    // The operator's tokens are the control plane's own; any other credential is decided as
    // the edge decides it.
    let bearer = auth
        .as_deref()
        .and_then(|a| match parse_authorization(a, EnabledSchemes::ALL) {
            Ok(Credential::Bearer { token }) => Some(token.to_vec()),
            _ => None,
        });
    let expected = match bearer {
        Some(t) if t == fixture.admin.as_bytes() => Outcome::Operator("admin"),
        Some(t) if t == fixture.edge.as_bytes() => Outcome::Operator("edge"),
        _ => {
            let head = RequestHead {
                method: &method,
                path: &path,
                authorization: auth
                    .as_deref()
                    .map_or(AuthorizationHeader::Absent, AuthorizationHeader::One),
                cors_preflight_headers: false,
            };
            match decide(&fixture.reference, &head, now_s, &mut || Some(ip)) {
                Decision::Allow(a) => {
                    let id = a.identity().expect("no preflight in the control catalogue");
                    Outcome::Admitted(
                        id.account_sid.to_owned(),
                        id.key_sid.map(str::to_owned),
                        id.api.map(str::to_owned),
                    )
                }
                Decision::Deny(Reason::UnknownRoute) => {
                    // Authenticated but matched nothing: the door lets the handlers answer
                    // (403 for an operator route, 404 otherwise). Who it was is in `judged`.
                    match &judged {
                        Outcome::Admitted(_, _, None) => return,
                        other => panic!("the edge authenticated, the control plane: {other:?}"),
                    }
                }
                Decision::Deny(r) => Outcome::Refused(r.code()),
            }
        }
    };
    assert_eq!(
        judged,
        expected,
        "{} {} with {:?} from {ip}",
        String::from_utf8_lossy(&method),
        String::from_utf8_lossy(&path),
        auth.as_deref().map(String::from_utf8_lossy)
    );
}
