//! Encoding text with mergeable ranks, the way tiktoken does.
//!
//! Exists so tests can check that a trained artifact loaded into
//! `tiktoken.Encoding` tokenizes exactly like this crate: same pre-tokenizer
//! chunks (our scanner vs tiktoken's regex engine) and same rank-driven
//! merging (inside a chunk, repeatedly join the adjacent parts whose joined
//! bytes have the lowest rank; leftmost on a tie).

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::error::BpeError;
use crate::pretok::Splitter;

/// Token bytes → rank (= token id), plus the splitter.
pub struct Encoder {
    splitter: Splitter,
    ranks: FxHashMap<Vec<u8>, u32>,
}

impl Encoder {
    /// An encoder from `(bytes, rank)` pairs; every byte must have a rank.
    pub fn new(splitter: Splitter, ranks: Vec<(Vec<u8>, u32)>) -> Result<Encoder, BpeError> {
        let n = ranks.len();
        let ranks: FxHashMap<Vec<u8>, u32> = ranks.into_iter().collect();
        if ranks.len() != n {
            return Err(BpeError::BadRanks("the same bytes appear twice".into()));
        }
        if let Some(b) = (0..=255u8).find(|b| !ranks.contains_key([*b].as_slice())) {
            return Err(BpeError::BadRanks(format!("byte {b} has no rank")));
        }
        Ok(Encoder { splitter, ranks })
    }

    /// Token ids of `text` (no special tokens).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, BpeError> {
        let mut out = Vec::with_capacity(text.len() / 3);
        self.splitter.for_each_chunk(text, |chunk| self.encode_chunk(chunk.as_bytes(), &mut out))?;
        Ok(out)
    }

    /// `encode` over many texts, in parallel.
    pub fn encode_batch(&self, texts: &[String]) -> Result<Vec<Vec<u32>>, BpeError> {
        texts.par_iter().map(|t| self.encode(t)).collect()
    }

    fn rank(&self, bytes: &[u8]) -> u32 {
        self.ranks.get(bytes).copied().unwrap_or(u32::MAX)
    }

    fn encode_chunk(&self, piece: &[u8], out: &mut Vec<u32>) {
        if let Some(&r) = self.ranks.get(piece) {
            out.push(r);
            return;
        }
        // bounds[i]..bounds[i + 1] is part i; rank[i] is the rank of joining
        // part i with part i + 1 (u32::MAX when they cannot join).
        let mut bounds: Vec<usize> = (0..=piece.len()).collect();
        let mut rank: Vec<u32> =
            (0..piece.len()).map(|i| piece.get(i..i + 2).map_or(u32::MAX, |p| self.rank(p))).collect();
        while let Some((i, _)) = rank.iter().enumerate().filter(|&(_, &r)| r != u32::MAX).min_by_key(|&(i, &r)| (r, i))
        {
            bounds.remove(i + 1);
            rank.remove(i + 1);
            let joined = |j: usize| match (bounds.get(j), bounds.get(j + 2)) {
                (Some(&s), Some(&e)) => self.rank(&piece[s..e]),
                _ => u32::MAX,
            };
            rank[i] = joined(i);
            if i > 0 {
                rank[i - 1] = joined(i - 1);
            }
        }
        out.extend(bounds.windows(2).map(|w| self.rank(&piece[w[0]..w[1]])));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretok::GPT4_PATTERN;

    fn encoder(extra: &[&[u8]]) -> Encoder {
        let mut ranks: Vec<(Vec<u8>, u32)> = (0..=255u8).map(|b| (vec![b], u32::from(b))).collect();
        for (i, e) in extra.iter().enumerate() {
            ranks.push((e.to_vec(), 256 + i as u32));
        }
        Encoder::new(Splitter::new(GPT4_PATTERN).expect("splitter"), ranks).expect("encoder")
    }

    #[test]
    fn merges_by_lowest_rank() {
        let e = encoder(&[b"bc", b"ab", b"abc", b" a"]);
        // "abc": "bc" (256) joins first, then "a"+"bc" = "abc" (258).
        assert_eq!(e.encode("abc").expect("encode"), vec![258]);
        assert_eq!(e.encode("abd").expect("encode"), vec![257, 100]);
        assert_eq!(e.encode(" ab").expect("encode"), vec![32, 257]); // "ab" (257) beats " a" (259)
        assert_eq!(e.encode(" ax").expect("encode"), vec![259, 120]);
        assert_eq!(e.encode("").expect("encode"), Vec::<u32>::new());
    }

    #[test]
    fn byte_fallback_round_trips() {
        let e = encoder(&[]);
        let text = "héllo 😀";
        let ids = e.encode(text).expect("encode");
        let bytes: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
        assert_eq!(bytes, text.as_bytes());
    }

    #[test]
    fn rejects_incomplete_ranks() {
        let ranks = vec![(vec![0u8], 0u32)];
        let splitter = Splitter::new(GPT4_PATTERN).expect("splitter");
        assert!(matches!(Encoder::new(splitter, ranks), Err(BpeError::BadRanks(_))));
    }
}
