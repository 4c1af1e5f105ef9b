//! White-box: the attacker has the weights and the code. Per preset and radius, every
//! photo the raw model gets right is attacked with the white-box attacks in turn
//! (gradients through the preset's differentiable copy, EOT), and separately with PGD
//! on the raw model alone (transfer). Every verdict is the real pipeline's on the
//! 8-bit PNG with fresh noise, `JUDGE_DRAWS` times; a photo is robust only if every
//! draw is right (abstentions are wrong) against both attacks.

use std::time::Instant;

use super::{Evaluator, WhiteBoxRow, eps_255, median, png_bytes};
use crate::attack::{Goal, Norm};
use crate::imaging::ModelImage;
use crate::redteam::RedTeamError;
use crate::redteam::attack::progress_bar;
use crate::redteam::whitebox::{WhiteBox, WhiteBoxAttack, WhiteBoxBudget};

/// Fresh-noise verdicts per adversarial image (the "right on 3 fresh draws").
const JUDGE_DRAWS: usize = 3;

pub(super) fn run(ev: &Evaluator<'_>) -> Result<Vec<WhiteBoxRow>, RedTeamError> {
    let options = ev.options;
    if options.whitebox.is_empty() {
        return Ok(Vec::new());
    }
    let root = std::env::current_dir().map_err(RedTeamError::io("."))?;
    let mut white_box = WhiteBox::start(std::sync::Arc::clone(&ev.pipeline), ev.runtime.handle().clone(), &root)?;
    let presets: Vec<&String> = if options.whitebox_presets.is_empty() {
        options.presets.iter().filter(|p| p.as_str() != "none").collect()
    } else {
        options.whitebox_presets.iter().collect()
    };
    let radii: Vec<(Norm, f32)> = options
        .epsilons
        .iter()
        .map(|&e| (Norm::Linf, e))
        .chain(options.whitebox_l2.iter().map(|&e| (Norm::L2, e)))
        .collect();
    let photos: Vec<usize> = ev.attacked().collect();
    let mut rows = Vec::new();
    for &(norm, epsilon) in &radii {
        let budget = WhiteBoxBudget {
            norm,
            epsilon,
            steps: options.whitebox_steps,
            eot: options.whitebox_eot,
            judge_draws: JUDGE_DRAWS,
            seed: options.seed,
        };
        // The transfer examples: PGD on the raw model alone, once per photo.
        let mut transfer: Vec<ModelImage> = Vec::new();
        for &index in &photos {
            let sample = &ev.samples[index];
            let goal = Goal::Untargeted { true_class: sample.class_id };
            let raw_budget = WhiteBoxBudget { judge_draws: 1, ..budget };
            let found = white_box.attack(
                &sample.clean,
                goal,
                &[("defense", "none")],
                &[WhiteBoxAttack::Pgd],
                &raw_budget,
                &mut |_, _| {},
            )?;
            transfer.push(found.outcome.adversarial);
        }
        for preset in &presets {
            rows.push(attack_preset(ev, &mut white_box, &photos, &transfer, preset, &budget)?);
        }
    }
    Ok(rows)
}

fn radius_name(norm: Norm, epsilon: f32) -> String {
    match norm {
        Norm::Linf => format!("linf{:.0}", eps_255(epsilon)),
        Norm::L2 => format!("l2-{epsilon}"),
    }
}

fn attack_preset(
    ev: &Evaluator<'_>,
    white_box: &mut WhiteBox,
    photos: &[usize],
    transfer: &[ModelImage],
    preset: &str,
    budget: &WhiteBoxBudget,
) -> Result<WhiteBoxRow, RedTeamError> {
    let options = ev.options;
    let started = Instant::now();
    let norm = match budget.norm {
        Norm::Linf => "linf",
        Norm::L2 => "l2",
    };
    let mut row = WhiteBoxRow {
        preset: preset.to_string(),
        norm: norm.into(),
        epsilon: budget.epsilon,
        attacks: options.whitebox.iter().map(|a| a.name().to_string()).collect(),
        steps: budget.steps,
        eot: budget.eot,
        judge_draws: budget.judge_draws,
        photos: photos.len(),
        whitebox_robust: 0,
        transfer_robust: 0,
        robust: 0,
        median_steps: f64::NAN,
        seconds_per_photo: 0.0,
        rows_per_step: 0.0,
        strip: None,
    };
    let (mut steps_to_success, mut total_steps, mut total_rows) = (Vec::new(), 0usize, 0usize);
    let bar = progress_bar(photos.len());
    bar.set_message(format!("white-box on {preset}, {}", radius_name(budget.norm, budget.epsilon)));
    for (n, &index) in photos.iter().enumerate() {
        bar.set_position(n as u64);
        let sample = &ev.samples[index];
        let goal = Goal::Untargeted { true_class: sample.class_id };
        let params = [("defense", preset)];
        let found = white_box.attack(&sample.clean, goal, &params, &options.whitebox, budget, &mut |_, _| {})?;
        total_steps += found.steps;
        total_rows += found.rows;
        let whitebox_robust = !found.outcome.success;
        if found.outcome.success {
            steps_to_success.push(found.steps as f64);
        }
        let name = format!("whitebox-{preset}-{}-{}", radius_name(budget.norm, budget.epsilon), sample.stem());
        let adversarial_png = png_bytes(&found.outcome.adversarial)?;
        ev.write(&format!("adversarial/{name}.png"), &adversarial_png)?;
        if found.outcome.success && row.strip.is_none() {
            row.strip = example_strip(ev, sample, &found.outcome.adversarial, adversarial_png, preset, budget, &name)?;
        }
        // The transfer example, judged on this preset with fresh draws.
        let png = png_bytes(&transfer[n])?;
        let mut transfer_robust = true;
        for draw in 0..budget.judge_draws {
            let seed = u64::MAX / 3 + options.seed * 1000 + (index * 16 + draw) as u64;
            let outcome = ev.preset(png.clone(), preset, seed)?;
            transfer_robust &= outcome.defended.class_id == Some(sample.class_id);
        }
        row.whitebox_robust += usize::from(whitebox_robust);
        row.transfer_robust += usize::from(transfer_robust);
        row.robust += usize::from(whitebox_robust && transfer_robust);
    }
    bar.finish_and_clear();
    row.median_steps = median(steps_to_success);
    row.seconds_per_photo = started.elapsed().as_secs_f64() / photos.len().max(1) as f64;
    row.rows_per_step = total_rows as f64 / total_steps.max(1) as f64;
    eprintln!(
        "white-box on {preset} {}: robust {}/{n} (white-box {}/{n}, transfer {}/{n}), {:.1} s a photo",
        radius_name(budget.norm, budget.epsilon),
        row.robust,
        row.whitebox_robust,
        row.transfer_robust,
        row.seconds_per_photo,
        n = row.photos
    );
    Ok(row)
}

/// original | white-box adversarial | perturbation ×20 for the first photo broken at this
/// preset and radius, captioned with one fresh answer of the real pipeline; the chart's
/// path, or None when it could not be drawn (said on stderr, the run goes on).
fn example_strip(
    ev: &Evaluator<'_>,
    sample: &crate::redteam::evaluate::Sample,
    adversarial: &ModelImage,
    png: Vec<u8>,
    preset: &str,
    budget: &WhiteBoxBudget,
    name: &str,
) -> Result<Option<String>, RedTeamError> {
    let answer = ev.preset(png, preset, u64::MAX / 5 + ev.options.seed)?;
    let labels = &answer.model.labels;
    let defended = answer.defended.class_id.map_or("abstain", |c| labels.name(c));
    let radius = match budget.norm {
        Norm::Linf => format!("L∞ {:.0}/255", eps_255(budget.epsilon)),
        Norm::L2 => format!("L2 {}", budget.epsilon),
    };
    let captions = [
        format!("original: {}", labels.name(sample.class_id)),
        format!("white-box: raw {} / {preset} {defended}", labels.name(answer.raw_class())),
        format!("perturbation x20 ({radius})"),
    ];
    let path = format!("charts/strip_{name}.png");
    let captions = [captions[0].as_str(), captions[1].as_str(), captions[2].as_str()];
    match crate::redteam::charts::example_strip(&ev.options.out.join(&path), &sample.clean, adversarial, 20.0, captions)
    {
        Ok(()) => Ok(Some(path)),
        Err(e) => {
            eprintln!("no white-box strip: {e}");
            Ok(None)
        }
    }
}
