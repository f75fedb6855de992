//! Configuration errors.
//!
//! Each concept keeps its config beside its module: the trunk in [`crate::trunk`], heads in
//! [`crate::head`], the whole network (and its presets) in [`crate::network`].

/// A configuration that cannot describe a working network.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// A head attaches to a stage the trunk does not have.
    #[error(
        "head `{head}` attaches to `{attach}`, but the trunk has stages stage1..stage{stages} \
         (or `embedding`, the last stage's pooled output)"
    )]
    UnknownStage {
        /// The head's name.
        head: String,
        /// Where it asked to attach.
        attach: String,
        /// Number of stages in the trunk.
        stages: usize,
    },
    /// An attach point that is not `embedding` or `stageN`.
    #[error("`{0}` is not an attach point: use `embedding` or `stage1`, `stage2`, ...")]
    BadAttachPoint(String),
    /// A preset name nobody knows.
    #[error("unknown preset `{0}`: choose one of reference, small, resnet18")]
    UnknownPreset(String),
    /// Any other inconsistency, with what was expected.
    #[error("invalid model config: {0}")]
    Invalid(String),
}
