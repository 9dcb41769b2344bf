//! The access log: one line per request, written through Python `logging`
//! by a thread of its own, so I/O threads never wait for the interpreter.
//!
//! I/O threads format the line and hand it over a bounded channel. The log
//! thread waits detached, then attaches once per batch. If Python cannot
//! keep up, lines beyond the channel are counted, and the count is logged
//! with the next batch: the log says what it missed, never silently.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use pyo3::prelude::*;

use crate::interpreter::ParkOnForcedUnwind;

/// Lines waiting for the log thread; beyond this they are counted and dropped.
const CAPACITY: usize = 16 * 1024;
/// Lines logged per attach.
const BATCH: usize = 512;

enum Msg {
    Line(String),
    Stop,
}

pub struct AccessLog {
    tx: Sender<Msg>,
    dropped: Arc<AtomicU64>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl AccessLog {
    /// Starts the log thread; `sink(lines, dropped)` logs a batch.
    pub fn start(sink: Py<PyAny>) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded(CAPACITY);
        let dropped = Arc::new(AtomicU64::new(0));
        let counted = dropped.clone();
        let thread = std::thread::Builder::new()
            .name("catzilla-access".into())
            .spawn(move || run(&rx, &sink, &counted))?;
        Ok(Self {
            tx,
            dropped,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues one request's line; never waits.
    pub fn record(&self, line: String) {
        if self.tx.try_send(Msg::Line(line)).is_err() {
            self.dropped.fetch_add(1, Relaxed);
        }
    }

    /// Logs what is queued and stops the thread, waiting up to `timeout`.
    /// Call detached: the thread attaches to log.
    pub fn close(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let _ = self.tx.send_deadline(Msg::Stop, deadline);
        let Some(thread) = self.thread.lock().take() else {
            return;
        };
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if thread.is_finished() {
            let _ = thread.join();
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        // NOTE: never waits here (a drop may run attached); the thread ends
        // on the stop message or when the channel closes.
        let _ = self.tx.try_send(Msg::Stop);
    }
}

fn run(rx: &Receiver<Msg>, sink: &Py<PyAny>, dropped: &AtomicU64) {
    let mut lines = Vec::with_capacity(BATCH);
    loop {
        let mut stop = match rx.recv() {
            Ok(Msg::Line(line)) => {
                lines.push(line);
                false
            }
            Ok(Msg::Stop) | Err(_) => true,
        };
        while !stop && lines.len() < BATCH {
            match rx.try_recv() {
                Ok(Msg::Line(line)) => lines.push(line),
                Ok(Msg::Stop) => stop = true,
                Err(_) => break,
            }
        }
        let missed = dropped.swap(0, Relaxed);
        if !lines.is_empty() || missed > 0 {
            let batch = std::mem::take(&mut lines);
            let guard = ParkOnForcedUnwind;
            let logged = Python::try_attach(|py| {
                if let Err(e) = sink.call1(py, (batch, missed)) {
                    e.print(py);
                }
            });
            guard.disarm();
            if logged.is_none() {
                return; // the interpreter is gone
            }
        }
        if stop {
            return;
        }
    }
}

/// One request's line: client, request line, status, body bytes and time
/// taken, e.g. `203.0.113.7:51234 - "GET /users/1?x=1 HTTP/1.1" 200 27 0.412ms`.
pub fn line(
    client: Option<SocketAddr>,
    method: &http::Method,
    uri: &http::Uri,
    version: http::Version,
    status: u16,
    bytes: Option<u64>,
    took: Duration,
) -> String {
    let client = client.map_or_else(|| "-".to_string(), |c| c.to_string());
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let bytes = bytes.map_or_else(|| "-".to_string(), |b| b.to_string());
    let ms = took.as_secs_f64() * 1000.0;
    format!("{client} - \"{method} {target} {version:?}\" {status} {bytes} {ms:.3}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_names_client_request_status_size_and_time() {
        let uri: http::Uri = "/users/1?x=1".parse().unwrap();
        let text = line(
            Some("203.0.113.7:51234".parse().unwrap()),
            &http::Method::GET,
            &uri,
            http::Version::HTTP_11,
            200,
            Some(27),
            Duration::from_micros(412),
        );
        assert_eq!(
            text,
            "203.0.113.7:51234 - \"GET /users/1?x=1 HTTP/1.1\" 200 27 0.412ms"
        );
        let text = line(
            None,
            &http::Method::POST,
            &"/".parse().unwrap(),
            http::Version::HTTP_10,
            503,
            None,
            Duration::ZERO,
        );
        assert_eq!(text, "- - \"POST / HTTP/1.0\" 503 - 0.000ms");
    }
}
