//! Shared helpers of the parity tests: fixture paths, reference tensors and the tolerance rule.
//!
//! Tolerance rule: `max|a - b| <= rel * max|b|`, i.e. relative to the reference tensor's largest
//! magnitude, so a tolerance means the same thing for embeddings near 1 and latents near 10.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn model(name: &str) -> PathBuf {
    fixtures().join(name)
}

pub fn refs(name: &str) -> PathBuf {
    fixtures().join("refs").join(name)
}

/// All tensors of a reference file, as f32 on the CPU.
pub fn load_refs(path: PathBuf) -> HashMap<String, Tensor> {
    let map = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    map.into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap()))
        .collect()
}

pub fn meta(name: &str) -> serde_json::Value {
    let p = refs(name).join("meta.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// Largest |a - b| relative to the largest |b|.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let diff = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let mag = b.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(mag > 0.0, "reference tensor is all zeros");
    assert!(diff.is_finite(), "non-finite difference");
    diff / mag
}

/// The inputs of one `FluxTransformer2DModel` call from a reference file's tensors.
pub fn flux_inputs(r: &HashMap<String, Tensor>) -> lowtide::models::FluxInputs<'_> {
    lowtide::models::FluxInputs {
        hidden_states: &r["hidden_states"],
        encoder_hidden_states: &r["encoder_hidden_states"],
        pooled_projections: &r["pooled_projections"],
        timestep: &r["timestep"],
        guidance: r.get("guidance"),
        img_ids: &r["img_ids"],
        txt_ids: &r["txt_ids"],
    }
}

/// The tensor's values as f32 bit patterns: for bit-identity checks.
pub fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

#[track_caller]
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, rel: f32) {
    let e = rel_err(a, b);
    assert!(e <= rel, "{what}: relative error {e:.3e} > {rel:.1e}");
}

/// Copies a fixture folder (for tests that damage their copy).
pub fn copy_dir(src: &std::path::Path, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

pub const PROMPT: &str = "a photograph of an astronaut riding a horse";
pub const NEGATIVE: &str = "blurry, low quality";
pub const SCHEDULERS: [&str; 5] = ["pndm", "ddim", "euler", "euler-a", "dpmpp-2m"];
/// The two committed tiny pipelines: SD1.5 flavour and SD2 flavour (v_prediction, linear
/// projection, sharded UNet).
pub const PIPELINES: [&str; 2] = ["tiny-sd15", "tiny-sd2"];

// ---- the binary, as a user runs it ----

pub fn lowtide(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_lowtide"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("cannot run lowtide")
}

pub fn ok(args: &[&str]) -> std::process::Output {
    let out = lowtide(args);
    assert!(
        out.status.success(),
        "lowtide {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command that must fail cleanly (exit 1, an `error:` line, no panic); returns stderr.
#[track_caller]
pub fn fails(args: &[&str], expect: &[&str]) -> String {
    let out = lowtide(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "lowtide {args:?} succeeded");
    assert!(
        !err.contains("panicked"),
        "lowtide {args:?} panicked:\n{err}"
    );
    assert_eq!(out.status.code(), Some(1), "exit code of {args:?}:\n{err}");
    assert!(err.contains("error:"), "no error line for {args:?}:\n{err}");
    for e in expect {
        assert!(err.contains(e), "stderr of {args:?} lacks {e:?}:\n{err}");
    }
    err
}

pub fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// A writable copy of a committed tiny pipeline.
pub fn scratch(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("pipe");
    copy_dir(&model(name), &dst);
    (tmp, dst)
}

/// A writable copy of the tiny SD1.5 pipeline.
pub fn scratch_pipeline() -> (tempfile::TempDir, PathBuf) {
    scratch("tiny-sd15")
}

/// Opens component `component` of fixture pipeline `name` (f32, CPU, its own accounting) and
/// builds its model with `new`, asserting that every tensor of the checkpoint is used, so nothing
/// is silently ignored.
pub fn build_component<C: serde::de::DeserializeOwned, M>(
    name: &str,
    component: &str,
    new: impl FnOnce(&lowtide::residency::ParamPath, &C) -> lowtide::Result<M>,
) -> (lowtide::pipelines::Component, M) {
    let c = lowtide::pipelines::Component::open(
        &model(name),
        component,
        "diffusion_pytorch_model",
        None,
        None,
        &Device::Cpu,
        DType::F32,
        std::sync::Arc::default(),
    )
    .unwrap();
    let pp = c.param_root();
    let m = new(&pp, &c.config().unwrap()).unwrap();
    c.validate(&pp).unwrap();
    let declared: Vec<String> = pp.declared().into_iter().map(|s| s.name).collect();
    for n in c.weights.store().names() {
        assert!(
            declared.contains(n),
            "{name}/{component}: checkpoint tensor {n} is not used"
        );
    }
    (c, m)
}
