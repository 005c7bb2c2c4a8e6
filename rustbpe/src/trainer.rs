//! The training session: feed text from any mix of sources, then train.
//!
//! Sources: batches of documents (from a Python iterator), text files read
//! here in 16 MiB blocks (a file is one document; blocks are cut at safe cuts,
//! so a multi-GB file never sits in memory whole and is still split exactly as
//! if it did), and Arrow string arrays (offsets + data buffers, one batch of a
//! parquet `text` column, without a Python object per document).

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::count::ChunkCounter;
use crate::error::BpeError;
use crate::pretok::Splitter;
use crate::train::{learn_merges, Pair, Words};

/// Bytes read from a text file per step.
const FILE_BLOCK: usize = 16 << 20;

/// Feeds text into a chunk counter, then learns merges once.
pub struct Trainer {
    pattern: String,
    counter: Option<ChunkCounter>,
    /// What was fed, kept once `train` has consumed the counter.
    fed: crate::count::FeedStats,
    pool: Option<rayon::ThreadPool>,
}

impl Trainer {
    /// A trainer for `pattern`; `threads` = None uses rayon's global pool.
    pub fn new(
        pattern: &str,
        doc_cap: Option<u64>,
        max_chars: Option<u64>,
        threads: Option<usize>,
    ) -> Result<Trainer, BpeError> {
        let splitter = Splitter::new(pattern)?;
        let pool = match threads {
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n.max(1))
                    .build()
                    .map_err(|e| BpeError::Internal(format!("thread pool: {e}")))?,
            ),
            None => None,
        };
        let workers = pool.as_ref().map_or_else(rayon::current_num_threads, |p| p.current_num_threads());
        let counter = ChunkCounter::new(splitter, doc_cap, max_chars, workers);
        Ok(Trainer { pattern: pattern.to_owned(), counter: Some(counter), fed: Default::default(), pool })
    }

    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Documents, UTF-8 bytes and characters admitted so far.
    pub fn stats(&self) -> crate::count::FeedStats {
        self.counter.as_ref().map_or(self.fed, ChunkCounter::stats)
    }

    /// True once `max_chars` is reached: further text is ignored.
    pub fn is_full(&self) -> bool {
        self.counter.as_ref().is_some_and(ChunkCounter::is_full)
    }

    fn counter(&mut self) -> Result<&mut ChunkCounter, BpeError> {
        self.counter.as_mut().ok_or(BpeError::AlreadyTrained)
    }

    fn run<T: Send>(pool: &Option<rayon::ThreadPool>, f: impl FnOnce() -> T + Send) -> T {
        match pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }

    /// Count a batch of documents.
    pub fn feed_docs<S: AsRef<str>>(&mut self, docs: &[S]) -> Result<(), BpeError> {
        let counter = self.counter()?;
        let mut kept: Vec<&str> = Vec::with_capacity(docs.len());
        for doc in docs {
            if counter.is_full() {
                break;
            }
            let mut budget = counter.start_doc();
            kept.push(counter.admit(&mut budget, doc.as_ref()));
        }
        let counter = self.counter.as_mut().ok_or(BpeError::AlreadyTrained)?;
        Trainer::run(&self.pool, || counter.count(&kept))
    }

    /// Count one Arrow string array: `offsets[i]..offsets[i + 1]` of `data`
    /// is document `i` (as in Arrow's `string`/`large_string` layout).
    pub fn feed_arrow(&mut self, offsets: &[i64], data: &[u8]) -> Result<(), BpeError> {
        let (Some(&first), Some(&last)) = (offsets.first(), offsets.last()) else {
            return Err(BpeError::BadArrow("offsets buffer is empty".into()));
        };
        if first < 0 || last < first || last as u64 > data.len() as u64 {
            return Err(BpeError::BadArrow(format!(
                "offsets span {first}..{last} outside the {}-byte data buffer",
                data.len()
            )));
        }
        let text = std::str::from_utf8(&data[first as usize..last as usize]).map_err(|e| {
            BpeError::BadArrow(format!("invalid UTF-8 at data byte {}", first as usize + e.valid_up_to()))
        })?;
        let mut docs: Vec<&str> = Vec::with_capacity(offsets.len() - 1);
        for w in offsets.windows(2) {
            let doc = (w[0] <= w[1])
                .then(|| text.get((w[0] - first) as usize..(w[1] - first) as usize))
                .flatten()
                .ok_or_else(|| BpeError::BadArrow(format!("bad document offsets {}..{}", w[0], w[1])))?;
            docs.push(doc);
        }
        self.feed_docs(&docs)
    }

    /// Count a text file (its first `stop` bytes, if given) as one document,
    /// block by block. `on_progress` gets the bytes of this file consumed so
    /// far; returning false stops early.
    pub fn feed_file(
        &mut self,
        path: &Path,
        stop: Option<u64>,
        on_progress: &mut dyn FnMut(u64) -> bool,
    ) -> Result<(), BpeError> {
        let io_err = |source| BpeError::Io { path: path.to_owned(), source };
        let mut file = File::open(path).map_err(io_err)?.take(stop.unwrap_or(u64::MAX));
        let counter = self.counter.as_mut().ok_or(BpeError::AlreadyTrained)?;
        let pool = &self.pool;
        let mut budget = counter.start_doc();
        let mut buf: Vec<u8> = Vec::new();
        let mut consumed: u64 = 0; // file offset of buf[0]
        let mut checked = 0usize; // buf[..checked] is known to be valid UTF-8
        let mut eof = false;
        while !eof && !counter.is_full() && !budget.exhausted() {
            let got = (&mut file).take(FILE_BLOCK as u64).read_to_end(&mut buf).map_err(io_err)?;
            eof = got < FILE_BLOCK;
            let valid = match std::str::from_utf8(&buf[checked..]) {
                Ok(_) => buf.len(),
                Err(e) if e.error_len().is_none() && !eof => checked + e.valid_up_to(),
                Err(e) => {
                    let offset = consumed + (checked + e.valid_up_to()) as u64;
                    return Err(BpeError::InvalidUtf8 { path: path.to_owned(), offset });
                }
            };
            checked = valid;
            let text = std::str::from_utf8(&buf[..valid]).map_err(|e| BpeError::Internal(e.to_string()))?;
            let cut = if eof { valid } else { counter.splitter().last_safe_cut(text).unwrap_or(0) };
            if cut == 0 {
                continue; // no safe cut yet: read more before splitting
            }
            let kept = counter.admit(&mut budget, &text[..cut]);
            Trainer::run(pool, || counter.count(&[kept]))?;
            buf.drain(..cut);
            checked -= cut;
            consumed += cut as u64;
            if !on_progress(consumed) {
                break;
            }
        }
        Ok(())
    }

    /// Learn the merges (once; the trainer is spent afterwards).
    pub fn train(
        &mut self,
        vocab_size: u64,
        progress: &mut dyn FnMut(u32, u32) -> bool,
    ) -> Result<Vec<Pair>, BpeError> {
        if vocab_size < 256 {
            return Err(BpeError::VocabTooSmall(vocab_size));
        }
        let counter = self.counter.take().ok_or(BpeError::AlreadyTrained)?;
        self.fed = counter.stats();
        let words = Words::from_chunks(counter.into_chunks()?);
        learn_merges(words, vocab_size, progress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretok::GPT4_PATTERN;
    use std::io::Write;

    fn trainer(doc_cap: Option<u64>) -> Trainer {
        Trainer::new(GPT4_PATTERN, doc_cap, None, Some(2)).expect("trainer")
    }

    fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("pilot_rustbpe_{}_{name}", std::process::id()));
        File::create(&path).and_then(|mut f| f.write_all(bytes)).expect("write temp file");
        path
    }

    #[test]
    fn file_equals_the_same_text_as_a_document() {
        let text = "The quick brown fox, 1234 times.\n\nAnother line here!  ".repeat(400_000);
        let path = temp_file("same.txt", text.as_bytes());
        let mut from_file = trainer(None);
        from_file.feed_file(&path, None, &mut |_| true).expect("feed file");
        let mut from_doc = trainer(None);
        from_doc.feed_docs(&[text.as_str()]).expect("feed docs");
        assert_eq!(from_file.stats().bytes, text.len() as u64);
        let a = from_file.train(300, &mut |_, _| true).expect("train");
        let b = from_doc.train(300, &mut |_, _| true).expect("train");
        assert_eq!(a, b);
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn invalid_utf8_names_the_offset() {
        let path = temp_file("bad.txt", b"hello \xff world");
        let err = trainer(None).feed_file(&path, None, &mut |_| true).expect_err("must fail");
        assert!(matches!(err, BpeError::InvalidUtf8 { offset: 6, .. }), "{err}");
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let err = trainer(None).feed_file(Path::new("/nonexistent/x.txt"), None, &mut |_| true).expect_err("fails");
        assert!(matches!(err, BpeError::Io { .. }));
    }

    #[test]
    fn doc_cap_applies_to_a_whole_file() {
        let path = temp_file("cap.txt", "abcdef ghij".as_bytes());
        let mut t = trainer(Some(4));
        t.feed_file(&path, None, &mut |_| true).expect("feed");
        assert_eq!(t.stats().chars, 4);
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn stop_reads_only_a_prefix() {
        let path = temp_file("stop.txt", "abcdef ghij".as_bytes());
        let mut t = trainer(None);
        t.feed_file(&path, Some(6), &mut |_| true).expect("feed");
        assert_eq!(t.stats().bytes, 6);
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn arrow_buffers_are_documents() {
        let data = b"hello worldhi";
        let mut a = trainer(None);
        a.feed_arrow(&[0, 11, 13], data).expect("arrow");
        assert_eq!(a.stats().docs, 2);
        let mut b = trainer(None);
        b.feed_docs(&["hello world", "hi"]).expect("docs");
        assert_eq!(a.train(260, &mut |_, _| true).expect("a"), b.train(260, &mut |_, _| true).expect("b"));
        assert!(trainer(None).feed_arrow(&[0, 20], data).is_err());
        assert!(trainer(None).feed_arrow(&[5, 2], data).is_err());
        assert!(trainer(None).feed_arrow(&[0, 1], "é".as_bytes()).is_err());
    }

    #[test]
    fn trains_once() {
        let mut t = trainer(None);
        t.feed_docs(&["abab"]).expect("feed");
        assert!(matches!(t.train(100, &mut |_, _| true), Err(BpeError::VocabTooSmall(100))));
        assert_eq!(t.train(257, &mut |_, _| true).expect("train"), vec![(97, 98)]);
        assert_eq!(t.stats().bytes, 4, "stats survive training");
        assert!(matches!(t.train(257, &mut |_, _| true), Err(BpeError::AlreadyTrained)));
        assert!(matches!(t.feed_docs(&["x"]), Err(BpeError::AlreadyTrained)));
    }

    #[test]
    fn empty_corpus_fails() {
        let mut t = trainer(None);
        t.feed_docs(&[""]).expect("feed");
        assert!(matches!(t.train(300, &mut |_, _| true), Err(BpeError::EmptyCorpus)));
    }
}
