//! The control plane's error: one type for the service layer, the store and the HTTP
//! handlers, with no HTTP in it. Each error is a kind, a stable code and a message that is safe
//! to show (it names the offending field for bad requests and never carries internals: an
//! internal error is logged where it happens and shown as a fixed message). The HTTP layer
//! ([`crate::http`]) turns it into a status and one of two wire shapes: keygate's
//! `{"error":{"code","message"}}` or Twilio's `{"code","message","more_info","status"}` with
//! `"reason"`. The CLI prints its message.
//!
//! Refusals of keygate-core's decision ([`Error::Denied`]) carry the edge's own reason (code,
//! status and message: `ip_not_allowed` 403, `permission_denied` 403, `invalid_credentials`
//! 401, ...), so the control plane and the edge refuse alike.

use keygate_core::Reason;

/// What kind of refusal a [`Error::Refused`] is (the HTTP layer maps each to one status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A management change that would give a key more than the caller holds (403).
    Escalation,
    /// A cap on what is stored (409: `too_many_keys`, `too_many_secrets_in_grace`).
    Conflict,
    /// A request body over the cap (413).
    TooLarge,
    /// Too many of something in a window, with `Retry-After` (429).
    TooMany,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The message names the field (`FriendlyName: must be at most 64 characters`).
    BadRequest(String),
    /// The decision refused the request, with the edge's reason (status, code and message).
    Denied(Reason),
    /// The failed-authentication limiter or a credential's request rate, with `Retry-After`.
    Limited { reason: Reason, retry_after_s: u64 },
    /// Authenticated, but not allowed to do this.
    Forbidden(&'static str),
    /// A refusal with its own stable code: an escalation (`escalation_*`) or a cap
    /// (`too_many_keys`, `too_many_regenerations`, `body_too_large`, ...).
    Refused {
        kind: Refusal,
        code: &'static str,
        message: String,
        retry_after_s: Option<u64>,
    },
    /// Unknown SID, another account's resource, or no such route.
    NotFound,
    /// A known path without this method.
    MethodNotAllowed,
    /// The resource changed under a concurrent request; retry.
    Conflict(&'static str),
    /// What was asked for is no longer known (changes since a version older than the change
    /// log); the message says what to do instead.
    Gone(String),
    /// The cause was logged by [`internal`].
    Internal,
}

/// Logs an internal failure and turns it into [`Error::Internal`].
pub fn internal(context: &'static str, e: impl std::fmt::Display) -> Error {
    tracing::error!(error = %e, "{context}");
    Error::Internal
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        // rusqlite errors carry SQL text and codes, never bound values (digests at most).
        internal("database error", e)
    }
}

impl Error {
    pub fn bad(field: &str, message: impl std::fmt::Display) -> Error {
        Error::BadRequest(format!("{field}: {message}"))
    }

    /// A refusal with its own code and no `Retry-After`.
    pub fn refused(kind: Refusal, code: &'static str, message: impl Into<String>) -> Error {
        Error::Refused {
            kind,
            code,
            message: message.into(),
            retry_after_s: None,
        }
    }

    /// A management change that would escalate: `code` names the rule.
    pub fn escalation(code: &'static str, message: impl Into<String>) -> Error {
        Error::refused(Refusal::Escalation, code, message)
    }

    /// Seconds the client should wait before retrying, for the refusals that have them.
    pub fn retry_after_s(&self) -> Option<u64> {
        match self {
            Error::Limited { retry_after_s, .. } => Some(*retry_after_s),
            Error::Refused { retry_after_s, .. } => *retry_after_s,
            _ => None,
        }
    }

    /// Stable code (keygate's `error.code`, Twilio's `reason`).
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "invalid_request",
            Error::Denied(r) | Error::Limited { reason: r, .. } => r.code(),
            Error::Forbidden(_) => "forbidden",
            Error::Refused { code, .. } => code,
            Error::NotFound => "not_found",
            Error::MethodNotAllowed => "method_not_allowed",
            Error::Conflict(_) => "conflict",
            Error::Gone(_) => "changes_unavailable",
            Error::Internal => "internal",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Error::BadRequest(m) | Error::Gone(m) => m.clone(),
            Error::Denied(r) | Error::Limited { reason: r, .. } => r.message().to_owned(),
            Error::Forbidden(m) | Error::Conflict(m) => (*m).to_owned(),
            Error::Refused { message, .. } => message.clone(),
            Error::NotFound => "The requested resource was not found".to_owned(),
            Error::MethodNotAllowed => "Method not allowed".to_owned(),
            Error::Internal => "Internal error".to_owned(),
        }
    }
}
