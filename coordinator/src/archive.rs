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

use medbatch_schemas::InputKind;
use std::cell::Cell;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::rc::Rc;

/// What listing and reading need from an input: bytes, and seeking (zip's directory is at the end).
pub use medbatch_connectors::inputs::ReadSeek;

/// Most entries listed from one archive; past this the listing stops (a header flood, not
/// notes). Ten times the worker's default member limit for one read.
pub const LIST_MAX_MEMBERS: usize = 1_000_000;
/// Most bytes inflated while listing a tar.gz; the worker's default per-archive limit, since
/// a job could not read past it either.
pub const LIST_MAX_INFLATED_BYTES: u64 = 4 << 30;
/// Largest inflated/compressed ratio of a tar.gz stream, as in the worker.
pub const LIST_MAX_INFLATE_RATIO: u64 = 100;
/// The ratio limit applies only past this many inflated bytes, as in the worker.
const RATIO_CHECK_MIN_BYTES: u64 = 1 << 20;
/// Bytes the tar reader may consume for one member's headers (PAX records, GNU long names)
/// beyond skipping the previous member's data; the tar crate buffers these whole.
const TAR_HEADER_ALLOWANCE_BYTES: u64 = 1 << 20;
const TAR_BLOCK_BYTES: u64 = 512;

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
    /// A tar.gz inflates past [`LIST_MAX_INFLATED_BYTES`] or [`LIST_MAX_INFLATE_RATIO`].
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
            let meter = Rc::new(Meter::new(true));
            let compressed = Metered { inner: reader, meter: Rc::clone(&meter), compressed_side: true };
            let decoder = flate2::bufread::GzDecoder::new(BufReader::new(compressed));
            let stream = Metered { inner: decoder, meter: Rc::clone(&meter), compressed_side: false };
            let mut archive = tar::Archive::new(stream);
            let entries = archive.entries();
            Ok(walk_tar(entries, &meter))
        }
        _ => {
            if !starts_like_tar(&sniff(&mut reader, TAR_BLOCK_BYTES)?) {
                return Err(ListError::WrongFormat { expected: "tar" });
            }
            let meter = Rc::new(Meter::new(false));
            let stream = Metered { inner: reader, meter: Rc::clone(&meter), compressed_side: false };
            let mut archive = tar::Archive::new(stream);
            let entries = archive.entries_with_seek();
            Ok(walk_tar(entries, &meter))
        }
    }
}

fn walk_tar<R: Read>(entries: io::Result<tar::Entries<'_, R>>, meter: &Meter) -> Listing {
    let mut members = Vec::new();
    let mut entries = match entries {
        Ok(e) => e,
        Err(_) => return Listing::stopped(members, meter.stop()),
    };
    let mut previous_size = 0u64;
    loop {
        // Listing never reads member data, so before the next header the tar reader skips
        // exactly the previous member's padded data: read through on a gzip stream, seeked
        // over (so not counted) on a plain tar.
        let skip = if meter.gzip { previous_size.div_ceil(TAR_BLOCK_BYTES) * TAR_BLOCK_BYTES } else { 0 };
        meter.header_allowance.set(skip.saturating_add(TAR_HEADER_ALLOWANCE_BYTES));
        let entry = match entries.next() {
            None if meter.eof.get() => return Listing::stopped(members, ListStop::Truncated),
            None => return Listing::complete(members),
            Some(Err(_)) => return Listing::stopped(members, meter.stop()),
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

/// Whether the first block (up to 512 bytes) of a plain tar is a tar header: its checksum
/// matches, or it is the all-zero end marker of an empty archive. A short input counts when
/// it has the ustar magic (a tar cut inside its first header, which listing reports).
fn starts_like_tar(head: &[u8]) -> bool {
    let block = TAR_BLOCK_BYTES as usize;
    if head.len() < block {
        return head.get(257..262) == Some(b"ustar");
    }
    if head.iter().all(|&b| b == 0) {
        return true;
    }
    // The checksum is the byte sum of the header with its own field counted as spaces.
    let sum: u32 =
        head[..148].iter().chain(&head[156..block]).map(|&b| u32::from(b)).sum::<u32>() + 8 * u32::from(b' ');
    tar::Header::from_byte_slice(&head[..block]).cksum().ok() == Some(sum)
}

/// Reads up to `n` bytes from the start, then rewinds.
fn sniff(r: &mut Box<dyn ReadSeek>, n: u64) -> io::Result<Vec<u8>> {
    r.seek(SeekFrom::Start(0))?;
    let mut head = Vec::new();
    r.take(n).read_to_end(&mut head)?;
    r.seek(SeekFrom::Start(0))?;
    Ok(head)
}

/// Counts both sides of an archive stream, stops a tar.gz that inflates past the limits, and
/// bounds what the tar reader may consume for headers. Shared by the readers stacked around
/// the decoder, since their errors reach the caller only through the tar reader.
struct Meter {
    gzip: bool,
    compressed: Cell<u64>,
    inflated: Cell<u64>,
    header_allowance: Cell<u64>,
    eof: Cell<bool>,
    inflate_limit_hit: Cell<bool>,
}

impl Meter {
    fn new(gzip: bool) -> Self {
        Self {
            gzip,
            compressed: Cell::new(0),
            inflated: Cell::new(0),
            header_allowance: Cell::new(u64::MAX),
            eof: Cell::new(false),
            inflate_limit_hit: Cell::new(false),
        }
    }

    fn stop(&self) -> ListStop {
        if self.inflate_limit_hit.get() {
            ListStop::InflateLimit
        } else {
            ListStop::Truncated
        }
    }
}

struct Metered<R> {
    inner: R,
    meter: Rc<Meter>,
    compressed_side: bool,
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let m = &self.meter;
        if self.compressed_side {
            let n = self.inner.read(buf)?;
            m.compressed.set(m.compressed.get() + n as u64);
            return Ok(n);
        }
        let allowance = m.header_allowance.get();
        if allowance == 0 {
            return Err(io::Error::other("tar headers exceed the listing allowance"));
        }
        let len = buf.len().min(usize::try_from(allowance).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..len])?;
        if n == 0 && len > 0 {
            m.eof.set(true);
        }
        let inflated = m.inflated.get() + n as u64;
        m.inflated.set(inflated);
        m.header_allowance.set(allowance - n as u64);
        let over_ratio =
            inflated > RATIO_CHECK_MIN_BYTES && inflated > m.compressed.get().saturating_mul(LIST_MAX_INFLATE_RATIO);
        if m.gzip && (inflated > LIST_MAX_INFLATED_BYTES || over_ratio) {
            m.inflate_limit_hit.set(true);
            return Err(io::Error::other("archive inflates past the listing limits"));
        }
        Ok(n)
    }
}

/// Plain tar seeks over member data; seeking delivers no bytes, so nothing is counted.
impl<R: Seek> Seek for Metered<R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.inner.seek(pos)
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
