//! Distillation (`retina-train distill`): the student learns the teacher's outputs and
//! features, a resumed run continues exactly, and a teacher that cannot teach this student is
//! refused before any data is read.

mod common;

use common::{data, logs, request};
use retina_train::config::TrainConfig;
use retina_train::trainer::{self, Resume};
use std::path::{Path, PathBuf};

/// The embedded default model: `small` at 128 px with the clinical heads and the quality head.
fn default_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/default-model")
}

fn config(text: &str) -> TrainConfig {
    toml::from_str(&format!(
        "batch_size = 8\n{text}\n[data]\nquality_share = 0.0\nsampling = \"shuffle\"\n"
    ))
    .unwrap()
}

#[test]
fn a_student_trained_from_the_teacher_alone_moves_toward_it() {
    let dir = tempfile::tempdir().unwrap();
    let labels = data(&dir.path().join("data"), 96, 96, 7);
    // No labelled loss: everything the student learns comes from the teacher, which sees the
    // same views at its own 128 px while the student sees them at 48.
    let cfg = config(
        "epochs = 4\n[model]\nimage_size = 48\n[optimizer]\nlearning_rate = 3e-3\n\
         [distill]\nlabels = 0.0\nfeatures = 1.0\nteacher_stage = 3\nstudent_stage = 4",
    );
    let out = dir.path().join("run");
    let mut req = request(&labels, &out, cfg);
    req.teacher = Some(default_model());
    trainer::fit(req).unwrap();
    let logs = logs(&out);
    let term = |epoch: usize, name: &str| logs[epoch].train_distill_loss[name];
    // The diagnosis KL falls slowest: five grades from a 48 px view.
    for (name, fraction) in [("logits", 0.9), ("binary", 0.75), ("features", 0.5)] {
        let (first, last) = (term(0, name), term(3, name));
        assert!(
            first.is_finite() && last < fraction * first,
            "the {name} term should fall below {fraction} of its first epoch's as the student \
             learns the teacher: {first} -> {last}"
        );
    }
    // The labelled heads' losses are logged but weigh nothing in the total.
    let l = &logs[3];
    let distilled: f64 = l.train_distill_loss.values().sum();
    assert!(
        (l.train_loss - distilled - l.train_l2).abs() < 1e-3 * l.train_loss,
        "total {} = distillation {distilled} + L2 {}",
        l.train_loss,
        l.train_l2
    );
    let meta = std::fs::read_to_string(out.join("model/model.json")).unwrap();
    assert!(meta.contains("\"teacher\""), "{meta}");
    // The exported student is the student alone: 48 px, no projection weights.
    let weights = std::fs::read(out.join("model/weights.safetensors")).unwrap();
    assert!(!String::from_utf8_lossy(&weights[..4096.min(weights.len())]).contains("proj"));
    assert!(meta.contains("\"image_size\": 48"), "{meta}");
}

/// Without augmentation the loader still makes the teacher's own input (its 128 px from the
/// student's 32 px run).
#[test]
fn the_teacher_gets_its_own_input_without_augmentation() {
    let dir = tempfile::tempdir().unwrap();
    let labels = data(&dir.path().join("data"), 24, 64, 5);
    let out = dir.path().join("run");
    let mut req = request(
        &labels,
        &out,
        config("epochs = 1\n[model]\nimage_size = 32\n[distill]\nfeatures = 1.0"),
    );
    req.config.data.augment = None;
    req.teacher = Some(default_model());
    trainer::fit(req).unwrap();
    let l = &logs(&out)[0];
    assert!(l.train_distill_loss["logits"] > 0.0, "{l:?}");
    assert!(l.train_distill_loss["features"] > 0.0, "{l:?}");
}

#[test]
fn a_resumed_distillation_continues_as_if_uninterrupted() {
    let dir = tempfile::tempdir().unwrap();
    let labels = data(&dir.path().join("data"), 40, 64, 3);
    // A teacher with the student's own preprocessing: the student's input is reused.
    let teacher = dir.path().join("teacher");
    trainer::fit(request(
        &labels,
        &teacher,
        config("epochs = 1\n[model]\nimage_size = 48"),
    ))
    .unwrap();
    let cfg = |epochs: usize| {
        config(&format!(
            "epochs = {epochs}\n[model]\nimage_size = 48\n[distill]\nfeatures = 1.0\n\
             student_stage = 3"
        ))
    };
    let straight = dir.path().join("straight");
    let mut req = request(&labels, &straight, cfg(2));
    req.teacher = Some(teacher.join("model"));
    trainer::fit(req).unwrap();

    let split = dir.path().join("split");
    let mut req = request(&labels, &split, cfg(1));
    req.teacher = Some(teacher.join("model"));
    trainer::fit(req).unwrap();
    let more = retina_train::config::Overrides::default().set("epochs", 2i64);
    trainer::resume(&split, &Resume::new(more)).unwrap();

    let (a, b) = (&logs(&straight)[1], &logs(&split)[1]);
    for (name, x) in &a.train_distill_loss {
        let y = b.train_distill_loss[name];
        assert!(
            (x - y).abs() <= 1e-4 * x.abs().max(1e-3),
            "{name}: {x} uninterrupted, {y} resumed (the projection or its moments were lost)"
        );
    }
    assert!((a.train_loss - b.train_loss).abs() <= 1e-4 * a.train_loss);
}

#[test]
fn a_teacher_that_cannot_teach_the_student_is_refused_before_the_data_is_read() {
    let dir = tempfile::tempdir().unwrap();
    // The label file does not exist: each refusal must come first.
    let labels = dir.path().join("missing.csv");
    let refuse = |distill: &str, teacher: PathBuf| {
        let mut req = request(
            &labels,
            &dir.path().join("run"),
            config(&format!("epochs = 1\n[distill]\n{distill}")),
        );
        req.teacher = Some(teacher);
        format!("{:#}", trainer::fit(req).unwrap_err())
    };
    let e = refuse("student_stage = 7", default_model());
    assert!(
        e.contains("distill.student_stage = 7") && e.contains("1 to 4"),
        "{e}"
    );
    let e = refuse("teacher_stage = 0", default_model());
    assert!(e.contains("distill.teacher_stage = 0"), "{e}");
    let e = refuse("temperature = 0.0", default_model());
    assert!(e.contains("distill.temperature"), "{e}");
    let e = refuse(
        "labels = 0.0\nlogits = 0.0\nbinary = 0.0\nfeatures = 0.0",
        default_model(),
    );
    assert!(e.contains("learn nothing"), "{e}");
    let e = refuse("", dir.path().to_path_buf());
    assert!(
        e.contains("teacher bundle") && e.contains("model.json"),
        "{e}"
    );
}

/// Each term is its divergence times its weight, and a term whose weight is 0 is absent: the
/// same student output and teacher input under two sets of weights.
#[test]
fn each_term_is_weighted_by_its_own_weight() {
    use retina_model::burn::prelude::*;
    use retina_model::{BackendChoice, RetinaConfig};
    use retina_train::distill::{DistillConfig, Distiller};
    let device = BackendChoice::Cpu.select().unwrap().device;
    let ad = device.clone().autodiff();
    let mut student = RetinaConfig::preset("small").unwrap();
    student.preprocess.image_size = 32;
    let distiller = |logits: f32, binary: f32, features: f32| {
        let config = DistillConfig {
            logits,
            binary,
            features,
            ..DistillConfig::default()
        };
        Distiller::new(config, &default_model(), &student, &device).unwrap()
    };
    let one = distiller(1.0, 1.0, 1.0);
    let net = student.init(&ad).unwrap();
    let projection = one.projection(&ad);
    let x = Tensor::<4>::random(
        [2, 3, 32, 32],
        retina_model::burn::tensor::Distribution::Uniform(-1.0, 1.0),
        &ad,
    );
    let t = Tensor::<4>::random(
        [2, 3, 128, 128],
        retina_model::burn::tensor::Distribution::Uniform(-1.0, 1.0),
        &device,
    );
    let (out, map) = net.forward_keeping(x, one.student_stage().unwrap());
    let value = |d: &Distiller| -> Vec<Option<f32>> {
        d.terms(&out, Some(map.clone()), projection.as_ref(), t.clone())
            .parts()
            .iter()
            .map(|p| p.map(|v| v.clone().into_scalar()))
            .collect()
    };
    let base = value(&one);
    assert!(base.iter().all(|v| v.is_some_and(|v| v > 0.0)), "{base:?}");
    let scaled = value(&distiller(2.0, 3.0, 0.5));
    for (k, (b, s)) in base.iter().zip(&scaled).enumerate() {
        let (b, s) = (b.unwrap(), s.unwrap());
        let w = [2.0, 3.0, 0.5][k];
        assert!(
            (s - w * b).abs() <= 1e-4 * s.abs(),
            "term {k}: {s} vs {w} x {b}"
        );
    }
    let off = value(&distiller(1.0, 0.0, 1.0));
    assert!(off[1].is_none(), "a binary term at weight 0: {off:?}");
}
