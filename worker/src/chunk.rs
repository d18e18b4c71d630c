//! Token-based chunking of documents longer than a pipeline's input budget.
//!
//! Chunks are runs of whole lines packed up to the budget in tokens (the model's own
//! tokenizer counts them); each chunk after the first starts with the last lines of the one
//! before, up to the overlap in tokens, so a result on a line near a cut is read whole at
//! least once. A line longer than the budget is cut at whitespace into pieces that fit.
//! Offsets are characters of the whole document, so what is found in a chunk maps back by
//! adding the chunk's start.

/// A piece of a document: character span `[start, end)` and its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub start: usize,
    pub end: usize,
    pub text: String,
    /// Tokens in the chunk, as counted line by line.
    pub tokens: usize,
}

/// A line (or a piece of an over-long line) with its character span and token count.
struct Unit {
    start: usize,
    end: usize,
    tokens: usize,
}

/// Splits `text` into chunks of at most `budget` tokens (counted by `count`) that overlap by
/// up to `overlap` tokens. A text within the budget is one chunk.
pub fn chunk_by_tokens(text: &str, budget: usize, overlap: usize, count: &dyn Fn(&str) -> usize) -> Vec<Chunk> {
    let budget = budget.max(1);
    let chars: Vec<char> = text.chars().collect();
    let slice = |s: usize, e: usize| chars[s..e].iter().collect::<String>();
    let total = count(text);
    if total <= budget {
        return vec![Chunk { start: 0, end: chars.len(), text: text.to_string(), tokens: total }];
    }
    // Lines, each with its line break.
    let mut units = Vec::new();
    let mut s = 0;
    for (i, &c) in chars.iter().enumerate() {
        if c == '\n' || i + 1 == chars.len() {
            split_line(&chars, s, i + 1, budget, count, &mut units);
            s = i + 1;
        }
    }
    let overlap = overlap.min(budget / 2);
    let mut chunks = Vec::new();
    let mut first = 0;
    while first < units.len() {
        let mut last = first;
        let mut tokens = units[first].tokens;
        while last + 1 < units.len() && tokens + units[last + 1].tokens <= budget {
            last += 1;
            tokens += units[last].tokens;
        }
        let (start, end) = (units[first].start, units[last].end);
        chunks.push(Chunk { start, end, text: slice(start, end), tokens });
        if last + 1 == units.len() {
            break;
        }
        // Step back over trailing lines worth up to `overlap` tokens, always moving forward.
        let mut next = last + 1;
        let mut back = 0;
        while next > first + 1 && back + units[next - 1].tokens <= overlap {
            next -= 1;
            back += units[next].tokens;
        }
        first = next;
    }
    chunks
}

/// Adds the line `[s, e)` as one unit, or as pieces within `budget` cut at whitespace.
fn split_line(chars: &[char], s: usize, e: usize, budget: usize, count: &dyn Fn(&str) -> usize, out: &mut Vec<Unit>) {
    let text: String = chars[s..e].iter().collect();
    let tokens = count(&text);
    if tokens <= budget || e - s < 2 {
        out.push(Unit { start: s, end: e, tokens });
        return;
    }
    // Cut near the middle, at whitespace when there is some.
    let mid = s + (e - s) / 2;
    let cut = (s + 1..e).filter(|&i| chars[i - 1].is_whitespace()).min_by_key(|&i| i.abs_diff(mid)).unwrap_or(mid);
    split_line(chars, s, cut, budget, count, out);
    split_line(chars, cut, e, budget, count, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per whitespace-separated word (and per line break).
    fn words(s: &str) -> usize {
        s.split_whitespace().count() + s.matches('\n').count()
    }

    fn report(lines: usize) -> String {
        (0..lines).map(|i| format!("Test{i} {i}.5 mmol/L\n")).collect()
    }

    #[test]
    fn a_short_document_is_one_chunk() {
        let t = report(3);
        let c = chunk_by_tokens(&t, 100, 10, &words);
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].start, c[0].end, c[0].text.as_str()), (0, t.chars().count(), t.as_str()));
    }

    #[test]
    fn chunks_are_whole_lines_within_budget_overlapping_and_covering_everything() {
        let t = report(40); // 4 tokens a line
        let c = chunk_by_tokens(&t, 20, 8, &words);
        assert!(c.len() > 3, "{}", c.len());
        let chars: Vec<char> = t.chars().collect();
        assert_eq!(c[0].start, 0);
        assert_eq!(c.last().unwrap().end, chars.len());
        for (k, ch) in c.iter().enumerate() {
            assert!(ch.tokens <= 20);
            assert_eq!(ch.text, chars[ch.start..ch.end].iter().collect::<String>());
            assert!(ch.start == 0 || chars[ch.start - 1] == '\n', "chunk {k} starts mid-line");
            assert!(ch.text.ends_with('\n'));
            if k > 0 {
                // Two lines (8 tokens) of overlap, and progress.
                let prev: Vec<&str> = c[k - 1].text.lines().collect();
                let head: Vec<&str> = ch.text.lines().take(2).collect();
                assert_eq!(head, prev[prev.len() - 2..]);
                assert!(ch.start > c[k - 1].start);
            }
        }
    }

    #[test]
    fn a_line_longer_than_the_budget_is_cut_at_whitespace() {
        let long = format!("{}\nshort line\n", "word ".repeat(30).trim_end());
        let c = chunk_by_tokens(&long, 8, 2, &words);
        assert!(c.iter().all(|ch| ch.tokens <= 8));
        let joined: String = {
            let mut v: Vec<&Chunk> = c.iter().collect();
            v.dedup_by_key(|ch| ch.start);
            // Without overlap (2 < one piece) the chunks tile the text.
            v.iter().map(|ch| ch.text.as_str()).collect()
        };
        assert_eq!(joined, long);
        assert!(c.iter().all(|ch| !ch.text.starts_with("ord")));
    }
}
