//! `AutoencoderKLWan` (diffusers 0.42.1): the causal video VAE of Wan 2.1 (z_dim 16) and Wan 2.2
//! (z_dim 48, patch size 2, residual blocks).
//!
//! Videos are `(B, C, T, H, W)` at the API, and a list of `(B, C, H, W)` frames inside, so the
//! causal convs, the per-frame attention and the resamplers all work frame by frame and a
//! chunk's frames are dropped as soon as the next layer has consumed them. Decoding runs as
//! diffusers does: the first latent frame alone, then the others in causal chunks with the
//! feature cache carried between chunks (see [`blocks`]); encoding likewise with the first frame,
//! then chunks of 4 frames. Memory strategies (chunk sizes, tiling, slicing) and the peak
//! estimate are in [`memory`].

mod blocks;
mod config;
pub mod memory;
mod norm;

use std::sync::Arc;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::layers::conv3d::CausalConv3d;
use crate::models::autoencoder_kl::LatentDist;
use crate::residency::{ModuleScope, ParamPath, WeightProvider};

use blocks::{
    cached_conv, norm_silu, AvgDown, DownLayer, DupUp, FeatCache, Frames, MidBlock, Resample,
    ResampleMode, ResidualBlock, UpBlock,
};
pub use config::{AutoencoderKLWanConfig, ENCODE_FRAMES_PER_CHUNK};
pub use memory::{WanTiling, WanVaeMemory, WanVaeOptions, WanVaePeak};
use norm::ChannelRmsNorm;

struct Encoder {
    conv_in: CausalConv3d,
    down_blocks: Vec<DownLayer>,
    mid: MidBlock,
    norm_out: ChannelRmsNorm,
    conv_out: CausalConv3d,
}

struct Decoder {
    conv_in: CausalConv3d,
    mid: MidBlock,
    up_blocks: Vec<UpBlock>,
    /// Up blocks from this one on (and the head) change no frame count: they run one frame at
    /// a time (see `decode_chunk`).
    per_frame_from: usize,
    norm_out: ChannelRmsNorm,
    conv_out: CausalConv3d,
}

pub struct AutoencoderKLWan {
    cfg: AutoencoderKLWanConfig,
    src: Arc<dyn WeightProvider>,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: CausalConv3d,
    post_quant_conv: CausalConv3d,
    /// f32 bytes of the (encoder + quant_conv, decoder + post_quant_conv) weights.
    weights: (u64, u64),
    /// f32 bytes of the largest causal-conv weight of (encoder, decoder): the per-tap copies
    /// a conv makes while it runs.
    largest_conv: (u64, u64),
}

fn conv333(pp: &ParamPath, i: usize, o: usize) -> CausalConv3d {
    CausalConv3d::new(pp, i, o, (3, 3), (1, 1), (1, 1))
}

fn conv111(pp: &ParamPath, i: usize, o: usize) -> CausalConv3d {
    CausalConv3d::new(pp, i, o, (1, 1), (1, 1), (0, 0))
}

impl AutoencoderKLWan {
    pub fn new(pp: &ParamPath, cfg: &AutoencoderKLWanConfig) -> Result<Self> {
        cfg.validate()?;
        let n = cfg.dim_mult.len();
        let nrb = cfg.num_res_blocks;

        // Encoder: dims = base · [1] + dim_mult.
        // Text-to-video runs only decode: the encoder's weights are mapped when first used.
        let ep = pp.on_demand().pp("encoder");
        let dims: Vec<usize> = std::iter::once(1)
            .chain(cfg.dim_mult.iter().copied())
            .map(|m| cfg.base_dim * m)
            .collect();
        let mut down_blocks = Vec::new();
        for i in 0..n {
            let (mut in_dim, out_dim) = (dims[i], dims[i + 1]);
            let down = i + 1 < n;
            let temporal = down && cfg.temperal_downsample[i];
            let mode = if temporal {
                ResampleMode::Down3d
            } else {
                ResampleMode::Down2d
            };
            if cfg.is_residual {
                let bp = ep.pp("down_blocks").pp(i);
                let resnets = (0..nrb)
                    .map(|j| {
                        let c_in = if j == 0 { in_dim } else { out_dim };
                        ResidualBlock::new(&bp.pp("resnets").pp(j), c_in, out_dim)
                    })
                    .collect();
                down_blocks.push(DownLayer::ResidualDown {
                    resnets,
                    downsampler: down
                        .then(|| Resample::new(&bp.pp("downsampler"), out_dim, mode, 0)),
                    avg_shortcut: AvgDown::new(
                        out_dim,
                        if temporal { 2 } else { 1 },
                        if down { 2 } else { 1 },
                    ),
                });
            } else {
                for _ in 0..nrb {
                    let bp = ep.pp("down_blocks").pp(down_blocks.len());
                    down_blocks.push(DownLayer::Res(ResidualBlock::new(&bp, in_dim, out_dim)));
                    in_dim = out_dim;
                }
                if down {
                    let bp = ep.pp("down_blocks").pp(down_blocks.len());
                    down_blocks.push(DownLayer::Resample(Resample::new(&bp, out_dim, mode, 0)));
                }
            }
        }
        let top = dims[n];
        let encoder = Encoder {
            conv_in: conv333(&ep.pp("conv_in"), cfg.in_channels, dims[0]),
            down_blocks,
            mid: MidBlock::new(&ep.pp("mid_block"), top),
            norm_out: ChannelRmsNorm::new(&ep.pp("norm_out"), top, false),
            conv_out: conv333(&ep.pp("conv_out"), top, 2 * cfg.z_dim),
        };

        // Decoder: dims = decoder_base · [dim_mult[-1]] + reversed(dim_mult).
        let dp = pp.pp("decoder");
        let d = cfg.decoder_dim();
        let dims: Vec<usize> = std::iter::once(cfg.dim_mult[n - 1])
            .chain(cfg.dim_mult.iter().rev().copied())
            .map(|m| d * m)
            .collect();
        let t_up: Vec<bool> = cfg.temperal_downsample.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        for i in 0..n {
            let (mut in_dim, out_dim) = (dims[i], dims[i + 1]);
            if i > 0 && !cfg.is_residual {
                // Wan 2.1's upsamplers halve the channels.
                in_dim /= 2;
            }
            let up = i + 1 < n;
            let temporal = up && t_up[i];
            let mode = if temporal {
                ResampleMode::Up3d
            } else {
                ResampleMode::Up2d
            };
            let bp = dp.pp("up_blocks").pp(i);
            let resnets = (0..nrb + 1)
                .map(|j| {
                    let c_in = if j == 0 { in_dim } else { out_dim };
                    ResidualBlock::new(&bp.pp("resnets").pp(j), c_in, out_dim)
                })
                .collect();
            let block = if cfg.is_residual {
                UpBlock::new(
                    resnets,
                    up.then(|| Resample::new(&bp.pp("upsampler"), out_dim, mode, out_dim)),
                    up.then(|| DupUp::new(out_dim, if temporal { 2 } else { 1 }, 2)),
                )
            } else {
                let upp = bp.pp("upsamplers").pp(0);
                UpBlock::new(
                    resnets,
                    up.then(|| Resample::new(&upp, out_dim, mode, out_dim / 2)),
                    None,
                )
            };
            up_blocks.push(block);
        }
        let per_frame_from = (0..n)
            .rev()
            .find(|&i| i + 1 < n && t_up[i])
            .map_or(0, |i| i + 1);
        let decoder = Decoder {
            conv_in: conv333(&dp.pp("conv_in"), cfg.z_dim, dims[0]),
            mid: MidBlock::new(&dp.pp("mid_block"), dims[0]),
            up_blocks,
            per_frame_from,
            norm_out: ChannelRmsNorm::new(&dp.pp("norm_out"), dims[n], false),
            conv_out: conv333(&dp.pp("conv_out"), dims[n], cfg.out_channels),
        };
        let quant_conv = conv111(
            &pp.on_demand().pp("quant_conv"),
            2 * cfg.z_dim,
            2 * cfg.z_dim,
        );
        let post_quant_conv = conv111(&pp.pp("post_quant_conv"), cfg.z_dim, cfg.z_dim);
        // Weight sizes for the peak estimates, from what the modules declared: (total, the
        // largest 5-D one) under the given prefixes.
        let declared = pp.declared();
        let sizes = |prefixes: [&str; 2]| -> (u64, u64) {
            let mut out = (0, 0);
            for s in declared
                .iter()
                .filter(|s| prefixes.iter().any(|p| s.name.starts_with(p)))
            {
                let b = 4 * s.shape.iter().product::<usize>() as u64;
                out.0 += b;
                if s.shape.len() == 5 {
                    out.1 = out.1.max(b);
                }
            }
            out
        };
        let enc = sizes(["encoder.", "quant_conv."]);
        let dec = sizes(["decoder.", "post_quant_conv."]);
        let weights = (enc.0, dec.0);
        let largest_conv = (enc.1, dec.1);
        Ok(Self {
            cfg: cfg.clone(),
            src: pp.provider().clone(),
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            weights,
            largest_conv,
        })
    }

    pub fn config(&self) -> &AutoencoderKLWanConfig {
        &self.cfg
    }

    /// Decodes latents `(B, z_dim, T, h, w)`, unnormalised, to a video
    /// `(B, C, 1 + 4(T - 1), h·f, w·f)` clamped to [-1, 1], exactly as diffusers' `decode`
    /// (one latent frame per causal chunk, no tiling).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decode_with(z, &WanVaeMemory::default())
    }

    /// Encodes a video `(B, C, 1 + 4k, H, W)` in [-1, 1] (H and W multiples of the spatial
    /// factor) to the latent distribution `(B, z_dim, 1 + k, H/f, W/f)`, as diffusers' `encode`.
    pub fn encode(&self, x: &Tensor) -> Result<LatentDist> {
        self.encode_with(x, &WanVaeMemory::default())
    }

    /// One causal chunk of latent frames through post_quant_conv and the decoder: the decoder's
    /// output frames (still patchified for Wan 2.2).
    fn decode_chunk(&self, z: Frames, cache: &mut FeatCache, first: bool) -> Result<Frames> {
        let src = self.src.as_ref();
        let d = &self.decoder;
        cache.rewind();
        let scope = ModuleScope::enter(src, "decoder.in")?;
        let x = self.post_quant_conv.forward(&[], &z)?;
        drop(z);
        let x = cached_conv(&d.conv_in, &x, cache)?;
        scope.exit()?;
        let mut x = d.mid.forward(x, cache)?;
        let (temporal, per_frame) = d.up_blocks.split_at(d.per_frame_from);
        for b in temporal {
            x = b.forward(x, cache, first)?;
        }
        // Past the last temporal upsampler each latent frame has become 4 (or 4·chunk) frames at
        // the finest levels, where the activations are largest; no layer from here on mixes
        // frames except the causal convs, whose cache slots stream. So the rest runs one frame
        // at a time, each pass revisiting the same slots in the same order: one frame's
        // activations alive instead of the chunk's (the tiled 480×832 decode's peak fell from
        // 1302 to 1178 MiB), and the same numbers up to float rounding (each output frame comes from the same three input
        // frames either way; only the kernels' blocking over frames differs).
        let slots = cache.position();
        let mut out = Vec::with_capacity(x.len());
        for fr in x {
            cache.seek(slots);
            let mut y = vec![fr];
            for b in per_frame {
                y = b.forward(y, cache, first)?;
            }
            let scope = ModuleScope::enter(src, "decoder.out")?;
            let h = norm_silu(&d.norm_out, &y)?;
            drop(y);
            out.extend(cached_conv(&d.conv_out, &h, cache)?);
            scope.exit()?;
        }
        Ok(out)
    }

    /// One chunk of (patchified) frames through the encoder and quant_conv: moment frames
    /// `(B, 2·z_dim, h, w)`.
    fn encode_chunk(&self, x: Frames, cache: &mut FeatCache) -> Result<Frames> {
        let src = self.src.as_ref();
        let e = &self.encoder;
        cache.rewind();
        let scope = ModuleScope::enter(src, "encoder.conv_in")?;
        let mut x = cached_conv(&e.conv_in, &x, cache)?;
        scope.exit()?;
        for layer in &e.down_blocks {
            x = layer.forward(x, cache)?;
        }
        let x = e.mid.forward(x, cache)?;
        let scope = ModuleScope::enter(src, "encoder.out")?;
        let h = norm_silu(&e.norm_out, &x)?;
        drop(x);
        let y = cached_conv(&e.conv_out, &h, cache)?;
        drop(h);
        let y = self.quant_conv.forward(&[], &y)?;
        scope.exit()?;
        Ok(y)
    }

    /// Streams the decode of `z` `(B, z_dim, T, h, w)`: latent frame 0 alone, then `chunk`
    /// frames at a time through one feature cache; `emit` gets each chunk's output frames.
    /// Alive at any time: one chunk's activations, the cache (2 frames per causal conv) and
    /// whatever `emit` keeps.
    fn stream_decode(
        &self,
        z: &Tensor,
        chunk: usize,
        emit: &mut dyn FnMut(Frames) -> Result<()>,
    ) -> Result<()> {
        let t = z.dim(2)?;
        let mut cache = FeatCache::default();
        let mut start = 0;
        while start < t {
            let n = if start == 0 { 1 } else { chunk.min(t - start) };
            let frames = (start..start + n)
                .map(|i| Ok(z.narrow(2, i, 1)?.squeeze(2)?.contiguous()?))
                .collect::<Result<Frames>>()?;
            let out = self.decode_chunk(frames, &mut cache, start == 0)?;
            emit(out)?;
            start += n;
        }
        Ok(())
    }

    /// Streams the encode of a video of `t` frames, `frame(i)` giving frame `i` patchified:
    /// frame 0 alone, then `4 · chunk` frames at a time. Returns the moments
    /// `(B, 2·z_dim, 1 + (t - 1)/4, h, w)`.
    fn stream_encode(
        &self,
        t: usize,
        chunk: usize,
        frame: &dyn Fn(usize) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut cache = FeatCache::default();
        let mut out = Vec::new();
        let mut start = 0;
        while start < t {
            let n = if start == 0 {
                1
            } else {
                (ENCODE_FRAMES_PER_CHUNK * chunk).min(t - start)
            };
            let frames = (start..start + n).map(frame).collect::<Result<Frames>>()?;
            out.extend(self.encode_chunk(frames, &mut cache)?);
            start += n;
        }
        Ok(Tensor::stack(&out, 2)?)
    }

    pub(crate) fn dist_of(&self, moments: &Tensor) -> Result<LatentDist> {
        let z = self.cfg.z_dim;
        let mean = moments.narrow(1, 0, z)?;
        let logvar = moments.narrow(1, z, z)?.clamp(-30f32, 20f32)?;
        Ok(LatentDist { mean, logvar })
    }
}

/// diffusers' `patchify` of one frame `(B, C, H, W)` -> `(B, C·p², H/p, W/p)`: channel
/// `c·p² + px·p + py` holds pixel offset (py, px).
pub(crate) fn patchify(x: &Tensor, p: usize) -> Result<Tensor> {
    if p == 1 {
        return Ok(x.contiguous()?);
    }
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape(vec![b, c, h / p, p, w / p, p])?
        .permute([0, 1, 5, 3, 2, 4])?
        .contiguous()?
        .reshape((b, c * p * p, h / p, w / p))?)
}

/// diffusers' `unpatchify` of `(B, C·p², [T,] H, W)` -> `(B, C, [T,] H·p, W·p)`.
pub(crate) fn unpatchify(x: &Tensor, p: usize) -> Result<Tensor> {
    if p == 1 {
        return Ok(x.clone());
    }
    let d = x.dims().to_vec();
    let (b, cp, h, w) = (d[0], d[1], d[d.len() - 2], d[d.len() - 1]);
    let c = cp / (p * p);
    match d.len() {
        4 => Ok(x
            .reshape(vec![b, c, p, p, h, w])?
            .permute([0, 1, 4, 3, 5, 2])?
            .contiguous()?
            .reshape((b, c, h * p, w * p))?),
        5 => Ok(x
            .reshape(vec![b, c, p, p, d[2], h, w])?
            .permute([0, 1, 4, 5, 3, 6, 2])?
            .contiguous()?
            .reshape((b, c, d[2], h * p, w * p))?),
        _ => Err(Error::InvalidArgument(format!(
            "unpatchify: expected a 4-D or 5-D tensor, got {:?}",
            x.dims()
        ))),
    }
}
