//! Position and timestep embeddings without weights: diffusers' `get_timestep_embedding`, and the
//! rotary embedding of FLUX (`FluxPosEmbed`, `get_1d_rotary_pos_embed`, `apply_rotary_emb`).

use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result};

/// Sinusoidal timestep embedding (diffusers' `get_timestep_embedding` with `scale` 1 and
/// `max_period` 10000), shape (len(t), dim), f32. diffusers computes the frequencies, the products
/// and sin/cos in float32; so does this, so that large timesteps round the same way.
pub fn timestep_embedding(
    t: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let max_period = 10000f64;
    let freqs: Vec<f32> = (0..half)
        .map(|i| {
            let e = (-(max_period.ln() as f32) * i as f32) / (half as f32 - freq_shift as f32);
            e.exp()
        })
        .collect();
    let mut rows = Vec::with_capacity(t.len() * dim);
    for &ts in t {
        let args: Vec<f32> = freqs.iter().map(|f| ts * f).collect();
        let sin = args.iter().map(|a| a.sin());
        let cos = args.iter().map(|a| a.cos());
        if flip_sin_to_cos {
            rows.extend(cos.chain(sin));
        } else {
            rows.extend(sin.chain(cos));
        }
        if dim % 2 == 1 {
            rows.push(0.0);
        }
    }
    Ok(Tensor::from_vec(rows, (t.len(), dim), device)?)
}

/// FLUX's multi-axis rotary table for position ids of shape (seq, axes): for each axis `i`,
/// `axes_dims[i]` channels rotate by `pos[:, i] * theta^(-2j/axes_dims[i])`. Returns `(cos, sin)`,
/// each (seq, sum(axes_dims)) f32 with every value repeated twice (`repeat_interleave_real`).
///
/// diffusers takes the ids as float32 and builds the angles and their cos/sin in float64 on the
/// CPU before casting to float32; this does the same, so long sequences keep their precision.
pub fn flux_rope(
    ids: &Tensor,
    axes_dims: &[usize],
    theta: f64,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (seq, axes) = ids.dims2()?;
    if axes != axes_dims.len() {
        return Err(Error::InvalidArgument(format!(
            "position ids have {axes} axes but the rotary embedding has {} (axes_dims_rope)",
            axes_dims.len()
        )));
    }
    if let Some(d) = axes_dims.iter().find(|d| *d % 2 == 1) {
        return Err(Error::InvalidArgument(format!(
            "rotary axis dimension {d} is odd"
        )));
    }
    let pos = ids.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let dim: usize = axes_dims.iter().sum();
    let freqs: Vec<Vec<f64>> = axes_dims
        .iter()
        .map(|&d| {
            (0..d)
                .step_by(2)
                .map(|j| 1.0 / theta.powf(j as f64 / d as f64))
                .collect()
        })
        .collect();
    let mut cos = Vec::with_capacity(seq * dim);
    let mut sin = Vec::with_capacity(seq * dim);
    for row in &pos {
        for (axis, f) in freqs.iter().enumerate() {
            let p = row[axis] as f64;
            for &w in f {
                let a = p * w;
                let (s, c) = (a.sin() as f32, a.cos() as f32);
                cos.extend([c, c]);
                sin.extend([s, s]);
            }
        }
    }
    Ok((
        Tensor::from_vec(cos, (seq, dim), device)?,
        Tensor::from_vec(sin, (seq, dim), device)?,
    ))
}

/// Rotates `x` (batch, heads, seq, head_dim) by a `(cos, sin)` table of shape (seq, head_dim),
/// treating channel pairs `(2j, 2j+1)` as complex numbers (diffusers' `apply_rotary_emb` with
/// `use_real_unbind_dim=-1`). In f32, cast back to `x`'s dtype.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let dims = x.dims().to_vec();
    let hd = x.dim(D::Minus1)?;
    let xf = x.to_dtype(DType::F32)?;
    let mut pairs = dims[..dims.len() - 1].to_vec();
    pairs.extend([hd / 2, 2]);
    let xp = xf.reshape(pairs)?;
    let re = xp.narrow(D::Minus1, 0, 1)?;
    let im = xp.narrow(D::Minus1, 1, 1)?;
    let rotated = Tensor::cat(&[&im.neg()?, &re], D::Minus1)?.reshape(dims)?;
    let out = xf
        .broadcast_mul(cos)?
        .broadcast_add(&rotated.broadcast_mul(sin)?)?;
    Ok(out.to_dtype(dtype)?)
}
