//! The network's configuration: trunk shape, heads, and the input preprocessing.
//!
//! Everything that decides what the weights mean lives here, and is saved beside the weights in
//! a model bundle, so inference rebuilds exactly the network (and the preprocessing) that
//! training used.

use crate::preprocess::PreprocessConfig;
use crate::trunk::{StageConfig, TrunkConfig};
use burn::config::Config;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

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

/// Where a head reads its input: the pooled output of one trunk stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum AttachPoint {
    /// The shared embedding: the last stage's global-average-pooled output.
    Embedding,
    /// The pooled output of stage `k` (1-based). Closer to the input, so a loss here shapes the
    /// early layers more directly.
    Stage(usize),
}

impl AttachPoint {
    /// The 1-based stage index this point reads, given the trunk's stage count.
    pub fn stage_index(self, num_stages: usize) -> usize {
        match self {
            AttachPoint::Embedding => num_stages,
            AttachPoint::Stage(k) => k,
        }
    }
}

impl fmt::Display for AttachPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttachPoint::Embedding => write!(f, "embedding"),
            AttachPoint::Stage(k) => write!(f, "stage{k}"),
        }
    }
}

impl FromStr for AttachPoint {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        if t == "embedding" {
            return Ok(AttachPoint::Embedding);
        }
        t.strip_prefix("stage")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&k| k >= 1)
            .map(AttachPoint::Stage)
            .ok_or_else(|| ConfigError::BadAttachPoint(s.to_string()))
    }
}

impl TryFrom<String> for AttachPoint {
    type Error = ConfigError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<AttachPoint> for String {
    fn from(a: AttachPoint) -> String {
        a.to_string()
    }
}

/// What a head predicts, which decides its output width and its loss family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    /// One of `n` classes (logits of width `n`), e.g. the ICDR grade.
    Multiclass(usize),
    /// Present / absent (one logit), e.g. macular edema.
    Binary,
    /// A real number (one output), e.g. the amount of neovascularization in 0..1.
    Regression,
}

impl HeadKind {
    /// Width of the head's output.
    pub fn output_width(self) -> usize {
        match self {
            HeadKind::Multiclass(n) => n,
            HeadKind::Binary | HeadKind::Regression => 1,
        }
    }
}

impl fmt::Display for HeadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadKind::Multiclass(n) => write!(f, "multiclass({n})"),
            HeadKind::Binary => write!(f, "binary"),
            HeadKind::Regression => write!(f, "regression"),
        }
    }
}

/// A prediction head: data, not code. Any number of heads can share the trunk.
#[derive(Config, Debug, PartialEq)]
pub struct HeadSpec {
    /// The head's name; also the label column it learns from and the key of its output.
    pub name: String,
    /// What it predicts.
    pub kind: HeadKind,
    /// Which embedding it reads.
    #[config(default = "AttachPoint::Embedding")]
    pub attach: AttachPoint,
    /// Width of an optional hidden layer (Linear + ReLU) before the output layer.
    #[config(default = "None")]
    pub hidden: Option<usize>,
}

/// Name of the diagnosis head (ICDR grade).
pub const DIAGNOSIS: &str = "diagnosis";
/// Name of the macular-edema head.
pub const FLUID: &str = "fluid";
/// Name of the neovascularization-amount head.
pub const VESSEL_GROWTH: &str = "vessel_growth";

impl HeadSpec {
    /// The default heads: diagnosis (5 grades) and fluid on the embedding, vessel growth on
    /// stage 3.
    pub fn default_heads() -> Vec<HeadSpec> {
        vec![
            HeadSpec::new(DIAGNOSIS.into(), HeadKind::Multiclass(crate::NUM_GRADES)),
            HeadSpec::new(FLUID.into(), HeadKind::Binary),
            HeadSpec::new(VESSEL_GROWTH.into(), HeadKind::Regression)
                .with_attach(AttachPoint::Stage(3)),
        ]
    }
}

/// The whole network: trunk, heads and the input preprocessing they were trained with.
#[derive(Config, Debug, PartialEq)]
pub struct RetinaConfig {
    /// The preset this config started from (informational).
    #[config(default = "String::from(\"custom\")")]
    pub preset: String,
    /// The shared trunk.
    pub trunk: TrunkConfig,
    /// The heads, in output order.
    pub heads: Vec<HeadSpec>,
    /// How an image becomes the network's input.
    pub preprocess: PreprocessConfig,
}

/// Names of the built-in presets.
pub const PRESETS: [&str; 3] = ["reference", "small", "resnet18"];

impl RetinaConfig {
    /// A named preset with the default heads.
    ///
    /// - `reference`: exactly the PyTorch benchmark network in `shared/peer/model.py`
    ///   (stem 32, BasicBlocks 32, 64/2, 128/2, 256/2; 1,228,103 parameters), 224 px input.
    /// - `small`: a quarter of the reference's widths, 128 px; fast enough for tests and CPU demos.
    /// - `resnet18`: ResNet-18's stage layout (2 blocks each of 64, 128, 256, 512), 224 px.
    pub fn preset(name: &str) -> Result<RetinaConfig, ConfigError> {
        let stage = |w, s| StageConfig::new(w).with_stride(s);
        let (trunk, size) = match name {
            "reference" => (
                TrunkConfig::new(
                    32,
                    vec![stage(32, 1), stage(64, 2), stage(128, 2), stage(256, 2)],
                ),
                224,
            ),
            "small" => (
                TrunkConfig::new(
                    16,
                    vec![stage(16, 1), stage(32, 2), stage(48, 2), stage(64, 2)],
                ),
                128,
            ),
            "resnet18" => (
                TrunkConfig::new(
                    64,
                    [64, 128, 256, 512]
                        .iter()
                        .enumerate()
                        .map(|(i, &w)| stage(w, if i == 0 { 1 } else { 2 }).with_depth(2))
                        .collect(),
                )
                .with_stem_bias(false),
                224,
            ),
            other => return Err(ConfigError::UnknownPreset(other.to_string())),
        };
        Ok(RetinaConfig::new(
            trunk,
            HeadSpec::default_heads(),
            PreprocessConfig::new().with_image_size(size),
        )
        .with_preset(name.to_string()))
    }

    /// The head named `name`, if any.
    pub fn head(&self, name: &str) -> Option<&HeadSpec> {
        self.heads.iter().find(|h| h.name == name)
    }

    /// Checks that the config describes a network that can be built and run.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let t = &self.trunk;
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if t.stem_width == 0 || !(1..=4).contains(&t.stem_stride) {
            return bad(format!(
                "stem width must be > 0 and stride 1-4 (got width {}, stride {})",
                t.stem_width, t.stem_stride
            ));
        }
        if t.stages.is_empty() {
            return bad("the trunk needs at least one stage".into());
        }
        for (i, s) in t.stages.iter().enumerate() {
            if s.width == 0 || s.depth == 0 || !(s.stride == 1 || s.stride == 2) {
                return bad(format!(
                    "stage{} needs width > 0, depth > 0 and stride 1 or 2 \
                     (got width {}, depth {}, stride {})",
                    i + 1,
                    s.width,
                    s.depth,
                    s.stride
                ));
            }
        }
        if t.bn_epsilon.is_nan() || t.bn_epsilon <= 0.0 || !(0.0..=1.0).contains(&t.bn_momentum) {
            return bad("batch norm needs epsilon > 0 and momentum in [0, 1]".into());
        }
        if self.heads.is_empty() {
            return bad("at least one head is needed".into());
        }
        for (i, h) in self.heads.iter().enumerate() {
            let valid_name = !h.name.is_empty()
                && h.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !valid_name {
                return bad(format!(
                    "head name `{}` must be non-empty lowercase letters, digits and `_`",
                    h.name
                ));
            }
            if self.heads[..i].iter().any(|o| o.name == h.name) {
                return bad(format!("two heads are named `{}`", h.name));
            }
            if let HeadKind::Multiclass(n) = h.kind
                && n < 2
            {
                return bad(format!("head `{}` is multiclass({n}): needs >= 2", h.name));
            }
            if h.hidden == Some(0) {
                return bad(format!("head `{}` has a hidden layer of width 0", h.name));
            }
            if let AttachPoint::Stage(k) = h.attach
                && (k == 0 || k > t.stages.len())
            {
                return Err(ConfigError::UnknownStage {
                    head: h.name.clone(),
                    attach: h.attach.to_string(),
                    stages: t.stages.len(),
                });
            }
        }
        self.preprocess.validate().map_err(ConfigError::Invalid)?;
        if self.preprocess.image_size < t.total_stride() {
            return bad(format!(
                "image size {} is smaller than the trunk's total stride {}",
                self.preprocess.image_size,
                t.total_stride()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_points_parse_and_print() {
        assert_eq!(
            "embedding".parse::<AttachPoint>().unwrap(),
            AttachPoint::Embedding
        );
        assert_eq!(
            "Stage3".parse::<AttachPoint>().unwrap(),
            AttachPoint::Stage(3)
        );
        assert!("stage0".parse::<AttachPoint>().is_err());
        assert!("layer2".parse::<AttachPoint>().is_err());
        assert_eq!(AttachPoint::Stage(2).to_string(), "stage2");
    }

    #[test]
    fn presets_validate() {
        for p in PRESETS {
            RetinaConfig::preset(p).unwrap().validate().unwrap();
        }
        assert!(matches!(
            RetinaConfig::preset("vgg"),
            Err(ConfigError::UnknownPreset(_))
        ));
    }

    #[test]
    fn unknown_stage_is_a_clear_error() {
        let mut c = RetinaConfig::preset("small").unwrap();
        c.heads[1].attach = AttachPoint::Stage(7);
        let e = c.validate().unwrap_err();
        assert!(matches!(e, ConfigError::UnknownStage { stages: 4, .. }));
        let msg = e.to_string();
        assert!(msg.contains("`fluid`") && msg.contains("stage7"), "{msg}");
    }

    #[test]
    fn duplicate_heads_and_one_class_are_rejected() {
        let mut c = RetinaConfig::preset("small").unwrap();
        c.heads[1].name = "diagnosis".into();
        assert!(c.validate().unwrap_err().to_string().contains("two heads"));
        let mut c = RetinaConfig::preset("small").unwrap();
        c.heads[0].kind = HeadKind::Multiclass(1);
        assert!(c.validate().is_err());
    }

    #[test]
    fn config_round_trips_through_json() {
        let c = RetinaConfig::preset("reference").unwrap();
        let s = serde_json::to_string(&c).unwrap();
        assert!(s.contains("\"attach\":\"stage3\""), "{s}");
        assert!(s.contains("\"multiclass\":5"), "{s}");
        let back: RetinaConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(back, c);
    }
}
