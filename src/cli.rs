//! Command line: `serve`, `classify` (offline, same JSON as the API) and `models`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, Subcommand};

use crate::api::{ErrorDetail, ErrorResponse};
use crate::config::{CliOverrides, Config, ModelOverrides, ServerOverrides};
use crate::model::{ModelCard, ModelRegistry, sha256_file};
use crate::params::ClassifyParams;
use crate::pipeline::Pipeline;

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
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// List the configured models and check their files.
    Models,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = match &cli.command {
        Command::Serve { bind } => {
            CliOverrides { server: bind.clone().map(|bind| ServerOverrides { bind: Some(bind) }), ..Default::default() }
        }
        Command::Classify { model: Some(model), .. } => CliOverrides {
            models: Some(ModelOverrides { load: Some(vec![model.clone()]), default: Some(model.clone()) }),
            ..Default::default()
        },
        _ => CliOverrides::default(),
    };
    let config_path = cli.config.clone().or_else(|| Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.is_file()));
    let config = match Config::load(config_path.as_deref(), &overrides) {
        Ok(config) => config,
        Err(e) => return fail(&e.to_string()),
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
        Command::Classify { model, top_k, images } => runtime.block_on(classify(config, model, top_k, &images)),
        Command::Models => list_models(&config),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("pandaguard: {message}");
    ExitCode::FAILURE
}

async fn classify(config: Config, model: Option<String>, top_k: Option<usize>, images: &[PathBuf]) -> ExitCode {
    let mut pairs: Vec<(&str, String)> = Vec::new();
    if let Some(model) = &model {
        pairs.push(("model", model.clone()));
    }
    if let Some(k) = top_k {
        pairs.push(("top_k", k.to_string()));
    }
    let params = match ClassifyParams::from_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str())), &config) {
        Ok(params) => params,
        Err(e) => return fail(&e.to_string()),
    };
    let config = Arc::new(config);
    let names = vec![params.model.clone().unwrap_or_else(|| config.models.default.clone())];
    let loader_config = Arc::clone(&config);
    let registry = match tokio::task::spawn_blocking(move || ModelRegistry::load_only(&loader_config, &names)).await {
        Ok(Ok(registry)) => Arc::new(registry),
        Ok(Err(message)) => return fail(&message),
        Err(e) => return fail(&e.to_string()),
    };
    let pipeline = Pipeline::new(config, registry);
    let mut failures = 0;
    for (index, path) in images.iter().enumerate() {
        let started = Instant::now();
        let result = match std::fs::read(path) {
            Ok(bytes) => pipeline.classify(bytes.into(), &params, format!("cli-{index}"), started).await,
            Err(e) => Err(crate::error::ApiError::BadRequest(format!("{}: {e}", path.display()))),
        };
        let line = match result {
            Ok(answer) => serde_json::to_string(&answer),
            Err(error) => {
                failures += 1;
                let detail = ErrorDetail { code: error.code().into(), message: format!("{}: {error}", path.display()) };
                serde_json::to_string(&ErrorResponse { error: detail })
            }
        };
        match line {
            Ok(line) => println!("{line}"),
            Err(e) => return fail(&e.to_string()),
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
