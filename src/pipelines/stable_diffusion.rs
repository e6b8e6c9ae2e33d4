//! Stable Diffusion 1.x / 2.x: text-to-image and image-to-image, step for step as diffusers'
//! `StableDiffusionPipeline` and `StableDiffusionImg2ImgPipeline`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::loader::{Component, ModelIndex};
use crate::device::parse_device;
use crate::error::{read_json, Error, Result};
use crate::models::{
    AutoencoderKL, AutoencoderKLConfig, ClipTextConfig, ClipTextModel, UNet2DConditionConfig,
    UNet2DConditionModel, VaeMemory, VaeOptions,
};
use crate::residency::{plan_balanced, Accounting, DeviceMap, Strategy, WeightProvider};
use crate::rng::TorchRng;
use crate::schedulers::{self, SchedulerConfig, SchedulerKind};
use crate::tokenizer::ClipTokenizer;
use crate::weights::has_checkpoint;

/// How to open a pipeline.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype; stored weights are converted to it as they are read.
    pub dtype: DType,
    /// Weight file variant (`fp16` reads `*.fp16.safetensors`).
    pub variant: Option<String>,
    /// Whole components on different devices (excludes offloading until reset).
    pub device_map: Option<DeviceMapSpec>,
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
    /// Per-component overrides (library API: e.g. group for the UNet, model for the rest).
    pub per_component: BTreeMap<String, Strategy>,
    /// Components kept out of offload (diffusers' `_exclude_from_cpu_offload`).
    pub keep_on_device: Vec<String>,
}

impl OffloadPlan {
    pub fn uniform(s: Strategy) -> Self {
        Self {
            default: s,
            per_component: BTreeMap::new(),
            keep_on_device: Vec::new(),
        }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            variant: None,
            device_map: None,
        }
    }
}

pub struct StableDiffusion {
    pub root: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler_config: SchedulerConfig,
    pub default_scheduler: SchedulerKind,
    pub components: Vec<Component>,
    pub options: LoadOptions,
    /// Resident bytes, peaks and transfers of every component.
    pub accounting: Arc<Accounting>,
    device_map: Option<DeviceMap>,
}

/// diffusers' `model_cpu_offload_seq` for Stable Diffusion.
pub const OFFLOAD_ORDER: [&str; 3] = ["text_encoder", "unet", "vae"];

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub steps: usize,
    pub guidance: f64,
    pub scheduler: Option<SchedulerKind>,
    pub seed: u64,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub num_images: usize,
    /// Initial latents (B, C, h, w), exactly as diffusers' `latents=`.
    pub latents: Option<Tensor>,
    /// img2img: the init image (1, 3, H, W) in [-1, 1] and the strength in (0, 1].
    pub init_image: Option<Tensor>,
    pub strength: f64,
    /// VAE tiling / slicing / memory budget.
    pub vae: VaeOptions,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: None,
            steps: 50,
            guidance: 7.5,
            scheduler: None,
            seed: 0,
            width: None,
            height: None,
            num_images: 1,
            latents: None,
            init_image: None,
            strength: 0.8,
            vae: VaeOptions::default(),
        }
    }
}

pub struct GenerateOutput {
    /// (B, 77, D) text embeddings of the prompt.
    pub prompt_embeds: Tensor,
    /// (B, C, h, w) latents after the last step, before VAE scaling.
    pub final_latents: Tensor,
    /// (B, H, W, 3) in [0, 1], before 8-bit quantisation.
    pub image: Tensor,
    /// The VAE memory strategy the decode used (tiling may have been chosen by the budget).
    pub vae_memory: VaeMemory,
}

impl StableDiffusion {
    pub fn load(root: &Path, opts: LoadOptions) -> Result<Self> {
        let index = ModelIndex::read(root)?;
        let variant = opts.variant.as_deref();
        let (dev, dt) = (&opts.device, opts.dtype);
        let expect = |name: &str, allowed: &[&str]| -> Result<()> {
            let class = index.class_of(root, name)?;
            if !allowed.contains(&class.as_str()) {
                return Err(Error::unsupported(
                    "model_index.json",
                    name,
                    format!("\"{class}\""),
                    format!("supported: {}", allowed.join(", ")),
                ));
            }
            Ok(())
        };
        expect("text_encoder", &["CLIPTextModel"])?;
        expect("tokenizer", &["CLIPTokenizer", "CLIPTokenizerFast"])?;
        expect("unet", &["UNet2DConditionModel"])?;
        expect("vae", &["AutoencoderKL"])?;
        let sched_class = index.class_of(root, "scheduler")?;
        let default_scheduler = SchedulerKind::from_class_name(&sched_class)?;
        let scheduler_config: SchedulerConfig =
            read_json(&root.join("scheduler").join("scheduler_config.json"))?;

        // As diffusers: with a variant, components that lack it load their default files, but
        // at least one component must have it.
        let parts = [
            ("text_encoder", "model"),
            ("unet", "diffusion_pytorch_model"),
            ("vae", "diffusion_pytorch_model"),
        ];
        let variant_of = |name: &str, stem: &str| -> Option<&str> {
            variant.filter(|v| has_checkpoint(&root.join(name), stem, Some(v)))
        };
        if let Some(v) = variant {
            if parts.iter().all(|(n, s)| variant_of(n, s).is_none()) {
                return Err(Error::NotFound {
                    what: format!("`{v}` variant"),
                    path: root.to_path_buf(),
                    hint: format!("no component has *.{v}.safetensors files; drop --variant {v}"),
                });
            }
        }

        let acct = Arc::new(Accounting::default());
        let te = Component::open(
            root,
            "text_encoder",
            "model",
            variant_of("text_encoder", "model"),
            dev,
            dt,
            acct.clone(),
        )?;
        let te_cfg: ClipTextConfig = te.config()?;
        let pp = te.param_root();
        let text_encoder = ClipTextModel::new(&pp, &te_cfg)?;
        te.validate(&pp)?;

        let unet_c = Component::open(
            root,
            "unet",
            "diffusion_pytorch_model",
            variant_of("unet", "diffusion_pytorch_model"),
            dev,
            dt,
            acct.clone(),
        )?;
        let unet_cfg: UNet2DConditionConfig = unet_c.config()?;
        let pp = unet_c.param_root();
        let unet = UNet2DConditionModel::new(&pp, &unet_cfg)?;
        unet_c.validate(&pp)?;

        let vae_c = Component::open(
            root,
            "vae",
            "diffusion_pytorch_model",
            variant_of("vae", "diffusion_pytorch_model"),
            dev,
            dt,
            acct.clone(),
        )?;
        let vae_cfg: AutoencoderKLConfig = vae_c.config()?;
        let pp = vae_c.param_root();
        let vae = AutoencoderKL::new(&pp, &vae_cfg)?;
        vae_c.validate(&pp)?;

        let tokenizer =
            ClipTokenizer::from_dir(&root.join("tokenizer"), te_cfg.max_position_embeddings)?;
        if tokenizer.max_id() as usize >= te_cfg.vocab_size {
            return Err(Error::Tokenizer(format!(
                "{} has token ids up to {} but text_encoder/config.json's vocab_size is {}; \
                 the tokenizer does not belong to this text encoder",
                root.join("tokenizer").display(),
                tokenizer.max_id(),
                te_cfg.vocab_size
            )));
        }
        let mut pipe = Self {
            root: root.to_path_buf(),
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            default_scheduler,
            components: vec![te, unet_c, vae_c],
            options: opts,
            accounting: acct,
            device_map: None,
        };
        if let Some(spec) = pipe.options.device_map.clone() {
            pipe.apply_device_map(&spec)?;
        }
        Ok(pipe)
    }

    fn component(&self, name: &str) -> Result<&Component> {
        self.components
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown component `{name}`; this pipeline has {}",
                    OFFLOAD_ORDER.join(", ")
                ))
            })
    }

    /// The device a component computes on.
    pub fn component_device(&self, name: &str) -> Result<Device> {
        Ok(self.component(name)?.weights.device())
    }

    fn apply_device_map(&mut self, spec: &DeviceMapSpec) -> Result<()> {
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
            DeviceMapSpec::Explicit(m) => m.clone(),
            DeviceMapSpec::Balanced { max_memory } => {
                let sizes: Vec<(String, u64)> = self
                    .components
                    .iter()
                    .map(|c| (c.name.clone(), c.weights.total_bytes()))
                    .collect();
                plan_balanced(&sizes, max_memory)?
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
        for name in plan.per_component.keys().chain(&plan.keep_on_device) {
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
        }
        Ok(())
    }

    /// Before a component runs: every other offloaded component gives its weights back (in the
    /// declared order only one is active at a time), and under model offload this one is loaded
    /// whole.
    fn use_component(&self, name: &str) -> Result<()> {
        let this = self.component(name)?;
        for c in &self.components {
            if c.name != name {
                c.weights.release()?;
            }
        }
        this.weights.activate()
    }

    /// After a pipeline call nothing offloaded stays resident (diffusers' `maybe_free_model_hooks`).
    pub fn free_offloaded(&self) -> Result<()> {
        for c in &self.components {
            c.weights.release()?;
        }
        Ok(())
    }

    pub fn device(&self) -> &Device {
        &self.options.device
    }

    /// Pixels per latent cell.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().scale_factor()
    }

    /// Width and height must be multiples of this: the VAE factor and diffusers' rule of 8.
    pub fn size_multiple(&self) -> usize {
        let f = self.vae_scale_factor();
        8 * f / gcd(8, f)
    }

    pub fn latent_channels(&self) -> usize {
        self.unet.config().in_channels
    }

    /// Text embeddings (1, seq, D) for one prompt, on the UNet's device.
    pub fn encode_text(&self, text: &str) -> Result<Tensor> {
        if let Some(cut) = self.tokenizer.truncated_part(text)? {
            eprintln!(
                "warning: the following part of your input was truncated because CLIP can only \
                 handle sequences up to {} tokens: {cut:?}",
                self.tokenizer.max_len()
            );
        }
        let ids = self.tokenizer.encode_padded(text)?;
        let n = ids.len();
        let ids = Tensor::from_vec(ids, (1, n), &self.component_device("text_encoder")?)?;
        let out = self.text_encoder.forward(&ids, self.options.dtype)?;
        Ok(out.to_device(&self.component_device("unet")?)?)
    }

    fn randn(&self, rng: &mut TorchRng, shape: &[usize]) -> Result<Tensor> {
        let n = shape.iter().product();
        let dev = self.component_device("unet")?;
        Ok(Tensor::from_vec(rng.randn(n), shape, &dev)?.to_dtype(self.options.dtype)?)
    }

    /// Runs txt2img (or img2img when `init_image` is set). `on_step(i, total)` reports progress.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<GenerateOutput> {
        let out = self.generate_inner(req, on_step);
        let freed = self.free_offloaded();
        let out = out?;
        freed?;
        Ok(out)
    }

    fn generate_inner(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<GenerateOutput> {
        if req.num_images == 0 {
            return Err(Error::InvalidArgument(
                "--num-images must be at least 1".into(),
            ));
        }
        crate::validate::arg_f32("--guidance", req.guidance)?;
        let f = self.vae_scale_factor();
        let c = self.latent_channels();
        let b = req.num_images;
        let dtype = self.options.dtype;
        let kind = req.scheduler.unwrap_or(self.default_scheduler);
        let mut sched = schedulers::build(kind, &self.scheduler_config, req.steps)?;
        let mut rng = TorchRng::new(req.seed);

        // Size: explicit, else from the init image or latents, else the UNet's sample size.
        let (height, width) = if let Some(img) = &req.init_image {
            let (_, _, h, w) = img.dims4()?;
            (h, w)
        } else if let (None, None, Some(l)) = (req.height, req.width, &req.latents) {
            let (_, _, h, w) = l.dims4()?;
            (h * f, w * f)
        } else {
            let d = self.unet.config().sample_size.unwrap_or(64) * f;
            (req.height.unwrap_or(d), req.width.unwrap_or(d))
        };
        let multiple = self.size_multiple();
        if height == 0 || width == 0 || height % multiple != 0 || width % multiple != 0 {
            let what = if req.init_image.is_some() {
                "the --init-image's width and height"
            } else {
                "width and height"
            };
            return Err(Error::InvalidArgument(format!(
                "{what} must be positive multiples of {multiple} (the VAE scale factor {f} and diffusers' rule of 8); got {width}x{height}"
            )));
        }
        let (h, w) = (height / f, width / f);
        self.check_memory(b, cfg_batch(req.guidance), h, w, &req.vae)?;

        self.use_component("text_encoder")?;
        let cond = self.encode_text(&req.prompt)?;
        let cfg = req.guidance > 1.0;
        let prompt_embeds = cond.repeat((b, 1, 1))?;
        let context = if cfg {
            let neg = self.encode_text(req.negative_prompt.as_deref().unwrap_or(""))?;
            Tensor::cat(&[&neg.repeat((b, 1, 1))?, &prompt_embeds], 0)?
        } else {
            prompt_embeds.clone()
        };

        let all_ts = sched.timesteps().to_vec();
        let (timesteps, mut latents) = if let Some(img) = &req.init_image {
            if req.latents.is_some() {
                return Err(Error::InvalidArgument(
                    "--latents and --init-image cannot be combined".into(),
                ));
            }
            if !(req.strength > 0.0 && req.strength <= 1.0) {
                return Err(Error::InvalidArgument(format!(
                    "--strength must be in (0, 1]; got {}",
                    req.strength
                )));
            }
            let steps = req.steps;
            let init_t = ((steps as f64 * req.strength) as usize).min(steps);
            let t_start = steps - init_t;
            if init_t == 0 {
                return Err(Error::InvalidArgument(format!(
                    "--strength {} with {steps} steps leaves no denoising step \
                     (strength × steps < 1); raise --strength or --steps",
                    req.strength
                )));
            }
            let start = (t_start * sched.order()).min(all_ts.len());
            let ts = all_ts[start..].to_vec();
            sched.set_begin_index(start);
            self.use_component("vae")?;
            let vae_dev = self.component_device("vae")?;
            let dist = self
                .vae
                .encode(&img.to_device(&vae_dev)?.to_dtype(dtype)?)?;
            let dist = crate::models::LatentDist {
                mean: dist.mean.to_device(&self.component_device("unet")?)?,
                logvar: dist.logvar.to_device(&self.component_device("unet")?)?,
            };
            let eps = self.randn(&mut rng, dist.mean.dims())?;
            let sample = (&dist.mean + (dist.std()? * eps)?)?;
            let init = (sample * self.vae.config().scaling_factor)?;
            let init = init.repeat((b, 1, 1, 1))?;
            let noise = self.randn(&mut rng, init.dims())?;
            let lat = sched.add_noise(&init, &noise, ts[0])?;
            (ts, lat)
        } else {
            let lat = match &req.latents {
                Some(l) => {
                    let want = [b, c, h, w];
                    if l.dims() != want {
                        return Err(Error::InvalidArgument(format!(
                            "--latents has shape {:?}, expected {want:?} for {b} image(s) at {width}x{height}",
                            l.dims()
                        )));
                    }
                    l.to_device(&self.component_device("unet")?)?
                        .to_dtype(dtype)?
                }
                None => self.randn(&mut rng, &[b, c, h, w])?,
            };
            (all_ts, (lat * sched.init_noise_sigma())?)
        };

        self.use_component("unet")?;
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let inp = if cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let inp = sched.scale_model_input(&inp, t)?;
            let out = self.unet.forward(&inp, t, &context)?;
            let out = if cfg {
                let uncond = out.narrow(0, 0, b)?;
                let text = out.narrow(0, b, b)?;
                (&uncond + ((text - &uncond)? * req.guidance)?)?
            } else {
                out
            };
            latents = sched.step(&out, t, &latents, &mut rng)?;
            crate::validate::finite(&latents, || {
                format!(
                    "the latents after denoising step {} of {total} (timestep {t}); check \
                     --guidance, the initial latents and the scheduler config",
                    i + 1
                )
            })?;
            on_step(i + 1, total);
        }

        self.use_component("vae")?;
        let (_, _, lh, lw) = latents.dims4()?;
        let vae_memory = req.vae.plan(&self.vae, b, lh, lw)?;
        let image = self.decode_to_image(&latents, &vae_memory)?;
        crate::validate::finite(&image, || {
            "the VAE's decoded image; check vae/config.json (scaling_factor, shift_factor)".into()
        })?;
        Ok(GenerateOutput {
            prompt_embeds,
            final_latents: latents,
            image,
            vae_memory,
        })
    }

    /// Refuses, before any weight is read, a run whose estimated peak cannot fit in the memory
    /// available: resident weights under each component's strategy, the UNet's activations,
    /// the VAE decode (tiled or not) and the output image.
    fn check_memory(
        &self,
        batch: usize,
        cfg_factor: usize,
        h: usize,
        w: usize,
        vae: &VaeOptions,
    ) -> Result<()> {
        use crate::validate::{fits_in_memory, Need};
        let weights =
            crate::residency::resident_estimate(self.components.iter().map(|c| c.weights.as_ref()));
        let (bf, hf, wf) = (batch as f64, h as f64, w as f64);
        let f = self.vae_scale_factor() as f64;
        let c0 = self.unet.config().block_out_channels[0] as f64;
        // The largest UNet activations live at full latent resolution with the first block's
        // channels: about eight such tensors at once, plus bounded attention and conv scratch.
        let unet = bf * cfg_factor as f64 * c0 * hf * wf * 4.0 * 8.0 + (96u64 << 20) as f64;
        // A budget-chosen tile is planned later; without one, the decode is as asked.
        let decode = match (vae.memory_budget, vae.tiling || vae.tile_size.is_some()) {
            (Some(b), _) => b as f64,
            (None, true) => {
                let t = self.vae.tiling(vae.tile_size, vae.tile_overlap)?;
                let per = if vae.slicing { 1 } else { batch };
                self.vae
                    .decode_peak_estimate(per, t.tile_latent, t.tile_latent) as f64
            }
            (None, false) => {
                let per = if vae.slicing { 1.0 } else { bf };
                // decode_peak_estimate in f64 terms, so absurd sizes cannot overflow.
                per * self
                    .vae
                    .decode_peak_estimate(1, h.min(1 << 14), w.min(1 << 14))
                    as f64
                    * (hf / hf.min(16384.0))
                    * (wf / wf.min(16384.0))
            }
        };
        let image = bf * hf * f * wf * f * 3.0 * 4.0 * 2.0;
        fits_in_memory(
            &[
                Need {
                    what: "weights",
                    bytes: weights,
                },
                Need {
                    what: "UNet activations",
                    bytes: unet,
                },
                Need {
                    what: "VAE decode",
                    bytes: decode,
                },
                Need {
                    what: "output images",
                    bytes: image,
                },
            ],
            "use a smaller --width/--height or --num-images, --tiling or --memory-budget for the \
             VAE, and --offload group or sequential for the weights",
        )
    }

    /// VAE-decodes scaled latents into (B, H, W, 3) images in [0, 1].
    pub fn decode_to_image(&self, latents: &Tensor, mem: &VaeMemory) -> Result<Tensor> {
        let z = (latents.to_device(&self.component_device("vae")?)?
            / self.vae.config().scaling_factor)?;
        let x = decode_or_retry_tiled(&self.vae, &z, mem)?;
        Ok(((x / 2.0)? + 0.5)?
            .clamp(0f32, 1f32)?
            .permute((0, 2, 3, 1))?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .contiguous()?)
    }
}

/// Decodes; on a CUDA out-of-memory error during an untiled decode, retries once with
/// diffusers' default tiling and says so (as ComfyUI does). CPU allocation failures abort the
/// process instead, which is why a CPU user sets `--memory-budget`.
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

/// The UNet's batch multiplier: classifier-free guidance runs the batch twice.
fn cfg_batch(guidance: f64) -> usize {
    if guidance > 1.0 {
        2
    } else {
        1
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
