//! Helpers shared by the training tests.
#![allow(dead_code)] // each test binary uses a subset

use retina_train::config::TrainConfig;
use retina_train::dataset::DatasetFormat;
use retina_train::synth::{self, SynthOptions};
use retina_train::trainer::{DataSource, EpochLog, FitRequest, read_logs};
use std::path::Path;

pub fn data(dir: &Path, count: usize, size: u32, seed: u64) -> std::path::PathBuf {
    synth::generate(&SynthOptions {
        out: dir.to_path_buf(),
        count,
        size,
        seed,
        // Enough referable eyes to learn from in a short run.
        grades: [0.4, 0.1, 0.3, 0.1, 0.1],
        missing: 0.2,
        ungradable: 0.0,
        format: DatasetFormat::Native,
        progress: false,
    })
    .unwrap();
    synth::label_path(dir, DatasetFormat::Native)
}

pub fn request(labels: &Path, out: &Path, config: TrainConfig) -> FitRequest {
    FitRequest {
        data: DataSource::Labels {
            path: labels.to_path_buf(),
            format: DatasetFormat::Native,
            images: None,
            val: None,
        },
        out: out.to_path_buf(),
        config,
        backend: "cpu".into(),
        skip_bad_images: false,
        command: "test".into(),
        resumed: Vec::new(),
    }
}

pub fn logs(dir: &Path) -> Vec<EpochLog> {
    read_logs(&dir.join("metrics.jsonl")).unwrap()
}
