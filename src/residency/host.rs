//! The host tier of weights offloaded from a GPU: page-locked (pinned) host copies, so that moving
//! a weight onto the GPU is one DMA, issued on a transfer stream of its own, that runs while the
//! GPU computes (diffusers' group offload with `use_stream=True` pins its CPU weights likewise).
//!
//! A weight is pinned the second time it is loaded (read from its safetensors file in the form it
//! is held in) and copied from there on every later load; its first load is a pageable copy, so
//! that a weight loaded once per run (model offload from the command line) never pays for
//! page-locking. Pinned pages cannot be swapped out and
//! come from the host's RAM, so a budget bounds them (`--pin-memory`; by default half the memory
//! available when the pipeline opens); a weight past the budget is copied from pageable memory,
//! on the same stream, as without a host tier. On the CPU there is nothing to pin: the weights
//! are the memory-mapped files' pages.

// Without the `cuda` feature only the bookkeeping's tests use the cache.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};

use super::accounting::Accounting;
use crate::error::{Error, Result};

/// What `--pin-memory` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PinMemory {
    /// Up to half of the host memory available when the pipeline opens.
    #[default]
    Auto,
    /// No host tier: every load reads the checkpoint and copies from pageable memory.
    Off,
    /// Up to this many bytes.
    Limit(u64),
}

impl PinMemory {
    /// `auto`, `off` or a size such as `16GiB`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "auto" => Ok(Self::Auto),
            "off" | "0" => Ok(Self::Off),
            size => super::device_map::parse_bytes(size)
                .map(Self::Limit)
                .map_err(|_| {
                    Error::InvalidArgument(format!(
                        "--pin-memory `{s}`: use auto, off or a size such as 16GiB"
                    ))
                }),
        }
    }

    /// The budget in bytes, `None` for no host tier.
    pub fn budget(self) -> Option<u64> {
        match self {
            Self::Off => None,
            Self::Limit(b) => Some(b),
            Self::Auto => crate::validate::available_memory().map(|b| b / 2),
        }
    }
}

/// Which weights are pinned, within a byte budget: the bookkeeping of the host tier, generic over
/// the buffer so that it is tested on machines without a GPU.
struct PinCache<B> {
    limit: u64,
    state: Mutex<CacheState<B>>,
}

struct CacheState<B> {
    entries: HashMap<String, (Arc<B>, u64)>,
    /// Keys loaded at least once.
    seen: HashSet<String>,
    /// Bytes of the entries plus those reserved for buffers being filled.
    used: u64,
}

impl<B> PinCache<B> {
    fn new(limit: u64) -> Self {
        Self {
            limit,
            state: Mutex::new(CacheState {
                entries: HashMap::new(),
                seen: HashSet::new(),
                used: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, CacheState<B>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The buffer under `key` if `valid` accepts it; one it rejects (held in another dtype or
    /// shape since) is dropped and its bytes given back.
    fn get(&self, key: &str, valid: impl Fn(&B) -> bool) -> Option<Arc<B>> {
        let mut st = self.lock();
        match st.entries.get(key) {
            Some((b, _)) if valid(b) => Some(b.clone()),
            Some(_) => {
                if let Some((_, bytes)) = st.entries.remove(key) {
                    st.used -= bytes;
                }
                None
            }
            None => None,
        }
    }

    /// Notes a load of `key`; whether it had been loaded before (pinning pays from its reuse on).
    fn reused(&self, key: &str) -> bool {
        !self.lock().seen.insert(key.to_string())
    }

    /// Sets `bytes` aside for a buffer about to be filled, if the budget has room. The buffer is
    /// filled outside the lock (reading a checkpoint is slow), so it is reserved first.
    fn reserve(&self, bytes: u64) -> bool {
        let mut st = self.lock();
        if st.used.saturating_add(bytes) > self.limit {
            return false;
        }
        st.used += bytes;
        true
    }

    fn unreserve(&self, bytes: u64) {
        let mut st = self.lock();
        st.used = st.used.saturating_sub(bytes);
    }

    /// Stores a filled buffer whose bytes were reserved. If another thread stored one under
    /// the same key meanwhile, that one is kept and this one's reservation given back.
    fn insert(&self, key: &str, buf: B, bytes: u64) -> Arc<B> {
        let mut st = self.lock();
        if let Some((b, _)) = st.entries.get(key) {
            let b = b.clone();
            st.used = st.used.saturating_sub(bytes);
            return b;
        }
        let b = Arc::new(buf);
        st.entries.insert(key.to_string(), (b.clone(), bytes));
        b
    }

    /// Bytes pinned or reserved now.
    fn used(&self) -> u64 {
        self.lock().used
    }
}

/// A pinned copy of one weight as it is held: dtype, shape and the page-locked buffer.
struct Pinned {
    dtype: DType,
    shape: Vec<usize>,
    /// A `cudarc` `PinnedHostSlice<T>` of the dtype's element type.
    buf: Box<dyn std::any::Any + Send + Sync>,
}

/// The host tier shared by every component of a pipeline on one GPU: the pinned copies, their
/// budget, and the stream that copies weights onto the GPU.
pub struct HostTier {
    cache: PinCache<Pinned>,
    acct: Arc<Accounting>,
    #[cfg(feature = "cuda")]
    stream: Mutex<Option<Arc<candle_core::cuda::cudarc::driver::CudaStream>>>,
}

impl HostTier {
    /// A host tier of at most `limit` pinned bytes, reporting to `acct`.
    pub fn new(limit: u64, acct: Arc<Accounting>) -> Self {
        Self {
            cache: PinCache::new(limit),
            acct,
            #[cfg(feature = "cuda")]
            stream: Mutex::new(None),
        }
    }

    /// The weight `key` (unique across components) on `device`: from its pinned copy, pinning
    /// it first with what `read` returns (the held tensor, on the CPU) when the budget allows.
    /// The copy is only enqueued on the transfer stream; [`HostTier::ready_for_compute`] or
    /// [`HostTier::ready_on_host`] orders it before its use.
    pub fn load(
        &self,
        key: &str,
        dtype: DType,
        shape: &[usize],
        read: impl FnOnce() -> Result<Tensor>,
        device: &Device,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            return gpu::load(self, dev, key, dtype, shape, read);
        }
        let _ = (key, dtype, shape);
        Ok(read()?.to_device(device)?)
    }

    /// Makes the compute stream of the calling thread wait for every copy enqueued so far (on
    /// the GPU, without blocking the host).
    pub fn ready_for_compute(&self, device: &Device) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            return gpu::ready_for_compute(self, dev);
        }
        let _ = device;
        Ok(())
    }

    /// Blocks until every copy enqueued so far has landed (the prefetch thread, before it hands
    /// a group over: the group is then complete and its transfer time honest).
    pub fn ready_on_host(&self, device: &Device) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            return gpu::ready_on_host(self, dev);
        }
        device.synchronize()?;
        Ok(())
    }

    /// Bytes pinned now.
    pub fn pinned_bytes(&self) -> u64 {
        self.cache.used()
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;

    use candle_core::cuda::cudarc::driver::{
        CudaContext, CudaStream, DeviceRepr, HostSlice, PinnedHostSlice, ValidAsZeroBits,
    };
    use candle_core::cuda::{CudaDType, CudaDevice, CudaStorage};
    use candle_core::op::BackpropOp;
    use candle_core::{DType, Device, Storage, Tensor, WithDType};

    use super::{HostTier, Pinned};
    use crate::device::with_cpu;
    use crate::error::{Error, Result};

    fn cuda_err(e: impl std::error::Error + Send + Sync + 'static) -> Error {
        candle_core::Error::wrap(e).into()
    }

    /// The transfer stream, created at first use: a non-blocking stream, so its copies never
    /// wait for the compute stream's kernels.
    fn stream(tier: &HostTier, dev: &CudaDevice) -> Result<Arc<CudaStream>> {
        let mut s = super::lock(&tier.stream);
        if let Some(s) = s.as_ref() {
            return Ok(s.clone());
        }
        let new = dev.cuda_stream().context().new_stream().map_err(cuda_err)?;
        *s = Some(new.clone());
        Ok(new)
    }

    pub fn ready_for_compute(tier: &HostTier, dev: &CudaDevice) -> Result<()> {
        let Some(t) = super::lock(&tier.stream).clone() else {
            return Ok(());
        };
        let done = t.record_event(None).map_err(cuda_err)?;
        dev.cuda_stream().wait(&done).map_err(cuda_err)
    }

    pub fn ready_on_host(tier: &HostTier, dev: &CudaDevice) -> Result<()> {
        if let Some(t) = super::lock(&tier.stream).clone() {
            t.synchronize().map_err(cuda_err)?;
        }
        // Copies of dtypes the tier does not handle went through this thread's own stream.
        dev.cuda_stream().synchronize().map_err(cuda_err)
    }

    pub fn load(
        tier: &HostTier,
        dev: &CudaDevice,
        key: &str,
        dtype: DType,
        shape: &[usize],
        read: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let args = (tier, dev, key, dtype, shape);
        match dtype {
            _ if shape.contains(&0) => plain(dev, read()?),
            DType::F32 => load_typed::<f32>(args, read),
            DType::F16 => load_typed::<half::f16>(args, read),
            DType::BF16 => load_typed::<half::bf16>(args, read),
            DType::F8E4M3 => load_typed::<float8::F8E4M3>(args, read),
            DType::U8 => load_typed::<u8>(args, read),
            _ => plain(dev, read()?),
        }
    }

    /// candle's own copy, on the calling thread's stream.
    fn plain(dev: &CudaDevice, t: Tensor) -> Result<Tensor> {
        Ok(t.to_device(&Device::Cuda(dev.clone()))?)
    }

    fn load_typed<T>(
        (tier, dev, key, dtype, shape): (&HostTier, &CudaDevice, &str, DType, &[usize]),
        read: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor>
    where
        T: CudaDType + DeviceRepr + ValidAsZeroBits + WithDType + 'static,
    {
        let stream = stream(tier, dev)?;
        let bytes = (shape.iter().product::<usize>() * dtype.size_in_bytes()) as u64;
        let valid = |p: &Pinned| p.dtype == dtype && p.shape == shape;
        let pinned = match tier.cache.get(key, valid) {
            Some(p) => p,
            None => {
                let cpu = read()?;
                let buf = if tier.cache.reused(key) && tier.cache.reserve(bytes) {
                    let ctx = dev.cuda_stream().context().clone();
                    let buf = with_cpu::<T, _>(&cpu, |s| Ok(pin(&ctx, s)))?;
                    if buf.is_none() {
                        tier.cache.unreserve(bytes);
                    }
                    buf
                } else {
                    None
                };
                let Some(buf) = buf else {
                    // A first load, past the budget, or page-locking refused (ulimit, cgroup): a
                    // pageable copy, which the driver stages before the call returns.
                    tier.acct.pageable(bytes);
                    return with_cpu::<T, _>(&cpu, |s| upload(&stream, dev, s, shape));
                };
                let p = Pinned {
                    dtype,
                    shape: shape.to_vec(),
                    buf: Box::new(buf),
                };
                let p = tier.cache.insert(key, p, bytes);
                tier.acct.set_pinned(tier.cache.used());
                p
            }
        };
        let buf = p_buf::<T>(&pinned)?;
        upload(&stream, dev, buf, shape)
    }

    fn p_buf<T: 'static>(p: &Pinned) -> Result<&PinnedHostSlice<T>> {
        p.buf.downcast_ref().ok_or_else(|| {
            Error::InvalidArgument("a pinned weight's buffer does not match its dtype".into())
        })
    }

    /// A page-locked copy of `src`; `None` when the driver refuses to lock more pages.
    fn pin<T: DeviceRepr + ValidAsZeroBits + Copy>(
        ctx: &Arc<CudaContext>,
        src: &[T],
    ) -> Option<PinnedHostSlice<T>> {
        // SAFETY: the buffer is filled completely before any use. Flags 0: cached host memory
        // (the default write-combined kind is slow for the CPU to touch at all).
        let mut buf = unsafe { ctx.alloc_pinned_with_flags::<T>(src.len(), 0) }.ok()?;
        buf.as_mut_slice().ok()?.copy_from_slice(src);
        Some(buf)
    }

    /// Enqueues the copy of `src` into a new device buffer on the transfer stream and wraps the
    /// buffer as a tensor of `dev`. cudarc's event tracking orders a use on another stream after
    /// the copy; `ready_for_compute` / `ready_on_host` order it explicitly as well.
    fn upload<T: CudaDType + DeviceRepr, S: HostSlice<T> + ?Sized>(
        stream: &Arc<CudaStream>,
        dev: &CudaDevice,
        src: &S,
        shape: &[usize],
    ) -> Result<Tensor> {
        // SAFETY: the copy fills the whole buffer before anything reads it.
        let mut dst = unsafe { stream.alloc::<T>(src.len()) }.map_err(cuda_err)?;
        stream.memcpy_htod(src, &mut dst).map_err(cuda_err)?;
        let storage = CudaStorage::wrap_cuda_slice(dst, dev.clone());
        Ok(Tensor::from_storage(
            Storage::Cuda(storage),
            shape,
            BackpropOp::none(),
            false,
        ))
    }
}

#[cfg(feature = "cuda")]
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_memory_parses() {
        assert_eq!(PinMemory::parse("auto").unwrap(), PinMemory::Auto);
        assert_eq!(PinMemory::parse("off").unwrap(), PinMemory::Off);
        assert_eq!(PinMemory::parse("2GiB").unwrap(), PinMemory::Limit(2 << 30));
        assert!(PinMemory::parse("lots").is_err());
        assert_eq!(PinMemory::Off.budget(), None);
        assert_eq!(PinMemory::Limit(5).budget(), Some(5));
    }

    #[test]
    fn cache_pins_within_its_budget_and_reuses() {
        let c: PinCache<Vec<u8>> = PinCache::new(100);
        assert!(c.get("a", |_| true).is_none());
        assert!(c.reserve(60));
        let a = c.insert("a", vec![1; 60], 60);
        assert_eq!(c.used(), 60);
        // Reused, not pinned again.
        assert!(Arc::ptr_eq(&a, &c.get("a", |_| true).unwrap()));
        // 60 + 50 > 100: declined, nothing held for it.
        assert!(!c.reserve(50));
        assert_eq!(c.used(), 60);
        assert!(c.reserve(40));
        c.insert("b", vec![2; 40], 40);
        assert_eq!(c.used(), 100);
        assert!(!c.reserve(1));
    }

    #[test]
    fn cache_pins_on_reuse_only() {
        let c: PinCache<Vec<u8>> = PinCache::new(100);
        assert!(!c.reused("a"));
        assert!(c.reused("a"));
        assert!(!c.reused("b"));
    }

    #[test]
    fn cache_drops_stale_entries_and_keeps_the_first_of_a_race() {
        let c: PinCache<Vec<u8>> = PinCache::new(100);
        assert!(c.reserve(10));
        c.insert("w", vec![0; 10], 10);
        // Held in another form now (e.g. a new storage dtype): dropped, its bytes given back.
        assert!(c.get("w", |b| b.len() == 20).is_none());
        assert_eq!(c.used(), 0);
        assert!(c.get("w", |_| true).is_none());
        // Two loads pinned the same weight: the first stored wins, the second's bytes return.
        assert!(c.reserve(10) && c.reserve(10));
        let first = c.insert("w", vec![1; 10], 10);
        let second = c.insert("w", vec![2; 10], 10);
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(c.used(), 10);
        // A failed fill gives its reservation back.
        assert!(c.reserve(30));
        c.unreserve(30);
        assert_eq!(c.used(), 10);
    }
}
