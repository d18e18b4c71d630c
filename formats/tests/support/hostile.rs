//! Hostile image files built byte by byte (no library in between, so a header can say
//! anything): DICOM files whose header declares sizes and values of the test's choosing,
//! NIfTI-1 volumes plain or gzip-compressed with any amount of trailing inflation, and PNGs
//! claiming any size. Shared by the crate's tests and the end-to-end memory test.

#![allow(dead_code)]

use std::io::Write;

/// A DICOM file's declared image fields. `slope` is written as the RescaleSlope string as is.
pub struct Dicom<'a> {
    pub rows: u16,
    pub columns: u16,
    pub frames: u32,
    pub slope: &'a str,
    /// Bytes of pixel data actually stored (whatever the header declares).
    pub pixel_bytes: usize,
}

impl Default for Dicom<'_> {
    fn default() -> Self {
        Self { rows: 4, columns: 3, frames: 1, slope: "1", pixel_bytes: 4 * 3 * 2 }
    }
}

fn element(out: &mut Vec<u8>, group: u16, elem: u16, vr: &[u8; 2], value: &[u8]) {
    let mut value = value.to_vec();
    if value.len() % 2 == 1 {
        value.push(if vr == b"UI" || vr == b"OB" { 0 } else { b' ' });
    }
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    out.extend_from_slice(vr);
    if matches!(vr, b"OB" | b"OW" | b"UN" | b"SQ" | b"UT") {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(&value);
}

/// A CT image in Explicit VR Little Endian, 16-bit unsigned greyscale.
pub fn dicom(d: &Dicom<'_>) -> Vec<u8> {
    const SOP_CLASS: &[u8] = b"1.2.840.10008.5.1.4.1.1.2";
    const INSTANCE: &[u8] = b"1.2.826.0.1.3680043.8.498.1";
    let mut meta = Vec::new();
    element(&mut meta, 0x0002, 0x0001, b"OB", &[0, 1]);
    element(&mut meta, 0x0002, 0x0002, b"UI", SOP_CLASS);
    element(&mut meta, 0x0002, 0x0003, b"UI", INSTANCE);
    element(&mut meta, 0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.1");
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    element(&mut out, 0x0002, 0x0000, b"UL", &(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    element(&mut out, 0x0008, 0x0016, b"UI", SOP_CLASS);
    element(&mut out, 0x0008, 0x0018, b"UI", INSTANCE);
    element(&mut out, 0x0008, 0x0060, b"CS", b"CT");
    element(&mut out, 0x0010, 0x0020, b"LO", b"TEST-ID");
    element(&mut out, 0x0020, 0x000D, b"UI", b"1.2.826.0.1.3680043.8.498.2");
    element(&mut out, 0x0020, 0x000E, b"UI", b"1.2.826.0.1.3680043.8.498.3");
    element(&mut out, 0x0020, 0x0013, b"IS", b"1");
    element(&mut out, 0x0028, 0x0002, b"US", &1u16.to_le_bytes());
    element(&mut out, 0x0028, 0x0004, b"CS", b"MONOCHROME2");
    element(&mut out, 0x0028, 0x0008, b"IS", d.frames.to_string().as_bytes());
    element(&mut out, 0x0028, 0x0010, b"US", &d.rows.to_le_bytes());
    element(&mut out, 0x0028, 0x0011, b"US", &d.columns.to_le_bytes());
    element(&mut out, 0x0028, 0x0100, b"US", &16u16.to_le_bytes());
    element(&mut out, 0x0028, 0x0101, b"US", &16u16.to_le_bytes());
    element(&mut out, 0x0028, 0x0102, b"US", &15u16.to_le_bytes());
    element(&mut out, 0x0028, 0x0103, b"US", &0u16.to_le_bytes());
    element(&mut out, 0x0028, 0x1052, b"DS", b"-1024");
    element(&mut out, 0x0028, 0x1053, b"DS", d.slope.as_bytes());
    let pixels: Vec<u8> = (0..d.pixel_bytes).map(|i| (i * 7 % 251) as u8).collect();
    element(&mut out, 0x7FE0, 0x0010, b"OW", &pixels);
    out
}

/// A NIfTI-1 header (little endian, single file) for int16 voxels of `dims`.
pub fn nifti_header(dims: &[u16]) -> Vec<u8> {
    let mut h = vec![0u8; 348];
    h[0..4].copy_from_slice(&348i32.to_le_bytes());
    h[40..42].copy_from_slice(&(dims.len() as i16).to_le_bytes());
    for (i, &d) in dims.iter().enumerate() {
        h[42 + 2 * i..44 + 2 * i].copy_from_slice(&(d as i16).to_le_bytes());
    }
    h[70..72].copy_from_slice(&4i16.to_le_bytes()); // datatype: int16
    h[72..74].copy_from_slice(&16i16.to_le_bytes()); // bitpix
    for i in 0..=dims.len() {
        h[76 + 4 * i..80 + 4 * i].copy_from_slice(&1f32.to_le_bytes()); // pixdim
    }
    h[108..112].copy_from_slice(&352f32.to_le_bytes()); // vox_offset
    h[112..116].copy_from_slice(&1f32.to_le_bytes()); // scl_slope
    h[344..348].copy_from_slice(b"n+1\0");
    h.extend_from_slice(&[0, 0, 0, 0]); // no extensions
    h
}

/// A plain NIfTI-1 volume of `dims` (int16), voxels counting up.
pub fn nifti(dims: &[u16]) -> Vec<u8> {
    let mut out = nifti_header(dims);
    let n: usize = dims.iter().map(|&d| usize::from(d)).product();
    for i in 0..n {
        out.extend_from_slice(&((i % 1000) as i16).to_le_bytes());
    }
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `head` gzip-compressed, followed by gzip members of zeros until the whole stream inflates
/// to at least `inflated` bytes: a few MB on disk (members of 64 MiB of zeros, compressed
/// once and repeated).
pub fn gzip_bomb(head: &[u8], inflated: u64) -> Vec<u8> {
    const CHUNK: usize = 64 << 20;
    let zeros = gzip(&vec![0u8; CHUNK]);
    let mut out = gzip(head);
    let mut total = head.len() as u64;
    while total < inflated {
        out.extend_from_slice(&zeros);
        total += CHUNK as u64;
    }
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &byte in data {
        c ^= u32::from(byte);
        for _ in 0..8 {
            c = if c & 1 == 1 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// A 1 × 1 RGB PNG whose header claims `width` × `height` (the IHDR chunk rewritten, its CRC
/// made to match).
pub fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    image::RgbImage::new(1, 1).write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out[16..20].copy_from_slice(&width.to_be_bytes());
    out[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&out[12..29]);
    out[29..33].copy_from_slice(&crc.to_be_bytes());
    out
}
