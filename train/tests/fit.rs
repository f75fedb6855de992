//! Training end to end at library level: it learns, and a config file with a typo is located.

mod common;

use common::{data, logs, request};
use retina_train::config::TrainConfig;
use retina_train::trainer;

#[test]
fn small_preset_learns_referable_dr_on_generated_images() {
    let dir = tempfile::tempdir().unwrap();
    let labels = data(&dir.path().join("data"), 480, 128, 1);
    let config = TrainConfig {
        image_size: Some(96),
        epochs: 8,
        batch_size: 16,
        learning_rate: 3e-3,
        val_fraction: 0.25,
        ..TrainConfig::default()
    };
    let out = dir.path().join("run");
    let summary = trainer::fit(request(&labels, &out, config)).unwrap();
    let logs = logs(&out);
    assert_eq!(logs.len(), 8);
    assert!(
        logs.last().unwrap().train_loss < 0.85 * logs[0].train_loss,
        "training loss must fall: {:?}",
        logs.iter().map(|l| l.train_loss).collect::<Vec<_>>()
    );
    let auc = summary.best_val["diagnosis.referable_auc"];
    assert!(
        auc > 0.7,
        "validation referable AUC {auc} should beat chance (0.5) by a margin"
    );
    // Every head's loss and the L2 term are logged separately.
    assert_eq!(logs[0].train_head_loss.len(), 3);
    assert!(logs[0].train_l2 > 0.0);
    // The exported bundle carries the validation metrics of its epoch.
    let meta = retina_model::BundleMetadata::load(&out.join("model")).unwrap();
    assert_eq!(meta.provenance.epochs, Some(summary.best_epoch));
    assert_eq!(meta.provenance.metrics["diagnosis.referable_auc"], auc);
}

#[test]
fn a_config_file_with_a_typo_is_located() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("train.toml");
    std::fs::write(&p, "preset = \"small\"\nepochs = 3\nlearnig_rate = 0.1\n").unwrap();
    let e = TrainConfig::load(&p).unwrap_err().to_string();
    assert!(
        e.contains("train.toml:3:1") && e.contains("learnig_rate"),
        "{e}"
    );
    std::fs::write(
        &p,
        "preset = \"small\"\naugment = false\n[loss]\nobjective = \"screening\"\n[[loss.heads]]\nhead = \"fluid\"\nweight = 0.5\nclass_weights = [1.0, 1000.0]\n",
    )
    .unwrap();
    let c = TrainConfig::load(&p).unwrap();
    assert_eq!(c.augment, None);
    // The README's head override parses and moves the head.
    std::fs::write(
        &p,
        "[[heads]]\nname = \"diagnosis\"\nkind = { multiclass = 5 }\nattach = \"embedding\"\n\n[[heads]]\nname = \"vessel_growth\"\nkind = \"regression\"\nattach = \"stage3\"\nhidden = 32\n",
    )
    .unwrap();
    let m = TrainConfig::load(&p).unwrap().model_config().unwrap();
    assert_eq!(m.heads.len(), 2);
    assert_eq!(m.heads[1].attach, retina_model::AttachPoint::Stage(3));
    assert_eq!(m.heads[1].hidden, Some(32));
    assert_eq!(c.loss.heads[0].weight, 0.5);
    assert_eq!(c.epochs, TrainConfig::default().epochs);
}

#[test]
fn the_readme_train_toml_parses() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let start = readme
        .find("A `train.toml`:")
        .expect("README shows a train.toml");
    let block = &readme[start..];
    let block = &block[block.find("```toml\n").unwrap() + 8..];
    let block = &block[..block.find("```").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("train.toml");
    std::fs::write(&p, block).unwrap();
    let c = TrainConfig::load(&p).unwrap_or_else(|e| panic!("{e}\n{block}"));
    assert_eq!(c.loss.objective, retina_train::loss::Objective::Screening);
    assert_eq!(c.loss.heads.len(), 3);
    assert_eq!(c.loss.heads[2].weight, 0.0);
    c.validate().unwrap();
    let specs = c.model_config().unwrap().heads;
    c.loss.init(&specs, &|_| Some(vec![5, 1, 1, 1, 1])).unwrap();
}
