//! ggml's block formats (the weights of GGUF files), through candle's ports of ggml's reference
//! kernels (`candle_core::quantized::k_quants`): candle already reads GGUF headers and carries
//! every block type with `to_float`/`from_float`, so lowtide only adds the byte-level glue. A
//! quantized weight is kept as its raw blocks (a `U8` tensor) and dequantized here when a layer
//! uses it; rows are independent runs of blocks, so a row range of a fused tensor (FLUX's
//! `qkv`) is a byte range of the file.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType,
};
pub use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

use crate::error::{Error, Result};

/// The types `lowtide quantize --type` writes and GGUF files may hold, by their usual names.
pub const NAMES: [(&str, GgmlDType); 13] = [
    ("f32", GgmlDType::F32),
    ("f16", GgmlDType::F16),
    ("bf16", GgmlDType::BF16),
    ("q8_0", GgmlDType::Q8_0),
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q2_k", GgmlDType::Q2K),
    ("q3_k", GgmlDType::Q3K),
    ("q4_k", GgmlDType::Q4K),
    ("q5_k", GgmlDType::Q5K),
    ("q6_k", GgmlDType::Q6K),
];

/// The usual name of a type (`q4_k`).
pub fn name(t: GgmlDType) -> &'static str {
    NAMES.iter().find(|(_, d)| *d == t).map_or(
        match t {
            GgmlDType::Q8_1 => "q8_1",
            _ => "q8_k",
        },
        |(n, _)| n,
    )
}

pub fn parse(s: &str) -> Result<GgmlDType> {
    let lower = s.to_ascii_lowercase();
    NAMES
        .iter()
        .find(|(n, _)| *n == lower)
        .map(|(_, d)| *d)
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unknown ggml type `{s}`; choose one of {}",
                NAMES.map(|(n, _)| n).join(", ")
            ))
        })
}

/// Whether the type is a block quantization (not a plain float type).
pub fn is_quantized(t: GgmlDType) -> bool {
    !matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// Bytes of `n` elements in type `t` (`n` a multiple of the block size).
pub fn bytes_for(t: GgmlDType, n: usize) -> usize {
    n / t.block_size() * t.type_size()
}

/// Blocks per chunk of parallel work: large enough to amortise the task, small enough to spread
/// a 3072-wide row set over the cores.
const CHUNK_BLOCKS: usize = 1024;

fn dequant_blocks<T: GgmlType>(bytes: &[u8], out: &mut [f32]) {
    let size = std::mem::size_of::<T>();
    let bs = T::BLCK_SIZE;
    let run = |src: &[u8], dst: &mut [f32]| {
        let n = src.len() / size;
        if (src.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
            // SAFETY: `T` is one of ggml's `#[repr(C)]` block structs of plain integer and f16
            // fields, for which every bit pattern is valid; the pointer is aligned (checked) and
            // the slice covers `n * size` bytes of `src`.
            let blocks = unsafe { std::slice::from_raw_parts(src.as_ptr() as *const T, n) };
            T::to_float(blocks, dst);
        } else {
            let mut blocks = vec![T::zeros(); n];
            // SAFETY: as above; the destination is a fresh, aligned vector of `n` blocks.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src.as_ptr(),
                    blocks.as_mut_ptr() as *mut u8,
                    n * size,
                )
            };
            T::to_float(&blocks, dst);
        }
    };
    bytes
        .par_chunks(CHUNK_BLOCKS * size)
        .zip(out.par_chunks_mut(CHUNK_BLOCKS * bs))
        .for_each(|(s, d)| run(s, d));
}

/// Dequantizes `bytes` (whole blocks of type `t`) into `out`, as ggml's `dequantize_row_*` does.
pub fn dequantize(t: GgmlDType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let expected = bytes_for(t, out.len());
    if !out.len().is_multiple_of(t.block_size()) || bytes.len() != expected {
        return Err(Error::InvalidArgument(format!(
            "{} bytes of {} cannot hold {} values (expected {expected} bytes)",
            bytes.len(),
            name(t),
            out.len()
        )));
    }
    match t {
        GgmlDType::F32 => dequant_blocks::<f32>(bytes, out),
        GgmlDType::F16 => dequant_blocks::<half::f16>(bytes, out),
        GgmlDType::BF16 => dequant_blocks::<half::bf16>(bytes, out),
        GgmlDType::Q4_0 => dequant_blocks::<BlockQ4_0>(bytes, out),
        GgmlDType::Q4_1 => dequant_blocks::<BlockQ4_1>(bytes, out),
        GgmlDType::Q5_0 => dequant_blocks::<BlockQ5_0>(bytes, out),
        GgmlDType::Q5_1 => dequant_blocks::<BlockQ5_1>(bytes, out),
        GgmlDType::Q8_0 => dequant_blocks::<BlockQ8_0>(bytes, out),
        GgmlDType::Q8_1 => dequant_blocks::<BlockQ8_1>(bytes, out),
        GgmlDType::Q2K => dequant_blocks::<BlockQ2K>(bytes, out),
        GgmlDType::Q3K => dequant_blocks::<BlockQ3K>(bytes, out),
        GgmlDType::Q4K => dequant_blocks::<BlockQ4K>(bytes, out),
        GgmlDType::Q5K => dequant_blocks::<BlockQ5K>(bytes, out),
        GgmlDType::Q6K => dequant_blocks::<BlockQ6K>(bytes, out),
        GgmlDType::Q8K => dequant_blocks::<BlockQ8K>(bytes, out),
    }
    Ok(())
}

fn quant_blocks<T: GgmlType>(src: &[f32]) -> Vec<u8> {
    let bs = T::BLCK_SIZE;
    let mut blocks = vec![T::zeros(); src.len() / bs];
    blocks
        .par_chunks_mut(CHUNK_BLOCKS)
        .zip(src.par_chunks(CHUNK_BLOCKS * bs))
        .for_each(|(b, s)| T::from_float(s, b));
    let size = std::mem::size_of::<T>();
    // SAFETY: the blocks are plain `#[repr(C)]` data; the byte view covers exactly the vector.
    let bytes =
        unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const u8, blocks.len() * size) };
    bytes.to_vec()
}

/// Quantizes `src` (a multiple of the block size) into blocks of type `t`, with ggml's
/// reference `quantize_row_*` rules as candle ports them.
pub fn quantize(t: GgmlDType, src: &[f32]) -> Result<Vec<u8>> {
    if !src.len().is_multiple_of(t.block_size()) {
        return Err(Error::InvalidArgument(format!(
            "{} values are not whole {} blocks of {}",
            src.len(),
            name(t),
            t.block_size()
        )));
    }
    Ok(match t {
        GgmlDType::F32 => quant_blocks::<f32>(src),
        GgmlDType::F16 => quant_blocks::<half::f16>(src),
        GgmlDType::BF16 => quant_blocks::<half::bf16>(src),
        GgmlDType::Q4_0 => quant_blocks::<BlockQ4_0>(src),
        GgmlDType::Q4_1 => quant_blocks::<BlockQ4_1>(src),
        GgmlDType::Q5_0 => quant_blocks::<BlockQ5_0>(src),
        GgmlDType::Q5_1 => quant_blocks::<BlockQ5_1>(src),
        GgmlDType::Q8_0 => quant_blocks::<BlockQ8_0>(src),
        GgmlDType::Q8_1 => quant_blocks::<BlockQ8_1>(src),
        GgmlDType::Q2K => quant_blocks::<BlockQ2K>(src),
        GgmlDType::Q3K => quant_blocks::<BlockQ3K>(src),
        GgmlDType::Q4K => quant_blocks::<BlockQ4K>(src),
        GgmlDType::Q5K => quant_blocks::<BlockQ5K>(src),
        GgmlDType::Q6K => quant_blocks::<BlockQ6K>(src),
        GgmlDType::Q8K => quant_blocks::<BlockQ8K>(src),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_then_dequantize_is_close_for_every_type() {
        let src: Vec<f32> = (0..4096)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        for (n, t) in NAMES {
            let q = quantize(t, &src).unwrap();
            assert_eq!(q.len(), bytes_for(t, src.len()), "{n}");
            let mut back = vec![0f32; src.len()];
            dequantize(t, &q, &mut back).unwrap();
            let err = src
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // Q2_K is coarse: 2 bits over a range of 4.
            assert!(err < 0.75, "{n}: max error {err}");
        }
    }

    /// An odd byte offset (a block view into a packed file) dequantizes the same as an aligned
    /// copy.
    #[test]
    fn misaligned_blocks_are_copied_first() {
        let src: Vec<f32> = (0..512).map(|i| (i as f32).sin()).collect();
        let q = quantize(GgmlDType::Q4K, &src).unwrap();
        let mut shifted = vec![0u8; q.len() + 1];
        shifted[1..].copy_from_slice(&q);
        let (mut a, mut b) = (vec![0f32; 512], vec![0f32; 512]);
        dequantize(GgmlDType::Q4K, &q, &mut a).unwrap();
        dequantize(GgmlDType::Q4K, &shifted[1..], &mut b).unwrap();
        assert_eq!(a, b);
        assert!(dequantize(GgmlDType::Q4K, &q[1..], &mut b).is_err());
    }
}
