//! Typed errors of the library. Every message names the file, tensor or value at fault and,
//! where there is one, what the user can do about it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} not found: {path} ({hint})")]
    NotFound {
        what: String,
        path: PathBuf,
        hint: String,
    },

    // Causes are part of the message and deliberately not `#[source]`: the CLI prints the
    // whole chain, and a source would print the same text twice.
    #[error("cannot read {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("invalid JSON in {path}: {cause}")]
    Json {
        path: PathBuf,
        cause: serde_json::Error,
    },

    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },

    #[error("not enough memory: {what} needs about {needed}, but {available} {hint}")]
    InsufficientMemory {
        what: String,
        needed: String,
        available: String,
        hint: String,
    },

    #[error("non-finite values (NaN or infinity): {0}")]
    NonFinite(String),

    #[error("corrupt or truncated safetensors file {path}: {reason}")]
    CorruptSafetensors { path: PathBuf, reason: String },

    #[error("corrupt or unreadable GGUF file {path}: {reason}")]
    CorruptGguf { path: PathBuf, reason: String },

    #[error("{path} does not fit this pipeline: {reason}")]
    WrongCheckpoint { path: PathBuf, reason: String },

    #[error("tensor `{tensor}` is missing from {location}")]
    MissingTensor { tensor: String, location: String },

    #[error("tensor `{tensor}` in {path} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        tensor: String,
        path: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("tensor `{tensor}` in {path} has dtype {found}, expected a floating-point dtype (F32, F16, BF16 or F64)")]
    DtypeMismatch {
        tensor: String,
        path: PathBuf,
        found: String,
    },

    #[error("unsupported value in {file}: `{field}` = {value} ({hint})")]
    UnsupportedConfig {
        file: String,
        field: String,
        value: String,
        hint: String,
    },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("device unavailable: {0}")]
    DeviceUnavailable(String),

    #[error("image {path}: {reason}")]
    Image { path: PathBuf, reason: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error(
        "model `{repo}` is not in the local Hugging Face cache (looked in {looked_in}); {hint}"
    )]
    ModelNotCached {
        repo: String,
        looked_in: String,
        hint: String,
    },

    #[error("tensor computation failed: {0}")]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        // candle wraps errors in context layers that repeat the message; keep the innermost.
        Error::Candle(match e {
            candle_core::Error::Context { inner, .. }
            | candle_core::Error::WithBacktrace { inner, .. } => *inner,
            other => other,
        })
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
        }
    }

    pub fn unsupported(
        file: impl Into<String>,
        field: impl Into<String>,
        value: impl std::fmt::Display,
        hint: impl Into<String>,
    ) -> Self {
        Error::UnsupportedConfig {
            file: file.into(),
            field: field.into(),
            value: value.to_string(),
            hint: hint.into(),
        }
    }
}

/// Reads and parses a JSON file into `T`, with the path in every error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound {
                what: "file".into(),
                path: path.to_path_buf(),
                hint: "is this a diffusers model folder?".into(),
            }
        } else {
            Error::io(path, e)
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|cause| Error::Json {
        path: path.to_path_buf(),
        cause,
    })
}
