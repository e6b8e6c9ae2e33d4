//! Stable Diffusion 1.x / 2.x: text-to-image and image-to-image, step for step as diffusers'
//! `StableDiffusionPipeline` and `StableDiffusionImg2ImgPipeline`.

use std::path::Path;

use candle_core::Tensor;

use super::base::{
    denoise, image_vae_choices, vae_decode_needs, ComponentSpec, LoadOptions, PipelineBase,
};
use super::{GenerateOutput, GenerateRequest, Pipeline};
use crate::error::{read_json, Error, Result};
use crate::models::{
    AutoencoderKL, AutoencoderKLConfig, ClipTextConfig, ClipTextModel, UNet2DConditionConfig,
    UNet2DConditionModel,
};
use crate::planner::{ActChoice, PhaseNeed};
use crate::rng::TorchRng;
use crate::schedulers::{self, SchedulerConfig, SchedulerKind};
use crate::tokenizer::ClipTokenizer;
use crate::validate::Need;

pub struct StableDiffusion {
    /// Components, residency, offload and device maps (shared by every family).
    pub base: PipelineBase,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler_config: SchedulerConfig,
    pub default_scheduler: SchedulerKind,
}

/// diffusers' `model_cpu_offload_seq` for Stable Diffusion.
pub const OFFLOAD_ORDER: &[&str] = &["text_encoder", "unet", "vae"];

/// The weight-bearing components, as `model_index.json` must name them.
const COMPONENTS: &[ComponentSpec] = &[
    ComponentSpec {
        name: "text_encoder",
        stem: "model",
        classes: &["CLIPTextModel"],
        denoiser: false,
        optional: false,
    },
    ComponentSpec {
        name: "unet",
        stem: "diffusion_pytorch_model",
        classes: &["UNet2DConditionModel"],
        denoiser: true,
        optional: false,
    },
    ComponentSpec {
        name: "vae",
        stem: "diffusion_pytorch_model",
        classes: &["AutoencoderKL"],
        denoiser: false,
        optional: false,
    },
];

/// `model_index.json` classes this family runs.
pub const CLASSES: &[&str] = &["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"];

crate::family_base!(StableDiffusion);

impl StableDiffusion {
    pub fn load(root: &Path, opts: LoadOptions) -> Result<Self> {
        let mut base = PipelineBase::open(root, opts, COMPONENTS, OFFLOAD_ORDER)?;
        base.index
            .expect_class(root, "tokenizer", &["CLIPTokenizer", "CLIPTokenizerFast"])?;
        let default_scheduler =
            SchedulerKind::from_class_name(&base.index.class_of(root, "scheduler")?)?;
        let scheduler_config: SchedulerConfig =
            read_json(&root.join("scheduler").join("scheduler_config.json"))?;

        let (text_encoder, te_cfg): (_, ClipTextConfig) =
            base.build("text_encoder", ClipTextModel::new)?;
        let (unet, _): (_, UNet2DConditionConfig) =
            base.build("unet", UNet2DConditionModel::new)?;
        let (vae, _): (_, AutoencoderKLConfig) = base.build("vae", AutoencoderKL::new)?;

        let tokenizer =
            ClipTokenizer::from_dir(&root.join("tokenizer"), te_cfg.max_position_embeddings)?;
        base.check_vocab(
            "tokenizer",
            tokenizer.max_id(),
            "text_encoder",
            te_cfg.vocab_size,
        )?;
        base.apply_device_map()?;
        Ok(Self {
            base,
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            default_scheduler,
        })
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

    /// The latent size (h, w) of a run: explicit, else from the init image or latents, else the
    /// UNet's sample size; checked against the size multiple.
    fn latent_size(&self, req: &GenerateRequest) -> Result<(usize, usize)> {
        let f = self.vae_scale_factor();
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
        Ok((height / f, width / f))
    }

    /// The planner's view of a run (see [`crate::planner`]): text encoding (the prompt, and the
    /// negative prompt under guidance), img2img's image encoding, the denoising steps and the
    /// decode with its alternatives.
    fn phases(&self, req: &GenerateRequest) -> Result<Vec<PhaseNeed>> {
        let (h, w) = self.latent_size(req)?;
        let b = req.num_images;
        let cfg = cfg_batch(req.guidance);
        let te = self.text_encoder.config();
        let tokens = te.max_position_embeddings as f64;
        let mut phases = vec![PhaseNeed {
            label: "text encoding".into(),
            component: "text_encoder".into(),
            passes: cfg,
            flops: 2.0 * self.param_count("text_encoder") * tokens,
            uses_on_demand: false,
            // A layer's hidden states, its MLP and the attention scores.
            choices: ActChoice::only(tokens * te.hidden_size as f64 * 4.0 * 8.0),
        }];
        let vae_params = self.param_count("vae");
        let mut steps = req.steps;
        if req.init_image.is_some() {
            steps = ((req.steps as f64 * req.strength) as usize).clamp(1, req.steps);
            phases.push(PhaseNeed {
                label: "image encoding".into(),
                component: "vae".into(),
                passes: 1,
                flops: 2.0 * vae_params * (h * w) as f64 * 3.0,
                uses_on_demand: true,
                choices: ActChoice::only(self.vae.decode_activation_estimate(1, h, w) as f64),
            });
        }
        let unet = self.unet_activations(b * cfg, h, w);
        phases.push(PhaseNeed {
            label: "denoising".into(),
            component: "unet".into(),
            passes: steps,
            // A conv UNet's work per latent cell, relative to its size: fitted so that the
            // predicted time matches the SD 1.5 architecture's measured steps (512², batch 2:
            // 8.2 s per step at 96 GFLOP/s measured on a 2-core Sapphire Rapids).
            flops: 2.0 * self.param_count("unet") * 0.056 * (h * w * b * cfg) as f64,
            uses_on_demand: false,
            choices: ActChoice::only(unet),
        });
        phases.push(PhaseNeed {
            label: "VAE decode".into(),
            component: "vae".into(),
            passes: 1,
            // Fitted as the UNet's: 7.9 s for the SD 1.5 VAE's decode at 512².
            flops: 2.0 * vae_params * (h * w * b) as f64 * 2.0,
            uses_on_demand: false,
            choices: image_vae_choices(&self.vae, &req.vae, b, h, w)?,
        });
        Ok(phases)
    }

    /// The UNet's peak activation bytes at batch `n` (the guided batch): measured on the SD1.5
    /// architecture (256² and 512², batch 2: 136 and 390 MiB of RSS over the weights and the
    /// process's baseline) as about 32 maps of the first block's width at full latent
    /// resolution (the level-0 transformer's GEGLU and attention tensors, the skip connections
    /// kept for the up path) plus about 51 MiB of the conv and attention kernels' bounded
    /// scratch, of which small maps fill about the conv's share (tiny UNets measure ~20 MiB
    /// over the baseline).
    fn unet_activations(&self, n: usize, h: usize, w: usize) -> f64 {
        let c0 = self.unet.config().block_out_channels[0] as f64;
        let map = n as f64 * c0 * (h * w) as f64 * 4.0;
        let conv_scratch = crate::layers::conv2d::SCRATCH_BYTES as f64;
        32.0 * map + (51.0 * (1u64 << 20) as f64).min(16.0 * map + conv_scratch)
    }

    fn randn(&self, rng: &mut TorchRng, shape: &[usize]) -> Result<Tensor> {
        self.base.randn(rng, shape, "unet")
    }

    /// Runs txt2img (or img2img when `init_image` is set). `on_step(i, total)` reports progress.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<GenerateOutput> {
        Pipeline::generate(self, req, on_step)
    }

    fn run(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<GenerateOutput> {
        req.refuse(&[
            (req.true_cfg.is_some(), "--true-cfg"),
            (req.max_sequence_length.is_some(), "--max-sequence-length"),
        ])?;
        let f = self.vae_scale_factor();
        let c = self.latent_channels();
        let b = req.num_images;
        let dtype = self.options.dtype;
        let kind = req.scheduler.unwrap_or(self.default_scheduler);
        let mut sched = schedulers::build(kind, &self.scheduler_config, req.steps)?;
        let mut rng = TorchRng::new(req.seed);

        let (h, w) = self.latent_size(req)?;
        let (height, width) = (h * f, w * f);
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
        let (timesteps, latents) = if let Some(img) = &req.init_image {
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
        let (latents, step_seconds) = denoise(
            sched.as_mut(),
            &timesteps,
            latents,
            &mut rng,
            on_step,
            |latents, t, sched| {
                let inp = if cfg {
                    Tensor::cat(&[latents, latents], 0)?
                } else {
                    latents.clone()
                };
                let inp = sched.scale_model_input(&inp, t)?;
                let out = self.unet.forward(&inp, t, &context)?;
                Ok(if cfg {
                    let uncond = out.narrow(0, 0, b)?;
                    let text = out.narrow(0, b, b)?;
                    (&uncond + ((text - &uncond)? * req.guidance)?)?
                } else {
                    out
                })
            },
        )?;

        self.use_component("vae")?;
        let (_, _, lh, lw) = latents.dims4()?;
        let vae_memory = req.vae.plan(&self.vae, b, lh, lw)?;
        let image = self
            .base
            .decode_to_image(&self.vae, &latents, &vae_memory)?;
        Ok(GenerateOutput {
            step_seconds,
            prompt_embeds,
            pooled_prompt_embeds: None,
            final_latents: latents,
            image,
            vae_note: vae_memory.budget_note(&req.vae),
            vae_memory,
        })
    }

    /// Refuses a run that cannot fit before any weight is read: the UNet's activations and
    /// the VAE decode on top of the resident weights.
    fn check_memory(
        &self,
        batch: usize,
        cfg_factor: usize,
        h: usize,
        w: usize,
        vae: &crate::models::VaeOptions,
    ) -> Result<()> {
        let unet = self.unet_activations(batch * cfg_factor, h, w);
        let [decode, image] = vae_decode_needs(&self.vae, vae, batch, h, w)?;
        self.base.check_memory(&[
            Need {
                what: "UNet activations",
                bytes: unet,
            },
            decode,
            image,
        ])
    }
}

impl Pipeline for StableDiffusion {
    fn defaults(&self) -> (usize, f64) {
        (50, 7.5)
    }
    fn size_multiple(&self) -> usize {
        StableDiffusion::size_multiple(self)
    }
    fn run(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<GenerateOutput> {
        StableDiffusion::run(self, req, on_step)
    }
    fn phases(&self, req: &GenerateRequest) -> Result<Vec<PhaseNeed>> {
        StableDiffusion::phases(self, req)
    }
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
