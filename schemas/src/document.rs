//! Documents read from inputs, and the input errors that replace them when an input is bad.

use crate::ids::Digest;
use serde::{Deserialize, Serialize};

/// One document to process: a text file, an archive member, or one record of a JSONL/CSV file.
///
/// `Debug` prints the text's length and digest, never the text itself, so a document can be
/// logged by accident without leaking patient text.
#[derive(Clone, PartialEq, Eq)]
pub struct Document {
    /// The document id: the record's id field, or the file/member path for whole-file documents.
    pub id: String,
    /// Where the document came from: the input URI, with `#member` for archive members.
    pub source_uri: String,
    /// SHA-256 of the input the document was read from (the file or archive as a whole).
    pub input_sha256: Digest,
    /// The document text (UTF-8).
    pub text: String,
    /// The patient it belongs to, when the input says (`input.patient_field` of a record,
    /// or `input.patient_pattern` over the file name).
    pub patient_id: Option<String>,
    /// Its date as written, when the input says (`input.date_field`, `input.date_pattern`).
    pub date: Option<String>,
}

impl std::fmt::Debug for Document {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Document")
            .field("id", &self.id)
            .field("source_uri", &self.source_uri)
            .field("text_len", &self.text.len())
            .field("text_sha256", &Digest::of_bytes(self.text.as_bytes()).short().to_string())
            .finish()
    }
}

/// Why an input (or part of one) could not become a document. Each kind has a stable label
/// used in the `_errors` table and in metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputErrorKind {
    /// The file or member holds no bytes (or only whitespace).
    Empty,
    /// The bytes are not valid UTF-8.
    InvalidUtf8,
    /// A JSONL line or CSV row could not be parsed.
    MalformedRecord,
    /// A record lacks the configured id or text field, or a CSV lacks the text column.
    MissingField,
    /// The archive ends early or its structure is corrupt.
    TruncatedArchive,
    /// An archive member's name is absolute or climbs out with `..`.
    UnsafePath,
    /// An archive member is a symbolic or hard link.
    Link,
    /// A document or member is larger than the configured limit.
    TooLarge,
    /// A member inflates past the size or ratio limit.
    CompressionBomb,
    /// The content is not what the file extension says.
    WrongFormat,
    /// The input could not be read at all (missing, permission denied, I/O error).
    Unreadable,
    /// The input's kind is not accepted by the pipeline.
    UnsupportedKind,
    /// An image or volume is stored in an encoding this build cannot decode (a DICOM
    /// transfer syntax without a maintained decoder, say).
    UnsupportedEncoding,
    /// An image's pixels or a volume's header could not be decoded.
    CorruptImage,
    /// An image or study does not fit the pipeline (a modality it does not read, a study
    /// without a prior to compare with).
    NotApplicable,
}

impl InputErrorKind {
    pub const ALL: [Self; 15] = [
        Self::Empty,
        Self::InvalidUtf8,
        Self::MalformedRecord,
        Self::MissingField,
        Self::TruncatedArchive,
        Self::UnsafePath,
        Self::Link,
        Self::TooLarge,
        Self::CompressionBomb,
        Self::WrongFormat,
        Self::Unreadable,
        Self::UnsupportedKind,
        Self::UnsupportedEncoding,
        Self::CorruptImage,
        Self::NotApplicable,
    ];

    /// Stable label for the `_errors` table and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::MalformedRecord => "malformed_record",
            Self::MissingField => "missing_field",
            Self::TruncatedArchive => "truncated_archive",
            Self::UnsafePath => "unsafe_path",
            Self::Link => "link_member",
            Self::TooLarge => "too_large",
            Self::CompressionBomb => "compression_bomb",
            Self::WrongFormat => "wrong_format",
            Self::Unreadable => "unreadable",
            Self::UnsupportedKind => "unsupported_kind",
            Self::UnsupportedEncoding => "unsupported_encoding",
            Self::CorruptImage => "corrupt_image",
            Self::NotApplicable => "not_applicable",
        }
    }
}

/// An input that could not be turned into a document. `detail` names positions, sizes and
/// formats — never document text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputError {
    /// The input URI (the file or archive).
    pub source_uri: String,
    /// The archive member, when the error concerns one member.
    pub member: Option<String>,
    /// The record's id or line number, when the error concerns one record.
    pub record: Option<String>,
    pub kind: InputErrorKind,
    pub detail: String,
}

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.source_uri)?;
        if let Some(m) = &self.member {
            write!(f, " member {m:?}")?;
        }
        if let Some(r) = &self.record {
            write!(f, " record {r}")?;
        }
        write!(f, ": {} ({})", self.detail, self.kind.label())
    }
}

/// Longest archive member name accepted, in bytes. Real paths are far shorter; a longer name
/// is a crafted header, and names end up in ids, URIs and the `_errors` table.
pub const MAX_MEMBER_NAME_BYTES: usize = 4096;

/// Checks that an archive member name is a plain relative path, and says why not.
///
/// Shared by the coordinator (planning) and the worker (reading) so both agree on which
/// members are unsafe. Members are never written to disk, but their names become document
/// ids and URIs downstream, where a name that climbs out (`../x`), is absolute (`/etc/x`,
/// `C:x`), uses Windows separators (`..\\x`) or carries control characters could be
/// misread by a tool that does extract it. `.` components (`./a.txt`, as written by
/// `tar -C dir .`) are harmless and accepted.
pub fn check_member_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty member name");
    }
    if name.len() > MAX_MEMBER_NAME_BYTES {
        return Err("member name too long");
    }
    if name.chars().any(char::is_control) {
        return Err("control character in member name");
    }
    if name.contains('\\') {
        return Err("backslash in member name");
    }
    if name.starts_with('/') {
        return Err("absolute member path");
    }
    let b = name.as_bytes();
    if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':' {
        return Err("drive prefix in member name");
    }
    if name.split('/').any(|c| c == "..") {
        return Err("parent-directory component in member name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_text() {
        let d = Document {
            id: "r1".into(),
            source_uri: "file:///x.txt".into(),
            input_sha256: Digest::of_bytes(b"x"),
            text: "Jane Doe, potassium 6.1".into(),
            patient_id: None,
            date: None,
        };
        let s = format!("{d:?}");
        assert!(!s.contains("Jane"), "{s}");
        assert!(s.contains("text_len"));
    }

    #[test]
    fn member_names_accepted() {
        for ok in ["a.txt", "notes/2024/a.txt", "./a.txt", "a..b.txt", "dir/.hidden", "visit 10:30.txt"] {
            assert_eq!(check_member_name(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn member_names_rejected() {
        for bad in [
            "",
            "../evil.txt",
            "a/../../evil.txt",
            "a/..",
            "/etc/passwd",
            "C:evil.txt",
            "c:/windows/evil.txt",
            "..\\evil.txt",
            "\\\\server\\share\\x.txt",
            "a\nb.txt",
            "a\0b.txt",
        ] {
            assert!(check_member_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_member_name(&"a".repeat(MAX_MEMBER_NAME_BYTES + 1)).is_err());
    }
}
