//! PNG and JPEG files (the `image` crate), decoded only after the size their header declares
//! (width × height × bytes a pixel) has been held to [`ImageLimits::max_decoded_bytes`]; the
//! decoder's own allocation limit is set to the same bound. The caller turns the decoded
//! image into the model's input (the engine's Pillow-exact conversion).

use crate::limits::ImageLimits;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};
use std::io::Cursor;

/// Why an image file could not be decoded. Messages name sizes and formats, never content.
#[derive(Debug, thiserror::Error)]
pub enum ImageFileError {
    #[error("not a PNG or JPEG file{0}")]
    NotImage(String),
    #[error("not a readable image: {0}")]
    Corrupt(String),
    #[error("image is empty ({width}x{height})")]
    Empty { width: u32, height: u32 },
    #[error("the header declares {width}x{height} pixels, {declared} decoded bytes, over the limit of {limit} bytes")]
    TooLarge { width: u32, height: u32, declared: u64, limit: u64 },
}

impl ImageFileError {
    /// The error row kind this problem is reported as.
    pub fn kind(&self) -> medbatch_schemas::InputErrorKind {
        use medbatch_schemas::InputErrorKind as K;
        match self {
            Self::NotImage(_) => K::WrongFormat,
            Self::Corrupt(_) | Self::Empty { .. } => K::CorruptImage,
            Self::TooLarge { .. } => K::TooLarge,
        }
    }
}

/// Decodes a PNG or JPEG file held in memory.
pub fn decode(bytes: &[u8], limits: &ImageLimits) -> Result<DynamicImage, ImageFileError> {
    crate::guard::guarded("image", || decode_checked(bytes, limits))
        .unwrap_or_else(|panic| Err(ImageFileError::Corrupt(panic)))
}

fn decode_checked(bytes: &[u8], limits: &ImageLimits) -> Result<DynamicImage, ImageFileError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageFileError::Corrupt(e.to_string()))?;
    if !matches!(reader.format(), Some(ImageFormat::Png | ImageFormat::Jpeg)) {
        return Err(ImageFileError::NotImage(crate::sniff::format_hint(&bytes[..bytes.len().min(512)])));
    }
    let mut decoder = reader.into_decoder().map_err(|e| ImageFileError::Corrupt(e.to_string()))?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(ImageFileError::Empty { width, height });
    }
    let declared = decoder.total_bytes();
    if declared > limits.max_decoded_bytes {
        return Err(ImageFileError::TooLarge { width, height, declared, limit: limits.max_decoded_bytes });
    }
    let mut bound = image::Limits::default();
    // The decoded image plus the decoder's working buffers (a row or an MCU band at a time).
    bound.max_alloc = Some(declared.saturating_mul(2).max(64 << 20));
    decoder.set_limits(bound).map_err(|e| ImageFileError::Corrupt(e.to_string()))?;
    DynamicImage::from_decoder(decoder).map_err(|e| ImageFileError::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut out = Vec::new();
        image::RgbImage::new(width, height).write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn images_within_the_limits_decode() {
        let img = decode(&png(3, 2), &ImageLimits::default()).unwrap();
        assert_eq!((img.width(), img.height()), (3, 2));
        let tight = ImageLimits { max_file_bytes: 1 << 20, max_decoded_bytes: 17 };
        assert!(matches!(decode(&png(3, 2), &tight), Err(ImageFileError::TooLarge { declared: 18, .. })));
    }

    #[test]
    fn other_content_is_named() {
        let e = decode(b"%PDF-1.7 not an image", &ImageLimits::default()).unwrap_err();
        assert_eq!(e.to_string(), "not a PNG or JPEG file (content looks like PDF)");
        assert!(decode(&png(2, 2)[..40], &ImageLimits::default()).is_err());
    }
}
