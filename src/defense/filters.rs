//! Fast filters on model-sized images (planar RGB floats): Gaussian blur, median
//! filter ("feature squeezing") and foveated blur.
//!
//! They run dozens of times per request on 224–260 px images, so each one works a
//! channel plane at a time on contiguous `f32` slices, with branch-free inner loops
//! over whole rows that the compiler vectorizes. Borders replicate the edge pixel.
//! Buffers are allocated once per call (or reused by the `_into` variant), never per
//! pixel. The filters do not clamp: outputs stay within the range of their inputs up
//! to float rounding.

use crate::imaging::ModelImage;

/// Separable Gaussian blur with standard deviation `sigma` pixels: kernel radius
/// ceil(3σ), weights normalized to sum to 1, borders replicated. A `sigma` that is
/// not a positive finite number returns a copy.
///
/// The cost grows with the kernel radius, so `sigma` is meant to be a few pixels,
/// not a fraction of the whole image.
pub fn gaussian_blur(image: &ModelImage, sigma: f32) -> ModelImage {
    let mut out = ModelImage { width: image.width, height: image.height, data: Vec::new() };
    gaussian_blur_into(image, sigma, &mut out);
    out
}

/// [`gaussian_blur`] into `out` (reshaped to match `src`), reusing its buffer: for a
/// caller that blurs many images of one size.
pub fn gaussian_blur_into(src: &ModelImage, sigma: f32, out: &mut ModelImage) {
    out.width = src.width;
    out.height = src.height;
    let (width, height) = (src.width, src.height);
    let plane_len = width * height;
    let blurs = sigma.is_finite() && sigma > 0.0;
    if !blurs || plane_len == 0 {
        out.data.clone_from(&src.data);
        return;
    }
    let kernel = half_gaussian_kernel(sigma);
    let radius = kernel.len() - 1;
    // Every value is overwritten below, so resizing is enough.
    out.data.resize(src.data.len(), 0.0);
    // One row at a time: the vertical pass writes the row into the middle of
    // `padded`, its edge pixels are replicated into the `radius` cells on either
    // side, and the horizontal pass reads every tap as an in-bounds shifted slice.
    // No intermediate plane, and the row stays in L1 between the passes.
    let mut padded = vec![0.0f32; width + 2 * radius];
    for (src_plane, out_plane) in src.data.chunks_exact(plane_len).zip(out.data.chunks_exact_mut(plane_len)) {
        let src_row = |y: usize| &src_plane[y * width..(y + 1) * width];
        for (y, out_row) in out_plane.chunks_exact_mut(width).enumerate() {
            let column_blurred = &mut padded[radius..radius + width];
            convolve(column_blurred, &kernel, src_row(y), |k| {
                (src_row(y.saturating_sub(k)), src_row((y + k).min(height - 1)))
            });
            let (first, last) = (padded[radius], padded[radius + width - 1]);
            padded[..radius].fill(first);
            padded[radius + width..].fill(last);
            let padded = &padded[..];
            convolve(out_row, &kernel, &padded[radius..radius + width], |k| {
                (&padded[radius - k..radius - k + width], &padded[radius + k..radius + k + width])
            });
        }
    }
}

/// The centre tap and one side of a normalized Gaussian: `[w0, w1, …, wr]` with
/// w0 + 2·(w1 + … + wr) = 1. Symmetry lets each pass add the two mirrored taps
/// before multiplying, halving the multiplications.
fn half_gaussian_kernel(sigma: f32) -> Vec<f32> {
    let radius = (3.0 * sigma).ceil().max(1.0) as usize;
    let inv_two_variance = 1.0 / (2.0 * sigma * sigma);
    let mut kernel: Vec<f32> = (0..=radius).map(|k| (-((k * k) as f32) * inv_two_variance).exp()).collect();
    let total = kernel[0] + 2.0 * kernel[1..].iter().sum::<f32>();
    kernel.iter_mut().for_each(|weight| *weight /= total);
    kernel
}

/// out[i] = kernel[0]·centre[i] + Σₖ kernel[k]·(before[i] + after[i]), with
/// `mirrored_taps(k)` = (before, after), the inputs k taps away on either side, all
/// slices as long as `out`. One whole-row multiply-add per tap: contiguous, so it
/// vectorizes (measured faster than accumulating blocks of outputs in registers).
fn convolve<'a>(
    out: &mut [f32],
    kernel: &[f32],
    centre: &[f32],
    mirrored_taps: impl Fn(usize) -> (&'a [f32], &'a [f32]),
) {
    for (o, &value) in out.iter_mut().zip(centre) {
        *o = kernel[0] * value;
    }
    for (k, &weight) in kernel.iter().enumerate().skip(1) {
        let (before, after) = mirrored_taps(k);
        for ((o, &a), &b) in out.iter_mut().zip(before).zip(after) {
            *o += weight * (a + b);
        }
    }
}

/// Per-channel median over a (2·radius + 1)² window with replicated borders: the
/// "feature squeezing" median smoothing of Xu et al. (2018), whose default is
/// radius 1 (3×3). Radius 0 returns a copy.
///
/// Radius 1 uses an exact branch-free median network; larger radii a pruned sorting
/// network (exact too, but O(radius² log² radius) per pixel, so slower).
pub fn median_filter(image: &ModelImage, radius: usize) -> ModelImage {
    let (width, height) = (image.width, image.height);
    let plane_len = width * height;
    if radius == 0 || plane_len == 0 {
        return image.clone();
    }
    let mut out = ModelImage { width, height, data: vec![0.0; image.data.len()] };
    let planes = image.data.chunks_exact(plane_len).zip(out.data.chunks_exact_mut(plane_len));
    if radius == 1 {
        let mut column_sorted = vec![0.0; 3 * (width + 2)];
        for (src_plane, out_plane) in planes {
            median_3x3_plane(src_plane, width, height, &mut column_sorted, out_plane);
        }
    } else {
        for (src_plane, out_plane) in planes {
            median_plane(src_plane, width, height, radius, out_plane);
        }
    }
    out
}

/// 3×3 median by the column-sort network (J. L. Smith, "Implementing median filters
/// in XC4000E FPGAs", Xilinx XCell 23, 1996): sort each column's three values into
/// low ≤ mid ≤ high; the median of the nine is then median(max of the three lows,
/// median of the three mids, min of the three highs). Exact, and each column sort is
/// shared by the three windows that contain the column.
///
/// `column_sorted` holds the low, mid and high rows, each `width + 2` long: one
/// replicated column at either end stands for the border.
fn median_3x3_plane(plane: &[f32], width: usize, height: usize, column_sorted: &mut [f32], out: &mut [f32]) {
    let (low, rest) = column_sorted.split_at_mut(width + 2);
    let (mid, high) = rest.split_at_mut(width + 2);
    let row = |y: usize| &plane[y * width..(y + 1) * width];
    for (y, out_row) in out.chunks_exact_mut(width).enumerate() {
        let (above, centre, below) = (row(y.saturating_sub(1)), row(y), row((y + 1).min(height - 1)));
        let sorted_columns = low[1..=width].iter_mut().zip(&mut mid[1..=width]).zip(&mut high[1..=width]);
        for (((lo, mi), hi), ((&a, &b), &c)) in sorted_columns.zip(above.iter().zip(centre).zip(below)) {
            *lo = lesser(lesser(a, b), c);
            *mi = median3(a, b, c);
            *hi = greater(greater(a, b), c);
        }
        for sorted in [&mut *low, &mut *mid, &mut *high] {
            sorted[0] = sorted[1];
            sorted[width + 1] = sorted[width];
        }
        // Slicing to exactly width + 2 lets the compiler drop the bounds checks below.
        let (low, mid, high) = (&low[..width + 2], &mid[..width + 2], &high[..width + 2]);
        for (x, o) in out_row.iter_mut().enumerate() {
            let max_low = greater(greater(low[x], low[x + 1]), low[x + 2]);
            let min_high = lesser(lesser(high[x], high[x + 1]), high[x + 2]);
            *o = median3(max_low, median3(mid[x], mid[x + 1], mid[x + 2]), min_high);
        }
    }
}

fn median3(a: f32, b: f32, c: f32) -> f32 {
    greater(lesser(a, b), lesser(greater(a, b), c))
}

/// The smaller of `a` and `b`, or `b` if either is NaN. Unlike `f32::min`, whose NaN
/// rule costs extra instructions, this is a single `minps`: the median network is
/// nothing but minima and maxima.
#[inline(always)]
fn lesser(a: f32, b: f32) -> f32 {
    if a < b { a } else { b }
}

/// The larger of `a` and `b`, or `b` if either is NaN (a single `maxps`).
#[inline(always)]
fn greater(a: f32, b: f32) -> f32 {
    if a > b { a } else { b }
}

/// Pixels whose windows go through the median network together: four SSE registers
/// per wire, so a compare-exchange of two wires stays in registers.
const MEDIAN_LANES: usize = 16;

/// General-radius median: a sorting network applied to [`MEDIAN_LANES`] neighbouring
/// pixels at once, so each compare-exchange is a vector min and max across the
/// lanes, with no data-dependent branches (selection by comparisons mispredicts
/// about every other branch on image data). Each lane's window is gathered into the
/// network's wires (replicated borders); the extra wires up to the network's
/// power-of-two size hold +∞, which sorts last and leaves the middle unchanged.
fn median_plane(plane: &[f32], width: usize, height: usize, radius: usize, out: &mut [f32]) {
    let side = 2 * radius + 1;
    let window_len = side * side;
    let network = median_network(window_len);
    let mut wires = vec![[0.0f32; MEDIAN_LANES]; window_len.next_power_of_two()];
    for (y, out_row) in out.chunks_exact_mut(width).enumerate() {
        for (block, out_block) in out_row.chunks_mut(MEDIAN_LANES).enumerate() {
            let first_x = block * MEDIAN_LANES;
            // The padding wires, reset because the (pruned) network may leave data there.
            wires[window_len..].fill([f32::INFINITY; MEDIAN_LANES]);
            for (dy, dx) in (0..side).flat_map(|dy| (0..side).map(move |dx| (dy, dx))) {
                let source_row = (y + dy).saturating_sub(radius).min(height - 1);
                let row = &plane[source_row * width..(source_row + 1) * width];
                // In a partial last block the unused lanes keep stale values, harmlessly.
                let wire = &mut wires[dy * side + dx][..out_block.len()];
                let start = (first_x + dx).checked_sub(radius).filter(|start| start + wire.len() <= width);
                match start {
                    Some(start) => wire.copy_from_slice(&row[start..start + wire.len()]),
                    // Only near the left and right borders do coordinates need clamping.
                    None => {
                        for (lane, value) in wire.iter_mut().enumerate() {
                            *value = row[(first_x + lane + dx).saturating_sub(radius).min(width - 1)];
                        }
                    }
                }
            }
            for &(low, high) in &network {
                let (head, tail) = wires.split_at_mut(high);
                // Fixed-size lanes: the loop unrolls into a few vector min/max.
                for (a, b) in head[low].iter_mut().zip(&mut tail[0]) {
                    (*a, *b) = (lesser(*a, *b), greater(*a, *b));
                }
            }
            out_block.copy_from_slice(&wires[window_len / 2][..out_block.len()]);
        }
    }
}

/// Compare-exchanges (low wire, high wire) that put the median of `len` values on
/// wire `len / 2`: Batcher's odd–even merge sort on the next power of two (loops as
/// in its usual statement, with p the size of the runs being merged), keeping
/// only the comparators the middle wire depends on. Walking the sort backwards from
/// the middle wire, a comparator matters if either of its outputs does, and then
/// both its inputs do: 153 of the 191 comparators remain for 25 values (5×5), 435 of
/// 543 for 49 (7×7).
fn median_network(len: usize) -> Vec<(usize, usize)> {
    let wires = len.next_power_of_two();
    let mut sort = Vec::new();
    let mut p = 1;
    while p < wires {
        let mut k = p;
        while k >= 1 {
            for j in (k % p..wires - k).step_by(2 * k) {
                for i in 0..k.min(wires - j - k) {
                    if (i + j) / (2 * p) == (i + j + k) / (2 * p) {
                        sort.push((i + j, i + j + k));
                    }
                }
            }
            k /= 2;
        }
        p *= 2;
    }
    let mut needed = vec![false; wires];
    needed[len / 2] = true;
    let mut network: Vec<(usize, usize)> = sort
        .into_iter()
        .rev()
        .filter(|&(low, high)| {
            let matters = needed[low] || needed[high];
            needed[low] |= matters;
            needed[high] |= matters;
            matters
        })
        .collect();
    network.reverse();
    network
}

/// Foveated blur: `image` within `sharp_radius` of `centre`, `blurred` beyond
/// `blur_radius`, and between them a smoothstep blend (zero slope at both ends, so
/// no visible ring). `centre` is in this image's pixel coordinates, pixel (x, y)
/// covering [x, x + 1) × [y, y + 1), so its centre is at (x + 0.5, y + 0.5).
/// A `blur_radius` not beyond `sharp_radius` gives a hard edge at `sharp_radius`.
///
/// `blurred` is a blurred copy of `image` with the same shape, made once by the
/// caller. Two levels are deliberate: the blend band already makes the blur grow
/// gradually with eccentricity, and a three-level fovea (sharp → mild → strong)
/// is two calls, `foveate(&foveate(&sharp, &mild, c, r0, r1), &strong, c, r1, r2)`,
/// paying for its second blur only where it is wanted.
pub fn foveate(
    image: &ModelImage,
    blurred: &ModelImage,
    centre: (f32, f32),
    sharp_radius: f32,
    blur_radius: f32,
) -> ModelImage {
    debug_assert_eq!(
        (image.width, image.height, image.data.len()),
        (blurred.width, blurred.height, blurred.data.len())
    );
    let (width, height) = (image.width, image.height);
    let plane_len = width * height;
    if plane_len == 0 {
        return image.clone();
    }
    let mut out = ModelImage { width, height, data: vec![0.0; image.data.len()] };
    // A ramp of (almost) zero width turns the smoothstep into a step at sharp_radius.
    let inv_ramp = 1.0 / (blur_radius - sharp_radius).max(f32::EPSILON);
    // The blend weight depends only on the position, so it is computed once per row
    // and applied to every channel.
    let mut blur_weight = vec![0.0f32; width];
    for y in 0..height {
        let dy = y as f32 + 0.5 - centre.1;
        for (x, weight) in blur_weight.iter_mut().enumerate() {
            let dx = x as f32 + 0.5 - centre.0;
            let t = (((dx * dx + dy * dy).sqrt() - sharp_radius) * inv_ramp).clamp(0.0, 1.0);
            *weight = t * t * (3.0 - 2.0 * t);
        }
        let row = y * width..(y + 1) * width;
        let planes = image.data.chunks_exact(plane_len).zip(blurred.data.chunks_exact(plane_len));
        for ((sharp_plane, blurred_plane), out_plane) in planes.zip(out.data.chunks_exact_mut(plane_len)) {
            let sources = sharp_plane[row.clone()].iter().zip(&blurred_plane[row.clone()]);
            for ((o, (&sharp, &soft)), &weight) in out_plane[row.clone()].iter_mut().zip(sources).zip(&blur_weight) {
                *o = sharp + weight * (soft - sharp);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use rand::rngs::Xoshiro256PlusPlus;
    use rand::{RngExt, SeedableRng};

    use super::*;

    fn noise(width: usize, height: usize, seed: u64) -> ModelImage {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        ModelImage { width, height, data: (0..3 * width * height).map(|_| rng.random::<f32>()).collect() }
    }

    fn constant(width: usize, height: usize, value: f32) -> ModelImage {
        ModelImage { width, height, data: vec![value; 3 * width * height] }
    }

    fn mean(values: &[f32]) -> f64 {
        values.iter().map(|&v| f64::from(v)).sum::<f64>() / values.len() as f64
    }

    fn variance(values: &[f32]) -> f64 {
        let m = mean(values);
        values.iter().map(|&v| (f64::from(v) - m).powi(2)).sum::<f64>() / values.len() as f64
    }

    fn assert_close(got: &[f32], want: &[f32], tolerance: f32) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= tolerance, "index {i}: got {g}, want {w}");
        }
    }

    /// Direct 2-D convolution with clamped coordinates, the definition the separable
    /// implementation must match.
    fn reference_blur(image: &ModelImage, sigma: f32) -> ModelImage {
        let kernel = half_gaussian_kernel(sigma);
        let radius = kernel.len() as isize - 1;
        let (w, h) = (image.width as isize, image.height as isize);
        let mut out = image.clone();
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let mut sum = 0.0;
                    for dy in -radius..=radius {
                        for dx in -radius..=radius {
                            let (sx, sy) = ((x + dx).clamp(0, w - 1), (y + dy).clamp(0, h - 1));
                            let weight = kernel[dx.unsigned_abs()] * kernel[dy.unsigned_abs()];
                            sum += weight * image.data[(c * h * w + sy * w + sx) as usize];
                        }
                    }
                    out.data[(c * h * w + y * w + x) as usize] = sum;
                }
            }
        }
        out
    }

    fn reference_median(image: &ModelImage, radius: usize) -> ModelImage {
        let (w, h, r) = (image.width as isize, image.height as isize, radius as isize);
        let mut out = image.clone();
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let mut window = Vec::new();
                    for dy in -r..=r {
                        for dx in -r..=r {
                            let (sx, sy) = ((x + dx).clamp(0, w - 1), (y + dy).clamp(0, h - 1));
                            window.push(image.data[(c * h * w + sy * w + sx) as usize]);
                        }
                    }
                    window.sort_by(f32::total_cmp);
                    out.data[(c * h * w + y * w + x) as usize] = window[window.len() / 2];
                }
            }
        }
        out
    }

    #[test]
    fn gaussian_kernel_is_normalized_with_radius_three_sigma() {
        for sigma in [0.3f32, 1.0, 2.0, 3.7] {
            let kernel = half_gaussian_kernel(sigma);
            assert_eq!(kernel.len() - 1, (3.0 * sigma).ceil() as usize);
            let total = kernel[0] + 2.0 * kernel[1..].iter().sum::<f32>();
            assert!((total - 1.0).abs() < 1e-6, "sigma {sigma}: {total}");
            assert!(kernel.windows(2).all(|pair| pair[0] > pair[1]), "not decreasing: {kernel:?}");
        }
    }

    #[test]
    fn blur_preserves_a_constant_image() {
        let image = constant(13, 9, 0.37);
        for sigma in [0.5, 1.0, 2.0, 5.0] {
            let blurred = gaussian_blur(&image, sigma);
            assert_eq!((blurred.width, blurred.height), (13, 9));
            assert_close(&blurred.data, &image.data, 1e-6);
        }
    }

    #[test]
    fn blur_matches_a_direct_two_dimensional_convolution() {
        // Non-square and smaller than the kernel in one direction, to exercise the borders.
        let image = noise(11, 4, 1);
        for sigma in [0.7, 1.5] {
            assert_close(&gaussian_blur(&image, sigma).data, &reference_blur(&image, sigma).data, 1e-5);
        }
    }

    #[test]
    fn blur_keeps_the_mean_and_reduces_the_variance_of_noise() {
        let image = noise(64, 48, 2);
        let blurred = gaussian_blur(&image, 1.0);
        assert!((mean(&blurred.data) - mean(&image.data)).abs() < 2e-3);
        // For white noise the variance falls by the sum of squared 2-D weights, ≈ 1/(4πσ²) ≈ 0.08.
        let ratio = variance(&blurred.data) / variance(&image.data);
        assert!(ratio < 0.15, "variance ratio {ratio}");
        let more_blurred = gaussian_blur(&image, 2.0);
        assert!(variance(&more_blurred.data) < variance(&blurred.data));
    }

    #[test]
    fn non_positive_or_non_finite_sigma_is_the_identity() {
        let image = noise(8, 6, 3);
        for sigma in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert_eq!(gaussian_blur(&image, sigma), image);
        }
    }

    #[test]
    fn blur_into_reuses_a_dirty_buffer() {
        let (small, large) = (noise(10, 7, 4), noise(30, 20, 5));
        let mut out = constant(3, 3, 9.0);
        gaussian_blur_into(&large, 2.0, &mut out);
        assert_eq!(out, gaussian_blur(&large, 2.0));
        gaussian_blur_into(&small, 1.0, &mut out);
        assert_eq!(out, gaussian_blur(&small, 1.0));
    }

    #[test]
    fn median_removes_isolated_salt_and_pepper() {
        let mut image = constant(12, 10, 0.5);
        let plane = 12 * 10;
        for (c, x, y, value) in [(0, 3, 4, 1.0), (1, 8, 2, 0.0), (2, 0, 0, 1.0), (0, 11, 9, 0.0)] {
            image.data[c * plane + y * 12 + x] = value;
        }
        assert_eq!(median_filter(&image, 1), constant(12, 10, 0.5));
    }

    #[test]
    fn median_preserves_a_constant_image_and_a_step_edge() {
        let image = constant(9, 7, 0.25);
        assert_eq!(median_filter(&image, 1), image);
        assert_eq!(median_filter(&image, 2), image);
        let mut step = constant(9, 7, 0.0);
        for (i, value) in step.data.iter_mut().enumerate() {
            if i % 9 >= 4 {
                *value = 1.0;
            }
        }
        assert_eq!(median_filter(&step, 1), step);
        assert_eq!(median_filter(&step, 2), step);
    }

    #[test]
    fn median_matches_sorting_every_window() {
        for (width, height) in [(13, 8), (1, 5), (4, 1), (2, 2)] {
            let image = noise(width, height, 6);
            for radius in [1, 2, 3] {
                assert_eq!(
                    median_filter(&image, radius),
                    reference_median(&image, radius),
                    "{width}×{height} r{radius}"
                );
            }
        }
        let image = noise(5, 5, 7);
        assert_eq!(median_filter(&image, 0), image);
    }

    #[test]
    fn foveate_is_sharp_at_the_centre_and_blurred_far_away() {
        let image = noise(40, 30, 8);
        let blurred = gaussian_blur(&image, 2.0);
        let (centre, sharp_radius, blur_radius) = ((10.0, 12.0), 5.0, 15.0);
        let out = foveate(&image, &blurred, centre, sharp_radius, blur_radius);
        assert_eq!((out.width, out.height, out.data.len()), (40, 30, image.data.len()));
        for (i, ((&o, &sharp), &soft)) in out.data.iter().zip(&image.data).zip(&blurred.data).enumerate() {
            let (x, y) = ((i % (40 * 30)) % 40, (i % (40 * 30)) / 40);
            let distance = ((x as f32 + 0.5 - centre.0).powi(2) + (y as f32 + 0.5 - centre.1).powi(2)).sqrt();
            if distance <= sharp_radius {
                assert_eq!(o, sharp, "pixel ({x}, {y})");
            } else if distance >= blur_radius {
                assert!((o - soft).abs() < 1e-6, "pixel ({x}, {y})");
            } else {
                assert!(o >= sharp.min(soft) - 1e-6 && o <= sharp.max(soft) + 1e-6, "pixel ({x}, {y})");
            }
        }
    }

    #[test]
    fn foveate_blends_more_with_distance() {
        // sharp = 0 and blurred = 1 make the output the blend weight itself.
        let (sharp, soft) = (constant(50, 1, 0.0), constant(50, 1, 1.0));
        let out = foveate(&sharp, &soft, (0.5, 0.5), 10.0, 30.0);
        let row = &out.data[..50];
        assert!(row.windows(2).all(|pair| pair[0] <= pair[1]), "{row:?}");
        assert_eq!((row[10], row[30]), (0.0, 1.0));
        assert!((row[20] - 0.5).abs() < 1e-6, "midway {}", row[20]);
        // No ramp: a hard edge at the sharp radius.
        let hard = foveate(&sharp, &soft, (0.5, 0.5), 10.0, 10.0);
        assert_eq!((hard.data[10], hard.data[11]), (0.0, 1.0));
    }
}
