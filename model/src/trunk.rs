//! The shared convolutional trunk: a 3x3 stem and stages of ResNet BasicBlocks.
//!
//! The trunk stops before any classifier and returns every stage's output, so any number of
//! heads can read any stage. Parameter paths are hierarchical (`trunk.stages.2.blocks.0.conv1`)
//! and map one-to-one onto the PyTorch reference's names (see [`crate::torch`]).
//!
//! Its config ([`TrunkConfig`], [`StageConfig`]), their `init` and the modules sit side by side
//! here. Each convolution + batch-norm unit runs through [`retina_kernels::Plan::unit`], along the
//! path the plan gives it (the CPU kernels, or burn's own operations).

use burn::config::Config;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::prelude::*;
use retina_kernels::{Plan, UnitCache};

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
    /// Builds the trunk on `device` with PyTorch-default initialisation.
    pub fn init(&self, device: &Device) -> Trunk {
        let stem = Stem {
            conv: conv(
                3,
                self.stem_width,
                3,
                self.stem_stride,
                self.stem_bias,
                device,
            ),
            bn: batch_norm_layer(self.stem_width, self, device),
        };
        let mut cin = self.stem_width;
        let stages = self
            .stages
            .iter()
            .map(|s| {
                let stage = Stage::new(cin, s, self, device);
                cin = s.width;
                stage
            })
            .collect();
        Trunk {
            stem,
            stages,
            cache: UnitCache::default(),
        }
    }

    /// Channels of the pooled output of stage `k` (1-based).
    pub fn stage_width(&self, k: usize) -> usize {
        self.stages[k - 1].width
    }

    /// Total spatial downsampling of the trunk.
    pub fn total_stride(&self) -> usize {
        self.stem_stride * self.stages.iter().map(|s| s.stride).product::<usize>()
    }
}

fn conv(cin: usize, cout: usize, k: usize, stride: usize, bias: bool, device: &Device) -> Conv2d {
    let pad = k / 2;
    Conv2dConfig::new([cin, cout], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_bias(bias)
        .init(device)
}

fn batch_norm_layer(c: usize, cfg: &TrunkConfig, device: &Device) -> BatchNorm {
    BatchNormConfig::new(c)
        .with_epsilon(cfg.bn_epsilon)
        .with_momentum(cfg.bn_momentum)
        .init(device)
}

/// Stem: conv3x3 (stride 2 by default) + batch norm + ReLU.
#[derive(Module, Debug)]
pub struct Stem {
    /// The convolution.
    pub conv: Conv2d,
    /// Its batch norm.
    pub bn: BatchNorm,
}

impl Stem {
    /// `[N, 3, H, W]` to `[N, stem_width, H/s, W/s]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let plan = Plan::nchw(&x);
        self.apply(x, &plan)
    }

    fn apply(&self, x: Tensor<4>, plan: &Plan) -> Tensor<4> {
        plan.unit(&self.conv, &self.bn, x, None, true)
    }
}

/// The projection shortcut used when a block changes width or resolution: 1x1 conv + BN.
#[derive(Module, Debug)]
pub struct Downsample {
    /// 1x1 strided convolution, no bias.
    pub conv: Conv2d,
    /// Its batch norm.
    pub bn: BatchNorm,
}

/// ResNet BasicBlock: conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.
#[derive(Module, Debug)]
pub struct BasicBlock {
    /// First 3x3 convolution (carries the block's stride).
    pub conv1: Conv2d,
    /// Batch norm after `conv1`.
    pub bn1: BatchNorm,
    /// Second 3x3 convolution.
    pub conv2: Conv2d,
    /// Batch norm after `conv2`.
    pub bn2: BatchNorm,
    /// Projection shortcut, when the shape changes; identity otherwise.
    pub downsample: Option<Downsample>,
}

impl BasicBlock {
    fn new(cin: usize, cout: usize, stride: usize, cfg: &TrunkConfig, device: &Device) -> Self {
        let downsample = (stride != 1 || cin != cout).then(|| Downsample {
            conv: conv(cin, cout, 1, stride, false, device),
            bn: batch_norm_layer(cout, cfg, device),
        });
        BasicBlock {
            conv1: conv(cin, cout, 3, stride, false, device),
            bn1: batch_norm_layer(cout, cfg, device),
            conv2: conv(cout, cout, 3, 1, false, device),
            bn2: batch_norm_layer(cout, cfg, device),
            downsample,
        }
    }

    /// Applies the block.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let plan = Plan::nchw(&x);
        self.apply(x, &plan)
    }

    fn apply(&self, x: Tensor<4>, plan: &Plan) -> Tensor<4> {
        let shortcut = match &self.downsample {
            Some(d) => plan.unit(&d.conv, &d.bn, x.clone(), None, false),
            None => x.clone(),
        };
        let out = plan.unit(&self.conv1, &self.bn1, x, None, true);
        plan.unit(&self.conv2, &self.bn2, out, Some(shortcut), true)
    }

    fn units(&self) -> impl Iterator<Item = (&Conv2d, &BatchNorm)> {
        [(&self.conv1, &self.bn1), (&self.conv2, &self.bn2)]
            .into_iter()
            .chain(self.downsample.as_ref().map(|d| (&d.conv, &d.bn)))
    }
}

/// A stage: BasicBlocks of one width; the first may downsample.
#[derive(Module, Debug)]
pub struct Stage {
    /// The blocks, in order.
    pub blocks: Vec<BasicBlock>,
}

impl Stage {
    fn new(cin: usize, s: &StageConfig, cfg: &TrunkConfig, device: &Device) -> Self {
        let blocks = (0..s.depth)
            .map(|i| {
                let (inp, stride) = if i == 0 {
                    (cin, s.stride)
                } else {
                    (s.width, 1)
                };
                BasicBlock::new(inp, s.width, stride, cfg, device)
            })
            .collect();
        Stage { blocks }
    }

    /// Applies every block.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let plan = Plan::nchw(&x);
        self.apply(x, &plan)
    }

    fn apply(&self, x: Tensor<4>, plan: &Plan) -> Tensor<4> {
        self.blocks.iter().fold(x, |x, b| b.apply(x, plan))
    }
}

/// The trunk: stem, then stages.
#[derive(Module, Debug)]
pub struct Trunk {
    /// The stem.
    pub stem: Stem,
    /// The stages (`stage1` is `stages[0]`).
    pub stages: Vec<Stage>,
    /// Inference's folded and packed kernels, reused between calls (not a parameter: never
    /// saved, rebuilt from the weights when they change).
    #[module(skip)]
    cache: UnitCache,
}

impl Trunk {
    /// Runs the trunk and returns the feature map of every stage, `[N, C_k, H_k, W_k]`.
    ///
    /// Only the stages up to `last` (1-based) are computed: a network whose heads all sit early
    /// need not pay for the deep stages. The activations stay NCHW (the feature maps are NCHW).
    pub fn forward_stages(&self, x: Tensor<4>, last: usize) -> Vec<Tensor<4>> {
        let plan = Plan::nchw(&x);
        let mut x = self.stem.apply(x, &plan);
        let mut out = Vec::with_capacity(last);
        for stage in self.stages.iter().take(last) {
            x = stage.apply(x, &plan);
            out.push(x.clone());
        }
        out
    }

    /// The globally average-pooled output of every stage up to `last`, `[N, C_k]`: what the
    /// heads read.
    ///
    /// Where every unit takes the CPU kernels' channels-last path (inference on Flex, or
    /// training on `Autodiff<Flex>`; see [`Self::plan`]), the activations stay channels-last from
    /// the stem to the pooling; everywhere else this is [`Self::forward_stages`] then
    /// [`global_avg_pool`].
    pub fn forward_pooled(&self, x: Tensor<4>, last: usize) -> Vec<Tensor<2>> {
        self.forward_for_heads(x, last, &[], None).0.average
    }

    /// One pass up to stage `last` with everything the heads read: every stage's average,
    /// the maximum of the stages `max_of` marks (`max_of[k-1]` for stage k; missing entries
    /// are false), and the feature map of stage `keep` (1-based, at most `last`) as `[N, C, H,
    /// W]` where asked: a loss on a stage's feature map (distillation's feature matching) in
    /// the same pass as the heads. Channels-last from the stem to the pooling where
    /// [`Self::forward_pooled`] is.
    pub fn forward_for_heads(
        &self,
        x: Tensor<4>,
        last: usize,
        max_of: &[bool],
        keep: Option<usize>,
    ) -> (PooledStages, Option<Tensor<4>>) {
        if let Some(keep) = keep {
            assert!(
                (1..=last.min(self.stages.len())).contains(&keep),
                "stage {keep} is not computed in a pass to stage {last}"
            );
        }
        let plan = self.plan(&x);
        let mut x = self.stem.apply(plan.enter(x), &plan);
        let mut kept = None;
        let mut pooled = PooledStages::default();
        for (i, stage) in self.stages.iter().take(last).enumerate() {
            x = stage.apply(x, &plan);
            if keep == Some(i + 1) {
                kept = Some(plan.leave(x.clone()));
            }
            let max = max_of
                .get(i)
                .copied()
                .unwrap_or(false)
                .then(|| plan.max_pool(x.clone()));
            pooled.max.push(max);
            pooled.average.push(plan.pool(x.clone()));
        }
        (pooled, kept)
    }

    /// The plan of a [`Self::forward_pooled`] pass on `x`: the activations' layout and each
    /// unit's path, with this trunk's cache of packed inference kernels.
    pub fn plan(&self, x: &Tensor<4>) -> Plan<'_> {
        Plan::new(self.units(), x).with_cache(&self.cache)
    }

    /// Every convolution + batch-norm unit: the stem, then each block's.
    fn units(&self) -> impl Iterator<Item = (&Conv2d, &BatchNorm)> {
        std::iter::once((&self.stem.conv, &self.stem.bn)).chain(
            self.stages
                .iter()
                .flat_map(|s| &s.blocks)
                .flat_map(|b| b.units()),
        )
    }

    /// The folded and packed kernels that inference keeps between calls.
    pub fn inference_cache(&self) -> &UnitCache {
        &self.cache
    }
}

/// The pooled outputs of a pass's stages (index k-1 is stage k).
#[derive(Debug, Clone, Default)]
pub struct PooledStages {
    /// Each stage's global average, `[N, C_k]`.
    pub average: Vec<Tensor<2>>,
    /// Each stage's global maximum, `[N, C_k]`, where the pass was asked for it.
    pub max: Vec<Option<Tensor<2>>>,
}

/// Global average pooling: `[N, C, H, W]` to `[N, C]`.
pub fn global_avg_pool(x: Tensor<4>) -> Tensor<2> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h * w]).mean_dim(2).reshape([n, c])
}
