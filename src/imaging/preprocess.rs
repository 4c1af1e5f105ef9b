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

/// Largest intermediate (resized, before the centre crop) image: 16 Mpx, 48 MB. Any
/// photo of ordinary proportions stays far below; past it only the kept region is resized.
const MAX_INTERMEDIATE_PIXELS: u64 = 16 << 20;

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
            let target_short = (out_w.min(out_h) as f64 / spec.crop_fraction as f64).floor().max(1.0);
            let scale = target_short / width.min(height) as f64;
            let resized_w = ((width as f64 * scale).round().min(f64::from(u32::MAX)) as u32).max(out_w);
            let resized_h = ((height as f64 * scale).round().min(f64::from(u32::MAX)) as u32).max(out_h);
            if u64::from(resized_w) * u64::from(resized_h) > MAX_INTERMEDIATE_PIXELS {
                // An extreme aspect ratio (e.g. 10000×1) would need a gigapixel
                // intermediate image: resize only the source region the crop keeps.
                let (scale_x, scale_y) =
                    (f64::from(resized_w) / f64::from(width), f64::from(resized_h) / f64::from(height));
                let region = Region {
                    left: f64::from((resized_w - out_w) / 2) / scale_x,
                    top: f64::from((resized_h - out_h) / 2) / scale_y,
                    width: f64::from(out_w) / scale_x,
                    height: f64::from(out_h) / scale_y,
                };
                return resize_region(image, Some(region), out_w, out_h, spec.interpolation);
            }
            let resized = resize_region(image, None, resized_w, resized_h, spec.interpolation)?;
            let left = (resized_w - out_w) / 2;
            let top = (resized_h - out_h) / 2;
            Ok(image::imageops::crop_imm(&resized, left, top, out_w, out_h).to_image())
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
        // Resizing 16384×1 to a 256-pixel shorter side would make 4 Gpx; the region
        // path gives the 14×14 centre directly, with the colours of the centre.
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
