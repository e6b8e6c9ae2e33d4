//! `DPMSolverMultistepScheduler` as DPM-Solver++(2M): `algorithm_type="dpmsolver++"`,
//! `solver_order=2`, midpoint solver, zero final sigma.

use candle_core::Tensor;

use super::{
    arange_desc, interp, linspace_f64, round_half_even, sigma_index, Common, Prediction, Scheduler,
    SchedulerConfig, Spacing, StepIndex,
};
use crate::error::{Error, Result};
use crate::rng::TorchRng;

const FILE: &str = "scheduler/scheduler_config.json";

pub struct DpmSolverMultistep {
    c: Common,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    model_outputs: [Option<Tensor>; 2],
    lower_order_nums: usize,
    idx: StepIndex,
}

/// (alpha_t, sigma_t) of a k-diffusion sigma.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let a = 1.0 / (sigma * sigma + 1.0).sqrt();
    (a, sigma * a)
}

fn lambda(sigma: f64) -> f64 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

impl DpmSolverMultistep {
    pub fn new(c: Common, cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let checks = [
            (
                "algorithm_type",
                cfg.algorithm_type.as_deref(),
                "dpmsolver++",
            ),
            ("solver_type", cfg.solver_type.as_deref(), "midpoint"),
            (
                "final_sigmas_type",
                cfg.final_sigmas_type.as_deref(),
                "zero",
            ),
        ];
        for (field, v, want) in checks {
            if let Some(v) = v.filter(|v| *v != want) {
                return Err(Error::unsupported(
                    FILE,
                    field,
                    format!("\"{v}\""),
                    format!("only \"{want}\""),
                ));
            }
        }
        if let Some(o) = cfg.solver_order.filter(|&o| o != 2) {
            return Err(Error::unsupported(
                FILE,
                "solver_order",
                o,
                "only 2 (DPM-Solver++ 2M)",
            ));
        }
        if let Some(v) = cfg.variance_type.as_deref() {
            return Err(Error::unsupported(
                FILE,
                "variance_type",
                format!("\"{v}\""),
                "only null",
            ));
        }
        if cfg.lambda_min_clipped.is_some_and(|l| l.is_finite()) {
            return Err(Error::unsupported(
                FILE,
                "lambda_min_clipped",
                cfg.lambda_min_clipped.unwrap_or_default(),
                "only -inf",
            ));
        }
        let n = c.num_train_timesteps;
        let ts: Vec<i64> = match c.spacing {
            Spacing::Linspace => {
                let mut v: Vec<i64> = linspace_f64(0.0, (n - 1) as f64, steps + 1)
                    .into_iter()
                    .rev()
                    .map(|x| round_half_even(x) as i64)
                    .collect();
                v.pop();
                v
            }
            Spacing::Leading => {
                let ratio = n / (steps + 1);
                let mut v: Vec<i64> = (0..=steps)
                    .rev()
                    .map(|i| (i * ratio + c.steps_offset) as i64)
                    .collect();
                v.pop();
                v
            }
            Spacing::Trailing => arange_desc(n as f64, n as f64 / steps as f64)
                .into_iter()
                .map(|x| round_half_even(x) as i64 - 1)
                .collect(),
        };
        let train = c.train_sigmas();
        let mut sigmas: Vec<f32> = ts
            .iter()
            .map(|&t| interp(t as f64, &train) as f32)
            .collect();
        sigmas.push(0.0);
        Ok(Self {
            c,
            timesteps: ts.into_iter().map(|t| t as f64).collect(),
            sigmas,
            model_outputs: [None, None],
            lower_order_nums: 0,
            idx: StepIndex::default(),
        })
    }

    fn convert(&self, out: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let (a, s) = alpha_sigma(self.sigmas[i] as f64);
        Ok(match self.c.prediction {
            Prediction::Epsilon => ((sample - (out * s)?)? / a)?,
            Prediction::VPrediction => ((sample * a)? - (out * s)?)?,
            Prediction::Sample => out.clone(),
        })
    }
}

impl Scheduler for DpmSolverMultistep {
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
        let i = self.idx.get(&self.timesteps, t)?;
        let n = self.timesteps.len();
        // With a zero final sigma (the only kind supported) the last step is always first
        // order, whatever `lower_order_final` / `euler_at_final` say.
        let lower_final = i == n - 1;
        let x0 = self.convert(out, sample, i)?;
        self.model_outputs[0] = self.model_outputs[1].take();
        self.model_outputs[1] = Some(x0.clone());

        let s_t = self.sigmas[i + 1] as f64;
        let s_0 = self.sigmas[i] as f64;
        let (a_t, sig_t) = alpha_sigma(s_t);
        let (_, sig_0) = alpha_sigma(s_0);
        let h = lambda(s_t) - lambda(s_0);
        let em1 = (-h).exp() - 1.0;
        let first = self.lower_order_nums < 1 || lower_final;
        let prev = if first {
            ((sample * (sig_t / sig_0))? - (&x0 * (a_t * em1))?)?
        } else {
            let m1 = self.model_outputs[0]
                .as_ref()
                .ok_or_else(|| Error::InvalidArgument("DPM-Solver++ history is empty".into()))?;
            let s_1 = self.sigmas[i - 1] as f64;
            let h0 = lambda(s_0) - lambda(s_1);
            let r0 = h0 / h;
            let d1 = ((&x0 - m1)? * (1.0 / r0))?;
            (((sample * (sig_t / sig_0))? - (&x0 * (a_t * em1))?)? - (d1 * (0.5 * a_t * em1))?)?
        };
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        self.idx.advance();
        Ok(prev)
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, t: f64) -> Result<Tensor> {
        let i = sigma_index(&self.timesteps, self.idx.begin, self.idx.step, t)?;
        let (a, s) = alpha_sigma(self.sigmas[i] as f64);
        Ok(((original * a)? + (noise * s)?)?)
    }
    fn order(&self) -> usize {
        1
    }
    fn set_begin_index(&mut self, i: usize) {
        self.idx.begin = Some(i);
    }
}
