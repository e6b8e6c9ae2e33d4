//! `FluxTransformer2DModel` parity with diffusers 0.42.1 on the tiny FLUX.1 dev (guidance
//! embedding) and schnell transformers, offload identity over its block units, and bad configs
//! and inputs.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use lowtide::models::{FluxInputs, FluxTransformer2DModel, FluxTransformerConfig};
use lowtide::pipelines::Component;
use lowtide::residency::Strategy;

const FLAVOURS: [&str; 2] = ["tiny-flux-dev", "tiny-flux-schnell"];

fn open(name: &str) -> (Component, FluxTransformer2DModel) {
    build_component(name, "transformer", |pp, cfg: &FluxTransformerConfig| {
        FluxTransformer2DModel::new(pp, cfg)
    })
}


fn refs_of(name: &str) -> HashMap<String, Tensor> {
    load_refs(refs(name).join("transformer.safetensors"))
}

#[test]
fn transformer_matches_diffusers() {
    for name in FLAVOURS {
        let (_, m) = open(name);
        let r = refs_of(name);
        assert_eq!(r.contains_key("guidance"), m.config().guidance_embeds);
        let out = m.forward(&flux_inputs(&r)).unwrap();
        let e = rel_err(&out, &r["output"]);
        eprintln!("{name}: transformer relative error {e:.3e}");
        assert!(e <= 1e-4, "{name}: relative error {e:.3e} > 1e-4");
    }
}

/// A batch of two equals two single calls, with a (1,) timestep broadcast over the batch.
#[test]
fn batch_equals_single_calls() {
    let name = "tiny-flux-dev";
    let (_, m) = open(name);
    let r = refs_of(name);
    let two = |t: &Tensor, k: f64| Tensor::cat(&[t, &(t * k).unwrap()], 0).unwrap();
    let x = two(&r["hidden_states"], -0.5);
    let e = two(&r["encoder_hidden_states"], 0.7);
    let p = two(&r["pooled_projections"], 1.3);
    let g = two(&r["guidance"], 2.0);
    let batched = m
        .forward(&FluxInputs {
            hidden_states: &x,
            encoder_hidden_states: &e,
            pooled_projections: &p,
            guidance: Some(&g),
            ..flux_inputs(&r)
        })
        .unwrap();
    for i in 0..2 {
        let (xi, ei, pi, gi) = (
            x.narrow(0, i, 1).unwrap(),
            e.narrow(0, i, 1).unwrap(),
            p.narrow(0, i, 1).unwrap(),
            g.narrow(0, i, 1).unwrap(),
        );
        let single = m
            .forward(&FluxInputs {
                hidden_states: &xi,
                encoder_hidden_states: &ei,
                pooled_projections: &pi,
                guidance: Some(&gi),
                ..flux_inputs(&r)
            })
            .unwrap();
        assert_close(
            "batch item",
            &batched.narrow(0, i, 1).unwrap(),
            &single,
            1e-6,
        );
    }
}

/// Block-group and sequential offload give the same bits as keeping everything, on the first
/// (learning) call and on the next one; every block announces itself as a unit.
#[test]
fn offload_strategies_are_bit_identical() {
    let name = "tiny-flux-dev";
    let r = refs_of(name);
    let (_, m) = open(name);
    let want = m.forward(&flux_inputs(&r)).unwrap();
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
            let got = m.forward(&flux_inputs(&r)).unwrap();
            let d = (&got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(d, 0.0, "{s:?} call {call}");
        }
        c.weights.release().unwrap();
    }
}

#[test]
fn guidance_must_match_the_model() {
    let (_, dev) = open("tiny-flux-dev");
    let r = refs_of("tiny-flux-dev");
    let err = dev
        .forward(&FluxInputs {
            guidance: None,
            ..flux_inputs(&r)
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("guidance_embeds"), "{err}");

    let (_, schnell) = open("tiny-flux-schnell");
    let r = refs_of("tiny-flux-schnell");
    let g = Tensor::new(&[3.5f32], &Device::Cpu).unwrap();
    let err = schnell
        .forward(&FluxInputs {
            guidance: Some(&g),
            ..flux_inputs(&r)
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("guidance_embeds"), "{err}");
}

#[test]
fn bad_input_shapes_are_refused() {
    let (_, m) = open("tiny-flux-dev");
    let r = refs_of("tiny-flux-dev");
    let short_ids = r["img_ids"].narrow(0, 1, 3).unwrap();
    let err = m
        .forward(&FluxInputs {
            img_ids: &short_ids,
            ..flux_inputs(&r)
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("img_ids"), "{err}");
    let wrong_width = Tensor::zeros((1, 5, 16), DType::F32, &Device::Cpu).unwrap();
    let err = m
        .forward(&FluxInputs {
            encoder_hidden_states: &wrong_width,
            ..flux_inputs(&r)
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("encoder_hidden_states"), "{err}");
}

fn config_with(edit: serde_json::Value) -> FluxTransformerConfig {
    let text =
        std::fs::read_to_string(model("tiny-flux-dev").join("transformer/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (k, x) in edit.as_object().unwrap() {
        v[k] = x.clone();
    }
    serde_json::from_value(v).unwrap()
}

#[test]
fn bad_configs_name_the_field() {
    let cases = [
        (
            serde_json::json!({"axes_dims_rope": [4, 6, 8]}),
            "axes_dims_rope",
        ),
        (
            serde_json::json!({"axes_dims_rope": [5, 5, 6]}),
            "axes_dims_rope",
        ),
        (serde_json::json!({"axes_dims_rope": []}), "axes_dims_rope"),
        (
            serde_json::json!({"num_attention_heads": 0}),
            "num_attention_heads",
        ),
        (
            serde_json::json!({"attention_head_dim": 0}),
            "attention_head_dim",
        ),
        (serde_json::json!({"patch_size": 2}), "patch_size"),
        (serde_json::json!({"in_channels": 0}), "in_channels"),
        (
            serde_json::json!({"joint_attention_dim": 0}),
            "joint_attention_dim",
        ),
        (
            serde_json::json!({"pooled_projection_dim": 0}),
            "pooled_projection_dim",
        ),
    ];
    let (c, _) = open("tiny-flux-dev");
    for (edit, field) in cases {
        let cfg = config_with(edit.clone());
        let err = match FluxTransformer2DModel::new(&c.param_root(), &cfg) {
            Ok(_) => panic!("{edit} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("transformer/config.json") && err.contains(&format!("`{field}`")),
            "{edit}: {err}"
        );
    }
}

#[test]
fn config_defaults_are_diffusers_defaults() {
    let cfg: FluxTransformerConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(
        (
            cfg.patch_size,
            cfg.in_channels,
            cfg.out_channels(),
            cfg.num_layers,
            cfg.num_single_layers,
            cfg.attention_head_dim,
            cfg.num_attention_heads,
            cfg.joint_attention_dim,
            cfg.pooled_projection_dim,
            cfg.guidance_embeds,
        ),
        (1, 64, 64, 19, 38, 128, 24, 4096, 768, false)
    );
    assert_eq!(cfg.axes_dims_rope, vec![16, 56, 56]);
    assert_eq!(cfg.inner_dim(), 3072);
    cfg.validate().unwrap();
}
