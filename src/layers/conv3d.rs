//! A causal 3-D convolution (diffusers' `WanCausalConv3d`) over a video held as a list of frames.
//!
//! A `(kt, k, k)` conv3d is the sum over its `kt` temporal taps of a `k × k` conv2d of input frame
//! `t·stride + tap` with the weight slice `[:, :, tap]`, plus the bias once. Each output frame is
//! that sum on the memory-lean conv2d kernels ([`conv2d_sum`](super::conv2d::conv2d_sum): one
//! Winograd call with the taps stacked, or a chain of direct convs), so no im2col of a 5-D
//! tensor and no padded copy of the video is ever made: the scratch is that of one frame's conv.
//!
//! Causality is diffusers': the input is padded with `2 · padding_t` zero frames in front (none
//! behind), and a streaming caller passes the last input frames of the previous chunk as `past`,
//! which take the place of as many of those zero frames. Zero frames are skipped, not computed.

use candle_core::Tensor;

use super::conv2d::{self, ConvSpec};
use crate::error::{Error, Result};
use crate::residency::{Param, ParamPath};

pub struct CausalConv3d {
    weight: Param,
    bias: Param,
    kt: usize,
    stride_t: usize,
    /// Zero frames in front of the first chunk: 2 × the temporal padding.
    pad_t: usize,
    spatial: ConvSpec,
}

impl CausalConv3d {
    /// `kernel`, `stride` and `padding` are (temporal, spatial) pairs, as `nn.Conv3d` takes them
    /// with equal height and width.
    pub fn new(
        pp: &ParamPath,
        in_c: usize,
        out_c: usize,
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Self {
        let (kt, k) = kernel;
        Self {
            weight: pp.castable_param("weight", &[out_c, in_c, kt, k, k]),
            bias: pp.castable_param("bias", &[out_c]),
            kt,
            stride_t: stride.0,
            pad_t: 2 * padding.0,
            spatial: ConvSpec::new(stride.1, padding.1, 1),
        }
    }

    /// How many past input frames the conv can use: a streaming caller keeps this many.
    pub fn history(&self) -> usize {
        self.pad_t
    }

    /// Output frames for `frames`; see [`CausalConv3d::forward_ext`].
    pub fn forward(&self, past: &[Tensor], frames: &[Tensor]) -> Result<Vec<Tensor>> {
        self.forward_ext(past, frames, None)
    }

    /// The conv of `frames` (each `(B, C, H, W)`) preceded by `past` (at most
    /// [`CausalConv3d::history`] frames; the missing ones are zeros), plus `residual` (one
    /// tensor per output frame, consumed) accumulated inside the kernel.
    pub fn forward_ext(
        &self,
        past: &[Tensor],
        frames: &[Tensor],
        residual: Option<Vec<Tensor>>,
    ) -> Result<Vec<Tensor>> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("causal conv3d: {m}")));
        if past.len() > self.pad_t {
            return bad(format!(
                "{} past frames given, the conv uses at most {}",
                past.len(),
                self.pad_t
            ));
        }
        let zeros = self.pad_t - past.len();
        let len = zeros + past.len() + frames.len();
        if frames.is_empty() || len < self.kt || self.stride_t == 0 {
            return bad(format!(
                "{} frames (with {} past and {zeros} padding) are too few for a temporal kernel of {}",
                frames.len(),
                past.len(),
                self.kt
            ));
        }
        let t_out = (len - self.kt) / self.stride_t + 1;
        let mut residual = residual.map(|r| r.into_iter());
        if let Some(r) = &residual {
            if r.len() != t_out {
                return bad(format!(
                    "{} residual frames for {t_out} output frames",
                    r.len()
                ));
            }
        }
        let w = self.weight.get()?;
        let b = self.bias.get()?;
        // The per-tap weight slices, made contiguous once for all frames.
        let taps = (0..self.kt)
            .map(|k| Ok(w.narrow(2, k, 1)?.squeeze(2)?.contiguous()?))
            .collect::<Result<Vec<_>>>()?;
        let frame = |s: usize| -> &Tensor {
            let s = s - zeros;
            if s < past.len() {
                &past[s]
            } else {
                &frames[s - past.len()]
            }
        };
        let mut out = Vec::with_capacity(t_out);
        for o in 0..t_out {
            let acc = residual.as_mut().and_then(|r| r.next());
            // The taps that read real frames (the causal padding's zero frames add nothing).
            let terms: Vec<(&Tensor, &Tensor)> = (0..self.kt)
                .map(|k| o * self.stride_t + k)
                .zip(&taps)
                .filter(|&(s, _)| s >= zeros)
                .map(|(s, tap)| (frame(s), tap))
                .collect();
            let y = if terms.is_empty() {
                // Every tap read padding: the bias alone (a kernel wider than its padding
                // cannot get here, but a custom one might).
                let z = frame(zeros).zeros_like()?;
                conv2d::conv2d_sum(&[(&z, &taps[0])], Some(&b), &self.spatial, acc.as_ref())?
            } else {
                conv2d::conv2d_sum(&terms, Some(&b), &self.spatial, acc.as_ref())?
            };
            out.push(y);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use std::collections::HashMap;
    use std::sync::Arc;

    struct Fixed(HashMap<String, Tensor>, DType);

    impl crate::residency::WeightProvider for Fixed {
        fn get(&self, spec: &crate::residency::ParamSpec) -> Result<Tensor> {
            Ok(self.0[&spec.name].to_dtype(self.1)?)
        }
        fn contains(&self, name: &str) -> bool {
            self.0.contains_key(name)
        }
        fn device(&self) -> Device {
            Device::Cpu
        }
        fn dtype(&self) -> DType {
            self.1
        }
    }

    /// The reference: a direct causal conv3d in f64 with explicit loops over every index of
    /// `x` (B, C, T, H, W) zero-padded by `pad_t` frames in front and `pad_s` pixels around.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f64],
        (n, c, t, h, wd): (usize, usize, usize, usize, usize),
        w: &[f64],
        (o, kt, k): (usize, usize, usize),
        bias: &[f64],
        (st, ss): (usize, usize),
        (pad_t, pad_s): (usize, usize),
    ) -> (Vec<f64>, [usize; 5]) {
        let (tp, hp, wp) = (t + pad_t, h + 2 * pad_s, wd + 2 * pad_s);
        let (to, ho, wo) = ((tp - kt) / st + 1, (hp - k) / ss + 1, (wp - k) / ss + 1);
        let mut y = vec![0f64; n * o * to * ho * wo];
        let at = |b: usize, ci: usize, ti: isize, yi: isize, xi: isize| -> f64 {
            if ti < 0 || yi < 0 || xi < 0 || yi >= h as isize || xi >= wd as isize {
                return 0.0;
            }
            let (ti, yi, xi) = (ti as usize, yi as usize, xi as usize);
            x[(((b * c + ci) * t + ti) * h + yi) * wd + xi]
        };
        for b in 0..n {
            for oc in 0..o {
                for ot in 0..to {
                    for oy in 0..ho {
                        for ox in 0..wo {
                            let mut s = bias[oc];
                            for ci in 0..c {
                                for dt in 0..kt {
                                    for dy in 0..k {
                                        for dx in 0..k {
                                            let ti = (ot * st + dt) as isize - pad_t as isize;
                                            let yi = (oy * ss + dy) as isize - pad_s as isize;
                                            let xi = (ox * ss + dx) as isize - pad_s as isize;
                                            s += w[(((oc * c + ci) * kt + dt) * k + dy) * k + dx]
                                                * at(b, ci, ti, yi, xi);
                                        }
                                    }
                                }
                            }
                            y[(((b * o + oc) * to + ot) * ho + oy) * wo + ox] = s;
                        }
                    }
                }
            }
        }
        (y, [n, o, to, ho, wo])
    }

    fn frames_of(x: &Tensor) -> Vec<Tensor> {
        (0..x.dim(2).unwrap())
            .map(|t| x.narrow(2, t, 1).unwrap().squeeze(2).unwrap())
            .collect()
    }

    /// Whole-video and chunked (with the cache carried as `past`) against the direct loops, for
    /// the shapes the Wan VAE uses: 3x3x3 pad 1, 3x1x1 pad (1, 0), 3x1x1 stride (2, 1) pad 0
    /// (fed its previous frame explicitly, as the downsampler does), 1x1x1.
    #[test]
    fn matches_direct_conv3d_whole_and_chunked() {
        let dev = Device::Cpu;
        for (kt, k, st, ss, pt, ps, chunks) in [
            (3, 3, 1, 1, 1, 1, vec![1, 2, 3, 1]),
            (3, 3, 1, 2, 1, 1, vec![1, 4, 2]),
            (3, 1, 1, 1, 1, 0, vec![1, 1, 1, 4]),
            (1, 1, 1, 1, 0, 0, vec![2, 3, 2]),
            (3, 1, 2, 1, 0, 0, vec![]),
        ] {
            let (n, c, o, t, h, wd) = (2, 3, 4, 7, 5, 6);
            let x = Tensor::randn(0f32, 1.0, (n, c, t, h, wd), &dev).unwrap();
            let w = Tensor::randn(0f32, 0.3, (o, c, kt, k, k), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.3, o, &dev).unwrap();
            let weights: HashMap<String, Tensor> = [
                ("weight".to_string(), w.clone()),
                ("bias".to_string(), b.clone()),
            ]
            .into();
            let conv = CausalConv3d::new(
                &ParamPath::root(Arc::new(Fixed(weights, DType::F32))),
                c,
                o,
                (kt, k),
                (st, ss),
                (pt, ps),
            );
            let f64s = |t: &Tensor| -> Vec<f64> {
                t.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            let (want, shape) = reference(
                &f64s(&x),
                (n, c, t, h, wd),
                &f64s(&w),
                (o, kt, k),
                &f64s(&b),
                (st, ss),
                (2 * pt, ps),
            );
            let want = Tensor::from_vec(want, shape.as_slice(), &dev)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let frames = frames_of(&x);
            let whole = Tensor::stack(&conv.forward(&[], &frames).unwrap(), 2).unwrap();
            let tol = 1e-4;
            assert!(
                crate::layers::max_abs_diff(&whole, &want) < tol,
                "k{kt}x{k}"
            );
            if chunks.is_empty() {
                continue;
            }
            // Streaming: each chunk sees the last `history()` frames before it.
            let mut outs = Vec::new();
            let mut start: usize = 0;
            for len in chunks {
                let from = start.saturating_sub(conv.history());
                let y = conv.forward(&frames[from..start], &frames[start..start + len]);
                outs.extend(y.unwrap());
                start += len;
            }
            let chunked = Tensor::stack(&outs, 2).unwrap();
            assert!(
                crate::layers::max_abs_diff(&chunked, &want) < tol,
                "chunked k{kt}x{k}"
            );
            // The composed path (other dtypes and devices) gives the same numbers.
            let conv64 = CausalConv3d::new(
                &ParamPath::root(Arc::new(Fixed(
                    [("weight".to_string(), w), ("bias".to_string(), b)].into(),
                    DType::F64,
                ))),
                c,
                o,
                (kt, k),
                (st, ss),
                (pt, ps),
            );
            let f64frames: Vec<Tensor> = frames
                .iter()
                .map(|f| f.to_dtype(DType::F64).unwrap())
                .collect();
            let y64 = Tensor::stack(&conv64.forward(&[], &f64frames).unwrap(), 2)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            assert!(crate::layers::max_abs_diff(&y64, &want) < tol);
        }
    }

    #[test]
    fn residual_is_added_and_bad_inputs_are_errors() {
        let dev = Device::Cpu;
        let weights: HashMap<String, Tensor> = [
            (
                "weight".to_string(),
                Tensor::randn(0f32, 0.3, (2, 2, 3, 3, 3), &dev).unwrap(),
            ),
            (
                "bias".to_string(),
                Tensor::ones(2, DType::F32, &dev).unwrap(),
            ),
        ]
        .into();
        let conv = CausalConv3d::new(
            &ParamPath::root(Arc::new(Fixed(weights, DType::F32))),
            2,
            2,
            (3, 3),
            (1, 1),
            (1, 1),
        );
        let f: Vec<Tensor> = (0..2)
            .map(|_| Tensor::randn(0f32, 1.0, (1, 2, 4, 4), &dev).unwrap())
            .collect();
        let plain = conv.forward(&[], &f).unwrap();
        let res: Vec<Tensor> = plain.iter().map(|t| t.ones_like().unwrap()).collect();
        let with = conv.forward_ext(&[], &f, Some(res)).unwrap();
        for (a, b) in plain.iter().zip(&with) {
            let d = crate::layers::max_abs_diff(&(a + 1.0).unwrap(), b);
            // The residual joins the GEMM accumulation: equal up to float rounding.
            assert!(d < 1e-5, "{d}");
        }
        assert!(conv.forward(&f[..0], &[]).is_err());
        let three = [f[0].clone(), f[1].clone(), f[0].clone()];
        assert!(conv.forward(&three, &f).is_err());
        assert!(conv.forward_ext(&[], &f, Some(vec![])).is_err());
    }
}
