//! Following the control plane: `GET <control>/v1/edge/ratelimit-config?format=limitador` with
//! the edge token, every poll period, `If-None-Match` with the ETag of the set in force. A 200
//! whose document passes [`LimitSet::parse`] is put in force whole; a 304 changes nothing; any
//! other answer, an unreachable control plane or a refused document is logged and counted
//! (`errors_total{kind="control_plane"|"bad_limits"}`) and the last good set stays in force.

use std::sync::Arc;
use std::time::Duration;

use crate::limits::LimitSet;
use crate::metrics::kind;
use crate::service::{Loaded, Shared};

/// The export's path and query on the control plane.
pub const EXPORT_PATH: &str = "/v1/edge/ratelimit-config?format=limitador";

/// How long one poll may take.
const POLL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the limits come from and how to ask for them.
#[derive(Clone)]
pub struct ControlPlane {
    /// The control plane's base URL (`https://control:8088`).
    pub url: String,
    /// The edge token (sent as `Authorization: Bearer`, never logged).
    pub token: String,
    /// PEM certificates to trust for an `https` control plane, besides the system's.
    pub ca_pem: Option<Vec<u8>>,
    pub every: Duration,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("url", &self.url)
            .field("every", &self.every)
            .finish_non_exhaustive()
    }
}

/// What one poll did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Polled {
    /// A new set is in force.
    Updated { version: u64, limits: usize },
    /// 304: the set in force is current.
    Unchanged,
    /// Nothing changed; the reason was logged and counted.
    Failed(String),
}

pub struct Follower {
    control: ControlPlane,
    client: reqwest::Client,
    etag: Option<String>,
}

impl Follower {
    pub fn new(control: ControlPlane) -> Result<Follower, String> {
        let mut builder = reqwest::Client::builder().timeout(POLL_TIMEOUT);
        if let Some(pem) = &control.ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| format!("--control-ca: not PEM certificates: {e}"))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder
            .build()
            .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
        Ok(Follower {
            control,
            client,
            etag: None,
        })
    }

    /// Polls for ever, once every poll period.
    pub async fn run(mut self, shared: Arc<Shared>) {
        loop {
            self.poll(&shared).await;
            tokio::time::sleep(self.control.every).await;
        }
    }

    /// One poll.
    pub async fn poll(&mut self, shared: &Shared) -> Polled {
        let url = format!("{}{EXPORT_PATH}", self.control.url.trim_end_matches('/'));
        let mut request = self
            .client
            .get(&url)
            .bearer_auth(&self.control.token)
            .header(reqwest::header::ACCEPT, "application/yaml, text/yaml, */*");
        if let Some(etag) = &self.etag {
            request = request.header(reqwest::header::IF_NONE_MATCH, etag);
        }
        let failed = |kind: &'static str, message: String| {
            shared.metrics.error(kind);
            tracing::warn!(url = %url, error = %message, "limits not updated; the last good set stays in force");
            Polled::Failed(message)
        };
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => return failed(kind::CONTROL_PLANE, format!("GET: {e}")),
        };
        let status = response.status();
        if status == reqwest::StatusCode::NOT_MODIFIED {
            return Polled::Unchanged;
        }
        if status != reqwest::StatusCode::OK {
            let body = response.text().await.unwrap_or_default();
            let body: String = body.chars().take(300).collect();
            return failed(
                kind::CONTROL_PLANE,
                format!("the control plane answered {status}: {}", body.trim()),
            );
        }
        let etag = response
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = match response.text().await {
            Ok(body) => body,
            Err(e) => return failed(kind::CONTROL_PLANE, format!("reading the body: {e}")),
        };
        let limits = match LimitSet::parse(&body) {
            Ok(limits) => limits,
            Err(e) => return failed(kind::BAD_LIMITS, format!("the limits document: {e}")),
        };
        let version = etag.as_deref().map(version_of_etag).unwrap_or(0);
        let count = limits.len();
        shared.put_limits(Loaded { limits, version });
        self.etag = etag;
        tracing::info!(
            version,
            limits = count,
            "limits from the control plane in force"
        );
        Polled::Updated {
            version,
            limits: count,
        }
    }
}

/// The number in an ETag (`"42"`, `W/"42"`), else 0.
fn version_of_etag(etag: &str) -> u64 {
    etag.trim_start_matches("W/")
        .trim_matches('"')
        .parse()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_the_etag_number() {
        assert_eq!(version_of_etag("\"42\""), 42);
        assert_eq!(version_of_etag("W/\"7\""), 7);
        assert_eq!(version_of_etag("\"abc\""), 0);
    }
}
