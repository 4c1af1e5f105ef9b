//! Model cards: `models/<name>.toml` says where a model's file is, what input it
//! expects and where its weights came from. The server trusts nothing about a model
//! that its card does not state.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelCard {
    pub name: String,
    pub description: String,
    /// ONNX file, relative to the models folder.
    pub file: String,
    /// Hex sha256 of the ONNX file, checked at load.
    pub sha256: String,
    /// Class names, one per line in index order, relative to the models folder.
    pub labels: String,
    pub num_classes: usize,
    pub license: String,
    pub source_package: String,
    pub source_file: String,
    pub source_url: String,
    pub input: InputSpec,
    pub output: OutputSpec,
    #[serde(default)]
    pub accuracy: Option<Accuracy>,
    /// The int8 variant of this model (`[int8]`), loadable as `<name>-int8`.
    #[serde(default)]
    pub int8: Option<Int8Variant>,
}

/// Names ending in this are the int8 variant of the model named by the rest: their
/// card is the `[int8]` table of that model's card, never a file of their own.
pub const INT8_SUFFIX: &str = "-int8";

/// Whether a model is the float model of its card or the card's int8 variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Int8,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Int8 => "int8",
        })
    }
}

impl Precision {
    /// Read from the model's name: `<model>-int8` is an int8 variant.
    pub fn of_model(name: &str) -> Self {
        if name.ends_with(INT8_SUFFIX) { Precision::Int8 } else { Precision::Fp32 }
    }
}

/// `[int8]`: the same model quantized to int8 by `models/convert/quantize.py`
/// (static QDQ quantization). Input, output, labels and license are the card's.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Int8Variant {
    /// ONNX file, relative to the models folder.
    pub file: String,
    /// Hex sha256 of the ONNX file, checked at load like the fp32 file's.
    pub sha256: String,
    /// How it was quantized (method, calibration set, types).
    pub quantization: String,
    /// Fraction of the sample photos whose top-1 class equals the fp32 model's.
    #[serde(default)]
    pub top1_agreement: Option<f64>,
    #[serde(default)]
    pub accuracy: Option<Accuracy>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    pub name: String,
    pub width: u32,
    pub height: u32,
    /// Only "NCHW" is supported.
    pub layout: String,
    /// Only "RGB" is supported.
    pub color: String,
    /// Applied to [0,1] pixels: (x − mean) / std, per channel.
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub resize: ResizePolicy,
    /// For `shorter_side_center_crop`: the crop covers this fraction of the resized shorter side.
    #[serde(default = "one")]
    pub crop_fraction: f32,
    pub interpolation: Interpolation,
}

fn one() -> f32 {
    1.0
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResizePolicy {
    /// Resize the shorter side to size / crop_fraction, then take the centred size × size crop.
    ShorterSideCenterCrop,
    /// Resize to exactly size × size, ignoring the aspect ratio.
    Stretch,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    Nearest,
    Bilinear,
    Bicubic,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub name: String,
    pub kind: OutputKind,
}

/// What the graph's output row holds. The pipeline works on probabilities, so it
/// applies softmax to logits and takes probabilities as they are: a graph that already
/// ends in softmax must not be softmaxed twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// Unnormalized scores; the server applies softmax.
    Logits,
    /// Already a probability vector (the graph ends in softmax).
    Probabilities,
}

impl OutputKind {
    /// One output row as class probabilities.
    pub fn to_probabilities(self, row: &[f32]) -> Vec<f32> {
        match self {
            OutputKind::Logits => crate::prediction::softmax(row),
            OutputKind::Probabilities => row.to_vec(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Accuracy {
    pub dataset: String,
    pub images: usize,
    pub top1: f64,
    pub top5: f64,
    pub measured_with: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CardError {
    #[error("model card {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("model card {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl ModelCard {
    pub fn card_path(models_dir: &Path, name: &str) -> PathBuf {
        models_dir.join(format!("{name}.toml"))
    }

    /// Reads and checks `models_dir/<name>.toml`; for `<model>-int8`, the card of
    /// `<model>` turned into its int8 variant's card.
    pub fn load(models_dir: &Path, name: &str) -> Result<Self, CardError> {
        match name.strip_suffix(INT8_SUFFIX) {
            Some(float_name) => Self::load_file(models_dir, float_name)?.int8_variant(models_dir),
            None => Self::load_file(models_dir, name),
        }
    }

    fn load_file(models_dir: &Path, name: &str) -> Result<Self, CardError> {
        let path = Self::card_path(models_dir, name);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| CardError::Read { path: path.clone(), message: e.to_string() })?;
        let card: ModelCard =
            toml::from_str(&text).map_err(|e| CardError::Read { path: path.clone(), message: e.to_string() })?;
        card.check().map_err(|message| CardError::Invalid { path, message })?;
        Ok(card)
    }

    /// The card of `<name>-int8`: this model with the `[int8]` table's file, checksum
    /// and accuracy.
    fn int8_variant(self, models_dir: &Path) -> Result<Self, CardError> {
        let Some(int8) = self.int8.clone() else {
            return Err(CardError::Invalid {
                path: Self::card_path(models_dir, &self.name),
                message: format!(
                    "has no [int8] table, so there is no model {}{INT8_SUFFIX} (run models/convert/quantize.py \
                     and record its file and sha256 there)",
                    self.name
                ),
            });
        };
        Ok(ModelCard {
            name: format!("{}{INT8_SUFFIX}", self.name),
            description: format!("{} (int8: {})", self.description, int8.quantization),
            file: int8.file,
            sha256: int8.sha256,
            accuracy: int8.accuracy,
            int8: None,
            ..self
        })
    }

    pub fn precision(&self) -> Precision {
        Precision::of_model(&self.name)
    }

    fn check(&self) -> Result<(), String> {
        if self.name.ends_with(INT8_SUFFIX) {
            return Err(format!(
                "name {:?} ends in {INT8_SUFFIX:?}, which is kept for the [int8] variants of other cards",
                self.name
            ));
        }
        let input = &self.input;
        if input.layout != "NCHW" {
            return Err(format!("input.layout {:?} is not supported (only NCHW)", input.layout));
        }
        if input.color != "RGB" {
            return Err(format!("input.color {:?} is not supported (only RGB)", input.color));
        }
        if !(1..=4096).contains(&input.width) || !(1..=4096).contains(&input.height) {
            return Err("input.width and input.height must be between 1 and 4096".into());
        }
        if input.std.iter().any(|s| !s.is_finite() || *s <= 0.0) || input.mean.iter().any(|m| !m.is_finite()) {
            return Err("input.std must be positive and input.mean finite".into());
        }
        if !(0.05..=1.0).contains(&input.crop_fraction) {
            return Err("input.crop_fraction must be in [0.05, 1]".into());
        }
        if self.num_classes == 0 {
            return Err("num_classes must be positive".into());
        }
        Ok(())
    }

    /// Floats in one model input row: 3 × height × width.
    pub fn row_len(&self) -> usize {
        3 * self.input.width as usize * self.input.height as usize
    }
}
