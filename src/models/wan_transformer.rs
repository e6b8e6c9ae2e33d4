//! `WanTransformer3DModel` (diffusers 0.42.1, `models/transformers/transformer_wan.py`): the Wan
//! 2.1 / 2.2 video DiT for text-to-video. Video latents are cut into non-overlapping 3-D patches,
//! each block runs self-attention with a 3-axis rotary embedding (frames, height, width),
//! cross-attention to the UMT5 text and a feed-forward, all modulated by the timestep through a
//! learned `scale_shift_table`. Every `blocks.{i}` is an offload unit.
//!
//! Wan 2.2 TI2V (`expand_timesteps`) passes one timestep per token, shape (batch, seq). Such a
//! timestep holds few distinct values (the noise level, and 0 for conditioning frames), so the
//! embedding runs once per distinct value and is gathered per token where it is used: the same
//! values as diffusers' per-token embedding, without its (batch, seq, 6 * dim) table.

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::layers::embeddings::{apply_rope, flux_rope, timestep_embedding};
use crate::layers::{attention, layer_norm_f32, Activation, FeedForward, Linear, Mlp, RmsNorm};
use crate::residency::{ModuleScope, Param, ParamPath, UnitScope, WeightProvider};
use crate::validate::{config_f32, count};

const FILE: &str = "transformer/config.json";
/// `WanRotaryPosEmbed(theta=10000)`.
const ROPE_THETA: f64 = 10000.0;
/// Rows of the feed-forward run at once: its hidden layer is `ffn_dim` wide (13824 in the 14B
/// model), so whole-sequence activations would be the largest tensors of a call. Rows are
/// independent, so chunking changes no value.
const FFN_CHUNK_ROWS: usize = 4096;

fn d_patch() -> Vec<usize> {
    vec![1, 2, 2]
}
fn d_heads() -> usize {
    40
}
fn d_head_dim() -> usize {
    128
}
fn d_channels() -> usize {
    16
}
fn d_out_channels() -> Option<usize> {
    Some(16)
}
fn d_text_dim() -> usize {
    4096
}
fn d_freq_dim() -> usize {
    256
}
fn d_ffn_dim() -> usize {
    13824
}
fn d_layers() -> usize {
    40
}
fn d_true() -> bool {
    true
}
fn d_qk_norm() -> Option<String> {
    Some("rms_norm_across_heads".into())
}
fn d_eps() -> f64 {
    1e-6
}
fn d_rope_len() -> usize {
    1024
}

/// `transformer/config.json`; every default is diffusers' `WanTransformer3DModel.__init__`
/// default.
#[derive(Debug, Clone, Deserialize)]
pub struct WanTransformerConfig {
    /// (frames, height, width) of one patch.
    #[serde(default = "d_patch")]
    pub patch_size: Vec<usize>,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "d_channels")]
    pub in_channels: usize,
    #[serde(default = "d_out_channels")]
    pub out_channels: Option<usize>,
    #[serde(default = "d_text_dim")]
    pub text_dim: usize,
    #[serde(default = "d_freq_dim")]
    pub freq_dim: usize,
    #[serde(default = "d_ffn_dim")]
    pub ffn_dim: usize,
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    #[serde(default = "d_true")]
    pub cross_attn_norm: bool,
    #[serde(default = "d_qk_norm")]
    pub qk_norm: Option<String>,
    #[serde(default = "d_eps")]
    pub eps: f64,
    /// The CLIP image embedding of Wan 2.1 I2V: refused (text-to-video only).
    #[serde(default)]
    pub image_dim: Option<usize>,
    /// The image key/value projections of Wan I2V: refused.
    #[serde(default)]
    pub added_kv_proj_dim: Option<usize>,
    #[serde(default = "d_rope_len")]
    pub rope_max_seq_len: usize,
    /// Read by diffusers' image embedder only, which text-to-video models do not have.
    #[serde(default)]
    pub pos_embed_seq_len: Option<usize>,
}

impl WanTransformerConfig {
    /// `out_channels or in_channels`, as diffusers reads it (0 and null both fall back).
    pub fn out_channels(&self) -> usize {
        match self.out_channels {
            Some(c) if c > 0 => c,
            _ => self.in_channels,
        }
    }

    /// `num_attention_heads * attention_head_dim`, the model width.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// The patch as (frames, height, width); call after [`WanTransformerConfig::validate`].
    pub fn patch(&self) -> (usize, usize, usize) {
        match self.patch_size.as_slice() {
            [t, h, w] => (*t, *h, *w),
            _ => (1, 1, 1),
        }
    }

    /// `WanRotaryPosEmbed`'s split of a head's channels over (frames, height, width): height and
    /// width get `2 * (head_dim // 6)` each, frames the rest.
    pub fn rope_axes(&self) -> [usize; 3] {
        let hw = 2 * (self.attention_head_dim / 6);
        [self.attention_head_dim - 2 * hw, hw, hw]
    }

    /// Refuses every value that would size a tensor or a loop wrongly, and the image-to-video
    /// options, naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.patch_size.len() != 3 {
            return Err(Error::unsupported(
                FILE,
                "patch_size",
                format!("{:?}", self.patch_size),
                "needs three sizes: (frames, height, width)",
            ));
        }
        for &p in &self.patch_size {
            count(FILE, "patch_size", p, 1, 64)?;
        }
        count(
            FILE,
            "num_attention_heads",
            self.num_attention_heads,
            1,
            1024,
        )?;
        count(FILE, "attention_head_dim", self.attention_head_dim, 2, 4096)?;
        if self.attention_head_dim % 2 == 1 {
            return Err(Error::unsupported(
                FILE,
                "attention_head_dim",
                self.attention_head_dim,
                "must be even (the rotary embedding turns channel pairs)",
            ));
        }
        count(FILE, "in_channels", self.in_channels, 1, 1 << 16)?;
        if let Some(c) = self.out_channels {
            count(FILE, "out_channels", c, 0, 1 << 16)?;
        }
        count(FILE, "text_dim", self.text_dim, 1, 1 << 16)?;
        // `get_timestep_embedding` divides by `freq_dim / 2`.
        count(FILE, "freq_dim", self.freq_dim, 2, 1 << 16)?;
        count(FILE, "ffn_dim", self.ffn_dim, 1, 1 << 20)?;
        count(FILE, "num_layers", self.num_layers, 0, 1024)?;
        count(FILE, "rope_max_seq_len", self.rope_max_seq_len, 1, 1 << 20)?;
        let eps = config_f32(FILE, "eps", self.eps, false)?;
        if eps < 0.0 {
            return Err(Error::unsupported(
                FILE,
                "eps",
                self.eps,
                "must be positive",
            ));
        }
        match self.qk_norm.as_deref() {
            None | Some("rms_norm_across_heads") => {}
            Some(other) => {
                return Err(Error::unsupported(
                    FILE,
                    "qk_norm",
                    format!("\"{other}\""),
                    "only \"rms_norm_across_heads\" (diffusers builds that norm whatever the \
                     value says)",
                ))
            }
        }
        if let Some(d) = self.image_dim {
            return Err(Error::unsupported(
                FILE,
                "image_dim",
                d,
                "image-to-video (Wan I2V) is not supported; use a text-to-video model",
            ));
        }
        if let Some(d) = self.added_kv_proj_dim {
            return Err(Error::unsupported(
                FILE,
                "added_kv_proj_dim",
                d,
                "image-to-video (Wan I2V) is not supported; use a text-to-video model",
            ));
        }
        Ok(())
    }
}

/// The rotary table (seq, head_dim) of the patch grid.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// `WanAttention` without the image branch: q/k/v projections, RMS norm of q and k across all
/// heads (before the head split), rotary embedding in self-attention.
struct WanAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    heads: usize,
}

impl WanAttention {
    fn new(pp: &ParamPath, dim: usize, heads: usize, eps: f64) -> Self {
        Self {
            to_q: Linear::new(&pp.pp("to_q"), dim, dim, true),
            to_k: Linear::new(&pp.pp("to_k"), dim, dim, true),
            to_v: Linear::new(&pp.pp("to_v"), dim, dim, true),
            to_out: Linear::new(&pp.pp("to_out").pp(0), dim, dim, true),
            norm_q: RmsNorm::new(&pp.pp("norm_q"), dim, eps),
            norm_k: RmsNorm::new(&pp.pp("norm_k"), dim, eps),
            heads,
        }
    }

    /// Self-attention with `rope` when `context` is `None`, cross-attention to `context`
    /// otherwise.
    fn forward(&self, x: &Tensor, context: Option<&Tensor>, rope: Option<&Rope>) -> Result<Tensor> {
        let kv = context.unwrap_or(x);
        let heads_first = |t: Tensor| -> Result<Tensor> {
            let (b, n, _) = t.dims3()?;
            Ok(t.reshape((b, n, self.heads, ()))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let mut q = heads_first(self.norm_q.forward(&self.to_q.forward(x)?)?)?;
        let mut k = heads_first(self.norm_k.forward(&self.to_k.forward(kv)?)?)?;
        let v = heads_first(self.to_v.forward(kv)?)?;
        if let Some(r) = rope {
            q = apply_rope(&q, &r.cos, &r.sin)?;
            k = apply_rope(&k, &r.cos, &r.sin)?;
        }
        let (b, h, n, hd) = q.dims4()?;
        let o = attention(&q, &k, &v, None)?
            .transpose(1, 2)?
            .reshape((b, n, h * hd))?;
        self.to_out.forward(&o)
    }
}

/// The timestep conditioning of one call, in f32, with one row per sample for a (batch,)
/// timestep or one per distinct value for a (batch, seq) one; `index` then maps each token to
/// its row.
struct TimeCond {
    /// `temb` (rows, dim), f32 of the compute-dtype value, as diffusers adds it.
    temb: Tensor,
    /// `time_proj(silu(temb))` as (rows, 6, dim), f32.
    proj: Tensor,
    /// Per-token: the row of every token (batch * seq) and (batch, seq).
    index: Option<(Tensor, usize, usize)>,
}

impl TimeCond {
    /// Per-row vectors (rows, dim) spread to the tokens: (rows, 1, dim) for per-sample
    /// conditioning, (batch, seq, dim) for per-token.
    fn spread(&self, rows: Tensor) -> Result<Tensor> {
        Ok(match &self.index {
            None => rows.unsqueeze(1)?,
            Some((idx, b, seq)) => {
                let dim = rows.dim(1)?;
                rows.index_select(idx, 0)?.reshape((*b, *seq, dim))?
            }
        })
    }

    /// Modulation vector `k` of a block: `scale_shift_table[:, k] + temb_proj[..., k, :]`.
    fn block(&self, table: &Tensor, k: usize) -> Result<Tensor> {
        let rows = self
            .proj
            .narrow(1, k, 1)?
            .squeeze(1)?
            .broadcast_add(&table.narrow(1, k, 1)?.squeeze(1)?)?;
        self.spread(rows)
    }

    /// Output modulation `k` (0 shift, 1 scale): `scale_shift_table[:, k] + temb`.
    fn head(&self, table: &Tensor, k: usize) -> Result<Tensor> {
        let rows = table
            .narrow(1, k, 1)?
            .squeeze(1)?
            .broadcast_add(&self.temb)?;
        self.spread(rows)
    }
}

/// `norm(x) * (1 + scale) + shift` in f32 (`x` f32), back to `dtype`.
fn modulate(norm: &Tensor, shift: &Tensor, scale: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(norm
        .broadcast_mul(&(scale + 1.0)?)?
        .broadcast_add(shift)?
        .to_dtype(dtype)?)
}

/// `(x.float() + y * gate).type_as(x)`.
fn gated_add(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    Ok(x.to_dtype(DType::F32)?
        .broadcast_add(&y.to_dtype(DType::F32)?.broadcast_mul(gate)?)?
        .to_dtype(dtype)?)
}

/// `WanTransformerBlock`: modulated self-attention, cross-attention to the text (after an affine
/// `FP32LayerNorm` when `cross_attn_norm`), modulated gelu-tanh feed-forward.
struct WanBlock {
    unit: UnitScope,
    attn1: WanAttention,
    attn2: WanAttention,
    /// `norm2`'s weight and bias (`cross_attn_norm`), else identity.
    norm2: Option<(Param, Param)>,
    ffn: FeedForward,
    scale_shift_table: Param,
    eps: f64,
}

impl WanBlock {
    fn new(pp: &ParamPath, cfg: &WanTransformerConfig) -> Self {
        let dim = cfg.inner_dim();
        let (heads, eps) = (cfg.num_attention_heads, cfg.eps);
        let n2 = pp.pp("norm2");
        Self {
            unit: UnitScope::new(pp),
            attn1: WanAttention::new(&pp.pp("attn1"), dim, heads, eps),
            attn2: WanAttention::new(&pp.pp("attn2"), dim, heads, eps),
            norm2: cfg
                .cross_attn_norm
                .then(|| (n2.param("weight", &[dim]), n2.param("bias", &[dim]))),
            ffn: FeedForward::new(&pp.pp("ffn"), dim, cfg.ffn_dim),
            scale_shift_table: pp.param("scale_shift_table", &[1, 6, dim]),
            eps,
        }
    }

    fn forward(&self, x: &Tensor, context: &Tensor, tc: &TimeCond, rope: &Rope) -> Result<Tensor> {
        let dtype = x.dtype();
        let table = self.scale_shift_table.get()?.to_dtype(DType::F32)?;
        // shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa.
        let m = |k: usize| tc.block(&table, k);
        let norm = |x: &Tensor| layer_norm_f32(&x.to_dtype(DType::F32)?, None, None, self.eps);

        let h = modulate(&norm(x)?, &m(0)?, &m(1)?, dtype)?;
        let attn = self.attn1.forward(&h, None, Some(rope))?;
        drop(h);
        let x = gated_add(x, &attn, &m(2)?)?;
        drop(attn);

        let h = match &self.norm2 {
            Some((w, b)) => layer_norm_f32(
                &x.to_dtype(DType::F32)?,
                Some(&w.get()?),
                Some(&b.get()?),
                self.eps,
            )?
            .to_dtype(dtype)?,
            None => x.clone(),
        };
        let x = (&x + self.attn2.forward(&h, Some(context), None)?)?;
        drop(h);

        let h = modulate(&norm(&x)?, &m(3)?, &m(4)?, dtype)?;
        let ff = self.feed_forward(&h)?;
        drop(h);
        gated_add(&x, &ff, &m(5)?)
    }

    /// The feed-forward over sequence chunks of [`FFN_CHUNK_ROWS`].
    fn feed_forward(&self, h: &Tensor) -> Result<Tensor> {
        map_seq_chunks(h, FFN_CHUNK_ROWS, |c| self.ffn.forward(c))
    }
}

/// `f` applied to chunks of at most `rows` along axis 1 of `h`, the results concatenated.
fn map_seq_chunks(
    h: &Tensor,
    rows: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let n = h.dim(1)?;
    if n <= rows {
        return f(h);
    }
    let mut outs = Vec::with_capacity(n.div_ceil(rows));
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        outs.push(f(&h.narrow(1, start, len)?)?);
        start += len;
    }
    Ok(Tensor::cat(&outs, 1)?)
}

/// The inputs of one transformer call, as diffusers' `WanTransformer3DModel.forward` takes them.
pub struct WanInputs<'a> {
    /// Video latents (batch, in_channels, frames, height, width); frames, height and width must
    /// be multiples of the patch size.
    pub hidden_states: &'a Tensor,
    /// The scheduler's timestep (0..1000, not divided): (batch,) or (1,), or one per token
    /// (batch, seq) with seq = the number of patches, as Wan 2.2 TI2V (`expand_timesteps`)
    /// passes it. Any dtype; read as f32, as diffusers' `Timesteps` does.
    pub timestep: &'a Tensor,
    /// UMT5 embeddings (batch, text_len, text_dim), see [`crate::models::t5::wan_prompt_embeds`].
    pub encoder_hidden_states: &'a Tensor,
}

/// The checked shape of a call: batch, latent grid and patch grid.
struct CallShape {
    b: usize,
    grid: (usize, usize, usize),
    per_token: bool,
}

impl CallShape {
    fn seq(&self) -> usize {
        self.grid.0 * self.grid.1 * self.grid.2
    }
}

pub struct WanTransformer3DModel {
    cfg: WanTransformerConfig,
    src: std::sync::Arc<dyn WeightProvider>,
    patch_weight: Param,
    patch_bias: Param,
    time_embedder: Mlp,
    time_proj: Linear,
    text_embedder: Mlp,
    blocks: Vec<WanBlock>,
    proj_out: Linear,
    scale_shift_table: Param,
}

impl WanTransformer3DModel {
    pub fn new(pp: &ParamPath, cfg: &WanTransformerConfig) -> Result<Self> {
        cfg.validate()?;
        let dim = cfg.inner_dim();
        let (pt, ph, pw) = cfg.patch();
        let pe = pp.pp("patch_embedding");
        let ce = pp.pp("condition_embedder");
        Ok(Self {
            cfg: cfg.clone(),
            src: pp.provider().clone(),
            // Conv3d with kernel == stride: the patches do not overlap, so it is a linear map
            // of each flattened patch.
            patch_weight: pe.castable_param("weight", &[dim, cfg.in_channels, pt, ph, pw]),
            patch_bias: pe.castable_param("bias", &[dim]),
            time_embedder: Mlp::new(&ce.pp("time_embedder"), cfg.freq_dim, dim, Activation::Silu),
            time_proj: Linear::new(&ce.pp("time_proj"), dim, 6 * dim, true),
            text_embedder: Mlp::new(
                &ce.pp("text_embedder"),
                cfg.text_dim,
                dim,
                Activation::GeluTanh,
            ),
            blocks: (0..cfg.num_layers)
                .map(|i| WanBlock::new(&pp.pp("blocks").pp(i), cfg))
                .collect(),
            proj_out: Linear::new(
                &pp.pp("proj_out"),
                dim,
                cfg.out_channels() * pt * ph * pw,
                true,
            ),
            scale_shift_table: pp.param("scale_shift_table", &[1, 2, dim]),
        })
    }

    pub fn config(&self) -> &WanTransformerConfig {
        &self.cfg
    }

    /// Predicts the flow for video latents; returns (batch, out_channels, frames, height, width)
    /// in the latents' dtype.
    pub fn forward(&self, inp: &WanInputs) -> Result<Tensor> {
        let shape = self.check_inputs(inp)?;
        let x = inp.hidden_states;
        let dtype = x.dtype();
        let device = x.device();
        let src = self.src.as_ref();

        let rope = self.rope(&shape, device)?;

        let scope = ModuleScope::enter(src, "patch_embedding")?;
        let mut h = self.patchify(x, &shape)?;
        scope.exit()?;

        let scope = ModuleScope::enter(src, "condition_embedder")?;
        let tc = self.time_cond(inp.timestep, &shape, dtype, device)?;
        let context = self.text_embedder.forward(inp.encoder_hidden_states)?;
        scope.exit()?;

        for blk in &self.blocks {
            h = blk.unit.run(|| blk.forward(&h, &context, &tc, &rope))?;
        }
        drop(context);

        // `norm_out` (FP32LayerNorm, no affine) modulated by `scale_shift_table + temb`.
        let scope = ModuleScope::enter(src, "scale_shift_table")?;
        let table = self.scale_shift_table.get()?.to_dtype(DType::F32)?;
        let (shift, scale) = (tc.head(&table, 0)?, tc.head(&table, 1)?);
        scope.exit()?;
        let norm = layer_norm_f32(&h.to_dtype(DType::F32)?, None, None, self.cfg.eps)?;
        let h = modulate(&norm, &shift, &scale, dtype)?;
        drop(norm);

        let scope = ModuleScope::enter(src, "proj_out")?;
        let out = self.proj_out.forward(&h)?;
        scope.exit()?;
        self.unpatchify(&out, &shape)
    }

    /// (b, c, t, h, w) -> patch embeddings (b, seq, dim), patches in (frame, row, column) order.
    fn patchify(&self, x: &Tensor, s: &CallShape) -> Result<Tensor> {
        let (b, c, _, _, _) = x.dims5()?;
        let (pt, ph, pw) = self.cfg.patch();
        let (f, hh, ww) = s.grid;
        let patches = x
            .reshape(vec![b, c, f, pt, hh, ph, ww, pw])?
            .permute([0, 2, 4, 6, 1, 3, 5, 7])?
            .reshape((b, s.seq(), c * pt * ph * pw))?;
        let w = self.patch_weight.get()?;
        let w = w.reshape((w.dim(0)?, ()))?;
        Ok(candle_nn::Module::forward(
            &candle_nn::Linear::new(w, Some(self.patch_bias.get()?)),
            &patches,
        )?)
    }

    /// (b, seq, out * pt * ph * pw) -> (b, out, t, h, w), diffusers' unpatchify.
    fn unpatchify(&self, y: &Tensor, s: &CallShape) -> Result<Tensor> {
        let (pt, ph, pw) = self.cfg.patch();
        let (f, hh, ww) = s.grid;
        let c = self.cfg.out_channels();
        Ok(y.reshape(vec![s.b, f, hh, ww, pt, ph, pw, c])?
            .permute([0, 7, 1, 4, 2, 5, 3, 6])?
            .reshape((s.b, c, f * pt, hh * ph, ww * pw))?)
    }

    /// `WanRotaryPosEmbed`: each patch rotates by its (frame, row, column) index, over the
    /// channel split of [`WanTransformerConfig::rope_axes`]. The same float64 angles as
    /// diffusers' precomputed table, built for the grid only.
    fn rope(&self, s: &CallShape, device: &Device) -> Result<Rope> {
        let (f, hh, ww) = s.grid;
        let mut ids = Vec::with_capacity(s.seq() * 3);
        for i in 0..f {
            for j in 0..hh {
                for k in 0..ww {
                    ids.extend([i as f32, j as f32, k as f32]);
                }
            }
        }
        let ids = Tensor::from_vec(ids, (s.seq(), 3), device)?;
        let (cos, sin) = flux_rope(&ids, &self.cfg.rope_axes(), ROPE_THETA, device)?;
        Ok(Rope { cos, sin })
    }

    /// `WanTimeTextImageEmbedding`'s time part: sinusoidal projection (f32), `time_embedder`,
    /// `time_proj(silu(temb))`; one row per sample, or per distinct value of a per-token
    /// timestep.
    fn time_cond(
        &self,
        timestep: &Tensor,
        s: &CallShape,
        dtype: DType,
        device: &Device,
    ) -> Result<TimeCond> {
        let values = timestep
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (rows, index) = if s.per_token {
            let mut distinct: Vec<f32> = Vec::new();
            let mut seen = std::collections::HashMap::new();
            let idx: Vec<u32> = values
                .iter()
                .map(|v| {
                    *seen.entry(v.to_bits()).or_insert_with(|| {
                        distinct.push(*v);
                        distinct.len() as u32 - 1
                    })
                })
                .collect();
            let idx = Tensor::from_vec(idx, values.len(), device)?;
            (distinct, Some((idx, s.b, s.seq())))
        } else {
            (values, None)
        };
        let proj =
            timestep_embedding(&rows, self.cfg.freq_dim, true, 0.0, device)?.to_dtype(dtype)?;
        let temb = self.time_embedder.forward(&proj)?;
        let dim = self.cfg.inner_dim();
        let tproj = self
            .time_proj
            .forward(&temb.silu()?)?
            .reshape((rows.len(), 6, dim))?;
        Ok(TimeCond {
            temb: temb.to_dtype(DType::F32)?,
            proj: tproj.to_dtype(DType::F32)?,
            index,
        })
    }

    /// Shapes of every input against the config and each other.
    fn check_inputs(&self, inp: &WanInputs) -> Result<CallShape> {
        let bad = |what: &str, got: &Tensor, want: String| {
            Error::InvalidArgument(format!(
                "Wan transformer: `{what}` has shape {:?}, expected {want}",
                got.dims()
            ))
        };
        let cfg = &self.cfg;
        let x = inp.hidden_states;
        let want_x = format!("(batch, {}, frames, height, width)", cfg.in_channels);
        let (b, c, t, h, w) = x
            .dims5()
            .map_err(|_| bad("hidden_states", x, want_x.clone()))?;
        if c != cfg.in_channels || b == 0 {
            return Err(bad("hidden_states", x, want_x));
        }
        let (pt, ph, pw) = cfg.patch();
        if t == 0 || h == 0 || w == 0 || t % pt != 0 || h % ph != 0 || w % pw != 0 {
            return Err(Error::InvalidArgument(format!(
                "Wan transformer: latent frames, height and width {:?} must be positive \
                 multiples of the patch size {:?}",
                [t, h, w],
                cfg.patch_size
            )));
        }
        let grid = (t / pt, h / ph, w / pw);
        let longest = grid.0.max(grid.1).max(grid.2);
        if longest > cfg.rope_max_seq_len {
            return Err(Error::InvalidArgument(format!(
                "Wan transformer: the latent video is {longest} patches along one axis, more \
                 than the rotary embedding's rope_max_seq_len ({}); use a smaller size or fewer \
                 frames",
                cfg.rope_max_seq_len
            )));
        }
        let e = inp.encoder_hidden_states;
        let want_e = format!("({b}, text_len, {})", cfg.text_dim);
        let (eb, l, ec) = e
            .dims3()
            .map_err(|_| bad("encoder_hidden_states", e, want_e.clone()))?;
        if eb != b || ec != cfg.text_dim || l == 0 {
            return Err(bad("encoder_hidden_states", e, want_e));
        }
        let seq = grid.0 * grid.1 * grid.2;
        let ts = inp.timestep;
        let per_token = match ts.dims() {
            [n] if *n == b || *n == 1 => false,
            [n, s] if *n == b && *s == seq => true,
            _ => {
                return Err(bad(
                    "timestep",
                    ts,
                    format!("({b},), (1,) or ({b}, {seq}) (one per patch)"),
                ))
            }
        };
        Ok(CallShape { b, grid, per_token })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_chunks_cover_the_sequence_in_order() {
        let h = Tensor::arange(0f32, 60.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 10, 3))
            .unwrap();
        for rows in [1, 3, 4, 10, 11] {
            let got = map_seq_chunks(&h, rows, |c| Ok((c * 2.0)?)).unwrap();
            let want = (&h * 2.0).unwrap();
            let d = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0, "rows {rows}");
        }
    }
}
