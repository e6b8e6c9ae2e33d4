//! Execution devices named on the command line. Asking for an accelerator that is not there is an
//! error, never a silent fallback to the CPU.

use candle_core::{DType, Device, Tensor};

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

/// The contiguous data of the CPU tensor `t` as `D` (its dtype), for code that reads elements in
/// place (CPU kernels, the host tier's copies).
pub(crate) fn with_cpu<D: candle_core::WithDType, T>(
    t: &Tensor,
    f: impl FnOnce(&[D]) -> Result<T>,
) -> Result<T> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(cpu) => {
            let all = cpu.as_slice::<D>()?;
            let start = layout.start_offset();
            f(&all[start..start + t.elem_count()])
        }
        _ => Err(Error::InvalidArgument(
            "expected a CPU tensor (a CPU kernel or a host copy was handed a device tensor)".into(),
        )),
    }
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

/// Memory of an execution device, in bytes, as the driver reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DeviceMemory {
    /// `cuMemGetInfo`: free memory on the whole GPU (every process; the CUDA context, cuBLAS's
    /// workspace and the loaded kernels count as used).
    pub free_bytes: u64,
    /// `cuMemGetInfo`: the GPU's memory.
    pub total_bytes: u64,
    /// The high-water mark of memory handed out by the device's stream-ordered pool, from which
    /// candle's tensors are allocated (`cuMemAllocAsync`): the tensors' bytes at their peak,
    /// rounded to the pool's granularity. `None` where the device has no memory pools (candle then
    /// uses `cuMemAlloc`, and only `free_bytes` tells).
    pub pool_peak_used_bytes: Option<u64>,
    /// The high-water mark of memory the pool reserved from the GPU (≥ the used peak).
    pub pool_peak_reserved_bytes: Option<u64>,
}

/// The device's memory now, and the peaks of its memory pool since the process started or
/// since [`reset_device_memory_peaks`]. `None` for the CPU (and on builds without CUDA). The
/// pool's figures are exact whenever the caller has synchronised with the GPU (anything that
/// copies a result back to the CPU does).
pub fn device_memory(device: &Device) -> Option<DeviceMemory> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return cuda_memory::query(d);
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    None
}

/// Restarts the pool's peaks from the memory in use now (to measure one run of several in a
/// process). Does nothing for the CPU.
pub fn reset_device_memory_peaks(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        cuda_memory::reset(d);
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

#[cfg(feature = "cuda")]
mod cuda_memory {
    use candle_core::cuda::cudarc::driver::{sys, CudaContext};
    use candle_core::CudaDevice;

    use super::DeviceMemory;

    pub fn query(dev: &CudaDevice) -> Option<DeviceMemory> {
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        let (free, total) = ctx.mem_get_info().ok()?;
        let pool = pool(ctx);
        let attr = |a| pool.and_then(|p| get(p, a));
        Some(DeviceMemory {
            free_bytes: free as u64,
            total_bytes: total as u64,
            pool_peak_used_bytes: attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH),
            pool_peak_reserved_bytes: attr(
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            ),
        })
    }

    pub fn reset(dev: &CudaDevice) {
        let stream = dev.cuda_stream();
        if let Some(p) = pool(stream.context()) {
            for a in [
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            ] {
                // Setting a high-water mark to 0 resets it to the current value.
                let mut zero: u64 = 0;
                // SAFETY: `p` is the device's live pool; the value is the cuuint64_t these two
                // attributes take.
                let _ = unsafe { sys::cuMemPoolSetAttribute(p, a, (&mut zero as *mut u64).cast()) };
            }
        }
    }

    /// The pool `cuMemAllocAsync` draws from on this device (the device's current pool).
    fn pool(ctx: &CudaContext) -> Option<sys::CUmemoryPool> {
        if !ctx.has_async_alloc() {
            return None;
        }
        ctx.bind_to_thread().ok()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: a plain query into a local out-parameter, for the context's own device.
        unsafe { sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) }
            .result()
            .ok()?;
        (!pool.is_null()).then_some(pool)
    }

    fn get(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> Option<u64> {
        let mut v: u64 = 0;
        // SAFETY: `pool` is live; both attributes queried here are cuuint64_t.
        unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&mut v as *mut u64).cast()) }
            .result()
            .ok()?;
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_has_no_device_memory_figures() {
        assert_eq!(device_memory(&Device::Cpu), None);
        reset_device_memory_peaks(&Device::Cpu);
        assert!(parse_device("cuda:x").is_err());
        assert!(parse_device("cpu").unwrap().is_cpu());
    }
}
