//! Progress of long work (feature extraction, epochs, scoring), reported through a small trait
//! that the caller implements (the CLI draws indicatif bars); the library itself draws nothing.

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
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {}
