//! Pipelines: components wired together, from a model folder to images.
//!
//! [`base`] holds what every family shares (loading, residency, offload, device maps, the memory
//! check, the denoising loop, decoding); a family file declares its components and offload
//! order and writes its `run`. [`load`] picks the family from `model_index.json`'s `_class_name`.

pub mod base;
pub mod flux;
pub mod loader;
pub mod planning;
pub mod stable_diffusion;
pub mod vae;
pub mod wan;

use std::path::Path;

use candle_core::Tensor;

pub use base::{decode_or_retry_tiled, DeviceMapSpec, LoadOptions, OffloadPlan, PipelineBase};
pub use flux::Flux;
pub use loader::{hf_cache_dir, resolve_model, Component, ModelIndex};
pub use stable_diffusion::{StableDiffusion, OFFLOAD_ORDER};
pub use vae::{load_any_vae, load_vae, AnyVae};
pub use wan::Wan;

use crate::error::{Error, Result};
use crate::models::{VaeMemory, VaeOptions};
use crate::schedulers::SchedulerKind;

/// What to generate. Fields a family does not use must stay unset (it refuses them by name).
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
    /// Initial latents, exactly as diffusers' `latents=` (FLUX: unpacked, (B, C, h, w)).
    pub latents: Option<Tensor>,
    /// img2img: the init image (1, 3, H, W) in [-1, 1] and the strength in (0, 1].
    pub init_image: Option<Tensor>,
    pub strength: f64,
    /// VAE tiling / slicing / memory budget.
    pub vae: VaeOptions,
    /// FLUX: diffusers' `true_cfg_scale` (with a negative prompt).
    pub true_cfg: Option<f64>,
    /// FLUX, Wan: T5 tokens (diffusers' `max_sequence_length`).
    pub max_sequence_length: Option<usize>,
    /// Video: frames to generate (Wan: 4k + 1; others are rounded down as diffusers does).
    pub frames: Option<usize>,
    /// Wan 2.2 A14B: the low-noise expert's guidance (diffusers' `guidance_scale_2`).
    pub guidance_2: Option<f64>,
    /// Video VAE: latent frames per causal decode chunk after the first (diffusers: 1).
    pub decode_chunk_size: Option<usize>,
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
            true_cfg: None,
            max_sequence_length: None,
            frames: None,
            guidance_2: None,
            decode_chunk_size: None,
        }
    }
}

impl GenerateRequest {
    /// Fails on the first option that is set but means nothing to this family.
    pub fn refuse(&self, unused: &[(bool, &str)]) -> Result<()> {
        if let Some((_, flag)) = unused.iter().find(|(set, _)| *set) {
            return Err(Error::InvalidArgument(format!(
                "{flag} does not apply to this pipeline; drop it"
            )));
        }
        if self.num_images == 0 {
            return Err(Error::InvalidArgument(
                "--num-images must be at least 1".into(),
            ));
        }
        crate::validate::arg_f32("--guidance", self.guidance)?;
        Ok(())
    }
}

pub struct GenerateOutput {
    /// Text embeddings of the prompt ((B, 77, D) CLIP for SD, (B, L, D) T5 for FLUX).
    pub prompt_embeds: Tensor,
    /// FLUX: the pooled CLIP embedding (B, D).
    pub pooled_prompt_embeds: Option<Tensor>,
    /// (B, C, h, w) latents after the last step, before the VAE's scaling (and shift).
    pub final_latents: Tensor,
    /// (B, H, W, 3) images in [0, 1], before 8-bit quantisation; for video pipelines
    /// (B, T, H, W, 3) frames.
    pub image: Tensor,
    /// The image VAE's memory strategy (tiling may have been chosen by the budget); the
    /// default for video pipelines.
    pub vae_memory: VaeMemory,
    /// What `--memory-budget` chose for the VAE, to tell the user; `None` when nothing changed.
    pub vae_note: Option<String>,
    /// Wall seconds of each denoising step (the denoiser call(s), waits for weights included,
    /// and the scheduler step).
    pub step_seconds: Vec<f64>,
}

impl GenerateOutput {
    /// The tensors `--save-tensors` writes, by name.
    pub fn named_tensors(&self) -> Vec<(&'static str, &Tensor)> {
        let mut v = vec![("prompt_embeds", &self.prompt_embeds)];
        if let Some(p) = &self.pooled_prompt_embeds {
            v.push(("pooled_prompt_embeds", p));
        }
        v.push(("final_latents", &self.final_latents));
        let name = if self.is_video() { "video" } else { "image" };
        v.push((name, &self.image));
        v
    }

    /// Whether the output is frames (B, T, H, W, 3) rather than images.
    pub fn is_video(&self) -> bool {
        self.image.rank() == 5
    }
}

/// A loaded pipeline of any family. Families hold a [`PipelineBase`] and reach it through
/// `Deref` ([`family_base!`]), so every shared method (offload, device maps, accounting) is theirs.
pub trait Pipeline: std::ops::DerefMut<Target = PipelineBase> + Send + Sync {
    fn base(&self) -> &PipelineBase {
        self
    }
    fn base_mut(&mut self) -> &mut PipelineBase {
        self
    }
    /// diffusers' defaults for this family: (steps, guidance).
    fn defaults(&self) -> (usize, f64);
    /// Width and height must be multiples of this.
    fn size_multiple(&self) -> usize;
    /// What a run of `req` needs, phase by phase, for the planner ([`crate::planner`]): the
    /// component each phase runs, its passes and compute, its activations and their
    /// alternatives. Reads no weight.
    fn phases(&self, req: &GenerateRequest) -> Result<Vec<crate::planner::PhaseNeed>>;
    /// One call of the pipeline (the family's `__call__`).
    fn run(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<GenerateOutput>;

    /// Runs the pipeline; afterwards nothing offloaded stays resident, whatever happened.
    fn generate(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<GenerateOutput> {
        let acct = self.base().accounting.clone();
        let mut steps = |i: usize, total: usize| {
            acct.step_done();
            on_step(i, total)
        };
        let out = self.run(req, &mut steps);
        acct.end_phase();
        let freed = self.base().free_offloaded();
        let out = out?;
        freed?;
        Ok(out)
    }
}

type Loader = fn(&Path, LoadOptions) -> Result<Box<dyn Pipeline>>;

/// The families lowtide runs, by `model_index.json` `_class_name`.
fn families() -> [(&'static [&'static str], Loader); 3] {
    [
        (stable_diffusion::CLASSES, |r, o| {
            Ok(Box::new(StableDiffusion::load(r, o)?))
        }),
        (flux::CLASSES, |r, o| Ok(Box::new(Flux::load(r, o)?))),
        (wan::CLASSES, |r, o| Ok(Box::new(Wan::load(r, o)?))),
    ]
}

/// Whether a `model_index.json` class makes videos (its outputs are .mp4 files or frame folders).
pub fn makes_video(class_name: &str) -> bool {
    wan::CLASSES.contains(&class_name)
}

/// Opens the pipeline in `root`, choosing the family from `model_index.json`.
pub fn load(root: &Path, opts: LoadOptions) -> Result<Box<dyn Pipeline>> {
    let index = ModelIndex::read(root)?;
    let families = families();
    match families
        .iter()
        .find(|(classes, _)| classes.contains(&index.class_name.as_str()))
    {
        Some((_, open)) => open(root, opts),
        None => Err(Error::unsupported(
            root.join("model_index.json").display().to_string(),
            "_class_name",
            format!("\"{}\"", index.class_name),
            format!(
                "supported pipelines: {}",
                families
                    .iter()
                    .flat_map(|(c, _)| c.iter())
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}
