//! Statistics for randomized smoothing (Cohen, Rosenfeld & Kolter 2019, "Certified
//! Adversarial Robustness via Randomized Smoothing").
//!
//! The smoothed classifier `g(x) = argmax_c P[f(x + ε) = c]`, `ε ~ N(0, σ²I)`, is only ever
//! observed through Monte Carlo votes of the base classifier `f`. Everything here turns vote
//! counts into decisions whose error probability is bounded by a user-chosen `alpha`:
//!
//! - PREDICT ([`predict_schedule`], [`predict_decision`]): an exact two-sided binomial test on
//!   the top two counts. We sample adaptively ("looks" at growing sample counts) so that clean,
//!   easy inputs stop early; a Bonferroni correction over the looks keeps the overall
//!   probability of returning a wrong class at most `alpha`.
//! - CERTIFY ([`certify`], [`certify_futile`]): a one-sided Clopper–Pearson lower bound on the
//!   top-class probability `pA`, turned into the certified L2 radius `σ·Φ⁻¹(pA_lower)`.
//!
//! All distribution functions come from `statrs` (no hand-written special functions), and every
//! function is pure. Invalid inputs never panic: they are mapped to the conservative answer
//! (a p-value of 1, a lower bound of 0, no certificate), as documented on each function.
//!
//! Owns: the smoothing statistics (pure numbers). Must not import anything of the crate
//! but its own math.

use statrs::distribution::{Beta, Binomial, ContinuousCDF, DiscreteCDF, Normal};

/// Beyond this many unanimous votes the two-sided p-value `2·0.5^n` has underflowed to 0
/// (`2^-1074` is the smallest positive f64), so any positive level is passed by then. Scans for
/// "the first n at which unanimity passes" stop here rather than run to `max_samples`, which may
/// be astronomically large.
const UNANIMITY_SCAN_LIMIT: u64 = 1100;

/// Maps a user-supplied significance level into `[0, 1]`.
///
/// Why clamping is the right repair: a level `<= 0` asks for certainty, which no finite sample
/// gives, and the formulas then yield the trivial (fully conservative) answers: no test rejects,
/// every lower bound is 0. NaN is treated the same way, so a corrupted configuration makes the
/// defense abstain rather than certify. A level `>= 1` is a confidence of zero; clamping to 1
/// keeps the formulas defined, and rejecting such a configuration is the caller's job.
fn sanitize_alpha(alpha: f64) -> f64 {
    if alpha.is_nan() { 0.0 } else { alpha.clamp(0.0, 1.0) }
}

/// Two-sided exact binomial test of `successes` out of `trials` against p = 0.5
/// (what Cohen et al.'s PREDICT uses on the top two counts nA, nB with trials = nA + nB).
///
/// `p = min(1, 2·P[X <= min(k, n-k)])` for `X ~ Bin(n, 1/2)`. Because Bin(n, 1/2) is
/// symmetric, doubling the smaller tail is exactly the "sum of all outcomes at most as likely as
/// the observed one" definition (scipy's `binomtest`), and it is 1 at a perfect split.
///
/// `trials == 0` gives 1.0 (no evidence). `successes > trials` is impossible for real counts;
/// it is clamped to `trials` rather than panicking.
pub fn binomial_test_two_sided(successes: u64, trials: u64) -> f64 {
    if trials == 0 {
        return 1.0;
    }
    let k = successes.min(trials);
    let smaller_tail_end = k.min(trials - k);
    if 2 * smaller_tail_end + 1 >= trials {
        // The tail reaches the middle of a symmetric distribution, so it holds at least half
        // the mass and the p-value is exactly 1. Saying so directly avoids the incomplete beta
        // function's last-ulp rounding (e.g. 0.99999999999999 for 5 of 11).
        return 1.0;
    }
    // `Binomial::new` only fails for p outside [0, 1]; 0.5 is always valid, but should it ever
    // fail the conservative p-value is 1 (never reject).
    match Binomial::new(0.5, trials) {
        Ok(null) => (2.0 * null.cdf(smaller_tail_end)).min(1.0),
        Err(_) => 1.0,
    }
}

/// One-sided (1 - alpha) Clopper–Pearson lower confidence bound on a binomial proportion:
/// the alpha quantile of `Beta(k, n - k + 1)`; 0 when `k == 0`.
///
/// Why this bound: it is exact (never under-covers, unlike normal approximations), which is what
/// a *certificate* needs: the radius is only guaranteed if `pA >= p_lower` holds with
/// probability at least `1 - alpha`. It is the `p` solving `P[X >= k | p] = alpha`.
///
/// Invalid inputs: `alpha` is clamped to `[0, 1]` with NaN treated as 0 (see `sanitize_alpha`),
/// so a bad level yields the trivial bound 0; `successes > trials` is clamped to `trials`.
pub fn clopper_pearson_lower(successes: u64, trials: u64, alpha: f64) -> f64 {
    let alpha = sanitize_alpha(alpha);
    let k = successes.min(trials);
    if k == 0 {
        // No successes: the only bound that holds at every confidence level is 0.
        return 0.0;
    }
    // k >= 1 and n - k + 1 >= 1, so both shapes are positive; an Err is unreachable in
    // practice, and 0 (no information) is the safe fallback.
    match Beta::new(k as f64, (trials - k) as f64 + 1.0) {
        // NaN (not expected from valid shapes) would slip through `clamp`; map it to 0 too.
        Ok(beta) => match beta.inverse_cdf(alpha) {
            bound if bound.is_nan() => 0.0,
            bound => bound.clamp(0.0, 1.0),
        },
        Err(_) => 0.0,
    }
}

/// Standard normal quantile Φ⁻¹(p).
///
/// `p` is clamped to `[0, 1]` (Φ⁻¹(0) = -∞, Φ⁻¹(1) = +∞) because statrs panics outside that
/// range; NaN propagates as NaN, which every caller here treats as "no certificate".
pub fn normal_quantile(p: f64) -> f64 {
    if p.is_nan() {
        return f64::NAN;
    }
    Normal::standard().inverse_cdf(p.clamp(0.0, 1.0))
}

/// Certified L2 radius `σ·Φ⁻¹(p_lower)`, `None` when `p_lower <= 0.5` (CERTIFY abstains).
///
/// Cohen et al., Theorem 1: if the smoothed classifier's top class has probability at least
/// `p_lower > 1/2` (and hence the runner-up at most `1 - p_lower`), its prediction is constant
/// within radius `σ·Φ⁻¹(p_lower)`. Also `None` (conservatively) when `sigma` is not a positive
/// finite number (without noise there is nothing to certify), when `p_lower` is NaN, and when
/// the radius would be infinite (`p_lower >= 1`, which a finite sample at a positive level never
/// produces).
pub fn certified_radius(sigma: f64, p_lower: f64) -> Option<f64> {
    // Comparisons with NaN are false, so a NaN `sigma` or `p_lower` lands in the abstaining branch.
    let certifiable = sigma.is_finite() && sigma > 0.0 && p_lower > 0.5;
    if !certifiable {
        return None;
    }
    let radius = sigma * normal_quantile(p_lower);
    (radius.is_finite() && radius > 0.0).then_some(radius)
}

/// Largest radius CERTIFY can return with `n` estimation samples at level `alpha`:
/// all `n` samples agree, so `p_lower = alpha^(1/n)` (the Clopper–Pearson bound for k = n, since
/// the CDF of Beta(n, 1) is xⁿ) and the radius is `σ·Φ⁻¹(alpha^(1/n))`.
///
/// This is the ceiling the sample budget imposes regardless of how robust the input is, which is
/// why it is reported next to every certificate. Returns 0 when even unanimity cannot certify
/// (`alpha^(1/n) <= 0.5`, `n == 0`, or invalid `sigma`/`alpha`).
pub fn max_certifiable_radius(sigma: f64, n: u64, alpha: f64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let alpha = sanitize_alpha(alpha);
    let p_lower = alpha.powf(1.0 / n as f64);
    certified_radius(sigma, p_lower).unwrap_or(0.0)
}

/// The adaptive sampling plan for PREDICT: cumulative sample counts at which the
/// test is run ("looks"), and the level each look is tested at.
#[derive(Debug, Clone, PartialEq)]
pub struct LookSchedule {
    /// Cumulative sample counts, strictly increasing, the last one being the sample budget.
    pub looks: Vec<u64>,
    /// Level of the binomial test at each look: `alpha / looks.len()` (Bonferroni).
    pub alpha_per_look: f64,
    /// Overall level: the probability that PREDICT returns a wrong class is at most this.
    pub alpha: f64,
}

/// Smallest `n <= cap` at which a unanimous vote (`n` out of `n`) passes the two-sided test at
/// `level`, i.e. `2·0.5^n < level`. Uses the very test [`predict_decision`] runs, so the schedule
/// and the decision can never disagree through rounding. `None` if no such `n` exists.
fn first_passing_unanimous(level: f64, cap: u64) -> Option<u64> {
    if level.is_nan() || level <= 0.0 {
        return None;
    }
    (1..=cap.min(UNANIMITY_SCAN_LIMIT)).find(|&n| binomial_test_two_sided(n, n) < level)
}

/// The looks for a given per-look level: first look at the earliest sample count where a
/// unanimous vote can pass (but at least `min_first`), then doubling, capped by `max_samples`,
/// which is always the last look. A single look `[max_samples]` when even the whole budget
/// cannot pass.
fn looks_for_level(max_samples: u64, level: f64, min_first: u64) -> Vec<u64> {
    let Some(unanimous) = first_passing_unanimous(level, max_samples) else {
        return vec![max_samples];
    };
    // Why doubling: the test statistic's precision grows like sqrt(n), so geometric spacing
    // keeps the number of looks (and hence the Bonferroni penalty) logarithmic in the budget,
    // while wasting at most a factor of two of samples relative to stopping at the ideal n.
    let mut look = unanimous.max(min_first).max(1);
    let mut looks = Vec::new();
    while look < max_samples {
        looks.push(look);
        look = look.saturating_mul(2);
    }
    looks.push(max_samples);
    looks
}

/// Builds the schedule for at most `max_samples` samples at overall level `alpha`:
/// Bonferroni over K looks (each look tested at alpha/K, so the probability that any
/// look wrongly predicts is at most alpha by the union bound). The first look is the
/// smallest n at which a unanimous vote can pass at alpha/K (`2·0.5^n < alpha/K`), but at
/// least `min_first`; then looks double; the last look is `max_samples`. If even
/// `max_samples` cannot pass a unanimous vote, the schedule is the single look
/// `[max_samples]` (the procedure will abstain). `max_samples == 0` gives looks `[0]`.
///
/// K depends on the looks and the first look depends on K. More looks mean a stricter level,
/// hence a later first look, hence fewer looks, so the number of looks L(K) produced for a
/// trial K is non-increasing in K. An exact fixed point L(K) = K need not exist (L can step
/// from K to K - 1 between K - 1 and K), so we take the smallest K with L(K) <= K: its looks are
/// then tested at `alpha / L(K)`, a level at least `alpha / K`, so (i) the union bound over the
/// L(K) looks still gives at most `alpha`, and (ii) the first look can still pass a unanimous
/// vote. Taking the *smallest* such K gives the earliest first look. When L(K) = K this is the
/// fixed point. L(K) <= 65 always (doubling from 1 past any u64), so the search is short.
///
/// `alpha` is clamped to `[0, 1]` (NaN -> 0, see `sanitize_alpha`); the stored `alpha` is the
/// clamped value. At level 0 no look can ever pass, so the schedule is `[max_samples]`.
pub fn predict_schedule(max_samples: u64, alpha: f64, min_first: u64) -> LookSchedule {
    let alpha = sanitize_alpha(alpha);
    if max_samples == 0 {
        return LookSchedule { looks: vec![0], alpha_per_look: alpha, alpha };
    }
    let mut looks = vec![max_samples];
    for k in 1..=u64::BITS as usize + 1 {
        let candidate = looks_for_level(max_samples, alpha / k as f64, min_first);
        if candidate.len() <= k {
            looks = candidate;
            break;
        }
    }
    let alpha_per_look = alpha / looks.len() as f64;
    LookSchedule { looks, alpha_per_look, alpha }
}

/// Outcome of one look of the adaptive PREDICT; every variant carries the two-sided p-value of
/// the top two counts at this look (for logging and responses).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LookDecision {
    /// The top class is significantly ahead of the runner-up: return it.
    Predict { p_value: f64 },
    /// Give up: either the budget is spent, or no future look can reach significance.
    Abstain { p_value: f64 },
    /// Draw samples up to the next look and ask again.
    Continue { p_value: f64 },
}

/// Decision at look `look` (index into `schedule.looks`) given the top two vote
/// counts so far (`n_a >= n_b`) after `schedule.looks[look]` samples:
/// - Predict when the two-sided test of `n_a` out of `n_a + n_b` is below `alpha_per_look`;
/// - at the last look otherwise Abstain;
/// - before the last look, Abstain early (futility) when even if every remaining sample
///   (`looks.last - looks[look]`) went to the top class the FINAL look could not reject;
///   otherwise Continue.
///
/// Why the union bound survives adaptive stopping: the wrong-prediction event is contained in
/// "some look's test rejects in the wrong direction", each of which has probability at most
/// `alpha_per_look` whether or not we would have stopped before it, so the total is at most
/// `K · alpha / K = alpha`. Futility stopping only abstains (it turns Continue into Abstain,
/// never into Predict), so it can only remove prediction events and cannot raise the error rate.
///
/// The futility check is exact, not a heuristic: with `n_b` fixed the p-value falls as `n_a`
/// grows, and at any future look `n_a` can have grown by at most the samples drawn so far while
/// `n_b` cannot shrink, so the best case at the final look is the best case over all future
/// looks.
///
/// Defensive cases: `n_a < n_b` (a caller bug: "A" is not the top class) never predicts, since
/// the symmetric test would otherwise endorse the wrong class; `look` past the end is treated as
/// the last look; an empty schedule abstains.
pub fn predict_decision(schedule: &LookSchedule, look: usize, n_a: u64, n_b: u64) -> LookDecision {
    let p_value = binomial_test_two_sided(n_a, n_a.saturating_add(n_b));
    if n_a > n_b && p_value < schedule.alpha_per_look {
        return LookDecision::Predict { p_value };
    }
    let (Some(&last), Some(&now)) = (schedule.looks.last(), schedule.looks.get(look)) else {
        // Past the end (or no looks at all): this is, or is beyond, the final look.
        return LookDecision::Abstain { p_value };
    };
    if look + 1 >= schedule.looks.len() {
        return LookDecision::Abstain { p_value };
    }
    let best_a = n_a.saturating_add(last.saturating_sub(now));
    let best_p = binomial_test_two_sided(best_a, best_a.saturating_add(n_b));
    if best_p < schedule.alpha_per_look {
        LookDecision::Continue { p_value }
    } else {
        LookDecision::Abstain { p_value }
    }
}

/// CERTIFY's estimation step: with `n_a` of `n` estimation samples for the class chosen
/// from the separate selection samples, the (1-alpha) lower bound on pA and the radius.
///
/// Using separate selection samples matters: the bound is only valid for a class fixed before
/// the estimation samples are seen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Certificate {
    /// Estimation samples that voted for the selected class (clamped to `n`).
    pub n_a: u64,
    /// Estimation samples drawn.
    pub n: u64,
    /// One-sided (1 - alpha) Clopper–Pearson lower bound on pA.
    pub p_lower: f64,
    /// Certified L2 radius, `None` when CERTIFY abstains (`p_lower <= 0.5`).
    pub radius: Option<f64>,
    /// The largest radius this `n` and `alpha` could ever certify (all samples agreeing).
    pub max_radius: f64,
}

/// Builds the [`Certificate`] for `n_a` of `n` estimation samples at noise level `sigma` and
/// level `alpha` (clamped as in [`clopper_pearson_lower`]).
pub fn certify(sigma: f64, n_a: u64, n: u64, alpha: f64) -> Certificate {
    let n_a = n_a.min(n);
    let p_lower = clopper_pearson_lower(n_a, n, alpha);
    Certificate {
        n_a,
        n,
        p_lower,
        radius: certified_radius(sigma, p_lower),
        max_radius: max_certifiable_radius(sigma, n, alpha),
    }
}

/// CERTIFY draws its estimation samples in rounds too, but only the final look may
/// certify, so no correction is needed: this says whether the remaining samples can no
/// longer lift the (1-alpha) lower bound to above 0.5 even if all of them agree (then
/// CERTIFY can stop and abstain early).
///
/// Stopping early here is safe for the same reason as PREDICT's futility rule: it only ever
/// abstains, and the Clopper–Pearson bound grows with the success count, so "all remaining
/// samples agree" is the best case. If `n_so_far > n_total` the budget is treated as spent.
pub fn certify_futile(n_a: u64, n_so_far: u64, n_total: u64, alpha: f64) -> bool {
    let remaining = n_total.saturating_sub(n_so_far);
    let best_k = n_a.min(n_so_far).saturating_add(remaining);
    let best_n = n_so_far.saturating_add(remaining);
    let can_still_certify = clopper_pearson_lower(best_k, best_n, alpha) > 0.5;
    !can_still_certify
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::Xoshiro256PlusPlus;
    use rand::{RngExt, SeedableRng};

    /// Exact binomial pmf values for `Bin(n, p)` by the multiplicative recurrence
    /// `pmf(j+1) = pmf(j)·(n-j)/(j+1)·p/(1-p)`, in plain f64: independent of statrs.
    /// Valid for the moderate n used here (no underflow of `(1-p)^n`).
    fn exact_pmf(n: u64, p: f64) -> Vec<f64> {
        let mut pmf = Vec::with_capacity(n as usize + 1);
        let mut term = (1.0 - p).powi(n as i32);
        for j in 0..=n {
            pmf.push(term);
            term *= (n - j) as f64 / (j + 1) as f64 * p / (1.0 - p);
        }
        pmf
    }

    /// `P[X >= k]` for `X ~ Bin(n, p)` by exact summation.
    fn exact_upper_tail(k: u64, n: u64, p: f64) -> f64 {
        exact_pmf(n, p)[k as usize..].iter().sum()
    }

    fn assert_rel(actual: f64, expected: f64, rel: f64) {
        assert!(
            (actual - expected).abs() <= rel * expected.abs(),
            "{actual} vs {expected} (rel err {})",
            (actual - expected).abs() / expected.abs()
        );
    }

    #[test]
    fn binomial_test_known_values() {
        assert_rel(binomial_test_two_sided(10, 10), 2.0 * 0.5f64.powi(10), 1e-12);
        assert_eq!(binomial_test_two_sided(5, 10), 1.0);
        assert_eq!(binomial_test_two_sided(0, 10), binomial_test_two_sided(10, 10));
        assert_eq!(binomial_test_two_sided(3, 10), binomial_test_two_sided(7, 10));
        assert_eq!(binomial_test_two_sided(0, 0), 1.0);
        // Odd n: the two middle outcomes are equally likely, so neither is evidence.
        assert_eq!(binomial_test_two_sided(5, 11), 1.0);
        assert_eq!(binomial_test_two_sided(6, 11), 1.0);
    }

    #[test]
    fn binomial_test_matches_exact_sum() {
        // 15 of 20: p = 2·P[X <= 5] = 2·(1+20+190+1140+4845+15504)/2^20 = 43400/1048576.
        let pmf = exact_pmf(20, 0.5);
        let expected = 2.0 * pmf[..=5].iter().sum::<f64>();
        assert_rel(expected, 43400.0 / 1_048_576.0, 1e-13);
        assert_rel(binomial_test_two_sided(15, 20), expected, 1e-10);
        assert_rel(binomial_test_two_sided(5, 20), expected, 1e-10);
        // A larger n where the p-value is tiny.
        let pmf = exact_pmf(100, 0.5);
        let expected = 2.0 * pmf[..=30].iter().sum::<f64>();
        assert_rel(binomial_test_two_sided(70, 100), expected, 1e-9);
    }

    #[test]
    fn clopper_pearson_closed_forms() {
        for &(n, alpha) in &[(1u64, 0.05), (10, 0.001), (100, 0.001), (1000, 0.01)] {
            assert_rel(clopper_pearson_lower(n, n, alpha), alpha.powf(1.0 / n as f64), 1e-9);
            assert_eq!(clopper_pearson_lower(0, n, alpha), 0.0);
        }
        // Invalid levels fall back to trivial, conservative bounds.
        assert_eq!(clopper_pearson_lower(50, 100, f64::NAN), 0.0);
        assert_eq!(clopper_pearson_lower(50, 100, -1.0), 0.0);
        // More successes never lower the bound.
        let bounds: Vec<f64> = (0..=100).map(|k| clopper_pearson_lower(k, 100, 0.01)).collect();
        assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{bounds:?}");
    }

    #[test]
    fn clopper_pearson_solves_exact_tail_equation() {
        let (k, n, alpha) = (80u64, 100u64, 0.001);
        let p = clopper_pearson_lower(k, n, alpha);
        // The defining equation: P[X >= k | p] = alpha.
        assert_rel(exact_upper_tail(k, n, p), alpha, 1e-6);
        // And an independent root by bisection on the exact tail (increasing in p).
        let (mut lo, mut hi) = (0.0f64, 1.0f64);
        for _ in 0..100 {
            let mid = 0.5 * (lo + hi);
            if exact_upper_tail(k, n, mid) < alpha { lo = mid } else { hi = mid }
        }
        assert!((p - lo).abs() < 1e-9, "statrs {p} vs bisection {lo}");
        assert!(p > 0.65 && p < 0.72, "{p}");
    }

    #[test]
    fn normal_quantile_known_values() {
        assert_eq!(normal_quantile(0.5), 0.0);
        assert_rel(normal_quantile(0.975), 1.959_963_984_540_054, 1e-12);
        assert_rel(normal_quantile(0.025), -1.959_963_984_540_054, 1e-12);
        assert_eq!(normal_quantile(1.0), f64::INFINITY);
        assert_eq!(normal_quantile(2.0), f64::INFINITY);
        assert!(normal_quantile(f64::NAN).is_nan());
    }

    #[test]
    fn certified_radius_thresholds() {
        assert_eq!(certified_radius(0.25, 0.5), None);
        assert_eq!(certified_radius(0.25, 0.3), None);
        assert_eq!(certified_radius(0.25, f64::NAN), None);
        assert_eq!(certified_radius(0.0, 0.9), None);
        assert_eq!(certified_radius(-0.25, 0.9), None);
        assert_eq!(certified_radius(0.25, 1.0), None);
        // Φ(1) = (1 + erf(1/√2))/2, from an independent reference (not statrs, whose Normal::cdf
        // is only good to ~1e-11 here).
        let phi_1 = 0.841_344_746_068_542_9;
        assert!((normal_quantile(phi_1) - 1.0).abs() < 1e-12, "{}", normal_quantile(phi_1));
        let r = certified_radius(0.25, phi_1).expect("p_lower > 0.5 certifies");
        assert!((r - 0.25).abs() < 1e-9, "{r}");
    }

    #[test]
    fn max_certifiable_radius_formula() {
        let r = max_certifiable_radius(0.12, 100, 0.001);
        let p = 0.001f64.powf(0.01);
        assert_rel(r, 0.12 * normal_quantile(p), 1e-12);
        // It is the radius of a unanimous certificate.
        let c = certify(0.12, 100, 100, 0.001);
        assert_rel(c.radius.expect("unanimous 100 certifies"), r, 1e-9);
        // 0.001^(1/100) ≈ 0.93325, Φ⁻¹ ≈ 1.50, so ≈ 0.18.
        assert!(r > 0.175 && r < 0.185, "{r}");
        // Too few samples for unanimity to certify: 0.001^(1/5) ≈ 0.25 <= 0.5.
        assert_eq!(max_certifiable_radius(0.12, 5, 0.001), 0.0);
        assert_eq!(max_certifiable_radius(0.12, 0, 0.001), 0.0);
    }

    #[test]
    fn schedule_small_example() {
        // K=1: 2·0.5^n < 0.001 first at n=11 -> [11, 22, 32], 3 looks > 1.
        // K=2: < 0.0005 first at n=12 -> [12, 24, 32], 3 looks > 2.
        // K=3: < 0.000333 first at n=13 (2·0.5^13 = 2.44e-4; n=12 gives 4.88e-4) -> [13, 26, 32],
        // 3 looks = K: the fixed point. ([16, 32] is not one: at K=2 the first look would be 12.)
        let s = predict_schedule(32, 0.001, 1);
        assert_eq!(s.looks, vec![13, 26, 32]);
        assert_rel(s.alpha_per_look, 0.001 / 3.0, 1e-15);
        assert!(binomial_test_two_sided(13, 13) < s.alpha_per_look);
        assert!(binomial_test_two_sided(12, 12) >= s.alpha_per_look);
        // min_first pushes the first look later (and so removes a look).
        assert_eq!(predict_schedule(32, 0.001, 20).looks, vec![20, 32]);
        // The schedules the simulations below rely on.
        assert_eq!(predict_schedule(64, 0.05, 1).looks, vec![8, 16, 32, 64]);
        assert_eq!(predict_schedule(64, 0.001, 1).looks, vec![13, 26, 52, 64]);
    }

    #[test]
    fn schedule_invariants() {
        for &max_samples in &[1u64, 2, 7, 12, 13, 32, 64, 100, 1000, 100_000, u64::MAX] {
            for &alpha in &[0.5, 0.05, 0.01, 0.001, 1e-6] {
                for &min_first in &[0u64, 1, 10, 50] {
                    let s = predict_schedule(max_samples, alpha, min_first);
                    let k = s.looks.len();
                    assert_eq!(s.looks.last(), Some(&max_samples), "{s:?}");
                    assert!(s.looks.windows(2).all(|w| w[0] < w[1]), "{s:?}");
                    assert_eq!(s.alpha_per_look, alpha / k as f64, "{s:?}");
                    assert_eq!(s.alpha, alpha);
                    if k > 1 {
                        // The first look can pass a unanimous vote and respects min_first.
                        assert!(binomial_test_two_sided(s.looks[0], s.looks[0]) < s.alpha_per_look, "{s:?}");
                        assert!(s.looks[0] >= min_first, "{s:?}");
                        // Doubling between the interior looks.
                        assert!(s.looks[..k - 1].windows(2).all(|w| w[1] == 2 * w[0]), "{s:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn schedule_degenerate_cases() {
        assert_eq!(predict_schedule(0, 0.01, 1).looks, vec![0]);
        // 2·0.5^10 ≈ 0.002 > 0.001: even unanimity over the whole budget cannot pass.
        let s = predict_schedule(10, 0.001, 1);
        assert_eq!(s.looks, vec![10]);
        assert_eq!(s.alpha_per_look, 0.001);
        assert_eq!(predict_decision(&s, 0, 10, 0), LookDecision::Abstain { p_value: binomial_test_two_sided(10, 10) });
        // 12 passes at 0.001 alone, but adding an 11-sample look would need 0.0005: one look.
        assert_eq!(predict_schedule(12, 0.001, 1).looks, vec![12]);
        assert_eq!(predict_schedule(100, f64::NAN, 1).looks, vec![100]);
        assert_eq!(predict_schedule(100, 0.0, 1).looks, vec![100]);
        assert_eq!(predict_schedule(100, 0.01, 500).looks, vec![100]);
    }

    #[test]
    fn predict_decision_rules() {
        let s = predict_schedule(64, 0.001, 1); // [13, 26, 52, 64] at 0.00025
        assert!(matches!(predict_decision(&s, 0, 13, 0), LookDecision::Predict { .. }));
        assert!(matches!(predict_decision(&s, 0, 12, 1), LookDecision::Continue { .. }));
        // Reversed counts (a caller bug) never predict, however lopsided.
        assert!(matches!(predict_decision(&s, 0, 0, 13), LookDecision::Continue { .. }));
        assert!(matches!(predict_decision(&s, 3, 0, 64), LookDecision::Abstain { .. }));
        // Futile: at look 2 (52 samples) with 20 vs 20, even all 12 remaining samples for A
        // give 32 vs 20 at the final look, nowhere near significant.
        let best = binomial_test_two_sided(20 + 12, 20 + 12 + 20);
        assert!(best >= s.alpha_per_look);
        assert!(matches!(predict_decision(&s, 2, 20, 20), LookDecision::Abstain { .. }));
        // Not futile: a close race early with lots of budget left.
        assert!(binomial_test_two_sided(7 + 51, 7 + 51 + 6) < s.alpha_per_look);
        assert!(matches!(predict_decision(&s, 0, 7, 6), LookDecision::Continue { .. }));
        // Last look without significance abstains; index past the end counts as the last look.
        assert!(matches!(predict_decision(&s, 3, 40, 24), LookDecision::Abstain { .. }));
        assert!(matches!(predict_decision(&s, 9, 40, 24), LookDecision::Abstain { .. }));
        assert!(matches!(predict_decision(&s, 9, 64, 0), LookDecision::Predict { .. }));
        // The p-value is reported in every variant.
        assert_eq!(predict_decision(&s, 3, 32, 32), LookDecision::Abstain { p_value: 1.0 });
    }

    /// Result of simulating the adaptive PREDICT many times.
    struct PredictSim {
        predicted_a: usize,
        predicted_other: usize,
        samples_used: Vec<u64>,
    }

    /// Simulates PREDICT against a base classifier voting A with probability `p_a`, B with `p_b`
    /// and a third class C otherwise, drawing samples look by look and stopping as
    /// [`predict_decision`] says. The top two counts are taken over all three classes, as the
    /// real procedure does.
    fn simulate_predict(schedule: &LookSchedule, p_a: f64, p_b: f64, trials: usize, seed: u64) -> PredictSim {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let mut sim = PredictSim { predicted_a: 0, predicted_other: 0, samples_used: Vec::with_capacity(trials) };
        for _ in 0..trials {
            let mut counts = [0u64; 3];
            let mut drawn = 0u64;
            for (look, &target) in schedule.looks.iter().enumerate() {
                while drawn < target {
                    let u: f64 = rng.random();
                    let class = if u < p_a {
                        0
                    } else if u < p_a + p_b {
                        1
                    } else {
                        2
                    };
                    counts[class] += 1;
                    drawn += 1;
                }
                let mut order = [0usize, 1, 2];
                order.sort_by(|&i, &j| counts[j].cmp(&counts[i]));
                match predict_decision(schedule, look, counts[order[0]], counts[order[1]]) {
                    LookDecision::Continue { .. } => continue,
                    LookDecision::Predict { .. } => {
                        if order[0] == 0 {
                            sim.predicted_a += 1;
                        } else {
                            sim.predicted_other += 1;
                        }
                    }
                    LookDecision::Abstain { .. } => {}
                }
                break;
            }
            sim.samples_used.push(drawn);
        }
        sim
    }

    #[test]
    fn adaptive_predict_controls_error_on_ties() {
        let (alpha, trials) = (0.05, 20_000usize);
        let tolerance = 3.0 * (alpha * (1.0 - alpha) / trials as f64).sqrt();
        let corrected = predict_schedule(64, alpha, 1);
        assert_eq!(corrected.looks.len(), 4);
        // A tie between the top two: the smoothed classifier's top class is undetermined, so any
        // prediction at all is an error.
        let sim = simulate_predict(&corrected, 0.45, 0.45, trials, 0x5EED_0001);
        let corrected_rate = (sim.predicted_a + sim.predicted_other) as f64 / trials as f64;
        // The same looks each tested at the full alpha: no Bonferroni correction.
        let uncorrected = LookSchedule { alpha_per_look: alpha, ..corrected.clone() };
        let sim = simulate_predict(&uncorrected, 0.45, 0.45, trials, 0x5EED_0001);
        let uncorrected_rate = (sim.predicted_a + sim.predicted_other) as f64 / trials as f64;
        println!(
            "tie error rate at alpha={alpha}, looks {:?}: corrected {corrected_rate:.4}, uncorrected {uncorrected_rate:.4}",
            corrected.looks
        );
        assert!(corrected_rate <= alpha + tolerance, "corrected error rate {corrected_rate}");
        // Peeking at four looks at the full level inflates the error rate, here past alpha itself.
        assert!(uncorrected_rate > corrected_rate + 2.0 * tolerance, "{uncorrected_rate} vs {corrected_rate}");
        assert!(uncorrected_rate > alpha, "uncorrected error rate {uncorrected_rate}");
    }

    #[test]
    fn adaptive_predict_stops_early_on_clean_inputs() {
        let trials = 20_000usize;
        let schedule = predict_schedule(64, 0.001, 1);
        let mut sim = simulate_predict(&schedule, 0.9, 0.05, trials, 0x5EED_0002);
        sim.samples_used.sort_unstable();
        let median = sim.samples_used[trials / 2];
        let correct = sim.predicted_a as f64 / trials as f64;
        let stopped_at: Vec<usize> =
            schedule.looks.iter().map(|look| sim.samples_used.iter().filter(|&used| used == look).count()).collect();
        println!(
            "clean input pA=0.9, looks {:?}: stopped at each look {stopped_at:?}, median samples {median}, \
             mean {:.1}, predicted A {correct:.4}, wrong {}",
            schedule.looks,
            sim.samples_used.iter().sum::<u64>() as f64 / trials as f64,
            sim.predicted_other
        );
        assert!(median <= 32, "median samples {median}");
        assert!(correct >= 0.99, "predicted A in {correct}");
        assert_eq!(sim.predicted_other, 0);
    }

    #[test]
    fn certify_coverage_simulation() {
        let (p_a, n, alpha, trials) = (0.8, 100u64, 0.01, 20_000usize);
        let tolerance = 3.0 * (alpha * (1.0 - alpha) / trials as f64).sqrt();
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(0x5EED_0003);
        let mut over = 0usize;
        for _ in 0..trials {
            let n_a = (0..n).filter(|_| rng.random::<f64>() < p_a).count() as u64;
            if certify(0.25, n_a, n, alpha).p_lower > p_a {
                over += 1;
            }
        }
        let rate = over as f64 / trials as f64;
        println!("Clopper-Pearson non-coverage at pA={p_a}, n={n}, alpha={alpha}: {rate:.4}");
        assert!(rate <= alpha + tolerance, "non-coverage {rate}");
    }

    #[test]
    fn certify_fields() {
        let c = certify(0.5, 90, 100, 0.001);
        assert_eq!((c.n_a, c.n), (90, 100));
        assert_eq!(c.p_lower, clopper_pearson_lower(90, 100, 0.001));
        assert_eq!(c.radius, certified_radius(0.5, c.p_lower));
        assert!(c.radius.expect("90/100 certifies") < c.max_radius);
        let c = certify(0.5, 50, 100, 0.001);
        assert_eq!(c.radius, None);
        assert!(c.max_radius > 0.0);
        // Impossible counts are clamped, not trusted.
        assert_eq!(certify(0.5, 200, 100, 0.001).n_a, 100);
    }

    #[test]
    fn certify_futile_cases() {
        // At the start with a large budget nothing is futile.
        assert!(!certify_futile(0, 0, 10_000, 0.001));
        assert!(!certify_futile(60, 100, 10_000, 0.001));
        // 10 of 100 with 100 left: at best 110 of 200, far too few to get p_lower above 0.5.
        assert!(certify_futile(10, 100, 200, 0.001));
        // Budget spent: futile exactly when the final bound does not exceed 0.5.
        assert!(certify_futile(50, 100, 100, 0.001));
        assert!(!certify_futile(90, 100, 100, 0.001));
        // Boundary consistency with clopper_pearson_lower.
        for n_a in 0..=100 {
            let expected = clopper_pearson_lower(n_a + 50, 150, 0.01) <= 0.5;
            assert_eq!(certify_futile(n_a, 100, 150, 0.01), expected, "n_a = {n_a}");
        }
    }
}
