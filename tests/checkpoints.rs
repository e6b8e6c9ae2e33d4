//! The files users have (issue 22): GGUF weights held in their blocks under every strategy,
//! `lowtide quantize`, single files in diffusers, original (BFL, Wan, LDM) and ComfyUI layouts,
//! fp8_scaled, whole-pipeline Stable Diffusion checkpoints, and the errors for files that do
//! not fit.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use lowtide::weights::ggml::{self, GgmlDType};
use lowtide::weights::{Encoding, WeightStore};
use serde_json::Value;

const FLUX_ARGS: &[&str] = &[
    "--prompt",
    PROMPT,
    "--steps",
    "2",
    "--width",
    "32",
    "--height",
    "32",
    "--max-sequence-length",
    "8",
];
const WAN_ARGS: &[&str] = &[
    "--prompt",
    PROMPT,
    "--steps",
    "2",
    "--frames",
    "5",
    "--width",
    "32",
    "--height",
    "32",
    "--max-sequence-length",
    "8",
];

fn ckpt(name: &str) -> PathBuf {
    fixtures().join("checkpoints").join(name)
}

/// `lowtide quantize` of a fixture component into `dir`.
fn quantize(dir: &Path, pipeline: &str, component: &str, t: &str) -> PathBuf {
    let out = dir.join(format!("{pipeline}-{component}-{t}.gguf"));
    ok(&[
        "quantize",
        "--model",
        s(&model(pipeline)),
        "--component",
        component,
        "--type",
        t,
        "-o",
        s(&out),
    ]);
    out
}

/// `generate` on `pipeline` with `extra` arguments; returns the saved tensors' bytes and the
/// report.
fn run(dir: &Path, tag: &str, pipeline: &str, base: &[&str], extra: &[&str]) -> (Vec<u8>, Value) {
    let t = dir.join(format!("{tag}.safetensors"));
    let r = dir.join(format!("{tag}.json"));
    let video = pipeline.contains("wan");
    let out = dir.join(if video {
        format!("{tag}.mp4")
    } else {
        format!("{tag}.png")
    });
    let m = model(pipeline);
    let mut args = vec!["generate", "--model", s(&m)];
    args.extend_from_slice(base);
    args.extend_from_slice(&["--out", s(&out), "--save-tensors", s(&t), "--report", s(&r)]);
    args.extend_from_slice(extra);
    ok(&args);
    let report = serde_json::from_str(&std::fs::read_to_string(&r).unwrap()).unwrap();
    (std::fs::read(&t).unwrap(), report)
}

/// Bytes of every tensor of a transformer file as held in an f32 run: ggml blocks and scaled
/// fp8 as stored, plain F32/F16/BF16 tensors in f32 (as from any file without
/// `--storage-dtype`).
fn held_bytes(path: &Path, class: &str) -> u64 {
    let mut st = WeightStore::open_file(path).unwrap();
    lowtide::weights::layouts::prepare(&mut st, class, &serde_json::json!({})).unwrap();
    st.names()
        .map(|n| {
            let t = st.get(n).unwrap();
            match t.encoding {
                Encoding::Ggml(_) => t.nbytes(),
                Encoding::ScaledFp8 { .. } => t.shape.iter().product::<usize>() as u64,
                Encoding::Plain => 4 * t.shape.iter().product::<usize>() as u64,
            }
        })
        .sum()
}

/// An f32 GGUF written by `lowtide quantize` holds the folder's weights unchanged: generating
/// from it is bit-identical to generating from the folder, for FLUX and Wan.
#[test]
fn f32_gguf_round_trip_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    for (pipeline, base) in [("tiny-flux-dev", FLUX_ARGS), ("tiny-wan21", WAN_ARGS)] {
        let g = quantize(tmp.path(), pipeline, "transformer", "f32");
        let w = format!("transformer={}", s(&g));
        let (folder, _) = run(
            tmp.path(),
            &format!("{pipeline}-folder"),
            pipeline,
            base,
            &[],
        );
        let (file, _) = run(
            tmp.path(),
            &format!("{pipeline}-gguf"),
            pipeline,
            base,
            &["--weights", &w],
        );
        assert!(
            folder == file,
            "{pipeline}: f32 GGUF output differs from the folder's"
        );
    }
}

/// A quantized transformer stays in its blocks under every strategy: each strategy's output is
/// bit-identical to `none` with the same file, the resident bytes are the file's blocks (not a
/// widened copy), and the result differs from the f32 one (the weights really are quantized).
#[test]
fn quantized_weights_under_every_strategy_equal_none() {
    let tmp = tempfile::tempdir().unwrap();
    for (pipeline, base, t) in [
        ("tiny-flux-dev", FLUX_ARGS, "q8_0"),
        ("tiny-flux-dev", FLUX_ARGS, "q4_0"),
        ("tiny-wan21", WAN_ARGS, "q5_1"),
        ("tiny-flux-dev", FLUX_ARGS, "fp8-scaled"),
    ] {
        let g = match t {
            "fp8-scaled" => ckpt("flux-dev-fp8-scaled.safetensors"),
            _ => quantize(tmp.path(), pipeline, "transformer", t),
        };
        let w = format!("transformer={}", s(&g));
        let (f32_out, _) = run(tmp.path(), &format!("{pipeline}-f32"), pipeline, base, &[]);
        let (none, rep) = run(
            tmp.path(),
            &format!("{pipeline}-{t}-none"),
            pipeline,
            base,
            &["--weights", &w],
        );
        assert!(
            none != f32_out,
            "{pipeline} {t}: quantized output equals f32"
        );
        let peak = rep["components"]["transformer"]["peak_resident_bytes"]
            .as_u64()
            .unwrap();
        assert_eq!(
            peak,
            held_bytes(
                &g,
                if pipeline.contains("wan") {
                    "WanTransformer3DModel"
                } else {
                    "FluxTransformer2DModel"
                }
            ),
            "{pipeline} {t}: resident transformer bytes are not the file's blocks"
        );
        for strategy in ["model", "group", "sequential"] {
            let (out, rep) = run(
                tmp.path(),
                &format!("{pipeline}-{t}-{strategy}"),
                pipeline,
                base,
                &["--weights", &w, "--offload", strategy],
            );
            assert!(
                out == none,
                "{pipeline} {t} --offload {strategy} differs from none"
            );
            let p = rep["components"]["transformer"]["peak_resident_bytes"]
                .as_u64()
                .unwrap();
            assert!(
                p <= peak,
                "{pipeline} {t} {strategy}: peak {p} > none's {peak}"
            );
        }
    }
}

/// `lowtide quantize` follows the converters' rules: 1-D tensors and norms F32, rows that are not
/// whole blocks F16, the rest in the type asked for; names and shapes are kept.
#[test]
fn quantize_keeps_what_ggml_cannot_block() {
    let tmp = tempfile::tempdir().unwrap();
    let g = quantize(tmp.path(), "tiny-wan21", "transformer", "q8_0");
    let st = WeightStore::open_file(&g).unwrap();
    assert_eq!(st.architecture.as_deref(), Some("wan"));
    let folder = WeightStore::open_component(
        &model("tiny-wan21").join("transformer"),
        "diffusion_pytorch_model",
        None,
    )
    .unwrap();
    assert_eq!(st.names().count(), folder.names().count());
    let mut seen = std::collections::BTreeSet::new();
    for n in folder.names() {
        let a = folder.get(n).unwrap();
        let b = st
            .get(n)
            .unwrap_or_else(|| panic!("{n} missing from the GGUF"));
        assert_eq!(a.shape, b.shape, "{n}");
        let want = lowtide::weights::quantize::type_for(&a.shape, GgmlDType::Q8_0);
        let got = match b.encoding {
            Encoding::Ggml(t) => t,
            Encoding::Plain => match b.dtype {
                candle_core::DType::F32 => GgmlDType::F32,
                candle_core::DType::F16 => GgmlDType::F16,
                d => panic!("{n}: {d:?}"),
            },
            e => panic!("{n}: {e:?}"),
        };
        assert_eq!(got, want, "{n}");
        seen.insert(ggml::name(got));
    }
    // ffn.2 has 48 in-features: not whole Q8_0 blocks. The 5-D patch embedding comes back
    // in its shape through `comfy.gguf.orig_shape`.
    assert_eq!(
        st.get("blocks.0.ffn.net.2.weight").unwrap().dtype,
        candle_core::DType::F16
    );
    assert_eq!(st.get("patch_embedding.weight").unwrap().shape.len(), 5);
    assert!(seen.contains("q8_0") && seen.contains("f32") && seen.contains("f16"));
}

#[test]
fn files_that_do_not_fit_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let wan = quantize(tmp.path(), "tiny-wan21", "transformer", "q8_0");
    let dev = quantize(tmp.path(), "tiny-flux-dev", "transformer", "q8_0");
    let schnell = quantize(tmp.path(), "tiny-flux-schnell", "transformer", "q8_0");
    let flux = model("tiny-flux-dev");
    let with = |w: &Path| format!("transformer={}", s(w));
    let gen = |m: &Path, w: &str| -> Vec<String> {
        let mut v: Vec<String> = vec!["generate".into(), "--model".into(), s(m).into()];
        v.extend(FLUX_ARGS.iter().map(|a| a.to_string()));
        v.extend(["--weights".into(), w.into(), "--out".into()]);
        v.push(s(&tmp.path().join("x.png")).into());
        v
    };
    let call = |v: Vec<String>, expect: &[&str]| {
        let a: Vec<&str> = v.iter().map(String::as_str).collect();
        fails(&a, expect)
    };
    // A file for another family.
    call(
        gen(&flux, &with(&wan)),
        &[
            "looks like a diffusers Wan transformer",
            "FluxTransformer2DModel",
            s(&wan),
        ],
    );
    // FLUX.1 schnell's file (no guidance embedder) for a dev pipeline, and the other way round.
    call(
        gen(&flux, &with(&schnell)),
        &["time_text_embed.guidance_embedder", "missing"],
    );
    call(
        gen(&model("tiny-flux-schnell"), &with(&dev)),
        &[
            "does not fit this pipeline",
            "guidance_embedder",
            "config.json",
        ],
    );
    // Another size of the same family: the 256-wide FLUX for the 32-wide pipeline.
    call(
        gen(&flux, &with(&ckpt("flux-k-q.gguf"))),
        &[
            "does not fit this pipeline",
            "has shape",
            "another size or version",
        ],
    );
    // Truncated.
    let bytes = std::fs::read(&dev).unwrap();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    call(gen(&flux, &with(&cut)), &["GGUF", "truncated", s(&cut)]);
    // Not a weight file at all.
    let junk = tmp.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a checkpoint").unwrap();
    call(gen(&flux, &with(&junk)), &[s(&junk)]);
    // Bad flags.
    call(gen(&flux, "transformer"), &["COMPONENT=FILE"]);
    call(
        gen(&flux, &format!("unet={}", s(&dev))),
        &["unet", "transformer"],
    );
    call(
        gen(
            &flux,
            &format!("transformer={}", s(&tmp.path().join("nope.gguf"))),
        ),
        &["not a file"],
    );
    fails(
        &[
            "quantize",
            "--model",
            s(&flux),
            "--type",
            "q3_q",
            "-o",
            s(&tmp.path().join("o.gguf")),
        ],
        &["unknown ggml type", "q4_k"],
    );
    assert!(!tmp.path().join("o.gguf").exists());
}

// ---- against diffusers and ggml (references from tools/fixtures/make_checkpoint_fixtures.py) ----

use candle_core::{DType, Device, Tensor};
use lowtide::models::{
    FluxTransformer2DModel, FluxTransformerConfig, WanInputs, WanTransformer3DModel,
    WanTransformerConfig,
};
use lowtide::pipelines::Component;

/// Opens `component` of `root` with its weights from `file` (as `--weights` does).
fn open_file_component(root: &Path, component: &str, file: &Path, class: &str) -> Component {
    Component::open(
        root,
        component,
        "diffusion_pytorch_model",
        None,
        Some((file, class)),
        &Device::Cpu,
        DType::F32,
        std::sync::Arc::default(),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

fn flux_from(root: &Path, component: &str, file: &Path) -> (Component, FluxTransformer2DModel) {
    let c = open_file_component(root, component, file, "FluxTransformer2DModel");
    let (m, _) = c
        .build(|pp, cfg: &FluxTransformerConfig| FluxTransformer2DModel::new(pp, cfg))
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    (c, m)
}

fn flux_out(m: &FluxTransformer2DModel, r: &std::collections::HashMap<String, Tensor>) -> Tensor {
    m.forward(&flux_inputs(r)).unwrap()
}

/// Every ggml type dequantizes random blocks exactly as ggml does (gguf-py's reference
/// implementation of `dequantize_row_*`), bit for bit; and quantizes as ggml's reference
/// quantizer where gguf-py has one.
#[test]
fn ggml_types_equal_the_reference_bit_for_bit() {
    let r = load_refs_raw(refs("checkpoints").join("ggml_blocks.safetensors"));
    let meta: Value = serde_json::from_str(
        &std::fs::read_to_string(refs("checkpoints").join("ggml_blocks.json")).unwrap(),
    )
    .unwrap();
    let types = meta["types"].as_object().unwrap();
    assert_eq!(types.len(), 10, "every quantized type the issue names");
    for name in types.keys() {
        let t = ggml::parse(name).unwrap();
        let raw: Vec<u8> = r[&format!("{name}.raw")].to_vec1::<u8>().unwrap();
        let want = bits(&r[&format!("{name}.f32")]);
        let mut got = vec![0f32; want.len()];
        ggml::dequantize(t, &raw, &mut got).unwrap();
        let got: Vec<u32> = got.into_iter().map(f32::to_bits).collect();
        let bad = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(
            bad,
            0,
            "{name}: {bad} of {} values differ from ggml",
            want.len()
        );
        if let Some(src) = r.get(&format!("{name}.src")) {
            let src = src.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let q = ggml::quantize(t, &src).unwrap();
            let want: Vec<u8> = r[&format!("{name}.quant")].to_vec1::<u8>().unwrap();
            assert!(
                q == want,
                "{name}: quantized blocks differ from ggml's reference"
            );
        }
    }
}

/// Reference tensors in their stored dtype (u8 blocks stay bytes).
fn load_refs_raw(path: PathBuf) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| {
            let v = if v.dtype() == DType::U8 {
                v.flatten_all().unwrap()
            } else {
                v
            };
            (k, v)
        })
        .collect()
}

/// FLUX.1 single files in every layout against diffusers loading the same file: BFL keys in f32
/// (bit-identical weights to the folder), ComfyUI's prefix in bf16, ComfyUI fp8_scaled, a GGUF
/// of legacy types and a GGUF of K types.
#[test]
fn flux_single_files_match_diffusers() {
    let root = model("tiny-flux-dev");
    let inputs = load_refs(refs("tiny-flux-dev").join("transformer.safetensors"));
    for (file, tol) in [
        ("flux-dev-bfl.safetensors", 1e-4),
        ("flux-dev-comfy.safetensors", 1e-4),
        ("flux-dev-fp8-scaled.safetensors", 1e-4),
        ("flux-dev-q.gguf", 1e-3),
    ] {
        let (_, m) = flux_from(&root, "transformer", &ckpt(file));
        let r = load_refs(refs("checkpoints").join(file.replace(".gguf", ".safetensors")));
        for k in ["hidden_states", "timestep"] {
            assert_eq!(bits(&r[k]), bits(&inputs[k]), "{file}: inputs differ");
        }
        let e = rel_err(&flux_out(&m, &r), &r["output"]);
        eprintln!("{file}: relative error {e:.3e}");
        assert!(e <= tol, "{file}: relative error {e:.3e} > {tol:.0e}");
    }
    // K types, on a transformer wide enough for 256-value blocks.
    let (_, m) = flux_from(&ckpt(""), "flux-k", &ckpt("flux-k-q.gguf"));
    let r = load_refs(refs("checkpoints").join("flux-k-q.safetensors"));
    let e = rel_err(&flux_out(&m, &r), &r["output"]);
    eprintln!("flux-k-q.gguf: relative error {e:.3e}");
    assert!(e <= 1e-3, "flux-k-q.gguf: relative error {e:.3e}");
}

/// The BFL file holds the folder's f32 weights: converted, the transformer's output is
/// bit-identical to the folder's (the split q/k/v rows and swapped halves are exact).
#[test]
fn bfl_layout_converts_exactly() {
    let root = model("tiny-flux-dev");
    let inputs = load_refs(refs("tiny-flux-dev").join("transformer.safetensors"));
    let (_, a) = flux_from(&root, "transformer", &ckpt("flux-dev-bfl.safetensors"));
    let (_, b) = build_component(
        "tiny-flux-dev",
        "transformer",
        |pp, cfg: &FluxTransformerConfig| FluxTransformer2DModel::new(pp, cfg),
    );
    assert_eq!(bits(&flux_out(&a, &inputs)), bits(&flux_out(&b, &inputs)));
}

/// GGUF weights dequantized by lowtide against what diffusers holds after dequantizing: diffusers
/// computes in f16, ggml in f32, so they agree to an f16 rounding (and F32 tensors exactly).
#[test]
fn gguf_weights_match_diffusers_dequantized() {
    for (root, component, file, class) in [
        (
            model("tiny-flux-dev"),
            "transformer",
            "flux-dev-q.gguf",
            "FluxTransformer2DModel",
        ),
        (
            ckpt(""),
            "flux-k",
            "flux-k-q.gguf",
            "FluxTransformer2DModel",
        ),
        (
            model("tiny-wan21"),
            "transformer",
            "wan21-q.gguf",
            "WanTransformer3DModel",
        ),
    ] {
        let c = open_file_component(&root, component, &ckpt(file), class);
        let store = c.weights.store();
        let want =
            load_refs(refs("checkpoints").join(file.replace(".gguf", ".weights.safetensors")));
        assert!(!want.is_empty());
        for (name, w) in &want {
            let shape = w.dims().to_vec();
            let got = store.load(name, &shape, DType::F32, &Device::Cpu).unwrap();
            let quantized = store.get(name).unwrap().is_packed();
            let d = (&got - w)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            let d = d.to_scalar::<f32>().unwrap();
            let m = w
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            if quantized {
                assert!(
                    d <= m * 2e-3 + 1e-6,
                    "{file} {name}: max diff {d} (max |w| {m})"
                );
            } else {
                assert_eq!(d, 0.0, "{file} {name}: plain tensor differs");
            }
        }
    }
}

fn wan_from(file: &Path) -> WanTransformer3DModel {
    let c = open_file_component(
        &model("tiny-wan21"),
        "transformer",
        file,
        "WanTransformer3DModel",
    );
    c.build(|pp, cfg: &WanTransformerConfig| WanTransformer3DModel::new(pp, cfg))
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .0
}

/// Wan 2.1 in the original layout (ComfyUI repack) and as a GGUF with the 5-D patch embedding,
/// against diffusers loading the same files.
#[test]
fn wan_single_files_match_diffusers() {
    for (file, tol) in [("wan21-comfy.safetensors", 1e-4), ("wan21-q.gguf", 1e-3)] {
        let m = wan_from(&ckpt(file));
        let r = load_refs(refs("checkpoints").join(file.replace(".gguf", ".safetensors")));
        let out = m
            .forward(&WanInputs {
                hidden_states: &r["hidden_states"],
                timestep: &r["timestep"],
                encoder_hidden_states: &r["encoder_hidden_states"],
            })
            .unwrap();
        let e = rel_err(&out, &r["output"]);
        eprintln!("{file}: relative error {e:.3e}");
        assert!(e <= tol, "{file}: relative error {e:.3e} > {tol:.0e}");
    }
}

/// Original Stable Diffusion checkpoints (UNet, VAE and CLIP or OpenCLIP in LDM keys in one
/// file; SD 1.x and 2.x) with `--config` run bit-identical to the diffusers folder it was made from; so does the folder
/// with an original standalone VAE file.
#[test]
fn original_sd_checkpoint_equals_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let base = [
        "--prompt", PROMPT, "--steps", "2", "--width", "32", "--height", "32",
    ];
    // SD 2.x: its text encoder in OpenCLIP's layout, with the extra resblock real files carry.
    let (sd2, _) = run(tmp.path(), "folder2", "tiny-sd2", &base, &[]);
    let whole2 = ckpt("sd2-original.safetensors");
    let t2 = tmp.path().join("whole2.safetensors");
    let cfg2 = model("tiny-sd2");
    let png2 = tmp.path().join("whole2.png");
    let mut args = vec!["generate", "--model", s(&whole2), "--config", s(&cfg2)];
    args.extend_from_slice(&base);
    args.extend_from_slice(&["--out", s(&png2), "--save-tensors", s(&t2)]);
    ok(&args);
    assert!(
        std::fs::read(&t2).unwrap() == sd2,
        "whole-file SD 2.x differs from the folder"
    );
    let (folder, _) = run(tmp.path(), "folder", "tiny-sd15", &base, &[]);
    let whole = ckpt("sd15-original.safetensors");
    let t = tmp.path().join("whole.safetensors");
    let mut args = vec!["generate", "--model", s(&whole)];
    let cfg = model("tiny-sd15");
    args.extend_from_slice(&["--config", s(&cfg)]);
    args.extend_from_slice(&base);
    let png = tmp.path().join("whole.png");
    args.extend_from_slice(&["--out", s(&png), "--save-tensors", s(&t)]);
    ok(&args);
    assert!(
        std::fs::read(&t).unwrap() == folder,
        "whole-file SD differs from the folder"
    );
    let vae = format!("vae={}", s(&ckpt("sd15-original-vae.safetensors")));
    let (with_vae, _) = run(tmp.path(), "vae", "tiny-sd15", &base, &["--weights", &vae]);
    assert!(
        with_vae == folder,
        "original VAE file differs from the folder"
    );
    // A single file needs the pipeline it belongs to.
    fails(
        &[
            "generate",
            "--model",
            s(&whole),
            "--prompt",
            "x",
            "--out",
            s(&png),
        ],
        &["--config"],
    );
    // A UNet file given for the VAE.
    let unet = format!("vae={}", s(&whole));
    let err = lowtide(&[
        "generate",
        "--model",
        s(&cfg),
        "--prompt",
        "x",
        "--weights",
        &unet,
        "--out",
        s(&png),
    ]);
    assert!(
        err.status.success(),
        "a whole checkpoint for --weights vae keeps only the VAE's keys"
    );
}

/// The same weights under BFL keys, with ComfyUI's prefix, and in diffusers' keys (the folder)
/// give bit-identical transformer outputs.
#[test]
fn key_layouts_of_the_same_weights_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let bfl =
        candle_core::safetensors::load(ckpt("flux-dev-bfl.safetensors"), &Device::Cpu).unwrap();
    let prefixed: std::collections::HashMap<String, Tensor> = bfl
        .into_iter()
        .map(|(k, v)| (format!("model.diffusion_model.{k}"), v))
        .collect();
    let comfy = tmp.path().join("comfy-f32.safetensors");
    candle_core::safetensors::save(&prefixed, &comfy).unwrap();
    let root = model("tiny-flux-dev");
    let inputs = load_refs(refs("tiny-flux-dev").join("transformer.safetensors"));
    let (_, folder) = build_component(
        "tiny-flux-dev",
        "transformer",
        |pp, cfg: &FluxTransformerConfig| FluxTransformer2DModel::new(pp, cfg),
    );
    let want = bits(&flux_out(&folder, &inputs));
    for f in [ckpt("flux-dev-bfl.safetensors"), comfy] {
        let (_, m) = flux_from(&root, "transformer", &f);
        assert_eq!(bits(&flux_out(&m, &inputs)), want, "{}", f.display());
    }
}

/// `lowtide quantize`'s files reload and dequantize within each type's error bound, for every
/// type it writes: the 256-wide FLUX's shapes (rows of whole K blocks) filled with uniform values
/// in [-1, 1), quantized, reopened and dequantized; the bounds are about 1.5x each type's
/// worst error on such data.
#[test]
fn quantized_files_reload_within_each_types_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let shapes = WeightStore::open_file(&ckpt("flux-k-q.gguf")).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut uniform = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % 20000) as f32 / 10000.0 - 1.0
    };
    let tensors: std::collections::HashMap<String, Tensor> = shapes
        .names()
        .map(|n| {
            let shape = shapes.get(n).unwrap().shape.clone();
            let v: Vec<f32> = (0..shape.iter().product::<usize>())
                .map(|_| uniform())
                .collect();
            (n.clone(), Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
        })
        .collect();
    let f32_file = tmp.path().join("src.safetensors");
    candle_core::safetensors::save(&tensors, &f32_file).unwrap();
    let src = WeightStore::open_file(&f32_file).unwrap();
    for (t, bound) in [
        (GgmlDType::Q8_0, 0.007),
        (GgmlDType::Q6K, 0.05),
        (GgmlDType::Q5K, 0.075),
        (GgmlDType::Q5_0, 0.095),
        (GgmlDType::Q5_1, 0.05),
        (GgmlDType::Q4K, 0.13),
        (GgmlDType::Q4_0, 0.19),
        (GgmlDType::Q4_1, 0.1),
        (GgmlDType::Q3K, 0.41),
        (GgmlDType::Q2K, 0.7),
        (GgmlDType::F16, 3e-4),
    ] {
        let out = tmp.path().join(format!("{}.gguf", ggml::name(t)));
        let summary =
            lowtide::weights::quantize::write_gguf(&src, t, "flux", &out, |_, _| {}).unwrap();
        assert!(
            summary.per_type.contains_key(ggml::name(t)),
            "{}: nothing in that type",
            ggml::name(t)
        );
        let back = WeightStore::open_file(&out).unwrap();
        assert_eq!(back.architecture.as_deref(), Some("flux"));
        for n in src.names() {
            let shape = src.get(n).unwrap().shape.clone();
            let a = src.load(n, &shape, DType::F32, &Device::Cpu).unwrap();
            let b = back.load(n, &shape, DType::F32, &Device::Cpu).unwrap();
            let d = (&a - &b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            let d = d.to_scalar::<f32>().unwrap();
            assert!(d <= bound, "{} {n}: error {d} > {bound}", ggml::name(t));
        }
    }
}
