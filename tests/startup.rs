//! Start-up and shutdown of the real release binary, as a load balancer sees them:
//! readiness during model loading, the drain on SIGTERM/SIGINT, and replicas whose
//! model files are missing or corrupt.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Replica, Scratch, free_port, get, raw_class_id, read_response, request, root, samples};

/// Generous bounds: a loaded 2-core CI machine is slow, never this slow.
const START_BOUND: Duration = Duration::from_secs(180);
const EXIT_BOUND: Duration = Duration::from_secs(60);

/// Polls `/health/ready` until the first HTTP answer (the listener is bound before
/// the models start loading) and returns its status and body.
fn first_ready_answer(replica: &mut Replica) -> (u16, String) {
    let started = Instant::now();
    loop {
        if let Ok(answer) = get(replica.addr(), "/health/ready") {
            return answer;
        }
        if let Some(status) = replica.try_wait() {
            panic!("exited with {status} before listening:\n{}", replica.stderr());
        }
        assert!(started.elapsed() < START_BOUND, "not listening after {START_BOUND:?}:\n{}", replica.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn readiness_is_503_while_loading_and_a_sigterm_drains_then_exits_zero() {
    let scratch = Scratch::new("startup-drain");
    let (photo, label) = samples().swap_remove(5);
    let image = std::fs::read(&photo).unwrap();
    let mut replica = Replica::spawn(
        "replica",
        free_port(),
        &[
            ("PANDAGUARD_SERVER__DRAIN_DELAY_MS", "3000"),
            ("PANDAGUARD_SERVER__SHUTDOWN_TIMEOUT_MS", "30000"),
            ("PANDAGUARD_LOG", "info,ort=warn"),
        ],
        &scratch.join("replica.log"),
    );
    let addr = replica.addr();

    // Loading (all three models with warm-up: seconds): alive, not ready, /classify 503.
    let (status, body) = first_ready_answer(&mut replica);
    assert_eq!(status, 503, "ready before the models were loaded: {body}");
    assert!(body.contains("loading"), "{body}");
    assert_eq!(get(addr, "/health/live").unwrap().0, 200);
    let (status, body) = request(addr, "POST", "/classify?defense=none", &image).unwrap();
    assert!(status == 503 || status == 200, "{status} {body}"); // 200 only if loading just finished
    replica.wait_ready(START_BOUND);
    let (status, body) = request(addr, "POST", "/classify?defense=none", &image).unwrap();
    assert_eq!((status, raw_class_id(&body)), (200, Some(label as u64)), "{body}");

    // A request in flight across the whole drain: headers and half the body now, the
    // rest only after the listener has closed.
    let mut in_flight = TcpStream::connect(addr).unwrap();
    in_flight.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "POST /classify?defense=none HTTP/1.1\r\nHost: {addr}\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n",
        image.len()
    );
    in_flight.write_all(head.as_bytes()).unwrap();
    in_flight.write_all(&image[..image.len() / 2]).unwrap();
    in_flight.flush().unwrap();
    std::thread::sleep(Duration::from_millis(200)); // let the server read the headers

    let signalled = Instant::now();
    replica.signal("TERM");

    // Readiness turns 503 at once (bounded generously), while /classify still answers.
    loop {
        let (status, body) = get(addr, "/health/ready").expect("the replica must keep serving while draining");
        if status == 503 {
            assert!(body.contains("draining"), "{body}");
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(signalled.elapsed() < Duration::from_secs(10), "readiness still 200 long after SIGTERM");
        std::thread::sleep(Duration::from_millis(5));
    }
    let ready_503_after = signalled.elapsed();
    let (status, body) = request(addr, "POST", "/classify?defense=none", &image)
        .expect("/classify must be answered during the drain delay");
    assert_eq!((status, raw_class_id(&body)), (200, Some(label as u64)), "{body}");
    assert_eq!(get(addr, "/health/live").unwrap().0, 200);

    // Then the listener closes: new connections are refused.
    let mut served_while_draining = 0;
    loop {
        match get(addr, "/health/ready") {
            Ok((503, _)) => served_while_draining += 1,
            Ok((status, body)) => panic!("readiness {status} while draining: {body}"),
            Err(_) => break,
        }
        assert!(replica.try_wait().is_none(), "exited before the in-flight request finished:\n{}", replica.stderr());
        assert!(signalled.elapsed() < EXIT_BOUND, "still accepting connections {EXIT_BOUND:?} after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    let refused_after = signalled.elapsed();

    // The in-flight request still completes, with the right answer.
    in_flight.write_all(&image[image.len() / 2..]).unwrap();
    let (status, body) = read_response(&mut in_flight).expect("the in-flight request must be answered");
    assert_eq!((status, raw_class_id(&body)), (200, Some(label as u64)), "{body}");

    let exit = replica.wait_exit(EXIT_BOUND).unwrap_or_else(|| panic!("no exit {EXIT_BOUND:?} after SIGTERM"));
    let exited_after = signalled.elapsed();
    assert_eq!(exit.code(), Some(0), "{exit}:\n{}", replica.stderr());
    println!(
        "SIGTERM -> ready 503 after {:?}, {} probes answered while draining, connections refused after {:?} \
         (drain_delay 3000 ms), in-flight request 200, exit 0 after {:?}",
        ready_503_after, served_while_draining, refused_after, exited_after
    );
    let log = replica.stderr();
    assert!(log.contains("draining: readiness is now 503"), "{log}");
}

#[test]
fn a_sigint_while_models_load_exits_zero_without_ever_being_ready() {
    let scratch = Scratch::new("startup-sigint");
    let mut replica = Replica::spawn(
        "replica",
        free_port(),
        &[("PANDAGUARD_SERVER__DRAIN_DELAY_MS", "60000")],
        &scratch.join("replica.log"),
    );
    let (status, body) = first_ready_answer(&mut replica);
    assert_eq!(status, 503, "{body}");
    replica.signal("INT");
    // Never ready, so no drain delay (60 s here): it stops once the loader returns.
    let started = Instant::now();
    let mut statuses = Vec::new();
    let exit = loop {
        if let Some(exit) = replica.try_wait() {
            break exit;
        }
        if let Ok((status, _)) = get(replica.addr(), "/health/ready") {
            statuses.push(status);
        }
        assert!(started.elapsed() < EXIT_BOUND, "no exit {EXIT_BOUND:?} after SIGINT:\n{}", replica.stderr());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(exit.code(), Some(0), "{exit}:\n{}", replica.stderr());
    assert!(statuses.iter().all(|&s| s == 503), "readiness after SIGINT: {statuses:?}");
}

/// A models folder holding efficientnet-lite0's card, labels and ONNX file, after
/// `damage` has been applied to the ONNX file's path.
fn lite0_copy(scratch: &Scratch, damage: impl FnOnce(&Path)) -> PathBuf {
    let dir = scratch.join("models");
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["efficientnet-lite0.toml", "efficientnet-lite0.onnx", "imagenet_labels.txt"] {
        std::fs::copy(root().join("models").join(file), dir.join(file)).unwrap();
    }
    damage(&dir.join("efficientnet-lite0.onnx"));
    dir
}

/// Starts a replica on `models_dir`, polls readiness until it exits, and returns the
/// last line of its stderr. Asserts: non-zero exit within the bound, never ready.
fn failed_start(scratch: &Scratch, models_dir: &Path, extra: &[(&str, &str)]) -> String {
    let dir = models_dir.to_str().unwrap();
    let mut env = vec![
        ("PANDAGUARD_MODELS__DIR", dir),
        ("PANDAGUARD_MODELS__LOAD", "[\"efficientnet-lite0\"]"),
        ("PANDAGUARD_MODELS__DEFAULT", "efficientnet-lite0"),
    ];
    env.extend_from_slice(extra);
    let mut replica = Replica::spawn("replica", free_port(), &env, &scratch.join("replica.log"));
    let started = Instant::now();
    let mut statuses = Vec::new();
    let exit = loop {
        if let Some(exit) = replica.try_wait() {
            break exit;
        }
        if let Ok((status, _)) = get(replica.addr(), "/health/ready") {
            statuses.push(status);
        }
        assert!(started.elapsed() < EXIT_BOUND, "still running {EXIT_BOUND:?} after start:\n{}", replica.stderr());
        std::thread::sleep(Duration::from_millis(10));
    };
    let stderr = replica.stderr();
    assert!(!exit.success(), "a replica with a broken model must exit non-zero ({exit}):\n{stderr}");
    assert!(!statuses.contains(&200), "readiness was 200 with a broken model: {statuses:?}");
    let last = stderr.lines().last().unwrap_or_default().to_string();
    assert!(
        last.starts_with("pandaguard: model loading failed: model efficientnet-lite0: "),
        "the last stderr line must name the model and the reason:\n{stderr}"
    );
    println!("{exit}, readiness answers {statuses:?}, last line: {last}");
    last
}

#[test]
fn a_truncated_model_file_is_refused_by_its_sha256() {
    let scratch = Scratch::new("startup-truncated");
    let dir = lite0_copy(&scratch, |onnx| {
        let bytes = std::fs::read(onnx).unwrap();
        std::fs::write(onnx, &bytes[..bytes.len() / 3]).unwrap();
    });
    let line = failed_start(&scratch, &dir, &[]);
    assert!(line.contains("sha256") && line.contains("corrupt or stale") && line.contains("make models"), "{line}");
}

#[test]
fn a_missing_model_file_is_refused() {
    let scratch = Scratch::new("startup-missing");
    let dir = lite0_copy(&scratch, |onnx| std::fs::remove_file(onnx).unwrap());
    let line = failed_start(&scratch, &dir, &[]);
    assert!(line.contains("efficientnet-lite0.onnx is missing") && line.contains("make models"), "{line}");
}

#[test]
fn a_garbage_model_file_is_refused_by_onnx_runtime_without_the_checksum() {
    let scratch = Scratch::new("startup-garbage");
    let dir = lite0_copy(&scratch, |onnx| std::fs::write(onnx, b"this is not an ONNX model\n".repeat(100)).unwrap());
    let line = failed_start(&scratch, &dir, &[("PANDAGUARD_MODELS__VERIFY_SHA256", "false")]);
    assert!(line.contains("cannot load") && line.contains("efficientnet-lite0.onnx"), "{line}");
}
