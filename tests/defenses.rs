//! The defended answer over HTTP, on the real models: every preset's shape, the
//! details each defense reports, seeded determinism, parameter limits, the clean
//! accuracy of the default preset, and one adversarial photo it must see through.

mod common;

use std::sync::{Arc, LazyLock};

use common::{TestServer, client, photo, read, samples, test_config};
use pandaguard::api::{ClassifyResponse, DefenseReport, ErrorResponse};
use pandaguard::attack::Goal;
use pandaguard::attack::Norm;
use pandaguard::attack::square::{SquareConfig, square_attack};
use pandaguard::defense::blur::BlurDetails;
use pandaguard::defense::ensemble::EnsembleDetails;
use pandaguard::defense::saccade::SaccadeDetails;
use pandaguard::defense::smooth::SmoothDetails;
use pandaguard::imaging::{DecodeLimits, ModelImage, decode, fit_to_input};
use pandaguard::model::ModelRegistry;
use pandaguard::redteam::evaluate::png_bytes;
use pandaguard::redteam::oracle::RawModel;
use reqwest::StatusCode;

const MODELS: [&str; 3] = ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"];

static SERVER: LazyLock<TestServer> = LazyLock::new(|| {
    let mut config = test_config(&MODELS);
    config.server.request_timeout_ms = 60_000;
    TestServer::start(config)
});

async fn classify(body: Vec<u8>, query: &str) -> ClassifyResponse {
    let response = client().post(SERVER.url(&format!("/classify?{query}"))).body(body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{query}");
    response.json().await.unwrap()
}

/// A defense's details as its own type (they travel as JSON).
fn details<T: serde::de::DeserializeOwned>(report: &DefenseReport) -> T {
    serde_json::from_str(report.details.get()).unwrap_or_else(|e| panic!("{} details: {e}", report.name))
}

fn names(answer: &ClassifyResponse) -> Vec<&str> {
    answer.defenses.iter().map(|d| d.name.as_str()).collect()
}

#[tokio::test]
async fn every_preset_answers_raw_and_defended_side_by_side() {
    let (image, class) = photo("imagenet_05_853.jpg");
    let none = classify(image.clone(), "defense=none").await;
    assert!(none.defenses.is_empty());
    assert_eq!(none.defended.class_id, Some(none.raw.class_id));
    assert_eq!((none.suspicious, none.squeeze_score, none.rows), (false, 0.0, 1));

    let fast = classify(image.clone(), "defense=fast").await;
    assert_eq!(names(&fast), ["ensemble"]);
    assert_eq!(fast.rows, 3, "one plain view per model");

    let default = classify(image.clone(), "").await;
    assert_eq!(default.preset, "default");
    assert_eq!(names(&default), ["ensemble"]);
    assert_eq!(default.rows, 3 * 17, "each model: the plain view and 16 noisy views");
    let details: EnsembleDetails = details(&default.defenses[0]);
    let members: Vec<&str> = details.members.iter().map(|m| m.model.as_str()).collect();
    assert_eq!(members, MODELS);

    let strong = classify(image.clone(), "defense=strong").await;
    assert_eq!(names(&strong), ["smooth", "ensemble"]);

    for answer in [&fast, &default, &strong] {
        assert_eq!(answer.raw.class_id, class);
        assert_eq!(answer.defended.class_id, Some(class), "{}", answer.preset);
        assert!(!answer.defended.abstained);
        assert!(!answer.suspicious, "{}: a clean, confidently classified photo", answer.preset);
        assert!((0.0..=2.0).contains(&answer.squeeze_score));
        assert!(answer.defended.top_k.windows(2).all(|w| w[0].probability >= w[1].probability));
        assert!(answer.timing_ms.inference > 0.0);
    }
}

#[tokio::test]
async fn each_defense_reports_its_own_answer_and_details() {
    let (image, _) = photo("imagenet_09_455.jpg");
    let query = "defense=smooth,blur,saccade,ensemble&certify=true&samples=64&fixations=3&seed=5";
    let answer = classify(image, query).await;
    assert_eq!(answer.preset, "custom");
    assert_eq!(names(&answer), ["smooth", "blur", "saccade", "ensemble"]);
    assert_eq!(answer.defended.method, "mean of smooth, blur, saccade, ensemble");
    for defense in &answer.defenses {
        match defense.name.as_str() {
            "smooth" => {
                let s: SmoothDetails = details(defense);
                assert!(s.samples_used >= 1 && s.samples_used <= 64);
                assert_eq!(*s.planned_looks.last().unwrap(), 64);
                let votes: u64 = s.votes.iter().map(|v| v.count).sum();
                assert!(votes <= s.samples_used);
                let certificate = s.certificate.as_ref().expect("certify=true reports a certificate");
                assert_eq!(certificate.estimation_samples, 64);
                assert!(certificate.selection_samples > 0);
                let max = pandaguard::stats::max_certifiable_radius(0.05, 64, 0.001);
                assert!((certificate.max_radius - max).abs() < 1e-9);
                match certificate.radius {
                    Some(radius) => {
                        assert!(certificate.p_lower > 0.5 && radius > 0.0 && radius <= max + 1e-6, "{certificate:?}")
                    }
                    None => assert!(certificate.abstained && certificate.p_lower <= 0.5),
                }
            }
            "blur" => {
                let b: BlurDetails = details(defense);
                assert_eq!(defense.views, 2);
                assert!(b.gaussian.confidence > 0.0 && b.median.confidence > 0.0);
            }
            "saccade" => {
                let s: SaccadeDetails = details(defense);
                assert_eq!(s.fixations.len(), 3);
                assert_eq!(defense.views, 4, "three crops and the full view");
                for f in &s.fixations {
                    // Fixations are in original-image pixels (the photo is 512×512).
                    assert!(f.x > 0.0 && f.x < 512.0 && f.y > 0.0 && f.y < 512.0 && f.size > 0.0, "{f:?}");
                }
            }
            "ensemble" => assert_eq!(details::<EnsembleDetails>(defense).members.len(), 3),
            other => panic!("unexpected defense {other}"),
        }
    }
}

#[tokio::test]
async fn the_same_seed_gives_the_same_answer() {
    let (image, _) = photo("imagenet_16_251.jpg");
    let query = "defense=smooth,ensemble&samples=32&seed=42";
    let first = serde_json::to_value(classify(image.clone(), query).await.defenses).unwrap();
    let second = serde_json::to_value(classify(image.clone(), query).await.defenses).unwrap();
    assert_eq!(first, second);
    let other =
        serde_json::to_value(classify(image.clone(), "defense=smooth,ensemble&samples=32&seed=43").await.defenses)
            .unwrap();
    assert_ne!(first, other, "another seed draws other noise");
    let unseeded = classify(image, "defense=fast").await;
    assert_ne!(unseeded.seed, 0, "a fresh seed is drawn and reported");
}

/// A deployment facing attackers keeps the noise to itself: with
/// `defense.allow_client_seed = false` a request naming a seed is refused, and the
/// seed of an unseeded answer comes from the image (the same image, the same seed and
/// answer; another image, another seed), never from the client.
#[tokio::test]
async fn a_server_can_refuse_client_seeds() {
    let mut config = test_config(&["efficientnet-lite0"]);
    config.defense.allow_client_seed = false;
    let server = TestServer::start(config);
    let (image, _) = photo("imagenet_16_251.jpg");
    let response = client().post(server.url("/classify?seed=42")).body(image.clone()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let error: ErrorResponse = response.json().await.unwrap();
    assert_eq!(error.error.code, "invalid_parameter");
    assert!(error.error.message.contains("allow_client_seed"), "{}", error.error.message);
    let (other, _) = photo("imagenet_05_853.jpg");
    let mut answers = Vec::new();
    for body in [image.clone(), image, other] {
        let response = client().post(server.url("/classify?defense=default")).body(body).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        answers.push(response.json::<ClassifyResponse>().await.unwrap());
    }
    assert_eq!(answers[0].seed, answers[1].seed, "the same image gets the same seed");
    assert_eq!(
        serde_json::to_value(&answers[0].defended).unwrap(),
        serde_json::to_value(&answers[1].defended).unwrap(),
        "and the same defended answer"
    );
    assert_ne!(answers[0].seed, answers[2].seed, "another image, another seed");
}

#[tokio::test]
async fn a_clean_confident_photo_settles_before_the_sample_budget() {
    let (image, class) = photo("imagenet_08_915.jpg");
    let answer = classify(image, "defense=smooth&samples=128&seed=3").await;
    let details: SmoothDetails = details(&answer.defenses[0]);
    assert_eq!(answer.defenses[0].class_id, Some(class));
    assert!(details.samples_used < 64, "PREDICT used {} of 128 samples", details.samples_used);
    assert_eq!(answer.rows, 1 + details.samples_used as usize);
}

#[tokio::test]
async fn out_of_range_defense_parameters_are_refused() {
    let (image, _) = photo("imagenet_05_853.jpg");
    for query in [
        "sigma=5",
        "sigma=0",
        "samples=0",
        "samples=100000",
        "alpha=1",
        "defense=bogus",
        "certify=perhaps",
        "fixations=50",
        "blur_sigma=100",
        "models=resnet50",
        "ensemble_samples=9999",
    ] {
        let response =
            client().post(SERVER.url(&format!("/classify?{query}"))).body(image.clone()).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY, "{query}");
        let error: ErrorResponse = response.json().await.unwrap();
        assert_eq!(error.error.code, "invalid_parameter");
    }
}

/// The acceptance figure as a regression test: on the 20 labelled photos the default
/// preset is within one photo of the raw model's top-1.
#[tokio::test]
async fn the_default_preset_keeps_clean_accuracy() {
    let (mut raw, mut defended) = (0, 0);
    let photos = samples();
    for (index, (path, class)) in photos.iter().enumerate() {
        let answer = classify(read(path), &format!("seed={index}")).await;
        raw += usize::from(answer.raw.class_id == *class);
        defended += usize::from(answer.defended.class_id == Some(*class));
    }
    println!("clean top-1: raw {raw}/{n}, default {defended}/{n}", n = photos.len());
    assert!(defended + 1 >= raw, "default {defended} vs raw {raw}");
}

/// A Square-Attack photo that fools the raw model: the default preset answers the
/// true label and flags it.
#[tokio::test]
async fn the_default_preset_sees_through_a_square_attack() {
    let (bytes, class) = photo("imagenet_09_455.jpg");
    let registry = Arc::new(ModelRegistry::load_only(&test_config(&MODELS), &[MODELS[0].to_string()]).unwrap());
    let raw = Arc::clone(registry.get(MODELS[0]).unwrap());
    let clean = ModelImage::from_rgb(
        &fit_to_input(&decode(&bytes, &DecodeLimits::from(&test_config(&MODELS).image)).unwrap(), &raw.card.input)
            .unwrap(),
    );
    let outcome = tokio::task::spawn_blocking(move || {
        let mut oracle = RawModel::new(raw);
        let config = SquareConfig::new(Norm::Linf, 8.0 / 255.0, 1000, 0);
        square_attack(&mut oracle, &clean, &Goal::Untargeted { true_class: class }, &config, &mut |_, _| {}).unwrap()
    })
    .await
    .unwrap();
    registry.close();
    assert!(outcome.success, "the attack should fool the raw model at 8/255");
    assert!(outcome.linf <= 8.0 / 255.0 + 1e-6);
    let answer = classify(png_bytes(&outcome.adversarial).unwrap(), "seed=1").await;
    assert_ne!(answer.raw.class_id, class, "the PNG keeps the perturbation");
    assert_eq!(answer.defended.class_id, Some(class));
    assert!(answer.suspicious);
}
