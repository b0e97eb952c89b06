//! keygate-ratelimit against a real Redis (keygate-redistest), over real gRPC on 127.0.0.1:
//! exact counts under concurrency, keygate's descriptors with defaults and overrides, an outage
//! and the recovery, and the wire agreement of keygate-core's messages with envoy-types'.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{account, ask, descriptor, limit, of, request, Service};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code, DescriptorStatus, RateLimit,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use keygate_core::config::Role;
use keygate_core::fleet::{rls, Subject};
use keygate_redistest::RedisServer;
use prost::Message;

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;

fn account_limits(max: u32) -> String {
    limit(
        "account",
        max,
        60,
        &["descriptors[0].keygate == 'account'"],
        "account_sid",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_a_minute_admits_exactly_sixty_hits_to_sixteen_concurrent_clients() {
    let redis = RedisServer::start().unwrap();
    let service = Service::with_limits(&redis.url(), &account_limits(60)).await;
    service.wait_ready().await;

    // Each client asks for 1 to 10 hits; refused, it asks for what was left (at least 1), and
    // stops only when refused a single hit: then nothing is left.
    let mut clients = Vec::new();
    for c in 0..16u32 {
        let mut client = service.client().await;
        clients.push(tokio::spawn(async move {
            let (mut granted, mut refused) = (Vec::new(), Vec::new());
            let mut n = 0u32;
            let mut hits = 1 + (c * 7) % 10;
            loop {
                let answer = ask(&mut client, request(vec![of(&account("AC1"))], hits))
                    .await
                    .unwrap();
                let status = answer.statuses[0].clone();
                assert_eq!(answer.statuses.len(), 1);
                assert_eq!(status.code, answer.overall_code);
                if answer.overall_code == OK {
                    granted.push((hits, status));
                    n += 1;
                    hits = 1 + (c * 7 + n * 3) % 10;
                } else {
                    assert_eq!(answer.overall_code, OVER);
                    refused.push((hits, status.clone()));
                    if hits == 1 {
                        return (granted, refused);
                    }
                    hits = status.limit_remaining.clamp(1, hits - 1);
                }
            }
        }));
    }
    let (mut granted, mut refused) = (Vec::new(), Vec::new());
    for client in clients {
        let (g, r) = client.await.unwrap();
        granted.extend(g);
        refused.extend(r);
    }

    let total: u32 = granted.iter().map(|(hits, _)| hits).sum();
    assert_eq!(total, 60, "granted {granted:?}");
    // The reservations ran one after another in Redis; each OK answer's limit_remaining is what
    // was left after it, so sorted by it they give the running total exactly.
    granted.sort_by_key(|(_, status)| std::cmp::Reverse(status.limit_remaining));
    let mut used = 0;
    for (hits, status) in &granted {
        used += hits;
        assert_eq!(status.limit_remaining, 60 - used, "{granted:?}");
        assert_eq!(
            status.current_limit,
            Some(RateLimit {
                name: "account".into(),
                requests_per_unit: 60,
                unit: Unit::Minute as i32,
            })
        );
        let reset = status.duration_until_reset.unwrap();
        assert!(reset.seconds <= 60 && (reset.seconds, reset.nanos) > (0, 0));
    }
    // Every refusal said what was left, and it was less than asked.
    for (hits, status) in &refused {
        assert!(status.limit_remaining < *hits, "{hits} {status:?}");
    }
    assert_eq!(
        refused.iter().filter(|(hits, _)| *hits == 1).count(),
        16,
        "each client ends refused a single hit"
    );
    assert_eq!(
        service.metric("keygate_ratelimit_hits_granted_total").await,
        60.0
    );
    assert_eq!(
        service.metric("keygate_ratelimit_over_limit_total").await,
        refused.len() as f64
    );
    // Another account has its own counter.
    let mut client = service.client().await;
    let other = ask(&mut client, request(vec![of(&account("AC2"))], 10))
        .await
        .unwrap();
    assert_eq!(
        (other.overall_code, other.statuses[0].limit_remaining),
        (OK, 50)
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_key_apis_take_their_default_or_their_override_all_or_nothing() {
    let redis = RedisServer::start().unwrap();
    let limits = [
        limit(
            "key/standard",
            3,
            60,
            &[
                "descriptors[0].keygate == 'key'",
                "descriptors[0].role == 'standard'",
                "!(descriptors[0].key_sid in ['SK2'])",
            ],
            "key_sid",
        ),
        limit(
            "key/standard/SK2",
            5,
            60,
            &[
                "descriptors[0].keygate == 'key'",
                "descriptors[0].role == 'standard'",
                "descriptors[0].key_sid == 'SK2'",
            ],
            "key_sid",
        ),
        limit(
            "key_api/calls",
            2,
            90,
            &[
                "descriptors[0].keygate == 'key_api'",
                "descriptors[0].api == 'calls'",
                "!(descriptors[0].key_sid in ['SK2'])",
            ],
            "key_sid",
        ),
        limit(
            "key_api/calls/SK2",
            4,
            90,
            &[
                "descriptors[0].keygate == 'key_api'",
                "descriptors[0].api == 'calls'",
                "descriptors[0].key_sid == 'SK2'",
            ],
            "key_sid",
        ),
    ]
    .concat();
    let service = Service::with_limits(&redis.url(), &limits).await;
    service.wait_ready().await;
    let mut client = service.client().await;
    let key = |sid: &str| Subject::Key {
        role: Role::Standard,
        key_sid: sid.into(),
    };
    let key_api = |sid: &str| Subject::KeyApi {
        api: "calls".into(),
        key_sid: sid.into(),
    };
    let both = |sid: &str| request(vec![of(&key(sid)), of(&key_api(sid))], 1);
    let codes = |r: &RateLimitResponse| {
        (
            r.overall_code,
            r.statuses
                .iter()
                .map(|s| (s.code, s.limit_remaining))
                .collect::<Vec<_>>(),
        )
    };

    // SK1 takes the defaults: key 3 a minute, key x API 2 per 90 s.
    for left in [(2, 1), (1, 0)] {
        let r = ask(&mut client, both("SK1")).await.unwrap();
        assert_eq!(codes(&r), (OK, vec![(OK, left.0), (OK, left.1)]));
    }
    let r = ask(&mut client, both("SK1")).await.unwrap();
    // Refused by the key x API limit alone; the key's status says what it has left.
    assert_eq!(codes(&r), (OVER, vec![(OK, 1), (OVER, 0)]));
    let per_90s = r.statuses[1].current_limit.clone().unwrap();
    assert_eq!(
        per_90s,
        RateLimit {
            name: "key_api/calls, window 90s".into(),
            requests_per_unit: 2,
            unit: Unit::Unknown as i32,
        }
    );
    assert!(r.statuses[1].duration_until_reset.unwrap().seconds <= 90);
    // All or nothing: the refused call did not count on the key, which has 1 left.
    let r = ask(&mut client, request(vec![of(&key("SK1"))], 1))
        .await
        .unwrap();
    assert_eq!(codes(&r), (OK, vec![(OK, 0)]));
    assert_eq!(
        r.statuses[0]
            .current_limit
            .as_ref()
            .unwrap()
            .requests_per_unit,
        3
    );

    // SK2 takes its overrides (5 and 4), and only them.
    for n in 1..=4u32 {
        let r = ask(&mut client, both("SK2")).await.unwrap();
        assert_eq!(codes(&r), (OK, vec![(OK, 5 - n), (OK, 4 - n)]));
    }
    let r = ask(&mut client, both("SK2")).await.unwrap();
    assert_eq!(codes(&r), (OVER, vec![(OK, 1), (OVER, 0)]));
    // hits_addend counts as many hits; more than is left is refused whole.
    let r = ask(&mut client, request(vec![of(&key("SK2"))], 2))
        .await
        .unwrap();
    assert_eq!(codes(&r), (OVER, vec![(OVER, 1)]));

    // A descriptor no limit matches is OK with no current_limit ("unlimited"), also next to
    // one that is limited.
    let r = ask(
        &mut client,
        request(vec![of(&account("AC1")), of(&key("SK3"))], 1),
    )
    .await
    .unwrap();
    assert_eq!(r.overall_code, OK);
    assert_eq!(
        r.statuses[0],
        DescriptorStatus {
            code: OK,
            ..DescriptorStatus::default()
        }
    );
    assert_eq!(r.statuses[1].limit_remaining, 2);
    // A role without a limit: unlimited too.
    let main_key = Subject::Key {
        role: Role::Main,
        key_sid: "SK1".into(),
    };
    let r = ask(&mut client, request(vec![of(&main_key)], 1))
        .await
        .unwrap();
    assert_eq!(r.overall_code, OK);
    assert_eq!(r.statuses[0].current_limit, None);
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_protocol_allows_but_this_service_does_not_are_refused_exactly() {
    let redis = RedisServer::start().unwrap();
    let service = Service::with_limits(&redis.url(), &account_limits(5)).await;
    service.wait_ready().await;
    let mut client = service.client().await;
    let refused = |r: Result<RateLimitResponse, tonic::Status>| {
        let status = r.unwrap_err();
        (status.code(), status.message().to_string())
    };
    let mut no_domain = request(vec![of(&account("AC1"))], 1);
    no_domain.domain.clear();
    assert_eq!(
        refused(ask(&mut client, no_domain).await),
        (
            tonic::Code::InvalidArgument,
            "keygate-ratelimit: the request's domain is empty".into()
        )
    );
    assert_eq!(
        refused(ask(&mut client, request(vec![], 1)).await),
        (
            tonic::Code::InvalidArgument,
            "keygate-ratelimit: the request has no descriptors".into()
        )
    );
    let mut own_hits = of(&account("AC1"));
    own_hits.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 3 });
    assert_eq!(
        refused(ask(&mut client, request(vec![of(&account("AC1")), own_hits], 1)).await),
        (
            tonic::Code::InvalidArgument,
            "keygate-ratelimit: descriptors[1]: a descriptor's own hits_addend is not supported: \
             set the request's hits_addend"
                .into()
        )
    );
    // hits_addend 0 means 1; another domain has no limits.
    let r = ask(&mut client, request(vec![of(&account("AC1"))], 0))
        .await
        .unwrap();
    assert_eq!(r.statuses[0].limit_remaining, 4);
    let mut other = request(vec![of(&account("AC1"))], 1);
    other.domain = "other".into();
    let r = ask(&mut client, other).await.unwrap();
    assert_eq!(
        (r.overall_code, r.statuses[0].current_limit.clone()),
        (OK, None)
    );
    assert_eq!(
        service
            .metric("keygate_ratelimit_errors_total{kind=\"invalid_request\"}")
            .await,
        3.0
    );
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_unavailable_and_redis_back_counts_again_without_a_restart() {
    let mut redis = RedisServer::start().unwrap();
    let service = Service::with_limits(&redis.url(), &account_limits(3)).await;
    service.wait_ready().await;
    let mut client = service.client().await;
    let one = || request(vec![of(&account("AC1"))], 1);
    let r = ask(&mut client, one()).await.unwrap();
    assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, 2));

    redis.stop().unwrap();
    let status = ask(&mut client, one()).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (
            tonic::Code::Unavailable,
            "keygate-ratelimit: Redis is unavailable"
        )
    );
    let (code, body) = service.get("/readyz").await;
    assert_eq!(
        (code, body.as_str()),
        (503, "not ready: Redis does not answer PING\n")
    );
    assert!(
        service
            .metric("keygate_ratelimit_errors_total{kind=\"redis\"}")
            .await
            >= 1.0
    );
    // Still unavailable, not unlimited, for as long as Redis is gone.
    let status = ask(&mut client, one()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);

    // Back on the same port (empty: no persistence). The service reconnects by itself; until it
    // has, calls are UNAVAILABLE, never admitted uncounted.
    redis.start_again().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        match ask(&mut client, one()).await {
            Ok(r) => break r,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(Instant::now() < deadline, "never recovered: {status:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(
        (first.overall_code, first.statuses[0].limit_remaining),
        (OK, 2)
    );
    let left: Vec<(i32, u32)> = futures_answers(&mut client, 3).await;
    assert_eq!(left, vec![(OK, 1), (OK, 0), (OVER, 0)]);
    service.wait_ready().await;
    service.stop().await;
}

async fn futures_answers(
    client: &mut envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient<tonic::transport::Channel>,
    n: usize,
) -> Vec<(i32, u32)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = ask(client, request(vec![of(&account("AC1"))], 1))
            .await
            .unwrap();
        out.push((r.overall_code, r.statuses[0].limit_remaining));
    }
    out
}

/// keygate-core's hand-written messages (what the filter sends and reads) against envoy-types'
/// generated ones: encoded with one, decoded with the other, both ways, and over real gRPC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygate_core_rls_messages_and_envoy_types_agree_on_the_wire() {
    let subject = Subject::KeyApi {
        api: "calls".into(),
        key_sid: "SK1".into(),
    };
    let core_request = rls::RateLimitRequest {
        domain: "keygate".into(),
        descriptors: vec![rls::RateLimitDescriptor {
            entries: subject
                .entries()
                .iter()
                .map(|(key, value)| rls::Entry {
                    key: key.to_string(),
                    value: value.to_string(),
                })
                .collect(),
        }],
        hits_addend: 7,
    };
    let decoded = RateLimitRequest::decode(core_request.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded, request(vec![of(&subject)], 7));
    assert_eq!(
        rls::RateLimitRequest::decode(decoded.encode_to_vec().as_slice()).unwrap(),
        core_request
    );

    let envoy_response = RateLimitResponse {
        overall_code: OVER,
        statuses: vec![
            DescriptorStatus {
                code: OVER,
                current_limit: Some(RateLimit {
                    name: "account".into(),
                    requests_per_unit: 60,
                    unit: Unit::Minute as i32,
                }),
                limit_remaining: 3,
                duration_until_reset: Some(envoy_types::pb::google::protobuf::Duration {
                    seconds: 41,
                    nanos: 500_000_000,
                }),
                ..DescriptorStatus::default()
            },
            DescriptorStatus {
                code: OK,
                ..DescriptorStatus::default()
            },
        ],
        ..RateLimitResponse::default()
    };
    let core_response =
        rls::RateLimitResponse::decode(envoy_response.encode_to_vec().as_slice()).unwrap();
    assert_eq!(
        core_response,
        rls::RateLimitResponse {
            overall_code: rls::Code::OverLimit as i32,
            statuses: vec![
                rls::DescriptorStatus {
                    code: rls::Code::OverLimit as i32,
                    current_limit: Some(rls::RateLimit {
                        requests_per_unit: 60,
                        unit: 2,
                        name: "account".into(),
                    }),
                    limit_remaining: 3,
                    duration_until_reset: Some(rls::Duration {
                        seconds: 41,
                        nanos: 500_000_000,
                    }),
                },
                rls::DescriptorStatus {
                    code: rls::Code::Ok as i32,
                    current_limit: None,
                    limit_remaining: 0,
                    duration_until_reset: None,
                },
            ],
        }
    );
    assert_eq!(
        RateLimitResponse::decode(core_response.encode_to_vec().as_slice()).unwrap(),
        envoy_response
    );

    // Over gRPC: keygate-core's request to the service, its answer read as keygate-core's.
    let redis = RedisServer::start().unwrap();
    let limits = limit(
        "key_api/calls",
        10,
        60,
        &[
            "descriptors[0].keygate == 'key_api'",
            "descriptors[0].api == 'calls'",
        ],
        "key_sid",
    );
    let service = Service::with_limits(&redis.url(), &limits).await;
    service.wait_ready().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", service.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = format!("/{}/{}", rls::SERVICE, rls::METHOD);
    let answer: rls::RateLimitResponse = grpc
        .unary(
            tonic::Request::new(core_request),
            path.parse().unwrap(),
            tonic_prost::ProstCodec::<rls::RateLimitRequest, rls::RateLimitResponse>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.overall_code, rls::Code::Ok as i32);
    let status = &answer.statuses[0];
    assert_eq!(status.limit_remaining, 3);
    assert_eq!(
        status.current_limit,
        Some(rls::RateLimit {
            requests_per_unit: 10,
            unit: 2,
            name: "key_api/calls".into(),
        })
    );
    let _ = descriptor(&[]);
    service.stop().await;
}
