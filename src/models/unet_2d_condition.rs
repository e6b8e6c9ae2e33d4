//! `UNet2DConditionModel` as configured by Stable Diffusion 1.x and 2.x.

use candle_core::{DType, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::layers::embeddings::timestep_embedding;
use crate::layers::{Conv2d, GroupNorm, Linear};
use crate::models::blocks::{
    Downsample2D, ResnetBlock2D, Transformer2D, Transformer2DParams, Upsample2D,
};
use crate::residency::{ModuleScope, ParamPath, WeightProvider};

const FILE: &str = "unet/config.json";

/// A config value given either once for all blocks or per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone + std::fmt::Debug> PerBlock<T> {
    fn expand(&self, field: &str, n: usize) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::unsupported(
                FILE,
                field,
                format!("{v:?}"),
                format!("needs one value per down block ({n})"),
            )),
        }
    }
}

fn d_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_down() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_up() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_4() -> usize {
    4
}
fn d_true() -> bool {
    true
}
fn d_layers() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn d_1() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn d_pad() -> usize {
    1
}
fn d_scale() -> f64 {
    1.0
}
fn d_silu() -> String {
    "silu".into()
}
fn d_groups() -> usize {
    32
}
fn d_eps() -> f64 {
    1e-5
}
fn d_cross() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn d_head() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_kernel() -> usize {
    3
}
fn d_only_cross() -> PerBlock<bool> {
    PerBlock::One(false)
}

/// `unet/config.json`; every default is diffusers' `UNet2DConditionModel.__init__` default.
#[derive(Debug, Clone, Deserialize)]
pub struct UNet2DConditionConfig {
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "d_4")]
    pub in_channels: usize,
    #[serde(default = "d_4")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_only_cross")]
    pub only_cross_attention: PerBlock<bool>,
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "d_pad")]
    pub downsample_padding: usize,
    #[serde(default = "d_scale")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "d_1")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default = "d_head")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "d_scale")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "d_kernel")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_kernel")]
    pub conv_out_kernel: usize,
    #[serde(default = "d_default")]
    pub attention_type: String,
    #[serde(default)]
    pub class_embeddings_concat: bool,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
}

impl UNet2DConditionConfig {
    /// Refuses every value this implementation does not reproduce exactly.
    fn validate(&self) -> Result<()> {
        let unsupported = |field: &str, value: String, hint: &str| {
            Err(Error::unsupported(FILE, field, value, hint.to_string()))
        };
        use crate::validate::{count, counts};
        let per = |field: &str, v: &PerBlock<usize>, min: usize, max: usize| match v {
            PerBlock::One(x) => count(FILE, field, *x, min, max).map(|_| ()),
            PerBlock::Each(xs) => counts(FILE, field, xs, min, max),
        };
        count(FILE, "in_channels", self.in_channels, 1, 1024)?;
        count(FILE, "out_channels", self.out_channels, 1, 1024)?;
        count(
            FILE,
            "block_out_channels",
            self.block_out_channels.len(),
            1,
            12,
        )?;
        counts(
            FILE,
            "block_out_channels",
            &self.block_out_channels,
            1,
            1 << 16,
        )?;
        count(FILE, "norm_num_groups", self.norm_num_groups, 1, 1 << 16)?;
        count(FILE, "conv_in_kernel", self.conv_in_kernel, 1, 15)?;
        count(FILE, "conv_out_kernel", self.conv_out_kernel, 1, 15)?;
        count(FILE, "downsample_padding", self.downsample_padding, 0, 15)?;
        if let Some(s) = self.sample_size {
            count(FILE, "sample_size", s, 1, 1 << 16)?;
        }
        per("layers_per_block", &self.layers_per_block, 1, 64)?;
        per(
            "transformer_layers_per_block",
            &self.transformer_layers_per_block,
            1,
            64,
        )?;
        per("cross_attention_dim", &self.cross_attention_dim, 1, 1 << 16)?;
        per("attention_head_dim", &self.attention_head_dim, 1, 1 << 16)?;
        if let Some(h) = &self.num_attention_heads {
            per("num_attention_heads", h, 1, 1024)?;
        }
        for (field, v) in [
            ("freq_shift", self.freq_shift),
            ("norm_eps", self.norm_eps),
            ("mid_block_scale_factor", self.mid_block_scale_factor),
            ("resnet_out_scale_factor", self.resnet_out_scale_factor),
        ] {
            crate::validate::config_f32(FILE, field, v, field == "freq_shift")?;
        }
        let n = self.block_out_channels.len();
        if n == 0 {
            return unsupported(
                "block_out_channels",
                "[]".into(),
                "needs at least one block",
            );
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return unsupported(
                "down_block_types",
                format!("{:?} / {:?}", self.down_block_types, self.up_block_types),
                "needs as many down and up blocks as block_out_channels",
            );
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return unsupported(
                    "down_block_types",
                    format!("\"{t}\""),
                    "supported: CrossAttnDownBlock2D, DownBlock2D",
                );
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return unsupported(
                    "up_block_types",
                    format!("\"{t}\""),
                    "supported: CrossAttnUpBlock2D, UpBlock2D",
                );
            }
        }
        if let Some(m) = &self.mid_block_type {
            if m != "UNetMidBlock2DCrossAttn" {
                return unsupported(
                    "mid_block_type",
                    format!("\"{m}\""),
                    "supported: UNetMidBlock2DCrossAttn or null",
                );
            }
        }
        let none_or = |field: &str, v: &Option<String>| -> Result<()> {
            if let Some(v) = v {
                return unsupported(field, format!("\"{v}\""), "only null is supported");
            }
            Ok(())
        };
        none_or("class_embed_type", &self.class_embed_type)?;
        none_or("addition_embed_type", &self.addition_embed_type)?;
        none_or("time_embedding_act_fn", &self.time_embedding_act_fn)?;
        none_or("timestep_post_act", &self.timestep_post_act)?;
        none_or("cross_attention_norm", &self.cross_attention_norm)?;
        let checks: [(&str, bool, String, &str); 10] = [
            (
                "act_fn",
                self.act_fn == "silu",
                format!("\"{}\"", self.act_fn),
                "only silu",
            ),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift == "default",
                format!("\"{}\"", self.resnet_time_scale_shift),
                "only \"default\"",
            ),
            (
                "time_embedding_type",
                self.time_embedding_type == "positional",
                format!("\"{}\"", self.time_embedding_type),
                "only \"positional\"",
            ),
            (
                "attention_type",
                self.attention_type == "default",
                format!("\"{}\"", self.attention_type),
                "only \"default\"",
            ),
            (
                "dual_cross_attention",
                !self.dual_cross_attention,
                "true".into(),
                "only false",
            ),
            (
                "resnet_skip_time_act",
                !self.resnet_skip_time_act,
                "true".into(),
                "only false",
            ),
            (
                "class_embeddings_concat",
                !self.class_embeddings_concat,
                "true".into(),
                "only false",
            ),
            (
                "num_class_embeds",
                self.num_class_embeds.is_none(),
                format!("{:?}", self.num_class_embeds),
                "only null",
            ),
            (
                "encoder_hid_dim",
                self.encoder_hid_dim.is_none(),
                format!("{:?}", self.encoder_hid_dim),
                "only null",
            ),
            (
                "time_cond_proj_dim",
                self.time_cond_proj_dim.is_none(),
                format!("{:?}", self.time_cond_proj_dim),
                "only null (LCM-distilled UNets are not supported)",
            ),
        ];
        for (field, ok, value, hint) in checks {
            if !ok {
                return unsupported(field, value, hint);
            }
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return unsupported(
                "conv_in_kernel",
                format!("{} / {}", self.conv_in_kernel, self.conv_out_kernel),
                "kernels must be odd",
            );
        }
        for &c in &self.block_out_channels {
            if c % self.norm_num_groups != 0 {
                return unsupported(
                    "norm_num_groups",
                    self.norm_num_groups.to_string(),
                    "must divide every block_out_channels entry",
                );
            }
        }
        Ok(())
    }
}

enum Block {
    Down {
        resnets: Vec<ResnetBlock2D>,
        attentions: Vec<Transformer2D>,
        downsample: Option<Downsample2D>,
    },
    Up {
        resnets: Vec<ResnetBlock2D>,
        attentions: Vec<Transformer2D>,
        upsample: Option<Upsample2D>,
    },
}

struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
}

pub struct UNet2DConditionModel {
    cfg: UNet2DConditionConfig,
    src: std::sync::Arc<dyn WeightProvider>,
    time_linear_1: Linear,
    time_linear_2: Linear,
    conv_in: Conv2d,
    down: Vec<Block>,
    mid: Option<MidBlock>,
    up: Vec<Block>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    pub fn new(pp: &ParamPath, cfg: &UNet2DConditionConfig) -> Result<Self> {
        cfg.validate()?;
        let n = cfg.block_out_channels.len();
        let boc = &cfg.block_out_channels;
        let layers = cfg.layers_per_block.expand("layers_per_block", n)?;
        let cross = cfg.cross_attention_dim.expand("cross_attention_dim", n)?;
        let tlayers = cfg
            .transformer_layers_per_block
            .expand("transformer_layers_per_block", n)?;
        let only_cross = cfg.only_cross_attention.expand("only_cross_attention", n)?;
        // diffusers' historical naming: `attention_head_dim` holds the number of heads unless
        // `num_attention_heads` is given.
        let heads = cfg
            .num_attention_heads
            .as_ref()
            .unwrap_or(&cfg.attention_head_dim)
            .expand("attention_head_dim", n)?;
        let groups = cfg.norm_num_groups;
        let eps = cfg.norm_eps;
        let temb = boc[0] * 4;
        let temb_dim = cfg.time_embedding_dim.unwrap_or(temb);
        let head_dim_of = |c: usize, h: usize, field: &str| -> Result<usize> {
            if h == 0 || !c.is_multiple_of(h) {
                return Err(Error::unsupported(
                    FILE,
                    field,
                    h,
                    format!("the number of heads must divide the block's {c} channels"),
                ));
            }
            Ok(c / h)
        };
        let tparams = |c: usize, i: usize, l: usize| -> Result<Transformer2DParams> {
            Ok(Transformer2DParams {
                heads: heads[i],
                head_dim: head_dim_of(c, heads[i], "attention_head_dim")?,
                in_channels: c,
                layers: l,
                cross_dim: cross[i],
                groups,
                use_linear_projection: cfg.use_linear_projection,
                only_cross_attention: only_cross[i],
            })
        };

        let mut down = Vec::new();
        let mut out_c = boc[0];
        for (i, ty) in cfg.down_block_types.iter().enumerate() {
            let in_c = out_c;
            out_c = boc[i];
            let is_final = i == n - 1;
            let bp = pp.pp("down_blocks").pp(i);
            let has_attn = ty == "CrossAttnDownBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers[i] {
                let c_in = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock2D::new(
                    &bp.pp("resnets").pp(j),
                    c_in,
                    out_c,
                    Some(temb_dim),
                    groups,
                    eps,
                    cfg.resnet_out_scale_factor,
                ));
                if has_attn {
                    attentions.push(Transformer2D::new(
                        &bp.pp("attentions").pp(j),
                        &tparams(out_c, i, tlayers[i])?,
                    ));
                }
            }
            let downsample = (!is_final).then(|| {
                Downsample2D::new(&bp.pp("downsamplers").pp(0), out_c, cfg.downsample_padding)
            });
            down.push(Block::Down {
                resnets,
                attentions,
                downsample,
            });
        }

        let mid = if cfg.mid_block_type.is_some() {
            let c = boc[n - 1];
            let mp = pp.pp("mid_block");
            let r = |j: usize| {
                ResnetBlock2D::new(
                    &mp.pp("resnets").pp(j),
                    c,
                    c,
                    Some(temb_dim),
                    groups,
                    eps,
                    cfg.mid_block_scale_factor,
                )
            };
            let mut p = tparams(c, n - 1, tlayers[n - 1])?;
            p.only_cross_attention = cfg.mid_block_only_cross_attention.unwrap_or(false);
            Some(MidBlock {
                resnets: vec![r(0), r(1)],
                attentions: vec![Transformer2D::new(&mp.pp("attentions").pp(0), &p)],
            })
        } else {
            None
        };

        let rev_c: Vec<usize> = boc.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = layers.iter().rev().copied().collect();
        let rev_t: Vec<usize> = tlayers.iter().rev().copied().collect();
        let mut up = Vec::new();
        let mut out_c = rev_c[0];
        for (i, ty) in cfg.up_block_types.iter().enumerate() {
            let is_final = i == n - 1;
            let prev_out = out_c;
            out_c = rev_c[i];
            let in_c = rev_c[(i + 1).min(n - 1)];
            let bi = n - 1 - i; // per-block settings are reversed for the up path
            let bp = pp.pp("up_blocks").pp(i);
            let has_attn = ty == "CrossAttnUpBlock2D";
            let num = rev_layers[i] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..num {
                let skip = if j == num - 1 { in_c } else { out_c };
                let r_in = if j == 0 { prev_out } else { out_c };
                resnets.push(ResnetBlock2D::new(
                    &bp.pp("resnets").pp(j),
                    r_in + skip,
                    out_c,
                    Some(temb_dim),
                    groups,
                    eps,
                    cfg.resnet_out_scale_factor,
                ));
                if has_attn {
                    attentions.push(Transformer2D::new(
                        &bp.pp("attentions").pp(j),
                        &tparams(out_c, bi, rev_t[i])?,
                    ));
                }
            }
            let upsample = (!is_final).then(|| Upsample2D::new(&bp.pp("upsamplers").pp(0), out_c));
            up.push(Block::Up {
                resnets,
                attentions,
                upsample,
            });
        }

        let ki = cfg.conv_in_kernel;
        let ko = cfg.conv_out_kernel;
        Ok(Self {
            cfg: cfg.clone(),
            src: pp.provider().clone(),
            time_linear_1: Linear::new(
                &pp.pp("time_embedding").pp("linear_1"),
                boc[0],
                temb_dim,
                true,
            ),
            time_linear_2: Linear::new(
                &pp.pp("time_embedding").pp("linear_2"),
                temb_dim,
                temb_dim,
                true,
            ),
            conv_in: Conv2d::new(&pp.pp("conv_in"), cfg.in_channels, boc[0], ki, 1, ki / 2),
            down,
            mid,
            up,
            norm_out: GroupNorm::new(&pp.pp("conv_norm_out"), groups, boc[0], eps),
            conv_out: Conv2d::new(&pp.pp("conv_out"), boc[0], cfg.out_channels, ko, 1, ko / 2),
        })
    }

    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.cfg
    }

    /// Sinusoidal timestep embedding, as diffusers' `get_timestep_embedding`.
    fn time_proj(&self, t: &[f64], dtype: DType) -> Result<Tensor> {
        let t: Vec<f32> = t.iter().map(|&x| x as f32).collect();
        let dim = self.cfg.block_out_channels[0];
        let device = self.src.device();
        let emb = timestep_embedding(
            &t,
            dim,
            self.cfg.flip_sin_to_cos,
            self.cfg.freq_shift,
            &device,
        )?;
        Ok(emb.to_dtype(dtype)?)
    }

    /// Predicts noise (or v) for `sample` (B,C,h,w) at timestep `t` given text `context`.
    pub fn forward(&self, sample: &Tensor, t: f64, context: &Tensor) -> Result<Tensor> {
        let b = sample.dim(0)?;
        let dtype = sample.dtype();
        let src = self.src.as_ref();
        let scope = ModuleScope::enter(src, "time_embedding")?;
        let temb = self.time_proj(&vec![t; b], dtype)?;
        let temb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&temb)?.silu()?)?;
        scope.exit()?;

        let mut x = if self.cfg.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let scope = ModuleScope::enter(src, "conv_in")?;
        x = self.conv_in.forward(&x)?;
        scope.exit()?;
        let mut skips = vec![x.clone()];
        for blk in &self.down {
            if let Block::Down {
                resnets,
                attentions,
                downsample,
            } = blk
            {
                for (j, r) in resnets.iter().enumerate() {
                    x = r.forward(&x, Some(&temb))?;
                    if let Some(a) = attentions.get(j) {
                        x = a.forward(&x, context)?;
                    }
                    skips.push(x.clone());
                }
                if let Some(d) = downsample {
                    x = d.forward(&x)?;
                    skips.push(x.clone());
                }
            }
        }
        if let Some(mid) = &self.mid {
            x = mid.resnets[0].forward(&x, Some(&temb))?;
            for (a, r) in mid.attentions.iter().zip(&mid.resnets[1..]) {
                x = a.forward(&x, context)?;
                x = r.forward(&x, Some(&temb))?;
            }
        }
        for blk in &self.up {
            if let Block::Up {
                resnets,
                attentions,
                upsample,
            } = blk
            {
                for (j, r) in resnets.iter().enumerate() {
                    let skip = skips.pop().ok_or_else(|| {
                        Error::InvalidArgument("UNet skip connections exhausted".into())
                    })?;
                    x = Tensor::cat(&[&x, &skip], 1)?;
                    x = r.forward(&x, Some(&temb))?;
                    if let Some(a) = attentions.get(j) {
                        x = a.forward(&x, context)?;
                    }
                }
                if let Some(u) = upsample {
                    // Upsample to the next skip's size: odd latent sizes round-trip exactly.
                    let size = skips.last().map(|s| (s.dim(2), s.dim(3)));
                    let size = match size {
                        Some((Ok(h), Ok(w))) => Some((h, w)),
                        _ => None,
                    };
                    x = u.forward(&x, size)?;
                }
            }
        }
        let scope = ModuleScope::enter(src, "conv_out")?;
        x = self.conv_out.forward(&self.norm_out.forward_silu(&x)?)?;
        scope.exit()?;
        Ok(x)
    }
}
