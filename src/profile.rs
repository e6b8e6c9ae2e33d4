//! Op-level timing for finding where compute goes: with `LOWTIDE_PROFILE=1`, layers time
//! themselves under a label (op and shape) and the totals are printed to stderr at exit, most
//! costly first. Off, a span costs one relaxed atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static STATE: AtomicU8 = AtomicU8::new(0); // 0 unknown, 1 off, 2 on
static TOTALS: Mutex<Option<HashMap<String, (u64, Duration)>>> = Mutex::new(None);

fn enabled() -> bool {
    match STATE.load(Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = std::env::var_os("LOWTIDE_PROFILE").is_some_and(|v| v != "0");
            STATE.store(if on { 2 } else { 1 }, Relaxed);
            on
        }
    }
}

/// Times `f` under the label `label()` (built only when profiling is on).
pub fn span<T>(label: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let t0 = Instant::now();
    let out = f();
    let dt = t0.elapsed();
    let mut g = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let e = g
        .get_or_insert_with(HashMap::new)
        .entry(label())
        .or_default();
    e.0 += 1;
    e.1 += dt;
    out
}

/// The totals so far as a table (label, calls, seconds), most costly first; empty when off.
pub fn report() -> String {
    let g = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    let Some(m) = g.as_ref() else {
        return String::new();
    };
    let mut rows: Vec<_> = m.iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1 .1));
    let total: f64 = rows.iter().map(|r| r.1 .1.as_secs_f64()).sum();
    let mut s = format!("profile: {total:.3} s in timed ops\n");
    for (label, (n, d)) in rows {
        s += &format!("{:>9.4} s {:>6} x  {label}\n", d.as_secs_f64(), n);
    }
    s
}
