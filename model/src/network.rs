//! The multi-head network: one trunk, any number of heads on any stage.

use crate::config::ConfigError;
use crate::head::{AttachPoint, Decision, Head, HeadSpec};
use crate::preprocess::PreprocessConfig;
use crate::quality::GradabilityCheck;
use crate::trunk::{PooledStages, Trunk};
use crate::trunk::{StageConfig, TrunkConfig};
use burn::config::Config;
use burn::prelude::*;

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
    /// The check that refuses what is no fundus photograph before the network sees it;
    /// `None` (what bundles written before the check say) runs it with its defaults.
    pub gradability: Option<GradabilityCheck>,
}

/// Names of the built-in presets.
pub const PRESETS: [&str; 3] = ["reference", "small", "resnet18"];

impl RetinaConfig {
    /// A named preset with the default heads.
    ///
    /// - `reference`: the PyTorch benchmark network in `shared/peer/model.py` (stem 32,
    ///   BasicBlocks 32, 64/2, 128/2, 256/2), 224 px input; with the
    ///   [clinical heads](HeadSpec::clinical_heads) alone it is that network exactly
    ///   (1,228,103 parameters), the quality head adds 1,799.
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
        .with_preset(name.to_string())
        .with_gradability(Some(GradabilityCheck::default())))
    }

    /// The gradability check this model runs (see [`RetinaConfig::gradability`]).
    pub fn gradability(&self) -> GradabilityCheck {
        self.gradability.unwrap_or_default()
    }

    /// The head named `name`, if any.
    pub fn head(&self, name: &str) -> Option<&HeadSpec> {
        self.heads.iter().find(|h| h.name == name)
    }

    /// Every yes/no decision the network supports, in head order: each binary head, and each
    /// multiclass head's derived decision (`referable` from the diagnosis head).
    pub fn decisions(&self) -> Vec<Decision> {
        self.heads
            .iter()
            .filter_map(HeadSpec::decision_rule)
            .collect()
    }

    /// The decision called `name`, if the network has it.
    pub fn decision(&self, name: &str) -> Option<Decision> {
        self.decisions().into_iter().find(|d| d.name == name)
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
            h.validate()?;
            if self.heads[..i].iter().any(|o| o.name == h.name) {
                return bad(format!("two heads are named `{}`", h.name));
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
        let decisions = self.decisions();
        for (i, d) in decisions.iter().enumerate() {
            if decisions[..i].iter().any(|o| o.name == d.name) {
                return bad(format!(
                    "two decisions are named `{}` (a binary head is a decision under its own name)",
                    d.name
                ));
            }
        }
        let refusing: Vec<&str> = self
            .heads
            .iter()
            .filter(|h| h.refuses())
            .map(|h| h.name.as_str())
            .collect();
        if refusing.len() > 1 {
            return bad(format!(
                "heads {refusing:?} each have a refusing decision: at most one head may refuse \
                 images"
            ));
        }
        self.gradability()
            .validate()
            .map_err(ConfigError::Invalid)?;
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

/// The Retina network.
#[derive(Module, Debug)]
pub struct RetinaNet {
    /// The shared trunk.
    pub trunk: Trunk,
    /// One runtime head per [`HeadSpec`], in the same order.
    pub heads: Vec<Head>,
    /// The specs the heads were built from (names, kinds, attach points).
    #[module(skip)]
    pub specs: Vec<HeadSpec>,
}

/// Everything one forward pass produces.
#[derive(Debug, Clone)]
pub struct RetinaOutput {
    /// Each head's raw output `[N, width]`, in spec order.
    pub heads: Vec<Tensor<2>>,
    /// The pooled output of each computed stage, `[N, C_k]` (`embeddings[k-1]` is stage k).
    /// A loss may be put on any of them, not only on the heads.
    pub embeddings: Vec<Tensor<2>>,
    /// Head names, in the order of `heads`.
    pub names: Vec<String>,
}

impl RetinaOutput {
    /// The raw output of the head called `name`.
    pub fn head(&self, name: &str) -> Option<&Tensor<2>> {
        self.names
            .iter()
            .position(|n| n == name)
            .map(|i| &self.heads[i])
    }
}

impl RetinaConfig {
    /// Validates the config and builds the network on `device`.
    pub fn init(&self, device: &Device) -> Result<RetinaNet, ConfigError> {
        self.validate()?;
        let trunk = self.trunk.init(device);
        let n = self.trunk.stages.len();
        let heads = self
            .heads
            .iter()
            .map(|h| {
                let channels = self.trunk.stage_width(h.attach.stage_index(n));
                h.init(h.pooling.width(channels), device)
            })
            .collect();
        Ok(RetinaNet {
            trunk,
            heads,
            specs: self.heads.clone(),
        })
    }
}

impl RetinaNet {
    /// Runs the network on a preprocessed batch `[N, 3, S, S]`.
    pub fn forward(&self, images: Tensor<4>) -> RetinaOutput {
        // Stop after the deepest stage any head reads.
        let (pooled, _) =
            self.trunk
                .forward_for_heads(images, self.deepest_read(), &self.max_pooled(), None);
        self.heads_from(pooled)
    }

    /// [`Self::forward`], and the feature map of trunk stage `stage` (1-based) as `[N, C, H,
    /// W]`, from the same pass (the stages up to `stage` are computed even where no head reads
    /// them). Panics when the trunk has fewer stages.
    pub fn forward_keeping(&self, images: Tensor<4>, stage: usize) -> (RetinaOutput, Tensor<4>) {
        let last = self.deepest_read().max(stage);
        let (pooled, map) =
            self.trunk
                .forward_for_heads(images, last, &self.max_pooled(), Some(stage));
        (
            self.heads_from(pooled),
            map.expect("the kept stage is computed"),
        )
    }

    /// The deepest stage a head reads: a pass need not go further.
    fn deepest_read(&self) -> usize {
        let n = self.trunk.stages.len();
        self.specs
            .iter()
            .map(|s| s.attach.stage_index(n))
            .max()
            .unwrap_or(n)
    }

    /// Which stages' maxima some head reads (index k-1 is stage k).
    fn max_pooled(&self) -> Vec<bool> {
        let n = self.trunk.stages.len();
        let mut max = vec![false; n];
        for s in self.specs.iter().filter(|s| s.pooling.uses_max()) {
            max[s.attach.stage_index(n) - 1] = true;
        }
        max
    }

    /// Every head's output from the pooled stage outputs.
    fn heads_from(&self, pooled: PooledStages) -> RetinaOutput {
        let n = self.trunk.stages.len();
        let heads = self
            .heads
            .iter()
            .zip(&self.specs)
            .map(|(head, spec)| {
                let k = spec.attach.stage_index(n) - 1;
                let input = spec
                    .pooling
                    .combine(pooled.average[k].clone(), pooled.max[k].clone());
                head.forward(input)
            })
            .collect();
        RetinaOutput {
            heads,
            embeddings: pooled.average,
            names: self.specs.iter().map(|s| s.name.clone()).collect(),
        }
    }

    /// The index of the head called `name`.
    pub fn head_index(&self, name: &str) -> Option<usize> {
        self.specs.iter().position(|s| s.name == name)
    }

    /// The feature map head `index` reads, before pooling: `[N, C, H, W]` of its stage. With
    /// [`Self::head_from_feature_map`] this is [`Self::forward`] for one head, split where an
    /// explanation (Grad-CAM) needs the gradient.
    pub fn feature_map(&self, images: Tensor<4>, index: usize) -> Tensor<4> {
        let stage = self.specs[index]
            .attach
            .stage_index(self.trunk.stages.len());
        self.trunk
            .forward_stages(images, stage)
            .pop()
            .expect("a validated trunk has at least one stage")
    }

    /// Head `index`'s raw output from the feature map it reads (pooled, then the head).
    pub fn head_from_feature_map(&self, index: usize, features: Tensor<4>) -> Tensor<2> {
        self.heads[index].forward(self.specs[index].pooling.pool(features))
    }

    /// Sum of squares of every trainable parameter (conv and linear weights and biases, batch-norm
    /// gamma and beta; not the running statistics, which are not parameters). The explicit L2
    /// term of the training loss.
    pub fn l2_sum_of_squares(&self) -> Tensor<1> {
        let mut v = TrainableVisitor::new(true);
        self.visit(&mut v);
        v.sum.expect("a RetinaNet always has parameters")
    }

    /// Number of trainable scalars (PyTorch's `sum(p.numel() for p in parameters())`).
    pub fn parameter_count(&self) -> usize {
        let mut v = TrainableVisitor::new(false);
        self.visit(&mut v);
        v.count
    }
}

/// Visits trainable parameters only: burn hands batch-norm running statistics to visitors as
/// float tensors too, but they are buffers, not weights, and must stay out of the L2 term.
struct TrainableVisitor {
    path: Vec<String>,
    want_sum: bool,
    sum: Option<Tensor<1>>,
    count: usize,
}

impl TrainableVisitor {
    fn new(want_sum: bool) -> Self {
        TrainableVisitor {
            path: Vec::new(),
            want_sum,
            sum: None,
            count: 0,
        }
    }
}

impl burn::module::ModuleVisitor for TrainableVisitor {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
        if self.path.last().is_some_and(|n| n.starts_with("running_")) {
            return;
        }
        self.count += param.lazy_shape().num_elements();
        if self.want_sum {
            let t = param.val();
            let sq = (t.clone() * t).sum();
            self.sum = Some(match self.sum.take() {
                Some(s) => s + sq,
                None => sq,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::head::HeadKind;

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
    fn duplicate_heads_decisions_and_one_class_are_rejected() {
        let mut c = RetinaConfig::preset("small").unwrap();
        c.heads[1].name = "diagnosis".into();
        assert!(c.validate().unwrap_err().to_string().contains("two heads"));
        let mut c = RetinaConfig::preset("small").unwrap();
        c.heads[0].kind = HeadKind::Multiclass(1);
        assert!(c.validate().is_err());
        // A binary head called `referable` would collide with the diagnosis decision.
        let mut c = RetinaConfig::preset("small").unwrap();
        c.heads[1].name = "referable".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("two decisions")
        );
    }

    #[test]
    fn decisions_come_from_the_specs() {
        let c = RetinaConfig::preset("small").unwrap();
        let names: Vec<String> = c.decisions().into_iter().map(|d| d.name).collect();
        assert_eq!(names, ["referable", "fluid", "ungradable"]);
    }

    #[test]
    fn config_round_trips_through_json() {
        let c = RetinaConfig::preset("reference").unwrap();
        let s = serde_json::to_string(&c).unwrap();
        assert!(s.contains("\"attach\":\"stage3\""), "{s}");
        assert!(s.contains("\"multiclass\":5"), "{s}");
        assert!(s.contains("\"from_class\":2"), "{s}");
        let back: RetinaConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(back, c);
    }
}
