//! `FlowMatchEulerDiscreteScheduler` (diffusers 0.42.1): Euler steps along a rectified-flow
//! trajectory, `x_next = x + (sigma_next - sigma) * v`, with FLUX's resolution-dependent shift.
//!
//! diffusers builds the schedule in float32 numpy when the pipeline passes `sigmas` (FLUX does)
//! and in float64 otherwise, then stores float32. Both paths are mirrored: f32 arithmetic is done
//! as an f64 operation rounded to f32 after each step, which gives the same bits as native f32
//! for `+ - * /`.

use candle_core::{DType, Tensor};

use super::{linspace_f64, refuse_true, sigma_index, Scheduler, SchedulerConfig, StepIndex, FILE};
use crate::error::{Error, Result};
use crate::rng::TorchRng;

/// diffusers' `calculate_shift` (pipelines/flux/pipeline_flux.py): `mu` grows linearly with the
/// image token count, from `base_shift` at `base_seq_len` to `max_shift` at `max_seq_len`.
pub fn calculate_shift(
    image_seq_len: usize,
    base_seq_len: usize,
    max_seq_len: usize,
    base_shift: f64,
    max_shift: f64,
) -> f64 {
    let m = (max_shift - base_shift) / (max_seq_len as f64 - base_seq_len as f64);
    let b = base_shift - m * base_seq_len as f64;
    image_seq_len as f64 * m + b
}

/// The sigmas the FLUX pipeline passes: `np.linspace(1.0, 1 / steps, steps)`.
pub fn flux_sigmas(steps: usize) -> Vec<f64> {
    linspace_f64(1.0, 1.0 / steps as f64, steps)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeShift {
    Exponential,
    Linear,
}

/// A `FlowMatchEulerDiscreteScheduler` config with diffusers' defaults filled in and checked.
#[derive(Debug, Clone)]
pub struct FlowMatchConfig {
    pub num_train_timesteps: usize,
    pub shift: f64,
    pub use_dynamic_shifting: bool,
    pub base_shift: f64,
    pub max_shift: f64,
    pub base_image_seq_len: usize,
    pub max_image_seq_len: usize,
    pub invert_sigmas: bool,
    pub shift_terminal: Option<f64>,
    pub time_shift_type: TimeShift,
}

fn finite(field: &str, v: f64) -> Result<f64> {
    if !v.is_finite() {
        return Err(Error::unsupported(
            FILE,
            field,
            v,
            "must be a finite number",
        ));
    }
    Ok(v)
}

impl FlowMatchConfig {
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        let n = cfg.num_train_timesteps.unwrap_or(1000);
        if n == 0 {
            return Err(Error::unsupported(
                FILE,
                "num_train_timesteps",
                0,
                "must be positive",
            ));
        }
        let shift = finite("shift", cfg.shift.unwrap_or(1.0))?;
        if shift <= 0.0 {
            return Err(Error::unsupported(FILE, "shift", shift, "must be positive"));
        }
        let base_shift = finite("base_shift", cfg.base_shift.unwrap_or(0.5))?;
        let max_shift = finite("max_shift", cfg.max_shift.unwrap_or(1.15))?;
        let base_image_seq_len = cfg.base_image_seq_len.unwrap_or(256);
        let max_image_seq_len = cfg.max_image_seq_len.unwrap_or(4096);
        if base_image_seq_len == max_image_seq_len {
            return Err(Error::unsupported(
                FILE,
                "max_image_seq_len",
                max_image_seq_len,
                "must differ from base_image_seq_len (the shift is interpolated between them)",
            ));
        }
        // diffusers tests `if shift_terminal:`, so 0 means "off".
        let shift_terminal = match cfg.shift_terminal {
            Some(t) if t != 0.0 => {
                let t = finite("shift_terminal", t)?;
                if t >= 1.0 {
                    return Err(Error::unsupported(
                        FILE,
                        "shift_terminal",
                        t,
                        "must be below 1",
                    ));
                }
                Some(t)
            }
            _ => None,
        };
        let time_shift_type = match cfg.time_shift_type.as_deref().unwrap_or("exponential") {
            "exponential" => TimeShift::Exponential,
            "linear" => TimeShift::Linear,
            other => {
                return Err(Error::unsupported(
                    FILE,
                    "time_shift_type",
                    format!("\"{other}\""),
                    "supported: exponential, linear",
                ))
            }
        };
        refuse_true("use_karras_sigmas", cfg.use_karras_sigmas)?;
        refuse_true("use_exponential_sigmas", cfg.use_exponential_sigmas)?;
        refuse_true("use_beta_sigmas", cfg.use_beta_sigmas)?;
        refuse_true("stochastic_sampling", cfg.stochastic_sampling)?;
        Ok(Self {
            num_train_timesteps: n,
            shift,
            use_dynamic_shifting: cfg.use_dynamic_shifting.unwrap_or(false),
            base_shift,
            max_shift,
            base_image_seq_len,
            max_image_seq_len,
            invert_sigmas: cfg.invert_sigmas.unwrap_or(false),
            shift_terminal,
            time_shift_type,
        })
    }

    /// `mu` for an image of `image_seq_len` packed tokens, from this config's shift range (what
    /// the FLUX pipeline passes to `set_timesteps`).
    pub fn mu(&self, image_seq_len: usize) -> f64 {
        calculate_shift(
            image_seq_len,
            self.base_image_seq_len,
            self.max_image_seq_len,
            self.base_shift,
            self.max_shift,
        )
    }

    /// The shifts of `set_timesteps` on `s`, every operation rounded by `r` (to f32, or not).
    fn shift_sigmas(&self, s: &[f64], mu: Option<f64>, r: impl Fn(f64) -> f64) -> Vec<f64> {
        let mut out: Vec<f64> = match (self.use_dynamic_shifting, mu) {
            (true, Some(mu)) => {
                // `time_shift(mu, 1.0, t)`: the `** 1.0` is exact.
                let m = match self.time_shift_type {
                    TimeShift::Exponential => r(mu.exp()),
                    TimeShift::Linear => r(mu),
                };
                s.iter()
                    .map(|&t| {
                        let x = r(r(1.0 / t) - 1.0);
                        r(m / r(m + x))
                    })
                    .collect()
            }
            _ => {
                let (a, b) = (r(self.shift), r(self.shift - 1.0));
                s.iter().map(|&t| r(r(a * t) / r(1.0 + r(b * t)))).collect()
            }
        };
        if let (Some(st), Some(&last)) = (self.shift_terminal, out.last()) {
            // `stretch_shift_to_terminal`.
            let scale = r(r(1.0 - last) / r(1.0 - st));
            for v in &mut out {
                *v = r(1.0 - r(r(1.0 - *v) / scale));
            }
        }
        out
    }
}

fn to_f32(x: f64) -> f64 {
    x as f32 as f64
}

/// diffusers' `FlowMatchEulerDiscreteScheduler` after `set_timesteps`.
pub struct FlowMatchEulerDiscrete {
    cfg: FlowMatchConfig,
    timesteps: Vec<f64>,
    /// The schedule's sigmas and the terminal one (0, or 1 with `invert_sigmas`), float32.
    sigmas: Vec<f32>,
    idx: StepIndex,
}

impl FlowMatchEulerDiscrete {
    /// `set_timesteps(steps, sigmas=sigmas, mu=mu)`. The FLUX pipeline passes
    /// [`flux_sigmas`]`(steps)` and `mu = cfg.mu(image_seq_len)`; `mu` is required when the
    /// config has `use_dynamic_shifting` and ignored otherwise, as in diffusers.
    pub fn new(
        cfg: &SchedulerConfig,
        steps: usize,
        sigmas: Option<&[f64]>,
        mu: Option<f64>,
    ) -> Result<Self> {
        Self::with_config(FlowMatchConfig::from_config(cfg)?, steps, sigmas, mu)
    }

    pub fn with_config(
        cfg: FlowMatchConfig,
        steps: usize,
        sigmas: Option<&[f64]>,
        mu: Option<f64>,
    ) -> Result<Self> {
        if steps == 0 {
            return Err(Error::InvalidArgument("--steps must be at least 1".into()));
        }
        if cfg.use_dynamic_shifting {
            match mu {
                None => {
                    return Err(Error::InvalidArgument(
                        "this scheduler has use_dynamic_shifting: it needs `mu` (from the image \
                         sequence length, see calculate_shift)"
                            .into(),
                    ))
                }
                Some(m) if !m.is_finite() => {
                    return Err(Error::InvalidArgument(format!(
                        "the dynamic shift `mu` must be finite, got {m}"
                    )))
                }
                Some(m) if cfg.time_shift_type == TimeShift::Linear && m <= 0.0 => {
                    return Err(Error::InvalidArgument(format!(
                        "a linear time shift needs a positive `mu`, got {m}"
                    )))
                }
                _ => {}
            }
        }
        let n = cfg.num_train_timesteps as f64;
        let shifted: Vec<f64> = match sigmas {
            Some(s) => {
                if s.len() != steps {
                    return Err(Error::InvalidArgument(format!(
                        "{} custom sigmas given for {steps} steps",
                        s.len()
                    )));
                }
                if let Some(bad) = s.iter().find(|v| !(0.0..=1.0).contains(*v)) {
                    return Err(Error::InvalidArgument(format!(
                        "custom sigmas must lie in [0, 1], got {bad}"
                    )));
                }
                // `np.array(sigmas).astype(np.float32)`, then float32 numpy arithmetic.
                let s: Vec<f64> = s.iter().map(|&v| to_f32(v)).collect();
                cfg.shift_sigmas(&s, mu, to_f32)
            }
            None => {
                // `__init__`'s float32 table (shifted there already unless dynamic), whose ends
                // become float64 and are interpolated and shifted (again) in float64.
                let init = |t: f64| -> f64 {
                    let s = to_f32(t / n);
                    if cfg.use_dynamic_shifting {
                        s
                    } else {
                        let (a, b) = (to_f32(cfg.shift), to_f32(cfg.shift - 1.0));
                        to_f32(to_f32(a * s) / to_f32(1.0 + to_f32(b * s)))
                    }
                };
                let (sigma_max, sigma_min) = (init(n), init(1.0));
                let ts = linspace_f64(sigma_max * n, sigma_min * n, steps);
                let s: Vec<f64> = ts.iter().map(|t| t / n).collect();
                cfg.shift_sigmas(&s, mu, |x| x)
            }
        };
        // shift_terminal divides by `1 - last sigma`: one step ending at sigma 1 gives NaN there.
        if shifted.iter().any(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "the {steps}-step schedule is not finite (shift_terminal needs a last sigma \
                 below 1; use more steps)"
            )));
        }
        let mut sigmas: Vec<f32> = shifted.iter().map(|&v| v as f32).collect();
        let terminal = if cfg.invert_sigmas {
            for s in &mut sigmas {
                *s = 1.0 - *s;
            }
            1.0
        } else {
            0.0
        };
        let nf = cfg.num_train_timesteps as f32;
        let timesteps = sigmas.iter().map(|&s| (s * nf) as f64).collect();
        sigmas.push(terminal);
        Ok(Self {
            cfg,
            timesteps,
            sigmas,
            idx: StepIndex::default(),
        })
    }

    /// The Euler alternative to a Wan pipeline's UniPC: `FlowMatchEulerDiscreteScheduler`
    /// from that UniPC config with `shift = flow_shift` (what
    /// `FlowMatchEulerDiscreteScheduler.from_config(unipc_config, shift=flow_shift)` gives), then
    /// `set_timesteps(steps)` without custom sigmas, as `WanPipeline` calls it.
    pub fn with_flow_shift(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let shift = finite("flow_shift", cfg.flow_shift.unwrap_or(1.0))?;
        if shift <= 0.0 {
            return Err(Error::unsupported(
                FILE,
                "flow_shift",
                shift,
                "must be positive",
            ));
        }
        let fm = FlowMatchConfig {
            shift,
            ..FlowMatchConfig::from_config(cfg)?
        };
        Self::with_config(fm, steps, None, None)
    }

    pub fn config(&self) -> &FlowMatchConfig {
        &self.cfg
    }

    /// The sigmas of the schedule with the terminal one appended (steps + 1 values).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// `scale_noise`: the flow-matching forward process `sigma * noise + (1 - sigma) * sample`
    /// at timestep `t` (img2img), in the sample's dtype.
    pub fn scale_noise(&self, sample: &Tensor, t: f64, noise: &Tensor) -> Result<Tensor> {
        let i = sigma_index(&self.timesteps, self.idx.begin, self.idx.step, t)?;
        let sigma = self.sigmas[i];
        let noise = noise.to_dtype(sample.dtype())?;
        Ok(((noise * sigma as f64)? + (sample * (1.0 - sigma) as f64)?)?)
    }
}

impl Scheduler for FlowMatchEulerDiscrete {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    /// `prev = sample + (sigma_next - sigma) * model_output`, the sample upcast to f32 as
    /// diffusers does and the result in the model output's dtype.
    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        _rng: &mut TorchRng,
    ) -> Result<Tensor> {
        let i = self.idx.get(&self.timesteps, t)?;
        if i + 1 >= self.sigmas.len() {
            return Err(Error::InvalidArgument(format!(
                "step {i} is past the end of a {}-step schedule",
                self.timesteps.len()
            )));
        }
        let dt = self.sigmas[i + 1] - self.sigmas[i];
        let update = (model_output.to_dtype(DType::F32)? * dt as f64)?;
        let prev = (sample.to_dtype(DType::F32)? + update)?;
        self.idx.advance();
        Ok(prev.to_dtype(model_output.dtype())?)
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, t: f64) -> Result<Tensor> {
        self.scale_noise(original, t, noise)
    }
    fn set_begin_index(&mut self, i: usize) {
        self.idx.begin = Some(i);
    }
}
