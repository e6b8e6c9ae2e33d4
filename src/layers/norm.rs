//! Fused GroupNorm (+ SiLU) for contiguous f32 CPU tensors: one pass for the statistics and one
//! for the output, a single allocation, instead of the half-dozen full-size temporaries of a
//! composed implementation.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::with_cpu_f32;
use crate::error::{Error, Result};

pub fn supported(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && x.rank() >= 2
}

/// GroupNorm folded into per-(batch, channel) coefficients: `norm(x)·gamma + beta = x·a + b`.
/// Statistics are accumulated in f64.
pub fn coefficients(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let dims = x.dims().to_vec();
    let (n, c) = (dims[0], dims[1]);
    if c % groups != 0 {
        return Err(Error::InvalidArgument(format!(
            "group_norm: {c} channels do not split into {groups} groups"
        )));
    }
    let hw: usize = dims[2..].iter().product();
    let cg = c / groups;
    let gamma = gamma.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let beta = beta.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let len = cg * hw;
    let stats: Vec<(f64, f64)> = with_cpu_f32(x, |src| {
        Ok(src
            .par_chunks(len)
            .map(|s| {
                let mean = s.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
                let var = s
                    .iter()
                    .map(|&v| {
                        let d = v as f64 - mean;
                        d * d
                    })
                    .sum::<f64>()
                    / len as f64;
                (mean, 1.0 / (var + eps).sqrt())
            })
            .collect())
    })?;
    let mut a = Vec::with_capacity(n * c);
    let mut b = Vec::with_capacity(n * c);
    for bi in 0..n {
        for cc in 0..c {
            let (mean, rstd) = stats[bi * groups + cc / cg];
            a.push((rstd * gamma[cc] as f64) as f32);
            b.push((beta[cc] as f64 - mean * rstd * gamma[cc] as f64) as f32);
        }
    }
    Ok((a, b))
}

/// `group_norm(x) * gamma + beta`, then SiLU when `silu`, in one output allocation.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    // One contiguous view for both passes.
    let x = x.contiguous()?;
    let (a, b) = coefficients(&x, groups, gamma, beta, eps)?;
    let dims = x.dims().to_vec();
    let hw: usize = dims[2..].iter().product();
    let mut out = vec![0f32; x.elem_count()];
    let isa = super::simd::Isa::detect();
    with_cpu_f32(&x, |src| {
        out.par_chunks_mut(hw)
            .zip(src.par_chunks(hw))
            .enumerate()
            .for_each(|(i, (o, s))| super::simd::affine_silu_from(isa, o, s, a[i], b[i], silu));
        Ok(())
    })?;
    Ok(Tensor::from_vec(out, dims, x.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;

    #[test]
    fn matches_candle_group_norm_and_silu() {
        let dev = Device::Cpu;
        // Seeded: an unseeded draw could put a group's values (two of them in the 1x1 case) so
        // close together that the normalisation amplifies rounding past the tolerance.
        let mut rng = crate::rng::TorchRng::new(11);
        let mut randn = |shape: &[usize], std: f32| {
            let n = shape.iter().product();
            let v: Vec<f32> = rng.randn(n).into_iter().map(|x| x * std).collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        for (n, c, h, w, g) in [(2, 32, 5, 7, 8), (1, 6, 1, 1, 3), (3, 16, 9, 4, 16)] {
            let x = (randn(&[n, c, h, w], 2.0) + 3.0).unwrap();
            let gamma = randn(&[c], 1.0);
            let beta = randn(&[c], 1.0);
            let reference = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, g, 1e-6)
                .unwrap()
                .forward(&x)
                .unwrap();
            for silu in [false, true] {
                let want = if silu {
                    reference.silu().unwrap()
                } else {
                    reference.clone()
                };
                let got = group_norm(&x, g, &gamma, &beta, 1e-6, silu).unwrap();
                assert!(
                    crate::layers::max_abs_diff(&got, &want) < 2e-5,
                    "{n} {c} {h} {w} {g} silu={silu}"
                );
            }
        }
    }
}
