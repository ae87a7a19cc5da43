//! The guest agent's streams, the plumbing `exec` and `files` share: the
//! outbox every frame leaves through, output credit, input pumps, and the
//! table of live streams.
//!
//! Flow control is `qga::wire`'s: a sender has at most the credit its
//! receiver granted in flight. Output (stdout, stderr, tar-out) waits on a
//! [`Credit`] the host tops up with `agentlab-credit` commands; input (stdin,
//! tar-in) is queued by an [`Input`] that never holds more than the credit
//! it granted, and grants it again with `agentlab-credit` events as its sink
//! consumes it. So every per-stream buffer stays under its window.
//! Not here: what a stream carries (`exec`, `files`) and the dispatch (`agent`).

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use serde::Serialize;
use serde_json::Value;

use crate::guest::exec::Process;
use crate::guest::files::TarIn;
use crate::qga::wire::{self, StreamCredit, MAX_DATA};

/// Locks, taking the data of a mutex whose holder panicked: every critical
/// section here leaves its data consistent, and one stream's bug must not
/// take the agent down.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Work to start once a command's answer is queued: the threads whose
/// frames and events must follow that answer.
pub type Then = Box<dyn FnOnce() + Send>;

/// What the writer thread is handed.
pub enum Out {
    Bytes(Vec<u8>),
    /// The port was reopened: write there from now on.
    Sink(Box<dyn Write + Send>),
}

/// The one way out to the host: a channel to the writer thread, so frames
/// from many threads never interleave.
#[derive(Clone)]
pub struct Outbox(Sender<Out>);

impl Outbox {
    pub fn new() -> (Outbox, Receiver<Out>) {
        let (tx, rx) = mpsc::channel();
        (Outbox(tx), rx)
    }

    pub fn send(&self, bytes: Vec<u8>) {
        // The writer only goes away when the agent stops; nothing to tell.
        let _ = self.0.send(Out::Bytes(bytes));
    }

    pub fn set_sink(&self, sink: Box<dyn Write + Send>) {
        let _ = self.0.send(Out::Sink(sink));
    }

    pub fn event<T: Serialize>(&self, name: &str, data: &T) {
        let data = serde_json::to_value(data).unwrap_or(Value::Null);
        let event = wire::Message::Event {
            name: name.to_string(),
            data,
        };
        self.send(event.encode());
    }

    pub fn data(&self, stream: u32, kind: u8, payload: &[u8]) {
        self.send(wire::encode_data(stream, kind, payload));
    }
}

/// Writes what the outbox is handed to the current sink. A failed write
/// drops that message (the host is gone or not reading; it resyncs when it
/// comes back) and is logged once until a write succeeds again.
pub fn run_writer(rx: Receiver<Out>, mut sink: Box<dyn Write + Send>) {
    let mut failing = false;
    for out in rx {
        let bytes = match out {
            Out::Sink(new) => {
                sink = new;
                failing = false;
                continue;
            }
            Out::Bytes(bytes) => bytes,
        };
        match sink.write_all(&bytes).and_then(|()| sink.flush()) {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                note!("cannot write to the host ({e}); dropping output until it reads again");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// Bytes a stream may still send to the host.
pub struct Credit {
    state: Mutex<CreditState>,
    changed: Condvar,
}

struct CreditState {
    available: u64,
    closed: bool,
}

impl Credit {
    pub fn new(initial: u32) -> Credit {
        Credit {
            state: Mutex::new(CreditState {
                available: u64::from(initial),
                closed: false,
            }),
            changed: Condvar::new(),
        }
    }

    pub fn grant(&self, bytes: u32) {
        lock(&self.state).available += u64::from(bytes);
        self.changed.notify_all();
    }

    /// The stream is cancelled: waiters wake and get `None`.
    pub fn close(&self) {
        lock(&self.state).closed = true;
        self.changed.notify_all();
    }

    /// Blocks until some credit is there; how much (at most `MAX_DATA`), or
    /// `None` once the stream is cancelled.
    pub fn wait(&self) -> Option<usize> {
        let state = lock(&self.state);
        let state = self
            .changed
            .wait_while(state, |s| s.available == 0 && !s.closed)
            .unwrap_or_else(PoisonError::into_inner);
        (!state.closed).then(|| state.available.min(MAX_DATA as u64) as usize)
    }

    pub fn consume(&self, bytes: usize) {
        let mut state = lock(&self.state);
        state.available = state.available.saturating_sub(bytes as u64);
    }
}

/// A `Write` that sends what it is given as data frames of one stream,
/// never more than the credit allows: writes block while there is none, and
/// fail once the stream is cancelled. Buffers at most one frame.
pub struct CreditWriter {
    stream: u32,
    kind: u8,
    credit: Arc<Credit>,
    outbox: Outbox,
    buf: Vec<u8>,
}

impl CreditWriter {
    pub fn new(stream: u32, kind: u8, credit: Arc<Credit>, outbox: Outbox) -> CreditWriter {
        CreditWriter {
            stream,
            kind,
            credit,
            outbox,
            buf: Vec::with_capacity(MAX_DATA),
        }
    }

    fn send_buffered(&mut self) -> io::Result<()> {
        while !self.buf.is_empty() {
            let Some(credit) = self.credit.wait() else {
                return Err(io::Error::other("stream cancelled"));
            };
            let n = credit.min(self.buf.len());
            self.outbox.data(self.stream, self.kind, &self.buf[..n]);
            self.credit.consume(n);
            self.buf.drain(..n);
        }
        Ok(())
    }
}

impl Write for CreditWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() == MAX_DATA {
            self.send_buffered()?;
        }
        let n = data.len().min(MAX_DATA - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffered()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("stream {stream}: host sent {len} bytes with {owed} bytes of credit; frame dropped")]
    OverCredit { stream: u32, len: usize, owed: u64 },
    #[error("stream {stream}: input is closed; frame dropped")]
    Closed { stream: u32 },
}

/// The input direction of a stream: frames from the host are queued for a
/// thread that hands them to a sink (the child's stdin, a tar extractor) and
/// then grants the host that much credit again.
pub struct Input {
    stream: u32,
    tx: Mutex<Option<Sender<Vec<u8>>>>,
    /// Credit granted to the host that it has not used yet.
    owed: Arc<Mutex<u64>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Input {
    /// Grants the host `window` bytes (the caller tells it, in `Started`) and
    /// starts the thread feeding `sink`.
    pub fn start(
        stream: u32,
        window: u32,
        outbox: Outbox,
        mut sink: impl FnMut(&[u8]) + Send + 'static,
    ) -> Input {
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let owed = Arc::new(Mutex::new(u64::from(window)));
        let owed_by_pump = Arc::clone(&owed);
        let thread = std::thread::spawn(move || {
            for chunk in rx {
                sink(&chunk);
                if chunk.is_empty() {
                    continue;
                }
                *lock(&owed_by_pump) += chunk.len() as u64;
                let bytes = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
                outbox.event(wire::EVENT_CREDIT, &StreamCredit { stream, bytes });
            }
        });
        Input {
            stream,
            tx: Mutex::new(Some(tx)),
            owed,
            thread: Mutex::new(Some(thread)),
        }
    }

    /// Queues a frame from the host; refuses one beyond the credit granted.
    pub fn push(&self, payload: Vec<u8>) -> Result<(), InputError> {
        let tx = lock(&self.tx);
        let Some(tx) = tx.as_ref() else {
            return Err(InputError::Closed {
                stream: self.stream,
            });
        };
        let mut owed = lock(&self.owed);
        let len = payload.len();
        if len as u64 > *owed {
            return Err(InputError::OverCredit {
                stream: self.stream,
                len,
                owed: *owed,
            });
        }
        *owed -= len as u64;
        drop(owed);
        tx.send(payload).map_err(|_| InputError::Closed {
            stream: self.stream,
        })
    }

    /// No more input: the thread hands over what is queued, then drops the
    /// sink (the child sees end of file).
    pub fn close(&self) {
        lock(&self.tx).take();
    }

    /// `close`, then wait until the sink has had everything.
    pub fn close_and_join(&self) {
        self.close();
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

/// What a stream is, for the commands that act on it.
pub enum Control {
    Exec(Arc<Process>),
    TarOut,
    TarIn(Arc<Mutex<TarIn>>),
}

pub struct Stream {
    /// Output credit (exec, tar-out).
    pub output: Option<Arc<Credit>>,
    /// Input from the host (exec stdin or pty, tar-in).
    pub input: Option<Input>,
    pub control: Control,
}

impl Stream {
    /// `agentlab-cancel`: stop moving data; kill an exec's process group.
    pub fn cancel(&self) {
        if let Control::Exec(process) = &self.control {
            process.kill();
        }
        if let Some(credit) = &self.output {
            credit.close();
        }
        if let Some(input) = &self.input {
            input.close();
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("stream number {0} is in use (or 0); pick another")]
pub struct StreamInUse(pub u32);

/// Live streams by number. A stream leaves when its last event is sent.
#[derive(Default)]
pub struct Streams {
    next: AtomicU32,
    map: Mutex<HashMap<u32, Arc<Stream>>>,
}

impl Streams {
    /// A number no live stream has (from 1; 0 is never used).
    pub fn next_id(&self) -> u32 {
        loop {
            let id = self.next.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            if id != 0 && !lock(&self.map).contains_key(&id) {
                return id;
            }
        }
    }

    /// The number the host asked for, if it is free; else one of ours.
    pub fn claim(&self, requested: Option<u32>) -> Result<u32, StreamInUse> {
        match requested {
            Some(id) if id == 0 || lock(&self.map).contains_key(&id) => Err(StreamInUse(id)),
            Some(id) => Ok(id),
            None => Ok(self.next_id()),
        }
    }

    pub fn insert(&self, id: u32, stream: Stream) -> Arc<Stream> {
        let stream = Arc::new(stream);
        lock(&self.map).insert(id, Arc::clone(&stream));
        stream
    }

    pub fn get(&self, id: u32) -> Option<Arc<Stream>> {
        lock(&self.map).get(&id).cloned()
    }

    pub fn remove(&self, id: u32) -> Option<Arc<Stream>> {
        lock(&self.map).remove(&id)
    }

    /// Cancels every stream (the host went away for good).
    pub fn cancel_all(&self) {
        let all: Vec<Arc<Stream>> = lock(&self.map).values().cloned().collect();
        for stream in all {
            stream.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qga::wire::{kind, Decoder, Frame, Message};
    use std::time::Duration;

    fn drain(rx: &Receiver<Out>) -> Vec<Frame> {
        let mut d = Decoder::new(1 << 20);
        while let Ok(Out::Bytes(b)) = rx.recv_timeout(Duration::from_millis(100)) {
            d.push(&b);
        }
        std::iter::from_fn(|| d.next())
            .map(Result::unwrap)
            .collect()
    }

    fn payload_bytes(frames: &[Frame]) -> usize {
        frames
            .iter()
            .map(|f| match f {
                Frame::Data { payload, .. } => payload.len(),
                _ => 0,
            })
            .sum()
    }

    #[test]
    fn credit_writer_sends_no_more_than_granted() {
        let (outbox, rx) = Outbox::new();
        let credit = Arc::new(Credit::new(1000));
        let mut w = CreditWriter::new(5, kind::TAR, Arc::clone(&credit), outbox);
        let writer = std::thread::spawn(move || {
            w.write_all(&[7u8; 5000]).unwrap();
            w.flush().unwrap();
        });
        let first = drain(&rx);
        credit.grant(4000);
        writer.join().unwrap();
        let rest = drain(&rx);
        assert_eq!((payload_bytes(&first), payload_bytes(&rest)), (1000, 4000));
    }

    #[test]
    fn credit_writer_fails_once_cancelled() {
        let (outbox, _rx) = Outbox::new();
        let credit = Arc::new(Credit::new(0));
        let mut w = CreditWriter::new(5, kind::TAR, Arc::clone(&credit), outbox);
        w.write_all(b"abc").unwrap();
        credit.close();
        assert!(w.flush().is_err());
    }

    #[test]
    fn input_grants_credit_back_as_its_sink_consumes() {
        let (outbox, rx) = Outbox::new();
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink_got = Arc::clone(&got);
        let input = Input::start(9, 100, outbox, move |b| {
            lock(&sink_got).extend_from_slice(b)
        });
        input.push(b"hello".to_vec()).unwrap();
        input.close_and_join();
        let frames = drain(&rx);
        let Frame::Json(event) = &frames[0] else {
            panic!("{frames:?}")
        };
        let Message::Event { data, .. } = Message::parse(event).unwrap() else {
            panic!()
        };
        assert_eq!(
            (lock(&got).as_slice(), data),
            (&b"hello"[..], serde_json::json!({"stream": 9, "bytes": 5}))
        );
    }

    #[test]
    fn input_refuses_a_frame_beyond_its_credit() {
        let (outbox, _rx) = Outbox::new();
        let input = Input::start(9, 4, outbox, |_| {});
        assert!(matches!(
            input.push(b"hello".to_vec()),
            Err(InputError::OverCredit {
                len: 5,
                owed: 4,
                ..
            })
        ));
    }

    #[test]
    fn a_stream_number_the_host_asks_for_must_be_free() {
        let streams = Streams::default();
        assert_eq!(streams.claim(Some(5)).unwrap(), 5);
        streams.insert(
            5,
            Stream {
                output: None,
                input: None,
                control: Control::TarOut,
            },
        );
        assert!(streams.claim(Some(5)).is_err());
        assert!(streams.claim(Some(0)).is_err());
        assert_ne!(streams.claim(None).unwrap(), 5);
    }

    #[test]
    fn stream_numbers_skip_live_ones_and_zero() {
        let streams = Streams::default();
        streams.next.store(u32::MAX - 1, Ordering::Relaxed);
        let a = streams.next_id();
        let b = streams.next_id();
        assert_eq!((a, b), (u32::MAX, 1));
    }
}
