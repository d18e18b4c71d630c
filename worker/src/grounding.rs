//! Aligning a quoted piece of evidence to character offsets in the source text: exact match
//! first, then a case- and whitespace-normalized match, then the closest fuzzy match above a
//! similarity threshold.
//!
//! The fuzzy step is approximate substring matching (Sellers' edit-distance recurrence,
//! O(quote × source)); it is written here because it needs the matched span's offsets,
//! which the string-similarity crates (whole-string distances) do not give.

/// How a quote was found in the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alignment {
    /// The quote occurs verbatim.
    Exact,
    /// It occurs once case and runs of whitespace are ignored (and decimal commas read as
    /// points).
    Normalized,
    /// A span within the edit-distance threshold matches it.
    Fuzzy,
    /// It was not found; the item is kept and flagged.
    None,
}

impl Alignment {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Normalized => "normalized",
            Self::Fuzzy => "fuzzy",
            Self::None => "none",
        }
    }
}

/// Least similarity (1 − edits / quote length) for a fuzzy match.
pub const FUZZY_THRESHOLD: f64 = 0.8;
/// Shortest quote (in characters) aligned fuzzily; shorter ones must match exactly or
/// normalized (a 3-character quote within one edit matches almost anything).
pub const FUZZY_MIN_CHARS: usize = 5;

/// A quote located in the source: character span (end exclusive) and how it was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Located {
    pub start: usize,
    pub end: usize,
    pub alignment: Alignment,
}

/// Finds `quote` in `source`. Offsets are in characters (Unicode scalar values) of
/// `source`. Returns None when the quote is empty or not found at all.
pub fn align(quote: &str, source: &str) -> Option<Located> {
    let quote = quote.trim();
    if quote.is_empty() {
        return None;
    }
    if let Some(b) = source.find(quote) {
        let start = source[..b].chars().count();
        return Some(Located { start, end: start + quote.chars().count(), alignment: Alignment::Exact });
    }
    let (ns, map) = normalize(source);
    let (nq, _) = normalize(quote);
    if nq.is_empty() {
        return None;
    }
    let ns_chars: Vec<char> = ns.chars().collect();
    let nq_chars: Vec<char> = nq.chars().collect();
    if let Some(i) = find_chars(&ns_chars, &nq_chars) {
        let (start, end) = (map[i], map[i + nq_chars.len() - 1] + 1);
        return Some(Located { start, end, alignment: Alignment::Normalized });
    }
    if nq_chars.len() < FUZZY_MIN_CHARS {
        return None;
    }
    let (i, j, dist) = best_substring(&nq_chars, &ns_chars)?;
    let similarity = 1.0 - dist as f64 / nq_chars.len() as f64;
    if similarity < FUZZY_THRESHOLD || j <= i {
        return None;
    }
    // A fuzzy span never ends or starts inside a word of the source.
    let src: Vec<char> = source.chars().collect();
    let (mut start, mut end) = (map[i], map[j - 1] + 1);
    while start > 0 && src[start - 1].is_alphanumeric() && src[start].is_alphanumeric() {
        start -= 1;
    }
    while end < src.len() && src[end - 1].is_alphanumeric() && src[end].is_alphanumeric() {
        end += 1;
    }
    Some(Located { start, end, alignment: Alignment::Fuzzy })
}

/// Whether a quote that was not found in the document was copied from the prompt's
/// examples: it occurs there (trimmed, non-empty) and nowhere in the document.
pub fn from_examples(quote: &str, examples: &str, document: &str) -> bool {
    let q = quote.trim();
    !q.is_empty() && examples.contains(q) && !document.contains(q)
}

/// Lower-cased text with whitespace runs as one space and decimal commas as points, and
/// for each of its characters the index of the source character it came from.
fn normalize(s: &str) -> (String, Vec<usize>) {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::new();
    let mut map = Vec::new();
    let mut last_space = true;
    for (i, &c) in chars.iter().enumerate() {
        if c.is_whitespace() {
            if !last_space {
                out.push(' ');
                map.push(i);
            }
            last_space = true;
            continue;
        }
        last_space = false;
        let decimal_comma =
            c == ',' && i > 0 && chars[i - 1].is_ascii_digit() && chars.get(i + 1).is_some_and(char::is_ascii_digit);
        if decimal_comma {
            out.push('.');
            map.push(i);
            continue;
        }
        for l in c.to_lowercase() {
            out.push(l);
            map.push(i);
        }
    }
    if out.ends_with(' ') {
        out.pop();
        map.pop();
    }
    (out, map)
}

fn find_chars(hay: &[char], needle: &[char]) -> Option<usize> {
    (0..=hay.len().checked_sub(needle.len())?).find(|&i| hay[i..i + needle.len()] == *needle)
}

/// The span `[i, j)` of `text` with the least edit distance to `pattern`, and that distance.
fn best_substring(pattern: &[char], text: &[char]) -> Option<(usize, usize, usize)> {
    let m = pattern.len();
    // prev[k] / cur[k]: distance of pattern[..k] to the best substring ending here, with
    // the start of that substring alongside.
    let mut prev: Vec<(usize, usize)> = (0..=m).map(|k| (k, 0)).collect();
    let mut best: Option<(usize, usize, usize)> = None;
    for (j, &tc) in text.iter().enumerate() {
        let mut cur = vec![(0usize, j + 1); m + 1];
        for k in 1..=m {
            let sub = (prev[k - 1].0 + usize::from(pattern[k - 1] != tc), prev[k - 1].1);
            let del = (prev[k].0 + 1, prev[k].1);
            let ins = (cur[k - 1].0 + 1, cur[k - 1].1);
            cur[k] = [sub, del, ins].into_iter().min_by_key(|c| c.0).expect("three candidates");
        }
        if k_better(best, cur[m].0) {
            best = Some((cur[m].1, j + 1, cur[m].0));
        }
        prev = cur;
        // Row 0 is the empty prefix: a match may start after any character.
        prev[0] = (0, j + 1);
    }
    best
}

fn k_better(best: Option<(usize, usize, usize)>, d: usize) -> bool {
    best.is_none_or(|b| d < b.2)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "Hämoglobin   13,2 g/dl\nCREATININE 1.4 mg/dL (0.6-1.2) H";

    #[test]
    fn exact_match_in_characters() {
        let l = align("13,2 g/dl", SRC).unwrap();
        assert_eq!(l.alignment, Alignment::Exact);
        let chars: Vec<char> = SRC.chars().collect();
        assert_eq!(chars[l.start..l.end].iter().collect::<String>(), "13,2 g/dl");
    }

    #[test]
    fn normalized_match_ignores_case_spacing_and_decimal_commas() {
        let l = align("hämoglobin 13.2", SRC).unwrap();
        assert_eq!(l.alignment, Alignment::Normalized);
        assert_eq!(SRC.chars().skip(l.start).take(l.end - l.start).collect::<String>(), "Hämoglobin   13,2");
        assert_eq!(align("creatinine 1.4", SRC).unwrap().alignment, Alignment::Normalized);
    }

    #[test]
    fn fuzzy_match_within_threshold() {
        let l = align("Creatinin 1.4 mg/dl", SRC).unwrap();
        assert_eq!(l.alignment, Alignment::Fuzzy);
        let span: String = SRC.chars().skip(l.start).take(l.end - l.start).collect();
        assert!(span.starts_with("CREATININE") || span.starts_with("REATININE"), "{span}");
        assert!(span.ends_with("mg/dL"), "{span}");
    }

    #[test]
    fn quotes_copied_from_the_examples_are_told_apart() {
        let examples = "Line: Lipase 88 U/L 13-60 H\nJSON: {\"test\":\"Lipase\",\"value\":\"88\"}";
        assert!(from_examples("Lipase", examples, SRC));
        assert!(from_examples(" 88 ", examples, SRC));
        // In the document too, or nowhere: not a copy from the examples.
        assert!(!from_examples("13", examples, SRC));
        assert!(!from_examples("Amylase", examples, SRC));
        assert!(!from_examples("  ", examples, SRC));
    }

    #[test]
    fn unrelated_or_short_quotes_are_not_found() {
        assert_eq!(align("Potassium 4.1 mmol/L", SRC), None);
        assert_eq!(align("13.3", SRC), None);
        assert_eq!(align("  ", SRC), None);
        assert_eq!(Alignment::None.as_str(), "none");
    }
}
