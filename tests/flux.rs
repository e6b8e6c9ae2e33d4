//! FLUX.1 (dev and schnell flavours) against diffusers 0.42.1 `FluxPipeline` on the tiny
//! fixtures: full-pipeline parity per case, seeded noise, offload and storage-dtype identity,
//! fp8 layerwise casting, the CLI, and bad input.

mod common;

use std::path::Path;

use candle_core::{DType, Tensor};
use common::*;
use lowtide::pipelines::{Flux, GenerateRequest, LoadOptions, OffloadPlan, Pipeline};
use lowtide::residency::{StoragePlan, Strategy};

const TOL: f32 = 1e-4;

fn cases(flavour: &str) -> serde_json::Value {
    let p = refs(&format!("tiny-flux-{flavour}")).join("cases.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn flux(flavour: &str, opts: LoadOptions) -> Flux {
    Flux::load(&model(&format!("tiny-flux-{flavour}")), opts).unwrap()
}

/// The request for a case of cases.json, with the reference's initial noise when `latents`.
fn request(flavour: &str, case: &str, latents: bool) -> (GenerateRequest, Vec<(String, Tensor)>) {
    let c = &cases(flavour)["cases"][case];
    let r = load_refs(refs(&format!("tiny-flux-{flavour}")).join(c["file"].as_str().unwrap()));
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    let true_cfg = c["true_cfg"].as_f64().unwrap();
    let req = GenerateRequest {
        prompt: c["prompt"].as_str().unwrap().into(),
        negative_prompt: c["negative_prompt"].as_str().map(String::from),
        steps: u("steps"),
        guidance: c["guidance"].as_f64().unwrap(),
        seed: c["seed"].as_u64().unwrap(),
        width: Some(u("width")),
        height: Some(u("height")),
        num_images: u("num_images"),
        latents: latents.then(|| r["latents"].clone()),
        true_cfg: (true_cfg > 1.0).then_some(true_cfg),
        max_sequence_length: Some(u("max_sequence_length")),
        ..GenerateRequest::default()
    };
    let mut refs: Vec<(String, Tensor)> = r.into_iter().collect();
    refs.sort_by(|a, b| a.0.cmp(&b.0));
    (req, refs)
}

fn check(what: &str, out: &lowtide::pipelines::GenerateOutput, refs: &[(String, Tensor)]) {
    for (name, ours) in out.named_tensors() {
        let (_, r) = refs
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{what}: no reference for {name}"));
        assert_close(&format!("{what} {name}"), ours, r, TOL);
    }
}

#[test]
fn pipelines_match_diffusers() {
    for (flavour, names) in [
        ("dev", &["default", "batch", "true_cfg"][..]),
        ("schnell", &["default", "batch"][..]),
    ] {
        let pipe = flux(flavour, LoadOptions::default());
        for &case in names {
            let (req, refs) = request(flavour, case, true);
            let mut calls = 0;
            let out = pipe.generate(&req, &mut |_, _| calls += 1).unwrap();
            assert_eq!(calls, req.steps, "{flavour} {case}: one step per timestep");
            check(&format!("{flavour} {case}"), &out, &refs);
        }
    }
}

#[test]
fn seeded_noise_is_torchs() {
    let pipe = flux("dev", LoadOptions::default());
    let (req, refs) = request("dev", "default", false);
    let out = pipe.generate(&req, &mut |_, _| {}).unwrap();
    check("seeded", &out, &refs);
}

/// diffusers silently resizes sizes that are not multiples of 16; lowtide says so instead.
#[test]
fn sizes_not_multiple_of_16_are_refused_with_the_nearest() {
    let pipe = flux("schnell", LoadOptions::default());
    let (req, _) = request("schnell", "odd_size", false);
    let e = match pipe.generate(&req, &mut |_, _| {}) {
        Ok(_) => panic!("an odd size ran"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("multiples of 16") && e.contains("32x64"), "{e}");
}

fn run(pipe: &Flux) -> Vec<Tensor> {
    let (req, _) = request("dev", "default", true);
    let out = pipe.generate(&req, &mut |_, _| {}).unwrap();
    vec![out.final_latents, out.image, out.prompt_embeds]
}

fn identical(a: &[Tensor], b: &[Tensor]) -> bool {
    a.iter().zip(b).all(|(x, y)| {
        let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits())
    })
}

#[test]
fn offload_strategies_and_file_dtype_storage_are_bit_identical() {
    let reference = run(&flux("dev", LoadOptions::default()));
    for s in [
        Strategy::Model,
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
        let mut pipe = flux("dev", LoadOptions::default());
        pipe.set_offload(&OffloadPlan::uniform(s)).unwrap();
        pipe.accounting.reset();
        assert!(identical(&run(&pipe), &reference), "{s:?} differs");
        // The transformer's blocks are group units: never the whole transformer at once.
        if let Strategy::Group { .. } = s {
            let peak = pipe.accounting.report().components["transformer"].peak_resident_bytes;
            let total = pipe.component("transformer").unwrap().weights.total_bytes();
            assert!(peak < total, "group peak {peak} of {total}");
        }
    }
    for spec in ["auto", "f32", "transformer=f32,text_encoder_2=auto"] {
        let opts = LoadOptions {
            storage: StoragePlan::parse(spec).unwrap(),
            ..LoadOptions::default()
        };
        assert!(
            identical(&run(&flux("dev", opts)), &reference),
            "--storage-dtype {spec}"
        );
    }
}

#[test]
fn fp8_storage_matches_diffusers_layerwise_casting() {
    let c = cases("dev");
    // The skip patterns leave exactly the parameters diffusers leaves.
    for (key, skipped) in [("fp8_skipped_params", true), ("fp8_cast_params", false)] {
        for p in c[key].as_array().unwrap() {
            let p = p.as_str().unwrap();
            assert_eq!(lowtide::residency::storage::skipped(p), skipped, "{p}");
        }
    }
    let opts = LoadOptions {
        storage: StoragePlan::parse("f8e4m3").unwrap(),
        ..LoadOptions::default()
    };
    let pipe = flux("dev", opts);
    let (req, _) = request("dev", "default", true);
    let fp8_ref = load_refs(refs("tiny-flux-dev").join("pipeline_fp8.safetensors"));
    pipe.accounting.reset();
    let out = pipe.generate(&req, &mut |_, _| {}).unwrap();
    for (name, ours) in out.named_tensors() {
        assert_close(&format!("fp8 {name}"), ours, &fp8_ref[name], 1e-3);
    }
    // Honest accounting: the cast weights are held in one byte each.
    let f32_bytes = flux("dev", LoadOptions::default())
        .component("transformer")
        .unwrap()
        .weights
        .total_bytes();
    let fp8_bytes = pipe.component("transformer").unwrap().weights.total_bytes();
    assert!(fp8_bytes * 2 < f32_bytes, "{fp8_bytes} vs {f32_bytes}");
    let peak = pipe.accounting.report().components["transformer"].peak_resident_bytes;
    assert_eq!(peak, fp8_bytes);
    // e5m2 (2 mantissa bits): no diffusers reference was made for it; the image stays near the
    // f32 one, and differs from it (the cast really happened).
    let opts = LoadOptions {
        storage: StoragePlan::parse("transformer=f8e5m2").unwrap(),
        ..LoadOptions::default()
    };
    let out = flux("dev", opts).generate(&req, &mut |_, _| {}).unwrap();
    let f32_ref = load_refs(refs("tiny-flux-dev").join("pipeline_default.safetensors"));
    assert_close("e5m2 image", &out.image, &f32_ref["image"], 0.15);
    assert!(!identical(&[out.image], &[f32_ref["image"].clone()]));
}

// ---- through the CLI ----

fn flux_cli(flavour: &str, case: &str, dir: &Path) -> Vec<String> {
    let c = &cases(flavour)["cases"][case];
    let v = |k: &str| c[k].to_string().trim_matches('"').to_string();
    vec![
        "generate".into(),
        "--model".into(),
        s(&model(&format!("tiny-flux-{flavour}"))).into(),
        "--prompt".into(),
        v("prompt"),
        "--steps".into(),
        v("steps"),
        "--guidance".into(),
        v("guidance"),
        "--seed".into(),
        v("seed"),
        "--width".into(),
        v("width"),
        "--height".into(),
        v("height"),
        "--num-images".into(),
        v("num_images"),
        "--max-sequence-length".into(),
        v("max_sequence_length"),
        "--out".into(),
        s(&dir.join("f.png")).into(),
        "--save-tensors".into(),
        s(&dir.join("f.safetensors")).into(),
    ]
}

#[test]
fn cli_matches_diffusers_and_offload_is_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let mut pngs = Vec::new();
    for extra in [
        &[][..],
        &["--offload", "group"][..],
        &["--offload", "sequential"][..],
        &["--offload", "model"][..],
    ] {
        let mut args = flux_cli("schnell", "default", tmp.path());
        args.extend(extra.iter().map(|a| a.to_string()));
        let refs_: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
        ok(&refs_);
        pngs.push(std::fs::read(tmp.path().join("f.png")).unwrap());
        let got = load_refs(tmp.path().join("f.safetensors"));
        let (_, want) = request("schnell", "default", false);
        for (name, r) in &want {
            if let Some(t) = got.get(name.as_str()) {
                assert_close(&format!("cli {extra:?} {name}"), t, r, TOL);
            }
        }
        for k in [
            "prompt_embeds",
            "pooled_prompt_embeds",
            "final_latents",
            "image",
        ] {
            assert_eq!(got[k].dtype(), DType::F32, "{k}");
        }
    }
    assert!(
        pngs.windows(2).all(|w| w[0] == w[1]),
        "offloaded PNGs differ"
    );
}

/// `--matmul-precision high` (bf16x3 on AMX) stays within the parity tolerance of diffusers'
/// f32 run; on a CPU with AMX it really changes the products, elsewhere it changes nothing.
#[test]
fn matmul_precision_high_stays_within_tolerance() {
    let tmp = tempfile::tempdir().unwrap();
    let mut runs = Vec::new();
    for p in ["highest", "high"] {
        let mut args = flux_cli("dev", "default", tmp.path());
        args.extend(["--matmul-precision".to_string(), p.to_string()]);
        ok(&args.iter().map(|a| a.as_str()).collect::<Vec<_>>());
        let got = load_refs(tmp.path().join("f.safetensors"));
        let (_, want) = request("dev", "default", false);
        for (name, r) in &want {
            if let Some(t) = got.get(name.as_str()) {
                assert_close(&format!("{p} {name}"), t, r, TOL);
            }
        }
        runs.push(got["final_latents"].clone());
    }
    assert_eq!(
        !identical(&runs[..1], &runs[1..]),
        lowtide::layers::bf16x3_available(),
        "high differs from highest exactly where the CPU has AMX"
    );
}

#[test]
fn bad_flux_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let base = |extra: &[&str]| {
        let mut a = flux_cli("dev", "default", tmp.path());
        for e in extra.chunks(2) {
            if let Some(i) = a.iter().position(|x| x == e[0]) {
                a.remove(i);
                a.remove(i);
            }
        }
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let run_fails = |extra: &[&str], expect: &[&str]| {
        let a = base(extra);
        let r: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
        fails(&r, expect);
    };
    run_fails(&["--width", "40"], &["multiples of 16", "32x64"]);
    run_fails(&["--max-sequence-length", "0"], &["--max-sequence-length"]);
    run_fails(
        &["--max-sequence-length", "513"],
        &["--max-sequence-length", "512"],
    );
    run_fails(&["--true-cfg", "2"], &["--true-cfg", "--negative-prompt"]);
    run_fails(
        &["--storage-dtype", "int4"],
        &["--storage-dtype", "int4", "f8e4m3"],
    );
    run_fails(
        &["--storage-dtype", "unet=bf16"],
        &["unet", "text_encoder_2"],
    );
    run_fails(&["--scheduler", "euler"], &["--scheduler"]);

    // Files: an unknown pipeline class, a component of the wrong class, a missing T5
    // tokenizer, a checkpoint whose tensor does not fit the config.
    let pipe_arg = |p: &Path| vec!["--model".to_string(), s(p).to_string()];
    let with_model = |p: &Path, expect: &[&str]| {
        let mut a = base(&[]);
        let i = a.iter().position(|x| x == "--model").unwrap();
        a.splice(i..i + 2, pipe_arg(p));
        let r: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
        fails(&r, expect);
    };
    let edit = |p: &Path, f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(p, v.to_string()).unwrap();
    };
    let (_t, p) = scratch("tiny-flux-dev");
    edit(&p.join("model_index.json"), &|v| {
        v["_class_name"] = "FluxKontextPipeline".into()
    });
    with_model(
        &p,
        &[
            "FluxKontextPipeline",
            "FluxPipeline",
            "StableDiffusionPipeline",
        ],
    );
    let (_t, p) = scratch("tiny-flux-dev");
    edit(&p.join("model_index.json"), &|v| {
        v["transformer"] = serde_json::json!(["diffusers", "SD3Transformer2DModel"])
    });
    with_model(
        &p,
        &[
            "transformer",
            "SD3Transformer2DModel",
            "FluxTransformer2DModel",
        ],
    );
    let (_t, p) = scratch("tiny-flux-dev");
    std::fs::remove_file(p.join("tokenizer_2/tokenizer.json")).unwrap();
    with_model(&p, &["tokenizer_2", "tokenizer.json"]);
    let (_t, p) = scratch("tiny-flux-dev");
    edit(&p.join("transformer/config.json"), &|v| {
        v["joint_attention_dim"] = 48.into()
    });
    with_model(&p, &["context_embedder", "shape"]);
}
