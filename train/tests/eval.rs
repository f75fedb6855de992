//! Evaluation and calibration: thresholds that meet their target, stable metric keys, reports,
//! and refusal of label files that do not match the model.

use retina_model::burn::prelude::Device;
use retina_model::{BackendChoice, BundleMetadata, HeadKind, HeadSpec, ModelBundle, RetinaConfig};
use retina_train::dataset::DatasetFormat;
use retina_train::eval::{self, Target, choose_threshold};
use retina_train::metrics::BinaryCounts;
use retina_train::synth::{self, SynthOptions};
use std::path::{Path, PathBuf};

#[test]
fn a_threshold_for_sensitivity_095_really_gives_it() {
    // 300 scores with overlapping classes.
    let mut scores = Vec::new();
    let mut truth = Vec::new();
    for i in 0..300u32 {
        let pos = i % 3 == 0;
        let noise = ((i * 7919) % 100) as f32 / 100.0;
        scores.push(if pos { 0.3 + 0.7 * noise } else { 0.7 * noise });
        truth.push(pos);
    }
    for target in [0.8, 0.95, 0.99] {
        let t = choose_threshold(&scores, &truth, Target::Sensitivity(target)).unwrap();
        let c = BinaryCounts::at(&scores, &truth, t);
        assert!(c.sensitivity().unwrap() >= target, "target {target}: {c:?}");
        // The highest such threshold: one step up would miss the target.
        let above = scores
            .iter()
            .cloned()
            .filter(|s| *s > t)
            .fold(f32::INFINITY, f32::min);
        if above.is_finite() {
            assert!(
                BinaryCounts::at(&scores, &truth, above)
                    .sensitivity()
                    .unwrap()
                    < target
            );
        }
    }
    // Specificity: the *lowest* threshold that meets the target (the most sensitive one), not
    // merely one that does: "above every score" always has specificity 1.
    for target in [0.8, 0.9, 0.98] {
        let t = choose_threshold(&scores, &truth, Target::Specificity(target)).unwrap();
        let c = BinaryCounts::at(&scores, &truth, t);
        assert!(c.specificity().unwrap() >= target, "target {target}: {c:?}");
        assert!(
            c.sensitivity().unwrap() > 0.0,
            "target {target}: calls nothing positive"
        );
        let below = scores
            .iter()
            .cloned()
            .filter(|s| *s < t)
            .fold(f32::NEG_INFINITY, f32::max);
        assert!(
            BinaryCounts::at(&scores, &truth, below)
                .specificity()
                .unwrap()
                < target,
            "target {target}: {below} < {t} also meets it"
        );
    }
    assert_youden_is_the_best(&scores, &truth);
    assert_eq!(
        choose_threshold(&[0.1, 0.2], &[true, true], Target::Youden),
        None
    );
    assert!("sensitivity=1.5".parse::<Target>().is_err());
    assert_eq!(
        "specificity=0.98".parse::<Target>().unwrap(),
        Target::Specificity(0.98)
    );
}

fn setup(dir: &Path, heads: Option<Vec<HeadSpec>>) -> (PathBuf, PathBuf) {
    let labels_dir = dir.join("data");
    synth::generate(&SynthOptions {
        out: labels_dir.clone(),
        count: 16,
        size: 64,
        seed: 5,
        grades: [1.0; 5],
        missing: 0.25,
        ungradable: 0.0,
        format: DatasetFormat::Native,
        progress: false,
    })
    .unwrap();
    let mut config = RetinaConfig::preset("small").unwrap();
    config.preprocess.image_size = 32;
    if let Some(h) = heads {
        config.heads = h;
    }
    let net = config.init(&Device::flex()).unwrap();
    let model = dir.join("model");
    ModelBundle::new(net, BundleMetadata::new(config))
        .save(&model)
        .unwrap();
    (model, synth::label_path(&labels_dir, DatasetFormat::Native))
}

#[test]
fn eval_writes_stable_keys_report_and_figures_and_calibrate_adds_a_point() {
    let dir = tempfile::tempdir().unwrap();
    let (model, labels) = setup(dir.path(), None);
    let out = dir.path().join("report");
    let m = eval::evaluate(
        &model,
        &labels,
        DatasetFormat::Native,
        None,
        &out,
        None,
        BackendChoice::Cpu,
    )
    .unwrap();
    for key in [
        "diagnosis.quadratic_kappa",
        "diagnosis.referable_auc",
        "diagnosis.referable_sensitivity",
        "diagnosis.referable_specificity",
        "diagnosis.n",
        "fluid.auc",
        "fluid.n",
        "vessel_growth.mae",
        "vessel_growth.n",
    ] {
        let v = key.split('.').fold(&m, |v, k| &v[k]);
        assert!(v.is_number(), "{key} missing or not a number in {m}");
    }
    // Missing labels are left out and counted.
    assert_eq!(
        m["fluid"]["n"].as_u64().unwrap() + m["fluid"]["missing"].as_u64().unwrap(),
        16
    );
    assert!(m["fluid"]["missing"].as_u64().unwrap() > 0);
    let ci = m["diagnosis"]["referable_auc_ci95"].as_array().unwrap();
    let auc = m["diagnosis"]["referable_auc"].as_f64().unwrap();
    assert!(ci[0].as_f64().unwrap() <= auc && auc <= ci[1].as_f64().unwrap());
    for f in [
        "metrics.json",
        "report.md",
        "roc.png",
        "confusion_diagnosis.png",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let png = image::open(out.join("roc.png")).unwrap();
    assert!(png.width() > 100);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("operating point: `default`"), "{report}");
    // The report names the data by what it is, not by the folder it sat in on this machine.
    let here = dir.path().to_str().unwrap();
    assert!(!report.contains(here), "{report}");
    assert!(
        report.contains("- data: `labels.csv` (native format, 16 images, xxh3-128:"),
        "{report}"
    );
    assert!(
        report.contains("- model: `model` (`small` preset"),
        "{report}"
    );
    // report.html: self-contained, every image embedded and decodable, a gallery row (with its
    // thumbnail and heat map) per error shown.
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(!html.contains(here), "machine paths in report.html");
    assert!(
        !html.contains("href="),
        "links out of a self-contained report"
    );
    let srcs: Vec<&str> = html
        .split("src=\"")
        .skip(1)
        .map(|s| s.split('"').next().unwrap())
        .collect();
    assert!(srcs.len() >= 3, "the figures at least: {}", srcs.len());
    for src in &srcs {
        use base64::Engine as _;
        let b64 = src
            .strip_prefix("data:image/png;base64,")
            .unwrap_or_else(|| panic!("not embedded: {}", &src[..src.len().min(60)]));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        assert!(image::load_from_memory(&bytes).is_ok());
    }
    let rows = html.matches("class=\"fn\"").count() + html.matches("class=\"fp\"").count();
    let gallery_imgs = html
        .split("<table id=\"gallery\">")
        .nth(1)
        .map_or(0, |g| g.matches("<img").count());
    assert_eq!(gallery_imgs, 2 * rows, "a thumbnail and a heat map per row");
    assert!(html.contains("<h1>Evaluation report</h1>"));

    // Calibrate a screening point, then evaluate at it.
    let (name, point, _) = eval::calibrate(
        &model,
        &labels,
        DatasetFormat::Native,
        None,
        Target::Sensitivity(0.95),
        None,
        BackendChoice::Cpu,
    )
    .unwrap();
    assert_eq!(name, "screening");
    let meta = BundleMetadata::load(&model).unwrap();
    assert_eq!(meta.operating_points["screening"], point);
    let m = eval::evaluate(
        &model,
        &labels,
        DatasetFormat::Native,
        None,
        &out,
        Some("screening"),
        BackendChoice::Cpu,
    )
    .unwrap();
    assert_eq!(m["operating_point"]["name"], "screening");
    assert!(m["diagnosis"]["referable_sensitivity"].as_f64().unwrap() >= 0.95);
    // Both classification heads got a temperature (fluid has exactly two classes), and the
    // report scores the probabilities before it as well as after.
    let meta = BundleMetadata::load(&model).unwrap();
    for head in ["diagnosis", "fluid"] {
        let t = meta.config.head(head).unwrap().temperature;
        assert!(t.is_some_and(|t| t != 1.0), "{head}: {t:?}");
    }
    assert_ne!(
        m["fluid"]["brier"].as_f64().unwrap(),
        m["fluid"]["brier_uncalibrated"].as_f64().unwrap()
    );
}

#[test]
fn eval_refuses_labels_for_heads_the_model_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let (model, labels) = setup(
        dir.path(),
        Some(vec![HeadSpec::new(
            "diagnosis".into(),
            HeadKind::Multiclass(5),
        )]),
    );
    let out = dir.path().join("report");
    let e = eval::evaluate(
        &model,
        &labels,
        DatasetFormat::Native,
        None,
        &out,
        None,
        BackendChoice::Cpu,
    )
    .unwrap_err()
    .to_string();
    // The label file's column for a head the model lacks is refused where it is.
    assert!(
        e.contains("labels.csv:1:") && e.contains("unknown column `vessel_growth`"),
        "{e}"
    );
}

/// The training curves of a bundle in a run directory come from its `metrics.jsonl`, read by the
/// trainer's own reader: a damaged line is an error at `file:line:column`, not skipped.
#[test]
fn eval_reports_a_damaged_training_log_where_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let (model, labels) = setup(dir.path(), None);
    let log = r#"{"epoch":1,"train_loss":1.0,"train_head_loss":{},"train_l2":0.1,"val":{},"learning_rate":0.002,"train_img_per_s":10.0,"seconds":1.0}"#;
    std::fs::write(
        dir.path().join("metrics.jsonl"),
        format!("{log}\n{{\"epoch\": 2, \"train_loss\": }}\n"),
    )
    .unwrap();
    let e = eval::evaluate(
        &model,
        &labels,
        DatasetFormat::Native,
        None,
        &dir.path().join("report"),
        None,
        BackendChoice::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("metrics.jsonl:2:"), "{e}");
}

/// Targets as the command line writes them.
#[test]
fn targets_parse_every_form_and_refuse_the_rest() {
    assert_eq!(
        "sensitivity=0.95".parse::<Target>().unwrap(),
        Target::Sensitivity(0.95)
    );
    assert_eq!("youden".parse::<Target>().unwrap(), Target::Youden);
    for bad in [
        "recall=0.9",
        "sensitivity",
        "sensitivity=high",
        "specificity=-0.1",
        "",
    ] {
        let e = bad.parse::<Target>().unwrap_err();
        assert!(e.contains("use sensitivity=0.95"), "{bad}: {e}");
    }
    assert_eq!(Target::Sensitivity(0.9).default_name(), "screening");
    assert_eq!(Target::Specificity(0.9).default_name(), "confirmation");
}

/// Where no score separates enough negatives, the threshold goes just above the highest score
/// (the next float up), positive or negative, so nothing is called positive.
#[test]
fn a_target_only_met_above_every_score_gets_the_next_float_up() {
    for (scores, top) in [([0.2f32, 0.9, 0.5], 0.9f32), ([-0.7, -0.5, -0.6], -0.5)] {
        let truth = [false, false, true];
        let t = choose_threshold(&scores, &truth, Target::Specificity(1.0)).unwrap();
        assert!(t > top, "{t} <= {top}");
        assert_eq!(
            t,
            f32::from_bits(if top > 0.0 {
                top.to_bits() + 1
            } else {
                top.to_bits() - 1
            })
        );
        let c = BinaryCounts::at(&scores, &truth, t);
        assert_eq!(c.specificity(), Some(1.0));
    }
}

/// Youden's threshold reaches the maximum of sensitivity + specificity over every threshold,
/// found by brute force.
fn assert_youden_is_the_best(scores: &[f32], truth: &[bool]) {
    let j = |t: f32| {
        let c = BinaryCounts::at(scores, truth, t);
        c.sensitivity().unwrap() + c.specificity().unwrap()
    };
    let best = scores.iter().map(|s| j(*s)).fold(f64::MIN, f64::max);
    let t = choose_threshold(scores, truth, Target::Youden).unwrap();
    assert!(
        (j(t) - best).abs() < 1e-12,
        "{scores:?}: Youden {} at {t}, best {best}",
        j(t)
    );
}

/// Youden's index against a brute-force maximum over many generated score sets (where the sum
/// and, say, the product of sensitivity and specificity pick different thresholds).
#[test]
fn youden_is_the_maximum_of_sensitivity_plus_specificity_on_any_set() {
    let mut state = 12345u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    for _ in 0..200 {
        let n = 12;
        let truth: Vec<bool> = (0..n).map(|i| i % 3 == 0).collect();
        let scores: Vec<f32> = truth
            .iter()
            .map(|&t| next() * 0.8 + if t { 0.2 } else { 0.0 })
            .collect();
        assert_youden_is_the_best(&scores, &truth);
    }
}

/// A bundle's first calibration fits its classification heads' temperatures and becomes its
/// default point; a second keeps both. A head whose labels are all one class keeps 1.
#[test]
fn the_first_calibration_fits_temperatures_and_sets_the_default_and_later_ones_keep_them() {
    let dir = tempfile::tempdir().unwrap();
    let heads = vec![
        HeadSpec::default_heads()
            .into_iter()
            .find(|h| h.name == "diagnosis")
            .unwrap(),
        HeadSpec::new("lesion_type".into(), HeadKind::Multiclass(3)),
    ];
    let (model, labels) = setup(dir.path(), Some(heads));
    // The generated labels, rewritten for these heads: `lesion_type` all class 0.
    let text = std::fs::read_to_string(&labels).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let (img, grade) = (
        header.iter().position(|h| *h == "image").unwrap(),
        header.iter().position(|h| *h == "diagnosis").unwrap(),
    );
    let mut rewritten = String::from("image,diagnosis,lesion_type\n");
    for l in lines {
        let f: Vec<&str> = l.split(',').collect();
        rewritten += &format!("{},{},0\n", f[img], f[grade]);
    }
    let labels = labels.with_file_name("lesions.csv");
    std::fs::write(&labels, rewritten).unwrap();

    let calibrate = |target, name| {
        eval::calibrate(
            &model,
            &labels,
            DatasetFormat::Native,
            None,
            target,
            name,
            BackendChoice::Cpu,
        )
    };
    let (_, _, report) = calibrate(Target::Sensitivity(0.9), None).unwrap();
    let meta = BundleMetadata::load(&model).unwrap();
    assert_eq!(meta.default_point, "screening");
    let t_diag = meta.config.heads[0].temperature;
    assert!(t_diag.is_some_and(|t| t != 1.0), "{report:?}");
    assert_eq!(meta.config.heads[1].temperature, None, "{report:?}");
    assert!(
        report
            .iter()
            .any(|l| l.contains("lesion_type") && l.contains("temperature left at 1")),
        "{report:?}"
    );
    let (_, _, report) = calibrate(Target::Specificity(0.9), None).unwrap();
    let meta = BundleMetadata::load(&model).unwrap();
    assert_eq!(
        meta.default_point, "screening",
        "a later point is not made the default"
    );
    assert!(meta.operating_points.contains_key("confirmation"));
    assert_eq!(meta.config.heads[0].temperature, t_diag, "{report:?}");
    assert!(
        report.iter().any(|l| l.contains("temperatures kept")),
        "{report:?}"
    );
}

/// `labels` with every cell of `column` set to `value`, written beside it as `name`.
fn with_column(labels: &Path, column: &str, value: &str, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(labels).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let at = header.split(',').position(|h| h == column).unwrap();
    let out: String = std::iter::once(header.to_string())
        .chain(lines.map(|l| {
            let mut f: Vec<&str> = l.split(',').collect();
            f[at] = value;
            f.join(",")
        }))
        .map(|l| l + "\n")
        .collect();
    let path = labels.with_file_name(name);
    std::fs::write(&path, out).unwrap();
    path
}

/// A decision with one class in the calibration set cannot be calibrated: refused, nothing
/// written (never the default point's 0.5 passed off as calibrated). A decision with no labels
/// at all is as uncalibrated (only the refusing decision may keep the default point's threshold
/// when nothing labels it).
#[test]
fn calibration_on_a_one_class_set_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (model, labels) = setup(dir.path(), None);
    let before = std::fs::read(model.join("model.json")).unwrap();
    for (column, value, name, expected) in [
        (
            "diagnosis",
            "0",
            "healthy.csv",
            "cannot calibrate referable (0 positive",
        ),
        (
            "fluid",
            "",
            "no_fluid.csv",
            "fluid (0 positive, 0 negative)",
        ),
    ] {
        let e = eval::calibrate(
            &model,
            &with_column(&labels, column, value, name),
            DatasetFormat::Native,
            None,
            Target::Sensitivity(0.9),
            None,
            BackendChoice::Cpu,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(expected), "{e}");
        assert_eq!(std::fs::read(model.join("model.json")).unwrap(), before);
    }
}
