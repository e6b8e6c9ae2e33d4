//! `PNDMScheduler`: pseudo-numerical methods (Runge-Kutta warm-up, then linear multistep).

use candle_core::Tensor;

use super::{discrete_timesteps, lincomb, scaled, Common, Prediction, Scheduler, SchedulerConfig};
use crate::error::{Error, Result};
use crate::rng::TorchRng;

pub struct Pndm {
    c: Common,
    steps: usize,
    skip_prk: bool,
    final_alpha_cumprod: f64,
    prk_timesteps: Vec<i64>,
    timesteps: Vec<f64>,
    ets: Vec<Tensor>,
    counter: usize,
    cur_model_output: Option<Tensor>,
    cur_sample: Option<Tensor>,
}

impl Pndm {
    pub fn new(c: Common, cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        if c.prediction == Prediction::Sample {
            return Err(Error::unsupported(
                "scheduler/scheduler_config.json",
                "prediction_type",
                "\"sample\"",
                "PNDM supports epsilon and v_prediction",
            ));
        }
        let skip_prk = cfg.skip_prk_steps.unwrap_or(false);
        let set_alpha_to_one = cfg.set_alpha_to_one.unwrap_or(false);
        let final_alpha_cumprod = if set_alpha_to_one { 1.0 } else { c.acp(0) };
        // Ascending, as diffusers' `_timesteps`.
        let mut ts = discrete_timesteps(&c, steps);
        ts.reverse();
        let half = (c.num_train_timesteps / steps / 2) as i64;
        let (prk, plms): (Vec<i64>, Vec<i64>) = if skip_prk {
            let n = ts.len();
            let mut plms: Vec<i64> = ts[..n - 1].to_vec();
            if n >= 2 {
                plms.push(ts[n - 2]);
            }
            plms.push(ts[n - 1]);
            plms.reverse();
            (vec![], plms)
        } else {
            let order = 4usize;
            let tail = &ts[ts.len().saturating_sub(order)..];
            // repeat(2) + tile([0, half]) then [:-1].repeat(2)[1:-1][::-1]
            let rep: Vec<i64> = tail.iter().flat_map(|&t| [t, t + half]).collect();
            let cut = &rep[..rep.len() - 1];
            let twice: Vec<i64> = cut.iter().flat_map(|&t| [t, t]).collect();
            let mut prk = twice[1..twice.len() - 1].to_vec();
            prk.reverse();
            let mut plms: Vec<i64> = ts[..ts.len().saturating_sub(3)].to_vec();
            plms.reverse();
            (prk, plms)
        };
        let timesteps = prk.iter().chain(plms.iter()).map(|&t| t as f64).collect();
        Ok(Self {
            c,
            steps,
            skip_prk,
            final_alpha_cumprod,
            prk_timesteps: prk,
            timesteps,
            ets: vec![],
            counter: 0,
            cur_model_output: None,
            cur_sample: None,
        })
    }

    fn prev_sample(&self, sample: &Tensor, t: i64, prev_t: i64, out: &Tensor) -> Result<Tensor> {
        let a_t = self.c.acp(t);
        let a_prev = if prev_t >= 0 {
            self.c.acp(prev_t)
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let out = if self.c.prediction == Prediction::VPrediction {
            lincomb(out, a_t.sqrt(), sample, b_t.sqrt())?
        } else {
            out.clone()
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        lincomb(sample, sample_coeff, &out, -(a_prev - a_t) / denom)
    }

    fn ratio(&self) -> i64 {
        (self.c.num_train_timesteps / self.steps) as i64
    }

    fn step_prk(&mut self, out: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        let diff = if self.counter % 2 == 1 {
            0
        } else {
            self.ratio() / 2
        };
        let prev_t = t - diff;
        let t = self.prk_timesteps[self.counter / 4 * 4];
        let acc = |cur: &Option<Tensor>, w: f64| -> Result<Tensor> {
            let add = scaled(out, w)?;
            Ok(match cur {
                Some(c) => (c + add)?,
                None => add,
            })
        };
        let model_output = match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(acc(&self.cur_model_output, 1.0 / 6.0)?);
                self.ets.push(out.clone());
                self.cur_sample = Some(sample.clone());
                out.clone()
            }
            1 | 2 => {
                self.cur_model_output = Some(acc(&self.cur_model_output, 1.0 / 3.0)?);
                out.clone()
            }
            _ => {
                let m = acc(&self.cur_model_output, 1.0 / 6.0)?;
                self.cur_model_output = None;
                m
            }
        };
        let cur = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        let prev = self.prev_sample(&cur, t, prev_t, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    fn step_plms(&mut self, out: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        let mut t = t;
        let mut prev_t = t - self.ratio();
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(out.clone());
        } else {
            prev_t = t;
            t += self.ratio();
        }
        let e = &self.ets;
        let n = e.len();
        let mut sample = sample.clone();
        let model_output = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            out.clone()
        } else if n == 1 && self.counter == 1 {
            sample = self.cur_sample.take().unwrap_or(sample);
            ((out + &e[n - 1])? / 2.0)?
        } else if n == 2 {
            lincomb(&e[n - 1], 1.5, &e[n - 2], -0.5)?
        } else if n == 3 {
            let a = lincomb(&e[n - 1], 23.0, &e[n - 2], -16.0)?;
            ((a + (&e[n - 3] * 5.0)?)? / 12.0)?
        } else {
            let a = lincomb(&e[n - 1], 55.0, &e[n - 2], -59.0)?;
            let b = lincomb(&e[n - 3], 37.0, &e[n - 4], -9.0)?;
            ((a + b)? * (1.0 / 24.0))?
        };
        let prev = self.prev_sample(&sample, t, prev_t, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }
}

impl Scheduler for Pndm {
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
        if self.counter < self.prk_timesteps.len() && !self.skip_prk {
            self.step_prk(out, t as i64, sample)
        } else {
            self.step_plms(out, t as i64, sample)
        }
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, t: f64) -> Result<Tensor> {
        let a = self.c.acp(t as i64);
        lincomb(original, a.sqrt(), noise, (1.0 - a).sqrt())
    }
}
