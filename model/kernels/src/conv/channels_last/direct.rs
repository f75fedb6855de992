//! Direct convolution on channels-last f32 activations with AVX2 and FMA (x86-64).
//!
//! Why: through `gemm`, a convolution is a product over a view of the input that `gemm` packs
//! first, and a 3x3 stride-1 layer is three products (one per kernel row) that read and write
//! the whole output three times. Profiles of the batch-1 pass put two-thirds of its time in
//! `gemm`'s micro-kernel at ~60 GFLOP/s a core (this machine's FMA units peak near 92). This
//! kernel keeps a tile of 6 output pixels x 16 output channels in twelve registers for the whole
//! reduction (every kernel tap and input channel), reads the input in place (each value a
//! broadcast from the padded channels-last image) and the weights from a copy packed in the
//! order the loop reads them (per call in training, once per unit in inference: see
//! `crate::unit_cache`), and writes each output once, with the folded batch
//! norm's shift, the residual and the ReLU applied from the registers. One core runs the
//! reference trunk's 3x3 layers at 70-81 GFLOP/s this way (measured in a scratch benchmark).
//!
//! It takes any kernel size, stride and padding whose output channels come in blocks of 16;
//! other shapes, and the portable instruction set ([`crate::isa`]), stay on the `gemm` path.
//! With AVX-512 a block of 16 channels is one register: the tile holds 14 pixels (14
//! accumulators) and each weight load feeds 14 FMAs of 16 lanes, against 6 FMAs of 8 per load
//! with AVX2.

use super::super::{Geometry, with_scratch};
use super::{Tail, pad_rows};
use crate::isa::{Isa, active_isa};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::ops::Range;

/// Output channels per block: two 8-lane registers.
pub(super) const BLOCK: usize = 16;

/// Whether [`forward`] takes this convolution here: its precondition, asserted before the
/// `unsafe` code; the plan ([`crate::plan`]) picks the kernel from it.
pub(crate) fn applies(g: &Geometry) -> bool {
    g.cout.is_multiple_of(BLOCK) && g.cin > 0 && active_isa() != Isa::Portable
}

/// The kernel `[C_out / 16, kh·kw, C_in, 16]`, where `at(c_out, tap, c_in)` gives each weight
/// (`tap = i·kw + j`): one block's weights are read front to back by [`forward`], two registers
/// per input channel and tap.
pub(super) fn pack(g: &Geometry, at: impl Fn(usize, usize, usize) -> f32 + Sync) -> Vec<f32> {
    let (taps, ci) = (g.kh * g.kw, g.cin);
    let mut out = vec![0.0f32; g.cout * taps * ci];
    out.par_chunks_mut(taps * ci * BLOCK)
        .enumerate()
        .for_each(|(b, block)| {
            // Each output channel's weights are read in their own order (16 sequential streams);
            // each destination line is written whole.
            for c in 0..ci {
                for t in 0..taps {
                    let line = &mut block[(t * ci + c) * BLOCK..][..BLOCK];
                    for (lane, v) in line.iter_mut().enumerate() {
                        *v = at(b * BLOCK + lane, t, c);
                    }
                }
            }
        });
    out
}

/// The convolution of channels-last `x` (`[N, H, W, C_in]`) with a kernel from [`pack`], then
/// `tail` when there is one; `[N, H_out, W_out, C_out]`. Only where [`applies`] says so.
pub(super) fn forward(x: &[f32], packed: &[f32], g: &Geometry, tail: Option<&Tail>) -> Vec<f32> {
    assert!(
        applies(g),
        "direct convolution on a shape or CPU it does not take"
    );
    assert_eq!(
        x.len(),
        g.n * g.in_plane(),
        "direct convolution: input size"
    );
    assert_eq!(
        packed.len(),
        g.cout * g.k(),
        "direct convolution: kernel size"
    );
    if let Some(t) = tail {
        t.check(g, "direct convolution");
    }
    let padded = g.pad != [0, 0];
    let source_len = if padded { g.padded_len() } else { 0 };
    // Read here, on the calling thread: the workers below run with its choice.
    let isa = active_isa();
    let mut out = Output::new(g.n * g.out_plane());
    let dst = out.ptr();
    // One image: its padded copy (when the convolution pads), then its rows and channel blocks.
    let image = |img: usize, parallel: bool| {
        let xi = &x[img * g.in_plane()..(img + 1) * g.in_plane()];
        let run = |src: &[f32]| {
            let frame = Frame::new(src, packed, g, tail, img, dst, isa);
            let heavy = packed.len() > src.len().max(g.in_plane());
            split_image(g.oh, g.cout / BLOCK, heavy, parallel, |blocks, rows| {
                frame.run(blocks, rows)
            });
        };
        if padded {
            with_scratch(source_len, |p| {
                pad_rows(xi, g, p, parallel);
                run(p)
            })
        } else {
            run(xi)
        }
    };
    over_images(g.n, image);
    // SAFETY: every element was written: all rows, pixels and channel blocks of every image.
    unsafe { out.finish() }
}

/// An output buffer that the kernels fill in full without zeroing it first.
pub(super) struct Output(Vec<MaybeUninit<f32>>);

impl Output {
    pub(super) fn new(len: usize) -> Self {
        let mut out = Vec::with_capacity(len);
        // SAFETY: `MaybeUninit` needs no initialisation.
        unsafe { out.set_len(len) };
        Output(out)
    }

    pub(super) fn ptr(&mut self) -> Out {
        Out(self.0.as_mut_ptr().cast())
    }

    /// # Safety
    /// Every element must have been written through [`Self::ptr`].
    pub(super) unsafe fn finish(self) -> Vec<f32> {
        let mut out = std::mem::ManuallyDrop::new(self.0);
        // SAFETY: initialised (the caller's promise); `MaybeUninit<f32>` and `f32` share their
        // layout, and the parts come from a live `Vec` that is not dropped.
        unsafe { Vec::from_raw_parts(out.as_mut_ptr().cast(), out.len(), out.capacity()) }
    }
}

/// Runs `image(img, parallel)` for every image of a batch of `n`: the images across the threads
/// when there are at least as many, otherwise one after the other, each splitting its own work
/// (`parallel`).
pub(super) fn over_images(n: usize, image: impl Fn(usize, bool) + Sync) {
    let threads = rayon::current_num_threads();
    if n >= threads && threads > 1 {
        (0..n).into_par_iter().for_each(|img| image(img, false));
    } else {
        (0..n).for_each(|img| image(img, threads > 1));
    }
}

/// Runs `part(channel_blocks, rows)` over one image's `rows` output rows and `blocks` channel
/// blocks, across the threads when `parallel`: deep layers (`heavy`: a kernel larger than the
/// image) split the channel blocks, so that each weight is read by one thread; wide ones split
/// the rows.
pub(super) fn split_image(
    rows: usize,
    blocks: usize,
    heavy: bool,
    parallel: bool,
    part: impl Fn(Range<usize>, Range<usize>) + Sync,
) {
    let parts = rayon::current_num_threads().max(1);
    if !parallel {
        part(0..blocks, 0..rows);
    } else if heavy && blocks >= parts {
        split(blocks, parts)
            .into_par_iter()
            .for_each(|cbs| part(cbs, 0..rows));
    } else {
        split(rows, parts)
            .into_par_iter()
            .for_each(|r| part(0..blocks, r));
    }
}

/// Splits `0..n` into at most `parts` nearly equal non-empty ranges.
fn split(n: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.min(n).max(1);
    (0..parts)
        .map(|p| (p * n / parts)..((p + 1) * n / parts))
        .collect()
}

/// The output buffer, written by several threads in disjoint blocks.
#[derive(Clone, Copy)]
pub(super) struct Out(pub(super) *mut f32);

// SAFETY: the threads of one `forward` call write disjoint (image, row, channel block) parts.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// One image's convolution: where it reads and writes, checked once so that the kernel may
/// index with raw pointers.
pub(super) struct Frame<'a> {
    src: &'a [f32],
    /// Width of `src` in pixels (padded when the convolution pads).
    src_w: usize,
    packed: &'a [f32],
    g: &'a Geometry,
    out: Out,
    shift: Option<&'a [f32]>,
    residual: Option<&'a [f32]>,
    relu: bool,
    isa: Isa,
}

impl<'a> Frame<'a> {
    pub(super) fn new(
        src: &'a [f32],
        packed: &'a [f32],
        g: &'a Geometry,
        tail: Option<&'a Tail<'a>>,
        img: usize,
        out: Out,
        isa: Isa,
    ) -> Self {
        assert!(
            isa != Isa::Portable && isa <= Isa::detected(),
            "direct convolution with {} on a CPU whose best is {}",
            isa.name(),
            Isa::detected().name()
        );
        let src_w = if g.pad != [0, 0] { g.padded_w() } else { g.w };
        // The last value any tile reads: bottom-right output pixel, last tap, last channel.
        let last_row = (g.oh - 1) * g.stride[0] + g.kh - 1;
        let last_col = (g.ow - 1) * g.stride[1] + g.kw - 1;
        assert!(
            last_col < src_w && (last_row * src_w + last_col + 1) * g.cin <= src.len(),
            "direct convolution: the input does not cover the output's receptive field"
        );
        let plane = g.out_plane();
        Frame {
            src,
            src_w,
            packed,
            g,
            // SAFETY: image `img` of the `n` the output holds.
            out: Out(unsafe { out.0.add(img * plane) }),
            shift: tail.map(|t| t.shift),
            residual: tail.and_then(|t| t.residual.map(|r| &r[img * plane..(img + 1) * plane])),
            relu: tail.is_some_and(|t| t.relu),
            isa,
        }
    }

    /// Output rows `rows` of channel blocks `blocks`.
    pub(super) fn run(&self, blocks: Range<usize>, rows: Range<usize>) {
        assert!(blocks.end * BLOCK <= self.g.cout && rows.end <= self.g.oh);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `new` checked that the CPU has the instruction set and the input extent, the
        // caller built `packed` and the output for this geometry, and the ranges are checked
        // above.
        unsafe {
            match self.isa {
                Isa::Avx512 => avx512::run(self, blocks, rows),
                _ => avx2::run(self, blocks, rows),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("direct convolution without AVX2 ({blocks:?}, {rows:?})")
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BLOCK, Frame};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Pixels per tile: 6 x 2 accumulators, 2 weight registers and a broadcast fill 15 of the
    /// 16 registers.
    const TILE: usize = 6;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn run(f: &Frame, blocks: Range<usize>, rows: Range<usize>) {
        let ow = f.g.ow;
        for cb in blocks {
            for oh in rows.clone() {
                let mut p = 0;
                // SAFETY (all tiles): pixels `p..p + R` of row `oh` lie inside the output.
                unsafe {
                    while p + TILE <= ow {
                        tile::<TILE>(f, oh, p, cb);
                        p += TILE;
                    }
                    match ow - p {
                        1 => tile::<1>(f, oh, p, cb),
                        2 => tile::<2>(f, oh, p, cb),
                        3 => tile::<3>(f, oh, p, cb),
                        4 => tile::<4>(f, oh, p, cb),
                        5 => tile::<5>(f, oh, p, cb),
                        _ => {}
                    }
                }
            }
        }
    }

    /// Output pixels `p0..p0 + R` of row `oh`, channels `cb·16..cb·16 + 16`.
    ///
    /// # Safety
    /// AVX2 and FMA are available (it is inlined into [`run`], which enables them), and the
    /// frame's extents were checked for this geometry.
    #[inline(always)]
    unsafe fn tile<const R: usize>(f: &Frame, oh: usize, p0: usize, cb: usize) {
        let g = f.g;
        let (cin, [sh, sw]) = (g.cin, g.stride);
        let pixel_step = sw * cin;
        unsafe {
            let mut lo = [_mm256_setzero_ps(); R];
            let mut hi = [_mm256_setzero_ps(); R];
            let src = f.src.as_ptr();
            let mut w = f.packed.as_ptr().add(cb * g.kh * g.kw * cin * BLOCK);
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let x = src.add(((oh * sh + i) * f.src_w + p0 * sw + j) * cin);
                    for c in 0..cin {
                        let w0 = _mm256_loadu_ps(w);
                        let w1 = _mm256_loadu_ps(w.add(8));
                        w = w.add(BLOCK);
                        for r in 0..R {
                            let b = _mm256_broadcast_ss(&*x.add(r * pixel_step + c));
                            lo[r] = _mm256_fmadd_ps(w0, b, lo[r]);
                            hi[r] = _mm256_fmadd_ps(w1, b, hi[r]);
                        }
                    }
                }
            }
            let channel = cb * BLOCK;
            if let Some(shift) = f.shift {
                let (s0, s1) = (
                    _mm256_loadu_ps(shift.as_ptr().add(channel)),
                    _mm256_loadu_ps(shift.as_ptr().add(channel + 8)),
                );
                for r in 0..R {
                    lo[r] = _mm256_add_ps(lo[r], s0);
                    hi[r] = _mm256_add_ps(hi[r], s1);
                }
            }
            let at = |r: usize| (oh * g.ow + p0 + r) * g.cout + channel;
            if let Some(res) = f.residual {
                for r in 0..R {
                    let q = res.as_ptr().add(at(r));
                    lo[r] = _mm256_add_ps(lo[r], _mm256_loadu_ps(q));
                    hi[r] = _mm256_add_ps(hi[r], _mm256_loadu_ps(q.add(8)));
                }
            }
            if f.relu {
                let z = _mm256_setzero_ps();
                for r in 0..R {
                    lo[r] = _mm256_max_ps(lo[r], z);
                    hi[r] = _mm256_max_ps(hi[r], z);
                }
            }
            for r in 0..R {
                let o = f.out.0.add(at(r));
                _mm256_storeu_ps(o, lo[r]);
                _mm256_storeu_ps(o.add(8), hi[r]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{BLOCK, Frame};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Pixels per tile: 14 accumulators, a weight register and the broadcasts in 32 registers.
    const TILE: usize = 14;

    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn run(f: &Frame, blocks: Range<usize>, rows: Range<usize>) {
        let ow = f.g.ow;
        for cb in blocks {
            for oh in rows.clone() {
                let mut p = 0;
                // SAFETY (all tiles): pixels `p..p + R` of row `oh` lie inside the output.
                unsafe {
                    while p + TILE <= ow {
                        tile::<TILE>(f, oh, p, cb);
                        p += TILE;
                    }
                    // The rest in one tile of its own width.
                    macro_rules! rest {
                        ($($r:literal)*) => {
                            match ow - p {
                                $($r => tile::<$r>(f, oh, p, cb),)*
                                _ => {}
                            }
                        };
                    }
                    rest!(1 2 3 4 5 6 7 8 9 10 11 12 13);
                }
            }
        }
    }

    /// Output pixels `p0..p0 + R` of row `oh`, channels `cb·16..cb·16 + 16`: one register each.
    ///
    /// # Safety
    /// AVX-512 F and FMA are available (it is inlined into [`run`], which enables them), and the
    /// frame's extents were checked for this geometry.
    #[inline(always)]
    unsafe fn tile<const R: usize>(f: &Frame, oh: usize, p0: usize, cb: usize) {
        let g = f.g;
        let (cin, [sh, sw]) = (g.cin, g.stride);
        let pixel_step = sw * cin;
        unsafe {
            let mut acc = [_mm512_setzero_ps(); R];
            let src = f.src.as_ptr();
            let mut w = f.packed.as_ptr().add(cb * g.kh * g.kw * cin * BLOCK);
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let x = src.add(((oh * sh + i) * f.src_w + p0 * sw + j) * cin);
                    for c in 0..cin {
                        let wv = _mm512_loadu_ps(w);
                        w = w.add(BLOCK);
                        for (r, a) in acc.iter_mut().enumerate() {
                            let b = _mm512_set1_ps(*x.add(r * pixel_step + c));
                            *a = _mm512_fmadd_ps(wv, b, *a);
                        }
                    }
                }
            }
            let channel = cb * BLOCK;
            if let Some(shift) = f.shift {
                let s = _mm512_loadu_ps(shift.as_ptr().add(channel));
                for a in acc.iter_mut() {
                    *a = _mm512_add_ps(*a, s);
                }
            }
            let at = |r: usize| (oh * g.ow + p0 + r) * g.cout + channel;
            if let Some(res) = f.residual {
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_add_ps(*a, _mm512_loadu_ps(res.as_ptr().add(at(r))));
                }
            }
            if f.relu {
                let z = _mm512_setzero_ps();
                for a in acc.iter_mut() {
                    *a = _mm512_max_ps(*a, z);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(f.out.0.add(at(r)), *a);
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::{Tail, forward_gemm};
    use super::*;

    /// Reproducible values in [-0.5, 0.5).
    pub(in crate::conv::channels_last) fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// The direct kernel against the `gemm` path, for one shape, with and without each part
    /// of the tail, with every instruction set the CPU has. Under CI, a CPU without AVX2 fails
    /// (the kernels would go untested), as the wgpu tests fail without a Vulkan driver.
    fn agrees(n: usize, [cin, cout]: [usize; 2], [h, w]: [usize; 2], k: usize, s: usize, p: usize) {
        assert!(
            std::env::var_os("CI").is_none() || Isa::detected() >= Isa::Avx2,
            "CI runs on a CPU without AVX2: the direct kernels are not tested"
        );
        for isa in Isa::supported() {
            let _scope = crate::isa::scoped_isa(isa).expect("a supported instruction set");
            agrees_with(n, [cin, cout], [h, w], k, s, p, isa);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn agrees_with(
        n: usize,
        [cin, cout]: [usize; 2],
        [h, w]: [usize; 2],
        k: usize,
        s: usize,
        p: usize,
        isa: Isa,
    ) {
        let g = Geometry::new(&[n, cin, h, w], &[cout, cin, k, k], [s, s], [p, p]);
        if !applies(&g) {
            assert!(!g.cout.is_multiple_of(BLOCK) || isa == Isa::Portable);
            return;
        }
        let x = values(g.n * g.in_plane(), 1);
        let wperm = values(g.cout * g.k(), 2);
        let shift = values(g.cout, 3);
        let residual = values(g.n * g.out_plane(), 4);
        let (kk, ci) = (g.k(), g.cin);
        let packed = pack(&g, |co, t, c| wperm[co * kk + t * ci + c]);
        let tails = [
            None,
            Some((false, false)),
            Some((true, false)),
            Some((true, true)),
        ];
        for tail in tails {
            let tail = tail.map(|(relu, res)| Tail {
                shift: &shift,
                residual: res.then_some(residual.as_slice()),
                relu,
            });
            let got = forward(&x, &packed, &g, tail.as_ref());
            let want = forward_gemm(&x, &wperm, &g, tail.as_ref());
            assert_eq!(got.len(), want.len());
            let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * scale,
                    "{g:?}, {}, tail {:?}: value {i}: direct {a}, gemm {b}",
                    isa.name(),
                    tail.as_ref().map(|t| (t.relu, t.residual.is_some()))
                );
            }
        }
    }

    #[test]
    fn every_tile_width_and_stride() {
        // Widths 1-29 cover the full 6- and 14-pixel tiles and every remainder tile of both.
        for w in 1..=29 {
            agrees(1, [8, 16], [3, w], 3, 1, 1);
            agrees(2, [5, 32], [5, w], 3, 2, 1);
        }
    }

    #[test]
    fn the_reference_trunks_forms() {
        agrees(1, [3, 32], [19, 17], 3, 2, 1); // stem
        agrees(1, [32, 32], [14, 14], 3, 1, 1);
        agrees(3, [32, 64], [14, 13], 3, 2, 1);
        agrees(1, [32, 64], [14, 14], 1, 2, 0); // projection shortcut
        agrees(3, [64, 128], [7, 7], 1, 2, 0);
    }

    #[test]
    fn deep_layers_split_the_channel_blocks() {
        // The packed kernel outweighs the image, so a batch of one splits the channel blocks.
        agrees(1, [64, 48], [4, 4], 3, 1, 1);
        agrees(1, [96, 64], [3, 5], 3, 2, 1);
    }

    #[test]
    fn unpadded_and_larger_kernels_read_the_input_in_place() {
        agrees(2, [4, 16], [9, 9], 5, 1, 0);
        agrees(1, [6, 16], [8, 11], 3, 1, 0);
        agrees(3, [7, 16], [6, 6], 1, 1, 0);
        agrees(1, [4, 16], [11, 10], 5, 2, 2);
    }
}
