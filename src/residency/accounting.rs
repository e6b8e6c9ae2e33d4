//! Exact accounting of what is resident: bytes per component and in total, their peaks, bytes
//! moved from storage and the time spent moving versus waiting.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

#[derive(Debug, Default, Clone, Serialize)]
pub struct ComponentUsage {
    pub resident_bytes: u64,
    pub peak_resident_bytes: u64,
}

#[derive(Debug, Default, Clone)]
struct Stats {
    components: BTreeMap<String, ComponentUsage>,
    resident: u64,
    peak: u64,
    transferred: u64,
    transfer_seconds: f64,
    stall_seconds: f64,
    pinned: u64,
    peak_pinned: u64,
    pageable: u64,
}

/// Shared by every component of a pipeline.
#[derive(Debug)]
pub struct Accounting {
    stats: Mutex<Stats>,
    since: Mutex<Instant>,
}

impl Default for Accounting {
    fn default() -> Self {
        Self {
            stats: Mutex::default(),
            since: Mutex::new(Instant::now()),
        }
    }
}

/// A snapshot, as `--report` writes it.
#[derive(Debug, Clone, Serialize)]
pub struct UsageReport {
    pub peak_resident_bytes: u64,
    pub resident_bytes: u64,
    pub components: BTreeMap<String, ComponentUsage>,
    pub bytes_transferred: u64,
    /// Time spent reading and converting weights, on any thread.
    pub transfer_seconds: f64,
    /// Time the computation waited for weights (synchronous loads and unfinished prefetches).
    pub stall_seconds: f64,
    /// Wall time since the counters were reset, less the stalls.
    pub compute_seconds: f64,
    pub wall_seconds: f64,
    /// Page-locked host memory holding copies of weights offloaded from a GPU (the host tier,
    /// `residency::host`), now and at its peak; 0 on the CPU.
    pub pinned_host_bytes: u64,
    pub peak_pinned_host_bytes: u64,
    /// Bytes copied onto the GPU from pageable memory by the host tier: first loads (a weight is
    /// pinned when it is loaded again), loads past its budget or refused page-locking.
    pub pageable_transfer_bytes: u64,
}

impl Accounting {
    fn lock(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(&self, component: &str) {
        self.lock()
            .components
            .entry(component.to_string())
            .or_default();
    }

    /// `bytes` became resident for `component`.
    pub fn add(&self, component: &str, bytes: u64) {
        let mut s = self.lock();
        s.resident += bytes;
        s.peak = s.peak.max(s.resident);
        let c = s.components.entry(component.to_string()).or_default();
        c.resident_bytes += bytes;
        c.peak_resident_bytes = c.peak_resident_bytes.max(c.resident_bytes);
    }

    /// `bytes` of `component` were dropped.
    pub fn sub(&self, component: &str, bytes: u64) {
        let mut s = self.lock();
        s.resident = s.resident.saturating_sub(bytes);
        let c = s.components.entry(component.to_string()).or_default();
        c.resident_bytes = c.resident_bytes.saturating_sub(bytes);
    }

    pub fn transferred(&self, bytes: u64, seconds: f64) {
        let mut s = self.lock();
        s.transferred += bytes;
        s.transfer_seconds += seconds;
    }

    /// The host tier now holds `bytes` pinned.
    pub fn set_pinned(&self, bytes: u64) {
        let mut s = self.lock();
        s.pinned = bytes;
        s.peak_pinned = s.peak_pinned.max(bytes);
    }

    /// `bytes` went to the GPU from pageable memory instead of the host tier.
    pub fn pageable(&self, bytes: u64) {
        self.lock().pageable += bytes;
    }

    pub fn stalled(&self, seconds: f64) {
        self.lock().stall_seconds += seconds;
    }

    pub fn resident_bytes(&self) -> u64 {
        self.lock().resident
    }

    pub fn peak_resident_bytes(&self) -> u64 {
        self.lock().peak
    }

    /// Starts a new measurement: peaks fall to what is resident now, counters to zero.
    pub fn reset(&self) {
        let mut s = self.lock();
        s.peak = s.resident;
        for c in s.components.values_mut() {
            c.peak_resident_bytes = c.resident_bytes;
        }
        s.transferred = 0;
        s.transfer_seconds = 0.0;
        s.stall_seconds = 0.0;
        s.peak_pinned = s.pinned;
        s.pageable = 0;
        *self.since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    pub fn report(&self) -> UsageReport {
        let wall = self
            .since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
            .as_secs_f64();
        let s = self.lock();
        UsageReport {
            peak_resident_bytes: s.peak,
            resident_bytes: s.resident,
            components: s.components.clone(),
            bytes_transferred: s.transferred,
            transfer_seconds: s.transfer_seconds,
            stall_seconds: s.stall_seconds,
            compute_seconds: (wall - s.stall_seconds).max(0.0),
            wall_seconds: wall,
            pinned_host_bytes: s.pinned,
            peak_pinned_host_bytes: s.peak_pinned,
            pageable_transfer_bytes: s.pageable,
        }
    }
}
