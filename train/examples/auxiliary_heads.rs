//! Do the auxiliary heads help the diagnosis?
//!
//! Trains the `small` network on the same generated images with the auxiliary heads' losses on
//! (`fluid`, `vessel_growth`: the default) and off (their loss weights 0, so the trunk learns
//! from the diagnosis alone), for several seeds, and scores the diagnosis head on held-out
//! generated images: quadratic kappa and referable-DR AUC, each seed and their mean and spread.
//! The quality head's teaching is off in both, so the comparison is of the clinical heads only.
//!
//!     cargo run --example auxiliary_heads -- [WORK_DIR] [SEEDS] [EPOCHS]

mod common;

use anyhow::Result;
use retina_model::BackendChoice;
use retina_train::config::TrainConfig;
use retina_train::dataset::DatasetFormat;
use retina_train::eval;
use retina_train::trainer::{self, DataSource, FitRequest};
use std::path::PathBuf;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let work = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("retina-auxiliary-heads"));
    let seeds: u64 = args.next().map_or(Ok(3), |s| s.parse())?;
    let epochs: usize = args.next().map_or(Ok(12), |s| s.parse())?;
    let train = common::generated(&work, "train", 600, 41)?;
    let test = common::generated(&work, "test", 300, 42)?;
    println!("| auxiliary heads | seed | diagnosis kappa | referable AUC |");
    println!("|---|---|---|---|");
    for (label, aux_weight) in [("on", None), ("off", Some(0.0))] {
        let (mut kappas, mut aucs) = (Vec::new(), Vec::new());
        for seed in 0..seeds {
            let off = aux_weight.map_or(String::new(), |w: f64| {
                format!(
                    "[[loss.heads]]\nhead = \"fluid\"\nweight = {w}\n\
                     [[loss.heads]]\nhead = \"vessel_growth\"\nweight = {w}\n"
                )
            });
            let config: TrainConfig = toml::from_str(&format!(
                "epochs = {epochs}\nseed = {seed}\n[model]\nimage_size = 96\n\
                 [optimizer]\nlearning_rate = 3e-3\n[data]\nquality_share = 0.0\n[loss]\n{off}"
            ))?;
            let out = work.join(format!("run-{label}-{seed}"));
            let _ = std::fs::remove_dir_all(&out);
            trainer::fit(FitRequest {
                data: DataSource::Labels {
                    path: train.clone(),
                    format: DatasetFormat::Native,
                    images: None,
                    val: None,
                },
                out: out.clone(),
                config,
                backend: "cpu".into(),
                skip_bad_images: false,
                command: "examples/auxiliary_heads".into(),
                resumed: Vec::new(),
                teacher: None,
            })?;
            let m = eval::evaluate(
                &out.join("model"),
                &test,
                DatasetFormat::Native,
                None,
                &out.join("eval"),
                None,
                BackendChoice::Cpu,
            )?;
            let kappa = m["diagnosis"]["quadratic_kappa"]
                .as_f64()
                .unwrap_or(f64::NAN);
            let auc = m["diagnosis"]["referable_auc"].as_f64().unwrap_or(f64::NAN);
            println!("| {label} | {seed} | {kappa:.3} | {auc:.3} |");
            kappas.push(kappa);
            aucs.push(auc);
        }
        let (km, ks) = mean_sd(&kappas);
        let (am, asd) = mean_sd(&aucs);
        println!("| {label} | mean ± sd | {km:.3} ± {ks:.3} | {am:.3} ± {asd:.3} |");
    }
    Ok(())
}

/// Mean and sample standard deviation.
fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}
