//! `WanRMS_norm`: each pixel's channel vector scaled to unit L2 norm (`F.normalize` over dim 1,
//! eps 1e-12), times `sqrt(C)` and a learned per-channel `gamma`; optionally followed by SiLU.
//!
//! Unlike GroupNorm it cannot be folded into the next conv's per-channel prologue (the scale is
//! per pixel), so it is one fused pass producing a single output tensor.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::layers::with_cpu_f32;
use crate::residency::{Param, ParamPath};

/// F.normalize's default eps.
const EPS: f32 = 1e-12;

pub(crate) struct ChannelRmsNorm {
    gamma: Param,
    channels: usize,
}

impl ChannelRmsNorm {
    /// `images`: diffusers' flag for the attention block's norm, whose gamma is (C, 1, 1)
    /// rather than the (C, 1, 1, 1) of the video norms.
    pub fn new(pp: &ParamPath, channels: usize, images: bool) -> Self {
        let shape: &[usize] = if images {
            &[channels, 1, 1]
        } else {
            &[channels, 1, 1, 1]
        };
        Self {
            gamma: pp.param("gamma", shape),
            channels,
        }
    }

    /// The norm of one frame (B, C, H, W), then SiLU when `silu`.
    pub fn forward(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let gamma = self.gamma.get()?.flatten_all()?;
        let scale = (self.channels as f64).sqrt();
        if matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && x.rank() >= 2 {
            return fused(x, &gamma, scale as f32, silu);
        }
        // Other devices and dtypes: the composed ops, in f32 as diffusers does for half types.
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let norm = xf
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .clamp(EPS, f32::INFINITY)?;
        let mut shape = vec![1usize; x.rank()];
        shape[1] = self.channels;
        let g = gamma.to_dtype(DType::F32)?.reshape(shape)?;
        let y = (xf.broadcast_div(&norm)? * scale)?.broadcast_mul(&g)?;
        let y = if silu { y.silu()? } else { y };
        Ok(y.to_dtype(dtype)?)
    }
}

fn fused(x: &Tensor, gamma: &Tensor, scale: f32, silu: bool) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (n, c) = (dims[0], dims[1]);
    let px: usize = dims[2..].iter().product();
    let g = gamma.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let mut out = vec![0f32; x.elem_count()];
    with_cpu_f32(x, |src| {
        for b in 0..n {
            let xs = &src[b * c * px..(b + 1) * c * px];
            // Per-pixel norms, accumulated channel by channel over blocks of pixels.
            let mut norm = vec![0f32; px];
            norm.par_chunks_mut(4096)
                .enumerate()
                .for_each(|(blk, acc)| {
                    let p0 = blk * 4096;
                    for ci in 0..c {
                        let row = &xs[ci * px + p0..ci * px + p0 + acc.len()];
                        for (a, &v) in acc.iter_mut().zip(row) {
                            *a += v * v;
                        }
                    }
                    for a in acc.iter_mut() {
                        *a = a.sqrt().max(EPS);
                    }
                });
            out[b * c * px..(b + 1) * c * px]
                .par_chunks_mut(px)
                .zip(xs.par_chunks(px))
                .enumerate()
                .for_each(|(ci, (o, s))| {
                    for ((ov, &sv), &d) in o.iter_mut().zip(s).zip(&norm) {
                        // (x / ‖x‖) · sqrt(C) · gamma, in torch's order.
                        let y = sv / d * scale * g[ci];
                        *ov = if silu { y / (1.0 + (-y).exp()) } else { y };
                    }
                });
        }
        Ok(())
    })?;
    Ok(Tensor::from_vec(out, dims, x.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Arc;

    struct Fixed(HashMap<String, Tensor>);

    impl crate::residency::WeightProvider for Fixed {
        fn get(&self, spec: &crate::residency::ParamSpec) -> Result<Tensor> {
            Ok(self.0[&spec.name].clone())
        }
        fn contains(&self, name: &str) -> bool {
            self.0.contains_key(name)
        }
        fn device(&self) -> Device {
            Device::Cpu
        }
        fn dtype(&self) -> DType {
            DType::F32
        }
    }

    #[test]
    fn fused_equals_composed() {
        let dev = Device::Cpu;
        let c = 6;
        let gamma = Tensor::randn(1f32, 0.2, (c, 1, 1, 1), &dev).unwrap();
        let norm = ChannelRmsNorm::new(
            &ParamPath::root(Arc::new(Fixed([("gamma".to_string(), gamma)].into()))),
            c,
            false,
        );
        // 70 x 90 pixels: more than one pixel block.
        let x = Tensor::randn(0f32, 2.0, (2, c, 70, 90), &dev).unwrap();
        for silu in [false, true] {
            let fused = norm.forward(&x, silu).unwrap();
            let composed = norm
                .forward(&x.to_dtype(DType::F64).unwrap(), silu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            assert!(crate::layers::max_abs_diff(&fused, &composed) < 1e-5);
        }
        // A zero pixel stays zero (eps), rather than becoming NaN.
        let z = Tensor::zeros((1, c, 2, 2), DType::F32, &dev).unwrap();
        let y = norm.forward(&z, false).unwrap();
        assert_eq!(crate::layers::max_abs_diff(&y, &z), 0.0);
    }
}
