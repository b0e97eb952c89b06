//! `keygate-bench-load`: the load generator of `make bench-fleet-limits` (bench/fleet_limits.py).
//!
//! Keep-alive HTTP/1.1 `GET`s from `--connections` connections, one thread each, to
//! 127.0.0.1:`--port`. Request `i` goes to line `i mod n` of `--targets` (`path<TAB>authorization`
//! per line), so a file of one line is one hot key and a file of 1,000 lines spreads the load.
//!
//! - **Fixed rate** (`--rate R`, wrk2's model): request `i` is scheduled at `i / R` seconds after
//!   the start, on connection `i mod C`. A connection that is idle at the slot sleeps until it and
//!   times the request from its real send; a connection still busy with the previous request
//!   sends at once and times it from the slot, so the wait it caused is counted (no coordinated
//!   omission) while the generator's own timer slack is not.
//! - **Closed loop** (`--rate 0`): every connection sends back to back (for the saturation rate).
//!
//! Requests scheduled (or, closed loop, sent) in the first `--warmup` seconds are not recorded;
//! then `--seconds` are. A fixed-rate run that falls so far behind that it is still sending
//! `max(--seconds, 5)` seconds after its last slot stops there and counts the rest as `unsent`.
//! One JSON line on stdout: counts by status, errors, and latency percentiles in microseconds.
//! std only (no async runtime): its cost per request is a write, a read and, at a fixed rate, a
//! sleep.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

struct Args {
    port: u16,
    targets: Vec<(String, String)>,
    connections: usize,
    rate: f64,
    seconds: f64,
    warmup: f64,
}

const USAGE: &str = "usage: keygate-bench-load --port N --targets FILE [--connections 16] \
[--rate REQ_PER_S (0: closed loop)] [--seconds 10] [--warmup 2]";

fn parse_args() -> Result<Args, String> {
    let mut port = None;
    let mut targets_path = None;
    let (mut connections, mut rate, mut seconds, mut warmup) = (16usize, 0f64, 10f64, 2f64);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value:?}: {e}");
        match flag.as_str() {
            "--port" => port = Some(value.parse::<u16>().map_err(|e| bad(&e))?),
            "--targets" => targets_path = Some(value),
            "--connections" => connections = value.parse().map_err(|e| bad(&e))?,
            "--rate" => rate = value.parse().map_err(|e| bad(&e))?,
            "--seconds" => seconds = value.parse().map_err(|e| bad(&e))?,
            "--warmup" => warmup = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    let port = port.ok_or_else(|| format!("--port is required\n{USAGE}"))?;
    let path = targets_path.ok_or_else(|| format!("--targets is required\n{USAGE}"))?;
    let text = std::fs::read_to_string(&path).map_err(|e| format!("--targets {path}: {e}"))?;
    let targets: Vec<(String, String)> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match l.split_once('\t') {
            Some((p, a)) => (p.to_owned(), a.to_owned()),
            None => (l.to_owned(), String::new()),
        })
        .collect();
    if targets.is_empty() {
        return Err(format!("--targets {path}: no lines"));
    }
    let finite = [seconds, warmup, rate].iter().all(|x| x.is_finite());
    if connections == 0 || !finite || seconds <= 0.0 || warmup < 0.0 || rate < 0.0 {
        return Err(format!(
            "--connections must be > 0, --seconds > 0, --warmup and --rate >= 0\n{USAGE}"
        ));
    }
    Ok(Args {
        port,
        targets,
        connections,
        rate,
        seconds,
        warmup,
    })
}

/// What one connection saw in the recorded part.
#[derive(Default)]
struct Seen {
    latencies_us: Vec<u32>,
    /// (status, count)
    statuses: Vec<(u16, u64)>,
    errors: u64,
    /// Requests sent after their slot because the connection was still busy.
    late: u64,
    /// Requests of the recorded part never sent: the run gave up on an overloaded server.
    unsent: u64,
    reconnects: u64,
}

impl Seen {
    fn status(&mut self, code: u16, count: u64) {
        match self.statuses.iter_mut().find(|(c, _)| *c == code) {
            Some((_, n)) => *n += count,
            None => self.statuses.push((code, count)),
        }
    }
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads until `buf` holds at least `n` bytes.
fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> io::Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    while buf.len() < n {
        let got = s.read(&mut chunk)?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..got]);
    }
    Ok(())
}

/// Reads one response: (status, whether the server closes the connection).
fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<(u16, bool)> {
    buf.clear();
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        let want = buf.len() + 1;
        fill(s, buf, want)?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad status line"))?;
    let (mut length, mut chunked, mut close) = (0usize, false, false);
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            match name.trim() {
                "content-length" => length = value.parse().unwrap_or(0),
                "transfer-encoding" => chunked = value.contains("chunked"),
                "connection" => close = value.contains("close"),
                _ => {}
            }
        }
    }
    if !chunked {
        fill(s, buf, head_end + length)?;
        return Ok((status, close));
    }
    // Chunked: size line, data, CRLF; a zero size ends it (then trailers up to a blank line).
    let mut at = head_end;
    loop {
        let line_end = loop {
            if let Some(i) = find(&buf[at..], b"\r\n") {
                break at + i;
            }
            let want = buf.len() + 1;
            fill(s, buf, want)?;
        };
        let size_text = String::from_utf8_lossy(&buf[at..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
        at = line_end + 2;
        if size == 0 {
            loop {
                if let Some(i) = find(&buf[at..], b"\r\n") {
                    if i == 0 {
                        return Ok((status, close));
                    }
                    at += i + 2;
                } else {
                    let want = buf.len() + 1;
                    fill(s, buf, want)?;
                }
            }
        }
        fill(s, buf, at + size + 2)?;
        at += size + 2;
    }
}

fn request_bytes(port: u16, (path, auth): &(String, String)) -> Vec<u8> {
    let mut r = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n");
    if !auth.is_empty() {
        r.push_str(&format!("Authorization: {auth}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// One connection's share of the run.
fn run_connection(
    c: usize,
    addr: SocketAddr,
    requests: Arc<Vec<Vec<u8>>>,
    args: Arc<Args>,
    t0: Instant,
) -> Seen {
    let mut seen = Seen::default();
    let mut stream: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(16 * 1024);
    let record_from = t0 + Duration::from_secs_f64(args.warmup);
    let end = record_from + Duration::from_secs_f64(args.seconds);
    // An overloaded server is not waited for forever: what is still unsent then is counted.
    let give_up = end + Duration::from_secs_f64(args.seconds.max(5.0));
    let conns = args.connections;
    let mut i = c; // global request index
    loop {
        let (started, recorded) = if args.rate > 0.0 {
            let slot = t0 + Duration::from_secs_f64(i as f64 / args.rate);
            if slot >= end {
                break;
            }
            let now = Instant::now();
            if now >= give_up {
                while t0 + Duration::from_secs_f64(i as f64 / args.rate) < end {
                    seen.unsent += 1;
                    i += conns;
                }
                break;
            }
            let recorded = slot >= record_from;
            if now < slot {
                thread::sleep(slot - now);
                (Instant::now(), recorded)
            } else {
                if recorded {
                    seen.late += 1;
                }
                (slot, recorded)
            }
        } else {
            let now = Instant::now();
            if now >= end {
                break;
            }
            (now, now >= record_from)
        };
        let bytes = &requests[i % requests.len()];
        i += conns;
        let outcome = (|| -> io::Result<(u16, bool)> {
            if stream.is_none() {
                stream = Some(connect(addr)?);
                seen.reconnects += 1;
            }
            let s = stream
                .as_mut()
                .ok_or_else(|| io::Error::other("no connection"))?;
            s.write_all(bytes)?;
            read_response(s, &mut buf)
        })();
        let done = Instant::now();
        match outcome {
            Ok((status, close)) => {
                if close {
                    stream = None;
                }
                if recorded {
                    seen.status(status, 1);
                    let us = done.duration_since(started).as_micros();
                    seen.latencies_us
                        .push(u32::try_from(us).unwrap_or(u32::MAX));
                }
            }
            Err(_) => {
                stream = None;
                if recorded {
                    seen.errors += 1;
                }
            }
        }
    }
    seen
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("keygate-bench-load: {e}");
            return ExitCode::from(2);
        }
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], args.port));
    let requests: Arc<Vec<Vec<u8>>> = Arc::new(
        args.targets
            .iter()
            .map(|t| request_bytes(args.port, t))
            .collect(),
    );
    // Start a little ahead so every thread is up before the first slot.
    let t0 = Instant::now() + Duration::from_millis(50);
    let handles: Vec<_> = (0..args.connections)
        .map(|c| {
            let (requests, args) = (Arc::clone(&requests), Arc::clone(&args));
            thread::spawn(move || run_connection(c, addr, requests, args, t0))
        })
        .collect();
    let mut all = Seen::default();
    for h in handles {
        match h.join() {
            Ok(s) => {
                all.latencies_us.extend(s.latencies_us);
                for (code, n) in s.statuses {
                    all.status(code, n);
                }
                all.errors += s.errors;
                all.late += s.late;
                all.unsent += s.unsent;
                all.reconnects += s.reconnects;
            }
            Err(_) => {
                eprintln!("keygate-bench-load: a connection thread failed");
                return ExitCode::FAILURE;
            }
        }
    }
    let lat = &mut all.latencies_us;
    lat.sort_unstable();
    let n = lat.len();
    let mean = if n == 0 {
        0.0
    } else {
        lat.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64
    };
    all.statuses.sort_unstable();
    let statuses: Vec<String> = all
        .statuses
        .iter()
        .map(|(c, k)| format!("\"{c}\":{k}"))
        .collect();
    println!(
        "{{\"requests\":{n},\"seconds\":{},\"rate\":{},\"rps\":{:.1},\"connections\":{},\
\"targets\":{},\"status\":{{{}}},\"errors\":{},\"late\":{},\"unsent\":{},\"connects\":{},\
\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{},\"mean_us\":{:.1}}}",
        args.seconds,
        args.rate,
        n as f64 / args.seconds,
        args.connections,
        args.targets.len(),
        statuses.join(","),
        all.errors,
        all.late,
        all.unsent,
        all.reconnects,
        percentile(lat, 50.0),
        percentile(lat, 90.0),
        percentile(lat, 99.0),
        percentile(lat, 99.9),
        lat.last().copied().unwrap_or(0),
        mean,
    );
    ExitCode::SUCCESS
}
