//! CPU f32 kernels for the transformer blocks' dense work: a linear layer with its bias fused
//! into the GEMM (the accumulator starts at the bias, so no second pass over the output and no
//! extra tensor), and GEGLU's `hidden · gelu(gate)` in one pass over the projection.

use candle_core::{DType, Device, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::with_cpu_f32;
use crate::error::Result;

/// Whether [`linear`] and [`geglu`] take these tensors (CPU, f32).
pub fn supported(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32)
}

/// `x · wᵀ + b` over the last dim of `x` (`(…, k)`), `w` `(n, k)` as stored.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    let dims = x.dims();
    let m = x.elem_count() / k.max(1);
    let mut out = vec![0f32; m * n];
    if let Some(b) = b {
        let b = b.to_vec1::<f32>()?;
        out.par_chunks_mut(n)
            .for_each(|row| row.copy_from_slice(&b));
    }
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 && m * n * k >= 1 << 16 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    with_cpu_f32(x, |xs| {
        with_cpu_f32(w, |ws| {
            // SAFETY: dst is m × n row-major (`out`); lhs is x as m × k row-major; rhs is wᵀ,
            // k × n, read from w (n × k row-major) with row stride 1 and column stride k.
            // Every index stays inside its buffer, and dst aliases neither input.
            unsafe {
                // gemm(m, n, k, dst, dst_cs, dst_rs, read_dst, lhs, lhs_cs, lhs_rs, rhs,
                // rhs_cs, rhs_rs, alpha, beta, conj.., par): dst = alpha·dst + beta·lhs·rhs.
                #[rustfmt::skip]
                gemm(m, n, k, out.as_mut_ptr(), 1, n as isize, b.is_some(),
                     xs.as_ptr(), 1, k as isize, ws.as_ptr(), k as isize, 1,
                     1.0f32, 1.0f32, false, false, false, par);
            }
            Ok(())
        })
    })?;
    let mut shape = dims.to_vec();
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    Ok(Tensor::from_vec(out, shape, x.device())?)
}

/// diffusers' `GEGLU` after its projection: `p` is `(…, 2f)`, the result `(…, f)` is
/// `p[.., :f] · gelu(p[.., f:])` with the exact (erf) GELU, row by row in parallel.
pub fn geglu(p: &Tensor) -> Result<Tensor> {
    let dims = p.dims();
    let two_f = *dims.last().unwrap_or(&0);
    let f = two_f / 2;
    let rows = p.elem_count() / two_f.max(1);
    let mut out = vec![0f32; rows * f];
    with_cpu_f32(p, |ps| {
        out.par_chunks_mut(f.max(1))
            .zip(ps.par_chunks(two_f.max(1)))
            .for_each(|(o, row)| {
                let (hidden, gate) = row.split_at(f);
                for ((o, &h), &g) in o.iter_mut().zip(hidden).zip(gate) {
                    *o = h * gelu_erf(g);
                }
            });
        Ok(())
    })?;
    let mut shape = dims.to_vec();
    if let Some(last) = shape.last_mut() {
        *last = f;
    }
    Ok(Tensor::from_vec(out, shape, p.device())?)
}

/// `x · Φ(x)` with the same `erff` candle's `gelu_erf` uses, so results are unchanged.
#[inline]
fn gelu_erf(x: f32) -> f32 {
    (libm::erff(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::max_abs;

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

    #[test]
    fn geglu_equals_the_composed_ops() {
        let p = Tensor::randn(0f32, 2.0, (2, 9, 2 * 13), &Device::Cpu).unwrap();
        let want = (p.narrow(2, 0, 13).unwrap() * p.narrow(2, 13, 13).unwrap().gelu_erf().unwrap())
            .unwrap();
        let got = geglu(&p).unwrap();
        assert_eq!(got.dims(), &[2, 9, 13]);
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}
