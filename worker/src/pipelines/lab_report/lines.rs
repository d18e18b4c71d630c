//! Lines of a document with their character offsets.

use super::items::Span;

/// A line of the document without its terminator (`\n`, `\r\n` or `\r`, so HL7 segments
/// separated by carriage returns are lines too).
#[derive(Clone, Copy, Debug)]
pub(super) struct Line<'a> {
    /// Character offset of the first character.
    pub(super) start: usize,
    /// Byte offset of the first character.
    pub(super) byte_start: usize,
    pub(super) text: &'a str,
}

impl<'a> Line<'a> {
    pub(super) fn byte_end(&self) -> usize {
        self.byte_start + self.text.len()
    }

    pub(super) fn char_end(&self) -> usize {
        self.start + self.text.chars().count()
    }

    /// Character span and text of the line without surrounding whitespace.
    pub(super) fn trimmed(&self) -> (usize, usize, &'a str) {
        let lead = self.text.len() - self.text.trim_start().len();
        let t = self.text.trim();
        let start = self.start + self.text[..lead].chars().count();
        (start, start + t.chars().count(), t)
    }
}

pub(super) fn split_lines(text: &str) -> Vec<Line<'_>> {
    let mut lines = Vec::new();
    let mut chars = text.char_indices().peekable();
    let (mut line_byte, mut line_char, mut pos) = (0, 0, 0);
    while let Some((byte, c)) = chars.next() {
        if c != '\n' && c != '\r' {
            pos += 1;
            continue;
        }
        lines.push(Line { start: line_char, byte_start: line_byte, text: &text[line_byte..byte] });
        pos += 1;
        line_byte = byte + 1;
        if c == '\r' && chars.peek().is_some_and(|&(_, next)| next == '\n') {
            chars.next();
            pos += 1;
            line_byte += 1;
        }
        line_char = pos;
    }
    if line_byte < text.len() {
        lines.push(Line { start: line_char, byte_start: line_byte, text: &text[line_byte..] });
    }
    lines
}

pub(super) fn overlaps_any(spans: &[Span], start: usize, end: usize) -> bool {
    spans.iter().any(|&(s, e)| s < end && start < e)
}

/// The characters `start..end` of `text` (tests compare spans with what they cover).
#[cfg(test)]
pub(super) fn span_text(text: &str, start: usize, end: usize) -> String {
    text.chars().skip(start).take(end - start).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- lines ----

    #[test]
    fn split_lines_handles_all_terminators_and_multibyte() {
        let text = "aµ\r\nb°\rc\n\nd±";
        let lines = split_lines(text);
        let got: Vec<(usize, &str)> = lines.iter().map(|l| (l.start, l.text)).collect();
        assert_eq!(got, vec![(0, "aµ"), (4, "b°"), (7, "c"), (9, ""), (10, "d±")]);
        for l in &lines {
            assert_eq!(span_text(text, l.start, l.char_end()), l.text);
        }
    }
}
