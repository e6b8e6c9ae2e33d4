//! FLUX.1 transformers in Black Forest Labs' original layout (`flux1-dev.safetensors`, the GGUF
//! files made from it), as diffusers' `convert_flux_transformer_checkpoint_to_diffusers` maps
//! them. diffusers fixes the hidden size at 3072; here it is read from `img_in`, so smaller
//! models convert too.

use super::{need, rename, split_rows, Layout};
use crate::error::Result;
use crate::weights::WeightStore;

pub const BFL: Layout = Layout {
    what: "FLUX.1 transformer (original BFL keys)",
    class: "FluxTransformer2DModel",
    markers: &["double_blocks.0.img_attn.qkv.weight", "img_in.weight"],
    convert: Some(convert),
};

pub const DIFFUSERS: Layout = Layout {
    what: "diffusers FLUX.1 transformer",
    class: "FluxTransformer2DModel",
    markers: &["transformer_blocks.0.attn.to_q.weight", "x_embedder.weight"],
    convert: None,
};

/// One-to-one renames (a prefix of the original name, and its diffusers replacement).
const RENAMES: [(&str, &str); 10] = [
    (
        "time_in.in_layer.",
        "time_text_embed.timestep_embedder.linear_1.",
    ),
    (
        "time_in.out_layer.",
        "time_text_embed.timestep_embedder.linear_2.",
    ),
    (
        "vector_in.in_layer.",
        "time_text_embed.text_embedder.linear_1.",
    ),
    (
        "vector_in.out_layer.",
        "time_text_embed.text_embedder.linear_2.",
    ),
    (
        "guidance_in.in_layer.",
        "time_text_embed.guidance_embedder.linear_1.",
    ),
    (
        "guidance_in.out_layer.",
        "time_text_embed.guidance_embedder.linear_2.",
    ),
    ("txt_in.", "context_embedder."),
    ("img_in.", "x_embedder."),
    ("final_layer.linear.", "proj_out."),
    ("final_layer.adaLN_modulation.1.", "norm_out.linear."),
];

/// Renames inside double block `i` (after `double_blocks.{i}.`).
const DOUBLE: [(&str, &str); 12] = [
    ("img_mod.lin.", "norm1.linear."),
    ("txt_mod.lin.", "norm1_context.linear."),
    ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
    ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
    ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
    ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
    ("img_mlp.0.", "ff.net.0.proj."),
    ("img_mlp.2.", "ff.net.2."),
    ("txt_mlp.0.", "ff_context.net.0.proj."),
    ("txt_mlp.2.", "ff_context.net.2."),
    ("img_attn.proj.", "attn.to_out.0."),
    ("txt_attn.proj.", "attn.to_add_out."),
];

/// Renames inside single block `i`.
const SINGLE: [(&str, &str); 4] = [
    ("modulation.lin.", "norm.linear."),
    ("norm.query_norm.scale", "attn.norm_q.weight"),
    ("norm.key_norm.scale", "attn.norm_k.weight"),
    ("linear2.", "proj_out."),
];

fn renamed(k: &str) -> String {
    for (from, to) in RENAMES.iter() {
        if let Some(rest) = k.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    let block = |k: &str, from: &str, to: &str, table: &[(&str, &str)]| -> Option<String> {
        let rest = k.strip_prefix(from)?;
        let (i, tail) = rest.split_once('.')?;
        for (f, t) in table {
            if let Some(r) = tail.strip_prefix(f) {
                return Some(format!("{to}{i}.{t}{r}"));
            }
        }
        Some(format!("{to}{i}.{tail}"))
    };
    block(k, "double_blocks.", "transformer_blocks.", &DOUBLE)
        .or_else(|| block(k, "single_blocks.", "single_transformer_blocks.", &SINGLE))
        .unwrap_or_else(|| k.to_string())
}

fn convert(store: &mut WeightStore, _config: &serde_json::Value) -> Result<()> {
    let inner = store
        .get("img_in.weight")
        .map(|t| t.shape[0])
        .unwrap_or(3072);
    rename(store, renamed);
    let blocks = |prefix: &str, store: &WeightStore| -> Vec<String> {
        let mut v: Vec<String> = store
            .names()
            .filter_map(|n| n.strip_prefix(prefix)?.split('.').next().map(String::from))
            .collect();
        v.sort();
        v.dedup();
        v
    };
    // Fused q, k, v: thirds of the rows.
    for i in blocks("transformer_blocks.", store) {
        for (fused, names) in [
            ("img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
            (
                "txt_attn.qkv",
                ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
            ),
        ] {
            for p in ["weight", "bias"] {
                let key = format!("transformer_blocks.{i}.{fused}.{p}");
                let t = need(store, &key)?;
                let parts = split_rows(store, &key, &t, &[inner; 3])?;
                for (n, part) in names.iter().zip(parts) {
                    store.insert(format!("transformer_blocks.{i}.{n}.{p}"), part);
                }
            }
        }
    }
    // linear1: q, k, v and the MLP's input projection.
    for i in blocks("single_transformer_blocks.", store) {
        for p in ["weight", "bias"] {
            let key = format!("single_transformer_blocks.{i}.linear1.{p}");
            let t = need(store, &key)?;
            let mlp = t.shape[0].saturating_sub(3 * inner);
            let parts = split_rows(store, &key, &t, &[inner, inner, inner, mlp])?;
            for (n, part) in ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
                .iter()
                .zip(parts)
            {
                store.insert(format!("single_transformer_blocks.{i}.{n}.{p}"), part);
            }
        }
    }
    // The final modulation is (shift, scale) in BFL's order and (scale, shift) in diffusers'.
    for p in ["weight", "bias"] {
        let key = format!("norm_out.linear.{p}");
        let t = need(store, &key)?;
        let half = t.shape[0] / 2;
        let parts = split_rows(store, &key, &t, &[half, t.shape[0] - half])?;
        let swapped = parts[1].then(&parts[0]).expect("halves of one tensor");
        store.insert(key, swapped);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::renamed;

    #[test]
    fn names_follow_diffusers() {
        for (bfl, diffusers) in [
            (
                "time_in.in_layer.weight",
                "time_text_embed.timestep_embedder.linear_1.weight",
            ),
            (
                "double_blocks.3.img_mod.lin.bias",
                "transformer_blocks.3.norm1.linear.bias",
            ),
            (
                "double_blocks.0.txt_attn.norm.key_norm.scale",
                "transformer_blocks.0.attn.norm_added_k.weight",
            ),
            (
                "double_blocks.12.txt_attn.proj.weight",
                "transformer_blocks.12.attn.to_add_out.weight",
            ),
            (
                "single_blocks.7.linear2.bias",
                "single_transformer_blocks.7.proj_out.bias",
            ),
            (
                "single_blocks.0.norm.query_norm.scale",
                "single_transformer_blocks.0.attn.norm_q.weight",
            ),
            (
                "final_layer.adaLN_modulation.1.weight",
                "norm_out.linear.weight",
            ),
        ] {
            assert_eq!(renamed(bfl), diffusers);
        }
    }
}
