//! Execution devices named on the command line. Asking for an accelerator that is not there is an
//! error, never a silent fallback to the CPU.

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim();
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    if name == "auto" {
        // The best available: the first GPU when the build and the machine have one.
        if candle_core::utils::cuda_is_available() {
            if let Ok(d) = Device::new_cuda(0) {
                return Ok(d);
            }
        }
        return Ok(Device::Cpu);
    }
    let ordinal = match name {
        "cuda" => Some(0),
        _ => name
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok()),
    };
    let Some(ordinal) = ordinal else {
        return Err(Error::InvalidArgument(format!(
            "unknown device `{name}`; use auto, cpu, cuda or cuda:N (available: {})",
            available().join(", ")
        )));
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(Error::DeviceUnavailable(format!(
            "`{name}` was requested but this lowtide was built without CUDA support \
             (available: {}); rebuild with `cargo build --release --features cuda` or use --device cpu",
            available().join(", ")
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| {
        Error::DeviceUnavailable(format!(
            "`{name}` cannot be opened ({e}); available: {}",
            available().join(", ")
        ))
    })
}

/// The devices this build can open on this machine.
pub fn available() -> Vec<String> {
    let mut out = vec!["cpu".to_string()];
    if candle_core::utils::cuda_is_available() {
        for i in 0..16 {
            if Device::new_cuda(i).is_err() {
                break;
            }
            out.push(format!("cuda:{i}"));
        }
    }
    out
}

/// Parses `f32`, `f16` or `bf16` as a compute dtype.
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" | "fp32" | "float32" => Ok(DType::F32),
        "f16" | "fp16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(Error::InvalidArgument(format!(
            "unknown dtype `{other}`; use f32, f16 or bf16"
        ))),
    }
}
