//! Serving connections, hardened: the accept loop and each HTTP/1.1
//! connection, with hyper underneath.
//!
//! - A request head must arrive within `header_timeout` of the connection's
//!   start or of its first byte; an idle keep-alive connection is closed
//!   after `idle_timeout`. (hyper's own header timer also runs while a
//!   connection is idle, so it would cut idle connections at the head
//!   timeout; these two are kept apart here, as nginx does.)
//! - Heads over `MAX_HEAD_BYTES` are answered 431 by hyper.
//! - A request with both `Content-Length` and `Transfer-Encoding` is
//!   answered 400 and its connection closed: hyper would take the chunked
//!   body and drop the length, which a proxy in front may have read the
//!   other way (request smuggling). hyper removes one of the two headers
//!   before the request is seen, so the head is scanned as it is read.
//! - At most `max_connections` connections are open; past it the accept
//!   loop waits (new clients wait in the kernel's backlog) and the ones
//!   being served are not touched.
//! - On shutdown: stop accepting, let hyper close idle connections and
//!   finish the requests in flight, for at most the grace period.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use http::{Request, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Largest request head (request line and headers) accepted; larger is 431.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Limits of the connections, from the environment (`HEADER_TIMEOUT`,
/// `IDLE_TIMEOUT`, `MAX_CONNECTIONS`).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionSettings {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes; then stops
/// accepting, lets in-flight requests finish for at most `grace`, and
/// returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: ConnectionSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> io::Result<()> {
    let (stop_sender, stop) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(settings.max_connections.max(1)));
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // A free slot first: at the cap, new clients wait in the backlog.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        // Reap finished connections so the set holds only live ones.
        while connections.try_join_next().is_some() {}
        match accepted {
            Ok((stream, peer)) => {
                let router = router.clone();
                let stop = stop.clone();
                connections.spawn(async move {
                    serve_connection(stream, peer, router, settings, stop).await;
                    drop(slot);
                });
            }
            Err(error) => {
                // Out of file descriptors or a connection reset before it
                // was accepted: never fatal. Wait a little when the process
                // is out of descriptors, so the loop does not spin.
                drop(slot);
                if is_resource_exhausted(&error) {
                    tracing::warn!(event_type = "accept", error = %error, "Cannot accept a connection now");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    drop(listener);
    tracing::info!(
        event_type = "shutdown",
        grace_ms = grace.as_millis() as u64,
        "Shutting down: finishing in-flight requests"
    );
    let _ = stop_sender.send(true);
    let drained = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            event_type = "shutdown",
            "Grace period over: dropping the requests still running"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
    Ok(())
}

fn is_resource_exhausted(error: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM
    matches!(error.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// One connection: hyper's HTTP/1.1 with the head and idle timers of this
/// module watching it.
async fn serve_connection(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    router: Router,
    settings: ConnectionSettings,
    mut stop: watch::Receiver<bool>,
) {
    // Replies are written whole; no reason to wait for an ACK before
    // sending the next small write.
    let _ = stream.set_nodelay(true);
    let watch = Arc::new(ConnectionWatch::new());
    let io = TokioIo::new(WatchedIo {
        inner: stream,
        watch: watch.clone(),
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // The head timer of this module replaces hyper's (see above).
        .header_read_timeout(None)
        .max_buf_size(MAX_HEAD_BYTES);
    let service = ConnectionService {
        router,
        watch: watch.clone(),
        peer,
    };
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut stopping = *stop.borrow();
    if stopping {
        connection.as_mut().graceful_shutdown();
    }
    // One timer for the connection, moved to each new deadline.
    let timer = tokio::time::sleep_until(Instant::now() + settings.idle_timeout);
    tokio::pin!(timer);
    loop {
        let deadline = watch.deadline(&settings);
        if let Some(deadline) = deadline {
            timer.as_mut().reset(deadline);
        }
        tokio::select! {
            _ = connection.as_mut() => return,
            () = &mut timer, if deadline.is_some() => {
                if watch.deadline(&settings).is_some_and(|deadline| deadline <= Instant::now()) {
                    // Dropping the connection closes the socket.
                    return;
                }
            }
            // The deadline moved: take the new one.
            () = watch.changed.notified() => {}
            changed = stop.changed(), if !stopping => {
                if changed.is_err() || *stop.borrow() {
                    stopping = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// What the timers of one connection need to know, shared by its IO (bytes
/// read) and its service (requests begun and ended).
struct ConnectionWatch {
    state: Mutex<WatchState>,
    /// Requests inside the router now (at most one without pipelining).
    busy: AtomicU32,
    /// The head being read carries both `Content-Length` and
    /// `Transfer-Encoding`.
    conflicting_lengths: AtomicBool,
    /// Woken when the deadline moves: a request begins or ends, a head
    /// starts. (A stored permit: a change while the task is busy is not
    /// lost.)
    changed: tokio::sync::Notify,
}

struct WatchState {
    /// Since when the connection has been waiting for a request: its start,
    /// or the end of its last request.
    waiting_since: Instant,
    /// Whether any request has been served (a new connection waits for its
    /// first head under the head timeout; an idle one under the idle
    /// timeout).
    served: bool,
    /// When the first byte of the next head arrived.
    head_started: Option<Instant>,
    scanner: HeadScanner,
}

impl ConnectionWatch {
    fn new() -> ConnectionWatch {
        ConnectionWatch {
            state: Mutex::new(WatchState {
                waiting_since: Instant::now(),
                served: false,
                head_started: None,
                scanner: HeadScanner::default(),
            }),
            busy: AtomicU32::new(0),
            conflicting_lengths: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// When the connection is to be closed unless something happens; `None`
    /// while a request runs (the handler bounds its own time).
    fn deadline(&self, settings: &ConnectionSettings) -> Option<Instant> {
        if self.busy.load(Ordering::Acquire) > 0 {
            return None;
        }
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        Some(match state.head_started {
            Some(started) => started + settings.header_timeout,
            None if state.served => state.waiting_since + settings.idle_timeout,
            None => state.waiting_since + settings.header_timeout,
        })
    }

    fn bytes_read(&self, bytes: &[u8]) {
        if bytes.is_empty() || self.busy.load(Ordering::Acquire) > 0 {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.head_started.is_none() {
            state.head_started = Some(Instant::now());
            self.changed.notify_one();
        }
        if state.scanner.feed(bytes) {
            self.conflicting_lengths.store(true, Ordering::Release);
        }
    }

    /// A request reached the service: whether its head had both lengths.
    fn begin(&self) -> bool {
        self.busy.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_one();
        self.conflicting_lengths.swap(false, Ordering::AcqRel)
    }

    fn end(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.waiting_since = Instant::now();
        state.served = true;
        state.head_started = None;
        state.scanner.reset();
        drop(state);
        self.busy.fetch_sub(1, Ordering::AcqRel);
        self.changed.notify_one();
    }
}

/// Finds `Content-Length` and `Transfer-Encoding` among the header lines of
/// one head, as its bytes arrive; stops at the blank line that ends it.
#[derive(Default)]
struct HeadScanner {
    /// The current line, up to `NAME_PREFIX` bytes.
    line: Vec<u8>,
    content_length: bool,
    transfer_encoding: bool,
    /// Lines with content so far: blank lines before the request line
    /// (which parsers skip) do not end the head.
    lines: usize,
    done: bool,
    seen: usize,
}

impl HeadScanner {
    /// Room for the longest name looked for, its colon and some blanks.
    const NAME_PREFIX: usize = 32;

    /// Feeds bytes; true once the head holds both headers.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        let mut rest = bytes;
        while !self.done && !rest.is_empty() {
            if self.seen >= MAX_HEAD_BYTES {
                self.done = true;
                break;
            }
            let room = (MAX_HEAD_BYTES - self.seen).min(rest.len());
            if self.line.is_empty()
                && let Some(end) = memchr::memchr(b'\n', &rest[..room])
            {
                // A whole line from its start, as most arrive: read where it
                // lies instead of byte by byte.
                let (line, after) = rest.split_at(end);
                self.whole_line(line);
                self.seen += end + 1;
                rest = after.get(1..).unwrap_or_default();
                continue;
            }
            if self.line.len() >= Self::NAME_PREFIX {
                // Past the name (or a long request line): skip to the end
                // of the line at once, within what the head may still hold.
                match memchr::memchr(b'\n', &rest[..room]) {
                    // The line ends: its `\n` is read below.
                    Some(end) => {
                        self.seen += end;
                        rest = &rest[end..];
                    }
                    None => {
                        self.seen += room;
                        rest = &rest[room..];
                        continue;
                    }
                }
            }
            let byte = rest[0];
            rest = &rest[1..];
            self.seen += 1;
            match byte {
                b'\n' => {
                    self.end_line(self.line.is_empty());
                    self.line.clear();
                }
                b'\r' => {}
                _ => {
                    if self.line.len() < Self::NAME_PREFIX {
                        if byte == b':' {
                            self.note_name();
                            // Past the name: the rest of the line is its value.
                            self.line.resize(Self::NAME_PREFIX, b' ');
                        } else {
                            self.line.push(byte.to_ascii_lowercase());
                        }
                    }
                }
            }
        }
        self.content_length && self.transfer_encoding
    }

    /// One whole line (without its `\n`), read as `feed` reads one byte by
    /// byte: `\r` counts for nothing, and the name is what comes before
    /// the first `:` among the line's first `NAME_PREFIX` other bytes.
    fn whole_line(&mut self, line: &[u8]) {
        self.end_line(line.iter().all(|&byte| byte == b'\r'));
        for &byte in line {
            if byte == b'\r' {
                continue;
            }
            if self.line.len() == Self::NAME_PREFIX {
                break;
            }
            if byte == b':' {
                self.note_name();
                break;
            }
            self.line.push(byte.to_ascii_lowercase());
        }
        self.line.clear();
    }

    /// A line ended: one with content counts; a blank one after the
    /// request line ends the head.
    fn end_line(&mut self, blank: bool) {
        if !blank {
            self.lines += 1;
        } else if self.lines > 0 {
            self.done = true;
        }
    }

    /// The current line holds a header's name (lower-cased, before its `:`).
    fn note_name(&mut self) {
        match self.line.trim_ascii() {
            b"content-length" => self.content_length = true,
            b"transfer-encoding" => self.transfer_encoding = true,
            _ => {}
        }
    }

    /// Ready for the next head, keeping the line's buffer.
    fn reset(&mut self) {
        let mut line = std::mem::take(&mut self.line);
        line.clear();
        *self = HeadScanner {
            line,
            ..HeadScanner::default()
        };
    }
}

/// The socket, telling the watch what it reads.
struct WatchedIo {
    inner: TcpStream,
    watch: Arc<ConnectionWatch>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.watch.bytes_read(&buf.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The router as hyper's service for one connection.
struct ConnectionService {
    router: Router,
    watch: Arc<ConnectionWatch>,
    /// The client's address, handed to the console (`ConnectInfo`), which
    /// opens to anonymous callers on loopback only; other routes do not
    /// pay for the extension.
    peer: std::net::SocketAddr,
}

/// Ends the request for the watch when the response is ready or the request
/// is dropped.
struct RequestGuard(Arc<ConnectionWatch>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.end();
    }
}

impl hyper::service::Service<Request<Incoming>> for ConnectionService {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let conflicting = self.watch.begin();
        let guard = RequestGuard(self.watch.clone());
        if conflicting {
            drop(guard);
            return Box::pin(std::future::ready(Ok(conflicting_lengths())));
        }
        let mut router = self.router.clone();
        let mut request = request.map(Body::new);
        if super::console::is_console_path(request.uri().path()) {
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(self.peer));
        }
        Box::pin(async move {
            let response = tower_service::Service::call(&mut router, request).await;
            drop(guard);
            response
        })
    }
}

/// 400 for a head with both `Content-Length` and `Transfer-Encoding`; the
/// connection is closed after it.
fn conflicting_lengths() -> Response {
    super::ApiError {
        close_connection: true,
        ..super::ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "a request may not carry both `Content-Length` and `Transfer-Encoding`",
        )
    }
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(head: &[u8]) -> bool {
        HeadScanner::default().feed(head)
    }

    /// Both lengths are found however the head is cut in two reads.
    fn assert_flagged_in_any_split(head: &[u8]) {
        for split in 1..head.len() {
            let mut scanner = HeadScanner::default();
            let first = scanner.feed(&head[..split]);
            let second = scanner.feed(&head[split..]);
            assert!(first || second, "split at {split}");
        }
    }

    #[test]
    fn both_lengths_are_found_in_any_case_and_any_split() {
        let head = b"POST /orchestrate HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTRANSFER-encoding : chunked\r\n\r\n";
        assert!(scan(head));
        assert_flagged_in_any_split(head);
    }

    #[test]
    fn one_length_or_names_in_values_or_bodies_are_not_flagged() {
        assert!(!scan(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"));
        assert!(!scan(
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(!scan(
            b"POST / HTTP/1.1\r\nX-Note: transfer-encoding: chunked\r\nContent-Length: 5\r\n\r\n"
        ));
        assert!(!scan(
            b"POST / HTTP/1.1\r\nContent-Length: 40\r\n\r\ntransfer-encoding: chunked\r\n\r\n"
        ));
    }

    #[test]
    fn long_lines_are_skipped_to_their_end_in_any_split() {
        let value = "v".repeat(300);
        let head = format!(
            "POST /orchestrate/a/very/long/path/{value} HTTP/1.1\r\nX-Long: {value}\r\nContent-Length: 5\r\nX-Other-Quite-Long-Header-Name-Here: {value}\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        let head = head.as_bytes();
        assert!(scan(head));
        assert_flagged_in_any_split(head);
    }

    #[test]
    fn a_header_past_the_largest_head_is_not_read() {
        let filler = "f".repeat(MAX_HEAD_BYTES);
        let head = format!(
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nX-Filler: {filler}\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        assert!(!scan(head.as_bytes()));
        let mut scanner = HeadScanner::default();
        for byte in head.as_bytes().chunks(7) {
            assert!(!scanner.feed(byte));
        }
        assert!(scanner.done);
    }

    /// Whole lines read at once find what byte-by-byte reading finds.
    #[test]
    fn whole_lines_read_as_single_bytes_do() {
        let heads: [&[u8]; 9] = [
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-\rLength: 5\r\nTransfer-Encoding\r: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\n  content-length  : 5\r\n\ttransfer-encoding\t: x\r\n\r\n",
            b"\r\n\r\r\nPOST / HTTP/1.1\nContent-Length: 5\nTransfer-Encoding: chunked\n\n",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nX-Padding-Padding-Padding-Pad: 1\r\nContent-Length: 5\r\nX-Padding-Padding-Padding-Padd:transfer-encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\n                 content-length: 5\r\n               transfer-encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        ];
        for head in heads {
            let whole = scan(head);
            let mut scanner = HeadScanner::default();
            let mut bytewise = false;
            for byte in head {
                bytewise |= scanner.feed(std::slice::from_ref(byte));
            }
            assert_eq!(whole, bytewise, "{}", String::from_utf8_lossy(head));
        }
        assert!(scan(heads[1]) && scan(heads[2]) && scan(heads[3]));
        assert!(!scan(heads[4]) && !scan(heads[5]) && !scan(heads[6]) && !scan(heads[7]));
        // A name ends within the line's first `NAME_PREFIX` bytes or is none.
        let mut scanner = HeadScanner::default();
        scanner.feed(heads[6]);
        assert!(scanner.content_length && !scanner.transfer_encoding);
    }

    #[test]
    fn a_reset_scanner_reads_the_next_head_afresh() {
        let mut scanner = HeadScanner::default();
        assert!(!scanner.feed(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"));
        assert!(scanner.done);
        scanner.reset();
        assert!(!scanner.done && !scanner.content_length);
        assert!(!scanner.feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"));
    }

    #[test]
    fn blank_lines_before_the_request_line_do_not_end_the_head() {
        assert!(scan(
            b"\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
    }
}
