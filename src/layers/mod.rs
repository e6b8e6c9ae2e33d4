//! Building-block layers. Each holds [`Param`] handles and resolves them in `forward`, so the
//! residency manager decides where its weights are at that moment.

use candle_core::{DType, Module, Tensor, D};

use crate::error::Result;

#[cfg(target_arch = "x86_64")]
mod amx;
pub mod attention;
pub mod conv2d;
pub mod conv3d;
pub mod dense;
pub mod embeddings;
pub mod mlp;
pub mod norm;
pub(crate) mod sgemm;
pub(crate) mod simd;
#[cfg(target_arch = "x86_64")]
pub(crate) mod skinny;
mod winograd;
use crate::residency::{Param, ParamPath};
pub use attention::{attention, attention_scaled};
pub use mlp::{FeedForward, Mlp};
pub use sgemm::{matmul_precision, set_matmul_precision, MatmulPrecision, AMX_MIN_ROWS};

/// Whether [`MatmulPrecision::High`] changes anything here: the CPU has AMX-BF16 and the OS
/// granted the tile state.
pub fn bf16x3_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return amx::available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

pub struct Linear {
    weight: Param,
    bias: Option<Param>,
}

impl Linear {
    pub fn new(pp: &ParamPath, in_dim: usize, out_dim: usize, bias: bool) -> Self {
        Self {
            weight: pp.castable_param("weight", &[out_dim, in_dim]),
            bias: bias.then(|| pp.castable_param("bias", &[out_dim])),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_ext(x, dense::Epilogue::None, None)
    }

    /// The layer followed by `epilogue`, plus `residual`, fused into the GEMM on the CPU.
    pub fn forward_ext(
        &self,
        x: &Tensor,
        epilogue: dense::Epilogue,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let b = self.bias.as_ref().map(Param::get).transpose()?;
        let rest = [Some(x), b.as_ref(), residual];
        let cpu = dense::supported(&rest.into_iter().flatten().collect::<Vec<_>>());
        let rows = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
        // Few rows on the CPU: a bf16-held weight goes to the kernel as it is held.
        let w = if cpu && dense::few_rows(rows, true) {
            self.weight.get_stored()?
        } else {
            self.weight.get()?
        };
        crate::profile::span(
            || format!("linear {:?} x {:?} {epilogue:?}", x.dims(), w.dims()),
            || {
                // The dense kernels take any float weight on the CPU (widening what they must).
                if cpu && matches!(w.device(), candle_core::Device::Cpu) {
                    return dense::linear_ext(x, &w, b.as_ref(), epilogue, residual);
                }
                let y = candle_nn::Linear::new(w.clone(), b.clone()).forward(x)?;
                let y = match epilogue {
                    dense::Epilogue::None => y,
                    dense::Epilogue::GeluTanh => y.gelu()?,
                };
                Ok(match residual {
                    Some(r) => (y + r)?,
                    None => y,
                })
            },
        )
    }
}

pub struct Conv2d {
    weight: Param,
    bias: Option<Param>,
    spec: conv2d::ConvSpec,
}

impl Conv2d {
    pub fn new(
        pp: &ParamPath,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Self {
        Self {
            weight: pp.castable_param("weight", &[out_c, in_c, kernel, kernel]),
            bias: Some(pp.castable_param("bias", &[out_c])),
            spec: conv2d::ConvSpec::new(stride, padding, 1),
        }
    }

    /// The same conv with per-side zero padding (diffusers' VAE downsampler pads right and
    /// bottom only).
    pub fn with_padding(mut self, padding: conv2d::Padding) -> Self {
        self.spec.padding = padding;
        self
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_ext(x, &conv2d::Prologue::default(), None)
    }

    /// Whether [`Conv2d::forward_ext`] can fuse a prologue into the conv on `x` (CPU f32).
    pub fn fusable(&self, x: &Tensor) -> bool {
        matches!(x.device(), candle_core::Device::Cpu) && x.dtype() == DType::F32 && x.rank() == 4
    }

    /// `conv(prologue(x)) + residual` without materialising the prologue's output or the sum
    /// where [`Conv2d::fusable`] holds; composed from candle ops elsewhere.
    pub fn forward_ext(
        &self,
        x: &Tensor,
        pro: &conv2d::Prologue,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let w = self.weight.get()?;
        let b = self.bias.as_ref().map(Param::get).transpose()?;
        if conv2d::supported(x, &w) {
            return crate::profile::span(
                || {
                    format!(
                        "conv {:?} w {:?} s{} up{}",
                        x.dims(),
                        w.dims(),
                        self.spec.stride,
                        pro.upsample
                    )
                },
                || conv2d::conv2d_ext(x, &w, b.as_ref(), &self.spec, pro, residual),
            );
        }
        let y = compose_prologue(x, pro)?;
        let p = self.spec.padding;
        let cfg = candle_nn::Conv2dConfig {
            padding: 0,
            stride: self.spec.stride,
            dilation: 1,
            groups: self.spec.groups,
            cudnn_fwd_algo: None,
        };
        let y = y
            .pad_with_zeros(2, p.top, p.bottom)?
            .pad_with_zeros(3, p.left, p.right)?;
        let y = candle_nn::Conv2d::new(w, b, cfg).forward(&y)?;
        Ok(match residual {
            Some(r) => (y + r)?,
            None => y,
        })
    }
}

/// Runs `f` on the f32 data of a CPU tensor: in place when it is contiguous, otherwise on one
/// contiguous copy. The CPU kernels (`conv2d`, `norm`) read their inputs through this.
pub(crate) fn with_cpu_f32<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    crate::device::with_cpu(t, f)
}

/// [`with_cpu_f32`] for several tensors at once.
pub(crate) fn with_cpu_f32_all<T>(
    ts: &[&Tensor],
    f: impl FnOnce(&[&[f32]]) -> Result<T>,
) -> Result<T> {
    let ts = ts
        .iter()
        .map(|t| Ok(t.contiguous()?))
        .collect::<Result<Vec<Tensor>>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (t, (storage, layout)) in ts.iter().zip(&guards) {
        match &**storage {
            candle_core::Storage::Cpu(cpu) => {
                let start = layout.start_offset();
                slices.push(&cpu.as_slice::<f32>()?[start..start + t.elem_count()]);
            }
            _ => {
                return Err(crate::error::Error::InvalidArgument(
                    "CPU kernel: expected a CPU tensor".into(),
                ))
            }
        }
    }
    f(&slices)
}

/// The prologue of a fused conv as separate ops, for devices and dtypes the fused kernel does
/// not cover.
pub(crate) fn compose_prologue(x: &Tensor, pro: &conv2d::Prologue) -> Result<Tensor> {
    let mut y = x.clone();
    if let Some((a, b)) = &pro.affine {
        let (n, c, _, _) = x.dims4()?;
        let a = Tensor::from_slice(a, (n, c, 1, 1), x.device())?.to_dtype(x.dtype())?;
        let b = Tensor::from_slice(b, (n, c, 1, 1), x.device())?.to_dtype(x.dtype())?;
        y = y.broadcast_mul(&a)?.broadcast_add(&b)?;
    }
    if pro.silu {
        y = y.silu()?;
    }
    if pro.upsample > 1 {
        let (_, _, h, w) = y.dims4()?;
        y = y.upsample_nearest2d(h * pro.upsample, w * pro.upsample)?;
    }
    Ok(y)
}

pub struct GroupNorm {
    weight: Param,
    bias: Param,
    channels: usize,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(pp: &ParamPath, groups: usize, channels: usize, eps: f64) -> Self {
        Self {
            weight: pp.param("weight", &[channels]),
            bias: pp.param("bias", &[channels]),
            channels,
            groups,
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }

    /// The norm as per-(batch, channel) coefficients for a fused conv prologue.
    pub fn coefficients(&self, x: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
        let (w, b) = (self.weight.get()?, self.bias.get()?);
        crate::profile::span(
            || format!("group_norm stats {:?}", x.dims()),
            || norm::coefficients(x, self.groups, &w, &b, self.eps),
        )
    }

    /// `silu(group_norm(x))` in one pass where the fused kernel applies.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        crate::profile::span(
            || format!("group_norm {:?} silu {silu}", x.dims()),
            || self.run_inner(x, silu),
        )
    }

    fn run_inner(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if norm::supported(x) {
            let (w, b) = (self.weight.get()?, self.bias.get()?);
            return norm::group_norm(x, self.groups, &w, &b, self.eps, silu);
        }
        let gn = candle_nn::GroupNorm::new(
            self.weight.get()?,
            self.bias.get()?,
            self.channels,
            self.groups,
            self.eps,
        )?;
        let y = gn.forward(x)?;
        Ok(if silu { y.silu()? } else { y })
    }
}

pub struct LayerNorm {
    weight: Param,
    bias: Param,
    eps: f64,
}

impl LayerNorm {
    pub fn new(pp: &ParamPath, dim: usize, eps: f64) -> Self {
        Self {
            weight: pp.param("weight", &[dim]),
            bias: pp.param("bias", &[dim]),
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = (self.weight.get()?, self.bias.get()?);
        crate::profile::span(
            || format!("layer_norm {:?}", x.dims()),
            || Ok(candle_nn::ops::layer_norm(x, &w, &b, self.eps as f32)?),
        )
    }
}

/// LayerNorm over the last axis in f32 with a centred second pass for the variance (candle's
/// fused `layer_norm` takes `E[x²] - E[x]²` in one pass, which loses digits on the large
/// activations of diffusion transformers), then the optional affine in f32; returns `x`'s dtype.
/// diffusers' `LayerNorm(elementwise_affine=False)` in FLUX and `FP32LayerNorm` in Wan.
pub fn layer_norm_f32(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let centred = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let mut y = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    if let Some(w) = weight {
        y = y.broadcast_mul(&w.to_dtype(DType::F32)?)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(&b.to_dtype(DType::F32)?)?;
    }
    Ok(y.to_dtype(dtype)?)
}

/// Root-mean-square norm with a learned scale and no bias or mean subtraction: T5's
/// `T5LayerNorm` and diffusers' `RMSNorm` (FLUX's QK norm). Statistics in f32, as both do.
pub struct RmsNorm {
    weight: Param,
    eps: f64,
}

impl RmsNorm {
    pub fn new(pp: &ParamPath, dim: usize, eps: f64) -> Self {
        Self {
            weight: pp.param("weight", &[dim]),
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xf.broadcast_mul(&(var + self.eps)?.sqrt()?.recip()?)?;
        let w = self.weight.get()?;
        Ok(y.to_dtype(w.dtype())?.broadcast_mul(&w)?.to_dtype(dtype)?)
    }
}

pub struct Embedding {
    weight: Param,
    dim: usize,
}

impl Embedding {
    pub fn new(pp: &ParamPath, count: usize, dim: usize) -> Self {
        Self {
            weight: pp.param("weight", &[count, dim]),
            dim,
        }
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let w = self.weight.get()?;
        let mut shape = ids.dims().to_vec();
        shape.push(self.dim);
        Ok(w.index_select(&ids.flatten_all()?, 0)?.reshape(shape)?)
    }
}

/// Activation functions named in configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    Gelu,
    /// The tanh approximation (torch's `GELU(approximate="tanh")`, diffusers' `gelu_tanh`);
    /// not a `hidden_act` name [`Activation::parse`] accepts.
    GeluTanh,
    QuickGelu,
}

impl Activation {
    pub fn parse(file: &str, field: &str, name: &str) -> Result<Self> {
        Ok(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "quick_gelu" => Activation::QuickGelu,
            other => {
                return Err(crate::Error::unsupported(
                    file,
                    field,
                    format!("\"{other}\""),
                    "supported: silu, gelu, quick_gelu",
                ))
            }
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Silu => x.silu()?,
            // Exact (erf) GELU, as torch's default.
            Activation::Gelu => x.gelu_erf()?,
            Activation::GeluTanh => x.gelu()?,
            Activation::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
        })
    }
}

/// The largest absolute difference between two tensors of the same shape (kernel tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).expect("tensors of one shape"))
}

/// A seeded draw in `lo..=hi` for the kernels' random-case tests.
#[cfg(test)]
pub(crate) fn pick(rng: &mut crate::rng::TorchRng, lo: usize, hi: usize) -> usize {
    let u = rng.randn(1)[0].abs();
    lo + ((u * 1000.0) as usize) % (hi - lo + 1)
}

/// The largest magnitude in a tensor, as f32 (kernel tests).
#[cfg(test)]
pub(crate) fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|d| d.flatten_all()?.max(0)?.to_dtype(DType::F32)?.to_scalar())
        .expect("a non-empty tensor")
}

/// Deterministic floats in [-0.5, 0.5) (a 64-bit LCG) for the kernels' tests.
#[cfg(test)]
pub(crate) fn test_rng(mut seed: u64) -> impl FnMut() -> f32 {
    move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Weights held in memory, converted to one dtype.
    struct Fixed(std::collections::HashMap<String, Tensor>, DType);

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

    /// The composed fallback (other devices and dtypes) equals the fused CPU kernel.
    #[test]
    fn conv_fallback_equals_fused_kernel() {
        let dev = Device::Cpu;
        let (n, c, h, w) = (2, 4, 7, 5);
        let weights: std::collections::HashMap<String, Tensor> = [
            (
                "weight",
                Tensor::randn(0f32, 0.3, (6, c, 3, 3), &dev).unwrap(),
            ),
            ("bias", Tensor::randn(0f32, 0.3, 6, &dev).unwrap()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
        let pro = conv2d::Prologue {
            affine: Some((
                (0..n * c).map(|i| i as f32 * 0.1).collect(),
                vec![0.2; n * c],
            )),
            silu: true,
            upsample: 2,
        };
        let padding = conv2d::Padding {
            top: 0,
            bottom: 1,
            left: 0,
            right: 1,
        };
        let run = |dtype: DType| {
            let src = std::sync::Arc::new(Fixed(weights.clone(), dtype));
            let conv = Conv2d::new(&ParamPath::root(src), c, 6, 3, 2, 0).with_padding(padding);
            let x = x.to_dtype(dtype).unwrap();
            let res = Tensor::ones((n, 6, h, w), dtype, &dev).unwrap();
            assert_eq!(conv.fusable(&x), dtype == DType::F32);
            conv.forward_ext(&x, &pro, Some(&res))
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        assert!(max_abs_diff(&run(DType::F32), &run(DType::F64)) < 1e-5);
    }
}
