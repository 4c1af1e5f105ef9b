//! The production `BatchRunner`: an ONNX Runtime session for one model.

use std::path::Path;

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;

use super::BatchRunner;

/// How a session allocates: from an arena (the environment's shared one or its own) or
/// straight from the system allocator, and whether ONNX Runtime plans memory patterns
/// (`runtime.cpu_arena`, `runtime.shared_arena`, `runtime.memory_pattern`).
#[derive(Debug, Clone, Copy)]
pub struct SessionMemory {
    pub arena: bool,
    pub shared_arena: bool,
    pub pattern: bool,
}

pub struct OnnxRunner {
    session: Session,
    input_name: String,
    /// Channels, height, width of one row.
    chw: [usize; 3],
    output_len: usize,
}

impl OnnxRunner {
    /// Builds a session that uses the environment's global thread pool, and checks
    /// that the graph has the input and output the model card promises.
    pub fn load(
        environment: &Environment,
        path: &Path,
        input_name: &str,
        chw: [usize; 3],
        output_len: usize,
        memory: SessionMemory,
    ) -> Result<Self, String> {
        let session = Session::builder(environment)
            .and_then(|b| b.with_optimization_level(GraphOptimizationLevel::All).map_err(Into::into))
            .and_then(|b| b.with_memory_pattern(memory.pattern).map_err(Into::into))
            .and_then(|b| match (memory.arena, memory.shared_arena) {
                (false, _) => b
                    .with_execution_providers([ort::ep::CPU::default().with_arena_allocator(false).build()])
                    .map_err(Into::into),
                (true, true) => b.with_env_allocators().map_err(Into::into),
                (true, false) => Ok(b),
            })
            .and_then(|mut b| b.commit_from_file(path))
            .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
        let Some(input) = session.inputs().first() else {
            return Err(format!("{} has no inputs", path.display()));
        };
        if input.name() != input_name {
            return Err(format!(
                "{}: the graph's input is {:?}, the model card says {input_name:?}",
                path.display(),
                input.name()
            ));
        }
        if let Some(shape) = input.dtype().tensor_shape() {
            let expected = [-1, chw[0] as i64, chw[1] as i64, chw[2] as i64];
            let fits = shape.len() == 4 && shape.iter().zip(expected).all(|(got, want)| *got == want || *got < 0);
            if !fits {
                return Err(format!(
                    "{}: input shape {shape:?} does not match the card's {expected:?}",
                    path.display()
                ));
            }
        }
        if session.outputs().is_empty() {
            return Err(format!("{} has no outputs", path.display()));
        }
        Ok(Self { session, input_name: input_name.to_string(), chw, output_len })
    }
}

impl BatchRunner for OnnxRunner {
    fn run(&mut self, input: &[f32], rows: usize) -> Result<Vec<f32>, String> {
        let [c, h, w] = self.chw;
        let tensor = TensorRef::from_array_view(([rows, c, h, w], input)).map_err(|e| e.to_string())?;
        let outputs = self.session.run(ort::inputs![self.input_name.as_str() => tensor]).map_err(|e| e.to_string())?;
        let (shape, data) = outputs[0].try_extract_tensor::<f32>().map_err(|e| e.to_string())?;
        if data.len() != rows * self.output_len {
            return Err(format!("output shape {shape:?}, expected [{rows}, {}]", self.output_len));
        }
        // Outputs borrow the session; copy them out before the next run.
        Ok(data.to_vec())
    }
}
