//! Character classes used by the GPT-4 split pattern: `\p{L}`, `\p{N}`, `\s`.
//!
//! The hand-written pre-tokenizer in `pretok.rs` must agree with `fancy-regex`
//! (and so with tiktoken) on every code point, so the classes are not taken from
//! `char::is_alphabetic` & co. (which use different Unicode properties) but from
//! the very tables `regex-syntax` compiles `\p{L}`, `\p{N}` and `\s` into.
//! They are flattened once per process into a 64 Ki-entry lookup table for the
//! Basic Multilingual Plane plus a sorted range list for the astral planes.

use std::sync::OnceLock;

use regex_syntax::hir::{Class as HirClass, HirKind};

use crate::error::BpeError;

/// The class of one code point as far as the GPT-4 pattern cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CharClass {
    /// `\p{L}`: any letter.
    Letter = 0,
    /// `\p{N}`: any number (digits, numerals, fractions...).
    Number = 1,
    /// `\s`: Unicode `White_Space`.
    Space = 2,
    /// Everything else (punctuation, symbols, marks, controls...).
    Other = 3,
}

/// Code point → class lookup, built from regex-syntax's Unicode tables.
pub struct ClassTable {
    /// Class of every code point below U+10000.
    bmp: Box<[CharClass]>,
    /// Sorted, disjoint `(start, end_inclusive, class)` ranges above U+FFFF.
    astral: Vec<(u32, u32, CharClass)>,
}

const BMP_SIZE: usize = 0x1_0000;

impl ClassTable {
    /// The process-wide table (built on first use, ~0.2 ms).
    pub fn get() -> Result<&'static ClassTable, BpeError> {
        static TABLE: OnceLock<Result<ClassTable, String>> = OnceLock::new();
        TABLE
            .get_or_init(ClassTable::build)
            .as_ref()
            .map_err(|e| BpeError::Internal(format!("building Unicode class tables: {e}")))
    }

    fn build() -> Result<ClassTable, String> {
        let mut bmp = vec![CharClass::Other; BMP_SIZE].into_boxed_slice();
        let mut astral = Vec::new();
        for (expr, class) in [(r"\p{L}", CharClass::Letter), (r"\p{N}", CharClass::Number), (r"\s", CharClass::Space)] {
            for (start, end) in unicode_ranges(expr)? {
                for cp in start..=end.min(BMP_SIZE as u32 - 1) {
                    bmp[cp as usize] = class;
                }
                if end >= BMP_SIZE as u32 {
                    astral.push((start.max(BMP_SIZE as u32), end, class));
                }
            }
        }
        astral.sort_unstable_by_key(|&(start, _, _)| start);
        Ok(ClassTable { bmp, astral })
    }

    /// The class of code point `cp` (any `u32`; non-characters are `Other`).
    #[inline(always)]
    pub fn class(&self, cp: u32) -> CharClass {
        match self.bmp.get(cp as usize) {
            Some(&class) => class,
            None => self.astral_class(cp),
        }
    }

    #[cold]
    fn astral_class(&self, cp: u32) -> CharClass {
        let idx = self.astral.partition_point(|&(start, _, _)| start <= cp);
        match idx.checked_sub(1).and_then(|i| self.astral.get(i)) {
            Some(&(_, end, class)) if cp <= end => class,
            _ => CharClass::Other,
        }
    }
}

/// The code point ranges a Unicode class expression such as `\p{L}` matches.
fn unicode_ranges(expr: &str) -> Result<Vec<(u32, u32)>, String> {
    let hir = regex_syntax::parse(expr).map_err(|e| format!("{expr}: {e}"))?;
    match hir.kind() {
        HirKind::Class(HirClass::Unicode(class)) => {
            Ok(class.ranges().iter().map(|r| (r.start() as u32, r.end() as u32)).collect())
        }
        other => Err(format!("{expr} did not compile to a Unicode class: {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> &'static ClassTable {
        ClassTable::get().expect("class table")
    }

    #[test]
    fn ascii_classes() {
        let t = table();
        assert_eq!(t.class('a' as u32), CharClass::Letter);
        assert_eq!(t.class('Z' as u32), CharClass::Letter);
        assert_eq!(t.class('7' as u32), CharClass::Number);
        for ws in [' ', '\t', '\n', '\r', '\x0b', '\x0c'] {
            assert_eq!(t.class(ws as u32), CharClass::Space, "{ws:?}");
        }
        for other in ['!', '\'', '_', '\0', '\x7f'] {
            assert_eq!(t.class(other as u32), CharClass::Other, "{other:?}");
        }
    }

    #[test]
    fn non_ascii_classes() {
        let t = table();
        assert_eq!(t.class('é' as u32), CharClass::Letter);
        assert_eq!(t.class('中' as u32), CharClass::Letter);
        assert_eq!(t.class('½' as u32), CharClass::Number); // No
        assert_eq!(t.class('Ⅻ' as u32), CharClass::Number); // Nl
        assert_eq!(t.class('\u{a0}' as u32), CharClass::Space);
        assert_eq!(t.class('\u{85}' as u32), CharClass::Space);
        assert_eq!(t.class('\u{3000}' as u32), CharClass::Space);
        assert_eq!(t.class('\u{301}' as u32), CharClass::Other); // combining mark
        assert_eq!(t.class('😀' as u32), CharClass::Other);
        assert_eq!(t.class('𝐀' as u32), CharClass::Letter); // astral letter
        assert_eq!(t.class('𝟙' as u32), CharClass::Number); // astral digit
        assert_eq!(t.class(0x10_FFFF), CharClass::Other);
    }

    #[test]
    fn agrees_with_regex_on_every_code_point() {
        let t = table();
        let letter = fancy_regex::Regex::new(r"^\p{L}$").expect("regex");
        let number = fancy_regex::Regex::new(r"^\p{N}$").expect("regex");
        let space = fancy_regex::Regex::new(r"^\s$").expect("regex");
        // every 7th code point keeps the test fast while crossing every block
        for cp in (0..0x11_0000u32).step_by(7) {
            let Some(c) = char::from_u32(cp) else {
                continue;
            };
            let s = c.to_string();
            let expected = if letter.is_match(&s).expect("match") {
                CharClass::Letter
            } else if number.is_match(&s).expect("match") {
                CharClass::Number
            } else if space.is_match(&s).expect("match") {
                CharClass::Space
            } else {
                CharClass::Other
            };
            assert_eq!(t.class(cp), expected, "U+{cp:04X}");
        }
    }
}
