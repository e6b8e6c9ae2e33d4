//! `vae/config.json` of `AutoencoderKLWan`; defaults are diffusers 0.42.1's `__init__` defaults
//! (the Wan 2.1 VAE).

use serde::Deserialize;

use crate::error::{Error, Result};

pub(crate) const FILE: &str = "vae/config.json";

/// diffusers encodes the first frame alone, then chunks of this many frames (a constant there,
/// not `scale_factor_temporal`).
pub const ENCODE_FRAMES_PER_CHUNK: usize = 4;

fn d_base() -> usize {
    96
}
fn d_z() -> usize {
    16
}
fn d_mult() -> Vec<usize> {
    vec![1, 2, 4, 4]
}
fn d_2() -> usize {
    2
}
fn d_tdown() -> Vec<bool> {
    vec![false, true, true]
}
fn d_3() -> usize {
    3
}
fn d_t() -> Option<usize> {
    Some(4)
}
fn d_s() -> Option<usize> {
    Some(8)
}
fn d_true() -> bool {
    true
}
fn d_mean() -> Vec<f64> {
    vec![
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
        0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    ]
}
fn d_std() -> Vec<f64> {
    vec![
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
        1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    ]
}

#[derive(Debug, Clone, Deserialize)]
pub struct AutoencoderKLWanConfig {
    #[serde(default = "d_base")]
    pub base_dim: usize,
    /// The decoder's base width when it differs from the encoder's (Wan 2.2: 256 vs 160).
    #[serde(default)]
    pub decoder_base_dim: Option<usize>,
    #[serde(default = "d_z")]
    pub z_dim: usize,
    #[serde(default = "d_mult")]
    pub dim_mult: Vec<usize>,
    #[serde(default = "d_2")]
    pub num_res_blocks: usize,
    #[serde(default)]
    pub attn_scales: Vec<f64>,
    /// diffusers' spelling. One entry per downsampling level; the decoder uses it reversed.
    #[serde(default = "d_tdown")]
    pub temperal_downsample: Vec<bool>,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "d_mean")]
    pub latents_mean: Vec<f64>,
    #[serde(default = "d_std")]
    pub latents_std: Vec<f64>,
    /// Wan 2.2: residual down/up blocks with space-to-channel shortcuts.
    #[serde(default)]
    pub is_residual: bool,
    /// Channels of the encoder's input after patchify (Wan 2.2: 3 · 2 · 2 = 12).
    #[serde(default = "d_3")]
    pub in_channels: usize,
    #[serde(default = "d_3")]
    pub out_channels: usize,
    #[serde(default)]
    pub patch_size: Option<usize>,
    #[serde(default = "d_t")]
    pub scale_factor_temporal: Option<usize>,
    #[serde(default = "d_s")]
    pub scale_factor_spatial: Option<usize>,
    /// Written by the diffusers version that introduced Wan 2.2 (`false` there). diffusers 0.42.1
    /// ignores it and always clamps the decoded video to [-1, 1]; so does lowtide.
    #[serde(default = "d_true")]
    pub clip_output: bool,
}

impl AutoencoderKLWanConfig {
    /// Downsampling levels of the encoder (and upsampling levels of the decoder).
    pub fn levels(&self) -> usize {
        self.dim_mult.len().saturating_sub(1)
    }

    /// `patch_size`, with diffusers' `None` (and 1) meaning no patchify.
    pub fn patch(&self) -> usize {
        self.patch_size.unwrap_or(1).max(1)
    }

    /// Pixels per latent cell along height and width: 2^levels × patch (8 for Wan 2.1, 16 for
    /// Wan 2.2).
    pub fn spatial_factor(&self) -> usize {
        (1usize << self.levels()) * self.patch()
    }

    /// Frames per latent frame after the first: 2^(temporal downsamples) (4 for both Wans).
    pub fn temporal_factor(&self) -> usize {
        1usize << self.temperal_downsample.iter().filter(|&&t| t).count()
    }

    /// Channels of the video itself (before patchify / after unpatchify).
    pub fn image_in_channels(&self) -> usize {
        self.in_channels / (self.patch() * self.patch())
    }

    pub fn image_out_channels(&self) -> usize {
        self.out_channels / (self.patch() * self.patch())
    }

    pub fn decoder_dim(&self) -> usize {
        self.decoder_base_dim.unwrap_or(self.base_dim)
    }

    /// Video frames decoded from `latent_frames` latent frames: `1 + factor · (T - 1)`.
    pub fn decoded_frames(&self, latent_frames: usize) -> usize {
        1 + self.temporal_factor() * latent_frames.saturating_sub(1)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        use crate::validate::{config_f32, count, counts};
        count(FILE, "base_dim", self.base_dim, 1, 1 << 14)?;
        if let Some(d) = self.decoder_base_dim {
            count(FILE, "decoder_base_dim", d, 1, 1 << 14)?;
        }
        count(FILE, "z_dim", self.z_dim, 1, 1024)?;
        count(FILE, "dim_mult", self.dim_mult.len(), 1, 8)?;
        counts(FILE, "dim_mult", &self.dim_mult, 1, 64)?;
        count(FILE, "num_res_blocks", self.num_res_blocks, 1, 64)?;
        count(FILE, "in_channels", self.in_channels, 1, 1024)?;
        count(FILE, "out_channels", self.out_channels, 1, 1024)?;
        if let Some(p) = self.patch_size {
            count(FILE, "patch_size", p, 1, 8)?;
        }
        if !self.attn_scales.is_empty() {
            return Err(Error::unsupported(
                FILE,
                "attn_scales",
                format!("{:?}", self.attn_scales),
                "only [] is supported: diffusers 0.42.1 cannot run encoder attention blocks \
                 either (it passes the feature cache to WanAttentionBlock)",
            ));
        }
        if self.temperal_downsample.len() != self.levels() {
            return Err(Error::unsupported(
                FILE,
                "temperal_downsample",
                format!("{:?}", self.temperal_downsample),
                format!(
                    "needs one entry per downsampling level ({}, from dim_mult)",
                    self.levels()
                ),
            ));
        }
        if self.temporal_factor() > ENCODE_FRAMES_PER_CHUNK {
            return Err(Error::unsupported(
                FILE,
                "temperal_downsample",
                format!("{:?}", self.temperal_downsample),
                "at most two temporal downsamples: the encoder runs chunks of 4 frames",
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::unsupported(
                FILE,
                "dropout",
                self.dropout,
                "must be in [0, 1) (it is not applied at inference)",
            ));
        }
        for (field, v) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if v.len() != self.z_dim {
                return Err(Error::unsupported(
                    FILE,
                    field,
                    format!("{} values", v.len()),
                    format!("needs z_dim = {} values", self.z_dim),
                ));
            }
            for &x in v.iter() {
                config_f32(FILE, field, x, field == "latents_mean")?;
            }
        }
        let p2 = self.patch() * self.patch();
        for (field, c) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
        ] {
            if c % p2 != 0 {
                return Err(Error::unsupported(
                    FILE,
                    field,
                    c,
                    format!("must be a multiple of patch_size² = {p2}"),
                ));
            }
        }
        if let Some(s) = self.scale_factor_spatial {
            if s != self.spatial_factor() {
                return Err(Error::unsupported(
                    FILE,
                    "scale_factor_spatial",
                    s,
                    format!(
                        "the architecture (dim_mult, patch_size) gives {}",
                        self.spatial_factor()
                    ),
                ));
            }
        }
        if let Some(t) = self.scale_factor_temporal {
            if t != self.temporal_factor() {
                return Err(Error::unsupported(
                    FILE,
                    "scale_factor_temporal",
                    t,
                    format!("temperal_downsample gives {}", self.temporal_factor()),
                ));
            }
        }
        if !self.is_residual && self.decoder_dim() < 2 {
            // The Wan 2.1 upsamplers halve the channels.
            return Err(Error::unsupported(
                FILE,
                "base_dim",
                self.decoder_dim(),
                "must be at least 2 (the upsamplers halve the channels)",
            ));
        }
        if self.is_residual {
            self.check_shortcuts()?;
        }
        Ok(())
    }

    /// The space-to-channel shortcuts of the Wan 2.2 blocks need whole channel groups.
    fn check_shortcuts(&self) -> Result<()> {
        let n = self.dim_mult.len();
        let enc: Vec<usize> = std::iter::once(1)
            .chain(self.dim_mult.iter().copied())
            .map(|m| self.base_dim * m)
            .collect();
        for i in 0..n {
            // The last level does not downsample: its shortcut only regroups channels.
            let f = match i + 1 < n {
                true if self.temperal_downsample[i] => 8,
                true => 4,
                false => 1,
            };
            let (cin, cout) = (enc[i], enc[i + 1]);
            if (cin * f) % cout != 0 {
                return Err(Error::unsupported(
                    FILE,
                    "dim_mult",
                    format!("{:?}", self.dim_mult),
                    format!("encoder level {i}: {cin} channels × {f} do not split into {cout}"),
                ));
            }
        }
        let d = self.decoder_dim();
        let dec: Vec<usize> = std::iter::once(self.dim_mult[n - 1])
            .chain(self.dim_mult.iter().rev().copied())
            .map(|m| d * m)
            .collect();
        let up: Vec<bool> = self.temperal_downsample.iter().rev().copied().collect();
        for i in 0..n.saturating_sub(1) {
            let ft = if up[i] { 2 } else { 1 };
            let (cin, cout) = (dec[i], dec[i + 1]);
            if (cout * ft * 4) % cin != 0 {
                return Err(Error::unsupported(
                    FILE,
                    "dim_mult",
                    format!("{:?}", self.dim_mult),
                    format!(
                        "decoder level {i}: {cout} channels × {} do not split into {cin}",
                        ft * 4
                    ),
                ));
            }
        }
        Ok(())
    }
}
