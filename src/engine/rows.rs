//! A request's rows while they wait in the queue.
//!
//! Queued rows are most of what a busy server holds: sixteen admitted `default`
//! requests keep 51 input rows each, about 570 MB as f32. Rows the caller marks as
//! compact (noisy views, which are random draws anyway) wait at half precision and
//! are widened to f32 only when their batch is built; the rest stay exact. A part is
//! always a whole number of rows, so a batch can take rows from any mix of parts.

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Rows back to back, in the order they were pushed, each part full or half precision.
#[derive(Debug, Default, Clone)]
pub struct Rows {
    parts: Vec<Part>,
    floats: usize,
}

#[derive(Debug, Clone)]
enum Part {
    Full(Vec<f32>),
    Half(Vec<f16>),
}

impl Part {
    fn len(&self) -> usize {
        match self {
            Part::Full(values) => values.len(),
            Part::Half(values) => values.len(),
        }
    }
}

impl From<Vec<f32>> for Rows {
    fn from(values: Vec<f32>) -> Self {
        let floats = values.len();
        Self { parts: vec![Part::Full(values)], floats }
    }
}

impl Rows {
    pub fn new() -> Self {
        Self::default()
    }

    /// Floats held, whatever their precision.
    pub fn len(&self) -> usize {
        self.floats
    }

    pub fn is_empty(&self) -> bool {
        self.floats == 0
    }

    /// Appends full-precision values through `write`, which pushes them onto a `Vec`
    /// (one or more whole rows).
    pub fn push_full_with(&mut self, write: impl FnOnce(&mut Vec<f32>)) {
        if !matches!(self.parts.last(), Some(Part::Full(_))) {
            self.parts.push(Part::Full(Vec::new()));
        }
        if let Some(Part::Full(values)) = self.parts.last_mut() {
            let before = values.len();
            write(values);
            self.floats += values.len() - before;
        }
    }

    /// Appends `values` (one or more whole rows) stored at half precision: about 1e-3
    /// relative rounding, 1/16 of an 8-bit pixel step after normalisation.
    pub fn push_half(&mut self, values: &[f32]) {
        self.push_half_with(values.len(), |half| half.convert_from_f32_slice(values));
    }

    /// Appends `floats` half-precision values (whole rows) written by `fill`, which
    /// gets them zeroed.
    pub fn push_half_with(&mut self, floats: usize, fill: impl FnOnce(&mut [f16])) {
        if !matches!(self.parts.last(), Some(Part::Half(_))) {
            self.parts.push(Part::Half(Vec::new()));
        }
        if let Some(Part::Half(half)) = self.parts.last_mut() {
            let at = half.len();
            half.resize(at + floats, f16::ZERO);
            fill(&mut half[at..]);
            self.floats += floats;
        }
    }

    /// Whether every part is a whole number of `row_len` rows.
    pub(super) fn rows_align(&self, row_len: usize) -> bool {
        row_len > 0 && self.parts.iter().all(|part| part.len() % row_len == 0)
    }

    /// The floats `range` as one full-precision slice, when they sit in one such part.
    pub(super) fn contiguous(&self, range: std::ops::Range<usize>) -> Option<&[f32]> {
        let mut start = 0;
        for part in &self.parts {
            let end = start + part.len();
            if range.start >= start && range.end <= end {
                return match part {
                    Part::Full(values) => values.get(range.start - start..range.end - start),
                    Part::Half(_) => None,
                };
            }
            start = end;
        }
        None
    }

    /// Appends the floats in `range` to `out` as f32.
    pub(super) fn write(&self, range: std::ops::Range<usize>, out: &mut Vec<f32>) {
        let mut start = 0;
        for part in &self.parts {
            let end = start + part.len();
            let from = range.start.max(start);
            let to = range.end.min(end);
            if from < to {
                match part {
                    Part::Full(values) => out.extend_from_slice(&values[from - start..to - start]),
                    Part::Half(values) => {
                        let at = out.len();
                        out.resize(at + (to - from), 0.0);
                        values[from - start..to - start].convert_to_f32_slice(&mut out[at..]);
                    }
                }
            }
            start = end;
            if start >= range.end {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mixed() -> Rows {
        let mut rows = Rows::new();
        rows.push_full_with(|v| v.extend_from_slice(&[0.0, 1.0]));
        rows.push_half(&[0.25, -1.5]);
        rows.push_half(&[2.0, 0.1]);
        rows.push_full_with(|v| v.extend_from_slice(&[5.0, 6.0]));
        rows.push_full_with(|v| v.extend_from_slice(&[7.0, 8.0]));
        rows
    }

    #[test]
    fn rows_come_back_in_order_across_parts() {
        let rows = mixed();
        assert_eq!(rows.len(), 10);
        assert!(rows.rows_align(2));
        assert!(!rows.rows_align(4));
        let mut all = Vec::new();
        rows.write(0..10, &mut all);
        assert_eq!(&all[..4], &[0.0, 1.0, 0.25, -1.5]);
        // 0.1 is not a half-precision number: it comes back rounded, not exact.
        assert!((all[5] - 0.1).abs() < 1e-4 && all[5] != 0.1);
        assert_eq!(&all[6..], &[5.0, 6.0, 7.0, 8.0]);
        let mut middle = Vec::new();
        rows.write(4..8, &mut middle);
        assert_eq!(middle, all[4..8]);
    }

    #[test]
    fn only_full_precision_rows_are_lent_without_a_copy() {
        let rows = mixed();
        // Consecutive pushes of one precision share a part.
        assert_eq!(rows.contiguous(6..10), Some(&[5.0, 6.0, 7.0, 8.0][..]));
        assert_eq!(rows.contiguous(0..2), Some(&[0.0, 1.0][..]));
        assert_eq!(rows.contiguous(2..4), None);
        assert_eq!(rows.contiguous(0..4), None);
        assert_eq!(Rows::from(vec![1.0, 2.0]).contiguous(0..2), Some(&[1.0, 2.0][..]));
    }

    #[test]
    fn half_precision_error_is_far_below_a_pixel_step() {
        // Normalised pixels span about [-2.2, 2.7]; one 8-bit step is 1/255/std ≈ 0.017.
        let values: Vec<f32> = (0..10_000).map(|i| -2.2 + 4.9 * i as f32 / 9_999.0).collect();
        let mut rows = Rows::new();
        rows.push_half(&values);
        let mut back = Vec::new();
        rows.write(0..values.len(), &mut back);
        let worst = values.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 0.017 / 8.0, "worst rounding {worst}");
    }
}
