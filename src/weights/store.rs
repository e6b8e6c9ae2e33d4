use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors};

use super::{ggml, mapped};
use crate::error::{read_json, Error, Result};
use ggml::GgmlDType;

/// How a stored tensor's bytes encode its values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Encoding {
    /// Plain elements of the tensor's dtype.
    Plain,
    /// ggml blocks (GGUF), dequantized at use.
    Ggml(GgmlDType),
    /// ComfyUI's "fp8_scaled": f8e4m3 elements times a per-tensor `scale_weight`.
    ScaledFp8 { scale: f32 },
}

/// One tensor's place in a checkpoint.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    pub file: usize,
    /// The element dtype: U8 for ggml blocks, F8E4M3 for scaled fp8.
    pub dtype: DType,
    pub encoding: Encoding,
    /// The shape the model sees (diffusers' layout).
    pub shape: Vec<usize>,
    /// Absolute byte ranges in the file, read one after the other: one range, or several where
    /// a file's layout is rearranged into diffusers' (rows of a fused tensor, swapped halves).
    pub segments: Vec<(u64, u64)>,
}

impl StoredTensor {
    pub fn nbytes(&self) -> u64 {
        self.segments.iter().map(|(a, b)| b - a).sum()
    }

    /// Whether the values are block-quantized or scaled: kept in that form, never widened.
    pub fn is_packed(&self) -> bool {
        self.encoding != Encoding::Plain
    }

    /// Bytes of `n` values (whole ggml blocks), in this encoding.
    fn bytes_of(&self, n: usize) -> u64 {
        match self.encoding {
            Encoding::Ggml(t) => ggml::bytes_for(t, n) as u64,
            _ => (n * self.dtype.size_in_bytes()) as u64,
        }
    }

    /// Rows `r0..r1` of the first dimension (a part of a fused tensor), as a tensor of its own.
    pub fn rows(&self, r0: usize, r1: usize) -> Option<StoredTensor> {
        let per_row = self.bytes_of(self.shape.iter().skip(1).product());
        if r1 > *self.shape.first()? || r0 >= r1 || self.segments.len() != 1 {
            return None;
        }
        let (start, _) = self.segments[0];
        let mut t = self.clone();
        t.shape[0] = r1 - r0;
        t.segments = vec![(start + per_row * r0 as u64, start + per_row * r1 as u64)];
        Some(t)
    }

    /// These rows followed by `other`'s (same file, encoding and trailing shape).
    pub fn then(&self, other: &StoredTensor) -> Option<StoredTensor> {
        if self.file != other.file
            || self.encoding != other.encoding
            || self.dtype != other.dtype
            || self.shape.get(1..) != other.shape.get(1..)
        {
            return None;
        }
        let mut t = self.clone();
        t.shape[0] += other.shape[0];
        t.segments.extend(other.segments.iter().copied());
        Some(t)
    }
}

/// Index of every tensor of one component's checkpoint.
#[derive(Debug)]
pub struct WeightStore {
    files: Vec<(PathBuf, File, u64)>,
    tensors: HashMap<String, StoredTensor>,
    /// A GGUF file's `general.architecture`.
    pub architecture: Option<String>,
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// `LOWTIDE_MMAP=0` reads every tensor into memory instead of mapping it (for comparisons).
fn mapping_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LOWTIDE_MMAP").map_or(true, |v| v != "0"))
}

/// A zeroed `Vec<T>` of `n` elements filled by `read` from little-endian bytes.
fn read_typed<T: Copy + Default>(
    n: usize,
    read: &dyn Fn(&mut [u8]) -> Result<()>,
) -> Result<Vec<T>> {
    let mut v = vec![T::default(); n];
    // SAFETY: T is a plain floating-point type (f32, f16, bf16): every bit pattern is valid and
    // the byte view covers exactly the vector's initialised elements.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, n * std::mem::size_of::<T>())
    };
    advise_huge_pages(bytes);
    read(bytes)?;
    Ok(v)
}

/// Asks the kernel to back a large, not yet touched buffer with transparent huge pages: the read
/// that fills it then faults 2 MiB pages instead of 4 KiB ones (measured: a 9.6 GB checkpoint
/// read spent a fifth of its time in page faults and page clearing). Only a hint: a kernel
/// without THP, or in `never` mode, ignores it.
fn advise_huge_pages(buf: &mut [u8]) {
    const HUGE: usize = 2 << 20;
    if buf.len() < 4 * HUGE {
        return;
    }
    let start = (buf.as_mut_ptr() as usize).next_multiple_of(HUGE);
    let end = (buf.as_mut_ptr() as usize + buf.len()) & !(HUGE - 1);
    if end > start {
        // SAFETY: the range lies inside `buf`, which this process owns; madvise only changes how
        // the kernel backs those pages, not their contents or validity.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
}

/// Whether `dir` holds a `{stem}` checkpoint of this variant (single file or sharded index).
pub fn has_checkpoint(dir: &Path, stem: &str, variant: Option<&str>) -> bool {
    let (single, index) = match variant {
        Some(v) => (
            format!("{stem}.{v}.safetensors"),
            format!("{stem}.safetensors.index.{v}.json"),
        ),
        None => (
            format!("{stem}.safetensors"),
            format!("{stem}.safetensors.index.json"),
        ),
    };
    dir.join(single).is_file() || dir.join(index).is_file()
}

/// The safetensors files holding a component's weights: `{stem}[.{variant}].safetensors`, or the
/// shards listed in `{stem}.safetensors.index[.{variant}].json`, as diffusers names them.
pub fn checkpoint_files(dir: &Path, stem: &str, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let (single, index) = match variant {
        Some(v) => (
            dir.join(format!("{stem}.{v}.safetensors")),
            dir.join(format!("{stem}.safetensors.index.{v}.json")),
        ),
        None => (
            dir.join(format!("{stem}.safetensors")),
            dir.join(format!("{stem}.safetensors.index.json")),
        ),
    };
    if single.is_file() {
        return Ok(vec![single]);
    }
    if index.is_file() {
        let idx: ShardIndex = read_json(&index)?;
        let mut shards: Vec<String> = idx.weight_map.into_values().collect();
        shards.sort();
        shards.dedup();
        if shards.is_empty() {
            return Err(Error::unsupported(
                index.display().to_string(),
                "weight_map",
                "{}",
                "the shard index lists no tensors; re-save the checkpoint",
            ));
        }
        // A shard name is a file beside the index: nothing may point outside the component.
        if let Some(bad) = shards.iter().find(|s| {
            let p = Path::new(s.as_str());
            p.components().count() != 1
                || !matches!(p.components().next(), Some(std::path::Component::Normal(_)))
        }) {
            return Err(Error::unsupported(
                index.display().to_string(),
                "weight_map",
                format!("\"{bad}\""),
                "shard names must be plain file names in the component folder",
            ));
        }
        return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
    }
    let hint = match variant {
        Some(v) => format!(
            "no `{v}` variant here; drop --variant or use a folder that has {stem}.{v}.safetensors"
        ),
        None => {
            // transformers names its pickles pytorch_model.bin, diffusers {stem}.bin.
            let has_bin = dir.join(format!("{stem}.bin")).is_file()
                || dir.join("pytorch_model.bin").is_file();
            if has_bin {
                "only a pickle (.bin) checkpoint is present; convert it to safetensors".into()
            } else if dir.join(format!("{stem}.fp16.safetensors")).is_file() {
                "only an fp16 variant is present; pass --variant fp16".into()
            } else {
                format!("expected {stem}.safetensors or a sharded index")
            }
        }
    };
    Err(Error::NotFound {
        what: "checkpoint".into(),
        path: single,
        hint,
    })
}

fn to_candle_dtype(d: StDtype) -> Option<DType> {
    Some(match d {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F64 => DType::F64,
        StDtype::U8 => DType::U8,
        StDtype::U32 => DType::U32,
        StDtype::F8_E4M3 => DType::F8E4M3,
        StDtype::I64 => DType::I64,
        _ => return None,
    })
}

impl WeightStore {
    /// Opens every file and indexes its tensors. Only headers are read.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Error::NotFound {
                        what: "weight file".into(),
                        path: path.clone(),
                        hint: "the checkpoint or its shard index is incomplete".into(),
                    }
                } else {
                    Error::io(path, e)
                }
            })?;
            let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
            let corrupt = |reason: String| Error::CorruptSafetensors {
                path: path.clone(),
                reason,
            };
            if len < 8 {
                return Err(corrupt(format!("only {len} bytes, too short for a header")));
            }
            // SAFETY: the map is only read while parsing the header, below, and dropped after;
            // the safetensors parser checks every offset against the mapped length.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                let what = match e {
                    safetensors::SafeTensorError::MetadataIncompleteBuffer => {
                        "the tensor data does not match the header's offsets".to_string()
                    }
                    other => other.to_string(),
                };
                corrupt(format!(
                    "{what} (the file is damaged or was not fully downloaded)"
                ))
            })?;
            let data_start = 8 + n as u64;
            let data_end = meta
                .tensors()
                .values()
                .map(|i| data_start + i.data_offsets.1 as u64)
                .max()
                .unwrap_or(data_start);
            if data_end > len {
                return Err(corrupt(format!(
                    "the header promises {data_end} bytes but the file has {len}: truncated \
                     (re-download or re-save the checkpoint)"
                )));
            }
            for (name, info) in meta.tensors() {
                let dtype = to_candle_dtype(info.dtype).ok_or_else(|| Error::DtypeMismatch {
                    tensor: name.clone(),
                    path: path.clone(),
                    found: format!("{:?}", info.dtype),
                })?;
                tensors.insert(
                    name.clone(),
                    StoredTensor {
                        file: fi,
                        dtype,
                        encoding: Encoding::Plain,
                        shape: info.shape.clone(),
                        segments: vec![(
                            data_start + info.data_offsets.0 as u64,
                            data_start + info.data_offsets.1 as u64,
                        )],
                    },
                );
            }
            files.push((path.clone(), file, len));
        }
        Ok(Self {
            files,
            tensors,
            architecture: None,
        })
    }

    /// Opens one weight file: GGUF (by its magic) or safetensors.
    pub fn open_file(path: &Path) -> Result<Self> {
        let mut magic = [0u8; 4];
        let is_gguf = File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok()
            && &magic == b"GGUF";
        if is_gguf {
            Self::open_gguf(path)
        } else {
            Self::open(&[path.to_path_buf()])
        }
    }

    /// Indexes a GGUF file's tensors (candle reads the header). Shapes are in PyTorch's order;
    /// tensors of more than 4 dimensions, which ggml cannot hold, take the shape ComfyUI-GGUF's
    /// converter records in `comfy.gguf.orig_shape.<name>`.
    pub fn open_gguf(path: &Path) -> Result<Self> {
        use super::gguf::{read_header, Meta};
        let corrupt = |reason: String| Error::CorruptGguf {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let header = read_header(path, &file)?;
        let architecture = match header.metadata.get("general.architecture") {
            Some(Meta::Str(s)) => Some(s.clone()),
            _ => None,
        };
        let mut tensors = HashMap::new();
        for (name, info) in &header.tensors {
            let g = info.dtype;
            let mut shape = info.shape.clone();
            // Checked: a damaged header can claim any dimensions.
            let n = checked_elems(&shape)
                .filter(|&n| (n as u64) <= len.saturating_mul(8))
                .ok_or_else(|| {
                    corrupt(format!(
                        "tensor `{name}` claims dimensions {shape:?}, more than the file holds"
                    ))
                })?;
            if !n.is_multiple_of(g.block_size()) {
                return Err(corrupt(format!(
                    "tensor `{name}` has {n} values, not whole {} blocks",
                    ggml::name(g)
                )));
            }
            if let Some(Meta::Ints(s)) = header
                .metadata
                .get(&format!("comfy.gguf.orig_shape.{name}"))
            {
                let s: Vec<usize> = s.iter().map(|&d| d.max(0) as usize).collect();
                if checked_elems(&s) == Some(n) {
                    shape = s;
                }
            }
            let start = header.data_start.saturating_add(info.offset);
            let end = start.saturating_add(ggml::bytes_for(g, n) as u64);
            if end > len {
                return Err(corrupt(format!(
                    "tensor `{name}` ends at byte {end} but the file has {len}: truncated \
                     (re-download it)"
                )));
            }
            let (dtype, encoding) = match g {
                GgmlDType::F32 => (DType::F32, Encoding::Plain),
                GgmlDType::F16 => (DType::F16, Encoding::Plain),
                GgmlDType::BF16 => (DType::BF16, Encoding::Plain),
                q => (DType::U8, Encoding::Ggml(q)),
            };
            tensors.insert(
                name.clone(),
                StoredTensor {
                    file: 0,
                    dtype,
                    encoding,
                    shape,
                    segments: vec![(start, end)],
                },
            );
        }
        Ok(Self {
            files: vec![(path.to_path_buf(), file, len)],
            tensors,
            architecture,
        })
    }

    /// Removes a tensor from the index (for key conversions).
    pub fn take(&mut self, name: &str) -> Option<StoredTensor> {
        self.tensors.remove(name)
    }

    /// Adds or replaces a tensor of the index (for key conversions).
    pub fn insert(&mut self, name: impl Into<String>, t: StoredTensor) {
        self.tensors.insert(name.into(), t);
    }

    /// Every tensor of the index, for a conversion that rebuilds it.
    pub fn take_all(&mut self) -> HashMap<String, StoredTensor> {
        std::mem::take(&mut self.tensors)
    }

    /// The tensor's bytes as stored, whatever the encoding (ComfyUI's scale scalars).
    pub fn read_raw(&self, t: &StoredTensor) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; t.nbytes() as usize];
        self.read_into("(raw)", t, &mut buf)?;
        Ok(buf)
    }

    /// The first file's path.
    pub fn path(&self) -> &Path {
        &self.files[0].0
    }

    /// Opens a component folder's checkpoint (see [`checkpoint_files`]).
    pub fn open_component(dir: &Path, stem: &str, variant: Option<&str>) -> Result<Self> {
        Self::open(&checkpoint_files(dir, stem, variant)?)
    }

    pub fn get(&self, name: &str) -> Option<&StoredTensor> {
        self.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn path_of(&self, t: &StoredTensor) -> &Path {
        &self.files[t.file].0
    }

    /// Where the store's tensors come from, for messages.
    pub fn describe(&self) -> String {
        match self.files.as_slice() {
            [(p, _, _)] => p.display().to_string(),
            fs => format!(
                "{} shards in {}",
                fs.len(),
                fs[0].0.parent().unwrap_or(Path::new(".")).display()
            ),
        }
    }

    /// Checks that `name` exists with `shape` and a floating-point dtype, without reading data.
    pub fn check(&self, name: &str, shape: &[usize]) -> Result<&StoredTensor> {
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            tensor: name.to_string(),
            location: self.describe(),
        })?;
        if t.shape != shape {
            return Err(Error::ShapeMismatch {
                tensor: name.to_string(),
                path: self.path_of(t).to_path_buf(),
                expected: shape.to_vec(),
                found: t.shape.clone(),
            });
        }
        if !t.is_packed() && !t.dtype.is_float() {
            return Err(Error::DtypeMismatch {
                tensor: name.to_string(),
                path: self.path_of(t).to_path_buf(),
                found: format!("{:?}", t.dtype),
            });
        }
        Ok(t)
    }

    /// Reads a tensor's bytes (all its segments) into `buf`, which has exactly that length.
    fn read_into(&self, name: &str, t: &StoredTensor, buf: &mut [u8]) -> Result<()> {
        let (path, file, _) = &self.files[t.file];
        let mut at = 0usize;
        for &(a, b) in &t.segments {
            let n = (b - a) as usize;
            file.read_exact_at(&mut buf[at..at + n], a).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    Error::CorruptSafetensors {
                        path: path.clone(),
                        reason: format!(
                            "tensor `{name}` ends past the end of the file (truncated after it was opened?)"
                        ),
                    }
                } else {
                    Error::io(path, e)
                }
            })?;
            at += n;
        }
        Ok(())
    }

    /// Reads a packed tensor (ggml blocks, scaled fp8) in its stored form, on the CPU: a 1-D U8
    /// tensor of its blocks, or its fp8 elements in its shape.
    pub fn load_packed(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.check(name, shape)?;
        let n = t.nbytes() as usize;
        let read = |buf: &mut [u8]| self.read_into(name, t, buf);
        Ok(match t.encoding {
            // Blocks are used as stored: mapped from the file like an f32 tensor, no copy.
            Encoding::Ggml(_) => {
                Tensor::from_vec(self.mapped_or_read::<u8>(t, n, &read)?, n, &Device::Cpu)?
            }
            // f8e4m3 elements, straight into the tensor's buffer (mapped when large).
            _ => Tensor::from_vec(
                self.mapped_or_read::<float8::F8E4M3>(t, n, &read)?,
                t.shape.as_slice(),
                &Device::Cpu,
            )?,
        })
    }

    /// Reads one tensor from disk and converts it to `dtype` on `device` (packed tensors are
    /// dequantized).
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let t = self.check(name, shape)?;
        let n: usize = t.shape.iter().product();
        let tensor = match t.encoding {
            Encoding::Ggml(g) => {
                let raw = self.load_packed(name, shape)?;
                dequantize_packed(&raw, g, &t.shape)?
            }
            Encoding::ScaledFp8 { scale } => {
                let raw = self.load_packed(name, shape)?;
                widen_scaled_fp8(&raw, scale, DType::F32)?
            }
            Encoding::Plain => {
                let read = |buf: &mut [u8]| self.read_into(name, t, buf);
                // Large tensors are backed by the file's pages (no copy); the rest are read
                // straight into the tensor's own buffer (zeroed allocations of this size come
                // from fresh pages).
                match t.dtype {
                    DType::F32 => Tensor::from_vec(
                        self.mapped_or_read::<f32>(t, n, &read)?,
                        t.shape.as_slice(),
                        &Device::Cpu,
                    )?,
                    DType::F16 => Tensor::from_vec(
                        self.mapped_or_read::<half::f16>(t, n, &read)?,
                        t.shape.as_slice(),
                        &Device::Cpu,
                    )?,
                    DType::BF16 => Tensor::from_vec(
                        self.mapped_or_read::<half::bf16>(t, n, &read)?,
                        t.shape.as_slice(),
                        &Device::Cpu,
                    )?,
                    _ => {
                        let mut buf = vec![0u8; t.nbytes() as usize];
                        read(&mut buf)?;
                        Tensor::from_raw_buffer(&buf, t.dtype, &t.shape, &Device::Cpu)?
                    }
                }
            }
        };
        let tensor = if tensor.dtype() == dtype {
            tensor
        } else {
            tensor.to_dtype(dtype)?
        };
        Ok(tensor.to_device(device)?)
    }

    /// The tensor's elements, mapped from the file when [`mapped::map_vec`] can, else read.
    fn mapped_or_read<T: Copy + Default>(
        &self,
        t: &StoredTensor,
        n: usize,
        read: &dyn Fn(&mut [u8]) -> Result<()>,
    ) -> Result<Vec<T>> {
        let (path, file, _) = &self.files[t.file];
        // A page past the end of the file would fault: map only while the file still holds the
        // whole tensor (populating the pages then checks it again).
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if let [(start, end)] = t.segments[..] {
            if mapping_enabled() && len >= end {
                match mapped::map_vec::<T>(file, start, n) {
                    Ok(v) => return Ok(v),
                    Err(mapped::MapError::Truncated) => {
                        return Err(Error::CorruptSafetensors {
                            path: path.clone(),
                            reason: "a tensor ends past the end of the file (truncated after it \
                                     was opened?)"
                                .into(),
                        })
                    }
                    Err(mapped::MapError::Unsuitable) => {}
                }
            }
        }
        read_typed::<T>(n, read)
    }

    /// Re-checks that no file shrank since it was opened (a replaced or truncated checkpoint).
    pub fn verify_unchanged(&self) -> Result<()> {
        for (path, file, len) in &self.files {
            let now = file.metadata().map_err(|e| Error::io(path, e))?.len();
            if now != *len {
                return Err(Error::CorruptSafetensors {
                    path: path.clone(),
                    reason: format!(
                        "its size changed from {len} to {now} bytes after it was opened"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// The element count of `shape`, if it fits a `usize`.
fn checked_elems(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// A packed tensor's values: ggml blocks (a 1-D U8 tensor, on any device) dequantized on the CPU
/// into `shape`, in f32, on the blocks' device.
pub fn dequantize_packed(raw: &Tensor, t: GgmlDType, shape: &[usize]) -> Result<Tensor> {
    let device = raw.device().clone();
    let host = if device.is_cpu() {
        raw.clone()
    } else {
        raw.to_device(&Device::Cpu)?
    };
    let n: usize = shape.iter().product();
    let mut out = vec![0f32; n];
    {
        let (storage, layout) = host.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Err(Error::InvalidArgument(
                "ggml blocks are not on the CPU".into(),
            ));
        };
        let bytes = cpu.as_slice::<u8>()?;
        let start = layout.start_offset();
        let len = host.elem_count();
        ggml::dequantize(t, &bytes[start..start + len], &mut out)?;
    }
    let v = Tensor::from_vec(out, shape, &Device::Cpu)?;
    Ok(if device.is_cpu() {
        v
    } else {
        v.to_device(&device)?
    })
}

/// Scaled fp8 values in `compute`, as ComfyUI's `scaled_fp8` layers compute them: the weight cast
/// to the compute dtype, times the scale cast to it.
pub fn widen_scaled_fp8(raw: &Tensor, scale: f32, compute: DType) -> Result<Tensor> {
    let w = raw.to_dtype(compute)?;
    let s = Tensor::new(&[scale], raw.device())?.to_dtype(compute)?;
    Ok(w.broadcast_mul(&s)?)
}
