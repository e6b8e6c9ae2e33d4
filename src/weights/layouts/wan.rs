//! Wan 2.1/2.2 transformers in the original layout (Wan-AI's `.pth`/safetensors, ComfyUI's
//! repacks, city96's GGUF files), as diffusers' `convert_wan_transformer_to_diffusers` maps
//! them: ordered substring replacements (including its swap of `norm2` and `norm3`).

use super::{rename, Layout};
use crate::error::Result;
use crate::weights::WeightStore;

pub const ORIGINAL: Layout = Layout {
    what: "Wan transformer (original keys)",
    class: "WanTransformer3DModel",
    markers: &["blocks.0.self_attn.q.weight", "patch_embedding.weight"],
    convert: Some(convert),
};

pub const DIFFUSERS: Layout = Layout {
    what: "diffusers Wan transformer",
    class: "WanTransformer3DModel",
    markers: &["blocks.0.attn1.to_q.weight", "patch_embedding.weight"],
    convert: None,
};

/// diffusers' `TRANSFORMER_KEYS_RENAME_DICT`, applied in order to every key (the I2V and VACE
/// entries included; the Animate adapters are not supported).
const RENAMES: [(&str, &str); 28] = [
    (
        "time_embedding.0",
        "condition_embedder.time_embedder.linear_1",
    ),
    (
        "time_embedding.2",
        "condition_embedder.time_embedder.linear_2",
    ),
    (
        "text_embedding.0",
        "condition_embedder.text_embedder.linear_1",
    ),
    (
        "text_embedding.2",
        "condition_embedder.text_embedder.linear_2",
    ),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("cross_attn", "attn2"),
    ("self_attn", "attn1"),
    (".o.", ".to_out.0."),
    (".q.", ".to_q."),
    (".k.", ".to_k."),
    (".v.", ".to_v."),
    (".k_img.", ".add_k_proj."),
    (".v_img.", ".add_v_proj."),
    (".norm_k_img.", ".norm_added_k."),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("norm2", "norm__placeholder"),
    ("norm3", "norm2"),
    ("norm__placeholder", "norm3"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    (
        "img_emb.proj.1",
        "condition_embedder.image_embedder.ff.net.0.proj",
    ),
    (
        "img_emb.proj.3",
        "condition_embedder.image_embedder.ff.net.2",
    ),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("before_proj", "proj_in"),
    ("after_proj", "proj_out"),
];

fn renamed(k: &str) -> String {
    let mut k = k.to_string();
    for (from, to) in RENAMES {
        k = k.replace(from, to);
    }
    k
}

fn convert(store: &mut WeightStore, _config: &serde_json::Value) -> Result<()> {
    rename(store, renamed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::renamed;

    #[test]
    fn names_follow_diffusers() {
        for (orig, diffusers) in [
            ("blocks.0.self_attn.q.weight", "blocks.0.attn1.to_q.weight"),
            ("blocks.1.cross_attn.o.bias", "blocks.1.attn2.to_out.0.bias"),
            (
                "blocks.0.self_attn.norm_k.weight",
                "blocks.0.attn1.norm_k.weight",
            ),
            ("blocks.0.norm3.weight", "blocks.0.norm2.weight"),
            ("blocks.0.modulation", "blocks.0.scale_shift_table"),
            ("blocks.0.ffn.2.weight", "blocks.0.ffn.net.2.weight"),
            ("head.modulation", "scale_shift_table"),
            ("head.head.weight", "proj_out.weight"),
            (
                "time_projection.1.bias",
                "condition_embedder.time_proj.bias",
            ),
            (
                "text_embedding.2.weight",
                "condition_embedder.text_embedder.linear_2.weight",
            ),
        ] {
            assert_eq!(renamed(orig), diffusers);
        }
    }
}
