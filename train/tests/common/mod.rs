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
        teacher: None,
    }
}

pub fn logs(dir: &Path) -> Vec<EpochLog> {
    read_logs(&dir.join("metrics.jsonl")).unwrap()
}

/// Every tensor of a run's exported weights (safetensors: an 8-byte header length, a JSON header
/// of name -> data offsets, then the data), in name order, concatenated.
pub fn exported_weights(run: &Path) -> Vec<f32> {
    let bytes = std::fs::read(run.join("model/weights.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out = Vec::new();
    for (name, t) in &header {
        if name == "__metadata__" {
            continue;
        }
        assert_eq!(t["dtype"], "F32", "{name}");
        let [a, b] = [0, 1].map(|i| t["data_offsets"][i].as_u64().unwrap() as usize);
        out.extend(
            data[a..b]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap())),
        );
    }
    out
}
