//! Gradability and calibration through the library: generated ungradable images and their
//! labels, the loader that keeps them out of the clinical batches, `eval` counting refusals and
//! scoring only what it answers, and temperatures fitted by a bundle's first calibration.

use retina_model::burn::prelude::*;
use retina_model::{BackendChoice, BundleMetadata, HeadSpec, ModelBundle, RetinaConfig};
use retina_train::data::{Augment, LoaderSpec, QualityTeaching};
use retina_train::dataset::{DatasetFormat, read_labels};
use retina_train::degrade::Degradation;
use retina_train::eval::{self, Target};
use retina_train::synth::{self, SynthOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn generate(dir: &Path, count: usize, ungradable: f32, seed: u64) -> Vec<synth::WrittenLabels> {
    synth::generate(&SynthOptions {
        out: dir.to_path_buf(),
        count,
        size: 96,
        seed,
        grades: [1.0; 5],
        missing: 0.0,
        ungradable,
        format: DatasetFormat::Native,
        progress: false,
    })
    .unwrap()
}

#[test]
fn synth_labels_the_quality_of_what_it_degrades() {
    let dir = tempfile::tempdir().unwrap();
    let written = generate(dir.path(), 60, 0.5, 3);
    let degraded = written.iter().filter(|w| w.degradation.is_some()).count();
    assert!(
        (18..=42).contains(&degraded),
        "{degraded} of 60 degraded at 0.5"
    );
    let text = std::fs::read_to_string(dir.path().join("labels.csv")).unwrap();
    assert!(
        text.starts_with("image,diagnosis,vessel_growth,fluid,quality\n"),
        "{text}"
    );
    let file = read_labels(
        &dir.path().join("labels.csv"),
        DatasetFormat::Native,
        None,
        &HeadSpec::default_heads(),
    )
    .unwrap();
    for (w, s) in written.iter().zip(&file.samples) {
        let class = match w.degradation {
            None => 0.0,
            Some(d) => (1 + Degradation::ALL.iter().position(|x| *x == d).unwrap()) as f32,
        };
        assert_eq!(s.labels.get("quality"), Some(&class), "{}", w.image);
        // A picture with no fundus has no retinopathy to grade; a degraded photograph keeps
        // its truth (the loader decides what it may teach).
        let graded = w.degradation != Some(Degradation::NotFundus);
        assert_eq!(s.labels.contains_key("diagnosis"), graded, "{}", w.image);
    }
    // Without --ungradable the label file is what it always was.
    let plain = tempfile::tempdir().unwrap();
    generate(plain.path(), 3, 0.0, 3);
    let text = std::fs::read_to_string(plain.path().join("labels.csv")).unwrap();
    assert!(text.starts_with("image,diagnosis,vessel_growth,fluid\n"));
    // Formats without a quality column refuse.
    let err = synth::generate(&SynthOptions {
        out: dir.path().join("aptos"),
        count: 2,
        size: 64,
        seed: 0,
        grades: [1.0; 5],
        missing: 0.0,
        ungradable: 0.2,
        format: DatasetFormat::Aptos,
        progress: false,
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("--format native"), "{err}");
}

#[test]
fn the_loader_keeps_ungradable_images_out_of_the_clinical_batches() {
    let dir = tempfile::tempdir().unwrap();
    generate(dir.path(), 40, 0.4, 8);
    let heads = HeadSpec::default_heads();
    let file = read_labels(
        &dir.path().join("labels.csv"),
        DatasetFormat::Native,
        None,
        &heads,
    )
    .unwrap();
    let samples = Arc::new(file.samples);
    let mut preprocess = RetinaConfig::preset("small").unwrap().preprocess;
    preprocess.image_size = 32;
    let labelled_ungradable = samples
        .iter()
        .filter(|s| s.labels.get("quality").is_some_and(|&q| q >= 1.0))
        .count();
    assert!(labelled_ungradable > 5);
    let spec = LoaderSpec {
        preprocess,
        heads: heads.iter().map(|h| h.name.clone()).collect(),
        augment: Some(Augment::none()),
        skip_bad: false,
        cache: None,
        seed: 1,
        hashes: Default::default(),
        store: None,
        quality: QualityTeaching::for_heads(&heads, 1.0, 0.5),
        check: None,
        teacher: None,
    };
    let idx: Vec<usize> = (0..samples.len()).collect();
    let b = spec.load_batch(&samples, &idx, 0).unwrap();
    // Training: photographs labelled ungradable only in the quality batch; every sample there.
    assert_eq!(b.n, samples.len() - labelled_ungradable);
    let q = heads.iter().position(|h| h.refuses()).unwrap();
    assert!(
        b.targets[q].iter().all(Option::is_none),
        "the main batch never teaches quality"
    );
    let qb = b.quality.as_ref().unwrap();
    assert_eq!(qb.labels.len(), samples.len());
    assert_eq!(qb.images.len(), samples.len() * 3 * 32 * 32);
    let degraded = qb.labels.iter().filter(|&&l| l >= 1.0).count();
    assert!(
        degraded > labelled_ungradable,
        "degradations on the fly add to the labelled ones"
    );
    assert!(
        qb.labels
            .iter()
            .all(|&l| (0.0..7.0).contains(&l) && l.fract() == 0.0)
    );

    // Validation: every image, the ungradable ones teaching nothing but quality.
    let val = LoaderSpec {
        augment: None,
        ..spec.clone()
    };
    let b = val.load_batch(&samples, &idx, 0).unwrap();
    assert_eq!(b.n, samples.len());
    assert!(b.quality.is_none());
    for (i, s) in samples.iter().enumerate() {
        let refused = s.labels.get("quality").is_some_and(|&v| v >= 1.0);
        for (h, spec) in heads.iter().enumerate() {
            let want = if refused && h != q {
                None
            } else {
                s.labels.get(&spec.name).copied()
            };
            assert_eq!(b.targets[h][i], want, "{} {}", s.image.display(), spec.name);
        }
    }
}

/// A bundle of the small preset at 32 px, untrained, and a label file of `good` generated
/// photographs plus a noise, a white and a black picture labelled `not_fundus` (and grade 0).
fn bundle_and_mixed_set(dir: &Path, good: usize) -> (PathBuf, PathBuf) {
    generate(&dir.join("data"), good, 0.0, 12);
    let images = dir.join("data/images");
    let mut state = 7u32;
    let noise = image::RgbImage::from_fn(200, 200, |_, _| {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        image::Rgb([(state >> 24) as u8, (state >> 16) as u8, (state >> 8) as u8])
    });
    noise.save(images.join("noise.png")).unwrap();
    image::RgbImage::from_pixel(200, 200, image::Rgb([255, 255, 255]))
        .save(images.join("white.png"))
        .unwrap();
    image::RgbImage::new(200, 200)
        .save(images.join("black.png"))
        .unwrap();
    let labels = dir.join("data/labels.csv");
    let mut text = std::fs::read_to_string(&labels).unwrap().replace(
        "image,diagnosis,vessel_growth,fluid\n",
        "image,diagnosis,vessel_growth,fluid,quality\n",
    );
    text = text
        .lines()
        .map(|l| {
            if l.starts_with("image,") {
                l.to_string()
            } else {
                format!("{l},gradable")
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    text.push('\n');
    // Graded anyway, as real data sets grade photographs nobody should: `eval` must not
    // score these grades.
    for n in ["noise", "white", "black"] {
        text.push_str(&format!("images/{n}.png,0,,,not_fundus\n"));
    }
    std::fs::write(&labels, text).unwrap();
    let mut config = RetinaConfig::preset("small").unwrap();
    config.preprocess.image_size = 32;
    let net = config.init(&Device::flex()).unwrap();
    let model = dir.join("model");
    ModelBundle::new(net, BundleMetadata::new(config))
        .save(&model)
        .unwrap();
    (model, labels)
}

#[test]
fn eval_counts_refusals_and_scores_only_what_it_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (model, labels) = bundle_and_mixed_set(dir.path(), 12);
    let m = eval::evaluate(
        &model,
        &labels,
        DatasetFormat::Native,
        None,
        &dir.path().join("report"),
        None,
        BackendChoice::Cpu,
    )
    .unwrap();
    let g = &m["gradability"];
    assert_eq!(g["n"], 15);
    // The check refuses the three pictures; the untrained quality head starts at
    // P(gradable) = 0.95 and refuses none of the photographs.
    assert_eq!(g["ungradable_by_check"], 3, "{g}");
    assert_eq!(g["ungradable"], 3, "{g}");
    assert_eq!(g["reasons"]["not_fundus"], 3, "{g}");
    assert_eq!(m["diagnosis"]["n"], 12);
    assert_eq!(m["diagnosis"]["refused"], 3);
    // The refusing head is scored on everything, the check's refusals at P = 1.
    assert_eq!(m["quality"]["n"], 15);
    assert_eq!(m["quality"]["ungradable_sensitivity"], 1.0);
    assert_eq!(m["quality"]["ungradable_specificity"], 1.0);
    for key in [
        "ungradable_ece",
        "ungradable_brier",
        "ungradable_ece_uncalibrated",
    ] {
        assert!(m["quality"][key].is_number(), "{key}: {}", m["quality"]);
    }
    let report = std::fs::read_to_string(dir.path().join("report/report.md")).unwrap();
    assert!(
        report.contains("3 of 15 images refused as ungradable (3 by the check"),
        "{report}"
    );
    assert!(dir.path().join("report/reliability.png").is_file());
}

#[test]
fn the_first_calibration_fits_temperatures_and_later_ones_keep_them() {
    let dir = tempfile::tempdir().unwrap();
    let (model, labels) = bundle_and_mixed_set(dir.path(), 30);
    let (_, point, report) = eval::calibrate(
        &model,
        &labels,
        DatasetFormat::Native,
        None,
        Target::Youden,
        None,
        BackendChoice::Cpu,
    )
    .unwrap();
    let meta = BundleMetadata::load(&model).unwrap();
    for h in &meta.config.heads {
        match h.kind {
            retina_model::HeadKind::Regression => assert_eq!(h.temperature, None),
            // Quality is labelled here, but the three pictures are refused by the check:
            // what is left is one class, which cannot calibrate a temperature.
            _ if h.refuses() => assert_eq!(h.temperature, None),
            _ => {
                let t = h
                    .temperature
                    .unwrap_or_else(|| panic!("{} has no temperature", h.name));
                assert!(t.is_finite() && t > 0.0);
            }
        }
    }
    assert!(
        report
            .iter()
            .any(|l| l.starts_with("diagnosis: temperature")),
        "{report:?}"
    );
    assert!(
        report
            .iter()
            .any(|l| l.starts_with("quality: 30 labelled images of 1 class")),
        "{report:?}"
    );
    // The refusing decision is calibrated by its own rule, whatever the target.
    assert!(point.thresholds.contains_key("ungradable"));
    assert!(
        report
            .iter()
            .any(|l| l.contains("ungradable") && l.contains(&format!("{:?}", eval::REFUSAL_TARGET))),
        "{report:?}"
    );
    let fitted: Vec<Option<f32>> = meta.config.heads.iter().map(|h| h.temperature).collect();
    let (_, _, report) = eval::calibrate(
        &model,
        &labels,
        DatasetFormat::Native,
        None,
        Target::Sensitivity(0.9),
        None,
        BackendChoice::Cpu,
    )
    .unwrap();
    let again: Vec<Option<f32>> = BundleMetadata::load(&model)
        .unwrap()
        .config
        .heads
        .iter()
        .map(|h| h.temperature)
        .collect();
    assert_eq!(fitted, again, "a second calibration keeps the temperatures");
    assert!(report[0].contains("temperatures kept"), "{report:?}");
}
