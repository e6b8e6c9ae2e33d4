//! The GGUF header: metadata and tensor infos (the data is read per tensor by the store).
//! candle's reader caps tensors at 4 dimensions, as ggml does, but GGUF files of video models
//! (city96's Wan and HunyuanVideo conversions) hold their 5-D patch embeddings as 5-D tensors
//! that gguf-py, ComfyUI-GGUF and diffusers read; so the header is parsed here. Every length is
//! checked against the file before anything is allocated.

use std::collections::HashMap;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

use super::ggml::GgmlDType;
use crate::error::{Error, Result};

/// One tensor's entry: its shape in PyTorch's order, type, and offset from the data start.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
    pub offset: u64,
}

/// Metadata values lowtide reads; others are skipped.
#[derive(Debug, Clone, PartialEq)]
pub enum Meta {
    Int(i64),
    Str(String),
    Ints(Vec<i64>),
    Other,
}

#[derive(Debug)]
pub struct Header {
    pub metadata: HashMap<String, Meta>,
    pub tensors: Vec<(String, TensorInfo)>,
    /// Absolute offset of the tensor data.
    pub data_start: u64,
}

/// ggml's type ids (`enum ggml_type`), for the types lowtide reads.
pub fn from_type_id(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

fn bad(m: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, m)
}

struct R<'a> {
    r: BufReader<&'a std::fs::File>,
    len: u64,
    v1: bool,
}

impl R<'_> {
    fn bytes<const N: usize>(&mut self) -> std::io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b)?;
        Ok(b)
    }
    fn u32(&mut self) -> std::io::Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> std::io::Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn len_(&mut self) -> std::io::Result<u64> {
        let n = if self.v1 {
            self.u32()? as u64
        } else {
            self.u64()?
        };
        let pos = self.r.stream_position()?;
        if n > self.len.saturating_sub(pos) {
            return Err(bad(format!(
                "a length of {n} at byte {pos} runs past the end of the file"
            )));
        }
        Ok(n)
    }
    fn string(&mut self) -> std::io::Result<String> {
        let n = self.len_()? as usize;
        let mut b = vec![0u8; n];
        self.r.read_exact(&mut b)?;
        String::from_utf8(b).map_err(|_| bad("a string is not UTF-8".into()))
    }
    /// A value of type `t`; integers kept, strings kept, the rest skipped.
    fn value(&mut self, t: u32, depth: usize) -> std::io::Result<Meta> {
        Ok(match t {
            0 => Meta::Int(self.bytes::<1>()?[0] as i64),
            1 => Meta::Int(self.bytes::<1>()?[0] as i8 as i64),
            2 => Meta::Int(u16::from_le_bytes(self.bytes()?) as i64),
            3 => Meta::Int(i16::from_le_bytes(self.bytes()?) as i64),
            4 => Meta::Int(self.u32()? as i64),
            5 => Meta::Int(self.u32()? as i32 as i64),
            6 => {
                self.bytes::<4>()?;
                Meta::Other
            }
            7 => {
                self.bytes::<1>()?;
                Meta::Other
            }
            8 => Meta::Str(self.string()?),
            9 if depth < 4 => {
                let et = self.u32()?;
                let n = self.len_()?;
                let mut ints = Vec::new();
                let mut all_int = true;
                for _ in 0..n {
                    match self.value(et, depth + 1)? {
                        Meta::Int(i) if all_int => ints.push(i),
                        _ => all_int = false,
                    }
                }
                if all_int {
                    Meta::Ints(ints)
                } else {
                    Meta::Other
                }
            }
            10 => Meta::Int(self.u64()? as i64),
            11 => Meta::Int(self.u64()? as i64),
            12 => {
                self.bytes::<8>()?;
                Meta::Other
            }
            other => return Err(bad(format!("unknown metadata value type {other}"))),
        })
    }
}

/// Reads the header of the GGUF file at `path`.
pub fn read_header(path: &Path, file: &std::fs::File) -> Result<Header> {
    let corrupt = |reason: String| Error::CorruptGguf {
        path: path.to_path_buf(),
        reason,
    };
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut r = R {
        r: BufReader::new(file),
        len,
        v1: false,
    };
    let parse = |r: &mut R| -> std::io::Result<Header> {
        if &r.bytes::<4>()? != b"GGUF" {
            return Err(bad("no GGUF magic".into()));
        }
        let version = r.u32()?;
        if !(1..=3).contains(&version) {
            return Err(bad(format!("GGUF version {version}")));
        }
        r.v1 = version == 1;
        let n_tensors = r.len_()?;
        let n_kv = r.len_()?;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let k = r.string()?;
            let t = r.u32()?;
            let v = r.value(t, 0)?;
            metadata.insert(k, v);
        }
        let mut tensors = Vec::new();
        for _ in 0..n_tensors {
            let name = r.string()?;
            let nd = r.u32()?;
            if nd > 8 {
                return Err(bad(format!("`{name}` has {nd} dimensions")));
            }
            let mut shape = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                shape.push(if r.v1 { r.u32()? as u64 } else { r.u64()? } as usize);
            }
            shape.reverse();
            let id = r.u32()?;
            let dtype = from_type_id(id).ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` has ggml type {id}, which lowtide does not read (it reads \
                     F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and Q2_K..Q6_K)"
                ))
            })?;
            let offset = r.u64()?;
            tensors.push((
                name,
                TensorInfo {
                    shape,
                    dtype,
                    offset,
                },
            ));
        }
        let align = match metadata.get("general.alignment") {
            Some(Meta::Int(a)) if *a > 0 => *a as u64,
            _ => 32,
        };
        let pos = r.r.stream_position()?;
        Ok(Header {
            metadata,
            tensors,
            data_start: pos.next_multiple_of(align),
        })
    };
    parse(&mut r).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            corrupt("the header ends early: truncated (re-download it)".into())
        } else {
            corrupt(e.to_string())
        }
    })
}
