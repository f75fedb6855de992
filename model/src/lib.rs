//! # retina-model
//!
//! The Retina network: a shared ResNet-style trunk with any number of prediction heads
//! (diagnosis grade, fluid, vessel growth, ...) attached to any stage, the input preprocessing
//! that training and inference share, model bundles, and run-time backend selection.
//!
//! ```no_run
//! use retina_model::{BackendChoice, RetinaConfig};
//! let backend = BackendChoice::Cpu.select().unwrap();
//! let config = RetinaConfig::preset("small").unwrap();
//! let net = config.init(&backend.device).unwrap();
//! println!("{} parameters", net.parameter_count());
//! ```
//!
//! The CPU kernels the trunk runs on, and the plan that picks them, are the `retina-kernels`
//! crate's: this one holds no `unsafe` code.

#![forbid(unsafe_code)]

pub mod backend;
pub mod bundle;
pub mod config;
pub mod explain;
pub mod grade;
pub mod head;
pub mod host;
pub mod network;
pub mod prediction;
pub mod preprocess;
pub mod quality;
pub mod torch;
pub mod trunk;

pub use backend::{BackendChoice, BackendError, SelectedBackend};
pub use bundle::{BundleError, BundleMetadata, ModelBundle, OperatingPoint, Provenance};
pub use config::ConfigError;
pub use grade::{Grade, NUM_GRADES};
pub use head::{
    AttachPoint, DIAGNOSIS, Decision, DecisionRule, FLUID, HeadKind, HeadSpec, Link, Pooling,
    QUALITY, QUALITY_CLASSES, REFERABLE, ThresholdDecision, UNGRADABLE, VESSEL_GROWTH,
};
pub use network::{PRESETS, RetinaConfig, RetinaNet, RetinaOutput};
pub use prediction::{HeadAnswer, Prediction};
pub use preprocess::{CropBox, Prepared, PreprocessConfig, PreprocessError, View};
pub use quality::{GradabilityCheck, Refusal};
pub use trunk::{StageConfig, TrunkConfig};

/// Re-exported so downstream crates use the same burn as the model.
pub use burn;

/// The git revision (12 hex digits) the binaries were built from, where the build could tell.
pub const GIT_REVISION: Option<&str> = option_env!("RETINA_GIT_REVISION");
