//! The `fit` command line: `--set`, `--print-config`, and flags refused with `--resume`.

use retina_train::config::TrainConfig;
use std::process::{Command, Output};

fn fit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_retina-train"))
        .arg("fit")
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `--print-config` prints the file with the flags applied, trains nothing, and what it prints
/// loads back to the same config.
#[test]
fn print_config_resolves_file_and_flags_and_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("train.toml");
    std::fs::write(
        &file,
        "epochs = 4\n[optimizer]\nweight_decay = 0.01\n[data]\naugment = false\n",
    )
    .unwrap();
    let out = fit(&[
        "--config",
        file.to_str().unwrap(),
        "--set",
        "optimizer.learning_rate=1e-3",
        "--set",
        "model.preset=reference",
        "--set",
        "data.sampling=balanced",
        "--set",
        "loss.objective=screening",
        "--epochs",
        "6",
        "--image-size",
        "96",
        "--print-config",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &text).unwrap();
    let c = TrainConfig::load(&printed).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(c.epochs, 6);
    assert_eq!(c.optimizer.learning_rate, 1e-3);
    assert_eq!(c.optimizer.weight_decay, 0.01);
    assert_eq!(c.model.preset, "reference");
    assert_eq!(c.model.image_size, Some(96));
    assert_eq!(c.data.augment, None);
    assert_eq!(c.data.sampling, retina_train::data::Sampling::Balanced);
    assert_eq!(c.loss.objective, retina_train::loss::Objective::Screening);
    // Identical: printing the loaded config gives the same text.
    assert_eq!(c.to_toml().unwrap(), text);
    // Nothing was trained or written.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn an_unknown_key_names_the_valid_ones() {
    let out = fit(&["--set", "optimizer.lr=0.1", "--print-config"]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("optimizer.lr"), "{e}");
    assert!(
        e.contains("learning_rate") && e.contains("clip_grad_norm"),
        "the keys of [optimizer]: {e}"
    );
    let out = fit(&["--set", "modle.preset=small", "--print-config"]);
    let e = stderr(&out);
    assert!(
        !out.status.success() && e.contains("modle") && e.contains("model"),
        "{e}"
    );
}

/// The data of a run is fixed: data flags with `--resume` are refused with the flag's name
/// (before the run directory is even read).
#[test]
fn data_flags_are_refused_with_resume() {
    let dir = tempfile::tempdir().unwrap();
    for flags in [
        &["--data", "labels.csv"][..],
        &["--synthetic", "10"],
        &["--format", "aptos"],
        &["--skip-bad-images"],
        &["--out", "elsewhere"],
    ] {
        let mut args = vec!["--resume", dir.path().to_str().unwrap()];
        args.extend_from_slice(flags);
        let out = fit(&args);
        let e = stderr(&out);
        assert!(!out.status.success(), "{flags:?}");
        assert!(
            e.contains(&format!("{} cannot be used with --resume", flags[0])),
            "{flags:?}: {e}"
        );
    }
}

/// The flags that describe generated images are refused without `--synthetic`, rather than
/// ignored; a malformed grade mix is named.
#[test]
fn synthetic_flags_need_synthetic() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("run");
    for flags in [
        &["--synthetic-grades", "1,1,1,1,1"][..],
        &["--synthetic-size", "64"],
        &["--synthetic-ungradable", "0.1"],
    ] {
        let mut args = vec!["--data", "labels.csv", "--out", out_dir.to_str().unwrap()];
        args.extend_from_slice(flags);
        let out = fit(&args);
        let e = stderr(&out);
        assert!(!out.status.success(), "{flags:?}");
        assert!(
            e.contains(&format!("{} describes generated images", flags[0]))
                && e.contains("--synthetic N"),
            "{flags:?}: {e}"
        );
    }
    let out = fit(&[
        "--synthetic",
        "8",
        "--synthetic-grades",
        "1,1,1",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("five comma-separated weights"), "{e}");
    assert!(!out_dir.exists(), "nothing written");
}

/// `prepare` through the binary: its settings come from the same flags as `fit`'s, it names a
/// bad photograph by line and exits 2, and `fit --data STORE` refuses flags that do not apply.
#[test]
fn prepare_and_fit_from_a_store_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_retina-train");
    let data = dir.path().join("data");
    let synth = Command::new(bin)
        .args(["synth", "--out", data.to_str().unwrap(), "--count", "6"])
        .args(["--size", "96", "--format", "eyepacs"])
        .output()
        .unwrap();
    assert!(synth.status.success(), "{}", stderr(&synth));
    let labels = data.join("trainLabels.csv");
    let store = dir.path().join("store");
    let prepare = |extra: &[&str]| {
        Command::new(bin)
            .args(["prepare", "--data", labels.to_str().unwrap()])
            .args(["--format", "eyepacs", "--out", store.to_str().unwrap()])
            .args(["--image-size", "32"])
            .args(extra)
            .output()
            .unwrap()
    };
    // The third row's photograph is cut short.
    let third = std::fs::read_to_string(&labels)
        .unwrap()
        .lines()
        .nth(3)
        .unwrap()
        .to_string();
    let photo = data
        .join("train")
        .join(format!("{}.jpeg", third.split(',').next().unwrap()));
    let good = std::fs::read(&photo).unwrap();
    std::fs::write(&photo, &good[..good.len() / 2]).unwrap();
    let out = prepare(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("trainLabels.csv:4: "),
        "{}",
        stderr(&out)
    );
    std::fs::write(&photo, &good).unwrap();
    let out = prepare(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["stored"], 6);
    assert_eq!(
        summary["resumed"], 2,
        "the rows before the bad one were kept"
    );

    let run = dir.path().join("run");
    let out = fit(&["--data", store.to_str().unwrap(), "--format", "aptos"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("is a prepared store"),
        "{}",
        stderr(&out)
    );
    let out = fit(&[
        "--data",
        store.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
        "--image-size",
        "64",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("image_size: store 32, model 64"),
        "{}",
        stderr(&out)
    );
}

/// `distill` takes `fit`'s flags and a teacher: it trains a student at its own input size,
/// records the teacher, refuses a teacher with `--resume`, and resumes with the run's own.
#[test]
fn distill_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let teacher = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/default-model");
    let distill = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_retina-train"))
            .arg("distill")
            .args(args)
            .output()
            .unwrap()
    };
    let o = distill(&[
        "--teacher",
        teacher,
        "--synthetic",
        "24",
        "--synthetic-size",
        "64",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--set",
        "data.quality_share=0",
        "--set",
        "distill.temperature=2",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("temperature 2"), "{}", stderr(&o));
    let log = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(log.contains("\"train_distill_loss\""), "{log}");
    let o = distill(&["--resume", run.to_str().unwrap(), "--teacher", teacher]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("keeps its teacher"), "{}", stderr(&o));
    let o = distill(&[
        "--resume",
        run.to_str().unwrap(),
        "--set",
        "distill.logits=2",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("distill.logits"), "{}", stderr(&o));
    let o = distill(&["--resume", run.to_str().unwrap(), "--epochs", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = distill(&[
        "--synthetic",
        "8",
        "--out",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--teacher"), "{}", stderr(&o));
}
