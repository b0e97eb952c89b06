//! TLS for the REST API and the edge feed: `serve --tls-cert FILE --tls-key FILE`.
//!
//! [`load`] reads a PEM certificate chain and private key into a rustls server config (ring
//! backend, TLS 1.2 and 1.3, ALPN `http/1.1`); every problem is one line naming the file.
//! [`serve`] runs a router behind a [`TlsListener`]: TCP connections are accepted by a task of
//! their own and each handshake runs in its own task (at most [`MAX_HANDSHAKES`] at once, each
//! within [`HANDSHAKE_TIMEOUT`]), so a client that opens a connection and never says hello holds
//! up nobody. Handlers get the TCP peer as `ConnectInfo<SocketAddr>`, exactly as on plain HTTP.
//! [`init`] (`keygate-control tls-init`) makes a CA and a server certificate for it.

use std::convert::Infallible;
use std::future::{ready, Future, Ready};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::response::Response;
use axum::routing::future::RouteFuture;
use axum::serve::{IncomingStream, Listener};
use axum::Router;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::rustls;
pub use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tower_service::Service;

/// Handshakes in progress at once; further connections wait in the kernel's accept queue.
pub const MAX_HANDSHAKES: usize = 256;
/// A handshake not finished by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Certificate and key files, given together or not at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// `--tls-cert` and `--tls-key`: both (TLS), neither (plain HTTP), or an error naming the
    /// missing one.
    pub fn from_options(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<TlsFiles>, String> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key })),
            (None, None) => Ok(None),
            (Some(_), None) => Err("--tls-cert needs --tls-key (give both or neither)".to_owned()),
            (None, Some(_)) => Err("--tls-key needs --tls-cert (give both or neither)".to_owned()),
        }
    }
}

/// The provider every config here is built with (ring), whatever else the process links.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the certificate chain (PEM, leaf first) and the private key (PEM: PKCS#8, PKCS#1 or
/// SEC1) and checks that they belong together.
pub fn load(files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let cert_path = files.cert.display();
    let key_path = files.key.display();
    let cert_pem = std::fs::read(&files.cert)
        .map_err(|e| format!("cannot read TLS certificate {cert_path}: {e}"))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("TLS certificate {cert_path}: {e}"))?;
    if chain.is_empty() {
        return Err(format!(
            "TLS certificate {cert_path}: no PEM \"CERTIFICATE\" block"
        ));
    }
    let key_pem =
        std::fs::read(&files.key).map_err(|e| format!("cannot read TLS key {key_path}: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => format!(
            "TLS key {key_path}: no PEM private key (\"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\")"
        ),
        e => format!("TLS key {key_path}: {e}"),
    })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => {
                format!("TLS key {key_path} is not the key of certificate {cert_path}")
            }
            e => format!("TLS key {key_path} with certificate {cert_path}: {e}"),
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `router` over TLS on `listener` until `shutdown` completes, then drains in-flight
/// requests (axum's graceful shutdown, as on plain HTTP).
pub async fn serve(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let listener = TlsListener::new(listener, config)?;
    axum::serve(listener, MakeWithPeer(router))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Completed TLS connections, as an axum [`Listener`]. Dropping it stops accepting.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    /// Stops the accept loop when the listener is dropped.
    _acceptor: AbortOnDrop,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(MAX_HANDSHAKES);
        let acceptor = tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), tx));
        Ok(TlsListener {
            ready,
            local,
            _acceptor: AbortOnDrop(acceptor),
        })
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop ended (it only does when it is aborted, i.e. never while this
            // listener lives): accept nothing more.
            None => {
                tracing::error!("TLS accept loop ended");
                std::future::pending().await
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                accept_error(e).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    drop(slot);
                    let _ = ready.send((tls, peer)).await;
                }
                // Closed before a handshake: a port probe or health check, not worth a line.
                Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    tracing::debug!(peer = %peer, error = %e, "TLS handshake failed")
                }
                Ok(Err(e)) => tracing::info!(peer = %peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::info!(peer = %peer, "TLS handshake timed out"),
            }
        });
    }
}

/// As axum's own accept loop: connection-level errors are the client's; anything else (such as
/// running out of file descriptors) is logged and retried after a second.
async fn accept_error(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept error");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Per connection: the router with the TLS connection's TCP peer as `ConnectInfo<SocketAddr>`
/// (what `into_make_service_with_connect_info::<SocketAddr>()` gives on plain HTTP).
#[derive(Clone)]
struct MakeWithPeer(Router);

impl Service<IncomingStream<'_, TlsListener>> for MakeWithPeer {
    type Response = WithPeer;
    type Error = Infallible;
    type Future = Ready<Result<WithPeer, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, conn: IncomingStream<'_, TlsListener>) -> Self::Future {
        ready(Ok(WithPeer {
            router: self.0.clone(),
            peer: *conn.remote_addr(),
        }))
    }
}

/// Marks a request that came over TLS (the console's cookie is then `Secure`).
#[derive(Debug, Clone, Copy)]
pub struct ServedOverTls;

#[derive(Clone)]
struct WithPeer {
    router: Router,
    peer: SocketAddr,
}

impl Service<Request> for WithPeer {
    type Response = Response;
    type Error = Infallible;
    type Future = RouteFuture<Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<Request>::poll_ready(&mut self.router, cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        req.extensions_mut().insert(ConnectInfo(self.peer));
        req.extensions_mut().insert(ServedOverTls);
        self.router.call(req)
    }
}

/// What [`init`] wrote.
#[derive(Debug)]
pub struct Initialized {
    /// The CA certificate to trust (Envoy's `validation_context.trusted_ca`).
    pub ca: PathBuf,
    /// The server's certificate (`--tls-cert`).
    pub cert: PathBuf,
    /// The server's private key (`--tls-key`), mode 0600.
    pub key: PathBuf,
}

/// File names [`init`] writes in its directory.
pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "server.pem";
pub const KEY_FILE: &str = "server.key";

/// Makes a CA and a server certificate it signs for `names` (DNS names or IP addresses, the
/// first also the common name), valid from yesterday for `days` days, into `dir` (created if
/// missing): `ca.pem`, `server.pem`, `server.key`. The CA's private key is never written: the
/// CA can only ever have signed this one certificate. Refuses to overwrite any of the files.
pub fn init(dir: &Path, names: &[String], days: u32) -> Result<Initialized, String> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let Some(first) = names.first() else {
        return Err("tls-init needs at least one --name".to_owned());
    };
    if days == 0 {
        return Err("--days must be at least 1".to_owned());
    }
    let out = Initialized {
        ca: dir.join(CA_FILE),
        cert: dir.join(CERT_FILE),
        key: dir.join(KEY_FILE),
    };
    for path in [&out.ca, &out.cert, &out.key] {
        if path.exists() {
            return Err(format!(
                "{} exists; tls-init does not overwrite (remove the three files first)",
                path.display()
            ));
        }
    }
    let today = chrono::Utc::now().date_naive();
    let date = |d: chrono::NaiveDate| {
        use chrono::Datelike;
        rcgen::date_time_ymd(d.year(), d.month() as u8, d.day() as u8)
    };
    let not_before = date(today - chrono::Days::new(1));
    let not_after = date(today + chrono::Days::new(u64::from(days)));
    fn err(what: &'static str) -> impl Fn(rcgen::Error) -> String {
        move |e| format!("tls-init: {what}: {e}")
    }

    let ca_key = KeyPair::generate().map_err(err("CA key"))?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "keygate-control CA (tls-init)");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_cert = ca.self_signed(&ca_key).map_err(err("CA certificate"))?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate().map_err(err("server key"))?;
    let mut server = CertificateParams::new(names.to_vec()).map_err(err("server names"))?;
    server.distinguished_name.push(DnType::CommonName, first);
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.not_before = not_before;
    server.not_after = not_after;
    let cert = server
        .signed_by(&key, &issuer)
        .map_err(err("server certificate"))?;

    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    write_new(&out.ca, ca_cert.pem().as_bytes(), 0o644)?;
    write_new(&out.cert, cert.pem().as_bytes(), 0o644)?;
    write_new(&out.key, key.serialize_pem().as_bytes(), 0o600)?;
    Ok(out)
}

/// Creates `path` (never replacing a file) with `mode` on Unix.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    options
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_rustls::rustls::pki_types::ServerName;
    use tokio_rustls::TlsConnector;

    fn names() -> Vec<String> {
        vec![
            "keygate-control".to_owned(),
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ]
    }

    fn connector(ca: &Path) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }

    /// One HTTP/1.1 request over TLS to `addr` as `name`; the whole response (the server closes).
    async fn get_over_tls(
        addr: SocketAddr,
        ca: &Path,
        name: &str,
        path: &str,
    ) -> io::Result<String> {
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = connector(ca)
            .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
            .await?;
        tls.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: {name}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = String::new();
        tls.read_to_string(&mut out).await?;
        Ok(out)
    }

    fn peer_router() -> Router {
        Router::new().route(
            "/peer",
            get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
        )
    }

    struct Server {
        addr: SocketAddr,
        stop: tokio::sync::oneshot::Sender<()>,
        done: JoinHandle<io::Result<()>>,
    }

    async fn start(files: &Initialized) -> Server {
        let config = load(&TlsFiles {
            cert: files.cert.clone(),
            key: files.key.clone(),
        })
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(serve(listener, config, peer_router(), async move {
            let _ = stopped.await;
        }));
        Server { addr, stop, done }
    }

    /// A client that trusts the CA reaches a handler, which sees the TLS connection's TCP
    /// peer as `ConnectInfo<SocketAddr>`; after shutdown the server returns.
    #[tokio::test]
    async fn serves_over_tls_with_the_peer_address_and_shuts_down() {
        let dir = tempfile::tempdir().unwrap();
        let files = init(dir.path(), &names(), 30).unwrap();
        let server = start(&files).await;
        for name in ["keygate-control", "localhost", "127.0.0.1"] {
            let tcp = TcpStream::connect(server.addr).await.unwrap();
            let local = tcp.local_addr().unwrap();
            let mut tls = connector(&files.ca)
                .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
                .await
                .unwrap();
            assert_eq!(tls.get_ref().1.alpn_protocol(), None);
            tls.write_all(b"GET /peer HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut out = String::new();
            tls.read_to_string(&mut out).await.unwrap();
            assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
            assert!(out.ends_with(&format!("\r\n\r\n{local}")), "{out}");
        }
        server.stop.send(()).unwrap();
        server.done.await.unwrap().unwrap();
    }

    /// A client that trusts another CA, or asks for a name the certificate does not have,
    /// fails the handshake; the server keeps serving others.
    #[tokio::test]
    async fn a_client_that_does_not_trust_the_ca_or_asks_another_name_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let files = init(&dir.path().join("right"), &names(), 30).unwrap();
        let other = init(&dir.path().join("other"), &names(), 30).unwrap();
        let server = start(&files).await;
        let e = get_over_tls(server.addr, &other.ca, "keygate-control", "/peer")
            .await
            .unwrap_err();
        assert!(e.to_string().starts_with("invalid peer certificate"), "{e}");
        let e = get_over_tls(server.addr, &files.ca, "other.example", "/peer")
            .await
            .unwrap_err();
        assert!(
            e.to_string().starts_with(
                "invalid peer certificate: certificate not valid for name \"other.example\""
            ),
            "{e}"
        );
        let ok = get_over_tls(server.addr, &files.ca, "keygate-control", "/peer")
            .await
            .unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        server.stop.send(()).unwrap();
        server.done.await.unwrap().unwrap();
    }

    /// A connection that never sends a ClientHello does not stop others from being served.
    #[tokio::test]
    async fn a_silent_connection_does_not_hold_up_the_next_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let files = init(dir.path(), &names(), 30).unwrap();
        let server = start(&files).await;
        let silent = TcpStream::connect(server.addr).await.unwrap();
        let ok = get_over_tls(server.addr, &files.ca, "localhost", "/peer")
            .await
            .unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        // Had the second handshake waited for the first, it would have been served only once
        // the silent connection was dropped for its timeout: it is still open.
        let e = silent.try_read(&mut [0u8; 1]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        server.stop.send(()).unwrap();
        server.done.await.unwrap().unwrap();
    }

    #[test]
    fn certificate_and_key_go_together() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(TlsFiles::from_options(None, None), Ok(None));
        assert_eq!(
            TlsFiles::from_options(p("c.pem"), p("k.pem")),
            Ok(Some(TlsFiles {
                cert: PathBuf::from("c.pem"),
                key: PathBuf::from("k.pem")
            }))
        );
        assert_eq!(
            TlsFiles::from_options(p("c.pem"), None),
            Err("--tls-cert needs --tls-key (give both or neither)".to_owned())
        );
        assert_eq!(
            TlsFiles::from_options(None, p("k.pem")),
            Err("--tls-key needs --tls-cert (give both or neither)".to_owned())
        );
    }

    /// Each bad file is refused with one line naming it.
    #[test]
    fn bad_files_are_refused_with_one_line_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = init(&dir.path().join("a"), &names(), 30).unwrap();
        let other = init(&dir.path().join("b"), &names(), 30).unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem at all\n").unwrap();
        let missing = dir.path().join("missing.pem");
        let files = |cert: &Path, key: &Path| TlsFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
        };
        let err = |cert: &Path, key: &Path| load(&files(cert, key)).err().unwrap();
        let d = |p: &Path| p.display().to_string();

        assert!(load(&files(&good.cert, &good.key)).is_ok());
        assert_eq!(
            err(&missing, &good.key),
            format!(
                "cannot read TLS certificate {}: No such file or directory (os error 2)",
                d(&missing)
            )
        );
        assert_eq!(
            err(&junk, &good.key),
            format!("TLS certificate {}: no PEM \"CERTIFICATE\" block", d(&junk))
        );
        assert_eq!(
            err(&good.cert, &missing),
            format!(
                "cannot read TLS key {}: No such file or directory (os error 2)",
                d(&missing)
            )
        );
        assert_eq!(
            err(&good.cert, &junk),
            format!(
                "TLS key {}: no PEM private key (\"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\")",
                d(&junk)
            )
        );
        // The certificate where the key should be: still no private key in it.
        assert_eq!(
            err(&good.cert, &good.cert),
            format!(
                "TLS key {}: no PEM private key (\"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\")",
                d(&good.cert)
            )
        );
        assert_eq!(
            err(&good.cert, &other.key),
            format!(
                "TLS key {} is not the key of certificate {}",
                d(&other.key),
                d(&good.cert)
            )
        );
    }

    #[test]
    fn init_refuses_to_overwrite_and_keeps_the_key_private() {
        let dir = tempfile::tempdir().unwrap();
        let out = init(dir.path(), &names(), 1).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&out.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let key_before = std::fs::read(&out.key).unwrap();
        assert_eq!(
            init(dir.path(), &names(), 1).err().unwrap(),
            format!(
                "{} exists; tls-init does not overwrite (remove the three files first)",
                out.ca.display()
            )
        );
        assert_eq!(std::fs::read(&out.key).unwrap(), key_before);
        // Only the three files: no CA key anywhere.
        let mut written: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        written.sort();
        assert_eq!(written, [CA_FILE, KEY_FILE, CERT_FILE]);
        assert_eq!(
            init(&dir.path().join("x"), &[], 1).err().unwrap(),
            "tls-init needs at least one --name"
        );
    }
}
