//! A distilled student against the same student trained alone, at the same budget, and
//! against its teacher.
//!
//! The teacher is the embedded default model (`small` at 128 px, trained on 2,000 generated
//! eyes for 40 epochs: the main command, with a tenth of the eyes ungradable and every step
//! teaching the quality head). The student is the `small` network at 96 px, trained for the same
//! epochs on the same 600 generated eyes twice per seed: on the labels alone (`fit`), and on
//! the labels plus the teacher's losses (`distill` with the `[distill]` defaults: temperature
//! 4, KL on the diagnosis logits, soft fluid targets, the last stages' features matched). Two
//! label budgets: every eye labelled, and 100 of the 600 labelled (the others' cells blank,
//! which masks their labelled losses; the teacher still teaches on them). Scored on 300
//! held-out eyes; quality teaching is off, so no answer is refused.
//!
//!     cargo run --example distillation -- [WORK_DIR] [SEEDS] [EPOCHS] [TEACHER]

mod common;

use anyhow::Result;
use std::path::{Path, PathBuf};

fn main() -> Result<()> {
    let (work, seeds, epochs) = common::args("distillation", 12)?;
    let teacher = std::env::args()
        .nth(4)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../assets/default-model"
            ))
        });
    let train = common::generated(&work, "train", 600, 71)?;
    let test = common::generated(&work, "test", 300, 72)?;
    let few = labelled_first(&train, 100)?;
    let columns = ["diagnosis kappa", "referable AUC", "fluid AUC"];
    println!("{}", common::header("model", &columns));
    let scores = |m: &serde_json::Value| {
        vec![
            common::metric(m, "diagnosis", "quadratic_kappa"),
            common::metric(m, "diagnosis", "referable_auc"),
            common::metric(m, "fluid", "auc"),
        ]
    };
    let m = common::score(&teacher, &test, &work.join("teacher-eval"))?;
    println!("{}", common::row("teacher (128 px)", &[scores(&m)]));
    for (budget, labels) in [("600 labelled", &train), ("100 of 600 labelled", &few)] {
        for (how, with_teacher) in [("alone", None), ("distilled", Some(teacher.as_path()))] {
            let mut per_seed = Vec::new();
            for seed in 0..seeds {
                let config = format!(
                    "epochs = {epochs}\nseed = {seed}\nselect_metric = \"diagnosis.referable_auc\"\n[model]\nimage_size = 96\n[model.preprocess]\ngraham = false\n\
                     [optimizer]\nlearning_rate = 3e-3\n[data]\nquality_share = 0.0\nsampling = \"shuffle\"\n"
                );
                let name = format!(
                    "run-{}-{how}-{seed}",
                    budget.split(' ').next().unwrap_or("")
                );
                let out = common::train(&work, &name, labels, &config, with_teacher)?;
                let m = common::score(&out.join("model"), &test, &out.join("eval"))?;
                per_seed.push(scores(&m));
            }
            println!(
                "{}",
                common::row(&format!("student {how} (96 px), {budget}"), &per_seed)
            );
        }
    }
    Ok(())
}

/// A copy of the label file `labels` with every label cell after the first `keep` rows blank.
fn labelled_first(labels: &Path, keep: usize) -> Result<PathBuf> {
    let text = std::fs::read_to_string(labels)?;
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        if i == 0 || i <= keep {
            out.push_str(line);
        } else {
            let image = line.split(',').next().unwrap_or_default();
            let cells = line.matches(',').count();
            out.push_str(image);
            out.push_str(&",".repeat(cells));
        }
        out.push('\n');
    }
    let path = labels.with_file_name(format!("labels-first-{keep}.csv"));
    std::fs::write(&path, out)?;
    Ok(path)
}
