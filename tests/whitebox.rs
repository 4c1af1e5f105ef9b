//! White-box attacks end to end: `pandaguard attack --method pgd|apgd-ce` as real
//! processes, with exact gradients of the served ONNX files (models/gradients, JAX) and
//! every verdict from the real pipeline on the written 8-bit PNG.

mod common;

use std::process::Command;

use common::{root, samples};
use serde_json::Value;

/// Each test starts a JAX gradient server with the three models: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn attack(image: &std::path::Path, out: &std::path::Path, args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_pandaguard"))
        .current_dir(root())
        .env_remove("ORT_DYLIB_PATH")
        .env("PANDAGUARD_LOG", "warn")
        .arg("attack")
        .arg(image)
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(String::from_utf8(output.stdout).unwrap().trim()).unwrap()
}

/// PGD at 8/255 fools raw Lite0 on every photo of the first four it classifies right,
/// inside the ball; and APGD with EOT breaks the `fast` ensemble on one of them
/// (judged by the real pipeline: the white-box attack sees through the defense).
#[test]
fn white_box_attacks_fool_raw_and_the_fast_ensemble_within_the_budget() {
    let _serial = serial();
    let dir = std::env::temp_dir().join(format!("pandaguard-whitebox-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut fooled = Vec::new();
    for (n, (path, truth)) in samples().into_iter().enumerate() {
        if fooled.len() == 4 {
            break;
        }
        let out = dir.join(format!("raw-{n}.png"));
        let report = attack(&path, &out, &["--method", "pgd", "--eps", "8/255", "--queries", "20", "--against", "raw"]);
        if report["original"]["class_id"].as_u64() != Some(truth as u64) {
            continue; // raw is wrong already: not an attack target
        }
        assert_eq!(report["success"], true, "PGD did not fool raw on {}: {report}", path.display());
        assert_ne!(report["raw"]["class_id"].as_u64(), Some(truth as u64), "{report}");
        assert!(report["linf"].as_f64().unwrap() <= 8.0 / 255.0 + 1e-6, "{report}");
        fooled.push((path, truth, report["queries"].as_u64().unwrap()));
    }
    assert_eq!(fooled.len(), 4);
    println!("PGD 8/255 on raw Lite0: steps to success {:?}", fooled.iter().map(|f| f.2).collect::<Vec<_>>());

    let (path, truth, _) = &fooled[0];
    let out = dir.join("fast.png");
    let args = ["--method", "apgd-ce", "--eps", "8/255", "--queries", "20", "--eot", "1", "--against", "fast"];
    let report = attack(path, &out, &args);
    println!("APGD-CE 8/255 on fast: {report}");
    assert_eq!(report["success"], true, "{report}");
    assert_ne!(report["defended"]["class_id"].as_u64(), Some(*truth as u64), "{report}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `pandaguard evaluate` with `args` into a fresh folder and returns its report.json.
fn evaluate(name: &str, args: &[&str]) -> Value {
    let out = std::env::temp_dir().join(format!("pandaguard-whitebox-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let output = Command::new(env!("CARGO_BIN_EXE_pandaguard"))
        .current_dir(root())
        .env_remove("ORT_DYLIB_PATH")
        .env("PANDAGUARD_LOG", "warn")
        .arg("evaluate")
        .args(args)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&out);
    report
}

/// The white-box row of `report` for `preset` at L∞ `eps_255`/255.
fn white_box_row<'a>(report: &'a Value, preset: &str, eps_255: f64) -> &'a Value {
    report["whitebox"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| {
            r["preset"] == preset
                && r["norm"] == "linf"
                && (r["epsilon"].as_f64().unwrap() * 255.0 - eps_255).abs() < 1e-3
        })
        .unwrap_or_else(|| panic!("no white-box row for {preset} at {eps_255}/255 in {}", report["whitebox"]))
}

fn count(row: &Value, field: &str) -> u64 {
    row[field].as_u64().unwrap_or_else(|| panic!("{field} in {row}"))
}

/// On the same photos (the first six samples, those raw gets right), against `fast`:
/// the white-box attack is at least as strong as the transfer attacks (Square and PGD
/// on the raw model) and the adaptive Square-EOT attack, at every ε; its success does
/// not fall as ε rises (1/255 → 4/255) or as its steps rise (1 → 5).
#[test]
fn white_box_is_the_strongest_attack_and_grows_with_epsilon_and_steps() {
    let _serial = serial();
    let common =
        ["--presets", "fast", "--max-images", "6", "--certify-sigmas", "0", "--seed", "0", "--whitebox-eot", "1"];
    let mut args = common.to_vec();
    args.extend([
        "--attacks",
        "square,square-eot,pgd,apgd-ce",
        "--eps",
        "1/255,4/255",
        "--queries",
        "100",
        "--adaptive-images",
        "6",
        "--adaptive-queries",
        "100",
        "--eot",
        "1",
        "--whitebox-steps",
        "5",
    ]);
    let report = evaluate("strongest", &args);
    let mut robust_by_eps = Vec::new();
    for eps in [1.0, 4.0] {
        let white = white_box_row(&report, "fast", eps);
        let adaptive = report["adaptive"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| {
                r["preset"] == "fast"
                    && r["attack"] == "square-eot"
                    && (r["epsilon"].as_f64().unwrap() * 255.0 - eps).abs() < 1e-3
            })
            .unwrap_or_else(|| panic!("no square-eot row at {eps}/255: {}", report["adaptive"]));
        let photos = count(white, "photos");
        assert_eq!(photos, count(adaptive, "images"), "the attacks saw different photos: {white} {adaptive}");
        assert!(photos >= 4, "raw gets only {photos} of the first six photos right");
        let white_robust = count(white, "whitebox_robust");
        println!(
            "fast at {eps}/255 on {photos} photos: right after white-box {white_robust}, PGD transfer {}, \
             Square transfer {}, Square-EOT {}",
            count(white, "transfer_robust"),
            count(adaptive, "transfer_correct"),
            count(adaptive, "adaptive_correct")
        );
        for (attack, robust) in [
            ("PGD transfer", count(white, "transfer_robust")),
            ("Square transfer", count(adaptive, "transfer_correct")),
            ("Square-EOT", count(adaptive, "adaptive_correct")),
        ] {
            assert!(
                white_robust <= robust,
                "{attack} left {robust} photos right, white-box {white_robust} at {eps}/255"
            );
        }
        robust_by_eps.push(white_robust);
    }
    assert!(robust_by_eps[1] <= robust_by_eps[0], "more robust at 4/255 than at 1/255: {robust_by_eps:?}");
    assert!(robust_by_eps[1] * 2 <= count(white_box_row(&report, "fast", 4.0), "photos"), "{robust_by_eps:?}");

    let mut args = common.to_vec();
    args.extend(["--attacks", "pgd,apgd-ce", "--eps", "1/255", "--queries", "10", "--whitebox-steps", "1"]);
    let one_step = evaluate("one-step", &args);
    let (few, more) = (
        count(white_box_row(&one_step, "fast", 1.0), "whitebox_robust"),
        count(white_box_row(&report, "fast", 1.0), "whitebox_robust"),
    );
    println!("fast at 1/255: right after 1 step {few}, after 5 steps {more}");
    assert!(more <= few, "more photos right after 5 steps ({more}) than after 1 ({few})");

    // `pandaguard chart` draws both runs' rows in one chart; a report without white-box
    // rows is refused with a message.
    let dir = std::env::temp_dir().join(format!("pandaguard-whitebox-chart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut without_rows = one_step.clone();
    without_rows["whitebox"] = serde_json::json!([]);
    for (name, value) in [("a.json", &report), ("b.json", &one_step), ("none.json", &without_rows)] {
        std::fs::write(dir.join(name), serde_json::to_vec(value).unwrap()).unwrap();
    }
    let chart = |reports: &[&str]| {
        let reports: Vec<String> = reports.iter().map(|r| dir.join(r).display().to_string()).collect();
        Command::new(env!("CARGO_BIN_EXE_pandaguard"))
            .current_dir(root())
            .env("PANDAGUARD_LOG", "warn")
            .args(["chart", "--reports", &reports.join(","), "--out"])
            .arg(dir.join("chart.png"))
            .output()
            .unwrap()
    };
    let drawn = chart(&["a.json", "b.json"]);
    assert!(drawn.status.success(), "{}", String::from_utf8_lossy(&drawn.stderr));
    let png = image::open(dir.join("chart.png")).unwrap();
    assert!(png.width() > 100 && png.height() > 100);
    let refused = chart(&["none.json"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no L∞ white-box rows"), "{refused:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Gradients through the differentiable copy of every preset of the shipped config, and
/// of smoothing alone, are finite, non-zero and not masked to zero on most pixels (no
/// silent gradient masking by clipping or rounding), for the cross-entropy and DLR losses.
#[test]
fn gradients_are_finite_and_unmasked_through_every_preset() {
    let _serial = serial();
    use std::sync::Arc;

    use pandaguard::attack::surrogate::Loss;
    use pandaguard::attack::{Goal, Norm};
    use pandaguard::config::{CliOverrides, Config};
    use pandaguard::imaging::DecodeLimits;
    use pandaguard::model::ModelRegistry;
    use pandaguard::pipeline::Pipeline;
    use pandaguard::redteam::evaluate::load_samples;
    use pandaguard::redteam::whitebox::{WhiteBox, WhiteBoxBudget};

    let config = Config::load(Some(&root().join("config/default.toml")), &CliOverrides::default()).unwrap();
    // The int8 presets need the int8 models, which the shipped config does not load (and
    // the gradients are of the fp32 graphs).
    let mut presets: Vec<String> = config
        .defense
        .presets
        .iter()
        .filter(|(name, preset)| name.as_str() != "none" && preset.precision == pandaguard::model::Precision::Fp32)
        .map(|(name, _)| name.clone())
        .collect();
    presets.push("smooth".into());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let config = Arc::new(config);
    let registry = Arc::new(ModelRegistry::load(&config).unwrap());
    let raw = Arc::clone(registry.get(registry.default_name()).unwrap());
    let samples = load_samples(
        &root().join("testdata/imagenet"),
        &root().join("testdata/imagenet/labels.csv"),
        2,
        &raw,
        &DecodeLimits::from(&config.image),
    )
    .unwrap();
    let pipeline = Arc::new(Pipeline::new(Arc::clone(&config), Arc::clone(&registry)));
    let mut white_box = WhiteBox::start(pipeline, runtime.handle().clone(), &root()).unwrap();
    let budget = WhiteBoxBudget { norm: Norm::Linf, epsilon: 4.0 / 255.0, steps: 1, eot: 2, judge_draws: 1, seed: 7 };
    for sample in &samples {
        let goal = Goal::Untargeted { true_class: sample.class_id };
        for preset in &presets {
            for loss in [Loss::CrossEntropy, Loss::Dlr] {
                let step = white_box.probe(&sample.clean, goal, loss, &[("defense", preset)], &budget).unwrap();
                let gradient = &step.gradient;
                assert_eq!(gradient.len(), sample.clean.data.len());
                assert!(gradient.iter().all(|g| g.is_finite()), "{preset} {loss:?}: non-finite gradient");
                let norm = gradient.iter().map(|g| g * g).sum::<f32>().sqrt();
                let nonzero = gradient.iter().filter(|g| **g != 0.0).count() as f64 / gradient.len() as f64;
                println!(
                    "{} {preset} {loss:?}: loss {:.4}, ‖∇‖₂ {norm:.3e}, non-zero {:.1}%",
                    sample.file,
                    step.loss,
                    100.0 * nonzero
                );
                assert!(norm > 1e-6, "{preset} {loss:?}: the gradient vanished (‖∇‖₂ = {norm})");
                assert!(nonzero > 0.9, "{preset} {loss:?}: only {:.1}% of the gradient is non-zero", 100.0 * nonzero);
                assert!((step.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-3);
            }
        }
    }
    registry.close();
}

/// White-box PGD at 8/255 with 50 steps fools raw Lite0 on at least 95% of the sample
/// photos it classifies right (all 20 photos; verdicts from the real pipeline).
#[test]
fn white_box_pgd_fools_raw_on_95_percent_of_the_photos_at_8_255() {
    let _serial = serial();
    let report = evaluate(
        "raw",
        &[
            "--presets",
            "none",
            "--whitebox-presets",
            "none",
            "--attacks",
            "square,pgd",
            "--eps",
            "8/255",
            "--queries",
            "1",
            "--whitebox-steps",
            "50",
            "--whitebox-eot",
            "1",
            "--certify-sigmas",
            "0",
            "--seed",
            "0",
        ],
    );
    let row = white_box_row(&report, "none", 8.0);
    let (photos, robust) = (count(row, "photos"), count(row, "whitebox_robust"));
    println!("PGD 8/255 on raw: {} of {photos} photos fooled, median steps {}", photos - robust, row["median_steps"]);
    assert!(photos >= 15, "raw gets only {photos} of the 20 photos right");
    assert!((photos - robust) as f64 >= 0.95 * photos as f64, "PGD fooled raw on {} of {photos}", photos - robust);
}
