//! Exact gradients of the served ONNX graphs, from `models/gradients/server.py` (an
//! evaluator of the same ONNX files in JAX, reverse-mode autodiff), spoken to over its
//! stdin/stdout frame protocol (models/gradients/README.md, "Protocol").
//!
//! Why a child process: ONNX Runtime has no gradients for these graphs, and no Rust
//! autodiff library ran the depthwise convolutions fast enough (the README measures
//! candle at 40–200× slower). Inputs and gradients are the *normalized* model input
//! tensors, NCHW, exactly what ONNX Runtime is given.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde_json::{Value, json};

use super::AttackError;

/// One model the server was started with, as its `ready` frame describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct GradientModel {
    pub name: String,
    /// Values per input row (3·H·W).
    pub row_len: usize,
    pub classes: usize,
}

/// Forward passes and input gradients of ONNX models, one request at a time.
pub trait Gradients {
    /// Logits of `rows` input rows, and a handle to the saved pass for [`Gradients::backward`].
    fn forward(&mut self, model: &str, input: &[f32], rows: usize) -> Result<(u64, Vec<f32>), AttackError>;
    /// ∂⟨cotangent, logits⟩/∂input of a saved pass (which is then freed).
    fn backward(&mut self, handle: u64, cotangent: &[f32]) -> Result<Vec<f32>, AttackError>;
}

/// The running gradient server. Dropping it closes its stdin (it exits on EOF).
pub struct GradientServer {
    child: Child,
    /// `None` once closed (on drop).
    input: Option<BufWriter<ChildStdin>>,
    output: BufReader<ChildStdout>,
    pub models: Vec<GradientModel>,
}

/// How to start the gradient server.
#[derive(Debug, Clone)]
pub struct GradientServerOptions {
    /// The Python with jax installed (`.venv/bin/python`).
    pub python: PathBuf,
    /// `models/gradients/server.py`.
    pub script: PathBuf,
    /// (name, ONNX file) of every model to differentiate.
    pub models: Vec<(String, PathBuf)>,
    /// Row counts to compile before `ready` (the server pads to powers of two).
    pub warmup: Vec<usize>,
    /// JAX's persistent compilation cache (restarts compile faster).
    pub cache_dir: Option<PathBuf>,
}

impl GradientServerOptions {
    /// The project's layout: `.venv/bin/python` and `models/gradients/server.py` under `root`.
    pub fn in_project(root: &Path, models: Vec<(String, PathBuf)>) -> Self {
        Self {
            python: root.join(".venv/bin/python"),
            script: root.join("models/gradients/server.py"),
            models,
            warmup: Vec::new(),
            cache_dir: Some(root.join("target/jax-cache")),
        }
    }
}

fn failed(message: impl Into<String>) -> AttackError {
    AttackError::Gradient(message.into())
}

impl GradientServer {
    /// Starts the server and waits for its `ready` frame (seconds; longer with warm-up).
    pub fn start(options: &GradientServerOptions) -> Result<Self, AttackError> {
        let mut command = Command::new(&options.python);
        command.arg(&options.script);
        for (name, path) in &options.models {
            command.arg("--model").arg(format!("{name}={}", path.display()));
        }
        if !options.warmup.is_empty() {
            let list: Vec<String> = options.warmup.iter().map(usize::to_string).collect();
            command.arg("--warmup").arg(list.join(","));
        }
        if let Some(dir) = &options.cache_dir {
            command.arg("--cache-dir").arg(dir);
        }
        let mut child =
            command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().map_err(|e| {
                failed(format!("cannot start {} {}: {e}", options.python.display(), options.script.display()))
            })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(failed("the gradient server has no pipes"));
        };
        let mut server = GradientServer {
            child,
            input: Some(BufWriter::new(stdin)),
            output: BufReader::new(stdout),
            models: Vec::new(),
        };
        let (ready, _) = server.read_frame()?;
        let models = ready.get("models").and_then(Value::as_array).cloned().unwrap_or_default();
        for model in models {
            let name = model.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
            let shape: Vec<usize> = model
                .get("input")
                .and_then(Value::as_array)
                .map(|dims| dims.iter().filter_map(Value::as_u64).map(|d| d as usize).collect())
                .unwrap_or_default();
            let classes = model.get("classes").and_then(Value::as_u64).unwrap_or(0) as usize;
            server.models.push(GradientModel { name, row_len: shape.iter().product(), classes });
        }
        Ok(server)
    }

    fn model(&self, name: &str) -> Result<&GradientModel, AttackError> {
        self.models.iter().find(|m| m.name == name).ok_or_else(|| failed(format!("no gradients for model {name}")))
    }

    fn write_frame(&mut self, header: &Value, payload: &[f32]) -> Result<(), AttackError> {
        let header = serde_json::to_vec(header).map_err(|e| failed(e.to_string()))?;
        let io = |e: std::io::Error| failed(format!("writing to the gradient server: {e}"));
        let input = self.input.as_mut().ok_or_else(|| failed("the gradient server is closed"))?;
        let mut bytes = Vec::with_capacity(header.len() + 12 + payload.len() * 4);
        bytes.extend_from_slice(&(header.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&((payload.len() * 4) as u64).to_le_bytes());
        for value in payload {
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        input.write_all(&bytes).map_err(io)?;
        input.flush().map_err(io)
    }
    /// Reads one frame; an `ok: false` header becomes an error with the server's message.
    fn read_frame(&mut self) -> Result<(Value, Vec<f32>), AttackError> {
        let io = |e: std::io::Error| failed(format!("reading from the gradient server: {e}"));
        let mut len4 = [0u8; 4];
        self.output.read_exact(&mut len4).map_err(io)?;
        let mut header = vec![0u8; u32::from_le_bytes(len4) as usize];
        self.output.read_exact(&mut header).map_err(io)?;
        let mut len8 = [0u8; 8];
        self.output.read_exact(&mut len8).map_err(io)?;
        let bytes = u64::from_le_bytes(len8) as usize;
        let mut payload = vec![0u8; bytes];
        self.output.read_exact(&mut payload).map_err(io)?;
        let header: Value = serde_json::from_slice(&header).map_err(|e| failed(format!("bad header: {e}")))?;
        if header.get("ok").and_then(Value::as_bool) != Some(true) {
            let message = header.get("error").and_then(Value::as_str).unwrap_or("no message");
            return Err(failed(format!("gradient server: {message}")));
        }
        let floats = payload.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        Ok((header, floats))
    }
}

impl Gradients for GradientServer {
    fn forward(&mut self, model: &str, input: &[f32], rows: usize) -> Result<(u64, Vec<f32>), AttackError> {
        let spec = self.model(model)?.clone();
        if rows == 0 || input.len() != rows * spec.row_len {
            return Err(failed(format!("{} values are not {rows} rows of {}", input.len(), spec.row_len)));
        }
        self.write_frame(&json!({"op": "forward", "model": model, "rows": rows}), input)?;
        let (header, logits) = self.read_frame()?;
        let handle = header.get("handle").and_then(Value::as_u64).ok_or_else(|| failed("no handle in the answer"))?;
        if logits.len() != rows * spec.classes {
            return Err(failed(format!("{} logits for {rows} rows", logits.len())));
        }
        Ok((handle, logits))
    }

    fn backward(&mut self, handle: u64, cotangent: &[f32]) -> Result<Vec<f32>, AttackError> {
        self.write_frame(&json!({"op": "backward", "handle": handle}), cotangent)?;
        Ok(self.read_frame()?.1)
    }
}

impl Drop for GradientServer {
    fn drop(&mut self) {
        // EOF on stdin ends the server; wait for it so no zombie is left.
        drop(self.input.take());
        let _ = self.child.wait();
    }
}
