//! A fault-injecting HTTP/1.1 proxy for the edge feed: sits between Envoy (the filter's poller)
//! and the real control plane, forwards every request, and answers either with the control
//! plane's response unchanged or with a damaged one ([`Fault`]), chosen when the response comes
//! back (so a long-poll sent in pass-through mode and answered later is damaged if the fault is
//! on by then).
//!
//! It records every request it forwarded (for secret scans) and how many feed requests were in
//! flight at once (one poller per Envoy means at most one). One thread accepts, one thread serves
//! each connection (the loop of `server.rs`); stops when dropped.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::client::Conn;
use crate::echo::CapturedRequest;
use crate::server::{Handler, Server};
use crate::wire::{Headers, Wire};

/// What the proxy does to a 200 answer from the feed (other answers always pass unchanged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward the response as it is.
    PassThrough,
    /// Serve the first half of the body as a complete response (its `Content-Length` says so).
    Truncate,
    /// Announce the whole body, send half of it, then close the connection.
    CutConnection,
    /// Serve a body that is not JSON (it starts like a newer config document).
    InvalidJson,
    /// Serve the first 200 body this proxy ever forwarded (an older version), with its ETag.
    ReplayFirst,
    /// Serve the real document with the last key's `allowed_ips` (the last account's if there
    /// is no key) set to `["10.0.0.1/8"]` (host bits set: refused by the edge's compiler); a
    /// change-feed page with only deletions gets its last deleted SID replaced by `SK/../x`.
    FailsValidation,
    /// [`Fault::FailsValidation`] for the pages of a walk after its first (requests with
    /// `&after=`); the first page passes through.
    FailsValidationOnLaterPages,
    /// Serve the real change-feed page with its `next` cursor set to this string (one that must
    /// never reach a request path, such as `SK1&known=0&wait=0`).
    CraftedNext(&'static str),
}

struct Shared {
    target: u16,
    fault: Mutex<Fault>,
    captured: Mutex<Vec<CapturedRequest>>,
    first_ok: Mutex<Option<(Vec<u8>, Vec<u8>)>>,
    damaged: AtomicUsize,
    forwarded_ok: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// A running proxy in front of 127.0.0.1:`target`.
pub struct FaultyProxy {
    port: u16,
    shared: Arc<Shared>,
    _server: Server,
}

impl FaultyProxy {
    /// Starts on 127.0.0.1 (free port), forwarding to 127.0.0.1:`target`, in pass-through mode.
    pub fn start(target: u16) -> FaultyProxy {
        let shared = Arc::new(Shared {
            target,
            fault: Mutex::new(Fault::PassThrough),
            captured: Mutex::new(Vec::new()),
            first_ok: Mutex::new(None),
            damaged: AtomicUsize::new(0),
            forwarded_ok: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let server = Server::start("127.0.0.1", 0, "faulty", Arc::clone(&shared))
            .expect("start the faulty proxy on 127.0.0.1:0");
        FaultyProxy {
            port: server.addr().port(),
            shared,
            _server: server,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// What to do with the next 200 answers.
    pub fn set_fault(&self, fault: Fault) {
        *self.shared.fault.lock().expect("fault lock") = fault;
    }

    /// Responses damaged so far.
    pub fn damaged(&self) -> usize {
        self.shared.damaged.load(Ordering::SeqCst)
    }

    /// 200 responses forwarded unchanged so far.
    pub fn forwarded_ok(&self) -> usize {
        self.shared.forwarded_ok.load(Ordering::SeqCst)
    }

    /// Every request received, in arrival order.
    pub fn captured(&self) -> Vec<CapturedRequest> {
        self.shared.captured.lock().expect("capture lock").clone()
    }

    /// Most requests in flight at the same time since start (or [`FaultyProxy::reset_max`]).
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Restarts the [`FaultyProxy::max_in_flight`] count from the requests in flight now.
    pub fn reset_max(&self) {
        let now = self.shared.in_flight.load(Ordering::SeqCst);
        self.shared.max_in_flight.store(now, Ordering::SeqCst);
    }
}

impl Handler for Shared {
    fn handle(&self, wire: &mut Wire, request: CapturedRequest, _: Headers) -> io::Result<bool> {
        self.captured
            .lock()
            .expect("capture lock")
            .push(request.clone());
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        forward(wire, &request, self, InFlight(self))
    }
}

/// A request counted in flight from when the proxy read it until the control plane answered
/// it (not until the answer was written back: by then the edge may already have sent its next
/// long-poll on another connection, which is not a second poller).
struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Forwards one request and answers it; `Ok(false)` when the connection must close.
fn forward(
    wire: &mut Wire,
    req: &CapturedRequest,
    shared: &Shared,
    in_flight: InFlight<'_>,
) -> io::Result<bool> {
    let mut out = format!("{} {} HTTP/1.1\r\n", req.method, req.path).into_bytes();
    for (name, value) in &req.headers {
        if name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if !req.body.is_empty() {
        out.extend_from_slice(format!("content-length: {}\r\n", req.body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&req.body);
    // The control plane down: close, as a refused connection would look to Envoy.
    let Ok(mut upstream) = Conn::open(shared.target) else {
        return Ok(false);
    };
    let Ok(res) = upstream.send_raw(&out) else {
        return Ok(false);
    };
    drop(in_flight);
    let etag = res.header("etag").map(<[u8]>::to_vec);
    let (mut status, mut etag, mut body, mut cut) = (res.status, etag, res.body.clone(), false);
    if res.status == 200 && req.path.starts_with("/v1/edge/") {
        {
            let mut first = shared.first_ok.lock().expect("first lock");
            if first.is_none() {
                *first = Some((etag.clone().unwrap_or_default(), body.clone()));
            }
        }
        let fault = match *shared.fault.lock().expect("fault lock") {
            Fault::FailsValidationOnLaterPages if req.path.contains("&after=") => {
                Fault::FailsValidation
            }
            Fault::FailsValidationOnLaterPages => Fault::PassThrough,
            f => f,
        };
        match fault {
            Fault::PassThrough => {
                shared.forwarded_ok.fetch_add(1, Ordering::SeqCst);
            }
            Fault::Truncate => body.truncate(body.len() / 2),
            Fault::CutConnection => cut = true,
            Fault::InvalidJson => {
                body = b"{\"schema\":\"keygate.config/v1\",\"version\":999999,\"keys\":[}".to_vec();
            }
            Fault::ReplayFirst => {
                let first = shared.first_ok.lock().expect("first lock").clone();
                if let Some((e, b)) = first {
                    etag = Some(e);
                    body = b;
                }
            }
            Fault::CraftedNext(next) => {
                let mut doc: serde_json::Value =
                    serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                doc["next"] = serde_json::json!(next);
                body = serde_json::to_vec(&doc).unwrap_or_default();
            }
            Fault::FailsValidation | Fault::FailsValidationOnLaterPages => {
                let mut doc: serde_json::Value =
                    serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                let bad = serde_json::json!(["10.0.0.1/8"]);
                if let Some(key) = doc["keys"].as_array_mut().and_then(|k| k.last_mut()) {
                    key["allowed_ips"] = bad;
                } else if let Some(a) = doc["accounts"].as_array_mut().and_then(|a| a.last_mut()) {
                    a["allowed_ips"] = bad;
                } else if let Some(d) = doc["deleted"].as_array_mut().and_then(|d| d.last_mut()) {
                    *d = serde_json::json!("SK/../x");
                } else {
                    status = 599; // nothing to damage: make the failure visible
                }
                body = serde_json::to_vec(&doc).unwrap_or_default();
            }
        }
        if fault != Fault::PassThrough {
            shared.damaged.fetch_add(1, Ordering::SeqCst);
        }
    }
    let mut head = format!("HTTP/1.1 {status} {}\r\n", res.reason).into_bytes();
    for (name, value) in &res.headers {
        let skip = ["content-length", "transfer-encoding", "connection", "etag"];
        if skip.iter().any(|s| name.eq_ignore_ascii_case(s)) {
            continue;
        }
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    if let Some(e) = &etag {
        head.extend_from_slice(b"etag: ");
        head.extend_from_slice(e);
        head.extend_from_slice(b"\r\n");
    }
    if status != 304 && status != 204 {
        head.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    if cut {
        head.extend_from_slice(&body[..body.len() / 2]);
        wire.write_all(&head)?;
        let _ = wire.stream.shutdown(std::net::Shutdown::Both);
        return Ok(false);
    }
    head.extend_from_slice(&body);
    wire.write_all(&head)?;
    Ok(true)
}
