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
use super::direct::{self, BLOCK, Frame, Out, Output, split};
use rayon::prelude::*;
use std::ops::Range;

/// Whether [`forward`] takes this convolution: 3x3, stride 1, padding 1, output channels in
/// blocks of 16 on a CPU with AVX2 and FMA.
pub(super) fn applies(g: &Geometry) -> bool {
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
        assert_eq!(
            t.shift.len(),
            g.cout,
            "Winograd convolution: one shift per channel"
        );
        if let Some(r) = t.residual {
            assert_eq!(
                r.len(),
                g.n * g.out_plane(),
                "Winograd convolution: residual size"
            );
        }
    }
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
            let part = |rows: Range<usize>, cbs: Range<usize>| {
                image_part(p, packed, g, tail, img, dst, rows, cbs)
            };
            if !parallel {
                return part(0..th, 0..blocks);
            }
            // As in the direct kernel: deep layers split the channel blocks (each thread then
            // transforms all the tiles, which are few), wide ones split the tile rows.
            let parts = rayon::current_num_threads().max(1);
            if packed.len() > padded_len && blocks >= parts {
                split(blocks, parts)
                    .into_par_iter()
                    .for_each(|cbs| part(0..th, cbs));
            } else {
                split(th, parts)
                    .into_par_iter()
                    .for_each(|rows| part(rows, 0..blocks));
            }
        })
    };
    let threads = rayon::current_num_threads();
    if g.n >= threads && threads > 1 {
        (0..g.n).into_par_iter().for_each(|img| image(img, false));
    } else {
        (0..g.n).for_each(|img| image(img, threads > 1));
    }
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
            // SAFETY: `applies` checked AVX2 and FMA.
            unsafe { transform_input(p, g, r0..r1, v) };
            let one = pointwise(g, t);
            for xi in 0..16 {
                let u = &packed[xi * co * ci..(xi + 1) * co * ci];
                let mx = Out(m[xi * t * co..].as_mut_ptr());
                Frame::new(&v[xi * t * ci..(xi + 1) * t * ci], u, &one, None, 0, mx)
                    .run(cbs.clone(), 0..1);
            }
            // SAFETY: as above.
            unsafe {
                transform_output(
                    m,
                    g,
                    tail,
                    img,
                    dst,
                    r0..r1,
                    cbs.start * BLOCK..cbs.end * BLOCK,
                )
            };
            r0 = r1;
        }
    });
}

/// `V = Bᵀ d B` for the tiles of rows `rows`: `v[ξ][tile][c_in]`, eight channels at a time.
///
/// Compiled for AVX2 (the crate's baseline is SSE2, which halves the lanes): only called where
/// [`applies`] checked the CPU.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
fn transform_input(p: &[f32], g: &Geometry, rows: Range<usize>, v: &mut [f32]) {
    let [_, tw] = tiles(g);
    let (c, pw) = (g.cin, 2 * tw + 2);
    let t = rows.len() * tw;
    for (k, tr) in rows.enumerate() {
        for tc in 0..tw {
            let tile = k * tw + tc;
            let d: [[&[f32]; 4]; 4] = std::array::from_fn(|i| {
                std::array::from_fn(|j| &p[((2 * tr + i) * pw + 2 * tc + j) * c..][..c])
            });
            let mut store = |ch: usize, vals: &[f32], xi: usize| {
                v[(xi * t + tile) * c + ch..][..vals.len()].copy_from_slice(vals);
            };
            let mut ch = 0;
            while ch + 8 <= c {
                input_lanes::<8>(&d, ch, &mut store);
                ch += 8;
            }
            while ch < c {
                input_lanes::<1>(&d, ch, &mut store);
                ch += 1;
            }
        }
    }
}

/// One tile's transform for channels `ch..ch + L` (fixed-width lane loops, so it vectorises).
#[inline(always)]
fn input_lanes<const L: usize>(
    d: &[[&[f32]; 4]; 4],
    ch: usize,
    store: &mut impl FnMut(usize, &[f32], usize),
) {
    let mut e = [[[0.0f32; L]; 4]; 4];
    for i in 0..4 {
        for j in 0..4 {
            e[i][j].copy_from_slice(&d[i][j][ch..ch + L]);
        }
    }
    // Bᵀ d: rows d0 - d2, d1 + d2, d2 - d1, d1 - d3.
    let mut b = [[[0.0f32; L]; 4]; 4];
    for j in 0..4 {
        for l in 0..L {
            b[0][j][l] = e[0][j][l] - e[2][j][l];
            b[1][j][l] = e[1][j][l] + e[2][j][l];
            b[2][j][l] = e[2][j][l] - e[1][j][l];
            b[3][j][l] = e[1][j][l] - e[3][j][l];
        }
    }
    // (Bᵀ d) B: the same on the columns.
    for (i, r) in b.iter().enumerate() {
        let mut v = [[0.0f32; L]; 4];
        for l in 0..L {
            v[0][l] = r[0][l] - r[2][l];
            v[1][l] = r[1][l] + r[2][l];
            v[2][l] = r[2][l] - r[1][l];
            v[3][l] = r[1][l] - r[3][l];
        }
        for (j, v) in v.iter().enumerate() {
            store(ch, v, i * 4 + j);
        }
    }
}

/// `Y = Aᵀ M A` for the tiles of rows `rows`, channels `chans` (whole blocks of 16), then the
/// tail; writes the output pixels that exist (an odd size's last tile row or column is half
/// outside).
#[allow(clippy::too_many_arguments)]
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
fn transform_output(
    m: &[f32],
    g: &Geometry,
    tail: Option<&Tail>,
    img: usize,
    dst: Out,
    rows: Range<usize>,
    chans: Range<usize>,
) {
    const L: usize = 8;
    let [_, tw] = tiles(g);
    let co = g.cout;
    let t = rows.len() * tw;
    let plane = g.out_plane();
    let residual = tail
        .and_then(|t| t.residual)
        .map(|r| &r[img * plane..(img + 1) * plane]);
    let relu = tail.is_some_and(|t| t.relu);
    let zero = [0.0f32; L];
    for (k, tr) in rows.enumerate() {
        for tc in 0..tw {
            let tile = k * tw + tc;
            for ch in chans.clone().step_by(L) {
                let mut e = [[0.0f32; L]; 16];
                for (xi, e) in e.iter_mut().enumerate() {
                    e.copy_from_slice(&m[(xi * t + tile) * co + ch..][..L]);
                }
                // Aᵀ M: rows m0 + m1 + m2 and m1 - m2 - m3, then the same on the columns.
                let mut r = [[[0.0f32; L]; 4]; 2];
                for j in 0..4 {
                    for l in 0..L {
                        r[0][j][l] = e[j][l] + e[4 + j][l] + e[8 + j][l];
                        r[1][j][l] = e[4 + j][l] - e[8 + j][l] - e[12 + j][l];
                    }
                }
                let shift: [f32; L] = match tail {
                    Some(t) => t.shift[ch..ch + L].try_into().expect("L lanes"),
                    None => zero,
                };
                for (i, row) in r.iter().enumerate() {
                    let oh = 2 * tr + i;
                    let mut y = [[0.0f32; L]; 2];
                    for l in 0..L {
                        y[0][l] = row[0][l] + row[1][l] + row[2][l] + shift[l];
                        y[1][l] = row[1][l] - row[2][l] - row[3][l] + shift[l];
                    }
                    for (j, val) in y.iter_mut().enumerate() {
                        let ow = 2 * tc + j;
                        if oh >= g.oh || ow >= g.ow {
                            continue;
                        }
                        let at = (oh * g.ow + ow) * co + ch;
                        if let Some(r) = residual {
                            for (v, r) in val.iter_mut().zip(&r[at..at + L]) {
                                *v += r;
                            }
                        }
                        if relu {
                            for v in val.iter_mut() {
                                *v = v.max(0.0);
                            }
                        }
                        // SAFETY: `(oh, ow)` is a pixel of image `img` and channels
                        // `ch..ch + 8` lie in this part's blocks: no other part writes them.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                val.as_ptr(),
                                dst.0.add(img * plane + at),
                                L,
                            )
                        };
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
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
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

    /// Winograd against the direct convolution on one shape, with each part of the tail.
    fn agrees(n: usize, [cin, cout]: [usize; 2], [h, w]: [usize; 2]) {
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
