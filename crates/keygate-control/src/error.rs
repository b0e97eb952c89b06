//! API errors: one type for every handler, two wire shapes.
//!
//! Handlers return `Result<_, ApiError>`; an `ApiError` knows its status and a message that is
//! safe to show (it names the offending field for 400s and never carries internals: an internal
//! error is logged where it happens and answered with a fixed 500). Keygate's own paths answer
//! `{"error":{"code","message"}}` like the edge; the Twilio-compatible paths wrap the same error
//! in [`TwilioError`], which answers Twilio's `{"code","message","more_info","status"}` plus
//! `"reason"`, keygate's code for the same refusal (Twilio SDKs ignore fields they do not know).
//!
//! Refusals of keygate-core's decision ([`ApiError::Denied`]) carry the edge's own reason code,
//! status and message (`ip_not_allowed` 403, `permission_denied` 403, `invalid_credentials`
//! 401, ...), so the control plane and the edge refuse alike.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use keygate_core::Reason;
use serde_json::json;

/// The realm in `WWW-Authenticate` on every 401.
pub const REALM: &str = "keygate";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// 400; the message names the field (`FriendlyName: must be at most 64 characters`).
    BadRequest(String),
    /// The decision refused the request, with the edge's reason (status, code and message).
    Denied(Reason),
    /// 429 with `Retry-After`: the failed-authentication limiter or a credential's request rate.
    Limited { reason: Reason, retry_after_s: u64 },
    /// 403: authenticated, but not allowed to do this.
    Forbidden(&'static str),
    /// A refusal with its own stable code: a management change that would give a key more than
    /// the caller holds (403 `escalation_*`), a cap (409 `too_many_keys`, 429
    /// `too_many_regenerations`, 413 `body_too_large`, ...).
    Refused {
        status: StatusCode,
        code: &'static str,
        message: String,
        retry_after_s: Option<u64>,
    },
    /// 404: unknown SID, another account's resource, or no such route.
    NotFound,
    /// 405 on a known path.
    MethodNotAllowed,
    /// 409: the resource changed under a concurrent request; retry.
    Conflict(&'static str),
    /// 410: what was asked for is no longer known (changes since a version older than the
    /// change log); the message says what to do instead.
    Gone(String),
    /// 500; the cause was logged by [`internal`].
    Internal,
}

/// Logs an internal failure and turns it into a fixed 500.
pub fn internal(context: &'static str, e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "{context}");
    ApiError::Internal
}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> Self {
        // rusqlite errors carry SQL text and codes, never bound values (digests at most).
        internal("database error", e)
    }
}

impl ApiError {
    pub fn bad(field: &str, message: impl std::fmt::Display) -> ApiError {
        ApiError::BadRequest(format!("{field}: {message}"))
    }

    /// A refusal with its own code and no `Retry-After`.
    pub fn refused(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::Refused {
            status,
            code,
            message: message.into(),
            retry_after_s: None,
        }
    }

    /// 403 for a management change that would escalate: `code` names the rule.
    pub fn escalation(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::refused(StatusCode::FORBIDDEN, code, message)
    }

    fn retry_after_s(&self) -> Option<u64> {
        match self {
            ApiError::Limited { retry_after_s, .. } => Some(*retry_after_s),
            ApiError::Refused { retry_after_s, .. } => *retry_after_s,
            _ => None,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Denied(r) | ApiError::Limited { reason: r, .. } => {
                StatusCode::from_u16(r.status() as u16).unwrap_or(StatusCode::FORBIDDEN)
            }
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Refused { status, .. } => *status,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable code on keygate's own paths.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "invalid_request",
            ApiError::Denied(r) | ApiError::Limited { reason: r, .. } => r.code(),
            ApiError::Forbidden(_) => "forbidden",
            ApiError::Refused { code, .. } => code,
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::Gone(_) => "changes_unavailable",
            ApiError::Internal => "internal",
        }
    }

    pub fn message(&self) -> String {
        match self {
            ApiError::BadRequest(m) | ApiError::Gone(m) => m.clone(),
            ApiError::Denied(r) | ApiError::Limited { reason: r, .. } => r.message().to_owned(),
            ApiError::Forbidden(m) | ApiError::Conflict(m) => (*m).to_owned(),
            ApiError::Refused { message, .. } => message.clone(),
            ApiError::NotFound => "The requested resource was not found".to_owned(),
            ApiError::MethodNotAllowed => "Method not allowed".to_owned(),
            ApiError::Internal => "Internal error".to_owned(),
        }
    }

    /// Twilio's error code for the same condition.
    pub fn twilio_code(&self) -> u32 {
        match self {
            ApiError::BadRequest(_) => 20001,
            ApiError::Denied(_) | ApiError::Limited { .. } | ApiError::Refused { .. } => {
                match self.status().as_u16() {
                    400 => 20001,
                    401 => 20003,
                    404 => 20404,
                    409 => 20409,
                    413 => 20413,
                    429 => 20429,
                    503 => 20503,
                    _ => 20403,
                }
            }
            ApiError::Forbidden(_) => 20403,
            ApiError::NotFound => 20404,
            ApiError::MethodNotAllowed => 20004,
            ApiError::Conflict(_) => 20409,
            ApiError::Gone(_) => 20410,
            ApiError::Internal => 20500,
        }
    }

    fn finish(&self, body: serde_json::Value) -> Response {
        let mut resp = (self.status(), axum::Json(body)).into_response();
        let h = resp.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(s) = self.retry_after_s() {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status() == StatusCode::UNAUTHORIZED {
            h.append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"keygate\", charset=\"UTF-8\""),
            );
            h.append(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"keygate\""),
            );
        }
        resp
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code(), "message": self.message()}});
        self.finish(body)
    }
}

/// An [`ApiError`] in Twilio's shape, for the `/2010-04-01/...` paths.
#[derive(Debug)]
pub struct TwilioError(pub ApiError);

impl From<ApiError> for TwilioError {
    fn from(e: ApiError) -> Self {
        TwilioError(e)
    }
}

impl From<rusqlite::Error> for TwilioError {
    fn from(e: rusqlite::Error) -> Self {
        TwilioError(e.into())
    }
}

impl IntoResponse for TwilioError {
    fn into_response(self) -> Response {
        let e = self.0;
        let code = e.twilio_code();
        let body = json!({
            "code": code,
            "message": e.message(),
            "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
            "status": e.status().as_u16(),
            "reason": e.code(),
        });
        e.finish(body)
    }
}
