//! CPU f32 kernels for the transformer blocks' dense work: a linear layer whose GEMM
//! accumulator starts at the bias (and a residual), with an in-place activation epilogue, so no
//! second pass over the output and no extra tensor; and GEGLU's `hidden · gelu(gate)` in one
//! pass over the projection.

use candle_core::{DType, Device, Tensor};
use gemm::Parallelism;

use super::sgemm::{self, Epilogue as Tile};
use rayon::prelude::*;

use super::simd::{exp, madd, Isa};
use super::with_cpu_f32;
use crate::error::Result;

/// Whether [`linear`] and [`geglu`] take these tensors (CPU, f32).
pub fn supported(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32)
}

/// What [`linear`] applies to its output in place, row by row in parallel, while it is still in
/// cache from the GEMM's last pass: no second tensor and no separate op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epilogue {
    None,
    /// candle's `gelu` (torch's `GELU(approximate="tanh")`), the same formula.
    GeluTanh,
}

/// Whether an `m`-row linear with `bf16` (else f32) weights takes the few-row kernel
/// (`layers/skinny.rs`), which reads bf16 weights as they are (so [`linear_ext`] may be handed
/// a bf16-held weight then).
pub fn few_rows(m: usize, bf16: bool) -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::skinny::takes(m, bf16);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (m, bf16);
        false
    }
}

/// `x · wᵀ + b` over the last dim of `x` (`(…, k)`), `w` `(n, k)` as stored.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear_ext(x, w, b, Epilogue::None, None)
}

/// [`linear`] followed by `epilogue`, plus `residual` (the output's shape), which starts the
/// accumulator with the bias: a transformer block's `x + proj(h)` without a separate add.
pub fn linear_ext(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    epilogue: Epilogue,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    let dims = x.dims();
    let m = x.elem_count() / k.max(1);
    let len = m * n;
    // bf16 weights are read as they are by the few-row kernel only; anything else not f32
    // (f16, a bf16 weight of many rows) is widened first.
    let widened;
    let w = match w.dtype() {
        DType::F32 => w,
        DType::BF16 if few_rows(m, true) => w,
        _ => {
            widened = w.to_dtype(DType::F32)?;
            &widened
        }
    };
    let bf16 = w.dtype() == DType::BF16;
    let b = b.map(|b| b.to_vec1::<f32>()).transpose()?;
    // The output starts as the residual (read by the GEMM), or is written by it from scratch.
    let mut out = match residual {
        Some(r) if r.elem_count() != len => {
            return Err(crate::error::Error::InvalidArgument(format!(
                "linear: residual {:?} does not match the output ({m}, {n})",
                r.dims()
            )))
        }
        Some(r) => with_cpu_f32(r, |rs| Ok(rs.to_vec()))?,
        None => Vec::with_capacity(len),
    };
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 && m * n * k >= 1 << 16 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    let isa = Isa::detect();
    let gelu = move |row: &mut [f32]| gelu_tanh_row(isa, row);
    let epi = Tile {
        bias: b.as_deref(),
        rows: match epilogue {
            Epilogue::None => None,
            Epilogue::GeluTanh => Some(&gelu),
        },
    };
    #[cfg(target_arch = "x86_64")]
    if few_rows(m, bf16) {
        let threads = if m * n * k >= 1 << 16 { threads } else { 1 };
        with_cpu_f32(x, |xs| {
            let mut run = |ws: super::skinny::Weights| -> Result<()> {
                // SAFETY: few_rows(m, bf16) holds; `out` has room for m × n (spare capacity or the
                // residual), x is m × k and w n × k row-major; every element is written (or
                // read and rewritten) before `set_len`.
                unsafe {
                    let dst = out.as_mut_ptr();
                    #[rustfmt::skip]
                    super::skinny::linear(m, n, k, dst, n, residual.is_some(), xs.as_ptr(), k,
                                          ws, epi, threads);
                    out.set_len(len);
                }
                Ok(())
            };
            match w.dtype() {
                DType::BF16 => {
                    crate::device::with_cpu(w, |ws| run(super::skinny::Weights::Bf16(ws)))
                }
                _ => with_cpu_f32(w, |ws| run(super::skinny::Weights::F32(ws))),
            }
        })?;
        return Ok(Tensor::from_vec(out, last_dim(dims, n), x.device())?);
    }
    with_cpu_f32(x, |xs| {
        with_cpu_f32(w, |ws| {
            // SAFETY: `out` has room for m × n (its spare capacity, or the residual's values);
            // x is m × k and w n × k, row-major; `out` aliases neither. Every element of `out`
            // is written before `set_len`.
            unsafe {
                let dst = out.as_mut_ptr();
                #[rustfmt::skip]
                sgemm::linear(m, n, k, dst, n, residual.is_some(), xs.as_ptr(), k, ws.as_ptr(),
                              epi, par);
                out.set_len(len);
            }
            Ok(())
        })
    })?;
    Ok(Tensor::from_vec(out, last_dim(dims, n), x.device())?)
}

/// diffusers' `GEGLU` after its projection: `p` is `(…, 2f)`, the result `(…, f)` is
/// `p[.., :f] · gelu(p[.., f:])` with the exact (erf) GELU, row by row in parallel, vectorised
/// for the CPU's widest instructions (chosen at run time).
pub fn geglu(p: &Tensor) -> Result<Tensor> {
    let dims = p.dims();
    let two_f = *dims.last().unwrap_or(&0);
    let f = two_f / 2;
    let rows = p.elem_count() / two_f.max(1);
    let mut out = vec![0f32; rows * f];
    let isa = Isa::detect();
    with_cpu_f32(p, |ps| {
        out.par_chunks_mut(f.max(1))
            .zip(ps.par_chunks(two_f.max(1)))
            .for_each(|(o, row)| {
                let (hidden, gate) = row.split_at(f);
                geglu_row(isa, o, hidden, gate);
            });
        Ok(())
    })?;
    Ok(Tensor::from_vec(out, last_dim(dims, f), p.device())?)
}

/// `dims` with the last one replaced by `n`.
fn last_dim(dims: &[usize], n: usize) -> Vec<usize> {
    let mut shape = dims.to_vec();
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    shape
}

super::simd::isa_kernel!(fn gelu_tanh_row(row: &mut [f32]) => gelu_tanh_row_generic);
super::simd::isa_kernel!(fn geglu_row(o: &mut [f32], h: &[f32], g: &[f32]) => geglu_row_generic);

/// candle's `gelu` formula, `0.5·v·(1 + tanh(√(2/π)·v·(1 + 0.044715·v²)))`, with
/// `tanh(y) = 1 - 2/(e^(2y) + 1)` over the branch-free `e^x` so the loop vectorises (libm's
/// scalar `tanhf` took a third of a FLUX block's feed-forward); within 2e-6 of candle's over ±10
/// (tested), i.e. float rounding at those magnitudes.
#[inline(always)]
fn gelu_tanh_row_generic<const FMA: bool>(row: &mut [f32]) {
    const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
    for v in row.iter_mut() {
        let x = *v;
        let y = SQRT_TWO_OVER_PI * x * madd::<FMA>(0.044715 * x, x, 1.0);
        let tanh = 1.0 - 2.0 / (exp::<FMA>(2.0 * y) + 1.0);
        *v = 0.5 * x * (1.0 + tanh);
    }
}

#[inline(always)]
fn geglu_row_generic<const FMA: bool>(o: &mut [f32], h: &[f32], g: &[f32]) {
    for ((o, &h), &g) in o.iter_mut().zip(h).zip(g) {
        *o = h * gelu_erf::<FMA>(g);
    }
}

/// `x · Φ(x)` with erf as PyTorch's vectorised CPU GELU computes it (Abramowitz–Stegun 7.1.26:
/// `1 - poly(t)·e^(-z²)`, `t = 1/(1 + p·z)`, absolute error < 1.5e-7) and a branch-free `e^x`,
/// so the loop vectorises; candle's scalar `erff` differs by that error at most.
#[inline(always)]
fn gelu_erf<const FMA: bool>(x: f32) -> f32 {
    let f = madd::<FMA>;
    let z = (x * std::f32::consts::FRAC_1_SQRT_2).abs();
    let t = 1.0 / f(0.327_591_1, z, 1.0);
    let mut poly = 1.061_405_4;
    for c in [-1.453_152_1, 1.421_413_8, -0.284_496_72, 0.254_829_6] {
        poly = f(poly, t, c);
    }
    let erf_abs = 1.0 - poly * t * exp::<FMA>(-z * z);
    let erf = erf_abs.copysign(x);
    0.5 * x * (1.0 + erf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::max_abs;

    /// `kernel(isa, v)` for every ISA the CPU has, on -10..10, within `tol` of candle's `op`.
    fn every_isa_matches(
        op: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
        tol: f32,
        kernel: impl Fn(Isa, &[f32]) -> Vec<f32>,
    ) {
        let v: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 2.5e-3).collect();
        let t = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
        let want = op(&t).unwrap().to_vec1::<f32>().unwrap();
        for isa in Isa::available() {
            let got = kernel(isa, &v);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < tol, "{isa:?}: {worst}");
        }
    }

    #[test]
    fn linear_equals_candles_matmul_plus_bias() {
        let dev = Device::Cpu;
        for (shape, n, bias) in [
            (vec![2, 37, 24], 19, true),
            (vec![3, 5], 7, false),
            (vec![1, 2, 3, 64], 130, true),
        ] {
            let k = *shape.last().unwrap();
            let x = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev).unwrap();
            let w = Tensor::randn(0f32, 0.2, (n, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.2, n, &dev).unwrap();
            let b = bias.then_some(&b);
            let want =
                candle_nn::Module::forward(&candle_nn::Linear::new(w.clone(), b.cloned()), &x)
                    .unwrap();
            let got = linear(&x, &w, b).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = max_abs(&(got - &want).unwrap());
            assert!(d <= 1e-5 * max_abs(&want).max(1.0), "{shape:?} x {n}: {d}");
        }
        // A non-contiguous input is read through one contiguous copy.
        let x = Tensor::randn(0f32, 1.0, (6, 4), &dev).unwrap().t().unwrap();
        let w = Tensor::randn(0f32, 0.2, (3, 6), &dev).unwrap();
        let want = x.matmul(&w.t().unwrap()).unwrap();
        let d = max_abs(&(linear(&x, &w, None).unwrap() - &want).unwrap());
        assert!(d < 1e-5, "{d}");
    }

    /// bf16 and f16 weights, few rows (the bf16 ones read as they are) and many (widened
    /// first), give what their f32 widening gives.
    #[test]
    fn half_weights_equal_their_f32_widening() {
        let dev = Device::Cpu;
        for (rows, dtype) in [(3, DType::BF16), (200, DType::BF16), (3, DType::F16)] {
            let x = Tensor::randn(0f32, 1.0, (rows, 40), &dev).unwrap();
            let w = Tensor::randn(0f32, 0.2, (21, 40), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let wide = w.to_dtype(DType::F32).unwrap();
            let want = linear(&x, &wide, None).unwrap();
            let d = max_abs(&(linear(&x, &w, None).unwrap() - &want).unwrap());
            assert!(d <= 1e-5 * max_abs(&want), "{rows} rows, {dtype:?}: {d}");
        }
    }

    #[test]
    fn the_gelu_epilogue_equals_candles_gelu_after_the_linear() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 7, 24), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.4, (33, 24), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.4, 33, &dev).unwrap();
        let want = linear(&x, &w, Some(&b)).unwrap().gelu().unwrap();
        let got = linear_ext(&x, &w, Some(&b), Epilogue::GeluTanh, None).unwrap();
        let d = max_abs(&(got - &want).unwrap());
        assert!(d <= 1e-6 * max_abs(&want).max(1.0), "{d}");
        // Every ISA's build against candle's gelu over a wide range (±10, where tanh saturates).
        every_isa_matches(
            |t| t.gelu(),
            2e-6,
            |isa, v| {
                let mut row = v.to_vec();
                gelu_tanh_row(isa, &mut row);
                row
            },
        );
        // A residual starts the accumulator, with or without a bias; a wrong shape is refused.
        let r = Tensor::randn(0f32, 1.0, (2, 7, 33), &dev).unwrap();
        for bias in [Some(&b), None] {
            let want = (linear(&x, &w, bias).unwrap() + &r).unwrap();
            let got = linear_ext(&x, &w, bias, Epilogue::None, Some(&r)).unwrap();
            let d = max_abs(&(got - &want).unwrap());
            assert!(d <= 1e-5 * max_abs(&want), "{d}");
        }
        let bad = Tensor::zeros((2, 7, 32), DType::F32, &dev).unwrap();
        assert!(linear_ext(&x, &w, None, Epilogue::None, Some(&bad)).is_err());
    }

    #[test]
    fn geglu_equals_the_composed_ops() {
        let p = Tensor::randn(0f32, 2.0, (2, 9, 2 * 13), &Device::Cpu).unwrap();
        let want = (p.narrow(2, 0, 13).unwrap() * p.narrow(2, 13, 13).unwrap().gelu_erf().unwrap())
            .unwrap();
        let got = geglu(&p).unwrap();
        assert_eq!(got.dims(), &[2, 9, 13]);
        let d = max_abs(&(got - &want).unwrap());
        assert!(d <= 1e-6 * max_abs(&want).max(1.0), "{d}");
        // Every ISA's build of the row kernel against candle's erf-GELU, over a wide range.
        every_isa_matches(
            |t| t.gelu_erf(),
            5e-7,
            |isa, g| {
                let mut o = vec![0f32; g.len()];
                geglu_row(isa, &mut o, &vec![1f32; g.len()], g);
                o
            },
        );
    }
}
