//! Where an exported model came from: the data set (and its hash), the code revision, the
//! command line and the epoch's validation metrics, stored in the bundle's metadata.

use super::{DataSource, FitRequest};
use crate::dataset::Sample;
use retina_model::Provenance;
use std::collections::BTreeMap;

fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Hash of a sample set: image paths and labels, in order.
pub(super) fn dataset_hash(samples: &[Sample]) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325;
    for s in samples {
        h = fnv1a(s.image.to_string_lossy().as_bytes(), h);
        for (k, v) in &s.labels {
            h = fnv1a(k.as_bytes(), h);
            h = fnv1a(&v.to_le_bytes(), h);
        }
    }
    format!("fnv1a64:{h:016x}")
}

/// The short git revision this binary was built from (recorded by `build.rs`), when it was
/// built from a git checkout: the directory a run starts in says nothing about the code.
pub(super) fn git_revision() -> Option<String> {
    option_env!("RETINA_GIT_REVISION").map(str::to_string)
}

/// The provenance of the model of `epoch`, validated with `metrics`.
pub(super) fn provenance(
    req: &FitRequest,
    dataset_hash: &str,
    epoch: usize,
    metrics: &BTreeMap<String, f64>,
) -> Provenance {
    Provenance {
        dataset: Some(match &req.data {
            DataSource::Labels { path, format, .. } => format!("{} ({format})", path.display()),
            DataSource::Synthetic { n, size } => {
                format!(
                    "{n} synthetic images at {size} px (seed {})",
                    req.config.seed
                )
            }
        }),
        dataset_hash: Some(dataset_hash.to_string()),
        epochs: Some(epoch),
        metrics: metrics.clone(),
        created: Some(retina_model::bundle::utc_now_rfc3339()),
        git_revision: git_revision(),
        command: Some(req.command.clone()),
        retina_version: Some(env!("CARGO_PKG_VERSION").into()),
    }
}
