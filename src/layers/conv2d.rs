//! A memory-lean CPU conv2d for f32 tensors: any stride, groups and (asymmetric) zero padding,
//! dilation 1. Used by every conv of the UNet and the VAE on CPU.
//!
//! candle's CPU conv builds one im2col buffer of `H·W × C_in·k²` floats (1.2 GB for a 128-channel
//! 3x3 conv at 512x512). Here the zero-padded input is split into its `s²` stride phases (for
//! stride 1, the padded input itself), each flattened with the row width of the output plus
//! `(k-1)/s` columns. Every kernel tap then reads one phase at a fixed offset, so the conv is
//! k² plain matrix products against *shifted views* of that buffer, accumulated into an output
//! computed over the phase width (the few extra columns per row are dropped). Rows are processed
//! in chunks, so the scratch memory is bounded by `CHUNK_BYTES` whatever the image size, and no
//! im2col copy is made at all.

use candle_core::{DType, Device, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::{sgemm, with_cpu_f32};
use crate::error::{Error, Result};

/// Scratch budget per chunk (input phases + output rows).
pub(super) const CHUNK_BYTES: usize = 24 << 20;

/// The most scratch either conv kernel takes, whatever the sizes (the Winograd kernel's
/// transformed weights and its pass), for memory estimates.
pub const SCRATCH_BYTES: usize = 2 * CHUNK_BYTES;

/// From this many output pixels a conv's GEMM runs on [`sgemm`], which packs the weights for
/// each call: below it the packing outweighs the product (measured with `cargo bench --bench
/// shapes`: the UNet's 8×8 1×1 convs, 64 pixels an image, 0.73x the `gemm` crate's speed; its
/// 8×8 and 4×4 3×3 taps in the im2col kernel also slower), above it level or faster (the 16×16
/// and 32×32 1×1 convs 1.0–1.05x).
const SGEMM_MIN_PIXELS: usize = 256;

/// Output pixels per task when a chunk is split across threads.
const PIXEL_BLOCK: usize = 1024;

/// The accumulator shared by tasks that write disjoint pixel ranges of it.
#[derive(Clone, Copy)]
struct AccPtr(*mut f32);
// SAFETY: only used for writes to disjoint ranges (see the GEMM call) while the buffer lives.
unsafe impl Send for AccPtr {}
unsafe impl Sync for AccPtr {}

/// Zero padding on each side of the input, in input pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Padding {
    pub top: usize,
    pub bottom: usize,
    pub left: usize,
    pub right: usize,
}

impl Padding {
    pub fn uniform(p: usize) -> Self {
        Self {
            top: p,
            bottom: p,
            left: p,
            right: p,
        }
    }
}

/// Stride, groups and padding of a conv (dilation is always 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvSpec {
    pub stride: usize,
    pub groups: usize,
    pub padding: Padding,
}

impl ConvSpec {
    pub fn new(stride: usize, padding: usize, groups: usize) -> Self {
        Self {
            stride,
            groups,
            padding: Padding::uniform(padding),
        }
    }
}

/// Whether [`conv2d`] handles this case (a CPU f32 input and a square f32 kernel).
pub fn supported(x: &Tensor, w: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && x.rank() == 4
        && w.rank() == 4
        && w.dim(2).ok() == w.dim(3).ok()
}

/// What the kernel applies to its input as it reads it, so the transformed input is never
/// materialised: a per-(batch, channel) affine map `x·a + b` (a GroupNorm folded into
/// coefficients), optionally followed by SiLU, and a nearest-neighbour upsampling factor.
/// Padding is applied after the prologue (zeros stay zeros), as in the composed ops.
#[derive(Debug, Clone, Default)]
pub struct Prologue {
    /// `(a, b)`, `n · c_in` entries each.
    pub affine: Option<(Vec<f32>, Vec<f32>)>,
    pub silu: bool,
    /// Nearest-neighbour upsampling factor of the input (1 = none).
    pub upsample: usize,
}

/// `conv2d(x, w) + b`.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, spec: &ConvSpec) -> Result<Tensor> {
    conv2d_ext(x, w, b, spec, &Prologue::default(), None)
}

/// `conv2d(prologue(x), w) + b + residual`: the prologue is applied while reading the input and
/// the residual (same shape as the output) initialises the accumulator, so neither the
/// normalised/upsampled input nor the sum needs a tensor of its own.
pub fn conv2d_ext(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    spec: &ConvSpec,
    pro: &Prologue,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let (n, c_in, h0, w0) = x.dims4()?;
    let (c_out, c_in_g, k, kw) = w.dims4()?;
    let (s, groups, pad) = (spec.stride, spec.groups, spec.padding);
    if k != kw {
        return Err(Error::InvalidArgument(format!(
            "conv2d: only square kernels are supported, got {k}x{kw}"
        )));
    }
    if s == 0 || groups == 0 || c_in % groups != 0 || c_out % groups != 0 {
        return Err(Error::InvalidArgument(format!(
            "conv2d: stride {s} and {groups} groups do not fit {c_in} -> {c_out} channels"
        )));
    }
    if c_in_g * groups != c_in {
        return Err(Error::InvalidArgument(format!(
            "conv2d: input has {c_in} channels, weight expects {} ({groups} groups of {c_in_g})",
            c_in_g * groups
        )));
    }
    let u = pro.upsample.max(1);
    let (h, wd) = (h0 * u, w0 * u);
    let (hp, wp) = (h + pad.top + pad.bottom, wd + pad.left + pad.right);
    if hp < k || wp < k {
        return Err(Error::InvalidArgument(format!(
            "conv2d: a {h}x{wd} input padded to {hp}x{wp} is smaller than the {k}x{k} kernel"
        )));
    }
    if let Some((a, bb)) = &pro.affine {
        if a.len() != n * c_in || bb.len() != n * c_in {
            return Err(Error::InvalidArgument(
                "conv2d: prologue size mismatch".into(),
            ));
        }
    }
    let (h_out, w_out) = ((hp - k) / s + 1, (wp - k) / s + 1);
    if let Some(r) = residual {
        if r.dims() != [n, c_out, h_out, w_out] {
            return Err(Error::InvalidArgument(format!(
                "conv2d: residual shape {:?} does not match the output ({n}, {c_out}, {h_out}, {w_out})",
                r.dims()
            )));
        }
    }
    let bias = b.map(|b| b.to_vec1::<f32>()).transpose()?;
    let (x_dims, w_dims) = ((n, c_in, h0, w0), (c_out, k));
    let out = with_cpu_f32(x, |xs| {
        with_cpu_f32(w, |ws| match residual {
            Some(r) => with_cpu_f32(r, |rs| {
                run(
                    None,
                    xs,
                    ws,
                    bias.as_deref(),
                    Some(rs),
                    pro,
                    spec,
                    x_dims,
                    w_dims,
                )
            }),
            None => run(
                None,
                xs,
                ws,
                bias.as_deref(),
                None,
                pro,
                spec,
                x_dims,
                w_dims,
            ),
        })
    })?;
    Ok(Tensor::from_vec(out, (n, c_out, h_out, w_out), x.device())?)
}

/// `Σ_k conv2d(x_k, w_k) + b + residual` for inputs of one shape and weights of one shape:
/// conv3d's temporal taps. Where the Winograd kernel applies, the terms are stacked along its
/// GEMMs' inner dimension (one output transform and one output tensor for the sum); otherwise
/// a chain of [`conv2d_ext`] calls, the running sum riding in the residual.
pub fn conv2d_sum(
    terms: &[(&Tensor, &Tensor)],
    b: Option<&Tensor>,
    spec: &ConvSpec,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let Some(&(x0, w0)) = terms.first() else {
        return Err(Error::InvalidArgument("conv2d_sum: no terms".into()));
    };
    if let Some((x, w)) = terms
        .iter()
        .find(|(x, w)| x.dims() != x0.dims() || w.dims() != w0.dims())
    {
        return Err(Error::InvalidArgument(format!(
            "conv2d_sum: terms differ in shape: {:?} * {:?} vs {:?} * {:?}",
            x.dims(),
            w.dims(),
            x0.dims(),
            w0.dims()
        )));
    }
    let stacked = terms.len() > 1
        && terms.iter().all(|(x, w)| supported(x, w))
        && residual.is_none_or(|r| matches!(r.device(), Device::Cpu) && r.dtype() == DType::F32);
    if stacked {
        let (n, c_in, h, wd) = x0.dims4()?;
        let (c_out, c_in_w, k, _) = w0.dims4()?;
        let pad = spec.padding;
        let (hp, wp) = (h + pad.top + pad.bottom, wd + pad.left + pad.right);
        if c_in_w == c_in && spec.groups == 1 && hp >= k && wp >= k {
            let (h_out, w_out) = ((hp - k) / spec.stride + 1, (wp - k) / spec.stride + 1);
            if super::winograd::takes(k, spec.stride, 1, h_out, w_out) {
                let shape = (n, c_out, h_out, w_out);
                if let Some(r) = residual.filter(|r| r.dims() != [n, c_out, h_out, w_out]) {
                    return Err(Error::InvalidArgument(format!(
                        "conv2d: residual shape {:?} does not match the output {shape:?}",
                        r.dims()
                    )));
                }
                let bias = b.map(|b| b.to_vec1::<f32>()).transpose()?;
                let xs: Vec<&Tensor> = terms.iter().map(|t| t.0).collect();
                let ws: Vec<&Tensor> = terms.iter().map(|t| t.1).collect();
                let mut out = vec![0f32; n * c_out * h_out * w_out];
                super::with_cpu_f32_all(&xs, |xs| {
                    super::with_cpu_f32_all(&ws, |ws| {
                        let mut run = |res: Option<&[f32]>| {
                            #[rustfmt::skip]
                            super::winograd::run(xs, ws, bias.as_deref(), res, &mut out, &Prologue::default(),
                                pad, (n, c_in, h, wd), c_out, (h_out, w_out), super::winograd::BUDGET);
                            Ok(())
                        };
                        match residual {
                            Some(r) => with_cpu_f32(r, |rs| run(Some(rs))),
                            None => run(None),
                        }
                    })
                })?;
                return Ok(Tensor::from_vec(out, shape, x0.device())?);
            }
        }
    }
    let mut acc = residual.cloned();
    for (i, (x, w)) in terms.iter().enumerate() {
        let bias = if i == 0 { b } else { None };
        let y = if supported(x, w) {
            conv2d_ext(x, w, bias, spec, &Prologue::default(), acc.as_ref())?
        } else {
            let p = spec.padding;
            let xp = x
                .pad_with_zeros(2, p.top, p.bottom)?
                .pad_with_zeros(3, p.left, p.right)?;
            let mut y = xp.conv2d(w, 0, spec.stride, 1, spec.groups)?;
            if let Some(b) = bias {
                y = y.broadcast_add(&b.reshape((1, (), 1, 1))?)?;
            }
            match &acc {
                Some(a) => (y + a)?,
                None => y,
            }
        };
        acc = Some(y);
    }
    acc.ok_or_else(|| Error::InvalidArgument("conv2d_sum: no terms".into()))
}

/// Fills one zero-initialised plane of `rows` rows of `width` columns with input channel `ci` of
/// `x_b` (stored `h0 × w0`), transformed by the prologue (coefficients at index `coef`), as
/// the stride phase `(ry, rx)` of the padded input: row `rr`, column `j` hold the padded input
/// pixel `(s·(y0 + rr) + ry, s·j + rx)`. Padding stays zero.
#[allow(clippy::too_many_arguments)]
pub(super) fn fill_plane(
    dst: &mut [f32],
    width: usize,
    rows: usize,
    x_b: &[f32],
    ci: usize,
    (h0, w0): (usize, usize),
    pro: &Prologue,
    coef: usize,
    pad: Padding,
    s: usize,
    (ry, rx): (usize, usize),
    y0: usize,
) {
    let u = pro.upsample.max(1);
    let (h, wd) = (h0 * u, w0 * u);
    let isa = super::simd::Isa::detect();
    let (a, b) = match &pro.affine {
        Some((a, b)) => (a[coef], b[coef]),
        None => (1.0, 0.0),
    };
    // Columns whose input column lies inside the image.
    let col = |j: usize| (s * j + rx) as isize - pad.left as isize;
    let j0 = (0..width).find(|&j| col(j) >= 0).unwrap_or(width);
    let j1 = (j0..width)
        .find(|&j| col(j) >= wd as isize)
        .unwrap_or(width);
    for rr in 0..rows {
        let iy = (s * (y0 + rr) + ry) as isize - pad.top as isize;
        if iy < 0 || iy >= h as isize || j0 >= j1 {
            continue;
        }
        let src = &x_b[ci * h0 * w0 + (iy as usize / u) * w0..][..w0];
        let row = &mut dst[rr * width + j0..rr * width + j1];
        let ix0 = col(j0) as usize;
        // Gather, then transform in place: separate passes vectorise.
        if u == 1 && s == 1 {
            row.copy_from_slice(&src[ix0..ix0 + row.len()]);
        } else if u == 1 {
            for (o, &v) in row.iter_mut().zip(src[ix0..].iter().step_by(s)) {
                *o = v;
            }
        } else {
            for (j, o) in row.iter_mut().enumerate() {
                *o = src[(ix0 + s * j) / u];
            }
        }
        if pro.affine.is_some() || pro.silu {
            super::simd::affine_silu(isa, row, a, b, pro.silu);
        }
    }
}

/// The three CPU conv kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// F(4×4, 3×3) Winograd: stride-1 3×3 convs on maps of at least 16 tiles.
    Winograd,
    /// One im2col matrix for the whole batch and one GEMM per group against the weights as
    /// stored: small maps (the UNet's 8×8 and 4×4 levels), where the direct kernel's per-tap,
    /// per-image products re-pack a strided slice of the weights each time and the packing
    /// costs more than the arithmetic (4×4 × 1280 channels: ~4x slower than this).
    Im2col,
    /// k² products against shifted views of the input, in bounded row chunks: large maps.
    Direct,
}

/// Whether the im2col matrix (`c_in·k² × pixels of the batch`) and its accumulator each fit in
/// the chunk budget.
fn im2col_fits(n: usize, c_in: usize, c_out: usize, k: usize, h_out: usize, w_out: usize) -> bool {
    let m = n * h_out * w_out;
    c_in.saturating_mul(k * k)
        .saturating_mul(m)
        .saturating_mul(4)
        <= CHUNK_BYTES
        && c_out.saturating_mul(m).saturating_mul(4) <= CHUNK_BYTES
}

/// The convolution itself, on validated sizes: `x_dims` is the stored input (n, c_in, h, w),
/// `w_dims` the weight's (c_out, k); the kernel chosen here (`None`) or by the caller (tests run
/// each on the same cases).
#[allow(clippy::too_many_arguments)]
fn run(
    kernel: Option<Kernel>,
    xs: &[f32],
    ws: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    pro: &Prologue,
    spec: &ConvSpec,
    (n, c_in, h0, w0): (usize, usize, usize, usize),
    (c_out, k): (usize, usize),
) -> Result<Vec<f32>> {
    let (s, groups, pad) = (spec.stride, spec.groups, spec.padding);
    let u = pro.upsample.max(1);
    let (h, wd) = (h0 * u, w0 * u);
    let h_out = (h + pad.top + pad.bottom - k) / s + 1;
    let w_out = (wd + pad.left + pad.right - k) / s + 1;
    let plain = pro.affine.is_none() && !pro.silu && u == 1;
    if kernel.is_none() && k == 1 && s == 1 && groups == 1 && pad == Padding::default() && plain {
        return Ok(pointwise(xs, ws, bias, residual, (n, c_in, h0 * w0), c_out));
    }
    let kernel = kernel.unwrap_or(if super::winograd::takes(k, s, groups, h_out, w_out) {
        Kernel::Winograd
    } else if im2col_fits(n, c_in, c_out, k, h_out, w_out) {
        Kernel::Im2col
    } else {
        Kernel::Direct
    });
    // Direct kernel: tap (ky, kx) = (s·qy + ry, s·qx + rx) reads phase (ry, rx) shifted by
    // (qy, qx).
    let qmax = (k - 1) / s;
    let wq = w_out + qmax; // phase row width = accumulator row width
    let slack = qmax; // the last tap of the last junk column reads this far past the rows
    let (c_in_g, c_out_g) = (c_in / groups, c_out / groups);
    // Rows per chunk: s² phases of c_in × (rows + qmax) × wq, plus the c_out × rows × wq output.
    let per_row = (c_in * s * s + c_out) * wq * 4;
    let rows = (CHUNK_BYTES / per_row.max(1)).clamp(1, h_out);
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    let mut out = vec![0f32; n * c_out * h_out * w_out];
    match kernel {
        Kernel::Winograd => {
            let x_dims = (n, c_in, h0, w0);
            #[rustfmt::skip]
            super::winograd::run(&[xs], &[ws], bias, residual, &mut out, pro, pad, x_dims, c_out, (h_out, w_out), super::winograd::BUDGET);
            return Ok(out);
        }
        Kernel::Im2col => {
            #[rustfmt::skip]
            im2col(xs, ws, bias, residual, &mut out, pro, spec, (n, c_in, h0, w0), (c_out, k), (h_out, w_out), par);
            return Ok(out);
        }
        Kernel::Direct => {}
    }
    let mut inp = Vec::<f32>::new();
    let mut acc = Vec::<f32>::new();
    for bi in 0..n {
        let x_b = &xs[bi * c_in * h0 * w0..(bi + 1) * c_in * h0 * w0];
        let out_len = c_out * h_out * w_out;
        let out_b = &mut out[bi * out_len..(bi + 1) * out_len];
        let res_b = residual.map(|r| &r[bi * out_len..(bi + 1) * out_len]);
        let mut oy0 = 0;
        while oy0 < h_out {
            let r = rows.min(h_out - oy0);
            let in_rows = r + qmax;
            let ch_stride = in_rows * wq + slack;
            let phase_len = c_in * ch_stride;
            inp.clear();
            inp.resize(s * s * phase_len, 0.0);
            // One task per (phase, channel) plane.
            inp.par_chunks_mut(ch_stride)
                .enumerate()
                .for_each(|(plane, dst)| {
                    let (phase, ci) = (plane / c_in, plane % c_in);
                    let ph = (phase / s, phase % s);
                    #[rustfmt::skip]
                    fill_plane(dst, wq, in_rows, x_b, ci, (h0, w0), pro, bi * c_in + ci, pad, s, ph, oy0);
                });
            let acc_stride = r * wq;
            acc.clear();
            acc.resize(c_out * acc_stride, 0.0);
            for (co, row) in acc.chunks_mut(acc_stride).enumerate() {
                let b0 = bias.map_or(0.0, |b| b[co]);
                match res_b {
                    Some(res) => {
                        for rr in 0..r {
                            let src = &res[co * h_out * w_out + (oy0 + rr) * w_out..][..w_out];
                            for (o, &v) in row[rr * wq..][..w_out].iter_mut().zip(src) {
                                *o = v + b0;
                            }
                        }
                    }
                    None => row.fill(b0),
                }
            }
            // With more pixels than output channels, pixels are the GEMM's rows (the vectorised
            // dimension, read straight from the input planes); on small maps (the UNet's inner
            // levels) output channels are, or the microkernel would run mostly empty.
            let pixel_rows = acc_stride >= c_out_g;
            let taps = |acc: AccPtr, j0: usize, m: usize, par: Parallelism| {
                for gi in 0..groups {
                    for ky in 0..k {
                        for kx in 0..k {
                            let (qy, ry, qx, rx) = (ky / s, ky % s, kx / s, kx % s);
                            let lhs = (ry * s + rx) * phase_len
                                + gi * c_in_g * ch_stride
                                + qy * wq
                                + qx
                                + j0;
                            let rhs = gi * c_out_g * c_in_g * k * k + ky * k + kx;
                            // SAFETY: lhs reads phase (ry, rx), channel gi·c_in_g + ci (ci <
                            // c_in_g), elements qy·wq + qx + j for j0 <= j < j0 + m <= r·wq,
                            // which stays below ch_stride since qmax·wq + qmax + r·wq <=
                            // (r + qmax)·wq + slack; rhs reads w[co, ci, ky, kx] for group gi's
                            // c_out_g × c_in_g weights; dst is acc[gi·c_out_g + co][j0 + j], and
                            // callers give concurrent calls disjoint j ranges. Inputs are
                            // only read.
                            let (a, st) = (acc_stride as isize, ch_stride as isize);
                            // Weight strides: between output channels, between input channels.
                            let (wo, wi) = ((c_in_g * k * k) as isize, (k * k) as isize);
                            unsafe {
                                let dst = acc.0.add(gi * c_out_g * acc_stride + j0);
                                let (w, x) = (ws.as_ptr().add(rhs), inp.as_ptr().add(lhs));
                                // gemm(m, n, k, dst, dst_cs, dst_rs, read_dst, lhs, lhs_cs,
                                // lhs_rs, rhs, rhs_cs, rhs_rs, alpha, beta, conj.., par)
                                if pixel_rows {
                                    #[rustfmt::skip]
                                    gemm(m, c_out_g, c_in_g, dst, a, 1, true, x, st, 1, w, wo, wi,
                                         1.0f32, 1.0f32, false, false, false, par);
                                } else {
                                    #[rustfmt::skip]
                                    gemm(c_out_g, m, c_in_g, dst, 1, a, true, w, wi, wo, x, 1, st,
                                         1.0f32, 1.0f32, false, false, false, par);
                                }
                            }
                        }
                    }
                }
            };
            let accp = AccPtr(acc.as_mut_ptr());
            if acc_stride >= 8 * PIXEL_BLOCK && threads > 1 {
                // Large chunks: one block of pixels per task through all taps keeps its
                // accumulator rows in cache, instead of streaming the whole chunk k² times.
                let blocks = acc_stride.div_ceil(PIXEL_BLOCK);
                (0..blocks).into_par_iter().for_each(|bi| {
                    let j0 = bi * PIXEL_BLOCK;
                    taps(
                        accp,
                        j0,
                        PIXEL_BLOCK.min(acc_stride - j0),
                        Parallelism::None,
                    );
                });
            } else {
                taps(accp, 0, acc_stride, par);
            }
            for co in 0..c_out {
                for rr in 0..r {
                    let src = &acc[co * acc_stride + rr * wq..][..w_out];
                    out_b[co * h_out * w_out + (oy0 + rr) * w_out..][..w_out].copy_from_slice(src);
                }
            }
            oy0 += r;
        }
    }
    Ok(out)
}

/// A 1×1 conv without prologue, padding or stride: per image, `out (c_out × pixels) = W (c_out ×
/// c_in) · x (c_in × pixels)` straight on the stored planes, the output starting at bias +
/// residual — no im2col copy, accumulator or scatter (which took more than half of the im2col
/// kernel's time on the UNet's 1×1 convs).
fn pointwise(
    xs: &[f32],
    ws: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    (n, c_in, hw): (usize, usize, usize),
    c_out: usize,
) -> Vec<f32> {
    let mut out = match residual {
        Some(r) => r.to_vec(),
        None => vec![0f32; n * c_out * hw],
    };
    if let Some(b) = bias {
        out.par_chunks_mut(hw.max(1))
            .enumerate()
            .for_each(|(i, row)| row.iter_mut().for_each(|v| *v += b[i % c_out]));
    }
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    for b in 0..n {
        // SAFETY: image b's output is c_out × hw row-major inside `out`; the weights are
        // c_out × c_in row-major, the image's input c_in × hw row-major; `out` is a buffer of
        // its own.
        unsafe {
            let dst = out.as_mut_ptr().add(b * c_out * hw);
            let x = xs.as_ptr().add(b * c_in * hw);
            if hw >= SGEMM_MIN_PIXELS {
                #[rustfmt::skip]
                sgemm::gemm(c_out, hw, c_in, dst, hw, true, (ws.as_ptr(), c_in as isize, 1),
                            (x, hw as isize, 1), par);
            } else {
                #[rustfmt::skip]
                gemm(c_out, hw, c_in, dst, 1, hw as isize, true, ws.as_ptr(), 1, c_in as isize,
                     x, 1, hw as isize, 1.0f32, 1.0f32, false, false, false, par);
            }
        }
    }
    out
}

/// The im2col kernel (see [`Kernel::Im2col`]): `col` holds, for input channel `ci` and tap
/// `(ky, kx)`, row `(ci·k + ky)·k + kx` — the weights' own column order — over the batch's
/// output pixels, the prologue applied and padding zero; then per group
/// `acc (c_out_g × pixels) += W_g (c_out_g × c_in_g·k²) · col_g`, the accumulator starting at
/// bias + residual, and a scatter to (n, c_out, h_out, w_out).
#[allow(clippy::too_many_arguments)]
fn im2col(
    xs: &[f32],
    ws: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    out: &mut [f32],
    pro: &Prologue,
    spec: &ConvSpec,
    (n, c_in, h0, w0): (usize, usize, usize, usize),
    (c_out, k): (usize, usize),
    (h_out, w_out): (usize, usize),
    par: Parallelism,
) {
    let (s, groups, pad) = (spec.stride, spec.groups, spec.padding);
    let u = pro.upsample.max(1);
    let (h, wd) = (h0 * u, w0 * u);
    let (hw, plane) = (h_out * w_out, h0 * w0);
    let m = n * hw;
    let kk = k * k;
    let mut col = vec![0f32; c_in * kk * m];
    // One task per input channel: its k² rows, for every image of the batch.
    col.par_chunks_mut(kk * m)
        .enumerate()
        .for_each(|(ci, rows)| {
            let mut src = vec![0f32; plane];
            for b in 0..n {
                src.copy_from_slice(&xs[(b * c_in + ci) * plane..][..plane]);
                let (a, sh) = match &pro.affine {
                    Some((a, sh)) => (a[b * c_in + ci], sh[b * c_in + ci]),
                    None => (1.0, 0.0),
                };
                if pro.affine.is_some() || pro.silu {
                    super::simd::affine_silu(super::simd::Isa::detect(), &mut src, a, sh, pro.silu);
                }
                for ky in 0..k {
                    for kx in 0..k {
                        let row = &mut rows[(ky * k + kx) * m + b * hw..][..hw];
                        for oy in 0..h_out {
                            let iy = (oy * s + ky) as isize - pad.top as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            let src_row = &src[(iy as usize / u) * w0..][..w0];
                            for ox in 0..w_out {
                                let ix = (ox * s + kx) as isize - pad.left as isize;
                                if ix >= 0 && ix < wd as isize {
                                    row[oy * w_out + ox] = src_row[ix as usize / u];
                                }
                            }
                        }
                    }
                }
            }
        });
    let mut acc = vec![0f32; c_out * m];
    for (co, row) in acc.chunks_mut(m).enumerate() {
        let b0 = bias.map_or(0.0, |b| b[co]);
        for b in 0..n {
            let dst = &mut row[b * hw..][..hw];
            match residual {
                Some(r) => {
                    for (o, &v) in dst.iter_mut().zip(&r[(b * c_out + co) * hw..][..hw]) {
                        *o = v + b0;
                    }
                }
                None => dst.fill(b0),
            }
        }
    }
    let (c_in_g, c_out_g) = (c_in / groups, c_out / groups);
    let kg = c_in_g * kk;
    // Few pixels: each thread takes a slice of the output channels (packing only its rows of
    // the weights) rather than gemm splitting one product, as for the linears (`dense.rs`).
    let threads = candle_core::utils::get_num_threads();
    let parts = if m < 1024 && threads > 1 && c_out_g >= 32 {
        threads
    } else {
        1
    };
    let rows = c_out_g.div_ceil(parts);
    let accp = AccPtr(acc.as_mut_ptr());
    let tasks: Vec<(usize, usize)> = (0..groups)
        .flat_map(|g| (0..c_out_g).step_by(rows).map(move |r0| (g, r0)))
        .collect();
    tasks.into_par_iter().for_each(|(g, r0)| {
        let nr = rows.min(c_out_g - r0);
        let acc = accp;
        let co = g * c_out_g + r0;
        let par = if parts > 1 { Parallelism::None } else { par };
        // SAFETY: dst is rows co..co + nr of acc (c_out × m, row stride m), disjoint between
        // tasks; lhs is the same rows of the weights (group g's, kg contiguous values each); rhs
        // is rows g·kg.. of col (kg × m, row stride m). All lie inside their buffers; dst does
        // not alias the inputs.
        unsafe {
            // gemm(m, n, k, dst, dst_cs, dst_rs, read_dst, lhs, lhs_cs, lhs_rs, rhs, rhs_cs,
            // rhs_rs, alpha, beta, conj.., par): dst = alpha·dst + beta·lhs·rhs.
            let (dst, w) = (acc.0.add(co * m), ws.as_ptr().add(co * kg));
            let x = col.as_ptr().add(g * kg * m);
            if m >= SGEMM_MIN_PIXELS {
                sgemm::gemm(
                    nr,
                    m,
                    kg,
                    dst,
                    m,
                    true,
                    (w, kg as isize, 1),
                    (x, m as isize, 1),
                    par,
                );
            } else {
                #[rustfmt::skip]
                gemm(nr, m, kg, dst, 1, m as isize, true, w, 1, kg as isize, x, 1, m as isize,
                     1.0f32, 1.0f32, false, false, false, par);
            }
        }
    });
    drop(col);
    for b in 0..n {
        for co in 0..c_out {
            out[(b * c_out + co) * hw..][..hw].copy_from_slice(&acc[co * m + b * hw..][..hw]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::max_abs;
    use crate::rng::TorchRng;

    /// `conv2d(x, w) + b` through one chosen kernel.
    fn conv_with(kernel: Kernel, x: &Tensor, w: &Tensor, b: &Tensor, spec: &ConvSpec) -> Tensor {
        conv_ext_with(kernel, x, w, b, spec, &Prologue::default(), None)
    }

    /// `conv2d(prologue(x), w) + b + residual` through one chosen kernel.
    fn conv_ext_with(
        kernel: Kernel,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        spec: &ConvSpec,
        pro: &Prologue,
        residual: Option<&Tensor>,
    ) -> Tensor {
        let (n, c_in, h, wd) = x.dims4().unwrap();
        let (c_out, _, k, _) = w.dims4().unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (xs, ws, bs) = (flat(x), flat(w), b.to_vec1::<f32>().unwrap());
        let rs = residual.map(flat);
        let (p, u) = (spec.padding, pro.upsample.max(1));
        let h_out = (h * u + p.top + p.bottom - k) / spec.stride + 1;
        let w_out = (wd * u + p.left + p.right - k) / spec.stride + 1;
        #[rustfmt::skip]
        let out = run(Some(kernel), &xs, &ws, Some(&bs), rs.as_deref(), pro, spec, (n, c_in, h, wd), (c_out, k)).unwrap();
        Tensor::from_vec(out, (n, c_out, h_out, w_out), &Device::Cpu).unwrap()
    }

    /// candle's conv2d on an explicitly padded input: the reference.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, spec: &ConvSpec) -> Tensor {
        let p = spec.padding;
        let xp = x
            .pad_with_zeros(2, p.top, p.bottom)
            .unwrap()
            .pad_with_zeros(3, p.left, p.right)
            .unwrap();
        let c_out = w.dim(0).unwrap();
        xp.conv2d(w, 0, spec.stride, 1, spec.groups)
            .unwrap()
            .broadcast_add(&b.reshape((1, c_out, 1, 1)).unwrap())
            .unwrap()
    }

    /// Property test: random shapes, strides, groups, (asymmetric) paddings, kernels, batch
    /// sizes and non-contiguous inputs against candle's own conv2d.
    #[test]
    fn matches_candle_conv2d_on_random_cases() {
        let mut rng = TorchRng::new(7);
        let mut pick = |lo: usize, hi: usize| crate::layers::pick(&mut rng, lo, hi);
        for case in 0..120 {
            let groups = [1, 1, 2, 3, 4][pick(0, 4)];
            let (n, c_in, c_out) = (pick(1, 3), groups * pick(1, 7), groups * pick(1, 8));
            let k = [1, 2, 3, 5][pick(0, 3)];
            let stride = [1, 1, 2, 2, 3][pick(0, 4)];
            let padding = if pick(0, 2) == 0 {
                Padding {
                    top: pick(0, k),
                    bottom: pick(0, k),
                    left: pick(0, k),
                    right: pick(0, k),
                }
            } else {
                Padding::uniform(pick(0, k))
            };
            let spec = ConvSpec {
                stride,
                groups,
                padding,
            };
            let min_h = k.saturating_sub(padding.top + padding.bottom).max(1);
            let min_w = k.saturating_sub(padding.left + padding.right).max(1);
            let (h, w) = (pick(min_h, 21), pick(min_w, 33));
            let dev = Device::Cpu;
            let x = Tensor::randn(0f32, 1.0, (n, c_in, w, h), &dev).unwrap();
            // Transposed: exercises the non-contiguous path.
            let x = x.transpose(2, 3).unwrap();
            let wt = Tensor::randn(0f32, 0.3, (c_out, c_in / groups, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.3, c_out, &dev).unwrap();
            let theirs = reference(&x, &wt, &b, &spec);
            // The kernel `conv2d` picks, then each general kernel on the same case.
            let ours = [
                conv2d(&x, &wt, Some(&b), &spec).unwrap(),
                conv_with(Kernel::Direct, &x, &wt, &b, &spec),
                conv_with(Kernel::Im2col, &x, &wt, &b, &spec),
            ];
            for (ours, kernel) in ours.iter().zip(["auto", "direct", "im2col"]) {
                assert_eq!(ours.dims(), theirs.dims(), "case {case} {spec:?}");
                let diff = max_abs(&(ours - &theirs).unwrap());
                assert!(
                    diff <= 1e-5 * max_abs(&theirs).max(1.0),
                    "case {case} {kernel} n{n} c{c_in}->{c_out} k{k} {spec:?} {h}x{w}: {diff}"
                );
            }
        }
    }

    /// The direct kernel's two GEMM orientations (fewer pixels than output channels, and more)
    /// and chunks of at least 8 pixel blocks, which are split across threads with a narrower
    /// last block; the im2col kernel on the same cases.
    #[test]
    fn both_orientations_and_split_chunks_match_candle() {
        let dev = Device::Cpu;
        for (c_in, c_out, hw, spec) in [
            (8, 64, 4, ConvSpec::new(1, 1, 1)),
            (8, 96, 5, ConvSpec::new(2, 1, 4)),
            (3, 5, 100, ConvSpec::new(1, 1, 1)),
            (4, 6, 201, ConvSpec::new(2, 1, 2)),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, c_in, hw, hw), &dev).unwrap();
            let wt = Tensor::randn(0f32, 0.3, (c_out, c_in / spec.groups, 3, 3), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.3, c_out, &dev).unwrap();
            let theirs = reference(&x, &wt, &b, &spec);
            for kernel in [Kernel::Direct, Kernel::Im2col] {
                let ours = conv_with(kernel, &x, &wt, &b, &spec);
                let diff = max_abs(&(&ours - &theirs).unwrap());
                assert!(
                    diff <= 1e-5 * max_abs(&theirs).max(1.0),
                    "{kernel:?} {spec:?}: {diff}"
                );
            }
        }
    }

    #[test]
    fn prologue_and_residual_equal_the_composed_ops() {
        let dev = Device::Cpu;
        let (n, c_in, c_out, h, w) = (2, 6, 8, 6, 9);
        let x = Tensor::randn(0f32, 1.0, (n, c_in, h, w), &dev).unwrap();
        let a: Vec<f32> = (0..n * c_in).map(|i| 0.5 + i as f32 * 0.1).collect();
        let s: Vec<f32> = (0..n * c_in).map(|i| i as f32 * 0.05 - 0.2).collect();
        let asym = ConvSpec {
            stride: 2,
            groups: 2,
            padding: Padding {
                top: 0,
                bottom: 1,
                left: 0,
                right: 1,
            },
        };
        for spec in [ConvSpec::new(1, 1, 1), asym] {
            let wt = Tensor::randn(0f32, 0.3, (c_out, c_in / spec.groups, 3, 3), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.3, c_out, &dev).unwrap();
            for (silu, up) in [(false, 1), (true, 1), (false, 2), (true, 2)] {
                let pro = Prologue {
                    affine: Some((a.clone(), s.clone())),
                    silu,
                    upsample: up,
                };
                let at = Tensor::from_vec(a.clone(), (n, c_in, 1, 1), &dev).unwrap();
                let st = Tensor::from_vec(s.clone(), (n, c_in, 1, 1), &dev).unwrap();
                let mut y = x.broadcast_mul(&at).unwrap().broadcast_add(&st).unwrap();
                if silu {
                    y = y.silu().unwrap();
                }
                let y = y.upsample_nearest2d(h * up, w * up).unwrap();
                let conv = reference(&y, &wt, &b, &spec);
                let res = Tensor::randn(0f32, 1.0, conv.dims(), &dev).unwrap();
                let want = (&conv + &res).unwrap();
                let got = conv2d_ext(&x, &wt, Some(&b), &spec, &pro, Some(&res)).unwrap();
                let d = max_abs(&(got - &want).unwrap());
                assert!(d < 1e-5, "{spec:?} silu={silu} up={up}: {d}");
                for kernel in [Kernel::Direct, Kernel::Im2col] {
                    let got = conv_ext_with(kernel, &x, &wt, &b, &spec, &pro, Some(&res));
                    let d = max_abs(&(got - &want).unwrap());
                    assert!(d < 1e-5, "{kernel:?} {spec:?} silu={silu} up={up}: {d}");
                }
            }
        }
    }

    /// A sum of convs (conv3d's taps) equals the composed convs, stacked into one Winograd call
    /// (stride 1) or chained (stride 2), and refuses terms of different shapes.
    #[test]
    fn sums_equal_the_composed_convs() {
        let dev = Device::Cpu;
        for stride in [1, 2] {
            let spec = ConvSpec::new(stride, 1, 1);
            let xs: Vec<Tensor> = (0..3)
                .map(|_| Tensor::randn(0f32, 1.0, (2, 5, 20, 20), &dev).unwrap())
                .collect();
            let ws: Vec<Tensor> = (0..3)
                .map(|_| Tensor::randn(0f32, 0.3, (6, 5, 3, 3), &dev).unwrap())
                .collect();
            let b = Tensor::randn(0f32, 0.3, 6, &dev).unwrap();
            let zero = b.zeros_like().unwrap();
            let mut want = reference(&xs[0], &ws[0], &b, &spec);
            for (x, w) in xs.iter().zip(&ws).skip(1) {
                want = (want + reference(x, w, &zero, &spec)).unwrap();
            }
            let res = Tensor::randn(0f32, 1.0, want.dims(), &dev).unwrap();
            let terms: Vec<(&Tensor, &Tensor)> = xs.iter().zip(&ws).collect();
            for r in [None, Some(&res)] {
                let got = conv2d_sum(&terms, Some(&b), &spec, r).unwrap();
                let want = match r {
                    Some(r) => (&want + r).unwrap(),
                    None => want.clone(),
                };
                let d = max_abs(&(got - &want).unwrap());
                assert!(d <= 1e-5 * max_abs(&want).max(1.0), "stride {stride}: {d}");
            }
        }
        let (x, w) = (
            Tensor::zeros((1, 4, 8, 8), DType::F32, &dev).unwrap(),
            Tensor::zeros((4, 4, 3, 3), DType::F32, &dev).unwrap(),
        );
        let x2 = Tensor::zeros((1, 4, 8, 9), DType::F32, &dev).unwrap();
        let spec = ConvSpec::new(1, 1, 1);
        assert!(conv2d_sum(&[(&x, &w), (&x2, &w)], None, &spec, None).is_err());
        assert!(conv2d_sum(&[], None, &spec, None).is_err());
    }

    #[test]
    fn unsupported_and_invalid_cases_are_declined() {
        let x = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((4, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(supported(&x, &w));
        let xh = x.to_dtype(DType::F16).unwrap();
        assert!(!supported(&xh, &w));
        let wr = Tensor::zeros((4, 4, 3, 1), DType::F32, &Device::Cpu).unwrap();
        assert!(!supported(&x, &wr));
        // 4 channels do not split into 3 groups; stride 0 is meaningless.
        assert!(conv2d(&x, &w, None, &ConvSpec::new(1, 1, 3)).is_err());
        assert!(conv2d(&x, &w, None, &ConvSpec::new(0, 1, 1)).is_err());
        // A weight for 2 groups of 2 channels does not match 1 group.
        let w2 = Tensor::zeros((4, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(conv2d(&x, &w2, None, &ConvSpec::new(1, 1, 1)).is_err());
        assert!(conv2d(&x, &w2, None, &ConvSpec::new(1, 1, 2)).is_ok());
    }
}
