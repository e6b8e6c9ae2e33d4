//! Blocks shared by the UNet and the VAE (diffusers' resnet.py, attention_processor.py,
//! transformers_2d.py, downsampling.py, upsampling.py).

use candle_core::Tensor;

use crate::error::Result;
use crate::layers::conv2d::{Padding, Prologue};
use crate::layers::{attention, Conv2d, GroupNorm, LayerNorm, Linear};
use crate::residency::{ParamPath, UnitScope};

/// `ResnetBlock2D` with `time_embedding_norm="default"`, `output_scale_factor` 1.
pub struct ResnetBlock2D {
    unit: UnitScope,
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(
        pp: &ParamPath,
        in_c: usize,
        out_c: usize,
        temb_c: Option<usize>,
        groups: usize,
        eps: f64,
        output_scale_factor: f64,
    ) -> Self {
        Self {
            unit: UnitScope::new(pp),
            norm1: GroupNorm::new(&pp.pp("norm1"), groups, in_c, eps),
            conv1: Conv2d::new(&pp.pp("conv1"), in_c, out_c, 3, 1, 1),
            time_emb_proj: temb_c.map(|t| Linear::new(&pp.pp("time_emb_proj"), t, out_c, true)),
            norm2: GroupNorm::new(&pp.pp("norm2"), groups, out_c, eps),
            conv2: Conv2d::new(&pp.pp("conv2"), out_c, out_c, 3, 1, 1),
            conv_shortcut: (in_c != out_c)
                .then(|| Conv2d::new(&pp.pp("conv_shortcut"), in_c, out_c, 1, 1, 0)),
            output_scale_factor,
        }
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        self.unit.run(|| self.forward_inner(x, temb))
    }

    fn forward_inner(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        if self.output_scale_factor == 1.0 && self.conv1.fusable(x) {
            return self.forward_fused(x, temb);
        }
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&t.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let x = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = (x + h)?;
        Ok(if self.output_scale_factor != 1.0 {
            (out / self.output_scale_factor)?
        } else {
            out
        })
    }
}

impl ResnetBlock2D {
    /// The same block with each norm+SiLU folded into the following conv and the residual sum
    /// accumulated by the last conv: at most the input, one intermediate and the output are
    /// alive at once (the plain path holds five tensors of that size at its peak).
    fn forward_fused(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let silu = |(a, b): (Vec<f32>, Vec<f32>)| Prologue {
            affine: Some((a, b)),
            silu: true,
            upsample: 1,
        };
        let mut h = self
            .conv1
            .forward_ext(x, &silu(self.norm1.coefficients(x)?), None)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&t.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = crate::profile::span(
                || format!("temb add {:?}", h.dims()),
                || h.broadcast_add(&t),
            )?;
        }
        let pro2 = silu(self.norm2.coefficients(&h)?);
        match &self.conv_shortcut {
            None => self.conv2.forward_ext(&h, &pro2, Some(x)),
            Some(sc) => {
                let h2 = self.conv2.forward_ext(&h, &pro2, None)?;
                drop(h);
                sc.forward_ext(x, &Prologue::default(), Some(&h2))
            }
        }
    }
}

/// diffusers' `Attention` with separate q/k/v projections, over (batch, seq, dim).
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    /// Cross-attention's keys and values (split into heads) for the last context tensor seen:
    /// the text embeddings are the same tensor at every denoising step, so their projections are
    /// made once per generation (a few MiB for the whole UNet; same numbers, fewer weight reads).
    context_kv: std::sync::Mutex<Option<(candle_core::TensorId, Tensor, Tensor)>>,
}

impl Attention {
    pub fn new(
        pp: &ParamPath,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
    ) -> Self {
        let inner = heads * head_dim;
        let ctx = context_dim.unwrap_or(query_dim);
        Self {
            to_q: Linear::new(&pp.pp("to_q"), query_dim, inner, qkv_bias),
            to_k: Linear::new(&pp.pp("to_k"), ctx, inner, qkv_bias),
            to_v: Linear::new(&pp.pp("to_v"), ctx, inner, qkv_bias),
            to_out: Linear::new(&pp.pp("to_out").pp(0), inner, query_dim, true),
            heads,
            context_kv: Default::default(),
        }
    }

    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        self.forward_residual(x, context, None)
    }

    /// `residual + attention(x)`, the sum made by the output projection's GEMM.
    pub fn forward_residual(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let q = self.to_q.forward(x)?;
        let inner = q.dim(2)?;
        let hd = inner / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            let m = t.dim(1)?;
            crate::profile::span(
                || format!("split heads {:?}", t.dims()),
                || {
                    Ok(t.reshape((b, m, self.heads, hd))?
                        .transpose(1, 2)?
                        .contiguous()?)
                },
            )
        };
        let kv = |ctx: &Tensor| -> Result<(Tensor, Tensor)> {
            Ok((
                split(self.to_k.forward(ctx)?)?,
                split(self.to_v.forward(ctx)?)?,
            ))
        };
        let (k, v) = match context {
            None => kv(x)?,
            Some(ctx) => {
                let mut cached = self.context_kv.lock().unwrap_or_else(|e| e.into_inner());
                match cached.as_ref() {
                    Some((id, k, v)) if *id == ctx.id() => (k.clone(), v.clone()),
                    _ => {
                        let (k, v) = kv(ctx)?;
                        *cached = Some((ctx.id(), k.clone(), v.clone()));
                        (k, v)
                    }
                }
            }
        };
        let o = attention(&split(q)?, &k, &v, None)?;
        let o = crate::profile::span(
            || format!("merge heads {:?}", o.dims()),
            || o.transpose(1, 2)?.reshape((b, n, inner)),
        )?;
        self.to_out
            .forward_ext(&o, crate::layers::dense::Epilogue::None, residual)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward.
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    fn new(
        pp: &ParamPath,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_dim: usize,
        only_cross_attention: bool,
    ) -> Self {
        let ff_inner = dim * 4;
        let attn1_ctx = only_cross_attention.then_some(cross_dim);
        Self {
            norm1: LayerNorm::new(&pp.pp("norm1"), dim, 1e-5),
            attn1: Attention::new(&pp.pp("attn1"), dim, attn1_ctx, heads, head_dim, false),
            norm2: LayerNorm::new(&pp.pp("norm2"), dim, 1e-5),
            attn2: Attention::new(
                &pp.pp("attn2"),
                dim,
                Some(cross_dim),
                heads,
                head_dim,
                false,
            ),
            norm3: LayerNorm::new(&pp.pp("norm3"), dim, 1e-5),
            ff_proj: Linear::new(
                &pp.pp("ff").pp("net").pp(0).pp("proj"),
                dim,
                ff_inner * 2,
                true,
            ),
            ff_out: Linear::new(&pp.pp("ff").pp("net").pp(2), ff_inner, dim, true),
            only_cross_attention,
        }
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let n = self.norm1.forward(x)?;
        let ctx1 = self.only_cross_attention.then_some(context);
        let x = self.attn1.forward_residual(&n, ctx1, Some(x))?;
        let n = self.norm2.forward(&x)?;
        let x = self.attn2.forward_residual(&n, Some(context), Some(&x))?;
        let n = self.norm3.forward(&x)?;
        let p = self.ff_proj.forward(&n)?;
        let half = p.dim(2)? / 2;
        let g = crate::profile::span(
            || format!("geglu {:?}", p.dims()),
            || -> Result<Tensor> {
                if crate::layers::dense::supported(&[&p]) {
                    return crate::layers::dense::geglu(&p);
                }
                Ok((p.narrow(2, 0, half)? * p.narrow(2, half, half)?.gelu_erf()?)?)
            },
        )?;
        self.ff_out
            .forward_ext(&g, crate::layers::dense::Epilogue::None, Some(&x))
    }
}

enum Proj {
    Linear(Linear),
    Conv(Conv2d),
}

/// `Transformer2DModel` for continuous inputs (the UNet's spatial transformer).
pub struct Transformer2D {
    unit: UnitScope,
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

pub struct Transformer2DParams {
    pub heads: usize,
    pub head_dim: usize,
    pub in_channels: usize,
    pub layers: usize,
    pub cross_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
}

impl Transformer2D {
    pub fn new(pp: &ParamPath, p: &Transformer2DParams) -> Self {
        let inner = p.heads * p.head_dim;
        let c = p.in_channels;
        let (proj_in, proj_out) = if p.use_linear_projection {
            (
                Proj::Linear(Linear::new(&pp.pp("proj_in"), c, inner, true)),
                Proj::Linear(Linear::new(&pp.pp("proj_out"), inner, c, true)),
            )
        } else {
            (
                Proj::Conv(Conv2d::new(&pp.pp("proj_in"), c, inner, 1, 1, 0)),
                Proj::Conv(Conv2d::new(&pp.pp("proj_out"), inner, c, 1, 1, 0)),
            )
        };
        let blocks = (0..p.layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    &pp.pp("transformer_blocks").pp(i),
                    inner,
                    p.heads,
                    p.head_dim,
                    p.cross_dim,
                    p.only_cross_attention,
                )
            })
            .collect();
        Self {
            unit: UnitScope::new(pp),
            norm: GroupNorm::new(&pp.pp("norm"), p.groups, c, 1e-6),
            proj_in,
            blocks,
            proj_out,
        }
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        self.unit.run(|| self.forward_inner(x, context))
    }

    fn forward_inner(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let residual = x;
        let x = self.norm.forward(x)?;
        let to_seq = |t: Tensor| -> Result<Tensor> {
            let inner = t.dim(1)?;
            crate::profile::span(
                || format!("to_seq {:?}", t.dims()),
                || Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, inner))?),
            )
        };
        let mut s = match &self.proj_in {
            Proj::Conv(conv) => to_seq(conv.forward(&x)?)?,
            Proj::Linear(lin) => lin.forward(&to_seq(x)?)?,
        };
        for blk in &self.blocks {
            s = blk.forward(&s, context)?;
        }
        let from_seq = |t: Tensor| -> Result<Tensor> {
            let inner = t.dim(2)?;
            crate::profile::span(
                || format!("from_seq {:?}", t.dims()),
                || {
                    Ok(t.reshape((b, h, w, inner))?
                        .permute((0, 3, 1, 2))?
                        .contiguous()?)
                },
            )
        };
        let out = match &self.proj_out {
            Proj::Conv(conv) => conv.forward(&from_seq(s)?)?,
            Proj::Linear(lin) => from_seq(lin.forward(&s)?)?,
        };
        debug_assert_eq!(out.dims4()?, (b, c, h, w));
        crate::profile::span(
            || format!("residual add {:?}", residual.dims()),
            || Ok((out + residual)?),
        )
    }
}

/// `Downsample2D` with a strided 3x3 conv. `padding == 0` pads right/bottom by one (VAE): the
/// conv pads asymmetrically itself, so no padded copy of the input is made.
pub struct Downsample2D {
    unit: UnitScope,
    conv: Conv2d,
}

impl Downsample2D {
    pub fn new(pp: &ParamPath, channels: usize, padding: usize) -> Self {
        let conv = Conv2d::new(&pp.pp("conv"), channels, channels, 3, 2, padding);
        let conv = if padding == 0 {
            conv.with_padding(Padding {
                top: 0,
                bottom: 1,
                left: 0,
                right: 1,
            })
        } else {
            conv
        };
        Self {
            unit: UnitScope::new(pp),
            conv,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.unit.run(|| self.conv.forward(x))
    }
}

/// `Upsample2D`: nearest-neighbour resize (2x, or to an explicit size) then a 3x3 conv.
pub struct Upsample2D {
    unit: UnitScope,
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(pp: &ParamPath, channels: usize) -> Self {
        Self {
            unit: UnitScope::new(pp),
            conv: Conv2d::new(&pp.pp("conv"), channels, channels, 3, 1, 1),
        }
    }

    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        self.unit.run(|| self.forward_inner(x, size))
    }

    fn forward_inner(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((h * 2, w * 2));
        if (th, tw) == (h * 2, w * 2) && self.conv.fusable(x) {
            // Upsample while the conv reads its input: the 4x larger tensor never exists.
            let pro = Prologue {
                upsample: 2,
                ..Prologue::default()
            };
            return self.conv.forward_ext(x, &pro, None);
        }
        self.conv.forward(&x.upsample_nearest2d(th, tw)?)
    }
}
