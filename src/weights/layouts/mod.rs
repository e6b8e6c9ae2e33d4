//! The key layouts single-file checkpoints come in, and their conversion to diffusers' names:
//! what diffusers' `from_single_file` does (`loaders/single_file_utils.py`), on the index of
//! stored tensors rather than on tensors, so nothing is read or copied. A fused tensor (FLUX's
//! `qkv`) becomes row ranges of the file; a GGUF tensor stays in its blocks.
//!
//! Before the layout is converted, ComfyUI's wrappers are undone: the `model.diffusion_model.`
//! prefix and the "fp8_scaled" format (f8e4m3 weights with a per-tensor `scale_weight`).

mod flux;
mod ldm_unet;
mod ldm_vae;
mod open_clip;
mod wan;

use std::collections::HashMap;

use half::{bf16, f16};

use super::{Encoding, StoredTensor, WeightStore};
use crate::error::{Error, Result};
use candle_core::DType;

/// One key layout: what it is, the diffusers class it feeds, the keys that identify it, and the
/// conversion to diffusers' names (none for diffusers' own layout).
pub struct Layout {
    pub what: &'static str,
    pub class: &'static str,
    /// Every one of these keys is present in a file of this layout.
    pub markers: &'static [&'static str],
    pub convert: Option<fn(&mut WeightStore, &serde_json::Value) -> Result<()>>,
}

const LAYOUTS: &[Layout] = &[
    flux::BFL,
    flux::DIFFUSERS,
    wan::ORIGINAL,
    wan::DIFFUSERS,
    ldm_vae::LDM,
    ldm_unet::LDM,
    open_clip::OPEN_CLIP,
    Layout {
        what: "diffusers UNet",
        class: "UNet2DConditionModel",
        markers: &[
            "conv_in.weight",
            "down_blocks.0.resnets.0.conv1.weight",
            "time_embedding.linear_1.weight",
        ],
        convert: None,
    },
    Layout {
        what: "diffusers AutoencoderKL",
        class: "AutoencoderKL",
        markers: &[
            "decoder.conv_in.weight",
            "decoder.mid_block.resnets.0.conv1.weight",
        ],
        convert: None,
    },
    Layout {
        what: "CLIP text encoder",
        class: "CLIPTextModel",
        markers: &["text_model.embeddings.token_embedding.weight"],
        convert: None,
    },
    Layout {
        what: "T5 encoder",
        class: "T5EncoderModel",
        markers: &["encoder.block.0.layer.0.SelfAttention.q.weight"],
        convert: None,
    },
];

/// Classes that share a layout (UMT5 has T5's keys; CLIP with projection has CLIP's).
fn same_family(a: &str, b: &str) -> bool {
    fn norm(c: &str) -> &str {
        match c {
            "UMT5EncoderModel" => "T5EncoderModel",
            "CLIPTextModelWithProjection" => "CLIPTextModel",
            "AutoencoderKLQwenImage" => "AutoencoderKLWan",
            other => other,
        }
    }
    norm(a) == norm(b)
}

/// The layout the store's keys match, if any.
pub fn detect(store: &WeightStore) -> Option<&'static Layout> {
    LAYOUTS
        .iter()
        .find(|l| l.markers.iter().all(|m| store.get(m).is_some()))
}

/// The model width a layout's first marker shows (a linear's in-features, a conv's output
/// channels): what tells a Wan 1.3B (1536) from a 14B (5120) file.
fn width(store: &WeightStore, l: &Layout) -> Option<usize> {
    let t = store.get(l.markers.first()?)?;
    match t.shape.as_slice() {
        [_, w] => Some(*w),
        [c, ..] => Some(*c),
        _ => None,
    }
}

/// Prefixes single files put before a component's own keys (ComfyUI's and the original
/// checkpoints', as diffusers' `LDM_*_KEY(S)`), by the component's class.
fn prefixes(class: &str) -> &'static [&'static str] {
    match class {
        "AutoencoderKL" | "AutoencoderKLWan" | "AutoencoderKLQwenImage" => {
            &["first_stage_model.", "vae."]
        }
        "CLIPTextModel" | "CLIPTextModelWithProjection" => &[
            "cond_stage_model.transformer.",
            "cond_stage_model.model.",
            "conditioner.embedders.0.transformer.",
            "text_encoders.clip_l.transformer.",
        ],
        "T5EncoderModel" | "UMT5EncoderModel" => &["text_encoders.t5xxl.transformer."],
        _ => &["model.diffusion_model.", "diffusion_model."],
    }
}

/// Makes a single file's index speak diffusers' names for a component of class `class`: strips
/// prefixes, unpacks fp8_scaled weights, checks the layout is for this class, converts it
/// (with the component's `config.json`, for layouts numbered by it).
pub fn prepare(store: &mut WeightStore, class: &str, config: &serde_json::Value) -> Result<()> {
    strip_prefixes(store, prefixes(class));
    unscale_fp8(store)?;
    match detect(store) {
        Some(l) if !same_family(l.class, class) => Err(Error::WrongCheckpoint {
            path: store.path().to_path_buf(),
            reason: format!(
                "this looks like a {}{} (a {}); the pipeline's component is a {class}",
                l.what,
                width(store, l).map_or(String::new(), |w| format!(" of width {w}")),
                l.class
            ),
        }),
        Some(Layout {
            convert: Some(f), ..
        }) => f(store, config),
        _ => Ok(()),
    }
}

/// Keeps the keys under the first prefix present, without it: a whole ComfyUI checkpoint also
/// holds the VAE and text encoders under other prefixes, which are not this component's.
fn strip_prefixes(store: &mut WeightStore, prefixes: &[&str]) {
    for &p in prefixes {
        if store.names().any(|n| n.starts_with(p)) {
            let all = store.take_all();
            for (k, t) in all {
                if let Some(k) = k.strip_prefix(p) {
                    store.insert(k, t);
                }
            }
            return;
        }
    }
}

/// ComfyUI's "fp8_scaled" files (the `scaled_fp8` marker): every f8e4m3 `X.weight` with an
/// `X.scale_weight` is held as fp8 and scaled at use; `scale_input` (for fp8 matmuls) and the
/// marker are dropped.
fn unscale_fp8(store: &mut WeightStore) -> Result<()> {
    if store.get("scaled_fp8").is_none() {
        return Ok(());
    }
    store.take("scaled_fp8");
    let scales: Vec<String> = store
        .names()
        .filter(|n| n.ends_with(".scale_weight"))
        .cloned()
        .collect();
    for s in scales {
        let st = store.take(&s).expect("listed above");
        let scale = scalar(store, &s, &st)?;
        let w = s.replace(".scale_weight", ".weight");
        if let Some(mut t) = store.take(&w) {
            if t.dtype == DType::F8E4M3 {
                t.encoding = Encoding::ScaledFp8 { scale };
            }
            store.insert(w, t);
        }
    }
    let inputs: Vec<String> = store
        .names()
        .filter(|n| n.ends_with(".scale_input"))
        .cloned()
        .collect();
    for s in inputs {
        store.take(&s);
    }
    Ok(())
}

/// A one-element tensor's value (ComfyUI writes `scale_weight` as f32, sometimes bf16/f16).
fn scalar(store: &WeightStore, name: &str, t: &StoredTensor) -> Result<f32> {
    let bad = |why: &str| Error::WrongCheckpoint {
        path: store.path().to_path_buf(),
        reason: format!("`{name}` {why}"),
    };
    if t.shape.iter().product::<usize>() != 1 {
        return Err(bad("is not a single value"));
    }
    let b = store.read_raw(t)?;
    Ok(match t.dtype {
        DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        DType::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        DType::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
        _ => return Err(bad("is not f32, bf16 or f16")),
    })
}

/// Renames tensors by `map` (old → new), keeping the rest; a conversion's plain part.
pub(crate) fn rename(store: &mut WeightStore, map: impl Fn(&str) -> String) {
    let all: HashMap<String, StoredTensor> = store.take_all();
    for (k, t) in all {
        let n = map(&k);
        store.insert(n, t);
    }
}

/// Takes tensor `name` or says which one a file of this layout lacks.
pub(crate) fn need(store: &mut WeightStore, name: &str) -> Result<StoredTensor> {
    store.take(name).ok_or_else(|| Error::MissingTensor {
        tensor: name.to_string(),
        location: store.describe(),
    })
}

/// Splits a fused tensor's rows into parts of `sizes` rows, as `torch.split(t, sizes, 0)`.
pub(crate) fn split_rows(
    store: &WeightStore,
    name: &str,
    t: &StoredTensor,
    sizes: &[usize],
) -> Result<Vec<StoredTensor>> {
    let total: usize = sizes.iter().sum();
    if t.shape.first() != Some(&total) {
        return Err(Error::WrongCheckpoint {
            path: store.path().to_path_buf(),
            reason: format!(
                "`{name}` has shape {:?}; expected {total} rows to split into {sizes:?}",
                t.shape
            ),
        });
    }
    let mut out = Vec::with_capacity(sizes.len());
    let mut r = 0;
    for &n in sizes {
        out.push(t.rows(r, r + n).ok_or_else(|| Error::WrongCheckpoint {
            path: store.path().to_path_buf(),
            reason: format!("`{name}` cannot be split by rows"),
        })?);
        r += n;
    }
    Ok(out)
}

/// The names in `store` no declared parameter uses: a file with them is for another model (or
/// another size of this one). Buffers that diffusers and transformers ignore are not counted.
pub fn unused<'a>(store: &'a WeightStore, declared: &[String]) -> Vec<&'a String> {
    let set: std::collections::HashSet<&str> = declared.iter().map(String::as_str).collect();
    let mut v: Vec<&String> = store
        .names()
        .filter(|n| !set.contains(n.as_str()) && !n.ends_with("position_ids"))
        .collect();
    v.sort();
    v
}
