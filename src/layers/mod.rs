//! Building-block layers. Each holds [`Param`] handles and resolves them in `forward`, so the
//! residency manager decides where its weights are at that moment.

use candle_core::{DType, Module, Tensor, D};

use crate::error::Result;

pub mod conv2d;
use crate::residency::{Param, ParamPath};

pub struct Linear {
    weight: Param,
    bias: Option<Param>,
}

impl Linear {
    pub fn new(pp: &ParamPath, in_dim: usize, out_dim: usize, bias: bool) -> Self {
        Self {
            weight: pp.param("weight", &[out_dim, in_dim]),
            bias: bias.then(|| pp.param("bias", &[out_dim])),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.get()?;
        let b = self.bias.as_ref().map(Param::get).transpose()?;
        Ok(candle_nn::Linear::new(w, b).forward(x)?)
    }
}

pub struct Conv2d {
    weight: Param,
    bias: Option<Param>,
    cfg: candle_nn::Conv2dConfig,
}

impl Conv2d {
    pub fn new(
        pp: &ParamPath,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Self {
        Self {
            weight: pp.param("weight", &[out_c, in_c, kernel, kernel]),
            bias: Some(pp.param("bias", &[out_c])),
            cfg: candle_nn::Conv2dConfig {
                padding,
                stride,
                dilation: 1,
                groups: 1,
                cudnn_fwd_algo: None,
            },
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.get()?;
        let b = self.bias.as_ref().map(Param::get).transpose()?;
        if conv2d::supported(x, &w, self.cfg.stride, self.cfg.groups) {
            return conv2d::conv2d(x, &w, b.as_ref(), self.cfg.padding);
        }
        Ok(candle_nn::Conv2d::new(w, b, self.cfg).forward(x)?)
    }
}

pub struct GroupNorm {
    weight: Param,
    bias: Param,
    channels: usize,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(pp: &ParamPath, groups: usize, channels: usize, eps: f64) -> Self {
        Self {
            weight: pp.param("weight", &[channels]),
            bias: pp.param("bias", &[channels]),
            channels,
            groups,
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gn = candle_nn::GroupNorm::new(
            self.weight.get()?,
            self.bias.get()?,
            self.channels,
            self.groups,
            self.eps,
        )?;
        Ok(gn.forward(x)?)
    }
}

pub struct LayerNorm {
    weight: Param,
    bias: Param,
    eps: f64,
}

impl LayerNorm {
    pub fn new(pp: &ParamPath, dim: usize, eps: f64) -> Self {
        Self {
            weight: pp.param("weight", &[dim]),
            bias: pp.param("bias", &[dim]),
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(
            x,
            &self.weight.get()?,
            &self.bias.get()?,
            self.eps as f32,
        )?)
    }
}

pub struct Embedding {
    weight: Param,
    dim: usize,
}

impl Embedding {
    pub fn new(pp: &ParamPath, count: usize, dim: usize) -> Self {
        Self {
            weight: pp.param("weight", &[count, dim]),
            dim,
        }
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let w = self.weight.get()?;
        let mut shape = ids.dims().to_vec();
        shape.push(self.dim);
        Ok(w.index_select(&ids.flatten_all()?, 0)?.reshape(shape)?)
    }
}

/// Activation functions named in configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    Gelu,
    QuickGelu,
}

impl Activation {
    pub fn parse(file: &str, field: &str, name: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "quick_gelu" => Activation::QuickGelu,
            other => {
                return Err(crate::Error::unsupported(
                    file,
                    field,
                    format!("\"{other}\""),
                    "supported: silu, gelu, quick_gelu",
                ))
            }
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Silu => x.silu()?,
            // Exact (erf) GELU, as torch's default.
            Activation::Gelu => x.gelu_erf()?,
            Activation::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
        })
    }
}

/// Scaled dot-product attention over (batch, heads, seq, head_dim), softmax in f32.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let dtype = q.dtype();
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let (q, k) = if dtype == DType::F32 {
        (q.clone(), k.clone())
    } else {
        (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
    };
    let mut scores = ((q * scale)?.matmul(&k.t()?.contiguous()?))?;
    if let Some(m) = mask {
        scores = scores.broadcast_add(m)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    Ok(probs.matmul(&v.contiguous()?)?)
}
