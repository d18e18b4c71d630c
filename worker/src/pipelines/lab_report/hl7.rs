//! HL7 v2 OBX segments, read without the model.

use super::classify::{read_status, NonResult, SetAside};
use super::items::{LabItem, Method, Parsed};
use super::lines::{split_lines, Line};
use super::numbers::{compute_flag, parse_range, parse_value};
use crate::grounding::Alignment;

/// HL7 v2 delimiters, read from MSH-1/MSH-2 when the message has an MSH segment.
struct Hl7Delimiters {
    field: char,
    component: char,
    repetition: char,
    escape: char,
    subcomponent: char,
}

impl Hl7Delimiters {
    const DEFAULT: Self = Self { field: '|', component: '^', repetition: '~', escape: '\\', subcomponent: '&' };

    fn from_lines(lines: &[Line]) -> Self {
        let Some(msh) = lines.iter().map(|l| l.text.trim_start()).find(|t| t.starts_with("MSH")) else {
            return Self::DEFAULT;
        };
        let mut rest = msh[3..].chars();
        let Some(field) = rest.next() else {
            return Self::DEFAULT;
        };
        let enc: Vec<char> = rest.take_while(|&c| c != field).collect();
        let d = Self::DEFAULT;
        Self {
            field,
            component: enc.first().copied().unwrap_or(d.component),
            repetition: enc.get(1).copied().unwrap_or(d.repetition),
            escape: enc.get(2).copied().unwrap_or(d.escape),
            subcomponent: enc.get(3).copied().unwrap_or(d.subcomponent),
        }
    }

    /// `XYZ|...`: three upper-case letters or digits, the first a letter, then the field
    /// delimiter.
    fn is_segment(&self, t: &str) -> bool {
        let mut c = t.chars();
        let id: Vec<char> = c.by_ref().take(3).collect();
        id.len() == 3
            && id[0].is_ascii_uppercase()
            && id.iter().all(|ch| ch.is_ascii_uppercase() || ch.is_ascii_digit())
            && c.next() == Some(self.field)
    }

    /// Replaces the standard escapes (`\F\`, `\S\`, `\T\`, `\R\`, `\E\`); other escapes
    /// (formatting, hex) become a space.
    fn unescape(&self, s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(i) = rest.find(self.escape) {
            out.push_str(&rest[..i]);
            let after = &rest[i + self.escape.len_utf8()..];
            let Some(j) = after.find(self.escape) else {
                out.push_str(&rest[i..]);
                return out;
            };
            match &after[..j] {
                "F" => out.push(self.field),
                "S" => out.push(self.component),
                "T" => out.push(self.subcomponent),
                "R" => out.push(self.repetition),
                "E" => out.push(self.escape),
                _ => out.push(' '),
            }
            rest = &after[j + self.escape.len_utf8()..];
        }
        out.push_str(rest);
        out
    }
}

/// Reads HL7 v2 OBX segments: test = OBX-3 text component (component 2, else the alternate
/// text, component 5; never the code), value = OBX-5 (coded values by their text, structured
/// numerics like `<^0.3` joined to `<0.3`), unit = OBX-6 component 1, range = OBX-7, flag =
/// OBX-8 through [`compute_flag`] (computed from value and range when OBX-8 is empty).
/// Evidence is the segment's span. Every segment of the message (MSH, PID, NTE, ...) is
/// claimed, so no part of it reaches the model. `None` when there is no OBX segment.
pub fn parse_hl7_obx(text: &str) -> Option<Parsed> {
    let lines = split_lines(text);
    let delims = Hl7Delimiters::from_lines(&lines);
    let mut parsed = Parsed::default();
    let mut saw_obx = false;
    for line in &lines {
        let (start, end, seg) = line.trimmed();
        if !delims.is_segment(seg) {
            continue;
        }
        parsed.claimed.push((start, end));
        if !seg.starts_with("OBX") {
            continue;
        }
        saw_obx = true;
        match obx_item(seg, &delims, start, end) {
            Some(Ok(item)) => parsed.items.push(item),
            Some(Err(reason)) => parsed.set_aside.push(SetAside { reason, start, end }),
            None => {}
        }
    }
    saw_obx.then_some(parsed)
}

/// The segment's item, or why it is not a result (OBX-11: `I` pending, `X` cannot be
/// obtained, `D` deleted, `W` posted in error, `N` not asked); `None` without a value.
fn obx_item(seg: &str, d: &Hl7Delimiters, start: usize, end: usize) -> Option<Result<LabItem, NonResult>> {
    let fields: Vec<&str> = seg.split(d.field).collect();
    let field = |i: usize| fields.get(i).copied().unwrap_or("");
    let component = |f: &str, i: usize| -> Option<String> {
        let c = f.split(d.repetition).next()?.split(d.component).nth(i - 1)?;
        let c = d.unescape(c).trim().to_string();
        (!c.is_empty()).then_some(c)
    };
    let status = match read_status(field(11)) {
        Some(Err(reason)) => return Some(Err(reason)),
        Some(Ok(status)) => Some(status),
        None => None,
    };
    let test = component(field(3), 2).or_else(|| component(field(3), 5));
    let raw_value = field(5);
    let value = match field(2).trim() {
        "SN" => {
            let joined: String = raw_value.split(d.component).map(|c| d.unescape(c)).collect();
            Some(joined.trim().to_string())
        }
        "CE" | "CWE" | "CNE" => component(raw_value, 2).or_else(|| component(raw_value, 1)),
        _ => Some(d.unescape(raw_value).trim().to_string()),
    }
    .filter(|v| !v.is_empty())?;
    let value_numeric = parse_value(&value);
    let unit = component(field(6), 1).or_else(|| component(field(6), 2));
    let (ref_low, ref_high) = parse_range(&d.unescape(field(7)));
    let printed = field(8).split(d.repetition).next().unwrap_or("").trim();
    let printed = (!printed.is_empty()).then_some(printed);
    Some(Ok(LabItem {
        test,
        value: Some(value),
        value_numeric,
        unit,
        ref_low,
        ref_high,
        flag: compute_flag(value_numeric, ref_low, ref_high, printed),
        evidence_start: start,
        evidence_end: end,
        method: Method::Hl7Obx,
        alignment: Alignment::Exact,
        from_examples: false,
        status,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::classify::ResultStatus;
    use super::super::items::Flag;
    use super::super::lines::span_text;
    use super::super::segment::segment;
    use super::*;

    // ---- HL7 ----

    const HL7: &str = "MSH|^~\\&|LAB|H|EHR|H|20240315083000||ORU^R01|1|P|2.5.1\r\
PID|1||000123^^^H^MR||SAMPLE^TEST||19800101|F\r\
OBX|1|NM|718-7^Hemoglobin^LN||13.2|g/dL|12.0-15.5|N|||F\r\
OBX|2|NM|2823-3^Potassium^LN||6.9|mmol/L|3.5-5.1|HH|||F\r\
OBX|3|SN|1988-5^CRP^LN||<^0.3|mg/dL|<0.9||||F\r\
OBX|4|NM|2951-2^Sodium^LN||128|mmol/L|136-145||||F\r\
OBX|5|CWE|5778-6^Color^LN||YEL^Yellow^L||||||F\r\
OBX|6|NM|2345-7^^LN^^Glucose, fasting||5.1|mmol/L|3.9\\S\\5.5|||F\r\
OBX|7|NM|9999-9^Deleted test^LN||1.0|U|||||D\r\
OBX|8|NM|2160-0^Creatinine^LN||||||||I\r\
OBX|9|NM|2885-2^Protein^LN||71|g/L|60-80||||C\r\
OBX|10|NM|1751-7^Albumin^LN||38|g/L|35-50||||P\r\
NTE|1||Comment 123 text";

    #[test]
    fn hl7_reads_obx_segments() {
        let Parsed { items, claimed, set_aside } = parse_hl7_obx(HL7).unwrap();
        assert_eq!(items.len(), 8, "the deleted and the pending observation give no item");
        let reasons: Vec<_> = set_aside.iter().map(|s| s.reason).collect();
        assert_eq!(reasons, [NonResult::Withdrawn, NonResult::Pending]);
        let statuses: Vec<_> = items.iter().map(|i| i.status.map_or("-", ResultStatus::as_str)).collect();
        // OBX 6 leaves OBX-11 empty: no status of its own (the report's applies).
        assert_eq!(statuses[5..], ["-", "corrected", "preliminary"]);
        let hb = &items[0];
        assert_eq!(hb.test.as_deref(), Some("Hemoglobin"));
        assert_eq!(hb.value.as_deref(), Some("13.2"));
        assert_eq!(hb.value_numeric, Some(13.2));
        assert_eq!(hb.unit.as_deref(), Some("g/dL"));
        assert_eq!((hb.ref_low, hb.ref_high), (Some(12.0), Some(15.5)));
        assert_eq!(hb.flag, Some(Flag::Normal));
        assert_eq!(hb.method, Method::Hl7Obx);
        assert_eq!(items[1].flag, Some(Flag::Critical));
        let crp = &items[2];
        assert_eq!(crp.value.as_deref(), Some("<0.3"));
        assert_eq!(crp.value_numeric, None);
        assert_eq!((crp.ref_low, crp.ref_high), (None, Some(0.9)));
        assert_eq!(crp.flag, None);
        assert_eq!(items[3].flag, Some(Flag::Low), "computed when OBX-8 is empty");
        assert_eq!(items[4].value.as_deref(), Some("Yellow"));
        assert_eq!(items[5].test.as_deref(), Some("Glucose, fasting"), "alternate text");
        assert_eq!(items[5].ref_low, None, "escaped ^ is not a range dash");
        // Every segment is claimed, and evidence is the OBX segment itself.
        assert_eq!(claimed.len(), 13);
        assert!(span_text(HL7, hb.evidence_start, hb.evidence_end).starts_with("OBX|1|NM|718-7"));
        assert!(span_text(HL7, hb.evidence_start, hb.evidence_end).ends_with("|F"));
        assert!(segment(HL7, &claimed).is_empty());
    }

    #[test]
    fn hl7_none_without_obx_and_custom_delimiters() {
        assert!(parse_hl7_obx("MSH|^~\\&|LAB\nPID|1||1").is_none());
        assert!(parse_hl7_obx("Hemoglobin 13.2 g/dL").is_none());
        let custom = "MSH#$~\\&#LAB\nOBX#1#NM#1-1$Urea$LN##7.1#mmol/L#2.5-7.8#H";
        let Parsed { items, .. } = parse_hl7_obx(custom).unwrap();
        assert_eq!(items[0].test.as_deref(), Some("Urea"));
        assert_eq!(items[0].flag, Some(Flag::High));
    }

    #[test]
    fn hl7_offsets_are_characters() {
        let text = "NTE|1||µ° ± note\nOBX|1|NM|1-1^Kreatinin^LN||88|µmol/L|45–90|||F";
        let Parsed { items, .. } = parse_hl7_obx(text).unwrap();
        let it = &items[0];
        assert_eq!(it.evidence_start, 17);
        assert_eq!(span_text(text, it.evidence_start, it.evidence_end), text.lines().nth(1).unwrap());
        assert_eq!(it.unit.as_deref(), Some("µmol/L"));
        assert_eq!((it.ref_low, it.ref_high), (Some(45.0), Some(90.0)));
    }
}
