//! `AutoencoderKL` in the original LDM layout (`ae.safetensors` of FLUX.1, the VAE inside an
//! original Stable Diffusion checkpoint, `vae-ft-mse-840000-ema-pruned.safetensors`), as
//! diffusers' `convert_ldm_vae_checkpoint` maps it. The decoder's up blocks are numbered from
//! the bottom in LDM and from the top in diffusers; the attention's 1x1 convolutions become
//! linears (the same bytes in another shape).

use super::{rename, Layout};
use crate::error::Result;
use crate::weights::WeightStore;

pub const LDM: Layout = Layout {
    what: "AutoencoderKL (original LDM keys)",
    class: "AutoencoderKL",
    markers: &[
        "decoder.up.0.block.0.conv1.weight",
        "encoder.down.0.block.0.conv1.weight",
    ],
    convert: Some(convert),
};

fn renamed(k: &str, up_blocks: usize) -> String {
    let (side, rest) = match k.split_once('.') {
        Some((s @ ("encoder" | "decoder"), r)) => (s, r),
        _ => return k.to_string(),
    };
    let r = if let Some(r) = rest.strip_prefix("norm_out.") {
        format!("conv_norm_out.{r}")
    } else if let Some(r) = rest.strip_prefix("down.") {
        let (i, tail) = r.split_once('.').unwrap_or((r, ""));
        let tail =
            tail.replacen("block.", "resnets.", 1)
                .replacen("downsample.", "downsamplers.0.", 1);
        format!("down_blocks.{i}.{tail}")
    } else if let Some(r) = rest.strip_prefix("up.") {
        let (i, tail) = r.split_once('.').unwrap_or((r, ""));
        let i = i.parse::<usize>().map_or(i.to_string(), |b| {
            up_blocks.saturating_sub(1 + b).to_string()
        });
        let tail = tail
            .replacen("block.", "resnets.", 1)
            .replacen("upsample.", "upsamplers.0.", 1);
        format!("up_blocks.{i}.{tail}")
    } else if let Some(r) = rest.strip_prefix("mid.block_1.") {
        format!("mid_block.resnets.0.{r}")
    } else if let Some(r) = rest.strip_prefix("mid.block_2.") {
        format!("mid_block.resnets.1.{r}")
    } else if let Some(r) = rest.strip_prefix("mid.attn_1.") {
        let r = match r.split_once('.') {
            Some(("norm", p)) => format!("group_norm.{p}"),
            Some(("q", p)) => format!("to_q.{p}"),
            Some(("k", p)) => format!("to_k.{p}"),
            Some(("v", p)) => format!("to_v.{p}"),
            Some(("proj_out", p)) => format!("to_out.0.{p}"),
            _ => r.to_string(),
        };
        format!("mid_block.attentions.0.{r}")
    } else {
        rest.to_string()
    };
    format!("{side}.{}", r.replace("nin_shortcut", "conv_shortcut"))
}

fn convert(store: &mut WeightStore, _config: &serde_json::Value) -> Result<()> {
    let up_blocks = store
        .names()
        .filter_map(|n| {
            n.strip_prefix("decoder.up.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1);
    rename(store, |k| renamed(k, up_blocks));
    // The attention's 1x1 convolution kernels as linear weights.
    let attn: Vec<String> = store
        .names()
        .filter(|n| n.contains("mid_block.attentions.0.to_") && n.ends_with(".weight"))
        .cloned()
        .collect();
    for n in attn {
        if let Some(mut t) = store.take(&n) {
            t.shape.truncate(2);
            store.insert(n, t);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::renamed;

    #[test]
    fn names_follow_diffusers() {
        for (ldm, diffusers) in [
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "encoder.down.0.downsample.conv.bias",
                "encoder.down_blocks.0.downsamplers.0.conv.bias",
            ),
            (
                "decoder.up.3.block.2.conv1.weight",
                "decoder.up_blocks.0.resnets.2.conv1.weight",
            ),
            (
                "decoder.up.1.upsample.conv.weight",
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
            ),
            (
                "decoder.mid.block_2.norm1.bias",
                "decoder.mid_block.resnets.1.norm1.bias",
            ),
            (
                "encoder.mid.attn_1.proj_out.weight",
                "encoder.mid_block.attentions.0.to_out.0.weight",
            ),
            (
                "encoder.mid.attn_1.norm.weight",
                "encoder.mid_block.attentions.0.group_norm.weight",
            ),
            ("decoder.norm_out.bias", "decoder.conv_norm_out.bias"),
            ("quant_conv.weight", "quant_conv.weight"),
        ] {
            assert_eq!(renamed(ldm, 4), diffusers);
        }
    }
}
