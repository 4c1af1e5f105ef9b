//! The int8 variants of the models (`[int8]` in the cards, `models/convert/quantize.py`):
//! the quantizer reproduces the files the cards describe, a file that differs from its
//! card is refused at load, the int8 models agree with their fp32 models on the sample
//! photos, and the `default-int8` preset answers over HTTP with int8 ensemble members.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use common::{TestServer, client, photo, read, root, samples, test_config, venv_python};
use pandaguard::api::{ClassifyResponse, ErrorResponse};
use pandaguard::model::{LoadError, ModelCard, ModelRegistry, Precision, sha256_file};
use pandaguard::params::ClassifyParams;
use pandaguard::pipeline::Pipeline;
use reqwest::StatusCode;

const FP32: [&str; 3] = ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"];
const INT8: [&str; 3] = ["efficientnet-lite0-int8", "efficientnet-lite1-int8", "efficientnet-lite2-int8"];

/// Photos (of 20) on which each int8 model's top-1 must equal its fp32 model's. All
/// three agree on 20 of 20 here (models/README.md "int8 variants"); the margin of two
/// allows for another CPU's int8 kernels rounding a close call the other way.
const MIN_TOP1_AGREEMENT: usize = 18;

fn tempdir(label: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pandaguard-{label}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Lite0 only (about 8 s): the other two go through the same code with other inputs.
#[test]
fn quantizer_reproduces_the_int8_file_of_the_card() {
    let out = tempdir("requantize");
    let status = Command::new(venv_python())
        .arg(root().join("models/convert/quantize.py"))
        .args(["--check", "--models", "lite0", "--out-dir"])
        .arg(&out)
        .status()
        .expect("run the quantizer");
    assert!(status.success(), "quantize.py --check reported a sha256 mismatch");
    let card = ModelCard::load(&root().join("models"), "efficientnet-lite0-int8").unwrap();
    assert_eq!(card.precision(), Precision::Int8);
    assert_eq!(sha256_file(&out.join(&card.file)).unwrap(), card.sha256, "the quantizer no longer reproduces the card");
    assert_eq!(
        sha256_file(&root().join("models").join(&card.file)).unwrap(),
        card.sha256,
        "models/{} differs from its card (re-run `make models`)",
        card.file
    );
    let _ = std::fs::remove_dir_all(out);
}

/// A models folder holding Lite0's card, labels and int8 file, whose bytes the test may change.
fn models_copy(label: &str) -> std::path::PathBuf {
    let dir = tempdir(label);
    let models = root().join("models");
    let card = ModelCard::load(&models, "efficientnet-lite0-int8").unwrap();
    for file in ["efficientnet-lite0.toml", card.labels.as_str(), card.file.as_str()] {
        std::fs::copy(models.join(file), dir.join(file)).unwrap();
    }
    dir
}

#[test]
fn an_int8_file_that_differs_from_its_card_is_refused_at_load() {
    let dir = models_copy("int8-checksum");
    let file = dir.join("efficientnet-lite0-int8.onnx");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let mut config = test_config(&["efficientnet-lite0-int8"]);
    config.models.dir = dir.clone();
    match ModelRegistry::load(&config) {
        Err(error @ LoadError::Checksum { .. }) => {
            let message = error.to_string();
            assert!(message.contains("efficientnet-lite0-int8") && message.contains("make models"), "{message}");
        }
        Err(other) => panic!("expected a checksum error, got: {other}"),
        Ok(_) => panic!("a corrupted int8 file was loaded"),
    }

    // A card without an [int8] table has no int8 variant, and says so.
    let card_path = dir.join("efficientnet-lite0.toml");
    let text = std::fs::read_to_string(&card_path).unwrap();
    let without_int8 = text.split("\n# The int8 variant").next().unwrap();
    assert!(!without_int8.contains("[int8]"), "the card's [int8] table is expected at its end");
    std::fs::write(&card_path, without_int8).unwrap();
    let message = ModelCard::load(&dir, "efficientnet-lite0-int8").unwrap_err().to_string();
    assert!(message.contains("has no [int8] table"), "{message}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Through the full Rust pipeline (decode, resize, engine): each int8 model's top-1
/// equals its fp32 model's on at least MIN_TOP1_AGREEMENT photos and its accuracy is
/// within one photo of what its card records.
#[tokio::test]
async fn int8_models_agree_with_their_fp32_models_on_the_sample_photos() {
    let all: Vec<&str> = FP32.iter().chain(&INT8).copied().collect();
    let config = Arc::new(test_config(&all));
    let registry = Arc::new(ModelRegistry::load(&config).unwrap());
    let pipeline = Pipeline::new(Arc::clone(&config), Arc::clone(&registry));
    let photos = samples();
    assert_eq!(photos.len(), 20, "expected the 20 foolbox photos");
    for (fp32, int8) in FP32.iter().zip(INT8) {
        let (mut agree, mut correct) = (0, 0);
        for (path, class) in &photos {
            let mut top1 = Vec::new();
            for model in [fp32, &int8] {
                let mut params = ClassifyParams::defaults(&config);
                params.model = Some(model.to_string());
                params.defense.defenses.clear();
                top1.push(pipeline.classify(read(path).into(), &params, Instant::now()).await.unwrap().raw_class());
            }
            agree += usize::from(top1[0] == top1[1]);
            correct += usize::from(top1[1] == *class);
        }
        let recorded = registry.get(int8).unwrap().card.accuracy.as_ref().unwrap().top1;
        println!("{int8}: top-1 {correct}/20 (card {recorded:.2}), same top-1 as {fp32} on {agree}/20");
        assert!(agree >= MIN_TOP1_AGREEMENT, "{int8} agrees with {fp32} on {agree} of 20 photos");
        assert!((correct as f64 / 20.0 - recorded).abs() <= 0.05 + 1e-9, "{int8}: {correct}/20 vs card {recorded}");
    }
    registry.close();
}

/// `default-int8` over HTTP: the three int8 models are the ensemble members (17 views
/// each) and the raw answer is the fp32 default model's; on a server without int8
/// models the preset is refused with 422 naming what to load.
#[tokio::test]
async fn default_int8_preset_answers_with_int8_members_over_http() {
    let mut models = vec!["efficientnet-lite0"];
    models.extend(INT8);
    let server = TestServer::start(test_config(&models));
    let (image, class) = photo("imagenet_05_853.jpg");
    let url = server.url("/classify?defense=default-int8&seed=7");
    let response = client().post(&url).header("content-type", "image/jpeg").body(image.clone()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer: ClassifyResponse = response.json().await.unwrap();
    assert_eq!(answer.preset, "default-int8");
    assert_eq!(answer.model, "efficientnet-lite0");
    assert_eq!(answer.rows, 1 + 3 * 17, "the fp32 raw row and 17 views of each int8 member");
    let ensemble = answer.defenses.iter().find(|d| d.name == "ensemble").expect("an ensemble report");
    let details: serde_json::Value = serde_json::from_str(ensemble.details.get()).unwrap();
    let members: Vec<String> = details["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["model"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(members, INT8, "members of default-int8");
    assert_eq!(answer.defended.class_id, Some(class), "the thatch photo, defended by int8 members");
    // `default` on the same server still combines only the fp32 models it has.
    let url = server.url("/classify?defense=default&seed=7");
    let response = client().post(&url).header("content-type", "image/jpeg").body(image.clone()).send().await.unwrap();
    let answer: ClassifyResponse = response.json().await.unwrap();
    assert_eq!(answer.rows, 17, "default with one fp32 model loaded: its 17 views");
    drop(server);

    let server = TestServer::start(test_config(&["efficientnet-lite0"]));
    let url = server.url("/classify?defense=default-int8");
    let response = client().post(&url).header("content-type", "image/jpeg").body(image).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let error: ErrorResponse = response.json().await.unwrap();
    assert!(error.error.message.contains("models.load"), "{}", error.error.message);
}
