//! Scaled dot-product attention over (…, seq, head_dim), softmax in f32.

use candle_core::{DType, Tensor, D};

use crate::error::Result;

/// Scaled dot-product attention over (batch, heads, seq, head_dim), softmax in f32.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    attention_scaled(q, k, v, mask, scale)
}

/// [`attention`] with an explicit score scale (T5 does not scale its scores: pass 1.0). `mask`
/// is added to the scores (an additive bias, e.g. T5's relative position bias).
pub fn attention_scaled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    // Softmax rows are independent, so long query sequences run in chunks whose score matrix
    // stays under ATTN_CHUNK_BYTES (the VAE's 128x128-latent attention would otherwise need a
    // 16384 x 16384 matrix at once). Chunking does not change a single value.
    const ATTN_CHUNK_BYTES: usize = 64 << 20;
    let q_len = q.dim(D::Minus2)?;
    let k_len = k.dim(D::Minus2)?;
    let lead: usize = q.dims()[..q.rank() - 2].iter().product();
    let per_row = lead * k_len * 4;
    let rows = (ATTN_CHUNK_BYTES / per_row.max(1)).max(1);
    let k_t = k.t()?.contiguous()?;
    let v = v.contiguous()?;
    if rows >= q_len {
        return attention_chunk(q, &k_t, &v, mask, scale);
    }
    let mut outs = Vec::new();
    let mut start = 0;
    while start < q_len {
        let n = rows.min(q_len - start);
        let qc = q.narrow(q.rank() - 2, start, n)?;
        let mc = match mask {
            Some(m) if m.dim(D::Minus2)? == q_len => Some(m.narrow(m.rank() - 2, start, n)?),
            other => other.cloned(),
        };
        outs.push(attention_chunk(&qc, &k_t, &v, mc.as_ref(), scale)?);
        start += n;
    }
    Ok(Tensor::cat(&outs, q.rank() - 2)?)
}

fn attention_chunk(
    q: &Tensor,
    k_t: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let (q, k_t) = if dtype == DType::F32 {
        (q.clone(), k_t.clone())
    } else {
        (q.to_dtype(DType::F32)?, k_t.to_dtype(DType::F32)?)
    };
    let mut scores = if scale == 1.0 {
        q.matmul(&k_t)?
    } else {
        (q * scale)?.matmul(&k_t)?
    };
    if let Some(m) = mask {
        scores = scores.broadcast_add(m)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    Ok(probs.matmul(v)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn chunked_attention_equals_whole() {
        let dev = Device::Cpu;
        // 5000 queries x 4096 keys: over the chunk budget, so it runs in two chunks.
        let q = Tensor::randn(0f32, 1.0, (1, 5000, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, 4096, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, 4096, 8), &dev).unwrap();
        let chunked = attention(&q, &k, &v, None).unwrap();
        let k_t = k.t().unwrap().contiguous().unwrap();
        let whole = attention_chunk(&q, &k_t, &v, None, 1.0 / 8f64.sqrt()).unwrap();
        assert!(max_abs_diff(&chunked, &whole) < 1e-6);
    }
}
