//! White-box attacks end to end: `pandaguard attack --method pgd|apgd-ce` as real
//! processes, with exact gradients of the served ONNX files (models/gradients, JAX) and
//! every verdict from the real pipeline on the written 8-bit PNG.

mod common;

use std::process::Command;

use common::{root, samples};
use serde_json::Value;

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
