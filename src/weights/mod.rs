//! Weights and storage: where tensors live on disk and how one is read into memory.
//!
//! A component's checkpoint (single file, sharded, or an `fp16` variant) becomes one
//! [`WeightStore`]: an index from tensor name to a byte range in a safetensors file. Headers are
//! parsed through a memory map once; tensor data is read per tensor, on demand, with positioned
//! reads. Reading (rather than touching the mapped pages) keeps two promises: a file truncated
//! after it was opened is a clean error instead of a SIGBUS, and bytes dropped by the residency
//! manager really leave the process (mapped pages that were read stay in RSS while mapped).

mod store;

pub use store::{checkpoint_files, has_checkpoint, StoredTensor, WeightStore};
