//! The blocks of `WanEncoder3d` / `WanDecoder3d`, over a chunk of a video held as a list of
//! frames `(B, C, H, W)`, with diffusers' causal feature cache.
//!
//! The cache ([`FeatCache`]) holds, for each causal conv in visiting order, the last
//! `CACHE_T = 2` input frames it saw (the temporal downsampler keeps 1): exactly what the next
//! chunk's conv needs in place of zero padding, so streaming a video chunk by chunk gives the
//! whole-video result while memory stays that of one chunk plus two frames per conv. Frames are
//! shared tensor handles, so caching one copies nothing.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::layers::conv2d::{Padding, Prologue};
use crate::layers::conv3d::CausalConv3d;
use crate::layers::{attention, Conv2d};
use crate::residency::{ParamPath, UnitScope};

use super::norm::ChannelRmsNorm;

/// diffusers' `CACHE_T`: frames kept per causal conv.
pub(crate) const CACHE_T: usize = 2;

pub(crate) type Frames = Vec<Tensor>;

/// What one causal conv remembers between chunks.
#[derive(Default)]
enum Slot {
    /// Not run yet.
    #[default]
    Empty,
    /// diffusers' `"Rep"`: a temporal upsampler that let the first chunk through unchanged; its
    /// next chunk is convolved with zero history.
    Rep,
    Frames(Frames),
}

/// diffusers' `feat_cache` list and `feat_idx` cursor, for one stream (a video or one tile of it).
#[derive(Default)]
pub(crate) struct FeatCache {
    slots: Vec<Slot>,
    idx: usize,
}

impl FeatCache {
    /// Back to the first conv, before each chunk.
    pub fn rewind(&mut self) {
        self.idx = 0;
    }

    /// The cursor, to run the same convs again on the next frames with [`FeatCache::seek`].
    pub fn position(&self) -> usize {
        self.idx
    }

    pub fn seek(&mut self, idx: usize) {
        self.idx = idx;
    }

    fn next(&mut self) -> &mut Slot {
        if self.idx == self.slots.len() {
            self.slots.push(Slot::Empty);
        }
        self.idx += 1;
        &mut self.slots[self.idx - 1]
    }
}

/// The last `n` frames of `past` followed by `x`.
fn tail(past: &[Tensor], x: &[Tensor], n: usize) -> Frames {
    let all: Vec<&Tensor> = past.iter().chain(x).collect();
    all[all.len().saturating_sub(n)..]
        .iter()
        .map(|&t| t.clone())
        .collect()
}

/// A causal conv that takes its history from the next cache slot and leaves its input's last
/// frames there (diffusers' `cache_x` rule: the chunk's last two frames, completed with the
/// previous chunk's last frame when the chunk has one).
fn cached(
    conv: &CausalConv3d,
    x: &[Tensor],
    cache: &mut FeatCache,
    residual: Option<Frames>,
) -> Result<Frames> {
    let slot = cache.next();
    let past = match slot {
        Slot::Frames(f) => std::mem::take(f),
        _ => Vec::new(),
    };
    let y = conv.forward_ext(&past, x, residual)?;
    *slot = Slot::Frames(tail(&past, x, CACHE_T));
    Ok(y)
}

fn map(x: &[Tensor], f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Frames> {
    x.iter().map(f).collect()
}

/// `WanResidualBlock`: RMS norm, SiLU, causal 3x3x3 conv, twice, plus a (1x1x1) shortcut.
pub(crate) struct ResidualBlock {
    unit: UnitScope,
    norm1: ChannelRmsNorm,
    conv1: CausalConv3d,
    norm2: ChannelRmsNorm,
    conv2: CausalConv3d,
    conv_shortcut: Option<CausalConv3d>,
}

impl ResidualBlock {
    pub fn new(pp: &ParamPath, in_c: usize, out_c: usize) -> Self {
        let conv = |name: &str, i, o| CausalConv3d::new(&pp.pp(name), i, o, (3, 3), (1, 1), (1, 1));
        Self {
            unit: UnitScope::new(pp),
            norm1: ChannelRmsNorm::new(&pp.pp("norm1"), in_c, false),
            conv1: conv("conv1", in_c, out_c),
            norm2: ChannelRmsNorm::new(&pp.pp("norm2"), out_c, false),
            conv2: conv("conv2", out_c, out_c),
            conv_shortcut: (in_c != out_c).then(|| {
                CausalConv3d::new(&pp.pp("conv_shortcut"), in_c, out_c, (1, 1), (1, 1), (0, 0))
            }),
        }
    }

    pub fn forward(&self, x: Frames, cache: &mut FeatCache) -> Result<Frames> {
        self.unit.run(|| {
            // Each intermediate is dropped as soon as the next exists (the caches keep their
            // two frames of it).
            let h = {
                let n = map(&x, |f| self.norm1.forward(f, true))?;
                cached(&self.conv1, &n, cache, None)?
            };
            let h = {
                let n = map(&h, |f| self.norm2.forward(f, true))?;
                drop(h);
                n
            };
            // The shortcut rides in conv2's accumulator: no separate sum.
            let res = match &self.conv_shortcut {
                Some(sc) => sc.forward(&[], &x)?,
                None => x,
            };
            cached(&self.conv2, &h, cache, Some(res))
        })
    }
}

/// `WanAttentionBlock`: single-head self-attention within each frame.
pub(crate) struct AttentionBlock {
    unit: UnitScope,
    norm: ChannelRmsNorm,
    to_qkv: Conv2d,
    proj: Conv2d,
    channels: usize,
}

impl AttentionBlock {
    pub fn new(pp: &ParamPath, c: usize) -> Self {
        Self {
            unit: UnitScope::new(pp),
            norm: ChannelRmsNorm::new(&pp.pp("norm"), c, true),
            to_qkv: Conv2d::new(&pp.pp("to_qkv"), c, 3 * c, 1, 1, 0),
            proj: Conv2d::new(&pp.pp("proj"), c, c, 1, 1, 0),
            channels: c,
        }
    }

    pub fn forward(&self, x: Frames) -> Result<Frames> {
        self.unit.run(|| map(&x, |f| self.frame(f)))
    }

    fn frame(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let c3 = 3 * self.channels;
        let qkv = self.to_qkv.forward(&self.norm.forward(x, false)?)?;
        // (B, 3C, HW) -> (B, 1, HW, 3C), then q | k | v along the last dim, as diffusers.
        let qkv = qkv
            .reshape((b, 1, c3, h * w))?
            .transpose(2, 3)?
            .contiguous()?;
        let q = qkv.narrow(3, 0, c)?.contiguous()?;
        let k = qkv.narrow(3, c, c)?.contiguous()?;
        let v = qkv.narrow(3, 2 * c, c)?.contiguous()?;
        drop(qkv);
        let o = attention(&q, &k, &v, None)?;
        let o = o.squeeze(1)?.transpose(1, 2)?.reshape((b, c, h, w))?;
        self.proj.forward_ext(&o, &Prologue::default(), Some(x))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResampleMode {
    Up2d,
    Up3d,
    Down2d,
    Down3d,
}

/// `WanResample`: nearest ×2 + 3x3 conv (up) or padded stride-2 3x3 conv (down), per frame, and
/// for the 3-D modes a causal temporal conv that doubles (up) or halves (down) the frames.
pub(crate) struct Resample {
    unit: UnitScope,
    mode: ResampleMode,
    conv: Conv2d,
    time_conv: Option<CausalConv3d>,
    channels: usize,
}

impl Resample {
    /// `up_out`: the upsampling conv's output channels (Wan 2.1 halves them, Wan 2.2 keeps them).
    pub fn new(pp: &ParamPath, dim: usize, mode: ResampleMode, up_out: usize) -> Self {
        let cp = pp.pp("resample").pp(1);
        let (conv, time_conv) = match mode {
            ResampleMode::Up2d | ResampleMode::Up3d => (
                Conv2d::new(&cp, dim, up_out, 3, 1, 1),
                (mode == ResampleMode::Up3d).then(|| {
                    CausalConv3d::new(&pp.pp("time_conv"), dim, 2 * dim, (3, 1), (1, 1), (1, 0))
                }),
            ),
            ResampleMode::Down2d | ResampleMode::Down3d => (
                // nn.ZeroPad2d((0, 1, 0, 1)): right and bottom only.
                Conv2d::new(&cp, dim, dim, 3, 2, 0).with_padding(Padding {
                    top: 0,
                    bottom: 1,
                    left: 0,
                    right: 1,
                }),
                (mode == ResampleMode::Down3d).then(|| {
                    CausalConv3d::new(&pp.pp("time_conv"), dim, dim, (3, 1), (2, 1), (0, 0))
                }),
            ),
        };
        Self {
            unit: UnitScope::new(pp),
            mode,
            conv,
            time_conv,
            channels: dim,
        }
    }

    pub fn forward(&self, x: Frames, cache: &mut FeatCache) -> Result<Frames> {
        self.unit.run(|| self.forward_inner(x, cache))
    }

    fn forward_inner(&self, mut x: Frames, cache: &mut FeatCache) -> Result<Frames> {
        if let (ResampleMode::Up3d, Some(tc)) = (self.mode, &self.time_conv) {
            let slot = cache.next();
            if matches!(slot, Slot::Empty) {
                // The first chunk passes through with its frame count unchanged.
                *slot = Slot::Rep;
            } else {
                let past = match slot {
                    Slot::Frames(f) => std::mem::take(f),
                    _ => Vec::new(),
                };
                let y = tc.forward(&past, &x)?;
                *slot = Slot::Frames(tail(&past, &x, CACHE_T));
                // Each output frame's channels [0, C) and [C, 2C) are two consecutive frames.
                let c = self.channels;
                x = Vec::with_capacity(2 * y.len());
                for f in y {
                    x.push(f.narrow(1, 0, c)?);
                    x.push(f.narrow(1, c, c)?);
                }
            }
        }
        let up = Prologue {
            upsample: 2,
            ..Prologue::default()
        };
        let mut x = match self.mode {
            // Nearest ×2 read inside the conv ("nearest-exact" equals nearest at ×2).
            ResampleMode::Up2d | ResampleMode::Up3d => {
                map(&x, |f| self.conv.forward_ext(f, &up, None))?
            }
            ResampleMode::Down2d | ResampleMode::Down3d => map(&x, |f| self.conv.forward(f))?,
        };
        if let (ResampleMode::Down3d, Some(tc)) = (self.mode, &self.time_conv) {
            let slot = cache.next();
            match slot {
                Slot::Frames(prev) => {
                    // Stride-2 windows over (previous chunk's last frame, this chunk).
                    let mut seq = Vec::with_capacity(1 + x.len());
                    seq.extend(prev.last().cloned());
                    let last = x.last().cloned();
                    seq.append(&mut x);
                    *slot = Slot::Frames(last.into_iter().collect());
                    x = tc.forward(&[], &seq)?;
                }
                _ => {
                    // The first chunk passes through; only its last frame is ever read back.
                    *slot = Slot::Frames(tail(&[], &x, 1));
                }
            }
        }
        Ok(x)
    }
}

/// `AvgDown3D`: the Wan 2.2 encoder's shortcut, space-and-time-to-channel then a mean over
/// channel groups.
pub(crate) struct AvgDown {
    out_c: usize,
    ft: usize,
    fs: usize,
}

impl AvgDown {
    pub fn new(out_c: usize, ft: usize, fs: usize) -> Self {
        Self { out_c, ft, fs }
    }

    pub fn forward(&self, x: &[Tensor]) -> Result<Frames> {
        let (ft, fs) = (self.ft, self.fs);
        let Some(first) = x.first() else {
            return Ok(Vec::new());
        };
        let (b, c, h, w) = first.dims4()?;
        // Zero frames in front make the chunk a whole number of ft-frame groups.
        let pad = (ft - x.len() % ft) % ft;
        let zero = first.zeros_like()?;
        let seq: Vec<&Tensor> = std::iter::repeat_n(&zero, pad).chain(x).collect();
        let group = c * ft * fs * fs / self.out_c;
        seq.chunks(ft)
            .map(|g| {
                // (B, C, ft, H/fs, fs, W/fs, fs) -> (B, C, ft, fs, fs, H/fs, W/fs): the channel
                // index becomes c·ft·fs² + t·fs² + y·fs + x, as diffusers' permute.
                let s = Tensor::stack(g, 2)?
                    .reshape(vec![b, c, ft, h / fs, fs, w / fs, fs])?
                    .permute([0, 1, 2, 4, 6, 3, 5])?
                    .contiguous()?
                    .reshape(vec![b, self.out_c, group, h / fs, w / fs])?;
                Ok(s.mean(2)?)
            })
            .collect()
    }
}

/// `DupUp3D`: the Wan 2.2 decoder's shortcut, channels repeated then channel-to-space-and-time.
pub(crate) struct DupUp {
    out_c: usize,
    ft: usize,
    fs: usize,
}

impl DupUp {
    pub fn new(out_c: usize, ft: usize, fs: usize) -> Self {
        Self { out_c, ft, fs }
    }

    pub fn forward(&self, x: &[Tensor], first_chunk: bool) -> Result<Frames> {
        let (ft, fs) = (self.ft, self.fs);
        let mut out = Vec::with_capacity(x.len() * ft);
        for f in x {
            let (b, c, h, w) = f.dims4()?;
            let reps = self.out_c * ft * fs * fs / c;
            // repeat_interleave over channels, then (B, out, ft, fs, fs, H, W).
            let e = f
                .unsqueeze(2)?
                .broadcast_as(vec![b, c, reps, h, w])?
                .contiguous()?
                .reshape(vec![b, self.out_c, ft, fs, fs, h, w])?;
            for t in 0..ft {
                // (B, out, fs_y, fs_x, H, W) -> (B, out, H, fs_y, W, fs_x).
                let s = e
                    .narrow(2, t, 1)?
                    .squeeze(2)?
                    .permute([0, 1, 4, 2, 5, 3])?
                    .contiguous()?
                    .reshape((b, self.out_c, h * fs, w * fs))?;
                out.push(s);
            }
        }
        if first_chunk {
            // The first latent frame decodes to one frame, not ft.
            out.drain(..(ft - 1).min(out.len()));
        }
        Ok(out)
    }
}

/// `WanMidBlock` with one attention layer.
pub(crate) struct MidBlock {
    resnets: [ResidualBlock; 2],
    attention: AttentionBlock,
}

impl MidBlock {
    pub fn new(pp: &ParamPath, c: usize) -> Self {
        let r = |j: usize| ResidualBlock::new(&pp.pp("resnets").pp(j), c, c);
        Self {
            resnets: [r(0), r(1)],
            attention: AttentionBlock::new(&pp.pp("attentions").pp(0), c),
        }
    }

    pub fn forward(&self, x: Frames, cache: &mut FeatCache) -> Result<Frames> {
        let x = self.resnets[0].forward(x, cache)?;
        let x = self.attention.forward(x)?;
        self.resnets[1].forward(x, cache)
    }
}

/// One entry of the encoder's `down_blocks` (built once; their sizes do not matter).
#[allow(clippy::large_enum_variant)]
pub(crate) enum DownLayer {
    /// Wan 2.1: a flat list of residual blocks and resamplers.
    Res(ResidualBlock),
    Resample(Resample),
    /// Wan 2.2: `WanResidualDownBlock`.
    ResidualDown {
        resnets: Vec<ResidualBlock>,
        downsampler: Option<Resample>,
        avg_shortcut: AvgDown,
    },
}

impl DownLayer {
    pub fn forward(&self, x: Frames, cache: &mut FeatCache) -> Result<Frames> {
        match self {
            DownLayer::Res(r) => r.forward(x, cache),
            DownLayer::Resample(r) => r.forward(x, cache),
            DownLayer::ResidualDown {
                resnets,
                downsampler,
                avg_shortcut,
            } => {
                let short = avg_shortcut.forward(&x)?;
                let mut h = x;
                for r in resnets {
                    h = r.forward(h, cache)?;
                }
                if let Some(d) = downsampler {
                    h = d.forward(h, cache)?;
                }
                add_frames(h, &short)
            }
        }
    }
}

/// One of the decoder's `up_blocks` (`WanUpBlock`, or `WanResidualUpBlock` with `dup_shortcut`).
pub(crate) struct UpBlock {
    resnets: Vec<ResidualBlock>,
    upsampler: Option<Resample>,
    dup_shortcut: Option<DupUp>,
}

impl UpBlock {
    pub fn new(
        resnets: Vec<ResidualBlock>,
        upsampler: Option<Resample>,
        dup_shortcut: Option<DupUp>,
    ) -> Self {
        Self {
            resnets,
            upsampler,
            dup_shortcut,
        }
    }

    pub fn forward(&self, x: Frames, cache: &mut FeatCache, first_chunk: bool) -> Result<Frames> {
        // The (small) input is kept for the shortcut, which is expanded only at the end.
        let input = self.dup_shortcut.as_ref().map(|_| x.clone());
        let mut h = x;
        for r in &self.resnets {
            h = r.forward(h, cache)?;
        }
        if let Some(u) = &self.upsampler {
            h = u.forward(h, cache)?;
        }
        match (&self.dup_shortcut, input) {
            (Some(d), Some(x)) => add_frames(h, &d.forward(&x, first_chunk)?),
            _ => Ok(h),
        }
    }
}

fn add_frames(h: Frames, s: &[Tensor]) -> Result<Frames> {
    if h.len() != s.len() {
        return Err(Error::InvalidArgument(format!(
            "Wan VAE: {} frames on the main path but {} on the shortcut",
            h.len(),
            s.len()
        )));
    }
    h.into_iter().zip(s).map(|(a, b)| Ok((a + b)?)).collect()
}

/// A causal conv with its cache slot: the stems (conv_in, conv_out) of encoder and decoder.
pub(crate) fn cached_conv(
    conv: &CausalConv3d,
    x: &[Tensor],
    cache: &mut FeatCache,
) -> Result<Frames> {
    cached(conv, x, cache, None)
}

pub(crate) fn norm_silu(norm: &ChannelRmsNorm, x: &[Tensor]) -> Result<Frames> {
    map(x, |f| norm.forward(f, true))
}
