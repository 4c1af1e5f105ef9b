//! `make bench`: in-process throughput of the full Rust path (decode + preprocess +
//! batched inference) at batch 1, 8 and 32 on EfficientNet-Lite0, beside Python
//! onnxruntime's inference alone on the same model, threads and batch, in the same
//! run. Medians over repeated runs; the ratio is the figure to quote.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use image::RgbImage;
use pandaguard::config::Config;
use pandaguard::imaging::{DecodeLimits, ModelImage, decode, fit_to_input};
use pandaguard::model::ModelRegistry;
use pandaguard::runtime;

const MODEL: &str = "efficientnet-lite0";
const ROUNDS: usize = 5;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // PANDAGUARD_* environment overrides apply (e.g. PANDAGUARD_RUNTIME__SPIN=true).
    let mut config = Config::load(None, &Default::default()).expect("config");
    config.models.dir = root.join("models");
    config.models.load = vec![MODEL.into()];
    config.models.default = MODEL.into();
    let threads = runtime::intra_op_threads(&config.runtime);

    let registry = ModelRegistry::load(&config).expect("load the model (run `make setup` first)");
    let model = registry.get(MODEL).expect("model");
    let spec = model.card.input.clone();
    let limits = DecodeLimits::from(&config.image);
    let jpegs = sample_jpegs(&root, spec.width, 32);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");

    println!(
        "model {MODEL}, {threads} ORT threads, {}x{} JPEG inputs (quality 90), {ROUNDS} alternating rounds",
        spec.width, spec.height
    );
    println!(
        "{:>5} {:>11} {:>8} {:>7} {:>9} {:>13} {:>9} {:>13} {:>7}",
        "batch", "latency ms", "decode", "prep", "infer", "pipelined ms", "images/s", "python infer", "ratio"
    );
    let prepare = |offset: usize, batch: usize| -> (Vec<f32>, Duration, Duration) {
        let mut input = Vec::with_capacity(batch * spec.width as usize * spec.height as usize * 3);
        let (mut decoding, mut preprocessing) = (Duration::ZERO, Duration::ZERO);
        for jpeg in jpegs.iter().cycle().skip(offset).take(batch) {
            let t0 = Instant::now();
            let image = decode(jpeg, &limits).expect("decode");
            let t1 = Instant::now();
            let fitted = fit_to_input(&image, &spec).expect("resize");
            ModelImage::from_rgb(&fitted).push_normalized(&spec, &mut input);
            decoding += t1 - t0;
            preprocessing += t1.elapsed();
        }
        (input, decoding, preprocessing)
    };
    let infer = |input: Vec<f32>, batch: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        runtime.block_on(model.engine.infer(input, batch, deadline)).expect("inference");
    };
    for (batch, iterations) in [(1usize, 40usize), (8, 12), (32, 6)] {
        let (mut latency, mut decode_times, mut prep_times, mut infer_times) = (vec![], vec![], vec![], vec![]);
        let (mut pipelined, mut python) = (vec![], vec![]);
        infer(prepare(0, batch).0, batch); // warm-up at this batch size
        for _round in 0..ROUNDS {
            // Latency: one batch start to finish, decode then inference.
            for iteration in 0..iterations {
                let started = Instant::now();
                let (input, decoding, preprocessing) = prepare(iteration, batch);
                let t = Instant::now();
                infer(input, batch);
                infer_times.push(t.elapsed());
                latency.push(started.elapsed());
                decode_times.push(decoding);
                prep_times.push(preprocessing);
            }
            // Throughput: the next batch is decoded on another thread while this one
            // runs, as the server's blocking pool does for concurrent requests.
            let started = Instant::now();
            std::thread::scope(|scope| {
                let (sender, receiver) = std::sync::mpsc::sync_channel::<Vec<f32>>(1);
                scope.spawn(move || {
                    for iteration in 0..iterations {
                        if sender.send(prepare(iteration, batch).0).is_err() {
                            break;
                        }
                    }
                });
                for input in receiver {
                    infer(input, batch);
                }
            });
            pipelined.push(started.elapsed() / iterations as u32);
            python.push(python_inference_ms(&root, batch, threads, iterations));
        }
        let python = median(python);
        let pipelined_ms = median_ms(&pipelined);
        println!(
            "{:>5} {:>11.2} {:>8.2} {:>7.2} {:>9.2} {:>13.2} {:>9.1} {:>13.2} {:>7.3}",
            batch,
            median_ms(&latency),
            median_ms(&decode_times),
            median_ms(&prep_times),
            median_ms(&infer_times),
            pipelined_ms,
            batch as f64 * 1000.0 / pipelined_ms,
            python,
            pipelined_ms / python
        );
    }
    println!("latency: decode + preprocess + inference of one batch, one after the other (medians)");
    println!(
        "ratio = pipelined Rust ms per batch (decode + preprocess + inference) / Python onnxruntime inference alone"
    );
    println!("        (same model, threads and batch; target at batch 32: <= 1.10)");
    registry.close();
}

/// The labelled sample photos brought to `size`×`size` and re-encoded as JPEG.
fn sample_jpegs(root: &Path, size: u32, count: usize) -> Vec<Vec<u8>> {
    let dir = root.join("testdata/imagenet");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("testdata/imagenet (run `make setup`)")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    files.sort();
    files
        .iter()
        .cycle()
        .take(count)
        .map(|path| {
            let image = image::open(path).expect("photo").to_rgb8();
            let small: RgbImage = image::imageops::resize(&image, size, size, image::imageops::FilterType::Triangle);
            let mut out = Cursor::new(Vec::new());
            let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90);
            small.write_with_encoder(encoder).expect("encode");
            out.into_inner()
        })
        .collect()
}

fn python_inference_ms(root: &Path, batch: usize, threads: usize, iterations: usize) -> f64 {
    let output = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("models/convert/reference.py"))
        .args(["bench", "--model"])
        .arg(root.join(format!("models/{MODEL}.onnx")))
        .args(["--batch", &batch.to_string(), "--threads", &threads.to_string(), "--iters", &iterations.to_string()])
        .output()
        .expect("run reference.py bench");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("bench JSON");
    json["median_ms"].as_f64().expect("median_ms")
}

fn median_ms(times: &[Duration]) -> f64 {
    median(times.iter().map(|d| d.as_secs_f64() * 1e3).collect())
}

fn median(mut ms: Vec<f64>) -> f64 {
    ms.sort_by(f64::total_cmp);
    let mid = ms.len() / 2;
    if ms.len() % 2 == 0 { (ms[mid - 1] + ms[mid]) / 2.0 } else { ms[mid] }
}
