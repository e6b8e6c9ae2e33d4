//! `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler` (k-diffusion style sigmas).

use candle_core::Tensor;

use super::{
    arange_desc, interp, linspace_f64, round_half_even, sigma_index, Common, Prediction, Scheduler,
    SchedulerConfig, Spacing, StepIndex,
};
use crate::error::{Error, Result};
use crate::rng::TorchRng;

const FILE: &str = "scheduler/scheduler_config.json";

/// Float timesteps and sigmas (with the final zero) shared by both Euler variants.
fn euler_schedule(c: &Common, cfg: &SchedulerConfig, steps: usize) -> Result<(Vec<f64>, Vec<f32>)> {
    if let Some(i) = cfg.interpolation_type.as_deref().filter(|i| *i != "linear") {
        return Err(Error::unsupported(
            FILE,
            "interpolation_type",
            format!("\"{i}\""),
            "only linear",
        ));
    }
    if let Some(t) = cfg.timestep_type.as_deref().filter(|t| *t != "discrete") {
        return Err(Error::unsupported(
            FILE,
            "timestep_type",
            format!("\"{t}\""),
            "only discrete",
        ));
    }
    if let Some(f) = cfg.final_sigmas_type.as_deref().filter(|f| *f != "zero") {
        return Err(Error::unsupported(
            FILE,
            "final_sigmas_type",
            format!("\"{f}\""),
            "only zero",
        ));
    }
    let n = c.num_train_timesteps;
    let ts: Vec<f32> = match c.spacing {
        Spacing::Linspace => linspace_f64(0.0, (n - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|x| x as f32)
            .collect(),
        Spacing::Leading => {
            let ratio = n / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio) as f32 + c.steps_offset as f32)
                .collect()
        }
        Spacing::Trailing => arange_desc(n as f64, n as f64 / steps as f64)
            .into_iter()
            .map(|x| round_half_even(x) as f32 - 1.0)
            .collect(),
    };
    let train = c.train_sigmas();
    let mut sigmas: Vec<f32> = ts
        .iter()
        .map(|&t| interp(t as f64, &train) as f32)
        .collect();
    sigmas.push(0.0);
    Ok((ts.into_iter().map(|t| t as f64).collect(), sigmas))
}

fn init_sigma(c: &Common, sigmas: &[f32]) -> f64 {
    let max = sigmas.iter().fold(0f32, |a, &b| a.max(b)) as f64;
    match c.spacing {
        Spacing::Linspace | Spacing::Trailing => max,
        Spacing::Leading => (max * max + 1.0).sqrt(),
    }
}

fn predict_x0(c: &Common, out: &Tensor, sample: &Tensor, sigma: f64) -> Result<Tensor> {
    Ok(match c.prediction {
        Prediction::Epsilon => (sample - (out * sigma)?)?,
        Prediction::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            ((out * (-sigma / s2.sqrt()))? + (sample / s2)?)?
        }
        Prediction::Sample => out.clone(),
    })
}

pub struct Euler {
    c: Common,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    idx: StepIndex,
}

impl Euler {
    pub fn new(c: Common, cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let (timesteps, sigmas) = euler_schedule(&c, cfg, steps)?;
        Ok(Self {
            c,
            timesteps,
            sigmas,
            idx: StepIndex::default(),
        })
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f64 {
        init_sigma(&self.c, &self.sigmas)
    }
    fn scale_model_input(&mut self, sample: &Tensor, t: f64) -> Result<Tensor> {
        let i = self.idx.get(&self.timesteps, t)?;
        let s = self.sigmas[i] as f64;
        Ok((sample / (s * s + 1.0).sqrt())?)
    }
    fn step(
        &mut self,
        out: &Tensor,
        t: f64,
        sample: &Tensor,
        _rng: &mut TorchRng,
    ) -> Result<Tensor> {
        let i = self.idx.get(&self.timesteps, t)?;
        let sigma = self.sigmas[i] as f64;
        let x0 = predict_x0(&self.c, out, sample, sigma)?;
        let derivative = ((sample - x0)? / sigma)?;
        let dt = self.sigmas[i + 1] as f64 - sigma;
        self.idx.advance();
        Ok((sample + (derivative * dt)?)?)
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, t: f64) -> Result<Tensor> {
        let i = sigma_index(&self.timesteps, self.idx.begin, self.idx.step, t)?;
        Ok((original + (noise * self.sigmas[i] as f64)?)?)
    }
    fn set_begin_index(&mut self, i: usize) {
        self.idx.begin = Some(i);
    }
}

pub struct EulerAncestral {
    c: Common,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    idx: StepIndex,
}

impl EulerAncestral {
    pub fn new(c: Common, cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let (timesteps, sigmas) = euler_schedule(&c, cfg, steps)?;
        Ok(Self {
            c,
            timesteps,
            sigmas,
            idx: StepIndex::default(),
        })
    }
}

impl Scheduler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f64 {
        init_sigma(&self.c, &self.sigmas)
    }
    fn scale_model_input(&mut self, sample: &Tensor, t: f64) -> Result<Tensor> {
        let i = self.idx.get(&self.timesteps, t)?;
        let s = self.sigmas[i] as f64;
        Ok((sample / (s * s + 1.0).sqrt())?)
    }
    fn step(
        &mut self,
        out: &Tensor,
        t: f64,
        sample: &Tensor,
        rng: &mut TorchRng,
    ) -> Result<Tensor> {
        let i = self.idx.get(&self.timesteps, t)?;
        let sigma = self.sigmas[i] as f64;
        let x0 = predict_x0(&self.c, out, sample, sigma)?;
        let (from, to) = (sigma, self.sigmas[i + 1] as f64);
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).sqrt();
        let derivative = ((sample - x0)? / sigma)?;
        let prev = (sample + (derivative * (down - sigma))?)?;
        // diffusers draws the noise on every step, the last one included.
        let noise = Tensor::from_vec(rng.randn(out.elem_count()), out.shape(), out.device())?
            .to_dtype(out.dtype())?;
        self.idx.advance();
        Ok((prev + (noise * up)?)?)
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, t: f64) -> Result<Tensor> {
        let i = sigma_index(&self.timesteps, self.idx.begin, self.idx.step, t)?;
        Ok((original + (noise * self.sigmas[i] as f64)?)?)
    }
    fn set_begin_index(&mut self, i: usize) {
        self.idx.begin = Some(i);
    }
}
