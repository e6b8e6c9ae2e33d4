//! The `lowtide` binary as users and outside tests drive it: parity through the CLI, the files it
//! writes, and a clear error with a non-zero exit code (never a panic) for every kind of bad input.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::*;

fn generate_args<'a>(sched: &'a str, m: &'a HashMap<&str, String>) -> Vec<&'a str> {
    vec![
        "generate",
        "--model",
        &m["model"],
        "--prompt",
        PROMPT,
        "--negative-prompt",
        NEGATIVE,
        "--steps",
        "4",
        "--guidance",
        "7.5",
        "--scheduler",
        sched,
        "--seed",
        &m["seed"],
        "--width",
        &m["width"],
        "--height",
        &m["height"],
        "--latents",
        &m["latents"],
        "--out",
        &m["out"],
        "--save-tensors",
        &m["tensors"],
    ]
}

#[test]
fn generate_cli_matches_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    for name in PIPELINES {
        let meta = meta(name);
        for sched in ["pndm", "ddim", "euler"] {
            let out = tmp.path().join(format!("{name}-{sched}.png"));
            let tensors = tmp.path().join(format!("{name}-{sched}.safetensors"));
            let m: HashMap<&str, String> = [
                ("model", s(&model(name)).to_string()),
                ("seed", meta["seed"].to_string()),
                ("width", meta["width"].to_string()),
                ("height", meta["height"].to_string()),
                (
                    "latents",
                    s(&refs(name).join("latents.safetensors")).to_string(),
                ),
                ("out", s(&out).to_string()),
                ("tensors", s(&tensors).to_string()),
            ]
            .into();
            ok(&generate_args(sched, &m));
            let got = load_refs(tensors);
            let want = load_refs(refs(name).join(format!("pipeline_{sched}.safetensors")));
            let what = format!("cli {name} {sched}");
            assert_close(
                &format!("{what} prompt_embeds"),
                &got["prompt_embeds"],
                &want["prompt_embeds"],
                1e-5,
            );
            assert_close(
                &format!("{what} final_latents"),
                &got["final_latents"],
                &want["final_latents"],
                1e-4,
            );
            assert_close(
                &format!("{what} image"),
                &got["image"],
                &want["image"],
                1e-4,
            );
            for (k, t) in &got {
                assert_eq!(t.dtype(), DType::F32, "{k} must be saved as f32");
            }
            let png = image::open(&out).unwrap();
            assert_eq!(
                (png.width(), png.height()),
                (
                    meta["width"].as_u64().unwrap() as u32,
                    meta["height"].as_u64().unwrap() as u32
                )
            );
        }
    }
}

#[test]
fn several_images_get_numbered_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("img.png");
    ok(&[
        "generate",
        "--model",
        s(&model("tiny-sd2")),
        "--prompt",
        "x",
        "--steps",
        "2",
        "--num-images",
        "2",
        "--width",
        "16",
        "--height",
        "16",
        "--out",
        s(&out),
    ]);
    assert!(tmp.path().join("img-0.png").is_file());
    assert!(tmp.path().join("img-1.png").is_file());
}

#[test]
fn img2img_cli_matches_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "tiny-sd2";
    let m = meta(name);
    let t = tmp.path().join("t.safetensors");
    let init = refs(name).join("init.png");
    ok(&[
        "generate",
        "--model",
        s(&model(name)),
        "--prompt",
        PROMPT,
        "--steps",
        "5",
        "--scheduler",
        "ddim",
        "--seed",
        &m["img2img"]["seed"].to_string(),
        "--init-image",
        s(&init),
        "--strength",
        "0.6",
        "--out",
        s(&tmp.path().join("o.png")),
        "--save-tensors",
        s(&t),
    ]);
    let got = load_refs(t);
    let want = load_refs(refs(name).join("img2img_ddim.safetensors"));
    assert_close(
        "img2img final_latents",
        &got["final_latents"],
        &want["final_latents"],
        1e-4,
    );
    assert_close("img2img image", &got["image"], &want["image"], 1e-4);
}

#[test]
fn vae_cli_matches_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    for name in PIPELINES {
        let r = load_refs(refs(name).join("vae.safetensors"));
        let z = tmp.path().join("z.safetensors");
        candle_core::safetensors::save(&HashMap::from([("z".to_string(), r["z"].clone())]), &z)
            .unwrap();
        let dec = tmp.path().join("dec.safetensors");
        let png = tmp.path().join("dec.png");
        ok(&[
            "vae",
            "decode",
            "--model",
            s(&model(name)),
            "--latents",
            s(&z),
            "--save-tensors",
            s(&dec),
            "--out",
            s(&png),
        ]);
        assert_close(
            &format!("{name} decode"),
            &load_refs(dec)["sample"],
            &r["decoded"],
            1e-5,
        );
        assert!(tmp.path().join("dec-0.png").is_file() && tmp.path().join("dec-1.png").is_file());

        let img = tmp.path().join("img.safetensors");
        candle_core::safetensors::save(
            &HashMap::from([("image".to_string(), r["image"].clone())]),
            &img,
        )
        .unwrap();
        let enc = tmp.path().join("enc.safetensors");
        ok(&[
            "vae",
            "encode",
            "--model",
            s(&model(name)),
            "--image",
            s(&img),
            "--save-tensors",
            s(&enc),
        ]);
        let got = load_refs(enc);
        assert_close(&format!("{name} mean"), &got["mean"], &r["mean"], 1e-5);
        assert_close(
            &format!("{name} logvar"),
            &got["logvar"],
            &r["logvar"],
            1e-5,
        );
    }
}

#[test]
fn vae_encode_reads_png() {
    let tmp = tempfile::tempdir().unwrap();
    let enc = tmp.path().join("enc.safetensors");
    let png = refs("tiny-sd15").join("init.png");
    ok(&[
        "vae",
        "encode",
        "--model",
        s(&model("tiny-sd15")),
        "--image",
        s(&png),
        "--save-tensors",
        s(&enc),
    ]);
    let got = load_refs(enc);
    assert_eq!(got["mean"].dims(), &[1, 4, 8, 6]);
}

// ---- bad input ----

/// A 1-step 16x16 `generate` into `out_dir/o.png`; a flag in `extra` replaces the default of
/// the same name (clap refuses repeated flags).
fn run_quick(model: &Path, out_dir: &Path, extra: &[&str], expect: &[&str]) -> String {
    let out = out_dir.join("o.png");
    let defaults = [
        ("--model", s(model)),
        ("--prompt", "x"),
        ("--steps", "1"),
        ("--width", "16"),
        ("--height", "16"),
        ("--out", s(&out)),
    ];
    let mut args = vec!["generate"];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend(extra);
    fails(&args, expect)
}

#[test]
fn missing_model_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    run_quick(&missing, tmp.path(), &[], &["nope"]);
    // A repo id that is not in the (empty) cache names where it looked.
    let out = Command::new(env!("CARGO_BIN_EXE_lowtide"))
        .args(["generate", "--model", "someone/not-cached", "--prompt", "x"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HUB_CACHE", tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("someone/not-cached") && err.contains(s(tmp.path())),
        "{err}"
    );
}

#[test]
fn missing_component_and_files() {
    let (tmp, p) = scratch_pipeline();
    std::fs::remove_dir_all(p.join("vae")).unwrap();
    run_quick(&p, tmp.path(), &[], &["vae"]);

    let (tmp, p) = scratch_pipeline();
    std::fs::remove_file(p.join("unet/config.json")).unwrap();
    run_quick(&p, tmp.path(), &[], &["unet", "config.json"]);

    let (tmp, p) = scratch_pipeline();
    std::fs::remove_file(p.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    run_quick(
        &p,
        tmp.path(),
        &[],
        &["diffusion_pytorch_model.safetensors"],
    );

    let (tmp, p) = scratch_pipeline();
    std::fs::remove_file(p.join("model_index.json")).unwrap();
    run_quick(&p, tmp.path(), &[], &["model_index.json"]);

    let (tmp, p) = scratch_pipeline();
    std::fs::remove_file(p.join("tokenizer/vocab.json")).unwrap();
    run_quick(&p, tmp.path(), &[], &["tokenizer"]);
}

#[test]
fn variant_that_is_not_there() {
    let tmp = tempfile::tempdir().unwrap();
    run_quick(
        &model("tiny-sd2"),
        tmp.path(),
        &["--variant", "fp16"],
        &["fp16"],
    );
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let (tmp, p) = scratch_pipeline();
    let f = p.join("unet/diffusion_pytorch_model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.set_len(len / 2).unwrap();
    run_quick(
        &p,
        tmp.path(),
        &[],
        &["truncated", "diffusion_pytorch_model.safetensors"],
    );

    let (tmp, p) = scratch_pipeline();
    let f = p.join("vae/diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[8..40].copy_from_slice(&[b'#'; 32]);
    std::fs::write(&f, bytes).unwrap();
    run_quick(&p, tmp.path(), &[], &["corrupt", "vae"]);

    let (tmp, p) = scratch_pipeline();
    std::fs::write(p.join("text_encoder/model.safetensors"), b"abc").unwrap();
    run_quick(&p, tmp.path(), &[], &["model.safetensors"]);
}

fn rewrite_tensor(file: &Path, name: &str, f: impl Fn(&Tensor) -> Tensor) {
    let mut map = candle_core::safetensors::load(file, &Device::Cpu).unwrap();
    let t = f(&map[name]);
    map.insert(name.to_string(), t);
    candle_core::safetensors::save(&map, file).unwrap();
}

#[test]
fn wrong_shape_or_dtype_names_the_tensor() {
    let name = "conv_in.weight";
    let (tmp, p) = scratch_pipeline();
    let f = p.join("unet/diffusion_pytorch_model.safetensors");
    rewrite_tensor(&f, name, |t| t.flatten_all().unwrap());
    run_quick(&p, tmp.path(), &[], &[name, "shape"]);

    let (tmp, p) = scratch_pipeline();
    let f = p.join("unet/diffusion_pytorch_model.safetensors");
    rewrite_tensor(&f, name, |t| t.to_dtype(DType::U8).unwrap());
    run_quick(&p, tmp.path(), &[], &[name, "dtype"]);

    let (tmp, p) = scratch_pipeline();
    let f = p.join("unet/diffusion_pytorch_model.safetensors");
    let mut map = candle_core::safetensors::load(&f, &Device::Cpu).unwrap();
    map.remove(name);
    candle_core::safetensors::save(&map, &f).unwrap();
    run_quick(&p, tmp.path(), &[], &[name, "missing"]);
}

#[test]
fn unsupported_config_value() {
    let (tmp, p) = scratch_pipeline();
    let cfg = p.join("unet/config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text.replacen("\"CrossAttnDownBlock2D\"", "\"FancyDownBlock2D\"", 1);
    std::fs::write(&cfg, text).unwrap();
    run_quick(
        &p,
        tmp.path(),
        &[],
        &["FancyDownBlock2D", "down_block_types"],
    );
}

#[test]
fn bad_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model("tiny-sd15");
    run_quick(&m, tmp.path(), &["--scheduler", "heun"], &["heun", "pndm"]);
    // 20 is not a multiple of 8 (later flags override the earlier --width 16).
    run_quick(
        &m,
        tmp.path(),
        &["--width", "20"],
        &["multiples of 8", "20x16"],
    );
    run_quick(&m, tmp.path(), &["--steps", "0"], &["--steps"]);
    let init = refs("tiny-sd15").join("init.png");
    for bad in ["0", "1.5", "-0.2"] {
        run_quick(
            &m,
            tmp.path(),
            &["--init-image", s(&init), "--strength", bad],
            &["--strength"],
        );
    }
    run_quick(&m, tmp.path(), &["--device", "cuda"], &["cuda"]);
    run_quick(&m, tmp.path(), &["--dtype", "f8"], &["f8"]);
    // Latents of the wrong shape for the requested size.
    let lat = refs("tiny-sd15").join("latents.safetensors");
    run_quick(
        &m,
        tmp.path(),
        &["--latents", s(&lat)],
        &["--latents", "shape"],
    );
}

#[test]
fn unreadable_png() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nthis is not a png").unwrap();
    run_quick(
        &model("tiny-sd15"),
        tmp.path(),
        &["--init-image", s(&bad), "--strength", "0.5"],
        &["bad.png"],
    );
    let missing = tmp.path().join("missing.png");
    run_quick(
        &model("tiny-sd15"),
        tmp.path(),
        &["--init-image", s(&missing), "--strength", "0.5"],
        &["missing.png"],
    );
    let enc = tmp.path().join("e.safetensors");
    fails(
        &[
            "vae",
            "encode",
            "--model",
            s(&model("tiny-sd15")),
            "--image",
            s(&bad),
            "--save-tensors",
            s(&enc),
        ],
        &["bad.png"],
    );
}

#[test]
fn latents_file_must_hold_one_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let two = tmp.path().join("two.safetensors");
    let t = Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &HashMap::from([("a".to_string(), t.clone()), ("b".to_string(), t)]),
        &two,
    )
    .unwrap();
    let dec = tmp.path().join("d.safetensors");
    fails(
        &[
            "vae",
            "decode",
            "--model",
            s(&model("tiny-sd15")),
            "--latents",
            s(&two),
            "--save-tensors",
            s(&dec),
        ],
        &["exactly one tensor"],
    );
}

/// Lays `src` out as the hub cache does: content in `blobs/`, a snapshot of symlinks, `refs/main`.
fn fill_hub_cache(cache: &Path, repo: &str, src: &Path) {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo_dir.join("snapshots").join(commit);
    let blobs = repo_dir.join("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
    fn walk(dir: &Path, rel: &Path, snap: &Path, blobs: &Path, n: &mut usize) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let rel = rel.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                walk(&e.path(), &rel, snap, blobs, n);
            } else {
                *n += 1;
                let blob = blobs.join(format!("blob{n:04}"));
                std::fs::copy(e.path(), &blob).unwrap();
                let link = snap.join(&rel);
                std::fs::create_dir_all(link.parent().unwrap()).unwrap();
                let depth = rel.components().count();
                let up: PathBuf = std::iter::repeat_n("..", depth + 1).collect();
                std::os::unix::fs::symlink(up.join("blobs").join(blob.file_name().unwrap()), &link)
                    .unwrap();
            }
        }
    }
    walk(src, Path::new(""), &snap, &blobs, &mut 0);
}

#[test]
fn repo_id_resolves_offline_from_hub_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = "lowtide-tests/tiny-sd15";
    let expected = load_refs(refs("tiny-sd15").join("pipeline_ddim.safetensors"));
    let lat = refs("tiny-sd15").join("latents.safetensors");
    for var in ["HF_HUB_CACHE", "HF_HOME"] {
        let root = tmp.path().join(var);
        let cache = if var == "HF_HOME" {
            root.join("hub")
        } else {
            root.clone()
        };
        fill_hub_cache(&cache, repo, &model("tiny-sd15"));
        let t = tmp.path().join(format!("{var}.safetensors"));
        let out = Command::new(env!("CARGO_BIN_EXE_lowtide"))
            .args([
                "generate",
                "--model",
                repo,
                "--prompt",
                PROMPT,
                "--negative-prompt",
                NEGATIVE,
                "--steps",
                "4",
                "--scheduler",
                "ddim",
                "--width",
                "48",
                "--height",
                "64",
                "--latents",
                s(&lat),
                "--out",
                s(&tmp.path().join("o.png")),
                "--save-tensors",
                s(&t),
            ])
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_HOME")
            .env(var, &root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{var}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_close(
            var,
            &load_refs(t)["final_latents"],
            &expected["final_latents"],
            1e-4,
        );
    }
}

fn offload_run(tmp: &Path, tag: &str, extra: &[&str]) -> (Vec<u8>, serde_json::Value) {
    let t = tmp.join(format!("{tag}.safetensors"));
    let r = tmp.join(format!("{tag}.json"));
    let mut args = vec![
        "generate",
        "--model",
        s(&model("tiny-sd2")).to_string().leak(),
        "--prompt",
        PROMPT,
        "--steps",
        "3",
        "--scheduler",
        "euler-a",
        "--seed",
        "9",
        "--width",
        "32",
        "--height",
        "24",
        "--out",
        s(&tmp.join(format!("{tag}.png"))).to_string().leak(),
        "--save-tensors",
        s(&t).to_string().leak(),
        "--report",
        s(&r).to_string().leak(),
    ];
    args.extend_from_slice(extra);
    ok(&args);
    let report = serde_json::from_str(&std::fs::read_to_string(&r).unwrap()).unwrap();
    (std::fs::read(&t).unwrap(), report)
}

#[test]
fn offload_through_cli_is_bit_identical_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, rep) = offload_run(tmp.path(), "none", &["--offload", "none"]);
    let none_peak = rep["peak_resident_bytes"].as_u64().unwrap();
    assert!(none_peak > 0);
    let cases: [(&str, &[&str]); 6] = [
        ("model", &["--offload", "model"]),
        ("sequential", &["--offload", "sequential"]),
        ("group", &["--offload", "group"]),
        ("group3", &["--offload", "group", "--blocks-per-group", "3"]),
        ("group-noprefetch", &["--offload", "group", "--no-prefetch"]),
        (
            "model-keep",
            &["--offload", "model", "--keep-on-device", "vae"],
        ),
    ];
    for (tag, extra) in cases {
        let (out, rep) = offload_run(tmp.path(), tag, extra);
        assert!(out == base, "{tag}: tensors differ from --offload none");
        let peak = rep["peak_resident_bytes"].as_u64().unwrap();
        assert!(
            peak > 0 && peak < none_peak,
            "{tag}: peak {peak} vs none {none_peak}"
        );
        for key in [
            "bytes_transferred",
            "transfer_seconds",
            "compute_seconds",
            "wall_seconds",
        ] {
            assert!(rep[key].is_number(), "{tag}: report lacks {key}: {rep}");
        }
        assert!(rep["components"]["unet"]["peak_resident_bytes"].is_number());
        assert_eq!(rep["device"], "Cpu");
    }
    let (out, rep) = offload_run(
        tmp.path(),
        "map",
        &["--device-map", "text_encoder=cpu,unet=cpu,vae=cpu"],
    );
    assert!(out == base, "device map: tensors differ");
    assert_eq!(rep["device_map"]["unet"], "cpu");
    let (out, _) = offload_run(
        tmp.path(),
        "balanced",
        &["--device-map", "balanced", "--max-memory", "cpu=4GiB"],
    );
    assert!(out == base, "balanced device map: tensors differ");
}

#[test]
fn bad_offload_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model("tiny-sd15");
    run_quick(
        &m,
        tmp.path(),
        &["--offload", "everything"],
        &["everything", "sequential"],
    );
    run_quick(
        &m,
        tmp.path(),
        &["--offload", "model", "--keep-on-device", "refiner"],
        &["refiner", "unet"],
    );
    run_quick(
        &m,
        tmp.path(),
        &["--offload", "group", "--blocks-per-group", "0"],
        &["--blocks-per-group"],
    );
    run_quick(
        &m,
        tmp.path(),
        &["--device-map", "balanced", "--max-memory", "cuda:0:6GiB"],
        &["cuda:0:6GiB"],
    );
    run_quick(
        &m,
        tmp.path(),
        &["--device-map", "balanced", "--max-memory", "cpu=lots"],
        &["lots"],
    );
    run_quick(
        &m,
        tmp.path(),
        &["--device-map", "balanced"],
        &["--max-memory"],
    );
    run_quick(
        &m,
        tmp.path(),
        &["--device-map", "balanced", "--max-memory", "cpu=1MiB"],
        &["cannot fit"],
    );
    run_quick(
        &m,
        tmp.path(),
        &["--device-map", "unet=cpu", "--offload", "model"],
        &["exclude", "reset"],
    );
    run_quick(
        &m,
        tmp.path(),
        &["--device-map", "unet=cuda:1"],
        &["cuda:1", "available: cpu"],
    );
}

#[test]
fn vae_tiling_flags_through_cli_match_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    for name in PIPELINES {
        let r = load_refs(refs(name).join("vae_tiling.safetensors"));
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(refs(name).join("vae_tiling.json")).unwrap(),
        )
        .unwrap();
        let z = tmp.path().join("z.safetensors");
        candle_core::safetensors::save(&HashMap::from([("z".to_string(), r["z"].clone())]), &z)
            .unwrap();
        let img = tmp.path().join("img.safetensors");
        candle_core::safetensors::save(
            &HashMap::from([("image".to_string(), r["image"].clone())]),
            &img,
        )
        .unwrap();
        let custom = cfg["custom_tile"].to_string();
        let custom_ov = cfg["custom_overlap"].to_string();
        let cases: [(&str, Vec<&str>); 4] = [
            ("default", vec!["--tiling"]),
            (
                "custom",
                vec![
                    "--tiling",
                    "--tile-size",
                    &custom,
                    "--tile-overlap",
                    &custom_ov,
                ],
            ),
            ("sliced_tiled", vec!["--tiling", "--slicing"]),
            ("sliced", vec!["--slicing"]),
        ];
        for (tag, flags) in cases {
            let dec = tmp.path().join(format!("dec-{tag}.safetensors"));
            let mut args = vec![
                "vae",
                "decode",
                "--model",
                s(&model(name)).to_string().leak(),
                "--latents",
                s(&z),
                "--save-tensors",
                s(&dec),
            ];
            args.extend(flags.iter().copied());
            ok(&args);
            assert_close(
                &format!("{name} cli decode {tag}"),
                &load_refs(dec)["sample"],
                &r[&format!("decode_{tag}")],
                1e-5,
            );
            let enc = tmp.path().join(format!("enc-{tag}.safetensors"));
            let mut args = vec![
                "vae",
                "encode",
                "--model",
                s(&model(name)).to_string().leak(),
                "--image",
                s(&img),
                "--save-tensors",
                s(&enc),
            ];
            args.extend(flags.iter().copied());
            ok(&args);
            let got = load_refs(enc);
            assert_close(
                &format!("{name} cli encode {tag}"),
                &got["mean"],
                &r[&format!("encode_{tag}_mean")],
                1e-5,
            );
        }
    }
}

#[test]
fn memory_budget_turns_tiling_on_only_when_needed() {
    let tmp = tempfile::tempdir().unwrap();
    let name = "tiny-sd15";
    let r = load_refs(refs(name).join("vae_tiling.safetensors"));
    let z = tmp.path().join("z.safetensors");
    candle_core::safetensors::save(&HashMap::from([("z".to_string(), r["z"].clone())]), &z)
        .unwrap();
    let m = s(&model(name)).to_string();
    let run = |tag: &str, extra: &[&str]| -> (Tensor, String) {
        let dec = tmp.path().join(format!("{tag}.safetensors"));
        let mut args = vec![
            "vae",
            "decode",
            "--model",
            m.as_str(),
            "--latents",
            s(&z),
            "--save-tensors",
            s(&dec),
        ];
        args.extend_from_slice(extra);
        let out = ok(&args);
        (
            load_refs(dec)["sample"].clone(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (untiled, _) = run("plain", &[]);
    // A generous budget changes nothing.
    let (big, err) = run("big", &["--memory-budget", "8GiB"]);
    assert_eq!(rel_err(&big, &untiled), 0.0);
    assert!(!err.contains("tiling turned on"), "{err}");
    // A budget between a one-tile decode and the untiled decode tiles, and says so.
    let (vae, _) =
        lowtide::pipelines::load_vae(&model(name), &lowtide::pipelines::LoadOptions::default())
            .unwrap();
    let (b, _, h, w) = r["z"].dims4().unwrap();
    let (lo, hi) = (
        vae.decode_peak_estimate(b, 8, 8),
        vae.decode_peak_estimate(b, h, w),
    );
    assert!(lo < hi);
    let budget = ((lo + hi) / 2).to_string();
    let (small, err) = run("small", &["--memory-budget", &budget]);
    assert!(err.contains("tiling turned on"), "{err}");
    assert!(rel_err(&small, &untiled) > 1e-4);
    fails(
        &[
            "vae",
            "decode",
            "--model",
            &m,
            "--latents",
            s(&z),
            "--save-tensors",
            s(&tmp.path().join("x.safetensors")),
            "--memory-budget",
            "1000",
        ],
        &["too small", "budget"],
    );
}

#[test]
fn bad_vae_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model("tiny-sd15");
    run_quick(
        &m,
        tmp.path(),
        &["--tiling", "--tile-size", "12"],
        &["--tile-size", "multiple of"],
    );
    run_quick(&m, tmp.path(), &["--tile-size", "4"], &["--tile-size"]);
    run_quick(
        &m,
        tmp.path(),
        &["--tile-overlap", "1.0"],
        &["--tile-overlap"],
    );
    run_quick(
        &m,
        tmp.path(),
        &["--tile-overlap", "-0.5"],
        &["--tile-overlap"],
    );
    run_quick(
        &m,
        tmp.path(),
        &["--memory-budget", "lots"],
        &["--memory-budget"],
    );
    // Latents whose channel count does not match the VAE; an image tensor of the wrong shape.
    let z = tmp.path().join("z3.safetensors");
    let t = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("z".to_string(), t.clone())]), &z).unwrap();
    fails(
        &[
            "vae",
            "decode",
            "--model",
            s(&m),
            "--latents",
            s(&z),
            "--save-tensors",
            s(&tmp.path().join("o.safetensors")),
        ],
        &["channels"],
    );
    let img = tmp.path().join("img.safetensors");
    let t = Tensor::zeros((1, 3, 20, 20), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&HashMap::from([("i".to_string(), t)]), &img).unwrap();
    fails(
        &[
            "vae",
            "encode",
            "--model",
            s(&m),
            "--image",
            s(&img),
            "--save-tensors",
            s(&tmp.path().join("o.safetensors")),
        ],
        &["multiples of 8"],
    );
}
