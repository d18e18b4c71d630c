//! DICOM reading against pydicom and numpy on real files: the test files inside the pydicom
//! wheel (`MEDBATCH_PYDICOM_DATA`, set by infra/test.sh), and reference values computed from
//! them by tests/fixtures/dicom/make_reference.py (stored values, Hounsfield units, the three
//! CT windows, radiograph VOI windowing with MONOCHROME1, MR min–max over a series, slice
//! choice). A missing data folder fails the tests.

use medbatch_formats::dicom::{read_header, DicomError, Frames};
use medbatch_worker::imaging::recipes::{
    ct_rgb, minmax_u8, radiograph_u8, rescaled, slice_choice, window_u8, CT_WINDOWS, MAX_SLICES,
};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn data() -> PathBuf {
    let d = std::env::var("MEDBATCH_PYDICOM_DATA")
        .expect("MEDBATCH_PYDICOM_DATA: run the tests through `bash infra/test.sh` (pydicom's test files)");
    PathBuf::from(d)
}

fn read_frames(path: &Path) -> Result<Frames, DicomError> {
    medbatch_formats::dicom::read_frames(path, &Default::default())
}

fn reference() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/dicom/reference.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn stats<T: Copy + Into<i64>>(v: &[T]) -> Value {
    let min = v.iter().map(|&x| x.into()).min().unwrap();
    let max = v.iter().map(|&x| x.into()).max().unwrap();
    let sum: i64 = v.iter().map(|&x| x.into()).sum();
    let weighted: i64 = v.iter().enumerate().map(|(i, &x)| ((i % 9973) as i64 + 1) * x.into()).sum();
    json!({ "min": min, "max": max, "sum": sum, "weighted": weighted })
}

#[test]
fn stored_values_and_headers_equal_pydicom() {
    let r = reference();
    for (name, e) in r["files"].as_object().unwrap() {
        let path = data().join(name);
        let h = read_header(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let eh = &e["header"];
        assert_eq!(h.modality, eh["modality"], "{name}");
        assert_eq!(h.transfer_syntax, eh["transfer_syntax"], "{name}");
        let dims = (eh["rows"].as_u64(), eh["columns"].as_u64(), eh["frames"].as_u64());
        assert_eq!((Some(u64::from(h.rows)), Some(u64::from(h.columns)), Some(u64::from(h.frames))), dims, "{name}");
        assert_eq!(h.photometric, eh["photometric"], "{name}");
        assert_eq!(h.series_uid, eh["series_uid"], "{name}");
        assert_eq!(h.instance_number, eh["instance_number"].as_i64(), "{name}");
        let f = read_frames(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let all: Vec<i32> = f.frames.concat();
        assert_eq!(stats(&all), e["stored"], "{name}: stored values");
        if let Some(w) = e.get("ct_windows") {
            let hu = rescaled(&all, &f.header);
            let rounded: Vec<i64> = hu.iter().map(|v| v.round_ties_even() as i64).collect();
            assert_eq!(stats(&rounded), e["hu"], "{name}: HU");
            for (c, (lo, hi)) in ["r", "g", "b"].iter().zip(CT_WINDOWS) {
                assert_eq!(stats(&window_u8(&hu, lo, hi)), w[c], "{name}: window {c}");
            }
            let rgb = ct_rgb(&hu);
            assert_eq!(rgb.len(), hu.len() * 3);
            assert_eq!(rgb[1], window_u8(&hu[..1], CT_WINDOWS[1].0, CT_WINDOWS[1].1)[0]);
        }
        if let Some(want) = e.get("radiograph_u8") {
            assert_eq!(stats(&radiograph_u8(&all, &f.header)), *want, "{name}: radiograph");
        }
    }
}

#[test]
fn series_are_ordered_and_normalised_like_the_reference() {
    let r = reference();
    for (folder, e) in r["series"].as_object().unwrap() {
        let mut slices: Vec<(i64, PathBuf)> = std::fs::read_dir(data().join(folder))
            .unwrap()
            .map(|d| {
                let p = d.unwrap().path();
                (read_header(&p).unwrap().instance_number.unwrap(), p)
            })
            .collect();
        slices.sort();
        let numbers: Vec<i64> = slices.iter().map(|s| s.0).collect();
        assert_eq!(json!(numbers), e["instance_numbers"], "{folder}");
        let frames: Vec<_> = slices.iter().map(|(_, p)| read_frames(p).unwrap()).collect();
        assert!(frames.iter().all(|f| f.header.series_uid == e["series_uid"]));
        let values: Vec<Vec<f64>> = frames.iter().map(|f| rescaled(&f.frames[0], &f.header)).collect();
        if let Some(w) = e.get("ct_windows") {
            for (i, v) in values.iter().enumerate() {
                for (c, (lo, hi)) in ["r", "g", "b"].iter().zip(CT_WINDOWS) {
                    assert_eq!(stats(&window_u8(v, lo, hi)), w[i][c], "{folder} slice {i} {c}");
                }
            }
        } else {
            for (i, s) in minmax_u8(&values).iter().enumerate() {
                assert_eq!(stats(s), e["minmax_u8"][i], "{folder} slice {i}");
            }
        }
    }
    for (n, want) in r["slice_choice"].as_object().unwrap() {
        assert_eq!(json!(slice_choice(n.parse().unwrap(), MAX_SLICES)), *want, "{n} slices");
    }
}

#[test]
fn unsupported_and_broken_files_are_named_errors() {
    let e = read_frames(&data().join("MR_small_jpeg_ls_lossless.dcm")).unwrap_err();
    assert!(matches!(e, DicomError::UnsupportedSyntax { .. }) && e.to_string().contains("JPEG-LS"), "{e}");
    let e = read_frames(&data().join("JPGExtended.dcm")).unwrap_err();
    assert!(e.to_string().contains("1.2.840.10008.1.2.4.51"), "{e}");
    assert!(read_frames(&data().join("MR_truncated.dcm")).is_err());
    let dir = tempfile::tempdir().unwrap();
    let not = dir.path().join("notes.dcm");
    std::fs::write(&not, b"Patient seen in clinic; not an image.").unwrap();
    let e = read_header(&not).unwrap_err();
    assert!(matches!(e, DicomError::NotDicom(_)), "{e}");
    assert!(!e.to_string().contains("Patient seen"), "{e}");
}
