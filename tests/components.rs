//! Component parity with diffusers 0.42.1 / transformers: tokenizer ids, text embeddings, one UNet
//! call, VAE decode and encode, on both tiny pipelines; sharded and fp16-variant loading.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use lowtide::pipelines::{load_vae, LoadOptions, StableDiffusion};
use lowtide::tokenizer::ClipTokenizer;

fn load(name: &str) -> StableDiffusion {
    StableDiffusion::load(&model(name), LoadOptions::default()).unwrap()
}

fn ids_of(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect()
}

#[test]
fn clip_tokenizer_matches_transformers_on_full_vocab() {
    let tok = ClipTokenizer::from_dir(&fixtures().join("clip-tokenizer"), 77).unwrap();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("refs/tokenizer.json")).unwrap(),
    )
    .unwrap();
    let expected = ids_of(&load_refs(fixtures().join("refs/tokenizer.safetensors"))["input_ids"]);
    let prompts = meta["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), expected.len());
    for (p, want) in prompts.iter().zip(expected) {
        let p = p.as_str().unwrap();
        assert_eq!(tok.encode_padded(p).unwrap(), want, "prompt {p:?}");
    }
}

#[test]
fn text_encoder_matches() {
    for name in PIPELINES {
        let pipe = load(name);
        let r = load_refs(refs(name).join("text_encoder.safetensors"));
        let ids = ids_of(&r["input_ids"]);
        let texts = [PROMPT, NEGATIVE, ""];
        for (text, want) in texts.iter().zip(&ids) {
            assert_eq!(
                &pipe.tokenizer.encode_padded(text).unwrap(),
                want,
                "{name}: {text:?}"
            );
        }
        let flat: Vec<u32> = ids.concat();
        let ids = Tensor::from_vec(flat, (3, 77), &Device::Cpu).unwrap();
        let out = pipe.text_encoder.forward(&ids, DType::F32).unwrap();
        assert_close(
            &format!("{name} last_hidden_state"),
            &out,
            &r["last_hidden_state"],
            1e-5,
        );
    }
}

#[test]
fn unet_call_matches() {
    for name in PIPELINES {
        let pipe = load(name);
        let r = load_refs(refs(name).join("unet.safetensors"));
        let t = r["timestep"].to_vec1::<f32>().unwrap()[0] as f64;
        let out = pipe
            .unet
            .forward(&r["sample"], t, &r["encoder_hidden_states"])
            .unwrap();
        assert_close(&format!("{name} unet"), &out, &r["out"], 1e-5);
    }
}

#[test]
fn vae_decode_and_encode_match() {
    for name in PIPELINES {
        let (vae, _) = load_vae(&model(name), &LoadOptions::default()).unwrap();
        let r = load_refs(refs(name).join("vae.safetensors"));
        let dec = vae.decode(&r["z"]).unwrap();
        assert_close(&format!("{name} decode"), &dec, &r["decoded"], 1e-5);
        let dist = vae.encode(&r["image"]).unwrap();
        assert_close(&format!("{name} mean"), &dist.mean, &r["mean"], 1e-5);
        assert_close(&format!("{name} logvar"), &dist.logvar, &r["logvar"], 1e-5);
    }
}

#[test]
fn vae_loads_from_its_own_folder() {
    let (vae, _) = load_vae(&model("tiny-sd15").join("vae"), &LoadOptions::default()).unwrap();
    let r = load_refs(refs("tiny-sd15").join("vae.safetensors"));
    assert_close("decode", &vae.decode(&r["z"]).unwrap(), &r["decoded"], 1e-5);
}

#[test]
fn sharded_unet_is_one_checkpoint() {
    // tiny-sd2's UNet is saved in shards with an index file.
    let pipe = load("tiny-sd2");
    let store = pipe.components[1].weights.store();
    assert!(store.describe().contains("shards"), "{}", store.describe());
    let shards: std::collections::HashSet<_> = store
        .names()
        .map(|n| store.path_of(store.get(n).unwrap()).to_path_buf())
        .collect();
    assert!(
        shards.len() > 1,
        "expected several shard files, got {shards:?}"
    );
}

#[test]
fn fp16_variant_reads_half_files_and_upcasts() {
    let opts = LoadOptions {
        variant: Some("fp16".into()),
        ..LoadOptions::default()
    };
    let pipe = StableDiffusion::load(&model("tiny-sd15"), opts).unwrap();
    let store = pipe.components[1].weights.store();
    let any = store.names().next().unwrap();
    let path = store.path_of(store.get(any).unwrap());
    assert!(
        path.to_string_lossy().ends_with(".fp16.safetensors"),
        "{path:?}"
    );
    assert_eq!(store.get(any).unwrap().dtype, DType::F16);
}
