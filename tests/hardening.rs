//! A new user's probe, one test per class of failure: no panic or abort (every failure is one
//! `error:` line and exit 1), no silently wrong image, no lost file, and errors that name the
//! file, flag or value at fault.

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use common::*;

/// `generate` on the tiny SD1.5 pipeline, 1 step at 16x16; a flag in `extra` replaces the
/// default of the same name.
fn quick_args(model: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let defaults = [
        ("--model", s(model)),
        ("--prompt", "x"),
        ("--steps", "1"),
        ("--width", "16"),
        ("--height", "16"),
        ("--out", s(out)),
    ];
    let mut v = vec!["generate".to_string()];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            v.extend([flag.to_string(), value.to_string()]);
        }
    }
    v.extend(extra.iter().map(|a| a.to_string()));
    v
}

#[track_caller]
fn quick_fails(model: &Path, out: &Path, extra: &[&str], expect: &[&str]) -> String {
    let args = quick_args(model, out, extra);
    let refs: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    fails(&refs, expect)
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

// ---- 1. panics and aborts become errors ----

#[test]
fn schedules_past_the_training_timesteps_are_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model("tiny-sd15");
    let out = tmp.path().join("o.png");
    for sched in ["pndm", "dpmpp-2m", "ddim", "euler"] {
        quick_fails(
            &m,
            &out,
            &["--steps", "1000", "--scheduler", sched],
            &["--steps 1000", "timestep"],
        );
    }
    let (_t, p) = scratch_pipeline();
    let cfg = p.join("scheduler/scheduler_config.json");
    edit_json(&cfg, |v| v["steps_offset"] = 5000.into());
    quick_fails(&p, &out, &[], &["steps_offset", "5000"]);
    edit_json(&cfg, |v| {
        v["steps_offset"] = 1.into();
        v["num_train_timesteps"] = 2.into();
    });
    quick_fails(&p, &out, &["--steps", "4"], &["training timesteps"]);
    assert!(!out.exists());
}

#[test]
fn config_values_that_size_loops_are_validated() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    for (field, value) in [
        ("norm_num_groups", serde_json::json!(0)),
        ("layers_per_block", serde_json::json!(u64::MAX)),
        ("scaling_factor", serde_json::json!(0.0)),
        ("latent_channels", serde_json::json!(0)),
    ] {
        let (_t, p) = scratch_pipeline();
        edit_json(&p.join("vae/config.json"), |v| v[field] = value.clone());
        quick_fails(&p, &out, &[], &["vae/config.json", field]);
    }
    let (_t, p) = scratch_pipeline();
    edit_json(&p.join("unet/config.json"), |v| {
        v["layers_per_block"] = serde_json::json!(u64::MAX)
    });
    quick_fails(&p, &out, &[], &["unet/config.json", "layers_per_block"]);
    let (_t, p) = scratch_pipeline();
    edit_json(&p.join("text_encoder/config.json"), |v| {
        v["num_hidden_layers"] = serde_json::json!(u64::MAX)
    });
    quick_fails(
        &p,
        &out,
        &[],
        &["text_encoder/config.json", "num_hidden_layers"],
    );
}

#[test]
fn shard_index_without_tensors_or_escaping_the_folder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    let (_t, p) = scratch("tiny-sd2");
    let index = p.join("unet/diffusion_pytorch_model.safetensors.index.json");
    let original = std::fs::read_to_string(&index).unwrap();
    edit_json(&index, |v| v["weight_map"] = serde_json::json!({}));
    quick_fails(&p, &out, &[], &["weight_map", "no tensors"]);
    std::fs::write(&index, &original).unwrap();
    edit_json(&index, |v| {
        let map = v["weight_map"].as_object_mut().unwrap();
        let k = map.keys().next().unwrap().clone();
        map.insert(k, "../../../etc/passwd".into());
    });
    quick_fails(
        &p,
        &out,
        &[],
        &["weight_map", "../../../etc/passwd", "plain file names"],
    );
}

#[test]
fn runs_that_cannot_fit_in_memory_are_refused_with_the_figures() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model("tiny-sd15");
    let out = tmp.path().join("o.png");
    for extra in [
        &["--width", "4294967288", "--height", "64"][..],
        &["--num-images", "1000000000000000000"][..],
        &["--width", "100000", "--height", "100000"][..],
    ] {
        quick_fails(
            &m,
            &out,
            extra,
            &["not enough memory", "available", "--tiling"],
        );
    }
}

// ---- 2. silently wrong results: right or refused ----

#[test]
fn tiled_vae_outputs_always_have_the_requested_size() {
    use lowtide::models::VaeMemory;
    use lowtide::pipelines::{load_vae, LoadOptions};
    let (vae, _) = load_vae(&model("tiny-sd15"), &LoadOptions::default()).unwrap();
    let f = vae.config().scale_factor();
    let dev = Device::Cpu;
    for (h, w) in [(16, 16), (16, 8), (12, 20), (9, 7)] {
        for tile_px in [2 * f, 3 * f, 5 * f, 8 * f] {
            for overlap in [0.0, 0.1, 0.25, 0.5, 0.75] {
                let Ok(t) = vae.tiling(Some(tile_px), Some(overlap)) else {
                    continue;
                };
                let mem = VaeMemory {
                    tiling: Some(t),
                    slicing: false,
                };
                let z = Tensor::zeros((1, 4, h, w), candle_core::DType::F32, &dev).unwrap();
                let x = vae.decode_with(&z, &mem).unwrap();
                assert_eq!(
                    x.dims(),
                    &[1, 3, h * f, w * f],
                    "decode {h}x{w} tile {tile_px} overlap {overlap}"
                );
                let img =
                    Tensor::zeros((1, 3, h * f, w * f), candle_core::DType::F32, &dev).unwrap();
                let d = vae.encode_with(&img, &mem).unwrap();
                assert_eq!(
                    d.mean.dims(),
                    &[1, 4, h, w],
                    "encode {h}x{w} tile {tile_px} overlap {overlap}"
                );
            }
        }
    }
}

#[test]
fn tiled_generate_writes_the_requested_size() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model("tiny-sd15");
    let out = tmp.path().join("o.png");
    let args = quick_args(
        &m,
        &out,
        &[
            "--width",
            "128",
            "--height",
            "64",
            "--tile-size",
            "40",
            "--tile-overlap",
            "0.1",
        ],
    );
    let refs: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    ok(&refs);
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (128, 64));
}

#[test]
fn values_that_are_not_finite_in_f32_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model("tiny-sd15");
    let out = tmp.path().join("o.png");
    quick_fails(&m, &out, &["--guidance", "1e39"], &["--guidance", "finite"]);
    // Latents holding a NaN.
    let lat = tmp.path().join("nan.safetensors");
    let mut v = vec![0f32; 4 * 2 * 2];
    v[3] = f32::NAN;
    let t = Tensor::from_vec(v, (1, 4, 2, 2), &Device::Cpu).unwrap();
    t.save_safetensors("latents", &lat).unwrap();
    quick_fails(&m, &out, &["--latents", s(&lat)], &["--latents", "NaN"]);
    let (_t, p) = scratch_pipeline();
    edit_json(&p.join("scheduler/scheduler_config.json"), |v| {
        v["beta_end"] = 2.0.into()
    });
    quick_fails(&p, &out, &[], &["beta_end", "(0, 1)"]);
    assert!(!out.exists());
}

#[test]
fn options_that_would_be_ignored_are_errors_or_warnings() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model("tiny-sd15");
    let out = tmp.path().join("o.png");
    let init = refs("tiny-sd15").join("init.png");
    quick_fails(
        &m,
        &out,
        &[
            "--init-image",
            s(&init),
            "--strength",
            "0.5",
            "--width",
            "8",
        ],
        &["--init-image", "--width/--height"],
    );
    quick_fails(
        &m,
        &out,
        &["--blocks-per-group", "2"],
        &["--blocks-per-group", "group"],
    );
    quick_fails(&m, &out, &["--no-prefetch"], &["--no-prefetch", "group"]);
    quick_fails(
        &m,
        &out,
        &["--keep-on-device", "vae"],
        &["--keep-on-device", "--offload"],
    );
    // A prompt past CLIP's 77 tokens runs, with diffusers' warning naming the dropped part.
    let long = format!("{} tailword", "a photo of a cat ".repeat(30));
    let args = quick_args(&m, &out, &["--prompt", &long]);
    let refs: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    let err = String::from_utf8_lossy(&ok(&refs).stderr).into_owned();
    assert!(
        err.contains("warning") && err.contains("truncated") && err.contains("tailword"),
        "{err}"
    );
}

// ---- 3. lost files and lost work ----

#[test]
fn output_paths_are_checked_before_the_model_is_touched() {
    let tmp = tempfile::tempdir().unwrap();
    // A model path that does not exist: the output check must come first.
    let m = tmp.path().join("no-model");
    let d = tmp.path();
    for (flag, path, expect) in [
        ("--out", d.join("nodir/a.png"), "does not exist"),
        ("--out", d.to_path_buf(), "is a folder"),
        ("--out", d.join("noext"), "no extension"),
        ("--out", d.join("x.jpg"), ".jpg"),
        ("--report", d.join("nodir/r.json"), "does not exist"),
        ("--save-tensors", d.join("t.bin"), ".bin"),
    ] {
        let args = quick_args(&m, &d.join("ok.png"), &[flag, s(&path)]);
        let refs: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
        let err = fails(&refs, &[flag, expect]);
        assert!(!err.contains("no-model"), "{err}");
    }
}

#[test]
fn an_existing_output_survives_a_failing_run() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model("tiny-sd15");
    let out = tmp.path().join("c.png");
    std::fs::write(&out, b"precious").unwrap();
    let jpg = tmp.path().join("c.jpg");
    std::fs::write(&jpg, b"precious").unwrap();
    quick_fails(&m, &jpg, &[], &[".jpg"]);
    quick_fails(&m, &out, &["--guidance", "1e39"], &["--guidance"]);
    let lat = tmp.path().join("bad.safetensors");
    Tensor::zeros((0, 4, 2, 2), candle_core::DType::F32, &Device::Cpu)
        .unwrap()
        .save_safetensors("l", &lat)
        .unwrap();
    quick_fails(&m, &out, &["--latents", s(&lat)], &["--latents"]);
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    assert_eq!(std::fs::read(&jpg).unwrap(), b"precious");
    // The writer itself: a failed rename (the target is a folder) leaves no temporary file.
    let dir_target = tmp.path().join("taken");
    std::fs::create_dir(dir_target.join("").as_path()).unwrap();
    std::fs::write(dir_target.join("inside"), b"x").unwrap();
    let e = lowtide::io::write_atomic(&dir_target, b"data").unwrap_err();
    assert!(e.to_string().contains("taken"), "{e}");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

#[test]
fn every_output_gets_the_users_umask_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let m = model("tiny-sd15");
    let out = tmp.path().join("o.png");
    let t = tmp.path().join("t.safetensors");
    let r = tmp.path().join("r.json");
    let args = quick_args(&m, &out, &["--save-tensors", s(&t), "--report", s(&r)]);
    let refs: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    ok(&refs);
    let plain = tmp.path().join("plain");
    std::fs::write(&plain, b"").unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for p in [&out, &t, &r] {
        assert_eq!(mode(p), mode(&plain), "{}", p.display());
    }
}

// ---- 4. errors that name what is wrong ----

#[test]
fn low_precision_compute_on_the_cpu_is_refused_up_front() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    for dt in ["bf16", "f16"] {
        let err = quick_fails(
            &tmp.path().join("no-model"),
            &out,
            &["--dtype", dt],
            &["f32 only"],
        );
        assert_eq!(err.matches("CPU compute").count(), 1, "{err}");
    }
}

#[test]
fn errors_name_the_file_or_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    let m = model("tiny-sd15");
    // Latents of the wrong rank or an empty batch.
    let lat = tmp.path().join("l.safetensors");
    Tensor::zeros((4, 2, 2), candle_core::DType::F32, &Device::Cpu)
        .unwrap()
        .save_safetensors("l", &lat)
        .unwrap();
    quick_fails(
        &m,
        &out,
        &["--latents", s(&lat)],
        &["--latents", "l.safetensors", "(B, C, h, w)"],
    );
    // An init image whose size is not a multiple of 8.
    let png = tmp.path().join("odd.png");
    image::RgbImage::new(20, 12).save(&png).unwrap();
    quick_fails(
        &m,
        &out,
        &[
            "--init-image",
            s(&png),
            "--strength",
            "0.5",
            "--width",
            "20",
            "--height",
            "12",
        ],
        &["odd.png", "multiples of 8", "16x8"],
    );
    // The whole message, not a cut one.
    let init = refs("tiny-sd15").join("init.png");
    let (w, h) = image::image_dimensions(&init).unwrap();
    let (w, h) = (w.to_string(), h.to_string());
    quick_fails(
        &m,
        &out,
        &[
            "--init-image",
            s(&init),
            "--strength",
            "0.2",
            "--steps",
            "4",
            "--width",
            &w,
            "--height",
            &h,
        ],
        &["raise --strength or --steps"],
    );
    // `--model` given a file without --config (the pipeline it belongs to).
    let file = tmp.path().join("somefile");
    std::fs::write(&file, b"x").unwrap();
    quick_fails(
        &file,
        &out,
        &[],
        &["somefile", "is a single file", "--config"],
    );
}

#[test]
fn damaged_model_files_are_named_without_internal_jargon() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o.png");
    // A pickle text encoder gets the conversion hint.
    let (_t, p) = scratch_pipeline();
    std::fs::rename(
        p.join("text_encoder/model.safetensors"),
        p.join("text_encoder/pytorch_model.bin"),
    )
    .unwrap();
    quick_fails(&p, &out, &[], &["text_encoder", "pickle", "convert"]);
    // Bytes after the last tensor: a clear sentence, not the parser's variant name.
    let (_t, p) = scratch_pipeline();
    let vae = p.join("vae/diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&vae).unwrap();
    bytes.extend_from_slice(&[0u8; 10]);
    std::fs::write(&vae, bytes).unwrap();
    let err = quick_fails(
        &p,
        &out,
        &[],
        &["diffusion_pytorch_model.safetensors", "damaged"],
    );
    assert!(!err.contains("MetadataIncompleteBuffer"), "{err}");
    // Invalid JSON: the parser's message once, not twice.
    let (_t, p) = scratch_pipeline();
    std::fs::write(p.join("unet/config.json"), b"{ not json").unwrap();
    let err = quick_fails(&p, &out, &[], &["unet/config.json", "invalid JSON"]);
    assert_eq!(err.matches("key must be a string").count(), 1, "{err}");
    // A tokenizer with ids the text encoder cannot embed names the tokenizer.
    let (_t, p) = scratch_pipeline();
    edit_json(&p.join("tokenizer/vocab.json"), |v| {
        v["zzzunseen</w>"] = 100_000.into()
    });
    quick_fails(&p, &out, &[], &["tokenizer", "vocab_size", "100000"]);
}
