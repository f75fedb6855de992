//! Batch normalisation on the CPU: one pass per statistic in training, folded into the
//! convolution in inference.
//!
//! Why this exists: burn 0.22's generic `batch_norm_train` (which burn-flex inherits) swaps the
//! batch and channel axes and copies the tensor to reduce over it, twice forward and twice
//! backward, plus about ten broadcast element-wise passes, each on one thread in burn-flex. After
//! the convolution fast path ([`crate::conv`]) those transposing copies were the largest item in
//! a profile of the reference network's training step. Here the per-channel sums are read
//! straight from NCHW (each channel is `N` contiguous runs of `H·W` values) or from
//! channels-last data (each pixel a run of all channels, summed in blocks of pixels, in one pass
//! around a sample of each channel), and the output and input gradient are each one fused
//! parallel pass, `y = a·x + b` and `dx = a·dy + b·x + c` per channel, with the ReLU and the
//! residual add that follow in the trunk fused in (in channels-last, the ReLU's mask is applied
//! as the gradient is read).
//!
//! Like [`crate::conv`], these are burn backend extensions ([`BatchNormBackend`] for Flex and
//! `Autodiff<Flex>` with its own backward; [`BatchNormInferenceBackend`] for Flex alone). The
//! entry points take burn's `BatchNorm` module: the trunk's unit (through [`crate::Plan`]),
//! [`batch_norm`], [`batch_norm_relu`] and [`batch_norm_add_relu`]. They fall back to
//! `BatchNorm::forward` and burn's operations wherever the plan finds that the fast paths do not
//! apply (other devices, other dtypes, a frozen layer in a training graph, the kernels switched
//! off), and update the running statistics exactly as burn does.

use crate::conv::{ConvInferenceBackend, channels_last, flex, slice, zeros};
use crate::plan::NormStep;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, NodeGuard, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::{ActivationOps, FloatTensorOps, ModuleOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{AutodiffBackend, DType, Dispatch, DispatchTensor, Flex, backend_extension};
use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use rayon::prelude::*;

/// Batch normalisation with the batch's own statistics, optionally followed by a residual add
/// and ReLU: the two ways the trunk uses it (`relu(bn(x))` and `relu(bn(x) + shortcut)`).
/// burn-flex runs element-wise operations on one thread, so fusing the ReLU and the add into the
/// (parallel) normalisation pass also keeps the second core busy.
#[backend_extension(Flex, Autodiff)]
pub trait BatchNormBackend: burn::backend::Backend {
    /// `x: [N, C, ...]` (or `[N, H, W, C]` when `channels_last`), `gamma`, `beta: [C]`. Returns
    /// the output (after ReLU when `relu`), and the batch mean and biased variance per channel
    /// (not differentiated: they feed the running statistics).
    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
        channels_last: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// `relu(batch_norm(x) + residual)`, with `residual` shaped like `x`; returns as above.
    fn fused_batch_norm_add_relu_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        epsilon: f64,
        channels_last: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Inference-mode batch norm (running statistics) as one parallel pass, optionally with the
/// residual add and ReLU: burn's generic form is five broadcast element-wise operations, each on
/// one thread in burn-flex. Flex only and never differentiated: the plan
/// ([`crate::NormStep::Inference`]) keeps autodiff tensors (a frozen layer inside a training
/// graph) on burn's own operations.
#[backend_extension(Flex)]
pub trait BatchNormInferenceBackend: burn::backend::Backend {
    /// `relu?(scale[c]·x + shift[c] (+ residual))` with per-channel `scale` and `shift`.
    fn channel_affine(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        relu: bool,
    ) -> FloatTensor<Self>;

    /// `relu(scale[c]·x + shift[c] + residual)`.
    fn channel_affine_add_relu(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        residual: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

impl BatchNormInferenceBackend for Flex {
    fn channel_affine(
        x: FlexTensor,
        scale: FlexTensor,
        shift: FlexTensor,
        relu: bool,
    ) -> FlexTensor {
        apply_affine(x, scale, shift, None, relu)
    }

    fn channel_affine_add_relu(
        x: FlexTensor,
        scale: FlexTensor,
        shift: FlexTensor,
        residual: FlexTensor,
    ) -> FlexTensor {
        apply_affine(x, scale, shift, Some(residual), true)
    }
}

fn apply_affine(
    x: FlexTensor,
    scale: FlexTensor,
    shift: FlexTensor,
    residual: Option<FlexTensor>,
    relu: bool,
) -> FlexTensor {
    let shape = x.layout().shape().to_vec();
    let ch = Channels::of(&shape, false);
    let x = x.to_contiguous();
    let residual = residual.map(|r| r.to_contiguous());
    let out = affine(
        slice(&x),
        &ch,
        &host(&scale),
        &host(&shift),
        residual.as_ref().map(slice),
        relu,
    );
    flex(out, shape)
}

/// Inference batch norm as `scale · x + shift` per channel, from the running statistics:
/// burn's `forward_inference` computes `(x - mean) / sqrt(var + eps) · gamma + beta`.
fn running_scale_shift(bn: &BatchNorm, device: &Device) -> (Tensor<1>, Tensor<1>) {
    let mean = bn.running_mean.value().to_device(device);
    let var = bn.running_var.value().to_device(device);
    let scale = bn.gamma.val() / var.add_scalar(bn.epsilon).sqrt();
    let shift = bn.beta.val() - mean * scale.clone();
    (scale, shift)
}

/// `relu?(bn(x) (+ residual))` from the running statistics.
fn inference(bn: &BatchNorm, x: Tensor<4>, residual: Option<Tensor<4>>, relu: bool) -> Tensor<4> {
    let (scale, shift) = running_scale_shift(bn, &x.device());
    let out = match residual {
        Some(r) => Dispatch::channel_affine_add_relu(
            x.into_dispatch(),
            scale.into_dispatch(),
            shift.into_dispatch(),
            r.into_dispatch(),
        ),
        None => Dispatch::channel_affine(
            x.into_dispatch(),
            scale.into_dispatch(),
            shift.into_dispatch(),
            relu,
        ),
    };
    Tensor::from_dispatch(out)
}

/// The inference batch norm after `conv` as a per-output-channel `scale` (`gamma / sqrt(var +
/// eps)`, to multiply the convolution's weights by) and `shift` (with the convolution's bias).
pub(crate) fn folded_scale_shift(
    conv: &Conv2d,
    bn: &BatchNorm,
    device: &Device,
) -> (Tensor<1>, Tensor<1>) {
    let (scale, mut shift) = running_scale_shift(bn, device);
    if let Some(bias) = &conv.bias {
        shift = shift + bias.val() * scale.clone();
    }
    (scale, shift)
}

/// The convolution with the inference batch norm folded in: scaled weights and the shift.
fn folded(conv: &Conv2d, bn: &BatchNorm, device: &Device) -> (Tensor<4>, Tensor<1>) {
    let (scale, shift) = folded_scale_shift(conv, bn, device);
    let c = scale.dims()[0];
    (conv.weight.val() * scale.reshape([c, 1, 1, 1]), shift)
}

/// The unit `relu?(bn(conv(x)) (+ residual))` in inference on channels-last tensors (`[N, H,
/// W, C]` in and out), for a trunk that keeps its activations so (see
/// [`crate::conv::channels_last`]), with the batch norm folded in per call
/// ([`crate::Path::ChannelsLastInference`] without a cache, or with the `gemm` kernel).
pub(crate) fn conv_bn_channels_last(
    conv: &Conv2d,
    bn: &BatchNorm,
    x: Tensor<4>,
    residual: Option<Tensor<4>>,
    relu: bool,
    padding: [usize; 2],
) -> Tensor<4> {
    let (scale, shift) = folded_scale_shift(conv, bn, &x.device());
    channels_last::conv2d_shift(
        x,
        conv.weight.val(),
        scale,
        shift,
        residual,
        conv.stride,
        padding,
        relu,
    )
}

/// The unit `relu?(bn(conv(x)) (+ residual))` in inference on NCHW tensors
/// ([`crate::Path::NchwFolded`]; a residual implies the ReLU).
///
/// The batch norm is folded into the convolution: its weights scaled per output channel by
/// `gamma / sqrt(var + eps)`, and the shift, residual and ReLU applied in the convolution's own
/// per-image output pass.
pub(crate) fn conv_bn_folded(
    conv: &Conv2d,
    bn: &BatchNorm,
    x: Tensor<4>,
    residual: Option<Tensor<4>>,
    relu: bool,
    padding: [usize; 2],
) -> Tensor<4> {
    let (weight, shift) = folded(conv, bn, &x.device());
    let out = match residual {
        Some(r) => Dispatch::gemm_conv2d_shift_add_relu(
            x.into_dispatch(),
            weight.into_dispatch(),
            shift.into_dispatch(),
            r.into_dispatch(),
            conv.stride,
            padding,
        ),
        None => Dispatch::gemm_conv2d_shift(
            x.into_dispatch(),
            weight.into_dispatch(),
            shift.into_dispatch(),
            conv.stride,
            padding,
            relu,
        ),
    };
    Tensor::from_dispatch(out)
}

/// Applies burn's `BatchNorm` module, through the fused kernels where the plan
/// ([`crate::plan::norm_step`]) says so.
pub fn batch_norm(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    let step = crate::plan::norm_step(bn, &x);
    apply(step, bn, x, None, false)
}

/// `relu(bn(x))`.
pub fn batch_norm_relu(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    let step = crate::plan::norm_step(bn, &x);
    apply(step, bn, x, None, true)
}

/// `relu(bn(x) + residual)`: the end of a residual block.
pub fn batch_norm_add_relu(bn: &BatchNorm, x: Tensor<4>, residual: Tensor<4>) -> Tensor<4> {
    let step = crate::plan::norm_step(bn, &x);
    apply(step, bn, x, Some(residual), true)
}

/// `relu?(bn(x) (+ residual))` on NCHW `x` the way `step` says (a residual implies the ReLU). A
/// residual the fused passes cannot take (another shape or dtype) goes through burn's add.
pub(crate) fn apply(
    step: NormStep,
    bn: &BatchNorm,
    x: Tensor<4>,
    residual: Option<Tensor<4>>,
    relu: bool,
) -> Tensor<4> {
    let fits = residual
        .as_ref()
        .is_none_or(|r| r.dims() == x.dims() && r.dtype() == DType::F32);
    match step {
        NormStep::Inference if fits => inference(bn, x, residual, relu),
        NormStep::Training if fits => train(bn, x, residual, relu, false),
        _ => burn_batch_norm(bn, x, residual, relu),
    }
}

/// `relu?(bn(x) (+ residual))` with burn's own module and operations.
pub(crate) fn burn_batch_norm(
    bn: &BatchNorm,
    x: Tensor<4>,
    residual: Option<Tensor<4>>,
    relu: bool,
) -> Tensor<4> {
    let y = bn.forward(x);
    match residual {
        Some(r) => burn::tensor::activation::relu(y + r),
        None if relu => burn::tensor::activation::relu(y),
        None => y,
    }
}

/// `relu?(bn(x) (+ residual))` in training on a channels-last `x` (`[N, H, W, C]`), for a trunk
/// that keeps its activations so (see [`crate::conv::channels_last`]). The caller (the plan,
/// [`crate::Path::ChannelsLastTraining`]) has checked that the fused kernels apply, and
/// `residual` is an f32 tensor shaped like `x`.
pub fn batch_norm_channels_last(
    bn: &BatchNorm,
    x: Tensor<4>,
    residual: Option<Tensor<4>>,
    relu: bool,
) -> Tensor<4> {
    train(bn, x, residual, relu, true)
}

/// The fused training kernels (a residual implies the ReLU), then the running statistics.
fn train(
    bn: &BatchNorm,
    x: Tensor<4>,
    residual: Option<Tensor<4>>,
    relu: bool,
    channels_last: bool,
) -> Tensor<4> {
    let (gamma, beta) = (
        bn.gamma.val().into_dispatch(),
        bn.beta.val().into_dispatch(),
    );
    let out = match residual {
        Some(r) => Dispatch::fused_batch_norm_add_relu_train(
            x.into_dispatch(),
            gamma,
            beta,
            r.into_dispatch(),
            bn.epsilon,
            channels_last,
        ),
        None => Dispatch::fused_batch_norm_train(
            x.into_dispatch(),
            gamma,
            beta,
            bn.epsilon,
            relu,
            channels_last,
        ),
    };
    update_running(bn, out)
}

/// Folds the batch statistics into the running ones exactly as burn's `BatchNorm::forward_train`
/// does, and returns the output.
fn update_running(
    bn: &BatchNorm,
    (out, mean, var): (DispatchTensor, DispatchTensor, DispatchTensor),
) -> Tensor<4> {
    let (out, mean, var) = (
        Tensor::<4>::from_dispatch(out),
        Tensor::<1>::from_dispatch(mean),
        Tensor::<1>::from_dispatch(var),
    );
    let device = out.device();
    let running_mean = bn.running_mean.value_sync().to_device(&device);
    let running_var = bn.running_var.value_sync().to_device(&device);
    let running_mean = running_mean
        .mul_scalar(1.0 - bn.momentum)
        .add(mean.detach().mul_scalar(bn.momentum));
    let running_var = running_var
        .mul_scalar(1.0 - bn.momentum)
        .add(var.detach().mul_scalar(bn.momentum));
    bn.running_mean.update(running_mean.detach());
    bn.running_var.update(running_var.detach());
    out
}

/// Per-channel layout of an `[N, C, ...]` tensor: `n` runs of `plane` values per channel.
#[derive(Clone, Copy, Debug)]
struct Channels {
    n: usize,
    c: usize,
    plane: usize,
}

impl Channels {
    /// For `[N, C, ...]`, or `[N, ..., C]` when `channels_last` (then `n` counts pixels and
    /// `plane` is 1).
    fn of(shape: &[usize], channels_last: bool) -> Self {
        assert!(shape.len() >= 2, "batch norm: rank {} < 2", shape.len());
        if channels_last {
            let c = shape[shape.len() - 1];
            return Channels {
                n: shape[..shape.len() - 1].iter().product(),
                c,
                plane: 1,
            };
        }
        Channels {
            n: shape[0],
            c: shape[1],
            plane: shape[2..].iter().product(),
        }
    }

    fn count(&self) -> f64 {
        (self.n * self.plane).max(1) as f64
    }

    /// The runs of channel `ch` in `data`.
    fn runs<'a>(&self, data: &'a [f32], ch: usize) -> impl Iterator<Item = &'a [f32]> {
        let (c, p) = (self.c, self.plane);
        (0..self.n).map(move |i| &data[(i * c + ch) * p..(i * c + ch + 1) * p])
    }
}

/// Number of independent partial sums: a single running f32 sum is a chain of dependent
/// additions that neither vectorises nor pipelines; eight lanes do both.
const LANES: usize = 8;

/// `Σ f(v)` over a run, in eight interleaved f32 partial sums, returned in f64.
#[inline]
fn lanes_sum(run: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut acc = [0.0f32; LANES];
    let chunks = run.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().map(|&a| a as f64).sum::<f64>() + tail as f64
}

/// Two sums `Σ f(x, g).0` and `Σ f(x, g).1` over paired runs, as [`lanes_sum`].
#[inline]
fn lanes_sum2(xs: &[f32], gs: &[f32], f: impl Fn(f32, f32) -> (f32, f32)) -> (f64, f64) {
    let (mut a, mut b) = ([0.0f32; LANES], [0.0f32; LANES]);
    let (xc, gc) = (xs.chunks_exact(LANES), gs.chunks_exact(LANES));
    let (mut ta, mut tb) = (0.0f32, 0.0f32);
    for (&x, &g) in xc.remainder().iter().zip(gc.remainder()) {
        let (p, q) = f(x, g);
        ta += p;
        tb += q;
    }
    for (x, g) in xc.zip(gc) {
        for i in 0..LANES {
            let (p, q) = f(x[i], g[i]);
            a[i] += p;
            b[i] += q;
        }
    }
    let total = |l: [f32; LANES], t: f32| l.iter().map(|&v| v as f64).sum::<f64>() + t as f64;
    (total(a, ta), total(b, tb))
}

/// Per-channel `(mean, biased variance)`, accumulated in f64 around a first estimate.
fn statistics(x: &[f32], ch: &Channels) -> Vec<(f32, f32)> {
    (0..ch.c)
        .into_par_iter()
        .map(|c| {
            let sum: f64 = ch.runs(x, c).map(|r| lanes_sum(r, |v| v)).sum();
            let mean = sum / ch.count();
            let m = mean as f32;
            let sq: f64 = ch
                .runs(x, c)
                .map(|r| {
                    lanes_sum(r, |v| {
                        let d = v - m;
                        d * d
                    })
                })
                .sum();
            (m, (sq / ch.count()) as f32)
        })
        .collect()
}

/// `out[i, c, ...] = scale[c] · x[i, c, ...] + shift[c] (+ residual)`, then ReLU when asked.
fn affine(
    x: &[f32],
    ch: &Channels,
    scale: &[f32],
    shift: &[f32],
    residual: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    let mut out = zeros(x.len());
    let p = ch.plane.max(1);
    out.par_chunks_mut(p)
        .zip(x.par_chunks(p))
        .enumerate()
        .for_each(|(run, (o, x))| {
            let c = run % ch.c;
            let (a, b) = (scale[c], shift[c]);
            match residual {
                Some(r) => {
                    let r = &r[run * p..(run + 1) * p];
                    for ((o, &x), &r) in o.iter_mut().zip(x).zip(r) {
                        *o = (a * x + b + r).max(0.0);
                    }
                }
                None if relu => {
                    for (o, &x) in o.iter_mut().zip(x) {
                        *o = (a * x + b).max(0.0);
                    }
                }
                None => {
                    for (o, &x) in o.iter_mut().zip(x) {
                        *o = a * x + b;
                    }
                }
            }
        });
    out
}

fn host(t: &FlexTensor) -> Vec<f32> {
    slice(&t.to_contiguous()).to_vec()
}

fn inv_std(var: f32, epsilon: f64) -> f32 {
    (1.0 / (var as f64 + epsilon).sqrt()) as f32
}

/// The forward pass of both fused operations on Flex.
fn forward_flex(
    x: FlexTensor,
    gamma: FlexTensor,
    beta: FlexTensor,
    residual: Option<FlexTensor>,
    epsilon: f64,
    relu: bool,
    channels_last: bool,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let all_f32 = [Some(&x), Some(&gamma), Some(&beta), residual.as_ref()]
        .into_iter()
        .flatten()
        .all(|t| t.dtype() == DType::F32);
    assert!(
        all_f32 || !channels_last,
        "channels-last batch norm: f32 only (the caller checks)"
    );
    if !all_f32 {
        // burn's own operations, in the same order.
        let r = Flex::batch_norm_train(x, gamma, beta, epsilon);
        let mut out = r.output;
        if let Some(residual) = residual {
            out = Flex::float_add(out, residual);
        }
        if relu {
            out = Flex::relu(out);
        }
        return (out, r.mean, r.variance);
    }
    let shape = x.layout().shape().to_vec();
    let ch = Channels::of(&shape, channels_last);
    let x = x.to_contiguous();
    let stats = if channels_last {
        statistics_nhwc(slice(&x), ch.c)
    } else {
        statistics(slice(&x), &ch)
    };
    let (gamma, beta) = (host(&gamma), host(&beta));
    let scale: Vec<f32> = (0..ch.c)
        .map(|c| gamma[c] * inv_std(stats[c].1, epsilon))
        .collect();
    let shift: Vec<f32> = (0..ch.c).map(|c| beta[c] - stats[c].0 * scale[c]).collect();
    let residual = residual.map(|r| r.to_contiguous());
    let residual = residual.as_ref().map(slice);
    let out = if channels_last {
        affine_nhwc(slice(&x), &scale, &shift, residual, relu)
    } else {
        affine(slice(&x), &ch, &scale, &shift, residual, relu)
    };
    (
        flex(out, shape),
        flex(stats.iter().map(|s| s.0).collect(), vec![ch.c]),
        flex(stats.iter().map(|s| s.1).collect(), vec![ch.c]),
    )
}

impl BatchNormBackend for Flex {
    fn fused_batch_norm_train(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f64,
        relu: bool,
        channels_last: bool,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        forward_flex(x, gamma, beta, None, epsilon, relu, channels_last)
    }

    fn fused_batch_norm_add_relu_train(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        residual: FlexTensor,
        epsilon: f64,
        channels_last: bool,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        forward_flex(x, gamma, beta, Some(residual), epsilon, true, channels_last)
    }
}

/// `dx = γ·s·(dy - mean(dy) - x̂·mean(dy·x̂)) = a·dy + b·x + c` per channel: `[a, b, c]` from
/// the per-channel sums `(Σ dy, Σ dy·x̂)` over `count` values.
fn coefficients(
    sums: &[(f64, f64)],
    count: f64,
    gamma: &[f32],
    mean: &[f32],
    var: &[f32],
    epsilon: f64,
) -> Vec<[f32; 3]> {
    (0..sums.len())
        .map(|c| {
            let s = inv_std(var[c], epsilon) as f64;
            let a = gamma[c] as f64 * s;
            let mdy = sums[c].0 / count;
            let mdyx = sums[c].1 / count;
            [
                a as f32,
                (-a * s * mdyx) as f32,
                (a * (s * mdyx * mean[c] as f64 - mdy)) as f32,
            ]
        })
        .collect()
}

/// Pixels per task in the channels-last passes: each task sums its block in f32 per channel and
/// hands the block's sums over in f64.
const PIXELS: usize = 256;

/// Per-channel sums over the blocks of a channels-last tensor: `f(block, acc)` adds one block's
/// values into `acc` (`lanes` values per channel, laid out `[lanes][C]`).
fn channel_sums(
    len: usize,
    c: usize,
    lanes: usize,
    f: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync,
) -> Vec<f64> {
    let blocks = len.div_ceil(PIXELS * c);
    (0..blocks)
        .into_par_iter()
        .map(|b| {
            let mut acc = vec![0.0f32; lanes * c];
            f(b * PIXELS * c..((b + 1) * PIXELS * c).min(len), &mut acc);
            acc
        })
        .collect::<Vec<_>>()
        .into_iter()
        // Summed in block order, so a run gives the same sums whichever threads ran the blocks.
        .fold(vec![0.0f64; lanes * c], |mut total, block| {
            total
                .iter_mut()
                .zip(block)
                .for_each(|(t, b)| *t += b as f64);
            total
        })
}

/// Per-channel `(mean, biased variance)` of a channels-last tensor (`c` channels innermost), in
/// one pass, vectorised across the channels of each pixel: sums of `x - k` and `(x - k)²` around
/// the first pixel's values `k` (a sample of each channel, so the two sums do not cancel the way
/// plain sums of squares would for a channel far from zero).
fn statistics_nhwc(x: &[f32], c: usize) -> Vec<(f32, f32)> {
    let count = (x.len() / c.max(1)).max(1) as f64;
    let pivot: Vec<f32> = x[..c.min(x.len())].to_vec();
    let sums = channel_sums(x.len(), c, 2, |r, acc| {
        let (s1, s2) = acc.split_at_mut(c);
        for px in x[r].chunks_exact(c) {
            for (((s1, s2), &v), &k) in s1.iter_mut().zip(s2.iter_mut()).zip(px).zip(&pivot) {
                let d = v - k;
                *s1 += d;
                *s2 += d * d;
            }
        }
    });
    (0..c)
        .map(|k| {
            let (m1, m2) = (sums[k] / count, sums[c + k] / count);
            let mean = pivot.get(k).copied().unwrap_or(0.0) as f64 + m1;
            (mean as f32, (m2 - m1 * m1).max(0.0) as f32)
        })
        .collect()
}

/// [`affine`] for a channels-last tensor.
fn affine_nhwc(
    x: &[f32],
    scale: &[f32],
    shift: &[f32],
    residual: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    let c = scale.len();
    let mut out = zeros(x.len());
    let block = PIXELS * c;
    out.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .enumerate()
        .for_each(|(b, (o, x))| {
            let r = residual.map(|r| &r[b * block..b * block + x.len()]);
            for (p, (o, x)) in o.chunks_exact_mut(c).zip(x.chunks_exact(c)).enumerate() {
                let px = o.iter_mut().zip(x).zip(scale.iter().zip(shift));
                match r {
                    Some(r) => {
                        for (((o, &x), (&a, &b)), &r) in px.zip(&r[p * c..(p + 1) * c]) {
                            *o = (a * x + b + r).max(0.0);
                        }
                    }
                    None if relu => {
                        for ((o, &x), (&a, &b)) in px {
                            *o = (a * x + b).max(0.0);
                        }
                    }
                    None => {
                        for ((o, &x), (&a, &b)) in px {
                            *o = a * x + b;
                        }
                    }
                }
            }
        });
    out
}

/// [`backward`] for a channels-last tensor. With `relu_output`, `dy` is the gradient above the
/// ReLU and is masked where the output was zero as it is read (no masked copy is written).
#[allow(clippy::too_many_arguments)]
fn backward_nhwc(
    x: &[f32],
    dy: &[f32],
    relu_output: Option<&[f32]>,
    ch: &Channels,
    gamma: &[f32],
    mean: &[f32],
    var: &[f32],
    epsilon: f64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = ch.c;
    let centre: Vec<(f32, f32)> = mean
        .iter()
        .zip(var)
        .map(|(&m, &v)| (m, inv_std(v, epsilon)))
        .collect();
    // `[Σ dy | Σ dy·x̂]` per channel.
    let both = channel_sums(x.len(), c, 2, |r, acc| {
        let (sg, sgx) = acc.split_at_mut(c);
        let xs = x[r.clone()].chunks_exact(c);
        for (p, (px, g)) in xs.zip(dy[r.clone()].chunks_exact(c)).enumerate() {
            let lanes = sg.iter_mut().zip(sgx.iter_mut()).zip(&centre);
            match relu_output {
                Some(y) => {
                    let y = &y[r.start + p * c..r.start + (p + 1) * c];
                    for ((((sg, sgx), &(m, s)), (&x, &g)), &y) in lanes.zip(px.iter().zip(g)).zip(y)
                    {
                        let g = if y > 0.0 { g } else { 0.0 };
                        *sg += g;
                        *sgx += g * (x - m) * s;
                    }
                }
                None => {
                    for (((sg, sgx), &(m, s)), (&x, &g)) in lanes.zip(px.iter().zip(g)) {
                        *sg += g;
                        *sgx += g * (x - m) * s;
                    }
                }
            }
        }
    });
    let sums: Vec<(f64, f64)> = (0..c).map(|k| (both[k], both[c + k])).collect();
    let coef = coefficients(&sums, ch.count(), gamma, mean, var, epsilon);
    let mut dx = zeros(x.len());
    let block = PIXELS * c;
    dx.par_chunks_mut(block)
        .zip(x.par_chunks(block).zip(dy.par_chunks(block)))
        .enumerate()
        .for_each(|(blk, (o, (x, g)))| {
            let y = relu_output.map(|y| &y[blk * block..blk * block + x.len()]);
            let rows = o.chunks_exact_mut(c).zip(x.chunks_exact(c));
            for (p, ((o, x), g)) in rows.zip(g.chunks_exact(c)).enumerate() {
                let px = o.iter_mut().zip(x).zip(g).zip(&coef);
                match y {
                    Some(y) => {
                        for ((((o, &x), &g), &[a, b, cc]), &y) in px.zip(&y[p * c..(p + 1) * c]) {
                            let g = if y > 0.0 { g } else { 0.0 };
                            *o = a * g + b * x + cc;
                        }
                    }
                    None => {
                        for (((o, &x), &g), &[a, b, cc]) in px {
                            *o = a * g + b * x + cc;
                        }
                    }
                }
            }
        });
    let dgamma = sums.iter().map(|s| s.1 as f32).collect();
    let dbeta = sums.iter().map(|s| s.0 as f32).collect();
    (dx, dgamma, dbeta)
}

/// `(dx, dgamma, dbeta)` of training-mode batch norm.
fn backward(
    x: &[f32],
    dy: &[f32],
    ch: &Channels,
    gamma: &[f32],
    mean: &[f32],
    var: &[f32],
    epsilon: f64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    // Per channel: Σ dy and Σ dy·x̂, with x̂ = (x - mean)·inv_std.
    let sums: Vec<(f64, f64)> = (0..ch.c)
        .into_par_iter()
        .map(|c| {
            let (m, s) = (mean[c], inv_std(var[c], epsilon));
            ch.runs(x, c)
                .zip(ch.runs(dy, c))
                .fold((0.0f64, 0.0f64), |(a, b), (xr, gr)| {
                    let (sa, sb) = lanes_sum2(xr, gr, |x, g| (g, g * (x - m) * s));
                    (a + sa, b + sb)
                })
        })
        .collect();
    let coef = coefficients(&sums, ch.count(), gamma, mean, var, epsilon);
    let mut dx = zeros(x.len());
    let p = ch.plane.max(1);
    dx.par_chunks_mut(p)
        .zip(x.par_chunks(p).zip(dy.par_chunks(p)))
        .enumerate()
        .for_each(|(run, (o, (x, g)))| {
            let [a, b, c] = coef[run % ch.c];
            for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
                *o = a * g + b * x + c;
            }
        });
    let dgamma = sums.iter().map(|s| s.1 as f32).collect();
    let dbeta = sums.iter().map(|s| s.0 as f32).collect();
    (dx, dgamma, dbeta)
}

/// What the backward pass of a fused batch norm keeps from its forward pass.
#[derive(Debug, Clone)]
struct Saved {
    x: NodeId,
    gamma: NodeId,
    mean: FlexTensor,
    var: FlexTensor,
    epsilon: f64,
    /// The output, when a ReLU followed: its zeros mask the incoming gradient.
    relu_output: Option<FlexTensor>,
    /// `[N, H, W, C]` rather than `[N, C, H, W]`.
    channels_last: bool,
}

/// `(dx, dgamma, dbeta, dresidual)`: the gradient through the ReLU is the residual's.
fn grads_of(
    saved: Saved,
    dy: FlexTensor,
    checkpointer: &mut Checkpointer,
    residual_grad: bool,
) -> (FlexTensor, FlexTensor, FlexTensor, Option<FlexTensor>) {
    let x: FlexTensor = checkpointer.retrieve_node_output(saved.x);
    let gamma: FlexTensor = checkpointer.retrieve_node_output(saved.gamma);
    let shape = x.layout().shape().to_vec();
    let ch = Channels::of(&shape, saved.channels_last);
    let (x, dy) = (x.to_contiguous(), dy.to_contiguous());
    let (gamma, mean, var) = (host(&gamma), host(&saved.mean), host(&saved.var));
    if saved.channels_last && !residual_grad {
        // The ReLU's mask is applied as the gradient is read: no masked copy.
        let y = saved.relu_output.map(|y| y.to_contiguous());
        let (dx, dgamma, dbeta) = backward_nhwc(
            slice(&x),
            slice(&dy),
            y.as_ref().map(slice),
            &ch,
            &gamma,
            &mean,
            &var,
            saved.epsilon,
        );
        return (
            flex(dx, shape),
            flex(dgamma, vec![ch.c]),
            flex(dbeta, vec![ch.c]),
            None,
        );
    }
    let dy = match saved.relu_output {
        Some(y) => {
            let y = y.to_contiguous();
            let mut masked = zeros(slice(&dy).len());
            masked
                .par_chunks_mut(1 << 14)
                .zip(
                    slice(&dy)
                        .par_chunks(1 << 14)
                        .zip(slice(&y).par_chunks(1 << 14)),
                )
                .for_each(|(m, (g, y))| {
                    for ((m, &g), &y) in m.iter_mut().zip(g).zip(y) {
                        *m = if y > 0.0 { g } else { 0.0 };
                    }
                });
            flex(masked, shape.clone())
        }
        None => dy,
    };
    let (dx, dgamma, dbeta) = if saved.channels_last {
        let (x, dy) = (slice(&x), slice(&dy));
        backward_nhwc(x, dy, None, &ch, &gamma, &mean, &var, saved.epsilon)
    } else {
        backward(
            slice(&x),
            slice(&dy),
            &ch,
            &gamma,
            &mean,
            &var,
            saved.epsilon,
        )
    };
    (
        flex(dx, shape),
        flex(dgamma, vec![ch.c]),
        flex(dbeta, vec![ch.c]),
        residual_grad.then_some(dy),
    )
}

/// The backward pass of both fused operations: parents `x, gamma, beta` and, with a residual,
/// `residual` (whose gradient is the one through the ReLU).
#[derive(Debug)]
struct FusedBatchNormBackward;

impl<const N: usize> Backward<Flex, N> for FusedBatchNormBackward {
    type State = Saved;

    fn backward(
        self,
        ops: Ops<Self::State, N>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let dy = grads.consume::<Flex>(&ops.node);
        // Only the add-ReLU form has a fourth parent, the residual.
        let residual_grad = ops.parents.get(3).is_some_and(|p| p.is_some());
        let (dx, dgamma, dbeta, dres) = grads_of(ops.state, dy, checkpointer, residual_grad);
        let grads_in_order = [Some(dx), Some(dgamma), Some(dbeta), dres];
        for (node, grad) in ops.parents.into_iter().zip(grads_in_order) {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

type AdTensor<C> = FloatTensor<Autodiff<Flex, C>>;

/// Records one fused batch norm in the autodiff graph: `parents` are the guards of `x`, `gamma`,
/// `beta` (and the residual), `run` computes it on Flex; the batch statistics come back
/// untracked.
fn record<C: CheckpointStrategy, const N: usize>(
    parents: [NodeGuard; N],
    x: &AdTensor<C>,
    gamma: &AdTensor<C>,
    epsilon: f64,
    relu: bool,
    channels_last: bool,
    run: impl FnOnce() -> (FlexTensor, FlexTensor, FlexTensor),
) -> (AdTensor<C>, AdTensor<C>, AdTensor<C>) {
    let untracked = <Autodiff<Flex, C> as AutodiffBackend>::from_inner;
    match FusedBatchNormBackward
        .prepare::<C>(parents)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let (x, gamma) = (prep.checkpoint(x), prep.checkpoint(gamma));
            let (out, mean, var) = run();
            let saved = Saved {
                x,
                gamma,
                mean: mean.clone(),
                var: var.clone(),
                epsilon,
                relu_output: relu.then(|| out.clone()),
                channels_last,
            };
            (prep.finish(saved, out), untracked(mean), untracked(var))
        }
        OpsKind::UnTracked(prep) => {
            let (out, mean, var) = run();
            (prep.finish(out), untracked(mean), untracked(var))
        }
    }
}

impl<C: CheckpointStrategy> BatchNormBackend for Autodiff<Flex, C> {
    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
        channels_last: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let parents = [x.node(), gamma.node(), beta.node()];
        let (xp, gp, bp) = (
            x.primitive().clone(),
            gamma.primitive().clone(),
            beta.into_primitive(),
        );
        record::<C, 3>(parents, &x, &gamma, epsilon, relu, channels_last, || {
            Flex::fused_batch_norm_train(xp, gp, bp, epsilon, relu, channels_last)
        })
    }

    fn fused_batch_norm_add_relu_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        epsilon: f64,
        channels_last: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let parents = [x.node(), gamma.node(), beta.node(), residual.node()];
        let (xp, gp, bp, rp) = (
            x.primitive().clone(),
            gamma.primitive().clone(),
            beta.into_primitive(),
            residual.into_primitive(),
        );
        record::<C, 4>(parents, &x, &gamma, epsilon, true, channels_last, || {
            Flex::fused_batch_norm_add_relu_train(xp, gp, bp, rp, epsilon, channels_last)
        })
    }
}
