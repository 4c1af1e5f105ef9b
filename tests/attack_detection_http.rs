//! `pandaguard attack --url` against the release binary serving the real
//! EfficientNet-Lite0, with stateful query-attack detection answering 429
//! `query_attack_detected` (`attack_detection.action = refuse`): a plain attack stops
//! at the first refusal and says after how many requests; the OARS-style adaptive
//! attacker (`--adaptive`, several API keys) keeps going within its budget; HopSkipJump
//! runs over HTTP. Small budgets: these check behaviour, not attack strength.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Replica, Scratch, free_port, root, samples};
use serde_json::Value;

const KEYS: [&str; 5] = ["attacker-key-0", "attacker-key-1", "attacker-key-2", "attacker-key-3", "attacker-key-4"];

/// A replica serving Lite0 only, detection `action`, the keys above required.
fn replica(name: &str, scratch: &Scratch, action: &str) -> Replica {
    let keys = scratch.join("keys.txt");
    std::fs::write(&keys, KEYS.join("\n")).unwrap();
    let keys = keys.display().to_string();
    let env = [
        ("PANDAGUARD_MODELS__LOAD", "[\"efficientnet-lite0\"]"),
        ("PANDAGUARD_ATTACK_DETECTION__ACTION", action),
        ("PANDAGUARD_ATTACK_DETECTION__SECRET", "attack-detection-http-test"),
        // Short, so that the adaptive attacker's wait for a cooling key is short here.
        ("PANDAGUARD_ATTACK_DETECTION__COOLDOWN_SECONDS", "2"),
        ("PANDAGUARD_API_KEYS_FILE", keys.as_str()),
    ];
    let mut replica = Replica::spawn(name, free_port(), &env, &scratch.join(&format!("{name}.log")));
    replica.wait_ready(Duration::from_secs(180));
    replica
}

/// `pandaguard attack PHOTO --url … ARGS` and its JSON line.
fn attack(replica: &Replica, photo: &Path, out: &Path, args: &[&str]) -> Value {
    let url = format!("http://{}", replica.addr());
    let output = Command::new(env!("CARGO_BIN_EXE_pandaguard"))
        .current_dir(root())
        .env_remove("ORT_DYLIB_PATH")
        .env("PANDAGUARD_LOG", "warn")
        .arg("attack")
        .arg(photo)
        .arg("--out")
        .arg(out)
        .args(["--url", &url, "--against", "none"])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}\nserver:\n{}", replica.stderr());
    let stdout = String::from_utf8(output.stdout).unwrap();
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn count(report: &Value, field: &str) -> u64 {
    report[field].as_u64().unwrap_or_else(|| panic!("{field} is not a count: {report}"))
}

#[test]
fn a_plain_attack_stops_at_the_first_refusal_and_the_adaptive_one_keeps_going() {
    let scratch = Scratch::new("attack-refuse");
    let server = replica("refuse", &scratch, "refuse");
    let photo = &samples()[3].0;

    // Square with one key: refused within a handful of requests, and it says when. (At
    // 1/255: at the default 4/255 its first perturbed query already fools Lite0 on this
    // photo, before any detector has a second query to compare.)
    let out = scratch.join("square.png");
    let args = ["--method", "square", "--eps", "1/255", "--queries", "300", "--api-keys", KEYS[0]];
    let report = attack(&server, photo, &out, &args);
    println!("square: {report}");
    assert_eq!(report["stopped"], "query_attack_detected", "{report}");
    assert_eq!(report["success"], false);
    let first = count(&report, "queries_until_first_refusal");
    assert!((2..=10).contains(&first), "{report}");
    // It stopped at that request: nothing was sent after it.
    assert_eq!((count(&report, "queries_sent"), count(&report, "refusals")), (first, 1), "{report}");
    assert!(!out.exists(), "a stopped attack writes no PNG");

    // HopSkipJump, adaptive, with the other four keys (three attack, the last judges):
    // refused, switches key, adds noise, and spends its budget (refused requests
    // included) instead of stopping.
    let budget = 120;
    let keys = KEYS[1..].join(",");
    let out = scratch.join("hsja-adaptive.png");
    let args = [
        "--method",
        "hsja",
        "--eps",
        "0.5",
        "--norm",
        "l2",
        "--queries",
        "120",
        "--adaptive",
        "--max-wait",
        "5",
        "--api-keys",
    ];
    let report = attack(&server, photo, &out, &[&args[..], &[keys.as_str()]].concat());
    println!("hsja adaptive: {report}");
    assert_eq!(report["adaptive"], true);
    let refusals = count(&report, "refusals");
    let first = count(&report, "queries_until_first_refusal");
    let sent = count(&report, "queries_sent");
    assert!(refusals >= 1 && count(&report, "identity_switches") >= refusals, "{report}");
    assert!(sent > first + 20, "it went on after the first refusal: {report}");
    // The budget covers the clean look and the search; the final check (by the last
    // key, which never attacked) is one more request.
    assert!(sent <= budget + 1 + 1, "{report}");
    assert!(report["stopped"].is_null(), "{report}");
    assert!(report["distance"].is_number(), "{report}");
    assert_eq!(count(&report, "identities"), 3, "{report}");
}

#[test]
fn hsja_runs_over_http_without_detection() {
    let scratch = Scratch::new("attack-hsja-http");
    let server = replica("off", &scratch, "off");
    let photo = &samples()[3].0;
    let out = scratch.join("hsja.png");
    let args = ["--method", "hsja", "--eps", "8/255", "--queries", "150", "--api-keys", KEYS[2]];
    let report = attack(&server, photo, &out, &args);
    println!("hsja: {report}");
    assert_eq!(report["method"], "hsja");
    assert!(report["stopped"].is_null(), "{report}");
    assert_eq!(count(&report, "refusals"), 0);
    assert!(report["queries_until_first_refusal"].is_null());
    // The clean look, at most 150 search queries, the final check.
    let sent = count(&report, "queries_sent");
    assert!((100..=152).contains(&sent), "{report}");
    assert!(count(&report, "queries") <= 150);
    // Its answer is an image some distance away (HopSkipJump starts from noise and
    // walks toward the photo; 150 queries do not get within 8/255).
    assert!(out.exists());
    let distance = report["distance"].as_f64().unwrap();
    assert!(distance > 0.0 && distance <= 1.0, "{report}");
    assert!(report["raw"]["class_id"].is_number(), "{report}");
}
