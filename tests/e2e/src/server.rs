//! The serve loop shared by the echo upstream and the fault-injecting proxy: one thread accepts,
//! one thread serves each connection (keep-alive), reading each request (head, then a body framed
//! by `Content-Length` or chunked encoding, with its trailers) and handing it to a [`Handler`].
//! Stops when dropped.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::echo::CapturedRequest;
use crate::wire::{self, Framing, Headers, Wire};

/// What a server does with each request it reads.
pub(crate) trait Handler: Send + Sync + 'static {
    /// Answers `request` (its chunked trailers apart) on `wire`; `Ok(false)` closes the
    /// connection.
    fn handle(
        &self,
        wire: &mut Wire,
        request: CapturedRequest,
        trailers: Headers,
    ) -> io::Result<bool>;

    /// A connection ended with `error` while the server was running (not stopping).
    fn connection_error(&self, _error: io::Error) {}
}

/// A running server. Dropping it stops the acceptor and lets idle connections notice.
pub(crate) struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl Server {
    /// Listens on `bind:port` (port 0 picks a free one) and serves every connection with
    /// `handler`; `name` names the threads.
    pub(crate) fn start<H: Handler>(
        bind: &str,
        port: u16,
        name: &str,
        handler: Arc<H>,
    ) -> io::Result<Server> {
        let listener = TcpListener::bind((bind, port))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let stop = Arc::clone(&stop);
            let conn_name = format!("{name}-conn");
            thread::Builder::new()
                .name(format!("{name}-accept-{}", addr.port()))
                .spawn(move || accept_loop(listener, &conn_name, &stop, &handler))?
        };
        Ok(Server {
            addr,
            stop,
            acceptor: Some(acceptor),
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Blocks until the acceptor ends (which only dropping the server makes it do).
    pub(crate) fn join(mut self) -> io::Result<()> {
        match self.acceptor.take() {
            Some(handle) => handle
                .join()
                .map_err(|_| io::Error::other("acceptor thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so the acceptor sees the flag.
        let wake = match self.addr {
            SocketAddr::V4(a) if a.ip().is_unspecified() => {
                SocketAddr::from((Ipv4Addr::LOCALHOST, a.port()))
            }
            other => other,
        };
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(handle) = self.acceptor.take() {
            let _ = handle.join();
        }
    }
}

fn accept_loop<H: Handler>(
    listener: TcpListener,
    conn_name: &str,
    stop: &Arc<AtomicBool>,
    handler: &Arc<H>,
) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let (stop, handler) = (Arc::clone(stop), Arc::clone(handler));
        let _ = thread::Builder::new()
            .name(conn_name.to_string())
            .spawn(move || {
                if let Err(e) = serve_connection(stream, &stop, &*handler) {
                    if !stop.load(Ordering::SeqCst) {
                        handler.connection_error(e);
                    }
                }
            });
    }
}

fn serve_connection<H: Handler>(
    stream: TcpStream,
    stop: &Arc<AtomicBool>,
    handler: &H,
) -> io::Result<()> {
    // Short timeouts let idle keep-alive connections notice shutdown.
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    stream.set_nodelay(true)?;
    let mut wire = Wire::new(stream, Some(Arc::clone(stop)));
    loop {
        let head = wire.take_head(|buf| {
            let mut headers = vec![httparse::EMPTY_HEADER; wire::MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            Ok(match req.parse(buf)? {
                httparse::Status::Complete(len) => Some((
                    len,
                    (
                        req.method.unwrap_or("").to_string(),
                        req.path.unwrap_or("").to_string(),
                        wire::copy_headers(req.headers),
                    ),
                )),
                httparse::Status::Partial => None,
            })
        })?;
        let Some((method, path, headers)) = head else {
            return Ok(());
        };
        let (body, trailers) = match wire::framing(&headers)? {
            Framing::Chunked => wire.take_chunked_with_trailers()?,
            Framing::Length(n) => (wire.take(n)?, Headers::new()),
            Framing::None => (Vec::new(), Headers::new()),
        };
        let request = CapturedRequest {
            method,
            path,
            headers,
            body,
        };
        if !handler.handle(&mut wire, request, trailers)? {
            return Ok(());
        }
    }
}
