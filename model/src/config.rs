//! Configuration errors, and the trunk's shape.
//!
//! Each concept keeps its config beside its module: heads in [`crate::head`], the whole
//! network (and its presets) in [`crate::network`].

use burn::config::Config;

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

/// One stage of the trunk: `depth` BasicBlocks of `width` channels, the first with `stride`.
#[derive(Config, Debug, PartialEq)]
pub struct StageConfig {
    /// Output channels of every block in the stage.
    pub width: usize,
    /// Number of BasicBlocks.
    #[config(default = 1)]
    pub depth: usize,
    /// Stride of the stage's first block (1 or 2).
    #[config(default = 2)]
    pub stride: usize,
}

/// The shared convolutional trunk: a 3x3 stem, then stages of ResNet BasicBlocks.
#[derive(Config, Debug, PartialEq)]
pub struct TrunkConfig {
    /// Output channels of the stem convolution.
    pub stem_width: usize,
    /// Stride of the stem convolution.
    #[config(default = 2)]
    pub stem_stride: usize,
    /// Whether the stem convolution has a bias (PyTorch's default, kept for the reference net).
    #[config(default = true)]
    pub stem_bias: bool,
    /// The stages, in order; heads name them `stage1`, `stage2`, ...
    pub stages: Vec<StageConfig>,
    /// Batch-norm epsilon.
    #[config(default = 1e-5)]
    pub bn_epsilon: f64,
    /// Batch-norm running-statistics momentum (PyTorch convention).
    #[config(default = 0.1)]
    pub bn_momentum: f64,
}

impl TrunkConfig {
    /// Channels of the pooled output of stage `k` (1-based).
    pub fn stage_width(&self, k: usize) -> usize {
        self.stages[k - 1].width
    }

    /// Total spatial downsampling of the trunk.
    pub fn total_stride(&self) -> usize {
        self.stem_stride * self.stages.iter().map(|s| s.stride).product::<usize>()
    }
}
