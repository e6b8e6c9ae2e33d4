//! Exact accounting of what is resident: bytes per component and in total, their peaks, bytes
//! moved from storage and the time spent moving versus waiting, and a [`Timeline`] of all of it
//! (with the process's RSS and each phase's measured peak) for `--report` and `--report-plot`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

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
    timeline: Timeline,
    /// The phase running now: its index in `timeline.phases`.
    phase: Option<usize>,
    /// When RSS was last sampled (seconds since `since`).
    last_rss: f64,
}

/// Resident bytes over a run, as `--report` writes it and `--report-plot` draws it. Times are
/// seconds since the counters were reset.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct Timeline {
    /// Component names, indexed by `samples`.
    pub components: Vec<String>,
    /// `(t, component, resident bytes)` after each change of a component's resident bytes.
    pub samples: Vec<(f64, usize, u64)>,
    /// `(t, bytes)`: the process's resident set size (Linux; empty elsewhere), sampled at most
    /// every [`RSS_EVERY`] seconds as weights come and go, and at every phase boundary.
    pub rss: Vec<(f64, u64)>,
    /// Periods in which one component was active (what the pipeline ran, in order).
    pub phases: Vec<PhaseRecord>,
    /// End times of the denoising steps.
    pub steps: Vec<f64>,
    /// `(start, end)` of weight transfers (any thread; overlapping ones merged).
    pub transfers: Vec<(f64, f64)>,
    /// `(start, end)` of periods the computation waited for weights.
    pub stalls: Vec<(f64, f64)>,
}

/// One phase: the component that ran, when, and the peaks measured within it.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct PhaseRecord {
    pub name: String,
    pub start: f64,
    pub end: f64,
    /// Peak resident weight bytes (all components) within the phase.
    pub peak_resident_bytes: u64,
    /// Peak RSS of the process within the phase; `None` where it cannot be measured. Exact
    /// (`VmHWM`) when the phase raised the process's peak, else the largest of the RSS samples
    /// taken every 5 ms within it.
    pub peak_rss_bytes: Option<u64>,
    /// `VmHWM` when the phase started.
    #[serde(skip)]
    pub hwm_at_start: u64,
}

/// The finest RSS sampling of the timeline, seconds.
pub const RSS_EVERY: f64 = 0.02;

/// The process's resident set size now (Linux `/proc/self/statm`).
pub fn current_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

/// The process's peak RSS so far (Linux `VmHWM`).
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The largest RSS a background thread has seen (every [`SAMPLE_EVERY`]) since the last
/// [`take_sampled_peak`]. `VmHWM` alone cannot give a phase's peak: it can only be reset
/// through `clear_refs`, which would also reset what `getrusage` and `/usr/bin/time` report as
/// the process's peak.
static SAMPLED_PEAK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How often the RSS sampler looks.
pub const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_millis(5);

/// Every fourth sample, with its time: the RSS line of the timeline between weight events.
static RSS_LOG: Mutex<Vec<(Instant, u64)>> = Mutex::new(Vec::new());

/// The samples after `since`, as seconds since it (the log is cleared up to `since`).
fn rss_log_since(since: Instant) -> Vec<(f64, u64)> {
    let mut log = RSS_LOG.lock().unwrap_or_else(|e| e.into_inner());
    log.retain(|(t, _)| *t >= since);
    log.iter()
        .map(|(t, r)| (t.duration_since(since).as_secs_f64(), *r))
        .collect()
}

fn start_rss_sampler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if current_rss().is_none() {
            return;
        }
        // A failure to start it only makes phase peaks coarser.
        let _ = std::thread::Builder::new()
            .name("lowtide-rss".into())
            .spawn(|| {
                for i in 0u64.. {
                    if let Some(r) = current_rss() {
                        SAMPLED_PEAK.fetch_max(r, std::sync::atomic::Ordering::Relaxed);
                        if i % 4 == 0 {
                            let mut log = RSS_LOG.lock().unwrap_or_else(|e| e.into_inner());
                            // Bounded: an hour of samples at most.
                            if log.len() < 200_000 {
                                log.push((Instant::now(), r));
                            }
                        }
                    }
                    std::thread::sleep(SAMPLE_EVERY);
                }
            });
    });
}

/// The sampled peak since the last call, restarted from the RSS now.
fn take_sampled_peak() -> u64 {
    let now = current_rss().unwrap_or(0);
    SAMPLED_PEAK
        .swap(now, std::sync::atomic::Ordering::Relaxed)
        .max(now)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// Appends `(start, end)` to `v`, merging it into the last period when they overlap.
fn push_period(v: &mut Vec<(f64, f64)>, start: f64, end: f64) {
    if let Some(last) = v.last_mut() {
        if start <= last.1 + 1e-3 && end >= last.0 {
            last.0 = last.0.min(start);
            last.1 = last.1.max(end);
            return;
        }
    }
    v.push((start, end));
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
    pub timeline: Timeline,
}

impl Accounting {
    fn lock(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(&self, component: &str) {
        let mut s = self.lock();
        s.components.entry(component.to_string()).or_default();
        if !s.timeline.components.iter().any(|c| c == component) {
            s.timeline.components.push(component.to_string());
        }
    }

    fn now(&self) -> f64 {
        self.since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
            .as_secs_f64()
    }

    /// Records `component`'s resident bytes on the timeline (and the RSS, if due).
    fn sample(&self, s: &mut Stats, component: &str, t: f64) {
        let bytes = s.components.get(component).map_or(0, |c| c.resident_bytes);
        let idx = match s.timeline.components.iter().position(|c| c == component) {
            Some(i) => i,
            None => {
                s.timeline.components.push(component.to_string());
                s.timeline.components.len() - 1
            }
        };
        s.timeline.samples.push((t, idx, bytes));
        if t - s.last_rss >= RSS_EVERY || s.timeline.rss.is_empty() {
            if let Some(r) = current_rss() {
                s.timeline.rss.push((t, r));
            }
            s.last_rss = t;
        }
        if let Some(p) = s.phase {
            let resident = s.resident;
            let ph = &mut s.timeline.phases[p];
            ph.peak_resident_bytes = ph.peak_resident_bytes.max(resident);
        }
    }

    /// `bytes` became resident for `component`.
    pub fn add(&self, component: &str, bytes: u64) {
        let t = self.now();
        let mut s = self.lock();
        s.resident += bytes;
        s.peak = s.peak.max(s.resident);
        let c = s.components.entry(component.to_string()).or_default();
        c.resident_bytes += bytes;
        c.peak_resident_bytes = c.peak_resident_bytes.max(c.resident_bytes);
        self.sample(&mut s, component, t);
    }

    /// `bytes` of `component` were dropped.
    pub fn sub(&self, component: &str, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let t = self.now();
        let mut s = self.lock();
        s.resident = s.resident.saturating_sub(bytes);
        let c = s.components.entry(component.to_string()).or_default();
        c.resident_bytes = c.resident_bytes.saturating_sub(bytes);
        self.sample(&mut s, component, t);
    }

    pub fn transferred(&self, bytes: u64, seconds: f64) {
        let t = self.now();
        let mut s = self.lock();
        s.transferred += bytes;
        s.transfer_seconds += seconds;
        push_period(&mut s.timeline.transfers, (t - seconds).max(0.0), t);
    }

    /// `component` starts running: closes the phase in force (its peak RSS read) and opens
    /// one for it. Consecutive calls for the same component continue its phase.
    pub fn phase(&self, component: &str) {
        let t = self.now();
        let mut s = self.lock();
        if let Some(p) = s.phase {
            if s.timeline.phases[p].name == component {
                return;
            }
        }
        Self::close_phase(&mut s, t);
        start_rss_sampler();
        let hwm = peak_rss();
        take_sampled_peak();
        let resident = s.resident;
        s.timeline.phases.push(PhaseRecord {
            name: component.to_string(),
            start: t,
            end: t,
            peak_resident_bytes: resident,
            peak_rss_bytes: hwm.map(|_| 0),
            hwm_at_start: hwm.unwrap_or(0),
        });
        s.phase = Some(s.timeline.phases.len() - 1);
        if let Some(r) = current_rss() {
            s.timeline.rss.push((t, r));
            s.last_rss = t;
        }
    }

    /// A denoising step ended.
    pub fn step_done(&self) {
        let t = self.now();
        self.lock().timeline.steps.push(t);
    }

    /// Closes the phase in force (at the end of a pipeline call).
    pub fn end_phase(&self) {
        let t = self.now();
        let mut s = self.lock();
        Self::close_phase(&mut s, t);
    }

    fn close_phase(s: &mut Stats, t: f64) {
        if let Some(p) = s.phase.take() {
            let ph = &mut s.timeline.phases[p];
            ph.end = t;
            if ph.peak_rss_bytes.is_some() {
                let sampled = take_sampled_peak();
                ph.peak_rss_bytes =
                    peak_rss().map(|hwm| if hwm > ph.hwm_at_start { hwm } else { sampled });
            }
            if let Some(r) = current_rss() {
                s.timeline.rss.push((t, r));
            }
        }
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
        let t = self.now();
        let mut s = self.lock();
        s.stall_seconds += seconds;
        if seconds > 0.0 {
            push_period(&mut s.timeline.stalls, (t - seconds).max(0.0), t);
        }
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
        // The timeline starts again from what is resident now.
        let components = std::mem::take(&mut s.timeline.components);
        s.timeline = Timeline {
            samples: components
                .iter()
                .enumerate()
                .map(|(i, c)| (0.0, i, s.components.get(c).map_or(0, |u| u.resident_bytes)))
                .collect(),
            components,
            ..Timeline::default()
        };
        s.phase = None;
        s.last_rss = 0.0;
        if let Some(r) = current_rss() {
            s.timeline.rss.push((0.0, r));
        }
        *self.since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    pub fn report(&self) -> UsageReport {
        let since = *self.since.lock().unwrap_or_else(|e| e.into_inner());
        let wall = since.elapsed().as_secs_f64();
        let sampled = rss_log_since(since);
        let s = self.lock();
        let mut timeline = s.timeline.clone();
        timeline.rss.extend(sampled);
        timeline.rss.sort_by(|a, b| a.0.total_cmp(&b.0));
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
            timeline,
        }
    }
}
