//! The crate's error type and its mapping onto Python exceptions.
//!
//! Every fallible path returns `BpeError`; the Python bindings turn it into
//! `ValueError` (bad input), `OSError`/`FileNotFoundError` (I/O) or
//! `RuntimeError` (an internal bug, including a caught panic). No panic is
//! allowed to cross into Python: see `guarded`.

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::PyErr;

/// Everything that can go wrong while training or encoding.
#[derive(Debug)]
pub enum BpeError {
    /// The split pattern does not compile (or fails while matching).
    InvalidPattern { pattern: String, reason: String },
    /// `vocab_size` is below the 256 byte tokens.
    VocabTooSmall(u64),
    /// No text at all reached the trainer.
    EmptyCorpus,
    /// A file could not be opened or read.
    Io { path: PathBuf, source: std::io::Error },
    /// A file is not valid UTF-8 at `offset` bytes from its start.
    InvalidUtf8 { path: PathBuf, offset: u64 },
    /// Arrow buffers handed over from Python are inconsistent.
    BadArrow(String),
    /// Mergeable ranks handed to the encoder are inconsistent.
    BadRanks(String),
    /// `feed*` or `train` called on a trainer that has already trained.
    AlreadyTrained,
    /// A bug (including a caught panic); the message says where.
    Internal(String),
}

impl fmt::Display for BpeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BpeError::InvalidPattern { pattern, reason } => {
                write!(f, "invalid split pattern {pattern:?}: {reason}")
            }
            BpeError::VocabTooSmall(n) => {
                write!(f, "vocab_size {n} is too small: it must be at least 256 (one token per byte)")
            }
            BpeError::EmptyCorpus => write!(f, "empty corpus: no text reached the trainer"),
            BpeError::Io { path, source } => write!(f, "{}: {source}", path.display()),
            BpeError::InvalidUtf8 { path, offset } => {
                write!(f, "{}: invalid UTF-8 at byte offset {offset}", path.display())
            }
            BpeError::BadArrow(msg) => write!(f, "bad Arrow string buffers: {msg}"),
            BpeError::BadRanks(msg) => write!(f, "bad mergeable ranks: {msg}"),
            BpeError::AlreadyTrained => {
                write!(f, "this trainer has already trained; create a new Trainer to train again")
            }
            BpeError::Internal(msg) => write!(f, "internal error in pilot_rustbpe: {msg}"),
        }
    }
}

impl std::error::Error for BpeError {}

impl From<BpeError> for PyErr {
    fn from(err: BpeError) -> PyErr {
        let msg = err.to_string();
        match err {
            BpeError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                PyFileNotFoundError::new_err(msg)
            }
            BpeError::Io { .. } => PyOSError::new_err(msg),
            BpeError::Internal(_) => PyRuntimeError::new_err(msg),
            _ => PyValueError::new_err(msg),
        }
    }
}

/// Run `f`, turning a panic into `BpeError::Internal` instead of unwinding
/// into Python (PyO3 would raise `PanicException`, a `BaseException`).
pub fn guarded<T>(f: impl FnOnce() -> Result<T, BpeError>) -> Result<T, BpeError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        Err(BpeError::Internal(what))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guarded_turns_panics_into_errors() {
        let r: Result<(), BpeError> = guarded(|| panic!("boom"));
        match r {
            Err(BpeError::Internal(msg)) => assert!(msg.contains("boom")),
            other => panic!("expected Internal, got {other:?}"),
        }
        assert_eq!(guarded(|| Ok(3)).ok(), Some(3));
    }

    #[test]
    fn messages_name_the_bad_thing() {
        let e = BpeError::InvalidUtf8 { path: PathBuf::from("/x/y.txt"), offset: 17 };
        assert_eq!(e.to_string(), "/x/y.txt: invalid UTF-8 at byte offset 17");
        assert!(BpeError::VocabTooSmall(100).to_string().contains("100"));
    }
}
