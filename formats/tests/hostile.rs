//! Headers that lie: each declared size or value is refused before memory is reserved, with
//! an error naming the field or the size, and a gzip NIfTI is never inflated past what its
//! header declares.

mod support;

use medbatch_formats::dicom::{read_frames_from, DicomError};
use medbatch_formats::image::{decode, ImageFileError};
use medbatch_formats::nifti::{read_volume, NiftiError};
use medbatch_formats::ImageLimits;
use medbatch_schemas::InputErrorKind;
use support::hostile::{dicom, gzip_bomb, nifti, nifti_header, png_claiming, Dicom};

fn limits() -> ImageLimits {
    ImageLimits::default()
}

#[test]
fn a_well_formed_dicom_decodes() {
    let f = read_frames_from(&dicom(&Dicom::default()), &limits()).unwrap();
    assert_eq!((f.header.rows, f.header.columns, f.frames.len(), f.frames[0].len()), (4, 3, 1, 12));
    assert_eq!((f.header.rescale_slope, f.header.rescale_intercept), (1.0, -1024.0));
}

#[test]
fn a_dicom_declaring_65535_squared_pixels_in_4000_frames_is_refused_unread() {
    let d = Dicom { rows: 65535, columns: 65535, frames: 4000, ..Dicom::default() };
    let e = read_frames_from(&dicom(&d), &limits()).unwrap_err();
    assert!(matches!(e, DicomError::TooLarge { .. }), "{e}");
    assert_eq!(e.kind(), InputErrorKind::TooLarge);
    assert!(e.to_string().contains("65535 x 65535 pixels, 4000 frame(s)"), "{e}");
}

#[test]
fn zero_rows_or_columns_are_named() {
    for (d, field) in
        [(Dicom { rows: 0, ..Dicom::default() }, "Rows"), (Dicom { columns: 0, ..Dicom::default() }, "Columns")]
    {
        let e = read_frames_from(&dicom(&d), &limits()).unwrap_err();
        assert_eq!(e.kind(), InputErrorKind::CorruptImage, "{e}");
        assert_eq!(e.to_string(), format!("DICOM field {field} is 0 or negative"));
    }
}

#[test]
fn rescale_values_that_are_not_finite_numbers_are_named() {
    for (slope, reason) in
        [("ab", "is not a number"), ("NaN", "is not finite"), ("inf", "is not finite"), ("0", "is 0")]
    {
        let d = Dicom { slope, ..Dicom::default() };
        let e = read_frames_from(&dicom(&d), &limits()).unwrap_err();
        assert!(matches!(e, DicomError::Field(_)), "{slope}: {e}");
        assert_eq!(e.to_string(), format!("DICOM field RescaleSlope {reason}"), "{slope}");
    }
}

#[test]
fn element_lengths_past_the_end_of_the_file_are_refused_before_dicom_rs_reserves_them() {
    // 16 bytes after the pixel data: a tag, an OB VR and a 4 GB length.
    let mut trailing = dicom(&Dicom::default());
    trailing.extend_from_slice(&[0x09, 0x00, 0x10, 0x00, b'O', b'B', 0, 0, 0xFF, 0xFF, 0xFF, 0xF0, 1, 2, 3, 4]);
    // A VR damaged into one dicom-rs does not know (read as UN: a 32-bit length made of the
    // value's first bytes, here "1.2.").
    let mut vr = dicom(&Dicom::default());
    let at = vr.windows(2).position(|w| w == b"UI").unwrap();
    vr[at + 1] = b'\t';
    for (what, bytes) in [("trailing element", &trailing), ("unknown VR", &vr)] {
        let e = read_frames_from(bytes, &limits()).unwrap_err();
        assert_eq!(e.kind(), InputErrorKind::CorruptImage, "{what}: {e}");
        assert!(e.to_string().contains("only"), "{what}: {e}");
    }
    // Headers are read up to the pixel data: what follows it is never parsed.
    let header = |b: &[u8]| medbatch_formats::dicom::read_header_from(b, b.len() as u64);
    assert_eq!(header(&trailing).unwrap().rows, 4);
    assert_eq!(header(&vr).unwrap_err().kind(), InputErrorKind::CorruptImage);
}

#[test]
fn non_dicom_bytes_are_named_without_quoting_them() {
    let e = read_frames_from(&b"Patient seen in clinic today"[..], &limits()).unwrap_err();
    assert_eq!(e.kind(), InputErrorKind::WrongFormat);
    assert!(!e.to_string().contains("Patient"), "{e}");
}

#[test]
fn a_plain_and_a_gzip_nifti_decode_alike() {
    let plain = nifti(&[5, 4, 3]);
    let zipped = gzip_bomb(&plain, 0);
    for bytes in [plain, zipped] {
        let v = read_volume(&bytes, &limits()).unwrap();
        assert_eq!((v.width, v.height, v.depth), (5, 4, 3));
        assert_eq!(v.slice(1).unwrap()[..3], [20.0, 21.0, 22.0]);
        let all: Vec<f64> = (0..v.depth).flat_map(|z| v.slice(z).unwrap()).collect();
        assert_eq!((all[0], all[59]), (0.0, 59.0));
    }
}

#[test]
fn a_gzip_nifti_inflating_to_6_gib_is_refused_one_byte_past_its_declared_size() {
    // The header declares 64 x 64 x 4 voxels; 6 GiB of zeros follow in the stream.
    let bomb = gzip_bomb(&nifti(&[64, 64, 4]), 6 << 30);
    assert!(bomb.len() < 8 << 20, "{} bytes on disk", bomb.len());
    let e = read_volume(&bomb, &limits()).err().expect("refused");
    assert!(matches!(e, NiftiError::Bomb { declared } if declared == 352 + 64 * 64 * 4 * 2), "{e}");
    assert_eq!(e.kind(), InputErrorKind::CompressionBomb);
    // A plain file with bytes after its voxels is read as far as declared.
    let mut padded = nifti(&[4, 4, 2]);
    padded.extend_from_slice(&[0; 100]);
    assert_eq!(read_volume(&padded, &limits()).unwrap().depth, 2);
}

#[test]
fn a_gzip_nifti_declaring_6_gib_is_refused_before_inflating() {
    let bomb = gzip_bomb(&nifti_header(&[2048, 2048, 768]), 6 << 30);
    let e = read_volume(&bomb, &limits()).err().expect("refused");
    assert!(matches!(e, NiftiError::TooLarge { .. }), "{e}");
    assert_eq!(e.kind(), InputErrorKind::TooLarge);
    assert!(e.to_string().contains("6442450944 voxel bytes (2048 x 2048 x 768 at 16 bits)"), "{e}");
}

#[test]
fn a_nifti_with_a_zero_dimension_is_refused() {
    let e = read_volume(&nifti_header(&[64, 0, 4]), &limits()).err().expect("refused");
    assert_eq!(e.kind(), InputErrorKind::CorruptImage, "{e}");
}

#[test]
fn a_png_declaring_30000_squared_pixels_is_refused_undecoded() {
    let e = decode(&png_claiming(30_000, 30_000), &limits()).unwrap_err();
    assert!(matches!(e, ImageFileError::TooLarge { width: 30_000, height: 30_000, .. }), "{e}");
    assert_eq!(e.kind(), InputErrorKind::TooLarge);
    let e = decode(&png_claiming(0, 5), &limits()).unwrap_err();
    assert!(matches!(e, ImageFileError::Corrupt(_) | ImageFileError::Empty { .. }), "{e}");
}
