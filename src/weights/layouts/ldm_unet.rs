//! `UNet2DConditionModel` in the original LDM layout (`model.diffusion_model.*` of the Stable
//! Diffusion 1.x/2.x checkpoints), as diffusers' `convert_ldm_unet_checkpoint` maps it: LDM
//! numbers its input and output blocks flat, `layers_per_block + 1` to a diffusers block.

use serde_json::Value;

use super::{rename, Layout};
use crate::error::{Error, Result};
use crate::weights::WeightStore;

pub const LDM: Layout = Layout {
    what: "Stable Diffusion UNet (original LDM keys)",
    class: "UNet2DConditionModel",
    markers: &["input_blocks.0.0.weight", "out.2.weight"],
    convert: Some(convert),
};

/// diffusers' `update_unet_resnet_ldm_to_diffusers` renames.
fn resnet(tail: &str) -> String {
    tail.replace("in_layers.0", "norm1")
        .replace("in_layers.2", "conv1")
        .replace("out_layers.0", "norm2")
        .replace("out_layers.3", "conv2")
        .replace("emb_layers.1", "time_emb_proj")
        .replace("skip_connection", "conv_shortcut")
}

fn renamed(k: &str, per: usize) -> String {
    const LAYERS: [(&str, &str); 5] = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    for (from, to) in LAYERS {
        if let Some(r) = k.strip_prefix(from) {
            return format!("{to}{r}");
        }
    }
    let split = |r: &str| -> Option<(usize, String, String)> {
        let mut it = r.splitn(3, '.');
        let i = it.next()?.parse().ok()?;
        Some((
            i,
            it.next()?.to_string(),
            it.next().unwrap_or("").to_string(),
        ))
    };
    if let Some((i, part, tail)) = k.strip_prefix("input_blocks.").and_then(split) {
        let (b, l) = ((i - 1) / per, (i - 1) % per);
        return match (part.as_str(), tail.strip_prefix("op.")) {
            ("0", Some(p)) => format!("down_blocks.{b}.downsamplers.0.conv.{p}"),
            ("0", None) => format!("down_blocks.{b}.resnets.{l}.{}", resnet(&tail)),
            ("1", _) => format!("down_blocks.{b}.attentions.{l}.{tail}"),
            _ => k.to_string(),
        };
    }
    if let Some((i, tail)) = k.strip_prefix("middle_block.").and_then(|r| {
        let (i, tail) = r.split_once('.')?;
        Some((i.parse::<usize>().ok()?, tail))
    }) {
        let d = i.saturating_sub(1);
        return if i % 2 == 0 {
            format!("mid_block.resnets.{d}.{}", resnet(tail))
        } else {
            format!("mid_block.attentions.{d}.{tail}")
        };
    }
    if let Some((i, part, tail)) = k.strip_prefix("output_blocks.").and_then(split) {
        let (b, l) = (i / per, i % per);
        return match (part.as_str(), tail.strip_prefix("conv.")) {
            ("0", _) => format!("up_blocks.{b}.resnets.{l}.{}", resnet(&tail)),
            ("1" | "2", Some(p)) => format!("up_blocks.{b}.upsamplers.0.conv.{p}"),
            ("1", None) => format!("up_blocks.{b}.attentions.{l}.{tail}"),
            _ => k.to_string(),
        };
    }
    k.to_string()
}

fn convert(store: &mut WeightStore, config: &Value) -> Result<()> {
    let per = config
        .get("layers_per_block")
        .and_then(Value::as_u64)
        .unwrap_or(2) as usize
        + 1;
    if store.names().any(|n| n.starts_with("label_emb.")) {
        return Err(Error::WrongCheckpoint {
            path: store.path().to_path_buf(),
            reason: "a UNet with class or added embeddings (SDXL, the upscaler): lowtide runs \
                     SD 1.x/2.x UNets only"
                .into(),
        });
    }
    rename(store, |k| renamed(k, per));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::renamed;

    #[test]
    fn names_follow_diffusers() {
        for (ldm, diffusers) in [
            ("time_embed.2.bias", "time_embedding.linear_2.bias"),
            ("input_blocks.0.0.weight", "conv_in.weight"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.1.proj_in.weight",
                "down_blocks.0.attentions.1.proj_in.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.0.skip_connection.bias",
                "down_blocks.1.resnets.0.conv_shortcut.bias",
            ),
            (
                "middle_block.0.emb_layers.1.weight",
                "mid_block.resnets.0.time_emb_proj.weight",
            ),
            (
                "middle_block.1.transformer_blocks.0.attn1.to_q.weight",
                "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            ),
            (
                "middle_block.2.out_layers.3.bias",
                "mid_block.resnets.1.conv2.bias",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.4.1.norm.weight",
                "up_blocks.1.attentions.1.norm.weight",
            ),
            (
                "output_blocks.11.0.out_layers.0.weight",
                "up_blocks.3.resnets.2.norm2.weight",
            ),
            ("out.2.weight", "conv_out.weight"),
        ] {
            assert_eq!(renamed(ldm, 3), diffusers);
        }
    }
}
