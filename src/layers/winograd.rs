//! Winograd F(4×4, 3×3) for the stride-1, ungrouped 3×3 convs that dominate the UNet and the
//! VAEs: each 4×4 output tile costs 36 multiply-adds per channel pair instead of 144, so the
//! GEMM work falls 4x, for a transform of input tiles, weights and output tiles around it
//! (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015). oneDNN, behind
//! PyTorch's CPU conv, computes these convs directly.
//!
//! Layouts keep every transform a run of slice operations over tiles (vectorised) and every
//! GEMM a plain strided product: `V[ξ][c_in][tile]`, `U[ξ][c_out][c_in]`, `O[ξ][c_out][tile]`
//! for the 36 points ξ; the 36 GEMMs `O_ξ = V_ξ · U_ξ` run in parallel. Scratch stays within
//! `conv2d::SCRATCH_BYTES` whatever the sizes: input rows are taken a band of tile rows at a
//! time, output channels a block at a time.
//!
//! The rounding differs from the direct conv's (transforms add and subtract terms up to 5x the
//! inputs): a few 1e-6 of the output's scale in f32, checked against candle's direct conv in
//! the tests.

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::conv2d::{fill_plane, Padding, Prologue, CHUNK_BYTES, SCRATCH_BYTES};

/// Output tile side, input tile side, points per tile.
const M: usize = 4;
const TILE: usize = M + 2;
const XI: usize = TILE * TILE;

/// Scratch bounds: transformed weights held at once (an output-channel block), and the input
/// band, `V` and `O` of a pass; together `conv2d::SCRATCH_BYTES`. With 8 + 16 MiB the Wan 2.1
/// decoder (384 channels × 3 stacked taps) took 53 s instead of 44 s for 5 frames at 480×832:
/// transforms redone per block and per pass.
#[derive(Clone, Copy)]
pub(super) struct Budget {
    pub weights: usize,
    pub pass: usize,
}

pub(super) const BUDGET: Budget = Budget {
    weights: SCRATCH_BYTES - CHUNK_BYTES,
    pass: CHUNK_BYTES,
};

/// Whether the Winograd path takes this conv (3×3, stride 1, one group, enough tiles that the
/// 36 GEMMs are not degenerate). `LOWTIDE_WINOGRAD=0` turns it off (the direct kernel is then
/// used everywhere, e.g. to compare).
pub(super) fn takes(k: usize, stride: usize, groups: usize, h_out: usize, w_out: usize) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("LOWTIDE_WINOGRAD").map_or(true, |v| v != "0"));
    on && k == 3 && stride == 1 && groups == 1 && h_out.div_ceil(M) * w_out.div_ceil(M) >= MIN_TILES
}

/// Below this many tiles per image the direct kernel is faster (measured on the UNet's 8×8 and
/// 4×4 levels, `cargo bench --bench shapes`). Per image, not per batch, so that a batch and its
/// slices take the same kernel and give the same numbers.
const MIN_TILES: usize = 16;

/// Raw pointer for tasks writing disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct Ptr(*mut f32);
// SAFETY: each use writes ranges no other task touches, while the buffer lives.
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

impl Ptr {
    /// Through a method, so closures capture the whole `Ptr` (Send) and not its field.
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// `out = Σ_k conv3x3(prologue(x_k), w_k) + bias + residual` for stride 1, one group: the
/// terms (conv3d's temporal taps) are stacked along the GEMMs' inner dimension, so a sum costs
/// one output transform. Every output pixel is written once, by its tile. All `x_k` are
/// `(n, c_in, h0, w0)`, all `w_k` `(c_out, c_in, 3, 3)`; sizes are validated by the caller.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    xs: &[&[f32]],
    ws: &[&[f32]],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    out: &mut [f32],
    pro: &Prologue,
    pad: Padding,
    (n, c_in, h0, w0): (usize, usize, usize, usize),
    c_out: usize,
    (h_out, w_out): (usize, usize),
    budget: Budget,
) {
    let c_in1 = c_in;
    let c_in = c_in1 * xs.len(); // the stacked inner dimension
    let (ty_n, tx_n) = (h_out.div_ceil(M), w_out.div_ceil(M));
    let cols = M * tx_n + 4; // padded input row width: the tiles read up to 4·tx_n + 2
                             // Output-channel block whose transformed weights fit the budget.
    let co_blk = (budget.weights / (XI * c_in * 4)).clamp(1, c_out);
    let blocks = c_out.div_ceil(co_blk);
    // Tile rows per pass: V and O of the pass and the padded input band within the rest.
    let per_tile_row = tx_n * XI * (c_in + co_blk) * 4 + M * cols * c_in * 4;
    let band = (budget.pass / per_tile_row).max(1);

    let passes = (n * ty_n).div_ceil(band);
    // With several passes and several blocks one transform is redone per iteration of the outer
    // loop: redo the cheaper one (input ∝ tiles·c_in, weights ∝ c_in·c_out).
    let tiles_all = n * ty_n * tx_n;
    let blocks_outer = passes > 1 && blocks > 1 && (blocks - 1) * tiles_all < (passes - 1) * c_out;
    let (outer, inner) = if blocks_outer {
        (blocks, passes)
    } else {
        (passes, blocks)
    };

    let ctx = Ctx {
        xs,
        pro,
        pad,
        x_dims: (n, c_in1, h0, w0),
        ty_n,
        tx_n,
        cols,
        band,
    };
    let mut u = Vec::<f32>::new();
    let mut v = Vec::<f32>::new();
    let mut o = Vec::<f32>::new();
    let mut inp = Vec::<f32>::new();
    let (mut u_block, mut v_pass) = (usize::MAX, usize::MAX);
    for i in 0..outer {
        for j in 0..inner {
            let (blk, pass) = if blocks_outer { (i, j) } else { (j, i) };
            let (co0, cb) = (blk * co_blk, co_blk.min(c_out - blk * co_blk));
            if u_block != blk {
                weights(ws, c_in1, co0, cb, &mut u);
                u_block = blk;
            }
            if v_pass != pass {
                ctx.input(pass, &mut v, &mut inp);
                v_pass = pass;
            }
            let (start, end) = (pass * band, ((pass + 1) * band).min(n * ty_n));
            let t_pass = (end - start) * tx_n;
            grow(&mut o, XI * cb * t_pass);
            let op = Ptr(o.as_mut_ptr());
            (0..XI).into_par_iter().for_each(|xi| {
                // SAFETY: O_ξ is this task's alone; V_ξ and U_ξ are only read.
                unsafe {
                    let dst = op.at(xi * cb * t_pass);
                    let lhs = v.as_ptr().add(xi * c_in * t_pass);
                    let rhs = u.as_ptr().add(xi * cb * c_in);
                    // O_ξ[t, co] = Σ_ci V_ξ[t, ci] · U_ξ[ci, co]; t is the vectorised dimension.
                    #[rustfmt::skip]
                    gemm(t_pass, cb, c_in, dst, t_pass as isize, 1, false,
                         lhs, t_pass as isize, 1, rhs, c_in as isize, 1,
                         0.0f32, 1.0f32, false, false, false, Parallelism::None);
                }
            });
            // Output tiles, one task per output channel (its planes are disjoint in `out`).
            let outp = Ptr(out.as_mut_ptr());
            (0..cb).into_par_iter().for_each(|c| {
                let co = co0 + c;
                let mut row = start;
                while row < end {
                    let (bi, ty0) = (row / ty_n, row % ty_n);
                    let ty1 = (ty0 + (end - row)).min(ty_n);
                    let t0 = (row - start) * tx_n;
                    let plane_len = h_out * w_out;
                    let at = (bi * c_out + co) * plane_len;
                    // SAFETY: plane (bi, co) of the output, written by this task only.
                    let dst = unsafe { std::slice::from_raw_parts_mut(outp.at(at), plane_len) };
                    let init = (
                        bias.map_or(0.0, |b| b[co]),
                        residual.map(|r| &r[at..at + plane_len]),
                    );
                    output_tiles(
                        &o,
                        |xi| (xi * cb + c) * t_pass + t0,
                        (ty0, ty1),
                        tx_n,
                        dst,
                        init,
                        (h_out, w_out),
                    );
                    row += ty1 - ty0;
                }
            });
        }
    }
}

/// What the input transform of a pass needs.
struct Ctx<'a> {
    xs: &'a [&'a [f32]],
    pro: &'a Prologue,
    pad: Padding,
    x_dims: (usize, usize, usize, usize),
    ty_n: usize,
    tx_n: usize,
    cols: usize,
    band: usize,
}

impl Ctx<'_> {
    /// `V` of pass `pass` (tile rows `pass·band..` over the batch's images in order): each
    /// image's share is read as a zero-padded band of input rows, then transformed per channel.
    fn input(&self, pass: usize, v: &mut Vec<f32>, inp: &mut Vec<f32>) {
        let (n, c1, h0, w0) = self.x_dims;
        let c_in = c1 * self.xs.len();
        let (ty_n, tx_n, cols) = (self.ty_n, self.tx_n, self.cols);
        let (start, end) = (pass * self.band, ((pass + 1) * self.band).min(n * ty_n));
        let t_pass = (end - start) * tx_n;
        // Fully overwritten (every tile of every point): grown, never cleared.
        grow(v, XI * c_in * t_pass);
        let mut row = start;
        while row < end {
            let (bi, ty0) = (row / ty_n, row % ty_n);
            let ty1 = (ty0 + (end - row)).min(ty_n);
            let rows = M * (ty1 - ty0) + 2;
            let plane = rows * cols;
            inp.clear();
            inp.resize(c_in * plane, 0.0); // padding must be zeros
                                           // Stacked channel k·c1 + ci is channel ci of term k.
            inp.par_chunks_mut(plane).enumerate().for_each(|(p, dst)| {
                let (k, ci) = (p / c1, p % c1);
                let x_b = &self.xs[k][bi * c1 * h0 * w0..(bi + 1) * c1 * h0 * w0];
                #[rustfmt::skip]
                fill_plane(dst, cols, rows, x_b, ci, (h0, w0), self.pro, bi * c1 + ci, self.pad, 1, (0, 0), M * ty0);
            });
            let t0 = (row - start) * tx_n;
            let vp = Ptr(v.as_mut_ptr());
            let tiles = (ty1 - ty0) * tx_n;
            inp.par_chunks(plane).enumerate().for_each(|(ci, src)| {
                // SAFETY: channel ci's tiles t0..t0 + tiles of every ξ: disjoint across tasks.
                let mut dst: Vec<&mut [f32]> = (0..XI)
                    .map(|xi| unsafe {
                        std::slice::from_raw_parts_mut(vp.at((xi * c_in + ci) * t_pass + t0), tiles)
                    })
                    .collect();
                input_tiles(src, cols, ty1 - ty0, tx_n, &mut dst);
            });
            row += ty1 - ty0;
        }
    }
}

/// Makes `v` at least `len` long, keeping (not zeroing) what it holds.
fn grow(v: &mut Vec<f32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0.0);
    }
}

/// `U[ξ][c][k·c1 + ci] = (G w_k[co0 + c, ci] Gᵀ)[ξ]` for output channels `co0..co0 + cb`,
/// vectorised over the stacked input channels.
fn weights(ws: &[&[f32]], c1: usize, co0: usize, cb: usize, u: &mut Vec<f32>) {
    let c_in = c1 * ws.len();
    grow(u, XI * cb * c_in); // fully overwritten
    let up = Ptr(u.as_mut_ptr());
    let scratch = || (vec![vec![0f32; c_in]; 9], vec![vec![0f32; c_in]; TILE * 3]);
    (0..cb).into_par_iter().for_each_init(scratch, |(g, t), c| {
        // g[ky·3 + kx][ci], then t = G g (t[a·3 + kx]), then U = t Gᵀ.
        for (k, w) in ws.iter().enumerate() {
            let w = &w[(co0 + c) * c1 * 9..][..c1 * 9];
            for (ci, taps) in w.chunks_exact(9).enumerate() {
                for (gt, &x) in g.iter_mut().zip(taps) {
                    gt[k * c1 + ci] = x;
                }
            }
        }
        for kx in 0..3 {
            g_rows([&g[kx], &g[3 + kx], &g[6 + kx]], pick(t, kx, 3, 0..c_in));
        }
        for a in 0..TILE {
            // SAFETY: U[a·6 + b][c][..] for this task's c only.
            let o = std::array::from_fn(|b| unsafe {
                std::slice::from_raw_parts_mut(up.at(((a * TILE + b) * cb + c) * c_in), c_in)
            });
            g_rows([&t[a * 3], &t[a * 3 + 1], &t[a * 3 + 2]], o);
        }
    });
}

/// The six rows of `G · [z0 z1 z2]ᵀ` (each z a vector) into `o`.
fn g_rows(z: [&[f32]; 3], o: [&mut [f32]; 6]) {
    const S6: f32 = 1.0 / 6.0;
    const S12: f32 = 1.0 / 12.0;
    const S24: f32 = 1.0 / 24.0;
    let n = o[0].len();
    let [z0, z1, z2] = z.map(|v| &v[..n]);
    let [o0, o1, o2, o3, o4, o5] = o.map(|v| &mut v[..n]);
    for i in 0..n {
        let (a, b, c) = (z0[i], z1[i], z2[i]);
        let (ac, ac24) = (a + c, a * S24 + c * S6);
        o0[i] = a * 0.25;
        o1[i] = -(ac + b) * S6;
        o2[i] = (b - ac) * S6;
        o3[i] = ac24 + b * S12;
        o4[i] = ac24 - b * S12;
        o5[i] = c;
    }
}

/// `Bᵀ z` for six vectors (one input tile's rows or columns, across tiles) into `o`.
#[inline(always)]
fn bt(z: [&[f32]; 6], o: [&mut [f32]; 6]) {
    let n = o[0].len();
    let [z0, z1, z2, z3, z4, z5] = z.map(|v| &v[..n]);
    let [o0, o1, o2, o3, o4, o5] = o.map(|v| &mut v[..n]);
    for i in 0..n {
        let (a0, a1, a2, a3, a4, a5) = (z0[i], z1[i], z2[i], z3[i], z4[i], z5[i]);
        o0[i] = 4.0 * a0 - 5.0 * a2 + a4;
        o1[i] = -4.0 * (a1 + a2) + a3 + a4;
        o2[i] = 4.0 * (a1 - a2) - a3 + a4;
        o3[i] = 2.0 * (a3 - a1) + a4 - a2;
        o4[i] = 2.0 * (a1 - a3) + a4 - a2;
        o5[i] = 4.0 * a1 - 5.0 * a3 + a5;
    }
}

/// Six disjoint mutable slices `v[first + k·step][range]`, k = 0..6 (or the first four).
fn pick<const K: usize>(
    v: &mut [Vec<f32>],
    first: usize,
    step: usize,
    range: std::ops::Range<usize>,
) -> [&mut [f32]; K] {
    let mut it = v.iter_mut().skip(first).step_by(step);
    std::array::from_fn(|_| &mut it.next().expect("index in range")[range.clone()])
}

/// Input tiles of one channel's padded band (`4·tile_rows + 2` rows of `cols = 4·tx_n + 4`)
/// into `dst[ξ]`, each `tile_rows · tx_n` tiles in row-major tile order.
fn input_tiles(src: &[f32], cols: usize, tile_rows: usize, tx_n: usize, dst: &mut [&mut [f32]]) {
    // Per input row: its 4 column phases (phase q holds columns 4j + q), so a tile's columns
    // 0..6 are phases 0..4 at j and phases 0..2 at j + 1 — six contiguous vectors over tiles.
    let mut ph = vec![vec![0f32; tx_n + 1]; 4];
    let mut h = vec![vec![0f32; tx_n]; XI]; // rows transformed along columns: h[r·6 + b]
    for ty in 0..tile_rows {
        for r in 0..TILE {
            let line = &src[(M * ty + r) * cols..][..cols];
            for (q, p) in ph.iter_mut().enumerate() {
                for (o, &x) in p.iter_mut().zip(line[q..].iter().step_by(4)) {
                    *o = x;
                }
            }
            let z = [
                &ph[0][..tx_n],
                &ph[1][..tx_n],
                &ph[2][..tx_n],
                &ph[3][..tx_n],
                &ph[0][1..],
                &ph[1][1..],
            ];
            bt(z, pick(&mut h, r * TILE, 1, 0..tx_n));
        }
        // Along rows: for each transformed column b, Bᵀ over the six rows.
        let rows = ty * tx_n..(ty + 1) * tx_n;
        for b in 0..TILE {
            let z = std::array::from_fn(|r| &h[r * TILE + b][..]);
            let mut it = dst.iter_mut().skip(b).step_by(TILE);
            let o = std::array::from_fn(|_| &mut it.next().expect("36 points")[rows.clone()]);
            bt(z, o);
        }
    }
}

/// `Aᵀ z` for six vectors into `o`.
#[inline(always)]
fn at(z: [&[f32]; 6], o: [&mut [f32]; 4]) {
    let n = o[0].len();
    let [z0, z1, z2, z3, z4, z5] = z.map(|v| &v[..n]);
    let [o0, o1, o2, o3] = o.map(|v| &mut v[..n]);
    for i in 0..n {
        let (a0, a1, a2, a3, a4, a5) = (z0[i], z1[i], z2[i], z3[i], z4[i], z5[i]);
        let (s12, d12, s34, d34) = (a1 + a2, a1 - a2, a3 + a4, a3 - a4);
        o0[i] = a0 + s12 + s34;
        o1[i] = d12 + 2.0 * d34;
        o2[i] = s12 + 4.0 * s34;
        o3[i] = d12 + 8.0 * d34 + a5;
    }
}

/// Writes the output tiles of tile rows `ty0..ty1` (point ξ of tile row `ty`, column tile `tx`
/// at `o[at_xi(ξ) + (ty - ty0)·tx_n + tx]`) plus the bias and the residual's plane into one
/// output plane, dropping what lies outside it.
fn output_tiles(
    o: &[f32],
    at_xi: impl Fn(usize) -> usize,
    (ty0, ty1): (usize, usize),
    tx_n: usize,
    dst: &mut [f32],
    (bias, residual): (f32, Option<&[f32]>),
    (h_out, w_out): (usize, usize),
) {
    let mut v = vec![vec![0f32; tx_n]; M * TILE]; // Aᵀ along rows: v[b·4 + a]
    let mut y = vec![vec![0f32; tx_n]; M];
    for ty in ty0..ty1 {
        let base = (ty - ty0) * tx_n;
        for b in 0..TILE {
            let z = std::array::from_fn(|r| &o[at_xi(r * TILE + b) + base..][..tx_n]);
            at(z, pick(&mut v, b * M, 1, 0..tx_n));
        }
        for a in 0..M {
            let oy = M * ty + a;
            if oy >= h_out {
                break;
            }
            let z = std::array::from_fn(|b| &v[b * M + a][..]);
            at(z, pick(&mut y, 0, 1, 0..tx_n));
            let line = &mut dst[oy * w_out..(oy + 1) * w_out];
            let y = &y[..M.min(w_out)]; // columns past a narrow image's edge
            match residual {
                Some(r) => {
                    let r = &r[oy * w_out..(oy + 1) * w_out];
                    for (bx, yb) in y.iter().enumerate() {
                        let lr = line[bx..]
                            .iter_mut()
                            .step_by(M)
                            .zip(r[bx..].iter().step_by(M));
                        for ((d, &rv), &val) in lr.zip(yb) {
                            *d = val + bias + rv;
                        }
                    }
                }
                None => {
                    for (bx, yb) in y.iter().enumerate() {
                        for (d, &val) in line[bx..].iter_mut().step_by(M).zip(yb) {
                            *d = val + bias;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::layers::max_abs;
    use crate::rng::TorchRng;

    /// candle's ops composed: prologue, padding, conv, bias, residual.
    fn reference(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        pro: &Prologue,
        pad: Padding,
        res: Option<&Tensor>,
    ) -> Tensor {
        let y = crate::layers::compose_prologue(x, pro).unwrap();
        let y = y
            .pad_with_zeros(2, pad.top, pad.bottom)
            .unwrap()
            .pad_with_zeros(3, pad.left, pad.right)
            .unwrap()
            .conv2d(w, 0, 1, 1, 1)
            .unwrap();
        let c = w.dim(0).unwrap();
        let y = y.broadcast_add(&b.reshape((1, c, 1, 1)).unwrap()).unwrap();
        match res {
            Some(r) => (y + r).unwrap(),
            None => y,
        }
    }

    /// Random sizes (edges that are not whole tiles, one-pixel images), paddings, prologues and
    /// residuals, under budgets that force many passes and weight blocks in both loop orders,
    /// against candle's direct conv.
    #[test]
    fn matches_candle_on_random_cases() {
        let mut rng = TorchRng::new(11);
        let mut pick = |lo: usize, hi: usize| crate::layers::pick(&mut rng, lo, hi);
        let dev = Device::Cpu;
        let mut orders = [false, false];
        let mut worst = 0f32;
        for case in 0..60 {
            let (n, c_in, c_out) = (pick(1, 3), pick(1, 24), pick(1, 24));
            let (h, w) = (pick(1, 23), pick(1, 30));
            let pad = Padding {
                top: pick(0, 2),
                bottom: pick(0, 2),
                left: pick(0, 2),
                right: pick(0, 2),
            };
            let u = [1, 1, 2][pick(0, 2)];
            let (hp, wp) = (h * u + pad.top + pad.bottom, w * u + pad.left + pad.right);
            if hp < 3 || wp < 3 {
                continue;
            }
            let (h_out, w_out) = (hp - 2, wp - 2);
            let x = Tensor::randn(0f32, 1.0, (n, c_in, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.3, (c_out, c_in, 3, 3), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.3, c_out, &dev).unwrap();
            let pro = Prologue {
                affine: (pick(0, 1) == 1).then(|| {
                    let a = (0..n * c_in).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
                    let s = (0..n * c_in).map(|i| (i % 5) as f32 * 0.05 - 0.1).collect();
                    (a, s)
                }),
                silu: pick(0, 1) == 1,
                upsample: u,
            };
            let res = (pick(0, 1) == 1)
                .then(|| Tensor::randn(0f32, 1.0, (n, c_out, h_out, w_out), &dev).unwrap());
            let want = reference(&x, &wt, &b, &pro, pad, res.as_ref());
            // Budgets from "everything at once" down to one tile row and one channel per step.
            let budget = [
                BUDGET,
                Budget {
                    weights: XI * c_in * 4 * pick(1, 3),
                    pass: 1 << pick(8, 16),
                },
            ][case % 2];
            let co_blk = (budget.weights / (XI * c_in * 4)).clamp(1, c_out);
            let (tx, cols) = (w_out.div_ceil(M), M * w_out.div_ceil(M) + 4);
            let per = tx * XI * (c_in + co_blk) * 4 + M * cols * c_in * 4;
            let passes = (n * h_out.div_ceil(M)).div_ceil((budget.pass / per).max(1));
            if passes > 1 && c_out > co_blk {
                let tiles = n * h_out.div_ceil(M) * tx;
                orders[usize::from((c_out.div_ceil(co_blk) - 1) * tiles < (passes - 1) * c_out)] =
                    true;
            }
            let mut out = vec![f32::NAN; n * c_out * h_out * w_out];
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let ws = wt.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bs = b.to_vec1::<f32>().unwrap();
            let rs = res.map(|r| r.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            #[rustfmt::skip]
            run(&[&xs], &[&ws], Some(&bs), rs.as_deref(), &mut out, &pro, pad, (n, c_in, h, w), c_out,
                (h_out, w_out), budget);
            let got = Tensor::from_vec(out, want.dims(), &dev).unwrap();
            let d = max_abs(&(&got - &want).unwrap());
            let scale = max_abs(&want).max(1.0);
            worst = worst.max(d / scale / (c_in as f32).sqrt());
            assert!(
                d <= 1e-5 * scale * (c_in as f32).sqrt(),
                "case {case}: n{n} {c_in}->{c_out} {h}x{w} up{u} {pad:?}: {d} of {scale}"
            );
        }
        assert!(orders[0] && orders[1], "both loop orders ran: {orders:?}");
        eprintln!("worst error / scale / sqrt(c_in): {worst:e}");
    }

    /// The dispatch: only 3×3, stride 1, one group, and at least 16 tiles per image.
    #[test]
    fn takes_only_what_it_computes() {
        assert!(takes(3, 1, 1, 16, 16));
        assert!(!takes(3, 1, 1, 8, 8));
        assert!(!takes(3, 2, 1, 64, 64));
        assert!(!takes(3, 1, 2, 64, 64));
        assert!(!takes(1, 1, 1, 64, 64));
    }
}
