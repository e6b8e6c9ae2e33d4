//! `lowtide quantize`: a component's weights written as a GGUF file, tensor by tensor (one
//! tensor in memory at a time). The rules are those of the usual converters (city96's
//! ComfyUI-GGUF `convert.py` with llama.cpp's quantizer): 1-D tensors (norms, biases) and small tensors
//! stay F32; tensors whose rows are not whole blocks of the type, and convolution kernels, are
//! written F16; the rest in the requested type. Names are diffusers' (lowtide reads them back
//! as they are); `general.architecture` is the name ComfyUI-GGUF uses for the model.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};

use super::ggml::{self, GgmlDType};
use super::WeightStore;
use crate::error::Result;
use crate::io::TempOutput;

/// Below this many values a tensor stays F32, as ComfyUI-GGUF's `QUANTIZATION_THRESHOLD`.
pub const SMALL: usize = 1024;

/// GGUF's data alignment (`general.alignment` default).
const ALIGN: usize = 32;

/// The type a tensor is written in when `target` is asked for.
pub fn type_for(shape: &[usize], target: GgmlDType) -> GgmlDType {
    let n: usize = shape.iter().product();
    let last = shape.last().copied().unwrap_or(1);
    // Norm scales are 1-D; AdaLN modulation linears (`norm1.linear`) are big matrices and
    // quantized like any other, as the converters do.
    if shape.len() <= 1 || n < SMALL {
        return GgmlDType::F32;
    }
    if !ggml::is_quantized(target) {
        return target;
    }
    if shape.len() > 2 || last % target.block_size() != 0 {
        return GgmlDType::F16;
    }
    target
}

/// ComfyUI-GGUF's architecture name for a diffusers class.
pub fn architecture(class: &str) -> &'static str {
    match class {
        "FluxTransformer2DModel" => "flux",
        "WanTransformer3DModel" => "wan",
        "UNet2DConditionModel" => "sd1",
        "QwenImageTransformer2DModel" => "qwen_image",
        _ => "lowtide",
    }
}

/// What was written.
#[derive(Debug, Default)]
pub struct Summary {
    /// Per type name: tensors and bytes.
    pub per_type: BTreeMap<&'static str, (usize, u64)>,
    pub tensors: usize,
    pub bytes: u64,
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
}

/// GGUF metadata value types used here.
const T_U32: u32 = 4;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_I32: u32 = 5;

/// Writes every tensor of `store` to `out` as GGUF v3 in `target` (see [`type_for`]). The file
/// appears only when complete.
pub fn write_gguf(
    store: &WeightStore,
    target: GgmlDType,
    arch: &str,
    out: &Path,
    mut progress: impl FnMut(usize, usize),
) -> Result<Summary> {
    let mut names: Vec<&String> = store.names().collect();
    names.sort();
    struct Entry<'a> {
        name: &'a str,
        shape: Vec<usize>,
        ggml_shape: Vec<usize>,
        t: GgmlDType,
        offset: u64,
    }
    let mut entries = Vec::with_capacity(names.len());
    let mut offset = 0u64;
    let mut orig_shapes = Vec::new();
    for name in names {
        let shape = store.get(name).map(|t| t.shape.clone()).unwrap_or_default();
        let t = type_for(&shape, target);
        // ggml holds at most 4 dimensions: a 5-D kernel is written as rows of its last
        // dimension, its shape recorded as ComfyUI-GGUF does.
        let ggml_shape = if shape.len() > 4 {
            orig_shapes.push((name.as_str(), shape.clone()));
            let last = *shape.last().unwrap_or(&1);
            vec![shape.iter().product::<usize>() / last, last]
        } else {
            shape.clone()
        };
        let bytes = ggml::bytes_for(t, shape.iter().product()) as u64;
        entries.push(Entry {
            name,
            shape,
            ggml_shape,
            t,
            offset,
        });
        offset += bytes.next_multiple_of(ALIGN as u64);
    }
    let mut h = Vec::new();
    h.extend_from_slice(b"GGUF");
    h.extend_from_slice(&3u32.to_le_bytes());
    h.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    h.extend_from_slice(&(3 + orig_shapes.len() as u64).to_le_bytes());
    put_str(&mut h, "general.architecture");
    h.extend_from_slice(&T_STRING.to_le_bytes());
    put_str(&mut h, arch);
    put_str(&mut h, "general.quantization_version");
    h.extend_from_slice(&T_U32.to_le_bytes());
    h.extend_from_slice(&2u32.to_le_bytes());
    put_str(&mut h, "general.file_type_name");
    h.extend_from_slice(&T_STRING.to_le_bytes());
    put_str(&mut h, &ggml::name(target).to_ascii_uppercase());
    for (name, shape) in &orig_shapes {
        put_str(&mut h, &format!("comfy.gguf.orig_shape.{name}"));
        h.extend_from_slice(&T_ARRAY.to_le_bytes());
        h.extend_from_slice(&T_I32.to_le_bytes());
        h.extend_from_slice(&(shape.len() as u64).to_le_bytes());
        for &d in shape {
            h.extend_from_slice(&(d as i32).to_le_bytes());
        }
    }
    for e in &entries {
        put_str(&mut h, e.name);
        h.extend_from_slice(&(e.ggml_shape.len() as u32).to_le_bytes());
        for &d in e.ggml_shape.iter().rev() {
            h.extend_from_slice(&(d as u64).to_le_bytes());
        }
        h.extend_from_slice(&ggml_type_id(e.t).to_le_bytes());
        h.extend_from_slice(&e.offset.to_le_bytes());
    }
    h.resize(h.len().next_multiple_of(ALIGN), 0);
    let mut file = TempOutput::create(out)?;
    file.write(&h)?;
    let mut summary = Summary::default();
    let total = entries.len();
    for (i, e) in entries.iter().enumerate() {
        let v = store
            .load(e.name, &e.shape, DType::F32, &Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut bytes = ggml::quantize(e.t, &v)?;
        let n = bytes.len() as u64;
        bytes.resize(bytes.len().next_multiple_of(ALIGN), 0);
        file.write(&bytes)?;
        let s = summary.per_type.entry(ggml::name(e.t)).or_default();
        s.0 += 1;
        s.1 += n;
        summary.tensors += 1;
        summary.bytes += n;
        progress(i + 1, total);
    }
    file.persist()?;
    Ok(summary)
}

/// ggml's type ids (`enum ggml_type`).
fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converters_rules() {
        let q = GgmlDType::Q4K;
        assert_eq!(type_for(&[3072], q), GgmlDType::F32);
        assert_eq!(type_for(&[64], q), GgmlDType::F32);
        assert_eq!(type_for(&[18432, 3072], q), q);
        assert_eq!(type_for(&[16, 32], q), GgmlDType::F32);
        assert_eq!(type_for(&[3072, 3072], q), q);
        assert_eq!(type_for(&[3072, 48], q), GgmlDType::F16);
        assert_eq!(type_for(&[64, 64, 3, 3], q), GgmlDType::F16);
        assert_eq!(type_for(&[64, 64], GgmlDType::F16), GgmlDType::F16);
    }
}
