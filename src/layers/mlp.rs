//! The two-linear MLPs diffusers' transformers share: `TimestepEmbedding` /
//! `PixArtAlphaTextProjection` (`linear_1`, activation, `linear_2`) and `FeedForward`
//! (`net.0.proj`, activation, `net.2`).

use candle_core::Tensor;

use super::{Activation, Linear};
use crate::error::Result;
use crate::residency::ParamPath;

/// `linear_2(act(linear_1(x)))`: diffusers' `TimestepEmbedding` and
/// `PixArtAlphaTextProjection`, which share parameter names.
pub struct Mlp {
    linear_1: Linear,
    linear_2: Linear,
    act: Activation,
}

impl Mlp {
    /// `in_dim -> dim -> dim`, the shape every diffusers embedder of this kind has.
    pub fn new(pp: &ParamPath, in_dim: usize, dim: usize, act: Activation) -> Self {
        Self {
            linear_1: Linear::new(&pp.pp("linear_1"), in_dim, dim, true),
            linear_2: Linear::new(&pp.pp("linear_2"), dim, dim, true),
            act,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&self.act.forward(&self.linear_1.forward(x)?)?)
    }
}

/// `FeedForward(activation_fn="gelu-approximate")`: `net.2(gelu_tanh(net.0.proj(x)))`.
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    /// `dim -> inner -> dim` (`inner_dim`, or `dim * mult` in diffusers' terms).
    pub fn new(pp: &ParamPath, dim: usize, inner: usize) -> Self {
        let net = pp.pp("net");
        Self {
            proj: Linear::new(&net.pp(0).pp("proj"), dim, inner, true),
            out: Linear::new(&net.pp(2), inner, dim, true),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's `gelu` is the tanh approximation (torch's `approximate="tanh"`).
        let h = self
            .proj
            .forward_ext(x, super::dense::Epilogue::GeluTanh, None)?;
        self.out.forward(&h)
    }
}
