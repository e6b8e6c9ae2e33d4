//! Wan's text encoder against transformers 5.24 / diffusers 0.42.1: `UMT5EncoderModel` with an
//! attention mask, and `WanPipeline._get_t5_prompt_embeds`' truncation to the real length and
//! zero padding.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::*;
use lowtide::models::{wan_prompt_embeds, T5Config, T5EncoderModel};
use lowtide::pipelines::Component;
use lowtide::residency::{Accounting, Strategy};

const WAN: [&str; 3] = ["tiny-wan21", "tiny-wan22-ti2v", "tiny-wan22-a14b"];

fn load(name: &str) -> (T5EncoderModel, Component) {
    let c = Component::open(
        &model(name),
        "text_encoder",
        "model",
        None,
        None,
        &Device::Cpu,
        DType::F32,
        Arc::new(Accounting::default()),
    )
    .unwrap();
    let cfg: T5Config = c.config().unwrap();
    assert!(cfg.bias_per_layer(), "{name}: a UMT5 encoder");
    let pp = c.param_root();
    let m = T5EncoderModel::new(&pp, &cfg).unwrap();
    c.validate(&pp).unwrap();
    (m, c)
}

/// (ids as u32, mask, refs).
fn inputs(name: &str) -> (Tensor, Tensor, std::collections::HashMap<String, Tensor>) {
    let r = load_refs(refs(name).join("umt5.safetensors"));
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let mask = r["attention_mask"].clone();
    (ids, mask, r)
}

#[test]
fn umt5_with_mask_matches_transformers() {
    for name in WAN {
        let (m, _c) = load(name);
        let (ids, mask, r) = inputs(name);
        let out = m.forward_masked(&ids, &mask, DType::F32).unwrap();
        let e = rel_err(&out, &r["last_hidden_state"]);
        eprintln!("{name}: UMT5 last_hidden_state relative error {e:.3e}");
        assert!(e <= 1e-5, "{name}: {e:.3e}");

        let embeds = wan_prompt_embeds(&out, &mask).unwrap();
        let e = rel_err(&embeds, &r["prompt_embeds"]);
        eprintln!("{name}: Wan prompt_embeds relative error {e:.3e}");
        assert!(e <= 1e-5, "{name}: {e:.3e}");

        // Past each prompt's length the rows are exact zeros.
        let lens: Vec<usize> = mask
            .to_vec2::<f32>()
            .unwrap()
            .iter()
            .map(|r| r.iter().filter(|&&v| v > 0.0).count())
            .collect();
        for (i, &n) in lens.iter().enumerate() {
            let len = embeds.dim(1).unwrap();
            if n < len {
                let tail = embeds.get(i).unwrap().narrow(0, n, len - n).unwrap();
                let mx = tail.abs().unwrap().max_all().unwrap();
                assert_eq!(mx.to_scalar::<f32>().unwrap(), 0.0, "{name} prompt {i}");
            }
        }
    }
}

/// The mask matters (padding is not attended), and the unmasked FLUX path is unchanged by it.
#[test]
fn mask_changes_padded_prompts_only() {
    let (m, _c) = load("tiny-wan21");
    let (ids, mask, _) = inputs("tiny-wan21");
    let masked = m.forward_masked(&ids, &mask, DType::F32).unwrap();
    let plain = m.forward(&ids, DType::F32).unwrap();
    let ones = Tensor::ones(mask.dims(), DType::F32, &Device::Cpu).unwrap();
    let all_ones = m.forward_masked(&ids, &ones, DType::F32).unwrap();
    assert_close("all-ones mask vs no mask", &all_ones, &plain, 0.0);
    let full = mask.sum(1).unwrap().to_vec1::<f32>().unwrap();
    for (i, n) in full.iter().enumerate() {
        let d = rel_err(&masked.get(i).unwrap(), &plain.get(i).unwrap());
        if *n as usize == mask.dim(1).unwrap() {
            assert_eq!(d, 0.0, "prompt {i} has no padding");
        } else {
            assert!(d > 1e-3, "prompt {i}: the mask changed nothing ({d:.1e})");
        }
    }
}

#[test]
fn offload_is_bit_identical_with_mask() {
    let (m, _c) = load("tiny-wan21");
    let (ids, mask, _) = inputs("tiny-wan21");
    let want = m.forward_masked(&ids, &mask, DType::F32).unwrap();
    for s in [
        Strategy::Sequential,
        Strategy::Group {
            blocks_per_group: 1,
            prefetch: true,
        },
    ] {
        let (m, c) = load("tiny-wan21");
        c.weights.set_strategy(s).unwrap();
        for _ in 0..2 {
            let got = m.forward_masked(&ids, &mask, DType::F32).unwrap();
            assert_close(&format!("{s:?}"), &got, &want, 0.0);
        }
    }
}

#[test]
fn bad_masks_are_refused() {
    let (m, _c) = load("tiny-wan21");
    let (ids, mask, _) = inputs("tiny-wan21");
    let short = mask.narrow(1, 0, 5).unwrap();
    let err = m
        .forward_masked(&ids, &short, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("attention mask"), "{err}");
    let zeros = Tensor::zeros(mask.dims(), DType::F32, &Device::Cpu).unwrap();
    let err = m
        .forward_masked(&ids, &zeros, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("masks every token"), "{err}");
    let h = Tensor::zeros((4, 16, 32), DType::F32, &Device::Cpu).unwrap();
    let err = wan_prompt_embeds(&h, &short).unwrap_err().to_string();
    assert!(err.contains("mask"), "{err}");
}
