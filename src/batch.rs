//! A thread that hands items to a Python callable in batches, so the
//! threads that produce them never wait for the interpreter.
//!
//! Producers hand items over a bounded channel without waiting. The thread
//! waits detached, then attaches once per batch and calls
//! `sink(items, dropped)`. If Python cannot keep up, items beyond the
//! channel are counted, and the count goes with the next batch: the sink
//! learns what it missed, never silently.

use std::sync::atomic::{
    AtomicU64,
    Ordering::{Relaxed, SeqCst},
};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::interpreter::ParkOnForcedUnwind;

/// Items handed to the sink per attach.
const BATCH: usize = 512;

enum Msg<T> {
    Item(T),
    Stop,
}

pub struct Batcher<T> {
    tx: Sender<Msg<T>>,
    dropped: Arc<AtomicU64>,
    /// Items queued and not yet handed to the sink (or being handed).
    pending: Arc<AtomicU64>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<T> Batcher<T>
where
    T: Send + 'static,
    for<'py> T: IntoPyObject<'py>,
{
    /// Starts the thread `name`; at most `capacity` items wait for it.
    pub fn start(name: &str, sink: Py<PyAny>, capacity: usize) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let pending = Arc::new(AtomicU64::new(0));
        let counted = (dropped.clone(), pending.clone());
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(&rx, &sink, &counted.0, &counted.1))?;
        Ok(Self {
            tx,
            dropped,
            pending,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues one item; never waits.
    pub fn record(&self, item: T) {
        self.pending.fetch_add(1, SeqCst);
        if self.tx.try_send(Msg::Item(item)).is_err() {
            self.pending.fetch_sub(1, SeqCst);
            self.dropped.fetch_add(1, Relaxed);
        }
    }

    /// How many items are queued or being handed to the sink.
    pub fn pending(&self) -> u64 {
        self.pending.load(SeqCst)
    }

    /// Hands over what is queued and stops the thread, waiting up to
    /// `timeout`. Call detached: the thread attaches to hand items over.
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

impl<T> Drop for Batcher<T> {
    fn drop(&mut self) {
        // NOTE: never waits here (a drop may run attached); the thread ends
        // on the stop message or when the channel closes.
        let _ = self.tx.try_send(Msg::Stop);
    }
}

fn run<T>(rx: &Receiver<Msg<T>>, sink: &Py<PyAny>, dropped: &AtomicU64, pending: &AtomicU64)
where
    for<'py> T: IntoPyObject<'py>,
{
    let mut items = Vec::with_capacity(BATCH);
    loop {
        let mut stop = match rx.recv() {
            Ok(Msg::Item(item)) => {
                items.push(item);
                false
            }
            Ok(Msg::Stop) | Err(_) => true,
        };
        while !stop && items.len() < BATCH {
            match rx.try_recv() {
                Ok(Msg::Item(item)) => items.push(item),
                Ok(Msg::Stop) => stop = true,
                Err(_) => break,
            }
        }
        let missed = dropped.swap(0, Relaxed);
        if !items.is_empty() || missed > 0 {
            let batch = std::mem::take(&mut items);
            let count = batch.len() as u64;
            let guard = ParkOnForcedUnwind;
            let handed = Python::try_attach(|py| {
                let sent = PyList::new(py, batch).and_then(|list| sink.call1(py, (list, missed)));
                if let Err(e) = sent {
                    e.print(py);
                }
            });
            guard.disarm();
            pending.fetch_sub(count, SeqCst);
            if handed.is_none() {
                return; // the interpreter is gone
            }
        }
        if stop {
            return;
        }
    }
}
