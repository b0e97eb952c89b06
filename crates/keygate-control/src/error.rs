//! API errors: one type for every handler, two wire shapes.
//!
//! Handlers return `Result<_, ApiError>`; an `ApiError` knows its status and a message that is
//! safe to show (it names the offending field for 400s and never carries internals: an internal
//! error is logged where it happens and answered with a fixed 500). Keygate's own paths answer
//! `{"error":{"code","message"}}` like the edge; the Twilio-compatible paths wrap the same error
//! in [`TwilioError`], which answers Twilio's `{"code","message","more_info","status"}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// The realm in `WWW-Authenticate` on every 401.
pub const REALM: &str = "keygate";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// 400; the message names the field (`FriendlyName: must be at most 64 characters`).
    BadRequest(String),
    /// 401: no credential, or one that does not authenticate (one reply for every cause).
    Unauthorized,
    /// 403: authenticated, but not allowed to do this.
    Forbidden(&'static str),
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

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
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
            ApiError::Unauthorized => "invalid_credentials",
            ApiError::Forbidden(_) => "forbidden",
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
            ApiError::Unauthorized => "Invalid or missing credentials".to_owned(),
            ApiError::Forbidden(m) | ApiError::Conflict(m) => (*m).to_owned(),
            ApiError::NotFound => "The requested resource was not found".to_owned(),
            ApiError::MethodNotAllowed => "Method not allowed".to_owned(),
            ApiError::Internal => "Internal error".to_owned(),
        }
    }

    /// Twilio's error code for the same condition.
    pub fn twilio_code(&self) -> u32 {
        match self {
            ApiError::BadRequest(_) => 20001,
            ApiError::Unauthorized => 20003,
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
        if *self == ApiError::Unauthorized {
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
        });
        e.finish(body)
    }
}
