//! Winograd F(2x2, 3x3): the stride-1 3x3 convolutions of inference in 16 products instead of 36
//! multiplications per 2x2 output tile.
//!
//! Why: these layers are three-quarters of the reference network's arithmetic, and the direct
//! kernel already runs them near the FMA units' limit, so fewer multiplications is what is left.
//! Each 4x4 input tile `d` is transformed to `V = Bᵀ d B` and each 3x3 kernel to `U = G g Gᵀ`
//! (once, cached with the unit); the 16 elementwise products summed over input channels are 16
//! ordinary 1x1 convolutions of the tiles (`[tiles, C_in] · [C_in, C_out]`), run by the direct
//! kernel; the output transform `Y = Aᵀ M A` gives the 2x2 outputs and applies the folded batch
//! norm's shift, the residual and the ReLU. The transforms use only ±1 and ½, so the rounding is
//! that of the direct convolution (the tests compare the two to 1e-5 of the largest value).
//!
//! Work goes by chunks of tile rows (at least ~48 tiles, so that each packed weight block is
//! reused across tiles), transformed into per-thread scratch, multiplied and transformed back
//! before the next chunk, so the 16x larger transformed tiles stay in cache.

use super::super::{Geometry, with_scratch};
use super::Tail;
use super::direct::{self, BLOCK, Frame, Out, Output, over_images, split_image};
use rayon::prelude::*;
use std::ops::Range;

/// Whether [`forward`] takes this convolution: 3x3, stride 1, padding 1, output channels in
/// blocks of 16 on a CPU with AVX2 and FMA. Its precondition, asserted before the `unsafe` code;
/// the plan ([`crate::plan`]) picks the kernel from it.
pub(crate) fn applies(g: &Geometry) -> bool {
    g.kh == 3 && g.kw == 3 && g.stride == [1, 1] && g.pad == [1, 1] && direct::applies(g)
}

/// The 16 transformed kernels `U = G g Gᵀ` (`at(c_out, tap, c_in)` gives the 3x3 weights), each
/// packed as a 1x1 kernel for the direct convolution, one after another.
pub(super) fn pack(g: &Geometry, at: impl Fn(usize, usize, usize) -> f32 + Sync) -> Vec<f32> {
    let (ci, co) = (g.cin, g.cout);
    // U for every (c_out, c_in), 16 values each.
    let mut u = vec![0.0f32; co * ci * 16];
    u.par_chunks_mut(ci * 16).enumerate().for_each(|(o, row)| {
        for (c, u) in row.chunks_exact_mut(16).enumerate() {
            let w: [f32; 9] = std::array::from_fn(|t| at(o, t, c));
            // G g: 4x3, then (G g) Gᵀ: 4x4.
            let mut gg = [[0.0f32; 3]; 4];
            for j in 0..3 {
                let (a, b, d) = (w[j], w[3 + j], w[6 + j]);
                gg[0][j] = a;
                gg[1][j] = 0.5 * (a + b + d);
                gg[2][j] = 0.5 * (a - b + d);
                gg[3][j] = d;
            }
            for (i, r) in gg.iter().enumerate() {
                let (a, b, d) = (r[0], r[1], r[2]);
                u[i * 4] = a;
                u[i * 4 + 1] = 0.5 * (a + b + d);
                u[i * 4 + 2] = 0.5 * (a - b + d);
                u[i * 4 + 3] = d;
            }
        }
    });
    let one = pointwise(g, 1);
    let plane = co * ci;
    let mut out = Vec::with_capacity(16 * plane);
    for xi in 0..16 {
        out.extend(direct::pack(&one, |o, _, c| u[(o * ci + c) * 16 + xi]));
    }
    out
}

/// The 1x1 convolution that multiplies `tiles` transformed tiles by one transformed kernel.
fn pointwise(g: &Geometry, tiles: usize) -> Geometry {
    Geometry::new(
        &[1, g.cin, 1, tiles],
        &[g.cout, g.cin, 1, 1],
        [1, 1],
        [0, 0],
    )
}

/// Output tiles: `[ceil(H_out / 2), ceil(W_out / 2)]`.
fn tiles(g: &Geometry) -> [usize; 2] {
    [g.oh.div_ceil(2), g.ow.div_ceil(2)]
}

/// The zero-padded copy the tiles read: `[2·TH + 2, 2·TW + 2, C_in]` (one more row and column
/// than the padding when the output size is odd).
fn padded(xi: &[f32], g: &Geometry, out: &mut [f32], parallel: bool) {
    let [th, tw] = tiles(g);
    let (pw, c) = (2 * tw + 2, g.cin);
    let fill = |(r, row): (usize, &mut [f32])| {
        row.fill(0.0);
        if let Some(ih) = r.checked_sub(1).filter(|&ih| ih < g.h) {
            row[c..(g.w + 1) * c].copy_from_slice(&xi[ih * g.w * c..(ih + 1) * g.w * c]);
        }
    };
    let out = &mut out[..(2 * th + 2) * pw * c];
    if parallel {
        out.par_chunks_mut(pw * c).enumerate().for_each(fill);
    } else {
        out.chunks_mut(pw * c).enumerate().for_each(fill);
    }
}

/// The convolution of channels-last `x` with a kernel from [`pack`], then `tail`;
/// `[N, H_out, W_out, C_out]`. Only where [`applies`] says so.
pub(super) fn forward(x: &[f32], packed: &[f32], g: &Geometry, tail: Option<&Tail>) -> Vec<f32> {
    assert!(
        applies(g),
        "Winograd convolution on a shape it does not take: {g:?}"
    );
    assert_eq!(
        x.len(),
        g.n * g.in_plane(),
        "Winograd convolution: input size"
    );
    assert_eq!(
        packed.len(),
        16 * g.cout * g.cin,
        "Winograd convolution: kernel size"
    );
    if let Some(t) = tail {
        t.check(g, "Winograd convolution");
    }
    // Read on the calling thread; its products run on the workers with this choice.
    let isa = crate::isa::active_isa();
    let [th, tw] = tiles(g);
    let padded_len = (2 * th + 2) * (2 * tw + 2) * g.cin;
    let mut out = Output::new(g.n * g.out_plane());
    let dst = out.ptr();
    let blocks = g.cout / BLOCK;
    let image = |img: usize, parallel: bool| {
        let xi = &x[img * g.in_plane()..(img + 1) * g.in_plane()];
        with_scratch(padded_len, |p| {
            padded(xi, g, p, parallel);
            let p = &*p;
            // The transformed kernels outweigh the image: each thread then transforms all the
            // tiles (few, in such layers) and multiplies its channel blocks.
            let heavy = packed.len() > padded_len;
            split_image(th, blocks, heavy, parallel, |cbs, rows| {
                image_part(p, packed, g, tail, img, dst, rows, cbs, isa)
            })
        })
    };
    over_images(g.n, image);
    // SAFETY: every output pixel of every image lies in exactly one tile row and every channel
    // in one block; `image_part` writes all of them.
    unsafe { out.finish() }
}

/// Tile rows `rows` and channel blocks `cbs` of image `img`, chunk by chunk.
#[allow(clippy::too_many_arguments)]
fn image_part(
    p: &[f32],
    packed: &[f32],
    g: &Geometry,
    tail: Option<&Tail>,
    img: usize,
    dst: Out,
    rows: Range<usize>,
    cbs: Range<usize>,
    isa: crate::isa::Isa,
) {
    let [_, tw] = tiles(g);
    let (ci, co) = (g.cin, g.cout);
    let chunk_rows = 48usize.div_ceil(tw).max(1);
    let most = chunk_rows.min(rows.len()) * tw;
    with_scratch(16 * most * (ci + co), |scratch| {
        let mut r0 = rows.start;
        while r0 < rows.end {
            let r1 = (r0 + chunk_rows).min(rows.end);
            let t = (r1 - r0) * tw;
            let (v, m) = scratch.split_at_mut(16 * t * ci);
            let m = &mut m[..16 * t * co];
            transform_input(p, g, r0..r1, v);
            let one = pointwise(g, t);
            for xi in 0..16 {
                let u = &packed[xi * co * ci..(xi + 1) * co * ci];
                let mx = Out(m[xi * t * co..].as_mut_ptr());
                Frame::new(
                    &v[xi * t * ci..(xi + 1) * t * ci],
                    u,
                    &one,
                    None,
                    0,
                    mx,
                    isa,
                )
                .run(cbs.clone(), 0..1);
            }
            transform_output(
                m,
                g,
                tail,
                img,
                dst,
                r0..r1,
                cbs.start * BLOCK..cbs.end * BLOCK,
            );
            r0 = r1;
        }
    });
}

/// `V = Bᵀ d B` for the tiles of rows `rows` of the padded copy `p`: `v[ξ][tile][c_in]`.
fn transform_input(p: &[f32], g: &Geometry, rows: Range<usize>, v: &mut [f32]) {
    let [_, tw] = tiles(g);
    let (c, pw) = (g.cin, 2 * tw + 2);
    assert!(
        (2 * rows.end + 2) * pw * c <= p.len() && 16 * rows.len() * tw * c <= v.len(),
        "Winograd input transform: buffers too small"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `applies` checked AVX2 and FMA; the extents are checked above.
    unsafe {
        avx2::transform_input(p.as_ptr(), v.as_mut_ptr(), [c, pw, tw], rows)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("Winograd without AVX2 ({c}, {pw}, {rows:?})")
}

/// `Y = Aᵀ M A` for the tiles of rows `rows`, channels `chans` (whole blocks of 16), then the
/// tail; writes the output pixels that exist (an odd size's last tile row or column is half
/// outside).
#[allow(clippy::too_many_arguments)]
fn transform_output(
    m: &[f32],
    g: &Geometry,
    tail: Option<&Tail>,
    img: usize,
    dst: Out,
    rows: Range<usize>,
    chans: Range<usize>,
) {
    let [_, tw] = tiles(g);
    let plane = g.out_plane();
    assert!(
        chans.start.is_multiple_of(8) && chans.end.is_multiple_of(8) && chans.end <= g.cout,
        "Winograd output transform: channels in lanes of 8"
    );
    assert!(
        16 * rows.len() * tw * g.cout <= m.len(),
        "Winograd output transform: products too small"
    );
    if let Some(t) = tail {
        assert!(t.shift.len() == g.cout && t.residual.is_none_or(|r| r.len() >= (img + 1) * plane));
    }
    let residual = tail
        .and_then(|t| t.residual)
        .map(|r| r[img * plane..].as_ptr());
    let shift = tail.map(|t| t.shift.as_ptr());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `applies` checked AVX2 and FMA; the output transform writes pixels `(oh, ow)`
    // inside image `img` and channels in `chans`, which this part owns; the reads stay in `m`,
    // the shift and the residual image (checked above).
    unsafe {
        avx2::transform_output(
            m.as_ptr(),
            dst.0.add(img * plane),
            [g.oh, g.ow, g.cout, tw],
            rows,
            chans,
            shift,
            residual,
            tail.is_some_and(|t| t.relu),
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("Winograd without AVX2 ({shift:?}, {residual:?}, {rows:?}, {chans:?})")
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// See [`super::transform_input`]; `p` is the padded copy (`pw` pixels a row, `c` channels),
    /// `v` the 16 planes of `rows.len() · tw` tiles.
    // The index loops mirror the transform's matrices (row `i`, column `j`).
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transform_input(
        p: *const f32,
        v: *mut f32,
        [c, pw, tw]: [usize; 3],
        rows: Range<usize>,
    ) {
        let plane = rows.len() * tw * c;
        for (k, tr) in rows.enumerate() {
            for tc in 0..tw {
                // SAFETY (whole tile): inside the extents the caller checked.
                unsafe {
                    let base = p.add((2 * tr * pw + 2 * tc) * c);
                    let out = v.add((k * tw + tc) * c);
                    let mut ch = 0;
                    while ch + 8 <= c {
                        let ld =
                            |i: usize, j: usize| _mm256_loadu_ps(base.add((i * pw + j) * c + ch));
                        // Bᵀ d, a column at a time: d0 - d2, d1 + d2, d2 - d1, d1 - d3.
                        let mut b = [[_mm256_setzero_ps(); 4]; 4];
                        for j in 0..4 {
                            let (d0, d1, d2, d3) = (ld(0, j), ld(1, j), ld(2, j), ld(3, j));
                            b[0][j] = _mm256_sub_ps(d0, d2);
                            b[1][j] = _mm256_add_ps(d1, d2);
                            b[2][j] = _mm256_sub_ps(d2, d1);
                            b[3][j] = _mm256_sub_ps(d1, d3);
                        }
                        // (Bᵀ d) B: the same along each row.
                        for (i, r) in b.iter().enumerate() {
                            let o = out.add(i * 4 * plane + ch);
                            _mm256_storeu_ps(o, _mm256_sub_ps(r[0], r[2]));
                            _mm256_storeu_ps(o.add(plane), _mm256_add_ps(r[1], r[2]));
                            _mm256_storeu_ps(o.add(2 * plane), _mm256_sub_ps(r[2], r[1]));
                            _mm256_storeu_ps(o.add(3 * plane), _mm256_sub_ps(r[1], r[3]));
                        }
                        ch += 8;
                    }
                    for ch in ch..c {
                        let d = |i: usize, j: usize| *base.add((i * pw + j) * c + ch);
                        let mut b = [[0.0f32; 4]; 4];
                        for j in 0..4 {
                            b[0][j] = d(0, j) - d(2, j);
                            b[1][j] = d(1, j) + d(2, j);
                            b[2][j] = d(2, j) - d(1, j);
                            b[3][j] = d(1, j) - d(3, j);
                        }
                        for (i, r) in b.iter().enumerate() {
                            let o = out.add(i * 4 * plane + ch);
                            *o = r[0] - r[2];
                            *o.add(plane) = r[1] + r[2];
                            *o.add(2 * plane) = r[2] - r[1];
                            *o.add(3 * plane) = r[1] - r[3];
                        }
                    }
                }
            }
        }
    }

    /// See [`super::transform_output`]; `out` is image `img`'s output, `residual` its residual.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn transform_output(
        m: *const f32,
        out: *mut f32,
        [oh, ow, co, tw]: [usize; 4],
        rows: Range<usize>,
        chans: Range<usize>,
        shift: Option<*const f32>,
        residual: Option<*const f32>,
        relu: bool,
    ) {
        let plane = rows.len() * tw * co;
        let zero = _mm256_setzero_ps();
        for (k, tr) in rows.enumerate() {
            for tc in 0..tw {
                for ch in chans.clone().step_by(8) {
                    // SAFETY (whole block): inside the extents the caller checked.
                    unsafe {
                        let src = m.add((k * tw + tc) * co + ch);
                        let e = |xi: usize| _mm256_loadu_ps(src.add(xi * plane));
                        // Aᵀ M: rows m0 + m1 + m2 and m1 - m2 - m3, then the same along rows.
                        let mut r = [[zero; 4]; 2];
                        for (j, rj) in (0..4).map(|j| (j, [e(j), e(4 + j), e(8 + j), e(12 + j)])) {
                            r[0][j] = _mm256_add_ps(_mm256_add_ps(rj[0], rj[1]), rj[2]);
                            r[1][j] = _mm256_sub_ps(_mm256_sub_ps(rj[1], rj[2]), rj[3]);
                        }
                        let s = shift.map_or(zero, |s| _mm256_loadu_ps(s.add(ch)));
                        for (i, row) in r.iter().enumerate() {
                            let y = [
                                _mm256_add_ps(_mm256_add_ps(row[0], row[1]), row[2]),
                                _mm256_sub_ps(_mm256_sub_ps(row[1], row[2]), row[3]),
                            ];
                            let h = 2 * tr + i;
                            for (j, y) in y.into_iter().enumerate() {
                                let w = 2 * tc + j;
                                if h >= oh || w >= ow {
                                    continue;
                                }
                                let at = (h * ow + w) * co + ch;
                                let mut val = _mm256_add_ps(y, s);
                                if let Some(res) = residual {
                                    val = _mm256_add_ps(val, _mm256_loadu_ps(res.add(at)));
                                }
                                if relu {
                                    val = _mm256_max_ps(val, zero);
                                }
                                _mm256_storeu_ps(out.add(at), val);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Tail;
    use super::super::direct;
    use super::super::direct::tests::values;
    use super::*;

    /// Winograd against the direct convolution on one shape, with each part of the tail, with
    /// every instruction set the CPU has (the transforms are AVX2; the products follow the
    /// instruction set). Under CI a CPU without AVX2 fails rather than testing nothing.
    fn agrees(n: usize, [cin, cout]: [usize; 2], [h, w]: [usize; 2]) {
        assert!(
            std::env::var_os("CI").is_none()
                || crate::isa::Isa::detected() >= crate::isa::Isa::Avx2,
            "CI runs on a CPU without AVX2: the Winograd kernels are not tested"
        );
        for isa in crate::isa::Isa::supported() {
            let _scope = crate::isa::scoped_isa(isa).expect("a supported instruction set");
            agrees_with(n, [cin, cout], [h, w]);
        }
    }

    fn agrees_with(n: usize, [cin, cout]: [usize; 2], [h, w]: [usize; 2]) {
        let g = Geometry::new(&[n, cin, h, w], &[cout, cin, 3, 3], [1, 1], [1, 1]);
        if !applies(&g) {
            return;
        }
        let x = values(g.n * g.in_plane(), 11);
        let weight = values(g.cout * g.k(), 12);
        let shift = values(g.cout, 13);
        let residual = values(g.n * g.out_plane(), 14);
        let at = |co: usize, t: usize, c: usize| weight[(co * cin + c) * 9 + t];
        let (wino, plain) = (pack(&g, at), direct::pack(&g, at));
        for (relu, res) in [(false, false), (true, false), (true, true)] {
            let tail = Tail {
                shift: &shift,
                residual: res.then_some(residual.as_slice()),
                relu,
            };
            let got = forward(&x, &wino, &g, Some(&tail));
            let want = direct::forward(&x, &plain, &g, Some(&tail));
            assert_eq!(got.len(), want.len());
            let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * scale,
                    "{g:?} relu {relu} residual {res}: value {i}: Winograd {a}, direct {b}"
                );
            }
        }
    }

    #[test]
    fn even_and_odd_sizes() {
        for (h, w) in [(2, 2), (4, 6), (5, 7), (1, 1), (3, 8), (9, 4)] {
            agrees(1, [8, 16], [h, w]);
        }
        agrees(3, [5, 32], [7, 10]);
    }

    #[test]
    fn wide_layers_split_the_rows_and_deep_ones_the_channels() {
        // More than one chunk of tile rows (48 tiles a chunk) and, at batch 1, two threads.
        agrees(1, [16, 32], [40, 30]);
        agrees(2, [32, 16], [26, 26]);
        // Transformed weights outweigh the image: channel blocks split.
        agrees(1, [64, 64], [6, 6]);
    }
}
