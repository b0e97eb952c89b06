//! The console's way to the API: every change and every read of an owner's keys is the `/v1`
//! request it stands for, sent in-process through the whole router ([`crate::app`]) with the
//! session's credential and the browser's address. So the door judges it (the edge's decision:
//! credential, role, APIs, allowlists, rates, failed-auth limiter), the same handler serves it,
//! the same policy refuses an escalation, and the page shows the API's own code and message.

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use serde_json::Value;
use tower_service::Service;

use crate::error::Error;
use crate::AppState;

use super::session::Credential;

/// A refusal from the API, exactly as it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
}

impl Refused {
    fn from_answer(status: StatusCode, body: &Value) -> Refused {
        let field = |f: &str| {
            body["error"][f]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_default()
        };
        Refused {
            status,
            code: field("code"),
            message: field("message"),
        }
    }

    fn internal() -> Refused {
        let e = Error::Internal;
        Refused {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: e.code().to_owned(),
            message: e.message(),
        }
    }
}

/// Where the browser's request came from: its TCP peer and any `X-Forwarded-For` (the door
/// reads the latter only when the peer is a trusted proxy).
#[derive(Debug, Clone)]
pub struct Origin {
    pub peer: Option<ConnectInfo<std::net::SocketAddr>>,
    pub forwarded_for: Vec<HeaderValue>,
}

impl Origin {
    pub fn of(headers: &HeaderMap, peer: Option<ConnectInfo<std::net::SocketAddr>>) -> Origin {
        Origin {
            peer,
            forwarded_for: headers.get_all("x-forwarded-for").iter().cloned().collect(),
        }
    }
}

/// Sends `method path` with `body` (JSON) as `credential` from `origin`; answers the JSON body
/// of a 2xx (`Value::Null` for 204), or the API's refusal.
pub async fn call(
    state: &AppState,
    origin: &Origin,
    credential: &Credential,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, Refused> {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(h) = req.headers_mut() {
        let auth = HeaderValue::from_str(credential.expose()).map_err(|_| Refused::internal())?;
        h.insert(header::AUTHORIZATION, auth);
        for v in &origin.forwarded_for {
            h.append("x-forwarded-for", v.clone());
        }
        if body.is_some() {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
    }
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = req
        .body(Body::from(bytes))
        .map_err(|_| Refused::internal())?;
    if let Some(peer) = &origin.peer {
        req.extensions_mut().insert(*peer);
    }
    let mut router = crate::app(state.clone());
    if std::future::poll_fn(|cx| Service::<Request<Body>>::poll_ready(&mut router, cx))
        .await
        .is_err()
    {
        return Err(Refused::internal());
    }
    let resp = match router.call(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), 16 * 1024 * 1024)
        .await
        .map_err(|_| Refused::internal())?;
    let value: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).map_err(|_| Refused::internal())?
    };
    if status.is_success() {
        Ok(value)
    } else {
        Err(Refused::from_answer(status, &value))
    }
}
