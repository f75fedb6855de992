//! The plan: which path every convolution + batch-norm unit takes, decided in one place.
//!
//! A unit is `relu?(bn(conv(x)) (+ residual))`, the trunk's building block. Which kernels run it
//! depends on the layer (padding, groups, dilation, dtypes, output channels, whether its batch
//! norm trains), on the input (device, autodiff, dtype), on the CPU (AVX2 and FMA) and on the
//! switch ([`crate::enabled`]). This module holds every one of those checks, and nothing else
//! in the crate decides a path:
//!
//! - [`Plan::new`] plans a pass over a list of units: the activations stay channels-last from
//!   the first unit to the pooling when every unit takes the same channels-last path
//!   ([`Layout`]), and NCHW otherwise.
//! - [`Plan::path`] gives one unit's [`Path`] in that layout; [`Plan::unit`] runs it (the one
//!   entry point for a unit), [`Plan::enter`] and [`Plan::pool`] bring the activations into and
//!   out of the layout.
//! - [`conv_step`] and [`norm_step`] plan a convolution or a batch norm on its own (the NCHW
//!   entry points [`crate::conv2d`], [`crate::batch_norm`] and its forms).
//! - The kernels' choice between Winograd, the direct convolution and `gemm` for a convolution
//!   shape ([`Kernel`]) comes from here too, for the packed units of inference as for the
//!   per-call convolutions of training.

use crate::conv::channels_last::{self, direct, winograd};
use crate::conv::{Geometry, conv2d_gemm};
use crate::norm;
use crate::unit_cache::UnitCache;
use burn::backend::{DType, DispatchDevice};
use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, PaddingConfig2d};
use burn::prelude::*;

/// The kernel a channels-last convolution runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Winograd F(2x2, 3x3): 3x3, stride 1, padding 1, output channels in blocks of 16, on a CPU
    /// with AVX2 and FMA.
    Winograd,
    /// The direct register-tiled convolution: output channels in blocks of 16, AVX2 and FMA.
    Direct,
    /// `gemm` products: every shape, every CPU.
    Gemm,
}

/// How a convolution runs on NCHW activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvStep {
    /// The im2col / shifted-window `gemm` kernel (forward and backward), with symmetric
    /// `padding` (`[height, width]`).
    Gemm {
        /// Zero padding, `[height, width]`.
        padding: [usize; 2],
    },
    /// burn's `Conv2d::forward`.
    Burn,
}

/// How a batch norm runs on NCHW activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NormStep {
    /// Running statistics as one parallel per-channel pass (no autodiff, or a frozen layer).
    Inference,
    /// The fused training kernels (batch statistics, own backward) on `Autodiff<Flex>`.
    Training,
    /// burn's `BatchNorm::forward` (and its add and ReLU).
    Burn,
}

/// The path of one unit, `relu?(bn(conv(x)) (+ residual))` (a residual implies the ReLU).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    /// Inference on Flex in f32 on channels-last activations: the batch norm folded into the
    /// convolution, the shift, residual and ReLU applied in its output pass; with a
    /// [`UnitCache`], the Winograd and direct kernels are packed once and reused.
    ChannelsLastInference {
        /// The convolution kernel.
        kernel: Kernel,
        /// Zero padding, `[height, width]`.
        padding: [usize; 2],
    },
    /// Training on `Autodiff<Flex>` in f32 on channels-last activations: the convolution with
    /// its own backward pass, then the fused batch norm (+ residual, ReLU).
    ChannelsLastTraining {
        /// Zero padding, `[height, width]`.
        padding: [usize; 2],
    },
    /// Inference on Flex on NCHW activations: the batch norm folded into the `gemm`
    /// convolution, the shift, residual and ReLU applied in its output pass.
    NchwFolded {
        /// Zero padding, `[height, width]`.
        padding: [usize; 2],
    },
    /// NCHW activations, the convolution then the batch norm, at least one of them through a
    /// kernel.
    Nchw {
        /// The convolution.
        conv: ConvStep,
        /// The batch norm (+ residual, ReLU).
        norm: NormStep,
    },
    /// burn's own `Conv2d`, `BatchNorm` and ReLU (other devices and dtypes, the kernels off).
    Burn,
}

/// The layout of the activations between the units of a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// `[N, H, W, C]`, every unit on [`Path::ChannelsLastInference`].
    ChannelsLastInference,
    /// `[N, H, W, C]`, every unit on [`Path::ChannelsLastTraining`].
    ChannelsLastTraining,
    /// `[N, C, H, W]`.
    Nchw,
}

impl Path {
    /// The layout this path reads and writes.
    pub fn layout(&self) -> Layout {
        match self {
            Path::ChannelsLastInference { .. } => Layout::ChannelsLastInference,
            Path::ChannelsLastTraining { .. } => Layout::ChannelsLastTraining,
            _ => Layout::Nchw,
        }
    }

    /// Runs the unit along this path, on `x` (and `residual`) in [`Self::layout`].
    ///
    /// The caller chose the path (normally [`Plan::path`]); one whose kernels do not take the
    /// layer or the input stops at a kernel's checks (a panic), never computes out of bounds.
    pub fn run(
        self,
        cache: Option<&UnitCache>,
        conv: &Conv2d,
        bn: &BatchNorm,
        x: Tensor<4>,
        residual: Option<Tensor<4>>,
        relu: bool,
    ) -> Tensor<4> {
        let relu = relu || residual.is_some();
        match self {
            Path::ChannelsLastInference { kernel, padding } => match (kernel, cache) {
                (Kernel::Winograd | Kernel::Direct, Some(cache)) => cache.conv_bn(
                    conv,
                    bn,
                    x,
                    residual,
                    relu,
                    padding,
                    kernel == Kernel::Winograd,
                ),
                // Folded and reordered per call; the convolution picks the same kernel
                // (`kernel` below) for its shape.
                _ => norm::conv_bn_channels_last(conv, bn, x, residual, relu, padding),
            },
            Path::ChannelsLastTraining { padding } => {
                let y = channels_last::conv2d(conv, x, padding);
                norm::batch_norm_channels_last(bn, y, residual, relu)
            }
            Path::NchwFolded { padding } => {
                if residual.as_ref().is_none_or(|r| r.dtype() == DType::F32) {
                    norm::conv_bn_folded(conv, bn, x, residual, relu, padding)
                } else {
                    let y = conv2d_gemm(conv, x, padding);
                    norm::burn_batch_norm(bn, y, residual, relu)
                }
            }
            Path::Nchw { conv: step, norm } => {
                let y = match step {
                    ConvStep::Gemm { padding } => conv2d_gemm(conv, x, padding),
                    ConvStep::Burn => conv.forward(x),
                };
                norm::apply(norm, bn, y, residual, relu)
            }
            Path::Burn => norm::burn_batch_norm(bn, conv.forward(x), residual, relu),
        }
    }
}

/// What the plan reads from a pass's input; the same for every unit of the pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Target {
    /// The kernels are switched on ([`crate::enabled`]).
    kernels: bool,
    /// A Flex device, with or without autodiff.
    flex: bool,
    /// An autodiff device.
    autodiff: bool,
    /// f32 data.
    f32: bool,
}

impl Target {
    fn of(x: &Tensor<4>) -> Self {
        let device = x.device();
        Target {
            kernels: crate::enabled(),
            autodiff: device.is_autodiff(),
            flex: matches!(
                device.without_autodiff().as_dispatch(),
                DispatchDevice::Flex(_)
            ),
            f32: x.dtype() == DType::F32,
        }
    }

    /// Whether the CPU kernels can take this input at all: Flex, f32, kernels on.
    fn kernels(&self) -> bool {
        self.kernels && self.flex && self.f32
    }
}

/// A plan for one pass over a list of units, from the pass's input.
#[derive(Clone, Copy, Debug)]
pub struct Plan<'c> {
    layout: Layout,
    target: Target,
    cache: Option<&'c UnitCache>,
}

impl<'c> Plan<'c> {
    /// Plans a pass of `units` (each a convolution and the batch norm after it) on `x` (`[N, C,
    /// H, W]`, the pass's input; the units' own inputs share its device and dtype).
    ///
    /// Channels-last where every unit takes the same channels-last path, NCHW otherwise.
    pub fn new<'u>(
        units: impl IntoIterator<Item = (&'u Conv2d, &'u BatchNorm)>,
        x: &Tensor<4>,
    ) -> Self {
        let target = Target::of(x);
        let mut layouts = units
            .into_iter()
            .map(|(conv, bn)| channels_last_path(conv, bn, target).map(|p| p.layout()));
        let layout = match layouts.next().flatten() {
            Some(first) if layouts.all(|l| l == Some(first)) => first,
            _ => Layout::Nchw,
        };
        Plan {
            layout,
            target,
            cache: None,
        }
    }

    /// An NCHW plan on `x`, for units run one at a time.
    pub fn nchw(x: &Tensor<4>) -> Self {
        Plan {
            layout: Layout::Nchw,
            target: Target::of(x),
            cache: None,
        }
    }

    /// Runs the packed inference units from `cache`'s kernels (made on first use).
    pub fn with_cache(self, cache: &UnitCache) -> Plan<'_> {
        Plan {
            layout: self.layout,
            target: self.target,
            cache: Some(cache),
        }
    }

    /// The layout of the activations between units.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The path of one unit in this plan's layout.
    pub fn path(&self, conv: &Conv2d, bn: &BatchNorm) -> Path {
        match self.layout {
            Layout::Nchw => nchw_path(conv, bn, self.target),
            layout => channels_last_path(conv, bn, self.target)
                .filter(|p| p.layout() == layout)
                .unwrap_or_else(|| nchw_path(conv, bn, self.target)),
        }
    }

    /// `x` (`[N, C, H, W]`, the pass's input) in this plan's layout: inference transposes in
    /// parallel; training keeps the differentiable permutation.
    pub fn enter(&self, x: Tensor<4>) -> Tensor<4> {
        match self.layout {
            Layout::ChannelsLastInference => channels_last::to_channels_last_copy(x),
            Layout::ChannelsLastTraining => channels_last::to_channels_last(x),
            Layout::Nchw => x,
        }
    }

    /// Runs one unit, `relu?(bn(conv(x)) (+ residual))` (a residual implies the ReLU), on
    /// activations in this plan's layout: the crate's one entry point for a unit.
    pub fn unit(
        &self,
        conv: &Conv2d,
        bn: &BatchNorm,
        x: Tensor<4>,
        residual: Option<Tensor<4>>,
        relu: bool,
    ) -> Tensor<4> {
        let path = self.path(conv, bn);
        if path.layout() == self.layout || self.layout == Layout::Nchw {
            return path.run(self.cache, conv, bn, x, residual, relu);
        }
        // A unit that was not among those planned, and does not take the pass's channels-last
        // path: it runs on NCHW views of the activations (correct, only slower).
        let x = channels_last::to_channels_first(x);
        let residual = residual.map(channels_last::to_channels_first);
        channels_last::to_channels_last(path.run(self.cache, conv, bn, x, residual, relu))
    }

    /// Activations in this plan's layout as `[N, C, H, W]` (a view: differentiable).
    pub fn leave(&self, x: Tensor<4>) -> Tensor<4> {
        match self.layout {
            Layout::Nchw => x,
            _ => channels_last::to_channels_first(x),
        }
    }

    /// Global average pooling of activations in this plan's layout, to `[N, C]`.
    pub fn pool(&self, x: Tensor<4>) -> Tensor<2> {
        self.reduce_pixels(x, |t, dim| t.mean_dim(dim))
    }

    /// Global max pooling of activations in this plan's layout, to `[N, C]`.
    pub fn max_pool(&self, x: Tensor<4>) -> Tensor<2> {
        self.reduce_pixels(x, |t, dim| t.max_dim(dim))
    }

    /// `[N, C]` from activations in this plan's layout, by `reduce` over the pixels' dimension
    /// of an `[N, C, H·W]` or `[N, H·W, C]` view.
    fn reduce_pixels(
        &self,
        x: Tensor<4>,
        reduce: impl Fn(Tensor<3>, usize) -> Tensor<3>,
    ) -> Tensor<2> {
        match self.layout {
            Layout::Nchw => {
                let [n, c, h, w] = x.dims();
                reduce(x.reshape([n, c, h * w]), 2).reshape([n, c])
            }
            _ => {
                let [n, h, w, c] = x.dims();
                reduce(x.reshape([n, h * w, c]), 1).reshape([n, c])
            }
        }
    }
}

/// How [`crate::conv2d`] runs `conv` on `x` (NCHW).
pub fn conv_step(conv: &Conv2d, x: &Tensor<4>) -> ConvStep {
    gemm_padding(conv, Target::of(x)).map_or(ConvStep::Burn, |padding| ConvStep::Gemm { padding })
}

/// How [`crate::batch_norm`] and its forms run `bn` on `x` (NCHW).
pub fn norm_step(bn: &BatchNorm, x: &Tensor<4>) -> NormStep {
    norm_step_for(bn, Target::of(x))
}

/// The padding the `gemm` convolution runs `conv` with, where it takes the layer and the
/// input: symmetric zero padding, one group, no dilation, f32 on Flex.
fn gemm_padding(conv: &Conv2d, t: Target) -> Option<[usize; 2]> {
    let padding = symmetric_padding(&conv.padding)?;
    (t.kernels() && conv.groups == 1 && conv.dilation == [1, 1]).then_some(padding)
}

fn symmetric_padding(padding: &PaddingConfig2d) -> Option<[usize; 2]> {
    match *padding {
        PaddingConfig2d::Valid => Some([0, 0]),
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => {
            Some([top, left])
        }
        _ => None,
    }
}

fn norm_step_for(bn: &BatchNorm, t: Target) -> NormStep {
    if !t.kernels() {
        return NormStep::Burn;
    }
    let gamma = bn.gamma.val().dtype() == DType::F32;
    if !t.autodiff && gamma {
        // burn would use the running statistics: no autodiff.
        NormStep::Inference
    } else if t.autodiff && bn.training.is_enabled() && gamma && bn.beta.val().dtype() == DType::F32
    {
        // Training mode: an autodiff device and a layer that is not frozen.
        NormStep::Training
    } else {
        NormStep::Burn
    }
}

/// The unit's path on NCHW activations.
fn nchw_path(conv: &Conv2d, bn: &BatchNorm, t: Target) -> Path {
    let conv_step =
        gemm_padding(conv, t).map_or(ConvStep::Burn, |padding| ConvStep::Gemm { padding });
    match (conv_step, norm_step_for(bn, t)) {
        (ConvStep::Gemm { padding }, NormStep::Inference) => Path::NchwFolded { padding },
        (ConvStep::Burn, NormStep::Burn) => Path::Burn,
        (conv, norm) => Path::Nchw { conv, norm },
    }
}

/// The unit's channels-last path, where it has one.
fn channels_last_path(conv: &Conv2d, bn: &BatchNorm, t: Target) -> Option<Path> {
    let padding = gemm_padding(conv, t)?;
    let f32 = |p: &Tensor<1>| p.dtype() == DType::F32;
    let weight = conv.weight.val().dtype() == DType::F32;
    match norm_step_for(bn, t) {
        NormStep::Inference if weight => Some(Path::ChannelsLastInference {
            kernel: unit_kernel(conv, padding),
            padding,
        }),
        NormStep::Training if weight && conv.bias.as_ref().is_none_or(|b| f32(&b.val())) => {
            Some(Path::ChannelsLastTraining { padding })
        }
        _ => None,
    }
}

/// The kernel of `conv` run with `padding` (on any input size).
fn unit_kernel(conv: &Conv2d, padding: [usize; 2]) -> Kernel {
    let [cout, cin, kh, kw] = conv.weight.dims();
    let g = Geometry::new(
        &[1, cin, kh, kw],
        &[cout, cin, kh, kw],
        conv.stride,
        padding,
    );
    kernel(&g)
}

/// The kernel of a channels-last convolution of shape `g`: Winograd F(2x2, 3x3) for the
/// stride-1 3x3 layers, the direct convolution for the other shapes it takes (output channels in
/// blocks of 16 on a CPU with AVX2 and FMA), `gemm` products everywhere else.
pub(crate) fn kernel(g: &Geometry) -> Kernel {
    if winograd::applies(g) {
        Kernel::Winograd
    } else if direct::applies(g) {
        Kernel::Direct
    } else {
        Kernel::Gemm
    }
}
