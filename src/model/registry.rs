//! Loading the configured models: card → labels → checksum → ONNX session on its
//! own engine thread → warm-up. A model that fails any step stops the start-up with
//! a message naming the file and the fix.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::card::CardError;
use super::labels::LabelsError;
use super::{Labels, ModelCard};
use crate::config::Config;
use crate::engine::{Engine, EngineOptions, OnnxRunner, RunGate, SessionMemory};
use crate::runtime::{self, RuntimeError};

/// Why a model could not be loaded. Each message names the model, the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Card(#[from] CardError),
    #[error(transparent)]
    Labels(#[from] LabelsError),
    #[error("model {model}: file {} is missing; run `make models` (or `make setup`) to convert it", path.display())]
    Missing { model: String, path: PathBuf },
    #[error("model {model}: {}: {source}", path.display())]
    Unreadable { model: String, path: PathBuf, source: std::io::Error },
    #[error(
        "model {model}: {} has sha256 {found}, its card says {expected}; the file is corrupt or stale \
         (re-run `make models`)",
        path.display()
    )]
    Checksum { model: String, path: PathBuf, found: String, expected: String },
    /// The session could not be built or warmed up (ONNX Runtime's message).
    #[error("model {model}: {message}")]
    Engine { model: String, message: String },
    #[error("model {0} is not in models.load")]
    NotConfigured(String),
}

pub struct LoadedModel {
    pub card: ModelCard,
    pub labels: Labels,
    pub engine: Engine,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel").field("name", &self.card.name).finish_non_exhaustive()
    }
}

pub struct ModelRegistry {
    models: BTreeMap<String, Arc<LoadedModel>>,
    default: String,
}

impl ModelRegistry {
    /// Loads every model in `config.models.load`. Blocking (seconds): call it from a
    /// blocking thread.
    pub fn load(config: &Config) -> Result<Self, LoadError> {
        Self::load_only(config, &config.models.load)
    }

    /// Loads just `names` (the offline CLI needs one model, not all of them).
    pub fn load_only(config: &Config, names: &[String]) -> Result<Self, LoadError> {
        let environment = runtime::environment(&config.runtime)?;
        let gate =
            Arc::new(RunGate::with_small_runs(config.runtime.max_concurrent_runs, config.runtime.small_run_rows));
        let mut models = BTreeMap::new();
        for name in names {
            let started = Instant::now();
            let model = load_model(config, environment, name, Arc::clone(&gate))?;
            tracing::info!(model = %name, elapsed_ms = started.elapsed().as_millis() as u64, "model ready");
            models.insert(name.clone(), Arc::new(model));
        }
        let default = if names.contains(&config.models.default) {
            config.models.default.clone()
        } else {
            names.first().cloned().ok_or_else(|| LoadError::NotConfigured("(none)".into()))?
        };
        Ok(Self { models, default })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<LoadedModel>> {
        self.models.get(name)
    }

    pub fn default_name(&self) -> &str {
        &self.default
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.models.keys().map(String::as_str)
    }

    pub fn models(&self) -> impl Iterator<Item = &Arc<LoadedModel>> {
        self.models.values()
    }

    /// Every engine thread is still running.
    pub fn all_alive(&self) -> bool {
        self.models.values().all(|m| m.engine.is_alive())
    }

    pub fn close(&self) {
        for model in self.models.values() {
            model.engine.close();
        }
    }
}

fn load_model(
    config: &Config,
    environment: &'static ort::environment::Environment,
    name: &str,
    gate: Arc<RunGate>,
) -> Result<LoadedModel, LoadError> {
    let dir = &config.models.dir;
    let card = ModelCard::load(dir, name)?;
    let labels = Labels::load(&dir.join(&card.labels), card.num_classes)?;
    let path = dir.join(&card.file);
    if !path.is_file() {
        return Err(LoadError::Missing { model: name.to_string(), path });
    }
    if config.models.verify_sha256 {
        let digest = sha256_file(&path).map_err(|source| LoadError::Unreadable {
            model: name.to_string(),
            path: path.clone(),
            source,
        })?;
        if !digest.eq_ignore_ascii_case(&card.sha256) {
            return Err(LoadError::Checksum { model: name.to_string(), path, found: digest, expected: card.sha256 });
        }
    }
    let engine_config = &config.engine;
    let options = EngineOptions {
        name: name.to_string(),
        row_len: card.row_len(),
        output_len: card.num_classes,
        max_batch_rows: engine_config.max_batch_rows,
        max_wait: Duration::from_millis(engine_config.max_wait_ms),
        capacity_rows: engine_config.queue_capacity_rows,
        max_rows_per_request: engine_config.max_rows_per_request,
        warmup: engine_config.warmup,
        gate,
    };
    let input_name = card.input.name.clone();
    let chw = [3, card.input.height as usize, card.input.width as usize];
    let output_len = card.num_classes;
    let memory = SessionMemory {
        arena: config.runtime.cpu_arena,
        shared_arena: config.runtime.shared_arena,
        pattern: config.runtime.memory_pattern,
    };
    let engine =
        Engine::start(options, move || OnnxRunner::load(environment, &path, &input_name, chw, output_len, memory))
            .map_err(|e| LoadError::Engine { model: name.to_string(), message: e.to_string() })?;
    Ok(LoadedModel { card, labels, engine })
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
