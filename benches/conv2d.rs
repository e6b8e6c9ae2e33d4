//! conv2d throughput: lowtide's chunked tap-GEMM conv against candle's im2col conv.
//! `cargo bench --bench conv2d` (GFLOP/s = 2·C_in·C_out·k²·H_out·W_out / time).

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lowtide::layers::conv2d::{conv2d, ConvSpec, Padding};

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    // (channels, input side, stride): the UNet's 64x64 level, the VAE's 512x512 level and the
    // VAE encoder's first downsampler (stride 2, padded right/bottom as diffusers does).
    for (ch, hw, stride) in [(320usize, 64usize, 1usize), (128, 512, 1), (128, 512, 2)] {
        let x = Tensor::randn(0f32, 1.0, (1, ch, hw, hw), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.05, (ch, ch, 3, 3), &dev).unwrap();
        let b = Tensor::zeros(ch, DType::F32, &dev).unwrap();
        let spec = if stride == 1 {
            ConvSpec::new(1, 1, 1)
        } else {
            ConvSpec {
                stride,
                groups: 1,
                padding: Padding {
                    top: 0,
                    bottom: 1,
                    left: 0,
                    right: 1,
                },
            }
        };
        let out = hw / stride;
        let flops = 2 * ch * ch * 9 * out * out;
        let mut g = c.benchmark_group(format!("conv3x3_s{stride}_{ch}ch_{hw}px"));
        g.throughput(Throughput::Elements(flops as u64));
        g.sample_size(10);
        g.bench_function("lowtide", |bch| {
            bch.iter(|| conv2d(&x, &w, Some(&b), &spec).unwrap())
        });
        g.bench_function("candle", |bch| {
            bch.iter(|| {
                if stride == 1 {
                    x.conv2d(&w, 1, 1, 1, 1).unwrap()
                } else {
                    x.pad_with_zeros(2, 0, 1)
                        .unwrap()
                        .pad_with_zeros(3, 0, 1)
                        .unwrap()
                        .conv2d(&w, 0, stride, 1, 1)
                        .unwrap()
                }
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
