//! The bundled models: the converter reproduces the files the cards describe, the
//! Rust path gives Python onnxruntime's logits, and Lite0 is as accurate as it should be.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use common::paths::tiny_models;
use common::{read, root, samples, test_config, venv_python};
use pandaguard::imaging::{DecodeLimits, ModelImage, decode, fit_to_input};
use pandaguard::model::{ModelCard, ModelRegistry, OutputKind, sha256_file};
use pandaguard::params::ClassifyParams;
use pandaguard::pipeline::Pipeline;

const MODELS: [&str; 3] = ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"];

#[test]
fn model_files_match_their_cards_and_the_converter_reproduces_them() {
    let out = tempdir("reconvert");
    let status = Command::new(venv_python())
        .arg(root().join("models/convert/convert.py"))
        .args(["--check", "--out-dir"])
        .arg(&out)
        .status()
        .expect("run the converter");
    assert!(status.success(), "convert.py --check reported a sha256 mismatch");
    for name in MODELS {
        let card = ModelCard::load(&root().join("models"), name).unwrap();
        let shipped = sha256_file(&root().join("models").join(&card.file)).unwrap();
        let rebuilt = sha256_file(&out.join(&card.file)).unwrap();
        assert_eq!(shipped, card.sha256, "{name}: models/{} differs from its card", card.file);
        assert_eq!(rebuilt, card.sha256, "{name}: the converter no longer reproduces the card's file");
    }
    let _ = std::fs::remove_dir_all(out);
}

/// Preprocesses real photos in Rust, runs them through the engine (batch of 3), and
/// compares with Python onnxruntime on the very same input tensor.
#[tokio::test]
async fn rust_logits_equal_python_onnxruntime_logits() {
    let config = test_config(&MODELS);
    let registry = ModelRegistry::load(&config).unwrap();
    let photos = samples();
    let limits = DecodeLimits::from(&config.image);
    let dir = tempdir("parity");
    for name in MODELS {
        let model = registry.get(name).unwrap();
        let spec = &model.card.input;
        let mut input = Vec::new();
        for (path, _) in photos.iter().take(3) {
            let image = decode(&read(path), &limits).unwrap();
            ModelImage::from_rgb(&fit_to_input(&image, spec).unwrap()).push_normalized(spec, &mut input);
        }
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        let rust = model.engine.infer(input.clone(), 3, deadline).await.unwrap().outputs;

        let input_path = dir.join(format!("{name}.in"));
        let output_path = dir.join(format!("{name}.out"));
        std::fs::write(&input_path, floats_to_bytes(&input)).unwrap();
        let status = Command::new(venv_python())
            .arg(root().join("models/convert/reference.py"))
            .arg("logits")
            .arg("--model")
            .arg(root().join("models").join(&model.card.file))
            .arg("--input")
            .arg(&input_path)
            .args(["--shape", &format!("3,3,{},{}", spec.height, spec.width), "--output"])
            .arg(&output_path)
            .status()
            .unwrap();
        assert!(status.success());
        let python = bytes_to_floats(&std::fs::read(&output_path).unwrap());
        assert_eq!(python.len(), rust.len());
        let worst = rust.iter().zip(&python).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-4, "{name}: largest logit difference {worst}");
    }
    registry.close();
    let _ = std::fs::remove_dir_all(dir);
}

/// The labelled-photo check through the full Rust pipeline: Lite0 reaches 75% top-1,
/// and every model is within one photo of the figure its card records.
#[tokio::test]
async fn models_reach_their_recorded_accuracy_on_labelled_photos() {
    let config = Arc::new(test_config(&MODELS));
    let registry = Arc::new(ModelRegistry::load(&config).unwrap());
    let pipeline = Pipeline::new(Arc::clone(&config), Arc::clone(&registry));
    let photos = samples();
    assert!(photos.len() >= 20, "expected the 20 foolbox photos, found {}", photos.len());
    for name in MODELS {
        let mut params = ClassifyParams::defaults(&config);
        params.model = Some(name.to_string());
        let mut correct = 0;
        for (path, class) in &photos {
            let outcome = pipeline.classify(read(path).into(), &params, Instant::now()).await.unwrap();
            correct += usize::from(outcome.raw_class() == *class);
        }
        let top1 = correct as f64 / photos.len() as f64;
        let card = &registry.get(name).unwrap().card;
        let recorded = card.accuracy.as_ref().unwrap().top1;
        println!("{name}: top-1 {correct}/{} = {top1:.2} (card: {recorded:.2})", photos.len());
        assert!((top1 - recorded).abs() <= 1.0 / photos.len() as f64 + 1e-9, "{name}: {top1} vs card {recorded}");
        if name == "efficientnet-lite0" {
            assert!(top1 >= 0.75, "Lite0 top-1 {top1} < 0.75: the conversion or preprocessing is wrong");
        }
    }
    registry.close();
}

fn tempdir(label: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pandaguard-{label}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn floats_to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn bytes_to_floats(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// A model whose graph already ends in softmax (card: `output.kind = "probabilities"`)
/// is served its own probabilities, not softmax applied twice; a logits model gets
/// softmax once. The two tiny models compute the same function, so they must agree.
#[tokio::test]
async fn output_kind_decides_whether_softmax_is_applied() {
    let dir = tempdir("output-kind");
    tiny_models(&dir);
    let mut config = test_config(&["tiny-linear", "tiny-softmax"]);
    config.models.dir = dir.clone();
    let config = Arc::new(config);
    let registry = Arc::new(ModelRegistry::load(&config).unwrap());
    assert_eq!(registry.get("tiny-softmax").unwrap().card.output.kind, OutputKind::Probabilities);
    let pipeline = Pipeline::new(Arc::clone(&config), Arc::clone(&registry));
    // Mean pixel 103/255 = 0.404, just above the boundary at 0.4: logits ±1.51, so
    // softmax once gives 0.953 for "bright" and softmax twice would give 0.712.
    let mut png = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(8, 8, image::Rgb([103; 3])).write_to(&mut png, image::ImageFormat::Png).unwrap();
    let mut answers = Vec::new();
    for model in ["tiny-linear", "tiny-softmax"] {
        let params = pipeline.params([("model", model), ("defense", "none")]).unwrap();
        let outcome = pipeline.classify(png.get_ref().clone().into(), &params, Instant::now()).await.unwrap();
        answers.push(outcome.raw);
    }
    let z: f32 = 3.0 * 64.0 * ((103.0 / 255.0 - 0.5) / 0.5);
    let logit = z + 0.2 * 192.0;
    let expected = 1.0 / (1.0 + (-2.0 * logit).exp());
    for (model, raw) in ["tiny-linear", "tiny-softmax"].iter().zip(&answers) {
        assert!((raw[0] - expected).abs() < 1e-4, "{model}: p(bright) {} expected {expected}", raw[0]);
        assert!((raw.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
    registry.close();
    let _ = std::fs::remove_dir_all(dir);
}
