use std::fmt;
use std::io;
use std::sync::Arc;

/// Everything that can end a request or a worker. `Clone`, because one
/// crash ends every stream in flight with the same error.
#[derive(Debug, Clone)]
pub enum Error {
    /// The worker answered with an `error` line. Branch on `code` (stable,
    /// e.g. `no_model`), not on `message`.
    Request { code: String, message: String },
    /// The worker wrote something that is not a reply to a request in
    /// flight: every request in flight fails with this and is cancelled.
    Protocol { reason: String, line: String },
    /// The worker exited while the request was in flight (a crash), or
    /// `close` had to signal it. `stderr_tail` usually says why.
    Exited { code: Option<i32>, signal: Option<i32>, stderr_tail: String },
    /// The worker was closed by `Worker::close`.
    Closed,
    /// No reply in time: the hello at start-up, a stream's `timeout`, or a
    /// cancel that got no terminal line within `Options::cancel_grace`.
    Timeout(String),
    /// Spawning the worker, or writing to it, failed.
    Io(Arc<io::Error>),
}

impl Error {
    pub(crate) fn io(e: io::Error) -> Error {
        Error::Io(Arc::new(e))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Request { code, message } => write!(f, "request failed: {} ({})", message, code),
            Error::Protocol { reason, line } => write!(f, "protocol error: {}: {:?}", reason, line),
            Error::Exited { code, signal, stderr_tail } => {
                match (code, signal) {
                    (_, Some(sig)) => write!(f, "worker exited (signal {})", sig)?,
                    (Some(code), None) => write!(f, "worker exited (exit code {})", code)?,
                    (None, None) => write!(f, "worker exited")?,
                }
                write!(f, "; stderr tail:\n{}", stderr_tail)
            }
            Error::Closed => write!(f, "worker closed"),
            Error::Timeout(what) => write!(f, "timed out: {}", what),
            Error::Io(e) => write!(f, "i/o error: {}", e),
        }
    }
}

impl std::error::Error for Error {}
