//! `--memory-budget` for any pipeline: the planner's inputs gathered from what a family declares
//! (its components' sizes and `Pipeline::phases`), the machine's rates measured, the chosen plan
//! applied to the pipeline and the request. No family code here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::{GenerateRequest, OffloadPlan, Pipeline};
use crate::error::{Error, Result};
use crate::planner::{Calibration, Constraints, Plan};
use crate::residency::accounting::current_rss;
use crate::residency::device_map::parse_bytes;
use crate::residency::manager::Resident;
use crate::residency::Strategy;

/// `--memory-budget`: one size (the execution device's: the process's RAM on the CPU), or
/// `cuda=10GiB,cpu=24GiB` (device memory, and host RAM as a second limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    /// A plain size: the execution device's.
    pub plain: Option<u64>,
    /// `cuda=SIZE`: GPU memory.
    pub cuda: Option<u64>,
    /// `cpu=SIZE`: host RAM (on the CPU the process's; on a GPU the second limit, which
    /// bounds the pinned host tier).
    pub cpu: Option<u64>,
}

impl Budget {
    pub fn parse(s: &str) -> Result<Self> {
        if !s.contains('=') {
            return Ok(Self {
                plain: Some(parse_bytes(s)?),
                ..Self::default()
            });
        }
        let mut out = Self::default();
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "--memory-budget `{part}`: write SIZE, or cuda=SIZE,cpu=SIZE"
                ))
            })?;
            let v = parse_bytes(v)?;
            match k.trim() {
                k if k.starts_with("cuda") => out.cuda = Some(v),
                "cpu" => out.cpu = Some(v),
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "--memory-budget: unknown memory `{other}`; use cuda=SIZE and/or cpu=SIZE"
                    )))
                }
            }
        }
        Ok(out)
    }

    /// The limit the plan is made against on `device`.
    pub fn for_device(&self, device: &Device) -> Result<u64> {
        let b = if device.is_cpu() {
            self.cpu.or(self.plain)
        } else {
            self.cuda.or(self.plain)
        };
        b.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "--memory-budget names no limit for the execution device ({}); give {}=SIZE \
                 or a plain SIZE",
                device_name(device),
                device_name(device)
            ))
        })
    }
}

/// What a run holds on the CPU beyond the RSS measured when it is planned: the compute
/// threads' heaps and stacks, the RSS sampler (measured on the SD 1.5 architecture: the text
/// encoding phase sits 20 MiB above what was held at planning).
pub const RUN_OVERHEAD: u64 = 24 << 20;

/// The share of the budget a plan leaves free: the activation estimates' error (within ±5 %
/// of the measured peaks on the SD 1.5 architecture) must not take a run over the budget.
pub const MARGIN: f64 = 0.03;

/// What the user asked of the planner besides the budget.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    pub budget: Budget,
    pub allow_lossy: bool,
    /// Strategies the user gave explicitly, per component.
    pub fixed: BTreeMap<String, Strategy>,
    pub fixed_resident: Option<Resident>,
    /// What the process (device) holds before any weight is loaded; `None` measures it (the
    /// RSS now on the CPU, the used device memory on a GPU). A program embedding lowtide that
    /// will hold more can say so here.
    pub baseline: Option<u64>,
}

/// Plans a run of `req` on `pipe` (nothing is loaded but a few tensors timed for the read rate).
pub fn plan_run(pipe: &dyn Pipeline, req: &GenerateRequest, opts: &PlanOptions) -> Result<Plan> {
    let base = pipe.base();
    let device = base.options.device.clone();
    let budget = opts.budget.for_device(&device)?;
    // What opening the pipeline freed (parsed headers and configs) goes back first, as it
    // does before the run's first phase.
    crate::alloc::release_free_memory();
    let baseline = opts
        .baseline
        .unwrap_or_else(|| match crate::device::device_memory(&device) {
            Some(m) => m.total_bytes.saturating_sub(m.free_bytes),
            None => current_rss().unwrap_or(0) + RUN_OVERHEAD,
        });
    let cons = Constraints {
        budget,
        margin: MARGIN,
        baseline,
        allow_lossy: opts.allow_lossy,
        fixed: opts.fixed.clone(),
        fixed_resident: opts.fixed_resident,
        overlapped_transfers: !device.is_cpu(),
    };
    let phases = pipe.phases(req)?;
    let cal = calibrate(pipe)?;
    crate::planner::plan(&base.component_infos(), &phases, &cons, &cal)
}

/// Sets the plan's strategies and partial residency on the pipeline and its VAE choices on the
/// request (which then needs no VAE budget of its own).
pub fn apply_plan(pipe: &mut dyn Pipeline, plan: &Plan, req: &mut GenerateRequest) -> Result<()> {
    let mut per_component = BTreeMap::new();
    for c in &plan.components {
        if let Some((s, _)) = c.choice {
            per_component.insert(c.name.clone(), s);
        }
    }
    pipe.base_mut().set_offload(&OffloadPlan {
        default: Strategy::None,
        per_component,
        keep_on_device: Vec::new(),
        resident: BTreeMap::new(),
    })?;
    for c in &plan.components {
        if let Some((_, r)) = c.choice {
            pipe.base().component(&c.name)?.weights.set_resident(r)?;
        }
    }
    if let Some(t) = plan.vae.tile_size {
        req.vae.tiling = true;
        req.vae.tile_size = Some(t);
    }
    req.vae.slicing |= plan.vae.slicing;
    if req.decode_chunk_size.is_none() {
        req.decode_chunk_size = plan.vae.decode_chunk.filter(|&c| c != 1);
    }
    req.vae.memory_budget = None;
    Ok(())
}

/// The machine's rates: the GEMM rate is measured once per machine and cached
/// (`$LOWTIDE_CACHE_DIR`, else `$XDG_CACHE_HOME/lowtide`, else `~/.cache/lowtide`, file
/// `machine.json`, keyed by the CPU model, the thread count and the device); the read rate is
/// measured on every plan by loading the denoiser's largest tensors (up to 256 MiB) the way a
/// run loads them, because it depends on whether this model's files are in the page cache now.
pub fn calibrate(pipe: &dyn Pipeline) -> Result<Calibration> {
    let base = pipe.base();
    let device = base.options.device.clone();
    let key = format!(
        "{} / {} threads / {}",
        cpu_model(),
        rayon::current_num_threads(),
        device_name(&device)
    );
    let cache = cache_file();
    let cached: Option<f64> = cache
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|s| serde_json::from_str::<BTreeMap<String, f64>>(&s).ok())
        .and_then(|m| m.get(&key).copied());
    let (flops, source) = match cached {
        Some(f) if f > 0.0 => (f, "GEMM rate cached per machine, read rate measured now"),
        _ => {
            let f = gemm_rate(&device)?;
            if let Some(p) = &cache {
                let mut m: BTreeMap<String, f64> = std::fs::read_to_string(p)
                    .ok()
                    .and_then(|s| serde_json::from_str(&s).ok())
                    .unwrap_or_default();
                m.insert(key, f);
                if let Some(dir) = p.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                // A cache: failing to write it only means measuring again next time.
                let _ = serde_json::to_string_pretty(&m)
                    .map(|s| crate::io::write_atomic(p, s.as_bytes()));
            }
            (f, "GEMM rate and read rate measured now")
        }
    };
    Ok(Calibration {
        read_bytes_per_s: read_rate(pipe)?,
        flops_per_s: flops,
        source: source.into(),
    })
}

fn cache_file() -> Option<PathBuf> {
    let dir = std::env::var_os("LOWTIDE_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("lowtide")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/lowtide")))?;
    Some(dir.join("machine.json"))
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// f32 GEMM rate of the kernels a run uses: a 512 × 1024 × 1024 linear, best of four.
fn gemm_rate(device: &Device) -> Result<f64> {
    let (m, k, n) = (512usize, 1024usize, 1024usize);
    let x = Tensor::ones((m, k), DType::F32, device)?;
    let w = Tensor::ones((n, k), DType::F32, device)?;
    let mut best = f64::MAX;
    for _ in 0..4 {
        let t0 = Instant::now();
        let y = if device.is_cpu() {
            crate::layers::dense::linear(&x, &w, None)?
        } else {
            x.matmul(&w.t()?)?
        };
        device.synchronize()?;
        drop(y);
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(2.0 * (m * k * n) as f64 / best.max(1e-9))
}

/// Bytes per second of loading weights now: the largest tensors of the largest component, read
/// as a run reads them (mapped or converted to the compute dtype), up to 256 MiB.
fn read_rate(pipe: &dyn Pipeline) -> Result<f64> {
    let base = pipe.base();
    let Some(c) = base
        .components
        .iter()
        .max_by_key(|c| c.weights.total_bytes())
    else {
        return Ok(1e9);
    };
    let store = c.weights.store();
    let mut tensors: Vec<(&String, u64, Vec<usize>)> = store
        .names()
        .filter_map(|n| store.get(n).map(|t| (n, t.nbytes(), t.shape.clone())))
        .collect();
    tensors.sort_by_key(|t| std::cmp::Reverse(t.1));
    let (mut bytes, mut secs) = (0u64, 0f64);
    for (name, _, shape) in tensors {
        if bytes >= 256 << 20 {
            break;
        }
        let t0 = Instant::now();
        let t = store.load(name, &shape, base.options.dtype, &base.options.device)?;
        base.options.device.synchronize()?;
        secs += t0.elapsed().as_secs_f64();
        bytes += (t.elem_count() * t.dtype().size_in_bytes()) as u64;
    }
    crate::alloc::release_free_memory();
    Ok(if secs > 0.0 && bytes > 0 {
        bytes as f64 / secs
    } else {
        1e9
    })
}

fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        other => format!("{other:?}"),
    }
}
