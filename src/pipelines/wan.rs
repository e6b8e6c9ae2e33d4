//! Wan 2.1 / 2.2 text-to-video, step for step as diffusers 0.42.1 `WanPipeline` (one expert, or
//! Wan 2.2 A14B's two experts split at `boundary_ratio`, and TI2V's per-token timesteps).

use std::path::Path;

use candle_core::{DType, Tensor};

use super::base::{attention_scratch, denoise, ComponentSpec, LoadOptions, PipelineBase};
use super::{GenerateOutput, GenerateRequest, Pipeline};
use crate::error::{read_json, Error, Result};
use crate::models::{
    AutoencoderKLWan, AutoencoderKLWanConfig, T5Config, T5EncoderModel, WanInputs,
    WanTransformer3DModel, WanTransformerConfig, WanVaeOptions,
};
use crate::planner::{ActChoice, PhaseNeed, VaeChoice};
use crate::rng::TorchRng;
use crate::schedulers::{self, SchedulerConfig, SchedulerKind};
use crate::tokenizer::T5Tokenizer;
use crate::validate::Need;

/// `model_index.json` classes this family runs.
pub const CLASSES: &[&str] = &["WanPipeline"];

/// diffusers' `model_cpu_offload_seq` for Wan.
pub const OFFLOAD_ORDER: &[&str] = &["text_encoder", "transformer", "transformer_2", "vae"];

const COMPONENTS: &[ComponentSpec] = &[
    ComponentSpec {
        name: "text_encoder",
        stem: "model",
        classes: &["UMT5EncoderModel", "T5EncoderModel"],
        denoiser: false,
        optional: false,
    },
    ComponentSpec {
        name: "transformer",
        stem: "diffusion_pytorch_model",
        classes: &["WanTransformer3DModel"],
        denoiser: true,
        optional: false,
    },
    // Wan 2.2 A14B's low-noise expert; absent (or `[null, null]`) elsewhere.
    ComponentSpec {
        name: "transformer_2",
        stem: "diffusion_pytorch_model",
        classes: &["WanTransformer3DModel"],
        denoiser: true,
        optional: true,
    },
    ComponentSpec {
        name: "vae",
        stem: "diffusion_pytorch_model",
        classes: &["AutoencoderKLWan"],
        denoiser: false,
        optional: false,
    },
];

const MAX_SEQUENCE_LENGTH: usize = 512;

/// `WanPipeline`'s own config in `model_index.json`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
struct WanPipelineConfig {
    #[serde(default)]
    boundary_ratio: Option<f64>,
    #[serde(default)]
    expand_timesteps: bool,
}

pub struct Wan {
    pub base: PipelineBase,
    pub tokenizer: T5Tokenizer,
    pub text_encoder: T5EncoderModel,
    pub transformer: WanTransformer3DModel,
    pub transformer_2: Option<WanTransformer3DModel>,
    pub vae: AutoencoderKLWan,
    pub scheduler_config: SchedulerConfig,
    boundary_ratio: Option<f64>,
    expand_timesteps: bool,
}

crate::family_base!(Wan);

/// `WanPipeline`'s `prompt_clean`: HTML entities unescaped (twice, as `ftfy`-less diffusers
/// does), whitespace runs collapsed to one space, trimmed.
pub fn prompt_clean(text: &str) -> String {
    let once = html_escape::decode_html_entities(text.trim());
    let twice = html_escape::decode_html_entities(once.trim());
    twice.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Wan {
    pub fn load(root: &Path, opts: LoadOptions) -> Result<Self> {
        let mut base = PipelineBase::open(root, opts, COMPONENTS, OFFLOAD_ORDER)?;
        base.index
            .expect_class(root, "tokenizer", &["T5Tokenizer", "T5TokenizerFast"])?;
        let sched_class = base.index.class_of(root, "scheduler")?;
        if !["UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"]
            .contains(&sched_class.as_str())
        {
            return Err(Error::unsupported(
                "model_index.json",
                "scheduler",
                format!("\"{sched_class}\""),
                "Wan runs UniPCMultistepScheduler or FlowMatchEulerDiscreteScheduler",
            ));
        }
        let scheduler_config: SchedulerConfig =
            read_json(&root.join("scheduler").join("scheduler_config.json"))?;
        let pipe_cfg: WanPipelineConfig = read_json(&root.join("model_index.json"))?;
        if let Some(r) = pipe_cfg.boundary_ratio {
            if !(0.0..=1.0).contains(&r) {
                return Err(Error::unsupported(
                    "model_index.json",
                    "boundary_ratio",
                    r,
                    "must be in [0, 1]",
                ));
            }
        }

        let (text_encoder, te_cfg): (_, T5Config) =
            base.build("text_encoder", T5EncoderModel::new)?;
        let transformer_of = |name: &str| -> Result<WanTransformer3DModel> {
            let (m, _): (_, WanTransformerConfig) = base.build(name, WanTransformer3DModel::new)?;
            Ok(m)
        };
        let transformer = transformer_of("transformer")?;
        let has_second = base.components.iter().any(|c| c.name == "transformer_2");
        let transformer_2 = has_second
            .then(|| transformer_of("transformer_2"))
            .transpose()?;
        if pipe_cfg.boundary_ratio.is_some() != transformer_2.is_some() {
            return Err(Error::unsupported(
                "model_index.json",
                "boundary_ratio",
                format!("{:?}", pipe_cfg.boundary_ratio),
                "a boundary_ratio needs a transformer_2 (Wan 2.2 A14B), and a transformer_2 needs one",
            ));
        }

        let (vae, _): (_, AutoencoderKLWanConfig) = base.build("vae", AutoencoderKLWan::new)?;
        if transformer.config().in_channels != vae.config().z_dim {
            return Err(Error::unsupported(
                "transformer/config.json",
                "in_channels",
                transformer.config().in_channels,
                format!("must equal the VAE's z_dim ({})", vae.config().z_dim),
            ));
        }

        let tokenizer = T5Tokenizer::from_dir(&root.join("tokenizer"))?;
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
            transformer,
            transformer_2,
            vae,
            scheduler_config,
            boundary_ratio: pipe_cfg.boundary_ratio,
            expand_timesteps: pipe_cfg.expand_timesteps,
        })
    }

    /// `_get_t5_prompt_embeds`: (1, L, D) for one prompt, masked, cut at its real length and
    /// zero-padded to `max_len`.
    pub fn encode_prompt(&self, text: &str, max_len: usize) -> Result<Tensor> {
        let text = prompt_clean(text);
        let enc = self.tokenizer.encode_padded(&text, max_len)?;
        if let Some(cut) = &enc.truncated {
            eprintln!(
                "warning: the following part of your input was truncated because \
                 `max_sequence_length` is set to {max_len} tokens: {cut:?}"
            );
        }
        let dev = self.component_device("text_encoder")?;
        // UMT5 masks the padding out of every attention, so the real tokens' states do not depend
        // on it: encoding only those tokens gives the rows diffusers keeps (it encodes all
        // `max_len` and then zeroes the rest), at a fraction of the cost for short prompts.
        let n = enc.len.clamp(1, max_len);
        let ids = Tensor::from_vec(enc.ids[..n].to_vec(), (1, n), &dev)?;
        let mask = Tensor::ones((1, n), DType::U32, &dev)?;
        let hidden = self
            .text_encoder
            .forward_masked(&ids, &mask, self.options.dtype)?;
        let hidden = if n < max_len {
            let d = hidden.dim(2)?;
            let pad = Tensor::zeros((1, max_len - n, d), hidden.dtype(), hidden.device())?;
            Tensor::cat(&[hidden, pad], 1)?
        } else {
            hidden
        };
        Ok(hidden.to_device(&self.component_device("transformer")?)?)
    }

    /// Frames, latent (t, h, w) and pixel size of a run, checked and rounded as diffusers does
    /// (saying so on stderr when `say`).
    #[allow(clippy::type_complexity)]
    fn sizes(
        &self,
        req: &GenerateRequest,
        say: bool,
    ) -> Result<(usize, (usize, usize, usize), (usize, usize))> {
        let warn = |m: String| {
            if say {
                eprintln!("{m}");
            }
        };
        let cfg = self.vae.config();
        let (sf, tf) = (cfg.spatial_factor(), cfg.temporal_factor());
        let (_, ph, pw) = self.transformer.config().patch();
        // Frames and size as diffusers checks and rounds them, saying so.
        let mut frames = req.frames.unwrap_or(81);
        if frames == 0 {
            return Err(Error::InvalidArgument("--frames must be at least 1".into()));
        }
        if frames % tf != 1 {
            let rounded = frames / tf * tf + 1;
            warn(format!(
                "warning: --frames - 1 has to be divisible by {tf}; using {rounded} frames instead of {frames}"
            ));
            frames = rounded;
        }
        let (height, width) = match (req.height, req.width, &req.latents) {
            (None, None, Some(l)) if l.rank() == 5 => (l.dim(3)? * sf, l.dim(4)? * sf),
            _ => (req.height.unwrap_or(480), req.width.unwrap_or(832)),
        };
        if height == 0 || width == 0 || height % 16 != 0 || width % 16 != 0 {
            return Err(Error::InvalidArgument(format!(
                "width and height must be positive multiples of 16; got {width}x{height}"
            )));
        }
        let (mh, mw) = (sf * ph, sf * pw);
        let (h_px, w_px) = (height / mh * mh, width / mw * mw);
        if (h_px, w_px) != (height, width) {
            warn(format!(
                "warning: width and height must be multiples of ({mw}, {mh}) for this model's \
                 patches; using {w_px}x{h_px} instead of {width}x{height}"
            ));
        }
        if h_px == 0 || w_px == 0 {
            return Err(Error::InvalidArgument(format!(
                "width and height must be at least ({mw}, {mh}) for this model; got {width}x{height}"
            )));
        }
        Ok((
            frames,
            ((frames - 1) / tf + 1, h_px / sf, w_px / sf),
            (h_px, w_px),
        ))
    }

    /// The planner's view of a run (see [`crate::planner`]): UMT5, the denoising steps (with
    /// A14B's two experts split at the boundary), the decode with its chunks and tiles.
    fn phases(&self, req: &GenerateRequest) -> Result<Vec<PhaseNeed>> {
        let (_, (t, h, w), _) = self.sizes(req, false)?;
        let b = req.num_images;
        let max_len = req.max_sequence_length.unwrap_or(MAX_SEQUENCE_LENGTH);
        let calls = if req.guidance > 1.0 { 2 } else { 1 };
        let (tr, te) = self.activations(b, calls, (t, h, w), max_len);
        let tcfg = self.transformer.config();
        let (pt, ph, pw) = tcfg.patch();
        let tokens = (t / pt.max(1)) as f64 * (h / ph.max(1)) as f64 * (w / pw.max(1)) as f64;
        let flops = |name: &str| {
            b as f64
                * (2.0 * self.param_count(name) * tokens
                    + 4.0 * tokens * tokens * tcfg.inner_dim() as f64 * tcfg.num_layers as f64)
        };
        let mut phases = vec![PhaseNeed {
            label: "text encoding".into(),
            component: "text_encoder".into(),
            passes: calls,
            // Only the prompt's own tokens are encoded (about a sentence).
            flops: 2.0 * self.param_count("text_encoder") * 64.0,
            uses_on_demand: false,
            choices: ActChoice::only(te),
        }];
        // Steps per expert: the first above the boundary timestep.
        let kind = req.scheduler.unwrap_or(SchedulerKind::UniPc);
        let sched = schedulers::build(kind, &self.scheduler_config, req.steps)?;
        let boundary = self
            .boundary_ratio
            .map(|r| r * self.scheduler_config.num_train_timesteps.unwrap_or(1000) as f64);
        let low = match (boundary, &self.transformer_2) {
            (Some(bt), Some(_)) => sched.timesteps().iter().filter(|&&s| s < bt).count(),
            _ => 0,
        };
        for (name, steps) in [("transformer", req.steps - low), ("transformer_2", low)] {
            if steps > 0 {
                phases.push(PhaseNeed {
                    label: if name == "transformer" {
                        "denoising".into()
                    } else {
                        "denoising (low-noise expert)".into()
                    },
                    component: name.into(),
                    passes: steps * calls,
                    flops: flops(name),
                    uses_on_demand: false,
                    choices: ActChoice::only(tr),
                });
            }
        }
        let vae_flops = 2.0 * self.param_count("vae") * (t * h * w * b) as f64 * 16.0;
        phases.push(PhaseNeed {
            label: "VAE decode".into(),
            component: "vae".into(),
            passes: 1,
            flops: vae_flops,
            uses_on_demand: false,
            choices: self.vae_choices(req, b, (t, h, w))?,
        });
        Ok(phases)
    }

    /// The video VAE's alternatives: the decode chunks from the largest asked (exact, equal
    /// results), then square tiles (lossy), unless the user fixed them.
    fn vae_choices(
        &self,
        req: &GenerateRequest,
        b: usize,
        (t, h, w): (usize, usize, usize),
    ) -> Result<Vec<ActChoice>> {
        let asked = &req.vae;
        let explicit = asked.tiling || asked.tile_size.is_some() || asked.tile_overlap.is_some();
        let sf = self.vae.config().spatial_factor();
        let out_bytes = |b: usize| {
            let frames = self.vae.config().decoded_frames(t) as f64;
            b as f64 * frames * (h * sf) as f64 * (w * sf) as f64 * 3.0 * 4.0 * 2.0
        };
        let chunks: Vec<usize> = match req.decode_chunk_size {
            Some(c) => vec![c],
            None => {
                // 1 is diffusers' default; larger chunks are fewer passes, same results.
                let most = t.saturating_sub(1).max(1);
                [1, 2, 4, 8, 16]
                    .into_iter()
                    .filter(|&c| c <= most)
                    .collect()
            }
        };
        let tiles: Vec<Option<usize>> = if explicit {
            vec![asked.tile_size.or(Some(0))]
        } else {
            let step = 4 * sf;
            let mut v = vec![None];
            let mut px = (h.max(w) * sf).saturating_sub(1) / step * step;
            while px >= step {
                v.push(Some(px));
                px -= step;
            }
            v
        };
        let slicing = asked.slicing || b == 1;
        let per = if asked.slicing { 1 } else { b };
        let mut out = Vec::new();
        for tile in tiles {
            for &c in &chunks {
                let tiling = match tile {
                    Some(0) => Some(self.vae.tiling(None, asked.tile_overlap)?),
                    Some(px) => match self.vae.tiling(Some(px), asked.tile_overlap) {
                        Ok(t) => Some(t),
                        Err(_) => continue,
                    },
                    None => None,
                };
                let mem = crate::models::WanVaeMemory {
                    tiling,
                    slicing,
                    decode_chunk: c,
                    encode_chunk: 1,
                };
                let p = self.vae.decode_peak(per, t, h, w, &mem);
                let label = match tiling {
                    Some(g) => format!("tiles of {}x{} px, chunks of {c}", g.tile().0, g.tile().1),
                    None => format!("untiled, chunks of {c}"),
                };
                // Larger chunks: fewer passes over the cache (a few percent each).
                let cost = 1.0
                    + 0.03 / c as f64
                    + match tiling {
                        Some(g) => {
                            let (th, tw) = g.tile();
                            let (sh, sw) = g.stride();
                            let n = |side: usize, tile: usize, stride: usize| {
                                if side <= tile {
                                    1.0
                                } else {
                                    (side as f64 / stride as f64).ceil()
                                }
                            };
                            let (hp, wp) = (h * sf, w * sf);
                            (n(hp, th, sh) * th.min(hp) as f64 * n(wp, tw, sw) * tw.min(wp) as f64
                                / (hp * wp) as f64
                                - 1.0)
                                .max(0.0)
                        }
                        None => 0.0,
                    };
                out.push(ActChoice {
                    label,
                    // The decoded video (in `output`) and its frames-last copy.
                    // The kernels' scratch (a bound the model's estimate counts whole) is
                    // filled only in proportion to the maps: small decodes use little of it.
                    bytes: {
                        let scratch = crate::models::wan_vae::memory::KERNEL_SCRATCH;
                        let work = (p.working as f64 - scratch).max(0.0);
                        p.cache as f64
                            + work
                            + scratch.min(work)
                            + p.output as f64
                            + out_bytes(b) / 2.0
                    },
                    exact: tiling.is_none() || explicit,
                    cost,
                    vae: VaeChoice {
                        tile_size: tile.filter(|&p| p > 0),
                        slicing: asked.slicing,
                        decode_chunk: Some(c),
                    },
                });
            }
        }
        Ok(out)
    }

    /// Peak activation bytes of the transformer (all calls of a step) and of UMT5.
    fn activations(
        &self,
        batch: usize,
        calls: usize,
        (t, h, w): (usize, usize, usize),
        text_len: usize,
    ) -> (f64, f64) {
        let cfg = self.transformer.config();
        let (pt, ph, pw) = cfg.patch();
        let tokens = (t / pt.max(1)) as f64 * (h / ph.max(1)) as f64 * (w / pw.max(1)) as f64;
        let inner = cfg.inner_dim() as f64;
        // Per call: about a dozen token × width tensors of one block, plus bounded attention and
        // the chunked feed-forward.
        let tr = batch as f64 * calls as f64 * (tokens + text_len as f64) * inner * 4.0 * 12.0
            + attention_scratch(batch as f64 * calls as f64 * tokens * inner * 4.0);
        let te_cfg = self.text_encoder.config();
        let te = text_len as f64 * (te_cfg.d_ff.max(te_cfg.d_model) as f64) * 4.0 * 6.0;
        (tr, te)
    }

    fn run(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<GenerateOutput> {
        req.refuse(&[
            (req.init_image.is_some(), "--init-image (Wan image-to-video)"),
            (req.true_cfg.is_some(), "--true-cfg"),
            (
                req.guidance_2.is_some() && self.transformer_2.is_none(),
                "--guidance-2 (this pipeline has one expert; it needs a boundary_ratio and a transformer_2)",
            ),
        ])?;
        let max_len = req.max_sequence_length.unwrap_or(MAX_SEQUENCE_LENGTH);
        if max_len == 0 || max_len > MAX_SEQUENCE_LENGTH {
            return Err(Error::InvalidArgument(format!(
                "--max-sequence-length must be in 1..={MAX_SEQUENCE_LENGTH}; got {max_len}"
            )));
        }
        let guidance_2 = req.guidance_2.unwrap_or(req.guidance);
        crate::validate::arg_f32("--guidance-2", guidance_2)?;
        let (_, ph, pw) = self.transformer.config().patch();
        let b = req.num_images;
        let dtype = self.options.dtype;

        let (frames, (t, h, w), (h_px, w_px)) = self.sizes(req, true)?;
        let c = self.transformer.config().in_channels;
        // As diffusers: the first expert's scale decides whether guidance runs at all.
        let do_cfg = req.guidance > 1.0;
        let vae_opts = WanVaeOptions {
            tiling: req.vae.tiling,
            tile_size: req.vae.tile_size,
            tile_overlap: req.vae.tile_overlap,
            slicing: req.vae.slicing,
            decode_chunk_size: req.decode_chunk_size,
            memory_budget: req.vae.memory_budget,
        };
        let vae_memory = vae_opts.plan(&self.vae, b, t, h, w)?;
        self.check_memory(
            b,
            if do_cfg { 2 } else { 1 },
            (t, h, w),
            max_len,
            &vae_memory,
        )?;

        let kind = req.scheduler.unwrap_or(SchedulerKind::UniPc);
        if !matches!(kind, SchedulerKind::UniPc | SchedulerKind::FlowEuler) {
            return Err(Error::InvalidArgument(
                "Wan runs --scheduler unipc (its own) or flow-euler".into(),
            ));
        }
        let mut sched = schedulers::build(kind, &self.scheduler_config, req.steps)?;
        let timesteps = sched.timesteps().to_vec();

        self.use_component("text_encoder")?;
        let prompt_embeds = self
            .encode_prompt(&req.prompt, max_len)?
            .repeat((b, 1, 1))?;
        let negative_embeds = if do_cfg {
            let neg = req.negative_prompt.as_deref().unwrap_or("");
            Some(self.encode_prompt(neg, max_len)?.repeat((b, 1, 1))?)
        } else {
            None
        };

        let dev = self.component_device("transformer")?;
        let mut rng = TorchRng::new(req.seed);
        let latents = match &req.latents {
            Some(l) => {
                let want = [b, c, t, h, w];
                if l.dims() != want {
                    return Err(Error::InvalidArgument(format!(
                        "--latents has shape {:?}, expected {want:?} (B, C, T, h, w) for {b} \
                         video(s) of {frames} frames at {w_px}x{h_px}",
                        l.dims()
                    )));
                }
                l.to_device(&dev)?.to_dtype(dtype)?
            }
            None => self.base.randn(&mut rng, &[b, c, t, h, w], "transformer")?,
        };
        let boundary = self
            .boundary_ratio
            .map(|r| r * self.scheduler_config.num_train_timesteps.unwrap_or(1000) as f64);
        let seq = t * (h / ph) * (w / pw);
        let (latents, step_seconds) = denoise(
            sched.as_mut(),
            &timesteps,
            latents,
            &mut rng,
            on_step,
            |latents, step_t, _| {
                // The high-noise expert above the boundary, the low-noise one below it.
                let (name, model, g) = match (boundary, &self.transformer_2) {
                    (Some(bt), Some(t2)) if step_t < bt => ("transformer_2", t2, guidance_2),
                    _ => ("transformer", &self.transformer, req.guidance),
                };
                self.use_component(name)?;
                let ts = if self.expand_timesteps {
                    Tensor::full(step_t as f32, (b, seq), &dev)?
                } else {
                    Tensor::full(step_t as f32, b, &dev)?
                };
                let call = |embeds: &Tensor| {
                    model.forward(&WanInputs {
                        hidden_states: latents,
                        timestep: &ts,
                        encoder_hidden_states: embeds,
                    })
                };
                let pred = call(&prompt_embeds)?;
                Ok(match &negative_embeds {
                    Some(ne) => {
                        let uncond = call(ne)?;
                        (&uncond + ((pred - &uncond)? * g)?)?
                    }
                    None => pred,
                })
            },
        )?;

        self.use_component("vae")?;
        let video = self.decode_to_video(&latents, &vae_memory)?;
        Ok(GenerateOutput {
            step_seconds,
            prompt_embeds,
            pooled_prompt_embeds: None,
            final_latents: latents,
            image: video,
            vae_memory: Default::default(),
            vae_note: budget_note(&vae_opts, &vae_memory),
        })
    }

    /// De-normalises latents with the VAE's `latents_mean`/`latents_std` (as diffusers:
    /// `z / (1 / std) + mean`), decodes and returns (B, T, H, W, 3) frames in [0, 1] on the CPU.
    pub fn decode_to_video(
        &self,
        latents: &Tensor,
        mem: &crate::models::WanVaeMemory,
    ) -> Result<Tensor> {
        let cfg = self.vae.config();
        let dev = self.component_device("vae")?;
        let z_dim = cfg.z_dim;
        let col = |v: Vec<f32>| Tensor::from_vec(v, (1, z_dim, 1, 1, 1), &dev);
        let mean = col(cfg.latents_mean.iter().map(|&m| m as f32).collect())?;
        let inv_std = col(cfg.latents_std.iter().map(|&s| 1.0 / s as f32).collect())?;
        let z = latents
            .to_device(&dev)?
            .to_dtype(DType::F32)?
            .broadcast_div(&inv_std)?
            .broadcast_add(&mean)?
            .to_dtype(self.options.dtype)?;
        let x = self.vae.decode_with(&z, mem)?;
        let video = ((x / 2.0)? + 0.5)?
            .clamp(0f32, 1f32)?
            .permute((0, 2, 3, 4, 1))?
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?
            .contiguous()?;
        crate::validate::finite(&video, || {
            "the VAE's decoded video; check vae/config.json (latents_mean, latents_std)".into()
        })?;
        Ok(video)
    }

    fn check_memory(
        &self,
        batch: usize,
        calls: usize,
        (t, h, w): (usize, usize, usize),
        text_len: usize,
        vae: &crate::models::WanVaeMemory,
    ) -> Result<()> {
        let (tr, _) = self.activations(batch, calls, (t, h, w), text_len);
        let decode = self.vae.decode_peak_estimate(batch, t, h, w, vae) as f64;
        let frames = self.vae.config().decoded_frames(t) as f64;
        let sf = self.vae.config().spatial_factor() as f64;
        let video = batch as f64 * frames * h as f64 * sf * w as f64 * sf * 3.0 * 4.0 * 2.0;
        self.base.check_memory(&[
            Need {
                what: "transformer activations",
                bytes: tr,
            },
            Need {
                what: "VAE decode",
                bytes: decode,
            },
            Need {
                what: "output video",
                bytes: video,
            },
        ])
    }
}

/// What `--memory-budget` chose for the video VAE, when the user did not ask for it.
fn budget_note(asked: &WanVaeOptions, mem: &crate::models::WanVaeMemory) -> Option<String> {
    asked.memory_budget?;
    let mut parts = Vec::new();
    let explicit = asked.tiling || asked.tile_size.is_some() || asked.tile_overlap.is_some();
    if let (false, Some(t)) = (explicit, mem.tiling) {
        let ((th, tw), (sh, sw)) = (t.tile(), t.stride());
        parts.push(format!("tiles of {th}x{tw} px, stride {sh}x{sw}"));
    }
    if asked.decode_chunk_size.is_none() && mem.decode_chunk != 1 {
        parts.push(format!(
            "decode chunks of {} latent frames",
            mem.decode_chunk
        ));
    }
    (!parts.is_empty()).then(|| format!("VAE: chose {} to fit --memory-budget", parts.join(", ")))
}

impl Pipeline for Wan {
    fn defaults(&self) -> (usize, f64) {
        (50, 5.0)
    }
    fn size_multiple(&self) -> usize {
        16
    }
    fn run(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<GenerateOutput> {
        Wan::run(self, req, on_step)
    }
    fn phases(&self, req: &GenerateRequest) -> Result<Vec<PhaseNeed>> {
        Wan::phases(self, req)
    }
}
