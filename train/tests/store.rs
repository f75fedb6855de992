//! Prepared stores (`retina-train prepare`): what training reads from them is what it would
//! have decoded, an interrupted `prepare` resumes to the same store, and bad input is named.

mod common;

use common::logs;
use retina_train::config::{ModelSection, TrainConfig};
use retina_train::dataset::DatasetFormat;
use retina_train::store::{PrepareOptions, ViewStore, prepare};
use retina_train::synth::{self, SynthOptions};
use retina_train::trainer::{self, DataSource, FitRequest};
use std::path::{Path, PathBuf};

fn config(epochs: usize) -> TrainConfig {
    TrainConfig {
        model: ModelSection {
            image_size: Some(32),
            ..ModelSection::default()
        },
        epochs,
        batch_size: 8,
        ..TrainConfig::default()
    }
}

/// EyePACS layout: JPEG photographs, so both paths use the scaled decode.
fn photos(dir: &Path, count: usize, size: u32) -> PathBuf {
    synth::generate(&SynthOptions {
        out: dir.to_path_buf(),
        count,
        size,
        seed: 3,
        grades: [0.4, 0.1, 0.3, 0.1, 0.1],
        missing: 0.0,
        ungradable: 0.0,
        format: DatasetFormat::Eyepacs,
        progress: false,
    })
    .unwrap();
    synth::label_path(dir, DatasetFormat::Eyepacs)
}

fn options(labels: &Path, out: &Path, cfg: &TrainConfig, skip: bool) -> PrepareOptions {
    let model = cfg.model_config().unwrap();
    PrepareOptions {
        labels: labels.to_path_buf(),
        format: DatasetFormat::Eyepacs,
        images: None,
        out: out.to_path_buf(),
        preprocess: model.preprocess.clone(),
        heads: model.heads.clone(),
        skip_bad_images: skip,
        progress: false,
    }
}

fn request(data: DataSource, out: &Path, cfg: TrainConfig) -> FitRequest {
    FitRequest {
        data,
        out: out.to_path_buf(),
        config: cfg,
        backend: "cpu".into(),
        skip_bad_images: false,
        command: "test".into(),
        resumed: Vec::new(),
        teacher: None,
    }
}

#[test]
fn training_from_a_store_matches_training_from_the_photographs() {
    let dir = tempfile::tempdir().unwrap();
    let labels = photos(&dir.path().join("data"), 24, 192);
    let cfg = config(2);
    let store = dir.path().join("store");
    let s = prepare(&options(&labels, &store, &cfg, false)).unwrap();
    assert_eq!((s.stored, s.resumed, s.left_out.len()), (24, 0, 0));
    assert_eq!(s.bytes, 24 * 32 * 32 * 3);

    // Each stored view is the view decoding the photograph gives.
    let opened = ViewStore::open(&store).unwrap();
    let pre = cfg.model_config().unwrap().preprocess;
    for img in opened.manifest().images.iter().step_by(7) {
        let bytes = std::fs::read(&img.image).unwrap();
        let decoded = pre.view_from_bytes(&bytes, "x").unwrap().image;
        assert_eq!(opened.view(&img.image).unwrap(), decoded, "{:?}", img.image);
    }

    let raw = trainer::fit(request(
        DataSource::Labels {
            path: labels.clone(),
            format: DatasetFormat::Eyepacs,
            images: None,
            val: None,
        },
        &dir.path().join("raw"),
        cfg.clone(),
    ))
    .unwrap();
    let stored = trainer::fit(request(
        DataSource::Prepared {
            dir: store.clone(),
            val: None,
        },
        &dir.path().join("stored"),
        cfg.clone(),
    ))
    .unwrap();
    // The same samples, split and views: the same run, and the same data named in provenance.
    assert_eq!(raw.train_samples, stored.train_samples);
    assert_eq!(raw.dataset_hash, stored.dataset_hash);
    let (a, b) = (
        logs(&dir.path().join("raw")),
        logs(&dir.path().join("stored")),
    );
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        let rel = (x.train_loss - y.train_loss).abs() / x.train_loss;
        assert!(
            rel < 1e-5,
            "epoch {}: {} vs {}",
            x.epoch,
            x.train_loss,
            y.train_loss
        );
    }

    // A model with another input size is refused, naming what differs.
    let mut other = config(1);
    other.model.image_size = Some(48);
    let e = trainer::fit(request(
        DataSource::Prepared {
            dir: store,
            val: None,
        },
        &dir.path().join("other"),
        other,
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("image_size: store 32, model 48"), "{e}");
}

#[test]
fn an_interrupted_prepare_resumes_to_the_same_store() {
    let dir = tempfile::tempdir().unwrap();
    let labels = photos(&dir.path().join("data"), 40, 128);
    let cfg = config(1);
    let whole = dir.path().join("whole");
    prepare(&options(&labels, &whole, &cfg, false)).unwrap();

    // A truncated photograph stops `prepare` at its line, keeping the images before it.
    let rows = ViewStore::open(&whole).unwrap().manifest().images.clone();
    let victim = &rows[20];
    let good = std::fs::read(&victim.image).unwrap();
    std::fs::write(&victim.image, &good[..good.len() / 2]).unwrap();
    let part = dir.path().join("part");
    let e = prepare(&options(&labels, &part, &cfg, false))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("trainLabels.csv:{}:", victim.line)) && e.contains("truncated"),
        "{e}"
    );
    assert!(
        !ViewStore::is_store(&part),
        "an unfinished store is not a store"
    );
    let stride = 32 * 32 * 3;
    assert_eq!(
        std::fs::metadata(part.join("views.bin")).unwrap().len(),
        20 * stride
    );

    // A resumed run with other settings is refused, naming them.
    let mut bigger = config(1);
    bigger.model.image_size = Some(48);
    let e = prepare(&options(&labels, &part, &bigger, false))
        .unwrap_err()
        .to_string();
    assert!(e.contains("image_size: store 32, model 48"), "{e}");

    // What a kill in the middle of a chunk leaves: views past the last line, a torn line.
    use std::io::Write;
    let append = |name: &str, bytes: &[u8]| {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(part.join(name))
            .unwrap();
        f.write_all(bytes).unwrap();
    };
    append("views.bin", &[7u8; 5000]);
    append("progress.jsonl", b"{\"kind\":\"sto");
    std::fs::write(&victim.image, &good).unwrap();
    let s = prepare(&options(&labels, &part, &cfg, false)).unwrap();
    assert_eq!((s.resumed, s.stored), (20, 40));
    assert_eq!(
        std::fs::read(whole.join("views.bin")).unwrap(),
        std::fs::read(part.join("views.bin")).unwrap(),
        "the resumed store differs from the one made in one go"
    );
    assert_eq!(ViewStore::open(&part).unwrap().manifest().images, rows);
    let e = prepare(&options(&labels, &part, &cfg, false))
        .unwrap_err()
        .to_string();
    assert!(e.contains("already a complete store"), "{e}");

    // With --skip-bad-images the bad photograph is left out and listed with its reason.
    std::fs::write(&victim.image, &good[..good.len() / 2]).unwrap();
    let skipped = dir.path().join("skipped");
    let s = prepare(&options(&labels, &skipped, &cfg, true)).unwrap();
    assert_eq!(s.stored, 39);
    assert_eq!(s.left_out.len(), 1);
    assert_eq!(s.left_out[0].line, victim.line);
    assert!(
        s.left_out[0].reason.contains("truncated"),
        "{:?}",
        s.left_out
    );
    let opened = ViewStore::open(&skipped).unwrap();
    let heads = cfg.model_config().unwrap().heads;
    assert_eq!(opened.label_file(&heads).unwrap().samples.len(), 39);

    // A damaged views file is caught when the store is opened.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(skipped.join("views.bin"))
        .unwrap();
    f.set_len(stride).unwrap();
    let e = ViewStore::open(&skipped).unwrap_err().to_string();
    assert!(e.contains("damaged"), "{e}");
}
