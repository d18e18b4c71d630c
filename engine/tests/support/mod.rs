//! What several engine tests share: image files read as the worker reads them.

use medbatch_engine::image::{to_rgb, Rgb8};

/// PNG or JPEG bytes to RGB: bounded decoding (`medbatch_formats`), then the processor's
/// conversion.
pub fn decode(bytes: &[u8]) -> Result<Rgb8, String> {
    let img = medbatch_formats::image::decode(bytes, &Default::default()).map_err(|e| e.to_string())?;
    to_rgb(img).map_err(|e| e.to_string())
}
