//! The extension point, exercised: a defense written here (JPEG recompression: one
//! type implementing `Defense`, one implementing `DefenseRun`) and registered with one
//! line (`Defenses::standard().with(...)`) is planned, batched, answered and combined
//! by the pipeline like the shipped ones. docs/architecture.md "Adding a defense"
//! lists the same two places for a defense in `src/defense/`.

mod common;

use std::io::Cursor;
use std::sync::Arc;
use std::time::Instant;

use common::{photo, test_config};
use pandaguard::defense::{
    Defense, DefenseError, DefenseLimits, DefenseOutcome, DefenseRun, DefenseSettings, Defenses, Outputs, Request,
    RowRange, SettingsError, Source, Views, schemas_of,
};
use pandaguard::http::answer::classify_response;
use pandaguard::imaging::ModelImage;
use pandaguard::model::{LoadedModel, ModelRegistry};
use pandaguard::params::ParamProblem;
use pandaguard::pipeline::Pipeline;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa::openapi::{RefOr, Schema};

const QUALITY: u8 = 60;

/// JPEG recompression (Das et al. 2017, "Keeping the Bad Guys Out"): the raw model on
/// the model-input image encoded as a JPEG of quality 60 and decoded again.
struct JpegRecompression;

#[derive(Serialize, Deserialize, ToSchema)]
struct JpegDetails {
    quality: u8,
}

impl Defense for JpegRecompression {
    fn name(&self) -> &'static str {
        "jpeg"
    }

    fn parameters(&self) -> &'static [&'static str] {
        &[]
    }

    fn check(&self, _: &DefenseSettings, _: &DefenseLimits) -> Result<(), SettingsError> {
        Ok(())
    }

    fn start(&self, request: &Request<'_>) -> Result<Box<dyn DefenseRun>, DefenseError> {
        Ok(Box::new(JpegRun { model: Arc::clone(request.raw), rows: None, probabilities: None }))
    }

    fn details_schemas(&self) -> Vec<(String, RefOr<Schema>)> {
        schemas_of::<JpegDetails>()
    }
}

struct JpegRun {
    model: Arc<LoadedModel>,
    rows: Option<RowRange>,
    probabilities: Option<Vec<f32>>,
}

impl DefenseRun for JpegRun {
    fn models(&self) -> Vec<Arc<LoadedModel>> {
        vec![Arc::clone(&self.model)]
    }

    fn next_rows(&self) -> Vec<(Arc<LoadedModel>, usize)> {
        if self.probabilities.is_some() { Vec::new() } else { vec![(Arc::clone(&self.model), 1)] }
    }

    fn views(&mut self, source: &Source, views: &mut Views) -> Result<(), DefenseError> {
        let base = source.base(&self.model)?;
        let mut jpeg = Cursor::new(Vec::new());
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, QUALITY)
            .encode_image(&base.to_rgb())
            .map_err(|e| DefenseError::Unplanned(e.to_string()))?;
        let decoded = image::load_from_memory(jpeg.get_ref()).map_err(|e| DefenseError::Unplanned(e.to_string()))?;
        self.rows = Some(views.push(&self.model, &[ModelImage::from_rgb(&decoded.to_rgb8())]));
        Ok(())
    }

    fn observe(&mut self, outputs: &Outputs) {
        self.probabilities = self.rows.map(|r| outputs.row(r).to_vec());
    }

    fn finish(self: Box<Self>) -> DefenseOutcome {
        let probabilities = self.probabilities.unwrap_or_default();
        DefenseOutcome::from_probabilities("jpeg", probabilities, 1, &JpegDetails { quality: QUALITY })
    }
}

#[tokio::test]
async fn a_defense_registered_with_one_line_runs_like_the_shipped_ones() {
    let config = Arc::new(test_config(&["efficientnet-lite0"]));
    let registry = Arc::new(ModelRegistry::load(&config).unwrap());
    let standard = Pipeline::new(Arc::clone(&config), Arc::clone(&registry));
    let error = standard.params([("defense", "jpeg")]).unwrap_err();
    assert!(matches!(error.problem, ParamProblem::UnknownDefense { .. }), "{error}");

    // The registration line.
    let defenses = Defenses::standard().with(JpegRecompression);
    let pipeline = Pipeline::with_defenses(Arc::clone(&config), Arc::clone(&registry), defenses);
    let (image, class) = photo("imagenet_05_853.jpg");

    let params = pipeline.params([("defense", "jpeg")]).unwrap();
    let outcome = pipeline.classify(image.clone().into(), &params, Instant::now()).await.unwrap();
    assert_eq!(outcome.defenses.len(), 1);
    let jpeg = &outcome.defenses[0];
    assert_eq!((jpeg.name, jpeg.views, outcome.cost.rows), ("jpeg", 1, 2), "the raw view and the JPEG view");
    assert_eq!(jpeg.class_id, Some(class), "a clean photo survives recompression");
    assert_eq!(outcome.defended.class_id, Some(class));
    assert_eq!(outcome.defended.method, "mean of jpeg");

    // Beside a shipped defense, in one submission per model; its details reach the JSON.
    let params = pipeline.params([("defense", "jpeg,ensemble"), ("seed", "3")]).unwrap();
    let outcome = pipeline.classify(image.into(), &params, Instant::now()).await.unwrap();
    let names: Vec<&str> = outcome.defenses.iter().map(|d| d.name).collect();
    assert_eq!(names, ["jpeg", "ensemble"]);
    assert_eq!(outcome.cost.batches, [("efficientnet-lite0".to_string(), 2 + 16)], "one batch: raw, jpeg, noisy views");
    let answer = classify_response(&outcome, "test".into(), 3);
    assert_eq!(answer.defenses[0].details.get(), format!("{{\"quality\":{QUALITY}}}"));
    registry.close();
}
