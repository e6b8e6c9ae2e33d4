//! Files in and out: PNG images and safetensors tensor files given on the command line.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::ImageEncoder;

use crate::error::{Error, Result};
use crate::weights::WeightStore;

/// Reads a safetensors file holding exactly one tensor (any name), as f32.
pub fn read_single_tensor(path: &Path, device: &Device) -> Result<Tensor> {
    let store = WeightStore::open(&[path.to_path_buf()])?;
    let names: Vec<&String> = store.names().collect();
    let name = match names.as_slice() {
        [n] => (*n).clone(),
        _ => {
            return Err(Error::InvalidArgument(format!(
                "{} must hold exactly one tensor; it holds {}",
                path.display(),
                names.len()
            )))
        }
    };
    let shape = store
        .get(&name)
        .map(|t| t.shape.clone())
        .unwrap_or_default();
    store.load(&name, &shape, DType::F32, device)
}

/// A temporary file beside an output path, removed on drop unless [`TempOutput::persist`]
/// renamed it into place: how every output is written, so an existing file survives any failure
/// (a full disk, a bad path) and no partial file is left. Permissions follow the user's umask, as
/// for any new file.
pub struct TempOutput {
    path: PathBuf,
    tmp: PathBuf,
    file: std::fs::File,
    persisted: bool,
}

impl TempOutput {
    pub fn create(path: &Path) -> Result<Self> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = path
            .file_name()
            .ok_or_else(|| write_error(path, "not a file name".into()))?
            .to_string_lossy();
        let tmp = dir.join(format!(".{name}.lowtide-{}.tmp", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| write_error(path, e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            file,
            persisted: false,
        })
    }

    fn fail(&self, e: std::io::Error) -> Error {
        write_error(&self.path, e.to_string())
    }

    /// Appends `bytes`.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.write_all(bytes).map_err(|e| self.fail(e))
    }

    /// Syncs the data and renames the file into place.
    pub fn persist(mut self) -> Result<()> {
        self.file.sync_all().map_err(|e| self.fail(e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| self.fail(e))?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempOutput {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn write_error(path: &Path, reason: String) -> Error {
    Error::Write {
        path: path.to_path_buf(),
        reason,
    }
}

/// The one output writer: `bytes` go to a temporary file beside `path`, are synced, and the file
/// is renamed into place (see [`TempOutput`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut out = TempOutput::create(path)?;
    out.file.write_all(bytes).map_err(|e| out.fail(e))?;
    out.persist()
}

/// The safetensors header for f32 tensors of `shapes`, stored one after the other in that order:
/// the 8-byte little-endian length, then the JSON padded with spaces to a multiple of 8 bytes so
/// the data that follows is aligned for memory-mapped readers.
fn f32_safetensors_header(shapes: &[(&str, &[usize])]) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in shapes {
        let end = offset + shape.iter().product::<usize>() * 4;
        map.insert(
            name.to_string(),
            serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut json = serde_json::Value::Object(map).to_string().into_bytes();
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut header = (json.len() as u64).to_le_bytes().to_vec();
    header.extend(json);
    header
}

/// An f32 tensor as host values (converted and copied only where it is not one already).
fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: any f32 is 4 initialised bytes, and u8 has no alignment requirement.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Writes named tensors as f32 safetensors, streamed tensor by tensor into the file: no
/// serialised copy of the whole file is built in memory.
pub fn save_tensors(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let shapes: Vec<(&str, &[usize])> = tensors.iter().map(|(n, t)| (*n, t.dims())).collect();
    let out = TempOutput::create(path)?;
    let mut w = std::io::BufWriter::new(&out.file);
    let written = (|| -> Result<()> {
        w.write_all(&f32_safetensors_header(&shapes))
            .map_err(|e| out.fail(e))?;
        for (_, t) in tensors {
            w.write_all(f32_bytes(&host_f32(t)?))
                .map_err(|e| out.fail(e))?;
        }
        w.flush().map_err(|e| out.fail(e))
    })();
    drop(w);
    written?;
    out.persist()
}

/// Calls `run(flat_offset_in_full, flat_offset_in_piece, len)` for each contiguous run of a
/// `piece` placed at `origin` inside a row-major array of `full` shape. Trailing dims the piece
/// covers whole are merged into one run.
fn for_each_run(
    full: &[usize],
    origin: &[usize],
    piece: &[usize],
    run: &mut dyn FnMut(usize, usize, usize) -> Result<()>,
) -> Result<()> {
    let r = full.len();
    if origin.len() != r || piece.len() != r || (0..r).any(|d| origin[d] + piece[d] > full[d]) {
        return Err(Error::InvalidArgument(format!(
            "a piece {piece:?} at {origin:?} does not fit in {full:?}"
        )));
    }
    if piece.contains(&0) {
        return Ok(());
    }
    // The run covers dims `k..`: the last dim, and before it every dim the piece covers whole.
    let mut k = r - 1;
    while k > 0 && piece[k] == full[k] {
        k -= 1;
    }
    let strides: Vec<usize> = (0..r).map(|d| full[d + 1..].iter().product()).collect();
    let len: usize = piece[k..].iter().product();
    let outer: Vec<usize> = piece[..k].to_vec();
    let n_runs: usize = outer.iter().product();
    let mut idx = vec![0usize; k];
    for i in 0..n_runs {
        let at: usize = (0..r)
            .map(|d| (origin[d] + if d < k { idx[d] } else { 0 }) * strides[d])
            .sum();
        run(at, i * len, len)?;
        // Next index in the piece's outer dims, last fastest.
        for d in (0..k).rev() {
            idx[d] += 1;
            if idx[d] < outer[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(())
}

/// A safetensors file of one f32 tensor written piece by piece, so that a video decoded tile by
/// tile never has to exist whole in memory: the header and the file's full size are set first,
/// pieces land at their offsets (the page cache holds them, not the process), and
/// [`TensorFileWriter::finish`] syncs and renames the file into place. Dropped unfinished (a
/// failed run), it leaves nothing behind. Every element must be written before `finish`; the
/// file reads as zeros where one was not.
pub struct TensorFileWriter {
    out: TempOutput,
    shape: Vec<usize>,
    data_start: u64,
}

impl TensorFileWriter {
    pub fn create(path: &Path, name: &str, shape: &[usize]) -> Result<Self> {
        let out = TempOutput::create(path)?;
        let header = f32_safetensors_header(&[(name, shape)]);
        let size = header.len() as u64 + shape.iter().product::<usize>() as u64 * 4;
        (|| {
            out.file.set_len(size)?;
            std::os::unix::fs::FileExt::write_all_at(&out.file, &header, 0)
        })()
        .map_err(|e| out.fail(e))?;
        Ok(Self {
            data_start: header.len() as u64,
            shape: shape.to_vec(),
            out,
        })
    }

    /// Writes `piece` (same rank as the tensor) with its first element at `origin`.
    pub fn write_region(&mut self, origin: &[usize], piece: &Tensor) -> Result<()> {
        let v = host_f32(piece)?;
        let (file, start) = (&self.out.file, self.data_start);
        let out = &self.out;
        for_each_run(&self.shape, origin, piece.dims(), &mut |at, from, len| {
            std::os::unix::fs::FileExt::write_all_at(
                file,
                f32_bytes(&v[from..from + len]),
                start + at as u64 * 4,
            )
            .map_err(|e| out.fail(e))
        })
    }

    pub fn finish(self) -> Result<()> {
        self.out.persist()
    }
}

/// An f32 array in host memory that pieces are written into, as [`TensorFileWriter`] does into
/// a file.
pub struct HostCanvas {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl HostCanvas {
    pub fn zeros(shape: &[usize]) -> Self {
        Self {
            shape: shape.to_vec(),
            data: vec![0f32; shape.iter().product()],
        }
    }

    /// Writes `piece` (same rank) with its first element at `origin`.
    pub fn write_region(&mut self, origin: &[usize], piece: &Tensor) -> Result<()> {
        let v = host_f32(piece)?;
        let data = &mut self.data;
        for_each_run(&self.shape, origin, piece.dims(), &mut |at, from, len| {
            data[at..at + len].copy_from_slice(&v[from..from + len]);
            Ok(())
        })
    }

    pub fn into_tensor(self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(self.data, self.shape, device)?)
    }
}

/// Loads a PNG (or any format the `image` crate reads) as (1, 3, H, W) in [-1, 1], dropping alpha
/// as PIL's `convert("RGB")` does.
pub fn read_image(path: &Path, device: &Device) -> Result<Tensor> {
    let img = image::open(path).map_err(|e| Error::Image {
        path: path.to_path_buf(),
        reason: format!("cannot read image: {e}"),
    })?;
    let rgb = img.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let data: Vec<f32> = rgb
        .into_raw()
        .into_iter()
        .map(|v| v as f32 / 255.0 * 2.0 - 1.0)
        .collect();
    Ok(Tensor::from_vec(data, (h, w, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()?)
}

/// Reads an image argument: a PNG, or a safetensors file with one (B, 3, H, W) tensor in [-1, 1].
pub fn read_image_arg(path: &Path, device: &Device) -> Result<Tensor> {
    if path.extension().is_some_and(|e| e == "safetensors") {
        let t = read_single_tensor(path, device)?;
        if t.rank() != 4 || t.dim(1)? != 3 {
            return Err(Error::InvalidArgument(format!(
                "{} must hold one (B, 3, H, W) image tensor; it has shape {:?}",
                path.display(),
                t.dims()
            )));
        }
        Ok(t)
    } else {
        read_image(path, device)
    }
}

/// Reads a video argument as (B, 3, T, H, W) in [-1, 1]: a safetensors file with one such
/// tensor, or a folder of frames (PNG or any format `image` reads, in file-name order) as one
/// video.
pub fn read_video_arg(path: &Path, device: &Device) -> Result<Tensor> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{} holds no frames",
                path.display()
            )));
        }
        let frames = files
            .iter()
            .map(|f| read_image(f, device))
            .collect::<Result<Vec<_>>>()?;
        let dims = frames[0].dims().to_vec();
        if let Some((f, t)) = files.iter().zip(&frames).find(|(_, t)| t.dims() != dims) {
            return Err(Error::InvalidArgument(format!(
                "frame {} has shape {:?}, the first frame {:?}: all frames must have one size",
                f.display(),
                t.dims(),
                dims
            )));
        }
        // (1, 3, H, W) per frame → (1, 3, T, H, W).
        return Ok(Tensor::stack(&frames, 2)?);
    }
    let t = read_single_tensor(path, device)?;
    if t.rank() != 5 || t.dim(1)? != 3 {
        return Err(Error::InvalidArgument(format!(
            "{} must hold one (B, 3, T, H, W) video tensor in [-1, 1]; it has shape {:?}",
            path.display(),
            t.dims()
        )));
    }
    Ok(t)
}

/// Paths for a batch of images: `out.png` for one; `out-0.png`, `out-1.png`, … for several.
pub fn image_paths(out: &Path, n: usize) -> Vec<PathBuf> {
    if n == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
    let ext = out.extension().and_then(|s| s.to_str()).unwrap_or("png");
    (0..n)
        .map(|i| out.with_file_name(format!("{stem}-{i}.{ext}")))
        .collect()
}

/// Writes (B, H, W, 3) images in [0, 1] as 8-bit PNGs (`round(x * 255)`, as diffusers).
pub fn save_images(images: &Tensor, out: &Path) -> Result<Vec<PathBuf>> {
    let (b, h, w, c) = images.dims4()?;
    if c != 3 {
        return Err(Error::InvalidArgument(format!(
            "expected RGB images, got {c} channels"
        )));
    }
    let paths = image_paths(out, b);
    for (i, p) in paths.iter().enumerate() {
        let px: Vec<u8> = images
            .get(i)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect();
        let buf =
            image::RgbImage::from_raw(w as u32, h as u32, px).ok_or_else(|| Error::Image {
                path: p.clone(),
                reason: "pixel buffer has the wrong size".into(),
            })?;
        let mut png = Vec::new();
        image::codecs::png::PngEncoder::new(&mut png)
            .write_image(
                buf.as_raw(),
                w as u32,
                h as u32,
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| Error::Write {
                path: p.clone(),
                reason: format!("cannot encode PNG: {e}"),
            })?;
        write_atomic(p, &png)?;
    }
    Ok(paths)
}

/// (B, 3, H, W) in about [-1, 1] to (B, H, W, 3) in [0, 1], as diffusers' postprocess.
pub fn to_unit_hwc(x: &Tensor) -> Result<Tensor> {
    Ok(((x / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))?
        .contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_back(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let bytes = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + n) % 8, 0, "data is not 8-byte aligned");
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut out: Vec<_> = st
            .tensors()
            .into_iter()
            .map(|(name, v)| {
                assert_eq!(v.dtype(), safetensors::Dtype::F32);
                let vals = v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                (name, v.shape().to_vec(), vals)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn saved_tensors_read_back_with_the_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let a = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        // Non-contiguous and another dtype: converted as they are written.
        let b = a.transpose(1, 2).unwrap().to_dtype(DType::BF16).unwrap();
        let name = "quote\"d";
        save_tensors(&p, &[("a", &a), (name, &b)]).unwrap();
        let got = read_back(&p);
        assert_eq!(got[0].0, "a");
        assert_eq!(got[0].1, vec![2, 3, 4]);
        assert_eq!(got[0].2, a.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(got[1].0, name);
        assert_eq!(got[1].1, vec![2, 4, 3]);
        let want = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        assert_eq!(got[1].2, want.to_vec1::<f32>().unwrap());
    }

    #[test]
    fn pieces_written_anywhere_make_the_whole_tensor() {
        let full = [2usize, 3, 5, 7, 6];
        let want = Tensor::randn(0f32, 1.0, &full, &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.safetensors");
        let mut file = TensorFileWriter::create(&p, "sample", &full).unwrap();
        let mut canvas = HostCanvas::zeros(&full);
        // Whole frames (the untiled decode) and tiles of one frame (the tiled one), in an
        // order that is not the file's.
        let mut pieces = Vec::new();
        for t in (0..5).rev() {
            if t % 2 == 0 {
                pieces.push(([0, 0, t, 0, 0], [2, 3, 1, 7, 6]));
            } else {
                for (y, h) in [(4, 3), (0, 4)] {
                    for (x, w) in [(0, 4), (4, 2)] {
                        pieces.push(([1, 0, t, y, x], [1, 3, 1, h, w]));
                        pieces.push(([0, 0, t, y, x], [1, 3, 1, h, w]));
                    }
                }
            }
        }
        for (at, size) in pieces {
            let mut piece = want.clone();
            for d in 0..5 {
                piece = piece.narrow(d, at[d], size[d]).unwrap();
            }
            file.write_region(&at, &piece).unwrap();
            canvas.write_region(&at, &piece).unwrap();
        }
        // Not in place before finish.
        assert!(!p.exists());
        file.finish().unwrap();
        let want_v = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = read_back(&p);
        assert_eq!((got[0].1.as_slice(), &got[0].2), (&full[..], &want_v));
        let c = canvas.into_tensor(&Device::Cpu).unwrap();
        assert_eq!(c.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want_v);
        // A piece that does not fit is an error, not a write elsewhere.
        let mut file = TensorFileWriter::create(&p, "sample", &full).unwrap();
        let piece = want.narrow(4, 0, 4).unwrap();
        assert!(file.write_region(&[0, 0, 0, 0, 3], &piece).is_err());
    }

    #[test]
    fn an_unfinished_file_leaves_nothing_and_the_old_file_survives() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.safetensors");
        std::fs::write(&p, b"precious").unwrap();
        let mut file = TensorFileWriter::create(&p, "sample", &[1, 2]).unwrap();
        let piece = Tensor::ones((1, 1), DType::F32, &Device::Cpu).unwrap();
        file.write_region(&[0, 1], &piece).unwrap();
        drop(file);
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
