//! The HTTP server: tokio accepts and parses, Python threads run handlers.
//!
//! NOTE: tokio threads never run Python. Each request is handed over a
//! channel to the handler threads, which stay attached to the interpreter
//! and run queued requests back to back (2 ms budget) before they detach.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{
    AtomicBool,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use parking_lot::{Condvar, Mutex};
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use tokio::sync::{oneshot, watch};
use tokio_util::task::TaskTracker;

use super::access::AccessLog;
use super::forwarded::TrustedProxies;
use super::http_runtime;
use super::metrics::{HttpMetrics, RouteReading};
use super::request::Request;
use super::response::{error_response, to_http, HttpResponse, Streams};
use super::router::{Match, Router};
use super::routes::Routes;
use super::stream::{StreamBody, StreamSink};
use crate::clock::due_after;
use crate::interpreter::{
    close_event_loop, is_awaitable, lazy_event_loop, AsyncOutcome, ParkOnForcedUnwind,
};

const BATCH_BUDGET: Duration = Duration::from_millis(2);

type ReplySlot = Arc<Mutex<Option<oneshot::Sender<HttpResponse>>>>;

/// Where the exception of a handler answered 500 is left for `exchange`
/// (in-memory connections only), so the test client can raise it.
type FailureSlot = Arc<Mutex<Option<Py<PyAny>>>>;

struct Job {
    handler: usize,
    params: Vec<(String, String)>,
    parts: http::request::Parts,
    body: Bytes,
    peer: Option<SocketAddr>,
    reply: ReplySlot,
    failed: Option<FailureSlot>,
}

impl Job {
    fn reply_slot(&self) -> ReplySlot {
        self.reply.clone()
    }
}

enum Msg {
    Job(Box<Job>),
    Stop,
}

struct Shared {
    router: Router,
    handlers: Vec<Py<PyAny>>,
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
    max_body: usize,
    /// Open connections served at once; more get 503 and are closed.
    max_connections: usize,
    body_timeout: Duration,
    aio: Mutex<Option<Py<PyAny>>>,
    aio_closed: AtomicBool,
    /// Proxies whose `X-Forwarded-For` names the client.
    trusted: TrustedProxies,
    access: Option<AccessLog>,
    /// Request counts and latencies, when metrics are on.
    metrics: Option<HttpMetrics>,
    /// Raised when the server stops: streaming bodies end.
    stopping: watch::Sender<bool>,
}

impl Streams for Shared {
    fn channel(&self) -> (StreamSink, StreamBody) {
        super::stream::channel(self.stopping.subscribe())
    }

    fn start(&self, content: &Bound<'_, PyAny>, sink: Py<StreamSink>) -> PyResult<()> {
        let py = content.py();
        // A plain iterator runs on a thread of its own: no event loop needed.
        let aio = if content.hasattr("__aiter__")? {
            event_loop(py, self)?.into_bound(py)
        } else {
            py.None().into_bound(py)
        };
        http_runtime(py)?
            .start_stream
            .bind(py)
            .call1((content, sink, aio))?;
        Ok(())
    }
}

/// Connections made in this process (`Server.exchange`), for tests.
type MemoryConns = tokio::sync::mpsc::UnboundedReceiver<(tokio::io::DuplexStream, FailureSlot)>;

/// Who a connection is from: its address, and for an in-memory one, where a
/// handler's exception is left for the test client.
struct Peer {
    addr: Option<SocketAddr>,
    failed: Option<FailureSlot>,
}

/// The client address an in-memory connection reports: a local one.
const MEMORY_PEER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 50000);

/// The listening socket, as adopted and as served.
enum StdListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
    Memory(MemoryConns),
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
    Memory(tokio::sync::Mutex<MemoryConns>),
}

impl Listener {
    fn from_std(listener: StdListener) -> std::io::Result<Self> {
        Ok(match listener {
            StdListener::Tcp(l) => Self::Tcp(tokio::net::TcpListener::from_std(l)?),
            StdListener::Unix(l) => Self::Unix(tokio::net::UnixListener::from_std(l)?),
            StdListener::Memory(rx) => Self::Memory(tokio::sync::Mutex::new(rx)),
        })
    }

    /// The next connection; a Unix socket's peer has no address.
    async fn accept(&self) -> std::io::Result<(Conn, Option<SocketAddr>)> {
        match self {
            Self::Tcp(l) => {
                let (stream, peer) = l.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok((Conn::Tcp(stream), Some(peer)))
            }
            Self::Unix(l) => Ok((Conn::Unix(l.accept().await?.0), None)),
            Self::Memory(rx) => match rx.lock().await.recv().await {
                Some(conn) => Ok((Conn::Memory(conn), Some(MEMORY_PEER))),
                // The server is being dropped: nothing can connect any more.
                None => std::future::pending().await,
            },
        }
    }
}

enum Conn {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
    Memory((tokio::io::DuplexStream, FailureSlot)),
}

#[derive(Default)]
struct Flag {
    set: Mutex<bool>,
    cv: Condvar,
}

impl Flag {
    fn raise(&self) {
        *self.set.lock() = true;
        self.cv.notify_all();
    }

    fn wait(&self, until: Instant) -> bool {
        let mut set = self.set.lock();
        if !*set {
            self.cv.wait_until(&mut set, until);
        }
        *set
    }
}

struct Running {
    runtime: tokio::runtime::Runtime,
    shutdown: watch::Sender<Option<Duration>>,
    drained: Arc<Flag>,
    threads: Vec<JoinHandle<()>>,
}

/// The native server behind `Catzilla.listen`.
#[pyclass(frozen, module = "catzilla._catzilla")]
pub struct Server {
    shared: Arc<Shared>,
    handler_threads: usize,
    io_threads: usize,
    header_timeout: Duration,
    listener: Mutex<Option<StdListener>>,
    running: Mutex<Option<Running>>,
    /// Where `exchange` hands its connections, once serving in memory.
    memory:
        Mutex<Option<tokio::sync::mpsc::UnboundedSender<(tokio::io::DuplexStream, FailureSlot)>>>,
    stop_requested: Arc<Flag>,
    stopped: AtomicBool,
}

#[pymethods]
impl Server {
    #[new]
    #[pyo3(signature = (*, routes, max_body_size, handler_threads, io_threads, header_read_timeout, body_read_timeout, max_pending_requests, max_connections, access_log=false, forwarded_allow_ips=Vec::new(), metrics=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        routes: PyRef<'_, Routes>,
        max_body_size: usize,
        handler_threads: usize,
        io_threads: usize,
        header_read_timeout: f64,
        body_read_timeout: f64,
        max_pending_requests: usize,
        max_connections: usize,
        access_log: bool,
        forwarded_allow_ips: Vec<String>,
        metrics: bool,
    ) -> PyResult<Self> {
        let trusted = TrustedProxies::parse(&forwarded_allow_ips)
            .map_err(|e| PyValueError::new_err(format!("forwarded_allow_ips: {e}")))?;
        let access = if access_log {
            let sink = http_runtime(py)?.access.clone_ref(py);
            let log = AccessLog::start("catzilla-access", sink, super::access::CAPACITY).map_err(
                |e| PyRuntimeError::new_err(format!("cannot start the access log thread: {e}")),
            )?;
            Some(log)
        } else {
            None
        };
        let header_timeout = Duration::try_from_secs_f64(header_read_timeout).map_err(|_| {
            PyValueError::new_err("header_read_timeout must be a number of seconds >= 0")
        })?;
        let body_timeout = Duration::try_from_secs_f64(body_read_timeout)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                PyValueError::new_err("body_read_timeout must be a number of seconds > 0")
            })?;
        let (router, handlers) = routes.compiled(py);
        if max_connections > tokio::sync::Semaphore::MAX_PERMITS {
            return Err(PyValueError::new_err(format!(
                "max_connections must be from 1 to {}, got {max_connections}",
                tokio::sync::Semaphore::MAX_PERMITS
            )));
        }
        let (tx, rx) = crossbeam_channel::bounded(max_pending_requests);
        Ok(Self {
            shared: Arc::new(Shared {
                router,
                handlers,
                tx,
                rx,
                max_body: max_body_size,
                max_connections,
                body_timeout,
                aio: Mutex::new(None),
                aio_closed: AtomicBool::new(false),
                trusted,
                access,
                stopping: watch::channel(false).0,
                metrics: metrics.then(HttpMetrics::default),
            }),
            handler_threads,
            io_threads,
            header_timeout,
            listener: Mutex::new(None),
            running: Mutex::new(None),
            memory: Mutex::new(None),
            stop_requested: Arc::new(Flag::default()),
            stopped: AtomicBool::new(false),
        })
    }

    /// Serves on a listening socket (TCP or Unix) that the caller made and
    /// keeps: the server works on its own duplicate of `fd`.
    fn adopt(&self, fd: RawFd) -> PyResult<()> {
        let bad = |what: &str, e: std::io::Error| {
            PyOSError::new_err((e.raw_os_error().unwrap_or(0), format!("{what}: {e}")))
        };
        if fd < 0 {
            return Err(PyValueError::new_err(format!(
                "fd must be an open socket's descriptor, got {fd}"
            )));
        }
        // SAFETY: `fd` is open for the duration of this call (the caller holds
        // it); only a duplicate, owned here, outlives the call.
        let owned = unsafe { BorrowedFd::borrow_raw(fd) }
            .try_clone_to_owned()
            .map_err(|e| bad(&format!("cannot use descriptor {fd}"), e))?;
        let socket = socket2::Socket::from(owned);
        let listening = socket
            .is_listener()
            .map_err(|e| bad(&format!("descriptor {fd} is not a socket"), e))?;
        if !listening {
            return Err(PyValueError::new_err(format!(
                "descriptor {fd} is not a listening socket"
            )));
        }
        socket
            .set_nonblocking(true)
            .map_err(|e| bad("cannot configure the socket", e))?;
        let addr = socket
            .local_addr()
            .map_err(|e| bad("cannot read the bound address", e))?;
        let listener = if addr.is_unix() {
            StdListener::Unix(std::os::unix::net::UnixListener::from(
                std::os::fd::OwnedFd::from(socket),
            ))
        } else {
            StdListener::Tcp(socket.into())
        };
        *self.listener.lock() = Some(listener);
        Ok(())
    }

    /// Serves until `request_shutdown` is called, with the GIL released. Runs
    /// Python signal handlers every 50 ms; an exception from one propagates.
    fn serve(&self, py: Python<'_>) -> PyResult<()> {
        self.start(py)?;
        loop {
            let stop = &self.stop_requested;
            if py.detach(|| stop.wait(Instant::now() + Duration::from_millis(50))) {
                return Ok(());
            }
            py.check_signals()?;
        }
    }

    /// Starts serving connections made in this process only (`exchange`),
    /// without a socket; returns at once. `stop` ends it as usual.
    fn serve_in_memory(&self, py: Python<'_>) -> PyResult<()> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self.listener.lock() = Some(StdListener::Memory(rx));
        self.start(py)?;
        *self.memory.lock() = Some(tx);
        Ok(())
    }

    /// Sends one request over a new in-memory connection and waits, with the
    /// GIL released, up to `timeout` seconds for the whole response: returns
    /// (status, headers, body, the exception of a handler answered 500 or None). Raises `TimeoutError` when the response does
    /// not end in time (an endless stream, a stuck handler).
    #[pyo3(signature = (method, target, headers, body, timeout))]
    fn exchange<'py>(
        &self,
        py: Python<'py>,
        method: &str,
        target: &str,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        timeout: f64,
    ) -> PyResult<Exchanged<'py>> {
        let request = memory_request(method, target, &headers, body)?;
        let timeout = Duration::try_from_secs_f64(timeout)
            .map_err(|_| PyValueError::new_err("timeout must be a number of seconds >= 0"))?;
        let not_serving =
            || PyRuntimeError::new_err("the server is not serving in memory (or has stopped)");
        let tx = self.memory.lock().clone().ok_or_else(not_serving)?;
        let handle = self
            .running
            .lock()
            .as_ref()
            .map(|r| r.runtime.handle().clone())
            .ok_or_else(not_serving)?;
        let failed = FailureSlot::default();
        let slot = failed.clone();
        let answer = py.detach(move || {
            handle.block_on(async move {
                tokio::time::timeout(timeout, memory_exchange(tx, slot, request)).await
            })
        });
        let failed = failed.lock().take();
        let (parts, bytes) = match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(message)) => return Err(PyRuntimeError::new_err(message)),
            Err(_) => {
                return Err(pyo3::exceptions::PyTimeoutError::new_err(format!(
                    "{method} {target}: the response did not end within {timeout:?}"
                )))
            }
        };
        let headers = parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        Ok((
            parts.status.as_u16(),
            headers,
            pyo3::types::PyBytes::new(py, &bytes),
            failed,
        ))
    }

    /// Request counts by route template, method and status, with latency
    /// buckets cumulative at `HTTP_BUCKETS`; empty unless metrics are on.
    fn http_metrics(&self) -> Vec<RouteReading> {
        let router = &self.shared.router;
        self.shared
            .metrics
            .as_ref()
            .map(|m| m.read(|h| router.template(h)))
            .unwrap_or_default()
    }

    /// Asks `serve` to return; safe from signal handlers and any thread.
    fn request_shutdown(&self) {
        self.stop_requested.raise();
    }

    /// Stops accepting, lets in-flight requests finish for up to `grace`
    /// seconds, then stops the handler threads. Returns whether every
    /// connection finished in time.
    fn stop(&self, py: Python<'_>, grace: f64) -> PyResult<bool> {
        self.stop_requested.raise();
        self.memory.lock().take();
        if self.stopped.swap(true, SeqCst) {
            return Ok(true);
        }
        let grace =
            Duration::try_from_secs_f64(grace.max(0.0)).unwrap_or(Duration::from_secs(3600));
        let Some(running) = self.running.lock().take() else {
            return Ok(true);
        };
        let _ = running.shutdown.send(Some(grace));
        let drained = running.drained.clone();
        let until = due_after(Instant::now(), grace + Duration::from_secs(1));
        let clean = py.detach(|| drained.wait(until));
        let threads = running.threads;
        let runtime = running.runtime;
        let deadline = due_after(Instant::now(), grace.max(Duration::from_secs(1)));
        let tx = self.shared.tx.clone();
        py.detach(move || {
            for _ in &threads {
                let _ = tx.send_deadline(Msg::Stop, deadline);
            }
            // NOTE: a handler stuck in Python must not hang shutdown: threads
            // that have not finished by the deadline are left to the process.
            while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            for t in threads.into_iter().filter(|t| t.is_finished()) {
                let _ = t.join();
            }
            runtime.shutdown_timeout(Duration::from_secs(1));
        });
        if let Some(access) = &self.shared.access {
            py.detach(|| access.close(Duration::from_secs(2)));
        }
        let aio = close_event_loop(&self.shared.aio, &self.shared.aio_closed);
        if let Some(aio) = aio {
            aio.bind(py).call_method1("stop", (1.0,))?;
        }
        Ok(clean)
    }
}

impl Server {
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        let listener = self.listener.lock().take().ok_or_else(|| {
            PyRuntimeError::new_err("the server is not bound (call bind first) or already served")
        })?;
        http_runtime(py)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.io_threads)
            .thread_name("catzilla-io")
            .enable_all()
            .build()
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start the I/O runtime: {e}")))?;
        let mut threads = Vec::with_capacity(self.handler_threads);
        for i in 0..self.handler_threads {
            let shared = self.shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("catzilla-http-{i}"))
                .spawn(move || handler_thread(&shared))
                .map_err(|e| {
                    PyRuntimeError::new_err(format!("cannot start a handler thread: {e}"))
                })?;
            threads.push(t);
        }
        let (shutdown, shutdown_rx) = watch::channel(None);
        let drained = Arc::new(Flag::default());
        let shared = self.shared.clone();
        let header_timeout = self.header_timeout;
        let done = drained.clone();
        let accept = runtime.block_on(async move { Listener::from_std(listener) });
        let listener =
            accept.map_err(|e| PyOSError::new_err(format!("cannot register the socket: {e}")))?;
        runtime.spawn(async move {
            accept_loop(listener, shared, header_timeout, shutdown_rx).await;
            done.raise();
        });
        *self.running.lock() = Some(Running {
            runtime,
            shutdown,
            drained,
            threads,
        });
        Ok(())
    }
}

/// What `exchange` returns: status, headers, body, and the exception of a
/// handler the server answered 500 for.
type Exchanged<'py> = (
    u16,
    Vec<(String, String)>,
    Bound<'py, pyo3::types::PyBytes>,
    Option<Py<PyAny>>,
);

/// A request for `exchange`, checked before anything is sent.
fn memory_request(
    method: &str,
    target: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> PyResult<http::Request<http_body_util::Full<Bytes>>> {
    let bad = |what: &str, e: &dyn std::fmt::Display| PyValueError::new_err(format!("{what}: {e}"));
    let method = http::Method::from_bytes(method.as_bytes()).map_err(|e| bad("method", &e))?;
    let uri: http::Uri = target.parse().map_err(|e| bad("target", &e))?;
    let mut request = http::Request::new(http_body_util::Full::new(Bytes::from(body)));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    for (name, value) in headers {
        let name =
            http::HeaderName::from_bytes(name.as_bytes()).map_err(|e| bad("header name", &e))?;
        let value = http::HeaderValue::from_str(value).map_err(|e| bad("header value", &e))?;
        request.headers_mut().append(name, value);
    }
    Ok(request)
}

/// One request over a fresh in-memory connection, read to its end.
async fn memory_exchange(
    tx: tokio::sync::mpsc::UnboundedSender<(tokio::io::DuplexStream, FailureSlot)>,
    failed: FailureSlot,
    request: http::Request<http_body_util::Full<Bytes>>,
) -> Result<(http::response::Parts, Bytes), String> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    tx.send((server, failed))
        .map_err(|_| "the server has stopped".to_owned())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let driver = tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("the connection failed: {e}"))?;
    let (parts, body) = response.into_parts();
    let bytes = body
        .collect()
        .await
        .map_err(|e| format!("the response body failed: {e}"))?
        .to_bytes();
    drop(sender);
    driver.abort();
    Ok((parts, bytes))
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(running) = self.running.lock().take() {
            let _ = running.shutdown.send(Some(Duration::ZERO));
            for _ in &running.threads {
                let _ = self.shared.tx.try_send(Msg::Stop);
            }
            running.runtime.shutdown_background();
        }
    }
}

async fn accept_loop(
    listener: Listener,
    shared: Arc<Shared>,
    header_timeout: Duration,
    mut shutdown: watch::Receiver<Option<Duration>>,
) {
    let (stop, stopping) = watch::channel(false);
    let conns = Conns {
        tracker: TaskTracker::new(),
        stop: stopping,
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .keep_alive(true)
        .max_buf_size(64 * 1024);
    if !header_timeout.is_zero() {
        http.header_read_timeout(header_timeout);
    }
    // Connections beyond the cap get one 503 and are closed.
    let open = Arc::new(tokio::sync::Semaphore::new(shared.max_connections));
    let mut over_cap = http.clone();
    over_cap.keep_alive(false);
    let grace = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (conn, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(_) => {
                        // NOTE: out of descriptors or a reset handshake; back off
                        // briefly instead of spinning on the error.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                };
                match conn {
                    Conn::Tcp(stream) => serve_connection(stream, Peer { addr: peer, failed: None }, &shared, &open, &http, &over_cap, &conns),
                    Conn::Unix(stream) => serve_connection(stream, Peer { addr: peer, failed: None }, &shared, &open, &http, &over_cap, &conns),
                    Conn::Memory((stream, failed)) => serve_connection(stream, Peer { addr: peer, failed: Some(failed) }, &shared, &open, &http, &over_cap, &conns),
                }
            }
            changed = shutdown.changed() => {
                let grace = if changed.is_ok() { *shutdown.borrow() } else { Some(Duration::ZERO) };
                break grace.unwrap_or(Duration::ZERO);
            }
        }
    };
    drop(listener);
    let _ = stop.send(true);
    shared.stopping.send_replace(true);
    conns.tracker.close();
    let _ = tokio::time::timeout(grace, conns.tracker.wait()).await;
}

/// The open connections, and the signal that tells them the server stops.
struct Conns {
    tracker: TaskTracker,
    stop: watch::Receiver<bool>,
}

/// How long a connection accepted just before a stop may take to send its
/// first request, which is then answered (with `connection: close`).
/// NOTE: hyper closes an HTTP/1 connection that has not sent a request as
/// soon as it is told to shut down, so a client whose connect raced the
/// stop (a rolling restart) would lose its request.
const FIRST_REQUEST_GRACE: Duration = Duration::from_millis(500);

/// Whether a connection has sent a request yet, and a wake-up when it does.
#[derive(Default)]
struct FirstRequest {
    seen: AtomicBool,
    arrived: tokio::sync::Notify,
}

impl FirstRequest {
    fn mark(&self) {
        if !self.seen.load(Relaxed) && !self.seen.swap(true, SeqCst) {
            self.arrived.notify_one();
        }
    }
}

/// Serves a connection until it ends; once the server stops, it finishes
/// the request in progress (or the first one, if it is about to arrive)
/// and closes.
async fn drive<C: GracefulConnection>(
    conn: C,
    first: Option<Arc<FirstRequest>>,
    mut stop: watch::Receiver<bool>,
) {
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stop.wait_for(|s| *s) => {}
    }
    if let Some(first) = first.filter(|f| !f.seen.load(SeqCst)) {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = first.arrived.notified() => {}
            _ = tokio::time::sleep(FIRST_REQUEST_GRACE) => {}
        }
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

type Http1 = hyper::server::conn::http1::Builder;

/// Serves one accepted connection, or answers 503 and closes it when
/// `max_connections` are open already.
fn serve_connection<S>(
    stream: S,
    from: Peer,
    shared: &Arc<Shared>,
    open: &Arc<tokio::sync::Semaphore>,
    http: &Http1,
    over_cap: &Http1,
    conns: &Conns,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Peer { addr: peer, failed } = from;
    let Ok(permit) = open.clone().try_acquire_owned() else {
        let busy =
            service_fn(|_req| async { Ok::<_, Infallible>(with_server(too_many_connections())) });
        let conn = over_cap.serve_connection(TokioIo::new(stream), busy);
        conns.tracker.spawn(drive(conn, None, conns.stop.clone()));
        return;
    };
    let shared = shared.clone();
    let first = Arc::new(FirstRequest::default());
    let seen = first.clone();
    let service = service_fn(move |req| {
        seen.mark();
        serve_one(shared.clone(), peer, failed.clone(), req)
    });
    let conn = http.serve_connection(TokioIo::new(stream), service);
    let stop = conns.stop.clone();
    conns.tracker.spawn(async move {
        drive(conn, Some(first), stop).await;
        drop(permit);
    });
}

const SERVER: http::HeaderValue = http::HeaderValue::from_static("catzilla");

fn with_server(mut resp: HttpResponse) -> HttpResponse {
    resp.headers_mut().insert(http::header::SERVER, SERVER);
    resp
}

/// One request: its client (behind trusted proxies), its response with the
/// `server` header, and its access log line when that log is on.
async fn serve_one(
    shared: Arc<Shared>,
    peer: Option<SocketAddr>,
    failed: Option<FailureSlot>,
    req: http::Request<Incoming>,
) -> Result<HttpResponse, Infallible> {
    let client = shared.trusted.client(peer, req.headers());
    let mut route = None;
    if shared.access.is_none() && shared.metrics.is_none() {
        return handle(shared.clone(), client, req, &mut route, failed)
            .await
            .map(with_server);
    }
    let started = Instant::now();
    let (method, version) = (req.method().clone(), req.version());
    // The target is read only by the access log.
    let uri = shared.access.as_ref().map(|_| req.uri().clone());
    let resp = with_server(handle(shared.clone(), client, req, &mut route, failed).await?);
    if let Some(metrics) = &shared.metrics {
        metrics.record(route, &method, resp.status().as_u16(), started.elapsed());
    }
    let (Some(access), Some(uri)) = (&shared.access, uri) else {
        return Ok(resp);
    };
    let bytes = hyper::body::Body::size_hint(resp.body()).exact();
    access.record(super::access::line(
        client,
        &method,
        &uri,
        version,
        resp.status().as_u16(),
        bytes,
        started.elapsed(),
    ));
    Ok(resp)
}

async fn handle(
    shared: Arc<Shared>,
    peer: Option<SocketAddr>,
    req: http::Request<Incoming>,
    route: &mut Option<usize>,
    failed: Option<FailureSlot>,
) -> Result<HttpResponse, Infallible> {
    let (parts, body) = req.into_parts();
    if let Some(coding) = super::request::unsupported_transfer_coding(&parts.headers) {
        // The body's framing is unknown: answer, and close the connection.
        let mut resp = error_response(
            501,
            "Not Implemented: only the chunked transfer coding is supported",
            &[("transfer_coding", &coding)],
        );
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        return Ok(resp);
    }
    let (handler, params) = match shared
        .router
        .lookup(parts.method.as_str(), parts.uri.path())
    {
        Match::Found { handler, params } => {
            *route = Some(handler);
            (handler, params)
        }
        Match::NotFound => {
            return Ok(error_response(
                404,
                "Not Found",
                &[("path", parts.uri.path())],
            ));
        }
        Match::MethodNotAllowed(allow) => {
            let mut resp = error_response(
                405,
                "Method Not Allowed",
                &[("method", parts.method.as_str())],
            );
            if let Ok(v) = http::HeaderValue::from_str(&allow.join(", ")) {
                resp.headers_mut().insert(http::header::ALLOW, v);
            }
            return Ok(resp);
        }
    };
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > shared.max_body) {
        return Ok(too_large(shared.max_body));
    }
    let reading = tokio::time::timeout(
        shared.body_timeout,
        Limited::new(body, shared.max_body).collect(),
    );
    let body = match reading.await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => {
            return Ok(too_large(shared.max_body))
        }
        Ok(Err(_)) => {
            return Ok(error_response(
                400,
                "Bad Request: the body could not be read",
                &[],
            ))
        }
        Err(_) => {
            let mut resp =
                error_response(408, "Request Timeout: the body did not arrive in time", &[]);
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
            return Ok(resp);
        }
    };
    let (reply, answer) = oneshot::channel();
    let job = Job {
        handler,
        params,
        parts,
        body,
        peer,
        reply: Arc::new(Mutex::new(Some(reply))),
        failed,
    };
    if shared.tx.try_send(Msg::Job(Box::new(job))).is_err() {
        // NOTE: every handler thread is busy and the backlog is full (or the
        // server is stopping): shed load instead of queueing without bound.
        let mut resp = error_response(503, "Service Unavailable: too many requests waiting", &[]);
        resp.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("1"),
        );
        return Ok(resp);
    }
    Ok(answer
        .await
        .unwrap_or_else(|_| error_response(500, "Internal Server Error", &[])))
}

fn too_many_connections() -> HttpResponse {
    let mut resp = error_response(503, "Service Unavailable: too many open connections", &[]);
    let headers = resp.headers_mut();
    headers.insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    );
    headers.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    resp
}

fn too_large(limit: usize) -> HttpResponse {
    error_response(
        413,
        "Payload Too Large",
        &[("limit_bytes", &limit.to_string())],
    )
}

fn handler_thread(shared: &Arc<Shared>) {
    Python::attach(|py| loop {
        let Ok(Msg::Job(first)) = py.detach(|| shared.rx.recv()) else {
            return;
        };
        let started = Instant::now();
        let mut job = first;
        loop {
            let guard = ParkOnForcedUnwind;
            let reply = job.reply_slot();
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_job(py, shared, *job)
            }));
            if let Err(panic) = ran {
                // A panic (ours, or one PyO3 re-raises from a handler) must not
                // take the thread down: answer 500 and log it.
                let message = crate::tasks::pool::panic_message(panic.as_ref());
                if let Some(reply) = reply.lock().take() {
                    let _ = reply.send(error_response(500, "Internal Server Error", &[]));
                }
                if let Ok(rt) = http_runtime(py) {
                    let _ = rt.report.bind(py).call1((
                        "error",
                        format!("a handler panicked: {message}"),
                        py.None(),
                    ));
                }
            }
            guard.disarm();
            if started.elapsed() >= BATCH_BUDGET {
                break;
            }
            match shared.rx.try_recv() {
                Ok(Msg::Job(next)) => job = next,
                Ok(Msg::Stop) => return,
                Err(_) => break,
            }
        }
    });
}

fn run_job(py: Python<'_>, shared: &Arc<Shared>, job: Job) {
    let Job {
        handler,
        params,
        parts,
        body,
        peer,
        reply,
        failed,
    } = job;
    let Some(reply) = reply.lock().take() else {
        return;
    };
    let method = parts.method.clone();
    let request = match Bound::new(py, Request::new(parts, body, params, peer)) {
        Ok(r) => r,
        Err(err) => {
            let _ = reply.send(failure(
                py,
                err,
                method.as_str(),
                "(unreadable request)",
                failed.as_ref(),
            ));
            return;
        }
    };
    // NOTE: method and path are read back from the request only on the error
    // and async paths, so a plain request allocates no copies of them.
    let req = request.get();
    let handler = shared.handlers[handler].bind(py);
    let response = match handler.call1((&request,)) {
        Ok(value)
            if !value.is_instance_of::<super::response::Response>() && is_awaitable(&value) =>
        {
            let (method, path) = (req.method_str().to_string(), req.path_str().to_string());
            match submit_async(py, shared, value, reply, method, path, failed.clone()) {
                Ok(()) => return,
                Err((err, reply)) => {
                    let _ = reply.send(failure(
                        py,
                        err,
                        req.method_str(),
                        req.path_str(),
                        failed.as_ref(),
                    ));
                    return;
                }
            }
        }
        Ok(value) => to_http(&value, shared.as_ref()).unwrap_or_else(|err| {
            failure(py, err, req.method_str(), req.path_str(), failed.as_ref())
        }),
        Err(err) => failure(py, err, req.method_str(), req.path_str(), failed.as_ref()),
    };
    let _ = reply.send(response);
}

type Reply = oneshot::Sender<HttpResponse>;

fn submit_async(
    py: Python<'_>,
    shared: &Arc<Shared>,
    awaitable: Bound<'_, PyAny>,
    reply: Reply,
    method: String,
    path: String,
    failed: Option<FailureSlot>,
) -> Result<(), (PyErr, Reply)> {
    let aio = match event_loop(py, shared) {
        Ok(aio) => aio,
        Err(err) => return Err((err, reply)),
    };
    let done = HttpAsyncDone {
        shared: shared.clone(),
        reply: Mutex::new(Some(reply)),
        method,
        path,
        failed,
    };
    let done = match Py::new(py, done) {
        Ok(d) => d,
        Err(err) => return Err((err, recover_reply(py, None))),
    };
    let args = PyTuple::new(
        py,
        [
            awaitable.into_any(),
            py.None().into_bound(py),
            done.clone_ref(py).into_bound(py).into_any(),
        ],
    );
    let submitted = args.and_then(|args| aio.bind(py).call_method1("submit", args).map(|_| ()));
    submitted.map_err(|err| (err, recover_reply(py, Some(&done))))
}

fn recover_reply(py: Python<'_>, done: Option<&Py<HttpAsyncDone>>) -> Reply {
    let taken = done.and_then(|d| d.bind(py).get().reply.lock().take());
    taken.unwrap_or_else(|| oneshot::channel().0)
}

fn event_loop(py: Python<'_>, shared: &Shared) -> PyResult<Py<PyAny>> {
    lazy_event_loop(
        py,
        &shared.aio,
        &shared.aio_closed,
        &http_runtime(py)?.event_loop,
    )
}

/// A 500 (logged with its traceback) or the status of an `HTTPError`.
/// The response for a handler's exception: an `HTTPError`'s own, else 500
/// with the exception logged (and left in `failed` for the test client).
fn failure(
    py: Python<'_>,
    err: PyErr,
    method: &str,
    path: &str,
    failed: Option<&FailureSlot>,
) -> HttpResponse {
    let Ok(rt) = http_runtime(py) else {
        return error_response(500, "Internal Server Error", &[]);
    };
    let exc = err.into_value(py).into_bound(py);
    if exc.is_instance(rt.http_error.bind(py)).unwrap_or(false) {
        let status = exc
            .getattr("status_code")
            .and_then(|s| s.extract::<u16>())
            .ok()
            .filter(|s| (100..=599).contains(s));
        let Some(status) = status else {
            let message =
                format!("{method} {path} raised an HTTPError with an invalid status_code");
            let _ = rt.report.bind(py).call1(("error", message, exc));
            return error_response(500, "Internal Server Error", &[]);
        };
        let detail = exc
            .getattr("detail")
            .and_then(|d| d.str().map(|s| s.to_string()))
            .unwrap_or_default();
        return error_response(status, &detail, &[]);
    }
    let message = format!("{method} {path} raised an exception");
    if let Some(slot) = failed {
        // NOTE: what it replaces is dropped after the lock (it may run Python).
        let before = slot.lock().replace(exc.clone().into_any().unbind());
        drop(before);
    }
    if let Err(e) = rt.report.bind(py).call1(("error", message, exc)) {
        e.print(py);
    }
    error_response(500, "Internal Server Error", &[])
}

/// Completion of an `async def` handler, called on the event loop thread.
#[pyclass(frozen, module = "catzilla._catzilla")]
pub struct HttpAsyncDone {
    shared: Arc<Shared>,
    reply: Mutex<Option<Reply>>,
    method: String,
    path: String,
    failed: Option<FailureSlot>,
}

#[pymethods]
impl HttpAsyncDone {
    fn __call__(&self, py: Python<'_>, kind: u8, value: Bound<'_, PyAny>) {
        let guard = ParkOnForcedUnwind;
        let Some(reply) = self.reply.lock().take() else {
            guard.disarm();
            return;
        };
        let response = match AsyncOutcome::from_code(kind) {
            AsyncOutcome::Ok => to_http(&value, self.shared.as_ref()).unwrap_or_else(|err| {
                failure(py, err, &self.method, &self.path, self.failed.as_ref())
            }),
            AsyncOutcome::Error => failure(
                py,
                PyErr::from_value(value),
                &self.method,
                &self.path,
                self.failed.as_ref(),
            ),
            AsyncOutcome::Timeout | AsyncOutcome::Cancelled => {
                error_response(503, "Service Unavailable: the server is shutting down", &[])
            }
        };
        let _ = reply.send(response);
        guard.disarm();
    }
}
