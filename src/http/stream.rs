//! Streaming response bodies. Python produces the chunks (an async iterator
//! on the server's event loop, a plain iterator on a thread of its own) and
//! hands them to a `StreamSink`; hyper takes them from the `StreamBody`.
//!
//! NOTE: the channel between them is bounded, which is the backpressure: a
//! producer that finds it full waits until the client has taken a chunk. The
//! body side runs on tokio threads, which never run Python: whatever Python
//! must hear from it (room to send again, the client left) goes through one
//! notifier thread that attaches to call it.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use crossbeam_channel::Sender;
use hyper::body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use tokio::sync::{mpsc, watch};

/// Chunks buffered between the producer and the connection.
pub const STREAM_BUFFER: usize = 16;

/// Returned by `StreamSink.send`.
pub const SENT: u8 = 0;
pub const FULL: u8 = 1;
pub const GONE: u8 = 2;

/// What the two sides share: callbacks Python left to be called, and
/// whether the client is gone.
#[derive(Default)]
struct Ctl {
    /// Called once the client has taken a chunk (there is room again).
    waiter: Mutex<Option<Py<PyAny>>>,
    /// Called once when the body is dropped before its end (client gone, or
    /// the server stopped).
    on_gone: Mutex<Option<Py<PyAny>>>,
    gone: AtomicBool,
    /// Set by the producer when it failed: the body ends with an error, so
    /// the client sees a cut stream, not a complete one.
    aborted: AtomicBool,
}

impl Ctl {
    fn wake_waiter(&self) {
        if let Some(cb) = self.waiter.lock().take() {
            notify(cb);
        }
    }
}

/// The producer's end, handed to Python.
#[pyclass(frozen, module = "catzilla._catzilla")]
pub struct StreamSink {
    tx: Mutex<Option<mpsc::Sender<Bytes>>>,
    ctl: Arc<Ctl>,
}

fn chunk_bytes(data: &Bound<'_, PyAny>) -> PyResult<Bytes> {
    if let Ok(b) = data.cast::<PyBytes>() {
        Ok(Bytes::copy_from_slice(b.as_bytes()))
    } else if let Ok(s) = data.cast::<PyString>() {
        Ok(Bytes::from(s.to_cow()?.into_owned()))
    } else {
        Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "a streamed chunk must be str or bytes, got {}",
            data.get_type().name()?
        )))
    }
}

#[pymethods]
impl StreamSink {
    /// Queues a chunk without waiting: `SENT`, `FULL` (wait with
    /// `wait_writable`) or `GONE` (the client left; stop producing).
    fn send(&self, data: &Bound<'_, PyAny>) -> PyResult<u8> {
        let chunk = chunk_bytes(data)?;
        if chunk.is_empty() {
            return Ok(SENT);
        }
        let Some(tx) = self.tx.lock().clone() else {
            return Ok(GONE);
        };
        Ok(match tx.try_send(chunk) {
            Ok(()) => SENT,
            Err(mpsc::error::TrySendError::Full(_)) => FULL,
            Err(mpsc::error::TrySendError::Closed(_)) => GONE,
        })
    }

    /// Queues a chunk, waiting (detached) while the buffer is full; false
    /// once the client is gone. For producers on threads of their own.
    fn send_blocking(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<bool> {
        let chunk = chunk_bytes(data)?;
        if chunk.is_empty() {
            return Ok(!self.ctl.gone.load(SeqCst));
        }
        let Some(tx) = self.tx.lock().clone() else {
            return Ok(false);
        };
        Ok(py.detach(move || tx.blocking_send(chunk).is_ok()))
    }

    /// Leaves `callback` to be called (from another thread) once there is
    /// room again. False, with nothing left, when there is room already or
    /// the client is gone: send again at once.
    fn wait_writable(&self, callback: Py<PyAny>) -> bool {
        *self.ctl.waiter.lock() = Some(callback);
        let room = self
            .tx
            .lock()
            .as_ref()
            .is_none_or(|tx| tx.capacity() > 0 || tx.is_closed());
        if room {
            // NOTE: the body may have taken the callback meanwhile (and will
            // call it); that only wakes the producer once more.
            let taken = self.ctl.waiter.lock().take();
            drop(taken);
            return false;
        }
        true
    }

    /// Leaves `callback` to be called (from another thread) if the client
    /// goes before the stream ends. False when it is gone already.
    fn on_disconnect(&self, callback: Py<PyAny>) -> bool {
        *self.ctl.on_gone.lock() = Some(callback);
        if self.ctl.gone.load(SeqCst) {
            let taken = self.ctl.on_gone.lock().take();
            drop(taken);
            return false;
        }
        true
    }

    /// Ends the stream after the chunks already queued.
    fn finish(&self) {
        let tx = self.tx.lock().take();
        drop(tx);
        let cb = self.ctl.on_gone.lock().take();
        drop(cb);
    }

    /// Ends the stream as failed: the connection is cut after the chunks
    /// already queued, so the client does not take it for complete.
    fn abort(&self) {
        self.ctl.aborted.store(true, SeqCst);
        self.finish();
    }

    /// Whether the client is gone.
    #[getter]
    fn disconnected(&self) -> bool {
        self.ctl.gone.load(SeqCst)
    }
}

/// The error a stream whose producer failed ends with.
#[derive(Debug)]
pub struct StreamAborted;

impl std::fmt::Display for StreamAborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the response stream's producer failed")
    }
}

impl std::error::Error for StreamAborted {}

type StopSignal = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The connection's end: chunks until the producer finishes, the server
/// stops, or the producer fails.
pub struct StreamBody {
    rx: mpsc::Receiver<Bytes>,
    ctl: Arc<Ctl>,
    stop: StopSignal,
    ended: bool,
    /// The producer failed and hyper was given one turn to write what it
    /// holds: the next poll ends the body with the error.
    flushed: bool,
}

/// A connected sink and body; `stopping` ends the body when the server stops.
pub fn channel(mut stopping: watch::Receiver<bool>) -> (StreamSink, StreamBody) {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let ctl = Arc::new(Ctl::default());
    let stop: StopSignal = Box::pin(async move {
        let _ = stopping.wait_for(|s| *s).await;
    });
    (
        StreamSink {
            tx: Mutex::new(Some(tx)),
            ctl: ctl.clone(),
        },
        StreamBody {
            rx,
            ctl,
            stop,
            ended: false,
            flushed: false,
        },
    )
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = StreamAborted;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamAborted>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if self.stop.as_mut().poll(cx).is_ready() {
            // The server stops: end the stream cleanly (an event stream's
            // client reconnects, to a server that is up).
            self.ended = true;
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(chunk)) => {
                self.ctl.wake_waiter();
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Poll::Ready(None) if self.ctl.aborted.load(SeqCst) && !self.flushed => {
                // NOTE: hyper drops a connection whose body fails without
                // writing what it still buffers (the head, earlier chunks):
                // one Pending first lets it flush them.
                self.flushed = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(None) => {
                self.ended = true;
                if self.ctl.aborted.load(SeqCst) {
                    Poll::Ready(Some(Err(StreamAborted)))
                } else {
                    Poll::Ready(None)
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for StreamBody {
    fn drop(&mut self) {
        self.ctl.gone.store(true, SeqCst);
        self.rx.close();
        if let Some(cb) = self.ctl.on_gone.lock().take() {
            notify(cb);
        }
        self.ctl.wake_waiter();
    }
}

/// Calls `callback()` on the notifier thread, attached. A callback that
/// raises is printed; nothing else depends on it.
fn notify(callback: Py<PyAny>) {
    static NOTIFIER: OnceLock<Option<Sender<Py<PyAny>>>> = OnceLock::new();
    let tx = NOTIFIER.get_or_init(|| {
        let (tx, rx) = crossbeam_channel::unbounded::<Py<PyAny>>();
        std::thread::Builder::new()
            .name("catzilla-notify".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    Python::attach(|py| {
                        let mut next = Some(first);
                        while let Some(cb) = next.take() {
                            if let Err(err) = cb.bind(py).call0() {
                                err.print(py);
                            }
                            drop(cb);
                            next = rx.try_recv().ok();
                        }
                    });
                }
            })
            .ok()
            .map(|_| tx)
    });
    if let Some(tx) = tx {
        // NOTE: a send fails only once the thread is gone (at exit); the
        // callback is then dropped, and pyo3 defers its release to the GIL.
        let _ = tx.send(callback);
    }
}

pub fn init_pymodule(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<StreamSink>()?;
    m.add("STREAM_SENT", SENT)?;
    m.add("STREAM_FULL", FULL)?;
    m.add("STREAM_GONE", GONE)?;
    Ok(())
}
