//! Planning-time archive listing: member names and sizes, from headers only.
//!
//! The coordinator splits an archive into jobs by member, so it must know the members
//! without reading them. Zip's central directory gives them directly; a plain tar is walked
//! header to header, seeking over member data; a tar.gz has to be streamed through the
//! decompressor, but member data is skipped as it passes and never kept.
//!
//! Listing does not judge members: every non-directory entry is listed by its name as the
//! worker will see it, unsafe names and links included, so that the worker turns each into an
//! error row and nothing in the archive goes unreported. Listing does bound its own work: a
//! tar.gz is metered like the worker meters it, and a listing that has to stop early returns
//! the members found so far, marked [`Listing::truncated`] with the reason.

use medbatch_formats::limits::{
    DEFAULT_MAX_ARCHIVE_INFLATED_BYTES, DEFAULT_MAX_INFLATE_RATIO, LIST_MAX_MEMBERS, TAR_BLOCK_BYTES,
    TAR_HEADER_ALLOWANCE_BYTES,
};
use medbatch_formats::meter::{Metered, StreamMeter};
use medbatch_formats::sniff::{check_tar_head, sniff};
use medbatch_schemas::{InputErrorKind, InputKind};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::rc::Rc;

/// What listing and reading need from an input: bytes, and seeking (zip's directory is at the end).
pub use medbatch_connectors::inputs::ReadSeek;

/// One archive entry that is not a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    /// The name exactly as the worker reads it (lossy UTF-8), to be used in `Selection::Members`.
    pub name: String,
    /// Size the header declares (inflated size for zip members).
    pub size: u64,
}

/// The members of an archive, in archive order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing {
    pub members: Vec<MemberInfo>,
    /// Listing stopped before the archive's end: `members` holds the entries before that
    /// point. The worker reports the problem as an error row when it reads the archive.
    pub truncated: bool,
    /// Why it stopped; `Some` exactly when `truncated`.
    pub stop: Option<ListStop>,
}

impl Listing {
    /// Whether every entry of the archive was listed.
    pub fn is_complete(&self) -> bool {
        !self.truncated
    }

    fn complete(members: Vec<MemberInfo>) -> Self {
        Self { members, truncated: false, stop: None }
    }

    fn stopped(members: Vec<MemberInfo>, why: ListStop) -> Self {
        Self { members, truncated: true, stop: Some(why) }
    }
}

/// Why a listing stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListStop {
    /// The archive ends early or its structure is corrupt.
    Truncated,
    /// A tar.gz inflates past the worker's per-archive or ratio limit.
    InflateLimit,
    /// More than [`LIST_MAX_MEMBERS`] entries.
    TooManyMembers,
}

/// Why an archive could not be listed at all.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("{0:?} inputs are not archives")]
    NotAnArchive(InputKind),
    #[error("not a {expected} archive")]
    WrongFormat { expected: &'static str },
    #[error("reading the archive: {0}")]
    Io(#[from] io::Error),
}

/// Lists the non-directory entries of a tar, tar.gz or zip archive.
///
/// An empty input (0 bytes) lists as an empty, complete archive. Content that is not the
/// archive format at all is an error; damage after the start is a listing that stopped early.
pub fn list_members(kind: InputKind, mut reader: Box<dyn ReadSeek>) -> Result<Listing, ListError> {
    if !kind.is_archive() {
        return Err(ListError::NotAnArchive(kind));
    }
    let head = sniff(&mut reader, 4)?;
    if head.is_empty() {
        return Ok(Listing::complete(Vec::new()));
    }
    match kind {
        InputKind::Zip => {
            if !matches!(head.as_slice(), b"PK\x03\x04" | b"PK\x05\x06" | b"PK\x07\x08") {
                return Err(ListError::WrongFormat { expected: "zip" });
            }
            Ok(list_zip(reader))
        }
        InputKind::TarGz => {
            if !head.starts_with(b"\x1f\x8b") {
                return Err(ListError::WrongFormat { expected: "gzip-compressed tar" });
            }
            let meter = Rc::new(listing_meter(true));
            let compressed = Metered::compressed(reader, &meter);
            let decoder = flate2::bufread::GzDecoder::new(BufReader::new(compressed));
            let stream = Metered::inflated(decoder, &meter);
            let mut archive = tar::Archive::new(stream);
            let entries = archive.entries();
            Ok(walk_tar(entries, &meter))
        }
        _ => {
            // A short input with the ustar magic is a tar cut inside its first header: listed
            // (as nothing), and reported by the worker.
            if let Err((kind, _)) = check_tar_head(&sniff(&mut reader, TAR_BLOCK_BYTES)?) {
                if kind == InputErrorKind::TruncatedArchive {
                    return Ok(Listing::stopped(Vec::new(), ListStop::Truncated));
                }
                return Err(ListError::WrongFormat { expected: "tar" });
            }
            let meter = Rc::new(listing_meter(false));
            let stream = Metered::inflated(reader, &meter);
            let mut archive = tar::Archive::new(stream);
            let entries = archive.entries_with_seek();
            Ok(walk_tar(entries, &meter))
        }
    }
}

fn walk_tar<R: Read>(entries: io::Result<tar::Entries<'_, R>>, meter: &StreamMeter) -> Listing {
    let mut members = Vec::new();
    let mut entries = match entries {
        Ok(e) => e,
        Err(_) => return Listing::stopped(members, stop(meter)),
    };
    let mut previous_size = 0u64;
    loop {
        // Listing never reads member data, so before the next header the tar reader skips
        // exactly the previous member's padded data: read through on a gzip stream, seeked
        // over (so not counted) on a plain tar.
        let skip = if meter.is_gzip() { previous_size.div_ceil(TAR_BLOCK_BYTES) * TAR_BLOCK_BYTES } else { 0 };
        meter.allow_header_bytes(skip.saturating_add(TAR_HEADER_ALLOWANCE_BYTES));
        let entry = match entries.next() {
            None if meter.at_eof() => return Listing::stopped(members, ListStop::Truncated),
            None => return Listing::complete(members),
            Some(Err(_)) => return Listing::stopped(members, stop(meter)),
            Some(Ok(entry)) => entry,
        };
        previous_size = entry.size();
        let entry_type = entry.header().entry_type();
        if entry_type.is_pax_global_extensions() {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        if entry_type.is_dir() || name.ends_with('/') {
            continue;
        }
        if members.len() >= LIST_MAX_MEMBERS {
            return Listing::stopped(members, ListStop::TooManyMembers);
        }
        members.push(MemberInfo { name, size: previous_size });
    }
}

fn list_zip(mut reader: Box<dyn ReadSeek>) -> Listing {
    let mut members = Vec::new();
    let Ok(mut archive) = zip::ZipArchive::new(&mut reader) else {
        // No readable central directory (it sits at the end, so a cut-off zip loses it): list
        // from the local headers before each member, as the worker reads them.
        return list_zip_local_headers(reader);
    };
    for index in 0..archive.len() {
        let name = archive.name_for_index(index).unwrap_or_default().to_string();
        if name.ends_with('/') {
            continue;
        }
        if members.len() >= LIST_MAX_MEMBERS {
            return Listing::stopped(members, ListStop::TooManyMembers);
        }
        // A member whose local header is unreadable is still listed; the worker reports it.
        let size = archive.by_index_raw(index).map_or(0, |f| f.size());
        members.push(MemberInfo { name, size });
    }
    Listing::complete(members)
}

fn list_zip_local_headers(mut reader: Box<dyn ReadSeek>) -> Listing {
    let mut members = Vec::new();
    if reader.seek(SeekFrom::Start(0)).is_ok() {
        // Stops at the first unreadable header, or at the (corrupt) central directory.
        while let Ok(Some(file)) = zip::read::read_zipfile_from_stream(&mut reader) {
            if file.is_dir() {
                continue;
            }
            if members.len() >= LIST_MAX_MEMBERS {
                return Listing::stopped(members, ListStop::TooManyMembers);
            }
            members.push(MemberInfo { name: file.name().to_string(), size: file.size() });
        }
    }
    Listing::stopped(members, ListStop::Truncated)
}

/// The meter of a listing: a tar.gz is held to the limits a worker reading it would meet,
/// since no job could read past them.
fn listing_meter(gzip: bool) -> StreamMeter {
    StreamMeter::new(gzip, DEFAULT_MAX_ARCHIVE_INFLATED_BYTES, DEFAULT_MAX_INFLATE_RATIO)
}

/// Why a tar walk stopped on an error: an inflation limit, or damage.
fn stop(meter: &StreamMeter) -> ListStop {
    match meter.verdict() {
        Some((InputErrorKind::CompressionBomb, _)) => ListStop::InflateLimit,
        _ => ListStop::Truncated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use std::io::{Cursor, Write};

    fn boxed(bytes: Vec<u8>) -> Box<dyn ReadSeek> {
        Box::new(Cursor::new(bytes))
    }

    /// A tar entry with a raw name (the tar crate's path setters refuse `..`).
    fn raw_entry(b: &mut tar::Builder<Vec<u8>>, name: &str, kind: tar::EntryType, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        if kind == tar::EntryType::Symlink {
            h.set_link_name("/etc/shadow").unwrap();
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    fn sample_tar() -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        raw_entry(&mut b, "notes/", tar::EntryType::Directory, b"");
        raw_entry(&mut b, "notes/a.txt", tar::EntryType::Regular, b"first note");
        raw_entry(&mut b, "../evil.txt", tar::EntryType::Regular, b"x");
        raw_entry(&mut b, "link.txt", tar::EntryType::Symlink, b"");
        raw_entry(&mut b, "b.jsonl", tar::EntryType::Regular, &[b'{'; 3000]);
        b.into_inner().unwrap()
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    fn names(l: &Listing) -> Vec<&str> {
        l.members.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn archive_lists_tar_members_including_unsafe_and_links() {
        let l = list_members(InputKind::Tar, boxed(sample_tar())).unwrap();
        assert!(!l.truncated);
        assert_eq!(names(&l), ["notes/a.txt", "../evil.txt", "link.txt", "b.jsonl"]);
        assert_eq!(l.members[0].size, 10);
        assert_eq!(l.members[3].size, 3000);
    }

    #[test]
    fn archive_lists_tar_gz_members() {
        let l = list_members(InputKind::TarGz, boxed(gz(&sample_tar()))).unwrap();
        assert!(!l.truncated);
        assert_eq!(names(&l).len(), 4);
    }

    #[test]
    fn archive_lists_zip_members() {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default();
        w.add_directory("d/", opts).unwrap();
        w.start_file("d/a.txt", opts).unwrap();
        w.write_all(b"hello").unwrap();
        w.start_file("../evil.txt", opts).unwrap();
        w.write_all(b"x").unwrap();
        let bytes = w.finish().unwrap().into_inner();
        let l = list_members(InputKind::Zip, boxed(bytes.clone())).unwrap();
        assert!(!l.truncated);
        assert_eq!(
            l.members,
            [MemberInfo { name: "d/a.txt".into(), size: 5 }, MemberInfo { name: "../evil.txt".into(), size: 1 }]
        );

        // Cut off: the central directory is gone, the local headers still list a prefix.
        let cut = bytes[..bytes.len() - 60].to_vec();
        let l = list_members(InputKind::Zip, boxed(cut)).unwrap();
        assert_eq!(l.stop, Some(ListStop::Truncated));
        assert_eq!(names(&l), ["d/a.txt", "../evil.txt"]);
    }

    #[test]
    fn archive_truncated_tar_gz_lists_prefix() {
        let mut b = tar::Builder::new(Vec::new());
        for i in 0..20 {
            // Incompressible-ish data so that the cut lands among the members.
            let data: Vec<u8> =
                (0..4000u32).map(|j| (j.wrapping_mul(2654435761).wrapping_add(i) >> 13) as u8).collect();
            raw_entry(&mut b, &format!("n{i}.txt"), tar::EntryType::Regular, &data);
        }
        let full = gz(&b.into_inner().unwrap());
        let cut = full[..full.len() / 2].to_vec();
        let l = list_members(InputKind::TarGz, boxed(cut)).unwrap();
        assert_eq!(l.stop, Some(ListStop::Truncated));
        assert!(!l.members.is_empty() && l.members.len() < 20, "{}", l.members.len());
        assert_eq!(l.members[0].name, "n0.txt");
    }

    #[test]
    fn archive_truncated_plain_tar_is_reported() {
        let tar = sample_tar();
        // Cut at a block boundary after the first member: no error from the tar reader, only
        // the missing end-of-archive marker tells.
        let l = list_members(InputKind::Tar, boxed(tar[..512 * 3].to_vec())).unwrap();
        assert_eq!(l.stop, Some(ListStop::Truncated));
        assert_eq!(names(&l), ["notes/a.txt"]);
    }

    #[test]
    fn archive_tar_gz_bomb_stops_listing() {
        let mut b = tar::Builder::new(Vec::new());
        raw_entry(&mut b, "a.txt", tar::EntryType::Regular, b"ok");
        raw_entry(&mut b, "zeros.txt", tar::EntryType::Regular, &vec![0u8; 10 << 20]);
        raw_entry(&mut b, "c.txt", tar::EntryType::Regular, b"ok");
        let l = list_members(InputKind::TarGz, boxed(gz(&b.into_inner().unwrap()))).unwrap();
        assert_eq!(l.stop, Some(ListStop::InflateLimit));
        assert_eq!(names(&l), ["a.txt", "zeros.txt"]);
    }

    #[test]
    fn archive_oversized_tar_header_stops_listing() {
        // A 2 MiB GNU long name, after a member large enough to hide it if seeking over the
        // member counted towards the header allowance.
        let big: Vec<u8> = (0..3u32 << 20).map(|j| (j.wrapping_mul(2654435761) >> 13) as u8).collect();
        let mut b = tar::Builder::new(Vec::new());
        raw_entry(&mut b, "big.bin", tar::EntryType::Regular, &big);
        raw_entry(&mut b, "././@LongLink", tar::EntryType::GNULongName, &vec![b'n'; 2 << 20]);
        raw_entry(&mut b, "after.txt", tar::EntryType::Regular, b"x");
        let tar = b.into_inner().unwrap();
        for (kind, bytes) in [(InputKind::Tar, tar.clone()), (InputKind::TarGz, gz(&tar))] {
            let l = list_members(kind, boxed(bytes)).unwrap();
            assert_eq!(l.stop, Some(ListStop::Truncated), "{kind:?}");
            assert_eq!(names(&l), ["big.bin"], "{kind:?}");
        }
    }

    #[test]
    fn archive_wrong_format_and_kinds() {
        let text = b"just some text, not an archive".to_vec();
        assert!(matches!(list_members(InputKind::Zip, boxed(text.clone())), Err(ListError::WrongFormat { .. })));
        assert!(matches!(list_members(InputKind::TarGz, boxed(text.clone())), Err(ListError::WrongFormat { .. })));
        assert!(matches!(list_members(InputKind::Tar, boxed(text.clone())), Err(ListError::WrongFormat { .. })));
        assert!(matches!(list_members(InputKind::Text, boxed(text)), Err(ListError::NotAnArchive(InputKind::Text))));
        let empty = list_members(InputKind::Tar, boxed(Vec::new())).unwrap();
        assert!(!empty.truncated && empty.members.is_empty());
    }
}
