//! `DDIMScheduler` with eta = 0 (deterministic), as the SD pipelines call it.

use candle_core::Tensor;

use super::{discrete_timesteps, lincomb, Common, Prediction, Scheduler, SchedulerConfig};
use crate::error::Result;
use crate::rng::TorchRng;

pub struct Ddim {
    c: Common,
    steps: usize,
    final_alpha_cumprod: f64,
    clip_sample: Option<f64>,
    timesteps: Vec<f64>,
}

impl Ddim {
    pub fn new(c: Common, cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            c.acp(0)
        };
        let clip_sample = cfg
            .clip_sample
            .unwrap_or(true)
            .then(|| cfg.clip_sample_range.unwrap_or(1.0));
        let timesteps = discrete_timesteps(&c, steps)
            .into_iter()
            .map(|t| t as f64)
            .collect();
        Ok(Self {
            c,
            steps,
            final_alpha_cumprod,
            clip_sample,
            timesteps,
        })
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn step(
        &mut self,
        out: &Tensor,
        t: f64,
        sample: &Tensor,
        _rng: &mut TorchRng,
    ) -> Result<Tensor> {
        let t = t as i64;
        let prev_t = t - (self.c.num_train_timesteps / self.steps) as i64;
        let a_t = self.c.acp(t);
        let a_prev = if prev_t >= 0 {
            self.c.acp(prev_t)
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let (mut x0, eps) = match self.c.prediction {
            Prediction::Epsilon => (((sample - (out * b_t.sqrt())?)? / a_t.sqrt())?, out.clone()),
            Prediction::VPrediction => (
                lincomb(sample, a_t.sqrt(), out, -b_t.sqrt())?,
                lincomb(out, a_t.sqrt(), sample, b_t.sqrt())?,
            ),
            Prediction::Sample => (out.clone(), ((sample - (out * a_t.sqrt())?)? / b_t.sqrt())?),
        };
        if let Some(r) = self.clip_sample {
            x0 = x0.clamp(-r as f32, r as f32)?;
        }
        lincomb(&x0, a_prev.sqrt(), &eps, (1.0 - a_prev).sqrt())
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, t: f64) -> Result<Tensor> {
        let a = self.c.acp(t as i64);
        lincomb(original, a.sqrt(), noise, (1.0 - a).sqrt())
    }
}
