//! The HTTP edge of the control plane's errors: each [`Error`] becomes a status and a body in
//! one of two shapes. Keygate's own paths answer `{"error":{"code","message"}}` like the edge;
//! the Twilio-compatible paths wrap the same error in [`TwilioError`], which answers Twilio's
//! `{"code","message","more_info","status"}` plus `"reason"`, keygate's code for the same
//! refusal (Twilio SDKs ignore fields they do not know). Every error response has
//! `Cache-Control: no-store`; a 401 has `WWW-Authenticate` for both schemes; a refusal with a
//! retry time has `Retry-After`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::{Error, Refusal};

/// The realm in `WWW-Authenticate` on every 401.
pub const REALM: &str = "keygate";

/// The status of `e`.
pub fn status(e: &Error) -> StatusCode {
    match e {
        Error::BadRequest(_) => StatusCode::BAD_REQUEST,
        Error::Denied(r) | Error::Limited { reason: r, .. } => {
            StatusCode::from_u16(r.status() as u16).unwrap_or(StatusCode::FORBIDDEN)
        }
        Error::Forbidden(_) => StatusCode::FORBIDDEN,
        Error::Refused { kind, .. } => match kind {
            Refusal::Escalation => StatusCode::FORBIDDEN,
            Refusal::Conflict => StatusCode::CONFLICT,
            Refusal::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::TooMany => StatusCode::TOO_MANY_REQUESTS,
        },
        Error::NotFound => StatusCode::NOT_FOUND,
        Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        Error::Conflict(_) => StatusCode::CONFLICT,
        Error::Gone(_) => StatusCode::GONE,
        Error::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Twilio's error code for the same condition.
pub fn twilio_code(e: &Error) -> u32 {
    match e {
        Error::BadRequest(_) => 20001,
        Error::Denied(_) | Error::Limited { .. } | Error::Refused { .. } => {
            match status(e).as_u16() {
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
        Error::Forbidden(_) => 20403,
        Error::NotFound => 20404,
        Error::MethodNotAllowed => 20004,
        Error::Conflict(_) => 20409,
        Error::Gone(_) => 20410,
        Error::Internal => 20500,
    }
}

fn finish(e: &Error, body: serde_json::Value) -> Response {
    let status = status(e);
    let mut resp = (status, axum::Json(body)).into_response();
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(s) = e.retry_after_s() {
        h.insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    if status == StatusCode::UNAUTHORIZED {
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

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code(), "message": self.message()}});
        finish(&self, body)
    }
}

/// An [`Error`] in Twilio's shape, for the `/2010-04-01/...` paths.
#[derive(Debug)]
pub struct TwilioError(pub Error);

impl From<Error> for TwilioError {
    fn from(e: Error) -> Self {
        TwilioError(e)
    }
}

impl IntoResponse for TwilioError {
    fn into_response(self) -> Response {
        let e = self.0;
        let code = twilio_code(&e);
        let body = json!({
            "code": code,
            "message": e.message(),
            "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
            "status": status(&e).as_u16(),
            "reason": e.code(),
        });
        finish(&e, body)
    }
}
