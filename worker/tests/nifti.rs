//! NIfTI reading against nibabel and numpy on the examples inside nibabel's wheel
//! (`MEDBATCH_NIBABEL_DATA`, set by infra/test.sh), with reference values computed by
//! tests/fixtures/nifti/make_reference.py: volume shape, slice choice and the 8-bit slices
//! after min–max over the volume. A missing data folder fails the tests.

use medbatch_schemas::pipeline::{ImagingSpec, ImagingUnit};
use medbatch_schemas::{Digest, InputErrorKind, InputKind, InputRef, Selection};
use medbatch_worker::imaging::{volume, ImagingRead};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn data() -> PathBuf {
    PathBuf::from(
        std::env::var("MEDBATCH_NIBABEL_DATA")
            .expect("MEDBATCH_NIBABEL_DATA: run the tests through `bash infra/test.sh` (nibabel's NIfTI examples)"),
    )
}

fn reference() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/nifti/reference.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn stats(v: &[u8]) -> Value {
    let min = v.iter().map(|&x| i64::from(x)).min().unwrap();
    let max = v.iter().map(|&x| i64::from(x)).max().unwrap();
    let sum: i64 = v.iter().map(|&x| i64::from(x)).sum();
    let weighted: i64 = v.iter().enumerate().map(|(i, &x)| ((i % 9973) as i64 + 1) * i64::from(x)).sum();
    json!({ "min": min, "max": max, "sum": sum, "weighted": weighted })
}

fn read_volume(bytes: &[u8], input: &InputRef, spec: &ImagingSpec) -> ImagingRead {
    volume(
        bytes,
        input,
        spec,
        &medbatch_formats::ImageLimits { max_file_bytes: 1 << 28, max_decoded_bytes: spec.max_decoded_bytes },
    )
}

fn input(name: &str, bytes: &[u8]) -> InputRef {
    InputRef {
        uri: format!("file:///nibabel/{name}"),
        size: bytes.len() as u64,
        sha256: Digest::of_bytes(bytes),
        kind: InputKind::Nifti,
        selection: Selection::Whole,
        etag: None,
        case: None,
    }
}

#[test]
fn slices_equal_nibabel() {
    let r = reference();
    let spec = ImagingSpec {
        unit: ImagingUnit::Series,
        modalities: Vec::new(),
        max_images: r["max_images"].as_u64().unwrap() as usize,
        pad_to_square: false,
        max_decoded_bytes: medbatch_schemas::pipeline::DEFAULT_MAX_DECODED_BYTES,
        slide: Default::default(),
    };
    for (name, e) in r["files"].as_object().unwrap() {
        let bytes = std::fs::read(data().join(name)).unwrap();
        let item = read_volume(&bytes, &input(name, &bytes), &spec).unwrap_or_else(|e| panic!("{name}: {e}"));
        let shape: Vec<usize> = e["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        let want = e["slice_u8"].as_array().unwrap();
        assert_eq!(item.images.len(), want.len(), "{name}: slices kept");
        for (k, (img, w)) in item.images.iter().zip(want).enumerate() {
            assert_eq!((img.width, img.height), (shape[0], shape[1]), "{name}");
            // Grey replicated to RGB: the red channel is the slice.
            let grey: Vec<u8> = img.data.chunks(3).map(|p| p[0]).collect();
            assert_eq!(stats(&grey), *w, "{name}: slice {}", e["slices"][k]);
        }
        let labels: Vec<String> = (1..=want.len()).map(|n| format!("<start_of_image>SLICE {n}")).collect();
        assert_eq!(item.doc.text, labels.concat(), "{name}");
    }
}

#[test]
fn nifti2_and_garbage_are_named_errors() {
    let spec = ImagingSpec {
        unit: ImagingUnit::Series,
        modalities: Vec::new(),
        max_images: 4,
        pad_to_square: false,
        max_decoded_bytes: medbatch_schemas::pipeline::DEFAULT_MAX_DECODED_BYTES,
        slide: Default::default(),
    };
    let r = reference();
    assert_eq!(r["nifti2"]["sizeof_hdr"], 540);
    let name = r["nifti2"]["file"].as_str().unwrap();
    let bytes = std::fs::read(data().join(name)).unwrap();
    let e = read_volume(&bytes, &input(name, &bytes), &spec).expect_err("NIfTI-2 is refused");
    assert_eq!(e.kind, InputErrorKind::UnsupportedEncoding);
    assert!(e.detail.contains("NIfTI-2"), "{}", e.detail);
    let junk = b"Patient seen in clinic; not a volume at all, just some words.".repeat(8);
    let e = read_volume(&junk, &input("notes.nii", &junk), &spec).expect_err("garbage is refused");
    assert_eq!(e.kind, InputErrorKind::CorruptImage);
    assert!(!e.detail.contains("Patient"), "{}", e.detail);
}
