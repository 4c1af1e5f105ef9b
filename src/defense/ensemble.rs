//! `ensemble`: the image through several models ("sampling the classifier space"
//! instead of, or besides, the image space): each member classifies its plain view
//! and noisy views at its own input size. A perturbation crafted against one model at
//! one resolution rarely fools differently sized models that see it resampled.

use super::report::{DefenseDetails, DefenseReport, EnsembleDetails, MemberPrediction, mean_probabilities};
use crate::model::Labels;
use crate::prediction::argmax;

/// One member's answer: its name and its mean probabilities over its views.
pub struct Member<'a> {
    pub model: &'a str,
    pub probabilities: Vec<f32>,
    /// Views the member classified (plain + noisy).
    pub views: usize,
}

/// The mean of the members' probabilities. All members share the label space.
pub fn report(members: &[Member<'_>], labels: &Labels) -> DefenseReport {
    let probabilities = mean_probabilities(members.iter().map(|m| m.probabilities.as_slice()));
    let class_id = argmax(&probabilities);
    let views = members.iter().map(|m| m.views).sum();
    let members = members
        .iter()
        .map(|m| {
            let class_id = argmax(&m.probabilities);
            MemberPrediction {
                model: m.model.to_string(),
                class_id,
                label: labels.name(class_id).to_string(),
                confidence: m.probabilities.get(class_id).copied().unwrap_or(0.0),
            }
        })
        .collect::<Vec<_>>();
    DefenseReport {
        name: "ensemble".into(),
        class_id: Some(class_id),
        label: Some(labels.name(class_id).to_string()),
        confidence: probabilities.get(class_id).copied().unwrap_or(0.0),
        abstained: false,
        views,
        details: DefenseDetails::Ensemble(EnsembleDetails { members }),
        probabilities,
    }
}
