//! A deliberate bias: screening (fewer missed referable eyes) against confirmation (fewer
//! false alarms).
//!
//! Trains the `small` network on 600 generated eyes with `loss.objective` = `balanced`,
//! `screening` and `confirmation` (`bias_factor` 4: the avoided error costs four times the
//! other in the diagnosis and fluid losses), several seeds each, and scores each bundle on 300
//! held-out eyes at its default operating point (P >= 0.5, no calibration): the bias must show
//! as sensitivity traded for specificity and back, with the ranking (AUC) unchanged.
//!
//!     cargo run --example objective_bias -- [WORK_DIR] [SEEDS] [EPOCHS]

mod common;

use anyhow::Result;

fn main() -> Result<()> {
    let (work, seeds, epochs) = common::args("objective-bias", 12)?;
    let train = common::generated(&work, "train", 600, 61)?;
    let test = common::generated(&work, "test", 300, 62)?;
    println!(
        "{}",
        common::header(
            "objective",
            &[
                "referable sensitivity",
                "referable specificity",
                "referable AUC",
                "fluid sensitivity",
                "fluid specificity"
            ]
        )
    );
    for objective in ["balanced", "screening", "confirmation"] {
        let mut per_seed = Vec::new();
        for seed in 0..seeds {
            let config = format!(
                "epochs = {epochs}\nseed = {seed}\nselect_metric = \"diagnosis.referable_auc\"\n[model]\nimage_size = 96\n[model.preprocess]\ngraham = false\n\
                 [optimizer]\nlearning_rate = 3e-3\n[data]\nquality_share = 0.0\nsampling = \"shuffle\"\n\
                 [loss]\nobjective = \"{objective}\"\nbias_factor = 4.0\n"
            );
            let out = common::train(
                &work,
                &format!("run-{objective}-{seed}"),
                &train,
                &config,
                None,
            )?;
            let m = common::score(&out.join("model"), &test, &out.join("eval"))?;
            per_seed.push(vec![
                common::metric(&m, "diagnosis", "referable_sensitivity"),
                common::metric(&m, "diagnosis", "referable_specificity"),
                common::metric(&m, "diagnosis", "referable_auc"),
                common::metric(&m, "fluid", "sensitivity"),
                common::metric(&m, "fluid", "specificity"),
            ]);
        }
        println!("{}", common::row(objective, &per_seed));
    }
    Ok(())
}
