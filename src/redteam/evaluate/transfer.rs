//! Transfer: each score-based attack on the raw model, then every preset on its
//! adversarial photos (and a few example strips).

use std::sync::Arc;

use super::{
    AttackKind, AttackSummary, Evaluator, Example, Tally, TransferResult, eps_255, median, png_bytes, run_attack,
};
use crate::attack::Goal;
use crate::imaging::ModelImage;
use crate::pipeline::Outcome;
use crate::redteam::RedTeamError;
use crate::redteam::attack::progress_bar;
use crate::redteam::charts;
use crate::redteam::oracle::RawModel;

/// Example strips drawn (the first adversarial examples).
const MAX_STRIPS: usize = 6;

/// Runs the transfer attacks and fills `report.attacks`, `report.transfer` and
/// `report.examples`. Returns the first attack's output per (ε, photo) for the photos
/// the raw model gets right: the adaptive attacks start from it.
pub(super) fn run(
    ev: &Evaluator<'_>,
    report: &mut super::EvaluationReport,
) -> Result<Vec<Vec<Option<ModelImage>>>, RedTeamError> {
    let options = ev.options;
    let kinds: Vec<AttackKind> = match options.attacks.iter().filter(|a| !a.adaptive()).copied().collect::<Vec<_>>() {
        kinds if kinds.is_empty() => vec![AttackKind::Square],
        kinds => kinds,
    };
    let mut transfer_images = vec![vec![None; ev.samples.len()]; options.epsilons.len()];
    let mut strips = 0;
    for (e, &epsilon) in options.epsilons.iter().enumerate() {
        for (k, &kind) in kinds.iter().enumerate() {
            let mut adversarial = Vec::new();
            let mut queries = Vec::new();
            let mut attacked = 0;
            let bar = progress_bar(ev.samples.len());
            bar.set_message(format!("{} on raw, ε {:.0}/255", kind.name(), eps_255(epsilon)));
            for index in ev.attacked().collect::<Vec<_>>() {
                bar.set_position(index as u64);
                let sample = &ev.samples[index];
                attacked += 1;
                let mut oracle = RawModel::new(Arc::clone(&ev.raw));
                let goal = Goal::Untargeted { true_class: sample.class_id };
                let seed = options.seed + index as u64;
                let outcome = run_attack(
                    kind,
                    &mut oracle,
                    &sample.clean,
                    &goal,
                    epsilon,
                    options.queries,
                    seed,
                    None,
                    options.p_init,
                )?;
                // HopSkipJump's answer may lie outside the ε-ball: never a warm start then.
                if k == 0 && (kind != AttackKind::Hsja || outcome.success) {
                    transfer_images[e][index] = Some(outcome.adversarial.clone());
                }
                if outcome.success {
                    queries.push(outcome.queries as f64);
                    adversarial.push((index, outcome));
                }
            }
            bar.finish_and_clear();
            report.attacks.push(AttackSummary {
                attack: kind.name().into(),
                epsilon,
                attacked,
                fooled: adversarial.len(),
                median_queries: median(queries),
            });
            eprintln!(
                "{} eps {:.0}/255: fooled raw on {}/{attacked}",
                kind.name(),
                eps_255(epsilon),
                adversarial.len()
            );

            let mut per_preset: Vec<Vec<(usize, Outcome)>> = vec![Vec::new(); options.presets.len()];
            for (index, outcome) in &adversarial {
                let sample = &ev.samples[*index];
                let png = png_bytes(&outcome.adversarial)?;
                let name = format!("{}_{}_eps{}.png", sample.stem(), kind.name(), eps_255(epsilon));
                ev.write(&format!("adversarial/{name}"), &png)?;
                let mut defended = Vec::new();
                let mut raw_label = String::new();
                for (p, preset) in options.presets.iter().enumerate() {
                    let answer = ev.preset(png.clone(), preset, options.seed + *index as u64)?;
                    let labels = &answer.model.labels;
                    raw_label = labels.name(answer.raw_class()).to_string();
                    let label = answer.defended.class_id.map_or("abstain", |c| labels.name(c)).to_string();
                    defended.push((preset.clone(), label, answer.suspicious));
                    per_preset[p].push((sample.class_id, answer));
                }
                let strip = if strips < MAX_STRIPS {
                    strips += 1;
                    let path = format!("charts/strip_{}_{}_eps{}.png", sample.stem(), kind.name(), eps_255(epsilon));
                    let truth = ev.raw.labels.name(sample.class_id);
                    let (preset, label, _) = defended.first().cloned().unwrap_or_default();
                    let captions = [
                        format!("original: {truth}"),
                        format!("adversarial: raw {raw_label} / {preset} {label}"),
                        format!("perturbation x20 ({} {:.0}/255)", kind.name(), eps_255(epsilon)),
                    ];
                    let captions = [captions[0].as_str(), captions[1].as_str(), captions[2].as_str()];
                    match charts::example_strip(
                        &options.out.join(&path),
                        &sample.clean,
                        &outcome.adversarial,
                        20.0,
                        captions,
                    ) {
                        Ok(()) => Some(path),
                        Err(e) => {
                            eprintln!("no strip chart: {e}");
                            None
                        }
                    }
                } else {
                    None
                };
                report.examples.push(Example {
                    file: sample.file.clone(),
                    class_id: sample.class_id,
                    epsilon,
                    queries: outcome.queries,
                    fooled: true,
                    raw_label,
                    defended,
                    png: format!("adversarial/{name}"),
                    strip,
                });
            }
            for (preset, answers) in options.presets.iter().zip(per_preset) {
                let tally = Tally::of(&answers);
                report.transfer.push(TransferResult {
                    preset: preset.clone(),
                    attack: kind.name().into(),
                    epsilon,
                    adversarial: answers.len(),
                    recovered: tally.defended_correct,
                    abstained: tally.abstained,
                    suspicious: tally.suspicious,
                    per_defense: tally.per_defense,
                });
            }
        }
    }
    Ok(transfer_images)
}
