//! conv2d throughput: lowtide's chunked tap-GEMM conv against candle's im2col conv.
//! `cargo bench --bench conv2d` (GFLOP/s = 2·C_in·C_out·k²·H·W / time).

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    for (ch, hw) in [(320usize, 64usize), (128, 512)] {
        let x = Tensor::randn(0f32, 1.0, (1, ch, hw, hw), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.05, (ch, ch, 3, 3), &dev).unwrap();
        let b = Tensor::zeros(ch, DType::F32, &dev).unwrap();
        let flops = 2 * ch * ch * 9 * hw * hw;
        let mut g = c.benchmark_group(format!("conv3x3_{ch}ch_{hw}px"));
        g.throughput(Throughput::Elements(flops as u64));
        g.sample_size(10);
        g.bench_function("lowtide", |bch| {
            bch.iter(|| lowtide::layers::conv2d::conv2d(&x, &w, Some(&b), 1).unwrap())
        });
        g.bench_function("candle", |bch| {
            bch.iter(|| x.conv2d(&w, 1, 1, 1, 1).unwrap())
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
