//! Weights and storage: where tensors live on disk and how one is read into memory.
//!
//! A component's checkpoint (single file, sharded, or an `fp16` variant) becomes one
//! [`WeightStore`]: an index from tensor name to a byte range in a safetensors file. Headers are
//! parsed through a memory map once; tensor data is loaded per tensor, on demand. A large tensor
//! whose stored dtype is the one wanted is backed by its own private mapping of the file
//! ([`mapped`]: no copy, pages shared with the page cache, unmapped when the tensor is dropped so
//! offloaded bytes really leave the process); everything else is read with positioned reads. A
//! file truncated before a tensor is loaded is a clean error either way.

pub mod ggml;
pub mod gguf;
pub mod layouts;
pub mod mapped;
pub mod quantize;
mod store;

pub use store::{
    checkpoint_files, dequantize_packed, has_checkpoint, widen_scaled_fp8, Encoding, StoredTensor,
    WeightStore,
};
