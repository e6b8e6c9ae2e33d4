//! `CLIPTextModel` (transformers), as used by Stable Diffusion 1.x (quick_gelu) and 2.x (gelu).

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::error::Result;
use crate::layers::{attention, Activation, Embedding, LayerNorm, Linear};
use crate::residency::{ModuleScope, ParamPath, UnitScope, WeightProvider};

fn default_vocab() -> usize {
    49408
}
fn default_hidden() -> usize {
    512
}
fn default_inter() -> usize {
    2048
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    8
}
fn default_max_pos() -> usize {
    77
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> Option<i64> {
    Some(49407)
}
/// `eos_token_id` may be a list or null in some configs; only the pooled output reads it, so
/// anything but an integer loads as `None` and is refused there, not at load.
fn int_or_none<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<i64>, D::Error> {
    Ok(serde_json::Value::deserialize(d)?.as_i64())
}

/// `config.json` of a `CLIPTextModel`; defaults are transformers' `CLIPTextConfig` defaults.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden")]
    pub hidden_size: usize,
    #[serde(default = "default_inter")]
    pub intermediate_size: usize,
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
    /// Picks the pooled (EOS) position; 2 in configs from before transformers PR #24773.
    #[serde(default = "default_eos", deserialize_with = "int_or_none")]
    pub eos_token_id: Option<i64>,
}

/// Both outputs of `CLIPTextModel`.
pub struct ClipTextOutput {
    /// (batch, seq, hidden), after the final layer norm.
    pub last_hidden_state: Tensor,
    /// (batch, hidden): `last_hidden_state` at each row's EOS position (FLUX's pooled prompt).
    pub pooler_output: Tensor,
}

struct EncoderLayer {
    unit: UnitScope,
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct ClipTextModel {
    cfg: ClipTextConfig,
    src: std::sync::Arc<dyn WeightProvider>,
    act: Activation,
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_ln: LayerNorm,
}

impl ClipTextModel {
    pub fn new(pp: &ParamPath, cfg: &ClipTextConfig) -> Result<Self> {
        let file = "text_encoder/config.json";
        {
            use crate::validate::{config_f32, count};
            count(file, "vocab_size", cfg.vocab_size, 1, 1 << 24)?;
            count(file, "hidden_size", cfg.hidden_size, 1, 1 << 16)?;
            count(file, "intermediate_size", cfg.intermediate_size, 1, 1 << 18)?;
            count(file, "num_hidden_layers", cfg.num_hidden_layers, 1, 256)?;
            count(
                file,
                "num_attention_heads",
                cfg.num_attention_heads,
                1,
                1024,
            )?;
            count(
                file,
                "max_position_embeddings",
                cfg.max_position_embeddings,
                1,
                1 << 16,
            )?;
            config_f32(file, "layer_norm_eps", cfg.layer_norm_eps, false)?;
        }
        if let Some(arch) = &cfg.architectures {
            if let Some(a) = arch.iter().find(|a| a.as_str() != "CLIPTextModel") {
                return Err(crate::Error::unsupported(
                    file,
                    "architectures",
                    format!("\"{a}\""),
                    "only CLIPTextModel text encoders are supported",
                ));
            }
        }
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            return Err(crate::Error::unsupported(
                file,
                "num_attention_heads",
                cfg.num_attention_heads,
                "must divide hidden_size",
            ));
        }
        let act = Activation::parse(file, "hidden_act", &cfg.hidden_act)?;
        let h = cfg.hidden_size;
        // transformers 4 saves `text_model.*`; transformers 5 drops the prefix.
        let tm = if pp.has("embeddings.token_embedding.weight") {
            pp.clone()
        } else {
            pp.pp("text_model")
        };
        let emb = tm.pp("embeddings");
        let enc = tm.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let l = enc.pp(i);
                let a = l.pp("self_attn");
                EncoderLayer {
                    unit: UnitScope::new(&l),
                    ln1: LayerNorm::new(&l.pp("layer_norm1"), h, cfg.layer_norm_eps),
                    q: Linear::new(&a.pp("q_proj"), h, h, true),
                    k: Linear::new(&a.pp("k_proj"), h, h, true),
                    v: Linear::new(&a.pp("v_proj"), h, h, true),
                    out: Linear::new(&a.pp("out_proj"), h, h, true),
                    ln2: LayerNorm::new(&l.pp("layer_norm2"), h, cfg.layer_norm_eps),
                    fc1: Linear::new(&l.pp("mlp").pp("fc1"), h, cfg.intermediate_size, true),
                    fc2: Linear::new(&l.pp("mlp").pp("fc2"), cfg.intermediate_size, h, true),
                }
            })
            .collect();
        Ok(Self {
            cfg: cfg.clone(),
            src: pp.provider().clone(),
            act,
            token_embedding: Embedding::new(&emb.pp("token_embedding"), cfg.vocab_size, h),
            position_embedding: Embedding::new(
                &emb.pp("position_embedding"),
                cfg.max_position_embeddings,
                h,
            ),
            layers,
            final_ln: LayerNorm::new(&tm.pp("final_layer_norm"), h, cfg.layer_norm_eps),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    /// `last_hidden_state` for token ids of shape (batch, seq).
    pub fn forward(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        let (b, seq) = ids.dims2()?;
        if seq > self.cfg.max_position_embeddings {
            return Err(crate::Error::InvalidArgument(format!(
                "{seq} tokens exceed the text encoder's {} positions",
                self.cfg.max_position_embeddings
            )));
        }
        let device = ids.device();
        let pos = Tensor::arange(0u32, seq as u32, device)?.unsqueeze(0)?;
        let src = self.src.as_ref();
        let scope = ModuleScope::enter(src, "embeddings")?;
        let mut x = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.forward(&pos)?)?
            .to_dtype(dtype)?;
        scope.exit()?;
        let mask = causal_mask(seq, device)?;
        let heads = self.cfg.num_attention_heads;
        let hd = self.cfg.hidden_size / heads;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, seq, heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        for l in &self.layers {
            x = l.unit.run(|| {
                let mut x = x.clone();
                let r = x.clone();
                let h = l.ln1.forward(&x)?;
                let q = split(l.q.forward(&h)?)?;
                let k = split(l.k.forward(&h)?)?;
                let v = split(l.v.forward(&h)?)?;
                let a = attention(&q, &k, &v, Some(&mask))?
                    .transpose(1, 2)?
                    .reshape((b, seq, self.cfg.hidden_size))?;
                x = (r + l.out.forward(&a)?)?;
                let r = x.clone();
                let h = l.ln2.forward(&x)?;
                let h = l.fc2.forward(&self.act.forward(&l.fc1.forward(&h)?)?)?;
                x = (r + h)?;
                Ok(x)
            })?;
        }
        let scope = ModuleScope::enter(src, "final_layer_norm")?;
        let out = self.final_ln.forward(&x)?;
        scope.exit()?;
        Ok(out)
    }

    /// `last_hidden_state` and `pooler_output`, as transformers' `CLIPTextTransformer`.
    pub fn forward_with_pooled(&self, ids: &Tensor, dtype: DType) -> Result<ClipTextOutput> {
        let last_hidden_state = self.forward(ids, dtype)?;
        let (b, seq, h) = last_hidden_state.dims3()?;
        let rows = ids.to_vec2::<u32>()?;
        let eos = self.cfg.eos_token_id.ok_or_else(|| {
            crate::Error::unsupported(
                "text_encoder/config.json",
                "eos_token_id",
                "a non-integer",
                "the pooled output needs the integer id of the end-of-text token",
            )
        })?;
        // Legacy configs (eos 2) take the highest id (EOS is the largest CLIP id), others the
        // first EOS; both as torch's argmax, which returns the first maximum (0 if none).
        let first_max = |v: &[u32]| -> usize {
            let m = v.iter().copied().max().unwrap_or(0);
            v.iter().position(|&x| x == m).unwrap_or(0)
        };
        let pos: Vec<u32> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let p = if eos == 2 {
                    first_max(r)
                } else {
                    r.iter().position(|&x| i64::from(x) == eos).unwrap_or(0)
                };
                (i * seq + p) as u32
            })
            .collect();
        let idx = Tensor::from_vec(pos, b, last_hidden_state.device())?;
        let pooler_output = last_hidden_state
            .reshape((b * seq, h))?
            .index_select(&idx, 0)?;
        Ok(ClipTextOutput {
            last_hidden_state,
            pooler_output,
        })
    }
}

fn causal_mask(seq: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (1, 1, seq, seq), device)?)
}
