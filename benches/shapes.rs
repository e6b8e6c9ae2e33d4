//! The models' hot conv and matmul shapes (tools/bench/shapes.txt), timed one by one: median
//! milliseconds and GFLOP/s per shape, as `METRIC` lines that tools/bench/side_by_side.py
//! compares with PyTorch's (tools/bench/torch_shapes.py) on the same machine:
//!
//!     python3 tools/bench/side_by_side.py --pairs 3 \
//!         --a "lowtide=target/release/deps/shapes-* --bench" \
//!         --b "torch=python tools/bench/torch_shapes.py"
//!
//! (or `cargo bench --bench shapes` alone). `SHAPES_FILTER=conv` keeps the lines containing it.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use lowtide::layers::conv2d::{conv2d, ConvSpec};
use lowtide::layers::{attention, dense};

/// The CLI's allocator, so buffer reuse is what `lowtide generate` sees.
#[global_allocator]
static ALLOC: lowtide::alloc::LowtideAlloc = lowtide::alloc::lowtide_alloc();

fn median_ms(mut f: impl FnMut()) -> f64 {
    f(); // warm-up: first-touch of buffers, thread pool start
    let (mut times, start) = (Vec::new(), Instant::now());
    while times.len() < 5 || (start.elapsed() < Duration::from_secs(2) && times.len() < 50) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/bench/shapes.txt");
    let text = std::fs::read_to_string(file).expect("tools/bench/shapes.txt");
    let filter = std::env::var("SHAPES_FILTER").unwrap_or_default();
    let dev = Device::Cpu;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || !line.contains(filter.as_str()) {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let v: Vec<usize> = f[1..].iter().map(|s| s.parse().expect(line)).collect();
        let (name, flops, ms) = match (f[0], v.as_slice()) {
            ("conv", &[n, c, h, w, co, k, s]) => {
                let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
                let wt = Tensor::randn(0f32, 0.05, (co, c, k, k), &dev).unwrap();
                let b = Tensor::randn(0f32, 0.05, co, &dev).unwrap();
                let spec = ConvSpec::new(s, k / 2, 1);
                let y = conv2d(&x, &wt, Some(&b), &spec).unwrap();
                let (_, _, ho, wo) = y.dims4().unwrap();
                let ms = median_ms(|| drop(conv2d(&x, &wt, Some(&b), &spec).unwrap()));
                (
                    format!("conv_{n}x{c}x{h}x{w}_to{co}_k{k}s{s}"),
                    2.0 * (n * c * co * k * k * ho * wo) as f64,
                    ms,
                )
            }
            ("mm", &[m, k, n]) => {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
                let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
                let b = Tensor::randn(0f32, 0.05, n, &dev).unwrap();
                let ms = median_ms(|| drop(dense::linear(&x, &w, Some(&b)).unwrap()));
                (format!("mm_{m}x{k}x{n}"), 2.0 * (m * k * n) as f64, ms)
            }
            ("attn", &[b, h, lq, lk, d]) => {
                let q = Tensor::randn(0f32, 1.0, (b, h, lq, d), &dev).unwrap();
                let k = Tensor::randn(0f32, 1.0, (b, h, lk, d), &dev).unwrap();
                let v = Tensor::randn(0f32, 1.0, (b, h, lk, d), &dev).unwrap();
                let ms = median_ms(|| drop(attention(&q, &k, &v, None).unwrap()));
                let name = format!("attn_{b}x{h}x{lq}x{lk}x{d}");
                (name, 4.0 * (b * h * lq * lk * d) as f64, ms)
            }
            _ => panic!("{file}: cannot read `{line}`"),
        };
        println!("METRIC {name}_ms {ms:.3}");
        println!("METRIC {name}_GFLOPs {:.1}", flops / ms / 1e6);
    }
}
