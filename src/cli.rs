//! Command line: `serve`, `classify` (offline, same JSON as the API), `attack`,
//! `evaluate` and `models`.
//!
//! Owns: the flags and turning them into the config and each command's options. It
//! may use `http` (serving, the JSON answer and its errors for `classify`), and is the
//! only module besides `http/` that may.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, Subcommand};

use crate::attack::Norm;
use crate::config::{CliOverrides, Config, ModelOverrides, ServerOverrides};
use crate::defense::Defenses;
use crate::http::ApiError;
use crate::http::answer::classify_response;
use crate::model::{ModelCard, ModelRegistry, sha256_file};
use crate::params::{ClassifyParams, ClassifyQuery};
use crate::pipeline::Pipeline;
use crate::redteam::attack::{AttackOptions, Method};
use crate::redteam::evaluate::{AttackKind, EvaluateOptions};
use crate::redteam::whitebox::WhiteBoxAttack;

const DEFAULT_CONFIG: &str = "config/default.toml";

#[derive(Parser)]
#[command(name = "pandaguard", version, about = "Image classification that shows the raw and the defended answer")]
struct Cli {
    /// Configuration file [default: config/default.toml when it exists]
    #[arg(long, global = true, env = "PANDAGUARD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API.
    Serve {
        /// Listen address, e.g. 0.0.0.0:8080 (overrides server.bind).
        #[arg(long)]
        bind: Option<String>,
    },
    /// Classify image files offline; prints one JSON object per image, as the API would.
    Classify {
        /// Model to use (default: models.default).
        #[arg(long)]
        model: Option<String>,
        /// Classes to list per image.
        #[arg(long)]
        top_k: Option<usize>,
        /// Defense preset or comma list (as the API's `defense`).
        #[arg(long)]
        defense: Option<String>,
        /// Any other API parameter, e.g. `--param sigma=0.25 --param seed=7`.
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Measure clean and adversarial accuracy of the raw model and defense presets
    /// on labelled photos; writes report.json and report.md.
    Evaluate(EvaluateArgs),
    /// Attack one photo (Square, NES or HopSkipJump, optionally with EOT; or white-box PGD / APGD
    /// with gradients of the served ONNX files) against the raw model, a
    /// defended preset in-process, or a running server (`--url`); writes the adversarial
    /// PNG at the model's input size and prints one JSON line.
    Attack(AttackArgs),
    /// List the configured models and check their files.
    Models,
    /// Draw the white-box robust-accuracy chart from the report.json of one or more
    /// `evaluate` runs (white-box runs are long: split them by radius or preset, chart
    /// them together).
    Chart {
        /// report.json files, comma-separated or repeated.
        #[arg(long, value_delimiter = ',', required = true)]
        reports: Vec<PathBuf>,
        /// The PNG to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Draw a decision map: the labels of the raw model and of a defended preset on a
    /// 2-D slice of input space around IMAGE, toward an adversarial example (given, or
    /// found by a short Square Attack) and a random orthogonal direction.
    Map(MapArgs),
}

#[derive(clap::Args)]
struct MapArgs {
    /// The photo at the centre of the map.
    image: PathBuf,
    /// An adversarial example of IMAGE (e.g. from `pandaguard attack`): the x axis
    /// points at it. Default: a short Square Attack on the raw model finds one.
    #[arg(long)]
    toward: Option<PathBuf>,
    /// Defense preset or comma list (as the API's `defense`).
    #[arg(long, default_value = "fast")]
    preset: String,
    /// Raw model (default: models.default).
    #[arg(long)]
    model: Option<String>,
    /// Half the map's side along x, in `--norm` units [default: 1.5x the adversarial
    /// example's distance, or 10 in L2 / 0.06 in L∞ without one]
    #[arg(long)]
    radius: Option<f32>,
    /// l2 or linf.
    #[arg(long, default_value = "l2")]
    norm: String,
    /// Cells per side.
    #[arg(long, default_value_t = 41)]
    grid: usize,
    /// Seed of every cell's defenses and of the random direction.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The PNG to write.
    #[arg(long)]
    out: PathBuf,
    /// Also write the map as JSON (the `POST /explore` answer).
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct EvaluateArgs {
    /// Folder of labelled photos.
    #[arg(long, default_value = "testdata/imagenet")]
    images: PathBuf,
    /// CSV `file,class_id` [default: IMAGES/labels.csv]
    #[arg(long)]
    labels: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "default")]
    presets: Vec<String>,
    /// L∞ budgets, as fractions like 4/255 or decimals.
    #[arg(long, value_delimiter = ',', default_value = "4/255,8/255")]
    eps: Vec<String>,
    /// Query budget per attack.
    #[arg(long, default_value_t = 1000)]
    queries: usize,
    #[arg(long, default_value_t = 20)]
    max_images: usize,
    #[arg(long, default_value = "reports/evaluate")]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also set the squeeze threshold on clean variants (5% false positives).
    #[arg(long)]
    calibrate: bool,
    /// square / nes / hsja attack the raw model (transfer; hsja is decision-based,
    /// success within ε); square-eot / nes-eot attack
    /// each preset's pipeline itself with EOT (adaptive); pgd / apgd-ce / apgd-dlr are
    /// white-box (gradients through a copy of each preset, EOT), worst case per photo.
    #[arg(long, value_delimiter = ',', default_value = "square,square-eot")]
    attacks: Vec<String>,
    /// Gradient steps of each white-box attack.
    #[arg(long, default_value_t = 20)]
    whitebox_steps: usize,
    /// Noisy views per noisy term and step of the white-box attacks (EOT draws).
    #[arg(long, default_value_t = 3)]
    whitebox_eot: usize,
    /// Presets attacked white-box [default: every preset but none].
    #[arg(long, value_delimiter = ',')]
    whitebox_presets: Vec<String>,
    /// Also an L2 white-box row at these radii (e.g. 0.5,1.0).
    #[arg(long, value_delimiter = ',')]
    whitebox_l2: Vec<f32>,
    /// Query budget of the adaptive attacks (each query is --eot defended answers).
    #[arg(long, default_value_t = 100)]
    adaptive_queries: usize,
    /// Photos attacked adaptively (the first ones the raw model gets right).
    #[arg(long, default_value_t = 8)]
    adaptive_images: usize,
    /// Draws of the defense's randomness averaged per adaptive query.
    #[arg(long, default_value_t = 2)]
    eot: usize,
    /// Noise levels of the certified-accuracy curves (empty: none).
    #[arg(long, value_delimiter = ',', default_value = "0.12,0.25")]
    certify_sigmas: Vec<f32>,
    /// CERTIFY's estimation samples n.
    #[arg(long, default_value_t = 200)]
    certify_samples: u32,
    /// Square Attack's initial fraction of changed pixels (the paper's 0.05 fooled
    /// Lite0 on 12/17 photos at 4/255, 0.15 on 14/17: README "Red team").
    #[arg(long, default_value_t = 0.15)]
    p_init: f32,
    /// Presets attacked adaptively [default: every preset but none].
    #[arg(long, value_delimiter = ',')]
    adaptive_presets: Vec<String>,
    /// The adaptive attacker fixes the defense's noise: every candidate is scored
    /// under the same --eot seeds (common random numbers) instead of fresh draws.
    #[arg(long)]
    fixed_noise: bool,
}

impl EvaluateArgs {
    fn into_options(self) -> Result<EvaluateOptions, String> {
        if self.eot == 0 {
            return Err("--eot must be at least 1".into());
        }
        Ok(EvaluateOptions {
            images: self.images,
            labels: self.labels,
            presets: self.presets,
            epsilons: self.eps.iter().map(|e| parse_fraction(e)).collect::<Result<Vec<_>, _>>()?,
            queries: self.queries,
            max_images: self.max_images,
            out: self.out,
            seed: self.seed,
            calibrate: self.calibrate,
            attacks: self
                .attacks
                .iter()
                .filter(|a| WhiteBoxAttack::parse(a).is_none())
                .map(|a| AttackKind::parse(a).map_err(|e| e.to_string()))
                .collect::<Result<_, _>>()?,
            whitebox: self.attacks.iter().filter_map(|a| WhiteBoxAttack::parse(a)).collect(),
            whitebox_steps: self.whitebox_steps,
            whitebox_eot: self.whitebox_eot,
            whitebox_presets: self.whitebox_presets,
            whitebox_l2: self.whitebox_l2,
            adaptive_queries: self.adaptive_queries,
            adaptive_images: self.adaptive_images,
            eot: self.eot,
            certify_sigmas: self.certify_sigmas.into_iter().filter(|s| *s > 0.0).collect(),
            certify_samples: self.certify_samples,
            p_init: Some(self.p_init),
            adaptive_presets: self.adaptive_presets,
            fixed_noise: self.fixed_noise,
        })
    }
}

#[derive(clap::Args)]
struct AttackArgs {
    image: PathBuf,
    /// Where to write the adversarial PNG.
    #[arg(long)]
    out: PathBuf,
    /// Class name or id to reach (default: untargeted, any other answer).
    #[arg(long)]
    target: Option<String>,
    /// Budget: a fraction like 4/255 or a decimal, in [0,1] pixel units.
    #[arg(long, default_value = "4/255")]
    eps: String,
    #[arg(long, value_enum, default_value = "linf")]
    norm: NormArg,
    #[arg(long, value_enum, default_value = "square")]
    method: MethodArg,
    #[arg(long, default_value_t = 1000)]
    queries: usize,
    /// `raw`, `defended` (the `default` preset) or a preset / comma list of defenses.
    #[arg(long, default_value = "raw")]
    against: String,
    /// Draws of the defense's randomness averaged per query (expectation over transformation).
    #[arg(long, default_value_t = 1)]
    eot: usize,
    /// Attack a running server, e.g. http://localhost:8080, through POST /classify only.
    #[arg(long)]
    url: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Square Attack's initial fraction of changed pixels [default: the paper's,
    /// 0.05 for L∞ and 0.1 for L2].
    #[arg(long)]
    p_init: Option<f32>,
    /// Fix the defense's noise: every candidate is scored under the same --eot seeds
    /// (common random numbers) instead of fresh draws; success is still judged with
    /// a seed the attack never used.
    #[arg(long)]
    fixed_noise: bool,
    /// Raw model (default: the configured or served default).
    #[arg(long)]
    model: Option<String>,
    /// API keys for --url, comma-separated (sent as `Authorization: Bearer`); with
    /// --adaptive each key is one client identity.
    #[arg(long, value_delimiter = ',', env = "PANDAGUARD_ATTACK_API_KEYS", hide_env_values = true)]
    api_keys: Vec<String>,
    /// Evade a server's query-attack detection (OARS-style): on a 429
    /// `query_attack_detected`, switch to the next key, send queries with random noise
    /// of growing magnitude and take larger steps; refused requests count against
    /// --queries. Needs --url.
    #[arg(long)]
    adaptive: bool,
    /// With --adaptive: switch key every N accepted queries too (0: only when refused).
    #[arg(long, default_value_t = 0)]
    rotate_every: usize,
    /// With --adaptive: when every key is in its cooldown, wait up to this many seconds
    /// for the first to be free (the server's Retry-After), else stop.
    #[arg(long, default_value_t = 60)]
    max_wait: u64,
}

impl AttackArgs {
    fn into_options(self) -> Result<AttackOptions, String> {
        Ok(AttackOptions {
            image: self.image,
            out: self.out,
            target: self.target,
            epsilon: parse_fraction(&self.eps)?,
            norm: match self.norm {
                NormArg::Linf => Norm::Linf,
                NormArg::L2 => Norm::L2,
            },
            method: match self.method {
                MethodArg::Square => Method::Square,
                MethodArg::Nes => Method::Nes,
                MethodArg::Hsja => Method::Hsja,
                MethodArg::Pgd => Method::Pgd,
                MethodArg::ApgdCe => Method::ApgdCe,
                MethodArg::ApgdDlr => Method::ApgdDlr,
            },
            queries: self.queries,
            against: self.against,
            eot: self.eot,
            url: self.url,
            seed: self.seed,
            p_init: self.p_init,
            fixed_noise: self.fixed_noise,
            model: self.model,
            api_keys: self.api_keys.into_iter().map(|k| k.trim().to_string()).filter(|k| !k.is_empty()).collect(),
            adaptive: self.adaptive,
            rotate_every: self.rotate_every,
            max_wait: std::time::Duration::from_secs(self.max_wait),
        })
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum NormArg {
    Linf,
    L2,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MethodArg {
    Square,
    Nes,
    /// HopSkipJump: decision-based (top-1 answers only), untargeted; --eps is the
    /// distance that counts as success.
    Hsja,
    /// White-box PGD (cross-entropy, then margin loss) with EOT; --queries = steps.
    Pgd,
    /// White-box APGD on the cross-entropy (AutoAttack's step-size schedule).
    ApgdCe,
    /// White-box APGD on the DLR loss.
    ApgdDlr,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = match &cli.command {
        Command::Serve { bind } => {
            CliOverrides { server: bind.clone().map(|bind| ServerOverrides { bind: Some(bind) }), ..Default::default() }
        }
        Command::Classify { model: Some(model), .. } => CliOverrides {
            models: Some(ModelOverrides { load: None, default: Some(model.clone()) }),
            ..Default::default()
        },
        _ => CliOverrides::default(),
    };
    let config_path = cli.config.clone().or_else(|| Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.is_file()));
    let config = match Config::load(config_path.as_deref(), &overrides) {
        Ok(config) => config,
        Err(e) => return fail(&e),
    };
    let serving = matches!(cli.command, Command::Serve { .. });
    crate::telemetry::init_logging(serving && config.server.log_format == "json");

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    match cli.command {
        Command::Serve { .. } => match runtime.block_on(crate::http::serve(config)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e.to_string()),
        },
        Command::Classify { model, top_k, defense, params, images } => {
            let mut pairs: Vec<(String, String)> = Vec::new();
            pairs.extend(model.map(|m| ("model".to_string(), m)));
            pairs.extend(top_k.map(|k| ("top_k".to_string(), k.to_string())));
            pairs.extend(defense.map(|d| ("defense".to_string(), d)));
            for param in params {
                match param.split_once('=') {
                    Some((key, value)) => pairs.push((key.to_string(), value.to_string())),
                    None => return fail(&format!("--param {param:?} is not KEY=VALUE")),
                }
            }
            runtime.block_on(classify(config, &pairs, &images))
        }
        Command::Map(args) => match runtime.block_on(map(config, args)) {
            Ok(summary) => {
                eprintln!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Chart { reports, out } => match whitebox_chart_of(&reports, &out) {
            Ok(rows) => {
                eprintln!("wrote {} ({rows} white-box rows)", out.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Evaluate(args) => {
            let options = match args.into_options() {
                Ok(options) => options,
                Err(e) => return fail(&e),
            };
            match crate::redteam::evaluate::run(&runtime, config, &options) {
                Ok(_) => {
                    eprintln!("wrote {}/report.md and report.json", options.out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::Attack(args) => {
            let options = match args.into_options() {
                Ok(options) => options,
                Err(e) => return fail(&e),
            };
            match crate::redteam::attack::run(&runtime, config, &options) {
                Ok(report) => match serde_json::to_string(&report) {
                    Ok(line) => {
                        println!("{line}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(&e),
                },
                Err(e) => fail(&e),
            }
        }
        Command::Models => list_models(&config),
    }
}

fn fail(message: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("pandaguard: {message}");
    ExitCode::FAILURE
}

/// "4/255" or "0.0157".
pub fn parse_fraction(text: &str) -> Result<f32, String> {
    let value = match text.split_once('/') {
        Some((a, b)) => a.trim().parse::<f32>().ok().zip(b.trim().parse::<f32>().ok()).map(|(a, b)| a / b),
        None => text.trim().parse::<f32>().ok(),
    };
    value.filter(|v| v.is_finite() && *v > 0.0).ok_or_else(|| format!("{text:?} is not a positive number or fraction"))
}

/// `pandaguard map`: the decision map of one photo, in-process, written as PNG (and JSON).
async fn map(config: Config, args: MapArgs) -> Result<String, String> {
    use crate::explore::{MapRequest, decision_map, draw_map};

    let norm = match args.norm.as_str() {
        "l2" => Norm::L2,
        "linf" => Norm::Linf,
        other => return Err(format!("--norm {other:?}: use l2 or linf")),
    };
    let mut explore = config.explore.clone();
    // The operator's own machine: the server's bounds on a map do not apply.
    explore.max_grid = explore.max_grid.max(args.grid);
    explore.max_rows = usize::MAX;
    explore.timeout_ms = u64::MAX / 4;
    explore.cell_concurrency = explore.cell_concurrency.max(32);
    let config = Arc::new(config);
    let registry = tokio::task::spawn_blocking({
        let config = Arc::clone(&config);
        move || ModelRegistry::load(&config)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let pipeline = Arc::new(Pipeline::new(Arc::clone(&config), Arc::new(registry)));
    let mut pairs = vec![("defense", args.preset.clone()), ("seed", args.seed.to_string())];
    if let Some(model) = &args.model {
        pairs.push(("model", model.clone()));
    }
    let params = pipeline.params(pairs.iter().map(|(k, v)| (*k, v.as_str()))).map_err(|e| e.to_string())?;
    let raw = params.model.clone().unwrap_or_else(|| pipeline.registry().default_name().to_string());
    let read = |path: &PathBuf| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
    let origin = pipeline.model_input(read(&args.image)?.into(), &raw).await.map_err(|e| e.to_string())?;
    let toward = match &args.toward {
        Some(path) => Some(pipeline.model_input(read(path)?.into(), &raw).await.map_err(|e| e.to_string())?),
        None => None,
    };
    let request = MapRequest { params, grid: args.grid, radius: args.radius, norm };
    let bar = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} cells, {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("map");
    let map = decision_map(&pipeline, origin, toward, &request, &explore, Some(bar.clone()))
        .await
        .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    let labels = pipeline.registry().get(&map.model).map(|m| m.labels.clone()).ok_or("the model vanished")?;
    draw_map(&map, &labels, &args.out).map_err(|e| e.to_string())?;
    if let Some(path) = &args.json {
        let answer = crate::http::explore_response(&map, &labels, "cli".into());
        let text = serde_json::to_string(&answer).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let share = |side: &crate::explore::SideMap| {
        side.labels.iter().filter(|l| **l == Some(map.true_class)).count() as f64 / side.labels.len().max(1) as f64
    };
    Ok(format!(
        "wrote {}: {}x{} cells, radius {:.3} L2 ({:.4} L∞), the image's label on {:.0}% of the raw map and {:.0}% \
         of the defended one, {} rows in {:.1} s",
        args.out.display(),
        map.grid,
        map.grid,
        map.radius_l2,
        map.radius_linf,
        100.0 * share(&map.raw),
        100.0 * share(&map.defended),
        map.rows,
        map.elapsed.as_secs_f64()
    ))
}

async fn classify(config: Config, pairs: &[(String, String)], images: &[PathBuf]) -> ExitCode {
    let defenses = Defenses::standard();
    let params = ClassifyQuery::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .and_then(|query| ClassifyParams::resolve(&query, &config, &defenses));
    let params = match params {
        Ok(params) => params,
        Err(e) => return fail(&e),
    };
    let config = Arc::new(config);
    // Only the models this request needs: the raw model, plus the models a defense
    // that reads `models` may use (the named ones, else every configured model of the
    // preset's precision).
    let raw = params.model.clone().unwrap_or_else(|| config.models.default.clone());
    let mut names = vec![raw];
    let reads_models =
        params.defense.defenses.iter().filter_map(|d| defenses.get(d)).any(|d| d.parameters().contains(&"models"));
    if reads_models {
        let members = params.defense.ensemble_members(config.models.load.iter().map(String::as_str));
        names.extend(members.into_iter().filter(|m| !names.contains(m)).collect::<Vec<_>>());
    }
    let loader_config = Arc::clone(&config);
    let registry = match tokio::task::spawn_blocking(move || ModelRegistry::load_only(&loader_config, &names)).await {
        Ok(Ok(registry)) => Arc::new(registry),
        Ok(Err(error)) => return fail(&error),
        Err(e) => return fail(&e),
    };
    let pipeline = Pipeline::with_defenses(config, registry, defenses);
    let mut failures = 0;
    for (index, path) in images.iter().enumerate() {
        let started = Instant::now();
        let result = match std::fs::read(path) {
            Ok(bytes) => pipeline.classify(bytes.into(), &params, started).await.map_err(ApiError::from),
            Err(e) => Err(ApiError::BadRequest(format!("{}: {e}", path.display()))),
        };
        let line = match result {
            Ok(outcome) => serde_json::to_string(&classify_response(&outcome, format!("cli-{index}"), params.top_k)),
            Err(error) => {
                failures += 1;
                let mut body = error.body();
                body.error.message = format!("{}: {}", path.display(), body.error.message);
                serde_json::to_string(&body)
            }
        };
        match line {
            Ok(line) => println!("{line}"),
            Err(e) => return fail(&e),
        }
    }
    pipeline.registry().close();
    if failures == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn list_models(config: &Config) -> ExitCode {
    let dir: &Path = &config.models.dir;
    let mut ok = true;
    println!("{:<20} {:>9} {:<11} {:>6} {:>6}  file", "model", "input", "license", "top1", "top5");
    for name in &config.models.load {
        match ModelCard::load(dir, name) {
            Ok(card) => {
                let path = dir.join(&card.file);
                let status = match sha256_file(&path) {
                    Ok(digest) if digest == card.sha256 => "ok".to_string(),
                    Ok(_) => {
                        ok = false;
                        "sha256 MISMATCH (run `make models`)".to_string()
                    }
                    Err(_) => {
                        ok = false;
                        "MISSING (run `make models`)".to_string()
                    }
                };
                let (top1, top5) = card.accuracy.as_ref().map_or((f64::NAN, f64::NAN), |a| (a.top1, a.top5));
                println!(
                    "{:<20} {:>9} {:<11} {:>6.2} {:>6.2}  {} {}{}",
                    card.name,
                    format!("{}x{}", card.input.width, card.input.height),
                    card.license,
                    top1,
                    top5,
                    path.display(),
                    status,
                    if *name == config.models.default { " (default)" } else { "" }
                );
            }
            Err(e) => {
                ok = false;
                println!("{name:<20} {e}");
            }
        }
    }
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// The white-box rows of `reports`, charted into `out`; how many rows were read.
fn whitebox_chart_of(reports: &[PathBuf], out: &Path) -> Result<usize, String> {
    let mut rows = Vec::new();
    for path in reports {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // Only the white-box rows are read: other sections hold NaNs written as null.
        #[derive(serde::Deserialize)]
        struct WhiteBoxRows {
            whitebox: Vec<crate::redteam::evaluate::WhiteBoxRow>,
        }
        let report: WhiteBoxRows =
            serde_json::from_str(&text).map_err(|e| format!("{}: not an evaluate report: {e}", path.display()))?;
        rows.extend(report.whitebox);
    }
    if !rows.iter().any(|r| r.norm == "linf") {
        return Err("the reports hold no L∞ white-box rows (run evaluate with --attacks pgd,apgd-ce)".into());
    }
    crate::redteam::evaluate::whitebox_chart(&rows, out).map_err(|e| e.to_string())?;
    Ok(rows.len())
}
