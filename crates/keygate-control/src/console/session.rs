//! The console's sessions: a random id in a cookie, everything else in this process's memory.
//!
//! - The id is 256 bits from the OS CSPRNG, sent only as the `keygate_console` cookie (`HttpOnly`,
//!   `SameSite=Strict`, `Path=/console`, `Secure` when served over TLS); the store is keyed by its
//!   SHA-256, so the map holds no usable id.
//! - A session is anonymous (the sign-in page: it only carries the CSRF token of the sign-in form)
//!   or signed in; signing in replaces the anonymous session with a new id (no fixation).
//! - Each session has its own CSRF token (256 bits); every POST must carry it in the form field
//!   `csrf`, compared in constant time ([`Sessions::check_csrf`]).
//! - A signed-in session holds the `Authorization` value its owner signed in with ([`Credential`],
//!   redacted in `Debug`), so every page and action is judged by the control plane's door exactly
//!   as the API request it makes: revoking or regenerating that credential without grace ends the
//!   session at its next request. It is kept in memory only: never written to the database,
//!   a log or a page.
//! - Expiry: 30 minutes idle, 12 hours in all ([`Limits`]); expired sessions are dropped when met
//!   and swept on every sign-in. At most [`Limits::max_sessions`] at once (the oldest go first).
//! - A one-time flash ([`Flash`]) carries what a POST answered to the page it redirects to: a
//!   created secret is shown by that one GET and removed from the session as it is read.
//!
//! The store is one process's memory: with several control-plane replicas behind one address,
//! the load balancer must keep a browser on one replica (sticky sessions), or it is signed out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

use crate::error::{internal, Error};

/// The cookie's name.
pub const COOKIE: &str = "keygate_console";

/// An `Authorization` header value. Redacted in `Debug`; read with [`Credential::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Credential(String);

impl Credential {
    pub fn new(value: String) -> Credential {
        Credential(value)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential([redacted])")
    }
}

/// Who a signed-in session belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    /// The operator's admin token.
    Operator { credential: Credential },
    /// An account's own credentials (`key_sid: None`) or one of its main keys.
    Owner {
        account_sid: String,
        key_sid: Option<String>,
        credential: Credential,
    },
}

impl Who {
    pub fn credential(&self) -> &Credential {
        match self {
            Who::Operator { credential } | Who::Owner { credential, .. } => credential,
        }
    }
}

/// What a POST hands to the page it redirects to, shown once.
#[derive(Clone, PartialEq, Eq)]
pub enum Flash {
    /// A secret just made (`what`: "key secret" or "auth token") for `owner` (a key or account
    /// SID), shown on that owner's page only.
    Secret {
        owner: String,
        what: &'static str,
        secret: String,
    },
    /// A change that was made.
    Notice(String),
    /// A refusal: the API's code and message, exactly.
    Refused { code: String, message: String },
}

impl std::fmt::Debug for Flash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Flash::Secret { owner, what, .. } => write!(f, "Secret({what} of {owner}, [redacted])"),
            Flash::Notice(m) => write!(f, "Notice({m:?})"),
            Flash::Refused { code, message } => write!(f, "Refused({code}: {message})"),
        }
    }
}

/// A session as a handler sees it.
#[derive(Debug, Clone)]
pub struct Session {
    pub csrf: String,
    pub who: Option<Who>,
}

struct Entry {
    session: Session,
    flash: Vec<Flash>,
    created: Instant,
    last_seen: Instant,
}

/// Expiry and size of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A session not used for this long is over.
    pub idle: Duration,
    /// A session older than this is over, used or not.
    pub absolute: Duration,
    /// Most sessions held at once (anonymous ones included).
    pub max_sessions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            idle: Duration::from_secs(30 * 60),
            absolute: Duration::from_secs(12 * 3600),
            max_sessions: 10_000,
        }
    }
}

/// The session store (one process's memory).
pub struct Sessions {
    map: Mutex<HashMap<[u8; 32], Entry>>,
    limits: Limits,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn random_token() -> Result<String, Error> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| internal("OS random number generator failed", e))?;
    Ok(hex::encode(b))
}

fn slot(id: &str) -> [u8; 32] {
    keygate_core::digest::Digester::Sha256.digest(id.as_bytes())
}

impl Sessions {
    pub fn new(limits: Limits) -> Sessions {
        Sessions {
            map: Mutex::new(HashMap::new()),
            limits,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self, e: &Entry, now: Instant) -> bool {
        now.duration_since(e.last_seen) < self.limits.idle
            && now.duration_since(e.created) < self.limits.absolute
    }

    /// The session of cookie value `id`, if it is live at `now` (which counts as a use).
    pub fn get(&self, id: &str, now: Instant) -> Option<Session> {
        let mut map = self.lock();
        let key = slot(id);
        let e = map.get_mut(&key)?;
        if !self.live(e, now) {
            map.remove(&key);
            return None;
        }
        e.last_seen = now;
        Some(e.session.clone())
    }

    /// Starts a session (anonymous when `who` is `None`); returns its id.
    pub fn start(&self, who: Option<Who>, now: Instant) -> Result<String, Error> {
        let id = random_token()?;
        let session = Session {
            csrf: random_token()?,
            who,
        };
        let mut map = self.lock();
        if map.len() >= self.limits.max_sessions {
            map.retain(|_, e| {
                now.duration_since(e.last_seen) < self.limits.idle
                    && now.duration_since(e.created) < self.limits.absolute
            });
        }
        while map.len() >= self.limits.max_sessions {
            let oldest = map.iter().min_by_key(|(_, e)| e.last_seen).map(|(k, _)| *k);
            match oldest {
                Some(k) => map.remove(&k),
                None => break,
            };
        }
        map.insert(
            slot(&id),
            Entry {
                session,
                flash: Vec::new(),
                created: now,
                last_seen: now,
            },
        );
        Ok(id)
    }

    /// Ends a session (sign-out, or an anonymous one replaced by a signed-in one).
    pub fn end(&self, id: &str) {
        self.lock().remove(&slot(id));
    }

    /// Drops every expired session.
    pub fn sweep(&self, now: Instant) {
        let limits = self.limits;
        self.lock().retain(|_, e| {
            now.duration_since(e.last_seen) < limits.idle
                && now.duration_since(e.created) < limits.absolute
        });
    }

    /// Whether `presented` is the session's CSRF token (constant time).
    pub fn check_csrf(session: &Session, presented: Option<&str>) -> bool {
        match presented {
            Some(p) => bool::from(p.as_bytes().ct_eq(session.csrf.as_bytes())),
            None => false,
        }
    }

    /// Adds a flash for the next page of session `id`.
    pub fn flash(&self, id: &str, flash: Flash) {
        if let Some(e) = self.lock().get_mut(&slot(id)) {
            e.flash.push(flash);
        }
    }

    /// Takes (removes) the session's flashes: each is shown by one page only.
    pub fn take_flash(&self, id: &str) -> Vec<Flash> {
        self.lock()
            .get_mut(&slot(id))
            .map(|e| std::mem::take(&mut e.flash))
            .unwrap_or_default()
    }

    /// Sessions held (for tests).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Who {
        Who::Owner {
            account_sid: "AC1".to_owned(),
            key_sid: None,
            credential: Credential::new("Basic c2VjcmV0".to_owned()),
        }
    }

    #[test]
    fn a_session_ends_after_its_idle_time_and_its_absolute_time() {
        let limits = Limits {
            idle: Duration::from_secs(60),
            absolute: Duration::from_secs(300),
            max_sessions: 10,
        };
        let s = Sessions::new(limits);
        let t0 = Instant::now();
        let id = s.start(Some(owner()), t0).unwrap();
        assert!(s.get(&id, t0 + Duration::from_secs(59)).is_some());
        // Used at 59 s: idle counts from then.
        assert!(s.get(&id, t0 + Duration::from_secs(118)).is_some());
        assert!(s.get(&id, t0 + Duration::from_secs(177)).is_some());
        assert!(s.get(&id, t0 + Duration::from_secs(236)).is_some());
        assert!(s.get(&id, t0 + Duration::from_secs(295)).is_some());
        // Used every minute, but 300 s old.
        assert!(s.get(&id, t0 + Duration::from_secs(300)).is_none());
        assert!(s.is_empty(), "an expired session is dropped when met");

        let id = s.start(Some(owner()), t0).unwrap();
        assert!(s.get(&id, t0 + Duration::from_secs(60)).is_none());
    }

    #[test]
    fn ids_and_csrf_tokens_are_random_and_the_map_holds_no_id() {
        let s = Sessions::new(Limits::default());
        let t0 = Instant::now();
        let a = s.start(None, t0).unwrap();
        let b = s.start(None, t0).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        let (sa, sb) = (s.get(&a, t0).unwrap(), s.get(&b, t0).unwrap());
        assert_ne!(sa.csrf, sb.csrf);
        assert!(!s.lock().keys().any(|k| hex::encode(k) == a));
        assert!(Sessions::check_csrf(&sa, Some(&sa.csrf)));
        assert!(!Sessions::check_csrf(&sa, Some(&sb.csrf)));
        assert!(!Sessions::check_csrf(&sa, Some("")));
        assert!(!Sessions::check_csrf(&sa, None));
        s.end(&a);
        assert!(s.get(&a, t0).is_none());
    }

    #[test]
    fn a_flash_is_read_once() {
        let s = Sessions::new(Limits::default());
        let id = s.start(Some(owner()), Instant::now()).unwrap();
        s.flash(
            &id,
            Flash::Secret {
                owner: "SK1".to_owned(),
                what: "key secret",
                secret: "sk_live_x".to_owned(),
            },
        );
        let first = s.take_flash(&id);
        assert_eq!(first.len(), 1);
        assert!(!format!("{first:?}").contains("sk_live_x"));
        assert!(s.take_flash(&id).is_empty());
    }

    #[test]
    fn the_oldest_session_goes_when_the_store_is_full() {
        let s = Sessions::new(Limits {
            max_sessions: 2,
            ..Limits::default()
        });
        let t0 = Instant::now();
        let a = s.start(None, t0).unwrap();
        let b = s.start(None, t0 + Duration::from_secs(1)).unwrap();
        let c = s.start(None, t0 + Duration::from_secs(2)).unwrap();
        let t = t0 + Duration::from_secs(3);
        assert!(s.get(&a, t).is_none());
        assert!(s.get(&b, t).is_some() && s.get(&c, t).is_some());
        assert!(!format!("{:?}", owner()).contains("c2VjcmV0"));
    }
}
