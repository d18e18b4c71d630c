//! Image preprocessing against transformers' Gemma 3 image processor (PIL backend): the
//! fixtures in tests/fixtures/images (made by its make_fixtures.py) hold, per source image,
//! the digest of the RGB pixels the processor starts from, and per size (896, 224) the digest
//! of its resized 8-bit image and sample `pixel_values`. PNG inputs must match to the bit;
//! the JPEG's decoded pixels may differ from libjpeg's by an LSB, so it is held to a bound.

mod support;

use medbatch_engine::image::{normalize, pad_to_square, resize_bilinear, ImageConfig, Rgb8};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use support::decode;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/images")
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn expected() -> Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("expected.json")).unwrap()).unwrap()
}

#[test]
fn png_images_preprocess_exactly_like_the_reference() {
    let exp = expected();
    let mut checked = 0;
    for (name, e) in exp["images"].as_object().unwrap() {
        if !name.ends_with(".png") {
            continue;
        }
        let img = decode(&std::fs::read(fixtures().join(name)).unwrap()).unwrap();
        assert_eq!(sha(&img.data), e["decoded_sha256"], "{name}: RGB conversion");
        for (size, s) in e["sizes"].as_object().unwrap() {
            let size: usize = size.parse().unwrap();
            let r = resize_bilinear(&img, size, size);
            for p in s["resized_pixels"].as_array().unwrap() {
                let (y, x) = (p[0].as_u64().unwrap() as usize, p[1].as_u64().unwrap() as usize);
                let want: Vec<u8> = p[2].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
                assert_eq!(r.pixel(x, y).to_vec(), want, "{name} {size}: pixel ({x},{y})");
            }
            assert_eq!(sha(&r.data), s["resized_sha256"], "{name} {size}: resized image");
            let cfg = ImageConfig { size, ..ImageConfig::default() };
            let pv = normalize(&r, &cfg);
            for v in s["pixel_values"].as_array().unwrap() {
                let (c, y, x) =
                    (v[0].as_u64().unwrap() as usize, v[1].as_u64().unwrap() as usize, v[2].as_u64().unwrap() as usize);
                let got = pv[c * size * size + y * size + x];
                assert!(
                    (got - v[3].as_f64().unwrap() as f32).abs() <= 1e-6,
                    "{name} {size}: value ({c},{y},{x}) {got}"
                );
            }
            checked += 1;
        }
        let sq = &exp["pad_to_square"][name];
        let padded = pad_to_square(&img);
        assert_eq!(padded.width as u64, sq["size"].as_u64().unwrap());
        assert_eq!(sha(&padded.data), sq["sha256"], "{name}: pad to square");
    }
    assert_eq!(checked, 8, "four PNG images at two sizes");
}

#[test]
fn a_jpeg_is_within_an_lsb_or_two_of_the_reference() {
    let exp = expected();
    let e = &exp["images"]["photo-320x240.jpg"];
    let img = decode(&std::fs::read(fixtures().join("photo-320x240.jpg")).unwrap()).unwrap();
    assert_eq!((img.width, img.height), (320, 240));
    let s = &e["sizes"]["896"];
    let r = resize_bilinear(&img, 896, 896);
    for p in s["resized_pixels"].as_array().unwrap() {
        let (y, x) = (p[0].as_u64().unwrap() as usize, p[1].as_u64().unwrap() as usize);
        for (c, want) in p[2].as_array().unwrap().iter().enumerate() {
            let d = (i32::from(r.pixel(x, y)[c]) - want.as_i64().unwrap() as i32).abs();
            assert!(d <= 2, "photo ({x},{y}) channel {c}: off by {d}");
        }
    }
}

#[test]
fn unreadable_bytes_are_a_decode_error() {
    let e = decode(b"not an image").unwrap_err();
    assert!(e.contains("not a PNG or JPEG file"), "{e}");
    let one = Rgb8::new(1, 1, vec![1, 2, 3]);
    assert_eq!(resize_bilinear(&one, 2, 2).data, [1, 2, 3].repeat(4));
}
