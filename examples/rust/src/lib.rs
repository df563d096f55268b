//! A small host for mlx-bridge workers (`mlx-bridge`, or anything that
//! speaks `docs/protocol.md`, such as `mlx-bridge-mock`).
//!
//! ```no_run
//! use mlx_host::{Event, Worker};
//! use serde_json::json;
//! use std::process::Command;
//!
//! // the console script, not `python -m bridge`: that would import a bridge.py
//! // from the working directory first
//! let cmd = Command::new("mlx-bridge");
//! let mut worker = Worker::spawn(cmd)?;
//! worker.call(json!({"cmd": "load", "path": "/models/qwen3"}))?;
//! for event in worker.stream(json!({"cmd": "generate", "prompt": "Hi", "max_tokens": 8}))? {
//!     if let Event::Token(t) = event? {
//!         print!("{}", t.token);
//!     }
//! }
//! worker.close()?;
//! # Ok::<(), mlx_host::Error>(())
//! ```
//!
//! One thread reads stdout and routes each line by its `id` to the channel of
//! its request, so many requests may be in flight at once; another drains
//! stderr (a full pipe would block the worker) and keeps its tail for the
//! error that reports a crash.

mod error;

pub use error::Error;

use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Timeouts and limits. `Options::default()` suits most hosts.
#[derive(Debug, Clone)]
pub struct Options {
    /// Start-up: how long the worker may take to answer `hello`.
    pub hello_timeout: Duration,
    /// After a cancel, how long to wait for the request's terminal line.
    pub cancel_grace: Duration,
    /// `close`: wait this long after `quit` before SIGTERM...
    pub quit_timeout: Duration,
    /// ...and this long after SIGTERM before SIGKILL.
    pub term_timeout: Duration,
    /// Bytes of stderr kept for `Error::Exited`.
    pub stderr_tail: usize,
    /// Longest reply line accepted (the worker's own request limit is 64 MiB).
    pub max_line_bytes: usize,
    /// Copy the worker's stderr to ours as well.
    pub echo_stderr: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            hello_timeout: Duration::from_secs(30),
            cancel_grace: Duration::from_secs(5),
            quit_timeout: Duration::from_secs(2),
            term_timeout: Duration::from_secs(2),
            stderr_tail: 8 << 10,
            max_line_bytes: 64 << 20,
            echo_stderr: false,
        }
    }
}

/// One generated token.
#[derive(Debug, Clone, Deserialize)]
pub struct Token {
    pub token: String,
    pub token_id: i64,
}

/// The end of a generation; `raw` is the whole line.
#[derive(Debug, Clone, Deserialize)]
pub struct Done {
    pub finish_reason: String,
    pub tokens_generated: u64,
    pub prompt_tokens: u64,
    #[serde(skip)]
    pub raw: Value,
}

/// One reply line of a request. Every stream ends with `Done` or `Reply`
/// (its terminal line), or with an `Err`.
#[derive(Debug, Clone)]
pub enum Event {
    Token(Token),
    Done(Done),
    /// The terminal reply of any other command (`hello`, `loaded`, `info`...).
    Reply(Value),
}

enum Msg {
    Item(Result<Event, Error>),
    Cancelled, // a Canceller sent the cancel line: start the grace period
}

struct Slot {
    tx: Sender<Msg>,
    abandoned: bool, // the host gave up on it: drop its lines until the terminal one
}

#[derive(Default)]
struct State {
    next_id: u64,
    pending: HashMap<u64, Slot>,
    gone: Option<Error>,
    closing: bool,
}

struct Shared {
    opts: Options,
    pid: libc::pid_t,
    stdin: Mutex<Option<ChildStdin>>,
    state: Mutex<State>,
    status: Mutex<Option<ExitStatus>>,
    exited: Condvar,
    tail: Mutex<VecDeque<u8>>,
}

/// A running worker process. Dropping it closes it.
pub struct Worker {
    shared: Arc<Shared>,
    hello: Value,
    reader: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Worker {
    /// Spawns `command` and waits for its answer to `hello`.
    pub fn spawn(command: Command) -> Result<Worker, Error> {
        Worker::spawn_with(command, Options::default())
    }

    pub fn spawn_with(mut command: Command, opts: Options) -> Result<Worker, Error> {
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // Its own process group: a Ctrl-C at the terminal reaches only us, and
        // we cancel and quit in order. (If we die, the worker sees end of stdin.)
        unsafe {
            command.pre_exec(|| {
                libc::setpgid(0, 0);
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(Error::io)?;
        let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let hello_timeout = opts.hello_timeout;
        let shared = Arc::new(Shared {
            opts,
            pid: child.id() as libc::pid_t,
            stdin: Mutex::new(child.stdin.take()),
            state: Mutex::default(),
            status: Mutex::new(None),
            exited: Condvar::new(),
            tail: Mutex::default(),
        });
        let s = Arc::clone(&shared);
        let reader = thread::spawn(move || {
            let drain = {
                let s = Arc::clone(&s);
                thread::spawn(move || s.drain_stderr(stderr))
            };
            if s.read_replies(stdout) {
                let _ = child.kill(); // the framing is lost
            }
            let _ = drain.join();
            let status = child.wait().unwrap_or_else(|_| ExitStatus::from_raw(-1));
            s.finish(status);
        });
        let mut worker = Worker { shared, hello: Value::Null, reader: Some(reader) };
        match worker.stream(json!({"cmd": "hello"})).and_then(|s| s.timeout(hello_timeout).wait()) {
            Ok(hello) => worker.hello = hello,
            Err(e) => {
                let _ = worker.close();
                return Err(e);
            }
        }
        Ok(worker)
    }

    /// The worker's answer to `hello` (`protocol_version`, `limits`, `pid`...).
    pub fn hello(&self) -> &Value {
        &self.hello
    }

    /// Sends `request` (a JSON object with a `cmd`; the `id` is ours) and
    /// returns the stream of its replies.
    pub fn stream(&self, request: Value) -> Result<Stream, Error> {
        let mut line = match request {
            Value::Object(line) => line,
            _ => {
                return Err(Error::io(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a request is a JSON object",
                )))
            }
        };
        let (tx, rx) = mpsc::channel();
        let id = {
            let mut state = lock(&self.shared.state);
            if let Some(e) = &state.gone {
                return Err(e.clone());
            }
            if state.closing {
                return Err(Error::Closed);
            }
            state.next_id += 1;
            let id = state.next_id;
            state.pending.insert(id, Slot { tx: tx.clone(), abandoned: false });
            id
        };
        line.insert("id".into(), json!(id));
        if let Err(e) = self.shared.send(&Value::Object(line)) {
            lock(&self.shared.state).pending.remove(&id);
            return Err(e);
        }
        Ok(Stream {
            id,
            rx,
            tx,
            shared: Arc::clone(&self.shared),
            deadline: None,
            cancel_sent: false,
            finished: false,
        })
    }

    /// Sends a request that has a single reply (`ping`, `load`, `info`...) and
    /// returns that reply.
    pub fn call(&self, request: Value) -> Result<Value, Error> {
        self.stream(request)?.wait()
    }

    /// Stops the worker: `quit` and end of stdin, then SIGTERM after
    /// `quit_timeout`, then SIGKILL after `term_timeout`. Open streams end
    /// with their terminal lines (quit cancels them) or `Error::Closed`.
    /// Returns `Error::Exited` unless the worker exited with status 0.
    pub fn close(&mut self) -> Result<(), Error> {
        let s = &self.shared;
        lock(&s.state).closing = true;
        let _ = s.send(&json!({"cmd": "quit"}));
        drop(lock(&s.stdin).take());
        if !s.wait_exit(Some(s.opts.quit_timeout)) {
            s.signal(libc::SIGTERM);
            if !s.wait_exit(Some(s.opts.term_timeout)) {
                s.signal(libc::SIGKILL);
                s.wait_exit(None);
            }
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let status = lock(&s.status).expect("the reader thread has reaped the worker");
        if status.success() {
            Ok(())
        } else {
            Err(s.exit_error(status))
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

/// The replies of one request, as an iterator: `Token`s, then one terminal
/// `Done` or `Reply`, or an `Err`. Dropping it early cancels the request.
pub struct Stream {
    id: u64,
    rx: Receiver<Msg>,
    tx: Sender<Msg>,
    shared: Arc<Shared>,
    deadline: Option<Instant>,
    cancel_sent: bool,
    finished: bool,
}

/// Cancels one request from any thread (a timer, a signal watcher).
#[derive(Clone)]
pub struct Canceller {
    id: u64,
    tx: Sender<Msg>,
    shared: Arc<Shared>,
}

impl Canceller {
    /// Sends `cancel`; the stream goes on until its terminal line (for a
    /// generation, a `Done` with `finish_reason` "cancelled").
    pub fn cancel(&self) {
        self.shared.cancel(self.id);
        let _ = self.tx.send(Msg::Cancelled);
    }
}

impl Stream {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn canceller(&self) -> Canceller {
        Canceller { id: self.id, tx: self.tx.clone(), shared: Arc::clone(&self.shared) }
    }

    /// Cancels the request if it has not ended `after` from now.
    pub fn timeout(mut self, after: Duration) -> Stream {
        self.deadline = Some(Instant::now() + after);
        self
    }

    /// Skips the tokens and returns the terminal line.
    pub fn wait(self) -> Result<Value, Error> {
        for event in self {
            match event? {
                Event::Token(_) => {}
                Event::Done(done) => return Ok(done.raw),
                Event::Reply(reply) => return Ok(reply),
            }
        }
        unreachable!("a stream always ends with a terminal line or an error")
    }

    fn start_grace(&mut self) {
        self.cancel_sent = true;
        self.deadline = Some(Instant::now() + self.shared.opts.cancel_grace);
    }
}

impl Iterator for Stream {
    type Item = Result<Event, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.finished {
            let msg = match self.deadline {
                None => self.rx.recv().ok()?, // never disconnected: we hold a sender
                Some(at) => match self.rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(msg) => msg,
                    Err(_) if self.cancel_sent => {
                        self.finished = true;
                        self.shared.abandon(self.id);
                        let grace = self.shared.opts.cancel_grace;
                        return Some(Err(Error::Timeout(format!(
                            "request {}: no terminal line {:?} after cancel",
                            self.id, grace
                        ))));
                    }
                    Err(_) => {
                        self.shared.cancel(self.id);
                        self.start_grace();
                        continue;
                    }
                },
            };
            match msg {
                Msg::Cancelled if !self.cancel_sent => self.start_grace(),
                Msg::Cancelled => {}
                Msg::Item(item) => {
                    self.finished = !matches!(item, Ok(Event::Token(_)));
                    return Some(item);
                }
            }
        }
        None
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if !self.finished {
            self.shared.abandon(self.id);
            self.shared.cancel(self.id);
        }
    }
}

impl Shared {
    fn send(&self, line: &Value) -> Result<(), Error> {
        let mut bytes = serde_json::to_vec(line).expect("a JSON value always serializes");
        bytes.push(b'\n');
        match lock(&self.stdin).as_mut() {
            Some(stdin) => stdin.write_all(&bytes).map_err(Error::io),
            None => Err(Error::Closed),
        }
    }

    fn cancel(&self, id: u64) {
        let _ = self.send(&json!({"cmd": "cancel", "id": id}));
    }

    fn abandon(&self, id: u64) {
        if let Some(slot) = lock(&self.state).pending.get_mut(&id) {
            slot.abandoned = true;
        }
    }

    /// Reads reply lines until end of file; true if a line was over the limit.
    fn read_replies(&self, stdout: ChildStdout) -> bool {
        let mut reader = BufReader::with_capacity(64 << 10, stdout);
        let limit = self.opts.max_line_bytes as u64 + 2; // room for "\r\n"
        let mut line = Vec::new();
        loop {
            line.clear();
            match (&mut reader).take(limit).read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return false,
                Ok(n) if n as u64 == limit && line.last() != Some(&b'\n') => {
                    self.fault_all("a line over max_line_bytes", &line);
                    return true;
                }
                Ok(_) => self.route(&line),
            }
        }
    }

    fn route(&self, line: &[u8]) {
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let reply: Value = match serde_json::from_slice(line) {
            Ok(reply @ Value::Object(_)) if reply["type"].is_string() => reply,
            _ => return self.fault_all("the worker wrote a line that is not a reply", line),
        };
        let terminal = reply["type"] != "token";
        let mut state = lock(&self.state);
        let id = reply["id"].as_u64().filter(|id| state.pending.contains_key(id));
        let id = match id {
            Some(id) => id,
            None => {
                drop(state);
                return self.fault_all("the worker wrote a line for no request in flight", line);
            }
        };
        let slot = if terminal { state.pending.remove(&id) } else { None };
        let slot = slot.as_ref().unwrap_or_else(|| &state.pending[&id]);
        if !slot.abandoned {
            let _ = slot.tx.send(Msg::Item(decode(reply)));
        }
    }

    /// Fails every request in flight and cancels it in the worker: a line
    /// that cannot be routed means we can no longer trust the routing.
    fn fault_all(&self, reason: &str, line: &[u8]) {
        let line = String::from_utf8_lossy(&line[..line.len().min(200)]);
        let error = Error::Protocol { reason: reason.into(), line: line.trim_end().into() };
        let mut ids = Vec::new();
        for (id, slot) in lock(&self.state).pending.iter_mut().filter(|(_, s)| !s.abandoned) {
            slot.abandoned = true;
            let _ = slot.tx.send(Msg::Item(Err(error.clone())));
            ids.push(*id);
        }
        for id in ids {
            self.cancel(id);
        }
    }

    fn drain_stderr(&self, mut stderr: ChildStderr) {
        let mut buf = [0u8; 8192];
        loop {
            let n = match stderr.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.opts.echo_stderr {
                let _ = io::stderr().write_all(&buf[..n]);
            }
            let mut tail = lock(&self.tail);
            tail.extend(&buf[..n]);
            let over = tail.len().saturating_sub(self.opts.stderr_tail);
            tail.drain(..over);
        }
    }

    fn exit_error(&self, status: ExitStatus) -> Error {
        let tail: Vec<u8> = lock(&self.tail).iter().copied().collect();
        Error::Exited {
            code: status.code(),
            signal: status.signal(),
            stderr_tail: String::from_utf8_lossy(&tail).into_owned(),
        }
    }

    /// The worker has exited: end every open stream, then wake `close`.
    fn finish(&self, status: ExitStatus) {
        let pending = {
            let mut state = lock(&self.state);
            let gone = if state.closing { Error::Closed } else { self.exit_error(status) };
            state.gone = Some(gone.clone());
            std::mem::take(&mut state.pending).into_values().map(move |slot| (slot, gone.clone()))
        };
        for (slot, gone) in pending.filter(|(slot, _)| !slot.abandoned) {
            let _ = slot.tx.send(Msg::Item(Err(gone)));
        }
        *lock(&self.status) = Some(status);
        self.exited.notify_all();
    }

    fn wait_exit(&self, timeout: Option<Duration>) -> bool {
        let status = lock(&self.status);
        let status = match timeout {
            Some(t) => self.exited.wait_timeout_while(status, t, |s| s.is_none()).unwrap().0,
            None => self.exited.wait_while(status, |s| s.is_none()).unwrap(),
        };
        status.is_some()
    }

    fn signal(&self, signal: libc::c_int) {
        if lock(&self.status).is_none() {
            unsafe { libc::kill(self.pid, signal) };
        }
    }
}

fn decode(reply: Value) -> Result<Event, Error> {
    let malformed = |e: serde_json::Error| Error::Protocol {
        reason: format!("malformed reply: {}", e),
        line: reply.to_string(),
    };
    match reply["type"].as_str() {
        Some("token") => Token::deserialize(&reply).map(Event::Token).map_err(malformed),
        Some("done") => match Done::deserialize(&reply) {
            Ok(done) => Ok(Event::Done(Done { raw: reply.clone(), ..done })),
            Err(e) => Err(malformed(e)),
        },
        Some("error") => Err(Error::Request {
            code: reply["code"].as_str().unwrap_or("internal").into(),
            message: reply["error"].as_str().unwrap_or_default().into(),
        }),
        _ => Ok(Event::Reply(reply)),
    }
}
