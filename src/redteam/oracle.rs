//! Oracles: what an attack may query. `RawModel` is the undefended model in-process
//! (logits, batched through its engine).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::attack::Oracle;
use crate::imaging::ModelImage;
use crate::model::LoadedModel;

/// The raw model through its batching engine. Blocking: call from a plain thread
/// (or `spawn_blocking`), never from an async task.
pub struct RawModel {
    model: Arc<LoadedModel>,
    timeout: Duration,
    /// Images scored so far.
    pub queries: usize,
}

impl RawModel {
    pub fn new(model: Arc<LoadedModel>) -> Self {
        Self { model, timeout: Duration::from_secs(60), queries: 0 }
    }
}

impl Oracle for RawModel {
    fn scores(&mut self, images: &[ModelImage]) -> Result<Vec<Vec<f32>>, String> {
        let spec = &self.model.card.input;
        let mut rows = Vec::with_capacity(images.len() * self.model.card.row_len());
        for image in images {
            if (image.width, image.height) != (spec.width as usize, spec.height as usize) {
                return Err(format!(
                    "image is {}x{}, the model takes {}x{}",
                    image.width, image.height, spec.width, spec.height
                ));
            }
            image.push_normalized(spec, &mut rows);
        }
        let receiver =
            self.model.engine.submit(rows, images.len(), Instant::now() + self.timeout).map_err(|e| e.to_string())?;
        let output =
            receiver.blocking_recv().map_err(|_| "the engine stopped".to_string())?.map_err(|e| e.to_string())?;
        self.queries += images.len();
        Ok(output.outputs.chunks(self.model.card.num_classes).map(<[f32]>::to_vec).collect())
    }
}
