//! Decision maps end to end: `POST /explore` and `pandaguard map` on the tiny linear
//! two-class model, whose boundary is known exactly from its weights (an image is
//! "bright" when its mean pixel value exceeds 0.4), and the bounds that keep a map
//! from costing more than the operator allowed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::paths::tiny_models;
use common::{TestServer, root};
use pandaguard::api::{ErrorResponse, ExploreResponse};
use pandaguard::config::Config;
use reqwest::StatusCode;

/// A fresh folder under the system temp dir.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pandaguard-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A uniform grey 8×8 PNG of value `level`/255, as bytes.
fn grey_png(level: u8) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(8, 8, image::Rgb([level; 3])).write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// The server config for the tiny model, maps enabled or not.
fn tiny_config(dir: &Path, enabled: bool) -> Config {
    tiny_models(dir);
    let mut config = Config::default();
    config.models.dir = dir.to_path_buf();
    config.models.load = vec!["tiny-linear".into()];
    config.models.default = "tiny-linear".into();
    config.server.drain_delay_ms = 0;
    config.explore.enabled = enabled;
    config.explore.max_rows = 500;
    config
}

/// Grey 0.6 at the origin, grey 0.2 as the adversarial example: the x axis is the
/// uniform direction (every pixel down by 1/√192 per L2 unit), so the mean pixel value
/// crosses 0.4 at x = 0.2·√192 ≈ 2.77, on every row of the map whose y offset leaves
/// the mean alone. The middle row (y = 0) has no offset at all.
const ORIGIN: u8 = 153;
const TOWARD: u8 = 51;

fn assert_boundary_where_the_weights_say(map: &ExploreResponse) {
    let n = map.grid;
    let boundary = 0.2 * 192f32.sqrt();
    let adversarial = map.adversarial.as_ref().expect("the given example is marked");
    assert!((adversarial.x - 0.4 * 192f32.sqrt()).abs() < 1e-3, "adversarial at {}", adversarial.x);
    assert_eq!(adversarial.source, "given");
    assert_eq!(map.axes.x.direction, "toward_adversarial");
    // The origin is "bright" (class 0): its label is the one the contours follow.
    assert_eq!(map.true_class.class_id, 0);
    let middle = n / 2;
    for side in [&map.raw, &map.defended] {
        assert_eq!(side.labels.len(), n * n);
        for j in 0..n {
            let x = -map.radius_l2 + 2.0 * map.radius_l2 * j as f32 / (n - 1) as f32;
            let expected = if x < boundary { 0 } else { 1 };
            assert_eq!(side.labels[middle * n + j], expected, "cell at x = {x} (boundary at {boundary})");
            let p = side.true_probability[middle * n + j].expect("a probability per cell");
            assert_eq!(p > 0.5, expected == 0, "p(bright) {p} at x = {x}");
        }
    }
}

#[test]
fn a_map_of_the_linear_model_has_its_boundary_where_the_weights_say() {
    let dir = scratch("explore-linear");
    let server = TestServer::start(tiny_config(&dir, true));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let map: ExploreResponse = runtime.block_on(async {
        let form = reqwest::multipart::Form::new()
            .part("image", reqwest::multipart::Part::bytes(grey_png(ORIGIN)).file_name("grey.png"))
            .part("toward", reqwest::multipart::Part::bytes(grey_png(TOWARD)).file_name("dark.png"));
        let response = reqwest::Client::new()
            .post(server.url("/explore?preset=none&grid=21&radius=5&seed=3"))
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    });
    assert_eq!((map.grid, map.radius_l2, map.seed), (21, 5.0, 3));
    assert_eq!(map.preset, "none");
    // 21² cells and the origin, one row each (no attack: the example was given).
    assert_eq!(map.rows, 21 * 21 + 1);
    assert_boundary_where_the_weights_say(&map);
    // L∞ along the uniform direction: 1/√192 per L2 unit.
    assert!((map.axes.x.linf_per_unit - 1.0 / 192f32.sqrt()).abs() < 1e-4);
}

#[test]
fn maps_are_refused_when_off_and_bounded_when_on() {
    let dir = scratch("explore-bounds");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let post = |server: &TestServer, query: &str| {
        let url = server.url(&format!("/explore?{query}"));
        runtime.block_on(async {
            let response = reqwest::Client::new()
                .post(url)
                .header("content-type", "image/png")
                .body(grey_png(ORIGIN))
                .send()
                .await;
            let response = response.unwrap();
            let status = response.status();
            (status, response.json::<ErrorResponse>().await.map(|e| (e.error.code, e.error.message)))
        })
    };

    let off = TestServer::start(tiny_config(&dir, false));
    let (status, error) = post(&off, "grid=5");
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (code, message) = error.unwrap();
    assert_eq!(code, "not_found");
    assert!(message.contains("explore.enabled"), "{message}");
    drop(off);

    let on = TestServer::start(tiny_config(&dir, true));
    let (status, error) = post(&on, "grid=99");
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(error.unwrap().1.contains("grid"));
    // 31² cells at one row each, over explore.max_rows = 500: refused before any work.
    let (status, error) = post(&on, "grid=31&preset=none");
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(error.unwrap().1.contains("explore.max_rows"));
    let (status, _) = post(&on, "grid=5&norm=l3");
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = post(&on, "grid=5&radius=-1&preset=none");
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = post(&on, "grid=5&colour=red");
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[test]
fn pandaguard_map_draws_the_same_map_as_a_png() {
    let dir = scratch("explore-cli");
    tiny_models(&dir);
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!("[models]\ndir = \"{}\"\nload = [\"tiny-linear\"]\ndefault = \"tiny-linear\"\n", dir.display()),
    )
    .unwrap();
    std::fs::write(dir.join("grey.png"), grey_png(ORIGIN)).unwrap();
    std::fs::write(dir.join("dark.png"), grey_png(TOWARD)).unwrap();
    let (png, json) = (dir.join("map.png"), dir.join("map.json"));
    let output = Command::new(env!("CARGO_BIN_EXE_pandaguard"))
        .current_dir(root())
        .env_remove("ORT_DYLIB_PATH")
        .env("PANDAGUARD_LOG", "warn")
        .arg("--config")
        .arg(&config)
        .arg("map")
        .arg(dir.join("grey.png"))
        .arg("--toward")
        .arg(dir.join("dark.png"))
        .args(["--preset", "none", "--grid", "21", "--radius", "5", "--out"])
        .arg(&png)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let map: ExploreResponse = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_boundary_where_the_weights_say(&map);
    let image = image::open(&png).unwrap().to_rgb8();
    assert_eq!(image.dimensions(), (1400, 860));
    // Drawn, not blank: the two labels' colours fill most of the panels.
    let distinct: std::collections::HashSet<[u8; 3]> = image.pixels().map(|p| p.0).collect();
    assert!(distinct.len() > 20, "{} colours", distinct.len());
}
