//! Files in and out: PNG images and safetensors tensor files given on the command line.

use std::collections::HashMap;
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

/// The one output writer: `bytes` go to a temporary file beside `path`, are synced, and the file
/// is renamed into place, so an existing file survives any failure (a full disk, a bad path) and
/// no partial file is left. Permissions follow the user's umask, as for any new file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let fail = |reason: String| Error::Write {
        path: path.to_path_buf(),
        reason,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| fail("not a file name".into()))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.lowtide-{}.tmp", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        fail(e.to_string())
    })
}

/// Writes named tensors as f32 safetensors.
pub fn save_tensors(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    let mut map = HashMap::new();
    for (name, t) in tensors {
        map.insert(
            name.to_string(),
            t.to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .contiguous()?,
        );
    }
    let bytes = safetensors::serialize(&map, None).map_err(|e| Error::Write {
        path: path.to_path_buf(),
        reason: format!("cannot serialise tensors: {e}"),
    })?;
    write_atomic(path, &bytes)
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
