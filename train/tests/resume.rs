//! Resuming and stopping: one test function in its own binary, because it pins `BURN_DEVICE`
//! (where burn materialises restored optimizer state) before any other thread exists, exactly as
//! the `retina-train` binary does at start-up.

mod common;

use common::{data, logs, request};
use retina_train::config::TrainConfig;
use retina_train::trainer;

#[test]
fn resume_and_stop_on_nan() {
    // SAFETY: the only test in this binary; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("BURN_DEVICE", "flex") };
    resume_matches_an_uninterrupted_run();
    a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint();
}

fn small_config(epochs: usize) -> TrainConfig {
    TrainConfig {
        image_size: Some(32),
        epochs,
        batch_size: 8,
        ..TrainConfig::default()
    }
}

fn resume_matches_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let labels = data(&dir.path().join("data"), 40, 64, 2);
    let straight = dir.path().join("straight");
    trainer::fit(request(&labels, &straight, small_config(3))).unwrap();
    let out = dir.path().join("run");
    trainer::fit(request(&labels, &out, small_config(1))).unwrap();
    assert_eq!(logs(&out).len(), 1);
    // A second `fit` into the same directory is refused; `resume` extends the run.
    let again = trainer::fit(request(&labels, &out, TrainConfig::default()));
    assert!(again.unwrap_err().to_string().contains("--resume"));
    trainer::resume(&out, Some(3)).unwrap();
    let (a, b) = (logs(&straight), logs(&out));
    assert_eq!(b.iter().map(|l| l.epoch).collect::<Vec<_>>(), vec![1, 2, 3]);
    // Same data order, same weights, same optimizer moments: the resumed run follows the
    // uninterrupted one (a lost Adam state would show as a different trajectory).
    for (x, y) in a.iter().zip(&b) {
        let rel = (x.train_loss - y.train_loss).abs() / x.train_loss;
        assert!(
            rel < 1e-3,
            "epoch {}: {} vs {}",
            x.epoch,
            x.train_loss,
            y.train_loss
        );
    }
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["epoch"], 3);
}

fn a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let labels = data(&dir.path().join("data"), 40, 64, 3);
    let out = dir.path().join("run");
    trainer::fit(request(&labels, &out, small_config(1))).unwrap();
    let good = std::fs::read(out.join("checkpoint/model.bpk")).unwrap();
    // Continue with an absurd learning rate: the weights blow up and the loss becomes NaN.
    let run_json = out.join("run.json");
    let mut req: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&run_json).unwrap()).unwrap();
    req["config"]["learning_rate"] = serde_json::json!(1e30);
    std::fs::write(&run_json, req.to_string()).unwrap();
    let err = trainer::resume(&out, Some(4)).unwrap_err().to_string();
    assert!(err.contains("non-finite"), "{err}");
    assert!(err.contains("last good checkpoint (epoch 1)"), "{err}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["epoch"], 1);
    assert_eq!(
        std::fs::read(out.join("checkpoint/model.bpk")).unwrap(),
        good,
        "checkpoint untouched"
    );
    // The exported model still loads.
    retina_model::ModelBundle::load(
        &out.join("model"),
        &retina_model::burn::prelude::Device::flex(),
    )
    .unwrap();
}
