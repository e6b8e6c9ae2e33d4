//! Memory strategies of the Wan VAE and its peak estimate.
//!
//! - Temporal chunks: after the first latent frame (always alone, as diffusers), `decode_chunk`
//!   latent frames go through the decoder at once with the causal cache carried between chunks.
//!   1 is diffusers; more gives the same numbers (every output frame is computed by the same
//!   per-frame convs) and saves per-chunk overheads (weight loads under offload, weight-tap
//!   copies) for memory that grows with the chunk — never with the video's length.
//! - Tiling: spatial tiles exactly as diffusers' `tiled_decode`/`tiled_encode` (tile and stride in
//!   video pixels, linear blends over the tile above and to the left, crop to the stride). Each
//!   tile streams through time with its own cache. Each frame of a tile is blended as soon as it
//!   is decoded and goes to the output (a file, a host buffer) as a piece; only the strips later
//!   blends read are kept, so the output itself never has to be held (`vae decode` writes pieces
//!   straight into the safetensors file).
//! - Slicing: one batch item at a time.
//!
//! Quirk kept for parity: with `patch_size` (Wan 2.2), diffusers' `tiled_encode` applies the tile
//! and stride to the *patchified* video, so its encode tiles cover twice the pixels asked for.

use candle_core::Tensor;

use super::blocks::CACHE_T;
use super::{patchify, unpatchify, AutoencoderKLWan};
use crate::error::{Error, Result};
use crate::io::HostCanvas;
use crate::models::autoencoder_kl::LatentDist;
use crate::models::vae_tiling::{blend_h, blend_v};

/// diffusers' `tile_sample_min_height`/`_width` and `tile_sample_stride_height`/`_width`.
pub const DEFAULT_TILE: usize = 256;
pub const DEFAULT_STRIDE: usize = 192;

/// Tile geometry in video pixels, validated against a VAE by [`AutoencoderKLWan::tiling`] or
/// [`AutoencoderKLWan::tiling_hw`]: tiles and strides are multiples of its spatial factor and
/// `0 < stride <= tile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WanTiling {
    tile: (usize, usize),
    stride: (usize, usize),
}

impl WanTiling {
    /// (height, width) of a tile in pixels.
    pub fn tile(&self) -> (usize, usize) {
        self.tile
    }
    /// (height, width) between tile starts in pixels.
    pub fn stride(&self) -> (usize, usize) {
        self.stride
    }
}

/// A resolved memory plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WanVaeMemory {
    pub tiling: Option<WanTiling>,
    pub slicing: bool,
    /// Latent frames per causal decode chunk after the first (diffusers: 1).
    pub decode_chunk: usize,
    /// Encode chunks of `4 · encode_chunk` frames after the first (diffusers: 1).
    pub encode_chunk: usize,
}

impl Default for WanVaeMemory {
    fn default() -> Self {
        Self {
            tiling: None,
            slicing: false,
            decode_chunk: 1,
            encode_chunk: 1,
        }
    }
}

/// What the user asked for; resolved against the VAE and the latent size by
/// [`WanVaeOptions::plan`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WanVaeOptions {
    pub tiling: bool,
    /// Tile size in pixels (default 256); implies tiling.
    pub tile_size: Option<usize>,
    /// Overlap factor in [0, 1) (default 0.25): the stride is `tile · (1 - overlap)`.
    pub tile_overlap: Option<f64>,
    pub slicing: bool,
    /// Latent frames per decode chunk after the first (default 1, as diffusers).
    pub decode_chunk_size: Option<usize>,
    /// With a budget (bytes), the plan lowers the chunk and then, if needed, tiles with the
    /// largest tile whose estimated peak fits; without one nothing changes behind the user's
    /// back. A budget never raises the chunk.
    pub memory_budget: Option<u64>,
}

impl WanVaeOptions {
    /// The memory plan for decoding latents of `frames` × `h` × `w` for `batch` videos.
    pub fn plan(
        &self,
        vae: &AutoencoderKLWan,
        batch: usize,
        frames: usize,
        h: usize,
        w: usize,
    ) -> Result<WanVaeMemory> {
        if self.decode_chunk_size == Some(0) {
            return Err(Error::InvalidArgument(
                "the VAE decode chunk size must be at least 1 latent frame".into(),
            ));
        }
        let explicit = self.tiling || self.tile_size.is_some() || self.tile_overlap.is_some();
        let mut mem = WanVaeMemory {
            tiling: if explicit {
                Some(vae.tiling(self.tile_size, self.tile_overlap)?)
            } else {
                None
            },
            slicing: self.slicing,
            decode_chunk: self.decode_chunk_size.unwrap_or(1),
            encode_chunk: 1,
        };
        let Some(budget) = self.memory_budget else {
            return Ok(mem);
        };
        let batch = if self.slicing { 1 } else { batch };
        // The chunk asked for, then smaller ones.
        let chunks: Vec<usize> = (1..=mem.decode_chunk).rev().collect();
        let fits = |m: &WanVaeMemory| vae.decode_peak_estimate(batch, frames, h, w, m) <= budget;
        let with_chunk = |m: WanVaeMemory| {
            chunks
                .iter()
                .map(|&c| WanVaeMemory {
                    decode_chunk: c,
                    ..m
                })
                .find(|m| fits(m))
        };
        if explicit {
            // The tile is the user's; only the chunk is the budget's to choose.
            return Ok(with_chunk(mem).unwrap_or(WanVaeMemory {
                decode_chunk: *chunks.last().unwrap_or(&1),
                ..mem
            }));
        }
        if let Some(m) = with_chunk(mem) {
            return Ok(m);
        }
        // The largest square tile, stepping down by 4 latent cells (so the default 0.25
        // overlap gives a whole number of cells), whose decode fits.
        let f = vae.config().spatial_factor();
        let step = 4 * f;
        let mut px = (h.max(w) * f).div_ceil(step) * step;
        while px >= step {
            if let Ok(t) = vae.tiling(Some(px), Some(0.25)) {
                mem.tiling = Some(t);
                if let Some(m) = with_chunk(mem) {
                    return Ok(m);
                }
            }
            px -= step;
        }
        let smallest = vae.tiling(Some(step), Some(0.25))?;
        let need = vae.decode_peak_estimate(
            batch,
            frames,
            h,
            w,
            &WanVaeMemory {
                tiling: Some(smallest),
                decode_chunk: 1,
                ..mem
            },
        );
        Err(Error::InvalidArgument(format!(
            "--memory-budget {budget} bytes is too small for any Wan VAE decode plan (a \
             {step}-pixel tile with one-frame chunks needs about {need} bytes); raise the budget"
        )))
    }
}

/// The estimated peak of a decode or encode, by part (bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WanVaePeak {
    /// The decoder's (or encoder's) weights in f32.
    pub weights: u64,
    /// The causal feature cache: two frames per causal conv (of one tile when tiled).
    pub cache: u64,
    /// The costliest layer of one chunk, plus the conv kernels' scratch and weight-tap copies.
    pub working: u64,
    /// The assembled output, and with tiling the blend strips kept (see `decode_regions`).
    pub output: u64,
}

impl WanVaePeak {
    pub fn total(&self) -> u64 {
        self.weights + self.cache + self.working + self.output
    }
}

/// The conv kernels' bounded scratch (`conv2d::SCRATCH_BYTES`) and the attention's score block;
/// the per-tap weight copies of the largest conv come on top.
pub(crate) const KERNEL_SCRATCH: f64 = (crate::layers::conv2d::SCRATCH_BYTES + (64 << 20)) as f64;

impl AutoencoderKLWan {
    /// diffusers' tile geometry (256 px tiles, stride 192) or a square tile of `tile_px` pixels
    /// with `overlap` in [0, 1): the stride `tile · (1 - overlap)` must be a whole multiple of the
    /// VAE's spatial factor, else the error names the nearest overlaps that are.
    pub fn tiling(&self, tile_px: Option<usize>, overlap: Option<f64>) -> Result<WanTiling> {
        let f = self.cfg.spatial_factor();
        let tile = tile_px.unwrap_or(DEFAULT_TILE);
        if tile < f || !tile.is_multiple_of(f) {
            let lo = (tile / f).max(1) * f;
            return Err(Error::InvalidArgument(format!(
                "--tile-size must be a positive multiple of the VAE's spatial factor {f}; got \
                 {tile} (try {lo} or {})",
                lo + f
            )));
        }
        let stride = match overlap {
            None if tile_px.is_none() => DEFAULT_STRIDE,
            None => tile - tile / 4,
            Some(o) => {
                if !(0.0..1.0).contains(&o) {
                    return Err(Error::InvalidArgument(format!(
                        "--tile-overlap must be in [0, 1); got {o}"
                    )));
                }
                let s = tile as f64 * (1.0 - o);
                let cells = s / f as f64;
                if (cells - cells.round()).abs() > 1e-9 || cells.round() < 1.0 {
                    let options: Vec<String> = [cells.floor(), cells.ceil()]
                        .into_iter()
                        .filter(|&c| c >= 1.0 && c * f as f64 <= tile as f64)
                        .map(|c| {
                            let s = c as usize * f;
                            format!(
                                "--tile-overlap {} (stride {s} px)",
                                1.0 - s as f64 / tile as f64
                            )
                        })
                        .collect();
                    return Err(Error::InvalidArgument(format!(
                        "a {tile}-pixel tile with --tile-overlap {o} steps {s} px between tiles, \
                         which is not a multiple of the VAE's spatial factor {f}; use {}",
                        if options.is_empty() {
                            "a larger tile or a smaller overlap".to_string()
                        } else {
                            options.join(" or ")
                        }
                    )));
                }
                cells.round() as usize * f
            }
        };
        self.tiling_hw((tile, tile), (stride, stride))
    }

    /// diffusers' `enable_tiling(tile_sample_min_height, tile_sample_min_width,
    /// tile_sample_stride_height, tile_sample_stride_width)`, validated.
    pub fn tiling_hw(&self, tile: (usize, usize), stride: (usize, usize)) -> Result<WanTiling> {
        let f = self.cfg.spatial_factor();
        for (what, v) in [
            ("tile height", tile.0),
            ("tile width", tile.1),
            ("tile stride height", stride.0),
            ("tile stride width", stride.1),
        ] {
            if v == 0 || v % f != 0 {
                let lo = (v / f).max(1) * f;
                return Err(Error::InvalidArgument(format!(
                    "the {what} must be a positive multiple of the VAE's spatial factor {f}; got \
                     {v} (nearest valid: {lo} or {})",
                    lo + f
                )));
            }
        }
        if stride.0 > tile.0 || stride.1 > tile.1 {
            return Err(Error::InvalidArgument(format!(
                "the tile stride {stride:?} exceeds the tile {tile:?}: tiles would leave gaps"
            )));
        }
        Ok(WanTiling { tile, stride })
    }

    /// Decodes with a memory plan; see [`AutoencoderKLWan::decode`].
    pub fn decode_with(&self, z: &Tensor, mem: &WanVaeMemory) -> Result<Tensor> {
        let (b, t, h, w) = self.check_latents(z, mem)?;
        let f = self.cfg.spatial_factor();
        let shape = [
            b,
            self.cfg.image_out_channels(),
            self.cfg.decoded_frames(t),
            h * f,
            w * f,
        ];
        if self.tiles(mem, h, w).is_some() {
            // Tiles arrive frame by frame; they are placed in host memory, where a piece can be
            // written in place.
            let mut canvas = HostCanvas::zeros(&shape);
            self.decode_regions(z, mem, &mut |at, piece| canvas.write_region(&at, &piece))?;
            return Ok(canvas.into_tensor(z.device())?.to_dtype(z.dtype())?);
        }
        let out = Tensor::zeros(shape.as_slice(), z.dtype(), z.device())?;
        for (b0, n) in batch_items(b, mem.slicing) {
            let part = out.narrow(0, b0, n)?;
            // Frames go into the output as they come: no list of frames and no final copy.
            self.decode_stream(&z.narrow(0, b0, n)?, mem, &mut |i, frame| {
                Ok(part.slice_set(&frame.unsqueeze(2)?, 2, i)?)
            })?;
        }
        Ok(out)
    }

    /// Decodes with a memory plan, handing each output frame `(B', C, H, W)` (clamped to
    /// [-1, 1]) to `sink(first_batch_item, frame_index, frame)` as soon as it exists. Without
    /// tiling the frames come chunk by chunk; with tiling, once the whole video is decoded (use
    /// [`AutoencoderKLWan::decode_regions`] to stream tiles).
    pub fn decode_frames(
        &self,
        z: &Tensor,
        mem: &WanVaeMemory,
        sink: &mut dyn FnMut(usize, usize, Tensor) -> Result<()>,
    ) -> Result<()> {
        let (b, _, h, w) = self.check_latents(z, mem)?;
        for (b0, n) in batch_items(b, mem.slicing) {
            let z = z.narrow(0, b0, n)?;
            if self.tiles(mem, h, w).is_some() {
                let video = self.decode_with(&z, mem)?;
                for i in 0..video.dim(2)? {
                    sink(b0, i, video.narrow(2, i, 1)?.squeeze(2)?.contiguous()?)?;
                }
            } else {
                self.decode_stream(&z, mem, &mut |i, fr| sink(b0, i, fr))?;
            }
        }
        Ok(())
    }

    /// Decodes with a memory plan, handing each piece of the video to `sink(origin, piece)` as
    /// soon as it is final: `piece` is `(B', C, 1, h, w)`, clamped to [-1, 1], and belongs at
    /// `origin` = `[batch item, 0, frame, row, column]` of the `(B, C, T, H, W)` video. Untiled,
    /// the pieces are whole frames; tiled, one tile's part of one frame. Nothing that grows with
    /// the video's length is kept except, with tiling, the blend strips (see
    /// [`AutoencoderKLWan::decode_peak`]), so a sink that writes pieces out (a file, a host
    /// buffer) bounds the whole decode.
    pub fn decode_regions(
        &self,
        z: &Tensor,
        mem: &WanVaeMemory,
        sink: &mut dyn FnMut([usize; 5], Tensor) -> Result<()>,
    ) -> Result<()> {
        let (b, _, h, w) = self.check_latents(z, mem)?;
        for (b0, n) in batch_items(b, mem.slicing) {
            let z = z.narrow(0, b0, n)?;
            if self.tiles(mem, h, w).is_some() {
                self.decode_tiled(&z, mem, &mut |[_, c, t, y, x], piece| {
                    sink([b0, c, t, y, x], piece)
                })?;
            } else {
                self.decode_stream(&z, mem, &mut |i, fr| {
                    sink([b0, 0, i, 0, 0], fr.unsqueeze(2)?)
                })?;
            }
        }
        Ok(())
    }

    fn check_latents(
        &self,
        z: &Tensor,
        mem: &WanVaeMemory,
    ) -> Result<(usize, usize, usize, usize)> {
        let d = z.dims();
        if d.len() != 5 || d[1] != self.cfg.z_dim || d.contains(&0) {
            return Err(Error::InvalidArgument(format!(
                "the Wan VAE decodes latents of shape (B, {}, T, h, w); got {d:?}",
                self.cfg.z_dim
            )));
        }
        if mem.decode_chunk == 0 {
            return Err(Error::InvalidArgument(
                "the VAE decode chunk size must be at least 1 latent frame".into(),
            ));
        }
        Ok((d[0], d[2], d[3], d[4]))
    }

    /// The tiling of `mem` if it applies to `(h, w)` latents (diffusers tiles only latents
    /// larger than one tile).
    fn tiles(&self, mem: &WanVaeMemory, h: usize, w: usize) -> Option<WanTiling> {
        let f = self.cfg.spatial_factor();
        mem.tiling.filter(|g| h > g.tile.0 / f || w > g.tile.1 / f)
    }

    /// Untiled: the video's frames, unpatchified and clamped, to `sink(index, frame)` chunk by
    /// chunk.
    fn decode_stream(
        &self,
        z: &Tensor,
        mem: &WanVaeMemory,
        sink: &mut dyn FnMut(usize, Tensor) -> Result<()>,
    ) -> Result<()> {
        let p = self.cfg.patch();
        let mut next = 0;
        self.stream_decode(z, mem.decode_chunk, &mut |frames| {
            for fr in frames {
                sink(next, unpatchify(&fr, p)?.clamp(-1f32, 1f32)?)?;
                next += 1;
            }
            Ok(())
        })
    }

    /// Tiled, in diffusers' `tiled_decode` geometry (tiles and strides in latent cells on the
    /// input side, blends and crops in patchified decoder-output pixels), but frame by frame:
    /// each tile streams through time with its own cache, and each of its frames is blended
    /// with the strips kept from the tile above and the tile to the left, cropped to the stride
    /// and handed to `sink` (origins as [`AutoencoderKLWan::decode_regions`], batch item 0).
    /// Kept across tiles: the bottom strips of the row above and the right strip of the tile to
    /// the left, per frame — the only memory that grows with the video's length.
    fn decode_tiled(
        &self,
        z: &Tensor,
        mem: &WanVaeMemory,
        sink: &mut dyn FnMut([usize; 5], Tensor) -> Result<()>,
    ) -> Result<()> {
        let (_, _, _, h, w) = z.dims5()?;
        let (p, f) = (self.cfg.patch(), self.cfg.spatial_factor());
        let Some(g) = mem.tiling else {
            return Err(Error::InvalidArgument(
                "tiled decode without a tiling".into(),
            ));
        };
        let (tile_in, stride_in) = (
            (g.tile.0 / f, g.tile.1 / f),
            (g.stride.0 / f, g.stride.1 / f),
        );
        let blend = ((g.tile.0 - g.stride.0) / p, (g.tile.1 - g.stride.1) / p);
        let stride_out = (g.stride.0 / p, g.stride.1 / p);
        let size_out = (h * f / p, w * f / p);
        // The last `n` rows (dim 2) or columns (dim 3) of a frame, as a tensor of their own.
        let last = |t: &Tensor, dim: usize, n: usize| -> Result<Tensor> {
            let len = t.dim(dim)?;
            let n = n.min(len);
            Ok(t.narrow(dim, len - n, n)?.contiguous()?)
        };
        // Per column of the row above: its tile's bottom strip, per frame.
        let mut above: Vec<Vec<Option<Tensor>>> = Vec::new();
        for (ii, i) in (0..h).step_by(stride_in.0).enumerate() {
            let y_out = ii * stride_out.0;
            let mut bottoms = Vec::new();
            let mut left: Vec<Option<Tensor>> = Vec::new();
            for (jj, j) in (0..w).step_by(stride_in.1).enumerate() {
                let x_out = jj * stride_out.1;
                let tile =
                    z.narrow(3, i, tile_in.0.min(h - i))?
                        .narrow(4, j, tile_in.1.min(w - j))?;
                let mut up = above.get_mut(jj).map(std::mem::take).unwrap_or_default();
                let (mut bottom, mut right) = (Vec::new(), Vec::new());
                let mut k = 0;
                self.stream_decode(&tile, mem.decode_chunk, &mut |frames| {
                    for mut fr in frames {
                        if let Some(a) = up.get_mut(k).and_then(Option::take) {
                            fr = blend_v(&a, &fr, blend.0)?;
                        }
                        if let Some(l) = left.get_mut(k).and_then(Option::take) {
                            fr = blend_h(&l, &fr, blend.1)?;
                        }
                        bottom.push(Some(last(&fr, 2, blend.0)?));
                        right.push(Some(last(&fr, 3, blend.1)?));
                        let (th, tw) = (fr.dim(2)?, fr.dim(3)?);
                        let rows = stride_out.0.min(th).min(size_out.0 - y_out);
                        let cols = stride_out.1.min(tw).min(size_out.1 - x_out);
                        let piece = fr.narrow(2, 0, rows)?.narrow(3, 0, cols)?;
                        let piece = unpatchify(&piece, p)?.clamp(-1f32, 1f32)?;
                        sink([0, 0, k, y_out * p, x_out * p], piece.unsqueeze(2)?)?;
                        k += 1;
                    }
                    Ok(())
                })?;
                bottoms.push(bottom);
                left = right;
                // The tile's cache and activations are gone; the next tile may be another size.
                crate::alloc::release_free_memory();
            }
            above = bottoms;
        }
        Ok(())
    }

    /// Encodes with a memory plan; see [`AutoencoderKLWan::encode`].
    pub fn encode_with(&self, x: &Tensor, mem: &WanVaeMemory) -> Result<LatentDist> {
        let d = x.dims();
        let f = self.cfg.spatial_factor();
        let c = self.cfg.image_in_channels();
        if d.len() != 5
            || d[1] != c
            || d[2] == 0
            || !(d[2] - 1).is_multiple_of(super::ENCODE_FRAMES_PER_CHUNK)
            || d[3] == 0
            || d[4] == 0
            || !d[3].is_multiple_of(f)
            || !d[4].is_multiple_of(f)
        {
            return Err(Error::InvalidArgument(format!(
                "the Wan VAE encodes videos of shape (B, {c}, 1 + 4k, H, W) with H and W \
                 multiples of {f}; got {d:?}"
            )));
        }
        if mem.encode_chunk == 0 {
            return Err(Error::InvalidArgument(
                "the VAE encode chunk size must be at least 1".into(),
            ));
        }
        let b = d[0];
        let moments = if mem.slicing && b > 1 {
            let parts = (0..b)
                .map(|i| self.encode_item(&x.narrow(0, i, 1)?, mem))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)?
        } else {
            self.encode_item(x, mem)?
        };
        self.dist_of(&moments)
    }

    fn encode_item(&self, x: &Tensor, mem: &WanVaeMemory) -> Result<Tensor> {
        let (_, _, t, h, w) = x.dims5()?;
        let p = self.cfg.patch();
        // A pixel region (in patchified coordinates) of frame i, patchified.
        let region = |i: usize, y0: usize, x0: usize, th: usize, tw: usize| -> Result<Tensor> {
            let fr = x
                .narrow(2, i, 1)?
                .squeeze(2)?
                .narrow(2, y0 * p, th * p)?
                .narrow(3, x0 * p, tw * p)?;
            patchify(&fr, p)
        };
        let (hp, wp) = (h / p, w / p);
        let tiling = mem.tiling.filter(|g| h > g.tile.0 || w > g.tile.1);
        let Some(g) = tiling else {
            return self.stream_encode(t, mem.encode_chunk, &|i| region(i, 0, 0, hp, wp));
        };
        // diffusers' tiled_encode runs on the patchified video with the pixel tile and stride
        // as they are, and a compression of spatial factor / patch.
        let r = self.cfg.spatial_factor() / p;
        let geo = Geometry {
            tile_in: g.tile,
            stride_in: g.stride,
            blend_out: ((g.tile.0 - g.stride.0) / r, (g.tile.1 - g.stride.1) / r),
            stride_out: (g.stride.0 / r, g.stride.1 / r),
            size_out: (hp / r, wp / r),
        };
        let mut rows = Vec::new();
        tiled(
            (hp, wp),
            &geo,
            &mut |i, j, th, tw| {
                self.stream_encode(t, mem.encode_chunk, &|k| region(k, i, j, th, tw))
            },
            &mut |_, row| {
                rows.push(row);
                Ok(())
            },
        )?;
        Ok(Tensor::cat(&rows, 3)?)
    }

    /// Estimated peak bytes of decoding `(batch, frames, h, w)` latents with `mem` (pass
    /// `batch` 1 when slicing; [`WanVaeOptions::plan`] does).
    pub fn decode_peak_estimate(
        &self,
        batch: usize,
        frames: usize,
        h: usize,
        w: usize,
        mem: &WanVaeMemory,
    ) -> u64 {
        self.decode_peak(batch, frames, h, w, mem).total()
    }

    /// [`AutoencoderKLWan::decode_peak_estimate`] by part.
    ///
    /// Per chunk, a residual block with `F` frames of `C` channels holds at most its input, one
    /// intermediate and its output (3·F·C per pixel); the 3-D upsamplers double `F` on the way
    /// up. The cache is two input frames per causal conv. Only the output (and with tiling the
    /// strips kept for blending, of the whole video's length) grows with the number of frames.
    pub fn decode_peak(
        &self,
        batch: usize,
        frames: usize,
        h: usize,
        w: usize,
        mem: &WanVaeMemory,
    ) -> WanVaePeak {
        let cfg = &self.cfg;
        // In f64 so absurd sizes saturate instead of overflowing.
        let (f, p) = (cfg.spatial_factor() as f64, cfg.patch() as f64);
        let (b, t) = (batch as f64, frames.max(1));
        let (hf, wf) = (h as f64, w as f64);
        let tiling = self.tiles(mem, h, w);
        // The latent extent one decoder stream sees.
        let (th, tw) = match tiling {
            Some(g) => (
                h.min(g.tile.0 / cfg.spatial_factor()),
                w.min(g.tile.1 / cfg.spatial_factor()),
            ),
            None => (h, w),
        };
        let chunk = mem.decode_chunk.max(1).min(t.saturating_sub(1).max(1)) as f64;
        let (cache, working) = self.decoder_activations(b, chunk, (th * tw) as f64);
        let t_out = cfg.decoded_frames(t) as f64;
        let video = b * cfg.image_out_channels() as f64 * t_out * hf * f * wf * f * 4.0;
        let output = match tiling {
            Some(g) => {
                // The blend strips, per frame of the whole video's length (patchified
                // channels): the bottom strips of one row of tiles (and the current tile's) and
                // the right strip of the tile to the left; and one frame of a tile with its
                // blended copy.
                let px = b * cfg.out_channels as f64 * 4.0;
                let (bh, bw) = (
                    (g.tile.0 - g.stride.0) as f64 / p,
                    (g.tile.1 - g.stride.1) as f64 / p,
                );
                let (tile_h, tile_w) = (th as f64 * f / p, tw as f64 * f / p);
                let cols = w.div_ceil(g.stride.1 / cfg.spatial_factor()) as f64;
                let strips = (bh * (cols + 1.0) * tile_w + tile_h * bw) * t_out;
                video + (strips + 2.0 * tile_h * tile_w) * px
            }
            None => video,
        };
        WanVaePeak {
            weights: self.weights.1,
            cache: cache as u64,
            working: (working + KERNEL_SCRATCH) as u64 + self.largest_conv.1,
            output: output as u64,
        }
    }

    /// Estimated peak of encoding `batch` videos of `frames` × `height` × `width` pixels with
    /// `mem`, by part (the input video, held by the caller, is not counted).
    pub fn encode_peak(
        &self,
        batch: usize,
        frames: usize,
        height: usize,
        width: usize,
        mem: &WanVaeMemory,
    ) -> WanVaePeak {
        let cfg = &self.cfg;
        let p = cfg.patch();
        let (mut hp, mut wp) = (height / p, width / p);
        if let Some(g) = mem.tiling.filter(|g| height > g.tile.0 || width > g.tile.1) {
            // Tiles apply to the patchified video, as diffusers.
            (hp, wp) = (hp.min(g.tile.0), wp.min(g.tile.1));
        }
        let b = batch as f64;
        let chunk = (super::ENCODE_FRAMES_PER_CHUNK * mem.encode_chunk.max(1))
            .min(frames.saturating_sub(1).max(1)) as f64;
        let (cache, working) = self.encoder_activations(b, chunk, (hp * wp) as f64);
        let f = cfg.spatial_factor() as f64;
        let lat = b * 2.0 * cfg.z_dim as f64 * (1 + frames.saturating_sub(1) / 4) as f64;
        WanVaePeak {
            weights: self.weights.0,
            cache: cache as u64,
            working: (working + KERNEL_SCRATCH) as u64 + self.largest_conv.0,
            // The moments, twice (chunks and their concatenation).
            output: (2.0 * lat * (height as f64 / f) * (width as f64 / f) * 4.0) as u64,
        }
    }

    /// (cache, largest per-chunk working set) in bytes for one decoder stream over `px` latent
    /// pixels with `chunk` latent frames per chunk.
    fn decoder_activations(&self, b: f64, chunk: f64, px: f64) -> (f64, f64) {
        let cfg = &self.cfg;
        let n = cfg.dim_mult.len();
        let d = cfg.decoder_dim() as f64;
        let dims: Vec<f64> = std::iter::once(cfg.dim_mult[n - 1])
            .chain(cfg.dim_mult.iter().rev().copied())
            .map(|m| d * m as f64)
            .collect();
        let t_up: Vec<bool> = cfg.temperal_downsample.iter().rev().copied().collect();
        let nrb = cfg.num_res_blocks as f64;
        let frame = |c: f64, px: f64| b * c * px * 4.0;
        let cache_t = CACHE_T as f64;
        // conv_in (z_dim) and the mid block's two residual blocks (two convs each).
        let mut cache = cache_t * (frame(cfg.z_dim as f64, px) + 4.0 * frame(dims[0], px));
        let mut work = 3.0 * chunk * frame(dims[0], px);
        let (mut fr, mut px) = (chunk, px);
        // From the first up block past the last temporal upsampler on, frames go one at a time
        // while the chunk's frames at that point wait (`decode_chunk`).
        let per_frame_from = (0..n)
            .rev()
            .find(|&i| i + 1 < n && t_up[i])
            .map_or(0, |i| i + 1);
        let (mut held, mut held_frames) = (0.0, fr);
        for i in 0..n {
            if i == per_frame_from {
                let c = if i > 0 && !cfg.is_residual {
                    (dims[i] / 2.0).floor()
                } else {
                    dims[i]
                };
                (held, held_frames) = (fr * frame(c, px), fr);
                fr = 1.0;
            }
            let out = dims[i + 1];
            let inp = if i > 0 && !cfg.is_residual {
                (dims[i] / 2.0).floor()
            } else {
                dims[i]
            };
            // The first block's conv1 reads `inp` channels; every other conv reads `out`.
            cache += cache_t * (frame(inp, px) + (1.0 + 2.0 * nrb) * frame(out, px));
            work = work.max(held + fr * (2.0 * frame(inp.max(out), px) + frame(out, px)));
            if i + 1 < n {
                if t_up[i] {
                    cache += cache_t * frame(out, px);
                    // The time conv's doubled channels, before the split into frames.
                    work = work.max(fr * 3.0 * frame(out, px));
                    fr *= 2.0;
                }
                px *= 4.0;
                if cfg.is_residual {
                    // The shortcut's expansion next to the upsampled main path.
                    work = work.max(held + 3.0 * fr * frame(out, px));
                }
            }
        }
        // norm_out + conv_out at full resolution.
        let last = dims[n];
        cache += cache_t * frame(last, px);
        // ... and the frames already through it.
        let done = held_frames * frame(cfg.out_channels as f64, px);
        let head = fr * (2.0 * frame(last, px) + frame(cfg.out_channels as f64, px));
        work = work.max(held + done + head);
        (cache, work)
    }

    /// (cache, largest per-chunk working set) in bytes for one encoder stream over `px`
    /// (patchified) pixels with `chunk` frames per chunk.
    fn encoder_activations(&self, b: f64, chunk: f64, px: f64) -> (f64, f64) {
        let cfg = &self.cfg;
        let n = cfg.dim_mult.len();
        let dims: Vec<f64> = std::iter::once(1)
            .chain(cfg.dim_mult.iter().copied())
            .map(|m| (cfg.base_dim * m) as f64)
            .collect();
        let nrb = cfg.num_res_blocks as f64;
        let frame = |c: f64, px: f64| b * c * px * 4.0;
        let cache_t = CACHE_T as f64;
        let mut cache = cache_t * frame(cfg.in_channels as f64, px);
        let mut work = chunk * (frame(cfg.in_channels as f64, px) + 2.0 * frame(dims[0], px));
        let (mut fr, mut px) = (chunk, px);
        for i in 0..n {
            let (inp, out) = (dims[i], dims[i + 1]);
            cache += cache_t * (frame(inp, px) + (2.0 * nrb - 1.0) * frame(out, px));
            work = work.max(fr * (2.0 * frame(inp.max(out), px) + frame(out, px)));
            if i + 1 < n {
                px /= 4.0;
                if cfg.temperal_downsample[i] {
                    // One frame of the downsampled input.
                    cache += frame(out, px);
                    fr = (fr / 2.0).ceil();
                }
            }
        }
        let top = dims[n];
        // The mid block's two residual blocks and conv_out.
        cache += cache_t * 5.0 * frame(top, px);
        work = work.max(3.0 * fr * frame(top, px));
        (cache, work)
    }
}

/// `(first item, count)` of each decoder/encoder pass: all at once, or one by one when slicing.
fn batch_items(b: usize, slicing: bool) -> Vec<(usize, usize)> {
    if slicing && b > 1 {
        (0..b).map(|i| (i, 1)).collect()
    } else {
        vec![(0, b)]
    }
}

/// Tile geometry in the units of the tiled function's input and output.
struct Geometry {
    tile_in: (usize, usize),
    stride_in: (usize, usize),
    blend_out: (usize, usize),
    stride_out: (usize, usize),
    /// The output's exact (height, width).
    size_out: (usize, usize),
}

/// The encoder's tiling (the decoder blends frame by frame in `decode_tiled`).
/// Runs `run(y, x, th, tw)` over overlapping tiles of an `(h, w)` input in row-major order,
/// blends each output tile `(B, C, T, th', tw')` with the (already blended) tile above and to
/// the left, crops it to the output stride and hands each finished row, cropped to the output
/// size, to `row_out(first_output_row, row)`.
///
/// Blends read only the last `blend` rows (columns) of the tile above (to the left), so only
/// those are kept: alive at once are one tile, the current row cropped to the stride, and the
/// bottom strips of the row above — not the two whole rows of tiles diffusers keeps (it keeps
/// all of them).
fn tiled(
    (h, w): (usize, usize),
    g: &Geometry,
    run: &mut dyn FnMut(usize, usize, usize, usize) -> Result<Tensor>,
    row_out: &mut dyn FnMut(usize, Tensor) -> Result<()>,
) -> Result<()> {
    // The last `n` entries of `t` along `dim`, as a tensor of their own.
    let last = |t: &Tensor, dim: usize, n: usize| -> Result<Tensor> {
        let len = t.dim(dim)?;
        let n = n.min(len);
        Ok(t.narrow(dim, len - n, n)?.contiguous()?)
    };
    let mut above: Vec<Tensor> = Vec::new();
    let mut y_out = 0;
    for i in (0..h).step_by(g.stride_in.0) {
        let mut bottoms = Vec::new();
        let mut cropped = Vec::new();
        let mut left: Option<Tensor> = None;
        for (jj, j) in (0..w).step_by(g.stride_in.1).enumerate() {
            let mut t = run(i, j, g.tile_in.0.min(h - i), g.tile_in.1.min(w - j))?;
            let r = t.rank();
            if let Some(a) = above.get(jj) {
                t = blend_v(a, &t, g.blend_out.0)?;
            }
            if let Some(l) = &left {
                t = blend_h(l, &t, g.blend_out.1)?;
            }
            bottoms.push(last(&t, r - 2, g.blend_out.0)?);
            left = Some(last(&t, r - 1, g.blend_out.1)?);
            let (th, tw) = (t.dim(r - 2)?, t.dim(r - 1)?);
            cropped.push(
                t.narrow(r - 2, 0, g.stride_out.0.min(th))?
                    .narrow(r - 1, 0, g.stride_out.1.min(tw))?
                    .contiguous()?,
            );
        }
        let joined = Tensor::cat(&cropped, 4)?;
        drop(cropped);
        let rows = joined.dim(3)?.min(g.size_out.0.saturating_sub(y_out));
        let cols = joined.dim(4)?.min(g.size_out.1);
        if rows > 0 {
            row_out(y_out, joined.narrow(3, 0, rows)?.narrow(4, 0, cols)?)?;
        }
        y_out += rows;
        above = bottoms;
    }
    if y_out != g.size_out.0 {
        return Err(Error::InvalidArgument(format!(
            "Wan VAE tiling covered {y_out} of {} output rows",
            g.size_out.0
        )));
    }
    Ok(())
}
