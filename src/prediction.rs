//! Probability arithmetic shared by the pipeline, the defenses and the attacks:
//! softmax, ranking, argmax. Pure functions; imports nothing of the crate.

/// Numerically stable softmax.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
pub fn top_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut indices: Vec<usize> = (0..values.len()).collect();
    let k = k.min(values.len());
    let by_value_desc = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    if k < indices.len() {
        indices.select_nth_unstable_by(k, by_value_desc);
        indices.truncate(k);
    }
    indices.sort_by(by_value_desc);
    indices
}

/// The index of the largest value.
pub fn argmax(values: &[f32]) -> usize {
    top_indices(values, 1).first().copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_survives_large_logits() {
        let p = softmax(&[1000.0, 1000.0, -1000.0]);
        assert!((p[0] - 0.5).abs() < 1e-6 && (p[1] - 0.5).abs() < 1e-6 && p[2] == 0.0);
        assert!((softmax(&[0.1, 2.0, -3.0]).iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn top_indices_are_sorted_and_stable() {
        let v = [0.1, 0.5, 0.2, 0.5, 0.0];
        assert_eq!(top_indices(&v, 3), vec![1, 3, 2]);
        assert_eq!(top_indices(&v, 10), vec![1, 3, 2, 0, 4]);
        assert_eq!(argmax(&v), 1);
    }
}
