//! Scaled dot-product attention over (…, seq, head_dim): `softmax(scale·q·kᵀ + mask)·v`.
//!
//! On CPU a flash-style kernel (any float dtype, computed in f32): each task takes one
//! (batch·head, query tile) and walks the keys tile by tile, keeping per query row a running
//! maximum `m` and sum `l` of `exp(score - m)` and rescaling its output rows whenever `m` grows
//! (the online softmax), so the `Lq × Lk` score matrix never exists; the scratch is one
//! `TILE_Q × TILE_K` score tile per worker, whatever the sequence lengths. The two products of a
//! tile go through `gemm`; the exponentials through a polynomial `exp` compiled for AVX-512 and
//! AVX2 and chosen at run time. Other devices use the composed candle ops ([`attention_chunked`]).

use candle_core::{DType, Device, Tensor, D};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::simd::{exp, madd, Isa};
use super::with_cpu_f32;
use crate::error::{Error, Result};

/// Queries per task, a multiple of the vector lanes.
const TILE_Q: usize = 128;

/// Keys per step. The working set of a step, the query tile (transposed), the score tile
/// (`TILE_K × TILE_Q`), the output rows and the K and V tiles it reads, stays within a core's
/// L2 cache up to head size 128 (and 2 MiB at the VAE's 512); measured on Sapphire Rapids, 64 or
/// 128 queries and 128 to 512 keys are all within a few percent.
const TILE_K: usize = 256;

/// Scaled dot-product attention over (batch, heads, seq, head_dim), softmax in f32.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    attention_scaled(q, k, v, mask, scale)
}

/// [`attention`] with an explicit score scale (T5 does not scale its scores: pass 1.0). `mask`
/// is added to the scores (an additive bias, e.g. T5's relative position bias) and broadcasts to
/// (batch, heads, q_len, k_len).
pub fn attention_scaled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    if matches!(q.device(), Device::Cpu) {
        crate::profile::span(
            || format!("attention q {:?} k {:?}", q.dims(), k.dims()),
            || attention_flash(q, k, v, mask, scale),
        )
    } else {
        attention_chunked(q, k, v, mask, scale)
    }
}

/// The flash kernel (CPU tensors only): the same result as [`attention_chunked`] up to float
/// rounding.
pub fn attention_flash(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    flash_with(Isa::detect(), super::sgemm::amx_on(), q, k, v, mask, scale)
}

/// [`attention_flash`] with its softmax compiled for `isa` (tests run every variant), its
/// products in bf16x3 on AMX when `bf16x3` (precision `High`; AMX checked by the caller).
fn flash_with(
    isa: Isa,
    bf16x3: bool,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let rank = q.rank();
    if rank < 2 || k.rank() != rank || v.rank() != rank {
        return Err(Error::InvalidArgument(format!(
            "attention: q, k, v must have one rank of at least 2, got {:?}, {:?}, {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let lead = &q.dims()[..rank - 2];
    let (lq, d) = (q.dims()[rank - 2], q.dims()[rank - 1]);
    let (lk, dv) = (k.dims()[rank - 2], v.dims()[rank - 1]);
    if &k.dims()[..rank - 2] != lead
        || &v.dims()[..rank - 2] != lead
        || k.dims()[rank - 1] != d
        || v.dims()[rank - 2] != lk
    {
        return Err(Error::InvalidArgument(format!(
            "attention: shapes do not fit: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    for t in [k, v].into_iter().chain(mask) {
        if !matches!(t.device(), Device::Cpu) {
            return Err(Error::InvalidArgument(
                "attention: the CPU kernel needs q, k, v and the mask on the CPU".into(),
            ));
        }
    }
    let mut out_dims = q.dims().to_vec();
    out_dims[rank - 1] = dv;
    let dtype = q.dtype();
    let bh: usize = lead.iter().product();
    let f32s = |t: &Tensor| t.to_dtype(DType::F32);
    let (q, k, v) = (f32s(q)?, f32s(k)?, f32s(v)?);
    let mask = mask.map(f32s).transpose()?;
    let dims = Dims {
        bh,
        lq,
        lk,
        d,
        dv,
        scale: scale as f32,
        isa,
        bf16x3,
    };
    let out = with_cpu_f32(&q, |qs| {
        with_cpu_f32(&k, |ks| {
            with_cpu_f32(&v, |vs| match &mask {
                Some(m) => {
                    let (storage, layout) = m.storage_and_layout();
                    let candle_core::Storage::Cpu(cpu) = &*storage else {
                        unreachable!("checked above: the mask is on the CPU")
                    };
                    let bias = BiasLayout::new(m.dims(), layout, lead, lq, lk)?;
                    Ok(flash(&dims, qs, ks, vs, Some((cpu.as_slice()?, &bias))))
                }
                None => Ok(flash(&dims, qs, ks, vs, None)),
            })
        })
    })?;
    Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?.to_dtype(dtype)?)
}

/// One call: `bh` (batch·heads) independent problems of `lq` queries and `lk` keys, the score
/// scale and the softmax's instruction set.
struct Dims {
    bh: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
    scale: f32,
    isa: Isa,
    bf16x3: bool,
}

/// Where a mask broadcast to (lead…, lq, lk) keeps element (i, r, c) of problem i: at
/// `bases[i] + r·row + c·col` of its storage, read in place through its own strides, 0 along
/// broadcast dims. A causal (1, 1, L, L) mask, T5's (1, H, L, L) bias or an expanded view is
/// never materialised per head or batch.
struct BiasLayout {
    bases: Vec<usize>,
    row: usize,
    col: usize,
}

impl BiasLayout {
    fn new(
        mask: &[usize],
        layout: &candle_core::Layout,
        lead: &[usize],
        lq: usize,
        lk: usize,
    ) -> Result<Self> {
        let out: Vec<usize> = lead.iter().copied().chain([lq, lk]).collect();
        if mask.len() > out.len() {
            return Err(Error::InvalidArgument(format!(
                "attention: mask of shape {mask:?} does not broadcast to {out:?}"
            )));
        }
        // Right-aligned, as broadcasting does; missing leading dims read element 0.
        let pad = out.len() - mask.len();
        let mut strides = vec![0; out.len()];
        for (i, (&m, &st)) in mask.iter().zip(layout.stride()).enumerate() {
            if m != 1 && m != out[pad + i] {
                return Err(Error::InvalidArgument(format!(
                    "attention: mask of shape {mask:?} does not broadcast to {out:?}"
                )));
            }
            strides[pad + i] = if m == 1 { 0 } else { st };
        }
        let n = lead.len();
        let bases = (0..lead.iter().product())
            .map(|mut i: usize| {
                let mut base = layout.start_offset();
                for j in (0..n).rev() {
                    base += (i % lead[j]) * strides[j];
                    i /= lead[j];
                }
                base
            })
            .collect();
        Ok(Self {
            bases,
            row: strides[n],
            col: strides[n + 1],
        })
    }
}

/// The mask rows of one tile: row r, key c at `data[start + r·row + c·col]`.
#[derive(Clone, Copy)]
struct TileBias<'a> {
    data: &'a [f32],
    start: usize,
    row: usize,
    col: usize,
}

/// The whole attention, `bh × lq × dv` values.
fn flash(
    dims: &Dims,
    qs: &[f32],
    ks: &[f32],
    vs: &[f32],
    mask: Option<(&[f32], &BiasLayout)>,
) -> Vec<f32> {
    let &Dims {
        bh,
        lq,
        lk,
        d,
        dv,
        scale,
        isa,
        bf16x3,
    } = dims;
    let mut out = vec![0f32; bh * lq * dv];
    if lk == 0 || lq == 0 || dv == 0 {
        // No keys: the product with an empty V is zero, as the composed path gives.
        return out;
    }
    // One task per (problem, query tile), each owning its rows of the output.
    let mut tasks = Vec::with_capacity(bh * lq.div_ceil(TILE_Q));
    let mut rest = out.as_mut_slice();
    for i in 0..bh {
        for q0 in (0..lq).step_by(TILE_Q) {
            let rows = TILE_Q.min(lq - q0);
            let (o, r) = std::mem::take(&mut rest).split_at_mut(rows * dv);
            rest = r;
            tasks.push((i, q0, o));
        }
    }
    tasks.into_par_iter().for_each(|(i, q0, o)| {
        let rows = o.len() / dv;
        let q = &qs[(i * lq + q0) * d..][..rows * d];
        let k = &ks[i * lk * d..][..lk * d];
        let v = &vs[i * lk * dv..][..lk * dv];
        let bias = mask.map(|(data, lay)| TileBias {
            data,
            start: lay.bases[i] + q0 * lay.row,
            row: lay.row,
            col: lay.col,
        });
        SCRATCH.with(|cell| {
            // A task never runs inside another on its thread (nothing in it waits on rayon),
            // so the borrow is free; a fresh scratch would do if it were not.
            let mut fresh = None;
            let mut held = cell.try_borrow_mut().ok();
            let sc = match held.as_deref_mut() {
                Some(sc) => sc,
                None => fresh.insert(Scratch::default()),
            };
            sc.fit(d);
            #[cfg(target_arch = "x86_64")]
            if bf16x3 && dv <= AMX_MAX_HEAD && lk >= AMX_MIN_KEYS {
                // SAFETY: AMX is available (the caller's `amx_on`); the slices hold the shapes.
                let shapes = (rows, lk, d, dv);
                return unsafe { query_tile_amx(isa, sc, q, k, v, bias, o, shapes, scale) };
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = bf16x3;
            query_tile(isa, sc, q, k, v, bias, o, (rows, lk, d, dv), scale);
        });
    });
    out
}

thread_local! {
    /// Each worker's scratch, kept between calls so that no call pays for fresh pages.
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// A worker's scratch, all O(tile): the query tile transposed and scaled (d × ld, ld = rows
/// rounded up to the vector lanes, zero padded), the score tile stored key-major (kn × ld: the
/// scores of one key for all the tile's queries are contiguous), and per query the running max,
/// the running sum and the rescale factor of the current step.
#[derive(Default)]
struct Scratch {
    qt: Vec<f32>,
    s: Vec<f32>,
    stats: Stats,
    /// Under bf16x3 ([`query_tile_amx`]): the packed Qᵀ, K tile, P tile and V tile.
    packed: [Vec<u16>; 4],
}

impl Scratch {
    /// Sizes the buffers for head size `d` (about 170 KiB at d = 64, 390 KiB at the VAE's 512).
    fn fit(&mut self, d: usize) {
        self.qt.resize(d * TILE_Q, 0.0);
        self.s.resize(TILE_K * TILE_Q, 0.0);
        let st = &mut self.stats;
        for v in [&mut st.m, &mut st.l, &mut st.alpha, &mut st.mx, &mut st.sum] {
            v.resize(TILE_Q, 0.0);
        }
    }
}

impl Scratch {
    /// Starts a query tile of `rows` queries of size `d`: Qᵀ·scale into `qt` (`ld` per row of
    /// Qᵀ, padded to the vector width with zeros) and fresh softmax statistics; returns `ld`.
    fn start(&mut self, q: &[f32], (rows, d): (usize, usize), scale: f32) -> usize {
        let ld = rows.next_multiple_of(LANES);
        let qt = &mut self.qt[..d * ld];
        qt.fill(0.0);
        for (i, qrow) in q.chunks_exact(d).enumerate() {
            for (kk, &x) in qrow.iter().enumerate() {
                // (q·scale)·kᵀ as the composed path computes it.
                qt[kk * ld + i] = x * scale;
            }
        }
        self.stats.start(ld);
        ld
    }
}

/// A query tile's running softmax statistics (see [`Step`]), one value per query.
#[derive(Default)]
struct Stats {
    m: Vec<f32>,
    l: Vec<f32>,
    alpha: Vec<f32>,
    mx: Vec<f32>,
    sum: Vec<f32>,
}

impl Stats {
    /// Before the first key tile of `ld` queries.
    fn start(&mut self, ld: usize) {
        self.m[..ld].fill(f32::NEG_INFINITY);
        self.l[..ld].fill(0.0);
    }

    /// The softmax step over key tile `j0`'s scores `s` (key-major, `ld` per key), then the
    /// rescale of the first `rows` rows of the output accumulated so far (`o`, row length `dv`).
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        isa: Isa,
        s: &mut [f32],
        (ld, rows): (usize, usize),
        bias: Option<TileBias>,
        j0: usize,
        o: &mut [f32],
        dv: usize,
    ) {
        let bias = bias.map(|b| TileBias {
            start: b.start + j0 * b.col,
            ..b
        });
        softmax_step(
            isa,
            Step {
                s,
                ld,
                rows,
                bias,
                m: &mut self.m[..ld],
                l: &mut self.l[..ld],
                alpha: &mut self.alpha[..ld],
                mx: &mut self.mx[..ld],
                sum: &mut self.sum[..ld],
                first: j0 == 0,
            },
        );
        if j0 > 0 {
            for (orow, &a) in o.chunks_exact_mut(dv).zip(&self.alpha[..rows]) {
                if a != 1.0 {
                    orow.iter_mut().for_each(|x| *x *= a);
                }
            }
        }
    }

    /// Divides the first `rows` output rows by their sums. A row whose every key is masked has
    /// l = 0 and gives NaN, as the composed softmax.
    fn finish(&self, o: &mut [f32], rows: usize, dv: usize) {
        for (orow, &l) in o.chunks_exact_mut(dv).zip(&self.l[..rows]) {
            for x in orow {
                *x /= l;
            }
        }
    }
}

/// One query tile against all keys: `o` (rows × dv) receives the normalised output.
///
/// Both products are laid out so that `gemm` reads its left operand with unit row stride and
/// packs nothing element by element: Qᵀ is built once per query tile, S is written key-major,
/// and P·V reads S as it lies. Key-major scores also make the softmax's per-query max and sum
/// element-wise vector operations across queries rather than horizontal reductions.
#[allow(clippy::too_many_arguments)]
fn query_tile(
    isa: Isa,
    sc: &mut Scratch,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: Option<TileBias>,
    o: &mut [f32],
    (rows, lk, d, dv): (usize, usize, usize, usize),
    scale: f32,
) {
    let ld = sc.start(q, (rows, d), scale);
    let qt = &sc.qt[..d * ld];
    let mut j0 = 0;
    while j0 < lk {
        let kn = TILE_K.min(lk - j0);
        let s = &mut sc.s[..kn * ld];
        // SAFETY: every pointer covers the matrix it describes: S(i, j) at j·ld + i (ld × kn)
        // in the scratch; Qᵀ read as Q (ld × d, Q(i, c) at c·ld + i) in the scratch; K's tile
        // read as Kᵀ (d × kn, Kᵀ(c, j) at (j0 + j)·d + c) inside `k`; no other thread touches
        // the scratch. gemm(m, n, k, dst, dst_cs, dst_rs, read_dst, lhs, lhs_cs, lhs_rs, rhs,
        // rhs_cs, rhs_rs, alpha, beta, conj.., par) computes dst = alpha·dst + beta·lhs·rhs.
        unsafe {
            #[rustfmt::skip]
            gemm(ld, kn, d, s.as_mut_ptr(), ld as isize, 1, false,
                 qt.as_ptr(), ld as isize, 1, k.as_ptr().add(j0 * d), d as isize, 1,
                 0.0f32, 1.0f32, false, false, false, Parallelism::None);
        }
        sc.stats.step(isa, s, (ld, rows), bias, j0, o, dv);
        // SAFETY: O is rows × dv (row stride dv) inside `o`, which only this task writes; P is
        // the score tile, P(i, j) at j·ld + i; V's tile is kn × dv inside `v`.
        unsafe {
            #[rustfmt::skip]
            gemm(rows, dv, kn, o.as_mut_ptr(), 1, dv as isize, j0 > 0,
                 s.as_ptr(), ld as isize, 1, v.as_ptr().add(j0 * dv), 1, dv as isize,
                 1.0f32, 1.0f32, false, false, false, Parallelism::None);
        }
        j0 += kn;
    }
    sc.stats.finish(o, rows, dv);
}

/// Value head sizes up to this take the bf16x3 kernel under precision `High`.
#[cfg(target_arch = "x86_64")]
const AMX_MAX_HEAD: usize = 1024;

/// Fewer keys than this stay on f32 even under `High`: the tiles' packing costs more than it
/// saves (the UNet's 77-token cross-attention: 1.43 → 1.62 ms; 256 keys: 1.56 → 1.15 ms).
#[cfg(target_arch = "x86_64")]
const AMX_MIN_KEYS: usize = 128;

/// [`query_tile`] with both products in bf16x3 on the AMX tile unit (precision `High`): S =
/// K·(scale·Q)ᵀ key-major as the softmax wants it, then O += P·V; Qᵀ is packed once per query
/// tile, K, P and V once per key tile.
///
/// # Safety
/// AMX is available; `q`, `k`, `v`, `o` hold rows × d, lk × d, lk × dv, rows × dv.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn query_tile_amx(
    isa: Isa,
    sc: &mut Scratch,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: Option<TileBias>,
    o: &mut [f32],
    (rows, lk, d, dv): (usize, usize, usize, usize),
    scale: f32,
) {
    use super::amx::{self, TILE};
    let ld = sc.start(q, (rows, d), scale);
    let qt = &sc.qt[..d * ld];
    // Packed sizes: groups of 16 (rows or columns, rounded up to 32) × K steps × (hi, lo).
    let size = |mn: usize, kk: usize| mn.div_ceil(32) * 2 * kk.div_ceil(32) * 2 * TILE;
    let [bq, ak, ap, bv] = &mut sc.packed;
    let (bq, ak) = (
        amx::aligned(bq, size(ld, d)),
        amx::aligned(ak, size(TILE_K, d)),
    );
    let (ap, bv) = (
        amx::aligned(ap, size(rows, TILE_K)),
        amx::aligned(bv, size(dv, TILE_K)),
    );
    // Column-group flags for `blocks` (up to AMX_MAX_HEAD columns): activations, so never the
    // exact-weights shortcut.
    let exact = [false; AMX_MAX_HEAD / 16];
    amx::configure();
    let steps_d = d.div_ceil(32);
    for g in 0..ld.div_ceil(32) * 2 {
        let cols = 16.min(ld.saturating_sub(g * 16));
        let dst = bq.add(g * steps_d * 2 * TILE);
        amx::pack_b_rows(qt.as_ptr().wrapping_add(g * 16), ld, cols, d, dst);
    }
    let mut none = |_: *mut f32, _: usize, _: usize, _: usize| {};
    let mut j0 = 0;
    while j0 < lk {
        let kn = TILE_K.min(lk - j0);
        let s = &mut sc.s[..kn * ld];
        for g in 0..kn.div_ceil(32) * 2 {
            let r = 16.min(kn.saturating_sub(g * 16));
            let src = k.as_ptr().wrapping_add((j0 + g * 16) * d);
            amx::pack_a(src, d, r, d, ak.add(g * steps_d * 2 * TILE));
        }
        let c = (s.as_mut_ptr(), ld);
        amx::blocks(ak, bq, steps_d, (kn, ld), c, true, &exact, &mut none);
        sc.stats.step(isa, s, (ld, rows), bias, j0, o, dv);
        let steps_k = kn.div_ceil(32);
        for g in 0..rows.div_ceil(32) * 2 {
            let r = 16.min(rows.saturating_sub(g * 16));
            let src = s.as_ptr().wrapping_add(g * 16);
            amx::pack_a_cols(src, ld, r, kn, ap.add(g * steps_k * 2 * TILE));
        }
        for g in 0..dv.div_ceil(32) * 2 {
            let cols = 16.min(dv.saturating_sub(g * 16));
            let src = v.as_ptr().wrapping_add(j0 * dv + g * 16);
            amx::pack_b_rows(src, dv, cols, kn, bv.add(g * steps_k * 2 * TILE));
        }
        let c = (o.as_mut_ptr(), dv);
        amx::blocks(ap, bv, steps_k, (rows, dv), c, j0 == 0, &exact, &mut none);
        j0 += kn;
    }
    amx::release();
    sc.stats.finish(o, rows, dv);
}

/// One online-softmax step over a key-major score tile (kn keys × ld queries, row stride ld).
struct Step<'a> {
    s: &'a mut [f32],
    ld: usize,
    /// Real queries (the rest up to ld are padding: computed, never read back).
    rows: usize,
    bias: Option<TileBias<'a>>,
    m: &'a mut [f32],
    l: &'a mut [f32],
    /// Out: the factor by which each query's output so far must be rescaled.
    alpha: &'a mut [f32],
    /// Scratch: the new maxima and the tile's sums.
    mx: &'a mut [f32],
    sum: &'a mut [f32],
    first: bool,
}

// The softmax step, compiled for each ISA and chosen at run time (`isa.softmax_tile(st)`
// below becomes `softmax_step(isa, st)`).
super::simd::isa_kernel!(fn softmax_step(st: Step<'_>) => softmax_tile);

/// The tile's query count is padded to a multiple of this (AVX-512's f32 lanes), so that `gemm`
/// takes the transposed query tile as it lies.
const LANES: usize = 16;
const _: () = assert!(TILE_Q.is_multiple_of(LANES));

/// The online-softmax step: adds the mask, updates each query's running max `m` and sum `l`,
/// replaces the scores by `exp(score - m)` (the P of P·V) and sets `alpha`, the rescale of the
/// output accumulated so far. Inlined into each ISA's wrapper, where its loops along the queries
/// vectorise for that ISA; `FMA` where the ISA has fused multiply-add (elsewhere `mul_add` would
/// be a library call).
#[inline(always)]
fn softmax_tile<const FMA: bool>(st: Step) {
    let Step {
        s,
        ld,
        rows,
        bias,
        m,
        l,
        alpha,
        mx,
        sum,
        first,
    } = st;
    if let Some(b) = bias {
        for (j, col) in s.chunks_exact_mut(ld).enumerate() {
            let at = b.start + j * b.col;
            if b.row == 0 {
                let c = b.data[at];
                col[..rows].iter_mut().for_each(|x| *x += c);
            } else {
                let src = b.data[at..].iter().step_by(b.row);
                col[..rows].iter_mut().zip(src).for_each(|(x, &c)| *x += c);
            }
        }
    }
    // Loops run along the queries of one key, contiguous in the tile, keeping the per-query
    // state in small arrays: each is then a plain vector loop. (Blocks of queries held in
    // registers across keys were compiled with shuffles instead.) `a > b` selects rather than
    // `f32::max`, which adds NaN fix-ups; NaN scores are skipped here and come out as NaN
    // through exp.
    let max = |a: f32, b: f32| if b > a { b } else { a };
    mx.copy_from_slice(m);
    for c in s.chunks_exact(ld) {
        for (x, &v) in mx.iter_mut().zip(c) {
            *x = max(*x, v);
        }
    }
    // Nothing but masked keys so far: subtract 0, so exp(-inf) = 0 rather than NaN.
    for (b, &x) in alpha.iter_mut().zip(mx.iter()) {
        *b = if x == f32::NEG_INFINITY { 0.0 } else { x };
    }
    let base = alpha;
    sum.fill(0.0);
    for c in s.chunks_exact_mut(ld) {
        for ((x, &b), acc) in c.iter_mut().zip(base.iter()).zip(sum.iter_mut()) {
            *x = exp::<FMA>(*x - b);
            *acc += *x;
        }
    }
    for i in 0..ld {
        if first {
            l[i] = sum[i];
        } else {
            // The rescale replaces the base it was computed from.
            let a = exp::<FMA>(m[i] - base[i]);
            l[i] = madd::<FMA>(l[i], a, sum[i]);
            base[i] = a;
        }
        m[i] = mx[i];
    }
}

/// The composed path (candle ops; every device and dtype): the score matrix in query chunks of
/// at most 64 MiB. The reference the flash kernel is tested against.
pub fn attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    // Softmax rows are independent, so long query sequences run in chunks whose score matrix
    // stays under ATTN_CHUNK_BYTES (the VAE's 128x128-latent attention would otherwise need a
    // 16384 x 16384 matrix at once). Chunking does not change a single value.
    const ATTN_CHUNK_BYTES: usize = 64 << 20;
    let q_len = q.dim(D::Minus2)?;
    let k_len = k.dim(D::Minus2)?;
    let lead: usize = q.dims()[..q.rank() - 2].iter().product();
    let per_row = lead * k_len * 4;
    let rows = (ATTN_CHUNK_BYTES / per_row.max(1)).max(1);
    let k_t = k.t()?.contiguous()?;
    let v = v.contiguous()?;
    if rows >= q_len {
        return attention_chunk(q, &k_t, &v, mask, scale);
    }
    let mut outs = Vec::new();
    let mut start = 0;
    while start < q_len {
        let n = rows.min(q_len - start);
        let qc = q.narrow(q.rank() - 2, start, n)?;
        let mc = match mask {
            Some(m) if m.dim(D::Minus2)? == q_len => Some(m.narrow(m.rank() - 2, start, n)?),
            other => other.cloned(),
        };
        outs.push(attention_chunk(&qc, &k_t, &v, mc.as_ref(), scale)?);
        start += n;
    }
    Ok(Tensor::cat(&outs, q.rank() - 2)?)
}

fn attention_chunk(
    q: &Tensor,
    k_t: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let (q, k_t) = if dtype == DType::F32 {
        (q.clone(), k_t.clone())
    } else {
        (q.to_dtype(DType::F32)?, k_t.to_dtype(DType::F32)?)
    };
    let mut scores = if scale == 1.0 {
        q.matmul(&k_t)?
    } else {
        (q * scale)?.matmul(&k_t)?
    };
    if let Some(m) = mask {
        scores = scores.broadcast_add(m)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    Ok(probs.matmul(v)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::{max_abs, max_abs_diff};

    fn randn(shape: &[usize], std: f32, seed: u64) -> Tensor {
        // Deterministic values without a global RNG: a hash of (seed, index) to [-1, 1) then
        // summed to a rough normal.
        let n: usize = shape.iter().product();
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        let data: Vec<f32> = (0..n).map(|_| (next() + next() + next()) * std).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// `max|flash − chunked| ≤ tol · max|chunked|`, for the softmax of every ISA the CPU has.
    fn check(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64, tol: f32) {
        let want = attention_chunked(q, k, v, mask, scale).unwrap();
        let want = want.to_dtype(DType::F32).unwrap();
        for isa in Isa::available() {
            let got = flash_with(isa, false, q, k, v, mask, scale).unwrap();
            assert_eq!(got.dims(), want.dims());
            let got = got.to_dtype(DType::F32).unwrap();
            let (err, mag) = (max_abs_diff(&got, &want), max_abs(&want));
            assert!(
                err <= tol * mag,
                "{isa:?}: q {:?} k {:?} mask {:?}: max error {err} vs max value {mag}",
                q.dims(),
                k.dims(),
                mask.map(Tensor::dims)
            );
        }
    }

    #[test]
    fn chunked_attention_equals_whole() {
        let dev = Device::Cpu;
        // 5000 queries x 4096 keys: over the chunk budget, so it runs in two chunks.
        let q = Tensor::randn(0f32, 1.0, (1, 5000, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, 4096, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, 4096, 8), &dev).unwrap();
        let scale = 1.0 / 8f64.sqrt();
        let chunked = attention_chunked(&q, &k, &v, None, scale).unwrap();
        let k_t = k.t().unwrap().contiguous().unwrap();
        let whole = attention_chunk(&q, &k_t, &v, None, scale).unwrap();
        assert!(max_abs_diff(&chunked, &whole) < 1e-6);
        // And the flash kernel on the same (rank-3) input.
        check(&q, &k, &v, None, scale, 1e-5);
    }

    /// Self- and cross-attention, lengths that are not multiples of the tiles, every head size
    /// the models use.
    #[test]
    fn flash_equals_chunked_on_many_shapes() {
        let mut seed = 1;
        for d in [8, 40, 64, 128] {
            for (lq, lk) in [(1, 1), (77, 77), (TILE_Q + 1, 300), (200, 77), (129, 600)] {
                let (b, h) = (2, 3);
                seed += 1;
                let q = randn(&[b, h, lq, d], 1.0, seed);
                let k = randn(&[b, h, lk, d], 1.0, seed + 100);
                let v = randn(&[b, h, lk, d], 1.0, seed + 200);
                check(&q, &k, &v, None, 1.0 / (d as f64).sqrt(), 1e-5);
            }
        }
    }

    /// The bf16x3 kernel (precision `High`, on AMX) on the same shapes, with a causal mask, over
    /// several key tiles: within 1e-4 of the f32 composed path (and, from `AMX_MIN_KEYS` keys,
    /// not the f32 kernel's result).
    #[test]
    fn bf16x3_flash_stays_close() {
        if !crate::layers::bf16x3_available() {
            eprintln!("bf16x3_flash_stays_close: this CPU has no AMX-BF16; not run");
            return;
        }
        let mut seed = 50;
        for d in [8, 40, 64, 128] {
            for (lq, lk) in [(1, 1), (77, 77), (TILE_Q + 1, 300), (200, 130), (129, 600)] {
                seed += 1;
                let q = randn(&[2, 3, lq, d], 1.0, seed);
                let k = randn(&[2, 3, lk, d], 1.0, seed + 100);
                let v = randn(&[2, 3, lk, d], 1.0, seed + 200);
                let causal: Vec<f32> = (0..lq * lk)
                    .map(|i| {
                        if i % lk > i / lk {
                            f32::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let causal = Tensor::from_vec(causal, (lq, lk), &Device::Cpu).unwrap();
                for mask in [None, Some(&causal)] {
                    let scale = 1.0 / (d as f64).sqrt();
                    let want = attention_chunked(&q, &k, &v, mask, scale).unwrap();
                    let got = flash_with(Isa::detect(), true, &q, &k, &v, mask, scale).unwrap();
                    let (err, mag) = (max_abs_diff(&got, &want), max_abs(&want));
                    let what = format!("d {d} lq {lq} lk {lk} mask {}", mask.is_some());
                    assert!(err <= 1e-4 * mag, "{what}: {err} vs {mag}");
                    // And it is really another kernel: not bit for bit the f32 one.
                    let f32_flash = flash_with(Isa::detect(), false, &q, &k, &v, mask, scale);
                    if lk >= AMX_MIN_KEYS {
                        assert!(max_abs_diff(&got, &f32_flash.unwrap()) > 0.0, "{what}");
                    }
                }
            }
        }
    }

    /// Masks of every broadcast shape: full, per head (T5's relative bias), shared (CLIP's
    /// causal mask, with -inf), per batch over keys (T5's padding mask), rank 2, per query row,
    /// and strided views (expanded, transposed) read in place.
    #[test]
    fn flash_applies_masks_of_every_broadcast_shape() {
        let (b, h, d) = (2, 3, 40);
        for (lq, lk) in [(77, 77), (300, 300), (70, 530)] {
            let q = randn(&[b, h, lq, d], 1.0, 1);
            let k = randn(&[b, h, lk, d], 1.0, 2);
            let v = randn(&[b, h, lk, d], 1.0, 3);
            let causal: Vec<f32> = (0..lq)
                .flat_map(|i| (0..lk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            let causal = Tensor::from_vec(causal, (1, 1, lq, lk), &Device::Cpu).unwrap();
            // Padding: the last third of each batch's keys masked with a large negative value.
            let pad: Vec<f32> = (0..b)
                .flat_map(|bi| (0..lk).map(move |j| if j > lk * 2 / 3 - bi { -1e9 } else { 0.0 }))
                .collect();
            let pad = Tensor::from_vec(pad, (b, 1, 1, lk), &Device::Cpu).unwrap();
            let masks = [
                randn(&[b, h, lq, lk], 2.0, 4),
                randn(&[1, h, lq, lk], 2.0, 5),
                randn(&[b, 1, lq, lk], 2.0, 6),
                causal.clone(),
                causal.squeeze(0).unwrap().squeeze(0).unwrap(),
                pad.clone(),
                randn(&[1, h, lq, lk], 2.0, 7).broadcast_add(&pad).unwrap(),
                randn(&[b, h, lq, 1], 2.0, 8),
                randn(&[1, 1, 1, 1], 2.0, 9),
                causal.broadcast_as((b, h, lq, lk)).unwrap(),
                randn(&[b, h, lk, lq], 2.0, 10).transpose(2, 3).unwrap(),
            ];
            for m in &masks {
                check(&q, &k, &v, Some(m), 1.0 / (d as f64).sqrt(), 1e-5);
                check(&q, &k, &v, Some(m), 1.0, 1e-5);
            }
        }
    }

    /// Scores near 1000 (T5's unscaled scores, large activations), where a plain `exp` would
    /// overflow: the online softmax subtracts the running maximum. Small integers make the
    /// scores exact in both paths, so the comparison measures the softmax alone and not the
    /// conditioning of large sums.
    #[test]
    fn flash_is_stable_for_large_scores() {
        let ints = |shape: &[usize], seed: u64, offset: f32| {
            let t = randn(shape, 1.0, seed)
                .affine(1.5, 0.0)
                .unwrap()
                .round()
                .unwrap();
            // Column 0 of q carries the offset, column 0 of k is 1: every score gets it.
            let d = shape[3];
            let col0 = Tensor::from_vec(
                (0..d)
                    .map(|i| if i == 0 { 1.0 } else { 0.0 })
                    .collect::<Vec<f32>>(),
                d,
                &Device::Cpu,
            )
            .unwrap();
            t.broadcast_mul(&(1.0 - &col0).unwrap())
                .unwrap()
                .broadcast_add(&(col0 * offset as f64).unwrap())
                .unwrap()
        };
        for d in [64, 128] {
            let q = ints(&[1, 2, 300, d], 11, 1000.0);
            let k = ints(&[1, 2, 700, d], 12, 1.0);
            let v = randn(&[1, 2, 700, d], 1.0, 13);
            check(&q, &k, &v, None, 1.0, 1e-5);
            check(&q, &k, &v, None, 0.25, 1e-5);
            // Maxima that grow along the keys force a rescale at every key tile.
            let ramp: Vec<f32> = (0..300 * 700).map(|i| (i % 700) as f32 * 0.02).collect();
            let ramp = Tensor::from_vec(ramp, (300, 700), &Device::Cpu).unwrap();
            let q = randn(&[1, 2, 300, d], 1.0, 14);
            let k = randn(&[1, 2, 700, d], 1.0, 15);
            check(&q, &k, &v, Some(&ramp), 1.0 / (d as f64).sqrt(), 1e-5);
        }
    }

    /// Half-precision and f64 inputs are computed in f32 and returned in their dtype.
    #[test]
    fn flash_keeps_the_input_dtype() {
        let q = randn(&[1, 2, 100, 64], 1.0, 21);
        let k = randn(&[1, 2, 150, 64], 1.0, 22);
        let v = randn(&[1, 2, 150, 64], 1.0, 23);
        for (dtype, tol) in [(DType::F16, 2e-3), (DType::BF16, 1e-2), (DType::F64, 1e-5)] {
            let c = |t: &Tensor| t.to_dtype(dtype).unwrap();
            let got = attention_flash(&c(&q), &c(&k), &c(&v), None, 0.125).unwrap();
            assert_eq!(got.dtype(), dtype);
            check(&c(&q), &c(&k), &c(&v), None, 0.125, tol);
        }
    }

    /// A strided (transposed) input gives what its contiguous copy gives.
    #[test]
    fn flash_reads_strided_inputs() {
        let q = randn(&[1, 90, 2, 64], 1.0, 31).transpose(1, 2).unwrap();
        let k = randn(&[1, 2, 64, 120], 1.0, 32).transpose(2, 3).unwrap();
        let v = randn(&[1, 2, 120, 32], 1.0, 33);
        check(&q, &k, &v, None, 0.125, 1e-5);
    }

    /// Bad shapes are errors, not panics.
    #[test]
    fn flash_rejects_mismatched_shapes() {
        let q = randn(&[1, 2, 10, 8], 1.0, 1);
        let k = randn(&[1, 2, 12, 8], 1.0, 2);
        let v = randn(&[1, 2, 12, 8], 1.0, 3);
        let bad_k = randn(&[1, 2, 12, 4], 1.0, 2);
        assert!(attention_flash(&q, &bad_k, &v, None, 1.0).is_err());
        let bad_mask = randn(&[1, 2, 10, 11], 1.0, 4);
        assert!(attention_flash(&q, &k, &v, Some(&bad_mask), 1.0).is_err());
        let bad_heads = randn(&[1, 3, 12, 8], 1.0, 5);
        assert!(attention_flash(&q, &bad_heads, &v, None, 1.0).is_err());
    }

    /// Every ISA variant this CPU has computes the same softmax step (to rounding).
    #[test]
    fn isa_variants_agree() {
        let (rows, ld, kn) = (20, 32, 77);
        let s0: Vec<f32> = (0..kn * ld)
            .map(|i| ((i * 37) % 101) as f32 * 0.3 - 15.0)
            .collect();
        let bias: Vec<f32> = (0..rows * kn)
            .map(|i| {
                if i % 7 == 0 {
                    f32::NEG_INFINITY
                } else {
                    (i % 5) as f32
                }
            })
            .collect();
        let run = |isa: Isa| {
            let (mut s, mut alpha) = (s0.clone(), vec![0f32; ld]);
            let (mut mx, mut sum) = (vec![0f32; ld], vec![0f32; ld]);
            let (mut m, mut l) = (vec![2.0f32; ld], vec![3.0f32; ld]);
            let bias = Some(TileBias {
                data: &bias,
                start: 0,
                row: kn,
                col: 1,
            });
            softmax_step(
                isa,
                Step {
                    s: &mut s,
                    ld,
                    rows,
                    bias,
                    m: &mut m,
                    l: &mut l,
                    alpha: &mut alpha,
                    mx: &mut mx,
                    sum: &mut sum,
                    first: false,
                },
            );
            [s, alpha, m, l].concat()
        };
        let base = run(Isa::Baseline);
        for isa in Isa::available() {
            let got = run(isa);
            for (a, b) in got.iter().zip(&base) {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "{isa:?}: {a} vs {b}"
                );
            }
        }
    }
}
