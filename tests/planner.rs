//! `--memory-budget` end to end on the tiny pipelines of every family: budgets that force each
//! kind of plan (everything resident, partial residency, sequential, nothing fits), the plan
//! kept under user-fixed flags, the run bit-identical to `none` and its measured peaks under
//! the budget, `lowtide plan`, the report and the plot.

mod common;

use common::*;
use serde_json::Value;

/// (pipeline, denoiser, extra generate arguments)
const FAMILIES: [(&str, &str, &[&str]); 3] = [
    (
        "tiny-sd15",
        "unet",
        &["--steps", "3", "--width", "32", "--height", "32"],
    ),
    (
        "tiny-flux-dev",
        "transformer",
        &[
            "--steps",
            "2",
            "--width",
            "32",
            "--height",
            "32",
            "--max-sequence-length",
            "8",
        ],
    ),
    (
        "tiny-wan21",
        "transformer",
        &[
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
        ],
    ),
];

fn args<'a>(name: &'a str, m: &'a str, extra: &[&'a str], budget: &'a str) -> Vec<&'a str> {
    let _ = name;
    let mut v = vec![
        "--model",
        m,
        "--prompt",
        PROMPT,
        "--memory-budget",
        budget,
        "--plan-baseline",
        PLAN_BASELINE,
    ];
    v.extend_from_slice(extra);
    v
}

fn plan_json(name: &str, extra: &[&str], budget: u64, more: &[&str]) -> Value {
    let m = s(&model(name)).to_string();
    let b = budget.to_string();
    let mut a = vec!["plan", "--json"];
    a.extend(args(name, &m, extra, &b));
    a.extend_from_slice(more);
    let out = ok(&a);
    serde_json::from_slice(&out.stdout).expect("plan --json prints JSON")
}

fn strategy(plan: &Value, component: &str) -> String {
    plan["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == component)
        .unwrap_or_else(|| panic!("no {component} in {plan}"))["strategy"]
        .as_str()
        .unwrap()
        .to_string()
}

fn runner_up(plan: &Value, label: &str) -> (u64, bool) {
    let r = plan["runners_up"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["description"] == label)
        .unwrap_or_else(|| panic!("no {label} in {plan}"));
    (
        r["predicted_peak_bytes"].as_u64().unwrap(),
        r["fits"].as_bool().unwrap(),
    )
}

const HUGE: u64 = 64 << 30;

/// What the CLI tests tell the planner the process holds before loading (a tiny pipeline's
/// process measures 40-45 MiB, varying by a few MiB between processes): fixed, so that plans
/// made in one process hold in the next.
const PLAN_BASELINE: &str = "52MiB";

/// A budget whose limit (the budget less the plans' margin) is `limit`.
fn budget_for(limit: u64) -> u64 {
    let of = |b: u64| {
        lowtide::planner::Constraints {
            budget: b,
            margin: lowtide::pipelines::planning::MARGIN,
            ..Default::default()
        }
        .limit()
    };
    let mut b = (limit as f64 / (1.0 - lowtide::pipelines::planning::MARGIN)) as u64 + 4;
    while of(b) > limit {
        b -= 1;
    }
    b
}

/// Through the CLI (the process's real baseline), on SD, whose UNet is large enough next to
/// the baseline's jitter between processes; every family through the library below.
#[test]
fn budgets_force_each_kind_of_plan_from_the_command_line() {
    for (name, denoiser, extra) in &FAMILIES[..1] {
        let (name, denoiser, extra) = (*name, *denoiser, *extra);
        // Everything fits: nothing is streamed.
        let all = plan_json(name, extra, HUGE, &[]);
        for c in all["components"].as_array().unwrap() {
            let s = c["strategy"].as_str().unwrap();
            assert!(s == "none" || s == "model", "{name}: {all}");
        }
        let (p_model, fits) = runner_up(&all, "--offload model");
        assert!(fits);
        let (p_group, _) = runner_up(&all, "--offload group");
        let (p_seq, _) = runner_up(&all, "--offload sequential");
        assert!(p_seq < p_group && p_group < p_model, "{name}: {all}");
        for p in all["phases"].as_array().unwrap() {
            assert!(
                p["predicted_peak_bytes"].as_u64().unwrap()
                    <= all["predicted_peak_bytes"].as_u64().unwrap()
            );
        }

        // Just under model offload: the denoiser streams, with the groups that fit kept
        // resident.
        // (2 MiB under: this plan is made in another process, whose baseline differs by a few
        // hundred kilobytes.)
        let partial = plan_json(name, extra, budget_for(p_model - 1), &[]);
        assert_eq!(strategy(&partial, denoiser), "group", "{name}: {partial}");
        let d = partial["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == denoiser)
            .unwrap();
        assert!(
            d["resident_groups"].as_u64().unwrap() >= 1,
            "{name}: {partial}"
        );
        assert!(partial["predicted_peak_bytes"].as_u64().unwrap() < p_model);
        let (_, model_fits) = runner_up(&partial, "--offload model");
        assert!(!model_fits, "{name}: {partial}");

        // Between sequential and group offload: something must run layer by layer.
        let seq = plan_json(name, extra, budget_for((p_seq + p_group) / 2), &[]);
        assert!(
            seq["components"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["strategy"] == "sequential"),
            "{name}: {seq}"
        );

        // Below every plan: an error with the minimum and what lowers it.
        let m = s(&model(name)).to_string();
        let small = (p_seq - (1 << 20)).to_string();
        let mut a = vec!["plan"];
        a.extend(args(name, &m, extra, &small));
        let e = fails(
            &a,
            &["no plan fits", "needs about", "raise --memory-budget"],
        );
        assert!(e.contains("--storage-dtype"), "{e}");
    }
}

#[test]
fn user_fixed_flags_are_kept_and_planned_around() {
    let (name, _, extra) = FAMILIES[0];
    let fixed = plan_json(name, extra, HUGE, &["--offload", "sequential"]);
    for c in fixed["components"].as_array().unwrap() {
        assert_eq!(c["strategy"], "sequential", "{fixed}");
        assert_eq!(c["fixed"], true);
    }
    // --keep-on-device without --offload: that one resident, the rest planned.
    let all = plan_json(name, extra, HUGE, &[]);
    let (p_group, _) = runner_up(&all, "--offload group");
    let (p_model, _) = runner_up(&all, "--offload model");
    let kept = plan_json(
        name,
        extra,
        budget_for((p_group + p_model) / 2),
        &["--keep-on-device", "vae"],
    );
    assert_eq!(strategy(&kept, "vae"), "none", "{kept}");
    assert_eq!(strategy(&kept, "unet"), "group", "{kept}");
    // A fixed group size: the resident groups are still the planner's.
    let g = plan_json(
        name,
        extra,
        budget_for((p_group + p_model) / 2),
        &["--offload", "group", "--blocks-per-group", "2"],
    );
    let unet = g["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "unet")
        .unwrap();
    assert_eq!(unet["blocks_per_group"], 2, "{g}");
    // A fixed strategy that cannot fit is refused, not overridden.
    let m = s(&model(name)).to_string();
    let b = ((runner_up(&all, "--offload sequential").0 + p_group) / 2).to_string();
    let mut a = vec!["plan"];
    a.extend(args(name, &m, extra, &b));
    a.extend(["--offload", "none"]);
    fails(&a, &["no plan fits"]);
    // Flags that need a budget or group offload.
    let mut a = vec!["generate", "--model", &m, "--prompt", "x", "--allow-lossy"];
    a.extend_from_slice(extra);
    fails(&a, &["--allow-lossy", "--memory-budget"]);
    let mut a = vec![
        "generate",
        "--model",
        &m,
        "--prompt",
        "x",
        "--resident-groups",
        "2",
    ];
    a.extend_from_slice(extra);
    fails(&a, &["--resident-groups", "--offload group"]);
}

/// The tensors of a run, bit for bit.
fn tensors(path: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec()))
        .collect();
    v.sort();
    v
}

#[test]
fn planned_runs_are_bit_identical_stay_under_budget_and_report_the_plan() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, denoiser, extra) in &FAMILIES[..1] {
        let (name, denoiser, extra) = (*name, *denoiser, *extra);
        let m = s(&model(name)).to_string();
        let out = |tag: &str, ext: &str| tmp.path().join(format!("{name}-{tag}.{ext}"));
        let video = name.contains("wan");
        let img = if video { "mp4" } else { "png" };
        let mut a = vec!["generate", "--model", &m, "--prompt", PROMPT];
        a.extend_from_slice(extra);
        let (o, t) = (out("none", img), out("none", "safetensors"));
        let mut base = a.clone();
        base.extend(["--out", s(&o), "--save-tensors", s(&t)]);
        ok(&base);
        let all = plan_json(name, extra, HUGE, &[]);
        let (p_group, _) = runner_up(&all, "--offload group");
        let (p_model, _) = runner_up(&all, "--offload model");
        let budget = budget_for((p_group + p_model) / 2).to_string();
        let (o2, t2, rep, svg) = (
            out("plan", img),
            out("plan", "safetensors"),
            out("plan", "json"),
            out("plan", "svg"),
        );
        let mut planned = a.clone();
        planned.extend([
            "--plan-baseline",
            PLAN_BASELINE,
            "--memory-budget",
            &budget,
            "--out",
            s(&o2),
            "--save-tensors",
            s(&t2),
            "--report",
            s(&rep),
            "--report-plot",
            s(&svg),
        ]);
        let run = ok(&planned);
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(err.contains("plan for --memory-budget"), "{err}");
        assert_eq!(
            tensors(&t),
            tensors(&t2),
            "{name}: planned run differs from none"
        );

        let r: Value = serde_json::from_slice(&std::fs::read(&rep).unwrap()).unwrap();
        let plan = &r["plan"];
        let b: u64 = budget.parse().unwrap();
        assert_eq!(plan["budget_bytes"], b);
        assert_eq!(strategy(plan, denoiser), "group", "{name}: {plan}");
        assert!(plan["predicted_peak_bytes"].as_u64().unwrap() <= b);
        // Measured: the resident weights (plus what the process held before) and every phase's
        // peak RSS under the budget.
        let baseline = plan["baseline_bytes"].as_u64().unwrap();
        let resident = r["peak_resident_bytes"].as_u64().unwrap();
        assert!(
            baseline + resident <= b,
            "{name}: {baseline} + {resident} > {b}"
        );
        for p in plan["phases"].as_array().unwrap() {
            let measured = p["measured_peak_bytes"]
                .as_u64()
                .unwrap_or_else(|| panic!("{name}: phase without a measured peak: {p}"));
            assert!(measured <= b, "{name}: {p}");
        }
        // The timeline: every planned phase ran, in order, with its component.
        let ran: Vec<&str> = r["timeline"]["phases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        let planned_phases: Vec<&str> = plan["phases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["component"].as_str().unwrap())
            .collect();
        assert_eq!(ran, planned_phases, "{name}");
        let steps = r["step_seconds"].as_array().unwrap().len();
        assert_eq!(r["timeline"]["steps"].as_array().unwrap().len(), steps);

        // The plot: well-formed SVG with the components and the budget.
        let text = std::fs::read_to_string(&svg).unwrap();
        let doc = roxmltree::Document::parse(&text).expect("the plot is well-formed SVG");
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        assert!(text.contains(denoiser) && text.contains("budget"), "{name}");
        // And again from the saved report, as a PNG.
        let png = out("replot", "png");
        ok(&["plot", s(&rep), "-o", s(&png)]);
        let im = image::open(&png).expect("the plot decodes as PNG");
        assert!(im.width() > 100 && im.height() > 100);
    }
}

#[test]
fn partial_residency_from_the_command_line_is_bit_identical_in_every_family() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, _, extra) in FAMILIES {
        let m = s(&model(name)).to_string();
        let mut got = Vec::new();
        for (tag, flags) in [
            ("none", &[][..]),
            (
                "resident",
                &["--offload", "group", "--resident-groups", "2"][..],
            ),
            (
                "bytes",
                &["--offload", "group", "--resident-bytes", "100KiB"][..],
            ),
        ] {
            let t = tmp.path().join(format!("{name}-{tag}.safetensors"));
            let o = tmp.path().join(format!(
                "{name}-{tag}.{}",
                if name.contains("wan") { "mp4" } else { "png" }
            ));
            let mut a = vec!["generate", "--model", &m, "--prompt", PROMPT];
            a.extend_from_slice(extra);
            a.extend_from_slice(flags);
            a.extend(["--out", s(&o), "--save-tensors", s(&t)]);
            ok(&a);
            got.push(tensors(&t));
        }
        assert_eq!(got[0], got[1], "{name}: --resident-groups");
        assert_eq!(got[0], got[2], "{name}: --resident-bytes");
    }
}

#[test]
fn bad_budgets_and_plot_inputs_are_clear_errors() {
    let (name, _, extra) = FAMILIES[0];
    let m = s(&model(name)).to_string();
    for (budget, expect) in [
        ("lots", "not a size"),
        ("gpu=3GiB", "unknown memory"),
        ("cuda=2GiB", "no limit for the execution device"),
    ] {
        let mut a = vec![
            "plan",
            "--model",
            &m,
            "--prompt",
            "x",
            "--memory-budget",
            budget,
        ];
        a.extend_from_slice(extra);
        fails(&a, &[expect]);
    }
    let mut a = vec!["plan", "--model", &m, "--prompt", "x"];
    a.extend_from_slice(extra);
    fails(&a, &["needs --memory-budget"]);
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("r.json");
    std::fs::write(&bad, "{\"peak_resident_bytes\": 1}").unwrap();
    fails(
        &["plot", s(&bad), "-o", s(&tmp.path().join("m.svg"))],
        &["no `timeline`"],
    );
    fails(
        &["plot", s(&bad), "-o", s(&tmp.path().join("m.txt"))],
        &["svg"],
    );
}

mod library {
    //! Every family through the library, with the baseline fixed at 0 so that budgets can sit
    //! between plans that differ by a few hundred kilobytes of tiny weights.

    use super::*;
    use lowtide::pipelines::planning::{apply_plan, plan_run, Budget, PlanOptions};
    use lowtide::pipelines::{GenerateRequest, LoadOptions, Pipeline};
    use lowtide::planner::Plan;

    fn request(name: &str) -> GenerateRequest {
        let mut r = GenerateRequest {
            prompt: PROMPT.into(),
            steps: 2,
            guidance: if name.contains("sd") { 7.5 } else { 3.5 },
            seed: 3,
            width: Some(32),
            height: Some(32),
            ..GenerateRequest::default()
        };
        if !name.contains("sd") {
            r.max_sequence_length = Some(8);
        }
        if name.contains("wan") {
            r.frames = Some(5);
            r.guidance = 5.0;
        }
        r
    }

    fn open(name: &str) -> Box<dyn Pipeline> {
        lowtide::pipelines::load(&model(name), LoadOptions::default()).unwrap()
    }

    fn plan(pipe: &dyn Pipeline, req: &GenerateRequest, budget: u64) -> lowtide::Result<Plan> {
        plan_run(
            pipe,
            req,
            &PlanOptions {
                budget: Budget {
                    plain: Some(budget),
                    ..Budget::default()
                },
                baseline: Some(0),
                ..PlanOptions::default()
            },
        )
    }

    fn peak(p: &Plan, label: &str) -> u64 {
        p.runners_up
            .iter()
            .find(|r| r.description == label)
            .unwrap()
            .predicted_peak_bytes
    }

    fn strategy_of(p: &Plan, c: &str) -> String {
        p.components
            .iter()
            .find(|x| x.name == c)
            .unwrap()
            .strategy
            .clone()
    }

    #[test]
    fn budgets_force_each_kind_of_plan_in_every_family() {
        for (name, denoiser, _) in FAMILIES {
            let req = request(name);
            let pipe = open(name);
            let base = pipe.generate(&req, &mut |_, _| {}).unwrap();
            let all = plan(pipe.as_ref(), &req, HUGE).unwrap();
            assert!(
                all.components
                    .iter()
                    .all(|c| c.strategy == "none" || c.strategy == "model"),
                "{name}: {}",
                all.describe()
            );
            let (p_model, p_group, p_seq) = (
                peak(&all, "--offload model"),
                peak(&all, "--offload group"),
                peak(&all, "--offload sequential"),
            );
            assert!(
                p_seq < p_group && p_group < p_model,
                "{name}: {}",
                all.describe()
            );
            let kinds = [
                ("partial", budget_for(p_model - 1)),
                ("sequential", budget_for((p_seq + p_group) / 2)),
            ];
            for (kind, budget) in kinds {
                let mut pipe = open(name);
                let p = plan(pipe.as_ref(), &req, budget).unwrap();
                // The component whose phase peaks highest under model offload is the one the
                // budget forces (the denoiser, or a tiny pipeline's VAE).
                let forced = all
                    .phases
                    .iter()
                    .max_by_key(|ph| ph.predicted_peak_bytes)
                    .map(|ph| ph.component.clone())
                    .unwrap();
                let _ = denoiser;
                let s = strategy_of(&p, &forced);
                match kind {
                    "partial" => {
                        assert_eq!(s, "group", "{name}: {}", p.describe());
                        // SD's UNet has groups small enough to keep some next to the stream;
                        // the tiny transformers' stems (kept under group offload) leave no
                        // room for one.
                        let d = p.components.iter().find(|c| c.name == forced).unwrap();
                        if name.contains("sd") {
                            assert!(d.resident_groups.unwrap() >= 1, "{name}: {}", p.describe());
                        }
                    }
                    _ => assert!(
                        p.components.iter().any(|c| c.strategy == "sequential"),
                        "{name}: {}",
                        p.describe()
                    ),
                }
                let mut r = req.clone();
                apply_plan(pipe.as_mut(), &p, &mut r).unwrap();
                pipe.base().accounting.reset();
                let out = pipe.generate(&r, &mut |_, _| {}).unwrap();
                // Exact: the same numbers as without any offloading.
                assert_eq!(
                    bits(&out.final_latents),
                    bits(&base.final_latents),
                    "{name} {kind}"
                );
                assert_eq!(bits(&out.image), bits(&base.image), "{name} {kind}");
                // Measured: each phase's resident weights, with its predicted activations,
                // within the budget; and the weights never above the prediction.
                let report = pipe.base().accounting.report();
                let mut next = 0;
                for ph in &p.phases {
                    let i = report.timeline.phases[next..]
                        .iter()
                        .position(|t| t.name == ph.component)
                        .unwrap_or_else(|| panic!("{name}: phase {} did not run", ph.label));
                    let t = &report.timeline.phases[next + i];
                    next += i + 1;
                    assert!(
                        t.peak_resident_bytes <= ph.weights_bytes,
                        "{name} {kind} {}: {} resident > {} predicted",
                        ph.label,
                        t.peak_resident_bytes,
                        ph.weights_bytes
                    );
                    assert!(t.peak_resident_bytes + ph.activation_bytes <= budget);
                }
            }
            // Below every plan: the error names the minimum.
            let e = plan(pipe.as_ref(), &req, p_seq / 2)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("no plan fits") && e.contains("needs about"),
                "{name}: {e}"
            );
        }
    }
}
