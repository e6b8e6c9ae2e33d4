//! VAE memory strategies, exactly as diffusers 0.42.1's `AutoencoderKL`: tiled decode/encode
//! (overlapping tiles, linear blends over the previous row and column, cropped to the row limit)
//! and slicing (one batch item at a time).
//!
//! diffusers decodes every tile before blending, so its memory still grows with the image. Here a
//! row of tiles is blended against the previous row as soon as it is decoded and the older row is
//! dropped, which gives the same numbers (blends read the already-blended neighbours, as
//! diffusers' in-place blends do) with two rows of tiles alive at most.

use candle_core::{DType, Tensor};

use super::autoencoder_kl::{AutoencoderKL, LatentDist};
use crate::error::{Error, Result};

/// Tile geometry: sizes in sample pixels and in latent cells, and the overlap factor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tiling {
    pub tile_sample: usize,
    pub tile_latent: usize,
    pub overlap: f64,
}

impl Tiling {
    /// Latent cells between tile starts (diffusers' `int(tile_latent * (1 - overlap))`).
    ///
    /// Each tile is cropped to exactly this stride (times the VAE factor on the pixel side), in
    /// both directions, so the output always has the input's size. diffusers crops to
    /// `tile - blend`, which equals the stride for its defaults (so results are identical there)
    /// but not for every tile size and overlap, where its output comes out too large.
    pub fn latent_step(&self) -> usize {
        ((self.tile_latent as f64) * (1.0 - self.overlap)) as usize
    }
}

/// How the VAE may trade speed for memory.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct VaeMemory {
    pub tiling: Option<Tiling>,
    pub slicing: bool,
}

impl AutoencoderKL {
    /// diffusers' tile geometry (`tile_sample_min_size = sample_size`, overlap 0.25), or a custom
    /// tile size in pixels (a multiple of the VAE factor) and overlap in [0, 1).
    pub fn tiling(&self, tile_px: Option<usize>, overlap: Option<f64>) -> Result<Tiling> {
        let f = self.config().scale_factor();
        let overlap = overlap.unwrap_or(0.25);
        if !(0.0..1.0).contains(&overlap) {
            return Err(Error::InvalidArgument(format!(
                "--tile-overlap must be in [0, 1); got {overlap}"
            )));
        }
        let (tile_sample, tile_latent) = match tile_px {
            None => {
                let s = self.config().sample_size;
                (s, s / f)
            }
            Some(px) => {
                if px < f || px % f != 0 {
                    return Err(Error::InvalidArgument(format!(
                        "--tile-size must be a positive multiple of the VAE's scale factor {f}; got {px}"
                    )));
                }
                (px, px / f)
            }
        };
        // int() truncation, as diffusers; a zero step would never advance.
        if ((tile_latent as f64) * (1.0 - overlap)) as usize == 0 {
            return Err(Error::InvalidArgument(format!(
                "a {tile_sample}px tile with overlap {overlap} leaves no step between tiles; use a larger tile or a smaller overlap"
            )));
        }
        Ok(Tiling {
            tile_sample,
            tile_latent,
            overlap,
        })
    }

    /// Decodes latents (B, C, h, w), unscaled, with the given memory strategy.
    pub fn decode_with(&self, z: &Tensor, mem: &VaeMemory) -> Result<Tensor> {
        let (b, c, _, _) = z.dims4()?;
        if c != self.config().latent_channels {
            return Err(Error::InvalidArgument(format!(
                "latents have {c} channels but the VAE expects {}",
                self.config().latent_channels
            )));
        }
        if mem.slicing && b > 1 {
            let parts = (0..b)
                .map(|i| self.decode_one(&z.narrow(0, i, 1)?, mem.tiling))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Tensor::cat(&parts, 0)?);
        }
        self.decode_one(z, mem.tiling)
    }

    fn decode_one(&self, z: &Tensor, tiling: Option<Tiling>) -> Result<Tensor> {
        let (_, _, h, w) = z.dims4()?;
        match tiling {
            Some(t) if h > t.tile_latent || w > t.tile_latent => {
                let step = t.latent_step();
                let blend = ((t.tile_sample as f64) * t.overlap) as usize;
                let f = self.config().scale_factor();
                tiled(z, t.tile_latent, step, blend, step * f, |x| {
                    self.decode_raw(x)
                })
            }
            _ => self.decode_raw(z),
        }
    }

    /// Encodes images (B, C, H, W) in [-1, 1] with the given memory strategy.
    pub fn encode_with(&self, x: &Tensor, mem: &VaeMemory) -> Result<LatentDist> {
        let (b, c, h, w) = x.dims4()?;
        let f = self.config().scale_factor();
        if c != self.config().in_channels || h % f != 0 || w % f != 0 {
            return Err(Error::InvalidArgument(format!(
                "the VAE encodes images of shape (B, {}, H, W) with H and W multiples of {f}; got {:?}",
                self.config().in_channels,
                x.dims()
            )));
        }
        let moments = if mem.slicing && b > 1 {
            let parts = (0..b)
                .map(|i| self.encode_one(&x.narrow(0, i, 1)?, mem.tiling))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)?
        } else {
            self.encode_one(x, mem.tiling)?
        };
        self.dist_of(&moments)
    }

    fn encode_one(&self, x: &Tensor, tiling: Option<Tiling>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        match tiling {
            Some(t) if h > t.tile_sample || w > t.tile_sample => {
                let step = t.latent_step();
                let blend = ((t.tile_latent as f64) * t.overlap) as usize;
                let f = self.config().scale_factor();
                tiled(x, t.tile_sample, step * f, blend, step, |x| {
                    self.encode_raw(x)
                })
            }
            _ => self.encode_raw(x),
        }
    }
}

/// Runs `f` over overlapping `tile`-sized windows stepping by `step`, blends each output tile
/// with the (already blended) tile above and to the left over `blend` rows/columns, crops to
/// `limit` and stitches the result.
fn tiled(
    x: &Tensor,
    tile: usize,
    step: usize,
    blend: usize,
    limit: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let mut prev: Option<Vec<Tensor>> = None;
    let mut rows = Vec::new();
    for i in (0..h).step_by(step) {
        let mut row: Vec<Tensor> = Vec::new();
        for (jj, j) in (0..w).step_by(step).enumerate() {
            let t = x
                .narrow(2, i, tile.min(h - i))?
                .narrow(3, j, tile.min(w - j))?;
            let mut t = f(&t)?;
            if let Some(p) = &prev {
                t = blend_v(&p[jj], &t, blend)?;
            }
            if jj > 0 {
                t = blend_h(&row[jj - 1], &t, blend)?;
            }
            row.push(t);
        }
        let cropped = row
            .iter()
            .map(|t| {
                let (_, _, th, tw) = t.dims4()?;
                Ok(t.narrow(2, 0, limit.min(th))?.narrow(3, 0, limit.min(tw))?)
            })
            .collect::<Result<Vec<_>>>()?;
        rows.push(Tensor::cat(&cropped, 3)?);
        prev = Some(row);
    }
    Ok(Tensor::cat(&rows, 2)?)
}

/// Weights `(1 - k/e, k/e)` for k in 0..e, rounded to the tensor dtype from f64 as torch rounds
/// a Python float scalar.
fn ramps(e: usize, dim: usize, dtype: DType, x: &Tensor) -> Result<(Tensor, Tensor)> {
    let a: Vec<f32> = (0..e).map(|k| (1.0 - k as f64 / e as f64) as f32).collect();
    let b: Vec<f32> = (0..e).map(|k| (k as f64 / e as f64) as f32).collect();
    let shape: Vec<usize> = (0..x.rank())
        .map(|d| if d == dim { e } else { 1 })
        .collect();
    let mk = |v: Vec<f32>| -> Result<Tensor> {
        Ok(Tensor::from_vec(v, shape.as_slice(), x.device())?.to_dtype(dtype)?)
    };
    Ok((mk(a)?, mk(b)?))
}

fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let e = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if e == 0 {
        return Ok(b.clone());
    }
    let (wa, wb) = ramps(e, dim, b.dtype(), b)?;
    let tail = a.narrow(dim, a.dim(dim)? - e, e)?;
    let head = b.narrow(dim, 0, e)?;
    // Blend only where both tiles have data (a last column/row tile can be narrower).
    let r = b.rank();
    let other = if dim == r - 2 { r - 1 } else { r - 2 };
    let n = a.dim(other)?.min(b.dim(other)?);
    let mixed = (tail.narrow(other, 0, n)?.broadcast_mul(&wa)?
        + head.narrow(other, 0, n)?.broadcast_mul(&wb)?)?;
    let mixed = if n < b.dim(other)? {
        let rest = head.narrow(other, n, b.dim(other)? - n)?;
        Tensor::cat(&[&mixed, &rest], other)?
    } else {
        mixed
    };
    let rest = b.narrow(dim, e, b.dim(dim)? - e)?;
    Ok(Tensor::cat(&[&mixed, &rest], dim)?)
}

/// Blends the last `extent` rows of `a` into the first rows of `b` (the second-to-last dim, so
/// images and videos alike).
pub(crate) fn blend_v(a: &Tensor, b: &Tensor, extent: usize) -> Result<Tensor> {
    blend(a, b, extent, b.rank() - 2)
}

/// Blends the last `extent` columns of `a` into the first columns of `b` (the last dim).
pub(crate) fn blend_h(a: &Tensor, b: &Tensor, extent: usize) -> Result<Tensor> {
    blend(a, b, extent, b.rank() - 1)
}

impl VaeMemory {
    /// What the memory budget turned on, if the user did not ask for it (said on stderr).
    pub fn budget_note(&self, asked: &VaeOptions) -> Option<String> {
        let explicit = asked.tiling || asked.tile_size.is_some() || asked.tile_overlap.is_some();
        match (explicit, self.tiling) {
            (false, Some(t)) => Some(format!(
                "VAE: tiling turned on to fit --memory-budget (tiles of {} px, overlap {})",
                t.tile_sample, t.overlap
            )),
            _ => None,
        }
    }
}

/// What the user asked for; resolved against the VAE and the latent size by [`VaeOptions::plan`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct VaeOptions {
    pub tiling: bool,
    pub tile_size: Option<usize>,
    pub tile_overlap: Option<f64>,
    pub slicing: bool,
    /// With a budget (bytes), tiling turns on by itself when the untiled decode would not fit.
    pub memory_budget: Option<u64>,
}

impl VaeOptions {
    /// The memory strategy for decoding `(batch, h, w)` latents.
    pub fn plan(&self, vae: &AutoencoderKL, batch: usize, h: usize, w: usize) -> Result<VaeMemory> {
        let explicit = self.tiling || self.tile_size.is_some() || self.tile_overlap.is_some();
        let tiling = if explicit {
            Some(vae.tiling(self.tile_size, self.tile_overlap)?)
        } else {
            None
        };
        let mut mem = VaeMemory {
            tiling,
            slicing: self.slicing,
        };
        let Some(budget) = self.memory_budget else {
            return Ok(mem);
        };
        let per = if self.slicing { 1 } else { batch };
        if mem.tiling.is_none() && vae.decode_peak_estimate(per, h, w) > budget {
            // The largest square tile (a multiple of 8 latent cells) whose decode fits.
            let f = vae.config().scale_factor();
            let mut lat = h.max(w).div_ceil(8) * 8;
            let overlap = self.tile_overlap.unwrap_or(0.25);
            let chosen = loop {
                if lat < 8 {
                    break None;
                }
                if vae.decode_peak_estimate(per, lat, lat) <= budget {
                    break Some(vae.tiling(Some(lat * f), Some(overlap))?);
                }
                lat -= 8;
            };
            mem.tiling = Some(chosen.ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "--memory-budget {budget} bytes is too small for any VAE decode plan (a 64-pixel tile needs about {} bytes); raise the budget",
                    vae.decode_peak_estimate(per, 8, 8)
                ))
            })?);
        }
        Ok(mem)
    }
}

impl AutoencoderKL {
    /// The decoder's channels per level, from the latent resolution up.
    fn decoder_channels(&self) -> Vec<u64> {
        self.config()
            .block_out_channels
            .iter()
            .rev()
            .map(|&c| c as u64)
            .collect()
    }

    /// Estimated peak bytes of decoding `(batch, h, w)` latents untiled: the decoder's weights,
    /// plus, at the costliest resolution, the block's input, output and normalised copies and the
    /// conv's im2col buffer (9 × input channels per pixel), plus the mid-block attention matrix.
    pub fn decode_peak_estimate(&self, batch: usize, h: usize, w: usize) -> u64 {
        let cfg = self.config();
        let bytes = 4u64; // activations are computed in f32 or smaller
        let boc = self.decoder_channels();
        let (b, h, w) = (batch as u64, h as u64, w as u64);
        let mut act = 0u64;
        for (i, &c) in boc.iter().enumerate() {
            let px = (h << i) * (w << i);
            // Upsampling into a level runs at the next resolution with this level's channels.
            let up_px = if i + 1 < boc.len() { px * 4 } else { px };
            act = act.max(b * c * (3 * px.max(up_px) + 9 * px.max(up_px)) * bytes);
        }
        let attn = if cfg.mid_block_add_attention {
            b * (h * w) * (h * w) * bytes * 2
        } else {
            0
        };
        let weights: u64 = boc.iter().map(|&c| c * c * 9 * 6).sum::<u64>() * bytes;
        weights + act.max(attn)
    }

    /// The decode's activations alone (its weights are the planner's to count): at the
    /// costliest level, a resnet's input and two maps of its output width (the intermediate and
    /// the output; the lean convs need no im2col copy and GroupNorm+SiLU is the conv's
    /// prologue), plus the kernels' bounded scratch. Levels run at doubling resolutions, each
    /// reading the previous level's channels.
    pub fn decode_activation_estimate(&self, batch: usize, h: usize, w: usize) -> u64 {
        let cfg = self.config();
        let boc = self.decoder_channels();
        let (b, h, w) = (batch as u64, h as u64, w as u64);
        let mut act = 0u64;
        for (i, &c) in boc.iter().enumerate() {
            let px = (h << i) * (w << i);
            let cin = if i == 0 { c } else { boc[i - 1] };
            act = act.max(b * (cin + 2 * c) * px * 4);
        }
        let attn = if cfg.mid_block_add_attention {
            b * boc[0] * h * w * 4 * 4
        } else {
            0
        };
        // Small maps fill little of it.
        let scratch = ((crate::layers::conv2d::SCRATCH_BYTES + (64 << 20)) as u64).min(act / 2);
        act.max(attn) + scratch
    }
}
