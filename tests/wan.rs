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

// ---- through the CLI ----

fn cli_args(dir: &std::path::Path, out: &str, extra: &[&str]) -> Vec<String> {
    let c = &cases("tiny-wan21")["cases"]["cfg"];
    let v = |k: &str| c[k].to_string().trim_matches('"').to_string();
    let mut a: Vec<String> = [
        "generate",
        "--model",
        s(&model("tiny-wan21")),
        "--prompt",
        &v("prompt"),
        "--negative-prompt",
        &v("negative_prompt"),
        "--steps",
        &v("steps"),
        "--guidance",
        &v("guidance"),
        "--seed",
        &v("seed"),
        "--width",
        &v("width"),
        "--height",
        &v("height"),
        "--frames",
        &v("num_frames"),
        "--max-sequence-length",
        &v("max_sequence_length"),
        "--save-tensors",
        s(&dir.join("w.safetensors")),
        "--out",
        s(&dir.join(out)),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

#[test]
fn cli_writes_an_mp4_and_frames_that_match_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let args = cli_args(tmp.path(), "w.mp4", &["--fps", "8"]);
    ok(&args.iter().map(|a| a.as_str()).collect::<Vec<_>>());
    let got = load_refs(tmp.path().join("w.safetensors"));
    let want = load_refs(refs("tiny-wan21").join("pipeline_cfg.safetensors"));
    for k in ["prompt_embeds", "final_latents", "video"] {
        assert_close(&format!("cli {k}"), &got[k], &want[k], TOL);
    }
    // The container: one H.264 track, a sample per frame, the size and rate asked for.
    let bytes = std::fs::read(tmp.path().join("w.mp4")).unwrap();
    let reader =
        mp4::Mp4Reader::read_header(std::io::Cursor::new(&bytes), bytes.len() as u64).unwrap();
    let track = &reader.tracks()[&1];
    assert_eq!(track.media_type().unwrap(), mp4::MediaType::H264);
    assert_eq!((track.width(), track.height()), (48, 32));
    assert_eq!(track.sample_count(), 9);
    assert_eq!(track.frame_rate(), 8.0);
    // A folder of frames holds the same frames as 8-bit PNGs, exactly.
    let args = cli_args(tmp.path(), "frames/", &["--offload", "group"]);
    ok(&args.iter().map(|a| a.as_str()).collect::<Vec<_>>());
    let video = &got["video"];
    for t in [0usize, 4, 8] {
        let png = image::open(tmp.path().join(format!("frames/frame_{t:04}.png")))
            .unwrap()
            .to_rgb8();
        let want: Vec<u8> = video
            .get(0)
            .unwrap()
            .get(t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect();
        assert_eq!(png.into_raw(), want, "frame {t}");
    }
}

#[test]
fn cli_refuses_bad_video_arguments_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |out: &str, extra: &[&str], expect: &[&str]| {
        let a = cli_args(tmp.path(), out, extra);
        fails(&a.iter().map(|x| x.as_str()).collect::<Vec<_>>(), expect);
    };
    run("w.png", &[], &["--out", ".mp4"]);
    run("w.avi", &[], &["--out", ".avi"]);
    run("w.mp4", &["--fps", "0"], &["--fps"]);
    run(
        "w.mp4",
        &["--decode-chunk-size", "0"],
        &["--decode-chunk-size"],
    );
    run("w.mp4", &["--guidance-2", "2"], &["--guidance-2"]);
    assert!(
        std::fs::read_dir(tmp.path()).unwrap().next().is_none(),
        "files were left"
    );
}

#[test]
fn vae_cli_decodes_a_wan_vae_in_chunks_and_tiles() {
    let tmp = tempfile::tempdir().unwrap();
    let r = load_refs(refs("tiny-wan21").join("vae.safetensors"));
    let z = tmp.path().join("z.safetensors");
    r["z"].save_safetensors("z", &z).unwrap();
    let tiling = &cases("tiny-wan21")["vae"]["decode_tiling"];
    let tile = tiling["tile_sample_min_height"].as_u64().unwrap();
    let stride = tiling["tile_sample_stride_height"].as_u64().unwrap();
    let (tile, overlap) = (
        tile.to_string(),
        (1.0 - stride as f64 / tile as f64).to_string(),
    );
    let m = model("tiny-wan21");
    for (i, (extra, want)) in [
        (&[][..], "sample"),
        (&["--decode-chunk-size", "2"][..], "sample"),
        (
            &["--tile-size", &tile, "--tile-overlap", &overlap][..],
            "sample_tiled",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let dst = tmp.path().join(format!("s{i}.safetensors"));
        let mut a = vec![
            "vae",
            "decode",
            "--model",
            s(&m),
            "--latents",
            s(&z),
            "--save-tensors",
            s(&dst),
        ];
        a.extend(extra);
        ok(&a);
        let got = load_refs(dst)["sample"].clone();
        assert_close(&format!("vae cli {extra:?}"), &got, &r[want], TOL);
    }
}

#[test]
fn vae_cli_encodes_a_folder_of_frames() {
    let tmp = tempfile::tempdir().unwrap();
    let r = load_refs(refs("tiny-wan21").join("vae.safetensors"));
    // The reference video as 8-bit PNG frames (quantisation is the only difference).
    let x = &r["x"]; // (1, 3, T, H, W) in [-1, 1]
    let frames = tmp.path().join("frames");
    std::fs::create_dir(&frames).unwrap();
    let (t, h, w) = (x.dim(2).unwrap(), x.dim(3).unwrap(), x.dim(4).unwrap());
    let mut q = Vec::new();
    for i in 0..t {
        let f = x
            .get(0)
            .unwrap()
            .narrow(1, i, 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let px: Vec<u8> = f
            .permute((1, 2, 0))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| ((v + 1.0) / 2.0 * 255.0).round().clamp(0.0, 255.0) as u8)
            .collect();
        q.extend(px.iter().map(|&b| b as f32 / 255.0 * 2.0 - 1.0));
        image::RgbImage::from_raw(w as u32, h as u32, px)
            .unwrap()
            .save(frames.join(format!("f{i:03}.png")))
            .unwrap();
    }
    let dst = tmp.path().join("e.safetensors");
    let m = model("tiny-wan21");
    ok(&[
        "vae",
        "encode",
        "--model",
        s(&m),
        "--image",
        s(&frames),
        "--save-tensors",
        s(&dst),
    ]);
    let got = load_refs(dst);
    // The same quantised video through the library is the exact reference for the CLI path.
    let xq = Tensor::from_vec(q, (t, h, w, 3), &candle_core::Device::Cpu)
        .unwrap()
        .permute((3, 0, 1, 2))
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .contiguous()
        .unwrap();
    let xq_path = tmp.path().join("xq.safetensors");
    xq.save_safetensors("x", &xq_path).unwrap();
    let dst2 = tmp.path().join("e2.safetensors");
    ok(&[
        "vae",
        "encode",
        "--model",
        s(&m),
        "--image",
        s(&xq_path),
        "--save-tensors",
        s(&dst2),
    ]);
    let want = load_refs(dst2);
    assert_close("folder encode mean", &got["mean"], &want["mean"], 1e-6);
    // And close to diffusers' encode of the unquantised video.
    assert_close("folder encode vs diffusers", &got["mean"], &r["mean"], 5e-2);
}
