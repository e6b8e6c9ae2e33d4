//! VAE tiling and slicing against diffusers' own tiled/sliced outputs (tiling is not exact, so the
//! references are diffusers' tiled results): default tile, a custom tile with overlap 0.5,
//! non-square latents whose last row/column of tiles is narrower, slicing alone and with tiling.

mod common;

use common::*;
use lowtide::models::VaeMemory;
use lowtide::pipelines::{load_vae, LoadOptions};

#[test]
fn tiled_and_sliced_decode_encode_match_diffusers() {
    for name in PIPELINES {
        let (vae, _) = load_vae(&model(name), &LoadOptions::default()).unwrap();
        let r = load_refs(refs(name).join("vae_tiling.safetensors"));
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(refs(name).join("vae_tiling.json")).unwrap(),
        )
        .unwrap();
        let default = vae.tiling(None, None).unwrap();
        assert_eq!(
            default.tile_sample as u64,
            cfg["default_tile"].as_u64().unwrap()
        );
        let custom = vae
            .tiling(
                Some(cfg["custom_tile"].as_u64().unwrap() as usize),
                Some(cfg["custom_overlap"].as_f64().unwrap()),
            )
            .unwrap();
        let cases = [
            (
                "default",
                VaeMemory {
                    tiling: Some(default),
                    slicing: false,
                },
            ),
            (
                "custom",
                VaeMemory {
                    tiling: Some(custom),
                    slicing: false,
                },
            ),
            (
                "sliced_tiled",
                VaeMemory {
                    tiling: Some(default),
                    slicing: true,
                },
            ),
            (
                "sliced",
                VaeMemory {
                    tiling: None,
                    slicing: true,
                },
            ),
        ];
        let untiled = vae.decode(&r["z"]).unwrap();
        for (tag, mem) in cases {
            let dec = vae.decode_with(&r["z"], &mem).unwrap();
            assert_close(
                &format!("{name} decode {tag}"),
                &dec,
                &r[&format!("decode_{tag}")],
                1e-5,
            );
            let dist = vae.encode_with(&r["image"], &mem).unwrap();
            assert_close(
                &format!("{name} encode {tag} mean"),
                &dist.mean,
                &r[&format!("encode_{tag}_mean")],
                1e-5,
            );
            assert_close(
                &format!("{name} encode {tag} logvar"),
                &dist.logvar,
                &r[&format!("encode_{tag}_logvar")],
                1e-5,
            );
            if mem.tiling.is_some() {
                // The tiled result really differs from the untiled one (the test can fail).
                assert!(
                    rel_err(&dec, &untiled) > 1e-4,
                    "{name} {tag}: tiling had no effect"
                );
            }
        }
    }
}

#[test]
fn bad_tiling_settings() {
    let (vae, _) = load_vae(&model("tiny-sd15"), &LoadOptions::default()).unwrap();
    for (px, ov, want) in [
        (Some(4), None, "multiple"),
        (Some(12), None, "multiple"),
        (None, Some(1.0), "[0, 1)"),
        (None, Some(-0.1), "[0, 1)"),
        (Some(8), Some(0.5), "step"),
    ] {
        let e = vae.tiling(px, ov).unwrap_err().to_string();
        assert!(e.contains(want), "{px:?} {ov:?}: {e}");
    }
    let z = candle_core::Tensor::zeros(
        (1, 3, 8, 8),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let e = vae
        .decode_with(&z, &VaeMemory::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("channels"), "{e}");
    let x = candle_core::Tensor::zeros(
        (1, 4, 64, 64),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let e = vae
        .encode_with(&x, &VaeMemory::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("shape"), "{e}");
}

#[test]
fn generate_uses_tiling_and_combines_with_offload() {
    use lowtide::models::VaeOptions;
    use lowtide::pipelines::{GenerateRequest, OffloadPlan, StableDiffusion};
    use lowtide::residency::Strategy;
    let mut pipe = StableDiffusion::load(&model("tiny-sd15"), LoadOptions::default()).unwrap();
    pipe.set_offload(&OffloadPlan::uniform(Strategy::Model))
        .unwrap();
    let req = GenerateRequest {
        prompt: PROMPT.into(),
        steps: 2,
        width: Some(152),
        height: Some(104),
        seed: 3,
        vae: VaeOptions {
            tiling: true,
            ..VaeOptions::default()
        },
        ..GenerateRequest::default()
    };
    let out = pipe.generate(&req, &mut |_, _| {}).unwrap();
    assert!(out.vae_memory.tiling.is_some());
    let (vae, _) = load_vae(&model("tiny-sd15"), &LoadOptions::default()).unwrap();
    let z = (&out.final_latents / vae.config().scaling_factor).unwrap();
    let want = lowtide::io::to_unit_hwc(&vae.decode_with(&z, &out.vae_memory).unwrap()).unwrap();
    assert_close("tiled image", &out.image, &want, 1e-6);
    let untiled = lowtide::io::to_unit_hwc(&vae.decode(&z).unwrap()).unwrap();
    assert!(rel_err(&out.image, &untiled) > 1e-4, "tiling was not used");
}
