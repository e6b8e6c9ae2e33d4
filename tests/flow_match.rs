//! `FlowMatchEulerDiscreteScheduler` against diffusers 0.42.1: the schedules the FLUX pipeline
//! builds (static shift and resolution-dependent `mu`), every step of one run, and bad input.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use lowtide::rng::TorchRng;
use lowtide::schedulers::{
    calculate_shift, flux_sigmas, FlowMatchConfig, FlowMatchEulerDiscrete, Scheduler,
    SchedulerConfig,
};

fn refs_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(refs("flow_match.json")).unwrap()).unwrap()
}

fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn scheduler_config(name: &str) -> SchedulerConfig {
    let p = model(name).join("scheduler/scheduler_config.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// `|a - b| <= 1e-6 * max(|b|, 1)` for every value; returns the largest relative difference.
#[track_caller]
fn assert_values(what: &str, got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    let mut worst = 0f64;
    for (g, w) in got.iter().zip(want) {
        let e = (*g as f64 - *w as f64).abs() / (w.abs() as f64).max(1.0);
        worst = worst.max(e);
        assert!(e <= 1e-6, "{what}: {got:?} vs {want:?}");
    }
    worst
}

#[test]
fn schedules_match_diffusers() {
    let r = refs_json();
    let n_train = r["num_train_timesteps"].as_u64().unwrap() as usize;
    let cases = r["cases"].as_array().unwrap();
    assert!(cases.len() >= 18);
    let (mut worst, mut exact) = (0f64, 0);
    for c in cases {
        let steps = c["num_inference_steps"].as_u64().unwrap() as usize;
        let dynamic = c["use_dynamic_shifting"].as_bool().unwrap();
        let mut cfg = scheduler_config(if dynamic {
            "tiny-flux-dev"
        } else {
            "tiny-flux-schnell"
        });
        assert_eq!(cfg.num_train_timesteps, Some(n_train));
        cfg.shift = c["shift"].as_f64();
        let mu = if dynamic {
            let seq = c["image_seq_len"].as_u64().unwrap() as usize;
            let fm = FlowMatchConfig::from_config(&cfg).unwrap();
            let mu = fm.mu(seq);
            assert_eq!(mu, c["mu"].as_f64().unwrap(), "calculate_shift({seq})");
            assert_eq!(mu, calculate_shift(seq, 256, 4096, 0.5, 1.15));
            Some(mu)
        } else {
            None
        };
        let s = FlowMatchEulerDiscrete::new(&cfg, steps, Some(&flux_sigmas(steps)), mu).unwrap();
        let want_sigmas = f32s(&c["sigmas"]);
        let want_ts = f32s(&c["timesteps"]);
        let got_ts: Vec<f32> = s.timesteps().iter().map(|&t| t as f32).collect();
        worst = worst.max(assert_values(
            &format!("{c} sigmas"),
            s.sigmas(),
            &want_sigmas,
        ));
        worst = worst.max(assert_values(&format!("{c} timesteps"), &got_ts, &want_ts));
        if s.sigmas() == want_sigmas.as_slice() && got_ts == want_ts {
            exact += 1;
        }
        assert_eq!(s.init_noise_sigma(), 1.0);
    }
    eprintln!(
        "flow match: {exact}/{} cases bit-exact, worst relative difference {worst:.2e}",
        cases.len()
    );
}

#[test]
fn steps_match_diffusers() {
    let r = refs_json();
    let st = &r["step"];
    let cfg: SchedulerConfig = serde_json::from_value(st["config"].clone()).unwrap();
    let steps = st["num_inference_steps"].as_u64().unwrap() as usize;
    let mu = st["mu"].as_f64().unwrap();
    let mut s =
        FlowMatchEulerDiscrete::new(&cfg, steps, Some(&flux_sigmas(steps)), Some(mu)).unwrap();
    let got_ts: Vec<f32> = s.timesteps().iter().map(|&t| t as f32).collect();
    assert_values("step timesteps", &got_ts, &f32s(&st["timesteps"]));

    let nested = |v: &serde_json::Value| -> Vec<f32> {
        fn flat(v: &serde_json::Value, out: &mut Vec<f32>) {
            match v {
                serde_json::Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
                x => out.push(x.as_f64().unwrap() as f32),
            }
        }
        let mut out = Vec::new();
        flat(v, &mut out);
        out
    };
    let dev = Device::Cpu;
    let sample = Tensor::from_vec(nested(&st["sample"]), (1, 4, 3), &dev).unwrap();
    let outs = Tensor::from_vec(nested(&st["model_outputs"]), (steps, 1, 4, 3), &dev).unwrap();
    let want = Tensor::from_vec(nested(&st["prev_samples"]), (steps, 1, 4, 3), &dev).unwrap();
    let mut rng = TorchRng::new(0);
    let mut x = sample;
    for (i, &t) in s.timesteps().to_vec().iter().enumerate() {
        let inp = s.scale_model_input(&x, t).unwrap();
        assert_eq!(inp.to_vec3::<f32>().unwrap(), x.to_vec3::<f32>().unwrap());
        x = s.step(&outs.get(i).unwrap(), t, &x, &mut rng).unwrap();
        assert_close(&format!("step {i}"), &x, &want.get(i).unwrap(), 1e-6);
    }
    // One step past the end of the schedule is an error, not a panic.
    assert!(s.step(&outs.get(0).unwrap(), 0.0, &x, &mut rng).is_err());
}

#[test]
fn scale_noise_is_the_flow_interpolation() {
    let cfg = scheduler_config("tiny-flux-schnell");
    let mut s = FlowMatchEulerDiscrete::new(&cfg, 4, Some(&flux_sigmas(4)), None).unwrap();
    let dev = Device::Cpu;
    let x = Tensor::new(&[1f32, 2.0, -3.0], &dev).unwrap();
    let n = Tensor::new(&[0.5f32, -1.0, 4.0], &dev).unwrap();
    let t = s.timesteps()[2];
    let sigma = s.sigmas()[2];
    let got = s.scale_noise(&x, t, &n).unwrap().to_vec1::<f32>().unwrap();
    let want: Vec<f32> = [1f32, 2.0, -3.0]
        .iter()
        .zip([0.5f32, -1.0, 4.0])
        .map(|(x, n)| sigma * n + (1.0 - sigma) * x)
        .collect();
    assert_eq!(got, want);
    // img2img: with a begin index the sigma comes from it, as diffusers does.
    s.set_begin_index(1);
    let got = s.add_noise(&x, &n, t).unwrap().to_vec1::<f32>().unwrap();
    let sigma = s.sigmas()[1];
    assert_eq!(got[0], sigma * 0.5 + (1.0 - sigma) * 1.0);
}

#[test]
fn bad_schedules_are_refused() {
    let dev_cfg = scheduler_config("tiny-flux-dev");
    let schnell = scheduler_config("tiny-flux-schnell");
    let err = |r: lowtide::Result<FlowMatchEulerDiscrete>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    // use_dynamic_shifting without mu.
    let e = err(FlowMatchEulerDiscrete::new(
        &dev_cfg,
        4,
        Some(&flux_sigmas(4)),
        None,
    ));
    assert!(e.contains("mu"), "{e}");
    let e = err(FlowMatchEulerDiscrete::new(
        &dev_cfg,
        4,
        None,
        Some(f64::NAN),
    ));
    assert!(e.contains("mu"), "{e}");
    // Zero steps; sigmas of the wrong length or out of range.
    let e = err(FlowMatchEulerDiscrete::new(&schnell, 0, None, None));
    assert!(e.contains("steps"), "{e}");
    let e = err(FlowMatchEulerDiscrete::new(
        &schnell,
        3,
        Some(&flux_sigmas(4)),
        None,
    ));
    assert!(e.contains("sigmas"), "{e}");
    let e = err(FlowMatchEulerDiscrete::new(
        &schnell,
        2,
        Some(&[1.0, f64::NAN]),
        None,
    ));
    assert!(e.contains("sigmas"), "{e}");
    // shift_terminal with one step: diffusers divides 0 by 0 and returns NaN sigmas.
    let mut cfg = schnell.clone();
    cfg.shift_terminal = Some(0.1);
    let e = err(FlowMatchEulerDiscrete::new(
        &cfg,
        1,
        Some(&flux_sigmas(1)),
        None,
    ));
    assert!(e.contains("not finite"), "{e}");
    // Config values, each named with its file.
    let bad = [
        ("shift", serde_json::json!(-1.0)),
        ("shift", serde_json::json!(0.0)),
        ("num_train_timesteps", serde_json::json!(0)),
        ("use_karras_sigmas", serde_json::json!(true)),
        ("use_exponential_sigmas", serde_json::json!(true)),
        ("use_beta_sigmas", serde_json::json!(true)),
        ("stochastic_sampling", serde_json::json!(true)),
        ("time_shift_type", serde_json::json!("cosine")),
        ("shift_terminal", serde_json::json!(1.0)),
        ("max_image_seq_len", serde_json::json!(256)),
    ];
    for (field, value) in bad {
        let path = model("tiny-flux-dev").join("scheduler/scheduler_config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        v[field] = value.clone();
        let cfg: SchedulerConfig = serde_json::from_value(v).unwrap();
        let e = err(FlowMatchEulerDiscrete::new(&cfg, 4, None, Some(0.5)));
        assert!(
            e.contains("scheduler/scheduler_config.json") && e.contains(&format!("`{field}`")),
            "{field} = {value}: {e}"
        );
    }
    // A non-finite shift cannot come from JSON; the resolved config refuses it too.
    let mut cfg = schnell.clone();
    cfg.shift = Some(f64::INFINITY);
    let e = err(FlowMatchEulerDiscrete::new(&cfg, 4, None, None));
    assert!(e.contains("`shift`"), "{e}");
}

/// The schedule without custom sigmas (diffusers' float64 path, used by SD3-style pipelines),
/// which shifts `sigma_min` twice; and `shift_terminal` with `invert_sigmas`. The values are
/// diffusers 0.42.1's, printed as float32 (`set_timesteps(4)` on `shift=3.0`; `set_timesteps(3)`
/// on `shift=3.0, shift_terminal=0.1, invert_sigmas=True`).
#[test]
fn default_and_terminal_schedules() {
    let mut cfg = scheduler_config("tiny-flux-schnell");
    cfg.shift = Some(3.0);
    let s = FlowMatchEulerDiscrete::new(&cfg, 4, None, None).unwrap();
    assert_eq!(
        s.sigmas(),
        &[1.0, 0.857_692_3, 0.602_150_56, 0.008_928_572, 0.0]
    );
    let ts: Vec<f32> = s.timesteps().iter().map(|&t| t as f32).collect();
    assert_eq!(ts, [1000.0, 857.692_3, 602.150_6, 8.928_572]);

    cfg.shift_terminal = Some(0.1);
    cfg.invert_sigmas = Some(true);
    let s = FlowMatchEulerDiscrete::new(&cfg, 3, None, None).unwrap();
    assert_eq!(s.sigmas(), &[0.0, 0.226_008_95, 0.9, 1.0]);
    let ts: Vec<f32> = s.timesteps().iter().map(|&t| t as f32).collect();
    assert_eq!(ts, [0.0, 226.008_96, 900.0]);
}
