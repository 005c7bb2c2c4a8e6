//! Counting unique chunks of a corpus, in parallel, under document limits.
//!
//! `ChunkCounter` receives text pieces (documents, or parts of one), applies
//! `doc_cap` (characters kept per document) and `max_chars` (characters kept
//! in total), splits the admitted text into chunks and counts each unique
//! chunk. Each worker thread owns one hash map for the whole run, so a batch
//! costs no map merging; the maps are merged once, at the end. Big pieces are
//! cut at safe cuts so both cores work even on a single huge document.

use hashbrown::HashMap;
use rayon::prelude::*;

use crate::error::BpeError;
use crate::pretok::Splitter;

/// Unique chunk bytes → number of occurrences.
pub type ChunkMap = HashMap<Box<[u8]>, u64>;

/// Below this many bytes a batch is counted on one thread.
const PARALLEL_MIN_BYTES: usize = 256 * 1024;

/// Characters still allowed for the document being fed (`None`: unlimited).
#[derive(Debug, Clone, Copy)]
pub struct DocBudget {
    left: Option<u64>,
}

impl DocBudget {
    /// True when the document has used up its `doc_cap`.
    pub fn exhausted(&self) -> bool {
        self.left == Some(0)
    }
}

/// Totals of what was admitted so far.
#[derive(Debug, Default, Clone, Copy)]
pub struct FeedStats {
    /// Documents started.
    pub docs: u64,
    /// UTF-8 bytes admitted.
    pub bytes: u64,
    /// Characters admitted (counted only when a limit is set, else 0).
    pub chars: u64,
}

/// Splits and counts admitted text; see the module docs.
pub struct ChunkCounter {
    splitter: Splitter,
    doc_cap: Option<u64>,
    max_chars: Option<u64>,
    maps: Vec<ChunkMap>,
    stats: FeedStats,
}

impl ChunkCounter {
    /// A counter with `workers` per-thread maps (at least one).
    pub fn new(splitter: Splitter, doc_cap: Option<u64>, max_chars: Option<u64>, workers: usize) -> Self {
        let maps = (0..workers.max(1)).map(|_| ChunkMap::new()).collect();
        ChunkCounter { splitter, doc_cap, max_chars, maps, stats: FeedStats::default() }
    }

    pub fn splitter(&self) -> &Splitter {
        &self.splitter
    }

    pub fn stats(&self) -> FeedStats {
        self.stats
    }

    /// True once `max_chars` characters have been admitted.
    pub fn is_full(&self) -> bool {
        self.max_chars.is_some_and(|m| self.stats.chars >= m)
    }

    /// Begin a new document.
    pub fn start_doc(&mut self) -> DocBudget {
        self.stats.docs += 1;
        DocBudget { left: self.doc_cap }
    }

    /// The prefix of `text` (the next piece of the current document) that the
    /// limits allow; updates the budget and the totals.
    pub fn admit<'t>(&mut self, budget: &mut DocBudget, text: &'t str) -> &'t str {
        let total_left = self.max_chars.map(|m| m.saturating_sub(self.stats.chars));
        let allowed = match (budget.left, total_left) {
            (None, None) => {
                self.stats.bytes += text.len() as u64;
                return text;
            }
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
        };
        let (kept, nchars) = if text.len() as u64 <= allowed {
            (text, text.chars().count() as u64) // chars <= bytes: all of it fits
        } else {
            match text.char_indices().nth(allowed as usize) {
                Some((cut, _)) => (&text[..cut], allowed),
                None => (text, text.chars().count() as u64),
            }
        };
        budget.left = budget.left.map(|l| l - nchars);
        self.stats.chars += nchars;
        self.stats.bytes += kept.len() as u64;
        kept
    }

    /// Split and count already-admitted pieces, in parallel when big enough.
    pub fn count(&mut self, pieces: &[&str]) -> Result<(), BpeError> {
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        if total == 0 {
            return Ok(());
        }
        let workers = if total < PARALLEL_MIN_BYTES { 1 } else { self.maps.len() };
        let groups = partition(&self.splitter, pieces, workers, total);
        let splitter = &self.splitter;
        self.maps
            .par_iter_mut()
            .zip(groups)
            .map(|(map, group)| group.iter().try_for_each(|piece| count_into(splitter, map, piece)))
            .collect::<Result<(), BpeError>>()
    }

    /// All unique chunks with their counts (the per-thread maps merged).
    pub fn into_chunks(self) -> Result<ChunkMap, BpeError> {
        let mut maps = self.maps;
        maps.sort_unstable_by_key(|m| std::cmp::Reverse(m.len()));
        let mut maps = maps.into_iter();
        let mut merged = maps.next().unwrap_or_default();
        for map in maps {
            for (chunk, n) in map {
                *merged.entry(chunk).or_insert(0) += n;
            }
        }
        if merged.is_empty() {
            return Err(BpeError::EmptyCorpus);
        }
        Ok(merged)
    }
}

/// Count every chunk of `piece` into `map`.
fn count_into(splitter: &Splitter, map: &mut ChunkMap, piece: &str) -> Result<(), BpeError> {
    splitter.for_each_chunk(piece, |chunk| {
        let key = chunk.as_bytes();
        *map.raw_entry_mut().from_key(key).or_insert_with(|| (key.into(), 0)).1 += 1;
    })
}

/// Group `pieces` into at most `groups` lists of about equal bytes, cutting
/// pieces at safe cuts where the splitter allows it.
fn partition<'t>(splitter: &Splitter, pieces: &[&'t str], groups: usize, total: usize) -> Vec<Vec<&'t str>> {
    let target = total.div_ceil(groups.max(1));
    let mut out: Vec<Vec<&'t str>> = vec![Vec::new()];
    let mut filled = 0usize;
    for &piece in pieces {
        let mut rest = piece;
        while !rest.is_empty() {
            if filled >= target && out.len() < groups {
                out.push(Vec::new());
                filled = 0;
            }
            let room = if out.len() < groups { target - filled } else { usize::MAX };
            let take =
                if rest.len() <= room { rest.len() } else { splitter.safe_cut_after(rest, room).unwrap_or(rest.len()) };
            let (head, tail) = rest.split_at(take);
            if let Some(group) = out.last_mut() {
                group.push(head);
            }
            filled += take;
            rest = tail;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretok::GPT4_PATTERN;

    fn counter(doc_cap: Option<u64>, max_chars: Option<u64>) -> ChunkCounter {
        ChunkCounter::new(Splitter::new(GPT4_PATTERN).expect("splitter"), doc_cap, max_chars, 2)
    }

    fn feed(c: &mut ChunkCounter, doc: &str) {
        let mut budget = c.start_doc();
        let kept = c.admit(&mut budget, doc);
        c.count(&[kept]).expect("count");
    }

    #[test]
    fn counts_chunks() {
        let mut c = counter(None, None);
        feed(&mut c, "the cat the dog");
        feed(&mut c, "the");
        let m = c.into_chunks().expect("chunks");
        assert_eq!(m.get(b"the".as_slice()), Some(&2));
        assert_eq!(m.get(b" the".as_slice()), Some(&1));
        assert_eq!(m.get(b" cat".as_slice()), Some(&1));
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn doc_cap_and_max_chars_truncate_by_characters() {
        let mut c = counter(Some(3), Some(5));
        feed(&mut c, "ééééé"); // capped to 3 chars
        assert!(!c.is_full());
        feed(&mut c, "abcdef"); // 2 chars left in total
        assert!(c.is_full());
        assert_eq!(c.stats().chars, 5);
        assert_eq!(c.stats().bytes, 6 + 2);
        let m = c.into_chunks().expect("chunks");
        assert_eq!(m.get("ééé".as_bytes()), Some(&1));
        assert_eq!(m.get(b"ab".as_slice()), Some(&1));
    }

    #[test]
    fn empty_corpus_is_an_error() {
        let mut c = counter(None, None);
        feed(&mut c, "");
        assert!(matches!(c.into_chunks(), Err(BpeError::EmptyCorpus)));
    }

    #[test]
    fn parallel_counting_equals_serial() {
        let text = "Some words, and numbers 12345; more words\nline two is here. ".repeat(20_000);
        let mut par = counter(None, None);
        feed(&mut par, &text);
        let mut serial = ChunkCounter::new(Splitter::new(GPT4_PATTERN).expect("splitter"), None, None, 1);
        feed(&mut serial, &text);
        assert_eq!(par.into_chunks().expect("par"), serial.into_chunks().expect("serial"));
    }

    #[test]
    fn partition_covers_every_byte_in_order() {
        let s = Splitter::new(GPT4_PATTERN).expect("splitter");
        let pieces = ["hello world ".repeat(100), "x".repeat(50), "tail words here".to_owned()];
        let refs: Vec<&str> = pieces.iter().map(String::as_str).collect();
        let total = refs.iter().map(|p| p.len()).sum();
        let groups = partition(&s, &refs, 3, total);
        assert!(groups.len() <= 3 && groups.len() >= 2);
        let joined: String = groups.concat().concat();
        assert_eq!(joined, refs.concat());
    }
}
