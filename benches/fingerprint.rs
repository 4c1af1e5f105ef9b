//! `make bench` (or `cargo bench --locked --bench fingerprint`): the cost of query-attack
//! detection per request on one core: the fingerprint of a 224×224 model input (budget:
//! 2 ms) and one lookup-and-record in the memory store, with the shipped settings.
//! Medians and 99th percentiles over the 20 sample photos, repeated.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use image::RgbImage;
use pandaguard::config::AttackDetectionConfig;
use pandaguard::detect::{ClientId, FingerprintStore, Fingerprinter, MemoryStore, Thresholds};

const ROUNDS: usize = 50;

fn main() {
    let config = AttackDetectionConfig::default();
    let fingerprinter = Fingerprinter::new(config.fingerprint_params(), Some(b"bench secret, not a real one"));
    let store = MemoryStore::new(config.store_limits());
    let thresholds = Thresholds { alike: config.match_threshold, close: config.close_match_threshold };
    let photos = photos();
    let (mut fingerprint_times, mut store_times) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        for (index, photo) in photos.iter().enumerate() {
            let started = Instant::now();
            let fingerprint = std::hint::black_box(fingerprinter.fingerprint(photo.as_raw()));
            fingerprint_times.push(started.elapsed());
            // Clients come and go as in a busy service: 100 of them, windows filling up.
            let client = ClientId::from_hashed(format!("client-{}", (round * photos.len() + index) % 100));
            let started = Instant::now();
            std::hint::black_box(store.record(&client, &fingerprint, thresholds));
            store_times.push(started.elapsed());
        }
    }
    println!(
        "attack detection, {} photos at 224x224 x {ROUNDS} rounds, one core (window {} stride {} quantization {} \
         hashes {})",
        photos.len(),
        config.window_size,
        config.window_stride,
        config.quantization,
        config.hashes
    );
    report("fingerprint", &mut fingerprint_times);
    report("memory store record", &mut store_times);
}

fn report(what: &str, times: &mut [Duration]) {
    times.sort_unstable();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    println!("{what:>20}: median {:.3} ms, p99 {:.3} ms, max {:.3} ms", at(0.5), at(0.99), at(1.0));
}

/// The sample photos at EfficientNet-Lite0's input size, as the pipeline hands them over.
fn photos() -> Vec<RgbImage> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/imagenet");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("testdata/imagenet (run `make setup`)")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|path| {
            let image = image::open(path).expect("photo").to_rgb8();
            image::imageops::resize(&image, 224, 224, image::imageops::FilterType::Triangle)
        })
        .collect()
}
