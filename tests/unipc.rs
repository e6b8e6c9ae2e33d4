//! `UniPCMultistepScheduler` (flow sigmas, as Wan uses it) and the flow-matching Euler
//! alternative built from its `flow_shift`, against diffusers 0.42.1: `set_timesteps` for
//! several step counts, whole runs step by step, and the configs they must refuse.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use lowtide::rng::TorchRng;
use lowtide::schedulers::{
    build, FlowMatchEulerDiscrete, Scheduler, SchedulerConfig, SchedulerKind, UniPcMultistep,
};
use serde_json::Value;

/// unipc.json as Python's `json` wrote it: the non-finite samples of the runs diffusers itself
/// breaks on are bare `NaN` / `Infinity` tokens, which JSON lacks; they are read as null.
fn refs_json() -> Value {
    let text = std::fs::read_to_string(refs("unipc.json")).unwrap();
    let text = text
        .replace("-Infinity", "null")
        .replace("Infinity", "null")
        .replace("NaN", "null");
    serde_json::from_str(&text).unwrap()
}

/// The values of a `{shape, data}` array; null (non-finite in the file) as NaN.
fn f32s(v: &Value) -> Vec<f32> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().map_or(f32::NAN, |x| x as f32))
        .collect()
}

fn dims(v: &Value) -> Vec<usize> {
    v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// Item `i` along the first axis of a `{shape, data}` array, as a tensor.
fn item(v: &Value, i: usize) -> Tensor {
    let shape = dims(v);
    let inner: Vec<usize> = shape[1..].to_vec();
    let n: usize = inner.iter().product();
    let data = f32s(v)[i * n..(i + 1) * n].to_vec();
    Tensor::from_vec(data, inner, &Device::Cpu).unwrap()
}

fn pipeline_config(name: &str) -> SchedulerConfig {
    let p = model(name).join("scheduler/scheduler_config.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn config_of(c: &Value) -> SchedulerConfig {
    serde_json::from_value(c["config"].clone()).unwrap()
}

/// The fixture's UniPC configs with `lower_order_final: false` on a zero final sigma are ones
/// diffusers itself runs into inf/NaN with (see `refused_configs_end_non_finite_in_diffusers`).
fn refused(cfg: &SchedulerConfig) -> bool {
    cfg.lower_order_final == Some(false)
}

/// The scheduler a fixture config names, for `steps`.
fn scheduler(kind: &str, cfg: &SchedulerConfig, steps: usize) -> Box<dyn Scheduler> {
    match kind {
        "unipc" => Box::new(UniPcMultistep::new(cfg, steps).unwrap()),
        "flow-euler" => {
            // The fixture's own FlowMatchEulerDiscreteScheduler config (with `shift`) and the
            // constructor the Wan pipeline uses (a UniPC config's `flow_shift`) agree.
            let direct = FlowMatchEulerDiscrete::new(cfg, steps, None, None).unwrap();
            let unipc_cfg = SchedulerConfig {
                flow_shift: cfg.shift,
                ..pipeline_config("tiny-wan21")
            };
            let from_shift = FlowMatchEulerDiscrete::with_flow_shift(&unipc_cfg, steps).unwrap();
            assert_eq!(direct.timesteps(), from_shift.timesteps());
            assert_eq!(direct.sigmas(), from_shift.sigmas());
            Box::new(from_shift)
        }
        other => panic!("unknown scheduler kind {other}"),
    }
}

fn sigmas_of(kind: &str, cfg: &SchedulerConfig, steps: usize) -> Vec<f32> {
    match kind {
        "unipc" => UniPcMultistep::new(cfg, steps).unwrap().sigmas().to_vec(),
        _ => FlowMatchEulerDiscrete::new(cfg, steps, None, None)
            .unwrap()
            .sigmas()
            .to_vec(),
    }
}

#[test]
fn set_timesteps_match_diffusers_exactly() {
    let r = refs_json();
    let mut checked = 0;
    for (name, c) in r["configs"].as_object().unwrap() {
        let kind = c["kind"].as_str().unwrap();
        let mut cfg = config_of(c);
        if refused(&cfg) {
            // Same schedule; only the last step's order differs.
            cfg.lower_order_final = Some(true);
        }
        for (steps, want) in c["set_timesteps"].as_object().unwrap() {
            let steps: usize = steps.parse().unwrap();
            let s = scheduler(kind, &cfg, steps);
            let got_ts: Vec<f32> = s.timesteps().iter().map(|&t| t as f32).collect();
            assert_eq!(got_ts, f32s(&want["timesteps"]), "{name} {steps} timesteps");
            if kind == "unipc" {
                // Integer timesteps, as diffusers' int64.
                assert!(s.timesteps().iter().all(|t| t.fract() == 0.0));
            }
            assert_eq!(
                sigmas_of(kind, &cfg, steps),
                f32s(&want["sigmas"]),
                "{name} {steps} sigmas"
            );
            checked += 1;
        }
    }
    assert!(checked >= 25, "{checked}");
}

/// The committed pipelines' scheduler_config.json give the fixture configs' schedules.
#[test]
fn pipeline_configs_give_the_same_schedules() {
    let r = refs_json();
    for (pipeline, config) in [
        ("tiny-wan21", "wan21_unipc_shift3"),
        ("tiny-wan22-a14b", "wan21_unipc_shift3"),
        ("tiny-wan22-ti2v", "wan22_unipc_shift5"),
    ] {
        let want = config_of(&r["configs"][config]);
        let got = pipeline_config(pipeline);
        for steps in [1, 7, 50] {
            let a = UniPcMultistep::new(&got, steps).unwrap();
            let b = UniPcMultistep::new(&want, steps).unwrap();
            assert_eq!(a.timesteps(), b.timesteps(), "{pipeline}");
            assert_eq!(a.sigmas(), b.sigmas(), "{pipeline}");
        }
    }
}

/// Whole runs: `model_output_i = noise_i + 0.5 * sample_i`, every step's sample within 1e-5
/// of diffusers' (relative to the larger of 1 and the sample's largest magnitude).
#[test]
fn runs_match_diffusers_step_by_step() {
    let r = refs_json();
    let mut rng = TorchRng::new(0);
    let (mut worst, mut runs) = (0f32, 0);
    for run in r["runs"].as_array().unwrap() {
        let name = run["config"].as_str().unwrap();
        let c = &r["configs"][name];
        let kind = c["kind"].as_str().unwrap();
        let cfg = config_of(c);
        if refused(&cfg) {
            continue;
        }
        let steps = run["steps"].as_u64().unwrap() as usize;
        let mut s = scheduler(kind, &cfg, steps);
        let ts = f32s(&run["timesteps"]);
        assert_eq!(ts.len(), steps);
        let mut sample = item(&run["samples"], 0);
        for (i, &t) in ts.iter().enumerate() {
            assert_eq!(s.timesteps()[i] as f32, t, "{name} step {i}");
            let out = item(&run["model_outputs"], i);
            sample = s.step(&out, s.timesteps()[i], &sample, &mut rng).unwrap();
            let want = item(&run["samples"], i + 1);
            let diff = (&sample - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let mag = want.abs().unwrap().max_all().unwrap();
            let e = diff / mag.to_scalar::<f32>().unwrap().max(1.0);
            worst = worst.max(e);
            assert!(e <= 1e-5, "{name} {steps} steps, step {i}: {e:.3e}");
        }
        runs += 1;
    }
    eprintln!("{runs} runs, worst step error {worst:.3e}");
    assert!(runs >= 14);
}

/// `lower_order_final: false` with a zero final sigma: diffusers' last (second-order) step
/// divides by an infinite step size, so its runs end in inf/NaN; lowtide refuses the config.
#[test]
fn refused_configs_end_non_finite_in_diffusers() {
    let r = refs_json();
    let mut seen = 0;
    for run in r["runs"].as_array().unwrap() {
        let name = run["config"].as_str().unwrap();
        let cfg = config_of(&r["configs"][name]);
        if !refused(&cfg) {
            continue;
        }
        let steps = run["steps"].as_u64().unwrap() as usize;
        let finite = f32s(&run["samples"]).iter().all(|v| v.is_finite());
        assert_eq!(finite, steps == 1, "{name} {steps}");
        let err = UniPcMultistep::new(&cfg, steps).err().unwrap().to_string();
        assert!(err.contains("`lower_order_final`"), "{err}");
        seen += 1;
    }
    assert!(seen > 0);
}

#[test]
fn reachable_by_name_and_through_build() {
    assert_eq!(
        SchedulerKind::from_cli("unipc").unwrap(),
        SchedulerKind::UniPc
    );
    assert_eq!(
        SchedulerKind::from_cli("flow-euler").unwrap(),
        SchedulerKind::FlowEuler
    );
    let cfg = pipeline_config("tiny-wan21");
    let a = build(SchedulerKind::UniPc, &cfg, 10).unwrap();
    let b = UniPcMultistep::new(&cfg, 10).unwrap();
    assert_eq!(a.timesteps(), b.timesteps());
    let a = build(SchedulerKind::FlowEuler, &cfg, 10).unwrap();
    let b = FlowMatchEulerDiscrete::with_flow_shift(&cfg, 10).unwrap();
    assert_eq!(a.timesteps(), b.timesteps());
    assert_eq!(b.config().shift, 3.0);
    // Not on a noise-prediction model's config.
    let sd: SchedulerConfig = serde_json::from_str(
        &std::fs::read_to_string(model("tiny-sd15").join("scheduler/scheduler_config.json"))
            .unwrap(),
    )
    .unwrap();
    assert!(build(SchedulerKind::FlowEuler, &sd, 10).is_err());
    let err = build(SchedulerKind::UniPc, &sd, 10)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("`use_flow_sigmas`"), "{err}");
}

#[test]
fn bad_step_counts_are_refused() {
    let cfg = pipeline_config("tiny-wan21");
    assert!(UniPcMultistep::new(&cfg, 0).is_err());
    // At 600 steps the first two truncated timesteps are both 999: diffusers would start at
    // the second and run past the end.
    let err = UniPcMultistep::new(&cfg, 600).err().unwrap().to_string();
    assert!(err.contains("too many"), "{err}");
    assert!(UniPcMultistep::new(&cfg, 200).is_ok());
    assert!(FlowMatchEulerDiscrete::with_flow_shift(&cfg, 0).is_err());
}

#[test]
fn bad_configs_name_the_field() {
    use serde_json::json;
    let base = serde_json::to_value(
        serde_json::from_str::<Value>(
            &std::fs::read_to_string(model("tiny-wan21").join("scheduler/scheduler_config.json"))
                .unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let cases = [
        (json!({"use_flow_sigmas": false}), "use_flow_sigmas"),
        (json!({"use_flow_sigmas": null}), "use_flow_sigmas"),
        (json!({"prediction_type": "epsilon"}), "prediction_type"),
        (json!({"predict_x0": false}), "predict_x0"),
        (json!({"solver_order": 0}), "solver_order"),
        (json!({"solver_order": 4}), "solver_order"),
        (json!({"solver_type": "bh3"}), "solver_type"),
        (json!({"solver_type": "bh1"}), "solver_type"),
        (json!({"final_sigmas_type": "one"}), "final_sigmas_type"),
        (json!({"lower_order_final": false}), "lower_order_final"),
        (
            json!({"lower_order_final": false, "final_sigmas_type": "sigma_min", "solver_order": 3}),
            "lower_order_final",
        ),
        (json!({"timestep_spacing": "cosine"}), "timestep_spacing"),
        (json!({"flow_shift": 0.0}), "flow_shift"),
        (json!({"flow_shift": -3.0}), "flow_shift"),
        (json!({"num_train_timesteps": 0}), "num_train_timesteps"),
        (json!({"thresholding": true}), "thresholding"),
        (
            json!({"use_dynamic_shifting": true}),
            "use_dynamic_shifting",
        ),
        (json!({"use_karras_sigmas": true}), "use_karras_sigmas"),
        (json!({"use_beta_sigmas": true}), "use_beta_sigmas"),
        (json!({"shift_terminal": 0.1}), "shift_terminal"),
        (
            json!({"solver_p": {"_class_name": "DDIMScheduler"}}),
            "solver_p",
        ),
    ];
    for (edit, field) in cases {
        let mut v = base.clone();
        for (k, x) in edit.as_object().unwrap() {
            v[k] = x.clone();
        }
        let cfg: SchedulerConfig = serde_json::from_value(v).unwrap();
        let err = match UniPcMultistep::new(&cfg, 10) {
            Ok(_) => panic!("{edit} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("scheduler/scheduler_config.json") && err.contains(&format!("`{field}`")),
            "{edit}: {err}"
        );
    }
    // What diffusers accepts as the same thing: DPM-Solver solver names mean bh2, a zero
    // shift_terminal is off, bh1 and no lower-order final step are fine on a sigma_min end.
    for edit in [
        json!({"solver_type": "midpoint"}),
        json!({"shift_terminal": 0.0}),
        json!({"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
        json!({"lower_order_final": false, "final_sigmas_type": "sigma_min"}),
        json!({"lower_order_final": false, "solver_order": 1}),
    ] {
        let mut v = base.clone();
        for (k, x) in edit.as_object().unwrap() {
            v[k] = x.clone();
        }
        let cfg: SchedulerConfig = serde_json::from_value(v).unwrap();
        assert!(UniPcMultistep::new(&cfg, 10).is_ok(), "{edit}");
    }
    let bad_shift = SchedulerConfig {
        flow_shift: Some(-1.0),
        ..pipeline_config("tiny-wan21")
    };
    let err = FlowMatchEulerDiscrete::with_flow_shift(&bad_shift, 10)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("`flow_shift`"), "{err}");
}
