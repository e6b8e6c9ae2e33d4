//! Bounded, fixed-seed fuzzing of every file lowtide parses from a model folder: safetensors
//! headers and each component's config. Zero panics allowed: every input either loads or is an
//! error. Runs in `cargo test` (a few hundred cases, a few seconds).

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use common::*;
use lowtide::pipelines::{self, GenerateRequest, LoadOptions};
use lowtide::weights::WeightStore;

/// xorshift64*: a fixed, dependency-free stream so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[track_caller]
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(_) => panic!("panicked on {what}"),
    }
}

#[test]
fn safetensors_headers_never_panic() {
    let src =
        std::fs::read(model("tiny-sd15").join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(src[..8].try_into().unwrap()) as usize;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("f.safetensors");
    let mut rng = Rng(0x5eed_1234);
    let mut loaded = 0;
    for case in 0..400 {
        let mut b = src.clone();
        match rng.below(5) {
            // Flip bytes inside the JSON header.
            0 | 1 => {
                for _ in 0..1 + rng.below(4) {
                    let i = 8 + rng.below(header_len);
                    b[i] = rng.next() as u8;
                }
            }
            // A wrong header length.
            2 => {
                let n = match rng.below(3) {
                    0 => rng.next(),
                    1 => (header_len as u64).wrapping_add(rng.below(64) as u64) - 32,
                    _ => rng.below(16) as u64,
                };
                b[..8].copy_from_slice(&n.to_le_bytes());
            }
            // Truncated anywhere.
            3 => b.truncate(rng.below(b.len())),
            // A digit of some offset or shape changed.
            _ => {
                let digits: Vec<usize> = (8..8 + header_len)
                    .filter(|&i| b[i].is_ascii_digit())
                    .collect();
                let i = digits[rng.below(digits.len())];
                b[i] = b'0' + rng.below(10) as u8;
            }
        }
        std::fs::write(&path, &b).unwrap();
        let opened = no_panic(&format!("header case {case}"), || {
            WeightStore::open(std::slice::from_ref(&path))
        });
        if let Ok(store) = opened {
            // Whatever opened must also read (or fail) without a panic.
            let names: Vec<String> = store.names().cloned().collect();
            for n in names.iter().take(8) {
                let shape = store.get(n).unwrap().shape.clone();
                no_panic(&format!("load {n} in case {case}"), || {
                    let _ = store.load(
                        n,
                        &shape,
                        candle_core::DType::F32,
                        &candle_core::Device::Cpu,
                    );
                });
            }
            loaded += 1;
        }
    }
    // Some mutations are harmless (a changed byte inside a name): the loop did exercise loads.
    assert!(loaded > 0);
}

/// Values that have broken parsers before: zeros, huge counts, negatives, non-f32 floats,
/// wrong types.
fn nasty(rng: &mut Rng) -> serde_json::Value {
    use serde_json::json;
    let pool = [
        json!(0),
        json!(1),
        json!(-1),
        json!(2),
        json!(3),
        json!(7),
        json!(u64::MAX),
        json!(1u64 << 40),
        json!(1e39),
        json!(-1e39),
        json!(0.0),
        json!(0.5),
        json!(2.0),
        json!("x"),
        json!(null),
        json!([]),
        json!([0]),
        json!([1, 2]),
        json!(true),
        json!({}),
    ];
    pool[rng.below(pool.len())].clone()
}

fn mutate_json(path: &Path, rng: &mut Rng) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let obj = v.as_object_mut().unwrap();
    let keys: Vec<String> = obj.keys().cloned().collect();
    let key = keys[rng.below(keys.len())].clone();
    let val = nasty(rng);
    let what = format!("{}: {key} = {val}", path.display());
    obj.insert(key, val);
    std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
    what
}

/// Mutates one value of one config file per case, loads the pipeline and (every few cases)
/// runs a short generate: nothing may panic.
fn fuzz_configs(name: &str, files: &[&str], seed: u64, cases: usize, size: usize) {
    let (_t, p) = scratch(name);
    let originals: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(p.join(f)).unwrap())
        .collect();
    let mut rng = Rng(seed);
    let mut ran = 0;
    for case in 0..cases {
        let fi = rng.below(files.len());
        let what = mutate_json(&p.join(files[fi]), &mut rng);
        let loaded = no_panic(&what, || pipelines::load(&p, LoadOptions::default()));
        if let Ok(pipe) = loaded {
            if case % 4 == 0 {
                let (steps, guidance) = pipe.defaults();
                let req = GenerateRequest {
                    prompt: "x".into(),
                    steps: steps.min(2),
                    guidance,
                    width: Some(size),
                    height: Some(size),
                    max_sequence_length: name.contains("flux").then_some(8),
                    ..Default::default()
                };
                no_panic(&what, || {
                    let _ = pipe.generate(&req, &mut |_, _| {});
                });
                ran += 1;
            }
        }
        std::fs::write(p.join(files[fi]), &originals[fi]).unwrap();
    }
    assert!(ran > 0);
}

#[test]
fn config_files_never_panic() {
    fuzz_configs(
        "tiny-sd15",
        &[
            "unet/config.json",
            "vae/config.json",
            "text_encoder/config.json",
            "scheduler/scheduler_config.json",
            "model_index.json",
        ],
        0xc0ff_ee00,
        240,
        16,
    );
}

#[test]
fn flux_config_files_never_panic() {
    fuzz_configs(
        "tiny-flux-schnell",
        &[
            "transformer/config.json",
            "text_encoder_2/config.json",
            "text_encoder/config.json",
            "vae/config.json",
            "scheduler/scheduler_config.json",
            "model_index.json",
        ],
        0xf107_0001,
        240,
        32,
    );
}

/// GGUF files damaged anywhere in their header (or truncated) open, convert and dequantize, or
/// fail with an error; never a panic.
#[test]
fn gguf_files_never_panic() {
    let src = std::fs::read(fixtures().join("checkpoints/flux-dev-q.gguf")).unwrap();
    // The header: everything before the first tensor's data (the file is mostly data).
    let header = src.len() - 64 * 1024;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("f.gguf");
    let mut rng = Rng(0x6767_7566);
    let mut opened_any = 0;
    for case in 0..300 {
        let mut b = src.clone();
        match rng.below(4) {
            0 | 1 => {
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(header.min(b.len()));
                    b[i] = rng.next() as u8;
                }
            }
            // A random 8-byte count, length, dimension or offset.
            2 => {
                let i = rng.below(header - 8);
                let v = match rng.below(3) {
                    0 => rng.next(),
                    1 => rng.below(1 << 20) as u64,
                    _ => u64::MAX - rng.below(16) as u64,
                };
                b[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            _ => b.truncate(rng.below(b.len())),
        }
        std::fs::write(&path, &b).unwrap();
        let opened = no_panic(&format!("gguf case {case}"), || {
            WeightStore::open_file(&path)
        });
        if let Ok(mut store) = opened {
            opened_any += 1;
            let prepared = no_panic(&format!("convert case {case}"), || {
                lowtide::weights::layouts::prepare(
                    &mut store,
                    "FluxTransformer2DModel",
                    &serde_json::json!({}),
                )
            });
            if prepared.is_err() {
                continue;
            }
            let names: Vec<String> = store.names().cloned().collect();
            for n in names.iter().take(12) {
                let shape = store.get(n).unwrap().shape.clone();
                no_panic(&format!("dequantize {n} in case {case}"), || {
                    let _ = store.load(
                        n,
                        &shape,
                        candle_core::DType::F32,
                        &candle_core::Device::Cpu,
                    );
                });
            }
        }
    }
    assert!(opened_any > 0);
}
