//! `WanTransformer3DModel` parity with diffusers 0.42.1 on the tiny Wan 2.1 T2V, Wan 2.2 A14B
//! (two experts) and Wan 2.2 TI2V (per-token timesteps) transformers; offload identity over its
//! block units; bad configs and inputs.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use lowtide::models::{WanInputs, WanTransformer3DModel, WanTransformerConfig};
use lowtide::pipelines::Component;
use lowtide::residency::Strategy;

fn open_component(name: &str, component: &str) -> (Component, WanTransformer3DModel) {
    build_component(name, component, |pp, cfg: &WanTransformerConfig| {
        WanTransformer3DModel::new(pp, cfg)
    })
}

fn open(name: &str) -> (Component, WanTransformer3DModel) {
    open_component(name, "transformer")
}

fn refs_of(name: &str) -> HashMap<String, Tensor> {
    load_refs(refs(name).join("transformer.safetensors"))
}

fn inputs<'a>(r: &'a HashMap<String, Tensor>, timestep: &'a str) -> WanInputs<'a> {
    WanInputs {
        hidden_states: &r["hidden_states"],
        timestep: &r[timestep],
        encoder_hidden_states: &r["encoder_hidden_states"],
    }
}

#[track_caller]
fn check(what: &str, got: &Tensor, want: &Tensor) {
    let e = rel_err(got, want);
    eprintln!("{what}: relative error {e:.3e}");
    assert!(e <= 1e-4, "{what}: relative error {e:.3e} > 1e-4");
}

#[test]
fn wan21_matches_diffusers() {
    let (_, m) = open("tiny-wan21");
    let r = refs_of("tiny-wan21");
    let out = m.forward(&inputs(&r, "timestep")).unwrap();
    check("tiny-wan21", &out, &r["output"]);
}

/// Wan 2.2 A14B: two transformers of the same architecture (high- and low-noise experts), both
/// run on the same inputs.
#[test]
fn wan22_a14b_experts_match_diffusers() {
    let r = refs_of("tiny-wan22-a14b");
    for (component, key) in [("transformer", "output"), ("transformer_2", "output_2")] {
        let (_, m) = open_component("tiny-wan22-a14b", component);
        let out = m.forward(&inputs(&r, "timestep")).unwrap();
        check(&format!("tiny-wan22-a14b {component}"), &out, &r[key]);
    }
}

/// Wan 2.2 TI2V: a (batch, seq) timestep, 0 on the first latent frame's patches (the
/// conditioning frame) and the noise level elsewhere; and a uniform one.
#[test]
fn wan22_ti2v_per_token_timesteps_match_diffusers() {
    let (_, m) = open("tiny-wan22-ti2v");
    let r = refs_of("tiny-wan22-ti2v");
    assert_eq!(r["timestep"].rank(), 2);
    let out = m.forward(&inputs(&r, "timestep")).unwrap();
    check("tiny-wan22-ti2v per-token", &out, &r["output"]);
    let uniform = m.forward(&inputs(&r, "timestep_uniform")).unwrap();
    check("tiny-wan22-ti2v uniform", &uniform, &r["output_uniform"]);

    // A per-token timestep that is uniform per sample is the (batch,) timestep.
    let per_sample = r["timestep_uniform"]
        .narrow(1, 0, 1)
        .unwrap()
        .squeeze(1)
        .unwrap();
    let flat = m
        .forward(&WanInputs {
            timestep: &per_sample,
            ..inputs(&r, "timestep")
        })
        .unwrap();
    assert_close("(batch,) vs uniform (batch, seq)", &flat, &uniform, 1e-6);
}

/// A batch of two equals two single calls; a (1,) timestep broadcasts over the batch.
#[test]
fn batch_equals_single_calls() {
    let name = "tiny-wan21";
    let (_, m) = open(name);
    let r = refs_of(name);
    let batched = m.forward(&inputs(&r, "timestep")).unwrap();
    for i in 0..2 {
        let (x, t, e) = (
            r["hidden_states"].narrow(0, i, 1).unwrap(),
            r["timestep"].narrow(0, i, 1).unwrap(),
            r["encoder_hidden_states"].narrow(0, i, 1).unwrap(),
        );
        let single = m
            .forward(&WanInputs {
                hidden_states: &x,
                timestep: &t,
                encoder_hidden_states: &e,
            })
            .unwrap();
        assert_close(
            "batch item",
            &batched.narrow(0, i, 1).unwrap(),
            &single,
            1e-6,
        );
    }
    let t0 = r["timestep"].narrow(0, 0, 1).unwrap();
    let both_t0 = Tensor::cat(&[&t0, &t0], 0).unwrap();
    let broadcast = m
        .forward(&WanInputs {
            timestep: &t0,
            ..inputs(&r, "timestep")
        })
        .unwrap();
    let explicit = m
        .forward(&WanInputs {
            timestep: &both_t0,
            ..inputs(&r, "timestep")
        })
        .unwrap();
    assert_close("(1,) timestep", &broadcast, &explicit, 1e-6);
}

/// Block-group and sequential offload give the same bits as keeping everything, on the first
/// (learning) call and on the next one; every block announces itself as a unit.
#[test]
fn offload_strategies_are_bit_identical() {
    for (name, ts) in [("tiny-wan21", "timestep"), ("tiny-wan22-ti2v", "timestep")] {
        let r = refs_of(name);
        let (_, m) = open(name);
        let want = m.forward(&inputs(&r, ts)).unwrap();
        for s in [
            Strategy::Sequential,
            Strategy::Group {
                blocks_per_group: 1,
                prefetch: true,
            },
            Strategy::Group {
                blocks_per_group: 2,
                prefetch: false,
            },
        ] {
            let (c, m) = open(name);
            c.weights.set_strategy(s).unwrap();
            for call in 0..2 {
                let got = m.forward(&inputs(&r, ts)).unwrap();
                let d = (&got - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert_eq!(d, 0.0, "{name} {s:?} call {call}");
            }
            if matches!(s, Strategy::Group { .. }) {
                // Two blocks and the embedders/head: more than one group was planned.
                let groups = c.weights.group_bytes().expect("group order learned");
                assert!(groups.len() >= 2, "{name} {s:?}: {groups:?}");
            }
            c.weights.release().unwrap();
        }
    }
}

#[test]
fn bad_input_shapes_are_refused() {
    let (_, m) = open("tiny-wan21");
    let r = refs_of("tiny-wan21");
    let dev = Device::Cpu;
    let cases: [(&str, Tensor, &str); 6] = [
        // Odd height: not a multiple of the 2x2 patch.
        (
            "hidden_states",
            Tensor::zeros((2, 16, 3, 5, 6), DType::F32, &dev).unwrap(),
            "multiples of the patch size",
        ),
        (
            "hidden_states",
            Tensor::zeros((2, 8, 3, 4, 6), DType::F32, &dev).unwrap(),
            "`hidden_states`",
        ),
        (
            "hidden_states",
            Tensor::zeros((2, 16, 4, 6), DType::F32, &dev).unwrap(),
            "`hidden_states`",
        ),
        (
            "encoder_hidden_states",
            Tensor::zeros((2, 16, 8), DType::F32, &dev).unwrap(),
            "`encoder_hidden_states`",
        ),
        (
            "timestep",
            Tensor::zeros(3, DType::F32, &dev).unwrap(),
            "`timestep`",
        ),
        // Per-token timesteps must cover every patch (3 * 2 * 3 = 18).
        (
            "timestep",
            Tensor::zeros((2, 17), DType::F32, &dev).unwrap(),
            "`timestep`",
        ),
    ];
    for (field, t, expect) in cases {
        let mut inp = inputs(&r, "timestep");
        match field {
            "hidden_states" => inp.hidden_states = &t,
            "encoder_hidden_states" => inp.encoder_hidden_states = &t,
            _ => inp.timestep = &t,
        }
        let err = m.forward(&inp).unwrap_err().to_string();
        assert!(err.contains(expect), "{field} {:?}: {err}", t.dims());
    }
}

fn config_with(edit: serde_json::Value) -> WanTransformerConfig {
    let text =
        std::fs::read_to_string(model("tiny-wan21").join("transformer/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (k, x) in edit.as_object().unwrap() {
        v[k] = x.clone();
    }
    serde_json::from_value(v).unwrap()
}

#[test]
fn bad_configs_name_the_field() {
    use serde_json::json;
    let cases = [
        (json!({"patch_size": [2, 2]}), "patch_size"),
        (json!({"patch_size": [1, 0, 2]}), "patch_size"),
        (json!({"num_attention_heads": 0}), "num_attention_heads"),
        (json!({"attention_head_dim": 0}), "attention_head_dim"),
        (json!({"attention_head_dim": 15}), "attention_head_dim"),
        (json!({"in_channels": 0}), "in_channels"),
        (json!({"text_dim": 0}), "text_dim"),
        (json!({"freq_dim": 1}), "freq_dim"),
        (json!({"ffn_dim": 0}), "ffn_dim"),
        (json!({"num_layers": 100000}), "num_layers"),
        (json!({"rope_max_seq_len": 0}), "rope_max_seq_len"),
        (json!({"eps": 0.0}), "eps"),
        (json!({"eps": -1e-6}), "eps"),
        (json!({"qk_norm": "layer_norm"}), "qk_norm"),
        (json!({"image_dim": 1280}), "image_dim"),
        (json!({"added_kv_proj_dim": 5120}), "added_kv_proj_dim"),
    ];
    let (c, _) = open("tiny-wan21");
    for (edit, field) in cases {
        let cfg = config_with(edit.clone());
        let err = match WanTransformer3DModel::new(&c.param_root(), &cfg) {
            Ok(_) => panic!("{edit} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("transformer/config.json") && err.contains(&format!("`{field}`")),
            "{edit}: {err}"
        );
    }
    // What diffusers treats the same as the default is accepted.
    for edit in [json!({"qk_norm": null}), json!({"out_channels": null})] {
        let cfg = config_with(edit.clone());
        assert!(cfg.validate().is_ok(), "{edit}");
        assert_eq!(cfg.out_channels(), 16);
    }
}

#[test]
fn config_defaults_are_diffusers_defaults() {
    let cfg: WanTransformerConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(cfg.patch_size, vec![1, 2, 2]);
    assert_eq!(
        (
            cfg.num_attention_heads,
            cfg.attention_head_dim,
            cfg.in_channels,
            cfg.out_channels(),
            cfg.text_dim,
            cfg.freq_dim,
            cfg.ffn_dim,
            cfg.num_layers,
            cfg.rope_max_seq_len,
        ),
        (40, 128, 16, 16, 4096, 256, 13824, 40, 1024)
    );
    assert!(cfg.cross_attn_norm);
    assert_eq!(cfg.qk_norm.as_deref(), Some("rms_norm_across_heads"));
    assert_eq!(cfg.eps, 1e-6);
    assert_eq!((cfg.image_dim, cfg.added_kv_proj_dim), (None, None));
    assert_eq!(cfg.inner_dim(), 5120);
    // WanRotaryPosEmbed(128): h = w = 2 * (128 // 6) = 42, t = 44.
    assert_eq!(cfg.rope_axes(), [44, 42, 42]);
    cfg.validate().unwrap();
}
