//! The residency manager of one component: the one owner of where each of its weights is.
//!
//! Tiers: *storage* (the safetensors files, in their stored dtype, read per tensor) and the
//! *execution device* (tensors in the compute dtype). A strategy decides when a weight moves up
//! and when it is dropped:
//!
//! - `None`: loaded on first use, kept.
//! - `Model`: the whole component is loaded by [`ManagedWeights::activate`] and dropped by
//!   [`ManagedWeights::release`]; the pipeline calls them in its component order.
//! - `Sequential`: only the leaf layer being run is resident (its parameters share a name prefix).
//! - `Group`: units (resnets, attention blocks, samplers, encoder layers, stems) announce
//!   themselves with `enter`; the first pass learns their order and which weights each uses; later
//!   passes keep `N` consecutive units resident and prefetch the next group on a background
//!   thread, wrapping from the last group to the first. At most one group is in flight, and its
//!   bytes count as resident from the moment the prefetch starts, so the peak is honest.
//!   With [`Resident`] groups (partial residency), some groups stay resident for the whole run
//!   once loaded and only the others are streamed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::accounting::Accounting;
use super::host::HostTier;
use super::storage::{held, Held, StorageDtype};
use super::{ParamSpec, WeightProvider};
use crate::error::{Error, Result};
use crate::weights::{Encoding, WeightStore};

/// How a component's weights are brought onto the execution device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    None,
    Model,
    Sequential,
    Group {
        blocks_per_group: usize,
        prefetch: bool,
    },
}

impl Strategy {
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::None => "none",
            Strategy::Model => "model",
            Strategy::Sequential => "sequential",
            Strategy::Group { .. } => "group",
        }
    }
}

/// Partial residency under group offload: which groups stay resident once loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resident {
    /// Every group is streamed.
    #[default]
    Nothing,
    /// The `K` largest groups stay.
    Groups(usize),
    /// The largest groups whose bytes add up to at most this stay.
    Bytes(u64),
}

/// The groups to keep resident, by index: the largest first (ties: the earlier one), as many as
/// `resident` allows. The largest, because the weights of a group are what its load costs while
/// its compute is roughly the same for every group of a transformer (and smaller, not larger,
/// for the UNet's deep low-resolution blocks, which hold most of its bytes): the largest groups
/// are those whose loads a prefetch hides least, and keeping them saves the most bytes moved per
/// step for the memory they take.
pub fn resident_groups(group_bytes: &[u64], resident: Resident) -> Vec<usize> {
    let mut by_size: Vec<usize> = (0..group_bytes.len()).collect();
    by_size.sort_by_key(|&i| (std::cmp::Reverse(group_bytes[i]), i));
    let mut keep = Vec::new();
    let mut sum = 0u64;
    for i in by_size {
        let ok = match resident {
            Resident::Nothing => false,
            Resident::Groups(k) => keep.len() < k,
            Resident::Bytes(b) => sum + group_bytes[i] <= b,
        };
        if ok {
            sum += group_bytes[i];
            keep.push(i);
        }
    }
    keep.sort_unstable();
    keep
}

type Loaded = HashMap<String, Tensor>;

fn bytes_of(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

/// Reads one weight from storage in the form it is held in. It is made on the CPU, where the file
/// is read (so an fp8 e5m2 weight travels as its held bytes), then moved to `device`.
fn load_held(store: &WeightStore, spec: &ParamSpec, h: Held, device: &Device) -> Result<Tensor> {
    let t = if h.is_packed() {
        store.load_packed(&spec.name, &spec.shape)?
    } else {
        store.load(&spec.name, &spec.shape, h.read_dtype(), &Device::Cpu)?
    };
    Ok(h.narrow(t)?.to_device(device)?)
}

/// The shape of the held tensor: ggml blocks are a 1-D run of bytes.
fn held_shape(spec: &ParamSpec, h: Held) -> Vec<usize> {
    match h {
        Held::Ggml(_) => vec![h.bytes(spec.shape.iter().product()) as usize],
        _ => spec.shape.clone(),
    }
}

/// Where a component's weights come from: its checkpoint, through the host tier when the
/// component is offloaded from a GPU. Cloned into the prefetch thread.
#[derive(Clone)]
struct Source {
    store: Arc<WeightStore>,
    host: Option<Arc<HostTier>>,
    component: Arc<str>,
}

impl Source {
    fn load(&self, spec: &ParamSpec, h: Held, device: &Device) -> Result<Tensor> {
        match &self.host {
            Some(host) if device.is_cuda() => host.load(
                &format!("{}/{}", self.component, spec.name),
                h.dtype(),
                &held_shape(spec, h),
                || load_held(&self.store, spec, h, &Device::Cpu),
                device,
            ),
            _ => load_held(&self.store, spec, h, device),
        }
    }

    /// Orders the copies enqueued so far before the calling thread's next computation.
    fn ready_for_compute(&self, device: &Device) -> Result<()> {
        match &self.host {
            Some(host) => host.ready_for_compute(device),
            None => Ok(()),
        }
    }

    /// Waits until the copies enqueued so far have landed.
    fn ready_on_host(&self, device: &Device) -> Result<()> {
        match &self.host {
            Some(host) => host.ready_on_host(device),
            // Without a host tier the copies ran on this thread's stream (candle uses per-thread
            // default streams). A no-op on the CPU.
            None => Ok(device.synchronize()?),
        }
    }
}

/// Reads `specs` from storage. Returns the tensors and the seconds it took. The group is complete
/// on the device when this returns (the prefetch thread hands it over only then, and the transfer
/// time is honest).
fn load_all(src: &Source, specs: &[(ParamSpec, Held)], device: &Device) -> Result<(Loaded, f64)> {
    let t0 = Instant::now();
    let mut out = HashMap::with_capacity(specs.len());
    for (s, h) in specs {
        out.insert(s.name.clone(), src.load(s, *h, device)?);
    }
    src.ready_on_host(device)?;
    Ok((out, t0.elapsed().as_secs_f64()))
}

struct InFlight {
    group: usize,
    bytes: u64,
    handle: JoinHandle<Result<(Loaded, f64)>>,
}

#[derive(Default)]
struct GroupState {
    /// Units in first-seen order, and the weights each used, while learning.
    order: Vec<String>,
    unit_specs: HashMap<String, Vec<ParamSpec>>,
    /// Whether a full pass has been seen and `groups` follows it.
    learned: bool,
    /// The plan in force: from the units' construction order until a pass has been seen, so
    /// even the first pass prefetches; then from the order the pass really took.
    groups: Option<Vec<Vec<ParamSpec>>>,
    unit_group: HashMap<String, usize>,
    /// Groups kept resident once loaded (partial residency), by index.
    keep: Vec<usize>,
    loaded: BTreeMap<usize, (Loaded, u64)>,
    in_flight: Option<InFlight>,
}

#[derive(Default)]
struct State {
    /// Weights kept regardless of units: everything for `None`/`Model`, the current leaf for
    /// `Sequential`, parameters used outside any unit for `Group`.
    kept: Loaded,
    kept_bytes: u64,
    /// `Sequential`: the leaf whose weights are in `kept`.
    leaf: Option<String>,
    /// `Group`: the unit running now and weights loaded for it outside the plan.
    unit: Option<String>,
    adhoc: Loaded,
    adhoc_bytes: u64,
    group: GroupState,
}

/// One component's weights under a strategy. Implements [`WeightProvider`] for its layers.
pub struct ManagedWeights {
    component: String,
    store: Arc<WeightStore>,
    device: Mutex<Device>,
    dtype: DType,
    /// Storage dtype of resident weights; `None` keeps them in the compute dtype.
    storage: Mutex<Option<StorageDtype>>,
    strategy: Mutex<Strategy>,
    resident: Mutex<Resident>,
    acct: Arc<Accounting>,
    /// Pinned host copies for weights offloaded from a GPU (used by every strategy but `None`).
    host: Mutex<Option<Arc<HostTier>>>,
    declared: Mutex<Vec<ParamSpec>>,
    /// Offload units in construction order.
    units: Mutex<Vec<String>>,
    state: Mutex<State>,
}

impl ManagedWeights {
    pub fn new(
        component: &str,
        store: WeightStore,
        device: Device,
        dtype: DType,
        acct: Arc<Accounting>,
    ) -> Self {
        acct.register(component);
        Self {
            component: component.to_string(),
            store: Arc::new(store),
            device: Mutex::new(device),
            dtype,
            storage: Mutex::new(None),
            strategy: Mutex::new(Strategy::None),
            resident: Mutex::default(),
            acct,
            host: Mutex::default(),
            declared: Mutex::default(),
            units: Mutex::default(),
            state: Mutex::default(),
        }
    }

    pub fn component(&self) -> &str {
        &self.component
    }

    pub fn store(&self) -> &WeightStore {
        &self.store
    }

    pub fn strategy(&self) -> Strategy {
        *lock(&self.strategy)
    }

    /// Gives the component the pipeline's host tier (`None`: weights always come from the
    /// checkpoint files).
    pub fn set_host_tier(&self, host: Option<Arc<HostTier>>) {
        *lock(&self.host) = host;
    }

    /// The source of loads under the strategy in force: the host tier only for offloaded weights
    /// (a resident component's single copy needs no host copy).
    fn source(&self) -> Source {
        let offloaded = self.strategy() != Strategy::None;
        Source {
            store: self.store.clone(),
            host: lock(&self.host).clone().filter(|_| offloaded),
            component: self.component.as_str().into(),
        }
    }

    /// Every parameter the model declared (for `Model`'s whole-component load).
    pub fn set_declared(&self, specs: Vec<ParamSpec>) {
        *lock(&self.declared) = specs;
    }

    /// The model's offload units in construction order (for group offload's first plan).
    pub fn set_units(&self, units: Vec<String>) {
        *lock(&self.units) = units;
    }

    /// Sets the dtype resident weights are kept in (`None`: the compute dtype); everything
    /// resident is dropped first.
    pub fn set_storage(&self, storage: Option<StorageDtype>) -> Result<()> {
        self.release_all()?;
        *lock(&self.storage) = storage;
        Ok(())
    }

    /// How `spec` is held: the storage dtype where it applies, else the file's or compute dtype.
    fn held(&self, spec: &ParamSpec) -> Held {
        let (file, encoding) = self
            .store
            .get(&spec.name)
            .map_or((self.dtype, Encoding::Plain), |t| (t.dtype, t.encoding));
        held(
            *lock(&self.storage),
            &spec.name,
            spec.castable,
            file,
            encoding,
            self.dtype,
        )
    }

    /// Bytes `spec` occupies while resident.
    fn held_bytes(&self, spec: &ParamSpec) -> u64 {
        self.held(spec).bytes(spec.shape.iter().product::<usize>())
    }

    /// Bytes of all declared parameters as they are held resident.
    pub fn total_bytes(&self) -> u64 {
        lock(&self.declared)
            .iter()
            .map(|s| self.held_bytes(s))
            .sum()
    }

    /// Bytes of the largest layer (parameters sharing a name prefix): sequential offload's unit.
    pub fn largest_layer_bytes(&self) -> u64 {
        let mut per: HashMap<&str, u64> = HashMap::new();
        let declared = lock(&self.declared);
        for s in declared.iter() {
            *per.entry(leaf_of(&s.name)).or_default() += self.held_bytes(s);
        }
        per.values().copied().max().unwrap_or(0)
    }

    /// Bytes of each planned group, once group offload has learned the order.
    pub fn group_bytes(&self) -> Option<Vec<u64>> {
        let st = lock(&self.state);
        st.group.groups.as_ref().map(|gs| {
            gs.iter()
                .map(|g| g.iter().map(|s| self.held_bytes(s)).sum())
                .collect()
        })
    }

    /// Bytes of the declared parameters (on-demand ones apart) outside every offload unit (kept
    /// resident under group offload), and of each unit's, in construction order: what a planner
    /// needs to size group offload before anything is loaded.
    pub fn unit_bytes(&self) -> (u64, Vec<u64>) {
        let units = lock(&self.units).clone();
        let mut per = vec![0u64; units.len()];
        let mut outside = 0u64;
        for p in lock(&self.declared).iter().filter(|p| !p.on_demand) {
            let owner = units
                .iter()
                .enumerate()
                .filter(|(_, u)| {
                    p.name
                        .strip_prefix(u.as_str())
                        .is_some_and(|r| r.starts_with('.'))
                })
                .max_by_key(|(_, u)| u.len());
            match owner {
                Some((i, _)) => per[i] += self.held_bytes(p),
                None => outside += self.held_bytes(p),
            }
        }
        (outside, per)
    }

    /// Number of declared parameters (on-demand ones apart): a model's size for compute
    /// estimates.
    pub fn param_count(&self) -> u64 {
        lock(&self.declared)
            .iter()
            .filter(|s| !s.on_demand)
            .map(|s| s.shape.iter().product::<usize>() as u64)
            .sum()
    }

    /// Held bytes of the declared parameters (on-demand ones apart) converted as they are read
    /// (their file's dtype is not the one they are held in, e.g. bf16 files computed in f32):
    /// they cannot be mapped from the file and pass through read buffers.
    pub fn converted_bytes(&self) -> u64 {
        lock(&self.declared)
            .iter()
            .filter(|s| !s.on_demand)
            .filter(|s| {
                let file = self.store.get(&s.name).map_or(self.dtype, |t| t.dtype);
                file != self.held(s).read_dtype()
            })
            .map(|s| self.held_bytes(s))
            .sum()
    }

    /// File bytes of the largest weight converted as it is read: its read buffer and its
    /// converted copy exist at once while it loads. For packed weights (GGUF blocks, scaled
    /// fp8), the compute-dtype copy a layer dequantizes into while it runs.
    pub fn largest_read_buffer(&self) -> u64 {
        let compute = self.dtype.size_in_bytes() as u64;
        lock(&self.declared)
            .iter()
            .filter(|s| !s.on_demand)
            .filter_map(|s| {
                let t = self.store.get(&s.name)?;
                let h = self.held(s);
                if h.is_packed() {
                    Some(s.shape.iter().product::<usize>() as u64 * compute)
                } else {
                    (t.dtype != h.read_dtype()).then_some(t.nbytes())
                }
            })
            .max()
            .unwrap_or(0)
    }

    /// Bytes of the declared parameters loaded only at first use (a VAE's encoder).
    pub fn on_demand_bytes(&self) -> u64 {
        lock(&self.declared)
            .iter()
            .filter(|s| s.on_demand)
            .map(|s| self.held_bytes(s))
            .sum()
    }

    /// Partial residency under group offload (see [`Resident`]); everything resident is
    /// dropped first.
    pub fn set_resident(&self, r: Resident) -> Result<()> {
        self.release_all()?;
        *lock(&self.resident) = r;
        let mut st = lock(&self.state);
        let sizes = self.groups_bytes(&st);
        st.group.keep = resident_groups(&sizes, r);
        Ok(())
    }

    pub fn resident(&self) -> Resident {
        *lock(&self.resident)
    }

    /// Indices of the groups kept resident under the plan in force.
    pub fn kept_groups(&self) -> Vec<usize> {
        lock(&self.state).group.keep.clone()
    }

    fn groups_bytes(&self, st: &State) -> Vec<u64> {
        st.group.groups.as_ref().map_or_else(Vec::new, |gs| {
            gs.iter()
                .map(|g| g.iter().map(|s| self.held_bytes(s)).sum())
                .collect()
        })
    }

    /// Changes the strategy; everything resident is dropped first.
    pub fn set_strategy(&self, s: Strategy) -> Result<()> {
        if let Strategy::Group {
            blocks_per_group: 0,
            ..
        } = s
        {
            return Err(Error::InvalidArgument(
                "--blocks-per-group must be at least 1".into(),
            ));
        }
        self.release_all()?;
        *lock(&self.state) = State::default();
        *lock(&self.strategy) = s;
        self.plan_declared();
        Ok(())
    }

    /// Moves the component to another device; everything resident is dropped first.
    pub fn set_device(&self, device: Device) -> Result<()> {
        self.release_all()?;
        *lock(&self.device) = device;
        Ok(())
    }

    fn load_one(&self, spec: &ParamSpec) -> Result<Tensor> {
        let t0 = Instant::now();
        let device = lock(&self.device).clone();
        let src = self.source();
        let t = src.load(spec, self.held(spec), &device)?;
        src.ready_for_compute(&device)?;
        let secs = t0.elapsed().as_secs_f64();
        self.acct.transferred(bytes_of(&t), secs);
        self.acct.stalled(secs);
        Ok(t)
    }

    /// Before the component runs. `Model` loads the whole component now (but its on-demand
    /// parts, loaded at first use); so does `None` (its
    /// weights are resident from their first use on, as `pipe.to(device)`; loading them in one
    /// go, before any activation is allocated, also keeps the allocator from recycling
    /// activation memory for weights, which measured slower).
    pub fn activate(&self) -> Result<()> {
        if !matches!(self.strategy(), Strategy::Model | Strategy::None) {
            return Ok(());
        }
        let specs = lock(&self.declared).clone();
        let mut st = lock(&self.state);
        for spec in specs.iter().filter(|s| !s.on_demand) {
            if !st.kept.contains_key(&spec.name) {
                let t = self.load_one(spec)?;
                let b = bytes_of(&t);
                st.kept.insert(spec.name.clone(), t);
                st.kept_bytes += b;
                self.acct.add(&self.component, b);
            }
        }
        Ok(())
    }

    /// Drops what the strategy does not keep between calls (everything but `None`'s weights).
    /// Group offload's learned order becomes final here if a pass has been seen.
    pub fn release(&self) -> Result<()> {
        if self.strategy() == Strategy::None {
            return Ok(());
        }
        self.release_all()
    }

    fn release_all(&self) -> Result<()> {
        let mut st = lock(&self.state);
        let in_flight = st.group.in_flight.take();
        if let Some(f) = in_flight {
            // Wait for the prefetch thread so its memory is really gone; its result is unused.
            let _ = f.handle.join();
            self.acct.sub(&self.component, f.bytes);
        }
        let loaded = std::mem::take(&mut st.group.loaded);
        for (_, (_, b)) in loaded {
            self.acct.sub(&self.component, b);
        }
        let (kept, adhoc) = (st.kept_bytes, st.adhoc_bytes);
        self.acct.sub(&self.component, kept + adhoc);
        st.kept.clear();
        st.kept_bytes = 0;
        st.adhoc.clear();
        st.adhoc_bytes = 0;
        st.leaf = None;
        st.unit = None;
        if !st.group.learned && !st.group.order.is_empty() {
            self.plan_learned(&mut st);
        }
        drop(st);
        // Copied weights (converted dtypes, small tensors) go back to the system now, not after
        // the allocator's purge delay: the next component's peak should not sit on them.
        crate::alloc::release_free_memory();
        Ok(())
    }

    /// The first plan, before any pass: units in construction order, each with the declared
    /// parameters under its name (a parameter belongs to the innermost unit around it).
    fn plan_declared(&self) {
        let units = lock(&self.units).clone();
        if units.is_empty() {
            return;
        }
        let mut specs: HashMap<String, Vec<ParamSpec>> = HashMap::new();
        for p in lock(&self.declared).iter() {
            let owner = units
                .iter()
                .filter(|u| {
                    p.name
                        .strip_prefix(u.as_str())
                        .is_some_and(|r| r.starts_with('.'))
                })
                .max_by_key(|u| u.len());
            if let Some(u) = owner {
                specs.entry(u.clone()).or_default().push(p.clone());
            }
        }
        let mut st = lock(&self.state);
        self.plan(&mut st, &units, &specs);
    }

    /// The plan from the pass just seen; replaces the declared one.
    fn plan_learned(&self, st: &mut State) {
        let (order, specs) = (st.group.order.clone(), st.group.unit_specs.clone());
        let before = group_names(st.group.groups.as_deref()).unwrap_or_default();
        self.plan(st, &order, &specs);
        st.group.learned = true;
        // What is resident or in flight stays where the new plan has the same group (the pass
        // usually ran in construction order, with the stems as small groups of their own); the
        // rest belongs to groups the new plan does not have.
        let after = group_names(st.group.groups.as_deref()).unwrap_or_default();
        let new_index = |old: usize| {
            before
                .get(old)
                .and_then(|g| after.iter().position(|h| h == g))
        };
        let loaded = std::mem::take(&mut st.group.loaded);
        for (old, entry) in loaded {
            match new_index(old) {
                Some(i) => {
                    st.group.loaded.insert(i, entry);
                }
                None => self.acct.sub(&self.component, entry.1),
            }
        }
        if let Some(mut f) = st.group.in_flight.take() {
            match new_index(f.group) {
                Some(i) => {
                    f.group = i;
                    st.group.in_flight = Some(f);
                }
                None => {
                    let _ = f.handle.join();
                    self.acct.sub(&self.component, f.bytes);
                }
            }
        }
    }

    fn plan(&self, st: &mut State, order: &[String], specs: &HashMap<String, Vec<ParamSpec>>) {
        let Strategy::Group {
            blocks_per_group, ..
        } = self.strategy()
        else {
            return;
        };
        let g = &mut st.group;
        g.unit_group.clear();
        let mut groups = Vec::new();
        for (i, chunk) in order.chunks(blocks_per_group.max(1)).enumerate() {
            let mut group = Vec::new();
            for u in chunk {
                g.unit_group.insert(u.clone(), i);
                group.extend(specs.get(u).cloned().unwrap_or_default());
            }
            groups.push(group);
        }
        g.groups = Some(groups);
        let sizes = self.groups_bytes(st);
        st.group.keep = resident_groups(&sizes, self.resident());
    }

    /// Makes group `gi` resident, evicting every other group, then starts the next prefetch.
    fn enter_group(&self, st: &mut State, gi: usize) -> Result<()> {
        let Strategy::Group { prefetch, .. } = self.strategy() else {
            return Ok(());
        };
        let n = st.group.groups.as_ref().map_or(0, |g| g.len());
        // Evict the other streamed groups first so at most this group, the resident ones and
        // one prefetch are resident.
        let keep = st.group.keep.clone();
        let others: Vec<usize> = st
            .group
            .loaded
            .keys()
            .copied()
            .filter(|&k| k != gi && !keep.contains(&k))
            .collect();
        for k in others {
            if let Some((_, b)) = st.group.loaded.remove(&k) {
                self.acct.sub(&self.component, b);
            }
        }
        if !st.group.loaded.contains_key(&gi) {
            let t0 = Instant::now();
            let mut got = None;
            if let Some(f) = st.group.in_flight.take() {
                let res = f.handle.join().map_err(|_| {
                    Error::InvalidArgument("weight prefetch thread panicked".into())
                })?;
                if f.group == gi {
                    let (tensors, secs) = res?;
                    self.acct.transferred(f.bytes, secs);
                    got = Some((tensors, f.bytes));
                } else {
                    self.acct.sub(&self.component, f.bytes);
                }
            }
            let entry = match got {
                Some(e) => e,
                None => {
                    let specs = st
                        .group
                        .groups
                        .as_ref()
                        .map(|g| self.with_held(&g[gi]))
                        .unwrap_or_default();
                    let device = lock(&self.device).clone();
                    let (tensors, secs) = load_all(&self.source(), &specs, &device)?;
                    let b: u64 = tensors.values().map(bytes_of).sum();
                    self.acct.transferred(b, secs);
                    self.acct.add(&self.component, b);
                    (tensors, b)
                }
            };
            self.acct.stalled(t0.elapsed().as_secs_f64());
            st.group.loaded.insert(gi, entry);
        }
        if prefetch && n > 1 {
            // The next group not already resident (resident groups are skipped once loaded).
            let next = (1..n)
                .map(|d| (gi + d) % n)
                .find(|j| !st.group.loaded.contains_key(j));
            let busy = st.group.in_flight.is_some();
            if let (false, Some(next)) = (busy, next) {
                let specs = st
                    .group
                    .groups
                    .as_ref()
                    .map(|g| self.with_held(&g[next]))
                    .unwrap_or_default();
                let bytes: u64 = specs.iter().map(|(s, _)| self.held_bytes(s)).sum();
                self.acct.add(&self.component, bytes);
                let src = self.source();
                let device = lock(&self.device).clone();
                let handle = std::thread::Builder::new()
                    .name("lowtide-prefetch".into())
                    .spawn(move || load_all(&src, &specs, &device))
                    .map_err(|e| Error::InvalidArgument(format!("cannot start prefetch: {e}")))?;
                st.group.in_flight = Some(InFlight {
                    group: next,
                    bytes,
                    handle,
                });
            }
        }
        Ok(())
    }

    fn with_held(&self, specs: &[ParamSpec]) -> Vec<(ParamSpec, Held)> {
        specs.iter().map(|s| (s.clone(), self.held(s))).collect()
    }

    fn keep(&self, st: &mut State, spec: &ParamSpec) -> Result<Tensor> {
        if let Some(t) = st.kept.get(&spec.name) {
            return Ok(t.clone());
        }
        let t = self.load_one(spec)?;
        let b = bytes_of(&t);
        st.kept.insert(spec.name.clone(), t.clone());
        st.kept_bytes += b;
        self.acct.add(&self.component, b);
        Ok(t)
    }

    fn drop_kept(&self, st: &mut State) {
        self.acct.sub(&self.component, st.kept_bytes);
        st.kept.clear();
        st.kept_bytes = 0;
    }

    fn drop_adhoc(&self, st: &mut State) {
        self.acct.sub(&self.component, st.adhoc_bytes);
        st.adhoc.clear();
        st.adhoc_bytes = 0;
    }
}

/// The parameter names of each group, to tell whether two plans are the same.
fn group_names(groups: Option<&[Vec<ParamSpec>]>) -> Option<Vec<Vec<String>>> {
    groups.map(|gs| {
        gs.iter()
            .map(|g| {
                // Sorted: a pass meets a group's weights in use order, a declaration in
                // construction order.
                let mut names: Vec<String> = g.iter().map(|s| s.name.clone()).collect();
                names.sort_unstable();
                names
            })
            .collect()
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The parameter's layer: its name without the last dotted part.
fn leaf_of(name: &str) -> &str {
    name.rsplit_once('.').map_or("", |(l, _)| l)
}

impl ManagedWeights {
    /// The resident tensor for `spec`, in the form it is held in.
    fn get_held(&self, spec: &ParamSpec) -> Result<Tensor> {
        let strategy = self.strategy();
        let mut st = lock(&self.state);
        match strategy {
            Strategy::None | Strategy::Model => self.keep(&mut st, spec),
            Strategy::Sequential => {
                let leaf = leaf_of(&spec.name);
                if st.leaf.as_deref() != Some(leaf) {
                    self.drop_kept(&mut st);
                    st.leaf = Some(leaf.to_string());
                }
                self.keep(&mut st, spec)
            }
            Strategy::Group { .. } => {
                let Some(unit) = st.unit.clone() else {
                    // Outside every unit: a non-block parameter, kept.
                    return self.keep(&mut st, spec);
                };
                if !st.group.learned {
                    let specs = st.group.unit_specs.entry(unit.clone()).or_default();
                    if !specs.iter().any(|s| s.name == spec.name) {
                        specs.push(spec.clone());
                    }
                }
                if let Some(gi) = st.group.unit_group.get(&unit).copied() {
                    if let Some(t) = st
                        .group
                        .loaded
                        .get(&gi)
                        .and_then(|(m, _)| m.get(&spec.name))
                    {
                        return Ok(t.clone());
                    }
                }
                if let Some(t) = st.adhoc.get(&spec.name) {
                    return Ok(t.clone());
                }
                let t = self.load_one(spec)?;
                let b = bytes_of(&t);
                st.adhoc.insert(spec.name.clone(), t.clone());
                st.adhoc_bytes += b;
                self.acct.add(&self.component, b);
                Ok(t)
            }
        }
    }
}

impl WeightProvider for ManagedWeights {
    /// Upcasts a low-precision resident weight to the compute dtype here, inside the layer's
    /// call; the copy lives only as long as the layer uses it.
    fn get(&self, spec: &ParamSpec) -> Result<Tensor> {
        let t = self.get_held(spec)?;
        self.held(spec).widen(&t, &spec.shape, self.dtype)
    }

    /// A bf16-held weight of an f32 component as it is held: no copy.
    fn get_stored(&self, spec: &ParamSpec) -> Result<Tensor> {
        let t = self.get_held(spec)?;
        match self.held(spec) {
            Held::Dtype(DType::BF16) if self.dtype == DType::F32 => Ok(t),
            h => h.widen(&t, &spec.shape, self.dtype),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.store.get(name).is_some()
    }

    fn enter(&self, module: &str) -> Result<()> {
        if !matches!(self.strategy(), Strategy::Group { .. }) {
            return Ok(());
        }
        let mut st = lock(&self.state);
        self.drop_adhoc(&mut st);
        if !st.group.learned {
            if st.group.order.iter().any(|u| u == module) {
                // A unit came round again: one full pass has been seen.
                self.plan_learned(&mut st);
            } else {
                st.group.order.push(module.to_string());
            }
        }
        if let Some(gi) = st.group.unit_group.get(module).copied() {
            self.enter_group(&mut st, gi)?;
        }
        st.unit = Some(module.to_string());
        Ok(())
    }

    fn exit(&self, _module: &str) -> Result<()> {
        if !matches!(self.strategy(), Strategy::Group { .. }) {
            return Ok(());
        }
        let mut st = lock(&self.state);
        st.unit = None;
        self.drop_adhoc(&mut st);
        Ok(())
    }

    fn device(&self) -> Device {
        lock(&self.device).clone()
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}

/// Bytes resident at the peak of a pipeline call with these components, from their strategies:
/// `None` components stay, one `Model` component is loaded at a time, and sequential/group
/// offload hold a layer (times the group size, and once more for a prefetch) at a time.
pub fn resident_estimate<'a>(components: impl Iterator<Item = &'a ManagedWeights>) -> f64 {
    let (mut kept, mut one_at_a_time) = (0u64, 0u64);
    for c in components {
        match c.strategy() {
            Strategy::None => kept += c.total_bytes(),
            Strategy::Model => one_at_a_time = one_at_a_time.max(c.total_bytes()),
            Strategy::Sequential => one_at_a_time = one_at_a_time.max(c.largest_layer_bytes()),
            Strategy::Group {
                blocks_per_group,
                prefetch,
            } => {
                let n = blocks_per_group as u64 * if prefetch { 2 } else { 1 };
                one_at_a_time = one_at_a_time.max(c.largest_layer_bytes().saturating_mul(n));
            }
        }
    }
    (kept + one_at_a_time) as f64
}
