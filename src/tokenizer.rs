//! CLIP tokenizer: byte-level BPE with `</w>` word ends, exactly as transformers' CLIP tokenizer.
//!
//! Real Stable Diffusion repos ship `vocab.json` + `merges.txt` only; newer ones also carry a
//! `tokenizer.json`. Both load through the `tokenizers` crate: from the two files we build the
//! same pipeline transformers' converter does (NFC, whitespace collapse, lower-case, CLIP's
//! split regex, byte-level alphabet). BOS/EOS, truncation and padding to `model_max_length` with
//! the configured pad token are applied here.

use std::path::Path;

use serde_json::{json, Value};

use crate::error::{read_json, Error, Result};

const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    max_len: usize,
}

fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl ClipTokenizer {
    /// Loads from a `tokenizer/` folder. `fallback_max_len` is used when the folder does not say.
    pub fn from_dir(dir: &Path, fallback_max_len: usize) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::NotFound {
                what: "tokenizer folder".into(),
                path: dir.to_path_buf(),
                hint: "a diffusers SD pipeline has tokenizer/vocab.json and merges.txt".into(),
            });
        }
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.is_file() {
            read_json(&cfg_path)?
        } else {
            json!({})
        };
        let map_path = dir.join("special_tokens_map.json");
        let map: Value = if map_path.is_file() {
            read_json(&map_path)?
        } else {
            json!({})
        };
        let special = |key: &str, default: &str| -> String {
            cfg.get(key)
                .and_then(token_content)
                .or_else(|| map.get(key).and_then(token_content))
                .unwrap_or_else(|| default.to_string())
        };
        let bos_s = special("bos_token", "<|startoftext|>");
        let eos_s = special("eos_token", "<|endoftext|>");
        let unk_s = special("unk_token", "<|endoftext|>");
        let pad_s = special("pad_token", &eos_s);
        let max_len = cfg
            .get("model_max_length")
            .and_then(|v| v.as_f64())
            .filter(|&m| m > 0.0 && m < 1e6)
            .map(|m| m as usize)
            .unwrap_or(fallback_max_len);

        let tj = dir.join("tokenizer.json");
        let inner = if tj.is_file() {
            tokenizers::Tokenizer::from_file(&tj)
                .map_err(|e| Error::Tokenizer(format!("{}: {e}", tj.display())))?
        } else {
            let vocab_path = dir.join("vocab.json");
            let merges_path = dir.join("merges.txt");
            let vocab: Value = read_json(&vocab_path)?;
            let merges_txt = std::fs::read_to_string(&merges_path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Error::NotFound {
                        what: "BPE merges".into(),
                        path: merges_path.clone(),
                        hint: "a CLIP tokenizer needs vocab.json and merges.txt".into(),
                    }
                } else {
                    Error::io(&merges_path, e)
                }
            })?;
            // The first line is a version header; CLIP's converter skips it.
            let merges: Vec<&str> = merges_txt
                .lines()
                .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
                .collect();
            // BOS/EOS/UNK are special added tokens: typed in a prompt they map to their ids.
            let mut added = vec![];
            for s in [&bos_s, &eos_s, &unk_s] {
                if let Some(id) = vocab.get(s.as_str()).and_then(Value::as_u64) {
                    if !added.iter().any(|a: &Value| a["id"] == id) {
                        added.push(json!({"id": id, "content": s, "single_word": false,
                            "lstrip": false, "rstrip": false, "normalized": false,
                            "special": true}));
                    }
                }
            }
            let spec = json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": [
                    {"type": "NFC"},
                    {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                    {"type": "Lowercase"}
                ]},
                "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": CLIP_PATTERN},
                     "behavior": "Removed", "invert": true},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                     "use_regex": true}
                ]},
                "post_processor": null,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                            "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": unk_s,
                          "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                          "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                          "vocab": vocab, "merges": merges}
            });
            tokenizers::Tokenizer::from_bytes(spec.to_string().as_bytes()).map_err(|e| {
                Error::Tokenizer(format!(
                    "{} / {}: {e}",
                    vocab_path.display(),
                    merges_path.display()
                ))
            })?
        };
        let id = |s: &str| -> Result<u32> {
            inner.token_to_id(s).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "special token `{s}` is not in the vocabulary of {}",
                    dir.display()
                ))
            })
        };
        Ok(Self {
            bos: id(&bos_s)?,
            eos: id(&eos_s)?,
            pad: id(&pad_s)?,
            max_len,
            inner,
        })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The largest token id the tokenizer can produce (added tokens included).
    pub fn max_id(&self) -> u32 {
        self.inner
            .get_vocab(true)
            .values()
            .copied()
            .chain([self.bos, self.eos, self.pad])
            .max()
            .unwrap_or(0)
    }

    /// The text that [`Self::encode_padded`] drops to fit `max_len` tokens, if any (diffusers
    /// warns with it).
    pub fn truncated_part(&self, text: &str) -> Result<Option<String>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot tokenize {text:?}: {e}")))?;
        let keep = self.max_len.saturating_sub(2);
        let ids = enc.get_ids();
        if ids.len() <= keep {
            return Ok(None);
        }
        let cut = self
            .inner
            .decode(&ids[keep..], true)
            .map_err(|e| Error::Tokenizer(format!("cannot decode {text:?}: {e}")))?;
        Ok(Some(cut))
    }

    /// `tokenizer(text, padding="max_length", max_length=max_len, truncation=True)` ids.
    pub fn encode_padded(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot tokenize {text:?}: {e}")))?;
        let body = enc.get_ids();
        let keep = body.len().min(self.max_len.saturating_sub(2));
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.eos);
        ids.resize(self.max_len, self.pad);
        Ok(ids)
    }
}

/// T5's SentencePiece (Unigram) tokenizer, read from `tokenizer.json` (FLUX's `tokenizer_2/`).
/// Encodes as transformers' `T5Tokenizer(Fast)`: no BOS, `</s>` appended after truncation,
/// right padding with the pad token.
pub struct T5Tokenizer {
    inner: tokenizers::Tokenizer,
    pad: u32,
    /// Tokens the post-processor adds to one sequence (`</s>`: 1).
    added: usize,
}

/// Ids padded to a fixed length, and what truncation cut off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct T5Encoding {
    pub ids: Vec<u32>,
    /// Tokens before the padding (the attention mask's ones), `</s>` included.
    pub len: usize,
    /// The tokens that did not fit, decoded (for diffusers' "was truncated" warning); `None`
    /// when the whole prompt fit.
    pub truncated: Option<String>,
}

impl T5Tokenizer {
    /// Loads from a folder holding `tokenizer.json` (and optionally `tokenizer_config.json` /
    /// `special_tokens_map.json`, which may rename the EOS and pad tokens).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            return Err(Error::NotFound {
                what: "T5 tokenizer file".into(),
                path: tj,
                hint: "FLUX needs tokenizer_2/tokenizer.json, the T5 tokenizer: write it with \
                       T5TokenizerFast.save_pretrained; spiece.model alone is not read"
                    .into(),
            });
        }
        let mut inner = tokenizers::Tokenizer::from_file(&tj)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tj.display())))?;
        let read = |name: &str| -> Result<Value> {
            let p = dir.join(name);
            if p.is_file() {
                read_json(&p)
            } else {
                Ok(json!({}))
            }
        };
        let (cfg, map) = (
            read("tokenizer_config.json")?,
            read("special_tokens_map.json")?,
        );
        let special = |key: &str, default: &str| -> String {
            cfg.get(key)
                .and_then(token_content)
                .or_else(|| map.get(key).and_then(token_content))
                .unwrap_or_else(|| default.to_string())
        };
        let id = |s: &str| -> Result<u32> {
            inner.token_to_id(s).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "special token `{s}` is not in the vocabulary of {}",
                    tj.display()
                ))
            })
        };
        let eos_s = special("eos_token", "</s>");
        let (eos, pad) = (id(&eos_s)?, id(&special("pad_token", "<pad>"))?);
        // transformers' T5Tokenizer installs this template whatever the file says; truncation
        // and padding are per call, so any baked into the file are dropped.
        let template = tokenizers::processors::template::TemplateProcessing::builder()
            .try_single(format!("$A {eos_s}"))
            .and_then(|b| {
                b.special_tokens(vec![(eos_s.clone(), eos)])
                    .build()
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| Error::Tokenizer(format!("{}: T5 template: {e}", tj.display())))?;
        let added = tokenizers::PostProcessor::added_tokens(&template, false);
        inner.with_post_processor(Some(template));
        inner
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", tj.display())))?;
        inner.with_padding(None);
        Ok(Self { inner, pad, added })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// The largest token id the tokenizer can produce (added tokens included), to check
    /// against the encoder's `vocab_size`.
    pub fn max_id(&self) -> u32 {
        self.inner
            .get_vocab(true)
            .values()
            .copied()
            .chain([self.pad])
            .max()
            .unwrap_or(0)
    }

    /// `tokenizer_2(text, padding="max_length", max_length=max_len, truncation=True)` ids: the
    /// text's tokens cut to `max_len - 1`, then `</s>`, then pad tokens up to `max_len`.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Result<T5Encoding> {
        if max_len == 0 || max_len < self.added {
            return Err(Error::InvalidArgument(format!(
                "T5 max sequence length {max_len} is too short (at least {} tokens)",
                self.added.max(1)
            )));
        }
        let fail =
            |e: tokenizers::Error| Error::Tokenizer(format!("cannot tokenize {text:?}: {e}"));
        let mut enc = self.inner.encode(text, false).map_err(fail)?;
        let room = max_len - self.added;
        let full = enc.get_ids().to_vec();
        let truncated = if full.len() > room {
            Some(self.inner.decode(&full[room..], true).map_err(fail)?)
        } else {
            None
        };
        enc.truncate(room, 0, tokenizers::TruncationDirection::Right);
        let enc = self.inner.post_process(enc, None, true).map_err(fail)?;
        let mut ids = enc.get_ids().to_vec();
        let len = ids.len();
        ids.resize(max_len, self.pad);
        Ok(T5Encoding {
            ids,
            len,
            truncated,
        })
    }
}
