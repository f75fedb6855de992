//! Model bundles: a directory holding `model.json` (format version, config, operating points,
//! provenance) and `weights.safetensors` (readable by any safetensors tool).
//!
//! Saving is atomic: the bundle is written into a scratch directory beside the target and
//! swapped in by rename, so an interrupted save never leaves half a bundle where a good one was.

use crate::config::ConfigError;
use crate::network::RetinaConfig;
use crate::network::RetinaNet;
use burn::prelude::*;
use burn_store::{ModuleSnapshot, SafetensorsStore};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The bundle format this build writes and the newest it reads. Version 2 moved class names,
/// the referable rule and the vessel-growth range into the head specs; version-1 bundles are
/// read by filling those in for the built-in heads ([`BundleMetadata::parse`]). Version 3 added
/// head temperatures, refusing decisions and the gradability check, all optional: a version-2
/// bundle reads as one without them, and is written back as version 3 (so a Retina that
/// predates them refuses it by its version, not by an unknown field).
pub const BUNDLE_FORMAT_VERSION: u32 = 3;
/// Metadata file inside a bundle.
pub const METADATA_FILE: &str = "model.json";
/// Weights file inside a bundle.
pub const WEIGHTS_FILE: &str = "weights.safetensors";

/// A decision threshold set: for each binary decision (`referable`, `fluid`, ...), the
/// probability at or above which the answer is "yes".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatingPoint {
    /// Threshold per decision.
    pub thresholds: BTreeMap<String, f32>,
    /// How the thresholds were chosen (e.g. "default 0.5", "sensitivity>=0.95 on val.csv").
    pub method: String,
}

impl OperatingPoint {
    /// The threshold of `decision` (`referable` or a binary head); 0.5 when the point has none.
    pub fn threshold(&self, decision: &str) -> f32 {
        self.thresholds.get(decision).copied().unwrap_or(0.5)
    }

    /// Threshold 0.5 for each decision.
    pub fn default_for(decisions: &[String]) -> OperatingPoint {
        OperatingPoint {
            thresholds: decisions.iter().map(|d| (d.clone(), 0.5)).collect(),
            method: "default: 0.5 for every decision".into(),
        }
    }
}

/// Where a model came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// Data set the model was trained on (path or description).
    pub dataset: Option<String>,
    /// Hash of the training labels and image list.
    pub dataset_hash: Option<String>,
    /// Epochs trained.
    pub epochs: Option<usize>,
    /// Validation metrics of the exported epoch, by name.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// When the bundle was written (UTC, RFC 3339).
    pub created: Option<String>,
    /// Git revision of the training code, where known.
    pub git_revision: Option<String>,
    /// The command line that produced the model.
    pub command: Option<String>,
    /// Retina version that wrote the bundle.
    pub retina_version: Option<String>,
    /// The teacher bundle a distilled model learned from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher: Option<String>,
}

/// The JSON half of a bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleMetadata {
    /// Bundle format version.
    pub format_version: u32,
    /// The network and its preprocessing.
    pub config: RetinaConfig,
    /// Class names by head name: read from version-1 bundles only (version 2 keeps them in
    /// the head specs).
    #[serde(default, skip_serializing)]
    legacy_class_names: BTreeMap<String, Vec<String>>,
    /// Named operating points (`default`, `screening`, `confirmation`, ...).
    pub operating_points: BTreeMap<String, OperatingPoint>,
    /// The point used when none is named.
    pub default_point: String,
    /// Training provenance.
    #[serde(default)]
    pub provenance: Provenance,
    /// Size of the weights file in bytes, to catch truncation before parsing.
    pub weights_bytes: u64,
}

/// An operating point the bundle does not have.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "the model has no operating point `{name}` (it has {have:?}); calibrate one with \
     `retina-train calibrate`"
)]
pub struct UnknownPoint {
    /// The name asked for.
    pub name: String,
    /// The names the bundle has.
    pub have: Vec<String>,
}

/// A bundle could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// No bundle at that path.
    #[error(
        "{path}: no model bundle here (expected a directory with {METADATA_FILE} and \
         {WEIGHTS_FILE}, as written by `retina-train fit`)"
    )]
    NotFound {
        /// The path given.
        path: PathBuf,
    },
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `model.json` is not valid.
    #[error("{path}:{line}:{column}: invalid bundle metadata: {message}")]
    BadMetadata {
        /// The metadata file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What was expected.
        message: String,
    },
    /// Written by a newer Retina.
    #[error(
        "{path}: bundle format version {found} is newer than this build reads \
         (up to {BUNDLE_FORMAT_VERSION}); upgrade Retina to load it"
    )]
    NewerFormat {
        /// The metadata file.
        path: PathBuf,
        /// Version in the file.
        found: u32,
    },
    /// The stored config is not a valid network.
    #[error("{path}: {source}")]
    Config {
        /// The metadata file.
        path: PathBuf,
        /// What is wrong.
        source: ConfigError,
    },
    /// The weights file is shorter (or longer) than recorded.
    #[error(
        "{path}: weights file is {found} bytes but the bundle recorded {expected}: it is \
         truncated or was replaced; re-export the bundle"
    )]
    Truncated {
        /// The weights file.
        path: PathBuf,
        /// Bytes recorded in model.json.
        expected: u64,
        /// Bytes on disk.
        found: u64,
    },
    /// The weights file cannot be parsed.
    #[error("{path}: weights file is not valid safetensors: {message}")]
    CorruptWeights {
        /// The weights file.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// A tensor's shape differs from what the config builds.
    #[error(
        "{path}: tensor `{tensor}` has shape {found:?} but the model config expects \
         {expected:?}; the weights do not belong to this config"
    )]
    ShapeMismatch {
        /// The weights file.
        path: PathBuf,
        /// Parameter path.
        tensor: String,
        /// Shape the network has.
        expected: Vec<usize>,
        /// Shape in the file.
        found: Vec<usize>,
    },
    /// Tensors the config needs are absent, or the file has tensors the config lacks.
    #[error("{path}: weights do not match the model config: {detail}")]
    TensorSet {
        /// The weights file.
        path: PathBuf,
        /// Which tensors are missing or unexpected.
        detail: String,
    },
    /// A file operation failed (the message names the path).
    #[error("{0}")]
    File(#[from] std::io::Error),
    /// Any other failure while writing weights.
    #[error("{path}: cannot write weights: {message}")]
    Write {
        /// The weights file.
        path: PathBuf,
        /// What happened.
        message: String,
    },
}

/// A trained network with its metadata.
#[derive(Debug, Clone)]
pub struct ModelBundle {
    /// The metadata (config, thresholds, provenance).
    pub metadata: BundleMetadata,
    /// The network.
    pub model: RetinaNet,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Names of the yes/no decisions a config supports (see [`RetinaConfig::decisions`]).
pub fn decisions(config: &RetinaConfig) -> Vec<String> {
    config.decisions().into_iter().map(|d| d.name).collect()
}

impl BundleMetadata {
    /// Fresh metadata for `config`: a `default` point at 0.5 for every decision.
    pub fn new(config: RetinaConfig) -> BundleMetadata {
        let mut operating_points = BTreeMap::new();
        operating_points.insert(
            "default".to_string(),
            OperatingPoint::default_for(&decisions(&config)),
        );
        BundleMetadata {
            format_version: BUNDLE_FORMAT_VERSION,
            config,
            legacy_class_names: BTreeMap::new(),
            operating_points,
            default_point: "default".into(),
            provenance: Provenance::default(),
            weights_bytes: 0,
        }
    }

    /// Class names of every multiclass head, by head name (from the head specs).
    pub fn class_names(&self) -> BTreeMap<String, Vec<String>> {
        self.config
            .heads
            .iter()
            .filter(|h| matches!(h.kind, crate::HeadKind::Multiclass(_)))
            .map(|h| (h.name.clone(), h.class_names()))
            .collect()
    }

    /// Version 1 kept class names beside the config and knew the referable rule, the grade
    /// names and the vessel-growth range from the head names; version 2 says them in the specs.
    fn upgrade_from_v1(&mut self) {
        for h in &mut self.config.heads {
            if h.classes.is_none()
                && let Some(names) = self.legacy_class_names.get(&h.name)
                && h.kind == crate::HeadKind::Multiclass(names.len())
            {
                h.classes = Some(names.clone());
            }
            let builtin = match h.name.as_str() {
                crate::DIAGNOSIS => crate::HeadSpec::diagnosis(),
                crate::VESSEL_GROWTH => crate::HeadSpec::vessel_growth(),
                _ => continue,
            };
            if h.kind == builtin.kind {
                h.classes = h.classes.take().or(builtin.classes);
                h.decision = h.decision.take().or(builtin.decision);
                h.range = h.range.or(builtin.range);
                h.answer_key = h.answer_key.take().or(builtin.answer_key);
            }
        }
        self.legacy_class_names.clear();
        self.format_version = BUNDLE_FORMAT_VERSION;
    }

    /// The operating point `name` (`None`: the bundle's default) with its name, or an error
    /// that lists the points the bundle has and says how to make one.
    pub fn point(&self, name: Option<&str>) -> Result<(String, &OperatingPoint), UnknownPoint> {
        let key = name.unwrap_or(&self.default_point);
        self.operating_points
            .get(key)
            .map(|p| (key.to_string(), p))
            .ok_or_else(|| UnknownPoint {
                name: key.to_string(),
                have: self.operating_points.keys().cloned().collect(),
            })
    }

    /// Reads and checks `model.json` from a bundle directory.
    pub fn load(dir: &Path) -> Result<BundleMetadata, BundleError> {
        let path = dir.join(METADATA_FILE);
        if !path.is_file() {
            return Err(BundleError::NotFound {
                path: dir.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        Self::parse(&text, path)
    }

    /// Parses and checks metadata text; `path` names it in errors.
    pub fn parse(text: &str, path: PathBuf) -> Result<BundleMetadata, BundleError> {
        let bad = |e: serde_json::Error| BundleError::BadMetadata {
            path: path.clone(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        };
        // Check the version before the schema: a newer bundle may not parse as ours at all.
        let raw: serde_json::Value = serde_json::from_str(text).map_err(bad)?;
        match raw.get("format_version").and_then(|v| v.as_u64()) {
            Some(v) if v > BUNDLE_FORMAT_VERSION as u64 => {
                return Err(BundleError::NewerFormat {
                    path,
                    found: v as u32,
                });
            }
            Some(_) => {}
            None => {
                return Err(BundleError::BadMetadata {
                    path,
                    line: 1,
                    column: 1,
                    message: "missing `format_version` (a positive integer)".into(),
                });
            }
        }
        let mut meta: BundleMetadata = serde_json::from_str(text).map_err(bad)?;
        if meta.format_version < 2 {
            meta.upgrade_from_v1();
        }
        meta.format_version = BUNDLE_FORMAT_VERSION;
        meta.config
            .validate()
            .map_err(|source| BundleError::Config {
                path: path.clone(),
                source,
            })?;
        if !meta.operating_points.contains_key(&meta.default_point) {
            return Err(BundleError::BadMetadata {
                path,
                line: 1,
                column: 1,
                message: format!(
                    "default_point `{}` is not among the operating points",
                    meta.default_point
                ),
            });
        }
        Ok(meta)
    }

    /// Writes `model.json` atomically into an existing bundle directory (used when only the
    /// metadata changes, e.g. after calibration).
    pub fn save_in_place(&self, dir: &Path) -> Result<(), BundleError> {
        write_atomic(&dir.join(METADATA_FILE), self.to_json().as_bytes())
    }

    fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("metadata always serialises") + "\n"
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), BundleError> {
    crate::host::write_atomic(path, bytes).map_err(BundleError::from)
}

/// Current UTC time as RFC 3339 (seconds precision).
pub fn utc_now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

impl ModelBundle {
    /// A bundle around a freshly built or trained network.
    pub fn new(model: RetinaNet, metadata: BundleMetadata) -> ModelBundle {
        ModelBundle { metadata, model }
    }

    /// Saves the bundle to `dir`, replacing any bundle there only once the new one is complete.
    pub fn save(&mut self, dir: &Path) -> Result<(), BundleError> {
        crate::host::replace_dir(dir, |scratch| self.write_into(scratch))
    }

    fn write_into(&mut self, dir: &Path) -> Result<(), BundleError> {
        let weights = dir.join(WEIGHTS_FILE);
        let mut store = SafetensorsStore::from_file(&weights)
            .metadata("retina_bundle_format", BUNDLE_FORMAT_VERSION.to_string());
        self.model
            .save_into(&mut store)
            .map_err(|e| BundleError::Write {
                path: weights.clone(),
                message: e.to_string(),
            })?;
        // burn-store writes through an owner-only temporary file; a model is meant to be shared.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&weights, std::fs::Permissions::from_mode(0o644))
                .map_err(io(&weights))?;
        }
        self.metadata.weights_bytes = std::fs::metadata(&weights).map_err(io(&weights))?.len();
        self.metadata.format_version = BUNDLE_FORMAT_VERSION;
        write_atomic(&dir.join(METADATA_FILE), self.metadata.to_json().as_bytes())
    }

    /// Loads a bundle onto `device`, checking the format version, the weights file's size and
    /// every tensor's presence and shape.
    pub fn load(dir: &Path, device: &Device) -> Result<ModelBundle, BundleError> {
        let metadata = BundleMetadata::load(dir)?;
        let weights = dir.join(WEIGHTS_FILE);
        let found = std::fs::metadata(&weights).map_err(io(&weights))?.len();
        let store = SafetensorsStore::from_file(&weights);
        Self::assemble(metadata, dir, store, found, device)
    }

    /// Loads a bundle held in memory (e.g. embedded in a binary with `include_bytes!`).
    /// `name` stands for the bundle in error messages.
    pub fn from_bytes(
        name: &str,
        metadata_json: &str,
        weights: &[u8],
        device: &Device,
    ) -> Result<ModelBundle, BundleError> {
        let dir = PathBuf::from(name);
        let metadata = BundleMetadata::parse(metadata_json, dir.join(METADATA_FILE))?;
        let store = SafetensorsStore::from_bytes(Some(weights.to_vec()));
        Self::assemble(metadata, &dir, store, weights.len() as u64, device)
    }

    /// The checks and the weight loading shared by [`Self::load`] and [`Self::from_bytes`].
    fn assemble(
        metadata: BundleMetadata,
        dir: &Path,
        store: SafetensorsStore,
        weights_bytes: u64,
        device: &Device,
    ) -> Result<ModelBundle, BundleError> {
        let weights = dir.join(WEIGHTS_FILE);
        if weights_bytes != metadata.weights_bytes {
            return Err(BundleError::Truncated {
                path: weights,
                expected: metadata.weights_bytes,
                found: weights_bytes,
            });
        }
        let mut model = metadata
            .config
            .init(device)
            .map_err(|source| BundleError::Config {
                path: dir.join(METADATA_FILE),
                source,
            })?;
        let mut store = store.validate(false).allow_partial(true);
        apply_checked(&mut model, &mut store, &weights, |_| false)?;
        Ok(ModelBundle { metadata, model })
    }
}

/// Applies a store to `model` and turns every discrepancy into a [`BundleError`].
/// `ignorable_extra` names file tensors that may be left unused (e.g. PyTorch's
/// `num_batches_tracked`).
pub(crate) fn apply_checked(
    model: &mut RetinaNet,
    store: &mut SafetensorsStore,
    path: &Path,
    ignorable_extra: impl Fn(&str) -> bool,
) -> Result<(), BundleError> {
    let result = model
        .load_from(store)
        .map_err(|e| BundleError::CorruptWeights {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if let Some(err) = result.errors.first() {
        return Err(match err {
            burn_store::ApplyError::ShapeMismatch {
                path: tensor,
                expected,
                found,
            } => BundleError::ShapeMismatch {
                path: path.to_path_buf(),
                tensor: tensor.clone(),
                expected: expected.to_vec(),
                found: found.to_vec(),
            },
            other => BundleError::TensorSet {
                path: path.to_path_buf(),
                detail: format!("{other:?}"),
            },
        });
    }
    let unused: Vec<&String> = result
        .unused
        .iter()
        .filter(|n| !ignorable_extra(n))
        .collect();
    if !result.missing.is_empty() || !unused.is_empty() {
        let missing: Vec<&str> = result.missing.iter().map(|(p, _)| p.as_str()).collect();
        return Err(BundleError::TensorSet {
            path: path.to_path_buf(),
            detail: format!("missing {missing:?}, unexpected {unused:?}"),
        });
    }
    Ok(())
}
