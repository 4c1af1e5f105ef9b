//! Bringing a decoded image to a model's input: resize and crop as the model card
//! says (SIMD convolution resize from `fast_image_resize`, the same antialiased
//! filters as PIL), then normalize into planar NCHW floats.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;

use crate::model::{InputSpec, Interpolation, ResizePolicy};

/// A region of the source image in pixels (fractional edges allowed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Region {
    pub left: f64,
    pub top: f64,
    pub width: f64,
    pub height: f64,
}

/// A resize that `fast_image_resize` refused (a buffer or size it could not take).
/// With sizes checked by the decoder and the model card this does not happen on real
/// input; it is an internal error, never the client's.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("resize failed: {0}")]
pub struct ResizeError(pub String);

/// Brings `image` to exactly the model's input size. An image that already has that
/// size is returned untouched (no resampling), so a crafted perturbation at the
/// model's resolution reaches the model exactly.
pub fn fit_to_input(image: &RgbImage, spec: &InputSpec) -> Result<RgbImage, ResizeError> {
    let (width, height) = image.dimensions();
    let (out_w, out_h) = (spec.width, spec.height);
    if (width, height) == (out_w, out_h) {
        return Ok(image.clone());
    }
    match spec.resize {
        ResizePolicy::Stretch => resize_region(image, None, out_w, out_h, spec.interpolation),
        ResizePolicy::ShorterSideCenterCrop => {
            // Resize the shorter side to floor(size / crop_fraction), the longer side in
            // proportion (rounded), then crop the centre (offset floored): the same
            // arithmetic as models/convert/reference.py, so accuracy figures carry over.
            // Only the kept region is resampled, straight to the output size: the filter
            // still reads the source pixels around it, so this is the full resize and
            // crop without the pixels thrown away (identical but for a rare ±1 level
            // where the region's fractional edges round differently).
            let target_short = (out_w.min(out_h) as f64 / spec.crop_fraction as f64).floor().max(1.0);
            let scale = target_short / width.min(height) as f64;
            let resized_w = ((width as f64 * scale).round().min(f64::from(u32::MAX)) as u32).max(out_w);
            let resized_h = ((height as f64 * scale).round().min(f64::from(u32::MAX)) as u32).max(out_h);
            let (scale_x, scale_y) =
                (f64::from(resized_w) / f64::from(width), f64::from(resized_h) / f64::from(height));
            let region = Region {
                left: f64::from((resized_w - out_w) / 2) / scale_x,
                top: f64::from((resized_h - out_h) / 2) / scale_y,
                width: f64::from(out_w) / scale_x,
                height: f64::from(out_h) / scale_y,
            };
            resize_region(image, Some(region), out_w, out_h, spec.interpolation)
        }
    }
}

/// Resizes `region` of `image` (the whole image when `None`) to `out_w` × `out_h`.
pub fn resize_region(
    image: &RgbImage,
    region: Option<Region>,
    out_w: u32,
    out_h: u32,
    interpolation: Interpolation,
) -> Result<RgbImage, ResizeError> {
    let (width, height) = image.dimensions();
    let source =
        ImageRef::new(width, height, image.as_raw(), PixelType::U8x3).map_err(|e| ResizeError(e.to_string()))?;
    let mut target = Image::new(out_w.max(1), out_h.max(1), PixelType::U8x3);
    let algorithm = match interpolation {
        Interpolation::Nearest => ResizeAlg::Nearest,
        Interpolation::Bilinear => ResizeAlg::Convolution(FilterType::Bilinear),
        Interpolation::Bicubic => ResizeAlg::Convolution(FilterType::CatmullRom),
    };
    let mut options = ResizeOptions::new().resize_alg(algorithm);
    if let Some(r) = region {
        options = options.crop(r.left, r.top, r.width, r.height);
    }
    Resizer::new().resize(&source, &mut target, &options).map_err(|e| ResizeError(e.to_string()))?;
    RgbImage::from_raw(out_w.max(1), out_h.max(1), target.into_vec())
        .ok_or_else(|| ResizeError("the resized buffer has the wrong size".into()))
}

/// Appends `image` as one normalized planar row, (pixel / 255 − mean) / std per
/// channel, bit for bit what [`ModelImage::from_rgb`] then
/// [`ModelImage::push_normalized`] give, without the float image in between (a plain
/// view needs nothing else): one table lookup per sample.
pub fn push_normalized_pixels(image: &RgbImage, spec: &InputSpec, row: &mut Vec<f32>) {
    let tables: [[f32; 256]; 3] = std::array::from_fn(|c| {
        let (mean, inv_std) = (spec.mean[c], 1.0 / spec.std[c]);
        std::array::from_fn(|v| (f32::from(v as u8) / 255.0 - mean) * inv_std)
    });
    let pixels = image.as_raw();
    row.reserve(pixels.len());
    // One plane after the other, each written once: extending from an exact-size
    // iterator needs no zero-filled row first (which cost a memset of 600 KB per
    // Lite0 row, more than the lookups), and the 8-bit pixels stay in cache.
    for (channel, table) in tables.iter().enumerate() {
        row.extend(pixels.chunks_exact(3).map(|pixel| table[usize::from(pixel[channel])]));
    }
}

/// A model-sized image as planar RGB floats in [0, 1] (C × H × W), the space in
/// which defenses add noise and blur and attacks measure distances.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl ModelImage {
    pub fn from_rgb(image: &RgbImage) -> Self {
        let (width, height) = (image.width() as usize, image.height() as usize);
        let plane = width * height;
        let mut data = vec![0.0f32; 3 * plane];
        for (i, pixel) in image.pixels().enumerate() {
            for c in 0..3 {
                data[c * plane + i] = f32::from(pixel.0[c]) / 255.0;
            }
        }
        Self { width, height, data }
    }

    /// Back to 8-bit (rounded, clamped), e.g. to save an adversarial example losslessly.
    pub fn to_rgb(&self) -> RgbImage {
        let plane = self.width * self.height;
        let mut raw = Vec::with_capacity(3 * plane);
        for i in 0..plane {
            for c in 0..3 {
                raw.push((self.data[c * plane + i].clamp(0.0, 1.0) * 255.0).round() as u8);
            }
        }
        RgbImage::from_raw(self.width as u32, self.height as u32, raw).unwrap_or_default()
    }

    pub fn plane_len(&self) -> usize {
        self.width * self.height
    }

    /// Appends this image as one model input row: (x − mean) / std per channel.
    pub fn push_normalized(&self, spec: &InputSpec, row: &mut Vec<f32>) {
        let plane = self.plane_len();
        for c in 0..3 {
            let (mean, inv_std) = (spec.mean[c], 1.0 / spec.std[c]);
            row.extend(self.data[c * plane..(c + 1) * plane].iter().map(|x| (x - mean) * inv_std));
        }
    }

    pub fn normalized(&self, spec: &InputSpec) -> Vec<f32> {
        let mut row = Vec::with_capacity(self.data.len());
        self.push_normalized(spec, &mut row);
        row
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn spec(size: u32) -> InputSpec {
        InputSpec {
            name: "input".into(),
            width: size,
            height: size,
            layout: "NCHW".into(),
            color: "RGB".into(),
            mean: [0.5, 0.25, 0.0],
            std: [0.5, 0.25, 1.0],
            resize: ResizePolicy::ShorterSideCenterCrop,
            crop_fraction: 0.875,
            interpolation: Interpolation::Bilinear,
        }
    }

    #[test]
    fn an_image_of_the_input_size_is_not_resampled() {
        let image = RgbImage::from_fn(8, 8, |x, y| Rgb([(x * 30) as u8, (y * 30) as u8, 7]));
        assert_eq!(fit_to_input(&image, &spec(8)).unwrap(), image);
    }

    #[test]
    fn extreme_aspect_ratios_do_not_allocate_a_gigapixel_intermediate() {
        // Resizing 16384×1 to a 256-pixel shorter side would make 4 Gpx; only the
        // kept region is resampled, to the 14×14 centre, with the colours of the centre.
        for (w, h) in [(16_384u32, 1u32), (1, 16_384), (10_000, 3)] {
            let image = RgbImage::from_fn(w, h, |x, y| {
                let along = if w > h { x * 255 / w } else { y * 255 / h };
                Rgb([along as u8, 40, 200])
            });
            let out = fit_to_input(&image, &spec(14)).unwrap();
            assert_eq!(out.dimensions(), (14, 14));
            let centre = out.get_pixel(7, 7).0;
            assert!((120..=135).contains(&centre[0]) && centre[1] == 40 && centre[2] == 200, "{w}×{h}: {centre:?}");
        }
    }

    #[test]
    fn shorter_side_center_crop_keeps_the_centre() {
        // 64×32, left half black, right half white: the centred crop straddles the edge.
        let image = RgbImage::from_fn(64, 32, |x, _| if x < 32 { Rgb([0, 0, 0]) } else { Rgb([255, 255, 255]) });
        let out = fit_to_input(&image, &spec(14)).unwrap();
        assert_eq!(out.dimensions(), (14, 14));
        assert!(out.get_pixel(0, 7).0[0] < 10 && out.get_pixel(13, 7).0[0] > 245);
    }

    #[test]
    fn fitting_resamples_like_a_full_resize_then_a_centre_crop() {
        // The region resize against what reference.py does: resize the whole image,
        // then crop. Same pixels but for a rare ±1 where fractional edges round apart.
        let image = RgbImage::from_fn(517, 389, |x, y| {
            Rgb([((x * 7 + y * 3) % 256) as u8, ((x * y) % 251) as u8, ((x ^ y) % 256) as u8])
        });
        for size in [14, 224, 240, 260] {
            let spec = spec(size);
            let short = (f64::from(size) / f64::from(spec.crop_fraction)).floor();
            let (w, h) = ((517.0 * short / 389.0).round() as u32, short as u32);
            let full = resize_region(&image, None, w, h, spec.interpolation).unwrap();
            let expected = image::imageops::crop_imm(&full, (w - size) / 2, (h - size) / 2, size, size).to_image();
            let got = fit_to_input(&image, &spec).unwrap();
            let apart: Vec<i16> = got
                .as_raw()
                .iter()
                .zip(expected.as_raw())
                .map(|(a, b)| i16::from(*a) - i16::from(*b))
                .filter(|d| *d != 0)
                .collect();
            assert!(apart.iter().all(|d| d.abs() == 1), "size {size}: {apart:?}");
            assert!(apart.len() * 1000 <= got.as_raw().len(), "size {size}: {} pixels apart", apart.len());
        }
    }

    #[test]
    fn normalizing_pixels_directly_matches_the_float_image() {
        let image = RgbImage::from_fn(17, 9, |x, y| Rgb([(x * 15) as u8, (y * 28) as u8, ((x + y) * 9) as u8]));
        let spec = InputSpec { mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225], ..spec(17) };
        let mut direct = vec![1.5];
        push_normalized_pixels(&image, &spec, &mut direct);
        let mut via_floats = vec![1.5];
        ModelImage::from_rgb(&image).push_normalized(&spec, &mut via_floats);
        // Bit for bit: a row built either way is the same model input.
        assert_eq!(
            direct.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            via_floats.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn normalization_is_planar_and_per_channel() {
        let image = RgbImage::from_pixel(2, 1, Rgb([255, 0, 51]));
        let model = ModelImage::from_rgb(&image);
        assert_eq!(model.data, vec![1.0, 1.0, 0.0, 0.0, 0.2, 0.2]);
        let row = model.normalized(&spec(2));
        let expected = [1.0, 1.0, -1.0, -1.0, 0.2, 0.2];
        for (got, want) in row.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{row:?}");
        }
        assert_eq!(model.to_rgb(), image);
    }
}
