//! Decoding untrusted bytes into an RGB8 image, with the size checked from the header
//! before any pixel is decoded and every allocation bounded by `image::Limits`.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader, Limits, RgbImage};

use crate::config::ImageConfig;

/// Why bytes could not become an image. Sizes are refused from the header, before a
/// pixel is decoded; everything else is a malformed or unsupported body.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("the request body is empty; send an image")]
    Empty,
    #[error("not a recognised image: expected JPEG, PNG, WebP, GIF, BMP or TIFF data")]
    UnknownFormat,
    #[error("cannot read the image: {0}")]
    Unreadable(String),
    #[error("the JPEG data is truncated (no end-of-image marker)")]
    TruncatedJpeg,
    #[error("the image is {width}×{height} pixels; it has no pixels")]
    NoPixels { width: u32, height: u32 },
    #[error("the image is {width}×{height} pixels; the limits are {max_width}×{max_height} and {max_pixels} pixels")]
    TooLarge { width: u32, height: u32, max_width: u32, max_height: u32, max_pixels: u64 },
    #[error("the image exceeds a decoding limit: {0}")]
    DecoderLimit(String),
    #[error("cannot decode the {format} image: {message}")]
    Corrupt { format: String, message: String },
}

impl DecodeError {
    /// Decodable in principle, but over the configured size limits (413, not 400).
    pub fn is_too_large(&self) -> bool {
        matches!(self, DecodeError::TooLarge { .. } | DecodeError::DecoderLimit(_))
    }
}

#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_width: u32,
    pub max_height: u32,
    pub max_pixels: u64,
    pub max_alloc_bytes: u64,
}

impl From<&ImageConfig> for DecodeLimits {
    fn from(config: &ImageConfig) -> Self {
        Self {
            max_width: config.max_width,
            max_height: config.max_height,
            max_pixels: config.max_pixels,
            max_alloc_bytes: config.max_alloc_bytes,
        }
    }
}

const SUPPORTED: &[ImageFormat] =
    &[ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::WebP, ImageFormat::Gif, ImageFormat::Bmp, ImageFormat::Tiff];

/// Decodes any supported format and colour type (grey, alpha, 16-bit, palette, CMYK
/// JPEG; the first frame of an animation), applies the EXIF orientation and returns
/// RGB8. Alpha is dropped, as PIL's `convert("RGB")` does.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let format = reader(bytes, limits)?.format().filter(|f| SUPPORTED.contains(f)).ok_or(DecodeError::UnknownFormat)?;

    // The JPEG decoder fills a truncated scan with grey instead of failing; a
    // classifier should not answer for half a photo.
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        return Err(DecodeError::TruncatedJpeg);
    }

    // The header alone tells the size: refuse huge images before allocating for them.
    let (width, height) = reader(bytes, limits)?.into_dimensions().map_err(|e| decode_error(format, e))?;
    check_dimensions(width, height, limits)?;

    let mut decoder = reader(bytes, limits)?.into_decoder().map_err(|e| decode_error(format, e))?;
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| decode_error(format, e))?;
    image.apply_orientation(orientation);
    Ok(match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
}

fn reader<'a>(bytes: &'a [u8], limits: &DecodeLimits) -> Result<ImageReader<Cursor<&'a [u8]>>, DecodeError> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::Unreadable(e.to_string()))?;
    let mut decoder_limits = Limits::default();
    decoder_limits.max_image_width = Some(limits.max_width);
    decoder_limits.max_image_height = Some(limits.max_height);
    decoder_limits.max_alloc = Some(limits.max_alloc_bytes);
    reader.limits(decoder_limits);
    Ok(reader)
}

fn check_dimensions(width: u32, height: u32, limits: &DecodeLimits) -> Result<(), DecodeError> {
    if width == 0 || height == 0 {
        return Err(DecodeError::NoPixels { width, height });
    }
    if width > limits.max_width
        || height > limits.max_height
        || u64::from(width) * u64::from(height) > limits.max_pixels
    {
        return Err(DecodeError::TooLarge {
            width,
            height,
            max_width: limits.max_width,
            max_height: limits.max_height,
            max_pixels: limits.max_pixels,
        });
    }
    Ok(())
}

/// Walks the JPEG marker segments and entropy-coded scans and reports whether an
/// end-of-image marker (FFD9) is reached. Inside scans 0xFF is always followed by a
/// stuffed 0x00 or a restart marker, so the first other marker after a scan is real
/// (an EXIF thumbnail's own FFD9 sits inside an APP1 segment and is skipped whole).
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let mut i = 2; // after SOI
    while i + 1 < bytes.len() {
        if bytes[i] != 0xFF {
            return false;
        }
        let marker = bytes[i + 1];
        match marker {
            0xD9 => return true,
            0xFF => i += 1,               // fill byte
            0x01 | 0xD0..=0xD7 => i += 2, // markers without a length
            _ => {
                let Some(len) = bytes.get(i + 2..i + 4).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]]))) else {
                    return false;
                };
                i += 2 + len;
                if marker == 0xDA {
                    // Skip the entropy-coded data up to the next real marker.
                    while i + 1 < bytes.len() && !is_marker(bytes[i], bytes[i + 1]) {
                        i += 1;
                    }
                }
            }
        }
    }
    false
}

/// 0xFF followed by anything but a stuffed zero or a restart marker.
fn is_marker(first: u8, second: u8) -> bool {
    first == 0xFF && !matches!(second, 0x00 | 0xD0..=0xD7)
}

fn decode_error(format: ImageFormat, error: ImageError) -> DecodeError {
    match error {
        ImageError::Limits(limit) => DecodeError::DecoderLimit(limit.to_string()),
        other => DecodeError::Corrupt { format: format!("{format:?}"), message: other.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Luma, LumaA, Rgba};

    const LIMITS: DecodeLimits =
        DecodeLimits { max_width: 4096, max_height: 4096, max_pixels: 4_000_000, max_alloc_bytes: 64 << 20 };

    fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, format).unwrap();
        out.into_inner()
    }

    #[test]
    fn every_colour_type_becomes_rgb8() {
        let grey = DynamicImage::ImageLuma8(ImageBuffer::from_pixel(5, 4, Luma([200u8])));
        let grey_alpha = DynamicImage::ImageLumaA8(ImageBuffer::from_pixel(5, 4, LumaA([90u8, 10])));
        let rgba16 = DynamicImage::ImageRgba16(ImageBuffer::from_pixel(5, 4, Rgba([65535u16, 0, 32896, 65535])));
        for (image, expected) in [(grey, [200, 200, 200]), (grey_alpha, [90, 90, 90]), (rgba16, [255, 0, 128])] {
            let decoded = decode(&encode(image, ImageFormat::Png), &LIMITS).unwrap();
            assert_eq!(decoded.dimensions(), (5, 4));
            assert_eq!(decoded.get_pixel(2, 2).0, expected);
        }
    }

    #[test]
    fn garbage_and_empty_bodies_are_invalid_images() {
        for bytes in [&b""[..], b"hello, world", &[0u8; 64]] {
            let error = decode(bytes, &LIMITS).unwrap_err();
            assert!(!error.is_too_large(), "{error}");
        }
        assert_eq!(decode(b"", &LIMITS), Err(DecodeError::Empty));
        assert_eq!(decode(b"hello, world", &LIMITS), Err(DecodeError::UnknownFormat));
        let png = encode(DynamicImage::new_rgb8(64, 64), ImageFormat::Png);
        assert!(matches!(decode(&png[..png.len() / 2], &LIMITS), Err(DecodeError::Corrupt { .. })));
    }

    #[test]
    fn truncated_jpegs_are_refused_and_complete_ones_accepted() {
        let image =
            DynamicImage::ImageRgb8(RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 90])));
        let jpeg = encode(image, ImageFormat::Jpeg);
        assert!(decode(&jpeg, &LIMITS).is_ok());
        let mut with_trailer = jpeg.clone();
        with_trailer.extend_from_slice(b"trailing bytes some cameras append");
        assert!(decode(&with_trailer, &LIMITS).is_ok());
        for cut in [jpeg.len() - 2, jpeg.len() * 3 / 4, jpeg.len() / 2, 200, 20, 3] {
            let error = decode(&jpeg[..cut], &LIMITS).unwrap_err();
            assert!(!error.is_too_large(), "cut at {cut}: {error}");
        }
    }

    #[test]
    fn oversized_dimensions_are_refused_from_the_header() {
        let png = encode(DynamicImage::new_rgb8(300, 200), ImageFormat::Png);
        let small = DecodeLimits { max_pixels: 300 * 200 - 1, ..LIMITS };
        assert!(matches!(decode(&png, &small), Err(DecodeError::TooLarge { width: 300, height: 200, .. })));
        let narrow = DecodeLimits { max_width: 299, ..LIMITS };
        assert!(decode(&png, &narrow).unwrap_err().is_too_large());
        assert!(decode(&png, &LIMITS).is_ok());
    }
}
