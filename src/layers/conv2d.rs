//! A memory-lean CPU conv2d for stride-1, ungrouped f32 convolutions (all the 3x3 and 1x1 convs
//! of the UNet and VAE but the few strided downsamplers).
//!
//! candle's CPU conv builds one im2col buffer of `H·W × C_in·k²` floats (1.2 GB for a 128-channel
//! 3x3 conv at 512x512). Here the input is zero-padded to width `W + 2p` and flattened, so each
//! kernel tap is a plain matrix product against a *shifted view* of that buffer: k² GEMMs
//! accumulate into an output computed over the padded width (the 2p extra columns per row are
//! dropped). Rows are processed in chunks, so the scratch memory is bounded by `CHUNK_BYTES`
//! whatever the image size, and no im2col copy is made at all.

use candle_core::{DType, Device, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Scratch budget per chunk (padded input rows + output rows).
const CHUNK_BYTES: usize = 24 << 20;

/// Whether [`conv2d`] handles this case.
pub fn supported(x: &Tensor, w: &Tensor, stride: usize, groups: usize) -> bool {
    matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && stride == 1
        && groups == 1
        && x.rank() == 4
        && w.rank() == 4
        && w.dim(2).ok() == w.dim(3).ok()
}

/// Runs `f` on the f32 data of a contiguous CPU tensor, without copying it.
fn with_f32<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            let all = cpu.as_slice::<f32>()?;
            let start = layout.start_offset();
            f(&all[start..start + t.elem_count()])
        }
        _ => Err(Error::InvalidArgument(
            "conv2d: expected a CPU tensor".into(),
        )),
    }
}

/// What the kernel applies to its input as it reads it, so the transformed input is never
/// materialised: a per-(batch, channel) affine map `x·a + b` (a GroupNorm folded into
/// coefficients), optionally followed by SiLU, and a nearest-neighbour upsampling factor.
#[derive(Debug, Clone, Default)]
pub struct Prologue {
    /// `(a, b)`, `n · c_in` entries each.
    pub affine: Option<(Vec<f32>, Vec<f32>)>,
    pub silu: bool,
    /// Nearest-neighbour upsampling factor of the input (1 = none).
    pub upsample: usize,
}

/// `conv2d(x, w) + b` with stride 1, dilation 1, one group, symmetric `padding`.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize) -> Result<Tensor> {
    conv2d_ext(x, w, b, padding, &Prologue::default(), None)
}

/// `conv2d(prologue(x), w) + b + residual`: the prologue is applied while reading the input and
/// the residual (same shape as the output) initialises the accumulator, so neither the
/// normalised/upsampled input nor the sum needs a tensor of its own.
pub fn conv2d_ext(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    padding: usize,
    pro: &Prologue,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let (n, c_in, h0, w0) = x.dims4()?;
    let (c_out, wc_in, k, _) = w.dims4()?;
    let u = pro.upsample.max(1);
    let (h, wd) = (h0 * u, w0 * u);
    if wc_in != c_in {
        return Err(Error::InvalidArgument(format!(
            "conv2d: input has {c_in} channels, weight expects {wc_in}"
        )));
    }
    if h + 2 * padding < k || wd + 2 * padding < k {
        return Err(Error::InvalidArgument(format!(
            "conv2d: a {h}x{wd} input with padding {padding} is smaller than the {k}x{k} kernel"
        )));
    }
    if let Some((a, bb)) = &pro.affine {
        if a.len() != n * c_in || bb.len() != n * c_in {
            return Err(Error::InvalidArgument(
                "conv2d: prologue size mismatch".into(),
            ));
        }
    }
    let (h_out, w_out) = (h + 2 * padding - k + 1, wd + 2 * padding - k + 1);
    if let Some(r) = residual {
        if r.dims() != [n, c_out, h_out, w_out] {
            return Err(Error::InvalidArgument(format!(
                "conv2d: residual shape {:?} does not match the output ({n}, {c_out}, {h_out}, {w_out})",
                r.dims()
            )));
        }
    }
    let bias = b.map(|b| b.to_vec1::<f32>()).transpose()?;
    let geo = Geometry {
        n,
        c_in,
        h0,
        w0,
        u,
        c_out,
        k,
        padding,
    };
    let out = with_f32(x, |xs| {
        with_f32(w, |ws| match residual {
            Some(r) => with_f32(r, |rs| run(xs, ws, bias.as_deref(), Some(rs), pro, &geo)),
            None => run(xs, ws, bias.as_deref(), None, pro, &geo),
        })
    })?;
    Ok(Tensor::from_vec(out, (n, c_out, h_out, w_out), x.device())?)
}

struct Geometry {
    n: usize,
    c_in: usize,
    /// Stored input size; the logical input is `u` times larger.
    h0: usize,
    w0: usize,
    u: usize,
    c_out: usize,
    k: usize,
    padding: usize,
}

fn run(
    xs: &[f32],
    ws: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    pro: &Prologue,
    g: &Geometry,
) -> Result<Vec<f32>> {
    let Geometry {
        n,
        c_in,
        h0,
        w0,
        u,
        c_out,
        k,
        padding,
    } = *g;
    let (h, wd) = (h0 * u, w0 * u);
    let (h_out, w_out) = (h + 2 * padding - k + 1, wd + 2 * padding - k + 1);
    let wp = wd + 2 * padding;

    // Rows per chunk: padded input (c_in × (rows + k - 1) × wp) plus output (c_out × rows × wp).
    let per_row = (c_in + c_out) * wp * 4;
    let rows = (CHUNK_BYTES / per_row.max(1)).clamp(1, h_out);
    let slack = k - 1; // the last tap of the last junk column reads this far past the rows
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };

    let mut out = vec![0f32; n * c_out * h_out * w_out];
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
            let in_rows = r + k - 1;
            let in_stride = in_rows * wp + slack;
            inp.clear();
            inp.resize(c_in * in_stride, 0.0);
            inp.par_chunks_mut(in_stride)
                .enumerate()
                .for_each(|(ci, dst)| {
                    let (a, b) = match &pro.affine {
                        Some((a, b)) => (a[bi * c_in + ci], b[bi * c_in + ci]),
                        None => (1.0, 0.0),
                    };
                    let plain = pro.affine.is_none() && !pro.silu;
                    for rr in 0..in_rows {
                        let iy = (oy0 + rr) as isize - padding as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        let src = &x_b[ci * h0 * w0 + (iy as usize / u) * w0..][..w0];
                        let row = &mut dst[rr * wp + padding..][..wd];
                        if plain && u == 1 {
                            row.copy_from_slice(src);
                            continue;
                        }
                        for (j, o) in row.iter_mut().enumerate() {
                            let mut v = src[j / u];
                            if pro.affine.is_some() {
                                v = v * a + b;
                            }
                            if pro.silu {
                                v /= 1.0 + (-v).exp();
                            }
                            *o = v;
                        }
                    }
                });
            let acc_stride = r * wp;
            acc.clear();
            acc.resize(c_out * acc_stride, 0.0);
            for (co, row) in acc.chunks_mut(acc_stride).enumerate() {
                let b0 = bias.map_or(0.0, |b| b[co]);
                match res_b {
                    Some(res) => {
                        for rr in 0..r {
                            let src = &res[co * h_out * w_out + (oy0 + rr) * w_out..][..w_out];
                            for (o, &v) in row[rr * wp..][..w_out].iter_mut().zip(src) {
                                *o = v + b0;
                            }
                        }
                    }
                    None => row.fill(b0),
                }
            }
            for ky in 0..k {
                for kx in 0..k {
                    // SAFETY: lhs reads w[co, ci, ky, kx] for co < c_out, ci < c_in; rhs reads
                    // inp[ci * in_stride + ky * wp + kx + j] for j < r * wp, which is below
                    // (ci + 1) * in_stride since (k - 1) * wp + (k - 1) + r * wp <= in_stride;
                    // dst is acc, c_out × acc_stride. The three buffers do not overlap.
                    unsafe {
                        gemm(
                            c_out,
                            acc_stride,
                            c_in,
                            acc.as_mut_ptr(),
                            1,
                            acc_stride as isize,
                            true,
                            ws.as_ptr().add(ky * k + kx),
                            (k * k) as isize,
                            (c_in * k * k) as isize,
                            inp.as_ptr().add(ky * wp + kx),
                            1,
                            in_stride as isize,
                            1.0f32,
                            1.0f32,
                            false,
                            false,
                            false,
                            par,
                        );
                    }
                }
            }
            for co in 0..c_out {
                for rr in 0..r {
                    let src = &acc[co * acc_stride + rr * wp..][..w_out];
                    out_b[co * h_out * w_out + (oy0 + rr) * w_out..][..w_out].copy_from_slice(src);
                }
            }
            oy0 += r;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::TorchRng;

    /// Property test: random shapes, paddings, kernels, batch sizes and non-contiguous inputs
    /// against candle's own conv2d.
    #[test]
    fn matches_candle_conv2d_on_random_cases() {
        let mut rng = TorchRng::new(7);
        let mut pick = |lo: usize, hi: usize| -> usize {
            let u = rng.randn(1)[0].abs();
            lo + ((u * 1000.0) as usize) % (hi - lo + 1)
        };
        for case in 0..60 {
            let (n, c_in, c_out) = (pick(1, 3), pick(1, 19), pick(1, 23));
            let k = [1, 3, 5][pick(0, 2)];
            let padding = pick(0, k);
            let (h, w) = (
                pick(k.saturating_sub(2 * padding).max(1), 21),
                pick(k.saturating_sub(2 * padding).max(1), 33),
            );
            let dev = Device::Cpu;
            let x = Tensor::randn(0f32, 1.0, (n, c_in, w, h), &dev).unwrap();
            // Transposed: exercises the non-contiguous path.
            let x = x.transpose(2, 3).unwrap();
            let wt = Tensor::randn(0f32, 0.3, (c_out, c_in, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.3, c_out, &dev).unwrap();
            let ours = conv2d(&x, &wt, Some(&b), padding).unwrap();
            let theirs = x
                .conv2d(&wt, padding, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, c_out, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "case {case}");
            let diff = (&ours - &theirs)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let mag = theirs
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff <= 1e-5 * mag.max(1.0),
                "case {case} n{n} c{c_in}->{c_out} k{k} p{padding} {h}x{w}: {diff}"
            );
        }
    }

    #[test]
    fn prologue_and_residual_equal_the_composed_ops() {
        let dev = Device::Cpu;
        let (n, c_in, c_out, h, w) = (2, 5, 7, 6, 9);
        let x = Tensor::randn(0f32, 1.0, (n, c_in, h, w), &dev).unwrap();
        let wt = Tensor::randn(0f32, 0.3, (c_out, c_in, 3, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, c_out, &dev).unwrap();
        let a: Vec<f32> = (0..n * c_in).map(|i| 0.5 + i as f32 * 0.1).collect();
        let s: Vec<f32> = (0..n * c_in).map(|i| i as f32 * 0.05 - 0.2).collect();
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
            let conv = y
                .conv2d(&wt, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, c_out, 1, 1)).unwrap())
                .unwrap();
            let res = Tensor::randn(0f32, 1.0, conv.dims(), &dev).unwrap();
            let want = (&conv + &res).unwrap();
            let got = conv2d_ext(&x, &wt, Some(&b), 1, &pro, Some(&res)).unwrap();
            let d = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-5, "silu={silu} up={up}");
        }
    }

    #[test]
    fn unsupported_cases_are_declined() {
        let x = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((4, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(supported(&x, &w, 1, 1));
        assert!(!supported(&x, &w, 2, 1));
        assert!(!supported(&x, &w, 1, 2));
        let xh = x.to_dtype(DType::F16).unwrap();
        assert!(!supported(&xh, &w, 1, 1));
    }
}
