//! keygate-ratelimit: a gRPC server of Envoy's rate-limit protocol
//! (`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`) for keygate's fleet-wide
//! limits, counting in Redis with the `limitador` crate and its atomic reservation script (see
//! [`service`]), its limits loaded from the control plane's export or a file (see [`limits`],
//! [`control`]). A thin server: the protocol's types come from `envoy-types`, the counting from
//! limitador; this crate matches descriptors to limits and maps answers.
//!
//! `serve` runs both sides on listeners the caller bound: gRPC, and HTTP for `/healthz`,
//! `/readyz` (503 until limits are loaded and Redis answers PING) and `/metrics`.

pub mod control;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod service;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use limitador::storage::redis::AsyncRedisStorage;
use tokio::net::TcpListener;

pub use crate::control::ControlPlane;
pub use crate::limits::LimitSet;
use crate::service::{Loaded, Redis, Shared};

/// Redis connection settings: each attempt and each answer bounded, few retries, so a request
/// during an outage fails fast (UNAVAILABLE) and the next one tries again.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
const REDIS_RETRIES: usize = 1;
/// Between attempts to make the first connection.
const REDIS_FIRST_CONNECT_EVERY: Duration = Duration::from_millis(500);

/// Where the limits come from.
#[derive(Debug)]
pub enum Limits {
    /// A checked file, in force from the start (`--limits FILE`).
    Static(LimitSet),
    /// Followed from the control plane (`--control-plane URL`).
    ControlPlane(ControlPlane),
}

#[derive(Debug)]
pub struct Options {
    /// `redis://127.0.0.1:6379`.
    pub redis_url: String,
    pub limits: Limits,
}

/// The gRPC service (envoy-types' generated server trait).
#[derive(Debug, Clone)]
pub struct Rls {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl RateLimitService for Rls {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        self.shared
            .should_rate_limit(request.into_inner())
            .await
            .map(tonic::Response::new)
    }
}

/// Checks a Redis URL without connecting.
pub fn check_redis_url(url: &str) -> Result<(), String> {
    redis::Client::open(url)
        .map(|_| ())
        .map_err(|e| format!("--redis {url:?}: {e}"))
}

/// Serves gRPC on `grpc` and HTTP on `http` until `shutdown` completes. Connects to Redis (and
/// keeps trying until it can) and loads the limits in the background.
pub async fn serve(
    grpc: TcpListener,
    http: TcpListener,
    options: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    check_redis_url(&options.redis_url)?;
    let shared = Arc::new(Shared::default());
    let mut background = Vec::new();
    match options.limits {
        Limits::Static(limits) => shared.put_limits(Loaded { limits, version: 0 }),
        Limits::ControlPlane(control) => {
            let follower = control::Follower::new(control)?;
            background.push(tokio::spawn(follower.run(Arc::clone(&shared))));
        }
    }
    background.push(tokio::spawn(connect_redis(
        options.redis_url,
        Arc::clone(&shared),
    )));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let http_server = axum::serve(http, http::router(Arc::clone(&shared)))
        .with_graceful_shutdown(stopped(stop_rx.clone()));
    let grpc_server = tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::new(Rls {
            shared: Arc::clone(&shared),
        }))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
            stopped(stop_rx),
        );
    let (http_result, grpc_result) = tokio::join!(http_server, grpc_server);
    for task in background {
        task.abort();
    }
    http_result.map_err(|e| format!("HTTP server: {e}"))?;
    grpc_result.map_err(|e| format!("gRPC server: {e}"))
}

/// Makes the first connection to Redis, retrying until Redis answers; afterwards limitador's
/// connection manager reconnects by itself.
async fn connect_redis(url: String, shared: Arc<Shared>) {
    let mut warned = false;
    loop {
        match connect_once(&url).await {
            Ok(redis) => {
                shared.put_redis(redis);
                tracing::info!("connected to Redis");
                return;
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "cannot reach Redis yet; retrying");
                    warned = true;
                }
                tokio::time::sleep(REDIS_FIRST_CONNECT_EVERY).await;
            }
        }
    }
}

async fn connect_once(url: &str) -> Result<Redis, redis::RedisError> {
    let client = redis::Client::open(url)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(REDIS_CONNECT_TIMEOUT)
        .set_response_timeout(REDIS_RESPONSE_TIMEOUT)
        .set_number_of_retries(REDIS_RETRIES)
        .set_factor(50)
        .set_max_delay(200);
    let connection = redis::aio::ConnectionManager::new_with_config(client, config).await?;
    let storage = AsyncRedisStorage::new_with_conn_manager(connection.clone()).await?;
    Ok(Redis {
        storage,
        connection,
    })
}
