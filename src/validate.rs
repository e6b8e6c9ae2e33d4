//! The one validation layer: config values that size tensors or loops, numbers checked in the
//! dtype they are used in, output paths and the memory a run needs — all checked before any
//! model work, so a bad value is an `error:` line and never a panic, an abort or a black image.

use std::path::Path;

use candle_core::Tensor;

use crate::error::{Error, Result};

/// A config count that sizes a tensor or a loop: in `[min, max]`, else an error naming the
/// file and field. The upper bounds are far above any real model and only stop absurd values
/// (a `u64::MAX` layer count) before they turn into allocations.
pub fn count(file: &str, field: &str, value: usize, min: usize, max: usize) -> Result<usize> {
    if value < min || value > max {
        return Err(Error::unsupported(
            file,
            field,
            value,
            format!("must be between {min} and {max}"),
        ));
    }
    Ok(value)
}

/// Every entry of a per-block list through [`count`].
pub fn counts(file: &str, field: &str, values: &[usize], min: usize, max: usize) -> Result<()> {
    for &v in values {
        count(file, field, v, min, max)?;
    }
    Ok(())
}

/// A config number used in f32: finite there (1e39 is finite in f64 but not in f32) and,
/// unless `zero_ok`, not zero.
pub fn config_f32(file: &str, field: &str, value: f64, zero_ok: bool) -> Result<f32> {
    let v = value as f32;
    if !v.is_finite() || (!zero_ok && v == 0.0) {
        return Err(Error::unsupported(
            file,
            field,
            value,
            if zero_ok {
                "must be a finite 32-bit float"
            } else {
                "must be a finite, non-zero 32-bit float"
            },
        ));
    }
    Ok(v)
}

/// A command-line number used in f32.
pub fn arg_f32(flag: &str, value: f64) -> Result<f32> {
    let v = value as f32;
    if !v.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "{flag} {value} is not a finite 32-bit float (the computation runs in f32)"
        )));
    }
    Ok(v)
}

/// Fails, naming `what`, when `t` holds a NaN or an infinity.
pub fn finite(t: &Tensor, what: impl FnOnce() -> String) -> Result<()> {
    let bad = t
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?
        .iter()
        .any(|v| !v.is_finite());
    if bad {
        return Err(Error::NonFinite(what()));
    }
    Ok(())
}

/// Checks an output path before any work: a file name with one of `exts` in an existing,
/// writable folder, and not a folder itself.
pub fn output_path(flag: &str, path: &Path, exts: &[&str]) -> Result<()> {
    let bad =
        |reason: String| Error::InvalidArgument(format!("{flag} {}: {reason}", path.display()));
    if path.is_dir() {
        return Err(bad(format!(
            "is a folder; give a file name ending in .{}",
            exts[0]
        )));
    }
    if path.file_name().is_none() {
        return Err(bad(format!("give a file name ending in .{}", exts[0])));
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext {
        Some(e) if exts.contains(&e.as_str()) => {}
        Some(e) => {
            return Err(bad(format!(
                "lowtide cannot write .{e} files here; use .{}",
                exts.join(" or .")
            )))
        }
        None => {
            return Err(bad(format!(
                "has no extension; use .{}",
                exts.join(" or .")
            )))
        }
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(bad(format!(
            "the folder {} does not exist; create it first",
            dir.display()
        )));
    }
    // Probe the folder: outputs are written there as a temporary file and renamed into place.
    let probe = dir.join(format!(".lowtide-probe-{}", std::process::id()));
    match std::fs::File::create(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(bad(format!("cannot write into {}: {e}", dir.display()))),
    }
}

/// Bytes as a short human figure for messages.
pub fn human_bytes(b: f64) -> String {
    const G: f64 = 1024.0 * 1024.0 * 1024.0;
    if b >= 1024.0 * G {
        format!("{:.1} TiB", b / (1024.0 * G))
    } else if b >= G {
        format!("{:.1} GiB", b / G)
    } else {
        format!("{:.0} MiB", b / (1024.0 * 1024.0))
    }
}

/// Memory the OS can give this process now (`MemAvailable`), where the platform tells.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// One part of a run's memory estimate, for the message when it does not fit.
pub struct Need {
    pub what: &'static str,
    pub bytes: f64,
}

/// Refuses a run whose estimated peak (the sum of `needs`, in f64 so absurd sizes cannot
/// overflow) exceeds the memory available, before anything is allocated.
pub fn fits_in_memory(needs: &[Need], hint: &str) -> Result<()> {
    fits_in(needs, available_memory(), "", hint)
}

/// [`fits_in_memory`] against the free memory of the execution device: a CUDA device's
/// `cuMemGetInfo` (what the GPU can still give, whatever other processes hold), the host's
/// memory for the CPU. Where the device cannot tell, nothing is refused.
pub fn fits_on_device(device: &candle_core::Device, needs: &[Need], hint: &str) -> Result<()> {
    match crate::device::device_memory(device) {
        Some(m) => fits_in(needs, Some(m.free_bytes), " of device memory", hint),
        None if device.is_cpu() => fits_in_memory(needs, hint),
        None => Ok(()),
    }
}

/// Refuses `needs` above `available` bytes (`None`: unknown, nothing refused); `of` says whose
/// memory it is in the message.
pub fn fits_in(needs: &[Need], available: Option<u64>, of: &str, hint: &str) -> Result<()> {
    let total: f64 = needs.iter().map(|n| n.bytes).sum();
    let Some(avail) = available else {
        return Ok(());
    };
    if total > avail as f64 {
        let parts = needs
            .iter()
            .filter(|n| n.bytes > 0.0)
            .map(|n| format!("{} {}", n.what, human_bytes(n.bytes)))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(Error::InsufficientMemory {
            what: format!("this run ({parts})"),
            needed: human_bytes(total),
            available: format!("{}{of} are available;", human_bytes(avail as f64)),
            hint: hint.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_checks_name_whose_memory_is_short() {
        let needs = [
            Need {
                what: "weights",
                bytes: 3.0 * 1024.0 * 1024.0 * 1024.0,
            },
            Need {
                what: "VAE decode",
                bytes: 1024.0 * 1024.0 * 1024.0,
            },
        ];
        let gib = 1u64 << 30;
        assert!(fits_in(&needs, Some(4 * gib), "", "hint").is_ok());
        assert!(fits_in(&needs, None, "", "hint").is_ok());
        let e = fits_in(&needs, Some(2 * gib), " of device memory", "use offload")
            .unwrap_err()
            .to_string();
        for part in [
            "weights 3.0 GiB",
            "VAE decode 1.0 GiB",
            "of device memory",
            "use offload",
        ] {
            assert!(e.contains(part), "{part:?} missing from: {e}");
        }
        // The CPU is checked against the host's memory; an absurd need is refused there.
        let huge = [Need {
            what: "weights",
            bytes: 1e30,
        }];
        assert!(fits_on_device(&candle_core::Device::Cpu, &huge, "h").is_err());
        assert!(fits_on_device(&candle_core::Device::Cpu, &needs[1..], "h").is_ok());
    }
}
