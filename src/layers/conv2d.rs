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
        _ => Err(Error::InvalidArgument("conv2d: expected a CPU tensor".into())),
    }
}

/// `conv2d(x, w) + b` with stride 1, dilation 1, one group, symmetric `padding`.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize) -> Result<Tensor> {
    let (n, c_in, h, wd) = x.dims4()?;
    let (c_out, wc_in, k, _) = w.dims4()?;
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
    let (h_out, w_out) = (h + 2 * padding - k + 1, wd + 2 * padding - k + 1);
    with_f32(x, |xs| with_f32(w, |ws| run(xs, ws, b, [n, c_in, h, wd], [c_out, k, padding])))
        .and_then(|out| Ok(Tensor::from_vec(out, (n, c_out, h_out, w_out), x.device())?))
}

fn run(
    xs: &[f32],
    ws: &[f32],
    b: Option<&Tensor>,
    [n, c_in, h, wd]: [usize; 4],
    [c_out, k, padding]: [usize; 3],
) -> Result<Vec<f32>> {
    let (h_out, w_out) = (h + 2 * padding - k + 1, wd + 2 * padding - k + 1);
    let wp = wd + 2 * padding;
    let bias = b.map(|b| b.to_vec1::<f32>()).transpose()?;

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
        let x_b = &xs[bi * c_in * h * wd..(bi + 1) * c_in * h * wd];
        let out_b = &mut out[bi * c_out * h_out * w_out..(bi + 1) * c_out * h_out * w_out];
        let mut oy0 = 0;
        while oy0 < h_out {
            let r = rows.min(h_out - oy0);
            let in_rows = r + k - 1;
            let in_stride = in_rows * wp + slack;
            inp.clear();
            inp.resize(c_in * in_stride, 0.0);
            for ci in 0..c_in {
                for rr in 0..in_rows {
                    let iy = (oy0 + rr) as isize - padding as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let src = &x_b[ci * h * wd + iy as usize * wd..][..wd];
                    inp[ci * in_stride + rr * wp + padding..][..wd].copy_from_slice(src);
                }
            }
            let acc_stride = r * wp;
            acc.clear();
            acc.resize(c_out * acc_stride, 0.0);
            if let Some(bias) = &bias {
                for (co, row) in acc.chunks_mut(acc_stride).enumerate() {
                    row.fill(bias[co]);
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
            let (h, w) = (pick(k.saturating_sub(2 * padding).max(1), 21), pick(k.saturating_sub(2 * padding).max(1), 33));
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
            let diff = (&ours - &theirs).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            let mag = theirs.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-5 * mag.max(1.0), "case {case} n{n} c{c_in}->{c_out} k{k} p{padding} {h}x{w}: {diff}");
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
