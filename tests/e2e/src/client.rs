//! A raw HTTP/1.1 client for tests: builds requests byte by byte so tests can send what a
//! well-behaved client never would (duplicate headers, non-UTF-8 values, any path bytes), and
//! parses responses framed by `Content-Length`, chunked encoding or connection close.
//!
//! ```no_run
//! use keygate_e2e::client::{Conn, Req};
//! # let port = 10000;
//! let res = Req::get("/v2/accounts/ACdemo0001/calls")
//!     .basic("SKdemomain01", "sk_live_demoMain0001")
//!     .send(port);
//! assert_eq!(res.status, 200);
//!
//! // Several requests on one keep-alive connection:
//! let mut conn = Conn::open(port).unwrap();
//! let first = conn.send(&Req::get("/api/account/balance")).unwrap();
//! let second = conn.send(&Req::get("/api/account/balance")).unwrap();
//! ```

use std::fmt;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use base64::Engine as _;

use crate::wire::{self, Framing, Headers, Wire};

/// How long a read may block before a request fails (Envoy under a 2-core CI box can be slow,
/// but a test should never hang forever).
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// A parsed HTTP response.
#[derive(Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    /// Headers in wire order, names as sent, values as raw bytes.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Response {
    wire::header_accessors!();

    /// The reply without its `date` header (any case), which changes from second to second:
    /// what two replies must share to be byte-identical (status line, headers in wire order,
    /// body).
    pub fn without_date(&self) -> Response {
        let mut reply = self.clone();
        reply
            .headers
            .retain(|(n, _)| !n.eq_ignore_ascii_case("date"));
        reply
    }

    /// The body as text (lossy UTF-8).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics with the status and body if it is not JSON.
    pub fn body_json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}); status {} body {:?}",
                self.status,
                self.body_text()
            )
        })
    }
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<(&str, String)> = self
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("headers", &headers)
            .field("body", &self.body_text())
            .finish()
    }
}

/// A request under construction. Unless told otherwise, `send` adds `host: 127.0.0.1:<port>`
/// when no `host` header was given, and `content-length` when a body was set and neither
/// `content-length` nor `transfer-encoding` was given.
#[derive(Clone, Debug)]
pub struct Req {
    method: Vec<u8>,
    target: Vec<u8>,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    body: Vec<u8>,
    has_body: bool,
    auto_headers: bool,
}

impl Req {
    /// The method as it will be sent.
    pub fn method(&self) -> &[u8] {
        &self.method
    }

    /// The request-target as it will be sent.
    pub fn target(&self) -> &[u8] {
        &self.target
    }

    /// A request with any method and request-target bytes.
    pub fn new(method: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Req {
        Req {
            method: method.as_ref().to_vec(),
            target: target.as_ref().to_vec(),
            headers: Vec::new(),
            body: Vec::new(),
            has_body: false,
            auto_headers: true,
        }
    }

    pub fn get(target: impl AsRef<[u8]>) -> Req {
        Req::new("GET", target)
    }

    pub fn post(target: impl AsRef<[u8]>) -> Req {
        Req::new("POST", target)
    }

    pub fn put(target: impl AsRef<[u8]>) -> Req {
        Req::new("PUT", target)
    }

    pub fn delete(target: impl AsRef<[u8]>) -> Req {
        Req::new("DELETE", target)
    }

    pub fn head(target: impl AsRef<[u8]>) -> Req {
        Req::new("HEAD", target)
    }

    pub fn options(target: impl AsRef<[u8]>) -> Req {
        Req::new("OPTIONS", target)
    }

    /// Appends a header; repeated names are sent as repeated lines, in order.
    pub fn header(mut self, name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Req {
        self.headers
            .push((name.as_ref().to_vec(), value.as_ref().to_vec()));
        self
    }

    /// Appends `authorization: Basic base64(user ":" pass)` (bytes, so any content works).
    pub fn basic(self, user: impl AsRef<[u8]>, pass: impl AsRef<[u8]>) -> Req {
        let mut userpass = user.as_ref().to_vec();
        userpass.push(b':');
        userpass.extend_from_slice(pass.as_ref());
        let encoded = base64::engine::general_purpose::STANDARD.encode(userpass);
        self.header("authorization", format!("Basic {encoded}"))
    }

    /// Appends `authorization: Bearer <token>`.
    pub fn bearer(self, token: impl AsRef<[u8]>) -> Req {
        let mut value = b"Bearer ".to_vec();
        value.extend_from_slice(token.as_ref());
        self.header("authorization", value)
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Req {
        self.body = body.into();
        self.has_body = true;
        self
    }

    /// Sets a JSON body and `content-type: application/json`.
    pub fn json(self, value: &serde_json::Value) -> Req {
        self.header("content-type", "application/json")
            .body(value.to_string())
    }

    /// Sends exactly the headers given: no automatic `host` or `content-length`.
    pub fn no_auto_headers(mut self) -> Req {
        self.auto_headers = false;
        self
    }

    pub fn is_head(&self) -> bool {
        self.method.eq_ignore_ascii_case(b"HEAD")
    }

    /// Sends the request to `port` as if from a client address no other request of this process
    /// used (`X-Forwarded-For: 198.18.x.y`, for an Envoy trusting one hop), so the edge's
    /// per-address failed-authentication limit never answers for a test's own probes.
    pub fn send_from_new_client(&self, port: u16) -> Response {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let client = format!("198.18.{}.{}", (n >> 8) & 0xff, n & 0xff);
        self.clone().header("x-forwarded-for", client).send(port)
    }

    /// The exact bytes `send` writes when talking to `port`.
    pub fn to_bytes(&self, port: u16) -> Vec<u8> {
        let has = |name: &str| {
            self.headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
        };
        let mut out = Vec::with_capacity(256 + self.body.len());
        out.extend_from_slice(&self.method);
        out.push(b' ');
        out.extend_from_slice(&self.target);
        out.extend_from_slice(b" HTTP/1.1\r\n");
        if self.auto_headers && !has("host") {
            out.extend_from_slice(format!("host: 127.0.0.1:{port}\r\n").as_bytes());
        }
        for (name, value) in &self.headers {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        if self.auto_headers && self.has_body && !has("content-length") && !has("transfer-encoding")
        {
            out.extend_from_slice(format!("content-length: {}\r\n", self.body.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }

    /// Sends on a fresh connection to 127.0.0.1:`port`; panics (with the request line) on I/O
    /// or parse errors. Use [`Req::try_send`] to test connection-level failures.
    pub fn send(&self, port: u16) -> Response {
        self.try_send(port).unwrap_or_else(|e| {
            panic!(
                "{} {} to 127.0.0.1:{port} failed: {e}",
                String::from_utf8_lossy(&self.method),
                String::from_utf8_lossy(&self.target)
            )
        })
    }

    pub fn try_send(&self, port: u16) -> io::Result<Response> {
        Conn::open(port)?.send(self)
    }
}

/// One client connection, reusable for several requests (keep-alive) or for raw bytes.
pub struct Conn {
    wire: Wire,
    port: u16,
}

impl Conn {
    pub fn open(port: u16) -> io::Result<Conn> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            wire: Wire::new(stream, None),
            port,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends one request and reads its response.
    pub fn send(&mut self, req: &Req) -> io::Result<Response> {
        self.write_raw(&req.to_bytes(self.port))?;
        self.read_response(req.is_head())
    }

    /// Writes `bytes` (one complete non-HEAD request) and reads one response.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<Response> {
        self.write_raw(bytes)?;
        self.read_response(false)
    }

    /// Writes bytes without reading anything (for split or pipelined requests).
    pub fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.wire.write_all(bytes)
    }

    /// Reads one response. `head_request` says whether it answers a HEAD (which has no body
    /// whatever its headers say). Interim 1xx responses are skipped.
    pub fn read_response(&mut self, head_request: bool) -> io::Result<Response> {
        loop {
            let head = self.wire.take_head(|buf| {
                let mut headers = vec![httparse::EMPTY_HEADER; wire::MAX_HEADERS];
                let mut res = httparse::Response::new(&mut headers);
                Ok(match res.parse(buf)? {
                    httparse::Status::Complete(len) => Some((
                        len,
                        (
                            res.code.unwrap_or(0),
                            res.reason.unwrap_or("").to_string(),
                            wire::copy_headers(res.headers),
                        ),
                    )),
                    httparse::Status::Partial => None,
                })
            })?;
            let Some((status, reason, headers)) = head else {
                return Err(wire::unexpected_eof(
                    "connection closed before a response arrived",
                ));
            };
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            let body = self.read_body(status, head_request, &headers)?;
            return Ok(Response {
                status,
                reason,
                headers,
                body,
            });
        }
    }

    fn read_body(
        &mut self,
        status: u16,
        head_request: bool,
        headers: &Headers,
    ) -> io::Result<Vec<u8>> {
        if head_request || status == 204 || status == 304 {
            return Ok(Vec::new());
        }
        match wire::framing(headers)? {
            Framing::Chunked => self.wire.take_chunked(),
            Framing::Length(n) => self.wire.take(n),
            Framing::None => self.wire.take_to_end(),
        }
    }

    /// Whether the server has closed the connection (waiting up to `wait` for it to do so).
    /// Unread response bytes count as "still open".
    pub fn peer_closed(&mut self, wait: Duration) -> bool {
        if !self.wire.buffered().is_empty() {
            return false;
        }
        let _ = self
            .wire
            .stream
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))));
        let closed = match self.wire.fill() {
            Ok(n) => n == 0,
            Err(e) => !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
        };
        let _ = self.wire.stream.set_read_timeout(Some(READ_TIMEOUT));
        closed
    }

    /// Half-closes the write side (the server sees end of stream).
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        self.wire.stream.shutdown(Shutdown::Write)
    }
}

/// Sends raw bytes (one complete non-HEAD request) on a fresh connection and reads one response.
pub fn send_raw(port: u16, bytes: &[u8]) -> io::Result<Response> {
    Conn::open(port)?.send_raw(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::net::TcpListener;
    use std::thread;

    /// A one-connection server that reads one request head and answers `reply` verbatim.
    fn canned(replies: Vec<&'static [u8]>) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            for reply in replies {
                let mut seen = Vec::new();
                let mut byte = [0u8; 1];
                while !seen.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap() == 1 {
                    seen.push(byte[0]);
                }
                s.write_all(reply).unwrap();
            }
        });
        port
    }

    #[test]
    fn reads_chunked_and_length_framed_responses_on_one_connection() {
        let port = canned(vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-b: \xfe\r\n\r\n4;ext=1\r\nwiki\r\n5\r\npedia\r\n0\r\nx-trailer: 1\r\n\r\n",
            b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\nwww-authenticate: Basic\r\nwww-authenticate: Bearer\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
        ]);
        let mut conn = Conn::open(port).unwrap();
        let first = conn.send(&Req::get("/a")).unwrap();
        assert_eq!(
            (first.status, first.body_text().as_str()),
            (200, "wikipedia")
        );
        assert_eq!(first.header("X-B"), Some(&b"\xfe"[..]));
        assert_eq!(first.header_str("x-b"), None);
        let second = conn.send(&Req::get("/b")).unwrap();
        assert_eq!(second.status, 401);
        assert_eq!(second.body_json(), serde_json::json!({}));
        assert_eq!(
            second.header_all("www-authenticate"),
            vec![&b"Basic"[..], &b"Bearer"[..]]
        );
        let head = conn.send(&Req::head("/c")).unwrap();
        assert_eq!((head.status, head.body.len()), (200, 0));
        assert!(conn.peer_closed(Duration::from_secs(5)));
    }

    #[test]
    fn reads_a_close_delimited_body() {
        let port = canned(vec![b"HTTP/1.0 200 OK\r\n\r\nuntil close"]);
        let res = Req::get("/").send(port);
        assert_eq!(res.body_text(), "until close");
    }

    #[test]
    fn builds_exact_request_bytes() {
        let req = Req::post(b"/p\xff?q")
            .basic("SKx", "s:e")
            .header("x-dup", "1")
            .header("x-dup", b"\x80")
            .body("hi");
        assert_eq!(
            req.to_bytes(7),
            b"POST /p\xff?q HTTP/1.1\r\nhost: 127.0.0.1:7\r\nauthorization: Basic U0t4OnM6ZQ==\r\nx-dup: 1\r\nx-dup: \x80\r\ncontent-length: 2\r\n\r\nhi"
        );
        let bare = Req::get("/")
            .header("Host", "h")
            .bearer("t")
            .no_auto_headers()
            .body("x");
        assert_eq!(
            bare.to_bytes(7),
            b"GET / HTTP/1.1\r\nHost: h\r\nauthorization: Bearer t\r\n\r\nx"
        );
    }
}
