//! The text encoder of original Stable Diffusion 2.x checkpoints: OpenCLIP's layout under
//! `cond_stage_model.model.`, as diffusers' `convert_open_clip_checkpoint` maps it onto
//! transformers' `CLIPTextModel`: renames, q/k/v split out of `in_proj`, and the resblocks past
//! the config's `num_hidden_layers` (SD 2.x files carry 24, the pipeline uses the penultimate
//! layer's output, so 23) and the unused `text_projection` dropped.

use serde_json::Value;

use super::{need, rename, split_rows, Layout};
use crate::error::Result;
use crate::weights::WeightStore;

pub const OPEN_CLIP: Layout = Layout {
    what: "OpenCLIP text encoder (SD 2.x original keys)",
    class: "CLIPTextModel",
    markers: &["token_embedding.weight", "positional_embedding"],
    convert: Some(convert),
};

fn renamed(k: &str) -> String {
    match k {
        "positional_embedding" => return "text_model.embeddings.position_embedding.weight".into(),
        "token_embedding.weight" => return "text_model.embeddings.token_embedding.weight".into(),
        _ => {}
    }
    if let Some(r) = k.strip_prefix("ln_final.") {
        return format!("text_model.final_layer_norm.{r}");
    }
    if let Some(r) = k.strip_prefix("transformer.resblocks.") {
        let r = r
            .replace(".ln_1.", ".layer_norm1.")
            .replace(".ln_2.", ".layer_norm2.")
            .replace(".mlp.c_fc.", ".mlp.fc1.")
            .replace(".mlp.c_proj.", ".mlp.fc2.")
            .replace(".attn.", ".self_attn.");
        return format!("text_model.encoder.layers.{r}");
    }
    k.to_string()
}

fn convert(store: &mut WeightStore, config: &Value) -> Result<()> {
    let layers = config
        .get("num_hidden_layers")
        .and_then(Value::as_u64)
        .unwrap_or(23) as usize;
    let hidden = store
        .get("token_embedding.weight")
        .map_or(1024, |t| t.shape[1]);
    // Resblocks the text model does not run, and OpenCLIP's extras.
    let unused: Vec<String> = store
        .names()
        .filter(|n| {
            let block = n
                .strip_prefix("transformer.resblocks.")
                .and_then(|r| r.split('.').next()?.parse::<usize>().ok());
            block.is_some_and(|b| b >= layers)
                || matches!(n.as_str(), "text_projection" | "logit_scale" | "attn_mask")
        })
        .cloned()
        .collect();
    for n in unused {
        store.take(&n);
    }
    rename(store, renamed);
    let fused: Vec<String> = store
        .names()
        .filter(|n| {
            n.ends_with(".self_attn.in_proj_weight") || n.ends_with(".self_attn.in_proj_bias")
        })
        .cloned()
        .collect();
    for key in fused {
        let t = need(store, &key)?;
        let parts = split_rows(store, &key, &t, &[hidden; 3])?;
        let (layer, kind) = key
            .rsplit_once(".in_proj_")
            .expect("filtered on the suffix");
        for (p, part) in ["q_proj", "k_proj", "v_proj"].iter().zip(parts) {
            store.insert(format!("{layer}.{p}.{kind}"), part);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::renamed;

    #[test]
    fn names_follow_diffusers() {
        for (oc, diffusers) in [
            (
                "positional_embedding",
                "text_model.embeddings.position_embedding.weight",
            ),
            ("ln_final.bias", "text_model.final_layer_norm.bias"),
            (
                "transformer.resblocks.3.ln_2.weight",
                "text_model.encoder.layers.3.layer_norm2.weight",
            ),
            (
                "transformer.resblocks.0.mlp.c_fc.bias",
                "text_model.encoder.layers.0.mlp.fc1.bias",
            ),
            (
                "transformer.resblocks.9.attn.out_proj.weight",
                "text_model.encoder.layers.9.self_attn.out_proj.weight",
            ),
            (
                "transformer.resblocks.1.attn.in_proj_weight",
                "text_model.encoder.layers.1.self_attn.in_proj_weight",
            ),
        ] {
            assert_eq!(renamed(oc), diffusers);
        }
    }
}
