//! The project's folders and the labelled sample photos (`make setup` copies them).

use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn venv_python() -> PathBuf {
    root().join(".venv/bin/python")
}

/// The 20 labelled ImageNet photos that foolbox ships: path and ImageNet class.
pub fn samples() -> Vec<(PathBuf, usize)> {
    let dir = root().join("testdata/imagenet");
    let csv = std::fs::read_to_string(dir.join("labels.csv"))
        .expect("testdata/imagenet/labels.csv is missing: run `make setup`");
    csv.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let (file, class) = line.split_once(',').expect("file,class_id");
            (dir.join(file), class.trim().parse().expect("class id"))
        })
        .collect()
}

/// The bytes and class of the sample photo whose file name ends with `name`.
pub fn photo(name: &str) -> (Vec<u8>, usize) {
    let (path, class) = samples().into_iter().find(|(p, _)| p.ends_with(name)).expect("a sample photo");
    (read(&path), class)
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Writes the tiny generated test models into `dir` (tests/fixtures/make_linear_model.py):
/// `tiny-linear` (two classes, logits) and `tiny-softmax` (the same graph ending in
/// softmax, output kind `probabilities`), with their cards and labels.
pub fn tiny_models(dir: &Path) {
    let status = std::process::Command::new(venv_python())
        .arg(root().join("tests/fixtures/make_linear_model.py"))
        .arg(dir)
        .status()
        .expect("run .venv/bin/python (make setup)");
    assert!(status.success(), "make_linear_model.py failed");
}
