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

/// Bytes of every tensor of a weight file as held in an f32 run: ggml blocks as stored, plain
/// F32/F16 tensors in f32 (as from any file without `--storage-dtype`).
fn held_bytes(path: &Path) -> u64 {
    let st = WeightStore::open_file(path).unwrap();
    st.names()
        .map(|n| {
            let t = st.get(n).unwrap();
            match t.encoding {
                Encoding::Ggml(_) => t.nbytes(),
                _ => 4 * t.shape.iter().product::<usize>() as u64,
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
    ] {
        let g = quantize(tmp.path(), pipeline, "transformer", t);
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
            held_bytes(&g),
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
        let want = lowtide::weights::quantize::type_for(n, &a.shape, GgmlDType::Q8_0);
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
