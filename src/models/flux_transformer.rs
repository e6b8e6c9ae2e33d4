//! `FluxTransformer2DModel` (diffusers 0.42.1, `models/transformers/transformer_flux.py`): the
//! FLUX.1 MMDiT. Double-stream blocks keep text and image tokens in separate weights and attend
//! jointly; single-stream blocks run on the concatenated sequence. Every block is an offload unit.

use candle_core::{DType, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::layers::embeddings::{apply_rope, flux_rope, timestep_embedding};
use crate::layers::{attention, layer_norm_f32, Activation, FeedForward, Linear, Mlp, RmsNorm};
use crate::residency::{ModuleScope, ParamPath, UnitScope, WeightProvider};

const FILE: &str = "transformer/config.json";
/// `FluxPosEmbed(theta=10000)`.
const ROPE_THETA: f64 = 10000.0;
/// `Timesteps(num_channels=256)` in the time/guidance embedders.
const TIME_PROJ_DIM: usize = 256;
/// Every LayerNorm and QK RMSNorm of the model.
const NORM_EPS: f64 = 1e-6;
/// `TimestepEmbedding` and `PixArtAlphaTextProjection(act_fn="silu")`.
const SILU: Activation = Activation::Silu;

fn d_1() -> usize {
    1
}
fn d_in() -> usize {
    64
}
fn d_layers() -> usize {
    19
}
fn d_single() -> usize {
    38
}
fn d_head_dim() -> usize {
    128
}
fn d_heads() -> usize {
    24
}
fn d_joint() -> usize {
    4096
}
fn d_pooled() -> usize {
    768
}
fn d_axes() -> Vec<usize> {
    vec![16, 56, 56]
}

/// `transformer/config.json`; every default is diffusers' `FluxTransformer2DModel.__init__`
/// default.
#[derive(Debug, Clone, Deserialize)]
pub struct FluxTransformerConfig {
    #[serde(default = "d_1")]
    pub patch_size: usize,
    #[serde(default = "d_in")]
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    #[serde(default = "d_layers")]
    pub num_layers: usize,
    #[serde(default = "d_single")]
    pub num_single_layers: usize,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_joint")]
    pub joint_attention_dim: usize,
    #[serde(default = "d_pooled")]
    pub pooled_projection_dim: usize,
    #[serde(default)]
    pub guidance_embeds: bool,
    #[serde(default = "d_axes")]
    pub axes_dims_rope: Vec<usize>,
}

impl FluxTransformerConfig {
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

    /// Refuses every value that would size a tensor or a loop wrongly, naming the field.
    pub fn validate(&self) -> Result<()> {
        use crate::validate::count;
        count(FILE, "num_layers", self.num_layers, 0, 1024)?;
        count(FILE, "num_single_layers", self.num_single_layers, 0, 1024)?;
        count(
            FILE,
            "num_attention_heads",
            self.num_attention_heads,
            1,
            1024,
        )?;
        count(
            FILE,
            "attention_head_dim",
            self.attention_head_dim,
            1,
            1 << 12,
        )?;
        count(FILE, "in_channels", self.in_channels, 1, 1 << 16)?;
        count(
            FILE,
            "joint_attention_dim",
            self.joint_attention_dim,
            1,
            1 << 16,
        )?;
        count(
            FILE,
            "pooled_projection_dim",
            self.pooled_projection_dim,
            1,
            1 << 16,
        )?;
        if let Some(o) = self.out_channels {
            count(FILE, "out_channels", o, 1, 1 << 16)?;
        }
        let positive = [
            ("in_channels", self.in_channels),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::unsupported(FILE, field, v, "must be positive"));
            }
        }
        if self.patch_size != 1 {
            return Err(Error::unsupported(
                FILE,
                "patch_size",
                self.patch_size,
                "only 1 (FLUX packs 2x2 latent patches in the pipeline, not in the model)",
            ));
        }
        if self
            .num_attention_heads
            .checked_mul(self.attention_head_dim)
            .and_then(|d| d.checked_mul(6))
            .is_none()
        {
            return Err(Error::unsupported(
                FILE,
                "num_attention_heads",
                self.num_attention_heads,
                "num_attention_heads * attention_head_dim overflows",
            ));
        }
        let axes = &self.axes_dims_rope;
        if axes.is_empty() || axes.iter().any(|d| *d == 0 || d % 2 == 1) {
            return Err(Error::unsupported(
                FILE,
                "axes_dims_rope",
                format!("{axes:?}"),
                "needs one or more positive even dimensions",
            ));
        }
        let sum: usize = axes.iter().sum();
        if sum != self.attention_head_dim {
            return Err(Error::unsupported(
                FILE,
                "axes_dims_rope",
                format!("{axes:?}"),
                format!(
                    "must sum to attention_head_dim ({}), not {sum}",
                    self.attention_head_dim
                ),
            ));
        }
        Ok(())
    }
}

/// q/k/v projections with their per-head RMS norm, giving (batch, heads, seq, head_dim).
struct QkvProj {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
}

impl QkvProj {
    /// `names`: the q, k, v projections and the q, k norms under `pp`.
    fn new(pp: &ParamPath, names: [&str; 5], in_dim: usize, heads: usize, hd: usize) -> Self {
        let inner = heads * hd;
        Self {
            q: Linear::new(&pp.pp(names[0]), in_dim, inner, true),
            k: Linear::new(&pp.pp(names[1]), in_dim, inner, true),
            v: Linear::new(&pp.pp(names[2]), in_dim, inner, true),
            norm_q: RmsNorm::new(&pp.pp(names[3]), hd, NORM_EPS),
            norm_k: RmsNorm::new(&pp.pp(names[4]), hd, NORM_EPS),
        }
    }

    fn forward(&self, x: &Tensor, hd: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, n, _) = x.dims3()?;
        // (b, n, heads*hd) -> (b, n, heads, hd): the norm runs over hd, then heads move up.
        let split = |t: Tensor| -> Result<Tensor> { Ok(t.reshape((b, n, (), hd))?) };
        let heads_first = |t: Tensor| -> Result<Tensor> { Ok(t.transpose(1, 2)?.contiguous()?) };
        let q = heads_first(self.norm_q.forward(&split(self.q.forward(x)?)?)?)?;
        let k = heads_first(self.norm_k.forward(&split(self.k.forward(x)?)?)?)?;
        let v = heads_first(split(self.v.forward(x)?)?)?;
        Ok((q, k, v))
    }
}

/// Rotary embedding then scaled dot-product attention over (b, heads, seq, hd); back to
/// (b, seq, heads*hd).
fn rope_attention(q: &Tensor, k: &Tensor, v: &Tensor, rope: &Rope) -> Result<Tensor> {
    let q = apply_rope(q, &rope.cos, &rope.sin)?;
    let k = apply_rope(k, &rope.cos, &rope.sin)?;
    let (b, h, n, hd) = q.dims4()?;
    Ok(attention(&q, &k, v, None)?
        .transpose(1, 2)?
        .reshape((b, n, h * hd))?)
}

/// `norm(x) * (1 + scale[:, None]) + shift[:, None]`: adaLN modulation by per-sample vectors.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    // `LayerNorm(elementwise_affine=False, eps=1e-6)`.
    Ok(layer_norm_f32(x, None, None, NORM_EPS)?
        .broadcast_mul(&(scale + 1.0)?.unsqueeze(1)?)?
        .broadcast_add(&shift.unsqueeze(1)?)?)
}

/// `x + gate[:, None] * y`.
fn gated_add(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_add(&y.broadcast_mul(&gate.unsqueeze(1)?)?)?)
}

/// The rotary table of the joint [text, image] sequence.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// `FluxTransformerBlock`: adaLN-Zero modulated joint attention and feed-forward, with separate
/// weights for the text (`*_context`, `add_*`) and image streams.
struct DoubleBlock {
    unit: UnitScope,
    norm1: Linear,
    norm1_context: Linear,
    img_qkv: QkvProj,
    txt_qkv: QkvProj,
    to_out: Linear,
    to_add_out: Linear,
    ff: FeedForward,
    ff_context: FeedForward,
    hd: usize,
}

impl DoubleBlock {
    fn new(pp: &ParamPath, heads: usize, hd: usize) -> Self {
        let dim = heads * hd;
        let a = pp.pp("attn");
        Self {
            unit: UnitScope::new(pp),
            norm1: Linear::new(&pp.pp("norm1").pp("linear"), dim, 6 * dim, true),
            norm1_context: Linear::new(&pp.pp("norm1_context").pp("linear"), dim, 6 * dim, true),
            img_qkv: QkvProj::new(
                &a,
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                dim,
                heads,
                hd,
            ),
            txt_qkv: QkvProj::new(
                &a,
                [
                    "add_q_proj",
                    "add_k_proj",
                    "add_v_proj",
                    "norm_added_q",
                    "norm_added_k",
                ],
                dim,
                heads,
                hd,
            ),
            to_out: Linear::new(&a.pp("to_out").pp(0), dim, dim, true),
            to_add_out: Linear::new(&a.pp("to_add_out"), dim, dim, true),
            ff: FeedForward::new(&pp.pp("ff"), dim, dim * 4),
            ff_context: FeedForward::new(&pp.pp("ff_context"), dim, dim * 4),
            hd,
        }
    }

    /// Returns the new (image, text) streams.
    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb_silu: &Tensor,
        rope: &Rope,
    ) -> Result<(Tensor, Tensor)> {
        // AdaLayerNormZero: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
        let m = self.norm1.forward(temb_silu)?.chunk(6, 1)?;
        let c = self.norm1_context.forward(temb_silu)?.chunk(6, 1)?;
        let (iq, ik, iv) = self
            .img_qkv
            .forward(&modulate(img, &m[0], &m[1])?, self.hd)?;
        let (tq, tk, tv) = self
            .txt_qkv
            .forward(&modulate(txt, &c[0], &c[1])?, self.hd)?;
        let l = txt.dim(1)?;
        let cat = |t: Tensor, i: Tensor| -> Result<Tensor> { Ok(Tensor::cat(&[t, i], 2)?) };
        let o = rope_attention(&cat(tq, iq)?, &cat(tk, ik)?, &cat(tv, iv)?, rope)?;
        let n = o.dim(1)?;
        let img_attn = self.to_out.forward(&o.narrow(1, l, n - l)?)?;
        let txt_attn = self.to_add_out.forward(&o.narrow(1, 0, l)?)?;
        drop(o);

        let img = gated_add(img, &m[2], &img_attn)?;
        let ff = self.ff.forward(&modulate(&img, &m[3], &m[4])?)?;
        let img = gated_add(&img, &m[5], &ff)?;

        let txt = gated_add(txt, &c[2], &txt_attn)?;
        let ff = self.ff_context.forward(&modulate(&txt, &c[3], &c[4])?)?;
        let txt = gated_add(&txt, &c[5], &ff)?;
        Ok((img, txt))
    }
}

/// `FluxSingleTransformerBlock`: attention and an MLP in parallel on the joint sequence, their
/// outputs concatenated into one projection.
struct SingleBlock {
    unit: UnitScope,
    norm: Linear,
    qkv: QkvProj,
    proj_mlp: Linear,
    proj_out: Linear,
    hd: usize,
}

impl SingleBlock {
    fn new(pp: &ParamPath, heads: usize, hd: usize) -> Self {
        let dim = heads * hd;
        let mlp = dim * 4;
        Self {
            unit: UnitScope::new(pp),
            norm: Linear::new(&pp.pp("norm").pp("linear"), dim, 3 * dim, true),
            qkv: QkvProj::new(
                &pp.pp("attn"),
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                dim,
                heads,
                hd,
            ),
            proj_mlp: Linear::new(&pp.pp("proj_mlp"), dim, mlp, true),
            proj_out: Linear::new(&pp.pp("proj_out"), dim + mlp, dim, true),
            hd,
        }
    }

    fn forward(&self, x: &Tensor, temb_silu: &Tensor, rope: &Rope) -> Result<Tensor> {
        // AdaLayerNormZeroSingle: shift, scale, gate.
        let m = self.norm.forward(temb_silu)?.chunk(3, 1)?;
        let h = modulate(x, &m[0], &m[1])?;
        let mlp = self
            .proj_mlp
            .forward_ext(&h, crate::layers::dense::Epilogue::GeluTanh, None)?;
        let (q, k, v) = self.qkv.forward(&h, self.hd)?;
        drop(h);
        let attn = rope_attention(&q, &k, &v, rope)?;
        let out = self.proj_out.forward(&Tensor::cat(&[attn, mlp], 2)?)?;
        gated_add(x, &m[2], &out)
    }
}

/// The inputs of one transformer call, as diffusers' `FluxTransformer2DModel.forward` takes them.
pub struct FluxInputs<'a> {
    /// Packed image latents (batch, seq, in_channels).
    pub hidden_states: &'a Tensor,
    /// T5 embeddings (batch, text_len, joint_attention_dim).
    pub encoder_hidden_states: &'a Tensor,
    /// CLIP pooled embedding (batch, pooled_projection_dim).
    pub pooled_projections: &'a Tensor,
    /// (batch,) or (1,): the scheduler's timestep divided by 1000, as the pipeline passes it; the
    /// model multiplies by 1000 in the compute dtype.
    pub timestep: &'a Tensor,
    /// (batch,) or (1,): the guidance scale (e.g. 3.5), also multiplied by 1000 inside. Required
    /// by models with `guidance_embeds`, refused by the others (diffusers raises there too).
    pub guidance: Option<&'a Tensor>,
    /// Position ids (seq, 3) of the image tokens.
    pub img_ids: &'a Tensor,
    /// Position ids (text_len, 3) of the text tokens (zeros in FLUX.1).
    pub txt_ids: &'a Tensor,
}

pub struct FluxTransformer2DModel {
    cfg: FluxTransformerConfig,
    src: std::sync::Arc<dyn WeightProvider>,
    x_embedder: Linear,
    context_embedder: Linear,
    timestep_embedder: Mlp,
    guidance_embedder: Option<Mlp>,
    text_embedder: Mlp,
    blocks: Vec<DoubleBlock>,
    single_blocks: Vec<SingleBlock>,
    norm_out: Linear,
    proj_out: Linear,
}

impl FluxTransformer2DModel {
    pub fn new(pp: &ParamPath, cfg: &FluxTransformerConfig) -> Result<Self> {
        cfg.validate()?;
        let (heads, hd) = (cfg.num_attention_heads, cfg.attention_head_dim);
        let dim = cfg.inner_dim();
        let tte = pp.pp("time_text_embed");
        Ok(Self {
            cfg: cfg.clone(),
            src: pp.provider().clone(),
            x_embedder: Linear::new(&pp.pp("x_embedder"), cfg.in_channels, dim, true),
            context_embedder: Linear::new(
                &pp.pp("context_embedder"),
                cfg.joint_attention_dim,
                dim,
                true,
            ),
            timestep_embedder: Mlp::new(&tte.pp("timestep_embedder"), TIME_PROJ_DIM, dim, SILU),
            guidance_embedder: cfg
                .guidance_embeds
                .then(|| Mlp::new(&tte.pp("guidance_embedder"), TIME_PROJ_DIM, dim, SILU)),
            text_embedder: Mlp::new(
                &tte.pp("text_embedder"),
                cfg.pooled_projection_dim,
                dim,
                SILU,
            ),
            blocks: (0..cfg.num_layers)
                .map(|i| DoubleBlock::new(&pp.pp("transformer_blocks").pp(i), heads, hd))
                .collect(),
            single_blocks: (0..cfg.num_single_layers)
                .map(|i| SingleBlock::new(&pp.pp("single_transformer_blocks").pp(i), heads, hd))
                .collect(),
            norm_out: Linear::new(&pp.pp("norm_out").pp("linear"), dim, 2 * dim, true),
            proj_out: Linear::new(
                &pp.pp("proj_out"),
                dim,
                cfg.patch_size * cfg.patch_size * cfg.out_channels(),
                true,
            ),
        })
    }

    pub fn config(&self) -> &FluxTransformerConfig {
        &self.cfg
    }

    /// Predicts the flow (velocity) for packed latents; returns (batch, seq, out_channels).
    pub fn forward(&self, inp: &FluxInputs) -> Result<Tensor> {
        let (seq, l) = self.check_inputs(inp)?;
        let dtype = inp.hidden_states.dtype();
        let src = self.src.as_ref();

        let scope = ModuleScope::enter(src, "x_embedder")?;
        let mut img = self.x_embedder.forward(inp.hidden_states)?;
        scope.exit()?;

        let scope = ModuleScope::enter(src, "time_text_embed")?;
        let temb = self.time_text_embed(inp, dtype)?;
        scope.exit()?;

        let scope = ModuleScope::enter(src, "context_embedder")?;
        let mut txt = self.context_embedder.forward(inp.encoder_hidden_states)?;
        scope.exit()?;

        let f32_ids = |t: &Tensor| -> Result<Tensor> { Ok(ids_2d(t)?.to_dtype(DType::F32)?) };
        let ids = Tensor::cat(&[f32_ids(inp.txt_ids)?, f32_ids(inp.img_ids)?], 0)?;
        let (cos, sin) = flux_rope(
            &ids,
            &self.cfg.axes_dims_rope,
            ROPE_THETA,
            inp.hidden_states.device(),
        )?;
        let rope = Rope { cos, sin };
        // Every block modulates from silu(temb); compute it once.
        let temb_silu = temb.silu()?;

        for blk in &self.blocks {
            (img, txt) = blk
                .unit
                .run(|| blk.forward(&img, &txt, &temb_silu, &rope))?;
        }
        // diffusers concatenates and splits in every single block; once is the same values.
        let mut x = Tensor::cat(&[txt, img], 1)?;
        for blk in &self.single_blocks {
            x = blk.unit.run(|| blk.forward(&x, &temb_silu, &rope))?;
        }
        let img = x.narrow(1, l, seq)?;
        drop(x);

        // AdaLayerNormContinuous: note the order, scale first.
        let scope = ModuleScope::enter(src, "norm_out")?;
        let m = self.norm_out.forward(&temb_silu)?.chunk(2, 1)?;
        let img = modulate(&img, &m[1], &m[0])?;
        scope.exit()?;

        let scope = ModuleScope::enter(src, "proj_out")?;
        let out = self.proj_out.forward(&img)?;
        scope.exit()?;
        Ok(out)
    }

    /// `CombinedTimestep(Guidance)TextProjEmbeddings`: (batch, inner_dim).
    fn time_text_embed(&self, inp: &FluxInputs, dtype: DType) -> Result<Tensor> {
        let pdtype = inp.pooled_projections.dtype();
        let device = inp.hidden_states.device();
        // `timestep.to(dtype) * 1000`, then `get_timestep_embedding` in f32, then to the pooled
        // embedding's dtype.
        let proj = |t: &Tensor| -> Result<Tensor> {
            let t = (t.to_dtype(dtype)? * 1000.0)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            Ok(timestep_embedding(&t, TIME_PROJ_DIM, true, 0.0, device)?.to_dtype(pdtype)?)
        };
        let mut emb = self.timestep_embedder.forward(&proj(inp.timestep)?)?;
        if let (Some(g), Some(embedder)) = (inp.guidance, &self.guidance_embedder) {
            emb = (emb.broadcast_add(&embedder.forward(&proj(g)?)?))?;
        }
        let pooled = self.text_embedder.forward(inp.pooled_projections)?;
        Ok(emb.broadcast_add(&pooled)?)
    }

    /// Shapes of every input against the config and each other: (image seq, text len).
    fn check_inputs(&self, inp: &FluxInputs) -> Result<(usize, usize)> {
        let bad = |what: &str, got: &Tensor, want: String| {
            Error::InvalidArgument(format!(
                "FLUX transformer: `{what}` has shape {:?}, expected {want}",
                got.dims()
            ))
        };
        let cfg = &self.cfg;
        let x = inp.hidden_states;
        let (b, seq, c) = x
            .dims3()
            .map_err(|_| bad("hidden_states", x, "(batch, seq, in_channels)".into()))?;
        if c != cfg.in_channels {
            return Err(bad(
                "hidden_states",
                x,
                format!("(batch, seq, {})", cfg.in_channels),
            ));
        }
        let e = inp.encoder_hidden_states;
        let want = format!("({b}, text_len, {})", cfg.joint_attention_dim);
        let (eb, l, ec) = e
            .dims3()
            .map_err(|_| bad("encoder_hidden_states", e, want.clone()))?;
        if eb != b || ec != cfg.joint_attention_dim {
            return Err(bad("encoder_hidden_states", e, want));
        }
        let p = inp.pooled_projections;
        if p.dims() != [b, cfg.pooled_projection_dim] {
            return Err(bad(
                "pooled_projections",
                p,
                format!("({b}, {})", cfg.pooled_projection_dim),
            ));
        }
        let per_sample = |what: &str, t: &Tensor| -> Result<()> {
            match t.dims() {
                [n] if *n == b || *n == 1 => Ok(()),
                _ => Err(bad(what, t, format!("({b},) or (1,)"))),
            }
        };
        per_sample("timestep", inp.timestep)?;
        match (inp.guidance, cfg.guidance_embeds) {
            (Some(g), true) => per_sample("guidance", g)?,
            (None, true) => {
                return Err(Error::InvalidArgument(
                    "this FLUX transformer has guidance_embeds (a guidance-distilled model such \
                     as FLUX.1-dev): pass a guidance scale"
                        .into(),
                ))
            }
            (Some(_), false) => {
                return Err(Error::InvalidArgument(
                    "this FLUX transformer has no guidance embedding (guidance_embeds is false, \
                     e.g. FLUX.1-schnell): do not pass a guidance scale"
                        .into(),
                ))
            }
            (None, false) => {}
        }
        let axes = cfg.axes_dims_rope.len();
        for (what, ids, n) in [("img_ids", inp.img_ids, seq), ("txt_ids", inp.txt_ids, l)] {
            let ids2 = ids_2d(ids).map_err(|_| bad(what, ids, format!("({n}, {axes})")))?;
            if ids2.dims() != [n, axes] {
                return Err(bad(what, ids, format!("({n}, {axes})")));
            }
        }
        Ok((seq, l))
    }
}

/// Position ids as (seq, axes); diffusers still accepts a deprecated leading batch axis and
/// uses its first entry.
fn ids_2d(ids: &Tensor) -> Result<Tensor> {
    Ok(match ids.rank() {
        3 => ids.get(0)?,
        2 => ids.clone(),
        r => {
            return Err(Error::InvalidArgument(format!(
                "position ids must have rank 2, got rank {r}"
            )))
        }
    })
}
