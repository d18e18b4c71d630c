//! Numbers, reference ranges and flags as printed in reports.

use super::items::Flag;
use regex::Regex;
use std::sync::LazyLock;

/// Reads a plain number: `13.2`, `-2.5`, `1,234.5`, `5,4`, `1.234,5`.
///
/// Comma rule: one comma followed by 1, 2 or 4+ digits is a decimal comma (`5,4` → 5.4);
/// commas between groups of three digits with a dot or a second comma are thousands
/// separators (`1,234.5`, `1,234,567`); `0,125` is a decimal comma (thousands groups never
/// start with 0). A lone `d,ddd` (`1,234`) is ambiguous — 1234 in US reports, 1.234 in
/// European ones (urine specific gravity `1,015`) — and gives `None` rather than a guess.
/// Comparators (`<0.27`, `>60`), words (`negative`) and grades (`1+`) give `None`.
pub fn parse_value(s: &str) -> Option<f64> {
    let s = s.trim();
    if let Some(v) = space_grouped(s) {
        return Some(v);
    }
    let (negative, body) = match s.strip_prefix('-').or_else(|| s.strip_prefix('−')) {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let well_formed = body.starts_with(|c: char| c.is_ascii_digit())
        && body.ends_with(|c: char| c.is_ascii_digit())
        && body.chars().all(|c| c.is_ascii_digit() || c == '.' || c == ',');
    if !well_formed {
        return None;
    }
    let normalized = normalize_separators(body)?;
    let v: f64 = normalized.parse().ok()?;
    v.is_finite().then_some(if negative { -v } else { v })
}

/// A count printed with spaces between groups of three digits (`251 000`, `1 180 000`; a
/// normal or narrow no-break space too), as French and other European reports print
/// thousands: only when every group after the first has three digits and no decimal mark
/// follows a group but the last.
fn space_grouped(s: &str) -> Option<f64> {
    let mut groups = s.split([' ', '\u{a0}', '\u{202f}']);
    let first = groups.next()?;
    let rest: Vec<&str> = groups.collect();
    if rest.is_empty() || !(1..=3).contains(&first.len()) || !first.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let (last, middle) = rest.split_last()?;
    let three = |g: &str| g.len() == 3 && g.chars().all(|c| c.is_ascii_digit());
    let (int_last, frac) = match last.split_once([',', '.']) {
        Some((a, b)) if !b.is_empty() && b.chars().all(|c| c.is_ascii_digit()) => (a, Some(b)),
        Some(_) => return None,
        None => (*last, None),
    };
    if !middle.iter().all(|g| three(g)) || !three(int_last) {
        return None;
    }
    let mut digits: String = [first].into_iter().chain(middle.iter().copied()).chain([int_last]).collect();
    if let Some(f) = frac {
        digits.push('.');
        digits.push_str(f);
    }
    digits.parse().ok()
}

/// Rewrites digits with `.`/`,` separators to a form `f64::from_str` reads, or `None` when
/// the separators are inconsistent or ambiguous (see [`parse_value`]).
fn normalize_separators(body: &str) -> Option<String> {
    let dots = body.matches('.').count();
    let commas = body.matches(',').count();
    let grouped = |int: &str, sep: char| {
        let mut groups = int.split(sep);
        let first = groups.next().unwrap_or("");
        (1..=3).contains(&first.len()) && groups.all(|g| g.len() == 3)
    };
    match (dots, commas) {
        (0, 0) | (1, 0) => Some(body.to_string()),
        (0, 1) => {
            let (int, frac) = body.split_once(',')?;
            if frac.len() != 3 || int.starts_with('0') {
                Some(format!("{int}.{frac}"))
            } else {
                None
            }
        }
        (0, _) => grouped(body, ',').then(|| body.replace(',', "")),
        (_, 0) => grouped(body, '.').then(|| body.replace('.', "")),
        _ => {
            // Both separators: the last one is the decimal mark, the other groups thousands.
            let (dec, group) = if body.rfind('.') > body.rfind(',') { ('.', ',') } else { (',', '.') };
            let (int, frac) = body.rsplit_once(dec)?;
            (grouped(int, group) && !frac.contains(group)).then(|| format!("{}.{frac}", int.replace(group, "")))
        }
    }
}

/// A number as it appears in text: digits with `.`/`,` separators.
pub(super) const NUM: &str = r"\d+(?:[.,]\d+)*";

pub(super) static RANGE_BOTH: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!(r"(?i)([-−]?{NUM})\s*(?:-|–|—|\.\.|\bto\b|\bbis\b)\s*([-−]?{NUM})")).unwrap());
pub(super) static RANGE_UPPER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(r"(?i)(?:<\s*or\s*=|<=|=<|≤|<|\bup to\b|\bbelow\b|\bless than\b)\s*({NUM})")).unwrap()
});
pub(super) static RANGE_LOWER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(r"(?i)(?:>\s*or\s*=|>=|=>|≥|>|\babove\b|\bgreater than\b)\s*({NUM})")).unwrap()
});

/// A range of counts with thousands grouped by spaces on both sides (`150 000 - 400 000`).
pub(super) static SPACED_RANGE: LazyLock<Regex> = LazyLock::new(|| {
    let g = r"\d{1,3}(?:[ \u{a0}\u{202f}]\d{3})+";
    Regex::new(&format!(r"(?:^|[^\d.,])({g})\s*(?:-|–|—|\bto\b|\bà\b|\ba\b|\bbis\b)\s*({g})(?:$|[^\d.,])")).unwrap()
});

/// The number (1–12) of a month named in English by its first three letters or more
/// (`Feb`, `february`), ignoring case.
pub fn month_number(name: &str) -> Option<u32> {
    const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
    let name = name.to_lowercase();
    MONTHS.iter().position(|m| name.starts_with(m)).map(|i| i as u32 + 1)
}

/// Reads a reference range: `12.0-15.5`, `12.0 - 15.5`, `12,0–15,5`, `3.5 to 5.1`,
/// `(ref 3.5-5.1 mmol/L)` → both bounds; `<5`, `≤5`, `up to 5` → upper only; `>60`, `≥60` →
/// lower only. Bounds are read with [`parse_value`]. A number glued to a letter (`CA19-9`)
/// is not a bound, and a range whose low bound exceeds its high bound is discarded.
pub fn parse_range(s: &str) -> (Option<f64>, Option<f64>) {
    let free = |m: &regex::Match| !preceded_by_alphanumeric(s, m.start());
    // A titre (`<1:80`) has no numeric bound.
    let titre = |c: &regex::Captures| {
        c.iter().skip(1).flatten().any(|m| {
            let rest = &s[m.end()..];
            rest.starts_with(':') && rest[1..].starts_with(|d: char| d.is_ascii_digit())
        })
    };
    if RANGE_BOTH
        .captures_iter(s)
        .chain(RANGE_UPPER.captures_iter(s))
        .chain(RANGE_LOWER.captures_iter(s))
        .any(|c| titre(&c))
    {
        return (None, None);
    }
    if let Some(c) = SPACED_RANGE.captures(s) {
        return match (parse_value(&c[1]), parse_value(&c[2])) {
            (Some(l), Some(h)) if l <= h => (Some(l), Some(h)),
            _ => (None, None),
        };
    }
    if let Some(c) = RANGE_BOTH.captures_iter(s).find(|c| free(&c.get(0).unwrap())) {
        let low = parse_value(&c[1]);
        let high = parse_value(&c[2]);
        return match (low, high) {
            (Some(l), Some(h)) if l > h => (None, None),
            bounds => bounds,
        };
    }
    if let Some(c) = RANGE_UPPER.captures(s) {
        return (None, parse_value(&c[1]));
    }
    if let Some(c) = RANGE_LOWER.captures(s) {
        return (parse_value(&c[1]), None);
    }
    (None, None)
}

fn preceded_by_alphanumeric(s: &str, byte: usize) -> bool {
    s[..byte].chars().next_back().is_some_and(|c| c.is_alphanumeric())
}

/// The flag of a result: a printed flag wins ([`Flag::from_printed`]); otherwise the value
/// is compared with the range, bounds inclusive (`<5` reads as "up to 5"); `None` when
/// there is no printed flag and no numeric value with at least one bound.
pub fn compute_flag(
    value_numeric: Option<f64>,
    ref_low: Option<f64>,
    ref_high: Option<f64>,
    printed: Option<&str>,
) -> Option<Flag> {
    // `*`, `!`, `+` and `-` beside a value mark it as out of range without saying which way
    // (or say it the way the range does): the range gives the direction.
    let marker = printed
        .map(str::trim)
        .filter(|p| !p.is_empty() && !p.contains("!!") && p.chars().all(|c| matches!(c, '*' | '!' | '+' | '-')));
    if marker.is_none() {
        if let Some(flag) = printed.and_then(Flag::from_printed) {
            return Some(flag);
        }
    }
    let unmarked = || marker.filter(|m| m.contains(['*', '!'])).map(|_| Flag::Abnormal);
    let Some(v) = value_numeric else { return unmarked() };
    if ref_low.is_none() && ref_high.is_none() {
        return unmarked();
    }
    if ref_low.is_some_and(|low| v < low) {
        Some(Flag::Low)
    } else if ref_high.is_some_and(|high| v > high) {
        Some(Flag::High)
    } else {
        Some(Flag::Normal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- numbers, ranges, flags ----

    #[test]
    fn parse_value_plain_numbers() {
        assert_eq!(parse_value("13.2"), Some(13.2));
        assert_eq!(parse_value(" 142 "), Some(142.0));
        assert_eq!(parse_value("-2.5"), Some(-2.5));
        assert_eq!(parse_value("−3"), Some(-3.0));
        assert_eq!(parse_value("0.005"), Some(0.005));
    }

    #[test]
    fn parse_value_comma_rules() {
        assert_eq!(parse_value("5,4"), Some(5.4));
        assert_eq!(parse_value("12,25"), Some(12.25));
        assert_eq!(parse_value("0,125"), Some(0.125));
        assert_eq!(parse_value("1,2345"), Some(1.2345));
        assert_eq!(parse_value("1,234.5"), Some(1234.5));
        assert_eq!(parse_value("1,234,567"), Some(1_234_567.0));
        assert_eq!(parse_value("1.234,5"), Some(1234.5));
        assert_eq!(parse_value("1.234.567"), Some(1_234_567.0));
        // Ambiguous: thousands in one convention, decimals in the other.
        assert_eq!(parse_value("1,234"), None);
        assert_eq!(parse_value("1,015"), None);
        // Inconsistent grouping.
        assert_eq!(parse_value("12,34,5"), None);
        assert_eq!(parse_value("1.2.3"), None);
        assert_eq!(parse_value("12.03.2024"), None);
        // Thousands grouped with spaces (a no-break space too).
        assert_eq!(parse_value("251 000"), Some(251_000.0));
        assert_eq!(parse_value("1 180 000"), Some(1_180_000.0));
        assert_eq!(parse_value("12\u{a0}500,5"), Some(12_500.5));
        for s in ["251 00", "7 1", "2510 000", "1 180 00", "4 5.6", "12 abc"] {
            assert_eq!(parse_value(s), None, "{s:?}");
        }
    }

    #[test]
    fn parse_value_rejects_non_plain() {
        for s in ["<0.27", ">60", "negative", "1+", "", "-", "13.2 H", "1e5", "5.", ".5", "10^9", "25-50"] {
            assert_eq!(parse_value(s), None, "{s:?}");
        }
    }

    #[test]
    fn parse_range_forms() {
        assert_eq!(parse_range("12.0-15.5"), (Some(12.0), Some(15.5)));
        assert_eq!(parse_range("12.0 - 15.5"), (Some(12.0), Some(15.5)));
        assert_eq!(parse_range("12,0–15,5"), (Some(12.0), Some(15.5)));
        assert_eq!(parse_range("3.5 to 5.1"), (Some(3.5), Some(5.1)));
        assert_eq!(parse_range("(ref 3.5-5.1 mmol/L)"), (Some(3.5), Some(5.1)));
        assert_eq!(parse_range("[150 - 450]"), (Some(150.0), Some(450.0)));
        assert_eq!(parse_range("-2.0 - 2.0"), (Some(-2.0), Some(2.0)));
        assert_eq!(parse_range("<5"), (None, Some(5.0)));
        assert_eq!(parse_range("< 5,0"), (None, Some(5.0)));
        assert_eq!(parse_range("≤ 200"), (None, Some(200.0)));
        assert_eq!(parse_range(">60"), (Some(60.0), None));
        assert_eq!(parse_range("≥ 1.0"), (Some(1.0), None));
        assert_eq!(parse_range("4.0-11.0 x10^9/L"), (Some(4.0), Some(11.0)));
        // Reference-laboratory spellings of one-sided limits.
        assert_eq!(parse_range("< OR = 4.0 ng/mL"), (None, Some(4.0)));
        assert_eq!(parse_range("> OR = 60"), (Some(60.0), None));
        assert_eq!(parse_range("=< 5"), (None, Some(5.0)));
        // Thousands printed with spaces.
        assert_eq!(parse_range("150 000 - 400 000"), (Some(150_000.0), Some(400_000.0)));
    }

    #[test]
    fn parse_range_refuses_nonsense() {
        assert_eq!(parse_range("Negative"), (None, None));
        assert_eq!(parse_range(""), (None, None));
        assert_eq!(parse_range("15.5-12.0"), (None, None));
        // A tumour-marker name is not a range.
        assert_eq!(parse_range("CA19-9 <37"), (None, Some(37.0)));
    }

    #[test]
    fn printed_flags() {
        let cases = [
            ("H", Flag::High),
            ("HIGH", Flag::High),
            ("high", Flag::High),
            ("↑", Flag::High),
            ("*H*", Flag::High),
            ("L", Flag::Low),
            ("Low", Flag::Low),
            ("↓", Flag::Low),
            ("HH", Flag::Critical),
            ("LL", Flag::Critical),
            ("HH  CRITICAL", Flag::Critical),
            ("critical", Flag::Critical),
            ("PANIC", Flag::Critical),
            ("!!", Flag::Critical),
            ("A", Flag::Abnormal),
            ("ABN", Flag::Abnormal),
            ("abnormal", Flag::Abnormal),
            ("*", Flag::Abnormal),
            ("N", Flag::Normal),
        ];
        for (s, f) in cases {
            assert_eq!(Flag::from_printed(s), Some(f), "{s:?}");
        }
        assert_eq!(Flag::from_printed(""), None);
        assert_eq!(Flag::from_printed("see note"), None);
    }

    #[test]
    fn titres_have_no_numeric_bounds() {
        assert_eq!(parse_range("(<1:80)"), (None, None));
        assert_eq!(parse_range("1:40 - 1:160"), (None, None));
        assert_eq!(parse_range("(< 80)"), (None, Some(80.0)));
    }

    #[test]
    fn compute_flag_printed_wins_then_range() {
        assert_eq!(compute_flag(Some(4.0), Some(3.5), Some(5.1), Some("H")), Some(Flag::High));
        assert_eq!(compute_flag(Some(3.0), Some(3.5), Some(5.1), None), Some(Flag::Low));
        assert_eq!(compute_flag(Some(5.9), Some(3.5), Some(5.1), None), Some(Flag::High));
        assert_eq!(compute_flag(Some(5.1), Some(3.5), Some(5.1), None), Some(Flag::Normal));
        assert_eq!(compute_flag(Some(7.0), None, Some(5.0), None), Some(Flag::High));
        assert_eq!(compute_flag(Some(45.0), Some(60.0), None, None), Some(Flag::Low));
        // An unknown printed flag falls back to the computation.
        assert_eq!(compute_flag(Some(3.0), Some(3.5), Some(5.1), Some("?")), Some(Flag::Low));
        assert_eq!(compute_flag(Some(3.0), None, None, None), None);
        assert_eq!(compute_flag(None, Some(1.0), Some(2.0), None), None);
        // Markers without a direction take the range's; without a range `*` is abnormal.
        assert_eq!(compute_flag(Some(3.0), Some(3.5), Some(5.1), Some("*")), Some(Flag::Low));
        assert_eq!(compute_flag(Some(9.0), Some(3.5), Some(5.1), Some(" + ")), Some(Flag::High));
        assert_eq!(compute_flag(Some(9.0), None, None, Some("*")), Some(Flag::Abnormal));
        assert_eq!(compute_flag(None, None, None, Some("-")), None);
        // `!!` is the critical mark, not a direction-less one.
        assert_eq!(compute_flag(Some(4.1), None, Some(2.0), Some("!!")), Some(Flag::Critical));
    }
}
