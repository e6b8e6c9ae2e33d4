//! The VAE on its own, for `lowtide vae encode|decode`.

use std::path::Path;

use super::base::LoadOptions;
use super::loader::Component;
use crate::error::{Error, Result};
use crate::models::{AutoencoderKL, AutoencoderKLConfig, AutoencoderKLWan, AutoencoderKLWanConfig};

/// The VAE of a pipeline: an image VAE or Wan's causal video VAE.
pub enum AnyVae {
    Image(Box<AutoencoderKL>),
    Video(Box<AutoencoderKLWan>),
}

/// The `vae` component of a pipeline folder, or a folder that is itself a VAE.
fn open_vae_component(root: &Path, opts: &LoadOptions) -> Result<Component> {
    let (parent, name) = if root.join("vae").is_dir() {
        (root.to_path_buf(), "vae".to_string())
    } else if root.join("config.json").is_file() {
        let parent = root.parent().unwrap_or(Path::new(".")).to_path_buf();
        let name = root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        (parent, name)
    } else {
        return Err(Error::NotFound {
            what: "VAE (a `vae/` folder or a config.json)".into(),
            path: root.to_path_buf(),
            hint: "give a diffusers pipeline folder or its vae folder".into(),
        });
    };
    Component::open(
        &parent,
        &name,
        "diffusion_pytorch_model",
        opts.variant.as_deref(),
        None,
        &opts.device,
        opts.dtype,
        Default::default(),
    )
}

/// Opens the `AutoencoderKL` of a pipeline folder (its `vae/`), or a folder that is itself a VAE.
pub fn load_vae(root: &Path, opts: &LoadOptions) -> Result<(AutoencoderKL, Component)> {
    let c = open_vae_component(root, opts)?;
    let (vae, _): (_, AutoencoderKLConfig) = c.build(AutoencoderKL::new)?;
    Ok((vae, c))
}

/// Opens whichever VAE the folder holds, by its config's `_class_name`.
pub fn load_any_vae(root: &Path, opts: &LoadOptions) -> Result<AnyVae> {
    let c = open_vae_component(root, opts)?;
    #[derive(serde::Deserialize)]
    struct Class {
        #[serde(rename = "_class_name", default)]
        class_name: Option<String>,
    }
    let class: Class = c.config()?;
    let pp = c.param_root();
    let vae = match class.class_name.as_deref() {
        Some("AutoencoderKLWan") => {
            let cfg: AutoencoderKLWanConfig = c.config()?;
            AnyVae::Video(Box::new(AutoencoderKLWan::new(&pp, &cfg)?))
        }
        None | Some("AutoencoderKL") => {
            let cfg: AutoencoderKLConfig = c.config()?;
            AnyVae::Image(Box::new(AutoencoderKL::new(&pp, &cfg)?))
        }
        Some(other) => {
            return Err(Error::unsupported(
                c.dir.join("config.json").display().to_string(),
                "_class_name",
                format!("\"{other}\""),
                "supported VAEs: AutoencoderKL, AutoencoderKLWan",
            ))
        }
    };
    c.validate(&pp)?;
    Ok(vae)
}
