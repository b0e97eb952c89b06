//! The echo upstream: an HTTP/1.1 server that answers every request with 200 and a JSON echo
//! `{"method": .., "path": .., "headers": [[name, value-lossy-utf8], ..]}`, and records each
//! request (header values as raw bytes) so a test can assert exactly what got past the filter.
//!
//! Trailers of a chunked request are recorded too ([`Echo::captured_trailers`]), not echoed.
//!
//! A path starting with `/__slow/<ms>` is answered after `<ms>` milliseconds, for tests that need
//! requests in flight at the same time; [`Echo::in_flight`] and [`Echo::max_in_flight`] count them.
//!
//! Served by the shared loop of `server.rs` (one thread accepts, one thread serves each
//! connection, keep-alive supported); the server stops when the [`Echo`] is dropped.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::server::{Handler, Server};
use crate::wire::{self, Headers, Wire};

/// A request as the upstream received it.
#[derive(Clone, PartialEq, Eq)]
pub struct CapturedRequest {
    pub method: String,
    /// The request-target as sent (lossy UTF-8; Envoy only forwards valid path characters).
    pub path: String,
    /// Headers in wire order, names as sent, values as raw bytes.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl CapturedRequest {
    wire::header_accessors!();

    /// The JSON the echo answers with for this request.
    pub fn to_json(&self) -> serde_json::Value {
        let headers: Vec<serde_json::Value> = self
            .headers
            .iter()
            .map(|(n, v)| serde_json::json!([n, String::from_utf8_lossy(v)]))
            .collect();
        serde_json::json!({"method": self.method, "path": self.path, "headers": headers})
    }
}

impl std::fmt::Debug for CapturedRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_json())
    }
}

#[derive(Default)]
struct Shared {
    captured: Mutex<Vec<CapturedRequest>>,
    /// The trailers of each captured request, in the same order (empty for most).
    trailers: Mutex<Vec<Headers>>,
    record: bool,
    verbose: bool,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Requests answered since start, recorded or not ([`Echo::received`]).
    received: AtomicU64,
}

/// A running echo upstream. Dropping it stops the server.
pub struct Echo {
    /// The port it listens on (same as [`Echo::port`]).
    pub port: u16,
    shared: Arc<Shared>,
    server: Server,
}

impl Echo {
    /// Starts on 127.0.0.1 with an ephemeral port, recording requests.
    pub fn start() -> Echo {
        Echo::start_on("127.0.0.1", 0).expect("start echo upstream on 127.0.0.1:0")
    }

    /// Starts on `bind:port` (port 0 picks a free one), recording requests.
    pub fn start_on(bind: &str, port: u16) -> io::Result<Echo> {
        Echo::spawn(bind, port, true, false)
    }

    /// Starts on 127.0.0.1 with an ephemeral port, counting requests ([`Echo::received`])
    /// without recording them: for long runs (the soak), whose millions of requests would not
    /// fit in memory.
    pub fn start_counting() -> Echo {
        Echo::spawn("127.0.0.1", 0, false, false).expect("start echo upstream on 127.0.0.1:0")
    }

    /// Serves forever without recording, printing one line per request (the `keygate-echo`
    /// binary).
    pub fn serve_forever(bind: &str, port: u16) -> io::Result<()> {
        let echo = Echo::spawn(bind, port, false, true)?;
        println!("keygate-echo listening on http://{}", echo.server.addr());
        echo.server.join()
    }

    fn spawn(bind: &str, port: u16, record: bool, verbose: bool) -> io::Result<Echo> {
        let shared = Arc::new(Shared {
            record,
            verbose,
            ..Shared::default()
        });
        let server = Server::start(bind, port, "echo", Arc::clone(&shared))?;
        Ok(Echo {
            port: server.addr().port(),
            shared,
            server,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every request received so far, in arrival order.
    pub fn captured(&self) -> Vec<CapturedRequest> {
        self.shared
            .captured
            .lock()
            .expect("echo capture lock")
            .clone()
    }

    /// Forgets the captured requests and resets [`Echo::max_in_flight`].
    /// The trailer fields of every request received so far, in the order of
    /// [`Echo::captured`]: names as sent, values as raw bytes (empty without trailers).
    pub fn captured_trailers(&self) -> Vec<Vec<(String, Vec<u8>)>> {
        self.shared
            .trailers
            .lock()
            .expect("echo capture lock")
            .clone()
    }

    pub fn clear(&self) {
        let mut captured = self.shared.captured.lock().expect("echo capture lock");
        captured.clear();
        self.shared
            .trailers
            .lock()
            .expect("echo capture lock")
            .clear();
        drop(captured);
        self.shared
            .max_in_flight
            .store(self.in_flight(), Ordering::SeqCst);
    }

    /// Waits until at least `n` requests have been captured, then returns them all; panics after
    /// `timeout`.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<CapturedRequest> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.captured();
            if got.len() >= n {
                return got;
            }
            if Instant::now() > deadline {
                panic!(
                    "echo upstream received {} requests, expected at least {n} within {timeout:?}: {got:?}",
                    got.len()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// How many requests it has answered since it started (recorded or not; not reset by
    /// [`Echo::clear`]).
    pub fn received(&self) -> u64 {
        self.shared.received.load(Ordering::SeqCst)
    }

    /// Requests currently being answered.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Most requests being answered at the same time since start (or the last [`Echo::clear`]).
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Handler for Shared {
    fn handle(
        &self,
        wire: &mut Wire,
        request: CapturedRequest,
        trailers: Headers,
    ) -> io::Result<bool> {
        let close = request
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"close"));
        let reply = request.to_json().to_string();
        if self.verbose {
            println!(
                "{} {} ({} headers)",
                request.method,
                request.path,
                request.headers.len()
            );
        }
        let delay = slow_delay(&request.path);
        if self.record {
            // Both lists under the captured lock's order: one push each, captured first.
            let mut captured = self.captured.lock().expect("echo capture lock");
            captured.push(request);
            self.trailers
                .lock()
                .expect("echo capture lock")
                .push(trailers);
        }

        self.received.fetch_add(1, Ordering::SeqCst);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        if let Some(delay) = delay {
            thread::sleep(delay);
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n{reply}",
            reply.len(),
            if close { "connection: close\r\n" } else { "" },
        );
        // Out of flight once answered: decrementing after the write would race a client that
        // reads the answer and checks the count at once.
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        wire.write_all(response.as_bytes())?;
        Ok(!close)
    }

    fn connection_error(&self, error: io::Error) {
        if self.verbose {
            eprintln!("keygate-echo: connection error: {error}");
        }
    }
}

/// `/__slow/<ms>[/...]` asks the echo to wait `<ms>` milliseconds before answering.
fn slow_delay(path: &str) -> Option<Duration> {
    let rest = path.strip_prefix("/__slow/")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok().map(Duration::from_millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Req;

    #[test]
    fn echoes_method_path_and_raw_header_bytes() {
        let echo = Echo::start();
        let res = Req::get("/a/b?c=d")
            .header("x-bin", b"\xffok")
            .header("x-dup", "1")
            .header("x-dup", "2")
            .send(echo.port());
        assert_eq!(res.status, 200);
        let json = res.body_json();
        assert_eq!(json["method"], "GET");
        assert_eq!(json["path"], "/a/b?c=d");
        let got = echo.captured();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].header("x-bin"), Some(&b"\xffok"[..]));
        assert_eq!(got[0].header_all("x-dup"), vec![&b"1"[..], &b"2"[..]]);
        assert_eq!(
            json["headers"][1],
            serde_json::json!(["x-bin", "\u{fffd}ok"])
        );
    }

    #[test]
    fn keeps_connections_alive_and_reads_bodies() {
        let echo = Echo::start();
        let mut conn = crate::client::Conn::open(echo.port()).unwrap();
        let a = conn.send(&Req::post("/one").body("hello")).unwrap();
        let b = conn
            .send_raw(
                b"POST /two HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            )
            .unwrap();
        assert_eq!((a.status, b.status), (200, 200));
        let got = echo.captured();
        assert_eq!(got[0].body, b"hello");
        assert_eq!(got[1].body, b"abc");
        assert_eq!(got[1].path, "/two");
    }

    #[test]
    fn a_counting_echo_counts_without_recording() {
        let echo = Echo::start_counting();
        let mut conn = crate::client::Conn::open(echo.port()).unwrap();
        for _ in 0..3 {
            assert_eq!(conn.send(&Req::get("/n")).unwrap().status, 200);
        }
        assert_eq!(echo.received(), 3);
        assert!(echo.captured().is_empty());
    }

    #[test]
    fn slow_path_delays_and_counts_in_flight() {
        let echo = Echo::start();
        let port = echo.port();
        let started = Instant::now();
        let threads: Vec<_> = (0..3)
            .map(|_| thread::spawn(move || Req::get("/__slow/300/x").send(port).status))
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 200);
        }
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(echo.max_in_flight(), 3);
        assert_eq!(echo.in_flight(), 0);
        assert_eq!(slow_delay("/__slow/abc"), None);
        assert_eq!(slow_delay("/__slow/25"), Some(Duration::from_millis(25)));
    }
}
