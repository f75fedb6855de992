//! 2-D convolution on the CPU through `gemm`, forward and backward.
//!
//! Why this exists: burn-flex 0.22 runs `conv2d` by converting NCHW to channels-last and back on
//! every call, and it has no backward of its own, so autodiff falls back to burn's generic
//! formulas. The weight gradient there is a convolution whose *kernel* is the whole output
//! gradient (a 3x3 output from a 112x112 kernel), which vectorises badly. Profiling a training
//! step of the reference network put those paths at most of the step. Here every pass is a few
//! matrix products per image:
//!
//! - stride 1 ("shifted windows", `Geometry::is_shifted`): in a zero-padded channels-last copy
//!   of the image, kernel row `i` of every output pixel's receptive field is one run of
//!   `kw·C_in` values, and consecutive pixels' runs start `C_in` apart, so the matrix of all of
//!   them is a strided view. Forward and weight gradient are `kh` accumulating products over
//!   such views, and the input gradient is the forward pass of the output gradient with the
//!   flipped kernel (`Geometry::input_gradient`). No column matrix is written.
//! - stride 2 3x3: a patch-major column matrix (one row of `kh·kw·C_in` values per output pixel,
//!   copied as `kh` contiguous runs from the channels-last image); input gradient through a
//!   channel-major column matrix scattered back by col2im.
//! - 1x1 with stride: the subsampled image is the column matrix. 1x1 with stride 1: the image.
//!
//! The products are oriented so that `gemm` reads the large operand in place: with fewer output
//! channels than pixels, `Y[c, p] = W · windows` into a channels-last buffer (then transposed to
//! NCHW) ran at 79-87 GFLOP/s on one core of this project's machine, against 57-70 for the
//! transposed product, which packs the windows first; with more channels than pixels (the deep
//! layers) the other way round. Batches are split across rayon's threads, each image one
//! single-threaded product (with its own partial weight gradient); a batch smaller than the
//! thread count lets `gemm` split each product instead.
//!
//! The operation is a burn backend extension ([`ConvBackend`]) implemented for the Flex CPU
//! backend and for `Autodiff<Flex>` with its own backward, plus a Flex-only inference variant
//! ([`ConvInferenceBackend`]) that applies a folded batch norm's shift, a residual and a ReLU in
//! its output pass. [`conv2d`] is the entry point: it takes burn's `Conv2d` module and uses the
//! fast path on a Flex device for f32 data, and burn's own convolution everywhere else (wgpu,
//! other dtypes, dilation or groups), so one model runs on any device with the same weights.

use crate::plan::ConvStep;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::{ConvOptions, ModuleOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{DType, Dispatch, Flex, TensorData, backend_extension};
use burn::nn::conv::Conv2d;
use burn::prelude::*;
use gemm::Parallelism;
use rayon::prelude::*;
use std::ops::Range;

pub mod channels_last;

/// Convolution (no bias, no dilation, one group) with a hand-written CPU kernel.
///
/// `stride` and `padding` are `[height, width]`; padding is symmetric (zeros).
#[backend_extension(Flex, Autodiff)]
pub trait ConvBackend: burn::backend::Backend {
    /// `x: [N, C_in, H, W]`, `weight: [C_out, C_in, kh, kw]` to `[N, C_out, H_out, W_out]`.
    fn gemm_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self>;
}

/// Applies burn's `Conv2d` module, through the im2col + gemm kernel where the plan
/// ([`crate::plan::conv_step`]) says so, and through `Conv2d::forward` everywhere else.
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    match crate::plan::conv_step(conv, &x) {
        ConvStep::Gemm { padding } => conv2d_gemm(conv, x, padding),
        ConvStep::Burn => conv.forward(x),
    }
}

/// [`conv2d`] through the im2col + gemm kernel, with `padding` as the plan gives it.
pub(crate) fn conv2d_gemm(conv: &Conv2d, x: Tensor<4>, padding: [usize; 2]) -> Tensor<4> {
    let out = Tensor::from_dispatch(Dispatch::gemm_conv2d(
        x.into_dispatch(),
        conv.weight.val().into_dispatch(),
        conv.stride,
        padding,
    ));
    match &conv.bias {
        Some(bias) => {
            let c = bias.dims()[0];
            out + bias.val().reshape([1, c, 1, 1])
        }
        None => out,
    }
}

/// Shape of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    stride: [usize; 2],
    pad: [usize; 2],
    oh: usize,
    ow: usize,
}

impl Geometry {
    pub(crate) fn new(x: &[usize], weight: &[usize], stride: [usize; 2], pad: [usize; 2]) -> Self {
        assert!(
            x.len() == 4 && weight.len() == 4 && x[1] == weight[1],
            "gemm_conv2d: input {x:?} and weight {weight:?} do not fit ([N, C, H, W] and [C_out, C, kh, kw])"
        );
        assert!(stride[0] > 0 && stride[1] > 0, "gemm_conv2d: stride 0");
        let (h, w, kh, kw) = (x[2], x[3], weight[2], weight[3]);
        assert!(
            h + 2 * pad[0] >= kh && w + 2 * pad[1] >= kw,
            "gemm_conv2d: kernel {kh}x{kw} larger than the padded input {h}x{w}"
        );
        Geometry {
            n: x[0],
            cin: x[1],
            h,
            w,
            cout: weight[0],
            kh,
            kw,
            stride,
            pad,
            oh: (h + 2 * pad[0] - kh) / stride[0] + 1,
            ow: (w + 2 * pad[1] - kw) / stride[1] + 1,
        }
    }

    /// Rows of the im2col matrix: `C_in · kh · kw`.
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    fn in_plane(&self) -> usize {
        self.cin * self.h * self.w
    }

    fn out_pixels(&self) -> usize {
        self.oh * self.ow
    }

    fn out_plane(&self) -> usize {
        self.cout * self.out_pixels()
    }

    /// Channels-last copy of one image, for the patch-major column matrix.
    fn hwc_len(&self) -> usize {
        if self.is_pointwise() {
            0
        } else {
            self.in_plane()
        }
    }

    /// Scratch for one image's forward or weight-gradient pass: channels-last copy and columns.
    fn scratch_len(&self) -> usize {
        if self.is_pointwise() {
            0
        } else {
            self.in_plane() + self.k() * self.out_pixels()
        }
    }

    /// A strided, unpadded 1x1 convolution (a projection shortcut) reads every `s`-th pixel: its
    /// column matrix is the subsampled image, channel-major, with no channels-last round trip.
    fn is_subsample(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.pad == [0, 0] && self.stride != [1, 1]
    }

    /// A 1x1, stride-1, unpadded convolution reads the image itself as its column matrix.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == [1, 1] && self.pad == [0, 0]
    }

    /// The output columns `ow` whose input column `ow·s + j - p` lies inside the image.
    fn valid_cols(&self, j: usize) -> (usize, usize) {
        let (s, p) = (self.stride[1], self.pad[1]);
        let lo = (p.saturating_sub(j)).div_ceil(s);
        let hi = (self.w + p).saturating_sub(j).div_ceil(s).min(self.ow);
        (lo.min(hi), hi)
    }

    /// The input row read by output row `oh` at kernel row `i`, if inside the image.
    fn input_row(&self, oh: usize, i: usize) -> Option<usize> {
        (oh * self.stride[0] + i)
            .checked_sub(self.pad[0])
            .filter(|&r| r < self.h)
    }
}

/// The channel-major column matrix `[C_in, H_out·W_out]` of a strided 1x1 convolution.
fn subsample(xi: &[f32], g: &Geometry, col: &mut [f32]) {
    let [sh, sw] = g.stride;
    for (c, out) in col.chunks_exact_mut(g.out_pixels()).enumerate() {
        let plane = &xi[c * g.h * g.w..(c + 1) * g.h * g.w];
        for (oh, row) in out.chunks_exact_mut(g.ow).enumerate() {
            let src = &plane[oh * sh * g.w..];
            for (ow, v) in row.iter_mut().enumerate() {
                *v = src[ow * sw];
            }
        }
    }
}

/// `[C, P]` to `[P, C]` for one image (NCHW plane to channels-last), in cache-sized tiles.
fn to_channels_last(x: &[f32], c: usize, p: usize, out: &mut [f32], parallel: bool) {
    const T: usize = 16;
    // One band of `T` pixels (all channels) at a time: each band is written by one thread.
    let band = |(b, out): (usize, &mut [f32])| {
        let p0 = b * T;
        interleave(|ci| &x[ci * p + p0..ci * p + (p0 + T).min(p)], c, out);
    };
    if parallel {
        out[..p * c]
            .par_chunks_mut(T * c)
            .enumerate()
            .for_each(band);
    } else {
        out[..p * c].chunks_mut(T * c).enumerate().for_each(band);
    }
}

/// `[C_out, C_in, kh, kw]` to `[C_out, kh, kw, C_in]`: the order of a patch row read from a
/// channels-last image. `back` undoes it.
fn permute_weight(w: &[f32], g: &Geometry, back: bool) -> Vec<f32> {
    let (ci, kk) = (g.cin, g.kh * g.kw);
    let mut out = vec![0.0f32; w.len()];
    // One output channel per task: with a batch of one this ran on one core before each product.
    out.par_chunks_mut(ci * kk)
        .zip(w.par_chunks(ci * kk))
        .for_each(|(out, w)| {
            for c in 0..ci {
                for t in 0..kk {
                    let (nchw, nhwc) = (c * kk + t, t * ci + c);
                    if back {
                        out[nchw] = w[nhwc];
                    } else {
                        out[nhwc] = w[nchw];
                    }
                }
            }
        });
    out
}

/// Writes the patch-major column matrix `[H_out·W_out, kh·kw·C_in]` of one channels-last image:
/// row `p` is the receptive field of output pixel `p` (zero where it hangs over the padding),
/// each kernel row of it one contiguous run of `kw·C_in` values of the image.
fn im2col_patches(xhwc: &[f32], g: &Geometry, col: &mut [f32], parallel: bool) {
    let row_len = g.ow * g.k();
    if parallel {
        col.par_chunks_mut(row_len)
            .enumerate()
            .for_each(|(oh, rows)| patch_row(xhwc, g, oh, rows));
    } else {
        for (oh, rows) in col.chunks_mut(row_len).enumerate() {
            patch_row(xhwc, g, oh, rows);
        }
    }
}

/// The patch rows of output row `oh`.
fn patch_row(xhwc: &[f32], g: &Geometry, oh: usize, col: &mut [f32]) {
    let (k, c) = (g.k(), g.cin);
    let run = g.kw * c;
    let top = (oh * g.stride[0]) as isize - g.pad[0] as isize;
    for ow in 0..g.ow {
        let left = (ow * g.stride[1]) as isize - g.pad[1] as isize;
        let dst = &mut col[ow * k..(ow + 1) * k];
        let cols_inside = left >= 0 && left as usize + g.kw <= g.w;
        for (i, d) in dst.chunks_exact_mut(run).enumerate() {
            let r = top + i as isize;
            if r < 0 || r as usize >= g.h {
                d.fill(0.0);
                continue;
            }
            let row = &xhwc[r as usize * g.w * c..(r as usize + 1) * g.w * c];
            if cols_inside {
                let s = left as usize * c;
                d.copy_from_slice(&row[s..s + run]);
            } else {
                for (j, d) in d.chunks_exact_mut(c).enumerate() {
                    let q = left + j as isize;
                    if q < 0 || q as usize >= g.w {
                        d.fill(0.0);
                    } else {
                        d.copy_from_slice(&row[q as usize * c..(q as usize + 1) * c]);
                    }
                }
            }
        }
    }
}

/// The patch-major column matrix of image `xi` (NCHW) into `col`, through `hwc` scratch; split
/// across the thread pool when `par` says the products are (a batch too small to split).
fn patches(xi: &[f32], g: &Geometry, hwc: &mut [f32], col: &mut [f32], par: Parallelism) {
    let parallel = matches!(par, Parallelism::Rayon(_));
    to_channels_last(xi, g.cin, g.h * g.w, hwc, parallel);
    im2col_patches(hwc, g, col, parallel);
}

/// Adds the channel-major column matrix `[C_in·kh·kw, H_out·W_out]` of one image back onto its
/// input gradient (the adjoint of im2col).
fn col2im(col: &[f32], g: &Geometry, dx: &mut [f32]) {
    let ohw = g.out_pixels();
    let (sw, pw) = (g.stride[1], g.pad[1]);
    for c in 0..g.cin {
        let plane = &mut dx[c * g.h * g.w..(c + 1) * g.h * g.w];
        for i in 0..g.kh {
            for j in 0..g.kw {
                let r = (c * g.kh + i) * g.kw + j;
                let row = &col[r * ohw..(r + 1) * ohw];
                let (lo, hi) = g.valid_cols(j);
                for oh in 0..g.oh {
                    let Some(ih) = g.input_row(oh, i) else {
                        continue;
                    };
                    let src = &row[oh * g.ow..(oh + 1) * g.ow];
                    let dst = &mut plane[ih * g.w..(ih + 1) * g.w];
                    if sw == 1 {
                        let start = lo + j - pw;
                        for (d, s) in dst[start..start + (hi - lo)].iter_mut().zip(&src[lo..hi]) {
                            *d += s;
                        }
                    } else {
                        for ow in lo..hi {
                            dst[ow * sw + j - pw] += src[ow];
                        }
                    }
                }
            }
        }
    }
}

/// A row-major matrix view for [`matmul`]: element `(r, c)` sits at `ptr + r·rs + c·cs`.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

impl Mat {
    /// A `rows x cols` view of `s` from `offset`; panics unless every element lies inside `s`
    /// (the bounds `gemm`'s raw pointers rely on).
    fn view(s: &[f32], offset: usize, rs: isize, cs: isize, [rows, cols]: [usize; 2]) -> Self {
        assert!(rs >= 0 && cs >= 0, "conv views use non-negative strides");
        let last =
            offset + rows.saturating_sub(1) * rs as usize + cols.saturating_sub(1) * cs as usize;
        assert!(
            rows == 0 || cols == 0 || last < s.len(),
            "conv view [{rows}x{cols}] from {offset} overruns {} values",
            s.len()
        );
        Mat {
            ptr: s[offset.min(s.len())..].as_ptr(),
            rs,
            cs,
        }
    }

    fn rows(s: &[f32], cols: usize) -> Self {
        Mat {
            ptr: s.as_ptr(),
            rs: cols as isize,
            cs: 1,
        }
    }

    /// The transpose of a row-major `[_, cols]` matrix stored in `s`.
    fn transposed(s: &[f32], cols: usize) -> Self {
        Mat {
            ptr: s.as_ptr(),
            rs: 1,
            cs: cols as isize,
        }
    }

    /// The same view starting `off` values later.
    ///
    /// # Safety
    /// The shifted view must stay inside the slice it was built from.
    unsafe fn shifted(self, off: isize) -> Mat {
        Mat {
            // SAFETY: forwarded to the caller.
            ptr: unsafe { self.ptr.offset(off) },
            ..self
        }
    }
}

/// `dst[m, n] = (accumulate ? dst : 0) + lhs[m, k] · rhs[k, n]`, `dst` row-major.
fn matmul(
    dst: &mut [f32],
    [m, n, k]: [usize; 3],
    lhs: Mat,
    rhs: Mat,
    accumulate: bool,
    par: Parallelism,
) {
    matmul_into(dst, [n as isize, 1], [m, n, k], lhs, rhs, accumulate, par);
}

/// The destination pointer of a product, shared by the threads that write disjoint blocks of it.
#[derive(Clone, Copy)]
struct Dst(*mut f32);

impl Dst {
    /// The element `off` values past the start.
    ///
    /// # Safety
    /// The result must stay inside the destination.
    unsafe fn at(self, off: isize) -> *mut f32 {
        // SAFETY: forwarded to the caller.
        unsafe { self.0.offset(off) }
    }
}

// SAFETY: `gemm_split` hands each thread a disjoint block of the destination.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

// SAFETY: a `Mat` is a read-only view of a slice that outlives the product using it.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

/// One product; with `Parallelism::Rayon`, the larger output dimension is cut into one block per
/// thread, each a single-threaded product. For the small products of a batch of one this scaled
/// better on 2 cores than gemm's own split, which parallelises inside its packing loops.
///
/// # Safety
/// `dst` must address an `m x n` matrix with strides `[rs, cs]` (row, column) that no one else
/// accesses during the call, and `lhs` (`m x k`) and `rhs` (`k x n`) must lie inside live slices.
unsafe fn gemm_split(
    dst: Dst,
    [rs, cs]: [isize; 2],
    [m, n, k]: [usize; 3],
    lhs: Mat,
    rhs: Mat,
    accumulate: bool,
    par: Parallelism,
) {
    let threads = match par {
        Parallelism::Rayon(0) => rayon::current_num_threads(),
        Parallelism::Rayon(t) => t,
        _ => 1,
    };
    const MIN_BLOCK: usize = 48;
    let along_n = n >= m;
    let len = if along_n { n } else { m };
    let parts = threads.min(len / MIN_BLOCK);
    let one = |dst: *mut f32, [m, n]: [usize; 2], lhs: Mat, rhs: Mat| {
        // SAFETY: forwarded from the caller, restricted to this block.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst,
                cs,
                rs,
                accumulate,
                lhs.ptr,
                lhs.cs,
                lhs.rs,
                rhs.ptr,
                rhs.cs,
                rhs.rs,
                if accumulate { 1.0 } else { 0.0 },
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            )
        }
    };
    if parts <= 1 {
        // SAFETY: the whole destination, as the caller guarantees.
        return one(unsafe { dst.at(0) }, [m, n], lhs, rhs);
    }
    (0..parts).into_par_iter().for_each(|p| {
        let (a, b) = (p * len / parts, (p + 1) * len / parts);
        let off = a as isize;
        // SAFETY: blocks `[a, b)` of distinct parts are disjoint rows or columns of `dst`, and
        // the offset operands stay inside the caller's extents.
        unsafe {
            if along_n {
                let rhs = rhs.shifted(off * rhs.cs);
                one(dst.at(off * cs), [m, b - a], lhs, rhs);
            } else {
                let lhs = lhs.shifted(off * lhs.rs);
                one(dst.at(off * rs), [b - a, n], lhs, rhs);
            }
        }
    });
}

/// `dst = (accumulate ? dst : 0) + lhs · rhs` for a `dst` with strides `[row, column]`.
fn matmul_into(
    dst: &mut [f32],
    [rs, cs]: [isize; 2],
    [m, n, k]: [usize; 3],
    lhs: Mat,
    rhs: Mat,
    accumulate: bool,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = (m - 1) * rs as usize + (n - 1) * cs as usize;
    assert!(last < dst.len(), "matmul: destination too small");
    // SAFETY: every element of `dst` the product writes lies inside it (checked above) and it is
    // exclusively borrowed; every `Mat` is built by this module from a slice whose extent covers
    // the strides it is used with (the callers index the same slices with the same geometry).
    unsafe {
        gemm_split(
            Dst(dst.as_mut_ptr()),
            [rs, cs],
            [m, n, k],
            lhs,
            rhs,
            accumulate,
            par,
        )
    }
}

thread_local! {
    /// Per-thread column matrix, reused across calls: allocating (and zeroing) up to tens of MB
    /// per image showed up as page faults and memset in the profile.
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch buffer of at least `len` values (contents unspecified).
///
/// The buffer is taken out of the slot while `f` runs, so a nested call (a rayon worker that
/// steals another convolution's task while `gemm` waits) gets a fresh one instead of a panic.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.with(|cell| cell.take());
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let out = f(&mut buf[..len]);
    SCRATCH.with(|cell| cell.replace(buf));
    out
}

/// How to spread a batch over the thread pool: per-image work on separate threads when there are
/// enough images, otherwise each product split by `gemm`.
fn plan(n: usize) -> (usize, Parallelism) {
    let threads = rayon::current_num_threads().max(1);
    if n >= threads && threads > 1 {
        (threads, Parallelism::None)
    } else {
        (1, Parallelism::Rayon(0))
    }
}

/// Splits `0..n` into `parts` nearly equal contiguous ranges.
fn split(n: usize, parts: usize) -> Vec<Range<usize>> {
    (0..parts)
        .map(|p| (p * n / parts)..((p + 1) * n / parts))
        .filter(|r| !r.is_empty())
        .collect()
}

/// Runs `f(images, out, par)` over a batch of `n` images as [`plan`] says, where `out` is the
/// part of `buf` (`per_image` values an image) that those images write.
fn over_batch(
    buf: &mut [f32],
    n: usize,
    per_image: usize,
    f: impl Fn(Range<usize>, &mut [f32], Parallelism) + Sync,
) {
    let (parts, par) = plan(n);
    let ranges = split(n, parts);
    let mut outs = Vec::with_capacity(ranges.len());
    let mut rest = buf;
    for r in &ranges {
        let (head, tail) = rest.split_at_mut(r.len() * per_image);
        outs.push(head);
        rest = tail;
    }
    ranges
        .into_par_iter()
        .zip(outs)
        .for_each(|(images, out)| f(images, out, par));
}

/// `Σ` over a batch of `n` images of what `f(images, acc, par)` adds into a zeroed `len`-value
/// accumulator: one accumulator per thread, summed at the end.
fn sum_over_batch(
    n: usize,
    len: usize,
    f: impl Fn(Range<usize>, &mut [f32], Parallelism) + Sync,
) -> Vec<f32> {
    let (parts, par) = plan(n);
    let partials: Vec<Vec<f32>> = split(n, parts)
        .into_par_iter()
        .map(|images| {
            let mut acc = vec![0.0f32; len];
            f(images, &mut acc, par);
            acc
        })
        .collect();
    let mut partials = partials.into_iter();
    let mut total = partials.next().unwrap_or_else(|| vec![0.0; len]);
    for p in partials {
        // Across the pool: for the deep layers this is a few MB that the main thread summed alone.
        total
            .par_chunks_mut(1 << 14)
            .zip(p.par_chunks(1 << 14))
            .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
    }
    total
}

/// Stride-1 convolutions skip the column matrix altogether ("shifted windows"): in a padded
/// channels-last copy of the image, the receptive-field row `i` of every output pixel is one run
/// of `kw·C_in` values, and consecutive pixels' runs start `C_in` apart. So for each kernel row
/// the matrix of all those runs is a strided view of the copy (rows overlapping), and the
/// convolution is `kh` accumulating products over views. Outputs are computed on the padded
/// width (the `W_pad - W_out` extra columns per row are discarded), which costs 2/114 more work
/// at 224 px and avoids writing and re-reading a column matrix 9x the image.
impl Geometry {
    fn is_shifted(&self) -> bool {
        self.stride == [1, 1] && !self.is_pointwise()
    }

    fn padded_w(&self) -> usize {
        self.w + 2 * self.pad[1]
    }

    /// Output pixels on the padded width: `H_out · W_pad`.
    fn virtual_pixels(&self) -> usize {
        self.oh * self.padded_w()
    }

    /// The padded copy, plus one spare row that the last view's overhang reads (and ignores).
    fn padded_len(&self) -> usize {
        (self.h + 2 * self.pad[0] + 1) * self.padded_w() * self.cin
    }

    fn shifted_scratch_len(&self) -> usize {
        self.padded_len() + self.cout * self.virtual_pixels()
    }

    /// The convolution whose forward pass is this one's input gradient: the output gradient
    /// correlated with the flipped kernel, padded by `k - 1 - p` (stride 1 only).
    fn input_gradient(&self) -> Option<Geometry> {
        (self.is_shifted() && self.pad[0] < self.kh && self.pad[1] < self.kw).then(|| Geometry {
            n: self.n,
            cin: self.cout,
            h: self.oh,
            w: self.ow,
            cout: self.cin,
            kh: self.kh,
            kw: self.kw,
            stride: [1, 1],
            pad: [self.kh - 1 - self.pad[0], self.kw - 1 - self.pad[1]],
            oh: self.h,
            ow: self.w,
        })
    }
}

/// Writes `c` channel rows (each `out.len() / c` pixels long) pixel-major into `out`: eight
/// channels at a time, so every store is one contiguous run of eight values.
fn interleave<'a>(row: impl Fn(usize) -> &'a [f32], c: usize, out: &mut [f32]) {
    const G: usize = 8;
    let full = c / G * G;
    for c0 in (0..full).step_by(G) {
        let rows: [&[f32]; G] = std::array::from_fn(|t| row(c0 + t));
        for (x, px) in out.chunks_exact_mut(c).enumerate() {
            let d: &mut [f32; G] = (&mut px[c0..c0 + G]).try_into().expect("eight channels");
            for (d, r) in d.iter_mut().zip(&rows) {
                *d = r[x];
            }
        }
    }
    for ci in full..c {
        for (px, &v) in out.chunks_exact_mut(c).zip(row(ci)) {
            px[ci] = v;
        }
    }
}

/// Zero-padded channels-last copy `[H_pad + 1, W_pad, C]` of one NCHW image.
fn pad_channels_last(xi: &[f32], g: &Geometry, out: &mut [f32], parallel: bool) {
    let c = g.cin;
    let fill = |(r, row): (usize, &mut [f32])| {
        let Some(ih) = r.checked_sub(g.pad[0]).filter(|&ih| ih < g.h) else {
            row.fill(0.0);
            return;
        };
        // Only the padding columns need zeros: the image overwrites the rest.
        let (left, rest) = row.split_at_mut(g.pad[1] * c);
        let (inside, right) = rest.split_at_mut(g.w * c);
        left.fill(0.0);
        right.fill(0.0);
        interleave(
            |ci| &xi[(ci * g.h + ih) * g.w..(ci * g.h + ih + 1) * g.w],
            c,
            inside,
        );
    };
    let out = &mut out[..g.padded_len()];
    let row = g.padded_w() * c;
    if parallel {
        out.par_chunks_mut(row).enumerate().for_each(fill);
    } else {
        out.chunks_mut(row).enumerate().for_each(fill);
    }
}

/// Channels-last output rows (`pitch` pixels apart, the first `W_out` of each real) to the NCHW
/// planes of one image; across the pool (eight channels per task, every read a contiguous run)
/// when `parallel`.
fn from_channels_last(cl: &[f32], g: &Geometry, pitch: usize, dst: &mut [f32], parallel: bool) {
    const G: usize = 8;
    let ohw = g.out_pixels();
    let group = |(gi, planes): (usize, &mut [f32])| {
        let c0 = gi * G;
        let nc = planes.len() / ohw;
        for oh in 0..g.oh {
            for w in 0..g.ow {
                let at = (oh * pitch + w) * g.cout + c0;
                let p = oh * g.ow + w;
                for (j, &v) in cl[at..at + nc].iter().enumerate() {
                    planes[j * ohw + p] = v;
                }
            }
        }
    };
    let dst = &mut dst[..g.cout * ohw];
    if parallel {
        dst.par_chunks_mut(G * ohw).enumerate().for_each(group);
        return;
    }
    // On one thread, row by row: one output row of every channel (a few KB) stays in L1, where
    // the grouped walk above re-reads the whole buffer once per group (measured slower).
    for oh in 0..g.oh {
        let rows = &cl[oh * pitch * g.cout..(oh * pitch + g.ow) * g.cout];
        for co in 0..g.cout {
            let out = &mut dst[co * ohw + oh * g.ow..co * ohw + (oh + 1) * g.ow];
            for (o, px) in out.iter_mut().zip(rows.chunks_exact(g.cout)) {
                *o = px[co];
            }
        }
    }
}

/// One image's output `[C_out, H_out, W_out]` by shifted windows; `wperm` is
/// `[C_out, kh, kw, C_in]`.
fn forward_shifted(
    xi: &[f32],
    wperm: &[f32],
    g: &Geometry,
    scratch: &mut [f32],
    dst: &mut [f32],
    par: Parallelism,
) {
    let (padded, virt) = scratch.split_at_mut(g.padded_len());
    pad_channels_last(xi, g, padded, matches!(par, Parallelism::Rayon(_)));
    let (m, run, wp, k) = (g.virtual_pixels(), g.kw * g.cin, g.padded_w(), g.k());
    let ohw = g.out_pixels();
    if g.cout <= m {
        // Few output channels, many pixels: `Y[c, p]` with the windows as the right operand,
        // read in place (k-contiguous columns), and channels-last output. For the wide early
        // layers gemm ran this 1.2-1.5x faster than the transposed product below, which packs
        // the windows first (measured on this machine: 79-87 vs 57-70 GFLOP/s on one core).
        for i in 0..g.kh {
            let kernel_row = Mat::view(wperm, i * run, k as isize, 1, [g.cout, run]);
            let windows = Mat::view(padded, i * wp * g.cin, 1, g.cin as isize, [run, m]);
            matmul_into(
                virt,
                [1, g.cout as isize],
                [g.cout, m, run],
                kernel_row,
                windows,
                i > 0,
                par,
            );
        }
        from_channels_last(virt, g, wp, dst, matches!(par, Parallelism::Rayon(_)));
        return;
    }
    for i in 0..g.kh {
        let windows = Mat::view(padded, i * wp * g.cin, g.cin as isize, 1, [m, run]);
        let kernel_row = Mat::view(wperm, i * run, 1, k as isize, [run, g.cout]);
        matmul_into(
            virt,
            [1, m as isize],
            [m, g.cout, run],
            windows,
            kernel_row,
            i > 0,
            par,
        );
    }
    for co in 0..g.cout {
        for oh in 0..g.oh {
            let from = co * m + oh * wp;
            dst[co * ohw + oh * g.ow..co * ohw + (oh + 1) * g.ow]
                .copy_from_slice(&virt[from..from + g.ow]);
        }
    }
}

/// Adds one image's weight gradient, in `[C_out, kh, kw, C_in]` order, to `dwperm` (or writes
/// it, when `accumulate` is false).
fn weight_grad_shifted(
    xi: &[f32],
    dyi: &[f32],
    g: &Geometry,
    scratch: &mut [f32],
    dwperm: &mut [f32],
    accumulate: bool,
    par: Parallelism,
) {
    let (padded, dyv) = scratch.split_at_mut(g.padded_len());
    pad_channels_last(xi, g, padded, matches!(par, Parallelism::Rayon(_)));
    let (m, run, wp, k) = (g.virtual_pixels(), g.kw * g.cin, g.padded_w(), g.k());
    // The output gradient on the padded width, zero in the discarded columns.
    let ohw = g.out_pixels();
    for co in 0..g.cout {
        for oh in 0..g.oh {
            let row = &mut dyv[co * m + oh * wp..co * m + (oh + 1) * wp];
            row[..g.ow].copy_from_slice(&dyi[co * ohw + oh * g.ow..co * ohw + (oh + 1) * g.ow]);
            row[g.ow..].fill(0.0);
        }
    }
    let grad = Mat::view(dyv, 0, m as isize, 1, [g.cout, m]);
    for i in 0..g.kh {
        let windows = Mat::view(padded, i * wp * g.cin, g.cin as isize, 1, [m, run]);
        matmul_into(
            &mut dwperm[i * run..],
            [k as isize, 1],
            [g.cout, run, m],
            grad,
            windows,
            accumulate,
            par,
        );
    }
}

/// `[C_out, C_in, kh, kw]` to the flipped, transposed kernel `[C_in, kh, kw, C_out]` that
/// correlates the output gradient back to the input gradient.
fn flip_weight(w: &[f32], g: &Geometry) -> Vec<f32> {
    let kk = g.kh * g.kw;
    let mut out = vec![0.0f32; w.len()];
    // One input channel per task (it ran on one thread before every input gradient). Reading a
    // kernel backwards flips both of its axes: tap `i·kw + j` is `kk - 1 - (i·kw + j)` flipped.
    out.par_chunks_mut(kk * g.cout)
        .enumerate()
        .for_each(|(ci, out)| {
            for co in 0..g.cout {
                let taps = &w[(co * g.cin + ci) * kk..(co * g.cin + ci + 1) * kk];
                for (t, &v) in taps.iter().rev().enumerate() {
                    out[t * g.cout + co] = v;
                }
            }
        });
    out
}

/// What inference applies to a convolution's output before anyone else reads it: a per-channel
/// shift (the folded batch norm), an optional residual of the output's shape, an optional ReLU.
/// Applied per image right after its product, while the output is still in cache.
#[derive(Clone, Copy)]
struct Epilogue<'a> {
    shift: &'a [f32],
    residual: Option<&'a [f32]>,
    relu: bool,
}

impl Epilogue<'_> {
    /// Applies to image `img`'s output planes, across the thread pool when `par` says the
    /// products were (a batch of one).
    fn apply(&self, g: &Geometry, img: usize, dst: &mut [f32], par: Parallelism) {
        let ohw = g.out_pixels();
        let residual = self
            .residual
            .map(|r| &r[img * g.out_plane()..(img + 1) * g.out_plane()]);
        let plane_of = |(co, plane): (usize, &mut [f32])| {
            let b = self.shift[co];
            match residual {
                Some(r) => {
                    let r = &r[co * ohw..(co + 1) * ohw];
                    for (v, &r) in plane.iter_mut().zip(r) {
                        *v = (*v + b + r).max(0.0);
                    }
                }
                None if self.relu => plane.iter_mut().for_each(|v| *v = (*v + b).max(0.0)),
                None => plane.iter_mut().for_each(|v| *v += b),
            }
        };
        if matches!(par, Parallelism::Rayon(_)) {
            dst.par_chunks_exact_mut(ohw).enumerate().for_each(plane_of);
        } else {
            dst.chunks_exact_mut(ohw).enumerate().for_each(plane_of);
        }
    }
}

fn forward(x: &[f32], weight: &[f32], g: &Geometry, epilogue: Option<Epilogue>) -> Vec<f32> {
    if g.is_shifted() {
        return forward_permuted(x, &permute_weight(weight, g, false), g, epilogue);
    }
    let mut out = zeros(g.n * g.out_plane());
    let (k, ohw) = (g.k(), g.out_pixels());
    let chunk = g.out_plane();
    let weight = if g.is_pointwise() || g.is_subsample() {
        weight.to_vec()
    } else {
        permute_weight(weight, g, false)
    };
    // As in `forward_shifted`: with few output channels, a channels-last product that reads the
    // patch rows in place beats the transposed one; not for a reduction as short as the 3-channel
    // stem's (k = 27), where writing NCHW directly saves the transposition (its forward measured
    // 18-20 -> 15-16 ms at 224 px, batch 16, with `examples/conv_layers.rs`).
    let channels_last = !g.is_pointwise() && !g.is_subsample() && g.cout <= ohw && g.k() >= 64;
    let extra = if channels_last { g.cout * ohw } else { 0 };
    over_batch(&mut out, g.n, chunk, |range, out, par| {
        with_scratch(g.scratch_len() + extra, |scratch| {
            let (scratch, cl) = scratch.split_at_mut(g.scratch_len());
            let (hwc, col) = scratch.split_at_mut(g.hwc_len());
            for (img, dst) in range.zip(out.chunks_mut(chunk)) {
                let xi = &x[img * g.in_plane()..(img + 1) * g.in_plane()];
                if channels_last {
                    patches(xi, g, hwc, col, par);
                    let patch_cols = Mat::view(col, 0, 1, k as isize, [k, ohw]);
                    let w = Mat::view(&weight, 0, k as isize, 1, [g.cout, k]);
                    matmul_into(
                        cl,
                        [1, g.cout as isize],
                        [g.cout, ohw, k],
                        w,
                        patch_cols,
                        false,
                        par,
                    );
                    from_channels_last(cl, g, g.ow, dst, matches!(par, Parallelism::Rayon(_)));
                    if let Some(e) = &epilogue {
                        e.apply(g, img, dst, par);
                    }
                    continue;
                }
                let rhs = if g.is_pointwise() {
                    Mat::rows(xi, ohw)
                } else if g.is_subsample() {
                    subsample(xi, g, col);
                    Mat::rows(col, ohw)
                } else {
                    patches(xi, g, hwc, col, par);
                    Mat::transposed(col, k)
                };
                matmul(
                    dst,
                    [g.cout, ohw, k],
                    Mat::rows(&weight, k),
                    rhs,
                    false,
                    par,
                );
                if let Some(e) = &epilogue {
                    e.apply(g, img, dst, par);
                }
            }
        })
    });
    out
}

/// Stride-1 forward over the batch with a kernel already in `[C_out, kh, kw, C_in]` order.
fn forward_permuted(
    x: &[f32],
    wperm: &[f32],
    g: &Geometry,
    epilogue: Option<Epilogue>,
) -> Vec<f32> {
    let mut out = zeros(g.n * g.out_plane());
    over_batch(&mut out, g.n, g.out_plane(), |range, out, par| {
        with_scratch(g.shifted_scratch_len(), |scratch| {
            for (img, dst) in range.zip(out.chunks_mut(g.out_plane())) {
                let xi = &x[img * g.in_plane()..(img + 1) * g.in_plane()];
                forward_shifted(xi, wperm, g, scratch, dst, par);
                if let Some(e) = &epilogue {
                    e.apply(g, img, dst, par);
                }
            }
        })
    });
    out
}

fn backward_x(weight: &[f32], dy: &[f32], g: &Geometry) -> Vec<f32> {
    if let Some(t) = g.input_gradient() {
        return forward_permuted(dy, &flip_weight(weight, g), &t, None);
    }
    let mut dx = zeros(g.n * g.in_plane());
    let (k, ohw) = (g.k(), g.out_pixels());
    over_batch(&mut dx, g.n, g.in_plane(), |range, dx, par| {
        with_scratch(if g.is_pointwise() { 0 } else { k * ohw }, |col| {
            for (img, dxi) in range.zip(dx.chunks_mut(g.in_plane())) {
                let dyi = Mat::rows(&dy[img * g.out_plane()..(img + 1) * g.out_plane()], ohw);
                let wt = Mat::transposed(weight, k);
                if g.is_pointwise() {
                    matmul(dxi, [k, ohw, g.cout], wt, dyi, false, par);
                } else {
                    matmul(col, [k, ohw, g.cout], wt, dyi, false, par);
                    col2im(col, g, dxi);
                }
            }
        })
    });
    dx
}

fn backward_weight(x: &[f32], dy: &[f32], g: &Geometry) -> Vec<f32> {
    let (k, ohw) = (g.k(), g.out_pixels());
    if g.is_shifted() {
        let dw = sum_over_batch(g.n, g.cout * k, |range, dw, par| {
            with_scratch(g.shifted_scratch_len(), |scratch| {
                for (nth, img) in range.enumerate() {
                    let xi = &x[img * g.in_plane()..(img + 1) * g.in_plane()];
                    let dyi = &dy[img * g.out_plane()..(img + 1) * g.out_plane()];
                    weight_grad_shifted(xi, dyi, g, scratch, dw, nth > 0, par);
                }
            })
        });
        return permute_weight(&dw, g, true);
    }
    let dw = sum_over_batch(g.n, g.cout * k, |range, dw, par| {
        with_scratch(g.scratch_len(), |scratch| {
            let (hwc, col) = scratch.split_at_mut(g.hwc_len());
            for (nth, img) in range.enumerate() {
                let xi = &x[img * g.in_plane()..(img + 1) * g.in_plane()];
                let colt = if g.is_pointwise() {
                    Mat::transposed(xi, ohw)
                } else if g.is_subsample() {
                    subsample(xi, g, col);
                    Mat::transposed(col, ohw)
                } else {
                    patches(xi, g, hwc, col, par);
                    Mat::rows(col, k)
                };
                let dyi = Mat::rows(&dy[img * g.out_plane()..(img + 1) * g.out_plane()], ohw);
                matmul(dw, [g.cout, k, ohw], dyi, colt, nth > 0, par);
            }
        })
    });
    if g.is_pointwise() || g.is_subsample() {
        dw
    } else {
        permute_weight(&dw, g, true)
    }
}

/// A zeroed buffer, filled by every thread: a serial `vec![0.0; n]` of an activation-sized
/// output left the other core idle (in the heap, calloc has to clear reused memory).
pub(crate) fn zeros(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    (0..n)
        .into_par_iter()
        .map(|_| 0.0f32)
        .collect_into_vec(&mut v);
    v
}

/// The values of a contiguous f32 Flex tensor (the kernels' callers make it so).
pub(crate) fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("CPU kernel: a contiguous f32 tensor")
}

/// A Flex tensor owning `values`.
pub(crate) fn flex(values: Vec<f32>, shape: impl Into<Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn options(stride: [usize; 2], padding: [usize; 2]) -> ConvOptions<2> {
    ConvOptions::new(stride, padding, [1, 1], 1)
}

/// Everything but f32 goes through burn-flex's own kernels.
fn is_f32(tensors: &[&FlexTensor]) -> bool {
    tensors.iter().all(|t| t.dtype() == DType::F32)
}

impl ConvBackend for Flex {
    fn gemm_conv2d(
        x: FlexTensor,
        weight: FlexTensor,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FlexTensor {
        if !is_f32(&[&x, &weight]) {
            return Flex::conv2d(x, weight, None, options(stride, padding));
        }
        let g = Geometry::new(x.layout().shape(), weight.layout().shape(), stride, padding);
        let (x, weight) = (x.to_contiguous(), weight.to_contiguous());
        let out = forward(slice(&x), slice(&weight), &g, None);
        flex(out, [g.n, g.cout, g.oh, g.ow])
    }
}

/// Inference only (Flex, never differentiated): the convolution with its batch norm folded in,
/// `relu?(conv(x, weight) + shift[c] (+ residual))`, where the caller has already scaled
/// `weight` by the batch norm's `gamma / sqrt(var + eps)`. See [`crate::Path::NchwFolded`].
#[backend_extension(Flex)]
pub trait ConvInferenceBackend: burn::backend::Backend {
    /// `relu?(conv(x, weight) + shift)`.
    fn gemm_conv2d_shift(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        relu: bool,
    ) -> FloatTensor<Self>;

    /// `relu(conv(x, weight) + shift + residual)`.
    fn gemm_conv2d_shift_add_relu(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self>;
}

fn conv_shift_flex(
    x: FlexTensor,
    weight: FlexTensor,
    shift: FlexTensor,
    residual: Option<FlexTensor>,
    stride: [usize; 2],
    padding: [usize; 2],
    relu: bool,
) -> FlexTensor {
    let g = Geometry::new(x.layout().shape(), weight.layout().shape(), stride, padding);
    let (x, weight) = (x.to_contiguous(), weight.to_contiguous());
    let shift = shift.to_contiguous();
    let residual = residual.map(|r| r.to_contiguous());
    let epilogue = Epilogue {
        shift: slice(&shift),
        residual: residual.as_ref().map(slice),
        relu: relu || residual.is_some(),
    };
    assert_eq!(
        epilogue.shift.len(),
        g.cout,
        "conv shift: one value per output channel"
    );
    if let Some(r) = epilogue.residual {
        assert_eq!(
            r.len(),
            g.n * g.out_plane(),
            "conv residual: the output's shape"
        );
    }
    let out = forward(slice(&x), slice(&weight), &g, Some(epilogue));
    flex(out, [g.n, g.cout, g.oh, g.ow])
}

impl ConvInferenceBackend for Flex {
    fn gemm_conv2d_shift(
        x: FlexTensor,
        weight: FlexTensor,
        shift: FlexTensor,
        stride: [usize; 2],
        padding: [usize; 2],
        relu: bool,
    ) -> FlexTensor {
        conv_shift_flex(x, weight, shift, None, stride, padding, relu)
    }

    fn gemm_conv2d_shift_add_relu(
        x: FlexTensor,
        weight: FlexTensor,
        shift: FlexTensor,
        residual: FlexTensor,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FlexTensor {
        conv_shift_flex(x, weight, shift, Some(residual), stride, padding, true)
    }
}

fn flex_backward_x(x: &FlexTensor, weight: FlexTensor, dy: FlexTensor, g: &Geometry) -> FlexTensor {
    if !is_f32(&[x, &weight, &dy]) {
        return Flex::conv2d_x_backward(x.clone(), weight, dy, options(g.stride, g.pad));
    }
    let (weight, dy) = (weight.to_contiguous(), dy.to_contiguous());
    flex(
        backward_x(slice(&weight), slice(&dy), g),
        [g.n, g.cin, g.h, g.w],
    )
}

fn flex_backward_weight(
    x: FlexTensor,
    weight: &FlexTensor,
    dy: FlexTensor,
    g: &Geometry,
) -> FlexTensor {
    if !is_f32(&[&x, weight, &dy]) {
        return Flex::conv2d_weight_backward(x, weight.clone(), dy, options(g.stride, g.pad));
    }
    let (x, dy) = (x.to_contiguous(), dy.to_contiguous());
    flex(
        backward_weight(slice(&x), slice(&dy), g),
        [g.cout, g.cin, g.kh, g.kw],
    )
}

/// `(dx, dweight)` of an NCHW convolution, each only when `want` asks for it.
fn gradients(
    x: FlexTensor,
    weight: FlexTensor,
    dy: FlexTensor,
    stride: [usize; 2],
    padding: [usize; 2],
    [want_x, want_weight]: [bool; 2],
) -> (Option<FlexTensor>, Option<FlexTensor>) {
    let g = Geometry::new(x.layout().shape(), weight.layout().shape(), stride, padding);
    let dx = want_x.then(|| flex_backward_x(&x, weight.clone(), dy.clone(), &g));
    let dw = want_weight.then(|| flex_backward_weight(x, &weight, dy, &g));
    (dx, dw)
}

/// The backward pass of both convolution layouts: NCHW ([`ConvBackend`]) and channels-last
/// ([`channels_last::ChannelsLastConvBackend`]); the state says which.
#[derive(Debug)]
struct GemmConv2dBackward;

impl Backward<Flex, 2> for GemmConv2dBackward {
    type State = (NodeId, NodeId, [usize; 2], [usize; 2], bool);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_weight] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (x_state, weight_state, stride, padding, channels_last) = ops.state;
        let x: FlexTensor = checkpointer.retrieve_node_output(x_state);
        let weight: FlexTensor = checkpointer.retrieve_node_output(weight_state);
        let gradients = if channels_last {
            channels_last::gradients
        } else {
            gradients
        };
        let want = [node_x.is_some(), node_weight.is_some()];
        let (dx, dw) = gradients(x, weight, dy, stride, padding, want);
        for (node, grad) in [(node_x, dx), (node_weight, dw)] {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

/// A convolution on `Autodiff<Flex>`: `run` (the NCHW or the channels-last kernel) on the inner
/// tensors, recorded with [`GemmConv2dBackward`] when either input is tracked.
fn record<C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<Flex, C>>,
    weight: FloatTensor<Autodiff<Flex, C>>,
    stride: [usize; 2],
    padding: [usize; 2],
    channels_last: bool,
) -> FloatTensor<Autodiff<Flex, C>> {
    let run = if channels_last {
        <Flex as channels_last::ChannelsLastConvBackend>::conv2d_nhwc
    } else {
        <Flex as ConvBackend>::gemm_conv2d
    };
    match GemmConv2dBackward
        .prepare::<C>([x.node(), weight.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let x_state = prep.checkpoint(&x);
            let weight_state = prep.checkpoint(&weight);
            let out = run(x.into_primitive(), weight.into_primitive(), stride, padding);
            prep.finish((x_state, weight_state, stride, padding, channels_last), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(run(
            x.into_primitive(),
            weight.into_primitive(),
            stride,
            padding,
        )),
    }
}

impl<C: CheckpointStrategy> ConvBackend for Autodiff<Flex, C> {
    fn gemm_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self> {
        record::<C>(x, weight, stride, padding, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_columns_match_a_direct_bounds_check() {
        for (w, k, s, p) in [
            (7, 3, 1, 1),
            (8, 3, 2, 1),
            (9, 1, 2, 0),
            (5, 5, 1, 2),
            (6, 3, 3, 0),
        ] {
            let g = Geometry::new(&[1, 1, w, w], &[1, 1, k, k], [s, s], [p, p]);
            for j in 0..k {
                let inside: Vec<usize> = (0..g.ow)
                    .filter(|ow| {
                        let c = (ow * s + j) as isize - p as isize;
                        c >= 0 && c < w as isize
                    })
                    .collect();
                let (lo, hi) = g.valid_cols(j);
                assert_eq!(
                    inside,
                    (lo..hi).collect::<Vec<_>>(),
                    "w {w} k {k} s {s} p {p} j {j}"
                );
            }
        }
    }
}
