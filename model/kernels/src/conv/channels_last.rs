//! Convolutions on channels-last activations (`[N, H, W, C]`), for inference and training.
//!
//! Why this exists: every kernel in [`super`] works channels-last inside (the padded copy that
//! shifted windows read, the patch rows of a strided 3x3, the channels-last product), so on NCHW
//! tensors each layer pays a transposing copy in (`interleave`) and one out
//! (`from_channels_last`), and the backward pass pays them again: 14% of a profile of the
//! reference network's inference pass at 224 px, 11% of its training step at 128 px. When the
//! activations stay channels-last from the stem to the pooling, the input copy is a row `memcpy`
//! (only the shifted windows' zero border needs it at all) and no layer transposes anything.
//!
//! - Inference ([`ChannelsLastBackend`], Flex only): the convolution with its batch norm folded
//!   in; the output pass applies the shift, the residual and the ReLU. Where the CPU has AVX2
//!   and FMA and the output channels come in blocks of 16, the kernel is packed once
//!   ([`ChannelsLastBackend::pack_kernel`], kept by [`crate::UnitCache`]) and the
//!   convolution runs as a direct register-tiled kernel (`direct`), or, for the stride-1 3x3
//!   layers, as Winograd F(2x2, 3x3) (`winograd`) whose 16 products are that kernel's 1x1
//!   form; elsewhere through `gemm` products.
//! - Training ([`ChannelsLastConvBackend`], Flex and `Autodiff<Flex>`): the plain convolution
//!   (forward and stride-1 input gradient through the same direct / Winograd kernels, packed per
//!   call since the weights change every step) with its own backward pass (input gradient by
//!   the flipped kernel for stride 1, by patch rows added back for the strided forms; weight
//!   gradient per image through `gemm`, summed over the batch); the batch norm that follows is
//!   [`crate::norm::batch_norm_channels_last`].
//!
//! A trunk switches to this layout as a whole ([`crate::Layout`], chosen by [`crate::Plan`]:
//! one permutation of the input, pooling straight from channels-last) wherever every layer can
//! take it; everywhere else (wgpu, NdArray, other dtypes, the kernels switched off, the trunk's
//! per-stage feature maps) it stays NCHW.

use super::{
    Geometry, Mat, flex, flip_weight, im2col_patches, matmul_into, over_batch, permute_weight,
    slice, sum_over_batch, to_channels_last as transpose_to_channels_last, with_scratch, zeros,
};
use crate::plan::Kernel;
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Dispatch, Flex, backend_extension};
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use gemm::Parallelism;
use rayon::prelude::*;

pub(crate) mod direct;
pub(crate) mod winograd;

/// Convolution with a folded batch norm on channels-last tensors, for inference on Flex.
///
/// `x: [N, H, W, C_in]`; `weight: [C_out, C_in, kh, kw]`, multiplied by `scale: [C_out]` (the
/// batch norm's `gamma / sqrt(var + eps)`) as the kernel reorders it; `shift: [C_out]`; the
/// output and `residual` are `[N, H_out, W_out, C_out]`.
#[backend_extension(Flex)]
pub trait ChannelsLastBackend: burn::backend::Backend {
    /// `relu?(conv(x, weight) + shift)`.
    fn conv2d_nhwc_shift(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        relu: bool,
    ) -> FloatTensor<Self>;

    /// `relu(conv(x, weight) + shift + residual)`.
    fn conv2d_nhwc_shift_add_relu(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self>;

    /// `[N, C, H, W]` to a contiguous `[N, H, W, C]`, in parallel: the trunk's input (burn's
    /// copy of a permuted view runs on one thread, 0.4 ms of a 13 ms batch-1 pass at 224 px).
    fn nchw_to_nhwc(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `weight · scale[c_out]` packed for the direct convolution ([`Kernel::Direct`]), or with
    /// `winograd` transformed for Winograd F(2x2, 3x3) (3x3 kernels that run with stride 1 and
    /// padding 1, [`Kernel::Winograd`]): the values in the kernel's own order, shaped
    /// `[C_out, kh, kw, C_in]` (`[C_out, 4, 4, C_in]` transformed). Made once, used by every
    /// call of [`conv2d_nhwc_packed`](Self::conv2d_nhwc_packed).
    fn pack_kernel(
        weight: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        winograd: bool,
    ) -> FloatTensor<Self>;

    /// `relu?(conv(x, kernel) + shift)` with a kernel from
    /// [`pack_kernel`](Self::pack_kernel).
    fn conv2d_nhwc_packed(
        x: FloatTensor<Self>,
        packed: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        relu: bool,
        winograd: bool,
    ) -> FloatTensor<Self>;

    /// `relu(conv(x, kernel) + shift + residual)` with a kernel from
    /// [`pack_kernel`](Self::pack_kernel).
    fn conv2d_nhwc_packed_add_relu(
        x: FloatTensor<Self>,
        packed: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        winograd: bool,
    ) -> FloatTensor<Self>;
}

impl ChannelsLastBackend for Flex {
    fn nchw_to_nhwc(x: FlexTensor) -> FlexTensor {
        let x = x.to_contiguous();
        let &[n, c, h, w] = x.layout().shape().as_slice() else {
            panic!("nchw_to_nhwc: {:?} is not [N, C, H, W]", x.layout().shape());
        };
        let (plane, xs) = (c * h * w, slice(&x));
        let mut out = vec![0.0f32; n * plane];
        for (xi, oi) in xs.chunks(plane.max(1)).zip(out.chunks_mut(plane.max(1))) {
            transpose_to_channels_last(xi, c, h * w, oi, true);
        }
        flex(out, [n, h, w, c])
    }

    fn pack_kernel(weight: FlexTensor, scale: FlexTensor, winograd: bool) -> FlexTensor {
        let (weight, scale) = (weight.to_contiguous(), scale.to_contiguous());
        let &[cout, cin, kh, kw] = weight.layout().shape().as_slice() else {
            panic!(
                "pack_kernel: weight {:?} is not [C_out, C_in, kh, kw]",
                weight.layout().shape()
            );
        };
        // The geometry of any input the kernel fits: only the kernel's own sizes matter here.
        let g = Geometry::new(&[1, cin, kh, kw], &[cout, cin, kh, kw], [1, 1], [0, 0]);
        assert!(
            direct::applies(&g),
            "pack_kernel: a kernel the direct convolution does not take"
        );
        let (w, scale) = (slice(&weight), slice(&scale));
        assert_eq!(
            scale.len(),
            cout,
            "pack_kernel: one scale per output channel"
        );
        let taps = kh * kw;
        let at = |co: usize, t: usize, ci: usize| scale[co] * w[(co * cin + ci) * taps + t];
        if winograd {
            let g = Geometry::new(&[1, cin, kh, kw], &[cout, cin, kh, kw], [1, 1], [1, 1]);
            assert!(
                winograd::applies(&g),
                "pack_kernel: a kernel Winograd does not take"
            );
            return flex(winograd::pack(&g, at), [cout, 4, 4, cin]);
        }
        flex(direct::pack(&g, at), [cout, kh, kw, cin])
    }

    fn conv2d_nhwc_packed(
        x: FlexTensor,
        packed: FlexTensor,
        shift: FlexTensor,
        stride: [usize; 2],
        padding: [usize; 2],
        relu: bool,
        winograd: bool,
    ) -> FlexTensor {
        run_packed(x, packed, shift, None, stride, padding, relu, winograd)
    }

    fn conv2d_nhwc_packed_add_relu(
        x: FlexTensor,
        packed: FlexTensor,
        shift: FlexTensor,
        residual: FlexTensor,
        stride: [usize; 2],
        padding: [usize; 2],
        winograd: bool,
    ) -> FlexTensor {
        run_packed(
            x,
            packed,
            shift,
            Some(residual),
            stride,
            padding,
            true,
            winograd,
        )
    }

    fn conv2d_nhwc_shift(
        x: FlexTensor,
        weight: FlexTensor,
        scale: FlexTensor,
        shift: FlexTensor,
        stride: [usize; 2],
        padding: [usize; 2],
        relu: bool,
    ) -> FlexTensor {
        run(x, weight, scale, shift, None, stride, padding, relu)
    }

    fn conv2d_nhwc_shift_add_relu(
        x: FlexTensor,
        weight: FlexTensor,
        scale: FlexTensor,
        shift: FlexTensor,
        residual: FlexTensor,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FlexTensor {
        run(
            x,
            weight,
            scale,
            shift,
            Some(residual),
            stride,
            padding,
            true,
        )
    }
}

/// A kernel packed by [`pack_kernel`], with the form it was packed in.
#[derive(Clone, Debug)]
pub(crate) struct PackedKernel {
    /// The packed values (see [`ChannelsLastBackend::pack_kernel`]).
    pub(crate) values: Tensor<4>,
    /// Transformed for Winograd F(2x2, 3x3).
    pub(crate) winograd: bool,
}

/// [`conv2d_shift`] with a kernel from [`pack_kernel`].
pub(crate) fn conv2d_packed(
    x: Tensor<4>,
    kernel: &PackedKernel,
    shift: Tensor<1>,
    residual: Option<Tensor<4>>,
    stride: [usize; 2],
    padding: [usize; 2],
    relu: bool,
) -> Tensor<4> {
    let packed = kernel.values.clone().into_dispatch();
    let out = match residual {
        Some(r) => Dispatch::conv2d_nhwc_packed_add_relu(
            x.into_dispatch(),
            packed,
            shift.into_dispatch(),
            r.into_dispatch(),
            stride,
            padding,
            kernel.winograd,
        ),
        None => Dispatch::conv2d_nhwc_packed(
            x.into_dispatch(),
            packed,
            shift.into_dispatch(),
            stride,
            padding,
            relu,
            kernel.winograd,
        ),
    };
    Tensor::from_dispatch(out)
}

/// `weight · scale` packed for [`conv2d_packed`] (see [`ChannelsLastBackend::pack_kernel`]).
pub(crate) fn pack_kernel(weight: Tensor<4>, scale: Tensor<1>, winograd: bool) -> PackedKernel {
    PackedKernel {
        values: Tensor::from_dispatch(Dispatch::pack_kernel(
            weight.into_dispatch(),
            scale.into_dispatch(),
            winograd,
        )),
        winograd,
    }
}

/// `[N, C, H, W]` to `[N, H, W, C]` and back (views; the kernels copy what they read).
pub fn to_channels_last(x: Tensor<4>) -> Tensor<4> {
    x.permute([0, 2, 3, 1])
}

/// `[N, C, H, W]` to a contiguous `[N, H, W, C]` copy (see [`ChannelsLastBackend::nchw_to_nhwc`];
/// Flex only, not differentiable: the inference path).
pub fn to_channels_last_copy(x: Tensor<4>) -> Tensor<4> {
    Tensor::from_dispatch(Dispatch::nchw_to_nhwc(x.into_dispatch()))
}

/// `[N, H, W, C]` to `[N, C, H, W]`.
pub fn to_channels_first(x: Tensor<4>) -> Tensor<4> {
    x.permute([0, 3, 1, 2])
}

/// `relu?(conv(x, weight) + shift (+ residual))` on channels-last tensors (see
/// [`ChannelsLastBackend`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv2d_shift(
    x: Tensor<4>,
    weight: Tensor<4>,
    scale: Tensor<1>,
    shift: Tensor<1>,
    residual: Option<Tensor<4>>,
    stride: [usize; 2],
    padding: [usize; 2],
    relu: bool,
) -> Tensor<4> {
    let out = match residual {
        Some(r) => Dispatch::conv2d_nhwc_shift_add_relu(
            x.into_dispatch(),
            weight.into_dispatch(),
            scale.into_dispatch(),
            shift.into_dispatch(),
            r.into_dispatch(),
            stride,
            padding,
        ),
        None => Dispatch::conv2d_nhwc_shift(
            x.into_dispatch(),
            weight.into_dispatch(),
            scale.into_dispatch(),
            shift.into_dispatch(),
            stride,
            padding,
            relu,
        ),
    };
    Tensor::from_dispatch(out)
}

#[allow(clippy::too_many_arguments)]
fn run(
    x: FlexTensor,
    weight: FlexTensor,
    scale: FlexTensor,
    shift: FlexTensor,
    residual: Option<FlexTensor>,
    stride: [usize; 2],
    padding: [usize; 2],
    relu: bool,
) -> FlexTensor {
    let &[n, h, w, c] = x.layout().shape().as_slice() else {
        panic!(
            "conv2d_nhwc: input {:?} is not [N, H, W, C]",
            x.layout().shape()
        );
    };
    let g = Geometry::new(&[n, c, h, w], weight.layout().shape(), stride, padding);
    let (x, weight) = (x.to_contiguous(), weight.to_contiguous());
    let (scale, shift) = (scale.to_contiguous(), shift.to_contiguous());
    let residual = residual.map(|r| r.to_contiguous());
    let tail = Tail {
        shift: slice(&shift),
        residual: residual.as_ref().map(slice),
        relu: relu || residual.is_some(),
    };
    tail.check(&g, "conv2d_nhwc");
    assert_eq!(
        scale.layout().shape().num_elements(),
        g.cout,
        "conv2d_nhwc: one scale per output channel"
    );
    // Repeated inference keeps its kernels packed (`UnitCache`, `run_packed`); this per-call
    // form goes through the same kernel choice (Winograd, direct, `gemm`) as training's forward.
    let wperm = fold_weight(slice(&weight), slice(&scale), &g);
    let out = forward(slice(&x), &wperm, &g, Some(&tail));
    flex(out, [g.n, g.oh, g.ow, g.cout])
}

#[allow(clippy::too_many_arguments)]
fn run_packed(
    x: FlexTensor,
    packed: FlexTensor,
    shift: FlexTensor,
    residual: Option<FlexTensor>,
    stride: [usize; 2],
    padding: [usize; 2],
    relu: bool,
    winograd: bool,
) -> FlexTensor {
    let (&[n, h, w, c], &[cout, kh, kw, cin]) = (
        x.layout().shape().as_slice(),
        packed.layout().shape().as_slice(),
    ) else {
        panic!(
            "conv2d_nhwc_packed: input {:?} or kernel {:?} is not 4-D",
            x.layout().shape(),
            packed.layout().shape()
        );
    };
    // A transformed kernel is 4x4 for a 3x3 convolution.
    let [kh, kw] = if winograd { [3, 3] } else { [kh, kw] };
    let g = Geometry::new(&[n, c, h, w], &[cout, cin, kh, kw], stride, padding);
    let (x, packed, shift) = (
        x.to_contiguous(),
        packed.to_contiguous(),
        shift.to_contiguous(),
    );
    let residual = residual.map(|r| r.to_contiguous());
    let tail = Tail {
        shift: slice(&shift),
        residual: residual.as_ref().map(slice),
        relu: relu || residual.is_some(),
    };
    let out = if winograd {
        winograd::forward(slice(&x), slice(&packed), &g, Some(&tail))
    } else {
        direct::forward(slice(&x), slice(&packed), &g, Some(&tail))
    };
    flex(out, [g.n, g.oh, g.ow, g.cout])
}

/// What follows the product: the folded batch norm's shift, the residual, the ReLU.
struct Tail<'a> {
    shift: &'a [f32],
    residual: Option<&'a [f32]>,
    relu: bool,
}

impl Tail<'_> {
    /// Panics unless the shift and the residual fit the output of `g`.
    fn check(&self, g: &Geometry, what: &str) {
        assert_eq!(
            self.shift.len(),
            g.cout,
            "{what}: one shift per output channel"
        );
        if let Some(r) = self.residual {
            assert_eq!(
                r.len(),
                g.n * g.out_plane(),
                "{what}: residual of the output's shape"
            );
        }
    }

    /// One output pixel's channels from the product's values `src` (or those already in `dst`).
    #[inline(always)]
    fn pixel(&self, src: Option<&[f32]>, res: Option<&[f32]>, dst: &mut [f32]) {
        let relu = self.relu;
        let f = |s: f32, b: f32, r: f32| {
            let v = s + b + r;
            if relu { v.max(0.0) } else { v }
        };
        match (src, res) {
            (Some(src), Some(res)) => {
                for (((d, &s), &b), &r) in dst.iter_mut().zip(src).zip(self.shift).zip(res) {
                    *d = f(s, b, r);
                }
            }
            (Some(src), None) => {
                for ((d, &s), &b) in dst.iter_mut().zip(src).zip(self.shift) {
                    *d = f(s, b, 0.0);
                }
            }
            (None, Some(res)) => {
                for ((d, &b), &r) in dst.iter_mut().zip(self.shift).zip(res) {
                    *d = f(*d, b, r);
                }
            }
            (None, None) => {
                for (d, &b) in dst.iter_mut().zip(self.shift) {
                    *d = f(*d, b, 0.0);
                }
            }
        }
    }

    /// Writes image `img`'s output rows from the product `src`, whose rows are `pitch` pixels
    /// apart (the first `W_out` of each real), or in place when the product sits in `dst`.
    fn rows(
        &self,
        g: &Geometry,
        img: usize,
        src: Option<(&[f32], usize)>,
        dst: &mut [f32],
        par: Parallelism,
    ) {
        let (row, c) = (g.ow * g.cout, g.cout);
        let residual = self
            .residual
            .map(|r| &r[img * g.out_plane()..(img + 1) * g.out_plane()]);
        let one_row = |(oh, out): (usize, &mut [f32])| {
            let res = residual.map(|r| &r[oh * row..(oh + 1) * row]);
            for (ow, px) in out.chunks_exact_mut(c).enumerate() {
                let r = res.map(|r| &r[ow * c..(ow + 1) * c]);
                let s = src.map(|(src, pitch)| {
                    let at = (oh * pitch + ow) * c;
                    &src[at..at + c]
                });
                self.pixel(s, r, px);
            }
        };
        if matches!(par, Parallelism::Rayon(_)) {
            dst.par_chunks_mut(row).enumerate().for_each(one_row);
        } else {
            dst.chunks_mut(row).enumerate().for_each(one_row);
        }
    }
}

/// The first `W_out` pixels of each product row (`pitch` pixels apart) into `dst`.
fn compact(src: &[f32], pitch: usize, g: &Geometry, dst: &mut [f32], par: Parallelism) {
    let row = g.ow * g.cout;
    let one_row = |(oh, out): (usize, &mut [f32])| {
        out.copy_from_slice(&src[oh * pitch * g.cout..oh * pitch * g.cout + row]);
    };
    if matches!(par, Parallelism::Rayon(_)) {
        dst.par_chunks_mut(row).enumerate().for_each(one_row);
    } else {
        dst.chunks_mut(row).enumerate().for_each(one_row);
    }
}

/// Zero-padded copy `[H_pad + 1, W_pad, C]` of one channels-last image: one `memcpy` a row.
fn pad_rows(xi: &[f32], g: &Geometry, out: &mut [f32], parallel: bool) {
    let c = g.cin;
    let fill = |(r, row): (usize, &mut [f32])| {
        let Some(ih) = r.checked_sub(g.pad[0]).filter(|&ih| ih < g.h) else {
            row.fill(0.0);
            return;
        };
        let (left, rest) = row.split_at_mut(g.pad[1] * c);
        let (inside, right) = rest.split_at_mut(g.w * c);
        left.fill(0.0);
        right.fill(0.0);
        inside.copy_from_slice(&xi[ih * g.w * c..(ih + 1) * g.w * c]);
    };
    let out = &mut out[..g.padded_len()];
    let row = g.padded_w() * c;
    if parallel {
        out.par_chunks_mut(row).enumerate().for_each(fill);
    } else {
        out.chunks_mut(row).enumerate().for_each(fill);
    }
}

/// The pixels a strided 1x1 convolution reads, `[H_out·W_out, C]`.
fn subsample_rows(xi: &[f32], g: &Geometry, col: &mut [f32]) {
    let [sh, sw] = g.stride;
    let c = g.cin;
    for (p, px) in col.chunks_exact_mut(c).enumerate() {
        let (oh, ow) = (p / g.ow, p % g.ow);
        let at = (oh * sh * g.w + ow * sw) * c;
        px.copy_from_slice(&xi[at..at + c]);
    }
}

/// Per-image scratch of [`forward`] and [`backward_weight`]: the padded copy and the product
/// for stride 1, otherwise the column rows.
fn scratch_len(g: &Geometry) -> usize {
    if g.is_shifted() {
        g.shifted_scratch_len()
    } else if g.is_pointwise() {
        0
    } else if g.is_subsample() {
        g.out_pixels() * g.cin
    } else {
        g.out_pixels() * g.k()
    }
}

/// The column rows `[H_out·W_out, kh·kw·C_in]` of one channels-last image for the forms without
/// shifted windows: the image itself (1x1), its subsample (strided 1x1) or its patch rows
/// (written into `scratch`).
fn columns(xi: &[f32], g: &Geometry, scratch: &mut [f32], parallel: bool) -> Mat {
    if g.is_pointwise() {
        Mat::rows(xi, g.cin)
    } else if g.is_subsample() {
        subsample_rows(xi, g, scratch);
        Mat::rows(scratch, g.cin)
    } else {
        im2col_patches(xi, g, scratch, parallel);
        Mat::rows(scratch, g.k())
    }
}

/// `dst[p, co] = Σ_q cols[p, q] · w[co, q]` into a channels-last `dst` (`[pixels, C_out]`,
/// row-major), where `cols` is `pixels x q` with strides `[rs, cs]` and `w` is `[C_out, q]`.
/// Oriented as in [`super::forward_shifted`]: with fewer output channels than pixels, `gemm`
/// reads `cols` in place as the right operand.
#[allow(clippy::too_many_arguments)]
fn product(
    dst: &mut [f32],
    cols: Mat,
    w: &[f32],
    w_offset: usize,
    w_stride: usize,
    [pixels, cout, q]: [usize; 3],
    accumulate: bool,
    par: Parallelism,
) {
    if cout <= pixels {
        let wm = Mat::view(w, w_offset, w_stride as isize, 1, [cout, q]);
        let cols_t = Mat {
            ptr: cols.ptr,
            rs: cols.cs,
            cs: cols.rs,
        };
        matmul_into(
            dst,
            [1, cout as isize],
            [cout, pixels, q],
            wm,
            cols_t,
            accumulate,
            par,
        );
    } else {
        let wt = Mat::view(w, w_offset, 1, w_stride as isize, [q, cout]);
        matmul_into(
            dst,
            [cout as isize, 1],
            [pixels, cout, q],
            cols,
            wt,
            accumulate,
            par,
        );
    }
}

/// `weight · scale[c_out]` in `[C_out, kh, kw, C_in]` order (a kernel row is one run of the
/// channels-last image): the batch norm's fold and the reorder in one parallel pass, instead of
/// a broadcast multiply on one thread and then the permutation.
fn fold_weight(w: &[f32], scale: &[f32], g: &Geometry) -> Vec<f32> {
    let (ci, kk) = (g.cin, g.kh * g.kw);
    let mut out = vec![0.0f32; w.len()];
    out.par_chunks_mut(ci * kk)
        .zip(w.par_chunks(ci * kk))
        .zip(scale.par_iter())
        .for_each(|((out, w), &s)| {
            for c in 0..ci {
                for t in 0..kk {
                    out[t * ci + c] = s * w[c * kk + t];
                }
            }
        });
    out
}

/// The convolution of channels-last `x` with a kernel in `[C_out, kh, kw, C_in]` order, then
/// `tail` when there is one.
fn forward(x: &[f32], wperm: &[f32], g: &Geometry, tail: Option<&Tail>) -> Vec<f32> {
    let (k, ci) = (g.k(), g.cin);
    let at = |co: usize, t: usize, c: usize| wperm[co * k + t * ci + c];
    match crate::plan::kernel(g) {
        Kernel::Winograd => winograd::forward(x, &winograd::pack(g, at), g, tail),
        Kernel::Direct => direct::forward(x, &direct::pack(g, at), g, tail),
        Kernel::Gemm => forward_gemm(x, wperm, g, tail),
    }
}

/// [`forward`] through `gemm` products: every shape, every CPU.
fn forward_gemm(x: &[f32], wperm: &[f32], g: &Geometry, tail: Option<&Tail>) -> Vec<f32> {
    let (k, ohw) = (g.k(), g.out_pixels());
    let scratch = scratch_len(g);
    let mut out = zeros(g.n * g.out_plane());
    over_batch(&mut out, g.n, g.out_plane(), |range, out, par| {
        with_scratch(scratch, |scratch| {
            let parallel = matches!(par, Parallelism::Rayon(_));
            for (img, dst) in range.zip(out.chunks_mut(g.out_plane())) {
                let xi = &x[img * g.in_plane()..(img + 1) * g.in_plane()];
                if g.is_shifted() {
                    let (padded, virt) = scratch.split_at_mut(g.padded_len());
                    pad_rows(xi, g, padded, parallel);
                    let (m, run, wp) = (g.virtual_pixels(), g.kw * g.cin, g.padded_w());
                    for i in 0..g.kh {
                        let windows =
                            Mat::view(padded, i * wp * g.cin, g.cin as isize, 1, [m, run]);
                        product(
                            virt,
                            windows,
                            wperm,
                            i * run,
                            k,
                            [m, g.cout, run],
                            i > 0,
                            par,
                        );
                    }
                    match tail {
                        Some(tail) => tail.rows(g, img, Some((virt, wp)), dst, par),
                        None => compact(virt, wp, g, dst, par),
                    }
                    continue;
                }
                let cols = columns(xi, g, scratch, parallel);
                product(dst, cols, wperm, 0, k, [ohw, g.cout, k], false, par);
                if let Some(tail) = tail {
                    tail.rows(g, img, None, dst, par);
                }
            }
        })
    });
    out
}

/// Convolution (no bias) on channels-last tensors, with its backward pass: the trunk's training
/// path on Flex, where the activations stay channels-last through convolutions and batch norms.
#[backend_extension(Flex, Autodiff)]
pub trait ChannelsLastConvBackend: burn::backend::Backend {
    /// `x: [N, H, W, C_in]`, `weight: [C_out, C_in, kh, kw]` to `[N, H_out, W_out, C_out]`.
    fn conv2d_nhwc(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self>;
}

/// `conv(x)` (plus its bias) on a channels-last `x`, differentiable; `padding` as the plan
/// gives it ([`crate::ConvStep::Gemm`]).
pub fn conv2d(conv: &Conv2d, x: Tensor<4>, padding: [usize; 2]) -> Tensor<4> {
    let out = Tensor::from_dispatch(Dispatch::conv2d_nhwc(
        x.into_dispatch(),
        conv.weight.val().into_dispatch(),
        conv.stride,
        padding,
    ));
    match &conv.bias {
        Some(bias) => {
            let c = bias.dims()[0];
            out + bias.val().reshape([1, 1, 1, c])
        }
        None => out,
    }
}

fn geometry(x: &FlexTensor, weight: &FlexTensor, stride: [usize; 2], pad: [usize; 2]) -> Geometry {
    let &[n, h, w, c] = x.layout().shape().as_slice() else {
        panic!(
            "conv2d_nhwc: input {:?} is not [N, H, W, C]",
            x.layout().shape()
        );
    };
    Geometry::new(&[n, c, h, w], weight.layout().shape(), stride, pad)
}

impl ChannelsLastConvBackend for Flex {
    fn conv2d_nhwc(
        x: FlexTensor,
        weight: FlexTensor,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FlexTensor {
        let g = geometry(&x, &weight, stride, padding);
        let (x, weight) = (x.to_contiguous(), weight.to_contiguous());
        let wperm = permute_weight(slice(&weight), &g, false);
        flex(
            forward(slice(&x), &wperm, &g, None),
            [g.n, g.oh, g.ow, g.cout],
        )
    }
}

/// Adds the patch rows `[H_out·W_out, kh·kw·C_in]` of one image back onto its channels-last
/// input gradient (the adjoint of [`im2col_patches`]): every kernel tap is a run of `C_in`.
fn col2im_rows(col: &[f32], g: &Geometry, dx: &mut [f32]) {
    let (k, c) = (g.k(), g.cin);
    for oh in 0..g.oh {
        for i in 0..g.kh {
            let Some(ih) = g.input_row(oh, i) else {
                continue;
            };
            for j in 0..g.kw {
                let (lo, hi) = g.valid_cols(j);
                for ow in lo..hi {
                    let iw = ow * g.stride[1] + j - g.pad[1];
                    let at = (oh * g.ow + ow) * k + (i * g.kw + j) * c;
                    let dst = &mut dx[(ih * g.w + iw) * c..(ih * g.w + iw + 1) * c];
                    for (d, s) in dst.iter_mut().zip(&col[at..at + c]) {
                        *d += s;
                    }
                }
            }
        }
    }
}

/// The input gradient, channels-last. Stride 1: the forward pass of the output gradient with
/// the flipped kernel. Otherwise the patch rows `dY · W` added back by [`col2im_rows`].
fn backward_x(weight: &[f32], dy: &[f32], g: &Geometry) -> Vec<f32> {
    if let Some(t) = g.input_gradient() {
        return forward(dy, &flip_weight(weight, g), &t, None);
    }
    let wperm = permute_weight(weight, g, false);
    let (k, ohw) = (g.k(), g.out_pixels());
    let mut dx = zeros(g.n * g.in_plane());
    over_batch(&mut dx, g.n, g.in_plane(), |range, dx, par| {
        with_scratch(if g.is_pointwise() { 0 } else { ohw * k }, |col| {
            for (img, dxi) in range.zip(dx.chunks_mut(g.in_plane())) {
                let dyi = Mat::rows(&dy[img * g.out_plane()..(img + 1) * g.out_plane()], g.cout);
                let w = Mat::rows(&wperm, k);
                if g.is_pointwise() {
                    matmul_into(dxi, [k as isize, 1], [ohw, k, g.cout], dyi, w, false, par);
                } else {
                    matmul_into(col, [k as isize, 1], [ohw, k, g.cout], dyi, w, false, par);
                    col2im_rows(col, g, dxi);
                }
            }
        })
    });
    dx
}

/// The weight gradient `[C_out, C_in, kh, kw]`: per image `dY^T · columns` (for stride 1, one
/// product per kernel row over the shifted windows), summed over the batch.
fn backward_weight(x: &[f32], dy: &[f32], g: &Geometry) -> Vec<f32> {
    let (k, ohw) = (g.k(), g.out_pixels());
    let scratch = scratch_len(g);
    let dw = sum_over_batch(g.n, g.cout * k, |range, dw, par| {
        with_scratch(scratch, |scratch| {
            let parallel = matches!(par, Parallelism::Rayon(_));
            for (nth, img) in range.enumerate() {
                let xi = &x[img * g.in_plane()..(img + 1) * g.in_plane()];
                let dyi = &dy[img * g.out_plane()..(img + 1) * g.out_plane()];
                if g.is_shifted() {
                    let (padded, dyv) = scratch.split_at_mut(g.padded_len());
                    pad_rows(xi, g, padded, parallel);
                    let (m, run, wp) = (g.virtual_pixels(), g.kw * g.cin, g.padded_w());
                    // The output gradient on the padded width, zero in the extra columns.
                    let row = g.ow * g.cout;
                    for oh in 0..g.oh {
                        let dst = &mut dyv[oh * wp * g.cout..(oh + 1) * wp * g.cout];
                        dst[..row].copy_from_slice(&dyi[oh * row..(oh + 1) * row]);
                        dst[row..].fill(0.0);
                    }
                    let grad = Mat::view(dyv, 0, 1, g.cout as isize, [g.cout, m]);
                    for i in 0..g.kh {
                        let windows =
                            Mat::view(padded, i * wp * g.cin, g.cin as isize, 1, [m, run]);
                        matmul_into(
                            &mut dw[i * run..],
                            [k as isize, 1],
                            [g.cout, run, m],
                            grad,
                            windows,
                            nth > 0,
                            par,
                        );
                    }
                    continue;
                }
                let cols = columns(xi, g, scratch, parallel);
                let grad = Mat::view(dyi, 0, 1, g.cout as isize, [g.cout, ohw]);
                matmul_into(
                    dw,
                    [k as isize, 1],
                    [g.cout, k, ohw],
                    grad,
                    cols,
                    nth > 0,
                    par,
                );
            }
        })
    });
    permute_weight(&dw, g, true)
}

/// `(dx, dweight)` of a channels-last convolution, each only when `want` asks for it.
pub(super) fn gradients(
    x: FlexTensor,
    weight: FlexTensor,
    dy: FlexTensor,
    stride: [usize; 2],
    padding: [usize; 2],
    [want_x, want_weight]: [bool; 2],
) -> (Option<FlexTensor>, Option<FlexTensor>) {
    let g = geometry(&x, &weight, stride, padding);
    let (weight, dy) = (weight.to_contiguous(), dy.to_contiguous());
    let dx = want_x.then(|| {
        let dx = backward_x(slice(&weight), slice(&dy), &g);
        flex(dx, [g.n, g.h, g.w, g.cin])
    });
    let dw = want_weight.then(|| {
        let x = x.to_contiguous();
        let dw = backward_weight(slice(&x), slice(&dy), &g);
        flex(dw, [g.cout, g.cin, g.kh, g.kw])
    });
    (dx, dw)
}

impl<C: CheckpointStrategy> ChannelsLastConvBackend for Autodiff<Flex, C> {
    fn conv2d_nhwc(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self> {
        super::record::<C>(x, weight, stride, padding, true)
    }
}
