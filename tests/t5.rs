//! FLUX's text encoders against transformers 5.24 / diffusers 0.42.1: the T5 tokenizer
//! (`tokenizer_2/tokenizer.json`), `T5EncoderModel` (`text_encoder_2`) and CLIP's pooled output;
//! plus the configs and files they must refuse.

mod common;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::*;
use lowtide::models::{ClipTextConfig, ClipTextModel, T5Config, T5EncoderModel};
use lowtide::pipelines::Component;
use lowtide::residency::{Accounting, Strategy};
use lowtide::tokenizer::{ClipTokenizer, T5Tokenizer};
use lowtide::Error;

const FLUX: [&str; 2] = ["tiny-flux-dev", "tiny-flux-schnell"];

fn ids_of(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn cases(name: &str) -> serde_json::Value {
    let p = refs(name).join("cases.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn open(root: &Path, name: &str, dtype: DType) -> Component {
    let acct = Arc::new(Accounting::default());
    Component::open(root, name, "model", None, None, &Device::Cpu, dtype, acct).unwrap()
}

fn load_t5(root: &Path, dtype: DType) -> (T5EncoderModel, Component) {
    let c = open(root, "text_encoder_2", dtype);
    let cfg: T5Config = c.config().unwrap();
    let pp = c.param_root();
    let model = T5EncoderModel::new(&pp, &cfg).unwrap();
    c.validate(&pp).unwrap();
    (model, c)
}

fn t5_config(json: &str) -> lowtide::Result<()> {
    let cfg: T5Config = serde_json::from_str(json).unwrap();
    cfg.validate()
}

#[track_caller]
fn assert_unsupported(r: lowtide::Result<()>, field: &str) {
    match r {
        Err(e @ Error::UnsupportedConfig { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&format!("`{field}`")), "{msg}");
        }
        other => panic!("expected an unsupported-config error for {field}, got {other:?}"),
    }
}

#[test]
fn t5_tokenizer_matches_transformers() {
    for name in FLUX {
        let tok = T5Tokenizer::from_dir(&model(name).join("tokenizer_2")).unwrap();
        let c = &cases(name)["t5"];
        let max = c["tokenizer_max_length"].as_u64().unwrap() as usize;
        let want = ids_of(&load_refs(refs(name).join("t5.safetensors"))["tokenizer_input_ids"]);
        let prompts = strings(&c["tokenizer_prompts"]);
        assert_eq!(prompts.len(), want.len());
        for (p, want) in prompts.iter().zip(want) {
            assert_eq!(
                tok.encode_padded(p, max).unwrap().ids,
                want,
                "{name}: {p:?}"
            );
        }
    }
}

#[test]
fn t5_truncation_keeps_eos_and_reports_the_rest() {
    let tok = T5Tokenizer::from_dir(&model("tiny-flux-dev").join("tokenizer_2")).unwrap();
    let short = tok.encode_padded("an astronaut", 16).unwrap();
    assert_eq!(short.truncated, None);
    assert_eq!(*short.ids.last().unwrap(), tok.pad_id());
    let long = tok
        .encode_padded(
            "a lighthouse on a rocky coast at dawn, seagulls over waves",
            6,
        )
        .unwrap();
    assert_eq!(long.ids.len(), 6);
    assert_eq!(long.ids[5], 1, "`</s>` stays the last token");
    let rest = long.truncated.expect("the prompt does not fit in 6 tokens");
    assert!(rest.contains("seagulls"), "{rest:?}");
    // Exactly full: not truncated.
    let n = tok.encode_padded("an astronaut", 64).unwrap();
    let len = n.ids.iter().position(|&i| i == tok.pad_id()).unwrap();
    assert_eq!(
        tok.encode_padded("an astronaut", len).unwrap().truncated,
        None
    );
    assert!(tok
        .encode_padded("an astronaut", len - 1)
        .unwrap()
        .truncated
        .is_some());
    assert!(matches!(
        tok.encode_padded("x", 0),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn t5_encoder_matches() {
    for name in FLUX {
        let root = model(name);
        let (t5, _c) = load_t5(&root, DType::F32);
        let tok = T5Tokenizer::from_dir(&root.join("tokenizer_2")).unwrap();
        let c = &cases(name)["t5"];
        let max = c["max_sequence_length"].as_u64().unwrap() as usize;
        let r = load_refs(refs(name).join("t5.safetensors"));
        let want = ids_of(&r["input_ids"]);
        let prompts = strings(&c["prompts"]);
        let mut flat = vec![];
        for (p, want) in prompts.iter().zip(&want) {
            let ids = tok.encode_padded(p, max).unwrap().ids;
            assert_eq!(&ids, want, "{name}: {p:?}");
            flat.extend(ids);
        }
        let ids = Tensor::from_vec(flat, (prompts.len(), max), &Device::Cpu).unwrap();
        let out = t5.forward(&ids, DType::F32).unwrap();
        assert_close(&format!("{name} T5"), &out, &r["prompt_embeds"], 1e-5);
    }
}

/// Half precision runs (f16 with its residual stream in f32) and stays near the f32 reference.
#[test]
fn t5_encoder_half_precision() {
    let r = load_refs(refs("tiny-flux-dev").join("t5.safetensors"));
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let (t5, _c) = load_t5(&model("tiny-flux-dev"), dtype);
        let out = t5.forward(&ids, dtype).unwrap();
        assert_eq!(out.dtype(), dtype);
        assert_close(&format!("T5 {dtype:?}"), &out, &r["prompt_embeds"], 3e-2);
    }
}

/// Every block is an offload unit: group and sequential offload give the same numbers.
#[test]
fn t5_encoder_under_offload() {
    let r = load_refs(refs("tiny-flux-dev").join("t5.safetensors"));
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let (t5, c) = load_t5(&model("tiny-flux-dev"), DType::F32);
    let base = t5.forward(&ids, DType::F32).unwrap();
    for s in [
        Strategy::Sequential,
        Strategy::Group {
            blocks_per_group: 1,
            prefetch: true,
        },
    ] {
        c.weights.set_strategy(s).unwrap();
        // Twice: group offload learns its plan on the first pass and uses it on the second.
        for _ in 0..2 {
            let out = t5.forward(&ids, DType::F32).unwrap();
            assert_close(&format!("T5 under {}", s.name()), &out, &base, 0.0);
        }
    }
}

/// Checkpoints that name the table `encoder.embed_tokens.weight` load too.
#[test]
fn t5_reads_embed_tokens_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("text_encoder_2");
    let src = model("tiny-flux-dev").join("text_encoder_2");
    copy_dir(&src, &dir);
    let file = dir.join("model.safetensors");
    let mut m = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let w = m.remove("shared.weight").unwrap();
    m.insert("encoder.embed_tokens.weight".into(), w);
    candle_core::safetensors::save(&m, &file).unwrap();
    let r = load_refs(refs("tiny-flux-dev").join("t5.safetensors"));
    let (t5, _c) = load_t5(tmp.path(), DType::F32);
    let out = t5
        .forward(&r["input_ids"].to_dtype(DType::U32).unwrap(), DType::F32)
        .unwrap();
    assert_close("T5 (embed_tokens)", &out, &r["prompt_embeds"], 1e-5);
}

/// UMT5's layout (a bias table in every block, `architectures: UMT5EncoderModel`) reads each
/// block's own table: with block 0's copied into block 1 it reproduces the T5 reference, with
/// zeros there it does not.
#[test]
fn t5_bias_per_layer_reads_every_table() {
    let r = load_refs(refs("tiny-flux-dev").join("t5.safetensors"));
    let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
    let name = |i: usize| {
        format!("encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight")
    };
    let run = |zeros: bool| -> Tensor {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("text_encoder_2");
        copy_dir(&model("tiny-flux-dev").join("text_encoder_2"), &dir);
        let file = dir.join("model.safetensors");
        let mut m = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
        let table = m[&name(0)].clone();
        let table = if zeros {
            table.zeros_like().unwrap()
        } else {
            table
        };
        m.insert(name(1), table);
        candle_core::safetensors::save(&m, &file).unwrap();
        let cfg_path = dir.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg["architectures"] = serde_json::json!(["UMT5EncoderModel"]);
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let (t5, _c) = load_t5(tmp.path(), DType::F32);
        assert!(t5.config().bias_per_layer());
        t5.forward(&ids, DType::F32).unwrap()
    };
    assert_close("UMT5 layout", &run(false), &r["prompt_embeds"], 1e-5);
    assert!(rel_err(&run(true), &r["prompt_embeds"]) > 1e-3);
}

#[test]
fn clip_pooled_output_matches() {
    for name in FLUX {
        let root = model(name);
        let c = open(&root, "text_encoder", DType::F32);
        let cfg: ClipTextConfig = c.config().unwrap();
        let pp = c.param_root();
        let clip = ClipTextModel::new(&pp, &cfg).unwrap();
        c.validate(&pp).unwrap();
        let tok = ClipTokenizer::from_dir(&root.join("tokenizer"), 77).unwrap();
        let r = load_refs(refs(name).join("clip.safetensors"));
        let want = ids_of(&r["input_ids"]);
        let prompts = strings(&cases(name)["clip"]["prompts"]);
        let mut flat = vec![];
        for (p, want) in prompts.iter().zip(&want) {
            let ids = tok.encode_padded(p).unwrap();
            assert_eq!(&ids, want, "{name}: {p:?}");
            flat.extend(ids);
        }
        let ids = Tensor::from_vec(flat, (prompts.len(), 77), &Device::Cpu).unwrap();
        let out = clip.forward_with_pooled(&ids, DType::F32).unwrap();
        assert_close(
            &format!("{name} CLIP last_hidden_state"),
            &out.last_hidden_state,
            &r["last_hidden_state"],
            1e-5,
        );
        assert_close(
            &format!("{name} CLIP pooled"),
            &out.pooler_output,
            &r["pooled_prompt_embeds"],
            1e-5,
        );

        // Configs after transformers PR #24773 name the real EOS id and pool at its first
        // occurrence; here that is the same position as the legacy argmax.
        let eos = tok.encode_padded("").unwrap()[1];
        let cfg = ClipTextConfig {
            eos_token_id: Some(i64::from(eos)),
            ..cfg
        };
        let clip = ClipTextModel::new(&c.param_root(), &cfg).unwrap();
        let out = clip.forward_with_pooled(&ids, DType::F32).unwrap();
        assert_close(
            &format!("{name} CLIP pooled (eos {eos})"),
            &out.pooler_output,
            &r["pooled_prompt_embeds"],
            1e-5,
        );
    }
}

#[test]
fn t5_config_defaults_are_transformers() {
    let cfg: T5Config = serde_json::from_str("{}").unwrap();
    assert_eq!(
        (
            cfg.vocab_size,
            cfg.d_model,
            cfg.d_kv,
            cfg.d_ff,
            cfg.num_layers,
            cfg.num_heads
        ),
        (32128, 512, 64, 2048, 6, 8)
    );
    assert_eq!(
        (
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance
        ),
        (32, 128)
    );
    assert_eq!(cfg.layer_norm_epsilon, 1e-6);
    assert_eq!(cfg.feed_forward_proj, "relu");
    cfg.validate().unwrap();
}

#[test]
fn t5_config_refuses_bad_values_by_name() {
    assert_unsupported(t5_config(r#"{"num_heads": 0}"#), "num_heads");
    assert_unsupported(t5_config(r#"{"d_kv": 0}"#), "d_kv");
    assert_unsupported(t5_config(r#"{"num_layers": 0}"#), "num_layers");
    assert_unsupported(
        t5_config(r#"{"relative_attention_num_buckets": 1}"#),
        "relative_attention_num_buckets",
    );
    assert_unsupported(
        t5_config(r#"{"relative_attention_max_distance": 8}"#),
        "relative_attention_max_distance",
    );
    for bad in [
        "gated-mish",
        "mish",
        "gelu-gated",
        "gated-gelu-new",
        "gated-",
    ] {
        assert_unsupported(
            t5_config(&format!(r#"{{"feed_forward_proj": "{bad}"}}"#)),
            "feed_forward_proj",
        );
    }
    assert_unsupported(
        t5_config(r#"{"architectures": ["BertModel"]}"#),
        "architectures",
    );
    for ok in [
        "relu",
        "gated-gelu",
        "gated-silu",
        "gelu_new",
        "gated-gelu_new",
    ] {
        t5_config(&format!(r#"{{"feed_forward_proj": "{ok}"}}"#)).unwrap();
    }
}

/// Absurd sizes are refused by name; sizes that disagree with the checkpoint before anything
/// runs.
#[test]
fn t5_config_disagreeing_with_checkpoint() {
    let c = open(&model("tiny-flux-dev"), "text_encoder_2", DType::F32);
    let cfg: T5Config = c.config().unwrap();
    let too_deep = T5Config {
        num_layers: 1_000_000_000,
        ..cfg.clone()
    };
    let r = T5EncoderModel::new(&c.param_root(), &too_deep).map(|_| ());
    assert_unsupported(r, "num_layers");
    let wrong_heads = T5Config {
        num_heads: 8,
        ..cfg
    };
    let pp = c.param_root();
    T5EncoderModel::new(&pp, &wrong_heads).unwrap();
    assert!(matches!(c.validate(&pp), Err(Error::ShapeMismatch { .. })));
}

#[test]
fn t5_refuses_out_of_vocab_ids() {
    let (t5, _c) = load_t5(&model("tiny-flux-dev"), DType::F32);
    let ids = Tensor::new(&[[5u32, 1000]], &Device::Cpu).unwrap();
    assert!(matches!(
        t5.forward(&ids, DType::F32),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn missing_t5_tokenizer_json_is_explained() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tokenizer_2");
    std::fs::create_dir_all(&dir).unwrap();
    let src = model("tiny-flux-dev").join("tokenizer_2");
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let e = T5Tokenizer::from_dir(&dir)
        .err()
        .expect("no tokenizer.json");
    let msg = e.to_string();
    assert!(matches!(e, Error::NotFound { .. }), "{msg}");
    assert!(
        msg.contains("tokenizer_2/tokenizer.json") && msg.contains("save_pretrained"),
        "{msg}"
    );
}

/// Wan's T5 is its `text_encoder`: a config error names the file read, not FLUX's folder.
#[test]
fn t5_config_errors_name_the_component_read() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("text_encoder");
    copy_dir(&model("tiny-wan21").join("text_encoder"), &dir);
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["num_layers"] = serde_json::json!(1_000_000_000u64);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let c = open(tmp.path(), "text_encoder", DType::F32);
    let msg = match c.build(T5EncoderModel::new) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("num_layers = 1e9 was accepted"),
    };
    let file = cfg_path.display().to_string();
    assert!(msg.contains(&file) && msg.contains("`num_layers`"), "{msg}");
    assert!(!msg.contains("text_encoder_2"), "{msg}");
}
