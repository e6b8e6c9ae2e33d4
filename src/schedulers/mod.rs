//! Noise schedulers, built from `scheduler_config.json` and switchable by name.
//!
//! Switching keeps diffusers' `from_config` semantics: a key present in the file wins, a key
//! absent takes the chosen scheduler's own default, and a key the scheduler does not know is
//! ignored. Values this crate does not implement are refused with an error.

mod ddim;
mod dpmpp_2m;
mod euler;
mod flow_match;
mod pndm;
mod unipc;

use candle_core::Tensor;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::rng::TorchRng;

pub use ddim::Ddim;
pub use dpmpp_2m::DpmSolverMultistep;
pub use euler::{Euler, EulerAncestral};
pub use flow_match::{
    calculate_shift, flux_sigmas, FlowMatchConfig, FlowMatchEulerDiscrete, TimeShift,
};
pub use pndm::Pndm;
pub use unipc::{FinalSigma, SolverType, UniPcConfig, UniPcMultistep};

const FILE: &str = "scheduler/scheduler_config.json";

/// Every field optional: absence means "the scheduler's own default".
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<usize>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub set_alpha_to_one: Option<bool>,
    pub skip_prk_steps: Option<bool>,
    pub thresholding: Option<bool>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub final_sigmas_type: Option<String>,
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
    pub lambda_min_clipped: Option<f64>,
    pub variance_type: Option<String>,
    // FlowMatchEulerDiscreteScheduler.
    pub shift: Option<f64>,
    pub use_dynamic_shifting: Option<bool>,
    pub base_shift: Option<f64>,
    pub max_shift: Option<f64>,
    pub base_image_seq_len: Option<usize>,
    pub max_image_seq_len: Option<usize>,
    pub invert_sigmas: Option<bool>,
    pub shift_terminal: Option<f64>,
    pub time_shift_type: Option<String>,
    pub stochastic_sampling: Option<bool>,
    // UniPCMultistepScheduler.
    pub use_flow_sigmas: Option<bool>,
    pub flow_shift: Option<f64>,
    pub predict_x0: Option<bool>,
    pub disable_corrector: Option<Vec<usize>>,
    pub solver_p: Option<serde_json::Value>,
}

/// The schedulers lowtide implements, by their CLI names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Pndm,
    Ddim,
    Euler,
    EulerAncestral,
    DpmPp2m,
    /// `UniPCMultistepScheduler` on flow sigmas (Wan).
    UniPc,
    /// `FlowMatchEulerDiscreteScheduler` with the static shift of a UniPC config's
    /// `flow_shift` (Wan's alternative).
    FlowEuler,
}

impl SchedulerKind {
    pub const NAMES: &'static str = "pndm, ddim, euler, euler-a, dpmpp-2m, unipc, flow-euler";

    pub fn from_cli(name: &str) -> Result<Self> {
        Ok(match name {
            "pndm" => Self::Pndm,
            "ddim" => Self::Ddim,
            "euler" => Self::Euler,
            "euler-a" => Self::EulerAncestral,
            "dpmpp-2m" => Self::DpmPp2m,
            "unipc" => Self::UniPc,
            "flow-euler" => Self::FlowEuler,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown scheduler `{other}`; choose one of {}",
                    Self::NAMES
                )))
            }
        })
    }

    /// The scheduler a `_class_name` in scheduler_config.json names.
    pub fn from_class_name(name: &str) -> Result<Self> {
        Ok(match name {
            "PNDMScheduler" => Self::Pndm,
            "DDIMScheduler" => Self::Ddim,
            "EulerDiscreteScheduler" => Self::Euler,
            "EulerAncestralDiscreteScheduler" => Self::EulerAncestral,
            "DPMSolverMultistepScheduler" => Self::DpmPp2m,
            other => {
                return Err(Error::unsupported(
                    FILE,
                    "_class_name",
                    format!("\"{other}\""),
                    format!(
                        "pick a supported scheduler with --scheduler ({})",
                        Self::NAMES
                    ),
                ))
            }
        })
    }
}

/// What a denoising loop needs from a scheduler.
pub trait Scheduler {
    /// The timesteps to run, in order (one UNet call each).
    fn timesteps(&self) -> &[f64];
    /// The initial noise's scale (1 for DDPM-style and flow schedulers).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// The model input for `sample` at `t` (unchanged unless the scheduler scales it).
    fn scale_model_input(&mut self, sample: &Tensor, _t: f64) -> Result<Tensor> {
        Ok(sample.clone())
    }
    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        rng: &mut TorchRng,
    ) -> Result<Tensor>;
    /// Noises clean latents to timestep `t` (img2img).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, t: f64) -> Result<Tensor>;
    /// diffusers' `scheduler.order` (timesteps per solver step).
    fn order(&self) -> usize {
        1
    }
    /// Starts the step counter at `i` (img2img), for schedulers that keep one.
    fn set_begin_index(&mut self, _i: usize) {}
}

/// Builds a scheduler of `kind` for `steps` inference steps from a config.
pub fn build(
    kind: SchedulerKind,
    cfg: &SchedulerConfig,
    steps: usize,
) -> Result<Box<dyn Scheduler>> {
    if steps == 0 {
        return Err(Error::InvalidArgument("--steps must be at least 1".into()));
    }
    // The flow-matching schedulers read their own config fields and build their own schedule
    // (float timesteps for flow-euler, repeats allowed mid-schedule for UniPC).
    match kind {
        SchedulerKind::UniPc => return Ok(Box::new(UniPcMultistep::new(cfg, steps)?)),
        SchedulerKind::FlowEuler => {
            // A flow schedule on an epsilon/v model (SD) would run and give noise.
            let flow = cfg.prediction_type.as_deref() == Some("flow_prediction")
                || cfg.class_name.as_deref() == Some("FlowMatchEulerDiscreteScheduler");
            if !flow {
                return Err(Error::InvalidArgument(
                    "--scheduler flow-euler is for flow-matching models (Wan); this model's \
                     scheduler config is not one"
                        .into(),
                ));
            }
            return Ok(Box::new(FlowMatchEulerDiscrete::with_flow_shift(
                cfg, steps,
            )?));
        }
        _ => {}
    }
    let common = Common::new(kind, cfg)?;
    if steps > common.num_train_timesteps {
        return Err(Error::InvalidArgument(format!(
            "--steps {steps} exceeds the scheduler's {} training timesteps",
            common.num_train_timesteps
        )));
    }
    let n = common.num_train_timesteps;
    let offset = common.steps_offset;
    let sched: Box<dyn Scheduler> = match kind {
        SchedulerKind::Pndm => Box::new(Pndm::new(common, cfg, steps)?),
        SchedulerKind::Ddim => Box::new(Ddim::new(common, cfg, steps)?),
        SchedulerKind::Euler => Box::new(Euler::new(common, cfg, steps)?),
        SchedulerKind::EulerAncestral => Box::new(EulerAncestral::new(common, cfg, steps)?),
        SchedulerKind::DpmPp2m => Box::new(DpmSolverMultistep::new(common, cfg, steps)?),
        SchedulerKind::UniPc | SchedulerKind::FlowEuler => {
            return Err(Error::InvalidArgument(format!("{kind:?} is built above")))
        }
    };
    // Every timestep must index the training schedule; checked here, before any model work,
    // instead of failing at the step that would read past the table.
    if let Some(&t) = sched
        .timesteps()
        .iter()
        .find(|&&t| !(t.is_finite() && t >= 0.0 && t <= (n - 1) as f64))
    {
        return Err(Error::InvalidArgument(format!(
            "--steps {steps} with steps_offset {offset} in {FILE} gives timestep {t}, outside the \
             scheduler's {n} training timesteps (0..{}); use fewer steps or fix the config",
            n - 1
        )));
    }
    // Each step needs its own timestep; spacing rules can collapse them (DPM-Solver's leading
    // spacing divides by steps + 1: at 1000 steps every timestep is the same and the solver
    // divides by zero).
    let mut distinct: Vec<f64> = sched.timesteps().to_vec();
    distinct.sort_by(f64::total_cmp);
    distinct.dedup();
    if distinct.len() < steps {
        return Err(Error::InvalidArgument(format!(
            "--steps {steps} is more than this scheduler can space over {n} training timesteps \
             (only {} distinct timesteps; see timestep_spacing and steps_offset in {FILE}); use \
             fewer steps",
            distinct.len()
        )));
    }
    Ok(sched)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

/// What every scheduler shares: the beta schedule and the spacing rules.
#[derive(Debug, Clone)]
pub struct Common {
    pub num_train_timesteps: usize,
    pub alphas_cumprod: Vec<f32>,
    pub prediction: Prediction,
    pub spacing: Spacing,
    pub steps_offset: usize,
}

/// Refuses a boolean option this crate does not implement when it is set.
fn refuse_true(field: &str, v: Option<bool>) -> Result<()> {
    refuse_true_because(field, v, "not supported; set it to false")
}

/// [`refuse_true`] with a reason of the scheduler's own.
fn refuse_true_because(field: &str, v: Option<bool>, hint: &str) -> Result<()> {
    if v == Some(true) {
        return Err(Error::unsupported(FILE, field, "true", hint));
    }
    Ok(())
}

impl Common {
    fn new(kind: SchedulerKind, cfg: &SchedulerConfig) -> Result<Self> {
        let n = cfg.num_train_timesteps.unwrap_or(1000);
        if n == 0 {
            return Err(Error::unsupported(
                FILE,
                "num_train_timesteps",
                0,
                "must be positive",
            ));
        }
        let default_schedule = match kind {
            SchedulerKind::Pndm
            | SchedulerKind::Ddim
            | SchedulerKind::Euler
            | SchedulerKind::EulerAncestral
            | SchedulerKind::DpmPp2m
            | SchedulerKind::UniPc
            | SchedulerKind::FlowEuler => "linear",
        };
        crate::validate::count(FILE, "num_train_timesteps", n, 1, 1_000_000)?;
        let schedule = cfg.beta_schedule.as_deref().unwrap_or(default_schedule);
        let b0 = cfg.beta_start.unwrap_or(0.0001);
        let b1 = cfg.beta_end.unwrap_or(0.02);
        for (field, b) in [("beta_start", b0), ("beta_end", b1)] {
            if !(b > 0.0 && b < 1.0) {
                return Err(Error::unsupported(
                    FILE,
                    field,
                    b,
                    "must be in (0, 1): a beta of 1 or more leaves no signal (a black image)",
                ));
            }
        }
        let betas: Vec<f32> = if let Some(tb) = &cfg.trained_betas {
            tb.iter().map(|&b| b as f32).collect()
        } else {
            match schedule {
                "linear" => linspace_f32(b0 as f32, b1 as f32, n),
                "scaled_linear" => linspace_f32(b0.sqrt() as f32, b1.sqrt() as f32, n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect(),
                "squaredcos_cap_v2" => {
                    let f = |t: f64| {
                        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                            .cos()
                            .powi(2)
                    };
                    (0..n)
                        .map(|i| {
                            let t1 = i as f64 / n as f64;
                            let t2 = (i + 1) as f64 / n as f64;
                            (1.0 - f(t2) / f(t1)).min(0.999) as f32
                        })
                        .collect()
                }
                other => {
                    return Err(Error::unsupported(
                        FILE,
                        "beta_schedule",
                        format!("\"{other}\""),
                        "supported: linear, scaled_linear, squaredcos_cap_v2",
                    ))
                }
            }
        };
        if let Some(b) = betas.iter().find(|&&b| !(b > 0.0 && b < 1.0)) {
            return Err(Error::unsupported(
                FILE,
                "trained_betas",
                b,
                "every beta must be in (0, 1)",
            ));
        }
        if betas.len() != n {
            return Err(Error::unsupported(
                FILE,
                "trained_betas",
                format!("{} values", betas.len()),
                format!("needs num_train_timesteps ({n}) values"),
            ));
        }
        // torch's CPU cumprod accumulates in double and stores float32.
        let mut acc = 1f64;
        let alphas_cumprod = betas
            .iter()
            .map(|&b| {
                acc *= (1.0f32 - b) as f64;
                acc as f32
            })
            .collect();
        let prediction = match cfg.prediction_type.as_deref().unwrap_or("epsilon") {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            "sample" => Prediction::Sample,
            other => {
                return Err(Error::unsupported(
                    FILE,
                    "prediction_type",
                    format!("\"{other}\""),
                    "supported: epsilon, v_prediction, sample",
                ))
            }
        };
        let default_spacing = match kind {
            SchedulerKind::Pndm | SchedulerKind::Ddim => "leading",
            _ => "linspace",
        };
        let spacing = match cfg.timestep_spacing.as_deref().unwrap_or(default_spacing) {
            "linspace" => Spacing::Linspace,
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            other => {
                return Err(Error::unsupported(
                    FILE,
                    "timestep_spacing",
                    format!("\"{other}\""),
                    "supported: linspace, leading, trailing",
                ))
            }
        };
        refuse_true("rescale_betas_zero_snr", cfg.rescale_betas_zero_snr)?;
        refuse_true("thresholding", cfg.thresholding)?;
        refuse_true("use_karras_sigmas", cfg.use_karras_sigmas)?;
        refuse_true("use_exponential_sigmas", cfg.use_exponential_sigmas)?;
        refuse_true("use_beta_sigmas", cfg.use_beta_sigmas)?;
        refuse_true("use_lu_lambdas", cfg.use_lu_lambdas)?;
        Ok(Self {
            num_train_timesteps: n,
            alphas_cumprod,
            prediction,
            spacing,
            steps_offset: crate::validate::count(
                FILE,
                "steps_offset",
                cfg.steps_offset.unwrap_or(0),
                0,
                n - 1,
            )?,
        })
    }

    pub fn acp(&self, t: i64) -> f64 {
        self.alphas_cumprod[t as usize] as f64
    }

    /// `((1 - acp) / acp) ** 0.5` for every training timestep, in float32 as numpy does it.
    pub fn train_sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect()
    }
}

/// torch.linspace in float32 (first half from the start, second half from the end).
pub fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - i - 1) as f32
            }
        })
        .collect()
}

/// numpy's float64 linspace.
pub fn linspace_f64(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
    v[n - 1] = end;
    v
}

/// numpy's `round` (half to even).
pub fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// numpy's `np.interp(x, arange(len(fp)), fp)` for x inside the range.
pub fn interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let i = x.floor() as usize;
    let frac = x - i as f64;
    let (a, b) = (fp[i] as f64, fp[i + 1] as f64);
    // numpy: slope * (x - xp[i]) + fp[i]
    (b - a) * frac + a
}

/// diffusers' `index_for_timestep`: the second match if the timestep repeats, else the first.
fn index_for_timestep(timesteps: &[f64], t: f64) -> Result<usize> {
    let hits: Vec<usize> = timesteps
        .iter()
        .enumerate()
        .filter(|(_, &x)| x == t)
        .map(|(i, _)| i)
        .collect();
    match hits.len() {
        0 => Err(Error::InvalidArgument(format!(
            "timestep {t} is not in the schedule"
        ))),
        1 => Ok(hits[0]),
        _ => Ok(hits[1]),
    }
}

/// diffusers' step-index bookkeeping for sigma-based schedulers.
#[derive(Debug, Default, Clone)]
struct StepIndex {
    step: Option<usize>,
    begin: Option<usize>,
}

impl StepIndex {
    fn get(&mut self, timesteps: &[f64], t: f64) -> Result<usize> {
        if self.step.is_none() {
            self.step = Some(match self.begin {
                Some(b) => b,
                None => index_for_timestep(timesteps, t)?,
            });
        }
        Ok(self.step.unwrap_or(0))
    }
    fn advance(&mut self) {
        self.step = self.step.map(|s| s + 1);
    }
}

/// Sigma-based schedulers' `add_noise`: the index of `t` (or the begin index) into the sigmas.
fn sigma_index(
    timesteps: &[f64],
    begin: Option<usize>,
    step: Option<usize>,
    t: f64,
) -> Result<usize> {
    match (begin, step) {
        (None, _) => index_for_timestep(timesteps, t),
        (Some(_), Some(s)) => Ok(s),
        (Some(b), None) => Ok(b),
    }
}

/// Integer timesteps for `steps` under a spacing rule (PNDM/DDIM style, descending).
pub fn discrete_timesteps(c: &Common, steps: usize) -> Vec<i64> {
    let n = c.num_train_timesteps;
    match c.spacing {
        Spacing::Linspace => linspace_f64(0.0, (n - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|x| round_half_even(x) as i64)
            .collect(),
        Spacing::Leading => {
            let ratio = n / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + c.steps_offset) as i64)
                .collect()
        }
        Spacing::Trailing => {
            let ratio = n as f64 / steps as f64;
            arange_desc(n as f64, ratio)
                .into_iter()
                .map(|x| round_half_even(x) as i64 - 1)
                .collect()
        }
    }
}

/// numpy's `np.arange(start, 0, -step)`.
fn arange_desc(start: f64, step: f64) -> Vec<f64> {
    let count = (start / step).ceil() as usize;
    (0..count).map(|i| start - i as f64 * step).collect()
}

fn scaled(t: &Tensor, a: f64) -> Result<Tensor> {
    Ok((t * a)?)
}

/// `a * x + b * y`.
fn lincomb(x: &Tensor, a: f64, y: &Tensor, b: f64) -> Result<Tensor> {
    Ok(((x * a)? + (y * b)?)?)
}
