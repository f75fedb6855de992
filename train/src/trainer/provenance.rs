//! Where an exported model came from: the data set (and its hash), the code revision, the
//! command line and the epoch's validation metrics, stored in the bundle's metadata.

use super::{DataSource, FitRequest};
use retina_model::Provenance;
use std::collections::BTreeMap;

/// The short git revision this binary was built from (recorded by `build.rs`), when it was
/// built from a git checkout: the directory a run starts in says nothing about the code.
pub(super) fn git_revision() -> Option<String> {
    retina_model::GIT_REVISION.map(str::to_string)
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
            DataSource::Prepared { dir, .. } => format!("{} (prepared store)", dir.display()),
            DataSource::Synthetic {
                n,
                size,
                ungradable,
                grades,
            } => {
                let degraded = if *ungradable > 0.0 {
                    format!(", {:.0}% made ungradable", ungradable * 100.0)
                } else {
                    String::new()
                };
                format!(
                    "{n} synthetic images at {size} px, grades 0-4 {} %{degraded} (seed {})",
                    crate::synth::mix_percentages(grades),
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
        teacher: req.teacher.as_ref().map(|t| t.display().to_string()),
    }
}
