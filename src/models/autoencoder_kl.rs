//! `AutoencoderKL`: encode images to a diagonal Gaussian over latents, decode latents to images.

use candle_core::Tensor;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::layers::conv2d::Prologue;
use crate::layers::{attention, Conv2d, GroupNorm, Linear};
use crate::models::blocks::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::models::vae_tiling::VaeMemory;
use crate::residency::{ModuleScope, ParamPath, UnitScope, WeightProvider};

const FILE: &str = "vae/config.json";

fn d_3() -> usize {
    3
}
fn d_4() -> usize {
    4
}
fn d_down() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn d_up() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn d_channels() -> Vec<usize> {
    vec![64]
}
fn d_1() -> usize {
    1
}
fn d_silu() -> String {
    "silu".into()
}
fn d_groups() -> usize {
    32
}
fn d_sample() -> usize {
    32
}
fn d_scaling() -> f64 {
    0.18215
}
fn d_true() -> bool {
    true
}

/// `vae/config.json`; defaults are diffusers' `AutoencoderKL.__init__` defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct AutoencoderKLConfig {
    #[serde(default = "d_3")]
    pub in_channels: usize,
    #[serde(default = "d_3")]
    pub out_channels: usize,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_1")]
    pub layers_per_block: usize,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_4")]
    pub latent_channels: usize,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_sample")]
    pub sample_size: usize,
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
}

impl AutoencoderKLConfig {
    /// How many pixels one latent cell covers (8 for SD).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }

    fn validate(&self) -> Result<()> {
        use crate::validate::{config_f32, count, counts};
        count(FILE, "in_channels", self.in_channels, 1, 64)?;
        count(FILE, "out_channels", self.out_channels, 1, 64)?;
        count(FILE, "latent_channels", self.latent_channels, 1, 1024)?;
        count(FILE, "layers_per_block", self.layers_per_block, 1, 64)?;
        count(FILE, "norm_num_groups", self.norm_num_groups, 1, 1 << 16)?;
        count(FILE, "sample_size", self.sample_size, 1, 1 << 16)?;
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
        config_f32(FILE, "scaling_factor", self.scaling_factor, false)?;
        if let Some(s) = self.shift_factor {
            config_f32(FILE, "shift_factor", s, true)?;
        }
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::unsupported(
                FILE,
                "block_out_channels",
                format!("{:?}", self.block_out_channels),
                "needs one entry per down/up block",
            ));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return Err(Error::unsupported(
                FILE,
                "down_block_types",
                format!("\"{t}\""),
                "supported: DownEncoderBlock2D",
            ));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return Err(Error::unsupported(
                FILE,
                "up_block_types",
                format!("\"{t}\""),
                "supported: UpDecoderBlock2D",
            ));
        }
        if self.act_fn != "silu" {
            return Err(Error::unsupported(
                FILE,
                "act_fn",
                format!("\"{}\"", self.act_fn),
                "only silu",
            ));
        }
        if let Some(&c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c % self.norm_num_groups != 0)
        {
            return Err(Error::unsupported(
                FILE,
                "norm_num_groups",
                self.norm_num_groups,
                format!("must divide every block_out_channels entry ({c})"),
            ));
        }
        Ok(())
    }
}

/// The VAE mid-block's single-head self-attention over pixels, with its own GroupNorm.
struct SpatialAttention {
    unit: UnitScope,
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl SpatialAttention {
    fn new(pp: &ParamPath, c: usize, groups: usize) -> Self {
        Self {
            unit: UnitScope::new(pp),
            group_norm: GroupNorm::new(&pp.pp("group_norm"), groups, c, 1e-6),
            to_q: Linear::new(&pp.pp("to_q"), c, c, true),
            to_k: Linear::new(&pp.pp("to_k"), c, c, true),
            to_v: Linear::new(&pp.pp("to_v"), c, c, true),
            to_out: Linear::new(&pp.pp("to_out").pp(0), c, c, true),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.unit.run(|| self.forward_inner(x))
    }

    fn forward_inner(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self.group_norm.forward(x)?;
        let s = n.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?;
        let q = self.to_q.forward(&s)?.unsqueeze(1)?;
        let k = self.to_k.forward(&s)?.unsqueeze(1)?;
        let v = self.to_v.forward(&s)?.unsqueeze(1)?;
        let o = attention(&q, &k, &v, None)?.squeeze(1)?;
        let o = self.to_out.forward(&o)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok((o + x)?)
    }
}

struct MidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Option<SpatialAttention>,
}

impl MidBlock {
    fn new(pp: &ParamPath, c: usize, groups: usize, add_attention: bool) -> Self {
        let r =
            |j: usize| ResnetBlock2D::new(&pp.pp("resnets").pp(j), c, c, None, groups, 1e-6, 1.0);
        Self {
            resnets: [r(0), r(1)],
            attention: add_attention
                .then(|| SpatialAttention::new(&pp.pp("attentions").pp(0), c, groups)),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(x, None)?;
        if let Some(a) = &self.attention {
            x = a.forward(&x)?;
        }
        self.resnets[1].forward(&x, None)
    }
}

struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

pub struct AutoencoderKL {
    cfg: AutoencoderKLConfig,
    src: std::sync::Arc<dyn WeightProvider>,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

/// The latent distribution returned by [`AutoencoderKL::encode`].
#[derive(Debug, Clone)]
pub struct LatentDist {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl LatentDist {
    pub fn std(&self) -> Result<Tensor> {
        Ok((&self.logvar * 0.5)?.exp()?)
    }
}

impl AutoencoderKL {
    pub fn new(pp: &ParamPath, cfg: &AutoencoderKLConfig) -> Result<Self> {
        cfg.validate()?;
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let g = cfg.norm_num_groups;
        let lat = cfg.latent_channels;
        let lpb = cfg.layers_per_block;

        // Text-to-image runs only decode: the encoder's weights are mapped when first used.
        let ep = pp.on_demand().pp("encoder");
        let mut blocks = Vec::new();
        let mut out_c = boc[0];
        for (i, &c) in boc.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let bp = ep.pp("down_blocks").pp(i);
            let resnets = (0..lpb)
                .map(|j| {
                    let c_in = if j == 0 { in_c } else { out_c };
                    ResnetBlock2D::new(&bp.pp("resnets").pp(j), c_in, out_c, None, g, 1e-6, 1.0)
                })
                .collect();
            let down =
                (i != n - 1).then(|| Downsample2D::new(&bp.pp("downsamplers").pp(0), out_c, 0));
            blocks.push((resnets, down));
        }
        let encoder = Encoder {
            conv_in: Conv2d::new(&ep.pp("conv_in"), cfg.in_channels, boc[0], 3, 1, 1),
            blocks,
            mid: MidBlock::new(
                &ep.pp("mid_block"),
                boc[n - 1],
                g,
                cfg.mid_block_add_attention,
            ),
            norm_out: GroupNorm::new(&ep.pp("conv_norm_out"), g, boc[n - 1], 1e-6),
            conv_out: Conv2d::new(&ep.pp("conv_out"), boc[n - 1], 2 * lat, 3, 1, 1),
        };

        let dp = pp.pp("decoder");
        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let mut blocks = Vec::new();
        let mut out_c = rev[0];
        for (i, &c) in rev.iter().enumerate() {
            let prev = out_c;
            out_c = c;
            let bp = dp.pp("up_blocks").pp(i);
            let resnets = (0..lpb + 1)
                .map(|j| {
                    let c_in = if j == 0 { prev } else { out_c };
                    ResnetBlock2D::new(&bp.pp("resnets").pp(j), c_in, out_c, None, g, 1e-6, 1.0)
                })
                .collect();
            let up = (i != n - 1).then(|| Upsample2D::new(&bp.pp("upsamplers").pp(0), out_c));
            blocks.push((resnets, up));
        }
        let decoder = Decoder {
            conv_in: Conv2d::new(&dp.pp("conv_in"), lat, rev[0], 3, 1, 1),
            mid: MidBlock::new(&dp.pp("mid_block"), rev[0], g, cfg.mid_block_add_attention),
            blocks,
            norm_out: GroupNorm::new(&dp.pp("conv_norm_out"), g, boc[0], 1e-6),
            conv_out: Conv2d::new(&dp.pp("conv_out"), boc[0], cfg.out_channels, 3, 1, 1),
        };
        Ok(Self {
            cfg: cfg.clone(),
            src: pp.provider().clone(),
            encoder,
            decoder,
            quant_conv: cfg
                .use_quant_conv
                .then(|| Conv2d::new(&pp.on_demand().pp("quant_conv"), 2 * lat, 2 * lat, 1, 1, 0)),
            post_quant_conv: cfg
                .use_post_quant_conv
                .then(|| Conv2d::new(&pp.pp("post_quant_conv"), lat, lat, 1, 1, 0)),
        })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.cfg
    }

    /// Encodes images (B, in_channels, H, W) in [-1, 1].
    pub fn encode(&self, x: &Tensor) -> Result<LatentDist> {
        self.encode_with(x, &VaeMemory::default())
    }

    /// Encoder + quant_conv: the moments (B, 2·latent_channels, h, w) of one batch or tile.
    pub(crate) fn encode_raw(&self, x: &Tensor) -> Result<Tensor> {
        let src = self.src.as_ref();
        let e = &self.encoder;
        let scope = ModuleScope::enter(src, "encoder.conv_in")?;
        let mut h = e.conv_in.forward(x)?;
        scope.exit()?;
        for (resnets, down) in &e.blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = down {
                h = d.forward(&h)?;
            }
        }
        h = e.mid.forward(&h)?;
        let scope = ModuleScope::enter(src, "encoder.out")?;
        h = e.conv_out.forward(&e.norm_out.forward_silu(&h)?)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        scope.exit()?;
        Ok(h)
    }

    pub(crate) fn dist_of(&self, moments: &Tensor) -> Result<LatentDist> {
        let lat = self.cfg.latent_channels;
        let mean = moments.narrow(1, 0, lat)?;
        let logvar = moments.narrow(1, lat, lat)?.clamp(-30f32, 20f32)?;
        Ok(LatentDist { mean, logvar })
    }

    /// Decodes latents (B, latent_channels, h, w), unscaled, to images in about [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_with(z, &VaeMemory::default())
    }

    /// post_quant_conv + decoder on one batch or tile.
    pub(crate) fn decode_raw(&self, z: &Tensor) -> Result<Tensor> {
        let src = self.src.as_ref();
        let scope = ModuleScope::enter(src, "decoder.in")?;
        let mut h = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        let d = &self.decoder;
        h = d.conv_in.forward(&h)?;
        scope.exit()?;
        h = d.mid.forward(&h)?;
        for (resnets, up) in &d.blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
                crate::alloc::release_free_memory();
            }
            if let Some(u) = up {
                h = u.forward(&h, None)?;
            }
            // Each level's activations are 4x the last's: return the freed ones now rather than
            // after the allocator's purge delay, so they do not sit under the next level's.
            crate::alloc::release_free_memory();
        }
        let scope = ModuleScope::enter(src, "decoder.out")?;
        h = if d.conv_out.fusable(&h) {
            // GroupNorm + SiLU applied as conv_out reads its input: no full-resolution copy at
            // the decode's largest level, where the run's peak usually is.
            let (a, b) = d.norm_out.coefficients(&h)?;
            let pro = Prologue {
                affine: Some((a, b)),
                silu: true,
                upsample: 1,
            };
            d.conv_out.forward_ext(&h, &pro, None)?
        } else {
            d.conv_out.forward(&d.norm_out.forward_silu(&h)?)?
        };
        scope.exit()?;
        Ok(h)
    }
}
