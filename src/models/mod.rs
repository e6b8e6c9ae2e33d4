//! Model families, one file each; configs are deserialized from the component's config.json.

pub mod autoencoder_kl;
pub mod blocks;
pub mod clip;
pub mod flux_transformer;
pub mod t5;
pub mod unet_2d_condition;
pub mod vae_tiling;
pub mod wan_transformer;
pub mod wan_vae;

pub use autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig, LatentDist};
pub use clip::{ClipTextConfig, ClipTextModel, ClipTextOutput};
pub use flux_transformer::{FluxInputs, FluxTransformer2DModel, FluxTransformerConfig};
pub use t5::{wan_prompt_embeds, T5Config, T5EncoderModel};
pub use unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
pub use vae_tiling::{Tiling, VaeMemory, VaeOptions};
pub use wan_transformer::{WanInputs, WanTransformer3DModel, WanTransformerConfig};
pub use wan_vae::{
    AutoencoderKLWan, AutoencoderKLWanConfig, WanTiling, WanVaeMemory, WanVaeOptions, WanVaePeak,
};
