//! What the experiments share: their generated data sets.

use anyhow::Result;
use retina_train::dataset::DatasetFormat;
use retina_train::synth::{self, SynthOptions};
use std::path::{Path, PathBuf};

/// `count` generated eyes (128 px, a grade mix with enough referable eyes to learn from) in
/// `work/name`, made once and reused by later runs; returns the label file.
pub fn generated(work: &Path, name: &str, count: usize, seed: u64) -> Result<PathBuf> {
    let out = work.join(name);
    if !out.join("labels.csv").is_file() {
        synth::generate(&SynthOptions {
            out: out.clone(),
            count,
            size: 128,
            seed,
            grades: [0.4, 0.1, 0.3, 0.1, 0.1],
            missing: 0.0,
            ungradable: 0.0,
            format: DatasetFormat::Native,
            progress: false,
        })?;
    }
    Ok(out.join("labels.csv"))
}
