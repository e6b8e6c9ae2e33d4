//! Zero-copy weights: the CLI maps large tensors from the checkpoint instead of reading copies.
//! With the threshold at 0 the tiny fixtures' tensors are mapped too; results must not change by
//! a bit, under every offload strategy.

mod common;
use common::*;

fn run(model_name: &str, extra: &[&str], env: (&str, &str), out: &std::path::Path) -> Vec<u8> {
    let m = model(model_name);
    let mut args: Vec<String> = [
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "a lighthouse",
        "--steps",
        "2",
        "--seed",
        "3",
        "--save-tensors",
        out.to_str().unwrap(),
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let ext = if extra.contains(&"--frames") {
        "mp4"
    } else {
        "png"
    };
    args.push(out.with_extension(ext).to_str().unwrap().into());
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_lowtide"))
        .args(&args)
        .env("HF_HUB_OFFLINE", "1")
        .env(env.0, env.1)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{model_name} {extra:?} {env:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read(out).unwrap()
}

#[test]
fn mapped_weights_give_the_same_tensors_as_read_ones_under_every_strategy() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str]); 3] = [
        ("tiny-sd15", &["--width", "48", "--height", "64"]),
        (
            "tiny-flux-schnell",
            &[
                "--width",
                "64",
                "--height",
                "64",
                "--max-sequence-length",
                "16",
            ],
        ),
        (
            "tiny-wan21",
            &[
                "--width",
                "64",
                "--height",
                "64",
                "--frames",
                "5",
                "--max-sequence-length",
                "16",
            ],
        ),
    ];
    for (name, size) in cases {
        let read = run(
            name,
            size,
            ("LOWTIDE_MMAP", "0"),
            &tmp.path().join("read.safetensors"),
        );
        for offload in ["none", "model", "group", "sequential"] {
            let mut extra = size.to_vec();
            extra.extend(["--offload", offload]);
            let mapped = run(
                name,
                &extra,
                ("LOWTIDE_MMAP_MIN_BYTES", "0"),
                &tmp.path().join(format!("{offload}.safetensors")),
            );
            assert!(
                read == mapped,
                "{name} --offload {offload}: mapped weights changed the output"
            );
        }
    }
}
