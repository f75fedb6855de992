//! Class weights, oversampling or neither, on a 1:100 skewed training set.
//!
//! 2,000 generated eyes of which 1 in 100 is referable (grades 2-4), the rest healthy or mild;
//! the `small` network trained three ways, several seeds each: plain cross entropy on shuffled
//! batches, inverse-frequency class weights on the diagnosis (`class_weights = "auto"`), and
//! oversampling of the rare grades (`data.sampling = "balanced"`). Scored on 400 held-out eyes of
//! the usual mix (a third of them referable) at the bundle's default operating point (referable
//! when P(grade >= 2) >= 0.5): sensitivity, specificity and referable AUC.
//!
//!     cargo run --example class_balance -- [WORK_DIR] [SEEDS] [EPOCHS]

mod common;

use anyhow::Result;

fn main() -> Result<()> {
    let (work, seeds, epochs) = common::args("class-balance", 8)?;
    let train =
        common::generated_with(&work, "skewed", 2000, 51, [0.9, 0.09, 0.004, 0.003, 0.003])?;
    let test = common::generated(&work, "test", 400, 52)?;
    // The exported epoch is picked on a validation set of the usual mix: a split of the
    // skewed set would hold 4 referable eyes.
    let val = common::generated(&work, "val", 200, 53)?;
    println!(
        "{}",
        common::header(
            "skew handling",
            &[
                "referable sensitivity",
                "referable specificity",
                "referable AUC"
            ]
        )
    );
    let conditions = [
        ("neither", "sampling = \"shuffle\"\n", ""),
        (
            "class weights (auto)",
            "sampling = \"shuffle\"\n",
            "[[loss.heads]]\nhead = \"diagnosis\"\nclass_weights = \"auto\"\n",
        ),
        ("oversampling (balanced)", "sampling = \"balanced\"\n", ""),
    ];
    for (label, data, loss) in conditions {
        let mut per_seed = Vec::new();
        for seed in 0..seeds {
            let config = format!(
                "epochs = {epochs}\nseed = {seed}\nselect_metric = \"diagnosis.referable_auc\"\n[model]\nimage_size = 96\n[model.preprocess]\ngraham = false\n\
                 [optimizer]\nlearning_rate = 3e-3\n[data]\nquality_share = 0.0\n{data}[loss]\n{loss}"
            );
            let name = format!("run-{}-{seed}", label.split(' ').next().unwrap_or(label));
            let out = common::train_with_val(
                &work,
                &name,
                &train,
                Some(&val),
                toml::from_str(&config)?,
                None,
            )?;
            let m = common::score(&out.join("model"), &test, &out.join("eval"))?;
            per_seed.push(vec![
                common::metric(&m, "diagnosis", "referable_sensitivity"),
                common::metric(&m, "diagnosis", "referable_specificity"),
                common::metric(&m, "diagnosis", "referable_auc"),
            ]);
        }
        println!("{}", common::row(label, &per_seed));
    }
    Ok(())
}
