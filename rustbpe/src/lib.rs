//! `pilot_rustbpe`: Pilot's BPE tokenizer trainer (Rust, exposed to Python).
//!
//! Python API (see `pilot_rustbpe.pyi` for the typed stub):
//! - `Trainer(pattern=None, doc_cap=None, max_chars=None, threads=None)` with
//!   `feed(texts)`, `feed_file(path)`, `feed_arrow(offsets, data)` and
//!   `train(vocab_size) -> list[(bytes, rank)]`;
//! - `Encoder(mergeable_ranks, pattern=None)` with `encode` / `encode_batch`
//!   (tiktoken's algorithm, for checking artifacts against tiktoken);
//! - `split(text, pattern=None)` (the pre-tokenizer) and `GPT4_PATTERN`.
//!
//! Heavy work runs with the GIL released; errors become `ValueError`,
//! `OSError` or `RuntimeError` (never a panic).

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod classes;
pub mod count;
pub mod encode;
pub mod error;
pub mod pretok;
pub mod train;
pub mod trainer;

use std::path::PathBuf;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::error::guarded;
use crate::pretok::{Splitter, GPT4_PATTERN};

/// Documents pulled from a Python iterator before counting them (GIL released).
const FEED_BUFFER_BYTES: usize = 32 << 20;

/// Calls an optional Python progress callback; remembers the first exception
/// (and Ctrl-C) so the Rust loop can stop and the caller re-raise it.
struct Callback<'a> {
    func: Option<&'a Py<PyAny>>,
    error: Option<PyErr>,
}

impl<'a> Callback<'a> {
    fn new(func: Option<&'a Py<PyAny>>) -> Self {
        Callback { func, error: None }
    }

    /// Report progress; false once the callback raised or Ctrl-C was pressed.
    fn call(&mut self, args: impl for<'py> pyo3::call::PyCallArgs<'py>) -> bool {
        if self.error.is_some() {
            return false;
        }
        let result = Python::attach(|py| {
            py.check_signals()?;
            match self.func {
                Some(f) => f.call1(py, args).map(drop),
                None => Ok(()),
            }
        });
        if let Err(e) = result {
            self.error = Some(e);
        }
        self.error.is_none()
    }

    fn finish<T>(self, value: T) -> PyResult<T> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(value),
        }
    }
}

/// Counts text from any mix of sources, then learns BPE merges.
#[pyclass(module = "pilot_rustbpe")]
struct Trainer {
    inner: trainer::Trainer,
}

#[pymethods]
impl Trainer {
    #[new]
    #[pyo3(signature = (pattern=None, doc_cap=None, max_chars=None, threads=None))]
    fn new(
        pattern: Option<&str>,
        doc_cap: Option<u64>,
        max_chars: Option<u64>,
        threads: Option<usize>,
    ) -> PyResult<Self> {
        let inner = guarded(|| trainer::Trainer::new(pattern.unwrap_or(GPT4_PATTERN), doc_cap, max_chars, threads))?;
        Ok(Trainer { inner })
    }

    /// The split pattern.
    #[getter]
    fn pattern(&self) -> String {
        self.inner.pattern().to_owned()
    }

    /// Documents started so far (a text file counts as one).
    #[getter]
    fn docs(&self) -> u64 {
        self.inner.stats().docs
    }

    /// UTF-8 bytes admitted so far.
    #[getter]
    fn bytes(&self) -> u64 {
        self.inner.stats().bytes
    }

    /// Characters admitted so far (counted only when doc_cap/max_chars is set).
    #[getter]
    fn chars(&self) -> u64 {
        self.inner.stats().chars
    }

    /// True once max_chars characters were admitted.
    #[getter]
    fn full(&self) -> bool {
        self.inner.is_full()
    }

    /// Count documents from an iterable of str, pulled in buffers; stops
    /// pulling once max_chars is reached. `progress(bytes)` after each buffer.
    #[pyo3(signature = (texts, buffer_size=8192, progress=None))]
    fn feed(
        &mut self,
        py: Python<'_>,
        texts: &Bound<'_, PyAny>,
        buffer_size: usize,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<()> {
        let mut iter = texts.try_iter()?;
        let mut callback = Callback::new(progress.as_ref());
        let mut buf: Vec<String> = Vec::with_capacity(buffer_size.clamp(1, 1 << 16));
        let mut exhausted = false;
        while !exhausted && !self.inner.is_full() {
            buf.clear();
            let mut bytes = 0usize;
            while buf.len() < buffer_size.max(1) && bytes < FEED_BUFFER_BYTES {
                let Some(item) = iter.next() else {
                    exhausted = true;
                    break;
                };
                let item = item?;
                let text = item
                    .cast::<PyString>()
                    .map_err(|_| PyTypeError::new_err(format!("documents must be str, got {}", item.get_type())))?;
                let text = text.to_str()?;
                bytes += text.len();
                buf.push(text.to_owned());
            }
            let inner = &mut self.inner;
            py.detach(|| guarded(|| inner.feed_docs(&buf)))?;
            if !callback.call((self.inner.stats().bytes,)) {
                break;
            }
        }
        callback.finish(())
    }

    /// Count a text file as one document (only its first `stop` bytes when
    /// given), read here block by block. `progress(path, bytes_read)`.
    #[pyo3(signature = (path, stop=None, progress=None))]
    fn feed_file(
        &mut self,
        py: Python<'_>,
        path: PathBuf,
        stop: Option<u64>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<()> {
        let mut callback = Callback::new(progress.as_ref());
        let name = path.to_string_lossy().into_owned();
        let inner = &mut self.inner;
        let cb = &mut callback;
        py.detach(|| guarded(|| inner.feed_file(&path, stop, &mut |n| cb.call((name.clone(), n)))))?;
        callback.finish(())
    }

    /// Count one Arrow string array from its buffers: `offsets` (int32 or
    /// int64 values, len = documents + 1) into `data` (uint8), no nulls.
    fn feed_arrow(&mut self, py: Python<'_>, offsets: &Bound<'_, PyAny>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let offsets: Vec<i64> = match PyBuffer::<i64>::get(offsets) {
            Ok(b) => b.to_vec(py)?,
            Err(_) => PyBuffer::<i32>::get(offsets)?.to_vec(py)?.into_iter().map(i64::from).collect(),
        };
        let data: Vec<u8> = PyBuffer::<u8>::get(data)?.to_vec(py)?;
        let inner = &mut self.inner;
        py.detach(|| guarded(|| inner.feed_arrow(&offsets, &data)))?;
        Ok(())
    }

    /// Learn merges up to `vocab_size` tokens (256 bytes + merges); returns
    /// the mergeable ranks `[(token_bytes, rank), ...]` in rank order.
    /// `progress(done, total)` about every 1 %. The trainer is spent after.
    #[pyo3(signature = (vocab_size, progress=None))]
    fn train(&mut self, py: Python<'_>, vocab_size: u64, progress: Option<Py<PyAny>>) -> PyResult<Vec<(Vec<u8>, u32)>> {
        let mut callback = Callback::new(progress.as_ref());
        let inner = &mut self.inner;
        let cb = &mut callback;
        let ranks = py.detach(|| {
            guarded(|| {
                let merges = inner.train(vocab_size, &mut |done, total| cb.call((done, total)))?;
                let vocab = train::token_bytes(&merges)?;
                Ok(vocab.into_iter().zip(0u32..).collect::<Vec<_>>())
            })
        })?;
        callback.finish(ranks)
    }
}

/// Encodes text with mergeable ranks exactly as tiktoken does.
#[pyclass(module = "pilot_rustbpe")]
struct Encoder {
    inner: encode::Encoder,
}

#[pymethods]
impl Encoder {
    #[new]
    #[pyo3(signature = (mergeable_ranks, pattern=None))]
    fn new(mergeable_ranks: Vec<(Vec<u8>, u32)>, pattern: Option<&str>) -> PyResult<Self> {
        let inner = guarded(|| encode::Encoder::new(Splitter::new(pattern.unwrap_or(GPT4_PATTERN))?, mergeable_ranks))?;
        Ok(Encoder { inner })
    }

    /// Token ids of `text` (no special tokens).
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        let text = text.to_owned();
        Ok(py.detach(|| guarded(|| self.inner.encode(&text)))?)
    }

    /// `encode` for many texts, in parallel.
    fn encode_batch(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        Ok(py.detach(|| guarded(|| self.inner.encode_batch(&texts)))?)
    }
}

/// The chunks `pattern` (default: GPT-4's) splits `text` into.
#[pyfunction]
#[pyo3(signature = (text, pattern=None))]
fn split(text: &str, pattern: Option<&str>) -> PyResult<Vec<String>> {
    let owned = guarded(|| {
        let splitter = Splitter::new(pattern.unwrap_or(GPT4_PATTERN))?;
        Ok(splitter.chunks(text)?.into_iter().map(str::to_owned).collect())
    })?;
    Ok(owned)
}

/// Pilot's BPE tokenizer trainer (Rust): fast GPT-4-style pre-tokenizer,
/// parallel chunk counting, heap-driven incremental merges.
#[pymodule]
mod pilot_rustbpe {
    #[pymodule_export]
    use super::{split, Encoder, Trainer};

    use pyo3::prelude::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("GPT4_PATTERN", super::GPT4_PATTERN)?;
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        Ok(())
    }
}
