//! The command line, run as a real process.

mod common;

use std::process::Command;

use common::{root, samples};
use pandaguard::api::{ClassifyResponse, ErrorResponse};

fn pandaguard() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pandaguard"));
    command.current_dir(root()).env_remove("ORT_DYLIB_PATH").env("PANDAGUARD_LOG", "warn");
    command
}

#[test]
fn classify_prints_the_api_json_per_image_in_order() {
    let photos = samples();
    let output = pandaguard()
        .args(["classify", "--top-k", "2"])
        .arg(&photos[5].0)
        .arg(&photos[0].0)
        .arg("Cargo.toml")
        .output()
        .unwrap();
    assert!(!output.status.success(), "an unreadable image must make the exit status non-zero");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let first: ClassifyResponse = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(first.raw.class_id, photos[5].1);
    assert_eq!(first.raw.top_k.len(), 2);
    assert_eq!(first.model, "efficientnet-lite0");
    let second: ClassifyResponse = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(second.raw.class_id, photos[0].1);
    let third: ErrorResponse = serde_json::from_str(lines[2]).unwrap();
    assert_eq!(third.error.code, "invalid_image");
}

#[test]
fn classify_with_another_model() {
    let photos = samples();
    let output = pandaguard().args(["classify", "--model", "efficientnet-lite2"]).arg(&photos[5].0).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let answer: ClassifyResponse = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer.model, "efficientnet-lite2");
    assert_eq!(answer.raw.class_id, photos[5].1);
}

#[test]
fn models_lists_the_cards_and_checks_the_files() {
    let output = pandaguard().arg("models").output().unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    for name in ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"] {
        let line = stdout.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{stdout}"));
        assert!(line.contains(" ok"), "{line}");
    }
}

#[test]
fn a_missing_onnx_runtime_fails_at_start_up_with_one_clear_line() {
    let output = pandaguard()
        .args(["serve", "--bind", "127.0.0.1:0"])
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so.1.31.1")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("pandaguard: ONNX Runtime library not found"), "{stderr}");
    assert!(last.contains("ORT_DYLIB_PATH") && last.contains("make setup"), "{last}");
}

#[test]
fn an_invalid_configuration_is_refused_with_every_problem_listed() {
    let output = pandaguard()
        .args(["serve"])
        .env("PANDAGUARD_ENGINE__MAX_BATCH_ROWS", "0")
        .env("PANDAGUARD_MODELS__DEFAULT", "nope")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("engine.max_batch_rows") && stderr.contains("models.default"), "{stderr}");
}
