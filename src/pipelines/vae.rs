//! The VAE on its own, for `lowtide vae encode|decode`.

use std::path::Path;

use super::base::LoadOptions;
use super::loader::Component;
use crate::error::{Error, Result};
use crate::models::{AutoencoderKL, AutoencoderKLConfig};

/// Opens the `AutoencoderKL` of a pipeline folder (its `vae/`), or a folder that is itself a VAE.
pub fn load_vae(root: &Path, opts: &LoadOptions) -> Result<(AutoencoderKL, Component)> {
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
    let c = Component::open(
        &parent,
        &name,
        "diffusion_pytorch_model",
        opts.variant.as_deref(),
        &opts.device,
        opts.dtype,
        Default::default(),
    )?;
    let cfg: AutoencoderKLConfig = c.config()?;
    let pp = c.param_root();
    let vae = AutoencoderKL::new(&pp, &cfg)?;
    c.validate(&pp)?;
    Ok((vae, c))
}
