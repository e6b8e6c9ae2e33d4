//! `T5EncoderModel` (transformers): FLUX's `text_encoder_2` (T5 v1.1, gated-gelu).
//!
//! The relative position bias is a learned table indexed by bucketed token distance; T5 keeps it
//! in block 0 and shares it with every block, UMT5 (`UMT5EncoderModel`, otherwise the same
//! encoder) has one per block. Both are a [`RelativePositionBias`] held by the blocks that own
//! one; `architectures` in the config says which layout the checkpoint has.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::layers::{attention_scaled, Embedding, Linear, RmsNorm};
use crate::residency::{ModuleScope, Param, ParamPath, UnitScope, WeightProvider};
use crate::validate::{config_f32, count};

/// Where FLUX keeps the T5 config; named in config errors.
const FILE: &str = "text_encoder_2/config.json";

fn default_vocab() -> usize {
    32128
}
fn default_d_model() -> usize {
    512
}
fn default_d_kv() -> usize {
    64
}
fn default_d_ff() -> usize {
    2048
}
fn default_layers() -> usize {
    6
}
fn default_heads() -> usize {
    8
}
fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff_proj() -> String {
    "relu".into()
}

/// `config.json` of a T5 encoder; defaults are transformers' `T5Config` defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    #[serde(default = "default_d_model")]
    pub d_model: usize,
    #[serde(default = "default_d_kv")]
    pub d_kv: usize,
    #[serde(default = "default_d_ff")]
    pub d_ff: usize,
    #[serde(default = "default_layers")]
    pub num_layers: usize,
    #[serde(default = "default_heads")]
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `relu`, `gated-gelu`, `gated-silu`, ... (`dense_act_fn` and `is_gated_act` in saved
    /// configs are derived from it by transformers, so they are not read).
    #[serde(default = "default_ff_proj")]
    pub feed_forward_proj: String,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
}

/// The feed-forward activation of `T5DenseActDense` / `T5DenseGatedActDense`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedForwardAct {
    Relu,
    /// Exact (erf) GELU: transformers' `gelu`.
    Gelu,
    /// Tanh approximation: `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`.
    GeluTanh,
    Silu,
}

impl FeedForwardAct {
    fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            FeedForwardAct::Relu => x.relu()?,
            FeedForwardAct::Gelu => x.gelu_erf()?,
            FeedForwardAct::GeluTanh => x.gelu()?,
            FeedForwardAct::Silu => x.silu()?,
        })
    }
}

impl T5Config {
    /// `feed_forward_proj` parsed as transformers' `T5Config.__post_init__` does: an optional
    /// `gated-` prefix and an activation name; `gated-gelu` means `gelu_new` for backwards
    /// compatibility. Returns (gated, activation).
    pub fn feed_forward(&self) -> Result<(bool, FeedForwardAct)> {
        let s = self.feed_forward_proj.as_str();
        let parts: Vec<&str> = s.split('-').collect();
        let bad =
            |hint: &str| Error::unsupported(FILE, "feed_forward_proj", format!("\"{s}\""), hint);
        let (gated, act) = match parts.as_slice() {
            [act] => (false, *act),
            ["gated", act] => (true, *act),
            _ => {
                return Err(bad(
                    "expected `ACT` or `gated-ACT`, e.g. \"relu\" or \"gated-gelu\"",
                ))
            }
        };
        let act = match act {
            "relu" => FeedForwardAct::Relu,
            "gelu" if gated => FeedForwardAct::GeluTanh,
            "gelu" => FeedForwardAct::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => FeedForwardAct::GeluTanh,
            "silu" | "swish" => FeedForwardAct::Silu,
            _ => return Err(bad(
                "supported activations: relu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, silu",
            )),
        };
        Ok((gated, act))
    }

    /// Refuses the architectures this file does not implement, sizes out of range (zero or
    /// absurd) and bucket settings that would make the bucket math divide by zero.
    pub fn validate(&self) -> Result<()> {
        if let Some(arch) = &self.architectures {
            let ok = [
                "T5EncoderModel",
                "T5ForConditionalGeneration",
                "T5Model",
                "UMT5EncoderModel",
            ];
            if let Some(a) = arch.iter().find(|a| !ok.contains(&a.as_str())) {
                return Err(Error::unsupported(
                    FILE,
                    "architectures",
                    format!("\"{a}\""),
                    "supported: T5EncoderModel, UMT5EncoderModel (T5ForConditionalGeneration and \
                     T5Model are read for their encoder)",
                ));
            }
        }
        count(FILE, "vocab_size", self.vocab_size, 1, 1 << 24)?;
        count(FILE, "d_model", self.d_model, 1, 1 << 16)?;
        count(FILE, "d_kv", self.d_kv, 1, 1 << 12)?;
        count(FILE, "d_ff", self.d_ff, 1, 1 << 18)?;
        count(FILE, "num_layers", self.num_layers, 1, 256)?;
        count(FILE, "num_heads", self.num_heads, 1, 1024)?;
        // Bidirectional buckets: half per direction, half of those exact, so at least 4; the
        // log-spaced ones need max_distance above the exact range (else the log divides by 0).
        let nb = self.relative_attention_num_buckets;
        count(FILE, "relative_attention_num_buckets", nb, 4, 1 << 16)?;
        count(
            FILE,
            "relative_attention_max_distance",
            self.relative_attention_max_distance,
            nb / 4 + 1,
            1 << 24,
        )?;
        config_f32(FILE, "layer_norm_epsilon", self.layer_norm_epsilon, false)?;
        self.feed_forward().map(|_| ())
    }

    /// Whether every block has its own relative position bias (UMT5) rather than sharing
    /// block 0's (T5).
    pub fn bias_per_layer(&self) -> bool {
        self.architectures
            .iter()
            .flatten()
            .any(|a| a == "UMT5EncoderModel")
    }
}

/// transformers' `T5Attention._relative_position_bucket` for one relative position
/// (`key_pos - query_pos`), including its f32 log math, so bucket edges fall where torch's do.
pub fn relative_position_bucket(
    relative_position: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut nb = num_buckets;
    let mut bucket = 0;
    let rel = if bidirectional {
        nb /= 2;
        if relative_position > 0 {
            bucket += nb;
        }
        relative_position.unsigned_abs()
    } else {
        relative_position.min(0).unsigned_abs()
    };
    let max_exact = nb / 2;
    if (rel as usize) < max_exact {
        return bucket + rel as usize;
    }
    let scale = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
    let large = ((rel as f32) / (max_exact as f32)).ln() / scale * (nb - max_exact) as f32;
    // `.to(torch.long)` truncates toward zero; the value is >= 0 here.
    bucket + (max_exact + large as usize).min(nb.saturating_sub(1))
}

/// The learned relative position bias `relative_attention_bias` (num_buckets, heads).
pub struct RelativePositionBias {
    table: Embedding,
    num_buckets: usize,
    max_distance: usize,
    bidirectional: bool,
}

impl RelativePositionBias {
    pub fn new(
        pp: &ParamPath,
        heads: usize,
        num_buckets: usize,
        max_distance: usize,
        bidirectional: bool,
    ) -> Self {
        Self {
            table: Embedding::new(pp, num_buckets, heads),
            num_buckets,
            max_distance,
            bidirectional,
        }
    }

    /// The additive score bias (1, heads, q_len, k_len), in f32 for the f32 softmax.
    pub fn forward(&self, q_len: usize, k_len: usize, device: &Device) -> Result<Tensor> {
        let buckets: Vec<u32> = (0..q_len as i64)
            .flat_map(|q| {
                (0..k_len as i64).map(move |k| {
                    relative_position_bucket(
                        k - q,
                        self.bidirectional,
                        self.num_buckets,
                        self.max_distance,
                    ) as u32
                })
            })
            .collect();
        let ids = Tensor::from_vec(buckets, (q_len, k_len), device)?;
        Ok(self
            .table
            .forward(&ids)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .to_dtype(DType::F32)?)
    }
}

enum FeedForward {
    Plain { wi: Linear },
    Gated { wi_0: Linear, wi_1: Linear },
}

struct Block {
    unit: UnitScope,
    /// Where the checkpoint has one (T5: block 0, UMT5: every block); the others reuse the
    /// last one computed.
    rel_bias: Option<RelativePositionBias>,
    ln_attn: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln_ff: RmsNorm,
    ff: FeedForward,
    /// `wo` as a bare weight: it runs in the residual stream's dtype (see `forward`).
    wo: Param,
}

pub struct T5EncoderModel {
    cfg: T5Config,
    src: std::sync::Arc<dyn WeightProvider>,
    act: FeedForwardAct,
    embed: Embedding,
    embed_unit: String,
    blocks: Vec<Block>,
    final_ln: RmsNorm,
}

impl T5EncoderModel {
    pub fn new(pp: &ParamPath, cfg: &T5Config) -> Result<Self> {
        cfg.validate()?;
        let (gated, act) = cfg.feed_forward()?;
        let enc = pp.pp("encoder");
        let blocks_pp = enc.pp("block");
        let per_layer = cfg.bias_per_layer();
        let (d, inner, eps) = (
            cfg.d_model,
            cfg.num_heads * cfg.d_kv,
            cfg.layer_norm_epsilon,
        );
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let b = blocks_pp.pp(i);
                let a = b.pp("layer").pp(0);
                let sa = a.pp("SelfAttention");
                let f = b.pp("layer").pp(1);
                let ffp = f.pp("DenseReluDense");
                Block {
                    unit: UnitScope::new(&b),
                    rel_bias: (i == 0 || per_layer).then(|| {
                        RelativePositionBias::new(
                            &sa.pp("relative_attention_bias"),
                            cfg.num_heads,
                            cfg.relative_attention_num_buckets,
                            cfg.relative_attention_max_distance,
                            true,
                        )
                    }),
                    ln_attn: RmsNorm::new(&a.pp("layer_norm"), d, eps),
                    q: Linear::new(&sa.pp("q"), d, inner, false),
                    k: Linear::new(&sa.pp("k"), d, inner, false),
                    v: Linear::new(&sa.pp("v"), d, inner, false),
                    o: Linear::new(&sa.pp("o"), inner, d, false),
                    ln_ff: RmsNorm::new(&f.pp("layer_norm"), d, eps),
                    ff: if gated {
                        FeedForward::Gated {
                            wi_0: Linear::new(&ffp.pp("wi_0"), d, cfg.d_ff, false),
                            wi_1: Linear::new(&ffp.pp("wi_1"), d, cfg.d_ff, false),
                        }
                    } else {
                        FeedForward::Plain {
                            wi: Linear::new(&ffp.pp("wi"), d, cfg.d_ff, false),
                        }
                    },
                    wo: ffp.pp("wo").param("weight", &[d, cfg.d_ff]),
                }
            })
            .collect();
        // transformers saves the tied table as `shared.weight` and/or
        // `encoder.embed_tokens.weight` depending on version and class.
        let embed_pp = if enc.has("embed_tokens.weight") {
            enc.pp("embed_tokens")
        } else {
            pp.pp("shared")
        };
        Ok(Self {
            cfg: cfg.clone(),
            src: pp.provider().clone(),
            act,
            embed: Embedding::new(&embed_pp, cfg.vocab_size, d),
            embed_unit: embed_pp.prefix().to_string(),
            blocks,
            final_ln: RmsNorm::new(&enc.pp("final_layer_norm"), d, eps),
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.cfg
    }

    /// `last_hidden_state` (batch, seq, d_model) for token ids (batch, seq), with no attention
    /// mask: FLUX calls `text_encoder_2(input_ids)`, so padding tokens attend and are attended.
    ///
    /// Under f16 the residual stream and `wo` run in f32: T5 v1.1's activations overflow f16
    /// otherwise. transformers does much the same (`wo` is in `_keep_in_fp32_modules` under
    /// f16, and adding its f32 output promotes the residual stream to f32).
    pub fn forward(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        self.encode(ids, None, dtype)
    }

    /// [`T5EncoderModel::forward`] with an attention mask (batch, seq), 1 (or any positive
    /// value) for real tokens and 0 for padding, as transformers' `UMT5EncoderModel(input_ids,
    /// attention_mask)` runs it for Wan: masked keys get the most negative f32 added to their
    /// scores, so no token attends to padding (padding rows still get outputs, which
    /// [`wan_prompt_embeds`] then zeroes).
    pub fn forward_masked(&self, ids: &Tensor, mask: &Tensor, dtype: DType) -> Result<Tensor> {
        self.encode(ids, Some(mask), dtype)
    }

    fn encode(&self, ids: &Tensor, mask: Option<&Tensor>, dtype: DType) -> Result<Tensor> {
        let (b, seq) = ids.dims2()?;
        if b == 0 || seq == 0 {
            return Err(Error::InvalidArgument(format!(
                "T5 encoder: empty input ids of shape ({b}, {seq})"
            )));
        }
        let max_id = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max_id as usize >= self.cfg.vocab_size {
            return Err(Error::InvalidArgument(format!(
                "T5 encoder: token id {max_id} is outside its vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        let mask_bias = mask.map(|m| key_mask_bias(m, b, seq)).transpose()?;
        let stream = if dtype == DType::F16 {
            DType::F32
        } else {
            dtype
        };
        let src = self.src.as_ref();
        let scope = ModuleScope::enter(src, &self.embed_unit)?;
        let mut x = self.embed.forward(ids)?.to_dtype(stream)?;
        scope.exit()?;
        let (heads, dk) = (self.cfg.num_heads, self.cfg.d_kv);
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, seq, heads, dk))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let mut bias: Option<Tensor> = None;
        for blk in &self.blocks {
            x = blk.unit.run(|| {
                if let Some(rb) = &blk.rel_bias {
                    let rel = rb.forward(seq, seq, ids.device())?;
                    // The mask is 0 on real keys, so adding it leaves their bias exact.
                    bias = Some(match &mask_bias {
                        Some(m) => rel.broadcast_add(m)?,
                        None => rel,
                    });
                }
                let h = blk.ln_attn.forward(&x)?.to_dtype(dtype)?;
                let (q, k, v) = (
                    split(blk.q.forward(&h)?)?,
                    split(blk.k.forward(&h)?)?,
                    split(blk.v.forward(&h)?)?,
                );
                // T5 does not scale its scores (the scale is folded into its init).
                let a = attention_scaled(&q, &k, &v, bias.as_ref(), 1.0)?
                    .transpose(1, 2)?
                    .reshape((b, seq, heads * dk))?;
                let x = (&x + blk.o.forward(&a)?.to_dtype(stream)?)?;
                let h = blk.ln_ff.forward(&x)?.to_dtype(dtype)?;
                let h = match &blk.ff {
                    FeedForward::Plain { wi } => self.act.forward(&wi.forward(&h)?)?,
                    FeedForward::Gated { wi_0, wi_1 } => {
                        (self.act.forward(&wi_0.forward(&h)?)? * wi_1.forward(&h)?)?
                    }
                };
                let wo = blk.wo.get()?.to_dtype(stream)?;
                let h = h.to_dtype(stream)?.broadcast_matmul(&wo.t()?)?;
                Ok((x + h)?)
            })?;
        }
        let scope = ModuleScope::enter(src, "encoder.final_layer_norm")?;
        let out = self.final_ln.forward(&x)?.to_dtype(dtype)?;
        scope.exit()?;
        Ok(out)
    }
}

/// The additive key mask (batch, 1, 1, seq) of an attention mask (batch, seq): 0 where the
/// mask is positive, `f32::MIN` elsewhere (transformers' `finfo(float32).min`).
fn key_mask_bias(mask: &Tensor, b: usize, seq: usize) -> Result<Tensor> {
    if mask.dims() != [b, seq] {
        return Err(Error::InvalidArgument(format!(
            "T5 encoder: attention mask has shape {:?}, the input ids ({b}, {seq})",
            mask.dims()
        )));
    }
    let rows = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    if let Some(i) = rows.iter().position(|r| !r.iter().any(|&v| v > 0.0)) {
        return Err(Error::InvalidArgument(format!(
            "T5 encoder: attention mask row {i} masks every token"
        )));
    }
    let bias: Vec<f32> = rows
        .iter()
        .flatten()
        .map(|&v| if v > 0.0 { 0.0 } else { f32::MIN })
        .collect();
    Ok(Tensor::from_vec(bias, (b, 1, 1, seq), mask.device())?)
}

/// What diffusers' Wan pipeline (`_get_t5_prompt_embeds`) makes of the UMT5 output: per prompt,
/// the first `seq_len` rows (`seq_len` = the number of positive mask entries) followed by zero
/// rows up to the padded length. `last_hidden_state` (batch, max_sequence_length, d_model) and
/// `mask` (batch, max_sequence_length) as given to [`T5EncoderModel::forward_masked`]; the
/// result has `last_hidden_state`'s shape and dtype.
pub fn wan_prompt_embeds(last_hidden_state: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, len, d) = last_hidden_state.dims3()?;
    if mask.dims() != [b, len] {
        return Err(Error::InvalidArgument(format!(
            "Wan prompt embeddings: mask has shape {:?}, expected ({b}, {len})",
            mask.dims()
        )));
    }
    let rows = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut out = Vec::with_capacity(b);
    for (i, r) in rows.iter().enumerate() {
        let n = r.iter().filter(|&&v| v > 0.0).count();
        let kept = last_hidden_state.get(i)?.narrow(0, 0, n)?;
        let pad = Tensor::zeros(
            (len - n, d),
            last_hidden_state.dtype(),
            last_hidden_state.device(),
        )?;
        out.push(Tensor::cat(&[kept, pad], 0)?);
    }
    Ok(Tensor::stack(&out, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bucket edges for relative positions -1100..=1100, from torch (transformers 5.24):
    /// `T5Attention._relative_position_bucket(torch.arange(-1100, 1101), True, nb, md)`;
    /// the sum of all buckets and the positive positions where the bucket changes.
    #[test]
    fn buckets_match_torch() {
        let cases: [(usize, usize, usize, &[i64]); 4] = [
            (
                32,
                128,
                49990,
                &[1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 23, 32, 46, 64, 91],
            ),
            (
                32,
                64,
                50188,
                &[1, 2, 3, 4, 5, 6, 7, 8, 11, 14, 18, 23, 30, 39, 50],
            ),
            (
                64,
                256,
                100670,
                &[
                    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 20, 23, 27, 32, 39, 46,
                    54, 64, 77, 91, 108, 128, 153, 182, 216,
                ],
            ),
            (16, 64, 24082, &[1, 2, 3, 4, 8, 16, 32]),
        ];
        for (nb, md, sum, changes) in cases {
            let b: Vec<usize> = (-1100..=1100)
                .map(|r| relative_position_bucket(r, true, nb, md))
                .collect();
            assert_eq!(b.iter().sum::<usize>(), sum, "sum for ({nb}, {md})");
            let got: Vec<i64> = (1..b.len())
                .filter(|&i| b[i] != b[i - 1] && i as i64 - 1100 > 0)
                .map(|i| i as i64 - 1100)
                .collect();
            assert_eq!(got, changes, "bucket edges for ({nb}, {md})");
        }
    }
}
