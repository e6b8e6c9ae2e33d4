//! What every pipeline shares, written once (diffusers' `DiffusionPipeline`): load options, the
//! components opened from `model_index.json` under the residency manager, offload plans and
//! device maps, the memory check before a run, the denoising loop and the VAE decode.
//!
//! A family only says what differs: its components and offload order ([`ComponentSpec`],
//! `model_cpu_offload_seq`), its models and its `generate`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::loader::{Component, ModelIndex};
use crate::device::parse_device;
use crate::error::{Error, Result};
use crate::models::{AutoencoderKL, VaeMemory, VaeOptions};
use crate::planner::{ActChoice, ComponentInfo, VaeChoice};
use crate::residency::manager::Resident;
use crate::residency::{
    plan_balanced, Accounting, DeviceMap, HostTier, PinMemory, StoragePlan, Strategy,
    WeightProvider,
};
use crate::rng::TorchRng;
use crate::schedulers::Scheduler;
use crate::validate::Need;
use crate::weights::has_checkpoint;

/// How to open a pipeline.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype; stored weights are converted to it as they are read (or at forward time,
    /// for components with a storage dtype).
    pub dtype: DType,
    /// Weight file variant (`fp16` reads `*.fp16.safetensors`).
    pub variant: Option<String>,
    /// Whole components on different devices (excludes offloading until reset).
    pub device_map: Option<DeviceMapSpec>,
    /// The dtype resident weights are kept in, per component (diffusers' layerwise casting).
    pub storage: StoragePlan,
    /// The budget of pinned host copies of weights offloaded from a GPU (`residency::host`).
    pub pin_memory: PinMemory,
    /// Components whose weights come from one file (`--weights NAME=FILE`: GGUF, original or
    /// ComfyUI keys, fp8_scaled) instead of the pipeline folder's checkpoint.
    pub single_files: BTreeMap<String, PathBuf>,
    /// One file holding every component (an original Stable Diffusion checkpoint:
    /// `from_single_file`), for the components not in `single_files`.
    pub whole_file: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            variant: None,
            device_map: None,
            storage: StoragePlan::default(),
            pin_memory: PinMemory::default(),
            single_files: BTreeMap::new(),
            whole_file: None,
        }
    }
}

/// How `--device-map` places components.
#[derive(Debug, Clone)]
pub enum DeviceMapSpec {
    /// `component=device` pairs; unnamed components stay on the main device.
    Explicit(DeviceMap),
    /// diffusers' "balanced" strategy over `--max-memory` budgets.
    Balanced { max_memory: Vec<(String, u64)> },
}

/// Which offload strategy each component gets.
#[derive(Debug, Clone)]
pub struct OffloadPlan {
    pub default: Strategy,
    /// Per-component overrides (library API: e.g. group for the denoiser, model for the rest).
    pub per_component: BTreeMap<String, Strategy>,
    /// Components kept out of offload (diffusers' `_exclude_from_cpu_offload`).
    pub keep_on_device: Vec<String>,
    /// Partial residency per component under group offload (`--resident-groups`).
    pub resident: BTreeMap<String, Resident>,
}

impl OffloadPlan {
    pub fn uniform(s: Strategy) -> Self {
        Self {
            default: s,
            per_component: BTreeMap::new(),
            keep_on_device: Vec::new(),
            resident: BTreeMap::new(),
        }
    }
}

/// Makes a family struct with a `base: PipelineBase` field dereference to it.
#[macro_export]
macro_rules! family_base {
    ($family:ty) => {
        impl std::ops::Deref for $family {
            type Target = $crate::pipelines::PipelineBase;
            fn deref(&self) -> &Self::Target {
                &self.base
            }
        }
        impl std::ops::DerefMut for $family {
            fn deref_mut(&mut self) -> &mut Self::Target {
                &mut self.base
            }
        }
    };
}

/// A component a family declares: its folder, checkpoint stem and the classes it accepts.
pub struct ComponentSpec {
    pub name: &'static str,
    pub stem: &'static str,
    pub classes: &'static [&'static str],
    /// The denoiser (UNet or transformer): a bare `--storage-dtype` applies to it.
    pub denoiser: bool,
    /// May be absent from `model_index.json` or listed as `[null, null]` (Wan 2.2's
    /// `transformer_2`).
    pub optional: bool,
}

/// A pipeline's components under the residency manager, in `model_cpu_offload_seq` order.
pub struct PipelineBase {
    pub root: PathBuf,
    pub index: ModelIndex,
    pub components: Vec<Component>,
    pub options: LoadOptions,
    /// Resident bytes, peaks and transfers of every component.
    pub accounting: Arc<Accounting>,
    /// diffusers' `model_cpu_offload_seq`.
    pub order: &'static [&'static str],
    device_map: Option<DeviceMap>,
}

impl PipelineBase {
    /// Opens the weight-bearing components of `specs` (headers only), after checking that
    /// `model_index.json` names an accepted class for each. With a variant, components that
    /// lack it load their default files, as diffusers does, but at least one must have it.
    pub fn open(
        root: &Path,
        opts: LoadOptions,
        specs: &[ComponentSpec],
        order: &'static [&'static str],
    ) -> Result<Self> {
        let index = ModelIndex::read(root)?;
        let present = |s: &ComponentSpec| {
            !s.optional || matches!(index.components.get(s.name), Some((_, Some(_))))
        };
        let specs: Vec<&ComponentSpec> = specs.iter().filter(|s| present(s)).collect();
        for s in &specs {
            index.expect_class(root, s.name, s.classes)?;
        }
        let variant = opts.variant.as_deref();
        let variant_of = |s: &&ComponentSpec| -> Option<&str> {
            variant.filter(|v| has_checkpoint(&root.join(s.name), s.stem, Some(v)))
        };
        if let Some(v) = variant {
            if specs.iter().all(|s| variant_of(s).is_none()) {
                return Err(Error::NotFound {
                    what: format!("`{v}` variant"),
                    path: root.to_path_buf(),
                    hint: format!("no component has *.{v}.safetensors files; drop --variant {v}"),
                });
            }
        }
        opts.storage
            .check_components(specs.iter().map(|s| s.name))?;
        if let Some(c) = opts
            .single_files
            .keys()
            .find(|c| !specs.iter().any(|s| s.name == c.as_str()))
        {
            return Err(Error::InvalidArgument(format!(
                "--weights names `{c}`, which this pipeline does not have (it has {})",
                specs.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
            )));
        }
        let acct = Arc::new(Accounting::default());
        // One host tier for the pipeline's GPU; nothing to pin for the CPU.
        let host = match opts.pin_memory.budget() {
            Some(limit) if opts.device.is_cuda() => {
                Some(Arc::new(HostTier::new(limit, acct.clone())))
            }
            _ => None,
        };
        let components = specs
            .iter()
            .map(|s| {
                let class = index.class_of(root, s.name)?;
                let single = opts
                    .single_files
                    .get(s.name)
                    .or(opts.whole_file.as_ref())
                    .map(|p| (p.as_path(), class.as_str()));
                let c = Component::open(
                    root,
                    s.name,
                    s.stem,
                    variant_of(s),
                    single,
                    &opts.device,
                    opts.dtype,
                    acct.clone(),
                )?;
                c.weights
                    .set_storage(opts.storage.for_component(s.name, s.denoiser))?;
                c.weights.set_host_tier(host.clone());
                Ok(c)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            root: root.to_path_buf(),
            index,
            components,
            options: opts,
            accounting: acct,
            order,
            device_map: None,
        })
    }

    pub fn component(&self, name: &str) -> Result<&Component> {
        self.components
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown component `{name}`; this pipeline has {}",
                    self.order.join(", ")
                ))
            })
    }

    /// Builds component `name`'s model (see [`Component::build`]).
    pub fn build<C: serde::de::DeserializeOwned, M>(
        &self,
        name: &str,
        new: impl FnOnce(&crate::residency::ParamPath, &C) -> Result<M>,
    ) -> Result<(M, C)> {
        self.component(name)?.build(new)
    }

    /// Refuses a tokenizer whose ids the text encoder `encoder` cannot embed, naming both.
    pub fn check_vocab(
        &self,
        tokenizer: &str,
        max_id: u32,
        encoder: &str,
        vocab: usize,
    ) -> Result<()> {
        if max_id as usize >= vocab {
            return Err(Error::Tokenizer(format!(
                "{} has token ids up to {max_id} but {encoder}/config.json's vocab_size is \
                 {vocab}; the tokenizer does not belong to this text encoder",
                self.root.join(tokenizer).display()
            )));
        }
        Ok(())
    }

    /// The device a component computes on.
    pub fn component_device(&self, name: &str) -> Result<Device> {
        Ok(self.component(name)?.weights.device())
    }

    pub fn device(&self) -> &Device {
        &self.options.device
    }

    /// Places components as `options.device_map` says (called once the models are built).
    pub fn apply_device_map(&mut self) -> Result<()> {
        let Some(spec) = self.options.device_map.clone() else {
            return Ok(());
        };
        if self
            .components
            .iter()
            .any(|c| c.weights.strategy() != Strategy::None)
        {
            return Err(Error::InvalidArgument(
                "a device map cannot be combined with offloading; turn offloading off first".into(),
            ));
        }
        let map = match spec {
            DeviceMapSpec::Explicit(m) => m,
            DeviceMapSpec::Balanced { max_memory } => {
                let sizes: Vec<(String, u64)> = self
                    .components
                    .iter()
                    .map(|c| (c.name.clone(), c.weights.total_bytes()))
                    .collect();
                plan_balanced(&sizes, &max_memory)?
            }
        };
        for (name, dev) in &map.placement {
            let device = parse_device(dev)?;
            self.component(name)?.weights.set_device(device)?;
        }
        self.device_map = Some(map);
        Ok(())
    }

    /// The device map in force, if any.
    pub fn device_map(&self) -> Option<&DeviceMap> {
        self.device_map.as_ref()
    }

    /// Puts every component back on the main device, so offloading can be enabled.
    pub fn reset_device_map(&mut self) -> Result<()> {
        for c in &self.components {
            c.weights.set_device(self.options.device.clone())?;
        }
        self.device_map = None;
        Ok(())
    }

    /// Sets each component's offload strategy. Refused while a device map is in force, as
    /// diffusers refuses `enable_model_cpu_offload` after `device_map=`.
    pub fn set_offload(&mut self, plan: &OffloadPlan) -> Result<()> {
        for name in plan
            .per_component
            .keys()
            .chain(&plan.keep_on_device)
            .chain(plan.resident.keys())
        {
            self.component(name)?;
        }
        let strategy_of = |name: &str| {
            if plan.keep_on_device.iter().any(|k| k == name) {
                Strategy::None
            } else {
                plan.per_component
                    .get(name)
                    .copied()
                    .unwrap_or(plan.default)
            }
        };
        if self.device_map.is_some()
            && self
                .components
                .iter()
                .any(|c| strategy_of(&c.name) != Strategy::None)
        {
            return Err(Error::InvalidArgument(
                "offloading cannot be combined with a device map: the pipeline's components are \
                 placed by --device-map; reset the map first (library: reset_device_map())"
                    .into(),
            ));
        }
        for c in &self.components {
            c.weights.set_strategy(strategy_of(&c.name))?;
            c.weights
                .set_resident(plan.resident.get(&c.name).copied().unwrap_or_default())?;
        }
        Ok(())
    }

    /// Before a component runs: every other offloaded component gives its weights back (in the
    /// declared order only one is active at a time), and under model offload this one is loaded
    /// whole.
    pub fn use_component(&self, name: &str) -> Result<()> {
        let this = self.component(name)?;
        for c in &self.components {
            if c.name != name {
                c.weights.release()?;
            }
        }
        // The phase starts once the others have given their weights back.
        self.accounting.phase(name);
        this.weights.activate()
    }

    /// After a pipeline call nothing offloaded stays resident (diffusers' `maybe_free_model_hooks`).
    pub fn free_offloaded(&self) -> Result<()> {
        for c in &self.components {
            c.weights.release()?;
        }
        Ok(())
    }

    /// Refuses, before any weight is read, a run whose estimated peak cannot fit in the memory
    /// available on the execution device (the host's for the CPU, the GPU's free memory for
    /// CUDA): the resident weights under each component's strategy plus the family's activation
    /// estimates.
    pub fn check_memory(&self, activations: &[Need]) -> Result<()> {
        let weights =
            crate::residency::resident_estimate(self.components.iter().map(|c| c.weights.as_ref()));
        let mut needs = vec![Need {
            what: "weights",
            bytes: weights,
        }];
        needs.extend(activations.iter().map(|n| Need {
            what: n.what,
            bytes: n.bytes,
        }));
        crate::validate::fits_on_device(
            &self.options.device,
            &needs,
            "use a smaller --width/--height or --num-images, --tiling or --memory-budget for the \
             VAE, and --offload group or sequential for the weights",
        )
    }

    /// Every component's weight sizes, as the planner needs them (nothing is loaded).
    pub fn component_infos(&self) -> Vec<ComponentInfo> {
        self.components
            .iter()
            .map(|c| {
                let w = &c.weights;
                let (outside, units) = w.unit_bytes();
                let on_demand = w.on_demand_bytes();
                ComponentInfo {
                    name: c.name.clone(),
                    total_bytes: w.total_bytes() - on_demand,
                    on_demand_bytes: on_demand,
                    outside_bytes: outside,
                    unit_bytes: units,
                    largest_layer_bytes: w.largest_layer_bytes(),
                    converted_bytes: w.converted_bytes(),
                    largest_read_buffer: w.largest_read_buffer(),
                }
            })
            .collect()
    }

    /// Parameters of `component` (for compute estimates); 0 for an unknown one.
    pub fn param_count(&self, component: &str) -> f64 {
        self.component(component)
            .map_or(0.0, |c| c.weights.param_count() as f64)
    }

    /// Standard normal noise of `shape` from torch's CPU generator, on `component`'s device.
    pub fn randn(&self, rng: &mut TorchRng, shape: &[usize], component: &str) -> Result<Tensor> {
        let n = shape.iter().product();
        let dev = self.component_device(component)?;
        Ok(Tensor::from_vec(rng.randn(n), shape, &dev)?.to_dtype(self.options.dtype)?)
    }
}

/// The memory a VAE decode of `(batch, h, w)` latents needs under `opts` (in f64 terms, so
/// absurd sizes cannot overflow), plus the output images.
pub fn vae_decode_needs(
    vae: &AutoencoderKL,
    opts: &VaeOptions,
    batch: usize,
    h: usize,
    w: usize,
) -> Result<[Need; 2]> {
    let (bf, hf, wf) = (batch as f64, h as f64, w as f64);
    let per = if opts.slicing { 1.0 } else { bf };
    let decode = match (opts.memory_budget, opts.tiling || opts.tile_size.is_some()) {
        // A budget-chosen tile is planned later, within the budget.
        (Some(b), _) => b as f64,
        (None, true) => {
            let t = vae.tiling(opts.tile_size, opts.tile_overlap)?;
            per * vae.decode_peak_estimate(1, t.tile_latent, t.tile_latent) as f64
        }
        (None, false) => {
            let cap = 1usize << 14;
            per * vae.decode_peak_estimate(1, h.min(cap), w.min(cap)) as f64
                * (hf / hf.min(cap as f64))
                * (wf / wf.min(cap as f64))
        }
    };
    let f = vae.config().scale_factor() as f64;
    Ok([
        Need {
            what: "VAE decode",
            bytes: decode,
        },
        Need {
            what: "output images",
            bytes: bf * hf * f * wf * f * 3.0 * 4.0 * 2.0,
        },
    ])
}

/// The planner's alternatives for an image VAE's decode of `(batch, h, w)` latents: untiled
/// (and sliced, for a batch), then square tiles from the largest down (lossy), unless the user
/// fixed tiling or slicing. Each with the decode's activations and the output images.
pub fn image_vae_choices(
    vae: &AutoencoderKL,
    asked: &VaeOptions,
    batch: usize,
    h: usize,
    w: usize,
) -> Result<Vec<ActChoice>> {
    let f = vae.config().scale_factor();
    let images = batch as f64 * (h * f) as f64 * (w * f) as f64 * 3.0 * 4.0 * 2.0;
    let explicit = asked.tiling || asked.tile_size.is_some() || asked.tile_overlap.is_some();
    let slicings: &[bool] = if asked.slicing || batch == 1 {
        &[asked.slicing]
    } else {
        &[false, true]
    };
    let mut out = Vec::new();
    for &slicing in slicings {
        let per = if slicing { 1 } else { batch };
        // Slicing runs the same convolutions on smaller batches: about as fast.
        let slice_cost = if slicing && batch > 1 { 1.02 } else { 1.0 };
        let tag = if slicing && batch > 1 { ", sliced" } else { "" };
        if explicit {
            let t = vae.tiling(asked.tile_size, asked.tile_overlap)?;
            out.push(ActChoice {
                label: format!("tiles of {} px{tag} (as given)", t.tile_sample),
                bytes: vae.decode_activation_estimate(
                    per,
                    t.tile_latent.min(h),
                    t.tile_latent.min(w),
                ) as f64
                    + images,
                exact: true,
                cost: slice_cost * tiling_cost(h, w, t.tile_latent, t.overlap),
                vae: VaeChoice {
                    tile_size: asked.tile_size,
                    slicing,
                    decode_chunk: None,
                },
            });
            continue;
        }
        out.push(ActChoice {
            label: if tag.is_empty() {
                "untiled".into()
            } else {
                "untiled, sliced".into()
            },
            bytes: vae.decode_activation_estimate(per, h, w) as f64 + images,
            exact: true,
            cost: slice_cost,
            vae: VaeChoice {
                tile_size: None,
                slicing,
                decode_chunk: None,
            },
        });
        // Tiles of 8-cell multiples below the larger side, down to 8 cells.
        let mut lat = (h.max(w).saturating_sub(1)) / 8 * 8;
        while lat >= 8 {
            if let Ok(t) = vae.tiling(Some(lat * f), None) {
                out.push(ActChoice {
                    label: format!("tiles of {} px{tag}", t.tile_sample),
                    bytes: vae.decode_activation_estimate(per, lat.min(h), lat.min(w)) as f64
                        + images,
                    exact: false,
                    cost: slice_cost * tiling_cost(h, w, lat, t.overlap),
                    vae: VaeChoice {
                        tile_size: Some(lat * f),
                        slicing,
                        decode_chunk: None,
                    },
                });
            }
            lat -= 8;
        }
    }
    Ok(out)
}

/// The attention and MLP kernels' scratch of a transformer block whose token streams take
/// `streams` bytes: query chunks of at most 64 MiB of scores, less for short sequences.
pub fn attention_scratch(streams: f64) -> f64 {
    ((64u64 << 20) as f64).min(2.0 * streams)
}

/// Decoded area over the image's area, for tiles of `tile` latent cells with `overlap`.
pub fn tiling_cost(h: usize, w: usize, tile: usize, overlap: f64) -> f64 {
    let stride = ((tile as f64) * (1.0 - overlap)).max(1.0);
    let n = |side: usize| {
        if side <= tile {
            1.0
        } else {
            (side as f64 / stride).ceil()
        }
    };
    let (th, tw) = (tile.min(h) as f64, tile.min(w) as f64);
    (n(h) * th * n(w) * tw / (h as f64 * w as f64)).max(1.0)
}

/// The denoising loop every family runs: one model call per timestep, a scheduler step, a
/// finiteness check naming the step, progress.
pub fn denoise(
    sched: &mut dyn Scheduler,
    timesteps: &[f64],
    mut latents: Tensor,
    rng: &mut TorchRng,
    on_step: &mut dyn FnMut(usize, usize),
    mut model: impl FnMut(&Tensor, f64, &mut dyn Scheduler) -> Result<Tensor>,
) -> Result<(Tensor, Vec<f64>)> {
    let total = timesteps.len();
    let mut seconds = Vec::with_capacity(total);
    for (i, &t) in timesteps.iter().enumerate() {
        let t0 = std::time::Instant::now();
        let pred = model(&latents, t, sched)?;
        latents = sched.step(&pred, t, &latents, rng)?;
        crate::validate::finite(&latents, || {
            format!(
                "the latents after denoising step {} of {total} (timestep {t}); check \
                 --guidance, the initial latents and the scheduler config",
                i + 1
            )
        })?;
        seconds.push(t0.elapsed().as_secs_f64());
        on_step(i + 1, total);
    }
    Ok((latents, seconds))
}

impl PipelineBase {
    /// VAE-decodes latents on the `vae` component's device as the image pipelines do
    /// (`z / scaling_factor + shift_factor`) into (B, H, W, 3) images in [0, 1] on the CPU,
    /// failing if the decode is not finite.
    pub fn decode_to_image(
        &self,
        vae: &AutoencoderKL,
        latents: &Tensor,
        mem: &VaeMemory,
    ) -> Result<Tensor> {
        // The denoising loop's freed buffers go back to the system first: the decode's peak is
        // usually the run's, and would otherwise sit on top of them.
        crate::alloc::release_free_memory();
        decode_to_image(
            vae,
            &latents.to_device(&self.component_device("vae")?)?,
            mem,
        )
    }
}

fn decode_to_image(vae: &AutoencoderKL, latents: &Tensor, mem: &VaeMemory) -> Result<Tensor> {
    let cfg = vae.config();
    let mut z = (latents / cfg.scaling_factor)?;
    if let Some(s) = cfg.shift_factor {
        z = (z + s)?;
    }
    let x = decode_or_retry_tiled(vae, &z, mem)?;
    let image = ((x / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .contiguous()?;
    crate::validate::finite(&image, || {
        "the VAE's decoded image; check vae/config.json (scaling_factor, shift_factor)".into()
    })?;
    Ok(image)
}

/// Decodes; on a CUDA out-of-memory error during an untiled decode, retries once with
/// diffusers' default tiling and says so (as ComfyUI does). CPU allocation failures abort the
/// process instead, which is why runs are checked against the memory available first.
pub fn decode_or_retry_tiled(vae: &AutoencoderKL, z: &Tensor, mem: &VaeMemory) -> Result<Tensor> {
    match vae.decode_with(z, mem) {
        Err(e) if mem.tiling.is_none() && z.device().is_cuda() && is_oom(&e) => {
            eprintln!("VAE decode ran out of GPU memory; retrying with tiling");
            let tiled = VaeMemory {
                tiling: Some(vae.tiling(None, None)?),
                ..*mem
            };
            vae.decode_with(z, &tiled)
        }
        other => other,
    }
}

fn is_oom(e: &Error) -> bool {
    let m = e.to_string().to_ascii_lowercase();
    m.contains("out of memory") || m.contains("out_of_memory")
}
