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

fn main() -> Result<()> {
    let (work, seeds, epochs) = common::args("auxiliary-heads", 12)?;
    let train = common::generated(&work, "train", 600, 41)?;
    let test = common::generated(&work, "test", 300, 42)?;
    println!(
        "{}",
        common::header("auxiliary heads", &["diagnosis kappa", "referable AUC"])
    );
    for (label, aux_weight) in [("on", None), ("off", Some(0.0))] {
        let mut per_seed = Vec::new();
        for seed in 0..seeds {
            let off = aux_weight.map_or(String::new(), |w: f64| {
                format!(
                    "[[loss.heads]]\nhead = \"fluid\"\nweight = {w}\n\
                     [[loss.heads]]\nhead = \"vessel_growth\"\nweight = {w}\n"
                )
            });
            let config = format!(
                "epochs = {epochs}\nseed = {seed}\nselect_metric = \"diagnosis.referable_auc\"\n[model]\nimage_size = 96\n[model.preprocess]\ngraham = false\n\
                 [optimizer]\nlearning_rate = 3e-3\n[data]\nquality_share = 0.0\nsampling = \"shuffle\"\n[loss]\n{off}"
            );
            let name = format!("run-{label}-{seed}");
            let out = common::train(&work, &name, &train, &config, None)?;
            let m = common::score(&out.join("model"), &test, &out.join("eval"))?;
            per_seed.push(vec![
                common::metric(&m, "diagnosis", "quadratic_kappa"),
                common::metric(&m, "diagnosis", "referable_auc"),
            ]);
        }
        println!("{}", common::row(label, &per_seed));
    }
    Ok(())
}
