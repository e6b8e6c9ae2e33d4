//! Finding and opening a diffusers pipeline: a folder, or a Hugging Face repo id resolved from
//! the local cache (downloading only when the network allows and the cache lacks it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use serde_json::Value;

use crate::error::{read_json, Error, Result};
use crate::residency::{Accounting, ManagedWeights, ParamPath, WeightProvider};
use crate::weights::{layouts, WeightStore};

/// `model_index.json`: the pipeline class and, per component, `[library, class]`.
#[derive(Debug, Clone)]
pub struct ModelIndex {
    pub class_name: String,
    pub components: BTreeMap<String, (Option<String>, Option<String>)>,
}

impl ModelIndex {
    pub fn read(root: &Path) -> Result<Self> {
        let path = root.join("model_index.json");
        if !root.is_dir() {
            return Err(Error::NotFound {
                what: "model folder".into(),
                path: root.to_path_buf(),
                hint: "pass a diffusers pipeline folder or a cached repo id to --model".into(),
            });
        }
        let v: Value = read_json(&path)?;
        let obj = v.as_object().ok_or_else(|| {
            Error::unsupported(
                path.display().to_string(),
                "(root)",
                "not an object",
                "expected a JSON object",
            )
        })?;
        let class_name = obj
            .get("_class_name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let mut components = BTreeMap::new();
        for (k, v) in obj {
            if k.starts_with('_') {
                continue;
            }
            if let Some(arr) = v.as_array() {
                let s = |i: usize| arr.get(i).and_then(Value::as_str).map(String::from);
                components.insert(k.clone(), (s(0), s(1)));
            }
        }
        Ok(Self {
            class_name,
            components,
        })
    }

    /// The class of a component, or an error if the pipeline does not have it.
    pub fn class_of(&self, root: &Path, name: &str) -> Result<String> {
        match self.components.get(name) {
            Some((_, Some(c))) => Ok(c.clone()),
            _ => Err(Error::NotFound {
                what: format!("component `{name}`"),
                path: root.join("model_index.json"),
                hint: format!(
                    "model_index.json does not list it, and a {} needs it",
                    self.class_name
                ),
            }),
        }
    }

    /// Checks that component `name` is one of `allowed` classes.
    pub fn expect_class(&self, root: &Path, name: &str, allowed: &[&str]) -> Result<()> {
        let class = self.class_of(root, name)?;
        if !allowed.contains(&class.as_str()) {
            return Err(Error::unsupported(
                "model_index.json",
                name,
                format!("\"{class}\""),
                format!("a {} takes {}", self.class_name, allowed.join(" or ")),
            ));
        }
        Ok(())
    }
}

/// The Hugging Face hub cache folder, as huggingface_hub resolves it.
pub fn hf_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    (1..=2).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// The snapshot folder of `repo` in a hub cache, if it holds a pipeline.
pub fn find_in_cache(cache: &Path, repo: &str, revision: &str) -> Option<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshots = repo_dir.join("snapshots");
    let by_ref = std::fs::read_to_string(repo_dir.join("refs").join(revision))
        .ok()
        .map(|h| snapshots.join(h.trim()));
    let direct = snapshots.join(revision);
    let candidates: Vec<PathBuf> = by_ref
        .into_iter()
        .chain(std::iter::once(direct))
        .chain(
            std::fs::read_dir(&snapshots)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path()),
        )
        .collect();
    candidates
        .into_iter()
        .find(|p| p.join("model_index.json").is_file())
}

/// Resolves `--model`: an existing folder, else a repo id from the local cache, else a download.
pub fn resolve_model(arg: &str, variant: Option<&str>) -> Result<PathBuf> {
    let p = Path::new(arg);
    if p.is_file() {
        return Err(Error::InvalidArgument(format!(
            "--model {arg} is a file; pass the pipeline's folder (the one holding model_index.json)"
        )));
    }
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    if !looks_like_repo_id(arg) {
        return Err(Error::NotFound {
            what: "model folder".into(),
            path: p.to_path_buf(),
            hint: "pass a diffusers pipeline folder or a Hugging Face repo id".into(),
        });
    }
    let cache = hf_cache_dir();
    if let Some(dir) = find_in_cache(&cache, arg, "main") {
        return Ok(dir);
    }
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
    let looked = format!(
        "{} (set by HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)",
        cache
            .join(format!("models--{}", arg.replace('/', "--")))
            .display()
    );
    if offline {
        return Err(Error::ModelNotCached {
            repo: arg.into(),
            looked_in: looked,
            hint: "HF_HUB_OFFLINE is set, so nothing was downloaded; download it with `huggingface-cli download` or pass a folder".into(),
        });
    }
    download(arg, variant, &cache).map_err(|e| Error::ModelNotCached {
        repo: arg.into(),
        looked_in: looked,
        hint: format!("downloading it failed too ({e}); pass a local folder, or fill the cache where the network allows"),
    })
}

/// Fetches what a pipeline needs into the hub cache (hf-hub): `model_index.json`, then for each
/// component it lists, its config, tokenizer files and weights (single file, or the shard index
/// and every shard it names), returning the snapshot folder.
fn download(
    repo: &str,
    variant: Option<&str>,
    cache: &Path,
) -> std::result::Result<PathBuf, String> {
    let api = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(cache.to_path_buf()))
        .with_progress(false)
        .build()
        .map_err(|e| e.to_string())?;
    let r = api.model(repo.to_string());
    let index = r.get("model_index.json").map_err(|e| e.to_string())?;
    let root = index
        .parent()
        .ok_or("unexpected cache layout")?
        .to_path_buf();
    let components = ModelIndex::read(&root)
        .map_err(|e| e.to_string())?
        .components;
    let v = variant.map(|v| format!(".{v}")).unwrap_or_default();
    for (name, (lib, _)) in components {
        if lib.is_none() {
            continue;
        }
        // Optional files (special_tokens_map, say) may be absent; required ones are checked at
        // load, with a message naming them.
        for f in [
            "config.json",
            "scheduler_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.json",
            "merges.txt",
        ] {
            let _ = r.get(&format!("{name}/{f}"));
        }
        for stem in ["diffusion_pytorch_model", "model"] {
            if r.get(&format!("{name}/{stem}{v}.safetensors")).is_ok() {
                break;
            }
            let idx = format!("{name}/{stem}.safetensors.index{v}.json");
            if let Ok(p) = r.get(&idx) {
                let shards: Vec<String> = std::fs::read_to_string(&p)
                    .ok()
                    .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                    .and_then(|j| j.get("weight_map").cloned())
                    .and_then(|m| m.as_object().cloned())
                    .map(|m| {
                        m.values()
                            .filter_map(|s| s.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                let mut shards = shards;
                shards.sort();
                shards.dedup();
                for s in shards {
                    r.get(&format!("{name}/{s}")).map_err(|e| e.to_string())?;
                }
                break;
            }
        }
    }
    Ok(root)
}

/// The weights of component `name` of the pipeline at `root`, in diffusers' names, with its
/// class: from `single_file` when given (converted as for `--weights`), else from the folder's
/// checkpoint (diffusers' or transformers' file stem).
pub fn open_component_store(
    root: &Path,
    name: &str,
    variant: Option<&str>,
    single_file: Option<&Path>,
) -> Result<(WeightStore, String)> {
    let class = ModelIndex::read(root)?.class_of(root, name)?;
    let store = match single_file {
        Some(p) => open_single_file(name, &root.join(name), p, &class)?,
        None => {
            let dir = root.join(name);
            let stem = ["diffusion_pytorch_model", "model"]
                .into_iter()
                .find(|s| crate::weights::has_checkpoint(&dir, s, variant))
                .unwrap_or("diffusion_pytorch_model");
            WeightStore::open_component(&dir, stem, variant)?
        }
    };
    Ok((store, class))
}

/// Component `name`'s weights from one file, in diffusers' names: opened (GGUF or safetensors)
/// and converted from its layout for `class`, with the component folder `dir`'s config.
fn open_single_file(name: &str, dir: &Path, path: &Path, class: &str) -> Result<WeightStore> {
    if !path.is_file() {
        return Err(Error::NotFound {
            what: format!("weights file for `{name}`"),
            path: path.to_path_buf(),
            hint: "check the path given to --weights".into(),
        });
    }
    let mut store = WeightStore::open_file(path)?;
    let config: Value = read_json(&dir.join("config.json"))?;
    layouts::prepare(&mut store, class, &config)?;
    Ok(store)
}

/// One component opened for use: its provider and the path root for its parameters.
pub struct Component {
    pub name: String,
    pub dir: PathBuf,
    pub weights: Arc<ManagedWeights>,
    /// The single file (`--weights NAME=FILE`) the weights come from instead of the folder's
    /// checkpoint.
    pub single_file: Option<PathBuf>,
}

impl Component {
    /// Opens component `name` of the pipeline at `root`: its config from the folder and its
    /// weights from the folder's checkpoint, or from `single_file` (any layout
    /// [`layouts::prepare`] converts for a `class`).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        root: &Path,
        name: &str,
        stem: &str,
        variant: Option<&str>,
        single_file: Option<(&Path, &str)>,
        device: &Device,
        dtype: DType,
        acct: Arc<Accounting>,
    ) -> Result<Self> {
        let dir = root.join(name);
        if !dir.is_dir() {
            return Err(Error::NotFound {
                what: format!("component folder `{name}`"),
                path: dir,
                hint: "the pipeline folder is incomplete".into(),
            });
        }
        let store = match single_file {
            Some((path, class)) => open_single_file(name, &dir, path, class)?,
            None => WeightStore::open_component(&dir, stem, variant)?,
        };
        Ok(Self {
            name: name.into(),
            single_file: single_file.map(|(p, _)| p.to_path_buf()),
            dir,
            weights: Arc::new(ManagedWeights::new(
                name,
                store,
                device.clone(),
                dtype,
                acct,
            )),
        })
    }

    pub fn param_root(&self) -> ParamPath {
        ParamPath::root(self.weights.clone() as Arc<dyn WeightProvider>)
    }

    /// Checks every declared parameter against the checkpoint (names, shapes, dtypes) and hands
    /// the list to the residency manager.
    pub fn validate(&self, pp: &ParamPath) -> Result<()> {
        let declared = pp.declared();
        for spec in &declared {
            let checked = self.weights.store().check(&spec.name, &spec.shape);
            match (checked, &self.single_file) {
                (
                    Err(Error::ShapeMismatch {
                        tensor,
                        path,
                        expected,
                        found,
                    }),
                    Some(_),
                ) => {
                    return Err(Error::WrongCheckpoint {
                        path,
                        reason: format!(
                            "tensor `{tensor}` has shape {found:?} where {}/config.json needs \
                             {expected:?}: the file is another size or version of this model",
                            self.dir.display()
                        ),
                    })
                }
                (r, _) => {
                    r?;
                }
            }
        }
        if let Some(path) = &self.single_file {
            let names: Vec<String> = declared.iter().map(|s| s.name.clone()).collect();
            let extra = layouts::unused(self.weights.store(), &names);
            if !extra.is_empty() {
                let first: Vec<&str> = extra.iter().take(5).map(|s| s.as_str()).collect();
                return Err(Error::WrongCheckpoint {
                    path: path.clone(),
                    reason: format!(
                        "{} tensors that {}/config.json's model does not have, first: {}",
                        extra.len(),
                        self.dir.display(),
                        first.join(", ")
                    ),
                });
            }
        }
        self.weights.set_declared(declared);
        self.weights.set_units(pp.declared_units());
        Ok(())
    }

    /// Builds the component's model from its `config.json` with `new`, then checks every
    /// parameter it declared against the checkpoint. Returns the model and its config.
    pub fn build<C: serde::de::DeserializeOwned, M>(
        &self,
        new: impl FnOnce(&ParamPath, &C) -> Result<M>,
    ) -> Result<(M, C)> {
        let cfg: C = self.config()?;
        let pp = self.param_root();
        // A model file names its usual folder in config errors (T5 is FLUX's `text_encoder_2`
        // but Wan's `text_encoder`): name the file really read.
        let model = new(&pp, &cfg).map_err(|e| match e {
            Error::UnsupportedConfig {
                file,
                field,
                value,
                hint,
            } if file.ends_with("config.json") => Error::UnsupportedConfig {
                file: self.dir.join("config.json").display().to_string(),
                field,
                value,
                hint,
            },
            e => e,
        })?;
        self.validate(&pp)?;
        Ok((model, cfg))
    }

    pub fn config<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        read_json(&self.dir.join("config.json"))
    }
}
