//! Wan 2.1 / 2.2 (TI2V, A14B two experts) against diffusers 0.42.1 `WanPipeline` on the tiny
//! fixtures: full-pipeline parity per case, the VAE's temporal chunks in the pipeline, offload
//! identity, and bad input.

mod common;

use candle_core::Tensor;
use common::*;
use lowtide::pipelines::{GenerateRequest, LoadOptions, OffloadPlan, Pipeline, Wan};
use lowtide::residency::Strategy;
use lowtide::schedulers::SchedulerKind;

const TOL: f32 = 1e-4;

fn cases(name: &str) -> serde_json::Value {
    let p = refs(name).join("cases.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn wan(name: &str) -> Wan {
    Wan::load(&model(name), LoadOptions::default()).unwrap()
}

fn request(name: &str, case: &str, latents: bool) -> GenerateRequest {
    let c = &cases(name)["cases"][case];
    let r = load_refs(refs(name).join(format!("pipeline_{case}.safetensors")));
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    GenerateRequest {
        prompt: c["prompt"].as_str().unwrap().into(),
        negative_prompt: c["negative_prompt"].as_str().map(String::from),
        steps: u("steps"),
        guidance: c["guidance"].as_f64().unwrap(),
        guidance_2: c["guidance_2"].as_f64(),
        scheduler: Some(SchedulerKind::from_cli(c["scheduler"].as_str().unwrap()).unwrap()),
        seed: c["seed"].as_u64().unwrap(),
        width: Some(u("width")),
        height: Some(u("height")),
        frames: Some(u("num_frames")),
        num_images: u("num_videos"),
        latents: latents.then(|| r["latents"].clone()),
        max_sequence_length: Some(u("max_sequence_length")),
        ..GenerateRequest::default()
    }
}

fn check(name: &str, case: &str, out: &lowtide::pipelines::GenerateOutput) {
    let r = load_refs(refs(name).join(format!("pipeline_{case}.safetensors")));
    for (k, ours) in out.named_tensors() {
        assert_close(&format!("{name} {case} {k}"), ours, &r[k], TOL);
    }
}

#[test]
fn pipelines_match_diffusers() {
    for (name, names) in [
        (
            "tiny-wan21",
            &["cfg", "nocfg_batch", "flow_euler", "single_frame"][..],
        ),
        ("tiny-wan22-ti2v", &["cfg", "nocfg_batch", "rounded"][..]),
        (
            "tiny-wan22-a14b",
            &["two_experts", "two_experts_default_g2"][..],
        ),
    ] {
        let pipe = wan(name);
        for &case in names {
            let req = request(name, case, true);
            let mut steps = 0;
            let out = pipe.generate(&req, &mut |_, _| steps += 1).unwrap();
            assert_eq!(steps, req.steps, "{name} {case}");
            assert!(out.is_video());
            check(name, case, &out);
        }
    }
}

#[test]
fn seeded_noise_is_torchs() {
    let pipe = wan("tiny-wan21");
    let out = pipe
        .generate(&request("tiny-wan21", "cfg", false), &mut |_, _| {})
        .unwrap();
    check("tiny-wan21", "cfg", &out);
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn offload_and_decode_chunks_are_bit_identical() {
    let name = "tiny-wan22-a14b";
    let req = request(name, "two_experts", true);
    let reference = wan(name).generate(&req, &mut |_, _| {}).unwrap();
    for s in [
        Strategy::Model,
        Strategy::Sequential,
        Strategy::Group {
            blocks_per_group: 1,
            prefetch: true,
        },
    ] {
        let mut pipe = wan(name);
        pipe.set_offload(&OffloadPlan::uniform(s)).unwrap();
        let out = pipe.generate(&req, &mut |_, _| {}).unwrap();
        assert_eq!(bits(&out.image), bits(&reference.image), "{s:?}");
        assert_eq!(
            bits(&out.final_latents),
            bits(&reference.final_latents),
            "{s:?}"
        );
    }
    // Larger causal chunks decode the same frames.
    let pipe = wan(name);
    let chunked = GenerateRequest {
        decode_chunk_size: Some(2),
        ..req.clone()
    };
    let out = pipe.generate(&chunked, &mut |_, _| {}).unwrap();
    assert_close("chunk 2 video", &out.image, &reference.image, 1e-5);
}

#[test]
fn bad_wan_input_is_a_clear_error() {
    let pipe = wan("tiny-wan21");
    let base = request("tiny-wan21", "cfg", false);
    let fails = |req: GenerateRequest, expect: &[&str]| {
        let e = match pipe.generate(&req, &mut |_, _| {}) {
            Ok(_) => panic!("ran: {expect:?}"),
            Err(e) => e.to_string(),
        };
        for x in expect {
            assert!(e.contains(x), "{e} lacks {x}");
        }
    };
    fails(
        GenerateRequest {
            frames: Some(0),
            ..base.clone()
        },
        &["--frames"],
    );
    fails(
        GenerateRequest {
            guidance_2: Some(3.0),
            ..base.clone()
        },
        &["--guidance-2", "one expert"],
    );
    fails(
        GenerateRequest {
            decode_chunk_size: Some(0),
            ..base.clone()
        },
        &["chunk"],
    );
    fails(
        GenerateRequest {
            width: Some(40),
            ..base.clone()
        },
        &["multiples of 16"],
    );
    let l = Tensor::zeros(
        (1, 16, 4, 4),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    fails(
        GenerateRequest {
            latents: Some(l),
            ..base.clone()
        },
        &["--latents", "(B, C, T, h, w)"],
    );
    fails(
        GenerateRequest {
            scheduler: Some(SchedulerKind::Euler),
            ..base
        },
        &["unipc", "flow-euler"],
    );
}
