//! ONNX Runtime time per model row, fp32 beside int8, for each EfficientNet-Lite, at
//! batch 1 and 32, through the server's engine (the same sessions, threads and arena
//! settings as `pandaguard serve`). The two precisions of a model alternate round by
//! round, so load from elsewhere on the machine hits both; the ratio is the figure to
//! quote. Inputs are the sample photos, preprocessed like a request's plain view.
//!
//! `cargo bench --locked --bench int8` (after `make setup`; PANDAGUARD_* overrides apply).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pandaguard::config::Config;
use pandaguard::imaging::{DecodeLimits, ModelImage, decode, fit_to_input};
use pandaguard::model::{INT8_SUFFIX, LoadedModel, ModelRegistry};
use pandaguard::runtime;

const MODELS: [&str; 3] = ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"];
const ROUNDS: usize = 5;
/// (batch, runs per round): about the same rows per round at every batch size.
const BATCHES: [(usize, usize); 2] = [(1, 24), (32, 2)];

fn main() {
    // `cargo test --all-targets` runs bench targets without `--bench`: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("int8: run with `cargo bench --bench int8`");
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut config = Config::load(None, &Default::default()).expect("config");
    config.models.dir = root.join("models");
    config.models.load = MODELS.iter().flat_map(|m| [m.to_string(), format!("{m}{INT8_SUFFIX}")]).collect();
    config.models.default = MODELS[0].into();
    let threads = runtime::intra_op_threads(&config.runtime);
    let registry = ModelRegistry::load(&config).expect("load the models (run `make setup` first)");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let photos: Vec<Vec<u8>> = std::fs::read_dir(root.join("testdata/imagenet"))
        .expect("testdata/imagenet (make setup)")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "jpg"))
        .map(|path| std::fs::read(path).expect("photo"))
        .collect();
    let limits = DecodeLimits::from(&config.image);

    println!("ORT ms per row through the engine, {threads} intra-op threads, median of {ROUNDS} alternating rounds");
    println!("| model | batch | fp32 ms/row | int8 ms/row | **speed-up** |");
    println!("|---|--:|--:|--:|--:|");
    for name in MODELS {
        let fp32 = registry.get(name).expect("fp32 model");
        let int8 = registry.get(&format!("{name}{INT8_SUFFIX}")).expect("int8 model");
        let spec = &fp32.card.input;
        let mut rows = Vec::new();
        for photo in photos.iter().cycle().take(32) {
            let image = decode(photo, &limits).expect("decode");
            let mut row = Vec::new();
            ModelImage::from_rgb(&fit_to_input(&image, spec).expect("resize")).push_normalized(spec, &mut row);
            rows.push(row);
        }
        for (batch, runs) in BATCHES {
            let input: Vec<f32> = rows.iter().take(batch).flatten().copied().collect();
            let per_row = |model: &LoadedModel| {
                let started = Instant::now();
                for _ in 0..runs {
                    let deadline = Instant::now() + Duration::from_secs(120);
                    runtime.block_on(model.engine.infer(input.clone(), batch, deadline)).expect("inference");
                }
                started.elapsed().as_secs_f64() * 1000.0 / (runs * batch) as f64
            };
            per_row(fp32); // warm-up at this batch size
            per_row(int8);
            let (mut fp32_ms, mut int8_ms) = (Vec::new(), Vec::new());
            for round in 0..ROUNDS {
                if round % 2 == 0 {
                    fp32_ms.push(per_row(fp32));
                    int8_ms.push(per_row(int8));
                } else {
                    int8_ms.push(per_row(int8));
                    fp32_ms.push(per_row(fp32));
                }
            }
            let (fp32_ms, int8_ms) = (median(fp32_ms), median(int8_ms));
            println!("| {name} | {batch} | {fp32_ms:.2} | {int8_ms:.2} | **{:.2}x** |", fp32_ms / int8_ms);
        }
    }
    registry.close();
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
