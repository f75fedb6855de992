//! The shared convolutional trunk: a 3x3 stem and stages of ResNet BasicBlocks.
//!
//! The trunk stops before any classifier and returns every stage's output, so any number of
//! heads can read any stage. Parameter paths are hierarchical (`trunk.stages.2.blocks.0.conv1`)
//! and map one-to-one onto the PyTorch reference's names (see [`crate::torch`]).

use crate::config::{StageConfig, TrunkConfig};
use crate::conv::channels_last;
use crate::norm::{
    batch_norm_channels_last, channels_last_padding, conv_bn, conv_bn_channels_last,
};
use crate::unit_cache::UnitCache;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::prelude::*;

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

/// The trunk's unit, `relu?(bn(conv(x)) (+ residual))`: [`conv_bn`], or its channels-last form.
type Unit<'a> = &'a dyn Fn(&Conv2d, &BatchNorm, Tensor<4>, Option<Tensor<4>>, bool) -> Tensor<4>;

impl Stem {
    /// `[N, 3, H, W]` to `[N, stem_width, H/s, W/s]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.apply(x, &conv_bn)
    }

    fn apply(&self, x: Tensor<4>, unit: Unit) -> Tensor<4> {
        unit(&self.conv, &self.bn, x, None, true)
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
        self.apply(x, &conv_bn)
    }

    fn apply(&self, x: Tensor<4>, unit: Unit) -> Tensor<4> {
        let shortcut = match &self.downsample {
            Some(d) => unit(&d.conv, &d.bn, x.clone(), None, false),
            None => x.clone(),
        };
        let out = unit(&self.conv1, &self.bn1, x, None, true);
        unit(&self.conv2, &self.bn2, out, Some(shortcut), true)
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
        self.apply(x, &conv_bn)
    }

    fn apply(&self, x: Tensor<4>, unit: Unit) -> Tensor<4> {
        self.blocks.iter().fold(x, |x, b| b.apply(x, unit))
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
}

impl Trunk {
    /// Runs the trunk and returns the feature map of every stage, `[N, C_k, H_k, W_k]`.
    ///
    /// Only the stages up to `last` (1-based) are computed: a network whose heads all sit early
    /// need not pay for the deep stages.
    pub fn forward_stages(&self, x: Tensor<4>, last: usize) -> Vec<Tensor<4>> {
        let mut x = self.stem.forward(x);
        let mut out = Vec::with_capacity(last);
        for stage in self.stages.iter().take(last) {
            x = stage.forward(x);
            out.push(x.clone());
        }
        out
    }

    /// The globally average-pooled output of every stage up to `last`, `[N, C_k]`: what the
    /// heads read.
    ///
    /// In inference on the CPU the activations stay channels-last from the stem to the pooling
    /// (see [`crate::conv::channels_last`]); everywhere else this is [`Self::forward_stages`]
    /// then [`global_avg_pool`].
    pub fn forward_pooled(&self, x: Tensor<4>, last: usize) -> Vec<Tensor<2>> {
        let infer =
            |conv: &Conv2d, bn: &BatchNorm, x: Tensor<4>, residual: Option<Tensor<4>>, relu| {
                match self
                    .cache
                    .conv_bn(conv, bn, x.clone(), residual.clone(), relu)
                {
                    Some(y) => y,
                    None => conv_bn_channels_last(conv, bn, x, residual, relu)
                        .expect("every unit was checked for the channels-last path"),
                }
            };
        let train = |conv: &Conv2d, bn: &BatchNorm, x: Tensor<4>, residual, relu| {
            let padding = crate::conv::fast_path(conv, &x)
                .expect("every unit was checked for the channels-last path");
            let y = channels_last::conv2d(conv, x, padding);
            batch_norm_channels_last(bn, y, residual, relu)
        };
        let inference = self.runs_channels_last(&x);
        let unit: Unit = if inference {
            &infer
        } else if self.trains_channels_last(&x) {
            &train
        } else {
            return self
                .forward_stages(x, last)
                .into_iter()
                .map(global_avg_pool)
                .collect();
        };
        // Inference transposes in parallel; training keeps the differentiable permutation.
        let x = if inference {
            channels_last::to_channels_last_copy(x)
        } else {
            channels_last::to_channels_last(x)
        };
        let mut x = self.stem.apply(x, unit);
        self.stages
            .iter()
            .take(last)
            .map(|stage| {
                x = stage.apply(x.clone(), unit);
                let [n, h, w, c] = x.dims();
                x.clone().reshape([n, h * w, c]).mean_dim(1).reshape([n, c])
            })
            .collect()
    }

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

    /// Whether [`Self::forward_pooled`] keeps `x`'s activations channels-last in inference: on
    /// the CPU, with every layer in a form the channels-last kernels take.
    pub fn runs_channels_last(&self, x: &Tensor<4>) -> bool {
        self.units()
            .all(|(conv, bn)| channels_last_padding(conv, bn, x).is_some())
    }

    /// Whether [`Self::forward_pooled`] keeps `x`'s activations channels-last in training: on
    /// the CPU (autodiff over Flex), f32, every batch norm training, every convolution in a form
    /// the kernels take.
    pub fn trains_channels_last(&self, x: &Tensor<4>) -> bool {
        self.units().all(|(conv, bn)| {
            crate::conv::fast_path(conv, x).is_some()
                && conv.weight.val().dtype() == burn::tensor::DType::F32
                && conv
                    .bias
                    .as_ref()
                    .is_none_or(|b| b.val().dtype() == burn::tensor::DType::F32)
                && crate::norm::fast_path(bn, x)
        })
    }
}

/// Global average pooling: `[N, C, H, W]` to `[N, C]`.
pub fn global_avg_pool(x: Tensor<4>) -> Tensor<2> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h * w]).mean_dim(2).reshape([n, c])
}
