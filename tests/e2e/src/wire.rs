//! Buffered HTTP/1.1 framing shared by the client and the echo upstream: read a message head,
//! then a body framed by `Content-Length`, by chunked encoding, or by the end of the connection.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Most headers a message head may carry before parsing gives up (Envoy's own default is 100).
pub(crate) const MAX_HEADERS: usize = 512;

/// A header list as it appeared on the wire: names as sent, values as raw bytes.
pub(crate) type Headers = Vec<(String, Vec<u8>)>;

pub(crate) struct Wire {
    pub(crate) stream: TcpStream,
    buf: Vec<u8>,
    /// When set, read timeouts are retried until this flag turns true (used by the echo
    /// server so idle keep-alive connections notice shutdown); otherwise they are errors.
    stop: Option<Arc<AtomicBool>>,
}

impl Wire {
    pub(crate) fn new(stream: TcpStream, stop: Option<Arc<AtomicBool>>) -> Wire {
        Wire {
            stream,
            buf: Vec::new(),
            stop,
        }
    }

    pub(crate) fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Bytes received but not yet consumed.
    pub(crate) fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Reads more bytes into the buffer; `Ok(0)` at end of stream.
    pub(crate) fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    match &self.stop {
                        Some(stop) if !stop.load(Ordering::SeqCst) => continue,
                        _ => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Removes and returns the first `n` buffered bytes, reading more as needed.
    pub(crate) fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill()? == 0 {
                return Err(unexpected_eof("body shorter than its Content-Length"));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Removes and returns one CRLF-terminated line (without the CRLF).
    fn take_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.drain(..i).collect();
                self.buf.drain(..2);
                return Ok(line);
            }
            if self.fill()? == 0 {
                return Err(unexpected_eof("connection closed inside a chunked body"));
            }
        }
    }

    pub(crate) fn take_to_end(&mut self) -> io::Result<Vec<u8>> {
        while self.fill()? > 0 {}
        Ok(std::mem::take(&mut self.buf))
    }

    /// Decodes a chunked body (trailers are read and dropped).
    pub(crate) fn take_chunked(&mut self) -> io::Result<Vec<u8>> {
        self.take_chunked_with_trailers().map(|(body, _)| body)
    }

    /// Decodes a chunked body and its trailer fields (`name: value` lines, as sent).
    pub(crate) fn take_chunked_with_trailers(&mut self) -> io::Result<(Vec<u8>, Headers)> {
        let mut body = Vec::new();
        loop {
            let line = self.take_line()?;
            let size_text = String::from_utf8_lossy(&line);
            let size_hex = size_text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size line {size_text:?}"),
                )
            })?;
            if size == 0 {
                let mut trailers = Headers::new();
                loop {
                    let line = self.take_line()?;
                    if line.is_empty() {
                        return Ok((body, trailers));
                    }
                    let colon = line.iter().position(|&b| b == b':').unwrap_or(line.len());
                    let value = line.get(colon + 1..).unwrap_or_default();
                    trailers.push((
                        String::from_utf8_lossy(&line[..colon]).into_owned(),
                        value.trim_ascii().to_vec(),
                    ));
                }
            }
            body.extend(self.take(size)?);
            if !self.take_line()?.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "chunk not followed by CRLF",
                ));
            }
        }
    }

    /// Parses one message head with `parse` (which returns the head length once complete),
    /// reading more bytes until it is complete. `Ok(None)` if the peer closed the connection
    /// before sending anything.
    pub(crate) fn take_head<T>(
        &mut self,
        mut parse: impl FnMut(&[u8]) -> Result<Option<(usize, T)>, httparse::Error>,
    ) -> io::Result<Option<T>> {
        loop {
            if !self.buf.is_empty() {
                match parse(&self.buf) {
                    Ok(Some((len, head))) => {
                        self.buf.drain(..len);
                        return Ok(Some(head));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "unparsable HTTP head ({e}): {:?}",
                                String::from_utf8_lossy(&self.buf[..self.buf.len().min(400)])
                            ),
                        ))
                    }
                }
            }
            if self.fill()? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(unexpected_eof("connection closed inside a message head"));
            }
        }
    }
}

pub(crate) fn unexpected_eof(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, what.to_string())
}

/// First value of header `name` (ASCII case-insensitive).
pub(crate) fn find_header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// Every value of header `name`, in wire order.
pub(crate) fn find_all_headers<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Vec<&'a [u8]> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
        .collect()
}

/// The header accessors of a message with a `headers: Vec<(String, Vec<u8>)>` field (a
/// [`crate::Response`], a [`crate::CapturedRequest`]), as inherent methods.
macro_rules! header_accessors {
    () => {
        /// First value of header `name` (case-insensitive).
        pub fn header(&self, name: &str) -> Option<&[u8]> {
            $crate::wire::find_header(&self.headers, name)
        }

        /// First value of header `name` as UTF-8 text, if present and valid UTF-8.
        pub fn header_str(&self, name: &str) -> Option<&str> {
            self.header(name).and_then(|v| std::str::from_utf8(v).ok())
        }

        /// Every value of header `name`, in wire order.
        pub fn header_all(&self, name: &str) -> Vec<&[u8]> {
            $crate::wire::find_all_headers(&self.headers, name)
        }

        pub fn has_header(&self, name: &str) -> bool {
            self.header(name).is_some()
        }
    };
}
pub(crate) use header_accessors;

pub(crate) fn copy_headers(parsed: &[httparse::Header<'_>]) -> Headers {
    parsed
        .iter()
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect()
}

/// How a message body is delimited, from its headers.
pub(crate) enum Framing {
    Chunked,
    Length(usize),
    None,
}

pub(crate) fn framing(headers: &[(String, Vec<u8>)]) -> io::Result<Framing> {
    let chunked = find_all_headers(headers, "transfer-encoding")
        .iter()
        .any(|v| {
            String::from_utf8_lossy(v)
                .to_ascii_lowercase()
                .contains("chunked")
        });
    if chunked {
        return Ok(Framing::Chunked);
    }
    match find_header(headers, "content-length") {
        Some(v) => String::from_utf8_lossy(v)
            .trim()
            .parse()
            .map(Framing::Length)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad Content-Length")),
        None => Ok(Framing::None),
    }
}
