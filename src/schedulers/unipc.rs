//! `UniPCMultistepScheduler` (diffusers 0.42.1) on flow-matching sigmas, as Wan 2.1 / 2.2 use
//! it: `use_flow_sigmas`, `prediction_type="flow_prediction"`, `predict_x0`. Each step corrects
//! the previous prediction with the new model output (UniC) and predicts the next sample with a
//! multistep B(h) solver (UniP), the order warming up over the first steps and dropping to 1 at
//! the end with `lower_order_final`.
//!
//! Numerics follow diffusers: `set_timesteps` in float64 numpy, the sigmas then stored as
//! float32; the solver's scalars (alphas, lambdas, `h`, the B(h) coefficients, the small linear
//! solve) are 0-dim float32 tensors there, so they are f32 here; the tensor updates run in the
//! sample's dtype, operation by operation as diffusers writes them.

use candle_core::Tensor;

use super::{
    linspace_f64, refuse_true_because, sigma_index, Scheduler, SchedulerConfig, StepIndex, FILE,
};
use crate::error::{Error, Result};
use crate::rng::TorchRng;

/// `solver_type`: the B(h) of the update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverType {
    /// `B(h) = h`.
    Bh1,
    /// `B(h) = e^h - 1`.
    Bh2,
}

/// `final_sigmas_type`: the sigma after the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigma {
    Zero,
    /// The last sigma of the schedule (the last step leaves that much noise).
    SigmaMin,
}

/// A `UniPCMultistepScheduler` config with diffusers' defaults filled in and checked.
#[derive(Debug, Clone)]
pub struct UniPcConfig {
    pub num_train_timesteps: usize,
    pub solver_order: usize,
    pub solver_type: SolverType,
    pub lower_order_final: bool,
    /// Step indices whose corrector is skipped (`disable_corrector`).
    pub disable_corrector: Vec<usize>,
    pub flow_shift: f64,
    pub final_sigmas_type: FinalSigma,
}

impl UniPcConfig {
    pub fn from_config(cfg: &SchedulerConfig) -> Result<Self> {
        let n = crate::validate::count(
            FILE,
            "num_train_timesteps",
            cfg.num_train_timesteps.unwrap_or(1000),
            1,
            1_000_000,
        )?;
        let flow_only = "lowtide implements UniPC for flow-matching models (Wan)";
        if cfg.use_flow_sigmas != Some(true) {
            return Err(Error::unsupported(
                FILE,
                "use_flow_sigmas",
                cfg.use_flow_sigmas.unwrap_or(false),
                format!("only true: {flow_only}"),
            ));
        }
        let prediction = cfg.prediction_type.as_deref().unwrap_or("epsilon");
        if prediction != "flow_prediction" {
            return Err(Error::unsupported(
                FILE,
                "prediction_type",
                format!("\"{prediction}\""),
                format!("only \"flow_prediction\": {flow_only}"),
            ));
        }
        // diffusers raises for flow_prediction without predict_x0 too.
        if cfg.predict_x0 == Some(false) {
            return Err(Error::unsupported(
                FILE,
                "predict_x0",
                false,
                "flow_prediction needs predict_x0 = true",
            ));
        }
        let solver_order =
            crate::validate::count(FILE, "solver_order", cfg.solver_order.unwrap_or(2), 1, 3)?;
        // diffusers maps the DPM-Solver names to bh2 (`register_to_config(solver_type="bh2")`).
        let solver_type = match cfg.solver_type.as_deref().unwrap_or("bh2") {
            "bh1" => SolverType::Bh1,
            "bh2" | "midpoint" | "heun" | "logrho" => SolverType::Bh2,
            other => {
                return Err(Error::unsupported(
                    FILE,
                    "solver_type",
                    format!("\"{other}\""),
                    "supported: bh1, bh2",
                ))
            }
        };
        let final_sigmas_type = match cfg.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => FinalSigma::Zero,
            "sigma_min" => FinalSigma::SigmaMin,
            other => {
                return Err(Error::unsupported(
                    FILE,
                    "final_sigmas_type",
                    format!("\"{other}\""),
                    "supported: zero, sigma_min",
                ))
            }
        };
        let lower_order_final = cfg.lower_order_final.unwrap_or(true);
        // The last step's size h is infinite onto a zero final sigma and zero onto sigma_min
        // (the last sigma again). diffusers ends these combinations in inf/NaN or a singular
        // solve: bh1 onto zero, and a last step of order above 1 (zero) or 2 (sigma_min).
        if final_sigmas_type == FinalSigma::Zero && solver_type == SolverType::Bh1 {
            return Err(Error::unsupported(
                FILE,
                "solver_type",
                "\"bh1\"",
                "bh1 with final_sigmas_type \"zero\" ends in NaN (in diffusers too); use bh2 or \
                 final_sigmas_type \"sigma_min\"",
            ));
        }
        let last_order_limit = match final_sigmas_type {
            FinalSigma::Zero => 1,
            FinalSigma::SigmaMin => 2,
        };
        if !lower_order_final && solver_order > last_order_limit {
            return Err(Error::unsupported(
                FILE,
                "lower_order_final",
                false,
                format!(
                    "a last step of order {solver_order} onto final_sigmas_type {:?} ends in \
                     inf/NaN (in diffusers too); set it to true",
                    cfg.final_sigmas_type.as_deref().unwrap_or("zero")
                ),
            ));
        }
        // Checked for its name only: the flow sigmas replace the spaced timesteps.
        match cfg.timestep_spacing.as_deref().unwrap_or("linspace") {
            "linspace" | "leading" | "trailing" => {}
            other => {
                return Err(Error::unsupported(
                    FILE,
                    "timestep_spacing",
                    format!("\"{other}\""),
                    "supported: linspace, leading, trailing",
                ))
            }
        }
        let flow_shift = cfg.flow_shift.unwrap_or(1.0);
        if !(flow_shift.is_finite() && flow_shift > 0.0) {
            return Err(Error::unsupported(
                FILE,
                "flow_shift",
                flow_shift,
                "must be a positive finite number",
            ));
        }
        refuse_true_because(
            "thresholding",
            cfg.thresholding,
            "not supported; set it to false",
        )?;
        refuse_true_because(
            "use_dynamic_shifting",
            cfg.use_dynamic_shifting,
            "not supported by lowtide's UniPC; set it to false and use flow_shift",
        )?;
        for (field, v) in [
            ("use_karras_sigmas", cfg.use_karras_sigmas),
            ("use_exponential_sigmas", cfg.use_exponential_sigmas),
            ("use_beta_sigmas", cfg.use_beta_sigmas),
        ] {
            refuse_true_because(
                field,
                v,
                "not supported with use_flow_sigmas; set it to false",
            )?;
        }
        // diffusers tests `if shift_terminal:`, so 0 means "off".
        if let Some(t) = cfg.shift_terminal.filter(|t| *t != 0.0) {
            return Err(Error::unsupported(
                FILE,
                "shift_terminal",
                t,
                "not supported by lowtide's UniPC; remove it",
            ));
        }
        if let Some(p) = cfg.solver_p.as_ref().filter(|p| !p.is_null()) {
            return Err(Error::unsupported(
                FILE,
                "solver_p",
                p,
                "only null (UniPC's own predictor)",
            ));
        }
        Ok(Self {
            num_train_timesteps: n,
            solver_order,
            solver_type,
            lower_order_final,
            disable_corrector: cfg.disable_corrector.clone().unwrap_or_default(),
            flow_shift,
            final_sigmas_type,
        })
    }
}

/// diffusers' `UniPCMultistepScheduler` after `set_timesteps`.
pub struct UniPcMultistep {
    cfg: UniPcConfig,
    timesteps: Vec<f64>,
    /// The schedule's sigmas and the final one, float32.
    sigmas: Vec<f32>,
    /// The last `solver_order` converted outputs (x0 predictions), oldest first.
    model_outputs: Vec<Option<Tensor>>,
    last_sample: Option<Tensor>,
    /// The order of the last predictor step (the next corrector's order).
    this_order: usize,
    lower_order_nums: usize,
    idx: StepIndex,
}

/// (alpha_t, sigma_t) of a flow sigma: `(1 - sigma, sigma)`.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    (1.0 - sigma, sigma)
}

/// `log(alpha_t) - log(sigma_t)`, in f32 (infinite at sigma 0).
fn lambda(sigma: f32) -> f32 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

/// `t / v` element by element (candle's `Tensor / f64` multiplies by the reciprocal, which can
/// round differently from torch's division).
fn div_scalar(t: &Tensor, v: f32) -> Result<Tensor> {
    let v = Tensor::new(v, t.device())?.to_dtype(t.dtype())?;
    Ok(t.broadcast_div(&v)?)
}

fn scaled(t: &Tensor, v: f32) -> Result<Tensor> {
    Ok((t * v as f64)?)
}

/// Solves `a x = b` by Gaussian elimination with partial pivoting in f32 (torch.linalg.solve's
/// LU on 2x2 and 3x3 float32 systems).
fn solve(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Result<Vec<f32>> {
    let n = b.len();
    for col in 0..n {
        let piv = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        if a[piv][col] == 0.0 || !a[piv][col].is_finite() {
            return Err(Error::InvalidArgument(
                "UniPC: the solver's coefficient matrix is singular at this step".into(),
            ));
        }
        a.swap(col, piv);
        b.swap(col, piv);
        let pivot = a[col].clone();
        for row in col + 1..n {
            let f = a[row][col] / pivot[col];
            for (x, p) in a[row][col..].iter_mut().zip(&pivot[col..]) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0f32; n];
    for row in (0..n).rev() {
        let s: f32 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    Ok(x)
}

/// The B(h) update's shared coefficients for one step from sigma `s0` to sigma `t`.
struct Coeffs {
    /// sigma_t / sigma_s0.
    ratio: f32,
    /// alpha_t * h_phi_1.
    a_phi: f32,
    /// alpha_t * B(h).
    a_bh: f32,
    /// The R rows and b of the order conditions.
    r: Vec<Vec<f32>>,
    b: Vec<f32>,
}

impl UniPcMultistep {
    /// `UniPCMultistepScheduler.from_config(cfg)` then `set_timesteps(steps)`.
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        Self::with_config(UniPcConfig::from_config(cfg)?, steps)
    }

    pub fn with_config(cfg: UniPcConfig, steps: usize) -> Result<Self> {
        if steps == 0 {
            return Err(Error::InvalidArgument("--steps must be at least 1".into()));
        }
        let n = cfg.num_train_timesteps as f64;
        let shift = cfg.flow_shift;
        let mut s: Vec<f64> = linspace_f64(1.0, 1.0 / n, steps + 1);
        s.truncate(steps);
        for v in &mut s {
            *v = shift * *v / (1.0 + (shift - 1.0) * *v);
        }
        // diffusers keeps the first sigma off 1, where log(alpha) = log(0) in the first update.
        if (s[0] - 1.0).abs() < 1e-6 {
            s[0] -= 1e-6;
        }
        // `torch.from_numpy(sigmas * N).to(int64)` truncates.
        let timesteps: Vec<f64> = s.iter().map(|v| (v * n).trunc()).collect();
        // At very many steps the truncated timesteps repeat from the start; diffusers' step
        // lookup then starts at the second entry and runs past the schedule's end.
        if timesteps.len() > 1 && timesteps[0] == timesteps[1] {
            return Err(Error::InvalidArgument(format!(
                "--steps {steps} is too many for UniPC with flow_shift {shift} over {} training \
                 timesteps (the first timesteps coincide); use fewer steps",
                cfg.num_train_timesteps
            )));
        }
        let last = match cfg.final_sigmas_type {
            FinalSigma::Zero => 0.0,
            FinalSigma::SigmaMin => s[steps - 1],
        };
        let mut sigmas: Vec<f32> = s.iter().map(|&v| v as f32).collect();
        sigmas.push(last as f32);
        let order = cfg.solver_order;
        Ok(Self {
            cfg,
            timesteps,
            sigmas,
            model_outputs: vec![None; order],
            last_sample: None,
            this_order: 0,
            lower_order_nums: 0,
            idx: StepIndex::default(),
        })
    }

    pub fn config(&self) -> &UniPcConfig {
        &self.cfg
    }

    /// The sigmas of the schedule with the final one appended (steps + 1 values).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// `model_outputs[-(k + 1)]`.
    fn history(&self, k: usize) -> Result<&Tensor> {
        let n = self.model_outputs.len();
        self.model_outputs
            .get(n.wrapping_sub(k + 1))
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::InvalidArgument("UniPC: the solver history is empty".into()))
    }

    /// The order conditions of a B(h) step from sigma index `s0` to `t` using the earlier
    /// sigma indices `prev` (most recent first), with their D1 differences of the history.
    fn coeffs(
        &self,
        t: usize,
        s0: usize,
        prev: &[usize],
        m0: &Tensor,
    ) -> Result<(Coeffs, Vec<Tensor>)> {
        let (a_t, s_t) = alpha_sigma(self.sigmas[t]);
        let (_, s_s0) = alpha_sigma(self.sigmas[s0]);
        let lam_s0 = lambda(self.sigmas[s0]);
        let h = lambda(self.sigmas[t]) - lam_s0;
        let mut rks = Vec::with_capacity(prev.len() + 1);
        let mut d1s = Vec::with_capacity(prev.len());
        for (k, &si) in prev.iter().enumerate() {
            let rk = (lambda(self.sigmas[si]) - lam_s0) / h;
            rks.push(rk);
            d1s.push(div_scalar(&(self.history(k + 1)? - m0)?, rk)?);
        }
        rks.push(1.0);
        // predict_x0: the update runs in -h.
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let b_h = match self.cfg.solver_type {
            SolverType::Bh1 => hh,
            SolverType::Bh2 => hh.exp_m1(),
        };
        let order = rks.len();
        let (mut r, mut b) = (Vec::with_capacity(order), Vec::with_capacity(order));
        let mut factorial = 1u64;
        for i in 1..=order {
            r.push(rks.iter().map(|&x| x.powi(i as i32 - 1)).collect());
            b.push(h_phi_k * factorial as f32 / b_h);
            factorial *= i as u64 + 1;
            h_phi_k = h_phi_k / hh - (1.0 / factorial as f64) as f32;
        }
        Ok((
            Coeffs {
                ratio: s_t / s_s0,
                a_phi: a_t * h_phi_1,
                a_bh: a_t * b_h,
                r,
                b,
            },
            d1s,
        ))
    }

    /// `einsum("k,bkc...->bc...", rhos, d1s)`.
    fn weighted(rhos: &[f32], d1s: &[Tensor]) -> Result<Option<Tensor>> {
        let mut acc: Option<Tensor> = None;
        for (r, d) in rhos.iter().zip(d1s) {
            let term = scaled(d, *r)?;
            acc = Some(match acc {
                Some(a) => (a + term)?,
                None => term,
            });
        }
        Ok(acc)
    }

    /// UniP: the sample at sigma index `i + 1` from `x` at `i`, of order `order`.
    fn predict(&self, x: &Tensor, i: usize, order: usize) -> Result<Tensor> {
        let m0 = self.history(0)?;
        let prev: Vec<usize> = (1..order).map(|k| i - k).collect();
        let (c, d1s) = self.coeffs(i + 1, i, &prev, m0)?;
        let x_t = (scaled(x, c.ratio)? - scaled(m0, c.a_phi)?)?;
        if d1s.is_empty() {
            return Ok(x_t);
        }
        let rhos = if order == 2 {
            vec![0.5]
        } else {
            let k = order - 1;
            let r = c.r[..k].iter().map(|row| row[..k].to_vec()).collect();
            solve(r, c.b[..k].to_vec())?
        };
        match Self::weighted(&rhos, &d1s)? {
            Some(res) => Ok((x_t - scaled(&res, c.a_bh)?)?),
            None => Ok(x_t),
        }
    }

    /// UniC: corrects `this_sample` (at sigma index `i`) with the new converted output
    /// `model_t`, from `last_sample` (at `i - 1`), of order `order`. Runs before the history
    /// takes `model_t`.
    fn correct(
        &self,
        model_t: &Tensor,
        last_sample: &Tensor,
        i: usize,
        order: usize,
    ) -> Result<Tensor> {
        let m0 = self.history(0)?;
        let prev: Vec<usize> = (1..order).map(|k| i - (k + 1)).collect();
        let (c, d1s) = self.coeffs(i, i - 1, &prev, m0)?;
        let rhos = if order == 1 {
            vec![0.5]
        } else {
            solve(c.r.clone(), c.b.clone())?
        };
        let x_t = (scaled(last_sample, c.ratio)? - scaled(m0, c.a_phi)?)?;
        let last = rhos[rhos.len() - 1];
        let d1_t = (model_t - m0)?;
        let corr = match Self::weighted(&rhos[..rhos.len() - 1], &d1s)? {
            Some(res) => (res + scaled(&d1_t, last)?)?,
            None => scaled(&d1_t, last)?,
        };
        Ok((x_t - scaled(&corr, c.a_bh)?)?)
    }
}

impl Scheduler for UniPcMultistep {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    /// One UniPC step: corrector on `sample` (from the second step on), then predictor. The
    /// update runs in the sample's dtype; the flow output is converted to x0 as diffusers does
    /// (`sample - sigma * model_output`, the product in the output's dtype).
    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        _rng: &mut TorchRng,
    ) -> Result<Tensor> {
        let i = self.idx.get(&self.timesteps, t)?;
        let n = self.timesteps.len();
        if i >= n {
            return Err(Error::InvalidArgument(format!(
                "step {i} is past the end of a {n}-step schedule"
            )));
        }
        let dtype = sample.dtype();
        let x0 = (sample - scaled(model_output, self.sigmas[i])?.to_dtype(dtype)?)?;
        let use_corrector =
            i > 0 && !self.cfg.disable_corrector.contains(&(i - 1)) && self.last_sample.is_some();
        let sample = match (&self.last_sample, use_corrector) {
            (Some(last), true) => self.correct(&x0, last, i, self.this_order)?,
            _ => sample.clone(),
        };
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(x0));
        let order = self.cfg.solver_order;
        let this_order = if self.cfg.lower_order_final {
            order.min(n - i)
        } else {
            order
        };
        // Warm-up: no more history than steps taken.
        self.this_order = this_order.min(self.lower_order_nums + 1);
        let prev = self.predict(&sample, i, self.this_order)?;
        self.last_sample = Some(sample);
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.idx.advance();
        Ok(prev.to_dtype(dtype)?)
    }
    /// `alpha_t * original + sigma_t * noise` with the flow's `alpha_t = 1 - sigma_t`.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, t: f64) -> Result<Tensor> {
        let i = sigma_index(&self.timesteps, self.idx.begin, self.idx.step, t)?;
        let (a, s) = alpha_sigma(self.sigmas[i]);
        let noise = noise.to_dtype(original.dtype())?;
        Ok((scaled(original, a)? + scaled(&noise, s)?)?)
    }
    fn set_begin_index(&mut self, i: usize) {
        self.idx.begin = Some(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solve_pivots() {
        let x = solve(vec![vec![1e-3, 1.0], vec![1.0, 1.0]], vec![1.0, 2.0]).unwrap();
        assert!(
            (x[0] - 1.001).abs() < 1e-5 && (x[1] - 0.999).abs() < 1e-5,
            "{x:?}"
        );
        assert!(solve(vec![vec![1.0, 1.0], vec![1.0, 1.0]], vec![1.0, 2.0]).is_err());
    }
}
