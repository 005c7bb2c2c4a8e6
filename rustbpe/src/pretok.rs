//! Pre-tokenization: splitting text into the chunks BPE works inside.
//!
//! `Splitter::new(pattern)` recognises the GPT-4 split pattern (with numbers in
//! groups of 1, 2 or 3 digits; nanochat uses 2) and then runs a hand-written
//! scanner that produces exactly the chunks `fancy-regex` would, several times
//! faster. Any other pattern runs through `fancy-regex` itself.
//!
//! The scanner also knows *safe cuts*: a position right after a letter and
//! before a non-letter is always a chunk boundary, whatever surrounds it, so a
//! long document can be cut there and its pieces split independently (in
//! parallel, or block by block from a file) with identical results.

use fancy_regex::Regex;

use crate::classes::{CharClass, ClassTable};
use crate::error::BpeError;

/// The GPT-4 pattern with numbers split into groups of 1–2 digits (nanochat's).
pub const GPT4_PATTERN: &str =
    r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// The GPT-4 pattern with at most `max_digits` digits per number chunk.
pub fn gpt4_pattern(max_digits: usize) -> String {
    GPT4_PATTERN.replace(r"\p{N}{1,2}", &format!(r"\p{{N}}{{1,{max_digits}}}"))
}

/// Splits text into chunks, by the fast scanner or by a regex.
pub enum Splitter {
    /// The GPT-4 pattern, scanned by hand.
    Gpt4 { max_digits: usize, table: &'static ClassTable },
    /// Any other pattern.
    Regex(Box<Regex>),
}

impl Splitter {
    /// A splitter for `pattern`; the fast scanner when the pattern is GPT-4's.
    pub fn new(pattern: &str) -> Result<Splitter, BpeError> {
        for max_digits in 1..=3 {
            if pattern == gpt4_pattern(max_digits) {
                return Ok(Splitter::Gpt4 { max_digits, table: ClassTable::get()? });
            }
        }
        Splitter::regex(pattern)
    }

    /// Always the regex engine, even for the GPT-4 pattern (tests use it as
    /// the reference for the scanner).
    pub fn regex(pattern: &str) -> Result<Splitter, BpeError> {
        Regex::new(pattern)
            .map(|r| Splitter::Regex(Box::new(r)))
            .map_err(|e| BpeError::InvalidPattern { pattern: pattern.to_owned(), reason: e.to_string() })
    }

    /// Whether documents can be cut at safe cuts (only for the scanner).
    pub fn supports_cuts(&self) -> bool {
        matches!(self, Splitter::Gpt4 { .. })
    }

    /// Call `f` on every chunk of `text`, in order.
    pub fn for_each_chunk<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> Result<(), BpeError> {
        match self {
            Splitter::Gpt4 { max_digits, table } => {
                let scanner = Scanner { s: text.as_bytes(), table, max_digits: *max_digits };
                let mut i = 0;
                while i < text.len() {
                    let end = scanner.chunk_end(i);
                    f(text.get(i..end).ok_or_else(|| {
                        BpeError::Internal(format!("scanner produced a non-boundary chunk {i}..{end}"))
                    })?);
                    i = end;
                }
                Ok(())
            }
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| BpeError::InvalidPattern {
                        pattern: re.as_str().to_owned(),
                        reason: format!("matching failed: {e}"),
                    })?;
                    f(m.as_str());
                }
                Ok(())
            }
        }
    }

    /// All chunks of `text` (convenience for tests and the `split` binding).
    pub fn chunks<'t>(&self, text: &'t str) -> Result<Vec<&'t str>, BpeError> {
        let mut out = Vec::new();
        self.for_each_chunk(text, |c| out.push(c))?;
        Ok(out)
    }

    /// The first safe cut at or after byte `from` (a chunk boundary that does
    /// not depend on the text around it), or `None`.
    pub fn safe_cut_after(&self, text: &str, from: usize) -> Option<usize> {
        let Splitter::Gpt4 { table, .. } = self else {
            return None;
        };
        let mut prev_letter = false;
        let start = (from.saturating_sub(4)..=from).find(|&i| text.is_char_boundary(i))?;
        for (off, c) in text.get(start..)?.char_indices() {
            let letter = table.class(c as u32) == CharClass::Letter;
            if prev_letter && !letter && start + off >= from {
                return Some(start + off);
            }
            prev_letter = letter;
        }
        None
    }

    /// The last safe cut in `text` (strictly inside it), or `None`.
    pub fn last_safe_cut(&self, text: &str) -> Option<usize> {
        let Splitter::Gpt4 { table, .. } = self else {
            return None;
        };
        let mut next_is_letter: Option<bool> = None;
        for (off, c) in text.char_indices().rev() {
            let letter = table.class(c as u32) == CharClass::Letter;
            if letter && next_is_letter == Some(false) {
                return Some(off + c.len_utf8());
            }
            next_is_letter = Some(letter);
        }
        None
    }
}

/// What `(?i:[sdmt])`, `(?i:l)`, `(?i:[vr])` and `(?i:e)` match under Unicode
/// case folding (U+017F LATIN SMALL LETTER LONG S folds to 's').
const FOLD_SDMT: &[char] = &['s', 'S', '\u{17f}', 'd', 'D', 'm', 'M', 't', 'T'];
const FOLD_L: &[char] = &['l', 'L'];
const FOLD_VR: &[char] = &['v', 'V', 'r', 'R'];
const FOLD_E: &[char] = &['e', 'E'];

/// The hand-written GPT-4 pattern matcher over one string.
struct Scanner<'a> {
    s: &'a [u8],
    table: &'a ClassTable,
    max_digits: usize,
}

impl Scanner<'_> {
    /// The code point at byte `i` (a char boundary) and its UTF-8 length.
    #[inline(always)]
    fn decode(&self, i: usize) -> (u32, usize) {
        let s = self.s;
        let b0 = s[i] as u32;
        if b0 < 0x80 {
            (b0, 1)
        } else if b0 < 0xE0 {
            (((b0 & 0x1F) << 6) | (s[i + 1] as u32 & 0x3F), 2)
        } else if b0 < 0xF0 {
            (((b0 & 0x0F) << 12) | ((s[i + 1] as u32 & 0x3F) << 6) | (s[i + 2] as u32 & 0x3F), 3)
        } else {
            let cp = ((b0 & 0x07) << 18)
                | ((s[i + 1] as u32 & 0x3F) << 12)
                | ((s[i + 2] as u32 & 0x3F) << 6)
                | (s[i + 3] as u32 & 0x3F);
            (cp, 4)
        }
    }

    /// Class of the char at `i`, with its length; `None` at the end.
    #[inline(always)]
    fn class_at(&self, i: usize) -> Option<(CharClass, u32, usize)> {
        if i >= self.s.len() {
            return None;
        }
        let (cp, len) = self.decode(i);
        Some((self.table.class(cp), cp, len))
    }

    /// Skip chars of `class` starting at `i`.
    #[inline(always)]
    fn skip(&self, mut i: usize, class: CharClass) -> usize {
        while let Some((c, _, len)) = self.class_at(i) {
            if c != class {
                break;
            }
            i += len;
        }
        i
    }

    #[inline(always)]
    fn skip_newlines(&self, mut i: usize) -> usize {
        while i < self.s.len() && (self.s[i] == b'\r' || self.s[i] == b'\n') {
            i += 1;
        }
        i
    }

    /// `(?i:[sdmt]|ll|ve|re)` right after an apostrophe at `i - 1`.
    fn contraction_end(&self, i: usize) -> Option<usize> {
        let (_, c1, l1) = self.class_at(i)?;
        let is = |c: u32, set: &[char]| set.iter().any(|&x| x as u32 == c);
        if is(c1, FOLD_SDMT) {
            return Some(i + l1);
        }
        let (_, c2, l2) = self.class_at(i + l1)?;
        let pair = (is(c1, FOLD_L) && is(c2, FOLD_L)) || (is(c1, FOLD_VR) && is(c2, FOLD_E));
        pair.then_some(i + l1 + l2)
    }

    /// End of the chunk that starts at byte `i` (the alternatives of the
    /// pattern tried in order, as a backtracking regex engine would).
    fn chunk_end(&self, i: usize) -> usize {
        use CharClass::*;
        let Some((k0, c0, l0)) = self.class_at(i) else {
            return i;
        };
        let j = i + l0;
        // 1. '(?i:[sdmt]|ll|ve|re)
        if c0 == u32::from(b'\'') {
            if let Some(end) = self.contraction_end(j) {
                return end;
            }
        }
        // 2. [^\r\n\p{L}\p{N}]?+\p{L}+
        if k0 == Letter {
            return self.skip(j, Letter);
        }
        let newline = c0 == u32::from(b'\r') || c0 == u32::from(b'\n');
        let next = self.class_at(j);
        if k0 != Number && !newline {
            if let Some((Letter, _, l1)) = next {
                return self.skip(j + l1, Letter);
            }
        }
        // 3. \p{N}{1,max}
        if k0 == Number {
            let mut end = j;
            for _ in 1..self.max_digits {
                match self.class_at(end) {
                    Some((Number, _, len)) => end += len,
                    _ => break,
                }
            }
            return end;
        }
        // 4. ' ?[^\s\p{L}\p{N}]++[\r\n]*'
        if k0 == Other {
            return self.skip_newlines(self.skip(j, Other));
        }
        if c0 == u32::from(b' ') {
            if let Some((Other, _, l1)) = next {
                return self.skip_newlines(self.skip(j + l1, Other));
            }
        }
        // k0 == Space. 5. \s*[\r\n]   6. \s+(?!\S)   7. \s+
        let mut end = i;
        let mut last_start = i;
        let mut last_newline_end = None;
        while let Some((Space, c, len)) = self.class_at(end) {
            if c == u32::from(b'\r') || c == u32::from(b'\n') {
                last_newline_end = Some(end + len);
            }
            last_start = end;
            end += len;
        }
        if let Some(e) = last_newline_end {
            return e;
        }
        if end == self.s.len() || last_start == i {
            return end;
        }
        last_start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(pattern: &str) -> (Splitter, Splitter) {
        (Splitter::new(pattern).expect("fast"), Splitter::regex(pattern).expect("regex"))
    }

    fn assert_same(fast: &Splitter, slow: &Splitter, text: &str) {
        assert_eq!(fast.chunks(text).expect("fast"), slow.chunks(text).expect("slow"), "{text:?}");
    }

    #[test]
    fn gpt4_pattern_is_recognised() {
        assert!(matches!(Splitter::new(GPT4_PATTERN), Ok(Splitter::Gpt4 { max_digits: 2, .. })));
        assert!(matches!(Splitter::new(&gpt4_pattern(3)), Ok(Splitter::Gpt4 { max_digits: 3, .. })));
        assert!(matches!(Splitter::new(r"\w+|\W"), Ok(Splitter::Regex(_))));
        assert!(matches!(Splitter::new(r"(unclosed"), Err(BpeError::InvalidPattern { .. })));
    }

    #[test]
    fn known_splits() {
        let s = Splitter::new(GPT4_PATTERN).expect("splitter");
        let got = s.chunks("Hello world's 12345 !!\n\n  x\ty").expect("chunks");
        assert_eq!(got, ["Hello", " world", "'s", " ", "12", "34", "5", " !!\n\n", " ", " x", "\ty"]);
    }

    const ALPHABET: &[char] = &[
        'a', 'b', 'S', 's', 'l', 'L', 'v', 'e', 'E', 'r', 't', 'd', 'm', 'K', '\u{17f}', '\u{212a}', '\'', ' ', ' ',
        '\t', '\n', '\r', '\x0b', '\u{a0}', '\u{85}', '\u{2028}', '\u{3000}', '1', '2', '٣', '½', '.', ',', '!', '-',
        '(', '"', 'é', '中', 'ß', '\u{301}', '😀', '𝐀', '𝟙', '_', '\0',
    ];

    /// Deterministic pseudo-random strings over a nasty alphabet.
    fn random_texts(n: usize, max_len: usize) -> Vec<String> {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        (0..n)
            .map(|_| {
                let len = (next() % max_len as u64) as usize;
                (0..len).map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize]).collect()
            })
            .collect()
    }

    #[test]
    fn scanner_matches_fancy_regex_on_random_text() {
        for digits in 1..=3 {
            let (fast, slow) = both(&gpt4_pattern(digits));
            for text in random_texts(3000, 40) {
                assert_same(&fast, &slow, &text);
            }
        }
    }

    #[test]
    fn scanner_matches_fancy_regex_on_edge_cases() {
        let (fast, slow) = both(GPT4_PATTERN);
        for text in [
            "",
            " ",
            "  ",
            "\n",
            " \n ",
            "a  ",
            "  a",
            " \t\n\r\n  b",
            "'",
            "'s",
            "'S",
            "'ſ",
            "'ll",
            "'LL",
            "'Ve",
            "'re'",
            "x'",
            "''s",
            "   !!!\r\n\r\nz",
            " 1",
            "a1b",
            "١٢٣٤٥",
            "..a",
            "\u{a0}b",
            "\r\nb",
            "tab\t\tend",
            "end   ",
            "😀😀 😀a",
            "a\u{301}b",
            "\n\n\n",
            "a\u{2028}b",
        ] {
            assert_same(&fast, &slow, text);
        }
    }

    #[test]
    fn contraction_case_folding_is_complete() {
        for (class, set) in [("[sdmt]", FOLD_SDMT), ("l", FOLD_L), ("[vr]", FOLD_VR), ("e", FOLD_E)] {
            let re = Regex::new(&format!("^(?i:{class})$")).expect("regex");
            let matched: Vec<char> = (0..0x11_0000u32)
                .filter_map(char::from_u32)
                .filter(|c| re.is_match(&c.to_string()).expect("m"))
                .collect();
            let mut expected = set.to_vec();
            expected.sort_unstable();
            assert_eq!(matched, expected, "(?i:{class})");
        }
    }

    #[test]
    fn safe_cuts_do_not_change_chunks() {
        let s = Splitter::new(GPT4_PATTERN).expect("splitter");
        for text in random_texts(500, 200) {
            let whole = s.chunks(&text).expect("chunks");
            let mut from = 0;
            let mut parts = Vec::new();
            while let Some(cut) = s.safe_cut_after(&text, from + 7) {
                parts.push(&text[from..cut]);
                from = cut;
            }
            parts.push(&text[from..]);
            let pieced: Vec<&str> = parts.iter().flat_map(|p| s.chunks(p).expect("chunks")).collect();
            assert_eq!(whole, pieced, "{text:?}");
            if let Some(cut) = s.last_safe_cut(&text) {
                let mut two = s.chunks(&text[..cut]).expect("chunks");
                two.extend(s.chunks(&text[cut..]).expect("chunks"));
                assert_eq!(whole, two, "{text:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn regex_splitter_has_no_cuts() {
        let s = Splitter::new(r"\w+|\W").expect("regex");
        assert!(!s.supports_cuts());
        assert_eq!(s.safe_cut_after("hello world", 0), None);
        assert_eq!(s.chunks("ab c").expect("chunks"), ["ab", " ", "c"]);
    }
}
