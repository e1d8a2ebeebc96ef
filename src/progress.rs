//! Progress of long work (feature extraction, epochs, scoring), reported through a small trait
//! that the caller implements (the CLI draws indicatif bars); the library itself draws nothing.

use crate::error::{Error, Result};

/// Receives the progress of one phase of work at a time. Every method has a no-op default.
pub trait Progress: Send + Sync {
    /// The current phase has `len` steps (0: unknown); the position goes back to 0.
    fn set_length(&self, _len: u64) {}
    /// `n` more steps are done.
    fn inc(&self, _n: u64) {}
    /// A short status line (e.g. the last epoch's loss).
    fn set_message(&self, _message: &str) {}
    /// The phase is over.
    fn finish(&self) {}
    /// Whether the caller wants the work stopped (e.g. Ctrl-C in Python); long loops ask after
    /// each step and return [`Error::Interrupted`].
    fn interrupted(&self) -> bool {
        false
    }
    /// `n` more steps are done; then [`Error::Interrupted`] if the caller wants the work stopped.
    fn step(&self, n: u64) -> Result<()> {
        self.inc(n);
        if self.interrupted() {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {}
