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
    // classifier should not answer for half a photo. A progressive JPEG can repeat
    // scans without end, each a pass over the whole image: refuse absurd counts.
    if format == ImageFormat::Jpeg {
        let scans = jpeg_scans(bytes).ok_or(DecodeError::TruncatedJpeg)?;
        if scans > MAX_JPEG_SCANS {
            return Err(DecodeError::DecoderLimit(format!("{scans} JPEG scans; at most {MAX_JPEG_SCANS} are decoded")));
        }
    }

    // The header alone tells the size: refuse huge images before allocating for them.
    let (width, height) = reader(bytes, limits)?.into_dimensions().map_err(|e| decode_error(format, e))?;
    check_dimensions(width, height, limits)?;

    let mut decoder = reader(bytes, limits)?.into_decoder().map_err(|e| decode_error(format, e))?;
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let turbo = if format == ImageFormat::Jpeg {
        decode_jpeg_turbo(bytes, width, height, limits.max_alloc_bytes)
    } else {
        None
    };
    let mut image = match turbo {
        Some(rgb) => DynamicImage::ImageRgb8(rgb),
        None => DynamicImage::from_decoder(decoder).map_err(|e| decode_error(format, e))?,
    };
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

/// More scans than any encoder writes (a progressive JPEG has about ten; libjpeg-turbo's
/// own tools suggest this limit against the repeated-scan attack).
const MAX_JPEG_SCANS: usize = 500;

/// libjpeg-turbo (SIMD; the decoder Pillow uses) for 8-bit YCbCr, grey and RGB JPEGs,
/// about a third faster than the `image` crate's decoder on photos. Anything it
/// refuses or only half accepts (CMYK, 12-bit, a corrupt-data warning) returns `None`
/// and goes to the `image` crate's decoder as before, under its allocation limits.
/// The size was checked from the header already; what libjpeg-turbo would allocate
/// (the RGB output, and for a progressive JPEG its coefficients, two bytes per sample
/// of up to three full-size components) must fit `max_alloc_bytes`, or the `image`
/// crate's decoder, which enforces that limit itself, decides.
fn decode_jpeg_turbo(bytes: &[u8], width: u32, height: u32, max_alloc_bytes: u64) -> Option<RgbImage> {
    use turbojpeg::{Colorspace, Decompressor, Image, PixelFormat};
    let mut decompressor = Decompressor::new().ok()?;
    decompressor.set_scan_limit(MAX_JPEG_SCANS as u32).ok()?;
    let header = decompressor.read_header(bytes).ok()?;
    let (w, h) = (usize::try_from(width).ok()?, usize::try_from(height).ok()?);
    let colours = matches!(header.colorspace, Colorspace::YCbCr | Colorspace::Gray | Colorspace::RGB);
    if (header.width, header.height) != (w, h) || header.is_lossless || !colours {
        return None;
    }
    let samples = u64::from(width) * u64::from(height) * 3;
    if samples * if header.is_progressive { 3 } else { 1 } > max_alloc_bytes {
        return None;
    }
    let mut pixels = vec![0u8; w.checked_mul(h)?.checked_mul(3)?];
    let output = Image { pixels: pixels.as_mut_slice(), width: w, pitch: w * 3, height: h, format: PixelFormat::RGB };
    decompressor.decompress(bytes, output).ok()?;
    RgbImage::from_raw(width, height, pixels)
}

/// Walks the JPEG marker segments and entropy-coded scans and counts the scans up to
/// the end-of-image marker (FFD9); `None` if that marker is never reached (truncated).
/// Inside scans 0xFF is always followed by a stuffed 0x00 or a restart marker, so the
/// first other marker after a scan is real (an EXIF thumbnail's own FFD9 sits inside
/// an APP1 segment and is skipped whole).
fn jpeg_scans(bytes: &[u8]) -> Option<usize> {
    let mut i = 2; // after SOI
    let mut scans = 0;
    while i + 1 < bytes.len() {
        if bytes[i] != 0xFF {
            return None;
        }
        let marker = bytes[i + 1];
        match marker {
            0xD9 => return Some(scans),
            0xFF => i += 1,               // fill byte
            0x01 | 0xD0..=0xD7 => i += 2, // markers without a length
            _ => {
                let len = bytes.get(i + 2..i + 4).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))?;
                i += 2 + len;
                if marker == 0xDA {
                    scans += 1;
                    // Skip the entropy-coded data up to the next real marker.
                    while i + 1 < bytes.len() && !is_marker(bytes[i], bytes[i + 1]) {
                        i += 1;
                    }
                }
            }
        }
    }
    None
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
    fn libjpeg_turbo_decodes_what_the_image_crate_decodes() {
        let photo = image::open(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/imagenet/imagenet_05_853.jpg"));
        let photo = photo.expect("sample photos (make setup)").to_rgb8();
        let grey = DynamicImage::ImageRgb8(photo.clone()).to_luma8();
        for jpeg in [
            std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/imagenet/imagenet_05_853.jpg")).unwrap(),
            encode(DynamicImage::ImageRgb8(photo), ImageFormat::Jpeg),
            encode(DynamicImage::ImageLuma8(grey), ImageFormat::Jpeg),
        ] {
            let (width, height) = image::load_from_memory(&jpeg).unwrap().to_rgb8().dimensions();
            let turbo = decode_jpeg_turbo(&jpeg, width, height, LIMITS.max_alloc_bytes).expect("an 8-bit JPEG");
            let tight = u64::from(width * height * 3);
            assert_eq!(decode_jpeg_turbo(&jpeg, width, height, tight - 1), None, "over max_alloc_bytes");
            assert_eq!(decode(&jpeg, &LIMITS).unwrap(), turbo, "decode() takes the libjpeg-turbo path");
            // Both are exact JPEG decoders up to IDCT and chroma-upsampling rounding.
            let reference = image::load_from_memory(&jpeg).unwrap().to_rgb8();
            let differences: Vec<u8> =
                turbo.as_raw().iter().zip(reference.as_raw()).map(|(a, b)| a.abs_diff(*b)).collect();
            let mean = differences.iter().map(|&d| f64::from(d)).sum::<f64>() / differences.len() as f64;
            assert!(mean < 1.5, "mean difference {mean}");
            assert!(differences.iter().filter(|&&d| d > 16).count() * 1000 < differences.len());
        }
        assert_eq!(decode_jpeg_turbo(b"\xFF\xD8\xFF\xD9", 1, 1, LIMITS.max_alloc_bytes), None);
    }

    #[test]
    fn a_jpeg_with_endless_scans_is_refused_before_decoding() {
        let mut jpeg = vec![0xFF, 0xD8];
        for _ in 0..=MAX_JPEG_SCANS {
            // A scan header (length 8) and one byte of entropy-coded data.
            jpeg.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x08, 1, 1, 0, 0, 63, 0, 0x12]);
        }
        jpeg.extend_from_slice(&[0xFF, 0xD9]);
        let error = decode(&jpeg, &LIMITS).unwrap_err();
        assert!(matches!(error, DecodeError::DecoderLimit(_)), "{error}");
        assert!(error.is_too_large());
        assert_eq!(jpeg_scans(&jpeg), Some(MAX_JPEG_SCANS + 1));
        assert_eq!(jpeg_scans(&jpeg[..jpeg.len() - 2]), None);
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
