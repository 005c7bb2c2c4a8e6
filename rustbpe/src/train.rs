//! The BPE merge loop: incremental pair counts, a lazily refreshed max-heap,
//! and per-pair lists of the words that contain the pair.
//!
//! Each unique chunk ("word") is a run of token ids in one flat `Vec<u32>`.
//! A merge of pair (a, b) → z visits only the words listed for (a, b), rewrites
//! them in place and applies the exact pair-count deltas (−1 for the pairs the
//! merge destroys, +1 for the new pairs with z), weighted by the word's count.
//!
//! Merge order: the pair with the highest count; on a tie the smallest
//! `(a, b)`. Counts only ever drop, except for pairs that contain the token
//! just created, which are pushed with their final count when created; so a
//! popped heap entry whose count is still current is the true maximum, and
//! entries whose count went stale are re-pushed (lazy refresh). This is the
//! same order PyPI `rustbpe` 0.1.0 produces, so the merges are identical.

use std::collections::BinaryHeap;

use rustc_hash::FxHashMap;

use crate::count::ChunkMap;
use crate::error::BpeError;

/// A pair of adjacent token ids.
pub type Pair = (u32, u32);

/// Unique chunks as token-id sequences with their corpus counts.
pub struct Words {
    syms: Vec<u32>,
    start: Vec<usize>,
    len: Vec<u32>,
    count: Vec<i64>,
}

impl Words {
    /// Words from counted chunks; single-byte chunks are dropped (no pairs).
    pub fn from_chunks(chunks: ChunkMap) -> Words {
        let n = chunks.len();
        let bytes: usize = chunks.keys().map(|k| k.len()).sum();
        let mut w = Words {
            syms: Vec::with_capacity(bytes),
            start: Vec::with_capacity(n),
            len: Vec::with_capacity(n),
            count: Vec::with_capacity(n),
        };
        for (chunk, count) in chunks {
            if chunk.len() >= 2 {
                w.start.push(w.syms.len());
                w.len.push(chunk.len() as u32);
                w.count.push(count as i64);
                w.syms.extend(chunk.iter().map(|&b| u32::from(b)));
            }
        }
        w
    }

    fn get(&self, w: usize) -> &[u32] {
        &self.syms[self.start[w]..self.start[w] + self.len[w] as usize]
    }
}

/// Dense ids for pairs: base-byte pairs map to `a * 256 + b` directly; pairs
/// involving a merged token go through a hash map.
struct Pairs {
    ids: FxHashMap<u64, u32>,
    pair: Vec<Pair>,
    count: Vec<i64>,
    /// Words that may contain the pair (each at most once, maybe stale).
    pos: Vec<Vec<u32>>,
}

const BASE_PAIRS: usize = 256 * 256;

impl Pairs {
    fn new() -> Pairs {
        Pairs {
            ids: FxHashMap::default(),
            pair: (0..BASE_PAIRS as u32).map(|i| (i >> 8, i & 0xFF)).collect(),
            count: vec![0; BASE_PAIRS],
            pos: vec![Vec::new(); BASE_PAIRS],
        }
    }

    #[inline(always)]
    fn key(a: u32, b: u32) -> u64 {
        (u64::from(a) << 32) | u64::from(b)
    }

    /// The id of (a, b) and whether it was just created.
    #[inline(always)]
    fn id(&mut self, a: u32, b: u32) -> (usize, bool) {
        if a < 256 && b < 256 {
            return (((a << 8) | b) as usize, false);
        }
        let next = self.pair.len() as u32;
        let id = *self.ids.entry(Pairs::key(a, b)).or_insert(next);
        if id == next {
            self.pair.push((a, b));
            self.count.push(0);
            self.pos.push(Vec::new());
            return (id as usize, true);
        }
        (id as usize, false)
    }

    #[inline(always)]
    fn note_word(&mut self, id: usize, word: u32) {
        let pos = &mut self.pos[id];
        if pos.last() != Some(&word) {
            pos.push(word);
        }
    }
}

/// Heap key: count, then the smaller pair first (both in one `u128`).
#[inline(always)]
fn heap_key(count: i64, (a, b): Pair) -> u128 {
    ((count as u128) << 64) | (u128::from(!a) << 32) | u128::from(!b)
}

#[inline(always)]
fn heap_unkey(key: u128) -> (i64, Pair) {
    ((key >> 64) as i64, (!(key >> 32) as u32, !(key as u32)))
}

/// Learn up to `vocab_size - 256` merges; returns them in order (merge `i`
/// creates token `256 + i`). Stops early if no pair is left.
/// `progress(done, total)` is called about every 1 %; returning false stops
/// training there (the merges so far are returned).
pub fn learn_merges(
    mut words: Words,
    vocab_size: u64,
    progress: &mut dyn FnMut(u32, u32) -> bool,
) -> Result<Vec<Pair>, BpeError> {
    if vocab_size < 256 {
        return Err(BpeError::VocabTooSmall(vocab_size));
    }
    let total = u32::try_from(vocab_size - 256)
        .map_err(|_| BpeError::Internal(format!("vocab_size {vocab_size} too large")))?;
    let mut pairs = Pairs::new();
    for w in 0..words.len.len() {
        let c = words.count[w];
        for win in words.get(w).windows(2) {
            let (id, _) = pairs.id(win[0], win[1]);
            pairs.count[id] += c;
            pairs.note_word(id, w as u32);
        }
    }
    let mut heap: BinaryHeap<u128> =
        pairs.count.iter().zip(&pairs.pair).filter(|(&c, _)| c > 0).map(|(&c, &p)| heap_key(c, p)).collect();

    let mut merges: Vec<Pair> = Vec::with_capacity(total as usize);
    let mut created: Vec<usize> = Vec::new();
    let step = (total / 100).max(1);
    while merges.len() < total as usize {
        let Some(top) = heap.pop() else { break };
        let (stored, (a, b)) = heap_unkey(top);
        let (id, _) = pairs.id(a, b);
        let current = pairs.count[id];
        if current <= 0 {
            pairs.pos[id] = Vec::new();
            continue;
        }
        if current != stored {
            heap.push(heap_key(current, (a, b)));
            continue;
        }
        let z = 256 + merges.len() as u32;
        merges.push((a, b));
        let positions = std::mem::take(&mut pairs.pos[id]);
        for &w in &positions {
            merge_word(&mut words, &mut pairs, &mut created, w, (a, b), z);
        }
        pairs.count[id] = 0;
        for &nid in &created {
            let c = pairs.count[nid];
            if c > 0 {
                heap.push(heap_key(c, pairs.pair[nid]));
            } else {
                pairs.pos[nid] = Vec::new();
            }
        }
        created.clear();
        let done = merges.len() as u32;
        if (done % step == 0 || done == total) && !progress(done, total) {
            break;
        }
    }
    Ok(merges)
}

/// Replace every non-overlapping (a, b) in word `w` (left to right) by `z`,
/// updating pair counts and positions. Pairs created here go to `created`.
#[inline]
fn merge_word(words: &mut Words, pairs: &mut Pairs, created: &mut Vec<usize>, w: u32, (a, b): Pair, z: u32) {
    let wi = w as usize;
    let start = words.start[wi];
    let len = words.len[wi] as usize;
    let count = words.count[wi];
    let syms = &mut words.syms[start..start + len];
    let (mut read, mut write) = (0usize, 0usize);
    while read < len {
        if read + 1 < len && syms[read] == a && syms[read + 1] == b {
            if write > 0 {
                let left = syms[write - 1];
                let (old, _) = pairs.id(left, a);
                pairs.count[old] -= count;
                add_created(pairs, created, (left, z), count, w);
            }
            if read + 2 < len {
                let right = syms[read + 2];
                let (old, _) = pairs.id(b, right);
                pairs.count[old] -= count;
                add_created(pairs, created, (z, right), count, w);
            }
            syms[write] = z;
            read += 2;
        } else {
            syms[write] = syms[read];
            read += 1;
        }
        write += 1;
    }
    words.len[wi] = write as u32;
}

#[inline(always)]
fn add_created(pairs: &mut Pairs, created: &mut Vec<usize>, (x, y): Pair, count: i64, w: u32) {
    let (id, new) = pairs.id(x, y);
    if new {
        created.push(id);
    }
    pairs.count[id] += count;
    pairs.note_word(id, w);
}

/// The bytes of every token: 256 single bytes, then one per merge.
pub fn token_bytes(merges: &[Pair]) -> Result<Vec<Vec<u8>>, BpeError> {
    let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for &(a, b) in merges {
        let (Some(left), Some(right)) = (vocab.get(a as usize), vocab.get(b as usize)) else {
            return Err(BpeError::Internal(format!("merge ({a}, {b}) refers to an unknown token")));
        };
        let joined = [left.as_slice(), right.as_slice()].concat();
        vocab.push(joined);
    }
    Ok(vocab)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap as StdMap;

    fn chunks(items: &[(&str, u64)]) -> ChunkMap {
        items.iter().map(|&(s, c)| (s.as_bytes().into(), c)).collect()
    }

    /// Textbook BPE: recount every pair, pick max count then smallest pair.
    fn naive(items: &[(&str, u64)], vocab: u64) -> Vec<Pair> {
        let mut words: Vec<(Vec<u32>, i64)> =
            items.iter().map(|&(s, c)| (s.bytes().map(u32::from).collect(), c as i64)).collect();
        let mut merges = Vec::new();
        for z in 256..vocab as u32 {
            let mut counts: StdMap<Pair, i64> = StdMap::new();
            for (w, c) in &words {
                for p in w.windows(2) {
                    *counts.entry((p[0], p[1])).or_default() += c;
                }
            }
            let Some((&best, _)) = counts.iter().max_by(|x, y| x.1.cmp(y.1).then(y.0.cmp(x.0))) else {
                break;
            };
            merges.push(best);
            for (w, _) in &mut words {
                let mut out = Vec::new();
                let mut i = 0;
                while i < w.len() {
                    if i + 1 < w.len() && (w[i], w[i + 1]) == best {
                        out.push(z);
                        i += 2;
                    } else {
                        out.push(w[i]);
                        i += 1;
                    }
                }
                *w = out;
            }
        }
        merges
    }

    fn learn(items: &[(&str, u64)], vocab: u64) -> Vec<Pair> {
        learn_merges(Words::from_chunks(chunks(items)), vocab, &mut |_, _| true).expect("merges")
    }

    #[test]
    fn matches_naive_bpe() {
        let items = [
            ("aaaaaa", 3),
            ("abab", 5),
            ("banana", 4),
            (" bandana", 2),
            ("aaab", 1),
            ("xyzxyz", 2),
            ("ab", 7),
            ("a", 100),
        ];
        for vocab in [256, 257, 260, 270, 300] {
            assert_eq!(learn(&items, vocab), naive(&items, vocab), "vocab {vocab}");
        }
    }

    #[test]
    fn ties_break_to_the_smallest_pair() {
        // (b,c) and (a,b) both occur twice; (a,b) < (b,c).
        assert_eq!(learn(&[("ab", 2), ("bc", 2)], 257), vec![(97, 98)]);
    }

    #[test]
    fn stops_when_no_pair_is_left() {
        assert_eq!(learn(&[("ab", 1)], 1000).len(), 1);
    }

    #[test]
    fn vocab_below_256_is_rejected() {
        let r = learn_merges(Words::from_chunks(chunks(&[("ab", 1)])), 255, &mut |_, _| true);
        assert!(matches!(r, Err(BpeError::VocabTooSmall(255))));
    }

    #[test]
    fn token_bytes_follow_merges() {
        let vocab = token_bytes(&[(97, 98), (256, 99)]).expect("vocab");
        assert_eq!(vocab.len(), 258);
        assert_eq!(vocab[257], b"abc");
        assert!(token_bytes(&[(999, 1)]).is_err());
    }
}
