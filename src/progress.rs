//! Progress reporting from long operations to whatever front end shows it.
//!
//! The library reports bytes done; `isrctl` draws a bar when stderr is a
//! terminal and stays silent otherwise (scripts, SSH without a TTY).

/// Receives progress of one long operation.
pub trait Progress: Send + Sync {
    /// A phase starts, with its total in bytes (0 when unknown).
    fn start(&self, label: &str, total_bytes: u64);
    /// `bytes` more are done.
    fn advance(&self, bytes: u64);
    /// The phase is over.
    fn finish(&self);
}

/// Discards progress.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _label: &str, _total_bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}
