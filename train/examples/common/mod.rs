//! What the experiments share: their generated data sets, one training run, scoring on
//! held-out images, and the table rows (each seed, then the mean and spread).
#![allow(dead_code)] // each example uses a subset

use anyhow::Result;
use retina_model::BackendChoice;
use retina_train::config::TrainConfig;
use retina_train::dataset::DatasetFormat;
use retina_train::eval;
use retina_train::synth::{self, SynthOptions};
use retina_train::trainer::{self, DataSource, FitRequest};
use std::path::{Path, PathBuf};

/// A grade mix with enough referable eyes to learn from in a short run.
pub const LEARNABLE: [f32; 5] = [0.4, 0.1, 0.3, 0.1, 0.1];

/// `count` generated eyes (128 px, the [`LEARNABLE`] grade mix) in `work/name`, made once and
/// reused by later runs; returns the label file.
pub fn generated(work: &Path, name: &str, count: usize, seed: u64) -> Result<PathBuf> {
    generated_with(work, name, count, seed, LEARNABLE)
}

/// [`generated`] with another grade mix.
pub fn generated_with(
    work: &Path,
    name: &str,
    count: usize,
    seed: u64,
    grades: [f32; 5],
) -> Result<PathBuf> {
    let out = work.join(name);
    if !out.join("labels.csv").is_file() {
        synth::generate(&SynthOptions {
            out: out.clone(),
            count,
            size: 128,
            seed,
            grades,
            missing: 0.0,
            ungradable: 0.0,
            format: DatasetFormat::Native,
            progress: false,
        })?;
    }
    Ok(out.join("labels.csv"))
}

/// Trains a run `work/name` (replacing one left there) on `labels` with the config `toml`
/// (and a teacher: a distillation); returns the run directory.
pub fn train(
    work: &Path,
    name: &str,
    labels: &Path,
    toml: &str,
    teacher: Option<&Path>,
) -> Result<PathBuf> {
    train_with_val(work, name, labels, None, toml::from_str(toml)?, teacher)
}

/// [`train`] with a validation set of its own (instead of a split of `labels`).
pub fn train_with_val(
    work: &Path,
    name: &str,
    labels: &Path,
    val: Option<&Path>,
    config: TrainConfig,
    teacher: Option<&Path>,
) -> Result<PathBuf> {
    let out = work.join(name);
    let _ = std::fs::remove_dir_all(&out);
    trainer::fit(FitRequest {
        data: DataSource::Labels {
            path: labels.to_path_buf(),
            format: DatasetFormat::Native,
            images: None,
            val: val.map(Path::to_path_buf),
        },
        out: out.clone(),
        config,
        backend: "cpu".into(),
        skip_bad_images: false,
        command: format!("examples ({name})"),
        resumed: Vec::new(),
        teacher: teacher.map(Path::to_path_buf),
    })?;
    Ok(out)
}

/// The metrics of the bundle `model` on the held-out `test` set, at its default operating
/// point (`eval`'s `metrics.json`).
pub fn score(model: &Path, test: &Path, out: &Path) -> Result<serde_json::Value> {
    eval::evaluate(
        model,
        test,
        DatasetFormat::Native,
        None,
        out,
        None,
        BackendChoice::Cpu,
    )
}

/// `metrics[head][key]`, NaN where absent.
pub fn metric(m: &serde_json::Value, head: &str, key: &str) -> f64 {
    m[head][key].as_f64().unwrap_or(f64::NAN)
}

/// Mean and sample standard deviation.
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

/// The columns of one condition's table row: for each metric, every seed's value and their
/// mean ± sd (`per_seed[seed][metric]`).
pub fn row(label: &str, per_seed: &[Vec<f64>]) -> String {
    let metrics = per_seed.first().map_or(0, Vec::len);
    let mut cells = vec![label.to_string()];
    for k in 0..metrics {
        let v: Vec<f64> = per_seed.iter().map(|s| s[k]).collect();
        let (m, sd) = mean_sd(&v);
        let each: Vec<String> = v.iter().map(|x| format!("{x:.3}")).collect();
        cells.push(format!("{m:.3} ± {sd:.3} ({})", each.join(", ")));
    }
    format!("| {} |", cells.join(" | "))
}

/// The table's header: the condition column, then one per metric.
pub fn header(first: &str, metrics: &[&str]) -> String {
    let mut s = format!("| {first} | {} |\n|", metrics.join(" | "));
    for _ in 0..=metrics.len() {
        s.push_str("---|");
    }
    s
}

/// `[WORK_DIR] [SEEDS] [EPOCHS]` from the command line, with defaults.
pub fn args(name: &str, epochs: usize) -> Result<(PathBuf, u64, usize)> {
    let mut args = std::env::args().skip(1);
    let work = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("retina-{name}")));
    let seeds: u64 = args.next().map_or(Ok(3), |s| s.parse())?;
    let epochs: usize = args.next().map_or(Ok(epochs), |s| s.parse())?;
    Ok((work, seeds, epochs))
}
