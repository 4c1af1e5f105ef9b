//! `ensemble`: the image through several models ("sampling the classifier space"
//! instead of, or besides, the image space): each member classifies its plain view
//! and noisy views at its own input size. A perturbation crafted against one model at
//! one resolution rarely fools differently sized models that see it resampled.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa::openapi::{RefOr, Schema};

use super::settings::within;
use super::smooth::NoiseLevel;
use super::{
    Defense, DefenseError, DefenseLimits, DefenseOutcome, DefenseRun, DefenseSettings, Outputs, Request, RowRange,
    SettingsError, Source, Views, mean_probabilities,
};
use crate::model::{Labels, LoadedModel};
use crate::prediction::argmax;

pub struct Ensemble;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnsembleDetails {
    pub members: Vec<MemberPrediction>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MemberPrediction {
    pub model: String,
    pub class_id: usize,
    pub label: String,
    pub confidence: f32,
}

/// Noise stream of member `index` (the raw model, when a member, is 0): rows numbered
/// from (index + 1) << 44, never shared with smoothing's stream (which starts at 0).
fn member_stream(index: usize) -> u64 {
    ((index as u64) + 1) << 44
}

impl Defense for Ensemble {
    fn name(&self) -> &'static str {
        "ensemble"
    }

    fn parameters(&self) -> &'static [&'static str] {
        &["models", "ensemble_samples", "sigma"]
    }

    fn row_parameter(&self) -> Option<&'static str> {
        Some("ensemble_samples")
    }

    fn check(&self, s: &DefenseSettings, l: &DefenseLimits) -> Result<(), SettingsError> {
        within(s.sigma > 0.0 && s.sigma <= l.max_sigma, "sigma", || format!("(0, {}]", l.max_sigma))?;
        within(s.ensemble_samples <= l.max_samples, "ensemble_samples", || format!("[0, {}]", l.max_samples))
    }

    fn start(&self, request: &Request<'_>) -> Result<Box<dyn DefenseRun>, DefenseError> {
        let settings = request.settings;
        let names = settings.ensemble_members(request.registry.names());
        if names.is_empty() {
            return Err(DefenseError::NoMembers {
                precision: settings.precision,
                loaded: request.registry.names().map(str::to_string).collect(),
            });
        }
        let raw = request.raw;
        // The raw model first when it is a member (its noise stream is 0), then the
        // others in the order named.
        let mut members = Vec::new();
        if names.contains(&raw.card.name) {
            members.push((Arc::clone(raw), member_stream(0)));
        }
        for (index, name) in names.iter().filter(|n| **n != raw.card.name).enumerate() {
            let model = request.registry.get(name).ok_or_else(|| DefenseError::UnknownModel {
                parameter: "models",
                name: name.clone(),
                known: request.registry.names().map(str::to_string).collect(),
            })?;
            if model.card.num_classes != raw.card.num_classes || model.card.labels != raw.card.labels {
                return Err(DefenseError::IncompatibleModel {
                    parameter: "models",
                    name: name.clone(),
                    raw: raw.card.name.clone(),
                });
            }
            members.push((Arc::clone(model), member_stream(index + 1)));
        }
        let noise = NoiseLevel::of(settings);
        Ok(Box::new(EnsembleRun {
            members: members
                .into_iter()
                .map(|(model, stream)| Member { model, stream, plain: None, noisy: None, probabilities: Vec::new() })
                .collect(),
            samples: settings.ensemble_samples as usize,
            noise,
            labels: request.labels().clone(),
            done: false,
        }))
    }

    fn details_schemas(&self) -> Vec<(String, RefOr<Schema>)> {
        super::schemas_of::<EnsembleDetails>()
    }
}

struct Member {
    model: Arc<LoadedModel>,
    stream: u64,
    plain: Option<RowRange>,
    noisy: Option<RowRange>,
    /// Mean over its plain and noisy views.
    probabilities: Vec<f32>,
}

impl Member {
    fn views(&self) -> usize {
        self.plain.map_or(0, |r| r.len()) + self.noisy.map_or(0, |r| r.len())
    }
}

struct EnsembleRun {
    members: Vec<Member>,
    samples: usize,
    noise: NoiseLevel,
    labels: Labels,
    done: bool,
}

impl DefenseRun for EnsembleRun {
    fn models(&self) -> Vec<Arc<LoadedModel>> {
        self.members.iter().map(|m| Arc::clone(&m.model)).collect()
    }

    fn plain_models(&self) -> Vec<Arc<LoadedModel>> {
        self.models()
    }

    fn next_rows(&self) -> Vec<(Arc<LoadedModel>, usize)> {
        if self.done || self.samples == 0 {
            return Vec::new();
        }
        self.members.iter().map(|m| (Arc::clone(&m.model), self.samples)).collect()
    }

    fn views(&mut self, source: &Source, views: &mut Views) -> Result<(), DefenseError> {
        for member in &mut self.members {
            member.plain = Some(views.plain(source, &member.model)?);
            if self.samples > 0 {
                member.noisy =
                    Some(views.push_noise(source, &member.model, self.noise, member.stream, self.samples)?);
            }
        }
        Ok(())
    }

    fn observe(&mut self, outputs: &Outputs) {
        for member in &mut self.members {
            let plain = member.plain.map_or(&[][..], |r| outputs.row(r));
            let noisy = member.noisy.map_or(&[][..], |r| outputs.rows(r));
            let rows = std::iter::once(plain).filter(|p| !p.is_empty()).chain(noisy.iter().map(Vec::as_slice));
            member.probabilities = mean_probabilities(rows);
        }
        self.done = true;
    }

    fn finish(self: Box<Self>) -> DefenseOutcome {
        let probabilities = mean_probabilities(self.members.iter().map(|m| m.probabilities.as_slice()));
        let views = self.members.iter().map(Member::views).sum();
        let members = self
            .members
            .iter()
            .map(|m| {
                let class_id = argmax(&m.probabilities);
                MemberPrediction {
                    model: m.model.card.name.clone(),
                    class_id,
                    label: self.labels.name(class_id).to_string(),
                    confidence: m.probabilities.get(class_id).copied().unwrap_or(0.0),
                }
            })
            .collect();
        DefenseOutcome::from_probabilities("ensemble", probabilities, views, &EnsembleDetails { members })
    }
}
