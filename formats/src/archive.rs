//! Archives (tar, tar.gz, zip) walked member by member, by one walker per format that serves
//! both listing at planning time and reading in workers: the caller's visitor decides what to
//! do with each member, the walker owns the stream — its meter, the tar header allowance, the
//! zip local-header fallback — so the two uses stay in step by construction.
//!
//! Listing ([`list`]) is a walk whose visitor keeps names and sizes, skips member data and
//! judges nothing: every non-directory entry is listed by its name as the worker will see it,
//! unsafe names and links included, so that the worker turns each into an error row and
//! nothing in the archive goes unreported. Listing bounds its own work: a tar.gz is held to the
//! limits a worker reading it would meet, and a listing that has to stop early returns the
//! members found so far, marked with the reason.

use crate::limits::{
    DEFAULT_MAX_ARCHIVE_INFLATED_BYTES, DEFAULT_MAX_INFLATE_RATIO, LIST_MAX_MEMBERS, TAR_BLOCK_BYTES,
    TAR_HEADER_ALLOWANCE_BYTES,
};
use crate::meter::{Metered, StreamMeter};
use crate::sniff::{check_tar_head, format_hint, sniff, sniff_gzip};
use medbatch_schemas::{InputErrorKind, InputKind};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::rc::Rc;

/// Compressed read buffer in front of the gzip decoder. The decoder reads ahead by up to one
/// buffer, so a tar.gz member's compressed size is measured with this much slack.
pub const GZ_BUFFER_BYTES: usize = 32 << 10;

/// Whether the visitor wants the walk to go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Next,
    Stop,
}

/// A tar entry that is not a directory, as the walker meets it.
pub struct TarEntry<'a> {
    /// The name as stored, lossy UTF-8.
    pub name: String,
    /// Whether the stored name was valid UTF-8.
    pub name_is_utf8: bool,
    /// `Some("symbolic link" | "hard link")` for links.
    pub link: Option<&'static str>,
    /// The tar entry type, when it is neither a regular file nor a link.
    pub other_type: Option<String>,
    /// Size the header declares.
    pub size: u64,
    /// The member's bytes (whatever is not read is skipped by the walker).
    pub data: &'a mut dyn Read,
    /// The stream's meter: its compressed offset and, once a limit trips, its verdict.
    pub meter: &'a StreamMeter,
}

/// How a tar walk ended.
#[derive(Debug, PartialEq, Eq)]
pub enum TarEnd {
    /// The end of the archive was reached.
    Complete,
    /// The visitor stopped the walk.
    Stopped,
    /// The stream ended without an end-of-archive marker.
    NoEndMarker,
    /// A stream limit tripped between members (the meter's verdict).
    Limit { kind: InputErrorKind, detail: String },
    /// The stream is truncated or corrupt between members.
    Broken(io::ErrorKind),
}

/// Checks the start of a tar (or tar.gz) stream before walking it, then rewinds.
pub fn open_tar<R: Read + Seek + ?Sized>(reader: &mut R, gzip: bool) -> Result<(), (InputErrorKind, String)> {
    let head = match sniff(reader, TAR_BLOCK_BYTES) {
        Ok(h) if gzip && h.is_empty() => Err((InputErrorKind::Empty, "0 bytes".to_string())),
        Ok(h) if gzip && !h.starts_with(b"\x1f\x8b") => {
            Err((InputErrorKind::WrongFormat, format!("not gzip-compressed{}", format_hint(&h))))
        }
        Ok(_) if gzip => sniff_gzip(reader, TAR_BLOCK_BYTES).map_err(|e| {
            (InputErrorKind::TruncatedArchive, format!("gzip stream is corrupt at its start ({:?})", e.kind()))
        }),
        Ok(h) => Ok(h),
        Err(e) => Err((InputErrorKind::Unreadable, format!("read failed ({:?})", e.kind()))),
    };
    head.and_then(|h| check_tar_head(&h))
}

/// Walks a tar or tar.gz stream (checked by [`open_tar`]), handing every entry that is not a
/// directory to `visit`. A tar.gz is metered against `max_inflated` bytes and `max_ratio`.
pub fn walk_tar<R: Read + Seek>(
    reader: R,
    gzip: bool,
    max_inflated: u64,
    max_ratio: u64,
    visit: &mut dyn FnMut(TarEntry<'_>) -> Flow,
) -> TarEnd {
    let meter = Rc::new(StreamMeter::new(gzip, max_inflated, max_ratio));
    if gzip {
        let compressed = Metered::compressed(reader, &meter);
        let decoder = flate2::bufread::GzDecoder::new(BufReader::with_capacity(GZ_BUFFER_BYTES, compressed));
        let mut archive = tar::Archive::new(Metered::inflated(decoder, &meter));
        walk_entries(archive.entries(), &meter, visit)
    } else {
        let mut archive = tar::Archive::new(Metered::inflated(reader, &meter));
        walk_entries(archive.entries_with_seek(), &meter, visit)
    }
}

fn walk_entries<R: Read>(
    entries: io::Result<tar::Entries<'_, R>>,
    meter: &StreamMeter,
    visit: &mut dyn FnMut(TarEntry<'_>) -> Flow,
) -> TarEnd {
    let failed = |e: &io::Error| match meter.verdict() {
        Some((kind, detail)) => TarEnd::Limit { kind, detail },
        None => TarEnd::Broken(e.kind()),
    };
    let mut entries = match entries {
        Ok(e) => e,
        Err(e) => return failed(&e),
    };
    // Data of the previous member that the tar reader skips before the next header: read
    // through on a gzip stream, seeked over (so not counted) on a plain tar.
    let mut skip_left = 0u64;
    loop {
        let skip_read = if meter.is_gzip() { skip_left } else { 0 };
        meter.allow_header_bytes(skip_read.saturating_add(TAR_HEADER_ALLOWANCE_BYTES));
        let next = entries.next();
        meter.allow_header_bytes(u64::MAX);
        let mut entry = match next {
            None if meter.at_eof() => return TarEnd::NoEndMarker,
            None => return TarEnd::Complete,
            Some(Err(e)) => return failed(&e),
            Some(Ok(entry)) => entry,
        };
        let size = entry.size();
        let data_start = meter.inflated();
        skip_left = size.div_ceil(TAR_BLOCK_BYTES).saturating_mul(TAR_BLOCK_BYTES);
        let entry_type = entry.header().entry_type();
        if entry_type.is_dir() || entry_type.is_pax_global_extensions() {
            continue;
        }
        let raw_name = entry.path_bytes();
        let name_is_utf8 = std::str::from_utf8(&raw_name).is_ok();
        let name = String::from_utf8_lossy(&raw_name).into_owned();
        if name.ends_with('/') {
            continue;
        }
        let link = if entry_type.is_symlink() {
            Some("symbolic link")
        } else if entry_type.is_hard_link() {
            Some("hard link")
        } else {
            None
        };
        let regular = entry_type.is_file() || entry_type.is_contiguous();
        let other_type = (link.is_none() && !regular).then(|| format!("{entry_type:?}"));
        let flow = visit(TarEntry { name, name_is_utf8, link, other_type, size, data: &mut entry, meter });
        skip_left = skip_left.saturating_sub(meter.inflated() - data_start);
        if flow == Flow::Stop {
            return TarEnd::Stopped;
        }
    }
}

/// Checks that a stream starts like a zip archive; returns the first bytes, rewound.
pub fn open_zip<R: Read + Seek + ?Sized>(reader: &mut R) -> Result<(), (InputErrorKind, String)> {
    let head = sniff(reader, 4).map_err(|e| (InputErrorKind::Unreadable, format!("read failed ({:?})", e.kind())))?;
    if matches!(head.as_slice(), b"PK\x03\x04" | b"PK\x05\x06" | b"PK\x07\x08") {
        Ok(())
    } else if head.is_empty() {
        Err((InputErrorKind::Empty, "0 bytes".to_string()))
    } else {
        Err((InputErrorKind::WrongFormat, format!("not a zip archive{}", format_hint(&head))))
    }
}

/// What a zip visitor does with a member it is offered by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// Open it and hand it to [`ZipVisitor::member`].
    Open,
    /// Go on to the next member.
    Skip,
    /// Stop the walk.
    Stop,
}

/// A zip member opened for reading, or why it could not be.
pub type ZipOpened<'a, 'z, R> = Result<&'a mut zip::read::ZipFile<'z, R>, (InputErrorKind, String)>;

/// The visitor of a zip walk: offered each member's name first, so that members not wanted
/// are never opened.
pub trait ZipVisitor {
    /// A member that is not a directory, with the size its header declares.
    fn offer(&mut self, name: &str, size: u64) -> Take;
    /// A member taken by [`ZipVisitor::offer`], opened, or why it could not be.
    fn member<R: Read>(&mut self, name: &str, file: ZipOpened<'_, '_, R>) -> Flow;
}

/// How a zip walk ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ZipEnd {
    /// Every member of the central directory was offered.
    Complete,
    /// The visitor stopped the walk.
    Stopped,
    /// The central directory (at the archive's end) is missing or corrupt — typically a
    /// cut-off upload — so members were read from the local headers before each one until
    /// the data ran out: `taken` of them were taken. `class` says what was wrong.
    LocalHeaders { class: &'static str, taken: usize, stopped: bool },
}

/// Walks a zip archive (checked by [`open_zip`]).
pub fn walk_zip<R: Read + Seek>(mut reader: R, visitor: &mut impl ZipVisitor) -> ZipEnd {
    let mut archive = match zip::ZipArchive::new(&mut reader) {
        Ok(a) => a,
        Err(e) => {
            let class = zip_error_class(&e);
            return walk_local_headers(reader, class, visitor);
        }
    };
    for index in 0..archive.len() {
        let name = archive.name_for_index(index).unwrap_or_default().to_string();
        if name.ends_with('/') {
            continue;
        }
        // A member whose local header is unreadable is still offered (with size 0 when even
        // its central record is unreadable); opening it reports the damage.
        let size = archive.by_index_raw(index).map_or(0, |f| f.size());
        match visitor.offer(&name, size) {
            Take::Skip => continue,
            Take::Stop => return ZipEnd::Stopped,
            Take::Open => {}
        }
        let flow = match archive.by_index(index) {
            Ok(mut file) => visitor.member(&name, Ok(&mut file)),
            Err(zip::result::ZipError::UnsupportedArchive(why)) => {
                visitor.member::<R>(&name, Err((InputErrorKind::UnsupportedKind, format!("zip member: {why}"))))
            }
            Err(e) => {
                let detail = format!("member header is corrupt ({})", zip_error_class(&e));
                visitor.member::<R>(&name, Err((InputErrorKind::TruncatedArchive, detail)))
            }
        };
        if flow == Flow::Stop {
            return ZipEnd::Stopped;
        }
    }
    ZipEnd::Complete
}

fn walk_local_headers<R: Read + Seek>(mut reader: R, class: &'static str, visitor: &mut impl ZipVisitor) -> ZipEnd {
    let mut taken = 0usize;
    if reader.seek(SeekFrom::Start(0)).is_ok() {
        // Stops at the first unreadable header, or at the (corrupt) central directory.
        while let Ok(Some(mut file)) = zip::read::read_zipfile_from_stream(&mut reader) {
            let name = file.name().to_string();
            if file.is_dir() || name.ends_with('/') {
                continue;
            }
            match visitor.offer(&name, file.size()) {
                Take::Skip => continue,
                Take::Stop => return ZipEnd::LocalHeaders { class, taken, stopped: true },
                Take::Open => {}
            }
            taken += 1;
            if visitor.member(&name, Ok(&mut file)) == Flow::Stop {
                return ZipEnd::LocalHeaders { class, taken, stopped: true };
            }
        }
    }
    ZipEnd::LocalHeaders { class, taken, stopped: false }
}

/// A zip error's class, for error details (never the archive's bytes).
pub fn zip_error_class(e: &zip::result::ZipError) -> &'static str {
    match e {
        zip::result::ZipError::Io(_) => "i/o error",
        zip::result::ZipError::InvalidArchive(_) => "invalid archive structure",
        zip::result::ZipError::UnsupportedArchive(why) => why,
        _ => "unreadable",
    }
}

/// One archive entry that is not a directory, as planning lists it.
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

    fn new(members: Vec<MemberInfo>, stop: Option<ListStop>) -> Self {
        Self { members, truncated: stop.is_some(), stop }
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

/// Keeps names and sizes, never opens a member, and stops past [`LIST_MAX_MEMBERS`].
#[derive(Default)]
struct Lister {
    members: Vec<MemberInfo>,
    too_many: bool,
}

impl Lister {
    fn add(&mut self, name: &str, size: u64) -> Flow {
        if self.members.len() >= LIST_MAX_MEMBERS {
            self.too_many = true;
            return Flow::Stop;
        }
        self.members.push(MemberInfo { name: name.to_string(), size });
        Flow::Next
    }
}

impl ZipVisitor for Lister {
    fn offer(&mut self, name: &str, size: u64) -> Take {
        match self.add(name, size) {
            Flow::Next => Take::Skip,
            Flow::Stop => Take::Stop,
        }
    }

    fn member<R: Read>(&mut self, _: &str, _: ZipOpened<'_, '_, R>) -> Flow {
        Flow::Next
    }
}

/// Lists the non-directory entries of a tar, tar.gz or zip archive from their headers.
///
/// An empty input (0 bytes) lists as an empty, complete archive. Content that is not the
/// archive format at all is an error; damage after the start is a listing that stopped early.
pub fn list<R: Read + Seek>(kind: InputKind, reader: R) -> Result<Listing, ListError> {
    crate::guard::guarded("archive", || list_unguarded(kind, reader))
        .unwrap_or_else(|detail| Err(ListError::Io(io::Error::other(detail))))
}

fn list_unguarded<R: Read + Seek>(kind: InputKind, mut reader: R) -> Result<Listing, ListError> {
    if !kind.is_archive() {
        return Err(ListError::NotAnArchive(kind));
    }
    let opened =
        if kind == InputKind::Zip { open_zip(&mut reader) } else { open_tar(&mut reader, kind == InputKind::TarGz) };
    match opened {
        Ok(()) => {}
        Err((InputErrorKind::Empty, _)) => return Ok(Listing::new(Vec::new(), None)),
        // A tar cut inside its first header, or a gzip stream corrupt at its start: listed as
        // nothing, and reported by the worker.
        Err((InputErrorKind::TruncatedArchive, _)) => return Ok(Listing::new(Vec::new(), Some(ListStop::Truncated))),
        Err((InputErrorKind::Unreadable, detail)) => return Err(ListError::Io(io::Error::other(detail))),
        Err(_) => {
            let expected = match kind {
                InputKind::Zip => "zip",
                InputKind::TarGz => "gzip-compressed tar",
                _ => "tar",
            };
            return Err(ListError::WrongFormat { expected });
        }
    }
    let mut lister = Lister::default();
    let stop = if kind == InputKind::Zip {
        match walk_zip(reader, &mut lister) {
            ZipEnd::Complete => None,
            ZipEnd::Stopped => Some(ListStop::TooManyMembers),
            ZipEnd::LocalHeaders { .. } if lister.too_many => Some(ListStop::TooManyMembers),
            ZipEnd::LocalHeaders { .. } => Some(ListStop::Truncated),
        }
    } else {
        let end = walk_tar(
            reader,
            kind == InputKind::TarGz,
            DEFAULT_MAX_ARCHIVE_INFLATED_BYTES,
            DEFAULT_MAX_INFLATE_RATIO,
            &mut |e: TarEntry<'_>| lister.add(&e.name, e.size),
        );
        match end {
            TarEnd::Complete => None,
            TarEnd::Stopped => Some(ListStop::TooManyMembers),
            TarEnd::Limit { kind: InputErrorKind::CompressionBomb, .. } => Some(ListStop::InflateLimit),
            TarEnd::Limit { .. } | TarEnd::Broken(_) | TarEnd::NoEndMarker => Some(ListStop::Truncated),
        }
    };
    Ok(Listing::new(lister.members, stop))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use std::io::{Cursor, Write};

    fn boxed(bytes: Vec<u8>) -> Cursor<Vec<u8>> {
        Cursor::new(bytes)
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
        let l = list(InputKind::Tar, boxed(sample_tar())).unwrap();
        assert!(!l.truncated);
        assert_eq!(names(&l), ["notes/a.txt", "../evil.txt", "link.txt", "b.jsonl"]);
        assert_eq!(l.members[0].size, 10);
        assert_eq!(l.members[3].size, 3000);
    }

    #[test]
    fn archive_lists_tar_gz_members() {
        let l = list(InputKind::TarGz, boxed(gz(&sample_tar()))).unwrap();
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
        let l = list(InputKind::Zip, boxed(bytes.clone())).unwrap();
        assert!(!l.truncated);
        assert_eq!(
            l.members,
            [MemberInfo { name: "d/a.txt".into(), size: 5 }, MemberInfo { name: "../evil.txt".into(), size: 1 }]
        );

        // Cut off: the central directory is gone, the local headers still list a prefix.
        let cut = bytes[..bytes.len() - 60].to_vec();
        let l = list(InputKind::Zip, boxed(cut)).unwrap();
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
        let l = list(InputKind::TarGz, boxed(cut)).unwrap();
        assert_eq!(l.stop, Some(ListStop::Truncated));
        assert!(!l.members.is_empty() && l.members.len() < 20, "{}", l.members.len());
        assert_eq!(l.members[0].name, "n0.txt");
    }

    #[test]
    fn archive_truncated_plain_tar_is_reported() {
        let tar = sample_tar();
        // Cut at a block boundary after the first member: no error from the tar reader, only
        // the missing end-of-archive marker tells.
        let l = list(InputKind::Tar, boxed(tar[..512 * 3].to_vec())).unwrap();
        assert_eq!(l.stop, Some(ListStop::Truncated));
        assert_eq!(names(&l), ["notes/a.txt"]);
    }

    #[test]
    fn archive_tar_gz_bomb_stops_listing() {
        let mut b = tar::Builder::new(Vec::new());
        raw_entry(&mut b, "a.txt", tar::EntryType::Regular, b"ok");
        raw_entry(&mut b, "zeros.txt", tar::EntryType::Regular, &vec![0u8; 10 << 20]);
        raw_entry(&mut b, "c.txt", tar::EntryType::Regular, b"ok");
        let l = list(InputKind::TarGz, boxed(gz(&b.into_inner().unwrap()))).unwrap();
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
            let l = list(kind, boxed(bytes)).unwrap();
            assert_eq!(l.stop, Some(ListStop::Truncated), "{kind:?}");
            assert_eq!(names(&l), ["big.bin"], "{kind:?}");
        }
    }

    #[test]
    fn archive_wrong_format_and_kinds() {
        let text = b"just some text, not an archive".to_vec();
        assert!(matches!(list(InputKind::Zip, boxed(text.clone())), Err(ListError::WrongFormat { .. })));
        assert!(matches!(list(InputKind::TarGz, boxed(text.clone())), Err(ListError::WrongFormat { .. })));
        assert!(matches!(list(InputKind::Tar, boxed(text.clone())), Err(ListError::WrongFormat { .. })));
        assert!(matches!(list(InputKind::Text, boxed(text)), Err(ListError::NotAnArchive(InputKind::Text))));
        let empty = list(InputKind::Tar, boxed(Vec::new())).unwrap();
        assert!(!empty.truncated && empty.members.is_empty());
    }
}
