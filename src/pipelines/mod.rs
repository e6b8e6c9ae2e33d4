//! Pipelines: components wired together, from a model folder to images.

pub mod loader;
pub mod stable_diffusion;
pub mod vae;

pub use loader::{hf_cache_dir, resolve_model, Component, ModelIndex};
pub use stable_diffusion::{
    DeviceMapSpec, GenerateOutput, GenerateRequest, LoadOptions, OffloadPlan, StableDiffusion,
    OFFLOAD_ORDER,
};
pub use vae::load_vae;
