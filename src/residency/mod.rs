//! Residency: the one place that decides when a weight is materialised and where.
//!
//! Layers never hold weight tensors. They hold [`Param`] handles (a name, an expected shape and the
//! component's [`WeightProvider`]) and resolve them at forward time. Modules that form natural
//! offload units announce themselves with [`WeightProvider::enter`]/[`WeightProvider::exit`], so a
//! provider can load a block's weights before it runs and drop them after. This foundation ships
//! [`ManagedWeights`] is the provider: it owns where each weight is under an offload [`Strategy`],
//! and reports to the pipeline's shared [`Accounting`].

pub mod accounting;
pub mod device_map;
pub mod host;
pub mod manager;
pub mod storage;

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

pub use accounting::{Accounting, ComponentUsage, UsageReport};
pub use device_map::{plan_balanced, DeviceMap};
pub use host::{HostTier, PinMemory};
pub use manager::{resident_estimate, ManagedWeights, Strategy};
pub use storage::{StorageDtype, StoragePlan};

/// What a layer declares it needs: a tensor name (relative to its component) and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    /// Whether the weight belongs to a layer whose storage dtype may be lowered (linear and
    /// conv layers, the ones diffusers' layerwise casting touches; not embeddings or norms).
    pub castable: bool,
    /// Loaded at its first use rather than when the component is activated: a part that a run
    /// may not touch (a VAE's encoder when only decoding), which then costs no memory.
    pub on_demand: bool,
}

/// Source of a component's weights at forward time.
pub trait WeightProvider: Send + Sync {
    /// The tensor for `spec`, on the execution device in the compute dtype.
    fn get(&self, spec: &ParamSpec) -> Result<Tensor>;
    /// [`WeightProvider::get`], except that a weight held in bf16 for an f32 computation may
    /// come as held: for kernels that widen it themselves (`layers::skinny`).
    fn get_stored(&self, spec: &ParamSpec) -> Result<Tensor> {
        self.get(spec)
    }
    /// Whether the checkpoint holds a tensor of this name (for layout differences between
    /// library versions, e.g. CLIP's `text_model.` prefix).
    fn contains(&self, name: &str) -> bool;
    /// A module (e.g. `down_blocks.1`) is about to run.
    fn enter(&self, _module: &str) -> Result<()> {
        Ok(())
    }
    /// A module has finished running.
    fn exit(&self, _module: &str) -> Result<()> {
        Ok(())
    }
    fn device(&self) -> Device;
    fn dtype(&self) -> DType;
}

/// A handle to one weight; the only way a layer gets at its parameters.
#[derive(Clone)]
pub struct Param {
    spec: ParamSpec,
    src: Arc<dyn WeightProvider>,
}

impl Param {
    pub fn get(&self) -> Result<Tensor> {
        self.src.get(&self.spec)
    }
    /// The weight in the compute dtype, or in bf16 if it is held so (see
    /// [`WeightProvider::get_stored`]).
    pub fn get_stored(&self) -> Result<Tensor> {
        self.src.get_stored(&self.spec)
    }
    pub fn spec(&self) -> &ParamSpec {
        &self.spec
    }
}

impl std::fmt::Debug for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Param({} {:?})", self.spec.name, self.spec.shape)
    }
}

/// Builds a component's parameter handles under a dotted prefix and records every one, so the
/// whole set can be checked against the checkpoint before anything runs.
#[derive(Clone)]
pub struct ParamPath {
    prefix: String,
    src: Arc<dyn WeightProvider>,
    registry: Arc<Mutex<Vec<ParamSpec>>>,
    /// Offload units in construction order (see [`UnitScope`]).
    units: Arc<Mutex<Vec<String>>>,
    /// Parameters declared under this path are [`ParamSpec::on_demand`].
    on_demand: bool,
}

impl ParamPath {
    pub fn root(src: Arc<dyn WeightProvider>) -> Self {
        Self {
            prefix: String::new(),
            src,
            registry: Arc::default(),
            units: Arc::default(),
            on_demand: false,
        }
    }

    /// The path one level down (`pp("down_blocks").pp(0)`).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Self {
            prefix,
            src: self.src.clone(),
            registry: self.registry.clone(),
            units: self.units.clone(),
            on_demand: self.on_demand,
        }
    }

    /// This path, its parameters loaded on first use (see [`ParamSpec::on_demand`]).
    pub fn on_demand(&self) -> Self {
        Self {
            on_demand: true,
            ..self.clone()
        }
    }

    pub fn param(&self, name: &str, shape: &[usize]) -> Param {
        self.declare(name, shape, false)
    }

    /// A weight of a linear or conv layer: one a storage dtype may lower (see [`ParamSpec`]).
    pub fn castable_param(&self, name: &str, shape: &[usize]) -> Param {
        self.declare(name, shape, true)
    }

    fn declare(&self, name: &str, shape: &[usize], castable: bool) -> Param {
        let spec = ParamSpec {
            name: if self.prefix.is_empty() {
                name.to_string()
            } else {
                format!("{}.{name}", self.prefix)
            },
            shape: shape.to_vec(),
            castable,
            on_demand: self.on_demand,
        };
        self.registry
            .lock()
            .expect("param registry poisoned")
            .push(spec.clone());
        Param {
            spec,
            src: self.src.clone(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether the checkpoint holds `name` under this path.
    pub fn has(&self, name: &str) -> bool {
        let full = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        self.src.contains(&full)
    }

    pub fn provider(&self) -> &Arc<dyn WeightProvider> {
        &self.src
    }

    /// Every offload unit declared so far under this root, in construction order (models build
    /// their units in the order they run them, so group offload can prefetch from the first
    /// pass on).
    pub fn declared_units(&self) -> Vec<String> {
        self.units.lock().expect("unit registry poisoned").clone()
    }

    /// Every parameter declared so far under this root.
    pub fn declared(&self) -> Vec<ParamSpec> {
        self.registry
            .lock()
            .expect("param registry poisoned")
            .clone()
    }
}

/// The name under which a module announces itself, captured at construction; offload units
/// (resnets, attention blocks, samplers, encoder layers) hold one and run their forward inside it.
#[derive(Clone)]
pub struct UnitScope {
    name: String,
    src: Arc<dyn WeightProvider>,
}

impl UnitScope {
    pub fn new(pp: &ParamPath) -> Self {
        pp.units
            .lock()
            .expect("unit registry poisoned")
            .push(pp.prefix().to_string());
        Self {
            name: pp.prefix().to_string(),
            src: pp.provider().clone(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` with this unit entered.
    pub fn run<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let scope = ModuleScope::enter(self.src.as_ref(), &self.name)?;
        let out = f()?;
        scope.exit()?;
        Ok(out)
    }
}

/// Announces a module to the provider for as long as the guard lives.
pub struct ModuleScope<'a> {
    src: &'a dyn WeightProvider,
    name: &'a str,
}

impl<'a> ModuleScope<'a> {
    pub fn enter(src: &'a dyn WeightProvider, name: &'a str) -> Result<Self> {
        src.enter(name)?;
        Ok(Self { src, name })
    }
    /// Ends the scope, reporting a failure to release (drop cannot).
    pub fn exit(self) -> Result<()> {
        let r = self.src.exit(self.name);
        std::mem::forget(self);
        r
    }
}

impl Drop for ModuleScope<'_> {
    fn drop(&mut self) {
        // Reached only on an early return through `?`: the error being propagated matters more.
        let _ = self.src.exit(self.name);
    }
}
