//! Attention: the flash kernel against the composed chunked path, self-attention at the token
//! counts of the UNet (1024, 4096), FLUX and the video models (16384), the VAE's one-head
//! mid-block and CLIP's masked 77 tokens. `cargo bench --bench attention` prints first each
//! path's peak heap above its inputs and output for one call (the working set), then criterion's
//! timings; "elements" in the throughput are floating-point operations (4·b·h·l²·d).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use candle_core::{Device, Tensor};
use criterion::{Criterion, Throughput};
use lowtide::layers::attention::{attention_chunked, attention_flash};

/// The system allocator, counting live and peak bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            PEAK.fetch_max(LIVE.fetch_add(l.size(), Relaxed) + l.size(), Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            PEAK.fetch_max(LIVE.fetch_add(l.size(), Relaxed) + l.size(), Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, size: usize) -> *mut u8 {
        let q = System.realloc(p, l, size);
        if !q.is_null() {
            let now = LIVE.fetch_add(size, Relaxed) + size;
            PEAK.fetch_max(now, Relaxed);
            LIVE.fetch_sub(l.size(), Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

type Attn = fn(&Tensor, &Tensor, &Tensor, Option<&Tensor>, f64) -> lowtide::Result<Tensor>;

/// (batch, heads, tokens, head_dim).
const SHAPES: [(usize, usize, usize, usize); 6] = [
    (1, 8, 1024, 64),
    (2, 8, 4096, 40),   // SD1.5's UNet at 512x512 (64x64 latent), batch 2 for CFG
    (1, 24, 4096, 128), // FLUX at 1024x1024
    (1, 8, 4096, 64),
    (1, 1, 4096, 512),  // the VAE mid-block at 512x512
    (1, 2, 16384, 128), // video models' token counts (two of the heads)
];

fn inputs(&(b, h, l, d): &(usize, usize, usize, usize)) -> [Tensor; 3] {
    let dev = Device::Cpu;
    [0, 1, 2].map(|_| Tensor::randn(0f32, 1.0, (b, h, l, d), &dev).unwrap())
}

/// Peak heap bytes above the inputs and the output during one call, in a fresh thread pool so
/// that per-thread buffers (the flash kernel's scratch, gemm's packing buffers) are counted.
fn working_set(f: Attn, shape: &(usize, usize, usize, usize)) -> usize {
    let [q, k, v] = inputs(shape);
    let scale = 1.0 / (shape.3 as f64).sqrt();
    let pool = rayon::ThreadPoolBuilder::new().build().unwrap();
    pool.broadcast(|_| ()); // the workers are up, with their own allocations
    let before = LIVE.load(Relaxed);
    PEAK.store(before, Relaxed);
    let out = pool.install(|| f(&q, &k, &v, None, scale).unwrap());
    let out_bytes = out.elem_count() * 4;
    PEAK.load(Relaxed) - before - out_bytes
}

fn bench(c: &mut Criterion) {
    let paths: [(&str, Attn); 2] = [("flash", attention_flash), ("chunked", attention_chunked)];
    // ATTN_SKIP_MEMORY=1 skips the working-set calls (the chunked ones take seconds).
    let memory = std::env::var_os("ATTN_SKIP_MEMORY").is_none();
    for shape in SHAPES.iter().filter(|_| memory) {
        let (b, h, l, d) = *shape;
        for (name, f) in paths {
            let ws = working_set(f, shape);
            println!(
                "working set b{b} h{h} l{l} d{d} {name}: {:.2} MiB",
                ws as f64 / (1 << 20) as f64
            );
        }
    }
    for shape in &SHAPES {
        let (b, h, l, d) = *shape;
        let [q, k, v] = inputs(shape);
        let scale = 1.0 / (d as f64).sqrt();
        let mut g = c.benchmark_group(format!("attn_b{b}_h{h}_l{l}_d{d}"));
        // Two products of (l × l × d) per head.
        g.throughput(Throughput::Elements((4 * b * h * l * l * d) as u64));
        g.sample_size(10);
        for (name, f) in paths {
            g.bench_function(name, |bch| bch.iter(|| f(&q, &k, &v, None, scale).unwrap()));
        }
        g.finish();
    }
    // CLIP's text encoder: 77 tokens with its causal mask, where the work is small.
    let [q, k, v] = inputs(&(2, 12, 77, 64));
    let causal: Vec<f32> = (0..77 * 77)
        .map(|i| {
            if i % 77 > i / 77 {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(causal, (1, 1, 77, 77), &Device::Cpu).unwrap();
    let mut g = c.benchmark_group("attn_clip_b2_h12_l77_d64_causal");
    for (name, f) in paths {
        g.bench_function(name, |bch| {
            bch.iter(|| f(&q, &k, &v, Some(&mask), 0.125).unwrap())
        });
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c);
    c.final_summary();
}
