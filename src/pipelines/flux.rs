//! FLUX.1 (dev, schnell): text-to-image, step for step as diffusers 0.42.1 `FluxPipeline`.

use std::path::Path;

use candle_core::Tensor;

use super::base::{
    attention_scratch, denoise, image_vae_choices, vae_decode_needs, ComponentSpec, LoadOptions,
    PipelineBase,
};
use super::{GenerateOutput, GenerateRequest, Pipeline};
use crate::error::{read_json, Error, Result};
use crate::models::{
    AutoencoderKL, AutoencoderKLConfig, ClipTextConfig, ClipTextModel, FluxInputs,
    FluxTransformer2DModel, FluxTransformerConfig, T5Config, T5EncoderModel,
};
use crate::planner::{ActChoice, PhaseNeed};
use crate::rng::TorchRng;
use crate::schedulers::{flux_sigmas, FlowMatchConfig, FlowMatchEulerDiscrete, SchedulerConfig};
use crate::tokenizer::{ClipTokenizer, T5Tokenizer};
use crate::validate::Need;

/// `model_index.json` classes this family runs.
pub const CLASSES: &[&str] = &["FluxPipeline"];

/// diffusers' `model_cpu_offload_seq` for FLUX.
pub const OFFLOAD_ORDER: &[&str] = &["text_encoder", "text_encoder_2", "transformer", "vae"];

const COMPONENTS: &[ComponentSpec] = &[
    ComponentSpec {
        name: "text_encoder",
        stem: "model",
        classes: &["CLIPTextModel"],
        denoiser: false,
        optional: false,
    },
    ComponentSpec {
        name: "text_encoder_2",
        stem: "model",
        classes: &["T5EncoderModel"],
        denoiser: false,
        optional: false,
    },
    ComponentSpec {
        name: "transformer",
        stem: "diffusion_pytorch_model",
        classes: &["FluxTransformer2DModel"],
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

/// T5 tokens beyond which FLUX was not trained (diffusers refuses more too).
const MAX_SEQUENCE_LENGTH: usize = 512;

pub struct Flux {
    pub base: PipelineBase,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub tokenizer_2: T5Tokenizer,
    pub text_encoder_2: T5EncoderModel,
    pub transformer: FluxTransformer2DModel,
    pub vae: AutoencoderKL,
    pub scheduler_config: FlowMatchConfig,
    raw_scheduler_config: SchedulerConfig,
}

crate::family_base!(Flux);

impl Flux {
    pub fn load(root: &Path, opts: LoadOptions) -> Result<Self> {
        let mut base = PipelineBase::open(root, opts, COMPONENTS, OFFLOAD_ORDER)?;
        let index = &base.index;
        index.expect_class(root, "tokenizer", &["CLIPTokenizer", "CLIPTokenizerFast"])?;
        index.expect_class(root, "tokenizer_2", &["T5Tokenizer", "T5TokenizerFast"])?;
        index.expect_class(root, "scheduler", &["FlowMatchEulerDiscreteScheduler"])?;
        let raw_scheduler_config: SchedulerConfig =
            read_json(&root.join("scheduler").join("scheduler_config.json"))?;
        let scheduler_config = FlowMatchConfig::from_config(&raw_scheduler_config)?;

        let (text_encoder, te_cfg): (_, ClipTextConfig) =
            base.build("text_encoder", ClipTextModel::new)?;
        let (text_encoder_2, t5_cfg): (_, T5Config) =
            base.build("text_encoder_2", T5EncoderModel::new)?;
        let (transformer, tr_cfg): (_, FluxTransformerConfig) =
            base.build("transformer", FluxTransformer2DModel::new)?;
        let (vae, vae_cfg): (_, AutoencoderKLConfig) = base.build("vae", AutoencoderKL::new)?;

        // The transformer consumes 2x2 patches of the VAE's latents.
        if tr_cfg.in_channels != vae_cfg.latent_channels * 4 {
            return Err(Error::unsupported(
                "transformer/config.json",
                "in_channels",
                tr_cfg.in_channels,
                format!(
                    "must be 4 x the VAE's latent_channels ({}): FLUX packs 2x2 latent patches",
                    vae_cfg.latent_channels
                ),
            ));
        }
        let tokenizer =
            ClipTokenizer::from_dir(&root.join("tokenizer"), te_cfg.max_position_embeddings)?;
        let tokenizer_2 = T5Tokenizer::from_dir(&root.join("tokenizer_2"))?;
        base.check_vocab(
            "tokenizer",
            tokenizer.max_id(),
            "text_encoder",
            te_cfg.vocab_size,
        )?;
        base.check_vocab(
            "tokenizer_2",
            tokenizer_2.max_id(),
            "text_encoder_2",
            t5_cfg.vocab_size,
        )?;
        base.apply_device_map()?;
        Ok(Self {
            base,
            tokenizer,
            text_encoder,
            tokenizer_2,
            text_encoder_2,
            transformer,
            vae,
            scheduler_config,
            raw_scheduler_config,
        })
    }

    /// Pixels per latent cell (8 for FLUX's VAE).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().scale_factor()
    }

    /// `_get_clip_prompt_embeds`: the pooled CLIP embedding (1, D) of one prompt.
    pub fn encode_pooled(&self, text: &str) -> Result<Tensor> {
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
        let out = self
            .text_encoder
            .forward_with_pooled(&ids, self.options.dtype)?;
        Ok(out
            .pooler_output
            .to_device(&self.component_device("transformer")?)?)
    }

    /// `_get_t5_prompt_embeds`: the T5 embedding (1, L, D) of one prompt, padded to `max_len`.
    pub fn encode_t5(&self, text: &str, max_len: usize) -> Result<Tensor> {
        let enc = self.tokenizer_2.encode_padded(text, max_len)?;
        if let Some(cut) = &enc.truncated {
            eprintln!(
                "warning: the following part of your input was truncated because \
                 `max_sequence_length` is set to {max_len} tokens: {cut:?}"
            );
        }
        let ids = Tensor::from_vec(
            enc.ids,
            (1, max_len),
            &self.component_device("text_encoder_2")?,
        )?;
        let out = self.text_encoder_2.forward(&ids, self.options.dtype)?;
        Ok(out.to_device(&self.component_device("transformer")?)?)
    }

    /// The latent size (h, w): explicit, else from the latents, else diffusers' default.
    fn latent_size(&self, req: &GenerateRequest) -> Result<(usize, usize)> {
        let f = self.vae_scale_factor();
        // Size: explicit, else from the latents, else diffusers' default (128 × VAE factor).
        let (height, width) = match (req.height, req.width, &req.latents) {
            (None, None, Some(l)) => {
                let (_, _, h, w) = l.dims4()?;
                (h * f, w * f)
            }
            _ => {
                let d = 128 * f;
                (req.height.unwrap_or(d), req.width.unwrap_or(d))
            }
        };
        let m = self.size_multiple();
        if height == 0 || width == 0 || height % m != 0 || width % m != 0 {
            let round = |x: usize| (x / m).max(1) * m;
            return Err(Error::InvalidArgument(format!(
                "width and height must be positive multiples of {m} (2 x the VAE scale factor \
                 {f}: FLUX packs 2x2 latent patches); got {width}x{height}, try {}x{} \
                 (diffusers would silently resize)",
                round(width),
                round(height)
            )));
        }
        Ok((height / f, width / f))
    }

    /// The planner's view of a run (see [`crate::planner`]).
    fn phases(&self, req: &GenerateRequest) -> Result<Vec<PhaseNeed>> {
        let (h, w) = self.latent_size(req)?;
        let b = req.num_images;
        let max_len = req.max_sequence_length.unwrap_or(MAX_SEQUENCE_LENGTH);
        let true_cfg = req.true_cfg.unwrap_or(1.0) > 1.0 && req.negative_prompt.is_some();
        let calls = if true_cfg { 2 } else { 1 };
        let clip = self.text_encoder.config();
        let clip_tokens = clip.max_position_embeddings as f64;
        let t5 = self.text_encoder_2.config();
        let (tr, te) = self.activations(b, calls, (h, w), max_len);
        let tokens = ((h / 2) * (w / 2) + max_len) as f64;
        let cfg = self.transformer.config();
        let inner = (cfg.num_attention_heads * cfg.attention_head_dim) as f64;
        let blocks = (cfg.num_layers + cfg.num_single_layers) as f64;
        Ok(vec![
            PhaseNeed {
                label: "text encoding (CLIP)".into(),
                component: "text_encoder".into(),
                passes: calls,
                flops: 2.0 * self.param_count("text_encoder") * clip_tokens,
                uses_on_demand: false,
                choices: ActChoice::only(clip_tokens * clip.hidden_size as f64 * 4.0 * 8.0),
            },
            PhaseNeed {
                label: "text encoding (T5)".into(),
                component: "text_encoder_2".into(),
                passes: calls,
                flops: 2.0 * self.param_count("text_encoder_2") * max_len as f64
                    + 4.0 * (max_len * max_len) as f64 * t5.d_model as f64 * t5.num_layers as f64,
                uses_on_demand: false,
                choices: ActChoice::only(te),
            },
            PhaseNeed {
                label: "denoising".into(),
                component: "transformer".into(),
                passes: req.steps * calls,
                flops: b as f64
                    * (2.0 * self.param_count("transformer") * tokens
                        + 4.0 * tokens * tokens * inner * blocks),
                uses_on_demand: false,
                choices: ActChoice::only(tr),
            },
            PhaseNeed {
                label: "VAE decode".into(),
                component: "vae".into(),
                passes: 1,
                // As SD's VAE (the same architecture, 16 latent channels).
                flops: 2.0 * self.param_count("vae") * (h * w * b) as f64 * 2.0,
                uses_on_demand: false,
                choices: image_vae_choices(&self.vae, &req.vae, b, h, w)?,
            },
        ])
    }

    /// Peak activation bytes of the transformer (all calls of a step) and of T5.
    fn activations(
        &self,
        batch: usize,
        calls: usize,
        (h, w): (usize, usize),
        text_len: usize,
    ) -> (f64, f64) {
        let seq = (h / 2) * (w / 2);
        let cfg = self.transformer.config();
        let inner = (cfg.num_attention_heads * cfg.attention_head_dim) as f64;
        let tokens = (seq + text_len) as f64;
        // Per call: the residual streams, q/k/v, attention output and the 4x MLP of one block
        // (about 12 token x width tensors), plus bounded attention scores.
        let streams = batch as f64 * calls as f64 * tokens * inner * 4.0;
        let tr = 12.0 * streams + attention_scratch(streams);
        let t5 = self.text_encoder_2.config();
        let te = batch as f64 * text_len as f64 * (t5.d_ff.max(t5.d_model) as f64) * 4.0 * 6.0;
        (tr, te)
    }

    fn run(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<GenerateOutput> {
        req.refuse(&[
            (req.init_image.is_some(), "--init-image (FLUX img2img)"),
            (
                req.scheduler.is_some(),
                "--scheduler (FLUX runs its flow-matching Euler)",
            ),
        ])?;
        let max_len = req.max_sequence_length.unwrap_or(MAX_SEQUENCE_LENGTH);
        if max_len == 0 || max_len > MAX_SEQUENCE_LENGTH {
            return Err(Error::InvalidArgument(format!(
                "--max-sequence-length must be in 1..={MAX_SEQUENCE_LENGTH}; got {max_len}"
            )));
        }
        let true_cfg = req.true_cfg.unwrap_or(1.0);
        crate::validate::arg_f32("--true-cfg", true_cfg)?;
        if req.true_cfg.is_some() && req.negative_prompt.is_none() {
            return Err(Error::InvalidArgument(
                "--true-cfg needs --negative-prompt (diffusers' true_cfg_scale guides away from \
                 it)"
                .into(),
            ));
        }
        let do_true_cfg = true_cfg > 1.0 && req.negative_prompt.is_some();
        let f = self.vae_scale_factor();
        let b = req.num_images;
        let dtype = self.options.dtype;
        let c = self.vae.config().latent_channels;

        let (h, w) = self.latent_size(req)?;
        let (height, width) = (h * f, w * f);
        let seq = (h / 2) * (w / 2);
        self.check_memory(b, if do_true_cfg { 2 } else { 1 }, (h, w), max_len, req)?;

        let guidance = if self.transformer.config().guidance_embeds {
            crate::validate::arg_f32("--guidance", req.guidance)?;
            Some(Tensor::full(
                req.guidance as f32,
                b,
                &self.component_device("transformer")?,
            )?)
        } else {
            None
        };

        self.use_component("text_encoder")?;
        let pooled = self.encode_pooled(&req.prompt)?.repeat((b, 1))?;
        let neg_pooled = match (do_true_cfg, &req.negative_prompt) {
            (true, Some(n)) => Some(self.encode_pooled(n)?.repeat((b, 1))?),
            _ => None,
        };
        self.use_component("text_encoder_2")?;
        let prompt_embeds = self.encode_t5(&req.prompt, max_len)?.repeat((b, 1, 1))?;
        let neg_embeds = match (do_true_cfg, &req.negative_prompt) {
            (true, Some(n)) => Some(self.encode_t5(n, max_len)?.repeat((b, 1, 1))?),
            _ => None,
        };

        let dev = self.component_device("transformer")?;
        let mut rng = TorchRng::new(req.seed);
        let latents = match &req.latents {
            Some(l) => {
                let want = [b, c, h, w];
                if l.dims() != want {
                    return Err(Error::InvalidArgument(format!(
                        "--latents has shape {:?}, expected {want:?} (unpacked) for {b} image(s) \
                         at {width}x{height}",
                        l.dims()
                    )));
                }
                l.to_device(&dev)?.to_dtype(dtype)?
            }
            None => self.base.randn(&mut rng, &[b, c, h, w], "transformer")?,
        };
        let latents = pack(&latents)?;
        let img_ids = image_ids(h / 2, w / 2, &dev)?.to_dtype(dtype)?;
        let txt_ids = Tensor::zeros((max_len, 3), dtype, &dev)?;

        let sigmas = flux_sigmas(req.steps);
        let mu = self.scheduler_config.mu(seq);
        let mut sched = FlowMatchEulerDiscrete::new(
            &self.raw_scheduler_config,
            req.steps,
            Some(&sigmas),
            Some(mu),
        )?;
        let timesteps = crate::schedulers::Scheduler::timesteps(&sched).to_vec();

        self.use_component("transformer")?;
        let (latents, step_seconds) = denoise(
            &mut sched,
            &timesteps,
            latents,
            &mut rng,
            on_step,
            |latents, t, _| {
                // diffusers divides the float32 timestep by 1000 in float32.
                let ts = Tensor::full((t as f32) / 1000f32, b, &dev)?.to_dtype(dtype)?;
                let call = |embeds: &Tensor, pooled: &Tensor| {
                    self.transformer.forward(&FluxInputs {
                        hidden_states: latents,
                        encoder_hidden_states: embeds,
                        pooled_projections: pooled,
                        timestep: &ts,
                        guidance: guidance.as_ref(),
                        img_ids: &img_ids,
                        txt_ids: &txt_ids,
                    })
                };
                let pred = call(&prompt_embeds, &pooled)?;
                Ok(match (&neg_embeds, &neg_pooled) {
                    (Some(ne), Some(np)) => {
                        let neg = call(ne, np)?;
                        (&neg + ((pred - &neg)? * true_cfg)?)?
                    }
                    _ => pred,
                })
            },
        )?;

        let final_latents = unpack(&latents, c, h, w)?;
        self.use_component("vae")?;
        let vae_memory = req.vae.plan(&self.vae, b, h, w)?;
        let image = self
            .base
            .decode_to_image(&self.vae, &final_latents, &vae_memory)?;
        Ok(GenerateOutput {
            step_seconds,
            prompt_embeds,
            pooled_prompt_embeds: Some(pooled),
            final_latents,
            image,
            vae_note: vae_memory.budget_note(&req.vae),
            vae_memory,
        })
    }

    /// Refuses a run that cannot fit before any weight is read: the transformer's and T5's
    /// activations and the VAE decode on top of the resident weights.
    fn check_memory(
        &self,
        batch: usize,
        calls: usize,
        (h, w): (usize, usize),
        text_len: usize,
        req: &GenerateRequest,
    ) -> Result<()> {
        let (tr, te) = self.activations(batch, calls, (h, w), text_len);
        let [decode, image] = vae_decode_needs(&self.vae, &req.vae, batch, h, w)?;
        self.base.check_memory(&[
            Need {
                what: "transformer activations",
                bytes: tr.max(te),
            },
            decode,
            image,
        ])
    }
}

impl Pipeline for Flux {
    fn defaults(&self) -> (usize, f64) {
        (28, 3.5)
    }
    fn size_multiple(&self) -> usize {
        2 * self.vae_scale_factor()
    }
    fn run(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<GenerateOutput> {
        Flux::run(self, req, on_step)
    }
    fn phases(&self, req: &GenerateRequest) -> Result<Vec<PhaseNeed>> {
        Flux::phases(self, req)
    }
}

/// diffusers' `_pack_latents`: (B, C, h, w) → (B, h/2 · w/2, 4C), 2x2 patches channel-last.
pub fn pack(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / 2) * (w / 2), c * 4))?)
}

/// diffusers' `_unpack_latents`: the inverse of [`pack`].
pub fn unpack(x: &Tensor, c: usize, h: usize, w: usize) -> Result<Tensor> {
    let b = x.dim(0)?;
    Ok(x.reshape((b, h / 2, w / 2, c, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, c, h, w))?)
}

/// diffusers' `_prepare_latent_image_ids`: (rows · cols, 3) with (0, row, col) per token.
pub fn image_ids(rows: usize, cols: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let mut v = Vec::with_capacity(rows * cols * 3);
    for r in 0..rows {
        for c in 0..cols {
            v.extend([0f32, r as f32, c as f32]);
        }
    }
    Ok(Tensor::from_vec(v, (rows * cols, 3), dev)?)
}
