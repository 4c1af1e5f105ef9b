//! Adaptive: each EOT attack on each preset's own pipeline, beside the transfer
//! example on the same photos. A photo counts as robust only when the defended answer
//! is right on both (judged with seeds the attack never used).

use std::sync::Arc;
use std::time::Instant;

use super::{AdaptiveResult, AttackKind, Evaluator, eps_255, median, png_bytes, run_attack};
use crate::attack::Goal;
use crate::attack::eot::Eot;
use crate::imaging::ModelImage;
use crate::redteam::RedTeamError;
use crate::redteam::attack::progress_bar;
use crate::redteam::oracle::{DefendedPipeline, Seeds};

/// Every adaptive attack of the options on every attacked preset and ε.
pub(super) fn run(
    ev: &Evaluator<'_>,
    transfer_images: &[Vec<Option<ModelImage>>],
) -> Result<Vec<AdaptiveResult>, RedTeamError> {
    let options = ev.options;
    let photos: Vec<usize> = ev.attacked().take(options.adaptive_images).collect();
    let presets = if options.adaptive_presets.is_empty() { &options.presets } else { &options.adaptive_presets };
    let mut results = Vec::new();
    for kind in options.attacks.iter().copied().filter(|a| a.adaptive()) {
        for preset in presets.iter().filter(|p| p.as_str() != "none") {
            for (e, &epsilon) in options.epsilons.iter().enumerate() {
                let result = attack_preset(ev, &photos, &transfer_images[e], preset, kind, epsilon)?;
                eprintln!(
                    "{} on {preset} eps {:.0}/255: transfer {}/{n}, adaptive {}/{n} correct",
                    kind.name(),
                    eps_255(epsilon),
                    result.transfer_correct,
                    result.adaptive_correct,
                    n = result.images
                );
                results.push(result);
            }
        }
    }
    Ok(results)
}

/// The adaptive attack of one kind on one preset at one ε.
fn attack_preset(
    ev: &Evaluator<'_>,
    photos: &[usize],
    transfer_images: &[Option<ModelImage>],
    preset: &str,
    kind: AttackKind,
    epsilon: f32,
) -> Result<AdaptiveResult, RedTeamError> {
    let options = ev.options;
    let started = Instant::now();
    let mut result = AdaptiveResult {
        preset: preset.to_string(),
        attack: kind.name().into(),
        epsilon,
        queries: options.adaptive_queries,
        eot: options.eot,
        fixed_noise: options.fixed_noise,
        images: photos.len(),
        clean_correct: 0,
        transfer_correct: 0,
        adaptive_correct: 0,
        abstained: 0,
        suspicious: 0,
        median_queries: f64::NAN,
        seconds: 0.0,
    };
    let mut queries = Vec::new();
    let bar = progress_bar(photos.len());
    bar.set_message(format!("{} on {preset}, ε {:.0}/255", kind.name(), eps_255(epsilon)));
    for (n, &index) in photos.iter().enumerate() {
        bar.set_position(n as u64);
        let sample = &ev.samples[index];
        let right = |class: Option<usize>| class == Some(sample.class_id);
        // Judged seeds differ from every seed the attack's oracle used.
        let judge_seed = u64::MAX / 2 + options.seed * 1000 + index as u64;
        let clean = ev.preset(ev.clean_png[index].clone(), preset, judge_seed)?;
        result.clean_correct += usize::from(right(clean.defended.class_id));
        let transfer = transfer_images[index].as_ref();
        let transfer_ok = match transfer {
            Some(image) => right(ev.preset(png_bytes(image)?, preset, judge_seed)?.defended.class_id),
            None => right(clean.defended.class_id),
        };
        result.transfer_correct += usize::from(transfer_ok);

        let attack_seed = (options.seed + index as u64) << 24;
        let runtime = ev.runtime.handle().clone();
        let mut oracle = DefendedPipeline::new(Arc::clone(&ev.pipeline), runtime, &[("defense", preset)], attack_seed)?;
        if options.fixed_noise {
            oracle = oracle.with_seeds(Seeds::Fixed { base: attack_seed, period: options.eot as u64 });
        }
        let mut eot = Eot::new(&mut oracle, options.eot);
        let goal = Goal::Untargeted { true_class: sample.class_id };
        let seed = options.seed + index as u64;
        let start = if kind == AttackKind::SquareEot { transfer } else { None };
        let outcome = run_attack(
            kind,
            &mut eot,
            &sample.clean,
            &goal,
            epsilon,
            options.adaptive_queries,
            seed,
            start,
            options.p_init,
        )?;
        if outcome.success {
            queries.push(outcome.queries as f64);
        }
        let answer = ev.preset(png_bytes(&outcome.adversarial)?, preset, judge_seed + 1)?;
        result.adaptive_correct += usize::from(right(answer.defended.class_id) && transfer_ok);
        result.abstained += usize::from(answer.defended.abstained());
        result.suspicious += usize::from(answer.suspicious);
    }
    bar.finish_and_clear();
    result.median_queries = median(queries);
    result.seconds = started.elapsed().as_secs_f64();
    Ok(result)
}
