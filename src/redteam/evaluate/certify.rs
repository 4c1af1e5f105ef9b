//! Certified accuracy of randomized smoothing on the raw model: CERTIFY on every
//! photo at each σ, and the curve of certified accuracy against the L2 radius.

use super::{CertifiedResult, Evaluator};
use crate::defense::smooth::SmoothDetails;
use crate::redteam::RedTeamError;

pub(super) fn run(ev: &Evaluator<'_>) -> Result<Vec<CertifiedResult>, RedTeamError> {
    let mut results = Vec::new();
    for &sigma in &ev.options.certify_sigmas {
        let result = at_sigma(ev, sigma)?;
        eprintln!(
            "certify sigma {sigma}: {}/{} certified correct at radius 0, max radius {:.3}",
            result.certified_correct, result.images, result.max_radius
        );
        results.push(result);
    }
    Ok(results)
}

fn at_sigma(ev: &Evaluator<'_>, sigma: f32) -> Result<CertifiedResult, RedTeamError> {
    let options = ev.options;
    let sigma_text = sigma.to_string();
    let samples_text = options.certify_samples.to_string();
    let mut radii = Vec::new();
    let (mut abstained, mut correct) = (0, 0);
    let mut meta = None;
    for (index, (sample, png)) in ev.samples.iter().zip(&ev.clean_png).enumerate() {
        let seed = (options.seed + index as u64).to_string();
        let pairs = [
            ("defense", "smooth"),
            ("sigma", sigma_text.as_str()),
            ("samples", samples_text.as_str()),
            ("certify", "true"),
            ("seed", seed.as_str()),
        ];
        let outcome = ev.classify(png.clone(), &pairs)?;
        let details = outcome
            .defenses
            .iter()
            .find(|d| d.name == "smooth")
            .and_then(|d| serde_json::from_str::<SmoothDetails>(d.details.get()).ok());
        let (certificate, alpha) = details
            .and_then(|d| d.certificate.map(|c| (c, d.alpha)))
            .ok_or_else(|| RedTeamError::Invalid("the smoothing answer carries no certificate".into()))?;
        abstained += usize::from(certificate.abstained);
        let radius = match (certificate.class_id, certificate.radius) {
            (Some(class), Some(radius)) if class == sample.class_id => Some(radius),
            _ => None,
        };
        correct += usize::from(radius.is_some());
        radii.push(radius);
        meta = Some((certificate.selection_samples, certificate.max_radius, alpha));
    }
    let (selection_samples, max_radius, alpha) =
        meta.ok_or_else(|| RedTeamError::Invalid("no photos to certify".into()))?;
    let steps = 40;
    let curve = (0..=steps)
        .map(|i| {
            let r = max_radius * 1.05 * i as f64 / steps as f64;
            let certified = radii.iter().filter(|radius| radius.is_some_and(|x| x >= r)).count();
            (r, certified as f64 / ev.samples.len() as f64)
        })
        .collect();
    Ok(CertifiedResult {
        sigma,
        selection_samples,
        samples: u64::from(options.certify_samples),
        alpha,
        max_radius,
        images: ev.samples.len(),
        certified_correct: correct,
        abstained,
        radii,
        curve,
    })
}
