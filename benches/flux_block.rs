//! lowtide's side of the FLUX block benchmark (tools/bench/flux_block.py writes the model and
//! its inputs and runs PyTorch's side): a full-width FLUX transformer cut to one double-stream
//! block, fp32, forward at 1024 image and 512 text tokens; prints the median as a `METRIC`
//! line for tools/bench/side_by_side.py.
//!
//!     python tools/bench/flux_block.py --write /tmp/flux1block
//!     FLUX_BLOCK_DIR=/tmp/flux1block cargo bench --bench flux_block
//!
//! `FLUX_BLOCK_OUT=o.safetensors` saves the output; `flux_block.py DIR --compare o.safetensors`
//! prints its error against float64 PyTorch.

use std::time::Instant;

use candle_core::{DType, Device};
use lowtide::models::{FluxInputs, FluxTransformer2DModel, FluxTransformerConfig};
use lowtide::pipelines::Component;
use lowtide::weights::WeightStore;

#[global_allocator]
static ALLOC: lowtide::alloc::LowtideAlloc = lowtide::alloc::lowtide_alloc();

fn main() {
    let Some(dir) = std::env::var_os("FLUX_BLOCK_DIR") else {
        eprintln!("set FLUX_BLOCK_DIR to a folder written by tools/bench/flux_block.py --write");
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let dev = Device::Cpu;
    let c = Component::open(
        &dir,
        "transformer",
        "diffusion_pytorch_model",
        None,
        None,
        &dev,
        DType::F32,
        Default::default(),
    )
    .expect("transformer");
    let pp = c.param_root();
    let cfg: FluxTransformerConfig = c.config().expect("config");
    let m = FluxTransformer2DModel::new(&pp, &cfg).expect("model");
    let store = WeightStore::open(&[dir.join("inputs.safetensors")]).expect("inputs");
    let get = |n: &str| {
        let shape = store.get(n).expect(n).shape.clone();
        store.load(n, &shape, DType::F32, &dev).expect(n)
    };
    let (x, e, p, t, ii, ti) = (
        get("hidden_states"),
        get("encoder_hidden_states"),
        get("pooled_projections"),
        get("timestep"),
        get("img_ids"),
        get("txt_ids"),
    );
    let inp = FluxInputs {
        hidden_states: &x,
        encoder_hidden_states: &e,
        pooled_projections: &p,
        timestep: &t,
        guidance: None,
        img_ids: &ii,
        txt_ids: &ti,
    };
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let mut times = Vec::new();
    for i in 0..=runs {
        let t0 = Instant::now();
        let out = m.forward(&inp).expect("forward");
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        // FLUX_BLOCK_OUT=file.safetensors: the output, for tools/bench/flux_block.py --compare.
        if let (0, Some(p)) = (i, std::env::var_os("FLUX_BLOCK_OUT")) {
            lowtide::io::save_tensors(p.as_ref(), &[("out", &out)]).expect("FLUX_BLOCK_OUT");
        }
    }
    times.sort_by(f64::total_cmp);
    println!("METRIC flux_1block_ms {:.1}", times[times.len() / 2]);
    // With LOWTIDE_PROFILE=1: where the time went, op by op (all runs).
    eprint!("{}", lowtide::profile::report());
}
