//! Device maps: whole components placed on different devices (diffusers' pipeline-level
//! `device_map`). A device map and offloading exclude each other until the map is reset.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Component name → device name (`cpu`, `cuda:0`, …).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceMap {
    pub placement: BTreeMap<String, String>,
}

impl DeviceMap {
    pub fn device_of(&self, component: &str) -> Option<&str> {
        self.placement.get(component).map(String::as_str)
    }

    /// Parses explicit `component=device` pairs separated by commas.
    pub fn parse_explicit(spec: &str) -> Result<Self> {
        let mut placement = BTreeMap::new();
        for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (c, d) = pair.split_once('=').ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "--device-map entry `{pair}` is not COMPONENT=DEVICE (or use `balanced`)"
                ))
            })?;
            placement.insert(c.trim().to_string(), d.trim().to_string());
        }
        if placement.is_empty() {
            return Err(Error::InvalidArgument("--device-map is empty".into()));
        }
        Ok(Self { placement })
    }
}

/// Parses a byte count: `123`, `512MiB`, `6GiB`, `2GB`, `1.5GiB`.
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024f64.powi(2),
        "gib" => 1024f64.powi(3),
        "tib" => 1024f64.powi(4),
        _ => f64::NAN,
    };
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    let v = n * mult;
    if !v.is_finite() || v < 0.0 {
        return Err(Error::InvalidArgument(format!(
            "`{s}` is not a size; write e.g. 6GiB, 512MiB or 2000000000"
        )));
    }
    Ok(v as u64)
}

/// Parses `--max-memory cuda:0=6GiB,cuda:1=6GiB,cpu=16GiB`, in the order given.
pub fn parse_max_memory(spec: &str) -> Result<Vec<(String, u64)>> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (d, b) = pair.split_once('=').ok_or_else(|| {
            Error::InvalidArgument(format!(
                "--max-memory entry `{pair}` is not DEVICE=SIZE (e.g. cuda:0=6GiB)"
            ))
        })?;
        let d = d.trim().to_string();
        if out.iter().any(|(e, _)| *e == d) {
            return Err(Error::InvalidArgument(format!(
                "--max-memory names `{d}` twice"
            )));
        }
        out.push((d, parse_bytes(b)?));
    }
    if out.is_empty() {
        return Err(Error::InvalidArgument("--max-memory is empty".into()));
    }
    Ok(out)
}

/// diffusers' "balanced" placement: components, largest first, go round the accelerators in a
/// there-and-back cycle (sorted by budget, largest first); one that does not fit the device whose
/// turn it is goes to the CPU. Unlike diffusers, CPU placements accumulate (diffusers keeps only
/// the last) and a CPU budget, when given, is enforced.
pub fn plan_balanced(sizes: &[(String, u64)], max_memory: &[(String, u64)]) -> Result<DeviceMap> {
    let mut sizes = sizes.to_vec();
    sizes.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut accel: Vec<(String, u64)> = max_memory
        .iter()
        .filter(|(d, _)| d != "cpu")
        .cloned()
        .collect();
    accel.sort_by_key(|a| std::cmp::Reverse(a.1));
    let mut cpu_left = max_memory.iter().find(|(d, _)| d == "cpu").map(|(_, b)| *b);
    let ids: Vec<String> = accel.iter().map(|(d, _)| d.clone()).collect();
    let cycle: Vec<String> = ids.iter().chain(ids.iter().rev()).cloned().collect();
    let mut left: BTreeMap<String, u64> = accel.into_iter().collect();
    let mut placement = BTreeMap::new();
    let mut turn = 0usize;
    for (component, size) in sizes {
        if !cycle.is_empty() {
            let dev = &cycle[turn % cycle.len()];
            let room = left.get_mut(dev).expect("device in cycle");
            if size <= *room {
                *room -= size;
                turn += 1;
                placement.insert(component, dev.clone());
                continue;
            }
        }
        if let Some(cpu) = cpu_left.as_mut() {
            if size > *cpu {
                return Err(Error::InvalidArgument(format!(
                    "the device map cannot fit `{component}` ({size} bytes): no device in --max-memory has room; raise a budget or use offloading instead"
                )));
            }
            *cpu -= size;
        }
        placement.insert(component, "cpu".to_string());
    }
    Ok(DeviceMap { placement })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn sizes() -> Vec<(String, u64)> {
        vec![
            ("text_encoder".into(), 492_000_000),
            ("unet".into(), 3_438_000_000),
            ("vae".into(), 335_000_000),
        ]
    }

    #[test]
    fn balanced_cycles_over_devices_largest_first() {
        let m = plan_balanced(
            &sizes(),
            &[("cuda:0".into(), 6 * GIB), ("cuda:1".into(), 6 * GIB)],
        )
        .unwrap();
        assert_eq!(m.device_of("unet"), Some("cuda:0"));
        assert_eq!(m.device_of("text_encoder"), Some("cuda:1"));
        // The cycle goes back: cuda:1 again.
        assert_eq!(m.device_of("vae"), Some("cuda:1"));
    }

    #[test]
    fn too_big_for_its_turn_goes_to_cpu() {
        let m =
            plan_balanced(&sizes(), &[("cuda:0".into(), GIB), ("cpu".into(), 8 * GIB)]).unwrap();
        assert_eq!(m.device_of("unet"), Some("cpu"));
        assert_eq!(m.device_of("text_encoder"), Some("cuda:0"));
        assert_eq!(m.device_of("vae"), Some("cuda:0"));
    }

    #[test]
    fn cpu_only_places_everything_on_cpu() {
        let m = plan_balanced(&sizes(), &[("cpu".into(), 16 * GIB)]).unwrap();
        assert!(m.placement.values().all(|d| d == "cpu"));
        assert_eq!(m.placement.len(), 3);
    }

    #[test]
    fn nothing_fits_is_an_error() {
        let e =
            plan_balanced(&sizes(), &[("cuda:0".into(), GIB), ("cpu".into(), GIB)]).unwrap_err();
        assert!(e.to_string().contains("unet"), "{e}");
    }

    #[test]
    fn parses_sizes_and_maps() {
        assert_eq!(parse_bytes("6GiB").unwrap(), 6 * GIB);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("6 parsecs").is_err());
        assert!(parse_bytes("").is_err());
        let mm = parse_max_memory("cuda:0=6GiB, cpu=16GiB").unwrap();
        assert_eq!(
            mm,
            vec![("cuda:0".into(), 6 * GIB), ("cpu".into(), 16 * GIB)]
        );
        assert!(parse_max_memory("cuda:0:6GiB").is_err());
        assert!(parse_max_memory("cpu=1GiB,cpu=2GiB").is_err());
        let dm = DeviceMap::parse_explicit("unet=cuda:0,vae=cpu").unwrap();
        assert_eq!(dm.device_of("unet"), Some("cuda:0"));
        assert!(DeviceMap::parse_explicit("unet").is_err());
    }
}
